//! Other poolers' configs turned into Switchyard's (`switchyard import`), so that a
//! team moves over with one file. Each importer reads the other tool's files and writes
//! a commented `switchyard.toml`: what maps is set, what has no equivalent is listed as
//! a comment naming the setting, so nothing is dropped silently.

pub mod pgbouncer;

/// A TOML string literal (basic string, escaped).
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

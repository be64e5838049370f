//! Other poolers' configs turned into Switchyard's (`switchyard import`), so that a
//! team moves over with one file. Each importer reads the other tool's files and writes
//! a commented `switchyard.toml`: what maps is set, what has no equivalent is listed as
//! a comment naming the setting, so nothing is dropped silently.

pub mod haproxy;
pub mod pgbouncer;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{file}:{line}: {reason}")]
    Syntax { file: String, line: usize, reason: String },
    /// Nothing in the file can be converted safely; the reason says what was found.
    #[error("{file}: {reason}")]
    Unsupported { file: String, reason: String },
}

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

/// A name usable as a TOML bare key and a cluster or node name.
fn name_of(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if n.is_empty() {
        "main".into()
    } else {
        n
    }
}

/// `name`, or `name2`, `name3`... if it is taken; the result is then taken.
fn unique_name(base: String, taken: &mut Vec<String>) -> String {
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}{n}");
        n += 1;
    }
    taken.push(name.clone());
    name
}

/// The report of what did not carry over, as comment lines.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    /// A note, unless the same one is already there.
    fn add(&mut self, what: impl Into<String>) {
        let what = what.into();
        if !self.0.contains(&what) {
            self.0.push(what);
        }
    }

    /// The closing comment: one `# - ` item per note (its further lines indented).
    fn write_to(&self, out: &mut String) {
        use std::fmt::Write as _;
        if self.0.is_empty() {
            return;
        }
        let _ = writeln!(out, "# Not carried over:");
        for n in &self.0 {
            for (i, line) in n.lines().enumerate() {
                let _ = writeln!(out, "#{} {line}", if i == 0 { " -" } else { "  " });
            }
        }
    }
}

/// A `[[clusters.NAME.nodes]]` entry.
fn write_node(out: &mut String, cluster: &str, node: &str, host: &str, port: u16) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "[[clusters.{cluster}.nodes]]\nname = {}\nhost = {}\nport = {port}\n",
        quote(node),
        quote(host)
    );
}

//! Reading PgBouncer's files as PgBouncer does: its INI (`;` and `#` comments,
//! `%include`, keys with spaces in `[databases]`), the libpq-style connection strings in
//! its values, `userlist.txt`, and its durations. Written here: the few INI crates do not
//! follow these rules, and the connection strings are PgBouncer's own syntax.

use super::ImportError;

/// One `key = value` of the INI, with its line.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// Sections in file order, each with its entries in order.
#[derive(Debug, Default)]
pub(super) struct Ini {
    pub sections: Vec<(String, Vec<Entry>)>,
    pub includes: Vec<String>,
}

impl Ini {
    pub fn section<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Entry> + 'a {
        self.sections
            .iter()
            .filter(move |(s, _)| s.eq_ignore_ascii_case(name))
            .flat_map(|(_, e)| e.iter())
    }
}

pub(super) fn parse_ini(file: &str, text: &str) -> Result<Ini, ImportError> {
    let mut ini = Ini::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with(';') || line.starts_with('#') {
            continue;
        }
        if let Some(rest) = line.strip_prefix("%include") {
            ini.includes.push(rest.trim().to_string());
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let name = name.strip_suffix(']').ok_or_else(|| ImportError::Syntax {
                file: file.to_string(),
                line: i + 1,
                reason: format!("a section header must end with ']': {line}"),
            })?;
            ini.sections.push((name.trim().to_string(), Vec::new()));
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(ImportError::Syntax {
                file: file.to_string(),
                line: i + 1,
                reason: format!("expected `key = value`: {line}"),
            });
        };
        let Some((_, entries)) = ini.sections.last_mut() else {
            return Err(ImportError::Syntax {
                file: file.to_string(),
                line: i + 1,
                reason: "a setting before any [section]".into(),
            });
        };
        entries.push(Entry {
            key: key.trim().to_string(),
            value: value.trim().to_string(),
            line: i + 1,
        });
    }
    Ok(ini)
}

/// A libpq-style connection string (`host=a port=5432 dbname='x y'`) as pairs.
pub(super) fn parse_connstr(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return Ok(out);
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(format!("expected `=` after \"{key}\""));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quote in the value of \"{key}\"")),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key.to_ascii_lowercase(), value));
    }
}

/// `userlist.txt`: `"name" "password"` per line (`""` is a quote inside).
pub(super) fn parse_userlist(text: &str) -> Vec<(String, String)> {
    let mut users = Vec::new();
    for line in text.lines() {
        let mut fields = Vec::new();
        let mut chars = line.trim().chars().peekable();
        while chars.peek() == Some(&'"') {
            chars.next();
            let mut field = String::new();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') | None => break,
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        }
        if fields.len() >= 2 {
            users.push((fields[0].clone(), fields[1].clone()));
        }
    }
    users
}

/// A PgBouncer duration (seconds, fractions allowed; or with a unit: `ms`, `s`, `min`,
/// `h`, `d`) in milliseconds.
pub(super) fn millis(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let n: f64 = number.trim().parse().ok()?;
    let factor = match unit.trim() {
        "" | "s" => 1000.0,
        "ms" => 1.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return None,
    };
    (n >= 0.0).then(|| (n * factor).round() as u64)
}

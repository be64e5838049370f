//! Reading HAProxy's configuration as HAProxy does: a section starts at a line whose first
//! word is a section keyword (`global`, `defaults`, `frontend`, `backend`, `listen`, ...),
//! indentation means nothing; a line's words are split at blanks, with `"..."`, `'...'`
//! and `\` escapes, and `#` starts a comment. Also its time values (milliseconds unless a
//! unit says otherwise) and its addresses. Written here: no crate reads this format.

use std::collections::BTreeMap;

use super::ImportError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Global,
    Defaults,
    Frontend,
    Backend,
    Listen,
    /// `resolvers`, `peers`, `userlist`, `mailers`, `program`, `cache`, ...
    Other,
}

/// One line: its words and its number in the file.
#[derive(Debug, Clone)]
pub(super) struct Line {
    pub words: Vec<String>,
    pub line: usize,
}

impl Line {
    /// The line's words joined again (for messages and comments).
    pub fn text(&self) -> String {
        printable(&self.words.join(" "))
    }

    /// The word after the keyword of `n` words (`timeout connect 4s`: `arg(2)` is `4s`).
    pub fn arg(&self, n: usize) -> Option<&str> {
        self.words.get(n).map(String::as_str)
    }
}

#[derive(Debug)]
pub(super) struct Section {
    pub kind: Kind,
    /// The keyword as written (`listen`, `resolvers`...).
    pub keyword: String,
    pub name: String,
    /// The header line's words after the name (HAProxy 1.x's `listen NAME ADDR:PORT`).
    pub args: Vec<String>,
    pub line: usize,
    pub lines: Vec<Line>,
    /// The `defaults` section in effect: the last one before this section.
    pub defaults: Option<usize>,
}

impl Section {
    /// `listen primary`, `backend master`...
    pub fn title(&self) -> String {
        if self.name.is_empty() {
            self.keyword.clone()
        } else {
            format!("{} {}", self.keyword, printable(&self.name))
        }
    }
}

/// Text from the file as it can stand in a one-line comment: control characters (from
/// `\r`, `\n` escapes) written as escapes again.
pub(super) fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            '\r' => vec!['\\', 'r'],
            '\n' => vec!['\\', 'n'],
            '\t' => vec!['\\', 't'],
            c if c.is_control() => vec!['?'],
            c => vec![c],
        })
        .collect()
}

const SECTIONS: &[(&str, Kind)] = &[
    ("global", Kind::Global),
    ("defaults", Kind::Defaults),
    ("frontend", Kind::Frontend),
    ("backend", Kind::Backend),
    ("listen", Kind::Listen),
    ("resolvers", Kind::Other),
    ("peers", Kind::Other),
    ("userlist", Kind::Other),
    ("mailers", Kind::Other),
    ("program", Kind::Other),
    ("http-errors", Kind::Other),
    ("ring", Kind::Other),
    ("cache", Kind::Other),
    ("fcgi-app", Kind::Other),
    ("log-forward", Kind::Other),
    ("crt-store", Kind::Other),
    ("traces", Kind::Other),
    ("acme", Kind::Other),
];

pub(super) fn parse(file: &str, text: &str) -> Result<Vec<Section>, ImportError> {
    let mut sections: Vec<Section> = Vec::new();
    let mut defaults: Option<usize> = None;
    for (i, raw) in text.lines().enumerate() {
        let words = words(raw).map_err(|reason| ImportError::Syntax {
            file: file.to_string(),
            line: i + 1,
            reason,
        })?;
        let Some(first) = words.first() else {
            continue;
        };
        if let Some((_, kind)) = SECTIONS.iter().find(|(k, _)| k == first) {
            sections.push(Section {
                kind: *kind,
                keyword: first.clone(),
                name: words.get(1).cloned().unwrap_or_default(),
                args: words.iter().skip(2).cloned().collect(),
                line: i + 1,
                lines: Vec::new(),
                defaults: if *kind == Kind::Defaults { None } else { defaults },
            });
            if *kind == Kind::Defaults {
                defaults = Some(sections.len() - 1);
            }
            continue;
        }
        let Some(section) = sections.last_mut() else {
            return Err(ImportError::Syntax {
                file: file.to_string(),
                line: i + 1,
                reason: format!("\"{first}\" before any section (global, defaults, listen, ...)"),
            });
        };
        section.lines.push(Line { words, line: i + 1 });
    }
    Ok(sections)
}

/// A line's words: split at blanks; `"..."` (with escapes) and `'...'` (literal) quote,
/// `\` escapes one character outside single quotes (`\r`, `\n`, `\t` as in C), and `#`
/// outside quotes starts a comment.
pub(super) fn words(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some('\''), '\'') | (Some('"'), '"') => quote = None,
            (Some('\''), c) => word.push(c),
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    Some('r') => word.push('\r'),
                    Some('n') => word.push('\n'),
                    Some('t') => word.push('\t'),
                    Some(c) => word.push(c),
                    None => {}
                }
            }
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                in_word = true;
                quote = Some(c);
            }
            (None, '#') => break,
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if let Some(q) = quote {
        return Err(format!("unterminated {q} quote"));
    }
    if in_word {
        out.push(word);
    }
    Ok(out)
}

/// An HAProxy time (`4s`, `30m`, `500ms`, `3000`: milliseconds when no unit is given;
/// `us`, `ms`, `s`, `m`, `h`, `d`) in milliseconds.
pub(super) fn millis(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let n: u64 = number.parse().ok()?;
    Some(match unit {
        "" | "ms" => n,
        "us" => n.div_ceil(1000),
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    })
}

/// A `bind` address as a listener address Switchyard takes (`*:5000` and `:5000` are
/// `0.0.0.0:5000`, IPv6 in brackets), or why it cannot be one.
pub(super) fn listen_addr(spec: &str) -> Result<String, String> {
    let (v6, rest) = match spec.split_once('@') {
        Some(("ipv4" | "tcp4" | "tcp", rest)) => (false, rest),
        Some(("ipv6" | "tcp6", rest)) => (true, rest),
        Some((family, _)) => return Err(format!("{family}@ sockets: Switchyard listens on TCP only")),
        None if spec.starts_with('/') => return Err("a Unix socket: Switchyard listens on TCP only".into()),
        None => (false, spec),
    };
    if rest.contains('$') {
        return Err("environment variables are not expanded here: write the address".into());
    }
    let (host, port) = rest.rsplit_once(':').ok_or("no port")?;
    if port.contains('-') {
        return Err("a port range: a listener takes one port".into());
    }
    let port: u16 = port.parse().map_err(|_| format!("\"{port}\" is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = match host {
        "" | "*" if v6 => "[::]".to_string(),
        "" | "*" => "0.0.0.0".to_string(),
        "localhost" => "127.0.0.1".to_string(),
        h => match h.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V6(_)) => format!("[{h}]"),
            Ok(_) => h.to_string(),
            Err(_) => return Err(format!("\"{h}\" is a host name: a listener takes an IP address")),
        },
    };
    Ok(format!("{host}:{port}"))
}

/// A `server` address: host and port (None: HAProxy then uses the port the client
/// connected to), or why it cannot be a node.
pub(super) fn server_addr(spec: &str) -> Result<(String, Option<u16>), String> {
    let rest = match spec.split_once('@') {
        Some(("ipv4" | "ipv6" | "tcp" | "tcp4" | "tcp6", rest)) => rest,
        Some((family, _)) => return Err(format!("{family}@ addresses: nodes are reached over TCP")),
        None if spec.starts_with('/') => return Err("a Unix socket: nodes are reached over TCP".into()),
        None => spec,
    };
    if rest.contains('$') {
        return Err("environment variables are not expanded here: write the address".into());
    }
    // An IPv6 address without a port has more than one colon and parses as one.
    if rest.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((rest.to_string(), None));
    }
    match rest.rsplit_once(':') {
        None => Ok((rest.to_string(), None)),
        Some((_, p)) if p.starts_with('+') || p.starts_with('-') => {
            Err("a port relative to the client's: give the node's port".into())
        }
        Some((host, port)) => {
            let port: u16 = port.parse().map_err(|_| format!("\"{port}\" is not a port"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err("no host".into());
            }
            Ok((host.to_string(), Some(port)))
        }
    }
}

/// Server options that take a value (the others are flags).
const VALUED: &[&str] = &[
    "port",
    "inter",
    "fastinter",
    "downinter",
    "fall",
    "rise",
    "maxconn",
    "minconn",
    "maxqueue",
    "weight",
    "on-marked-down",
    "on-marked-up",
    "on-error",
    "addr",
    "slowstart",
    "crt",
    "ca-file",
    "crl-file",
    "verify",
    "verifyhost",
    "sni",
    "resolvers",
    "resolve-prefer",
    "resolve-net",
    "init-addr",
    "agent-port",
    "agent-inter",
    "agent-addr",
    "agent-send",
    "error-limit",
    "observe",
    "cookie",
    "id",
    "source",
    "proto",
    "alpn",
    "check-sni",
    "check-alpn",
    "check-proto",
    "ciphers",
    "ciphersuites",
    "namespace",
    "pool-max-conn",
    "pool-low-conn",
    "pool-purge-delay",
    "max-reuse",
    "redir",
    "track",
    "usesrc",
    "proxy-v2-options",
    "tcp-ut",
    "log-proto",
    "shard",
    "hash-key",
    "curves",
    "sigalgs",
    "ssl-min-ver",
    "ssl-max-ver",
    "guid",
    "ws",
    "socks4",
];

/// Server options into `opts` (later ones override, `no-X` removes `X`).
pub(super) fn server_options(words: &[String], opts: &mut BTreeMap<String, Option<String>>) {
    let mut w = words.iter();
    while let Some(k) = w.next() {
        if VALUED.contains(&k.as_str()) {
            opts.insert(k.clone(), w.next().cloned());
        } else if let Some(off) = k.strip_prefix("no-") {
            opts.remove(off);
        } else {
            opts.insert(k.clone(), None);
        }
    }
}

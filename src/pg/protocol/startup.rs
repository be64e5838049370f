//! The untyped first packets of a connection: SSLRequest, GSSENCRequest,
//! CancelRequest and StartupMessage.

pub const SSL_REQUEST_CODE: i32 = 80877103;
pub const GSSENC_REQUEST_CODE: i32 = 80877104;
pub const CANCEL_REQUEST_CODE: i32 = 80877102;
/// PostgreSQL itself refuses startup packets longer than this (MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_LEN: usize = 10000;

#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel { pid: i32, key: i32 },
    Startup { minor: i32, params: Vec<(String, String)> },
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("client closed the connection")]
    Closed,
    #[error("invalid startup packet length {0}")]
    BadLength(i32),
    #[error("unsupported frontend protocol {major}.{minor}: Switchyard supports 3.0")]
    UnsupportedProtocol { major: i32, minor: i32 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Parse a startup packet body (everything after the length word).
pub fn parse_startup(body: &[u8]) -> Result<StartupPacket, StartupError> {
    let code = body
        .get(0..4)
        .map(|c| i32::from_be_bytes(c.try_into().expect("4 bytes")))
        .ok_or(StartupError::Malformed("shorter than a protocol code"))?;
    match code {
        SSL_REQUEST_CODE if body.len() == 4 => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE if body.len() == 4 => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE if body.len() == 12 => Ok(StartupPacket::Cancel {
            pid: i32::from_be_bytes(body[4..8].try_into().unwrap()),
            key: i32::from_be_bytes(body[8..12].try_into().unwrap()),
        }),
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(StartupError::Malformed("wrong length for request code"))
        }
        _ => {
            let (major, minor) = (code >> 16, code & 0xffff);
            if major != 3 {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let mut params = Vec::new();
            let mut rest = &body[4..];
            loop {
                let name = take_cstr(&mut rest)?;
                if name.is_empty() {
                    break;
                }
                let value = take_cstr(&mut rest)?;
                params.push((name, value));
            }
            if !rest.is_empty() {
                return Err(StartupError::Malformed("bytes after the final terminator"));
            }
            Ok(StartupPacket::Startup { minor, params })
        }
    }
}

fn take_cstr(rest: &mut &[u8]) -> Result<String, StartupError> {
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(StartupError::Malformed("missing terminator"))?;
    let s = std::str::from_utf8(&rest[..end]).map_err(|_| StartupError::Malformed("parameter is not UTF-8"))?;
    *rest = &rest[end + 1..];
    Ok(s.to_string())
}

/// Take a proxy-side setting out of the startup parameters, so that the server never
/// sees it: given directly (`name=value`, as drivers with "server settings" send it) or
/// in `options` as `-c name=value` / `--name=value` (libpq's `PGOPTIONS`). The rest of
/// `options` is kept as it was written; an `options` left empty is removed.
pub fn take_setting(params: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let mut found = None;
    if let Some(i) = params.iter().position(|(k, _)| k.eq_ignore_ascii_case(name)) {
        found = Some(params.remove(i).1);
    }
    if let Some(i) = params.iter().position(|(k, _)| k == "options") {
        let words = split_options(&params[i].1);
        let mut kept: Vec<&str> = Vec::new();
        let mut k = 0;
        while k < words.len() {
            let (raw, word) = &words[k];
            // "-c" "name=value", "-cname=value", "--name=value"
            let (setting, used) = if word == "-c" {
                (words.get(k + 1).map(|(_, w)| w.as_str()), 2)
            } else if let Some(rest) = word.strip_prefix("--").or_else(|| word.strip_prefix("-c")) {
                (Some(rest), 1)
            } else {
                (None, 1)
            };
            match setting.and_then(|s| s.split_once('=')) {
                Some((n, v)) if n.eq_ignore_ascii_case(name) => {
                    found = Some(v.to_string());
                    k += used;
                }
                _ => {
                    kept.push(raw);
                    k += 1;
                }
            }
        }
        if kept.is_empty() {
            params.remove(i);
        } else {
            params[i].1 = kept.join(" ");
        }
    }
    found
}

/// `options` split as the server does: on unescaped whitespace, `\` escaping the next
/// character. Each word as written (to keep it) and unescaped (to read it).
fn split_options(options: &str) -> Vec<(&str, String)> {
    let mut words = Vec::new();
    let mut chars = options.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_ascii_whitespace() {
            chars.next();
            continue;
        }
        let mut word = String::new();
        let mut end = start;
        while let Some((i, c)) = chars.next() {
            end = i + c.len_utf8();
            if c == '\\' {
                if let Some((j, n)) = chars.next() {
                    word.push(n);
                    end = j + n.len_utf8();
                }
            } else if c.is_ascii_whitespace() {
                end = i;
                break;
            } else {
                word.push(c);
            }
        }
        words.push((&options[start..end], word));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_proxy_setting_is_taken_out_of_options_and_parameters() {
        const N: &str = "switchyard.causal_token";
        let mut p = params(&[("options", "-c switchyard.causal_token=sy1.a.1.2")]);
        assert_eq!(take_setting(&mut p, N).as_deref(), Some("sy1.a.1.2"));
        assert!(p.is_empty());
        let mut p = params(&[(
            "options",
            "-c search_path=a\\ b --switchyard.causal_token=t -cwork_mem=1MB",
        )]);
        assert_eq!(take_setting(&mut p, N).as_deref(), Some("t"));
        assert_eq!(p, params(&[("options", "-c search_path=a\\ b -cwork_mem=1MB")]));
        let mut p = params(&[("application_name", "x"), ("switchyard.causal_token", "u")]);
        assert_eq!(take_setting(&mut p, N).as_deref(), Some("u"));
        assert_eq!(p, params(&[("application_name", "x")]));
        let mut p = params(&[("options", "-c geqo=off")]);
        assert_eq!(take_setting(&mut p, N), None);
        assert_eq!(p, params(&[("options", "-c geqo=off")]));
    }

    #[test]
    fn parses_startup_message() {
        let body = b"\x00\x03\x00\x00user\0app\0database\0db\0\0";
        assert_eq!(
            parse_startup(body).unwrap(),
            StartupPacket::Startup {
                minor: 0,
                params: vec![("user".into(), "app".into()), ("database".into(), "db".into())]
            }
        );
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_startup(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            StartupPacket::SslRequest
        );
        let mut cancel = CANCEL_REQUEST_CODE.to_be_bytes().to_vec();
        cancel.extend(5i32.to_be_bytes());
        cancel.extend(9i32.to_be_bytes());
        assert_eq!(
            parse_startup(&cancel).unwrap(),
            StartupPacket::Cancel { pid: 5, key: 9 }
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_startup(b"\x00\x02\x00\x00user\0a\0\0"),
            Err(StartupError::UnsupportedProtocol { major: 2, .. })
        ));
        assert!(matches!(
            parse_startup(b"\x00\x03\x00\x00user\0app"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            parse_startup(b"\x00\x03\x00\x00user\0a\0\0xx"),
            Err(StartupError::Malformed(_))
        ));
        assert!(matches!(
            parse_startup(b"\x04\xd2\x16\x2fxxxx"),
            Err(StartupError::Malformed(_))
        ));
    }
}

//! Borrowing, typed views of the messages the proxy looks inside (both directions), and
//! encoders for the frontend messages it rewrites.
//!
//! Every string here is bytes, never `&str`: query texts, statement, portal and column
//! names, setting values are in the *client's* encoding (LATIN9, SJIS, ...), which the
//! proxy forwards, hashes and compares but must not require to be UTF-8.
//!
//! Written by hand because `postgres-protocol` decodes only backend messages and owns
//! its buffers; the proxy needs zero-copy views of frontend messages to rename
//! statements without re-encoding the rest.

use bytes::{BufMut, BytesMut};

/// A message did not have the fields its type requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} message")]
pub struct Malformed(pub &'static str);

/// A NUL-terminated string at the start of `buf`, and what follows it.
pub fn cstr(buf: &[u8]) -> Option<(&[u8], &[u8])> {
    // memchr: a query's text is scanned for its end in every Query and Parse, and a
    // byte-at-a-time search showed in the profile.
    let end = memchr::memchr(0, buf)?;
    Some((&buf[..end], &buf[end + 1..]))
}

/// Header of the message at the start of `buf`: tag and total length (tag included),
/// once the 5 header bytes are there. The length word is not validated here.
pub fn header(buf: &[u8]) -> Option<(u8, u32)> {
    let len = u32::from_be_bytes(buf.get(1..5)?.try_into().ok()?);
    Some((buf[0], len))
}

/// A message type for an error message: the character, or its hex code.
pub fn printable(tag: u8) -> String {
    if tag.is_ascii_graphic() {
        format!("'{}'", tag as char)
    } else {
        format!("0x{tag:02x}")
    }
}

/// `Query`: one or more SQL statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query<'a> {
    pub sql: &'a [u8],
}

impl<'a> Query<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (sql, _) = cstr(body).ok_or(Malformed("Query"))?;
        Ok(Query { sql })
    }
}

/// `Parse`: statement name, query, parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// Everything after the name (query, NUL, parameter types): what a renamed Parse
    /// carries unchanged, and what identifies the statement's content.
    pub after_name: &'a [u8],
}

impl<'a> Parse<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (name, after_name) = cstr(body).ok_or(Malformed("Parse"))?;
        let (query, types) = cstr(after_name).ok_or(Malformed("Parse"))?;
        if types.len() < 2 {
            return Err(Malformed("Parse"));
        }
        Ok(Parse {
            name,
            query,
            after_name,
        })
    }
}

/// Encode a Parse named `name` whose content is `after_name` (see [`Parse::after_name`]).
pub fn encode_parse(out: &mut BytesMut, name: &[u8], after_name: &[u8]) {
    out.reserve(name.len() + after_name.len() + 6);
    out.put_u8(b'P');
    out.put_i32((name.len() + 1 + after_name.len() + 4) as i32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(after_name);
}

/// A message that names a prepared statement among its fields: `Bind` (portal,
/// statement, ...) or `Describe`/`Close` of a statement (`'S'`, name). Splitting it
/// around the name lets the proxy send it again under another name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatementRef<'a> {
    /// Bytes of the body before the statement name.
    pub prefix: &'a [u8],
    /// The statement name; empty for the unnamed statement, or when the message is
    /// about a portal.
    pub statement: &'a [u8],
    /// Bytes of the body after the name's NUL.
    pub tail: &'a [u8],
    /// A Describe/Close of a portal (no statement).
    pub portal: bool,
}

impl<'a> StatementRef<'a> {
    pub fn decode_bind(body: &'a [u8]) -> Result<Self, Malformed> {
        let (portal, rest) = cstr(body).ok_or(Malformed("Bind"))?;
        let (statement, tail) = cstr(rest).ok_or(Malformed("Bind"))?;
        Ok(StatementRef {
            prefix: &body[..portal.len() + 1],
            statement,
            tail,
            portal: false,
        })
    }

    /// `Describe` or `Close`: a kind byte (`'S'` statement, `'P'` portal), then a name.
    pub fn decode_target(body: &'a [u8], what: &'static str) -> Result<Self, Malformed> {
        let kind = *body.first().ok_or(Malformed(what))?;
        let (name, tail) = cstr(&body[1..]).ok_or(Malformed(what))?;
        match kind {
            b'S' => Ok(StatementRef {
                prefix: &body[..1],
                statement: name,
                tail,
                portal: false,
            }),
            b'P' => Ok(StatementRef {
                prefix: &body[..1],
                statement: b"",
                tail,
                portal: true,
            }),
            _ => Err(Malformed(what)),
        }
    }

    /// The same message (`tag`) naming `statement` instead.
    pub fn encode_renamed(&self, out: &mut BytesMut, tag: u8, statement: &[u8]) {
        let len = self.prefix.len() + statement.len() + 1 + self.tail.len() + 4;
        out.reserve(len + 1);
        out.put_u8(tag);
        out.put_i32(len as i32);
        out.put_slice(self.prefix);
        out.put_slice(statement);
        out.put_u8(0);
        out.put_slice(self.tail);
    }
}

/// Encode `Close` of a prepared statement.
pub fn encode_close_statement(out: &mut BytesMut, name: &[u8]) {
    out.put_u8(b'C');
    out.put_i32(name.len() as i32 + 6);
    out.put_u8(b'S');
    out.put_slice(name);
    out.put_u8(0);
}

/// `ParameterStatus`: a reported setting's name and value (value in the client's encoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParameterStatus<'a> {
    pub name: &'a [u8],
    pub value: &'a [u8],
}

impl<'a> ParameterStatus<'a> {
    pub fn decode(body: &'a [u8]) -> Result<Self, Malformed> {
        let (name, rest) = cstr(body).ok_or(Malformed("ParameterStatus"))?;
        let (value, _) = cstr(rest).ok_or(Malformed("ParameterStatus"))?;
        Ok(ParameterStatus { name, value })
    }
}

/// The fields of an ErrorResponse the proxy decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ErrorFields<'a> {
    /// SQLSTATE (field `C`).
    pub code: &'a [u8],
    /// Non-localized severity (field `V`), else the localized one (`S`).
    pub severity: &'a [u8],
    pub message: &'a [u8],
}

impl<'a> ErrorFields<'a> {
    pub fn decode(body: &'a [u8]) -> Self {
        let mut e = ErrorFields::default();
        let mut localized: &[u8] = b"";
        for field in body.split(|&b| b == 0) {
            match field.split_first() {
                Some((b'C', v)) => e.code = v,
                Some((b'V', v)) => e.severity = v,
                Some((b'S', v)) => localized = v,
                Some((b'M', v)) => e.message = v,
                _ => {}
            }
        }
        if e.severity.is_empty() {
            e.severity = localized;
        }
        e
    }

    /// FATAL or PANIC: the server ends the session after sending it.
    pub fn ends_session(&self) -> bool {
        self.severity == b"FATAL" || self.severity == b"PANIC"
    }
}

/// `NotificationResponse`: the pid of the notifying backend comes first; the proxy
/// rewrites it so a client recognises its own notifications.
pub fn notification_pid(body: &[u8]) -> Option<i32> {
    Some(i32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_fields_are_bytes_in_any_encoding() {
        // A LATIN9 query: 0xa4 is the euro sign, not valid UTF-8.
        let body = b"s1\0select 'x' as \"\xa4\"\0\0\x01\0\0\0\x17";
        let p = Parse::decode(body).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select 'x' as \"\xa4\"");
        assert_eq!(p.after_name, &body[3..]);
        assert_eq!(Parse::decode(b"s1\0select 1\0"), Err(Malformed("Parse")));
        assert_eq!(Parse::decode(b"s1"), Err(Malformed("Parse")));
    }

    #[test]
    fn parse_encodes_byte_exact() {
        let mut out = BytesMut::new();
        encode_parse(&mut out, b"sy_1", b"select 1\0\0\0");
        assert_eq!(&out[..], b"P\0\0\0\x14sy_1\0select 1\0\0\0");
    }

    #[test]
    fn bind_is_renamed_around_its_statement_name() {
        let body = b"portal\0stmt\0\0\0\0\x01\0\0";
        let b = StatementRef::decode_bind(body).unwrap();
        assert_eq!(
            (b.prefix, b.statement, b.tail),
            (&b"portal\0"[..], &b"stmt"[..], &b"\0\0\0\x01\0\0"[..])
        );
        let mut out = BytesMut::new();
        b.encode_renamed(&mut out, b'B', b"sy_2");
        assert_eq!(&out[..], b"B\0\0\0\x16portal\0sy_2\0\0\0\0\x01\0\0");
        assert!(StatementRef::decode_bind(b"portal\0stmt").is_err());
    }

    #[test]
    fn describe_and_close_know_statements_from_portals() {
        let d = StatementRef::decode_target(b"S\xa4\0", "Describe").unwrap();
        assert_eq!((d.statement, d.portal), (&b"\xa4"[..], false));
        let mut out = BytesMut::new();
        d.encode_renamed(&mut out, b'D', b"sy_3");
        assert_eq!(&out[..], b"D\0\0\0\x0aSsy_3\0");
        let p = StatementRef::decode_target(b"Pcur\0", "Close").unwrap();
        assert_eq!((p.statement, p.portal), (&b""[..], true));
        assert!(StatementRef::decode_target(b"Xname\0", "Close").is_err());
        assert!(StatementRef::decode_target(b"", "Close").is_err());
    }

    #[test]
    fn close_statement_bytes() {
        let mut out = BytesMut::new();
        encode_close_statement(&mut out, b"sy_4");
        assert_eq!(&out[..], b"C\0\0\0\x0aSsy_4\0");
    }

    #[test]
    fn error_fields_prefer_the_unlocalized_severity() {
        let body = b"SFATAL\0VFATAL\0C57P01\0Mterminating connection\0\0";
        let e = ErrorFields::decode(body);
        assert_eq!((e.code, e.message), (&b"57P01"[..], &b"terminating connection"[..]));
        assert!(e.ends_session());
        // A localized server (lc_messages = de) still says FATAL in V.
        let e = ErrorFields::decode(b"SFEHLER\0VERROR\0C0A000\0Mx\0\0");
        assert!(!e.ends_session());
        assert_eq!(e.code, b"0A000");
        let e = ErrorFields::decode(b"SPANIC\0C58000\0\0");
        assert!(e.ends_session());
    }

    #[test]
    fn parameter_status_and_notification() {
        let s = ParameterStatus::decode(b"client_encoding\0LATIN9\0").unwrap();
        assert_eq!((s.name, s.value), (&b"client_encoding"[..], &b"LATIN9"[..]));
        assert!(ParameterStatus::decode(b"client_encoding\0").is_err());
        assert_eq!(notification_pid(b"\0\0\x30\x39chan\0\0"), Some(12345));
        assert_eq!(notification_pid(b"\0\0"), None);
    }

    #[test]
    fn headers() {
        assert_eq!(header(b"Z\0\0\0\x05I"), Some((b'Z', 5)));
        assert_eq!(header(b"Z\0\0"), None);
        assert_eq!(Query::decode(b"select 1\0").unwrap().sql, b"select 1");
        assert!(Query::decode(b"select 1").is_err());
    }
}

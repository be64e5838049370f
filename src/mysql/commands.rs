//! The client commands the proxy reads itself: `KILL ...` statements and
//! `COM_CHANGE_USER` (by hand: `mysql_common`'s `ComChangeUser` parses it but has no
//! accessors).

use mysql_common::constants::CapabilityFlags;

/// `COM_CHANGE_USER`'s fields, read by hand: `mysql_common`'s `ComChangeUser` parses
/// them but has no accessors.
#[derive(Debug, PartialEq)]
pub(super) struct ChangeUserCmd<'a> {
    pub(super) user: &'a [u8],
    pub(super) auth: &'a [u8],
    pub(super) database: &'a [u8],
    pub(super) charset: Option<u16>,
    pub(super) plugin: Option<&'a [u8]>,
    pub(super) attributes: Option<&'a [u8]>,
}

pub(super) fn cstr<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let i = r.iter().position(|&b| b == 0)?;
    let s = &r[..i];
    *r = &r[i + 1..];
    Some(s)
}

pub(super) fn parse_change_user(p: &[u8], caps: CapabilityFlags) -> Option<ChangeUserCmd<'_>> {
    let mut rest = p.get(1..)?;
    let user = cstr(&mut rest)?;
    let auth = if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
        let n = *rest.first()? as usize;
        let a = rest.get(1..1 + n)?;
        rest = &rest[1 + n..];
        a
    } else {
        cstr(&mut rest)?
    };
    let database = cstr(&mut rest)?;
    let mut charset = None;
    if rest.len() >= 2 {
        charset = Some(u16::from_le_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
    }
    let plugin = if caps.contains(CapabilityFlags::CLIENT_PLUGIN_AUTH) && !rest.is_empty() {
        Some(cstr(&mut rest)?)
    } else {
        None
    };
    let attributes = (caps.contains(CapabilityFlags::CLIENT_CONNECT_ATTRS) && !rest.is_empty()).then_some(rest);
    Some(ChangeUserCmd {
        user,
        auth,
        database,
        charset,
        plugin,
        attributes,
    })
}

/// `KILL [HARD|SOFT] [QUERY|CONNECTION] <id>`: the id is one of ours.
pub(super) fn parse_kill(sql: &[u8]) -> Option<(bool, u32)> {
    let text = std::str::from_utf8(sql).ok()?;
    let mut words = text.split_ascii_whitespace().map(|w| w.trim_end_matches(';'));
    if !words.next()?.eq_ignore_ascii_case("kill") {
        return None;
    }
    let mut query_only = false;
    for w in words {
        if w.eq_ignore_ascii_case("hard") || w.eq_ignore_ascii_case("soft") || w.eq_ignore_ascii_case("connection") {
            continue;
        }
        if w.eq_ignore_ascii_case("query") {
            query_only = true;
            continue;
        }
        return w.parse().ok().map(|id| (query_only, id));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mysql::protocol;

    #[test]
    fn kill_statements() {
        assert_eq!(parse_kill(b"KILL QUERY 12"), Some((true, 12)));
        assert_eq!(parse_kill(b"kill 7;"), Some((false, 7)));
        assert_eq!(parse_kill(b"KILL HARD CONNECTION 3"), Some((false, 3)));
        assert_eq!(parse_kill(b"KILL USER app"), None);
        assert_eq!(parse_kill(b"SELECT 1"), None);
    }

    #[test]
    fn change_user_commands() {
        let caps = CapabilityFlags::CLIENT_SECURE_CONNECTION
            | CapabilityFlags::CLIENT_PLUGIN_AUTH
            | CapabilityFlags::CLIENT_CONNECT_ATTRS;
        let mut p = vec![protocol::COM_CHANGE_USER];
        p.extend_from_slice(b"bob\0\x03abcapp\0\x2d\x00mysql_native_password\0\x05\x01a\x02bc");
        let c = parse_change_user(&p, caps).unwrap();
        assert_eq!(
            c,
            ChangeUserCmd {
                user: b"bob",
                auth: b"abc",
                database: b"app",
                charset: Some(45),
                plugin: Some(b"mysql_native_password"),
                attributes: Some(b"\x05\x01a\x02bc"),
            }
        );
        // The short form of old clients: no charset, no plugin.
        let c = parse_change_user(b"\x11bob\0\x00db\0", caps).unwrap();
        assert_eq!(
            (c.auth, c.database, c.charset, c.plugin),
            (&b""[..], &b"db"[..], None, None)
        );
        assert!(parse_change_user(b"\x11bob", caps).is_none(), "truncated");
        assert!(
            parse_change_user(b"\x11bob\0\x09ab", caps).is_none(),
            "auth longer than the packet"
        );
    }
}

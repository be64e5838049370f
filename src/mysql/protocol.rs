//! MySQL packet framing and the few packets the proxy writes itself.
//!
//! The handshake packets are `mysql_common`'s (`HandshakePacket`, `HandshakeResponse`,
//! `AuthSwitchRequest`, `ErrPacket`, the scrambles). Written here by hand, and why:
//! - the 4-byte packet header, read and written straight on the socket: `mysql_common`'s
//!   `PacketCodec` decodes whole packets into a buffer, and the relay must pass a 16 MiB
//!   packet through without holding it (`Scanner` only counts header bytes);
//! - OK packets (`mysql_common` parses them but cannot write one);
//! - the first column of a one-row text result set (`first_value`), read on a fresh
//!   server connection to check `@@read_only`.

use std::io;

use mysql_common::constants::{CapabilityFlags, StatusFlags};
use mysql_common::io::ParseBuf;
use mysql_common::packets::{ErrPacket, ServerError, SqlState};
use mysql_common::proto::{MyDeserialize, MySerialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::Error;

/// Payload bytes in one packet at most; a payload this long continues in the next one.
pub const MAX_CHUNK: usize = 0xFF_FFFF;

/// Command bytes the proxy looks at.
pub const COM_QUIT: u8 = 0x01;
pub const COM_QUERY: u8 = 0x03;
pub const COM_PROCESS_KILL: u8 = 0x0c;
pub const COM_CHANGE_USER: u8 = 0x11;
pub const COM_STMT_PREPARE: u8 = 0x16;
pub const COM_STMT_EXECUTE: u8 = 0x17;
pub const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
pub const COM_STMT_CLOSE: u8 = 0x19;
pub const COM_RESET_CONNECTION: u8 = 0x1f;

/// What the proxy offers clients: what every MySQL 5.7+/MariaDB 10.x server offers,
/// minus compression and TLS (not relayed yet), and minus `CLIENT_DEPRECATE_EOF` and
/// session tracking only when the server lacks them (intersected with the server's
/// greeting at login, `offered`).
pub fn proxy_capabilities() -> CapabilityFlags {
    CapabilityFlags::CLIENT_LONG_PASSWORD
        | CapabilityFlags::CLIENT_FOUND_ROWS
        | CapabilityFlags::CLIENT_LONG_FLAG
        | CapabilityFlags::CLIENT_CONNECT_WITH_DB
        | CapabilityFlags::CLIENT_NO_SCHEMA
        | CapabilityFlags::CLIENT_ODBC
        | CapabilityFlags::CLIENT_LOCAL_FILES
        | CapabilityFlags::CLIENT_IGNORE_SPACE
        | CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_INTERACTIVE
        | CapabilityFlags::CLIENT_IGNORE_SIGPIPE
        | CapabilityFlags::CLIENT_TRANSACTIONS
        | CapabilityFlags::CLIENT_RESERVED
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_MULTI_STATEMENTS
        | CapabilityFlags::CLIENT_MULTI_RESULTS
        | CapabilityFlags::CLIENT_PS_MULTI_RESULTS
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_CONNECT_ATTRS
        | CapabilityFlags::CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        | CapabilityFlags::CLIENT_SESSION_TRACK
        | CapabilityFlags::CLIENT_DEPRECATE_EOF
}

/// Read one packet's payload (continuation chunks joined) into `buf`; returns the
/// sequence id of its last chunk. For logins and the proxy's own queries only, where
/// packets are small: refuses payloads over `limit`.
pub async fn read_packet<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>, limit: usize) -> io::Result<u8> {
    buf.clear();
    loop {
        let mut header = [0u8; 4];
        r.read_exact(&mut header).await?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        if buf.len() + len > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("packet of more than {limit} bytes during login"),
            ));
        }
        let start = buf.len();
        buf.resize(start + len, 0);
        r.read_exact(&mut buf[start..]).await?;
        if len < MAX_CHUNK {
            return Ok(header[3]);
        }
    }
}

/// Frame `payload` as packet(s) starting at sequence id `seq` into `out`; returns the
/// next sequence id.
pub fn frame(out: &mut Vec<u8>, mut seq: u8, payload: &[u8]) -> u8 {
    let mut chunks = payload.chunks(MAX_CHUNK).peekable();
    if payload.is_empty() {
        out.extend_from_slice(&[0, 0, 0, seq]);
        return seq.wrapping_add(1);
    }
    while let Some(chunk) = chunks.next() {
        let len = chunk.len() as u32;
        out.extend_from_slice(&len.to_le_bytes()[..3]);
        out.push(seq);
        out.extend_from_slice(chunk);
        seq = seq.wrapping_add(1);
        // A payload of an exact multiple of the chunk size ends with an empty packet.
        if chunks.peek().is_none() && chunk.len() == MAX_CHUNK {
            out.extend_from_slice(&[0, 0, 0, seq]);
            seq = seq.wrapping_add(1);
        }
    }
    seq
}

pub async fn write_packet<W: AsyncWrite + Unpin>(w: &mut W, seq: u8, payload: &[u8]) -> io::Result<u8> {
    let mut out = Vec::with_capacity(payload.len() + 4);
    let next = frame(&mut out, seq, payload);
    w.write_all(&out).await?;
    w.flush().await?;
    Ok(next)
}

/// Serialize any `mysql_common` packet.
pub fn to_vec(p: &impl MySerialize) -> Vec<u8> {
    let mut v = Vec::new();
    p.serialize(&mut v);
    v
}

/// An OK packet: nothing affected, autocommit on.
pub fn ok_payload() -> Vec<u8> {
    let status = StatusFlags::SERVER_STATUS_AUTOCOMMIT.bits();
    let mut v = vec![0x00, 0, 0];
    v.extend_from_slice(&status.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

/// The ERR packet a client gets for `e` (protocol 4.1 form, with the SQLSTATE).
pub fn err_payload(e: &Error) -> Vec<u8> {
    let code = e.mysql_code();
    to_vec(&ErrPacket::Error(ServerError::new(
        code.number,
        Some(SqlState::new(code.state)),
        e.message().as_bytes(),
    )))
}

/// A server's ERR packet as our error (its number, SQLSTATE and message kept).
pub fn parse_err(payload: &[u8], caps: CapabilityFlags) -> Error {
    match ErrPacket::deserialize(caps, &mut ParseBuf(payload)) {
        Ok(ErrPacket::Error(e)) => {
            let state = e
                .sql_state_ref()
                .map(|s| {
                    let mut b = [0u8; 5];
                    b.copy_from_slice(s.as_str().as_bytes());
                    b
                })
                .unwrap_or(*b"HY000");
            Error::mysql_server_refused(e.error_code(), state, e.message_str().into_owned())
        }
        _ => Error::server_protocol("MySQL server sent a malformed error packet"),
    }
}

/// Append `v` as a length-encoded integer.
pub fn put_lenenc_int(out: &mut Vec<u8>, v: u64) {
    match v {
        0..=0xFA => out.push(v as u8),
        0xFB..=0xFFFF => {
            out.push(0xFC);
            out.extend_from_slice(&(v as u16).to_le_bytes());
        }
        0x1_0000..=0xFF_FFFF => {
            out.push(0xFD);
            out.extend_from_slice(&(v as u32).to_le_bytes()[..3]);
        }
        _ => {
            out.push(0xFE);
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Read a length-encoded integer at `*pos`.
pub fn lenenc_int(b: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *b.get(*pos)?;
    let (n, width) = match first {
        0..=0xfa => (first as u64, 0),
        0xfc => (0, 2),
        0xfd => (0, 3),
        0xfe => (0, 8),
        _ => return None, // 0xfb is NULL, 0xff an error
    };
    *pos += 1;
    if width == 0 {
        return Some(n);
    }
    let bytes = b.get(*pos..*pos + width)?;
    *pos += width;
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(bytes);
    Some(u64::from_le_bytes(v))
}

/// Run `sql` on a connection the proxy owns (no client attached yet) and return the
/// first column of the first row (None for NULL or no row), or the server's error.
pub async fn first_value<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    caps: CapabilityFlags,
    sql: &str,
) -> Result<Option<String>, Error> {
    Ok(first_row(s, caps, sql)
        .await?
        .and_then(|row| row.into_iter().next().flatten()))
}

/// Run `sql` on a connection the proxy owns (no client attached, or a client held
/// between commands) and return the first row of its text result (None: no row, or a
/// statement without a result set; a column is None for NULL), or the server's error.
pub async fn first_row<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    caps: CapabilityFlags,
    sql: &str,
) -> Result<Option<Vec<Option<String>>>, Error> {
    let io = |e: io::Error| Error::server_protocol(format!("MySQL server connection failed during a check: {e}"));
    let mut payload = Vec::with_capacity(sql.len() + 1);
    payload.push(COM_QUERY);
    payload.extend_from_slice(sql.as_bytes());
    write_packet(s, 0, &payload).await.map_err(io)?;
    let mut buf = Vec::new();
    read_packet(s, &mut buf, 1 << 20).await.map_err(io)?;
    match buf.first() {
        Some(0xff) => return Err(parse_err(&buf, caps)),
        Some(0x00) => return Ok(None), // a statement without a result set
        _ => {}
    }
    let mut pos = 0;
    let columns = lenenc_int(&buf, &mut pos).ok_or_else(|| Error::server_protocol("bad column count"))?;
    for _ in 0..columns {
        read_packet(s, &mut buf, 1 << 20).await.map_err(io)?;
    }
    let deprecate_eof = caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF);
    if !deprecate_eof {
        read_packet(s, &mut buf, 1 << 20).await.map_err(io)?; // EOF after the columns
    }
    let mut row = None;
    loop {
        read_packet(s, &mut buf, 1 << 20).await.map_err(io)?;
        match buf.first() {
            Some(0xff) => return Err(parse_err(&buf, caps)),
            Some(0xfe) if buf.len() < 0xff_ffff => return Ok(row),
            _ if row.is_none() => {
                let mut values = Vec::with_capacity(columns as usize);
                let mut pos = 0;
                while pos < buf.len() && values.len() < columns as usize {
                    if buf[pos] == 0xfb {
                        values.push(None);
                        pos += 1;
                        continue;
                    }
                    let len = lenenc_int(&buf, &mut pos).ok_or_else(|| Error::server_protocol("bad row"))? as usize;
                    let end = (pos + len).min(buf.len());
                    values.push(Some(String::from_utf8_lossy(&buf[pos..end]).into_owned()));
                    pos = end;
                }
                row = Some(values);
            }
            _ => {}
        }
    }
}

/// Packet boundaries in a relayed byte stream: which bytes start a new command, with no
/// copy and no allocation (the relay hands bytes on as they come).
#[derive(Debug, Default)]
pub struct Scanner {
    /// Payload bytes of the current packet not seen yet.
    remaining: usize,
    /// The current packet is a full chunk: the next one continues it.
    continued: bool,
}

/// The start of one packet, as `Scanner::next` sees it.
#[derive(Debug, PartialEq, Eq)]
pub struct PacketStart {
    pub seq: u8,
    pub len: usize,
    /// A new command (sequence id 0, not the continuation of a long packet).
    pub command: bool,
}

impl Scanner {
    /// True between packets.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0 && !self.continued
    }

    /// Consume bytes from `data`: the payload of the current packet first (returns how
    /// many bytes it took, and None), else a packet header if all of it is there (4 bytes
    /// taken, and its start). None: fewer than 4 header bytes left.
    pub fn next(&mut self, data: &[u8]) -> Option<(usize, Option<PacketStart>)> {
        if self.remaining > 0 {
            let n = self.remaining.min(data.len());
            self.remaining -= n;
            return Some((n, None));
        }
        if data.len() < 4 {
            return None;
        }
        let len = u32::from_le_bytes([data[0], data[1], data[2], 0]) as usize;
        let command = !self.continued && data[3] == 0;
        self.continued = len == MAX_CHUNK;
        self.remaining = len;
        Some((
            4,
            Some(PacketStart {
                seq: data[3],
                len,
                command,
            }),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_splits_long_payloads_and_ends_exact_multiples_with_an_empty_packet() {
        let mut out = Vec::new();
        assert_eq!(frame(&mut out, 0, b"abc"), 1);
        assert_eq!(out, b"\x03\x00\x00\x00abc");
        let big = vec![7u8; MAX_CHUNK];
        let mut out = Vec::new();
        assert_eq!(frame(&mut out, 3, &big), 5);
        assert_eq!(&out[..4], &[0xff, 0xff, 0xff, 3]);
        assert_eq!(&out[4 + MAX_CHUNK..], &[0, 0, 0, 4]);
    }

    #[tokio::test]
    async fn read_packet_joins_continuations() {
        let payload = vec![1u8; MAX_CHUNK + 10];
        let mut framed = Vec::new();
        frame(&mut framed, 0, &payload);
        let mut buf = Vec::new();
        let seq = read_packet(&mut &framed[..], &mut buf, usize::MAX).await.unwrap();
        assert_eq!((seq, buf.len()), (1, MAX_CHUNK + 10));
        assert!(
            read_packet(&mut &framed[..], &mut buf, 1000).await.is_err(),
            "over the limit"
        );
    }

    #[test]
    fn scanner_finds_commands_and_skips_continuations() {
        let mut s = Scanner::default();
        // A COM_QUERY "x" then the header of a 16 MiB packet and its continuation.
        let mut data = b"\x02\x00\x00\x00\x03x".to_vec();
        let (n, start) = s.next(&data).unwrap();
        assert_eq!(
            (n, start),
            (
                4,
                Some(PacketStart {
                    seq: 0,
                    len: 2,
                    command: true
                })
            )
        );
        assert_eq!(s.next(&data[4..]).unwrap(), (2, None));
        assert!(s.at_boundary());
        data = vec![0xff, 0xff, 0xff, 0];
        let (_, start) = s.next(&data).unwrap();
        assert!(start.unwrap().command);
        let (n, _) = s.next(&vec![0u8; MAX_CHUNK]).unwrap();
        assert_eq!(n, MAX_CHUNK);
        assert!(!s.at_boundary(), "a full chunk continues");
        let (_, start) = s.next(&[1, 0, 0, 0]).unwrap();
        assert!(
            !start.unwrap().command,
            "seq 0 after wrap-around is still a continuation"
        );
        assert_eq!(s.next(&[9]).unwrap(), (1, None));
        assert!(s.at_boundary());
        assert!(s.next(&[1, 0]).is_none(), "half a header");
    }

    #[test]
    fn errors_become_err_packets_with_sqlstate() {
        let p = err_payload(&Error::auth_failed("password authentication failed for user \"app\""));
        assert_eq!(p[0], 0xff);
        assert_eq!(u16::from_le_bytes([p[1], p[2]]), 1045);
        assert_eq!(&p[3..9], b"#28000");
        let back = parse_err(&p, CapabilityFlags::CLIENT_PROTOCOL_41);
        assert_eq!(back.mysql_code().number, 1045);
        assert_eq!(back.message(), "password authentication failed for user \"app\"");
    }

    #[test]
    fn lenenc_integers() {
        let mut pos = 0;
        assert_eq!(lenenc_int(&[0xfa], &mut pos), Some(250));
        let mut pos = 0;
        assert_eq!(lenenc_int(&[0xfc, 0x10, 0x27], &mut pos), Some(10_000));
        assert_eq!(pos, 3);
        let mut pos = 0;
        assert_eq!(lenenc_int(&[0xfb], &mut pos), None);
    }
}

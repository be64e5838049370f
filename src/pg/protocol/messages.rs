//! Encoders for the backend messages the proxy writes to clients itself.

use bytes::{BufMut, BytesMut};

use crate::pg::protocol::tags::{BackendTag, TxStatus};

/// Write a message: tag, length placeholder, body from `body`, then patch the length.
fn message(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; no text we send has one, but never
    // trust that for text that may carry a client's input.
    buf.put_slice(s.replace('\0', "").as_bytes());
    buf.put_u8(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// ErrorResponse with severity, SQLSTATE, message and an optional hint.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, msg: &str, hint: Option<&str>) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    message(buf, b'E', |b| {
        b.put_u8(b'S');
        cstr(b, sev);
        b.put_u8(b'V');
        cstr(b, sev);
        b.put_u8(b'C');
        cstr(b, code);
        b.put_u8(b'M');
        cstr(b, msg);
        if let Some(h) = hint {
            b.put_u8(b'H');
            cstr(b, h);
        }
        b.put_u8(0);
    });
}

/// NoticeResponse (a WARNING, between a client's statements): `code` and `msg`.
pub fn notice(buf: &mut BytesMut, code: &str, msg: &str) {
    message(buf, b'N', |b| {
        for (field, value) in [(b'S', "WARNING"), (b'V', "WARNING"), (b'C', code), (b'M', msg)] {
            b.put_u8(field);
            cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn fatal(code: &str, msg: &str) -> BytesMut {
    let mut b = BytesMut::with_capacity(64 + msg.len());
    error_response(&mut b, Severity::Fatal, code, msg, None);
    b
}

pub fn auth_ok(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(0));
}

pub fn auth_cleartext(buf: &mut BytesMut) {
    message(buf, b'R', |b| b.put_i32(3));
}

pub fn auth_md5(buf: &mut BytesMut, salt: [u8; 4]) {
    message(buf, b'R', |b| {
        b.put_i32(5);
        b.put_slice(&salt);
    });
}

pub fn auth_sasl(buf: &mut BytesMut, mechanisms: &[&str]) {
    message(buf, b'R', |b| {
        b.put_i32(10);
        for m in mechanisms {
            cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(buf: &mut BytesMut, data: &[u8]) {
    message(buf, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, key: i32) {
    message(buf, b'K', |b| {
        b.put_i32(pid);
        b.put_i32(key);
    });
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    message(buf, b'S', |b| {
        cstr(b, name);
        cstr(b, value);
    });
}

/// ParameterStatus with name and value as the server sent them (any encoding).
pub fn parameter_status_bytes(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    message(buf, b'S', |b| {
        b.put_slice(name);
        b.put_u8(0);
        b.put_slice(value);
        b.put_u8(0);
    });
}

/// RowDescription of text columns (type OID 25), as the proxy's own answers use.
pub fn row_description_text<S: AsRef<str>>(buf: &mut BytesMut, columns: &[S]) {
    message(buf, b'T', |b| {
        b.put_i16(columns.len() as i16);
        for c in columns {
            cstr(b, c.as_ref());
            b.put_i32(0); // table OID
            b.put_i16(0); // column number
            b.put_i32(25); // text
            b.put_i16(-1); // variable length
            b.put_i32(-1); // no type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values.
pub fn data_row_text<S: AsRef<str>>(buf: &mut BytesMut, values: &[S]) {
    message(buf, b'D', |b| {
        b.put_i16(values.len() as i16);
        for v in values {
            b.put_i32(v.as_ref().len() as i32);
            b.put_slice(v.as_ref().as_bytes());
        }
    });
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    message(buf, b'C', |b| cstr(b, tag));
}

/// The answer to a query string with no statement in it.
pub fn empty_query_response(buf: &mut BytesMut) {
    message(buf, BackendTag::EmptyQueryResponse.byte(), |_| {});
}

/// ParseComplete (for a Parse the proxy answers itself).
pub fn parse_complete(buf: &mut BytesMut) {
    message(buf, BackendTag::ParseComplete.byte(), |_| {});
}

pub fn ready_for_query(buf: &mut BytesMut, status: TxStatus) {
    message(buf, b'Z', |b| b.put_u8(status.byte()));
}

/// Tell a client asking for protocol 3.x (x > 0) that we speak 3.0, and which `_pq_.`
/// options we did not recognise, so it can carry on instead of failing.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unrecognized: &[String]) {
    message(buf, b'v', |b| {
        b.put_i32(newest_minor);
        b.put_i32(unrecognized.len() as i32);
        for o in unrecognized {
            cstr(b, o);
        }
    });
}

/// The CancelRequest packet sent to a server.
pub fn cancel_request(pid: i32, key: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&super::startup::CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..16].copy_from_slice(&key.to_be_bytes());
    out
}

/// The answer to a causal-token statement (both pool modes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CausalReply {
    /// `SHOW`: the token, empty if none.
    Show(String),
    Set,
    Reset,
}

/// The answer to a causal-token statement, as a server would write it (then idle).
pub fn write_causal_reply(out: &mut BytesMut, reply: Result<CausalReply, crate::error::Error>) {
    match reply {
        Ok(CausalReply::Show(token)) => {
            row_description_text(out, &[crate::pg::classify::CAUSAL_TOKEN]);
            data_row_text(out, &[token]);
            command_complete(out, "SHOW");
        }
        Ok(CausalReply::Set) => command_complete(out, "SET"),
        Ok(CausalReply::Reset) => command_complete(out, "RESET"),
        Err(e) => out.extend_from_slice(&e.to_error(None)),
    }
    ready_for_query(out, TxStatus::Idle);
}

// The encodings of the engine-neutral `Error` as PostgreSQL messages.
impl crate::error::Error {
    /// The bytes the client gets: the server's own ErrorResponse, or a FATAL one of ours.
    pub fn to_fatal(&self) -> BytesMut {
        match self.raw() {
            Some(raw) => BytesMut::from(raw),
            None => fatal(self.code().as_str(), self.message()),
        }
    }

    /// The ErrorResponse (severity ERROR) for an error the session survives.
    pub fn to_error(&self, hint: Option<&str>) -> BytesMut {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Error, self.code().as_str(), self.message(), hint);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_column_answer_is_byte_exact() {
        let mut b = BytesMut::new();
        row_description_text(&mut b, &["a"]);
        data_row_text(&mut b, &["xy"]);
        command_complete(&mut b, "SHOW");
        let expected: &[u8] = b"T\0\0\0\x1a\0\x01a\0\0\0\0\0\0\0\0\0\0\x19\xff\xff\xff\xff\xff\xff\0\0\
D\0\0\0\x0c\0\x01\0\0\0\x02xyC\0\0\0\x09SHOW\0";
        assert_eq!(&b[..], expected);
    }

    #[test]
    fn error_response_bytes() {
        let mut b = BytesMut::new();
        error_response(&mut b, Severity::Fatal, "08P01", "bad", None);
        let expected: &[u8] = b"E\0\0\0\x1fSFATAL\0VFATAL\0C08P01\0Mbad\0\0";
        assert_eq!(&b[..], expected);
    }

    #[test]
    fn auth_and_ready_bytes() {
        let mut b = BytesMut::new();
        auth_ok(&mut b);
        ready_for_query(&mut b, TxStatus::Idle);
        backend_key_data(&mut b, 7, -1);
        parse_complete(&mut b);
        empty_query_response(&mut b);
        assert_eq!(
            &b[..],
            &b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05IK\0\0\0\x0c\0\0\0\x07\xff\xff\xff\xff1\0\0\0\x04I\0\0\0\x04"[..]
        );
    }

    #[test]
    fn nul_in_message_text_is_dropped() {
        let mut b = BytesMut::new();
        parameter_status(&mut b, "a\0b", "c");
        assert_eq!(&b[..], b"S\0\0\0\x09ab\0c\0");
    }
}

//! The W3C trace context (`traceparent`) an application puts into a statement's
//! sqlcommenter comment: found and parsed without I/O, so the transaction machine can
//! carry it (`obs::trace` makes the spans).

/// A W3C trace context (`traceparent`) found in a statement's comment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// The `traceparent` of a sqlcommenter comment in `sql`, if it has a valid one:
/// `traceparent='00-<32 hex>-<16 hex>-<2 hex>'` (version 00, ids not all zero).
pub fn traceparent(sql: &[u8]) -> Option<TraceParent> {
    const KEY: &[u8] = b"traceparent=";
    let at = memchr::memmem::find(sql, KEY)?;
    let rest = &sql[at + KEY.len()..];
    // sqlcommenter quotes values with single quotes; accept them bare too.
    let rest = rest.strip_prefix(b"'").unwrap_or(rest);
    let v = rest.get(..55)?;
    if &v[..3] != b"00-" || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    hex(&v[3..35], &mut trace_id)?;
    hex(&v[36..52], &mut span_id)?;
    let mut flags = [0u8; 1];
    hex(&v[53..55], &mut flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(TraceParent {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
    })
}

fn hex(s: &[u8], out: &mut [u8]) -> Option<()> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_read_from_sqlcommenter_comments() {
        let sql =
            b"SELECT 1 /*controller='index',traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/";
        let tp = traceparent(sql).unwrap();
        assert_eq!(tp.trace_id[..2], [0x0a, 0xf7]);
        assert_eq!(tp.span_id[7], 0x31);
        assert!(tp.sampled);
        let unsampled = b"/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00'*/ SELECT 1";
        assert!(!traceparent(unsampled).unwrap().sampled);
        for bad in [
            &b"SELECT 1"[..],
            b"/*traceparent='01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/",
            b"/*traceparent='00-00000000000000000000000000000000-b7ad6b7169203331-01'*/",
            b"/*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033zz-01'*/",
            b"/*traceparent='00-0af7651916cd43dd8448eb211c80319c'*/",
        ] {
            assert_eq!(traceparent(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}

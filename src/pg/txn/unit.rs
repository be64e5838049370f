//! Where a unit of work may run: a standby, or only the primary. Decided before the unit
//! gets a connection, from what the client has sent so far.

use bytes::Bytes;

use super::state::SessionState;
use super::statements::Statements;
use crate::pg::classify::Classifier;
use crate::pg::protocol::tags::FrontendTag;
use crate::pg::protocol::views::{self, Parse, Query, StatementRef};

/// Does the unit that starts with `first` only read? Looks at every statement up to the
/// first Sync among the messages already buffered (`rest`); an incomplete batch, or a
/// statement that does not provably read, makes it a write (the safe answer). A session
/// routed to the primary (`SET switchyard.route`) or whose transactions are SERIALIZABLE
/// (a standby refuses those) never reads elsewhere.
pub fn reads(first: &Bytes, rest: &[u8], stmts: &Statements, classifier: &Classifier, state: &SessionState) -> bool {
    if state.routes_to_primary() || state.serializable() {
        return false;
    }
    let judge = |msg: &[u8]| -> Option<bool> {
        let body = &msg[5..];
        let query: &[u8] = match FrontendTag::of(msg[0]) {
            Some(FrontendTag::Query) => Query::decode(body).ok()?.sql,
            Some(FrontendTag::Parse) => {
                let c = classifier.classify_parse(Parse::decode(body).ok()?.query);
                return Some(c.read_only && !c.hint_primary);
            }
            Some(tag @ (FrontendTag::Bind | FrontendTag::Describe)) => {
                let r = if tag == FrontendTag::Bind {
                    StatementRef::decode_bind(body).ok()?
                } else {
                    StatementRef::decode_target(body, "Describe").ok()?
                };
                if r.statement.is_empty() {
                    return Some(true); // judged by its Parse in the same batch
                }
                let c = &stmts.get(r.statement)?.class;
                return Some(c.read_only && !c.hint_primary);
            }
            Some(FrontendTag::Execute | FrontendTag::Flush) => return Some(true),
            _ => return Some(false),
        };
        let c = classifier.classify_bytes(query);
        Some(c.read_only && !c.hint_primary)
    };
    if FrontendTag::of(first[0]) == Some(FrontendTag::Query) {
        return judge(first).unwrap_or(false);
    }
    if !judge(first).unwrap_or(false) {
        return false;
    }
    let mut rest = rest;
    while let Some((tag, len)) = views::header(rest) {
        let Some(msg) = rest.get(..len as usize + 1) else {
            return false;
        };
        if FrontendTag::of(tag) == Some(FrontendTag::Sync) {
            return true;
        }
        if len < 4 || !judge(msg).unwrap_or(false) {
            return false;
        }
        rest = &rest[msg.len()..];
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn q(sql: &str) -> Bytes {
        let mut b = BytesMut::new();
        postgres_protocol::message::frontend::query(sql, &mut b).unwrap();
        b.freeze()
    }

    fn parse_bind_execute_sync(sql: &str) -> (Bytes, BytesMut) {
        let mut first = BytesMut::new();
        let mut after = sql.as_bytes().to_vec();
        after.extend_from_slice(b"\0\0\0");
        views::encode_parse(&mut first, b"", &after);
        let mut rest = BytesMut::new();
        rest.extend_from_slice(b"B\0\0\0\x0c\0\0\0\0\0\0\0\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04");
        (first.freeze(), rest)
    }

    #[test]
    fn reads_need_proof() {
        let k = Classifier::new(&[]);
        let stmts = Statements::default();
        let state = SessionState::new(Vec::new(), false);
        assert!(reads(&q("SELECT 1"), b"", &stmts, &k, &state));
        assert!(!reads(&q("UPDATE t SET v = 1"), b"", &stmts, &k, &state));
        let (first, rest) = parse_bind_execute_sync("SELECT 1");
        assert!(reads(&first, &rest, &stmts, &k, &state));
        // The Sync has not arrived: not proven.
        assert!(!reads(&first, &rest[..rest.len() - 5], &stmts, &k, &state));
        let (first, rest) = parse_bind_execute_sync("SELECT nextval('s')");
        assert!(!reads(&first, &rest, &stmts, &k, &state));
    }

    #[test]
    fn session_settings_can_forbid_standbys() {
        let k = Classifier::new(&[]);
        let stmts = Statements::default();
        let state = SessionState::new(
            vec![("options".into(), "-c default_transaction_isolation=serializable".into())],
            false,
        );
        assert!(!reads(&q("SELECT 1"), b"", &stmts, &k, &state));
        let state = SessionState::new(vec![("switchyard.route".into(), "primary".into())], false);
        assert!(!reads(&q("SELECT 1"), b"", &stmts, &k, &state));
    }
}

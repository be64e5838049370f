//! Protocol-level named prepared statements across pooled connections. A client's
//! statement lives on whichever connection it got when it prepared it; the next unit may
//! run elsewhere. So each statement is renamed to a content address (`sy_<hash>` of its
//! query and parameter types), prepared on demand on the connection in use, and the
//! answers the client did not ask for are dropped (see `owed`).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use postgres_protocol::message::frontend as fe;

use super::conn::Prepared;
use super::owed::{Owed, OwedQueue};
use crate::pg::classify::Classification;
use crate::pg::protocol::views::{self, Parse, StatementRef};

/// A client's named prepared statement.
pub struct Stmt {
    pub hash: u64,
    /// The Parse message under the server-side name, ready to send.
    pub parse: Bytes,
    pub server_name: String,
    /// Query text as the client sent it (its encoding, not necessarily UTF-8).
    pub query: Box<[u8]>,
    /// What the query does, classified once at its Parse: each Bind runs the same text,
    /// so it is not classified again (the literal blanking and the cache lookup were
    /// about 600 instructions per Bind under `bench/instructions -M prepared`).
    pub class: Arc<Classification>,
}

/// The content address of a statement: its query and parameter types (`after_name`).
fn statement_hash(after_name: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    after_name.hash(&mut h);
    h.finish()
}

impl Stmt {
    pub fn new(p: &Parse, class: Arc<Classification>) -> Stmt {
        let hash = statement_hash(p.after_name);
        let server_name = format!("sy_{hash:016x}");
        let mut parse = BytesMut::new();
        views::encode_parse(&mut parse, server_name.as_bytes(), p.after_name);
        Stmt {
            hash,
            parse: parse.freeze(),
            server_name,
            query: p.query.into(),
            class,
        }
    }

    fn ensure(&self, out: &mut BytesMut, owed: &mut OwedQueue, prepared: &mut Prepared) {
        ensure(self.hash, &self.server_name, &self.parse, out, owed, prepared);
    }
}

/// Make sure the statement `hash` (`server_name`, prepared by `parse`) exists on the
/// connection (`prepared`), with answers the client does not see. Closing first means a
/// Parse can never fail with "already exists" (closing a statement that does not exist
/// is no error).
fn ensure(
    hash: u64,
    server_name: &str,
    parse: &[u8],
    out: &mut BytesMut,
    owed: &mut OwedQueue,
    prepared: &mut Prepared,
) {
    if prepared.insert(hash) {
        views::encode_close_statement(out, server_name.as_bytes());
        owed.push(Owed::CloseComplete { pass: false });
        out.extend_from_slice(parse);
        owed.push(Owed::ParseComplete {
            pass: false,
            hash: Some(hash),
        });
    }
}

/// A question of the proxy's own, sent on whatever pooled connection a unit holds (the
/// read-your-writes floor question: `Machine::ask_floor`). Prepared there the first time
/// under its content address, as a client's statement would be (a client's statement of
/// the same text is the same one), then only bound and executed: a simple Query is
/// parsed and planned every time, and for this question that was a third of its cost
/// (`pgbench -c 1` on the primary: 64 µs per question as a simple Query, 44 prepared).
pub struct OwnStatement {
    sql: &'static str,
    hash: u64,
    server_name: String,
    parse: Bytes,
    /// Bind (unnamed portal, no parameters, results as text), Execute, Sync.
    run: Bytes,
}

impl OwnStatement {
    pub fn new(sql: &'static str) -> OwnStatement {
        // What a Parse carries after the name: the text, NUL, no parameter types.
        let mut after_name = Vec::with_capacity(sql.len() + 3);
        after_name.extend_from_slice(sql.as_bytes());
        after_name.push(0);
        after_name.extend_from_slice(&0i16.to_be_bytes());
        let hash = statement_hash(&after_name);
        let server_name = format!("sy_{hash:016x}");
        let mut parse = BytesMut::new();
        views::encode_parse(&mut parse, server_name.as_bytes(), &after_name);
        let mut run = BytesMut::new();
        fe::bind(
            "",
            &server_name,
            std::iter::empty::<i16>(),
            std::iter::empty::<()>(),
            |_, _| Ok(postgres_protocol::IsNull::No),
            std::iter::empty::<i16>(),
            &mut run,
        )
        .map_err(|_| ())
        .expect("a Bind with no parameters encodes");
        fe::execute("", 0, &mut run).expect("an unnamed portal encodes");
        fe::sync(&mut run);
        OwnStatement {
            sql,
            hash,
            server_name,
            parse: parse.freeze(),
            run: run.freeze(),
        }
    }

    /// Its text (to ask it as a simple Query where no answer can cross a client's).
    pub fn sql(&self) -> &'static str {
        self.sql
    }

    /// Queue it after a client's request, on a connection whose named statements are
    /// `prepared`: its answer is the proxy's (`Owed::Floor`).
    pub fn queue(&self, out: &mut BytesMut, owed: &mut OwedQueue, prepared: &mut Prepared) {
        ensure(self.hash, &self.server_name, &self.parse, out, owed, prepared);
        out.extend_from_slice(&self.run);
        owed.push(Owed::Floor);
    }
}

/// The client's named statements, by the name it gave them (bytes in its encoding).
/// Looked up at every Bind, so hashed with foldhash (a random seed per map) rather than
/// SipHash.
#[derive(Default)]
pub struct Statements {
    by_name: HashMap<Box<[u8]>, Stmt, foldhash::fast::RandomState>,
}

impl Statements {
    pub fn get(&self, name: &[u8]) -> Option<&Stmt> {
        self.by_name.get(name)
    }

    /// Every statement as (the client's name, its Parse message under the server-side
    /// name), to carry to a successor process (`Machine::carry`); `define` puts them back.
    pub fn carried(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        self.by_name
            .iter()
            .map(|(name, s)| (name.to_vec(), s.parse.to_vec()))
            .collect()
    }

    /// Record a statement without sending it (a lone Parse + Sync answered by the proxy).
    pub fn define(&mut self, p: &Parse, class: Arc<Classification>) {
        self.by_name.insert(p.name.into(), Stmt::new(p, class));
    }

    /// Parse: the unnamed statement as it is; a named one under its server-side name.
    /// `class`: what the machine classified its query as.
    pub fn parse(
        &mut self,
        msg: &[u8],
        p: &Parse,
        class: &Arc<Classification>,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        prepared: &mut Prepared,
    ) {
        if p.name.is_empty() {
            owed.push(Owed::ParseComplete { pass: true, hash: None });
            out.extend_from_slice(msg);
            return;
        }
        let stmt = Stmt::new(p, class.clone());
        // The same text may already be prepared on this connection (by this client
        // earlier, or another): close it first so the Parse cannot fail with "already
        // exists" and the client gets its ParseComplete in order.
        views::encode_close_statement(out, stmt.server_name.as_bytes());
        owed.push(Owed::CloseComplete { pass: false });
        owed.push(Owed::ParseComplete {
            pass: true,
            hash: Some(stmt.hash),
        });
        prepared.insert(stmt.hash);
        out.extend_from_slice(&stmt.parse);
        self.by_name.insert(p.name.into(), stmt);
    }

    /// Bind or Describe (`tag`) naming a statement (`r`): renamed, after preparing the
    /// statement here if this connection does not have it. Returns the statement when it
    /// is one of the client's named statements.
    pub fn refer(
        &self,
        tag: u8,
        msg: &[u8],
        r: &StatementRef,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        prepared: &mut Prepared,
    ) -> Option<&Stmt> {
        // The unnamed statement (most Binds of the extended protocol) is not looked up.
        let named = (!r.statement.is_empty())
            .then(|| self.by_name.get(r.statement))
            .flatten();
        match named {
            Some(stmt) => {
                stmt.ensure(out, owed, prepared);
                r.encode_renamed(out, tag, stmt.server_name.as_bytes());
                Some(stmt)
            }
            None => {
                out.extend_from_slice(msg);
                None
            }
        }
    }

    /// Close of a statement or portal.
    pub fn close(
        &mut self,
        msg: &[u8],
        r: &StatementRef,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        prepared: &mut Prepared,
    ) {
        let known = if r.statement.is_empty() {
            None
        } else {
            self.by_name.remove(r.statement)
        };
        match known {
            Some(stmt) => {
                prepared.remove(&stmt.hash);
                views::encode_close_statement(out, stmt.server_name.as_bytes());
            }
            None => out.extend_from_slice(msg),
        }
        owed.push(Owed::CloseComplete { pass: true });
    }

    /// SQL `DEALLOCATE name` / `DEALLOCATE ALL` (`name` empty) sent as a simple Query
    /// (`msg`, whose `Ready` is already owed). A protocol-level statement is known to the
    /// server under its content address, maybe not even on this connection.
    pub fn deallocate(
        &mut self,
        msg: &[u8],
        name: &str,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        prepared: &mut Prepared,
    ) -> std::io::Result<()> {
        if name.is_empty() {
            self.by_name.clear();
            prepared.clear();
            out.extend_from_slice(msg);
            return Ok(());
        }
        let Some(stmt) = self.by_name.remove(name.as_bytes()) else {
            out.extend_from_slice(msg);
            return Ok(());
        };
        if !prepared.remove(&stmt.hash) {
            // Not here: create it (answers dropped) so the DEALLOCATE succeeds with the
            // reply the client expects.
            views::encode_close_statement(out, stmt.server_name.as_bytes());
            out.extend_from_slice(&stmt.parse);
            owed.insert_before_last(Owed::CloseComplete { pass: false });
            owed.insert_before_last(Owed::ParseComplete {
                pass: false,
                hash: None,
            });
        }
        postgres_protocol::message::frontend::query(&format!("DEALLOCATE {}", stmt.server_name), out)
    }
}

/// SQL-level prepared statements (`PREPARE name AS …` / `EXECUTE name(…)` /
/// `DEALLOCATE name`) across pooled connections. The server knows them by the client's
/// own name, so no SQL is rewritten: before a client's request that executes (or
/// deallocates) a name, the connection's statement of that name is made the client's,
/// by replaying the client's `PREPARE` text (and first `DEALLOCATE` of another
/// client's), as simple Queries whose answers are dropped. A `PREPARE` counts once the
/// server confirmed it (its CommandComplete); a connection knows what it holds
/// (`ConnState::sql_prepared`), so it never runs another client's statement.
///
/// Boxed, and made only when the client first prepares one: few clients do, and every
/// idle client would carry the maps.
#[derive(Default)]
pub struct SqlStatements(Option<Box<Known>>);

#[derive(Default)]
struct Known {
    by_name: HashMap<String, SqlStmt>,
    /// PREPAREs sent and not yet confirmed, in order.
    pending: std::collections::VecDeque<(String, SqlStmt)>,
}

#[derive(Clone)]
struct SqlStmt {
    hash: u64,
    /// The client's PREPARE as a simple Query, ready to replay.
    prepare: Bytes,
}

impl SqlStmt {
    fn new(text: &str) -> SqlStmt {
        let mut prepare = BytesMut::new();
        postgres_protocol::message::frontend::query(text, &mut prepare).expect("the client's text has no NUL");
        SqlStmt {
            hash: statement_hash(text.as_bytes()),
            prepare: prepare.freeze(),
        }
    }
}

/// A simple Query of the proxy's own, answered but not shown to the client.
fn replay(out: &mut BytesMut, owed: &mut OwedQueue, sql: &str) {
    postgres_protocol::message::frontend::query(sql, out).expect("no NUL in a replayed statement");
    owed.push(Owed::Replay);
}

/// A name as an SQL identifier (it is already folded: quoted, it stays as it is).
fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl SqlStatements {
    fn known(&mut self) -> &mut Known {
        self.0.get_or_insert_with(Default::default)
    }

    /// The client knows no SQL statement: nothing to do for it.
    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|k| k.is_empty())
    }

    /// Make the connection's statement `name` the client's (or none, if the client has
    /// none of that name).
    pub fn ensure(&self, name: &str, out: &mut BytesMut, owed: &mut OwedQueue, conn: &mut HashMap<String, u64>) {
        match &self.0 {
            Some(k) => k.ensure(name, out, owed, conn),
            None => Known::default().ensure(name, out, owed, conn),
        }
    }

    /// Every statement as (name, the client's PREPARE text): `Known::carried`.
    pub fn carried(&self) -> Vec<(String, String)> {
        self.0.as_ref().map(|k| k.carried()).unwrap_or_default()
    }

    pub fn restore(&mut self, name: String, text: &str) {
        self.known().restore(name, text)
    }

    pub fn preparing(
        &mut self,
        name: &str,
        text: &str,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        conn: &mut HashMap<String, u64>,
    ) {
        self.known().preparing(name, text, out, owed, conn)
    }

    pub fn confirmed(&mut self, conn: &mut HashMap<String, u64>) {
        if let Some(k) = &mut self.0 {
            k.confirmed(conn)
        }
    }

    pub fn settled(&mut self) {
        if let Some(k) = &mut self.0 {
            k.settled()
        }
    }

    pub fn deallocate(
        &mut self,
        name: &str,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        conn: &mut HashMap<String, u64>,
    ) -> bool {
        match &mut self.0 {
            Some(k) => k.deallocate(name, out, owed, conn),
            None => Known::default().deallocate(name, out, owed, conn),
        }
    }

    pub fn forget_all(&mut self, conn: &mut HashMap<String, u64>) {
        match &mut self.0 {
            Some(k) => k.forget_all(conn),
            None => conn.clear(),
        }
    }
}

impl Known {
    /// The client knows no SQL statement: nothing to do for it.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty() && self.pending.is_empty()
    }

    /// Make the connection's statement `name` the client's (or none, if the client has
    /// none of that name). Replays go to `out` with their answers owed, before what the
    /// caller queues next.
    pub fn ensure(&self, name: &str, out: &mut BytesMut, owed: &mut OwedQueue, conn: &mut HashMap<String, u64>) {
        let want = self.by_name.get(name);
        let have = conn.get(name).copied();
        if want.map(|s| s.hash) == have {
            return;
        }
        if have.is_some() {
            replay(out, owed, &format!("DEALLOCATE {}", quoted(name)));
            conn.remove(name);
        }
        if let Some(s) = want {
            out.extend_from_slice(&s.prepare);
            owed.push(Owed::Replay);
            conn.insert(name.to_string(), s.hash);
        }
    }

    /// Every statement as (name, the client's PREPARE text), to carry to a successor
    /// process (`Machine::carry`; nothing is pending between units).
    pub fn carried(&self) -> Vec<(String, String)> {
        self.by_name
            .iter()
            .filter_map(|(name, s)| {
                let sql = views::Query::decode(s.prepare.get(5..)?).ok()?.sql;
                Some((name.clone(), String::from_utf8_lossy(sql).into_owned()))
            })
            .collect()
    }

    /// A statement carried from a predecessor process (`carried`): the client's, as if
    /// confirmed; connections learn it when it is used.
    pub fn restore(&mut self, name: String, text: &str) {
        self.by_name.insert(name, SqlStmt::new(text));
    }

    /// The client prepares `name` as `text`: another client's statement of that name
    /// goes first; it is the client's once the server confirms it (`confirmed`).
    pub fn preparing(
        &mut self,
        name: &str,
        text: &str,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        conn: &mut HashMap<String, u64>,
    ) {
        if conn.remove(name).is_some() {
            replay(out, owed, &format!("DEALLOCATE {}", quoted(name)));
        }
        self.pending.push_back((name.to_string(), SqlStmt::new(text)));
    }

    /// The server confirmed the oldest PREPARE sent (CommandComplete `PREPARE`).
    pub fn confirmed(&mut self, conn: &mut HashMap<String, u64>) {
        if let Some((name, s)) = self.pending.pop_front() {
            conn.insert(name.clone(), s.hash);
            self.by_name.insert(name, s);
        }
    }

    /// The client's request was answered (ReadyForQuery): PREPAREs not confirmed by now
    /// failed or never ran.
    pub fn settled(&mut self) {
        self.pending.clear();
    }

    /// `DEALLOCATE name` of the client's (true), or of a name this connection holds for
    /// another client: the connection's statement is made the client's first, so the
    /// server answers as it would the client alone; then it is gone.
    pub fn deallocate(
        &mut self,
        name: &str,
        out: &mut BytesMut,
        owed: &mut OwedQueue,
        conn: &mut HashMap<String, u64>,
    ) -> bool {
        if !self.by_name.contains_key(name) && !conn.contains_key(name) {
            return false;
        }
        self.ensure(name, out, owed, conn);
        self.by_name.remove(name);
        conn.remove(name);
        true
    }

    /// `DEALLOCATE ALL` or `DISCARD ALL`: nothing is prepared any more.
    pub fn forget_all(&mut self, conn: &mut HashMap<String, u64>) {
        self.by_name.clear();
        conn.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::classify::Classifier;

    fn parse_msg(name: &[u8], query: &[u8]) -> BytesMut {
        let mut after = query.to_vec();
        after.extend_from_slice(b"\0\0\0");
        let mut b = BytesMut::new();
        views::encode_parse(&mut b, name, &after);
        b
    }

    #[test]
    fn a_named_statement_is_renamed_and_prepared_where_it_is_used() {
        let k = Classifier::new(&[]);
        let mut stmts = Statements::default();
        let mut owed = OwedQueue::default();
        let mut out = BytesMut::new();
        let mut here = Prepared::default();
        let msg = parse_msg(b"P_0", b"SELECT 1");
        let p = Parse::decode(&msg[5..]).unwrap();
        stmts.parse(&msg, &p, &k.classify_bytes(p.query), &mut out, &mut owed, &mut here);
        let server_name = stmts.get(b"P_0").unwrap().server_name.clone();
        assert!(server_name.starts_with("sy_"));
        // Close sy_..., then Parse sy_...
        assert_eq!(out[0], b'C');
        assert!(out.windows(server_name.len()).any(|w| w == server_name.as_bytes()));
        assert!(!out.windows(3).any(|w| w == b"P_0"));
        // On another connection, a Bind prepares it first (answers dropped).
        let mut there = Prepared::default();
        let mut out2 = BytesMut::new();
        let mut owed2 = OwedQueue::default();
        let bind = b"B\0\0\0\x0f\0P_0\0\0\0\0\0\0\0";
        let r = StatementRef::decode_bind(&bind[5..]).unwrap();
        let stmt = stmts.refer(b'B', bind, &r, &mut out2, &mut owed2, &mut there).unwrap();
        assert_eq!(&*stmt.query, b"SELECT 1");
        assert!(stmt.class.read_only, "its classification at Parse is kept");
        assert_eq!(there.len(), 1);
        let tags: Vec<u8> = {
            let mut v = Vec::new();
            let mut rest = &out2[..];
            while let Some((t, len)) = views::header(rest) {
                v.push(t);
                rest = &rest[len as usize + 1..];
            }
            v
        };
        assert_eq!(tags, b"CPB");
        // The same text under another client name shares the server-side statement.
        let msg = parse_msg(b"other", b"SELECT 1");
        let p = Parse::decode(&msg[5..]).unwrap();
        stmts.parse(&msg, &p, &k.classify_bytes(p.query), &mut out, &mut owed, &mut here);
        assert_eq!(stmts.get(b"other").unwrap().server_name, server_name);
    }

    #[test]
    fn deallocate_of_a_statement_prepared_elsewhere_still_succeeds() {
        let mut stmts = Statements::default();
        let msg = parse_msg(b"s", b"SELECT 2");
        let p = Parse::decode(&msg[5..]).unwrap();
        stmts.define(&p, Classifier::new(&[]).classify_bytes(p.query));
        let mut owed = OwedQueue::default();
        owed.push(Owed::Ready);
        let mut out = BytesMut::new();
        let q = b"Q\0\0\0\x11DEALLOCATE s\0";
        stmts
            .deallocate(q, "s", &mut out, &mut owed, &mut Prepared::default())
            .unwrap();
        assert!(stmts.get(b"s").is_none());
        // Close, Parse, then the DEALLOCATE under the server name.
        assert_eq!(out[0], b'C');
        assert!(out.ends_with(b"\0") && out.windows(14).any(|w| w == b"DEALLOCATE sy_"));
        assert_eq!(owed.pending(), 1);
        // An unknown name is the server's business (it answers "does not exist").
        let mut out = BytesMut::new();
        stmts
            .deallocate(q, "nope", &mut out, &mut owed, &mut Prepared::default())
            .unwrap();
        assert_eq!(&out[..], q);
    }
}

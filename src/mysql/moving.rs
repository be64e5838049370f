//! Moving a session-pooled MySQL session to another server connection (the new primary
//! after a switchover) without the client noticing: what a session set is read back
//! from its old connection and set again on the new one; what cannot be carried over
//! (temporary tables, user variables, prepared statements, named locks, table locks,
//! session variables outside the replayed list) is noticed as the client's statements
//! pass, and such a session is ended with a clear error instead of being moved.
//!
//! The statement scan (`scan`) is a small lexer written here because only a few words
//! matter and it must run on the bytes as they pass (any encoding; no allocation); a
//! full SQL parser for MySQL's dialect would not change what it finds.

use std::sync::Arc;
use std::time::Duration;

use mysql_common::constants::CapabilityFlags;
use tracing::info;

use super::protocol::{self, first_row, first_value};
use super::relay::Relay;
use super::server::{LoginRequest, ServerConn};
use super::session::{End, MysqlDialer};
use crate::cluster::routing;
use crate::cluster::topology::{ClusterSnapshot, Role};
use crate::error::Error;
use crate::proxy::connector;

/// How long reading a session's settings back, or setting them again, may take.
const STEP: Duration = Duration::from_secs(5);

impl Relay<'_> {
    /// A command arrived while the session is held (PAUSE, a switchover's hold) or must
    /// move. Wait for the hold to end; then, if this node is no longer where rw
    /// sessions go, move the session to the new primary: its settings read back from
    /// the old connection and set on a new one (logged in as the client). Some(new
    /// connection) when it moved; an error (sent to the client for its held command)
    /// when it cannot move.
    pub(super) async fn hold(
        &mut self,
        server: &mut ServerConn,
        topology: &mut tokio::sync::watch::Receiver<Arc<ClusterSnapshot>>,
        caps: CapabilityFlags,
    ) -> Result<Option<ServerConn>, End> {
        tokio::select! {
            _ = self.cluster.wait_unpaused() => {}
            e = self.shared.closing(self.cluster) => return Err(End::Failed(e)),
        }
        let snap = topology.borrow_and_update().clone();
        if routing::eviction(self.endpoint, &snap, &self.node.name).is_none() {
            self.move_pending.store(false, std::sync::atomic::Ordering::Relaxed);
            return Ok(None);
        }
        self.move_session(server, topology, caps, MoveTo::NewPrimary)
            .await
            .map(Some)
    }

    /// Move the session to another server connection: its settings read back from the
    /// old connection and set on a new one (logged in as the client) on the primary
    /// (`to`). An error (sent to the client for its waiting command) when it cannot.
    pub(super) async fn move_session(
        &mut self,
        server: &mut ServerConn,
        topology: &mut tokio::sync::watch::Receiver<Arc<ClusterSnapshot>>,
        caps: CapabilityFlags,
        to: MoveTo,
    ) -> Result<ServerConn, End> {
        let old = self.node.name.clone();
        let refuse = |why: &str| {
            match to {
            MoveTo::NewPrimary => End::Failed(Error::evicted(
                true,
                format!(
                    "the primary moved away from \"{old}\" (a switchover) and this session holds {why}, which cannot be moved to the new primary; reconnect"
                ),
            )),
            MoveTo::PrimaryForFreshness { waited } => End::Failed(Error::not_fresh(format!(
                "node \"{old}\" has not applied the writes this session must see within {} ms (causal_wait_ms), and this session holds {why}, which cannot be moved to the primary; reconnect to be placed on a node that has",
                waited.as_millis()
            ))),
        }
        };
        let outcome = |moved: bool| match (to, moved) {
            (MoveTo::NewPrimary, true) => "moved",
            (MoveTo::NewPrimary, false) => "refused",
            (MoveTo::PrimaryForFreshness { .. }, true) => "moved_for_freshness",
            (MoveTo::PrimaryForFreshness { .. }, false) => "refused_for_freshness",
        };
        let lost = self.tracked.lock().unwrap().answers.lost;
        if let Some(why) = self
            .inbound
            .unmovable()
            .or(lost.then_some("a state the proxy did not follow"))
        {
            self.shared.metrics.session_moved(&self.cluster.name, outcome(false));
            match to {
                MoveTo::NewPrimary => {
                    info!(cluster = %self.cluster.name, node = %old, reason = why, "session not moved to the new primary")
                }
                MoveTo::PrimaryForFreshness { .. } => {
                    info!(cluster = %self.cluster.name, node = %old, reason = why, "session not moved to the primary for a fresh read")
                }
            }
            return Err(refuse(why));
        }
        let mariadb = server.greeting.version.contains("MariaDB");
        let values = match tokio::time::timeout(STEP, first_row(&mut server.stream, caps, &capture_sql(mariadb))).await
        {
            Ok(Ok(Some(v))) => v,
            Ok(Err(e)) => {
                return Err(refuse(&format!(
                    "settings that could not be read back ({})",
                    e.message()
                )))
            }
            _ => return Err(refuse("settings that could not be read back (no answer)")),
        };
        let mut dialer = MysqlDialer::new(
            self.cluster,
            &self.shared.config(),
            LoginRequest {
                user: &self.user.name,
                password: self.user.password.as_deref(),
                database: None,
                capabilities: self.client.capabilities,
                collation: self.client.collation,
                attributes: self.client.attributes.clone(),
            },
            self.endpoint,
        );
        let primary_only = |snap: &ClusterSnapshot, i: usize| snap.nodes[i].role == Role::Primary;
        let accept: Option<connector::Accept<'_>> = match to {
            MoveTo::NewPrimary => None,
            MoveTo::PrimaryForFreshness { .. } => Some(&primary_only),
        };
        let connected = connector::connect(self.cluster, self.endpoint, None, accept, Some(topology), &mut dialer)
            .await
            .map_err(End::Failed)?;
        let node = connected.node().clone();
        let (mut conn, slot) = connected.conn;
        if self.endpoint == crate::cluster::routing::Endpoint::ReadWrite {
            self.tracking = conn.tracking;
            self.tracked.lock().unwrap().answers.track = conn.tracking;
        }
        let (set, database) = replay_sql(mariadb, &values);
        let replay = async {
            first_value(&mut conn.stream, caps, &set).await?;
            if let Some(db) = database {
                first_value(&mut conn.stream, caps, &format!("USE `{}`", db.replace('`', "``"))).await?;
            }
            Ok::<_, Error>(())
        };
        match tokio::time::timeout(STEP, replay).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(refuse(&format!("settings the new primary refused ({})", e.message()))),
            Err(_) => return Err(refuse("settings the new primary did not take in time")),
        }
        // The old connection says goodbye; the KILL registry points at the new one.
        let _ = tokio::time::timeout(
            Duration::from_millis(200),
            protocol::write_packet(&mut server.stream, 0, &[protocol::COM_QUIT]),
        )
        .await;
        self.shared
            .cancels
            .retarget(&self.registered, Some((&node.addr, conn.thread_id as i32, 0)));
        self.shared.metrics.session_moved(&self.cluster.name, outcome(true));
        match to {
            MoveTo::NewPrimary => {
                info!(cluster = %self.cluster.name, from = %old, to = %node.name, server_thread = conn.thread_id, "session moved to the new primary between transactions")
            }
            MoveTo::PrimaryForFreshness { .. } => {
                info!(cluster = %self.cluster.name, from = %old, to = %node.name, server_thread = conn.thread_id, "session moved to the primary for a fresh read")
            }
        }
        self.node = node;
        self.slot = slot;
        // Transaction pooling (a pinned session): the old connection is closed, its
        // pool slot freed; the new one is the session's own until it ends.
        self.lease = None;
        self.move_pending.store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }
}

/// Where `Relay::move_session` takes a session.
#[derive(Clone, Copy)]
pub(super) enum MoveTo {
    /// rw, after a switchover: the new primary.
    NewPrimary,
    /// ro: the primary, because no replica applied what the session's reads must see
    /// within `waited`.
    PrimaryForFreshness { waited: Duration },
}

/// Session variables read back and set again, each as MariaDB and MySQL 8 name it.
/// Together with the current database, this is what a moved session keeps.
pub const REPLAYED: &[(&str, &str)] = &[
    ("autocommit", "autocommit"),
    ("sql_mode", "sql_mode"),
    ("time_zone", "time_zone"),
    ("character_set_client", "character_set_client"),
    ("character_set_connection", "character_set_connection"),
    ("character_set_results", "character_set_results"),
    ("collation_connection", "collation_connection"),
    ("tx_isolation", "transaction_isolation"),
    ("tx_read_only", "transaction_read_only"),
    ("foreign_key_checks", "foreign_key_checks"),
    ("unique_checks", "unique_checks"),
    ("sql_auto_is_null", "sql_auto_is_null"),
    ("group_concat_max_len", "group_concat_max_len"),
    ("innodb_lock_wait_timeout", "innodb_lock_wait_timeout"),
    ("wait_timeout", "wait_timeout"),
    ("sql_select_limit", "sql_select_limit"),
    ("max_join_size", "max_join_size"),
    ("sql_safe_updates", "sql_safe_updates"),
];

/// Names a `SET` may use for the replayed variables (besides their own).
const ALIASES: &[&str] = &[
    "NAMES",
    "CHARACTER",
    "CHARSET",
    "TRANSACTION_ISOLATION",
    "TRANSACTION_READ_ONLY",
];

/// The query that reads a session's state back (database first, then `REPLAYED`).
pub fn capture_sql(mariadb: bool) -> String {
    let vars: Vec<String> = REPLAYED
        .iter()
        .map(|(m, y)| format!("@@session.{}", if mariadb { m } else { y }))
        .collect();
    format!("SELECT DATABASE(), {}", vars.join(", "))
}

/// The statement that sets the captured state again (`values` as `capture_sql`
/// returned them; None is SQL NULL), and the database to select.
pub fn replay_sql(mariadb: bool, values: &[Option<String>]) -> (String, Option<String>) {
    let database = values.first().cloned().flatten();
    let sets: Vec<String> = REPLAYED
        .iter()
        .zip(values.iter().skip(1))
        .map(|((m, y), v)| {
            let name = if mariadb { m } else { y };
            let value = match v {
                None => "NULL".to_string(),
                Some(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => v.clone(),
                Some(v) => format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''")),
            };
            format!("@@session.{name} = {value}")
        })
        .collect();
    (format!("SET {}", sets.join(", ")), database)
}

/// The bytes a word goes on with (letters, digits, `_`, `$`): a table, because every
/// byte of every statement is looked at here.
static WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
        c += 1;
    }
    t
};

/// Why a statement leaves state on the connection that a move cannot carry over, if it
/// does. `text`: the statement as sent (`COM_QUERY`'s payload after the command byte).
pub fn scan(text: &[u8]) -> Option<&'static str> {
    // Every statement passes here, and nearly none leaves state. Each rule of
    // `scan_words` needs one of these in the text (in any letter case): `@`, `lock`
    // (also in GET_LOCK), `temporary`, `handler`, or SET or PREPARE as the first word.
    // A statement with none is passed over with a few SIMD byte searches (`memchr`)
    // for the rare byte of each, rather than word by word. (A text that starts with
    // anything but a word, a comment say, takes the word-by-word scan.)
    let has = |rare: [u8; 2], at: usize, word: &[u8]| {
        memchr::memchr2_iter(rare[0], rare[1], text).any(|i| {
            i.checked_sub(at)
                .and_then(|start| text.get(start..start + word.len()))
                .is_some_and(|w| w.eq_ignore_ascii_case(word))
        })
    };
    let start = text.trim_ascii_start();
    let first_len = start
        .iter()
        .position(|&c| !WORD_BYTE[c as usize])
        .unwrap_or(start.len());
    let first = &start[..first_len];
    let plain_start = start.first().is_none_or(|c| c.is_ascii_alphabetic() || *c == b'_');
    let needed = !plain_start
        || first.eq_ignore_ascii_case(b"set")
        || first.eq_ignore_ascii_case(b"prepare")
        || memchr::memchr(b'@', text).is_some()
        || has([b'k', b'K'], 3, b"lock")
        || has([b'y', b'Y'], 8, b"temporary")
        || has([b'h', b'H'], 0, b"handler");
    if !needed {
        return None;
    }
    scan_words(text)
}

/// `scan`, word by word.
fn scan_words(text: &[u8]) -> Option<&'static str> {
    let mut words: [Option<Word>; 3] = [None; 3]; // the first three words
    let mut count = 0usize;
    let mut i = 0;
    let n = text.len();
    let mut prev: Option<Word> = None;
    while i < n {
        let c = text[i];
        match c {
            b'\'' | b'"' | b'`' => {
                i += 1;
                while i < n && text[i] != c {
                    if text[i] == b'\\' && c != b'`' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
                prev = None;
            }
            b'-' if text.get(i + 1) == Some(&b'-') => {
                while i < n && text[i] != b'\n' {
                    i += 1;
                }
            }
            b'#' => {
                while i < n && text[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if text.get(i + 1) == Some(&b'*') && text.get(i + 2) != Some(&b'!') => {
                i += 2;
                while i + 1 < n && !(text[i] == b'*' && text[i + 1] == b'/') {
                    i += 1;
                }
                i += 2;
            }
            b'@' => {
                if text.get(i + 1) == Some(&b'@') {
                    // A system variable: @@session.x / @@x are replayed or checked by
                    // the SET rule; @@global.x changes nothing in the session.
                    i += 2;
                } else {
                    return Some("a user variable (@name)");
                }
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < n && WORD_BYTE[text[i] as usize] {
                    i += 1;
                }
                let w = Word::of(&text[start..i]);
                if count < 3 {
                    words[count] = Some(w);
                }
                count += 1;
                match (prev, w) {
                    (Some(Word::Create), Word::Temporary) => return Some("a temporary table"),
                    (_, Word::GetLock) => return Some("a named lock (GET_LOCK)"),
                    (Some(Word::Lock), Word::Tables) => return Some("table locks (LOCK TABLES)"),
                    (Some(Word::Handler), _) => return Some("an open HANDLER"),
                    _ => {}
                }
                if count == 1 && w == Word::Prepare {
                    return Some("a prepared statement (PREPARE)");
                }
                prev = Some(w);
                continue;
            }
            _ => {
                if !c.is_ascii_whitespace() {
                    prev = None;
                }
                i += 1;
            }
        }
    }
    if words[0] == Some(Word::Set) {
        return set_rule(text);
    }
    None
}

/// A `SET` statement: fine when every variable it sets in the session is replayed.
fn set_rule(text: &[u8]) -> Option<&'static str> {
    let s = String::from_utf8_lossy(text);
    let body = s.trim_start();
    let body = &body[3.min(body.len())..];
    for part in split_top_level(body) {
        let target = part.split('=').next().unwrap_or("").trim();
        let mut t = target.to_ascii_uppercase();
        for prefix in ["@@SESSION.", "@@LOCAL.", "SESSION ", "LOCAL ", "@@"] {
            if let Some(rest) = t.strip_prefix(prefix) {
                t = rest.trim_start().to_string();
            }
        }
        if t.starts_with("@@GLOBAL.") || t.starts_with("GLOBAL ") {
            continue;
        }
        let name = t.split_whitespace().next().unwrap_or("");
        if name == "TRANSACTION" {
            // SET TRANSACTION ...: the next transaction only (SET SESSION TRANSACTION
            // was stripped to this too: its isolation and access mode are replayed).
            continue;
        }
        let known = REPLAYED
            .iter()
            .any(|(m, y)| name.eq_ignore_ascii_case(m) || name.eq_ignore_ascii_case(y))
            || ALIASES.contains(&name);
        if !known {
            return Some("a session variable that is not replayed");
        }
    }
    None
}

/// `a = 1, b = 'x,y'` split at the commas outside quotes and parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut quote, mut start) = (Vec::new(), 0i32, None::<char>, 0);
    let mut chars = s.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => {
                chars.next();
            }
            (Some(_), _) => {}
            (None, '\'' | '"' | '`') => quote = Some(c),
            (None, '(') => depth += 1,
            (None, ')') => depth -= 1,
            (None, ',') if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            (None, ';') if depth == 0 => break,
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Create,
    Temporary,
    GetLock,
    Lock,
    Tables,
    Handler,
    Prepare,
    Set,
    Other,
}

impl Word {
    fn of(w: &[u8]) -> Word {
        let is = |k: &[u8]| w.eq_ignore_ascii_case(k);
        // By length first: every word of every statement passes here.
        match w.len() {
            3 if is(b"SET") => Word::Set,
            4 if is(b"LOCK") => Word::Lock,
            5 if is(b"TABLE") => Word::Tables,
            6 if is(b"CREATE") => Word::Create,
            6 if is(b"TABLES") => Word::Tables,
            7 if is(b"HANDLER") => Word::Handler,
            7 if is(b"PREPARE") => Word::Prepare,
            8 if is(b"GET_LOCK") => Word::GetLock,
            9 if is(b"TEMPORARY") => Word::Temporary,
            _ => Word::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_pass_lets_through_every_statement_a_rule_names() {
        // Texts over the words and characters the rules look at, at random: the quick
        // pass must never hide what the word-by-word scan finds.
        let parts = [
            "CREATE ",
            "temporary ",
            "TABLE ",
            "tables ",
            "lock ",
            "get_lock(",
            "HANDLER ",
            "prepare ",
            "SET ",
            "@x ",
            "@@session.x ",
            "'s' ",
            "-- c\n",
            "/* c */ ",
            "# c\n",
            "SELECT ",
            "a ",
            "1 ",
            "= ",
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = 1 + (next() % 6) as usize;
            let text: String = (0..n).map(|_| parts[(next() % parts.len() as u64) as usize]).collect();
            assert_eq!(scan(text.as_bytes()), scan_words(text.as_bytes()), "{text:?}");
        }
        assert_eq!(scan(b"SELECT c FROM sbtest1 WHERE id = 5"), None);
    }

    #[test]
    fn statements_that_leave_state_behind_are_named() {
        let s = |t: &str| scan(t.as_bytes());
        assert_eq!(s("CREATE TEMPORARY TABLE t (id int)"), Some("a temporary table"));
        assert_eq!(
            s("create  /* x */ temporary table t (id int)"),
            Some("a temporary table")
        );
        assert_eq!(s("SELECT GET_LOCK('job', 10)"), Some("a named lock (GET_LOCK)"));
        assert_eq!(s("SET @x = 1"), Some("a user variable (@name)"));
        assert_eq!(s("SELECT @x"), Some("a user variable (@name)"));
        assert_eq!(s("PREPARE s FROM 'SELECT 1'"), Some("a prepared statement (PREPARE)"));
        assert_eq!(s("LOCK TABLES t WRITE"), Some("table locks (LOCK TABLES)"));
        assert_eq!(s("HANDLER t OPEN"), Some("an open HANDLER"));
        assert_eq!(
            s("SET SESSION optimizer_switch = 'x=on'"),
            Some("a session variable that is not replayed")
        );
    }

    #[test]
    fn ordinary_statements_and_replayed_settings_keep_a_session_movable() {
        let s = |t: &str| scan(t.as_bytes());
        assert_eq!(
            s("INSERT INTO users VALUES ('a@example.com', \"b@c\")"),
            None,
            "@ inside strings"
        );
        assert_eq!(s("SELECT @@session.autocommit, @@version"), None);
        assert_eq!(s("-- @x\nSELECT 1"), None, "comments");
        assert_eq!(s("SELECT 'create temporary'"), None);
        assert_eq!(s("SET NAMES utf8mb4"), None);
        assert_eq!(s("SET autocommit=0"), None);
        assert_eq!(s("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"), None);
        assert_eq!(
            s("SET sql_mode='STRICT_TRANS_TABLES,NO_ZERO_DATE', time_zone = '+00:00'"),
            None
        );
        assert_eq!(s("SET @@session.foreign_key_checks = 0"), None);
        assert_eq!(s("SET GLOBAL max_connections = 10"), None);
        assert_eq!(s("UPDATE t SET a = 1"), None, "SET not first");
        assert_eq!(s("SELECT * FROM t FOR UPDATE"), None);
    }

    #[test]
    fn captured_state_is_set_again_in_each_dialect() {
        assert!(capture_sql(true).starts_with("SELECT DATABASE(), @@session.autocommit, @@session.sql_mode"));
        assert!(capture_sql(true).contains("@@session.tx_isolation"));
        assert!(capture_sql(false).contains("@@session.transaction_isolation"));
        let mut values = vec![
            Some("app".to_string()),
            Some("0".into()),
            Some("STRICT_TRANS_TABLES".into()),
        ];
        values.extend(std::iter::repeat_n(Some("x'y".to_string()), REPLAYED.len() - 2));
        values[6] = None; // character_set_results = NULL
        let (sql, db) = replay_sql(true, &values);
        assert_eq!(db.as_deref(), Some("app"));
        assert!(
            sql.starts_with("SET @@session.autocommit = 0, @@session.sql_mode = 'STRICT_TRANS_TABLES', @@session.time_zone = 'x''y'"),
            "{sql}"
        );
        assert!(
            sql.contains("@@session.character_set_connection = 'x''y', @@session.character_set_results = NULL"),
            "{sql}"
        );
    }
}

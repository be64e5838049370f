//! Fresh reads on MySQL / MariaDB clusters: a read on the ro endpoint sees the writes
//! it must see (the user's own, with `read_your_writes = "user"`; a causal token's).
//!
//! - **Where a write's position comes from.** A rw server connection asks the server
//!   to report each commit's GTID in its OK packet (session tracking: MariaDB's
//!   `last_gtid` variable, MySQL's `session_track_gtids = OWN_GTID`) when the client
//!   speaks `CLIENT_SESSION_TRACK`; the relay reads it as the OK passes
//!   (`Answers::gtid`), with no round trip of its own. A client without session
//!   tracking leaves writes of unknown position: its token is learned by asking the
//!   primary (`@@gtid_binlog_pos` / `@@gtid_executed`), and reads that must see such a
//!   write go to the primary.
//! - **Where a read goes.** A ro session is bound to one server connection (session
//!   pooling). Before a command at rest, if the session's floor rose since its node was
//!   last found fresh enough, the node is checked: known applied (its last health
//!   check, or an earlier wait), else `MASTER_GTID_WAIT` / `WAIT_FOR_EXECUTED_GTID_SET`
//!   on the session's own connection, bounded by `causal_wait_ms` (0: a check that does
//!   not wait). The server itself wakes the wait when it applies the position, so no
//!   probe polls. A node that is not there in time: the session moves to the primary
//!   (settings carried over, as a switchover moves rw sessions) and stays there.
//! - **Tokens across connections.** `SELECT @switchyard_causal_token` and
//!   `SET @switchyard_causal_token = '…'` are answered here, never sent to a server; the
//!   connection attribute `switchyard.causal_token` applies one at login. Tokens name
//!   their cluster (`gtid::Token`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mysql_common::constants::{CapabilityFlags, ColumnType};
use mysql_common::packets::Column;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::gtid::{self, Position, Token};
use super::moving::MoveTo;
use super::protocol;
use super::relay::Relay;
use super::server::ServerConn;
use super::session::End;
use super::ClusterInfo;
use crate::cluster::routing::Endpoint;
use crate::cluster::topology::{ClusterSnapshot, Role};
use crate::config::{ClusterConfig, ReadYourWrites};
use crate::error::Error;
use crate::obs::metrics::ClusterLabels;
use crate::proxy::stream::{write_flush, ClientStream};

use super::answers::{SERVER_MORE_RESULTS_EXISTS, SERVER_SESSION_STATE_CHANGED};

/// The token's name as clients write it.
pub const TOKEN_VARIABLE: &str = "@switchyard_causal_token";
/// The connection attribute that applies a token at login.
pub const TOKEN_ATTRIBUTE: &str = "switchyard.causal_token";

/// What a client's writes require of its later reads: the GTIDs its commits got, and a
/// count of writes whose GTID it did not learn. One per session, or one per user shared
/// by all of its sessions (`read_your_writes = "user"`).
#[derive(Default)]
pub struct Writes {
    inner: Mutex<WritesState>,
    /// Bumped by every write: a ro session checks its node again when it changed.
    generation: AtomicU64,
}

#[derive(Default)]
struct WritesState {
    position: Option<Position>,
    /// Writes of unknown position so far, and how many of them `position` covers.
    unknown: u64,
    covered: u64,
    /// When the last write of unknown position was known to be committed: a primary
    /// position read after that covers it.
    last_unknown: Option<Instant>,
}

impl Writes {
    /// A write committed: at `gtid`, or at a position not reported.
    pub fn wrote(&self, gtid: Option<Position>) {
        let mut s = self.inner.lock().unwrap();
        match gtid {
            Some(g) => s.position = Position::join(s.position.take(), Some(&g)),
            None => {
                s.unknown += 1;
                s.last_unknown = Some(Instant::now());
            }
        }
        drop(s);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The position learned so far, and the count of unknown writes a position asked
    /// of the primary now must cover, if some are not covered yet.
    pub fn pending(&self) -> (Option<Position>, Option<u64>) {
        let s = self.inner.lock().unwrap();
        (s.position.clone(), (s.unknown > s.covered).then_some(s.unknown))
    }

    /// A write of unknown position counted earlier (when it was sent) has now
    /// certainly committed: only a primary position read from now on covers it.
    pub fn committed(&self) {
        self.inner.lock().unwrap().last_unknown = Some(Instant::now());
    }

    /// A primary position read by a query started at `taken` covers every write of
    /// unknown position committed before then.
    pub fn cover(&self, position: &Position, taken: Instant) {
        let mut s = self.inner.lock().unwrap();
        if s.unknown > s.covered && s.last_unknown.is_some_and(|t| t < taken) {
            s.position = Position::join(s.position.take(), Some(position));
            s.covered = s.unknown;
        }
    }

    /// `position` was read from the primary after the first `covers` unknown writes.
    pub fn learned(&self, position: Position, covers: u64) {
        let mut s = self.inner.lock().unwrap();
        s.position = Position::join(s.position.take(), Some(&position));
        s.covered = s.covered.max(covers);
    }
}

/// One session's side of fresh reads.
pub(super) struct Fresh {
    pub(super) writes: Arc<Writes>,
    /// ro: reads must see `writes` (read_your_writes is not `off`).
    pub(super) follow_writes: bool,
    /// A token the client gave (SET, connection attribute).
    pub(super) token: Option<Position>,
    /// ro: the writes generation, and whether the token, were found applied on the
    /// session's node.
    confirmed_generation: u64,
    token_confirmed: bool,
    pub(super) wait: Duration,
    /// The cluster's servers are MariaDB (else MySQL).
    pub(super) maria: bool,
    pub(super) cluster_id: u64,
}

impl Fresh {
    pub(super) fn new(cc: &ClusterConfig, writes: Arc<Writes>, maria: bool, cluster: &str) -> Fresh {
        Fresh {
            writes,
            follow_writes: cc.read_your_writes != ReadYourWrites::Off,
            token: None,
            confirmed_generation: 0,
            token_confirmed: true,
            wait: Duration::from_millis(cc.causal_wait_ms),
            maria,
            cluster_id: gtid::cluster_id(cluster),
        }
    }

    /// ro: must the session's node be checked before its next command? (An atomic
    /// load per command: the common case of a session whose floor did not move.)
    pub(super) fn needs_check(&self) -> bool {
        !self.token_confirmed || (self.follow_writes && self.writes.generation() != self.confirmed_generation)
    }

    /// The node is fresh enough for everything up to `generation` and the token.
    pub(super) fn confirm(&mut self, generation: u64) {
        self.confirmed_generation = generation;
        self.token_confirmed = true;
    }

    /// What the next read must see: (generation it covers, the position, whether some
    /// writes' positions are unknown, so only the primary is sure to have them).
    pub(super) fn floor(&self, info: &ClusterInfo) -> (u64, Option<Position>, bool) {
        if let Some((position, taken)) = info.primary_position() {
            // Writes of unknown position are covered by the primary's position as its
            // health check read it after they committed.
            self.writes.cover(&position, taken);
        }
        let generation = self.writes.generation();
        let (own, unknown) = if self.follow_writes {
            self.writes.pending()
        } else {
            (None, None)
        };
        (generation, Position::join(own, self.token.as_ref()), unknown.is_some())
    }

    /// Parse a token the client gave (empty: none) and take it.
    pub(super) fn set_token(&mut self, text: &str) -> Result<(), Error> {
        if text.trim().is_empty() {
            self.token = None;
            return Ok(());
        }
        let token = Token::parse(text).map_err(|e| Error::invalid_parameter(e.to_string()))?;
        let position = token
            .check(self.cluster_id, Some(self.maria))
            .map_err(|e| Error::invalid_parameter(e.to_string()))?
            .clone();
        self.token = Some(position);
        self.token_confirmed = false;
        Ok(())
    }

    /// The token text for everything this session wrote (or its user, in user mode)
    /// and was given; `own` is the writes' position as resolved by the caller.
    pub(super) fn token_text(&self, own: Option<Position>) -> String {
        Position::join(own, self.token.as_ref())
            .map(|position| {
                Token {
                    cluster: self.cluster_id,
                    position,
                }
                .encode()
            })
            .unwrap_or_default()
    }

    /// The statement that makes the server report each commit's GTID in its OK.
    pub(super) fn tracking_sql(maria: bool) -> &'static str {
        if maria {
            "SET SESSION session_track_system_variables = \
             CONCAT_WS(',', NULLIF(@@session.session_track_system_variables, ''), 'last_gtid')"
        } else {
            "SET SESSION session_track_gtids = OWN_GTID"
        }
    }

    /// The primary's position now: at or after every commit it acknowledged.
    pub(super) fn primary_position_sql(maria: bool) -> &'static str {
        if maria {
            "SELECT @@global.gtid_binlog_pos"
        } else {
            "SELECT @@global.gtid_executed"
        }
    }

    /// The statement that waits (up to `within`) on a replica until it applied `need`,
    /// and the answer that means it did.
    pub(super) fn wait_sql(maria: bool, need: &Position, within: Duration) -> (String, &'static str) {
        let secs = format!("{:.3}", within.as_secs_f64());
        let text = need.to_server_text();
        if maria {
            (format!("SELECT MASTER_GTID_WAIT('{text}', {secs})"), "0")
        } else {
            (format!("SELECT WAIT_FOR_EXECUTED_GTID_SET('{text}', {secs})"), "0")
        }
    }
}

/// A token statement the proxy answers.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum TokenStatement {
    /// `SELECT @switchyard_causal_token`
    Show,
    /// `SET @switchyard_causal_token = '…'` (empty, `''` or `NULL`: none).
    Set(String),
}

/// Does a query start like a token statement? (`text`: its first bytes.) Such a query
/// is taken whole and answered by the proxy (`token_statement`), or refused.
pub(super) fn mentions_token(text: &[u8]) -> bool {
    let t = text.trim_ascii_start();
    let rest = if t.len() > 6 && t[..6].eq_ignore_ascii_case(b"select") && t[6].is_ascii_whitespace() {
        &t[6..]
    } else if t.len() > 3 && t[..3].eq_ignore_ascii_case(b"set") && t[3].is_ascii_whitespace() {
        &t[3..]
    } else {
        return false;
    };
    let rest = rest.trim_ascii_start();
    let name = TOKEN_VARIABLE.as_bytes();
    rest.len() >= name.len() && rest[..name.len()].eq_ignore_ascii_case(name)
}

/// The token statement `sql` is, if it is exactly one (a trailing `;` allowed).
///
/// Matched by hand rather than by a SQL parser: the two accepted forms are fixed, and
/// anything else that names the variable is refused, so nothing depends on a
/// parser's view of MySQL's dialect.
pub(super) fn token_statement(sql: &[u8]) -> Option<TokenStatement> {
    let text = std::str::from_utf8(sql).ok()?.trim();
    let text = text.strip_suffix(';').unwrap_or(text).trim_end();
    let (verb, rest) = text.split_once(|c: char| c.is_ascii_whitespace())?;
    let rest = rest.trim_start();
    let name_end = TOKEN_VARIABLE.len();
    if rest.len() < name_end || !rest[..name_end].eq_ignore_ascii_case(TOKEN_VARIABLE) {
        return None;
    }
    let after = rest[name_end..].trim_start();
    if verb.eq_ignore_ascii_case("select") {
        return after.is_empty().then_some(TokenStatement::Show);
    }
    if !verb.eq_ignore_ascii_case("set") {
        return None;
    }
    let value = after.strip_prefix(":=").or_else(|| after.strip_prefix('='))?.trim();
    if value.eq_ignore_ascii_case("null") {
        return Some(TokenStatement::Set(String::new()));
    }
    let quote = value.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let inner = value.strip_prefix(quote)?.strip_suffix(quote)?;
    // Tokens need no escapes: a quote or backslash inside is no token.
    if inner.contains([quote, '\\']) {
        return None;
    }
    Some(TokenStatement::Set(inner.to_string()))
}

/// A one-column, one-row text result (`value` None: NULL), from sequence id 1, ended as
/// the client's capabilities want; `status`: the session's status flags.
pub(super) fn one_value_result(name: &str, value: Option<&str>, status: u16, caps: CapabilityFlags) -> Vec<u8> {
    let deprecate_eof = caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF);
    let mut out = Vec::with_capacity(128);
    let mut seq = protocol::frame(&mut out, 1, &[1]);
    let column = Column::new(ColumnType::MYSQL_TYPE_VAR_STRING)
        .with_name(name.as_bytes())
        .with_character_set(45) // utf8mb4_general_ci
        .with_column_length(1024);
    seq = protocol::frame(&mut out, seq, &protocol::to_vec(&column));
    let eof = |status: u16| {
        let mut p = vec![0xFE, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p
    };
    if !deprecate_eof {
        seq = protocol::frame(&mut out, seq, &eof(status));
    }
    let mut row = Vec::with_capacity(16);
    match value {
        None => row.push(0xFB),
        Some(v) => {
            protocol::put_lenenc_int(&mut row, v.len() as u64);
            row.extend_from_slice(v.as_bytes());
        }
    }
    seq = protocol::frame(&mut out, seq, &row);
    if deprecate_eof {
        // An OK with header 0xFE: affected rows, insert id, status, warnings.
        let mut ok = vec![0xFE, 0, 0];
        ok.extend_from_slice(&status.to_le_bytes());
        ok.extend_from_slice(&[0, 0]);
        protocol::frame(&mut out, seq, &ok);
    } else {
        protocol::frame(&mut out, seq, &eof(status));
    }
    out
}

/// An OK packet's payload with the session's status flags.
pub(super) fn ok_with_status(status: u16) -> Vec<u8> {
    let mut v = vec![0x00, 0, 0];
    v.extend_from_slice(&status.to_le_bytes());
    v.extend_from_slice(&[0, 0]);
    v
}

/// How much longer than its own bound a wait statement may take to answer before the
/// session's connection is given up (the server answers a finished wait at once).
const WAIT_SLACK: Duration = Duration::from_secs(5);

impl Relay<'_> {
    /// ro, before a command at rest whose floor moved: make sure the session's node has
    /// applied what the command must see. Known applied, or the node's own wait
    /// returned in time: the command goes on here (None). Else the session moves to the
    /// primary (the new connection), or ends if it cannot move.
    pub(super) async fn make_fresh(
        &mut self,
        server: &mut ServerConn,
        topology: &mut tokio::sync::watch::Receiver<Arc<ClusterSnapshot>>,
        caps: CapabilityFlags,
    ) -> Result<Option<ServerConn>, End> {
        let (generation, need, unknown) = self.fresh.floor(ClusterInfo::of(self.cluster));
        let snap = self.cluster.state.snapshot();
        let on_primary = snap
            .index(&self.node.name)
            .is_some_and(|i| snap.nodes[i].role == Role::Primary);
        let labels = ClusterLabels {
            cluster: self.cluster.name.to_string(),
        };
        let metrics = &self.shared.metrics;
        let Some(need) = need.filter(|_| !on_primary && !unknown) else {
            // On the primary everything is there; no floor, nothing to see; a write of
            // unknown position: only the primary is sure to have it.
            if !on_primary && unknown {
                return self.fresh_on_primary(server, topology, caps, generation).await;
            }
            self.fresh.confirm(generation);
            return Ok(None);
        };
        let info = ClusterInfo::of(self.cluster);
        if info.has_applied(&self.node.name, &need) {
            self.fresh.confirm(generation);
            metrics.reads_to_standby.get_or_create(&labels).inc();
            return Ok(None);
        }
        let (sql, done) = Fresh::wait_sql(self.fresh.maria, &need, self.fresh.wait);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.fresh.wait + WAIT_SLACK,
            protocol::first_value(&mut server.stream, caps, &sql),
        )
        .await;
        metrics
            .causal_wait_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(Some(v))) if v == done => {
                info.note_applied(&self.node.name, &need);
                self.fresh.confirm(generation);
                metrics.reads_to_standby.get_or_create(&labels).inc();
                return Ok(None);
            }
            Ok(Ok(_)) => {
                debug!(cluster = %self.cluster.name, node = %self.node.name, need = %need.to_server_text(), "replica not there in time");
            }
            Ok(Err(e)) => {
                warn!(cluster = %self.cluster.name, node = %self.node.name, error = %e, "fresh-read wait failed");
            }
            Err(_) => {
                // The wait is still running on the server: the connection cannot be
                // used for the client's command.
                return Err(End::Failed(Error::server_lost(
                    &self.cluster.name,
                    &self.node.name,
                    format!(
                        "the server did not answer a wait of {} ms within {} s more",
                        self.fresh.wait.as_millis(),
                        WAIT_SLACK.as_secs()
                    ),
                )));
            }
        }
        self.fresh_on_primary(server, topology, caps, generation).await
    }

    /// Move the session to the primary for a read that no replica can serve fresh.
    async fn fresh_on_primary(
        &mut self,
        server: &mut ServerConn,
        topology: &mut tokio::sync::watch::Receiver<Arc<ClusterSnapshot>>,
        caps: CapabilityFlags,
        generation: u64,
    ) -> Result<Option<ServerConn>, End> {
        let waited = self.fresh.wait;
        let conn = self
            .move_session(server, topology, caps, MoveTo::PrimaryForFreshness { waited })
            .await?;
        self.shared
            .metrics
            .reads_to_primary_for_freshness
            .get_or_create(&ClusterLabels {
                cluster: self.cluster.name.to_string(),
            })
            .inc();
        self.fresh.confirm(generation);
        Ok(Some(conn))
    }

    /// `SELECT` / `SET @switchyard_causal_token` (None: a statement naming the token
    /// in another form), answered after any answer still owed has reached the client.
    pub(super) async fn answer_token(
        &mut self,
        stmt: Option<TokenStatement>,
        client: &mut ClientStream,
        server: &mut ServerConn,
        caps: CapabilityFlags,
    ) -> Result<(), End> {
        self.finish_answers(client, server).await?;
        let client_caps = self.client.capabilities & server.greeting.capabilities;
        // The proxy's packets carry no session state.
        let status =
            self.tracked.lock().unwrap().answers.status & !(SERVER_MORE_RESULTS_EXISTS | SERVER_SESSION_STATE_CHANGED);
        let reply = match stmt {
            None => Err(Error::syntax(format!(
                "Switchyard answers {TOKEN_VARIABLE} only as `SELECT {TOKEN_VARIABLE}` or `SET {TOKEN_VARIABLE} = '<token>'`, each sent alone"
            ))),
            Some(TokenStatement::Show) => self
                .own_writes(server, caps)
                .await
                .map(|own| one_value_result(TOKEN_VARIABLE, Some(&self.fresh.token_text(own)), status, client_caps)),
            Some(TokenStatement::Set(text)) => self.fresh.set_token(&text).map(|()| {
                let mut out = Vec::new();
                protocol::frame(&mut out, 1, &ok_with_status(status));
                out
            }),
        };
        let bytes = match reply {
            Ok(bytes) => bytes,
            Err(e) => {
                self.shared.metrics.error(e.code().as_str());
                let mut out = Vec::new();
                protocol::frame(&mut out, 1, &protocol::err_payload(&e));
                out
            }
        };
        write_flush(client, &bytes).await.map_err(End::Io)
    }

    /// The position of the writes this session's token covers: on rw, writes of
    /// unknown position are resolved by asking the primary (this connection's server)
    /// where it is now; on ro, the user's writes as known (with read-your-writes on).
    async fn own_writes(&mut self, server: &mut ServerConn, caps: CapabilityFlags) -> Result<Option<Position>, Error> {
        if self.endpoint == Endpoint::ReadOnly && !self.fresh.follow_writes {
            return Ok(None);
        }
        let (known, unknown) = self.fresh.writes.pending();
        let Some(covers) = unknown.filter(|_| self.endpoint == Endpoint::ReadWrite) else {
            return Ok(known);
        };
        let maria = self.fresh.maria;
        let text = protocol::first_value(&mut server.stream, caps, Fresh::primary_position_sql(maria)).await?;
        match text.as_deref().and_then(|t| Position::parse(maria, t)) {
            Some(p) => {
                self.fresh.writes.learned(p.clone(), covers);
                Ok(Position::join(known, Some(&p)))
            }
            None => Ok(known),
        }
    }

    /// Relay the rest of the answers the client is owed (a command of the proxy's own
    /// came in while an earlier command's answer was still coming).
    pub(super) async fn finish_answers(
        &mut self,
        client: &mut ClientStream,
        server: &mut ServerConn,
    ) -> Result<(), End> {
        let record = self.endpoint == Endpoint::ReadWrite;
        while !self.tracked.lock().unwrap().answers.idle() {
            self.sbuf.clear();
            match server.stream.read_some(&mut self.sbuf).await {
                Ok(0) => return Err(End::ServerClosed),
                Err(e) => return Err(End::Io(e)),
                Ok(_) => {}
            }
            {
                let mut t = self.tracked.lock().unwrap();
                t.answers.feed(&self.sbuf);
                t.update();
                if record {
                    super::relay::note_writes(&mut t, &self.fresh.writes, self.fresh.maria, self.tracking);
                }
                if self.multiplex {
                    t.absorb_state();
                }
            }
            write_flush(client, &self.sbuf).await.map_err(End::Io)?;
        }
        self.sbuf.clear();
        Ok(())
    }

    /// COM_CHANGE_USER: in user mode the session now shares the new user's writes.
    pub(super) fn fresh_user_changed(&mut self, user: &str) {
        if self.cluster_config_user_mode() {
            self.fresh.writes = ClusterInfo::of(self.cluster).user_writes(user);
        }
    }

    fn cluster_config_user_mode(&self) -> bool {
        self.shared
            .config()
            .clusters
            .get(&*self.cluster.name)
            .is_some_and(|c| c.read_your_writes == ReadYourWrites::User)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_statements_are_recognised_exactly() {
        assert!(mentions_token(b"  select   @SWITCHYARD_causal_token"));
        assert!(mentions_token(b"SET @switchyard_causal_token = 'x'"));
        assert!(!mentions_token(b"SELECT @switchyard_other"));
        assert!(!mentions_token(b"SETTINGS @switchyard_causal_token"));
        assert_eq!(
            token_statement(b"SELECT @switchyard_causal_token ;"),
            Some(TokenStatement::Show)
        );
        assert_eq!(token_statement(b"SELECT @switchyard_causal_token, 1"), None);
        assert_eq!(
            token_statement(b"set @switchyard_causal_token := 'sy1.m1.0-1-5'"),
            Some(TokenStatement::Set("sy1.m1.0-1-5".into()))
        );
        assert_eq!(
            token_statement(b"SET @switchyard_causal_token=\"sy1.m1.0-1-5\";"),
            Some(TokenStatement::Set("sy1.m1.0-1-5".into()))
        );
        assert_eq!(
            token_statement(b"SET @switchyard_causal_token = NULL"),
            Some(TokenStatement::Set(String::new()))
        );
        assert_eq!(
            token_statement(b"SET @switchyard_causal_token = ''"),
            Some(TokenStatement::Set(String::new()))
        );
        assert_eq!(token_statement(b"SET @switchyard_causal_token = 'a', @b = 1"), None);
        assert_eq!(token_statement(b"SET @switchyard_causal_token = 'a''b'"), None);
        assert_eq!(token_statement(b"SET @switchyard_causal_token = concat('a')"), None);
    }

    #[test]
    fn a_session_checks_its_node_again_only_when_its_floor_moved() {
        let cc: ClusterConfig = toml::from_str("engine = \"mysql\"\nread_your_writes = \"user\"\n").unwrap();
        let writes = Arc::new(Writes::default());
        let info = ClusterInfo::default();
        let mut f = Fresh::new(&cc, writes.clone(), true, "main");
        assert!(!f.needs_check());
        writes.wrote(Position::parse(true, "0-1-5"));
        assert!(f.needs_check());
        let (generation, floor, unknown) = f.floor(&info);
        assert_eq!(floor, Position::parse(true, "0-1-5"));
        assert!(!unknown);
        f.confirm(generation);
        assert!(!f.needs_check());
        writes.wrote(None);
        let (_, _, unknown) = f.floor(&info);
        assert!(unknown, "a write of unknown position: only the primary is sure");
        // A primary position read before the write committed does not cover it; one
        // read after does.
        info.note_primary_position(
            Position::parse(true, "0-1-8").unwrap(),
            Instant::now() - Duration::from_secs(1),
        );
        assert!(f.floor(&info).2);
        info.note_primary_position(Position::parse(true, "0-1-9").unwrap(), Instant::now());
        let (generation, floor, unknown) = f.floor(&info);
        assert_eq!((floor, unknown), (Position::parse(true, "0-1-9"), false));
        f.confirm(generation);
        // A token from this cluster makes it check; another cluster's is refused.
        let token = Token {
            cluster: gtid::cluster_id("main"),
            position: Position::parse(true, "0-1-12").unwrap(),
        }
        .encode();
        f.set_token(&token).unwrap();
        assert!(f.needs_check());
        assert_eq!(f.token_text(None), token);
        let other = Token {
            cluster: gtid::cluster_id("other"),
            position: Position::parse(true, "0-1-12").unwrap(),
        }
        .encode();
        let e = f.set_token(&other).unwrap_err();
        assert!(e.message().contains("another cluster"), "{}", e.message());
        f.set_token("").unwrap();
        assert_eq!(f.token, None);
        // With read_your_writes = "off", writes do not hold reads back; tokens still do.
        let off: ClusterConfig = toml::from_str("engine = \"mysql\"\nread_your_writes = \"off\"\n").unwrap();
        let f = Fresh::new(&off, writes.clone(), true, "main");
        writes.wrote(Position::parse(true, "0-1-20"));
        assert!(!f.needs_check());
    }
}

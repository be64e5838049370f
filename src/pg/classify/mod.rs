//! What a statement does, for routing and transaction pooling, decided with the real
//! PostgreSQL grammar (`pg_query`, libpg_query: PostgreSQL's own parser). Results are
//! cached by statement shape, per thread, so a repeated query costs one hash lookup.
//!
//! A statement is a *read* only if it provably cannot write: a SELECT / VALUES / SHOW /
//! EXPLAIN of such, with no locking clause, no SELECT INTO, no data-modifying CTE, and
//! only functions from the read-only list. Anything else, including what does not parse,
//! is a write: the safe answer.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use pg_query::protobuf::{a_const, ObjectType, TransactionStmtKind, VariableSetKind};
use pg_query::{NodeEnum, NodeRef};

mod literals;
pub(crate) use literals::block_comment_end;
pub use literals::{blank_literals, without_comments};

use crate::obs::digest::Digest;

/// The setting through which clients carry read-your-writes between connections.
pub const CAUSAL_TOKEN: &str = "switchyard.causal_token";

/// `SHOW` / `SET` / `RESET switchyard.causal_token`, sent alone in a simple query: the
/// proxy answers it (the setting is the proxy's, not the server's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CausalStatement {
    Show,
    /// The value; empty clears the token.
    Set(String),
    Reset,
}

/// Recognise a causal-token statement. Cheap for everything else: a byte search for the
/// setting's name comes before any parsing.
pub fn causal_statement(sql: &[u8]) -> Option<CausalStatement> {
    const NAME: &[u8] = b"causal_token";
    // Every query passes here: only SHOW, SET and RESET (or text behind a comment) are
    // looked into, and then only around underscores (`causal` + `_` + `token`).
    let text = sql.trim_ascii_start();
    // Looked at by the first bytes alone: five keyword comparisons cost every SELECT
    // more than the rest of this check (`bench/instructions`).
    let lower = |i: usize| text.get(i).map(u8::to_ascii_lowercase);
    let worth_a_look = match (lower(0), lower(1), lower(2)) {
        (Some(b's'), Some(b'h'), _) => text.get(..4).is_some_and(|w| w.eq_ignore_ascii_case(b"show")),
        (Some(b's'), Some(b'e'), Some(b't')) => true, // SET, not SELECT
        (Some(b'r'), Some(b'e'), _) => text.get(..5).is_some_and(|w| w.eq_ignore_ascii_case(b"reset")),
        (Some(b'/'), Some(b'*'), _) | (Some(b'-'), Some(b'-'), _) => true,
        _ => false,
    };
    if !worth_a_look {
        return None;
    }
    let named = sql
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'_' && i >= 6 && sql.get(i - 6..i + 6).is_some_and(|w| w.eq_ignore_ascii_case(NAME)));
    if !named {
        return None;
    }
    let parsed = pg_query::parse(std::str::from_utf8(sql).ok()?, 0).ok()?;
    let [raw] = parsed.protobuf.stmts.as_slice() else {
        return None;
    };
    match raw.stmt.as_ref()?.node.as_ref()? {
        NodeEnum::VariableShowStmt(v) if v.name.eq_ignore_ascii_case(CAUSAL_TOKEN) => Some(CausalStatement::Show),
        NodeEnum::VariableSetStmt(v) if v.name.eq_ignore_ascii_case(CAUSAL_TOKEN) => {
            match VariableSetKind::try_from(v.kind).ok()? {
                VariableSetKind::VarReset | VariableSetKind::VarSetDefault => Some(CausalStatement::Reset),
                VariableSetKind::VarSetValue => match v.args.as_slice() {
                    [arg] => match arg.node.as_ref()? {
                        NodeEnum::AConst(k) => match k.val.as_ref()? {
                            a_const::Val::Sval(s) => Some(CausalStatement::Set(s.sval.clone())),
                            _ => None,
                        },
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    }
}

/// Session state a statement changes; replayed on every server connection the client
/// gets in transaction mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetAction {
    /// `SET name ...` (not LOCAL): keep the statement text to replay it.
    Set {
        name: String,
        statement: String,
    },
    Reset {
        name: String,
    },
    ResetAll,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// Safe to run on a standby.
    pub read_only: bool,
    /// Starts a transaction block; `Some(true)` for `BEGIN READ ONLY`.
    pub begins: Option<bool>,
    /// Session state the server connection must keep: the client is pinned to it.
    pub pins: Option<&'static str>,
    pub sets: Vec<SetAction>,
    /// A `/* switchyard:primary */` (or `-- switchyard:primary`) hint.
    pub hint_primary: bool,
    /// The grammar accepts it (a server may still reject it, e.g. an unknown table).
    pub parses: bool,
    /// `DEALLOCATE name` (Some(name)) or `DEALLOCATE ALL` (Some("")), as the only statement.
    pub deallocate: Option<String>,
    /// What it does depends on a literal (which setting `current_setting` reads): cached
    /// by exact text, not by shape.
    pub literal_sensitive: bool,
    /// A database the statement needs free of other sessions: the template of `CREATE
    /// DATABASE`, the target of `DROP DATABASE` / `ALTER DATABASE ... RENAME` / `SET
    /// TABLESPACE`. Idle pooled connections to it are closed before it is forwarded.
    pub frees_database: Option<String>,
    /// Changes only the session's settings (`SET`, `RESET`, `DISCARD`, `SHOW`, `SELECT
    /// set_config(<constants>)`): writes no data, so it does not raise the client's
    /// read-your-writes floor (Django sets the time zone on every new connection).
    pub settings_only: bool,
    /// Ends a transaction with a commit (`COMMIT`, `END`, `COMMIT PREPARED`): if the
    /// server is lost before it answers, whether it committed is unknown (08007).
    pub commits: bool,
    /// The proxy may not queue a question of its own right behind it (read-your-writes
    /// sends the write-floor question in the same write as a commit: `pg::txn` machine):
    /// it may leave a transaction block open, where the question would run inside the
    /// client's transaction (`BEGIN`, `START TRANSACTION`, `COMMIT` or `ROLLBACK AND
    /// CHAIN`); the server reads COPY data after it, not statements (`COPY ... FROM`); or
    /// the grammar does not accept it.
    pub no_question_after: bool,
    /// The statement's shape for the query digests (`obs::digest`): libpg_query's
    /// fingerprint and normalized text.
    pub digest: Arc<Digest>,
    /// May release what a pin can be left for (`pg_advisory_unlock`, `…_shared`,
    /// `…_all`; `CLOSE`; `DROP`; `DISCARD`): a client pinned only by such things may be
    /// free again (`pg::txn` asks the server).
    pub may_unpin: bool,
    /// SQL `PREPARE`s, in order: the name (as the server knows it, folded) and the
    /// statement's text, to prepare it again on another connection.
    pub prepares: Vec<(String, String)>,
    /// Names SQL `EXECUTE`s run (also inside `EXPLAIN` or `CREATE TABLE AS`).
    pub executes: Vec<String>,
    /// `DISCARD ALL`: the session's prepared statements are all gone.
    pub discards_all: bool,
    /// Every statement is a LISTEN or an UNLISTEN: what they ask, in order (empty
    /// otherwise). Transaction pooling answers them itself between transactions
    /// (`pg::notify`).
    pub listens: Vec<ListenOp>,
    /// Its UNLISTEN statements, wherever they are (for a client's LISTENs that the proxy
    /// carries out, when the statement goes to the server: in a transaction block, or
    /// among other statements).
    pub unlistens: Vec<ListenOp>,
    /// Notifications it sends whose channel and payload are constants (`NOTIFY ch,
    /// 'p'`, `pg_notify('ch', 'p')`): a listening client's own come back with its pid.
    pub notifies: Vec<(String, String)>,
}

/// What a LISTEN / UNLISTEN statement asks (carried out by `pg::notify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenOp {
    Listen(String),
    Unlisten(String),
    UnlistenAll,
}

impl ListenOp {
    /// The CommandComplete tag the client gets for it.
    pub fn tag(&self) -> &'static str {
        match self {
            ListenOp::Listen(_) => "LISTEN",
            _ => "UNLISTEN",
        }
    }
}

/// Pin reasons a client can leave again, once its server session holds none of them (a
/// question the transaction machine asks after a statement that `may_unpin`); the
/// others (LISTEN, SQL PREPARE) last until the client leaves.
pub const ADVISORY_LOCK: &str = "a session advisory lock";
pub const HOLD_CURSOR: &str = "a WITH HOLD cursor";
pub const TEMPORARY_TABLE: &str = "a temporary table";

/// Whether a pin for `why` can be left again (see `ADVISORY_LOCK`).
pub fn releasable(why: &str) -> bool {
    [ADVISORY_LOCK, HOLD_CURSOR, TEMPORARY_TABLE].contains(&why)
}

impl Classification {
    /// What is not known to be a read: goes to the primary, changes nothing tracked.
    fn write(hint_primary: bool, digest: Arc<Digest>) -> Classification {
        Classification {
            digest,
            read_only: false,
            begins: None,
            pins: None,
            sets: Vec::new(),
            hint_primary,
            parses: false,
            deallocate: None,
            frees_database: None,
            literal_sensitive: false,
            settings_only: false,
            commits: false,
            no_question_after: true,
            may_unpin: false,
            prepares: Vec::new(),
            executes: Vec::new(),
            discards_all: false,
            listens: Vec::new(),
            unlistens: Vec::new(),
            notifies: Vec::new(),
        }
    }
}

/// `SELECT set_config('name', 'value', is_local)` with constant arguments, nothing else.
fn is_set_config(s: &pg_query::protobuf::SelectStmt) -> bool {
    if !s.from_clause.is_empty() || s.where_clause.is_some() || s.with_clause.is_some() || s.target_list.len() != 1 {
        return false;
    }
    let Some(NodeEnum::ResTarget(t)) = s.target_list[0].node.as_ref() else {
        return false;
    };
    let Some(NodeEnum::FuncCall(f)) = t.val.as_deref().and_then(|v| v.node.as_ref()) else {
        return false;
    };
    let named = matches!(f.funcname.last().and_then(|n| n.node.as_ref()),
        Some(NodeEnum::String(n)) if n.sval.eq_ignore_ascii_case("set_config"));
    named && f.args.iter().all(|a| matches!(a.node, Some(NodeEnum::AConst(_))))
}

/// Functions known not to write: a read calling anything else goes to the primary.
pub const DEFAULT_READ_ONLY_FUNCTIONS: &[&str] = &[
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "bool_and",
    "bool_or",
    "every",
    "array_agg",
    "string_agg",
    "json_agg",
    "jsonb_agg",
    "json_object_agg",
    "jsonb_object_agg",
    "stddev",
    "variance",
    "now",
    "statement_timestamp",
    "clock_timestamp",
    "transaction_timestamp",
    "timeofday",
    "date_trunc",
    "date_part",
    "extract",
    "to_char",
    "to_date",
    "to_timestamp",
    "to_number",
    "age",
    "make_date",
    "make_timestamp",
    "make_interval",
    "lower",
    "upper",
    "length",
    "char_length",
    "octet_length",
    "substring",
    "substr",
    "trim",
    "btrim",
    "ltrim",
    "rtrim",
    "replace",
    "concat",
    "concat_ws",
    "format",
    "left",
    "right",
    "lpad",
    "rpad",
    "position",
    "strpos",
    "split_part",
    "md5",
    "abs",
    "ceil",
    "ceiling",
    "floor",
    "round",
    "trunc",
    "mod",
    "power",
    "sqrt",
    "random",
    "greatest",
    "least",
    "coalesce",
    "nullif",
    "generate_series",
    "unnest",
    "array_length",
    "array_position",
    "cardinality",
    "json_build_object",
    "jsonb_build_object",
    "json_build_array",
    "jsonb_build_array",
    "to_json",
    "to_jsonb",
    "jsonb_extract_path",
    "jsonb_extract_path_text",
    "json_extract_path_text",
    "jsonb_typeof",
    "row_number",
    "rank",
    "dense_rank",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "version",
    "current_setting",
    "current_database",
    "current_schema",
    "current_user",
    "session_user",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "inet_server_port",
    "inet_server_addr",
    "pg_backend_pid",
    "pg_postmaster_start_time",
    "txid_current_snapshot",
    "pg_size_pretty",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_database_size",
    "has_table_privilege",
    "pg_get_userbyid",
    "format_type",
    "pg_table_is_visible",
    "pg_get_expr",
    "pg_get_indexdef",
    "pg_get_constraintdef",
    "obj_description",
    "col_description",
    "array_to_string",
    "string_to_array",
    "regexp_replace",
    "regexp_matches",
    "regexp_match",
    "starts_with",
    "pg_sleep",
];

/// Releasing session-level advisory locks.
const SESSION_UNLOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_unlock",
    "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all",
];

/// Session-level advisory locks live on the server connection: pin.
const SESSION_LOCK_FUNCTIONS: &[&str] = &[
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

const CURSOR_OPT_HOLD: i32 = 0x0020;
const CACHE_LIMIT: usize = 10_000;

pub struct Classifier {
    /// Names this classifier's entries in the per-thread caches.
    id: u64,
    read_only_functions: HashSet<String>,
    /// The answer for query text that is not UTF-8 (see `classify_bytes`).
    opaque: Arc<Classification>,
}

static NEXT_CLASSIFIER: AtomicU64 = AtomicU64::new(0);

/// Statement shape (or exact text, for literal-sensitive statements) → classification.
/// Hashed with foldhash, seeded at random per process (as SipHash would be, at a third
/// of its cost per lookup): the keys are client text.
/// Keyed by bytes, so that `classify_parse` can look a text up before checking its UTF-8.
type ShapeCache = HashMap<Box<[u8]>, Arc<Classification>, foldhash::fast::RandomState>;

thread_local! {
    /// Per thread (each worker thread of the data path has its own), so a lookup takes
    /// no lock and touches no cache line another thread writes: classifier id →
    /// statement shape → classification. (A handful of classifiers, one per cluster:
    /// searched in a list.)
    static CACHES: RefCell<Vec<(u64, ShapeCache)>> = const { RefCell::new(Vec::new()) };
    /// The shape of the statement being classified (reused: no allocation per query).
    static KEY: RefCell<String> = const { RefCell::new(String::new()) };
}

impl Classifier {
    pub fn new(extra_read_only_functions: &[String]) -> Classifier {
        let mut read_only_functions: HashSet<String> =
            DEFAULT_READ_ONLY_FUNCTIONS.iter().map(|s| s.to_string()).collect();
        read_only_functions.extend(extra_read_only_functions.iter().map(|s| s.to_ascii_lowercase()));
        Classifier {
            id: NEXT_CLASSIFIER.fetch_add(1, Ordering::Relaxed),
            read_only_functions,
            opaque: Arc::new(Classification::write(
                false,
                Arc::new(Digest::new(0, "(text not in UTF-8)")),
            )),
        }
    }

    /// Classify a query text (one or several statements), from the cache when seen before.
    ///
    /// The cache is keyed by the text with its literals blanked (`WHERE id = 42` and
    /// `WHERE id = 7` share an entry), since clients that inline values (pgbench -M
    /// simple, many ORMs' simple protocol) would otherwise parse every query. Literals
    /// never change what a statement does, except the value a SET records: those results
    /// are cached under the exact text instead.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        KEY.with_borrow_mut(|key| {
            blank_literals(sql, key);
            let found = CACHES.with_borrow(|caches| {
                let (_, cache) = caches.iter().find(|(id, _)| *id == self.id)?;
                cache.get(key.as_bytes()).or_else(|| cache.get(sql.as_bytes())).cloned()
            });
            if let Some(c) = found {
                return c;
            }
            let c = Arc::new(self.classify_uncached(sql));
            let literal_free =
                c.sets.is_empty() && c.deallocate.is_none() && c.frees_database.is_none() && !c.literal_sensitive;
            CACHES.with_borrow_mut(|caches| {
                let at = match caches.iter().position(|(id, _)| *id == self.id) {
                    Some(at) => at,
                    None => {
                        caches.push((self.id, ShapeCache::default()));
                        caches.len() - 1
                    }
                };
                let cache = &mut caches[at].1;
                if cache.len() >= CACHE_LIMIT {
                    // Crude but bounded: with literals blanked, applications have far
                    // fewer distinct statements than this.
                    cache.clear();
                }
                cache.insert(
                    if literal_free { key.as_bytes() } else { sql.as_bytes() }.into(),
                    c.clone(),
                );
            });
            c
        })
    }

    /// Classify the query of a Parse (the extended protocol). Such a text usually carries
    /// its values as parameters (`$1`), so the same text comes again and again: it is
    /// looked up as sent first. A statement without literals that was seen before is then
    /// found without the UTF-8 check and the literal blanking (about 500 instructions
    /// per pgbench -M extended transaction); a miss costs one lookup more. A hit is the
    /// entry stored under these very bytes: the text's own classification or that of a
    /// statement whose shape they are, which `classify` would also return (blanking a
    /// shape gives the shape again).
    pub fn classify_parse(&self, sql: &[u8]) -> Arc<Classification> {
        let found = CACHES.with_borrow(|caches| {
            let (_, cache) = caches.iter().find(|(id, _)| *id == self.id)?;
            cache.get(sql).cloned()
        });
        found.unwrap_or_else(|| self.classify_bytes(sql))
    }

    /// Classify query text as the client sent it: bytes in its `client_encoding`. Text
    /// that is not UTF-8 is not parsed: in SJIS, BIG5 or GBK the second byte of a
    /// character may be a quote or a backslash, so reading those bytes as anything else
    /// could take a write for a read. It is treated like anything that does not parse
    /// (primary, nothing tracked); most such clients still send ASCII SQL with the
    /// non-ASCII bytes in literals, which is UTF-8 as far as this check goes.
    pub fn classify_bytes(&self, sql: &[u8]) -> Arc<Classification> {
        match std::str::from_utf8(sql) {
            Ok(sql) => self.classify(sql),
            Err(_) => self.opaque.clone(),
        }
    }

    fn classify_uncached(&self, sql: &str) -> Classification {
        let write = Classification::write(sql.contains("switchyard:primary"), digest_of(sql));
        let Ok(parsed) = pg_query::parse(sql, 0) else {
            return write;
        };
        let mut c = Classification {
            read_only: true,
            parses: true,
            no_question_after: false,
            ..write
        };
        let stmts = &parsed.protobuf.stmts;
        if stmts.is_empty() {
            return c;
        }
        c.settings_only = stmts.iter().all(|raw| {
            matches!(
                raw.stmt.as_ref().and_then(|s| s.node.as_ref()),
                Some(NodeEnum::VariableSetStmt(_) | NodeEnum::VariableShowStmt(_) | NodeEnum::DiscardStmt(_))
            ) || matches!(raw.stmt.as_ref().and_then(|s| s.node.as_ref()), Some(NodeEnum::SelectStmt(s)) if is_set_config(s))
        });
        c.listens = stmts
            .iter()
            .map(|raw| match raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                Some(NodeEnum::ListenStmt(l)) => Some(ListenOp::Listen(l.conditionname.clone())),
                Some(NodeEnum::UnlistenStmt(u)) if u.conditionname.is_empty() => Some(ListenOp::UnlistenAll),
                Some(NodeEnum::UnlistenStmt(u)) => Some(ListenOp::Unlisten(u.conditionname.clone())),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .unwrap_or_default();
        c.unlistens = stmts
            .iter()
            .filter_map(|raw| match raw.stmt.as_ref().and_then(|s| s.node.as_ref()) {
                Some(NodeEnum::UnlistenStmt(u)) if u.conditionname.is_empty() => Some(ListenOp::UnlistenAll),
                Some(NodeEnum::UnlistenStmt(u)) => Some(ListenOp::Unlisten(u.conditionname.clone())),
                _ => None,
            })
            .collect();
        for raw in stmts {
            let Some(node) = raw.stmt.as_ref().and_then(|s| s.node.as_ref()) else {
                continue;
            };
            let text = statement_text(sql, raw.stmt_location, raw.stmt_len);
            match node {
                NodeEnum::SelectStmt(_) => {}
                NodeEnum::VariableShowStmt(v) => {
                    if is_node_local_setting(&v.name.to_ascii_lowercase()) {
                        c.read_only = false;
                    }
                }
                NodeEnum::ExplainStmt(e) => {
                    // EXPLAIN ANALYZE runs the statement: judge what it explains.
                    let analyze = e
                        .options
                        .iter()
                        .any(|o| matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname == "analyze"));
                    let inner_reads = matches!(
                        e.query.as_deref().and_then(|q| q.node.as_ref()),
                        Some(NodeEnum::SelectStmt(_))
                    );
                    if analyze && !inner_reads {
                        c.read_only = false;
                    }
                }
                NodeEnum::TransactionStmt(t) => match TransactionStmtKind::try_from(t.kind) {
                    Ok(TransactionStmtKind::TransStmtBegin | TransactionStmtKind::TransStmtStart) => {
                        let read_only = t.options.iter().any(|o| match &o.node {
                            Some(NodeEnum::DefElem(d)) if d.defname == "transaction_read_only" => matches!(
                                d.arg.as_deref().and_then(|a| a.node.as_ref()),
                                Some(NodeEnum::AConst(k)) if matches!(k.val, Some(a_const::Val::Ival(ref i)) if i.ival == 1)
                            ),
                            _ => false,
                        });
                        c.begins = Some(read_only);
                        c.no_question_after = true;
                        // A standby refuses SERIALIZABLE ("cannot use serializable mode in
                        // a hot standby"), even for a read-only transaction.
                        c.read_only &= read_only && !t.options.iter().any(is_serializable);
                    }
                    Ok(TransactionStmtKind::TransStmtCommit) => {
                        c.commits = true;
                        c.no_question_after |= t.chain;
                    }
                    Ok(TransactionStmtKind::TransStmtCommitPrepared) => {
                        c.commits = true;
                        c.read_only = false;
                    }
                    // Ending a transaction or a savepoint writes nothing by itself.
                    Ok(TransactionStmtKind::TransStmtRollback) => c.no_question_after |= t.chain,
                    Ok(
                        TransactionStmtKind::TransStmtSavepoint
                        | TransactionStmtKind::TransStmtRelease
                        | TransactionStmtKind::TransStmtRollbackTo,
                    ) => {}
                    _ => c.read_only = false,
                },
                NodeEnum::VariableSetStmt(v) => {
                    c.read_only = false;
                    if !v.is_local {
                        let name = v.name.to_ascii_lowercase();
                        match VariableSetKind::try_from(v.kind) {
                            Ok(VariableSetKind::VarReset) => c.sets.push(SetAction::Reset { name }),
                            Ok(VariableSetKind::VarResetAll) => c.sets.push(SetAction::ResetAll),
                            // SET SESSION CHARACTERISTICS AS TRANSACTION ...: the defaults of
                            // later transactions, as the settings they stand for.
                            Ok(VariableSetKind::VarSetMulti) if name == "session characteristics" => {
                                c.sets.extend(v.args.iter().filter_map(session_characteristic))
                            }
                            // SET TRANSACTION ... lasts one transaction.
                            Ok(VariableSetKind::VarSetMulti) => {}
                            Ok(_) => c.sets.push(SetAction::Set {
                                name,
                                statement: text.to_string(),
                            }),
                            Err(_) => {}
                        }
                    }
                }
                NodeEnum::DiscardStmt(d) => {
                    c.read_only = false;
                    c.may_unpin = true;
                    c.discards_all = d.target == pg_query::protobuf::DiscardMode::DiscardAll as i32;
                    c.sets.push(SetAction::ResetAll);
                }
                NodeEnum::ClosePortalStmt(_) | NodeEnum::DropStmt(_) => {
                    c.read_only = false;
                    c.may_unpin = true;
                }
                // Not a pin: tracked per client and prepared again where it is executed
                // (`pg::txn::statements::SqlStatements`). Its text is kept, so it is
                // cached by its exact text.
                NodeEnum::NotifyStmt(n) => {
                    c.read_only = false;
                    c.literal_sensitive = true;
                    c.notifies.push((n.conditionname.clone(), n.payload.clone()));
                }
                NodeEnum::PrepareStmt(p) => {
                    c.read_only = false;
                    c.literal_sensitive = true;
                    c.prepares.push((p.name.clone(), text.to_string()));
                }
                NodeEnum::DeallocateStmt(d) => {
                    c.read_only = false;
                    if stmts.len() == 1 {
                        c.deallocate = Some(if d.isall { String::new() } else { d.name.clone() });
                    }
                }
                NodeEnum::ListenStmt(_) => pin(&mut c, "LISTEN"),
                NodeEnum::DeclareCursorStmt(d) if d.options & CURSOR_OPT_HOLD != 0 => pin(&mut c, HOLD_CURSOR),
                NodeEnum::CreateStmt(s) if s.relation.as_ref().is_some_and(|r| r.relpersistence == "t") => {
                    pin(&mut c, TEMPORARY_TABLE)
                }
                NodeEnum::CreateTableAsStmt(s)
                    if s.into
                        .as_ref()
                        .and_then(|i| i.rel.as_ref())
                        .is_some_and(|r| r.relpersistence == "t") =>
                {
                    pin(&mut c, TEMPORARY_TABLE)
                }
                NodeEnum::DeclareCursorStmt(_) => {}
                NodeEnum::CreatedbStmt(s) => {
                    c.read_only = false;
                    // Without TEMPLATE, PostgreSQL copies template1.
                    let template = s.options.iter().find_map(|o| match &o.node {
                        Some(NodeEnum::DefElem(d)) if d.defname == "template" => def_string(d),
                        _ => None,
                    });
                    c.frees_database = Some(template.unwrap_or_else(|| "template1".into()));
                }
                NodeEnum::DropdbStmt(s) => {
                    c.read_only = false;
                    c.frees_database = Some(s.dbname.clone());
                }
                NodeEnum::RenameStmt(s) if s.rename_type == ObjectType::ObjectDatabase as i32 => {
                    c.read_only = false;
                    c.frees_database = Some(s.subname.clone());
                }
                NodeEnum::AlterDatabaseStmt(s)
                    if s.options
                        .iter()
                        .any(|o| matches!(&o.node, Some(NodeEnum::DefElem(d)) if d.defname == "tablespace")) =>
                {
                    c.read_only = false;
                    c.frees_database = Some(s.dbname.clone());
                }
                NodeEnum::CopyStmt(s) => {
                    c.read_only = false;
                    c.no_question_after |= s.is_from;
                }
                _ => c.read_only = false,
            }
        }
        for (node, _, _, _) in parsed.protobuf.nodes() {
            match node {
                NodeRef::ExecuteStmt(e) => {
                    c.read_only = false;
                    c.executes.push(e.name.clone());
                }
                NodeRef::SelectStmt(s) => {
                    if !s.locking_clause.is_empty() {
                        c.read_only = false;
                    }
                    if let Some(into) = &s.into_clause {
                        c.read_only = false;
                        if into.rel.as_ref().is_some_and(|r| r.relpersistence == "t") {
                            pin(&mut c, TEMPORARY_TABLE);
                        }
                    }
                }
                NodeRef::InsertStmt(_) | NodeRef::UpdateStmt(_) | NodeRef::DeleteStmt(_) | NodeRef::MergeStmt(_) => {
                    c.read_only = false
                }
                // State only the primary has, or that differs per node: a standby's
                // answer would be wrong, not just old.
                NodeRef::RangeVar(r) if is_node_local(&r.relname) => c.read_only = false,
                NodeRef::FuncCall(f) => {
                    let name = f
                        .funcname
                        .last()
                        .and_then(|n| match &n.node {
                            Some(NodeEnum::String(s)) => Some(s.sval.to_ascii_lowercase()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    if SESSION_LOCK_FUNCTIONS.contains(&name.as_str()) {
                        pin(&mut c, ADVISORY_LOCK);
                    }
                    if name == "pg_notify" {
                        let text = |a: &pg_query::protobuf::Node| match &a.node {
                            Some(NodeEnum::AConst(k)) => match &k.val {
                                Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
                                _ => None,
                            },
                            _ => None,
                        };
                        if let [ch, payload] = &f.args[..] {
                            if let (Some(ch), Some(payload)) = (text(ch), text(payload)) {
                                c.literal_sensitive = true;
                                c.notifies.push((ch, payload));
                            }
                        }
                    }
                    if SESSION_UNLOCK_FUNCTIONS.contains(&name.as_str()) {
                        c.may_unpin = true;
                    }
                    // Which setting it reads is a literal: cache this statement by its
                    // exact text, and send a read of a setting a standby reports
                    // differently to the primary.
                    if name == "current_setting" {
                        c.literal_sensitive = true;
                        let setting = f.args.first().and_then(|a| match &a.node {
                            Some(NodeEnum::AConst(k)) => match &k.val {
                                Some(a_const::Val::Sval(s)) => Some(s.sval.to_ascii_lowercase()),
                                _ => None,
                            },
                            _ => None,
                        });
                        // A setting named by a parameter ($1) may be one of those.
                        if setting.as_deref().is_none_or(is_node_local_setting) {
                            c.read_only = false;
                        }
                    }
                    if !self.read_only_functions.contains(&name) {
                        c.read_only = false;
                    }
                }
                _ => {}
            }
        }
        c
    }
}

/// Views and catalogs whose rows describe the node answering, not the database: prepared
/// transactions, sessions, locks, replication, statistics. Read on a standby they give
/// that standby's answer (e.g. no prepared transactions), so they belong on the primary.
fn is_node_local(relname: &str) -> bool {
    let r = relname.to_ascii_lowercase();
    r.starts_with("pg_stat_")
        || r.starts_with("pg_statio_")
        || matches!(
            r.as_str(),
            "pg_prepared_xacts"
                | "pg_locks"
                | "pg_replication_slots"
                | "pg_replication_origin_status"
                | "pg_stat_activity"
                | "pg_backend_memory_contexts"
        )
}

/// Settings a hot standby reports for its own reasons: every transaction there is
/// read-only, whatever the session asked for.
fn is_node_local_setting(name: &str) -> bool {
    matches!(name, "transaction_read_only" | "in_hot_standby")
}

/// A string-valued option (`TEMPLATE name`, `ISOLATION LEVEL x`).
fn def_string(d: &pg_query::protobuf::DefElem) -> Option<String> {
    match d.arg.as_deref().and_then(|a| a.node.as_ref())? {
        NodeEnum::String(s) => Some(s.sval.clone()),
        NodeEnum::AConst(k) => match &k.val {
            Some(a_const::Val::Sval(s)) => Some(s.sval.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn is_serializable(option: &pg_query::protobuf::Node) -> bool {
    matches!(&option.node, Some(NodeEnum::DefElem(d))
        if d.defname == "transaction_isolation"
            && def_string(d).is_some_and(|v| v.eq_ignore_ascii_case("serializable")))
}

/// One item of `SET SESSION CHARACTERISTICS AS TRANSACTION ...` as the session default
/// it changes, with a statement that sets it alone.
fn session_characteristic(option: &pg_query::protobuf::Node) -> Option<SetAction> {
    let Some(NodeEnum::DefElem(d)) = &option.node else {
        return None;
    };
    let name = format!("default_{}", d.defname);
    let value = match d.arg.as_deref().and_then(|a| a.node.as_ref())? {
        NodeEnum::AConst(k) => match &k.val {
            Some(a_const::Val::Sval(s)) => s.sval.clone(),
            Some(a_const::Val::Ival(i)) => if i.ival != 0 { "on" } else { "off" }.to_string(),
            Some(a_const::Val::Boolval(b)) => if b.boolval { "on" } else { "off" }.to_string(),
            _ => return None,
        },
        _ => return None,
    };
    if !matches!(
        name.as_str(),
        "default_transaction_isolation" | "default_transaction_read_only" | "default_transaction_deferrable"
    ) {
        return None;
    }
    let statement = format!("SET {name} = '{}'", value.replace('\'', "''"));
    Some(SetAction::Set { name, statement })
}

/// A statement's digest: libpg_query's fingerprint (literals, comments and spacing do
/// not count) and its normalized text without comments; for text the parser refuses,
/// a hash of its shape as the cache sees it. Computed once per shape (on a cache miss).
fn digest_of(sql: &str) -> Arc<Digest> {
    if let (Ok(f), Ok(normalized)) = (pg_query::fingerprint(sql, 0, 0), pg_query::normalize(sql)) {
        return Arc::new(Digest::new(f.value, &without_comments(&normalized)));
    }
    let mut key = String::new();
    blank_literals(sql, &mut key);
    let text = without_comments(&key);
    let mut h = std::hash::DefaultHasher::new();
    for word in text.split_whitespace() {
        std::hash::Hash::hash(word, &mut h);
    }
    Arc::new(Digest::new(std::hash::Hasher::finish(&h), &text))
}

/// Pin for `why`; a reason that lasts wins over one that can be left (`releasable`).
fn pin(c: &mut Classification, why: &'static str) {
    c.read_only = false;
    if c.pins.is_none_or(|p| releasable(p) && !releasable(why)) {
        c.pins = Some(why);
    }
}

/// The text of one statement of a multi-statement string (0 length: to the end).
fn statement_text(sql: &str, location: i32, len: i32) -> &str {
    let start = (location.max(0) as usize).min(sql.len());
    let end = if len <= 0 {
        sql.len()
    } else {
        (start + len as usize).min(sql.len())
    };
    sql.get(start..end).unwrap_or(sql).trim()
}

#[cfg(test)]
mod tests;

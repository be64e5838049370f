//! Which MySQL statements a replica may answer (read/write splitting on the rw
//! endpoint): parsed with `sqlparser`'s MySQL dialect, cached by statement shape.
//!
//! A statement goes to a replica only when it is certainly a read that any server
//! with the same data answers the same way:
//! - one `SELECT` (or `UNION`, `VALUES`, a `WITH` of them), no `INTO`, no locking
//!   clause (`FOR UPDATE`, `FOR SHARE`, `LOCK IN SHARE MODE`);
//! - calling only functions known to have no side effect and no tie to the session's
//!   own connection (`LAST_INSERT_ID()`, `FOUND_ROWS()`, `GET_LOCK()`,
//!   `CONNECTION_ID()`... are not on the list), plus the cluster's
//!   `read_only_functions`;
//! - reading no user variable (`@x` lives on the primary's connection).
//!
//! Anything else, including what does not parse, goes to the primary.

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use sqlparser::ast::{Expr, SetExpr, Statement};
use sqlparser::dialect::MySqlDialect;
use sqlparser::parser::Parser;

use crate::obs::digest::Digest;

/// Built-in functions a replica answers as the primary would: pure functions of their
/// arguments, aggregates, and clocks. (Lower case.)
const READ_ONLY_FUNCTIONS: &[&str] = &[
    // aggregates and windows
    "avg",
    "bit_and",
    "bit_or",
    "bit_xor",
    "count",
    "group_concat",
    "json_arrayagg",
    "json_objectagg",
    "max",
    "min",
    "std",
    "stddev",
    "stddev_pop",
    "stddev_samp",
    "sum",
    "var_pop",
    "var_samp",
    "variance",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    // control flow and comparison
    "coalesce",
    "if",
    "ifnull",
    "nullif",
    "isnull",
    "greatest",
    "least",
    "interval",
    "strcmp",
    "field",
    "find_in_set",
    "elt",
    // strings
    "ascii",
    "bin",
    "bit_length",
    "char",
    "char_length",
    "character_length",
    "concat",
    "concat_ws",
    "format",
    "hex",
    "insert",
    "instr",
    "lcase",
    "left",
    "length",
    "locate",
    "lower",
    "lpad",
    "ltrim",
    "make_set",
    "mid",
    "oct",
    "octet_length",
    "ord",
    "position",
    "quote",
    "regexp_instr",
    "regexp_like",
    "regexp_replace",
    "regexp_substr",
    "repeat",
    "replace",
    "reverse",
    "right",
    "rpad",
    "rtrim",
    "soundex",
    "space",
    "substr",
    "substring",
    "substring_index",
    "trim",
    "ucase",
    "unhex",
    "upper",
    "to_base64",
    "from_base64",
    "md5",
    "sha",
    "sha1",
    "sha2",
    "crc32",
    "collation",
    "charset",
    "convert",
    "cast",
    "binary",
    "weight_string",
    // numbers
    "abs",
    "acos",
    "asin",
    "atan",
    "atan2",
    "ceil",
    "ceiling",
    "conv",
    "cos",
    "cot",
    "degrees",
    "div",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "log2",
    "mod",
    "pi",
    "pow",
    "power",
    "radians",
    "round",
    "sign",
    "sin",
    "sqrt",
    "tan",
    "truncate",
    // dates and times (the replica's clock: as good as the primary's for a read)
    "adddate",
    "addtime",
    "convert_tz",
    "curdate",
    "current_date",
    "current_time",
    "current_timestamp",
    "curtime",
    "date",
    "date_add",
    "date_format",
    "date_sub",
    "datediff",
    "day",
    "dayname",
    "dayofmonth",
    "dayofweek",
    "dayofyear",
    "extract",
    "from_days",
    "from_unixtime",
    "get_format",
    "hour",
    "last_day",
    "localtime",
    "localtimestamp",
    "makedate",
    "maketime",
    "microsecond",
    "minute",
    "month",
    "monthname",
    "now",
    "period_add",
    "period_diff",
    "quarter",
    "sec_to_time",
    "second",
    "str_to_date",
    "subdate",
    "subtime",
    "sysdate",
    "time",
    "time_format",
    "time_to_sec",
    "timediff",
    "timestamp",
    "timestampadd",
    "timestampdiff",
    "to_days",
    "to_seconds",
    "unix_timestamp",
    "utc_date",
    "utc_time",
    "utc_timestamp",
    "week",
    "weekday",
    "weekofyear",
    "year",
    "yearweek",
    // JSON
    "json_array",
    "json_contains",
    "json_contains_path",
    "json_depth",
    "json_extract",
    "json_keys",
    "json_length",
    "json_object",
    "json_quote",
    "json_search",
    "json_type",
    "json_unquote",
    "json_valid",
    "json_value",
    "json_overlaps",
    "json_merge_patch",
    "json_merge_preserve",
    "json_set",
    "json_insert",
    "json_replace",
    "json_remove",
    // identity of the server and the session (the same on every node, or the replica's
    // own answer is what a read on it means)
    "database",
    "schema",
    "user",
    "current_user",
    "session_user",
    "system_user",
    "version",
    "uuid",
    "uuid_short",
    "rand",
];

/// What the proxy needs to know about one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Classification {
    /// A replica may answer it.
    pub read: bool,
}

const WRITE: Classification = Classification { read: false };

/// Classifies statements, remembering the answer per statement shape.
pub struct Classifier {
    extra: Vec<String>,
    cache: Mutex<ShapeMap<Classification>>,
    /// Statement shape → its query digest (`obs::digest`), computed once per shape.
    digests: Mutex<ShapeMap<Arc<Digest>>>,
}

/// Statement shapes to what is known of them. foldhash, seeded at random per map: the
/// lookup is on the path of every statement, where SipHash showed in the profile.
type ShapeMap<V> = HashMap<String, V, foldhash::fast::RandomState>;

thread_local! {
    /// The shape of the statement being looked up (`blank_literals`' output), kept from
    /// one statement to the next so that a lookup that finds it allocates nothing.
    static SHAPE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Look `sql`'s shape up with `find`; on a miss, `make` gets the shape to keep.
fn with_shape<T>(sql: &str, find: impl FnOnce(&str) -> Option<T>, make: impl FnOnce(String) -> T) -> T {
    let found = SHAPE.with_borrow_mut(|shape| {
        blank_literals(sql, shape);
        let found = find(shape).ok_or_else(|| shape.clone());
        // A huge statement's room is not kept for the thread's life.
        if shape.capacity() > 64 * 1024 {
            *shape = String::new();
        }
        found
    });
    found.unwrap_or_else(make)
}

/// Shapes remembered at most; past this the cache starts again (a workload that
/// builds statements with ever new shapes would otherwise grow it without bound).
const CACHE_MAX: usize = 10_000;

impl Classifier {
    /// `extra`: the cluster's `read_only_functions`.
    pub fn new(extra: &[String]) -> Classifier {
        Classifier {
            extra: extra.iter().map(|f| f.to_ascii_lowercase()).collect(),
            cache: Mutex::new(ShapeMap::default()),
            digests: Mutex::new(ShapeMap::default()),
        }
    }

    /// The query digest of `sql` (a `COM_QUERY`'s or `COM_STMT_PREPARE`'s text): the
    /// statement as `sqlparser` prints it back with every literal replaced by `?`
    /// (comments, spacing and letter case of keywords aside), identified by a hash of
    /// that text; what does not parse is grouped by its shape with literals blanked.
    pub fn digest(&self, sql: &[u8]) -> Arc<Digest> {
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Arc::new(Digest::new(0, "(text not in UTF-8)"));
        };
        with_shape(
            sql,
            |shape| self.digests.lock().unwrap().get(shape).cloned(),
            |shape| self.digest_new(sql, shape),
        )
    }

    /// The digest of a shape not seen before (`digest`), remembered.
    fn digest_new(&self, sql: &str, key: String) -> Arc<Digest> {
        let text = match Parser::parse_sql(&MySqlDialect {}, sql) {
            Ok(mut statements) if !statements.is_empty() => {
                let _ = sqlparser::ast::visit_expressions_mut(&mut statements, |e| {
                    if let Expr::Value(v) = e {
                        v.value = sqlparser::ast::Value::Placeholder("?".into());
                    }
                    ControlFlow::<()>::Continue(())
                });
                statements.iter().map(|s| s.to_string()).collect::<Vec<_>>().join("; ")
            }
            _ => key.clone(),
        };
        let mut h = std::hash::DefaultHasher::new();
        for word in text.split_whitespace() {
            std::hash::Hash::hash(word, &mut h);
        }
        let d = Arc::new(Digest::new(std::hash::Hasher::finish(&h), &text));
        let mut digests = self.digests.lock().unwrap();
        if digests.len() >= CACHE_MAX {
            digests.clear();
        }
        digests.insert(key, d.clone());
        d
    }

    /// Classify `sql` (a `COM_QUERY`'s text, in the connection's character set:
    /// not UTF-8 means not classified, so the primary).
    pub fn classify(&self, sql: &[u8]) -> Classification {
        let Ok(sql) = std::str::from_utf8(sql) else {
            return WRITE;
        };
        with_shape(
            sql,
            |shape| self.cache.lock().unwrap().get(shape).copied(),
            |shape| {
                let c = self.parse(sql);
                let mut cache = self.cache.lock().unwrap();
                if cache.len() >= CACHE_MAX {
                    cache.clear();
                }
                cache.insert(shape, c);
                c
            },
        )
    }

    fn parse(&self, sql: &str) -> Classification {
        let Ok(mut statements) = Parser::parse_sql(&MySqlDialect {}, sql) else {
            return WRITE;
        };
        if statements.len() != 1 {
            return WRITE;
        }
        let statement = statements.pop().expect("one statement");
        let Statement::Query(query) = &statement else {
            return WRITE;
        };
        if !query.locks.is_empty() || query.for_clause.is_some() || !reads_only(&query.body) {
            return WRITE;
        }
        if let Some(with) = &query.with {
            if with
                .cte_tables
                .iter()
                .any(|c| !c.query.locks.is_empty() || !reads_only(&c.query.body))
            {
                return WRITE;
            }
        }
        // Nested statements (a DML inside a CTE) make it a write.
        let mut nested = 0;
        let _ = sqlparser::ast::visit_statements(&statement, |_| {
            nested += 1;
            ControlFlow::<()>::Continue(())
        });
        if nested != 1 {
            return WRITE;
        }
        let verdict = sqlparser::ast::visit_expressions(&statement, |e| match e {
            Expr::Function(f) => {
                let name = f.name.to_string().to_ascii_lowercase();
                let name = name.rsplit('.').next().unwrap_or_default().trim_matches('`');
                if READ_ONLY_FUNCTIONS.contains(&name) || self.extra.iter().any(|x| x == name) {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            }
            Expr::Identifier(id) if primary_only_variable(&id.value, None) => ControlFlow::Break(()),
            Expr::CompoundIdentifier(ids)
                if ids
                    .first()
                    .is_some_and(|id| primary_only_variable(&id.value, ids.get(1).map(|i| i.value.as_str()))) =>
            {
                ControlFlow::Break(())
            }
            _ => ControlFlow::Continue(()),
        });
        // A locking clause in a subquery, which the AST keeps where the top-level
        // check does not look: refuse by its words.
        let upper = sql.to_ascii_uppercase();
        let locking = [
            "FOR UPDATE",
            "FOR SHARE",
            "LOCK IN SHARE MODE",
            "INTO OUTFILE",
            "INTO DUMPFILE",
        ]
        .iter()
        .any(|w| upper.contains(w));
        Classification {
            read: verdict.is_continue() && !locking,
        }
    }
}

/// System variables a replica connection answers as the primary one would: the session
/// settings it mirrors (`moving::REPLAYED`), and facts of the server the client asks to
/// see where its read ran. Any other `@@` variable (`@@last_insert_id`,
/// `@@warning_count`, `@@read_only`, a setting the replica connection does not mirror)
/// is the primary connection's to answer.
const REPLICA_VARIABLES: &[&str] = &[
    "server_id",
    "hostname",
    "port",
    "version",
    "version_comment",
    "version_compile_os",
    "version_compile_machine",
    "lower_case_table_names",
    "max_allowed_packet",
    "character_set_server",
    "collation_server",
    "system_time_zone",
    "default_storage_engine",
    "innodb_version",
];

/// A variable only the primary connection answers right: a user variable (`@x` lives on
/// that connection), or a system variable not in `REPLICA_VARIABLES` nor mirrored.
/// `next`: the part after a dot (`@@session.sql_mode`).
fn primary_only_variable(name: &str, next: Option<&str>) -> bool {
    if !name.starts_with('@') {
        return false;
    }
    if !name.starts_with("@@") {
        return true;
    }
    let var = match next {
        Some(n)
            if ["@@global", "@@session", "@@local"]
                .iter()
                .any(|s| name.eq_ignore_ascii_case(s)) =>
        {
            n
        }
        _ => name.trim_start_matches('@'),
    };
    let var = var.rsplit('.').next().unwrap_or(var);
    let mirrored = super::moving::REPLAYED
        .iter()
        .any(|(m, y)| var.eq_ignore_ascii_case(m) || var.eq_ignore_ascii_case(y))
        // READ ONLY differs on the replica connection on purpose.
        && !["tx_read_only", "transaction_read_only"].iter().any(|v| var.eq_ignore_ascii_case(v));
    !(mirrored || REPLICA_VARIABLES.iter().any(|v| var.eq_ignore_ascii_case(v)))
}

/// A query body that only reads: SELECTs without INTO, set operations and VALUES.
fn reads_only(body: &SetExpr) -> bool {
    match body {
        SetExpr::Select(s) => s.into.is_none(),
        SetExpr::Query(q) => q.locks.is_empty() && reads_only(&q.body),
        SetExpr::SetOperation { left, right, .. } => reads_only(left) && reads_only(right),
        SetExpr::Values(_) => true,
        _ => false,
    }
}

/// Copy `sql` into `out` with every literal (string, number, hex or bit value)
/// replaced by `?`, in MySQL's lexical rules (backslash escapes in strings, `"` as a
/// string quote, backquoted identifiers, `#` and `-- ` comments). Written by hand, like
/// PostgreSQL's `blank_literals`: one pass, no allocation; tokenizing with the parser
/// would cost what the cache saves.
pub fn blank_literals(sql: &str, out: &mut String) {
    /// The bytes `blank_literals` stops at: quotes, backquotes and digits.
    static STARTS_LITERAL: [bool; 256] = {
        let mut t = [false; 256];
        let mut c = 0;
        while c < 256 {
            t[c] = matches!(c as u8, b'\'' | b'"' | b'`' | b'0'..=b'9');
            c += 1;
        }
        t
    };
    out.clear();
    let b = sql.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    let mut i = 0;
    // The bytes from `kept` to `i` are copied as they are, in one go when a literal (or
    // the end) comes. Only ASCII bytes start a literal, so both ends of a run are
    // character boundaries.
    let mut kept = 0;
    while i < b.len() {
        // Most bytes start nothing: passed over a table lookup at a time.
        while i < b.len() && !STARTS_LITERAL[b[i] as usize] {
            i += 1;
        }
        let Some(&c) = b.get(i) else { break };
        match c {
            b'\'' | b'"' => {
                // A one-letter prefix (X'', B'', N'', _charset'') stays as text before `?`.
                let mut j = i + 1;
                while j < b.len() {
                    if b[j] == b'\\' {
                        j += 2;
                    } else if b[j] == c {
                        if b.get(j + 1) == Some(&c) {
                            j += 2;
                        } else {
                            break;
                        }
                    } else {
                        j += 1;
                    }
                }
                out.push_str(&sql[kept..i]);
                out.push('?');
                i = (j + 1).min(b.len());
                kept = i;
            }
            b'`' => {
                // Kept as it is, quotes and all (skipped whole: a quote inside is no
                // string's).
                i = memchr::memchr(b'`', &b[i + 1..]).map_or(b.len(), |e| i + 1 + e + 1);
            }
            b'0'..=b'9' if i == 0 || !ident(b[i - 1]) => {
                let mut j = i;
                while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.') {
                    j += 1;
                }
                out.push_str(&sql[kept..i]);
                out.push('?');
                i = j;
                kept = i;
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[kept..]);
}

impl Default for Classifier {
    fn default() -> Classifier {
        Classifier::new(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(sql: &str) -> bool {
        Classifier::new(&["my_pure_fn".to_string()])
            .classify(sql.as_bytes())
            .read
    }

    #[test]
    fn only_plain_reads_go_to_replicas() {
        for sql in [
            "SELECT 1",
            "select id, name from shop_customer where id = 5 limit 21",
            "SELECT COUNT(*) AS `__count` FROM `shop_customer`",
            "SELECT a FROM t UNION SELECT b FROM u",
            "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
            "SELECT @@session.sql_mode, @@server_id, @@time_zone",
            "SELECT CONCAT(name, '!'), NOW() FROM t WHERE d > DATE_SUB(NOW(), INTERVAL 1 DAY)",
            "SELECT my_pure_fn(a) FROM t",
            "SELECT * FROM t WHERE id IN (SELECT id FROM u)",
        ] {
            assert!(read(sql), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "UPDATE t SET a = 1",
            "SELECT * FROM t FOR UPDATE",
            "SELECT * FROM t LOCK IN SHARE MODE",
            "SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)",
            "SELECT LAST_INSERT_ID()",
            "SELECT GET_LOCK('x', 1)",
            "SELECT @x",
            "SELECT @@read_only",
            "SELECT @@global.read_only = 0 AND @@innodb_read_only = 0",
            "SELECT @@session.tx_read_only",
            "SELECT @@last_insert_id",
            "SELECT @@IDENTITY",
            "SELECT @@warning_count",
            "SELECT @@gtid_slave_pos",
            "SELECT a INTO @x FROM t",
            "SELECT * FROM t INTO OUTFILE '/tmp/x'",
            "SELECT nextval(s)",
            "SELECT some_stored_function(1)",
            "SET @x = 1",
            "SET NAMES utf8mb4",
            "BEGIN",
            "SELECT 1; SELECT 2",
            "SHOW TABLES",
            "not sql at all",
        ] {
            assert!(!read(sql), "{sql}");
        }
        assert!(!Classifier::new(&[]).classify(b"SELECT \xff").read, "not UTF-8");
    }

    /// The first version of `blank_literals`, a character at a time: what the one in use
    /// must agree with.
    fn blank_literals_per_char(sql: &str, out: &mut String) {
        out.clear();
        let b = sql.as_bytes();
        let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            match c {
                b'\'' | b'"' => {
                    // A one-letter prefix (X'', B'', N'', _charset'') stays as text before `?`.
                    let mut j = i + 1;
                    while j < b.len() {
                        if b[j] == b'\\' {
                            j += 2;
                        } else if b[j] == c {
                            if b.get(j + 1) == Some(&c) {
                                j += 2;
                            } else {
                                break;
                            }
                        } else {
                            j += 1;
                        }
                    }
                    out.push('?');
                    i = (j + 1).min(b.len());
                }
                b'`' => {
                    let end = sql[i + 1..].find('`').map_or(b.len(), |e| i + 1 + e + 1);
                    out.push_str(&sql[i..end]);
                    i = end;
                }
                b'0'..=b'9' if i == 0 || !ident(b[i - 1]) => {
                    let mut j = i;
                    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'.') {
                        j += 1;
                    }
                    out.push('?');
                    i = j;
                }
                _ => {
                    // Copy one UTF-8 character.
                    let len = sql[i..].chars().next().map_or(1, char::len_utf8);
                    out.push_str(&sql[i..i + len]);
                    i += len;
                }
            }
        }
    }

    #[test]
    fn blanking_in_runs_agrees_with_blanking_a_character_at_a_time() {
        // Texts over the characters that matter (quotes, escapes, digits next to
        // identifiers, backquotes, multi-byte letters), at random.
        let alphabet: Vec<char> = "'\"`\\0123456789.xeE_$ aZ(,)é€ß\n#-".chars().collect();
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut a, mut b) = (String::new(), String::new());
        for _ in 0..30_000 {
            let len = (next() % 24) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            blank_literals(&text, &mut a);
            blank_literals_per_char(&text, &mut b);
            assert_eq!(a, b, "{text:?}");
        }
    }

    #[test]
    fn statements_that_differ_only_in_values_share_a_shape() {
        let mut a = String::new();
        let mut b = String::new();
        blank_literals(
            "SELECT * FROM t1 WHERE a = 'x\\'y' AND b = 42.5 AND c = \"q\"\"q\"",
            &mut a,
        );
        blank_literals("SELECT * FROM t1 WHERE a = '' AND b = 7 AND c = \"\"", &mut b);
        assert_eq!(a, b);
        assert_eq!(a, "SELECT * FROM t1 WHERE a = ? AND b = ? AND c = ?");
        blank_literals("SELECT `a'1` FROM `t 2`", &mut a);
        assert_eq!(a, "SELECT `a'1` FROM `t 2`", "identifiers are kept");
        let c = Classifier::new(&[]);
        assert!(c.classify(b"SELECT * FROM t WHERE id = 1").read);
        assert!(c.classify(b"SELECT * FROM t WHERE id = 2").read);
        assert_eq!(c.cache.lock().unwrap().len(), 1);
    }

    #[test]
    fn digests_replace_literals_and_ignore_comments_and_spacing() {
        let c = Classifier::new(&[]);
        let a = c.digest(b"SELECT * FROM t1 WHERE a = 'x' AND b IN (1, 2)");
        let b = c.digest(b"select *  from t1 /* traceparent='00-aa-bb-01' */ where a = \"y\" and b in (3, 4)");
        assert_eq!(a.id, b.id);
        assert_eq!(&*a.text, "SELECT * FROM t1 WHERE a = ? AND b IN (?, ?)");
        assert_ne!(a.id, c.digest(b"SELECT * FROM t2 WHERE a = 'x' AND b IN (1, 2)").id);
        let bad = c.digest(b"SELEC 1 FROM nowhere");
        assert_eq!(bad.id, c.digest(b"SELEC 2 FROM nowhere").id);
    }
}

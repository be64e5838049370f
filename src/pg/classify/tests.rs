//! The classifier's table of tricky statements.
use super::*;

fn c(sql: &str) -> Classification {
    (*Classifier::new(&["my_report".to_string()]).classify(sql)).clone()
}

#[test]
fn reads_and_writes() {
    let table = [
        ("SELECT 1", true),
        ("select * from t where id = $1", true),
        ("WITH x AS (SELECT 1) SELECT * FROM x", true),
        ("VALUES (1), (2)", true),
        ("SHOW TimeZone", true),
        ("SELECT count(*), max(v) FROM t", true),
        ("/* a comment */ SELECT 1 -- trailing", true),
        ("SELECT a FROM t UNION SELECT b FROM u", true),
        ("EXPLAIN SELECT 1", true),
        ("SELECT my_report(1)", true),
        // Writes, however they are dressed.
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", false),
        ("SELECT * FROM t FOR UPDATE", false),
        ("SELECT * FROM (SELECT * FROM t FOR SHARE) s", false),
        ("SELECT nextval('s')", false),
        ("SELECT setval('s', 1)", false),
        ("SELECT my_function()", false),
        ("SELECT * INTO t2 FROM t", false),
        ("SELECT 1; DELETE FROM t", false),
        ("INSERT INTO t VALUES (1)", false),
        ("UPDATE t SET v = 1", false),
        ("DO $$ BEGIN PERFORM 1; END $$", false),
        ("CALL proc()", false),
        ("EXPLAIN ANALYZE DELETE FROM t", false),
        ("CREATE TABLE t (v int)", false),
        ("SET TIME ZONE 'UTC'", false),
        ("SELEC garbage", false),
    ];
    for (sql, read) in table {
        assert_eq!(c(sql).read_only, read, "{sql}");
    }
}

#[test]
fn transactions() {
    assert_eq!(c("BEGIN").begins, Some(false));
    assert!(!c("BEGIN").read_only);
    assert_eq!(c("BEGIN READ ONLY").begins, Some(true));
    assert!(c("START TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").read_only);
    assert!(c("BEGIN READ ONLY; SELECT 1; COMMIT").read_only);
    assert!(!c("BEGIN; SELECT 1; COMMIT").read_only);
    assert!(!c("PREPARE TRANSACTION 'x'").read_only);
}

/// What the proxy's own question may not follow in the same write: what may leave a
/// transaction block open, and COPY FROM (the server then reads COPY data).
#[test]
fn statements_no_question_may_follow() {
    for sql in [
        "BEGIN",
        "START TRANSACTION",
        "COMMIT; BEGIN",
        "UPDATE t SET a = 1; BEGIN ISOLATION LEVEL SERIALIZABLE",
        "COMMIT AND CHAIN",
        "END AND CHAIN",
        "ROLLBACK AND CHAIN",
        "UPDATE t SET a = 1 WHERE",
        "COPY t FROM STDIN",
        "COPY t (a, b) FROM STDIN WITH (FORMAT csv)",
    ] {
        assert!(c(sql).no_question_after, "{sql}");
    }
    for sql in [
        "COMMIT",
        "END",
        "COMMIT AND NO CHAIN",
        "ROLLBACK",
        "UPDATE t SET a = 1",
        "UPDATE t SET a = 1; INSERT INTO u VALUES (2)",
        "COMMIT PREPARED 'x'",
        "SELECT 1",
        "COPY t TO STDOUT",
    ] {
        assert!(!c(sql).no_question_after, "{sql}");
    }
}

#[test]
fn session_state() {
    assert_eq!(
        c("SET TIME ZONE 'UTC'").sets,
        vec![SetAction::Set {
            name: "timezone".into(),
            statement: "SET TIME ZONE 'UTC'".into()
        }]
    );
    assert_eq!(
        c("SET search_path = a; RESET work_mem").sets,
        vec![
            SetAction::Set {
                name: "search_path".into(),
                statement: "SET search_path = a".into()
            },
            SetAction::Reset {
                name: "work_mem".into()
            }
        ]
    );
    assert!(c("SET LOCAL work_mem = '1MB'").sets.is_empty());
    assert_eq!(c("RESET ALL").sets, vec![SetAction::ResetAll]);
    assert_eq!(c("DISCARD ALL").sets, vec![SetAction::ResetAll]);
}

#[test]
fn pins() {
    // SQL PREPARE does not pin: its text is kept to prepare it again elsewhere.
    let p = c("/* x */ PREPARE p (int) AS SELECT $1; EXPLAIN EXECUTE q(1); EXECUTE P(2)");
    assert_eq!(p.pins, None);
    assert_eq!(
        p.prepares,
        [("p".to_string(), "PREPARE p (int) AS SELECT $1".to_string())]
    );
    assert_eq!(p.executes, ["q", "p"]);
    assert!(c("DISCARD ALL").discards_all && !c("DISCARD TEMP").discards_all);
    // LISTEN / UNLISTEN alone (or only with each other) are the proxy's to answer.
    use crate::pg::notify::ListenOp;
    assert_eq!(
        c("LISTEN a; UNLISTEN \"B\"; UNLISTEN *").listens,
        [
            ListenOp::Listen("a".into()),
            ListenOp::Unlisten("B".into()),
            ListenOp::UnlistenAll
        ]
    );
    assert!(c("LISTEN a; SELECT 1").listens.is_empty());
    assert_eq!(
        c("BEGIN; UNLISTEN a; COMMIT").unlistens,
        [ListenOp::Unlisten("a".into())]
    );
    assert_eq!(c("LISTEN a").pins, Some("LISTEN"));
    assert_eq!(
        c("NOTIFY a, 'x'; SELECT pg_notify('b', 'y'), pg_notify('c', $1)").notifies,
        [("a".to_string(), "x".to_string()), ("b".to_string(), "y".to_string())]
    );
    assert_eq!(
        c("NOTIFY a, 'z'").notifies,
        [("a".to_string(), "z".to_string())],
        "cached by its text"
    );
    assert_eq!(c("LISTEN jobs").pins, Some("LISTEN"));
    assert_eq!(c("SELECT pg_advisory_lock(1)").pins, Some("a session advisory lock"));
    assert_eq!(c("SELECT pg_advisory_xact_lock(1)").pins, None);
    // What may release them is seen; a pin that lasts wins over a lock's in one string.
    for sql in [
        "SELECT pg_advisory_unlock(1)",
        "SELECT pg_advisory_unlock_all()",
        "CLOSE c",
        "DROP TABLE t",
        "DISCARD TEMP",
    ] {
        assert!(c(sql).may_unpin, "{sql}");
    }
    assert!(!c("SELECT pg_advisory_lock(1)").may_unpin);
    assert_eq!(c("DECLARE c CURSOR WITH HOLD FOR SELECT 1").pins, Some(HOLD_CURSOR));
    assert_eq!(c("SELECT pg_advisory_lock(1); LISTEN x").pins, Some("LISTEN"));
    assert_eq!(c("LISTEN x; SELECT pg_advisory_lock(1)").pins, Some("LISTEN"));
    assert_eq!(c("CREATE TEMP TABLE x (v int)").pins, Some("a temporary table"));
    assert_eq!(c("SELECT 1 INTO TEMP x").pins, Some("a temporary table"));
    assert_eq!(
        c("DECLARE \"_django_curs_1\" NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t").pins,
        Some("a WITH HOLD cursor")
    );
    assert_eq!(c("DECLARE c CURSOR FOR SELECT 1").pins, None);
}

#[test]
fn deallocate() {
    assert_eq!(c("DEALLOCATE ALL").deallocate, Some(String::new()));
    assert_eq!(c("DEALLOCATE \"_pg3_1\"").deallocate, Some("_pg3_1".into()));
    assert_eq!(c("DEALLOCATE PREPARE p").deallocate, Some("p".into()));
    assert_eq!(c("SELECT 1").deallocate, None);
}

#[test]
fn literals_are_blanked_for_the_cache_key() {
    let mut k = String::new();
    let mut key = |s: &str| {
        blank_literals(s, &mut k);
        k.clone()
    };
    assert_eq!(
        key("SELECT abalance FROM t WHERE aid = 42;"),
        "SELECT abalance FROM t WHERE aid = ?;"
    );
    assert_eq!(
        key("SELECT 'it''s', E'a\\'b', 1.5e-3, x1, $1, $$dollar 'q'$$"),
        "SELECT ?, ?, ?, x1, $1, ?"
    );
    assert_eq!(
        key("SELECT $tag$ 1 $tag$ FROM \"t 1\" /* 'x' 2 */ -- 3"),
        "SELECT ? FROM \"t 1\"    "
    );
    assert_eq!(key("SELECT B'0101', X'ff', n'x'"), "SELECT ?, ?, ?");
    assert_eq!(key("SELECT ünï, 'é'"), "SELECT ünï, ?");
    // Same shape, one entry; a hint is not a literal.
    assert_eq!(key("SELECT 1"), key("SELECT 2"));
    assert_ne!(key("/* switchyard:primary */ SELECT 1"), key("SELECT 1"));
    // sqlcommenter's per-request comment does not make every request a new shape.
    assert_eq!(
        key("SELECT 1 /*traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'*/"),
        key("SELECT 2 /*traceparent='00-ffffffffffffffffffffffffffffffff-0000000000000001-01'*/")
    );
}

#[test]
fn digests_ignore_literals_comments_and_spacing() {
    let k = Classifier::new(&[]);
    let a = k.classify("SELECT * FROM t WHERE id = 1 AND name = 'x'");
    let b = k.classify("select *\n  from t where id = 42 and name = 'y' -- why\n");
    let c = k.classify("/* traceparent='00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' */ SELECT * FROM t WHERE id = $1 AND name = $2");
    assert_eq!(a.digest.id, b.digest.id);
    assert_eq!(a.digest.id, c.digest.id);
    assert_eq!(&*a.digest.text, "SELECT * FROM t WHERE id = $1 AND name = $2");
    assert!(!c.digest.text.contains("traceparent"), "{}", c.digest.text);
    assert_ne!(a.digest.id, k.classify("SELECT * FROM u WHERE id = 1").digest.id);
    // What the parser refuses still gets one digest per shape.
    let bad = k.classify("SELEC 1 FROM nowhere");
    assert_eq!(bad.digest.id, k.classify("SELEC 2  FROM nowhere /* x */").digest.id);
    assert_eq!(&*bad.digest.text, "SELEC ? FROM nowhere");
}

#[test]
fn comments_leave_quoted_text_alone() {
    assert_eq!(
        without_comments("SELECT '--x', \"a/*b\" /* c /* nested */ */ FROM t -- end"),
        "SELECT '--x', \"a/*b\"   FROM t  "
    );
}

#[test]
fn cached_shapes_keep_set_values_exact() {
    let k = Classifier::new(&[]);
    assert!(Arc::ptr_eq(
        &k.classify("SELECT * FROM t WHERE id = 1"),
        &k.classify("SELECT * FROM t WHERE id = 2")
    ));
    let a = k.classify("SET TIME ZONE 'UTC'");
    let b = k.classify("SET TIME ZONE 'Asia/Tokyo'");
    assert_eq!(
        b.sets,
        vec![SetAction::Set {
            name: "timezone".into(),
            statement: "SET TIME ZONE 'Asia/Tokyo'".into()
        }]
    );
    assert_ne!(a.sets, b.sets);
    assert!(!k.classify("SELECT * FROM t WHERE id = 3 FOR UPDATE").read_only);
}

#[test]
fn serializable_goes_to_the_primary() {
    assert!(!c("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY").read_only);
    assert!(!c("START TRANSACTION READ ONLY, ISOLATION LEVEL SERIALIZABLE, DEFERRABLE").read_only);
    assert!(c("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").read_only);
    assert_eq!(
        c("SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY").sets,
        vec![
            SetAction::Set {
                name: "default_transaction_isolation".into(),
                statement: "SET default_transaction_isolation = 'serializable'".into()
            },
            SetAction::Set {
                name: "default_transaction_read_only".into(),
                statement: "SET default_transaction_read_only = 'on'".into()
            }
        ]
    );
    assert!(c("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE").sets.is_empty());
}

#[test]
fn node_local_state_is_read_on_the_primary() {
    for sql in [
        "SELECT gid FROM pg_prepared_xacts",
        "SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid = 1",
        "SELECT * FROM pg_locks l JOIN pg_class c ON c.oid = l.relation",
        "SELECT * FROM pg_stat_replication",
        "SELECT * FROM pg_stat_user_tables",
        "SELECT EXISTS (SELECT 1 FROM PG_STAT_ACTIVITY)",
    ] {
        assert!(!c(sql).read_only, "{sql}");
    }
    assert!(c("SELECT * FROM pg_class").read_only);
    assert!(c("SELECT * FROM my_stats").read_only);
}

#[test]
fn settings_a_standby_reports_differently_are_read_on_the_primary() {
    assert!(
        !c("SELECT current_setting('transaction_read_only'), current_setting('default_transaction_read_only')")
            .read_only
    );
    assert!(!c("SHOW transaction_read_only").read_only);
    // psycopg: current_setting(%s) with the name as a parameter.
    assert!(!c("select current_setting($1), current_setting($2)").read_only);
    assert!(c("SHOW TimeZone").read_only);
    // Same shape, another setting: a cache keyed by shape must not mix them.
    let k = Classifier::new(&[]);
    assert!(k.classify("SELECT current_setting('work_mem')").read_only);
    assert!(!k.classify("SELECT current_setting('transaction_read_only')").read_only);
    assert!(k.classify("SELECT current_setting('search_path')").read_only);
}

#[test]
fn statements_that_need_a_database_free() {
    let f = |sql: &str| c(sql).frees_database;
    assert_eq!(
        f("CREATE DATABASE \"test_app_1\" WITH TEMPLATE \"test_app\""),
        Some("test_app".into())
    );
    assert_eq!(f("CREATE DATABASE x TEMPLATE = 'tpl'"), Some("tpl".into()));
    assert_eq!(f("CREATE DATABASE x"), Some("template1".into()));
    assert_eq!(
        f("DROP DATABASE IF EXISTS test_app WITH (FORCE)"),
        Some("test_app".into())
    );
    assert_eq!(f("ALTER DATABASE old RENAME TO new"), Some("old".into()));
    assert_eq!(f("ALTER DATABASE d SET TABLESPACE t"), Some("d".into()));
    assert_eq!(f("ALTER DATABASE d SET work_mem = '1MB'"), None);
    assert_eq!(f("ALTER TABLE t RENAME TO u"), None);
    // Same shape, other names: never one cache entry.
    let k = Classifier::new(&[]);
    assert_eq!(
        k.classify("CREATE DATABASE a TEMPLATE 'x'").frees_database,
        Some("x".into())
    );
    assert_eq!(
        k.classify("CREATE DATABASE a TEMPLATE 'y'").frees_database,
        Some("y".into())
    );
}

#[test]
fn text_in_other_encodings_goes_to_the_primary() {
    let k = Classifier::new(&[]);
    // LATIN9: 0xa4 is the euro sign, not UTF-8.
    let c = k.classify_bytes(b"select 'x' as \"\xa4\"");
    assert!(!c.read_only && !c.parses);
    assert!(k.classify_bytes(b"select 1").read_only);
}

#[test]
fn hints_and_cache() {
    assert!(c("/* switchyard:primary */ SELECT 1").hint_primary);
    let k = Classifier::new(&[]);
    let a = k.classify("SELECT 1");
    let b = k.classify("SELECT 1");
    assert!(Arc::ptr_eq(&a, &b));
}

#[test]
fn causal_token_statements_are_recognised_alone() {
    use crate::pg::classify::{causal_statement, CausalStatement as C};
    assert_eq!(causal_statement(b"SHOW switchyard.causal_token"), Some(C::Show));
    assert_eq!(causal_statement(b"show SWITCHYARD.CAUSAL_TOKEN;"), Some(C::Show));
    assert_eq!(
        causal_statement(b"SET switchyard.causal_token = 'sy1.a.1.10'"),
        Some(C::Set("sy1.a.1.10".into()))
    );
    assert_eq!(
        causal_statement(b"set switchyard.causal_token to 'x'"),
        Some(C::Set("x".into()))
    );
    assert_eq!(
        causal_statement(b"SET switchyard.causal_token = ''"),
        Some(C::Set(String::new()))
    );
    assert_eq!(causal_statement(b"RESET switchyard.causal_token"), Some(C::Reset));
    assert_eq!(
        causal_statement(b"SET switchyard.causal_token TO DEFAULT"),
        Some(C::Reset)
    );
    // Anything else goes to a server as usual.
    assert_eq!(causal_statement(b"SELECT 1"), None);
    assert_eq!(causal_statement(b"SHOW other.causal_token"), None);
    assert_eq!(causal_statement(b"SELECT 'switchyard.causal_token'"), None);
    assert_eq!(causal_statement(b"SHOW switchyard.causal_token; SELECT 1"), None);
    assert_eq!(causal_statement(b"\xff causal_token"), None);
}

#[test]
fn statements_that_only_change_settings_are_known() {
    for sql in [
        "SET TIME ZONE 'UTC'",
        "SELECT set_config('TimeZone', 'UTC', false)",
        "SET search_path = a; SHOW work_mem",
        "DISCARD ALL",
    ] {
        assert!(c(sql).settings_only, "{sql}");
    }
    for sql in [
        "SELECT set_config('a', my_func(), false)",
        "SELECT set_config('a', 'b', false) FROM t",
        "SET a = 1; INSERT INTO t VALUES (1)",
        "SELECT 1",
        "INSERT INTO t VALUES (1)",
    ] {
        assert!(!c(sql).settings_only, "{sql}");
    }
}

#[test]
fn a_parse_is_looked_up_as_sent_and_classified_as_classify_would() {
    let k = Classifier::new(&[]);
    let texts: [&[u8]; 6] = [
        b"SELECT abalance FROM pgbench_accounts WHERE aid = $1",
        b"SELECT * FROM t WHERE id = 42",
        b"UPDATE t SET v = $1 WHERE id = 7",
        b"SET TIME ZONE 'UTC'",
        b"SELECT nextval('s')",
        b"SELECT current_setting('transaction_read_only')",
    ];
    for text in texts {
        // Before and after the text is in the cache, under its shape or as sent.
        for _ in 0..2 {
            let p = k.classify_parse(text);
            let q = k.classify_bytes(text);
            assert!(Arc::ptr_eq(&p, &q), "{}", String::from_utf8_lossy(text));
        }
    }
    // A shape and a text with literals are told apart by their bytes, not mixed up.
    assert!(!k.classify_parse(b"SELECT nextval('s')").read_only);
    assert_eq!(
        k.classify_parse(b"SET TIME ZONE 'Asia/Tokyo'").sets,
        vec![SetAction::Set {
            name: "timezone".into(),
            statement: "SET TIME ZONE 'Asia/Tokyo'".into()
        }]
    );
    // Not UTF-8: never cached, the opaque answer (primary) as from classify_bytes.
    let c = k.classify_parse(b"SELECT '\xff'");
    assert!(!c.read_only && !c.parses);
}

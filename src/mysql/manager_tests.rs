//! The control plane's MySQL statements and GTID arithmetic, against answers recorded
//! from MariaDB 10.11 and (from MySQL 8.0's reference manual's examples, as no MySQL 8
//! server runs here) MySQL 8.

use super::*;

fn row(text: &str) -> StatusRow {
    // `SHOW ... STATUS\G` as the mysql client prints it: `  Name: value` per line.
    text.lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// MariaDB 10.11, `SHOW ALL SLAVES STATUS\G` on a replica whose primary was just killed
/// (trimmed to the columns read).
const MARIADB_REPLICA: &str = "
              Connection_name:
               Slave_IO_State: Reconnecting after a failed master event read
                  Master_Host: 127.0.0.1
                  Master_Port: 40001
             Slave_IO_Running: Connecting
            Slave_SQL_Running: Yes
                Last_SQL_Error:
        Seconds_Behind_Master: NULL
                   Using_Gtid: Slave_Pos
                  Gtid_IO_Pos: 0-1-1207
";

/// MySQL 8.0, `SHOW REPLICA STATUS\G` of a replica streaming from its source.
const MYSQL_REPLICA: &str = "
             Replica_IO_State: Waiting for source to send event
                  Source_Host: 10.0.0.1
                  Source_Port: 3306
           Replica_IO_Running: Yes
          Replica_SQL_Running: Yes
                Last_SQL_Error:
        Seconds_Behind_Source: 0
           Retrieved_Gtid_Set: 3e11fa47-71ca-11e1-9e33-c80aa9429562:1-120
            Executed_Gtid_Set: 3e11fa47-71ca-11e1-9e33-c80aa9429562:1-117,
4e11fa47-71ca-11e1-9e33-c80aa9429562:1-5
                Auto_Position: 1
";

#[test]
fn a_mariadb_replica_that_lost_its_primary_is_a_candidate_that_does_not_hear_it() {
    let c = candidate(Flavor::MariaDb, &[row(MARIADB_REPLICA)], "0-1-1200", 1, "failover1").unwrap();
    assert_eq!(c.received, Some(1207), "received: Gtid_IO_Pos");
    assert_eq!(c.replayed, Some(1200), "applied: gtid_slave_pos");
    assert!(!c.hears_primary, "IO thread is Connecting");
    assert_eq!(c.position(), 1207);
}

#[test]
fn a_mysql_replica_counts_retrieved_and_executed_transactions() {
    let executed = "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-117,\n4e11fa47-71ca-11e1-9e33-c80aa9429562:1-5";
    let c = candidate(Flavor::MySql, &[row(MYSQL_REPLICA)], executed, 2, "r2").unwrap();
    assert_eq!(c.replayed, Some(122));
    assert_eq!(
        c.received,
        Some(125),
        "1-120 from the source joined with the 5 of its own"
    );
    assert!(c.hears_primary);
}

#[test]
fn a_node_without_replication_is_no_candidate() {
    assert_eq!(candidate(Flavor::MariaDb, &[], "0-1-5", 0, "p"), None);
}

#[test]
fn change_source_in_both_dialects() {
    assert_eq!(
        Flavor::MariaDb.change_source("10.0.0.2", 3306, None, false),
        "CHANGE MASTER TO MASTER_HOST = '10.0.0.2', MASTER_PORT = 3306, MASTER_USE_GTID = slave_pos"
    );
    assert_eq!(
        Flavor::MariaDb.change_source("db'2", 3307, Some(("repl", "p'w")), true),
        "CHANGE MASTER TO MASTER_HOST = 'db''2', MASTER_PORT = 3307, MASTER_USER = 'repl', MASTER_PASSWORD = 'p''w', MASTER_USE_GTID = current_pos"
    );
    assert_eq!(
        Flavor::MySql.change_source("db2", 3306, Some(("repl", "x")), true),
        "CHANGE REPLICATION SOURCE TO SOURCE_HOST = 'db2', SOURCE_PORT = 3306, SOURCE_USER = 'repl', SOURCE_PASSWORD = 'x', SOURCE_AUTO_POSITION = 1"
    );
    assert_eq!(
        Flavor::MariaDb.retry_and_heartbeat(Some(Duration::from_millis(500))),
        ", MASTER_CONNECT_RETRY = 1, MASTER_HEARTBEAT_PERIOD = 0.5"
    );
    assert_eq!(Flavor::MySql.retry_and_heartbeat(None), ", SOURCE_CONNECT_RETRY = 1");
    assert_eq!(Flavor::MySql.set_read_only(), "SET GLOBAL super_read_only = 1");
    assert_eq!(
        Flavor::MySql.set_writable(),
        ["SET GLOBAL super_read_only = 0", "SET GLOBAL read_only = 0"]
    );
    assert_eq!(Flavor::MySql.wait(), "SELECT WAIT_FOR_EXECUTED_GTID_SET(?, ?)");
    assert_eq!(Flavor::MariaDb.wait(), "SELECT MASTER_GTID_WAIT(?, ?)");
}

#[test]
fn flavor_from_the_version_string() {
    assert_eq!(Flavor::of("10.11.6-MariaDB-0+deb12u1-log"), Flavor::MariaDb);
    assert_eq!(Flavor::of("8.0.36"), Flavor::MySql);
}

#[test]
fn gtid_sets_union_difference_and_count() {
    let a = GtidSet::parse("3E11FA47-71CA-11E1-9E33-C80AA9429562:1-5:11-18, 4e11fa47-71ca-11e1-9e33-c80aa9429562:1")
        .unwrap();
    assert_eq!(a.count(), 14);
    assert_eq!(
        a.to_string(),
        "3e11fa47-71ca-11e1-9e33-c80aa9429562:1-5:11-18,4e11fa47-71ca-11e1-9e33-c80aa9429562:1"
    );
    let b = GtidSet::parse("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-12").unwrap();
    assert_eq!(
        a.minus(&b).to_string(),
        "3e11fa47-71ca-11e1-9e33-c80aa9429562:13-18,4e11fa47-71ca-11e1-9e33-c80aa9429562:1"
    );
    assert!(b
        .minus(&GtidSet::parse("3e11fa47-71ca-11e1-9e33-c80aa9429562:1-20").unwrap())
        .is_empty());
    let mut c = GtidSet::parse("u:1-3").unwrap();
    c.add(&GtidSet::parse("u:4-6:9").unwrap());
    assert_eq!(c.to_string(), "u:1-6:9");
    // MySQL 8.3 tagged GTIDs keep their tag with the UUID.
    assert_eq!(GtidSet::parse("u:1-2:blue:1-4").unwrap().count(), 6);
    assert!(GtidSet::parse("u:5-2").is_err());
    assert!(GtidSet::parse("").unwrap().is_empty());
}

#[test]
fn an_old_mysql_primary_with_transactions_the_new_one_lacks_is_named() {
    let old = "aaaa:1-100";
    let new = "aaaa:1-97,bbbb:1-30";
    assert_eq!(
        extra_history(Flavor::MySql, old, new, new).unwrap(),
        Some("aaaa:98-100".to_string())
    );
    assert_eq!(extra_history(Flavor::MySql, "aaaa:1-97", new, new).unwrap(), None);
}

#[test]
fn mariadb_history_is_compared_per_domain_from_the_fork() {
    // The new primary (server 2) replicated up to 0-1-90, then wrote 0-2-91..150.
    let (cur, rep) = ("0-2-150", "0-1-90");
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-90", cur, rep).unwrap(),
        None,
        "all it had was replicated"
    );
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-85", cur, rep).unwrap(),
        None,
        "behind: a prefix"
    );
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-100", cur, rep).unwrap(),
        Some("0-1-91 to 0-1-100".to_string()),
        "asynchronous replication lost 91..100"
    );
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-91", cur, rep).unwrap(),
        Some("0-1-91".to_string())
    );
    // The new primary wrote nothing of its own yet: its current position decides.
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-90", "0-1-90", "0-1-90").unwrap(),
        None
    );
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-92", "0-1-90", "0-1-90").unwrap(),
        Some("0-1-91 to 0-1-92".to_string())
    );
    // A domain the new primary never saw.
    assert_eq!(
        extra_history(Flavor::MariaDb, "0-1-90,1-1-3", cur, rep).unwrap(),
        Some("1-1-1 to 1-1-3".to_string())
    );
}

#[test]
fn a_connected_replica_hears_its_source_only_while_something_arrives() {
    let info = crate::mysql::ClusterInfo::default();
    let t0 = Instant::now();
    let window = Duration::from_secs(1);
    let period = Some(Duration::from_millis(500));
    // No record (MySQL, or never checked): the IO thread's state decides.
    assert!(still_hears(true, info.heard("r1"), t0, window));
    assert!(!still_hears(false, info.heard("r1"), t0, window));
    info.note_heard("r1", Some(10), period, t0);
    // The same marker later: nothing arrived since t0.
    info.note_heard("r1", Some(10), period, t0 + Duration::from_millis(1000));
    assert!(still_hears(
        true,
        info.heard("r1"),
        t0 + Duration::from_millis(900),
        window
    ));
    assert!(
        !still_hears(true, info.heard("r1"), t0 + Duration::from_millis(1100), window),
        "silent for longer than the window (and two heartbeat periods): a frozen source"
    );
    // A long heartbeat period widens the window: an idle source is silent that long.
    info.note_heard("r2", Some(1), Some(Duration::from_secs(2)), t0);
    assert!(still_hears(
        true,
        info.heard("r2"),
        t0 + Duration::from_millis(3900),
        window
    ));
    assert!(!still_hears(
        true,
        info.heard("r2"),
        t0 + Duration::from_millis(4100),
        window
    ));
    // A heartbeat arrived: it hears again.
    info.note_heard("r1", Some(11), period, t0 + Duration::from_millis(1700));
    assert!(still_hears(
        true,
        info.heard("r1"),
        t0 + Duration::from_millis(1800),
        window
    ));
    // No channel any more: no record.
    info.note_heard("r1", None, None, t0);
    assert!(info.heard("r1").is_none());
}

#[test]
fn the_managers_missing_privileges_are_named() {
    let g = |lines: &[&str]| lines.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // MariaDB 10.11's SHOW GRANTS for the tests' manager.
    let full = g(&[
        "GRANT RELOAD, PROCESS, BINLOG MONITOR, CONNECTION ADMIN, READ_ONLY ADMIN, REPLICATION SLAVE ADMIN, SLAVE MONITOR ON *.* TO `manager`@`%` IDENTIFIED BY PASSWORD '*A'",
    ]);
    assert_eq!(missing_grants(Flavor::MariaDb, &full), Vec::<&str>::new());
    let monitor_only = g(&["GRANT PROCESS, BINLOG MONITOR, SLAVE MONITOR ON *.* TO `monitor`@`%`"]);
    assert_eq!(
        missing_grants(Flavor::MariaDb, &monitor_only),
        [
            "READ_ONLY ADMIN",
            "REPLICATION SLAVE ADMIN",
            "CONNECTION ADMIN",
            "RELOAD"
        ]
    );
    // Grants on one database do not count; ALL PRIVILEGES on *.* covers everything.
    let db_only = g(&["GRANT ALL PRIVILEGES ON `app`.* TO `app`@`%`"]);
    assert_eq!(missing_grants(Flavor::MariaDb, &db_only).len(), 7);
    assert!(missing_grants(
        Flavor::MySql,
        &g(&["GRANT ALL PRIVILEGES ON *.* TO `root`@`%` WITH GRANT OPTION"])
    )
    .is_empty());
    // MySQL 8 lists static and dynamic privileges on separate lines.
    let mysql = g(&[
        "GRANT RELOAD, PROCESS, REPLICATION CLIENT ON *.* TO `manager`@`%`",
        "GRANT CONNECTION_ADMIN,REPLICATION_SLAVE_ADMIN ON *.* TO `manager`@`%`",
    ]);
    assert_eq!(missing_grants(Flavor::MySql, &mysql), ["SYSTEM_VARIABLES_ADMIN"]);
}

//! `Answers` against server byte streams built packet by packet, fed whole and one byte
//! at a time (a relay sees any split).

use super::*;

const AUTOCOMMIT: u16 = 0x0002;

fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    v.push(seq);
    v.extend_from_slice(payload);
    v
}

fn ok(status: u16) -> Vec<u8> {
    let mut p = vec![0x00, 0, 0];
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    p
}

/// An OK with header 0xFE (the end of rows under CLIENT_DEPRECATE_EOF), large counts.
fn ok_fe(status: u16) -> Vec<u8> {
    let mut p = vec![0xFE, 0xFC, 0x10, 0x27, 0xFD, 1, 2, 3];
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    p
}

fn eof(status: u16) -> Vec<u8> {
    let mut p = vec![0xFE, 0, 0];
    p.extend_from_slice(&status.to_le_bytes());
    p
}

fn err() -> Vec<u8> {
    let mut p = vec![0xFF, 0x48, 0x04, b'#'];
    p.extend_from_slice(b"HY000oops");
    p
}

fn coldef(name: &str) -> Vec<u8> {
    let mut p = vec![3];
    p.extend_from_slice(b"def");
    for s in ["app", "t", "t", name, name] {
        p.push(s.len() as u8);
        p.extend_from_slice(s.as_bytes());
    }
    p.extend_from_slice(&[0x0c, 0x21, 0, 0xff, 0, 0, 0, 0xfd, 0, 0, 0, 0, 0]);
    p
}

/// Feed `stream` whole to one tracker and byte by byte to another; both must agree.
fn feed(a: &mut Answers, b: &mut Answers, stream: &[Vec<u8>]) {
    let bytes: Vec<u8> = stream
        .iter()
        .enumerate()
        .flat_map(|(i, p)| packet(i as u8 + 1, p))
        .collect();
    a.feed(&bytes);
    for byte in &bytes {
        b.feed(std::slice::from_ref(byte));
    }
    assert_eq!(
        (a.idle(), a.in_transaction, a.lost),
        (b.idle(), b.in_transaction, b.lost)
    );
}

fn pair(deprecate_eof: bool) -> (Answers, Answers) {
    (Answers::new(deprecate_eof), Answers::new(deprecate_eof))
}

#[test]
fn an_ok_ends_a_command_and_its_status_says_whether_a_transaction_is_open() {
    let (mut a, mut b) = pair(false);
    a.command(0x03);
    b.command(0x03);
    assert!(!a.idle());
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT | SERVER_STATUS_IN_TRANS)]);
    assert!(a.idle() && a.in_transaction && !a.at_rest());
    a.command(0x03);
    b.command(0x03);
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT)]);
    assert!(a.at_rest());
}

#[test]
fn a_result_set_ends_at_its_eof_not_at_a_row_that_starts_like_an_ok() {
    for deprecate in [false, true] {
        let (mut a, mut b) = pair(deprecate);
        a.command(0x03);
        b.command(0x03);
        let mut stream = vec![vec![2], coldef("a"), coldef("b")];
        if !deprecate {
            stream.push(eof(AUTOCOMMIT));
        }
        // Rows: an empty first column (0x00), a NULL (0xFB), an ordinary one.
        stream.push(vec![0x00, 1, b'x']);
        stream.push(vec![0xFB, 1, b'y']);
        stream.push(vec![1, b'1', 1, b'2']);
        let before_end = stream.clone();
        let (mut c, mut d) = pair(deprecate);
        c.command(0x03);
        d.command(0x03);
        feed(&mut c, &mut d, &before_end);
        assert!(!c.idle(), "rows still coming (deprecate_eof {deprecate})");
        stream.push(if deprecate { ok_fe(AUTOCOMMIT) } else { eof(AUTOCOMMIT) });
        feed(&mut a, &mut b, &stream);
        assert!(a.at_rest(), "deprecate_eof {deprecate}: {a:?}");
    }
}

#[test]
fn more_results_keep_the_answer_open_and_an_err_ends_it() {
    let (mut a, mut b) = pair(true);
    a.command(0x03);
    b.command(0x03);
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT | SERVER_MORE_RESULTS_EXISTS)]);
    assert!(!a.idle(), "a second result follows");
    feed(&mut a, &mut b, &[vec![1], coldef("a"), vec![1, b'1'], err()]);
    assert!(a.idle() && !a.lost);
}

/// A query killed before its first row (`KILL QUERY`, `max_statement_time`): the ERR
/// comes right after the column definitions, and ends the answer.
#[test]
fn an_err_right_after_the_column_definitions_ends_the_answer() {
    for deprecate in [false, true] {
        let (mut a, mut b) = pair(deprecate);
        a.command(0x03);
        b.command(0x03);
        let mut stream = vec![vec![1], coldef("a")];
        if !deprecate {
            stream.push(eof(AUTOCOMMIT));
        }
        stream.push(err());
        feed(&mut a, &mut b, &stream);
        assert!(a.idle() && !a.lost, "deprecate_eof {deprecate}: {a:?}");
    }
}

#[test]
fn local_infile_waits_for_the_final_ok() {
    let (mut a, mut b) = pair(true);
    a.command(0x03);
    b.command(0x03);
    let mut req = vec![0xFB];
    req.extend_from_slice(b"/tmp/data.csv");
    feed(&mut a, &mut b, &[req]);
    assert!(!a.idle(), "the client sends the file; the server's OK is still owed");
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT)]);
    assert!(a.at_rest());
}

#[test]
fn a_prepare_ends_after_its_parameter_and_column_definitions() {
    for deprecate in [false, true] {
        let (mut a, mut b) = pair(deprecate);
        a.command(0x16);
        b.command(0x16);
        // stmt id 1, 1 column, 2 parameters.
        let prepare_ok = vec![0x00, 1, 0, 0, 0, 1, 0, 2, 0, 0, 0, 0];
        let mut stream = vec![prepare_ok, coldef("?"), coldef("?")];
        if !deprecate {
            stream.push(eof(AUTOCOMMIT));
        }
        stream.push(coldef("a"));
        let last = if deprecate { None } else { Some(eof(AUTOCOMMIT)) };
        feed(&mut a, &mut b, &stream);
        assert_eq!(a.idle(), deprecate, "deprecate_eof {deprecate}");
        if let Some(last) = last {
            let bytes = packet(9, &last);
            a.feed(&bytes);
            assert!(a.idle());
        }
        assert!(!a.lost);
    }
}

#[test]
fn a_cursor_ends_the_execute_answer_at_the_column_definitions() {
    let (mut a, mut b) = pair(false);
    a.command(0x17);
    b.command(0x17);
    feed(
        &mut a,
        &mut b,
        &[vec![1], coldef("a"), eof(AUTOCOMMIT | SERVER_STATUS_CURSOR_EXISTS)],
    );
    assert!(a.idle());
    // COM_STMT_FETCH: binary rows (header 0x00), then EOF.
    a.command(0x1c);
    b.command(0x1c);
    feed(&mut a, &mut b, &[vec![0x00, 0x00, 1, b'x'], eof(AUTOCOMMIT)]);
    assert!(a.at_rest());
}

#[test]
fn pipelined_commands_are_owed_in_order_and_some_get_no_answer() {
    let (mut a, mut b) = pair(true);
    for cmd in [0x03, 0x19, 0x0e, 0x03] {
        a.command(cmd);
        b.command(cmd);
    }
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT), ok(AUTOCOMMIT)]);
    assert!(!a.idle(), "three answers owed (COM_STMT_CLOSE gets none), two came");
    feed(&mut a, &mut b, &[ok(AUTOCOMMIT | SERVER_STATUS_IN_TRANS)]);
    assert!(a.idle() && a.in_transaction);
}

#[test]
fn long_packets_are_skipped_without_being_held() {
    let (mut a, mut b) = pair(true);
    a.command(0x03);
    b.command(0x03);
    let big_row = {
        let mut r = vec![0xFC, 0x00, 0x10];
        r.extend(std::iter::repeat_n(b'z', 0x1000));
        r
    };
    feed(&mut a, &mut b, &[vec![1], coldef("a"), big_row, ok_fe(AUTOCOMMIT)]);
    assert!(a.at_rest());
}

#[test]
fn an_unasked_packet_or_an_unknown_command_loses_track_for_good() {
    let mut a = Answers::new(true);
    a.feed(&packet(0, &ok(AUTOCOMMIT)));
    assert!(a.lost && !a.at_rest());
    let mut b = Answers::new(true);
    b.command(0x12); // COM_BINLOG_DUMP
    assert!(b.lost);
}

#[test]
fn an_answer_cut_short_between_packets_takes_the_next_sequence_id() {
    let mut a = Answers::new(true);
    a.command(0x03);
    assert_eq!(a.next_seq_mid_answer(), None, "nothing of the answer yet");
    // Column count (seq 1), a definition (seq 2), a row (seq 3): rows still to come.
    let bytes: Vec<u8> = [packet(1, &[1]), packet(2, &coldef("a")), packet(3, &[1, b'x'])].concat();
    a.feed(&bytes);
    assert_eq!(a.next_seq_mid_answer(), Some(4));
    // Half of the next packet: no place for another packet.
    let next = packet(4, &[1, b'y']);
    a.feed(&next[..2]);
    assert_eq!(a.next_seq_mid_answer(), None);
    a.feed(&next[2..]);
    a.feed(&packet(5, &ok_fe(AUTOCOMMIT)));
    assert_eq!(a.next_seq_mid_answer(), None, "the answer is whole");
}

/// An OK that reports session state: MariaDB's tracked `last_gtid`, or MySQL's GTIDs
/// entry (`mysql`), with `pad` bytes of info text before it.
fn ok_with_gtid(gtid: &str, mysql: bool, pad: usize) -> Vec<u8> {
    let mut p = vec![0x00, 1, 0];
    p.extend_from_slice(&(AUTOCOMMIT | SERVER_SESSION_STATE_CHANGED).to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    crate::mysql::protocol::put_lenenc_int(&mut p, pad as u64);
    p.extend(std::iter::repeat_n(b'i', pad));
    let mut data = Vec::new();
    let kind = if mysql {
        data.push(0); // encoding: the set as text
        data.push(gtid.len() as u8);
        data.extend_from_slice(gtid.as_bytes());
        SESSION_TRACK_GTIDS
    } else {
        data.push(9);
        data.extend_from_slice(b"last_gtid");
        data.push(gtid.len() as u8);
        data.extend_from_slice(gtid.as_bytes());
        SESSION_TRACK_SYSTEM_VARIABLES
    };
    // Another tracked variable first: entries are walked, not assumed.
    let mut state = vec![SESSION_TRACK_SYSTEM_VARIABLES, 14, 10];
    state.extend_from_slice(b"autocommit\x02ON");
    state.push(kind);
    state.push(data.len() as u8);
    state.extend_from_slice(&data);
    crate::mysql::protocol::put_lenenc_int(&mut p, state.len() as u64);
    p.extend_from_slice(&state);
    p
}

#[test]
fn session_state_is_read_as_servers_send_it() {
    // MariaDB 10.11's OK for `SET time_zone = '+05:00'` with the variable, schema and
    // state-change trackers on, as captured.
    let p = [
        0, 0, 0, 2, 64, 0, 0, 0, 22, 0, 17, 9, 116, 105, 109, 101, 95, 122, 111, 110, 101, 6, 43, 48, 53, 58, 48, 48,
        2, 1, 49,
    ];
    let s = ok_state(&p).unwrap();
    assert_eq!(s.vars, vec![("time_zone".to_string(), "+05:00".to_string())]);
    assert!(s.changed);
    assert_eq!((s.gtid, s.schema), (None, None));
    // A schema change: the name is length-encoded inside the entry's data.
    let mut p = vec![0, 0, 0, 2, 64, 0, 0, 0];
    let block = [1u8, 4, 3, b'a', b'p', b'p', 2, 1, b'1'];
    p.push(block.len() as u8);
    p.extend_from_slice(&block);
    let s = ok_state(&p).unwrap();
    assert_eq!(s.schema.as_deref(), Some("app"));
    assert!(s.changed && s.vars.is_empty());
}

#[test]
fn a_commit_s_gtid_is_read_from_its_ok_when_tracking() {
    assert_eq!(ok_gtid(&ok_with_gtid("0-1-42", false, 0)).as_deref(), Some("0-1-42"));
    let set = "3e11fa47-71ca-11e1-9e33-c80aa9429562:7";
    assert_eq!(ok_gtid(&ok_with_gtid(set, true, 3)).as_deref(), Some(set));
    assert_eq!(ok_gtid(&ok(AUTOCOMMIT)), None, "no session state");
    let mut cut = ok_with_gtid("0-1-42", false, 0);
    cut.truncate(cut.len() - 3);
    assert_eq!(ok_gtid(&cut), None, "a truncated state is ignored");

    for split in [false, true] {
        let mut a = Answers::new(true);
        a.track = true;
        // A result set (not looked at whole), then a write's OK, then an OK too large
        // to read whole.
        a.command(0x03);
        a.command(0x03);
        a.command(0x03);
        let mut stream = packet(1, &[1]);
        stream.extend(packet(
            2,
            b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x01\x00\x00\x00\x08\x00\x00\x00\x00\x00",
        ));
        stream.extend(packet(3, &[1, b'1']));
        stream.extend(packet(4, &ok_fe(AUTOCOMMIT)));
        stream.extend(packet(1, &ok_with_gtid("0-1-42", false, 0)));
        stream.extend(packet(1, &ok_with_gtid("0-1-43", false, 600)));
        if split {
            for b in &stream {
                a.feed(std::slice::from_ref(b));
            }
        } else {
            a.feed(&stream);
        }
        assert!(a.at_rest(), "{a:?}");
        assert_eq!(a.gtid.as_deref(), Some("0-1-42"), "the large OK's GTID is not read");
        assert_eq!(a.oks, 2);
        assert!(a.untracked_ok);
        assert_eq!(a.status, AUTOCOMMIT | SERVER_SESSION_STATE_CHANGED);
    }
}

#[test]
fn statements_finish_with_their_rows_and_errors_and_prepares_name_theirs() {
    let d = |t: &str| std::sync::Arc::new(crate::obs::digest::Digest::new(t.len() as u64, t));
    for deprecate in [false, true] {
        let (mut a, mut b) = pair(deprecate);
        a.statements = true;
        b.statements = true;
        let now = std::time::Instant::now();
        let mut stream = Vec::new();
        for x in [&mut a, &mut b] {
            // An UPDATE of 3 rows, a SELECT of 2 rows, a failing statement, a prepare.
            x.command(0x03);
            x.describe_last(Some(d("UPDATE")), false, now);
            x.command(0x03);
            x.describe_last(Some(d("SELECT")), false, now);
            x.command(0x03);
            x.describe_last(Some(d("BAD")), false, now);
            x.command(0x16);
            x.describe_last(Some(d("PREPARED")), true, now);
        }
        stream.push(vec![0x00, 3, 0, 2, 0, 0, 0]);
        stream.push(vec![1]);
        stream.push(coldef("a"));
        if !deprecate {
            stream.push(eof(AUTOCOMMIT));
        }
        stream.push(vec![1, b'1']);
        stream.push(vec![1, b'2']);
        stream.push(if deprecate { ok_fe(AUTOCOMMIT) } else { eof(AUTOCOMMIT) });
        stream.push(err());
        // stmt id 7, no columns, no parameters.
        stream.push(vec![0x00, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        feed(&mut a, &mut b, &stream);
        for x in [&a, &b] {
            let got: Vec<_> = x.finished.iter().map(|f| (&*f.digest.text, f.rows, f.failed)).collect();
            assert_eq!(
                got,
                [("UPDATE", 3, false), ("SELECT", 2, false), ("BAD", 0, true)],
                "deprecate_eof {deprecate}"
            );
            assert_eq!(x.prepared.get(&7).map(|d| &*d.text), Some("PREPARED"));
            assert!(x.idle() && !x.lost);
        }
    }
}

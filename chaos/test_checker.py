#!/usr/bin/env python3
"""Unit tests of the checker and the schedule, on made-up histories (no processes):
`python3 chaos/test_checker.py`. Each test builds the records a run would have and
says what the checker must conclude."""

import os
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))

from chaoslib.checker import Check  # noqa: E402
from chaoslib.faults import KINDS, schedule  # noqa: E402

N1, N2 = "10.77.0.11:5432", "10.77.0.12:5432"


def w(i, s, node=N1, tl=1, lsn="0/1000000", o="ack", k="w"):
    rec = {"k": k, "id": i, "s": s, "e": s + 0.01, "o": o}
    if o == "ack":
        rec.update({"node": node, "tl": tl, "lsn": lsn, "rec": False})
    return rec


def run(ops, present, sync=False, history=None, timeline=1, faults=(), raw_present=(), fds=(20, 22),
        incarnations=(), read_hold_s=0.0, proxies=None):
    r = {
        "ops": list(ops), "faults": list(faults), "sync": sync,
        "final": {"tables": {"chaos_writes": set(present), "chaos_raw": set(raw_present)},
                  "history": history or {}, "timeline": timeline},
        "node_by_addr": {N1: "n1", N2: "n2"}, "t_start": 0.0, "t_end": 100.0, "op_timeout": 10,
        "fd_bound": 32, "gate_stale_reads": True, "read_hold_s": read_hold_s,
        "proxy": {"incarnations": list(incarnations), "panics": [], "idle_start": {"fds": fds[0]},
                  "idle_end": {"fds": fds[1]}},
    }
    if proxies is not None:
        del r["proxy"]
        r["proxies"] = proxies
    return Check(r).run()


# Two instances ---------------------------------------------------------------------------

def two(incarnations=((), ()), fds=((20, 22), (20, 22)), panics=((), ())):
    return [{"name": n, "incarnations": list(incarnations[i]), "panics": list(panics[i]),
             "idle_start": {"fds": fds[i][0]}, "idle_end": {"fds": fds[i][1]}}
            for i, n in enumerate(("sy1", "sy2"))]


def via(rec, sy):
    return {**rec, "sy": sy}


def st2(sy, t, pub, ep, cut=None, tp=None, leader="sy1"):
    """A /status sample of instance `sy` with its coordination view."""
    return {"k": "st", "sy": sy, "t": t, "te": t + 0.01, "tp": tp, "primary": pub,
            "nodes": [[pub, "up", "primary", 1]],
            "co": {"leader": leader, "cut": cut, "pub": pub, "ep": ep}}


ACROSS = ("dual-primary windows across instances (a write through one instance taken by another node after a "
          "write through the other was acknowledged)")
SAME = "dual-primary windows (writes out of timeline order)"
OFF_PUB = "writes through an instance to a node not published as primary at the epoch it had seen"
WHILE_CUT = "writes acknowledged through an instance while its /status said it was cut off from etcd"


def checks(res):
    return {v["check"] for v in res["violations"]}


class CheckerTest(unittest.TestCase):
    def test_clean_history_passes(self):
        res = run([w(1, 1.0), w(2, 2.0), w(3, 3.0, o="fail")], {1, 2})
        self.assertTrue(res["passed"], res["violations"])

    def test_loss_after_fork_is_replication_lag_when_async(self):
        ops = [w(1, 1.0, lsn="0/1000000"), w(2, 2.0, lsn="0/3000000"), w(3, 5.0, node=N2, tl=2, lsn="0/3100000")]
        hist = {1: 0x2000000}
        res = run(ops, {1, 3}, history=hist, timeline=2)
        self.assertTrue(res["passed"], res["violations"])
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"], {"after_fork": 1})
        res = run(ops, {1, 3}, sync=True, history=hist, timeline=2)
        self.assertIn("acknowledged writes lost", checks(res))

    def test_loss_on_surviving_timeline_always_fails(self):
        res = run([w(1, 1.0), w(2, 2.0)], {1})
        self.assertIn("acknowledged writes lost", checks(res))

    def test_phantom_and_failed_present(self):
        res = run([w(1, 1.0), w(2, 2.0, o="fail")], {1, 2, 99})
        self.assertIn("phantom writes (present, never sent)", checks(res))
        self.assertIn("writes reported failed but committed", checks(res))

    def test_unknown_outcome_may_go_either_way(self):
        res = run([w(1, 1.0, o="unk"), w(2, 2.0, o="unk")], {1})
        self.assertTrue(res["passed"], res["violations"])

    def test_old_primary_after_new_one_is_a_dual_primary_window(self):
        ops = [w(1, 1.0), w(2, 2.0, node=N2, tl=2), w(3, 3.0, node=N1, tl=1)]
        res = run(ops, {1, 2, 3}, history={1: 0}, timeline=2)
        self.assertIn("dual-primary windows (writes out of timeline order)", checks(res))

    def test_in_flight_write_on_old_primary_is_fine(self):
        # Write 3 was sent before write 2 was acknowledged on the new primary.
        ops = [w(1, 1.0), w(2, 2.0, node=N2, tl=2), {**w(3, 1.995, node=N1, tl=1), "e": 2.5}]
        res = run(ops, {1, 2, 3}, history={1: 0}, timeline=2)
        self.assertTrue(res["passed"], res["violations"])

    def test_write_after_switchyard_saw_newer_timeline(self):
        st = {"k": "st", "t": 1.5, "te": 1.6, "primary": "n2",
              "nodes": [["n1", "up", "primary", 1], ["n2", "up", "primary", 2]]}
        res = run([w(1, 1.0), st, w(2, 2.0)], {1, 2})
        self.assertIn("writes to a primary on an older timeline than Switchyard had seen", checks(res))

    def test_stale_read_and_its_excuse(self):
        raw = [w(7, 1.0, k="raw_w"), {"k": "raw_causal", "id": 7, "s": 1.1, "e": 1.2, "o": "ack", "n": 0,
                                      "node": "10.77.0.13:5432", "rec": True}]
        st_ok = {"k": "st", "t": 0.5, "te": 0.5, "primary": "n1", "nodes": [["n1", "up", "primary", 1]]}
        res = run([st_ok] + raw, set(), raw_present={7})
        self.assertIn("stale reads", checks(res))
        st_none = {"k": "st", "t": 0.9, "te": 0.9, "primary": None, "nodes": [["n1", "down", "unknown", 1]]}
        res = run([st_ok, st_none] + raw, set(), raw_present={7})
        self.assertTrue(res["passed"], res["violations"])
        self.assertEqual(res["reads"]["raw_causal"]["excused_no_primary"], 1)
        # With a read hold, a miss is excused only once the cluster had no primary for
        # the whole hold (counted from the last sample that showed one).
        res = run([st_ok, st_none] + raw, set(), raw_present={7}, read_hold_s=5.0)
        self.assertIn("stale reads", checks(res))
        late = [w(7, 1.0, k="raw_w"), {"k": "raw_causal", "id": 7, "s": 5.4, "e": 5.6, "o": "ack", "n": 0,
                                       "node": "10.77.0.13:5432", "rec": True}]
        res = run([st_ok, st_none] + late, set(), raw_present={7}, read_hold_s=5.0)
        self.assertTrue(res["passed"], res["violations"])

    def test_fd_growth_and_crashes(self):
        self.assertTrue(run([w(1, 1.0)], {1}, fds=(20, 52))["passed"])
        self.assertIn("file descriptor growth beyond 32", checks(run([w(1, 1.0)], {1}, fds=(20, 53))))
        incs = [{"pid": 1, "ended_by": "harness SIGKILL"}, {"pid": 2, "ended_by": "crash"}]
        self.assertEqual(checks(run([w(1, 1.0)], {1}, incarnations=incs)),
                         {"Switchyard crashes (exits the harness did not cause)"})

    def test_two_instances_clean_history_passes(self):
        ops = [st2("sy1", 0.5, "n1", 1), st2("sy2", 0.5, "n1", 1),
               via(w(1, 1.0), "sy1"), via(w(2, 1.0), "sy2"), via(w(3, 2.0), "sy1"), via(w(4, 2.0), "sy2")]
        res = run(ops, {1, 2, 3, 4}, proxies=two())
        self.assertTrue(res["passed"], res["violations"])
        self.assertEqual(res["order"]["acknowledged_by_instance"], {"sy1": 2, "sy2": 2})

    def test_dual_primary_across_instances(self):
        # sy1 has moved to n2 (timeline 2) and a write is acknowledged there; sy2 sends a
        # write afterwards that n1 (timeline 1) takes: two primaries through two proxies.
        ops = [via(w(1, 1.0), "sy1"), via(w(2, 2.0, node=N2, tl=2), "sy1"), via(w(3, 2.1, node=N1, tl=1), "sy2")]
        res = run(ops, {1, 2, 3}, history={1: 0}, timeline=2, proxies=two())
        self.assertEqual(checks(res), {ACROSS})
        win = res["order"]["dual_primary_windows"][0]
        self.assertEqual((win["instances"], win["across"]), (["sy1", "sy2"], True))
        # Already in flight through sy2 when sy1's write was acknowledged: allowed.
        ops[2] = via({**w(3, 1.995, node=N1, tl=1), "e": 2.3}, "sy2")
        self.assertTrue(run(ops, {1, 2, 3}, history={1: 0}, timeline=2, proxies=two())["passed"])
        # The same instance going back to the old primary is the one-instance kind.
        ops[2] = via(w(3, 2.1, node=N1, tl=1), "sy1")
        res = run(ops, {1, 2, 3}, history={1: 0}, timeline=2, proxies=two())
        self.assertEqual(checks(res), {SAME})

    def test_write_off_the_published_primary(self):
        # sy2's /status showed n2 published at epoch 2; a write it sends later lands on n1.
        ops = [st2("sy1", 0.5, "n1", 1), st2("sy2", 0.5, "n1", 1), st2("sy2", 1.5, "n2", 2),
               via(w(1, 2.0, node=N1), "sy2")]
        self.assertEqual(checks(run(ops, {1}, proxies=two())), {OFF_PUB})
        # Sent before that sample: it may have been routed under epoch 1.
        ops[-1] = via(w(1, 1.4, node=N1), "sy2")
        self.assertTrue(run(ops, {1}, proxies=two())["passed"])
        # n1 published again later (epoch 3, seen by sy1): a write sy2 sends to it is fine.
        ops[-1] = via(w(1, 2.0, node=N1), "sy2")
        ops.append(st2("sy1", 1.8, "n1", 3))
        self.assertTrue(run(ops, {1}, proxies=two())["passed"])

    def test_write_while_cut_off_from_etcd(self):
        cut = "out of touch with etcd: its lease (2 s) was not renewed in time"
        status = [st2("sy1", 0.5, "n1", 1), st2("sy2", 0.5, "n1", 1),
                  st2("sy2", 1.0, "n1", 1, cut=cut, tp=0.8), st2("sy2", 3.0, "n1", 1, tp=2.8)]
        # Sent and acknowledged through sy2 while it said it was cut off.
        res = run(status + [via(w(1, 1.5), "sy2")], {1}, proxies=two())
        self.assertEqual(checks(res), {WHILE_CUT})
        self.assertEqual(res["coordination"]["instances"]["sy2"]["cut_off_spans"], 1)
        # Acknowledged after the last poll that still said so: it may have waited for
        # the instance to be back (failover_hold_ms), which is allowed.
        self.assertTrue(run(status + [via({**w(1, 1.5), "e": 2.9}, "sy2")], {1}, proxies=two())["passed"])
        # Through the other instance: fine.
        self.assertTrue(run(status + [via(w(1, 1.5), "sy1")], {1}, proxies=two())["passed"])
        # An unreachable /status ends the span at the poll before it.
        status[-1] = {"k": "st", "sy": "sy2", "t": 1.4, "te": 1.5, "tp": 1.2, "err": "TimeoutError"}
        self.assertTrue(run(status + [via(w(1, 1.3), "sy2")], {1}, proxies=two())["passed"])
        self.assertEqual(checks(run(status + [via(w(1, 1.1), "sy2")], {1}, proxies=two())), {WHILE_CUT})

    def test_per_instance_crashes_and_fd_growth(self):
        res = run([w(1, 1.0)], {1}, proxies=two(incarnations=((), ({"pid": 2, "ended_by": "crash"},)),
                                                fds=((20, 53), (20, 22))))
        self.assertEqual(checks(res), {"Switchyard crashes (exits the harness did not cause)",
                                       "file descriptor growth beyond 32 (sy1)"})
        crash = next(v for v in res["violations"] if v["check"].startswith("Switchyard crashes"))
        self.assertEqual(crash["detail"][0]["sy"], "sy2")

    def test_stale_read_excuse_uses_the_serving_instance_status(self):
        # The read went through sy2, whose /status showed no primary; sy1's did.
        raw = [via(w(7, 1.0, k="raw_w"), "sy1"),
               via({"k": "raw_causal", "id": 7, "s": 1.1, "e": 1.2, "o": "ack", "n": 0,
                    "node": "10.77.0.13:5432", "rec": True}, "sy2")]
        none2 = {"k": "st", "sy": "sy2", "t": 0.9, "te": 0.9, "primary": None, "nodes": [["n1", "down", "unknown", 1]]}
        res = run([st2("sy1", 0.5, "n1", 1), st2("sy1", 1.0, "n1", 1), none2] + raw, set(), raw_present={7},
                  proxies=two())
        self.assertTrue(res["passed"], res["violations"])
        raw[1] = {**raw[1], "sy": "sy1"}
        res = run([st2("sy1", 0.5, "n1", 1), st2("sy1", 1.0, "n1", 1), none2] + raw, set(), raw_present={7},
                  proxies=two())
        self.assertIn("stale reads", checks(res))

    def test_instance_schedule_leaves_the_one_instance_schedule_alone(self):
        from chaoslib.faults import INSTANCE_KINDS, available_kinds

        class Net:
            kind, netem = "netns", False
        one = available_kinds(Net(), tmpfs_ok=True)
        both = available_kinds(Net(), tmpfs_ok=True, instances=2)
        self.assertFalse(INSTANCE_KINDS & set(one))
        self.assertEqual(set(both) - set(one), INSTANCE_KINDS)
        self.assertTrue(all("inst" not in f for f in schedule(3, one, 30)))
        # Drawing the instances changes nothing else for the same kinds.
        a = schedule(3, one, 30, instances=2)
        self.assertEqual([{k: v for k, v in f.items() if k != "inst"} for f in a], schedule(3, one, 30))
        self.assertEqual(a, schedule(3, one, 30, instances=2))
        self.assertEqual({f["inst"] for f in a}, {0, 1})

    def test_schedule_is_repeatable_and_covers_every_kind(self):
        kinds = sorted(KINDS)
        a, b = schedule(5, kinds, 40), schedule(5, kinds, 40)
        self.assertEqual(a, b)
        self.assertNotEqual(a, schedule(6, kinds, 40))
        from chaoslib.faults import CORE
        self.assertEqual({f["kind"] for f in a[:len(CORE)]}, set(CORE))
        self.assertEqual({f["kind"] for f in a[len(CORE):len(CORE) + len(kinds)]}, set(kinds))


# MariaDB (--engine mariadb) --------------------------------------------------------------
M1, M2 = "10.77.0.11:3306", "10.77.0.12:3306"


def mw(i, s, gtid, bst, node=M1, o="ack", k="w", semi="ON"):
    """A write through rw as myworkload.py records it: the server, its binlog state
    before the COMMIT, the GTID it got."""
    rec = {"k": k, "id": i, "s": s, "e": s + 0.01, "o": o}
    if o == "ack":
        rec.update({"node": node, "sid": int(node == M2) + 1, "bst": bst, "semi": semi})
        if gtid:
            rec["gtid"] = gtid
    return rec


def myrun(ops, present, sync=False, truth=(), raw_present=(), faults=(), rebuilds=(), final_state=None):
    r = {
        "ops": list(ops), "faults": list(faults), "sync": sync, "engine": "mariadb",
        "final": {"tables": {"chaos_writes": set(present), "chaos_raw": set(raw_present)}, "history": {},
                  "timeline": None, "gtid_binlog_state": final_state},
        "node_by_addr": {M1: "n1", M2: "n2"}, "node_by_sid": {"1": "n1", "2": "n2"},
        "t_start": 0.0, "t_end": 100.0, "op_timeout": 10, "fd_bound": 32, "gate_stale_reads": True,
        "truth": list(truth), "rebuilds": list(rebuilds),
        "proxies": [{"name": "switchyard", "incarnations": [], "panics": [], "idle_start": {"fds": 20},
                     "idle_end": {"fds": 21}}],
    }
    return Check(r).run()


MY_ORDER = "dual-primary windows (a write taken on a history lacking an earlier acknowledged write)"
MY_NOT_PRIMARY = "writes taken by a node that was not the primary (replicating or read-only by its own state)"


class MariaDbCheckerTest(unittest.TestCase):
    # n1 took 0-1-10..12; n2 promoted having received 0-1-10 only, then took 0-2-11..
    def failover_history(self):
        return [mw(1, 1.0, "0-1-10", "0-1-9"), mw(2, 2.0, "0-1-11", "0-1-10"), mw(3, 3.0, "0-1-12", "0-1-11"),
                mw(4, 5.0, "0-2-11", "0-1-10", node=M2), mw(5, 6.0, "0-2-12", "0-1-10,0-2-11", node=M2)]

    def test_clean_history_passes(self):
        ops = [mw(1, 1.0, "0-1-10", "0-1-9"), mw(2, 2.0, "0-1-11", "0-1-10"), mw(3, 3.0, None, None, o="fail")]
        res = myrun(ops, {1, 2})
        self.assertTrue(res["passed"], res["violations"])

    def test_loss_on_an_abandoned_branch_is_lag_when_async_and_fails_with_semi_sync(self):
        ops = self.failover_history()
        # Write 3 (0-1-12) is above every surviving seqno: only the final primary's own
        # state (last GTID of server 1: 0-1-10) shows it is not there.
        res = myrun(ops, {1, 4, 5})
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"],
                         {"diverged_branch": 1, "unexplained": 1})
        res = myrun(ops, {1, 4, 5}, final_state="0-1-10,0-2-12")
        self.assertTrue(res["passed"], res["violations"])
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"], {"diverged_branch": 2})
        res = myrun(ops, {1, 4, 5}, sync=True, final_state="0-1-10,0-2-12")
        self.assertIn("acknowledged writes lost", checks(res))
        # Acknowledged while the primary said semi-sync had fallen back to async.
        ops[1] = {**ops[1], "semi": "OFF"}
        ops[2] = {**ops[2], "semi": "OFF"}
        res = myrun(ops, {1, 4, 5}, sync=True, final_state="0-1-10,0-2-12")
        self.assertTrue(res["passed"], res["violations"])
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"], {"semi_sync_off": 2})

    def test_loss_on_the_surviving_history_always_fails(self):
        # Write 1 (0-1-10) is in the history of the surviving writes 4 and 5, yet missing.
        res = myrun(self.failover_history(), {2, 3, 4, 5}, final_state="0-1-10,0-2-12")
        self.assertIn("acknowledged writes lost", checks(res))
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"], {"unexplained": 1})

    def test_loss_without_gtid_follows_an_earlier_diverged_write_of_its_server(self):
        ops = self.failover_history()
        ops[2] = {k: v for k, v in ops[2].items() if k != "gtid"}  # the session died after the OK
        res = myrun(ops, {1, 4, 5}, final_state="0-1-10,0-2-12")
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"], {"diverged_branch": 2})
        # Not if the server was down (restarted: its binlog may have been cut) in between.
        down = [{"t": 2.5, "node": "n1", "up": False, "primary": None}]
        res = myrun(ops, {1, 4, 5}, truth=down, final_state="0-1-10,0-2-12")
        self.assertEqual(res["writes"]["chaos_writes"]["lost"]["by_category"],
                         {"diverged_branch": 1, "unexplained": 1})

    def test_write_on_a_stale_primary_after_a_newer_write_is_a_dual_primary_window(self):
        ops = self.failover_history()
        # n1 (old primary) takes a write sent after write 4 (n2) was acknowledged.
        ops.append(mw(6, 5.5, "0-1-13", "0-1-12"))
        res = myrun(ops, {1, 4, 5}, final_state="0-1-10,0-2-12")
        self.assertEqual(checks(res), {MY_ORDER})
        self.assertEqual(res["order"]["dual_primary_windows"][0]["first"]["lacks"], ["0-2-11"])
        # Sent before write 4 was acknowledged: in flight, allowed.
        ops[-1] = {**mw(6, 4.995, "0-1-13", "0-1-12"), "e": 5.5}
        self.assertTrue(myrun(ops, {1, 4, 5}, final_state="0-1-10,0-2-12")["passed"])
        # Only surviving writes count: a write that was itself lost later (its branch
        # abandoned) proves nothing about writes that lack it.
        ops = [mw(1, 1.0, "0-1-10", "0-1-9"), mw(2, 2.0, "0-1-11", "0-1-10"),
               mw(4, 5.0, "0-2-12", "0-1-11", node=M2), mw(6, 5.5, "0-1-12", "0-1-11")]
        self.assertEqual(checks(myrun(ops, {1, 2, 6}, final_state="0-1-12")), set())
        self.assertEqual(checks(myrun(ops, {1, 2, 4, 6}, final_state="0-1-12,0-2-12")), {MY_ORDER})

    def test_write_on_a_node_that_was_replicating(self):
        truth = [{"t": 0.5, "node": "n2", "up": True, "primary": False, "ro": False, "src": M1, "io": "Yes",
                  "sql": "Yes"},
                 {"t": 9.0, "node": "n2", "up": True, "primary": True, "ro": False}]
        ops = [mw(1, 1.0, "0-1-10", "0-1-9"), mw(2, 2.0, "0-2-11", "0-1-10", node=M2)]
        self.assertEqual(checks(myrun(ops, {1, 2}, truth=truth)), {MY_NOT_PRIMARY})
        # Too close to the change the harness saw (samples every 0.5 s): not judged.
        ops[1] = mw(2, 7.0, "0-2-11", "0-1-10", node=M2)
        self.assertTrue(myrun(ops, {1, 2}, truth=truth)["passed"])

    def test_read_your_writes_on_the_same_session(self):
        raw = [mw(7, 1.0, "0-1-10", "0-1-9", k="raw_w"),
               {"k": "raw_own", "id": 7, "s": 1.1, "e": 1.2, "o": "ack", "n": 1, "node": M1}]
        self.assertTrue(myrun(raw, set(), raw_present={7})["passed"])
        raw[1] = {**raw[1], "n": 0}
        self.assertIn("read-your-writes misses (same rw session)", checks(myrun(raw, set(), raw_present={7})))

    def test_phantoms_and_failed_present(self):
        res = myrun([mw(1, 1.0, "0-1-10", "0-1-9"), mw(2, 2.0, None, None, o="fail")], {1, 2, 99})
        self.assertIn("phantom writes (present, never sent)", checks(res))
        self.assertIn("writes reported failed but committed", checks(res))


if __name__ == "__main__":
    unittest.main()

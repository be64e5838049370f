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
        incarnations=(), read_hold_s=0.0):
    r = {
        "ops": list(ops), "faults": list(faults), "sync": sync,
        "final": {"tables": {"chaos_writes": set(present), "chaos_raw": set(raw_present)},
                  "history": history or {}, "timeline": timeline},
        "node_by_addr": {N1: "n1", N2: "n2"}, "t_start": 0.0, "t_end": 100.0, "op_timeout": 10,
        "fd_bound": 32, "gate_stale_reads": True, "read_hold_s": read_hold_s,
        "proxy": {"incarnations": list(incarnations), "panics": [], "idle_start": {"fds": fds[0]},
                  "idle_end": {"fds": fds[1]}},
    }
    return Check(r).run()


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

    def test_schedule_is_repeatable_and_covers_every_kind(self):
        kinds = sorted(KINDS)
        a, b = schedule(5, kinds, 40), schedule(5, kinds, 40)
        self.assertEqual(a, b)
        self.assertNotEqual(a, schedule(6, kinds, 40))
        from chaoslib.faults import CORE
        self.assertEqual({f["kind"] for f in a[:len(CORE)]}, set(CORE))
        self.assertEqual({f["kind"] for f in a[len(CORE):len(CORE) + len(kinds)]}, set(kinds))


if __name__ == "__main__":
    unittest.main()

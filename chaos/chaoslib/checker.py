"""The checker: from the recorded operations, the faults, Switchyard's own view and the
final contents of the primary, what went wrong.

Every acknowledged write carries what the node that took it said about itself inside
the same statement: its address, whether it was in recovery, its WAL insert position
and its timeline. That is what the checks below rest on:

- lost: acknowledged, absent from the final primary. Each loss is placed against the
  final primary's timeline history: written on an abandoned timeline at or after the
  point where the surviving history forked off ("after_fork": never replicated before
  the failover), within `NEAR_FORK` bytes before it ("near_fork": the insert was
  before the fork, its commit record may be after it), or anything else
  ("unexplained": on the surviving history, or long before the fork). With
  asynchronous replication the first two are losses within the replication lag,
  reported and not failures; with --sync every loss fails the run except writes taken
  by an old primary in a split-brain window (promoted without fencing: no proxy can
  save those), which are reported apart.
- phantom: in the table, never sent. failed_present: reported failed (ERROR, then
  ReadyForQuery) but committed.
- write order: if write x was acknowledged before write y was sent, y must be on the
  same timeline or a newer one, and on the same node if on the same timeline. A
  violation means two nodes took writes through the proxy in an interleaved way
  (dual primary), or an older primary took one after a newer did. Violations are
  merged into windows.
- older timeline than seen: a write sent after Switchyard's /status already showed a
  primary on a newer timeline, taken by a primary on an older one.
- on a standby: a write whose node reported pg_is_in_recovery() = true.
- stale read: a read-after-write check (same connection on rw with splitting, or
  another connection on ro with the causal token) that did not see a row whose write
  was acknowledged and survived. Excused, and counted apart, when Switchyard showed no
  primary around the read (documented: reads then go to the standbys as they are).

With two Switchyard instances (`--instances 2`, every operation and /status sample
tagged `sy` with the instance it went through), the checks above apply to the
operations of both, each instance judged by its own /status where a check uses it
(older timeline than seen, the read hold), plus what only several instances allow:

- dual-primary across instances: the write-order rule between writes of different
  instances. A write acknowledged through one instance by node A and sent after a
  write through the other instance had been acknowledged by node B (another node on
  the same timeline, or a newer timeline): for a while both nodes took writes through
  the proxies. Writes already in flight when the other instance switched are not
  counted, as with one instance. Windows are reported apart from the one-instance kind.
- off the published primary: a write through an instance, sent after its /status
  showed primary P published at epoch E, that landed on a node never published at
  epoch E or later (from any instance's /status): it went around the agreement.
- while cut off: a write through an instance whose whole life (sent .. acknowledged)
  lies inside a span where that instance's /status said it was cut off from etcd (at
  the span's start and at its end, no sample in between saying otherwise). A write
  sent while cut off may wait (`failover_hold_ms`) and go through once the instance is
  back; only one acknowledged before the instance said it was back is judged.
- crashes, panics and file descriptor growth per instance.

With `--engine mariadb` (run["engine"] == "mariadb") there are no LSNs, timelines or
causal tokens. Every acknowledged write carries instead the server that took it and
that server's binlog state just before its COMMIT (`@@gtid_binlog_state`, read inside
the transaction: per originating server, the last GTID the history it extends holds),
then the GTID it got (`@@last_gtid`: domain-server_id-seqno) and whether semi-sync was
on there right after. A write's own history is that state plus its own GTID. The rules:

- lost: acknowledged, absent from the final primary. `diverged_branch` when the
  surviving history provably lacks the write: some surviving acknowledged write with a
  higher seqno has a history whose entry for the lost write's server is below the
  lost write's seqno (in gtid_strict_mode a server's GTIDs only grow within one
  history, so that history does not hold it), or the final primary's own
  `@@gtid_binlog_state` has that server's last GTID below it: written on a branch that
  was abandoned at a failover. A lost write whose GTID is unknown (the session died right after the
  COMMIT's OK) is `diverged_branch` if its history held an earlier write of the same
  server that is `diverged_branch` (the server neither rebuilt nor seen down between
  the two). `unexplained` otherwise (lost on the surviving history, or no evidence). Async:
  `diverged_branch` reported; `--sync` (semi-sync): it fails too, except
  `split_brain_window` (taken by the old primary during the split-brain fault) and
  `semi_sync_off` (the primary said right after the commit that semi-sync had fallen
  back to asynchronous, as MariaDB does after rpl_semi_sync_master_timeout: reported
  apart). `unexplained` always fails.
- phantoms, failed_present: as for PostgreSQL.
- write order (dual primary / stale primary): if write y was acknowledged before write
  z was sent and y survives, the history of the server that took z must hold y: its
  binlog state's entry for y's server must be at least y's seqno. Violations are
  merged into windows.
- not the primary: a write acknowledged by a server whose own state (the harness's
  samples over its Unix socket) said it was replicating or read-only from before the
  write was sent until after it was acknowledged.
- read-your-writes: a write acknowledged on an rw session and read back on the same
  session (session pooling: the same server connection) must be seen.
- crashes, panics, file descriptors; with two instances the coordination rules above
  (published primary, cut off from etcd) and the write-order rule across instances.
Dropped for MariaDB: LSN fork placement, timelines ("older timeline than seen"),
causal tokens and the stale-read hold.
"""

import bisect

from .common import lsn_int

NEAR_FORK = 1 << 20  # bytes
SOLE = "switchyard"  # the instance name of operations from a one-instance run (no `sy` tag)


def inst(o):
    return o.get("sy", SOLE)


def _key_error(op):
    if op.get("st"):
        return op["st"]
    msg = (op.get("err") or "").lower()
    for needle, key in (("no answer within", "timeout"), ("connect timeout", "connect timeout"),
                        ("connection lost", "connection lost"), ("refused", "connection refused"),
                        ("errno 111", "connection refused"),
                        ("reset", "connection reset")):
        if needle in msg:
            return key
    return "other: " + msg[:40]


class Check:
    def __init__(self, run):
        """run: dict with ops, faults, truth, final, node_by_addr, sync, proxy, load,
        t_start, t_end, fd_bound, gate_stale_reads."""
        self.r = run
        self.ops = run["ops"]
        self.nodes = run["node_by_addr"]
        self.writes = [o for o in self.ops if o["k"] in ("w", "raw_w")]
        self.acked = [o for o in self.writes if o.get("o") == "ack"]
        self.status = sorted((o for o in self.ops if o["k"] == "st"), key=lambda o: o.get("te", o["t"]))
        # Each instance's own /status samples (one instance: all of them).
        self.status_by = {}
        for st in self.status:
            self.status_by.setdefault(inst(st), []).append(st)
        # Older runs' checker_input.json has one "proxy".
        self.proxies = run.get("proxies") or [dict(run["proxy"], name=SOLE)]
        self.multi = len(self.proxies) > 1
        self.my = run.get("engine") == "mariadb"
        self.result = {"violations": [], "info": {}}

    def node_name(self, addr):
        return self.nodes.get(addr, addr)

    def violation(self, check, count, detail=None):
        if count:
            self.result["violations"].append({"check": check, "count": count, "detail": detail})

    # ------------------------------------------------------------------------------------
    def run(self):
        res = self.result
        res["writes"] = self.check_writes()
        res["order"] = self.my_check_order() if self.my else self.check_order()
        if self.multi or any("co" in st for st in self.status):
            res["coordination"] = self.check_coordination()
        res["reads"] = self.my_check_reads() if self.my else self.check_reads()
        res["faults"] = self.recovery()  # before errors: sets how long each fault lasted
        res["errors"] = self.errors_by_sqlstate()
        res["proxies"] = self.check_proxy()
        res["proxy"] = res["proxies"][0]
        res["passed"] = not res["violations"]
        return res

    # ---- writes ------------------------------------------------------------------------
    def check_writes(self):
        final = self.r["final"]
        out = {}
        for table, kind in (("chaos_writes", "w"), ("chaos_raw", "raw_w")):
            ops = [o for o in self.writes if o["k"] == kind]
            present = final["tables"].get(table, set())
            sent = {o["id"] for o in ops}
            acked = [o for o in ops if o["o"] == "ack"]
            failed = [o for o in ops if o["o"] == "fail"]
            unknown = [o for o in ops if o["o"] == "unk"]
            lost = [o for o in acked if o["id"] not in present]
            phantoms = sorted(present - sent)
            failed_present = [o for o in failed if o["id"] in present]
            out[table] = {
                "sent": len(ops), "acknowledged": len(acked), "failed": len(failed), "unknown": len(unknown),
                "unknown_committed": sum(1 for o in unknown if o["id"] in present),
                "present_final": len(present),
                "lost": self.my_classify_losses(lost) if self.my else self.classify_losses(lost),
                "phantoms": len(phantoms), "phantom_ids": phantoms[:20],
                "failed_present": len(failed_present),
                "failed_present_samples": [_brief(o) for o in failed_present[:5]],
            }
        lost_all = out["chaos_writes"]["lost"]["items"] + out["chaos_raw"]["lost"]["items"]
        failing = [l for l in lost_all if l["failing"]]
        self.violation("acknowledged writes lost", len(failing), failing[:10])
        self.violation("phantom writes (present, never sent)",
                       out["chaos_writes"]["phantoms"] + out["chaos_raw"]["phantoms"],
                       out["chaos_writes"]["phantom_ids"] + out["chaos_raw"]["phantom_ids"])
        fp = out["chaos_writes"]["failed_present"] + out["chaos_raw"]["failed_present"]
        self.violation("writes reported failed but committed", fp,
                       out["chaos_writes"]["failed_present_samples"] + out["chaos_raw"]["failed_present_samples"])
        if self.my:
            not_primary = self.my_not_primary()
            self.violation("writes taken by a node that was not the primary (replicating or read-only by its own "
                           "state)", len(not_primary), not_primary[:5])
            out["not_primary"] = len(not_primary)
            out["semi_sync_off_acks"] = sum(1 for o in self.acked if o.get("semi") == "OFF") if self.r["sync"] else None
            return out
        on_standby = [o for o in self.acked if o.get("rec")]
        self.violation("writes taken by a node in recovery", len(on_standby), [_brief(o) for o in on_standby[:5]])
        return out

    def classify_losses(self, lost):
        final = self.r["final"]
        hist = final.get("history", {})
        final_tl = final.get("timeline")
        sync = self.r["sync"]
        items, counts = [], {}
        for o in lost:
            tl, lsn = o.get("tl"), lsn_int(o.get("lsn"))
            if tl is None or lsn is None:
                cat = "unexplained"
            elif tl == final_tl:
                cat = "unexplained"
            elif tl in hist:
                fork = hist[tl]
                cat = "after_fork" if lsn >= fork else ("near_fork" if fork - lsn <= NEAR_FORK else "unexplained")
            else:
                cat = "abandoned_timeline"
            window = self.split_brain_window(o)
            if cat == "unexplained":
                failing = True
            elif sync:
                failing = window is None
            else:
                failing = False
            if window is not None and cat != "unexplained":
                cat = "split_brain_window"
            counts[cat] = counts.get(cat, 0) + 1
            items.append({**_brief(o), "category": cat, "failing": failing})
        return {"total": len(lost), "by_category": counts, "items": items}

    # ---- MariaDB ---------------------------------------------------------------------------
    def my_surviving(self):
        """Acknowledged writes with GTID facts that are in the final tables."""
        if not hasattr(self, "_my_surv"):
            tables = self.r["final"]["tables"]
            present = {"w": tables.get("chaos_writes", set()), "raw_w": tables.get("chaos_raw", set())}
            self._my_surv = [o for o in self.acked if o.get("gtid") and o["id"] in present[o["k"]]]
        return self._my_surv

    @staticmethod
    def my_history(o):
        """{(domain, server): seqno} of the history write `o` ends: the binlog state
        before its commit plus its own GTID."""
        st = _gtid_state(o.get("bst"))
        if o.get("gtid"):
            d, srv, n = _gtid(o["gtid"])
            st[(d, srv)] = max(st.get((d, srv), -1), n)
        return st

    def my_classify_losses(self, lost):
        """See the module docstring (MariaDB)."""
        sync = self.r["sync"]
        # For each (domain, server): surviving writes by seqno, with the suffix minimum of
        # their binlog state's entry for that server.
        surv = []
        for o in self.my_surviving():
            d, _, n = _gtid(o["gtid"])
            surv.append((d, n, self.my_history(o)))
        surv.sort(key=lambda x: (x[0], x[1]))
        keys = {(d, srv) for d, _, st in surv for (dd, srv) in st if dd == d}
        suffix = {}
        for (d, srv) in keys | {(_gtid(o["gtid"])[0], _gtid(o["gtid"])[1]) for o in lost if o.get("gtid")}:
            rows = [(n, st.get((d, srv), -1)) for dd, n, st in surv if dd == d]
            seqs = [n for n, _ in rows]
            mins = [0] * len(rows)
            m = None
            for i in range(len(rows) - 1, -1, -1):
                m = rows[i][1] if m is None else min(m, rows[i][1])
                mins[i] = m
            suffix[(d, srv)] = (seqs, mins)
        cats = {}
        # The final primary's own history: its last GTID of each server.
        final_state = _gtid_state(self.r["final"].get("gtid_binlog_state"))
        for o in lost:
            if o.get("gtid"):
                d, srv, n = _gtid(o["gtid"])
                seqs, mins = suffix.get((d, srv), ([], []))
                i = bisect.bisect_right(seqs, n)
                if (i < len(seqs) and mins[i] < n) or \
                        (self.r["final"].get("gtid_binlog_state") is not None and final_state.get((d, srv), -1) < n):
                    cats[id(o)] = "diverged_branch"
        # Without a GTID: an earlier diverged write of the same server in its history.
        diverged = sorted((o for o in lost if cats.get(id(o)) == "diverged_branch"), key=lambda o: o["e"])
        for o in lost:
            if o.get("gtid") or o.get("sid") is None or "bst" not in o:
                continue
            hist = _gtid_state(o.get("bst"))
            for dv in diverged:
                if dv["e"] >= o["s"]:
                    break
                d, srv, n = _gtid(dv["gtid"])
                if dv.get("sid") == o["sid"] and srv == o["sid"] and hist.get((d, srv), -1) >= n \
                        and not self.my_interrupted(self.node_name(o.get("node")), dv["e"], o["s"]):
                    cats[id(o)] = "diverged_branch"
                    break
        items, counts = [], {}
        for o in lost:
            cat = cats.get(id(o), "unexplained")
            window = self.split_brain_window(o)
            if cat == "unexplained":
                failing = True
            elif sync:
                failing = window is None and o.get("semi") != "OFF"
            else:
                failing = False
            if window is not None and cat != "unexplained":
                cat = "split_brain_window"
            elif sync and cat != "unexplained" and o.get("semi") == "OFF":
                cat = "semi_sync_off"
            counts[cat] = counts.get(cat, 0) + 1
            items.append({**_brief(o), "category": cat, "failing": failing})
        return {"total": len(lost), "by_category": counts, "items": items}

    def my_interrupted(self, node, t0, t1):
        """Was `node` rebuilt, or seen down by the harness, between t0 and t1?"""
        for rb in self.r.get("rebuilds") or []:
            if rb["node"] == node and t0 <= rb["t"] + rb.get("seconds", 0) and rb["t"] <= t1:
                return True
        return any(s["node"] == node and not s.get("up") and t0 <= s["t"] <= t1 for s in self.r.get("truth") or [])

    def my_check_order(self):
        """The write-order rule on GTIDs (module docstring): a write z sent after a
        surviving write y was acknowledged must be taken on a history that holds y."""
        surv = sorted(self.my_surviving(), key=lambda o: o["e"])
        ends = [o["e"] for o in surv]
        # Prefix maximum of the surviving writes' seqno per (domain, server), by end time.
        prefix, best = [], {}
        for o in surv:
            d, srv, n = _gtid(o["gtid"])
            if n > best.get((d, srv), -1):
                best = dict(best)
                best[(d, srv)] = n
            prefix.append(best)
        per = {}
        for i in {inst(o) for o in surv}:
            mine = [o for o in surv if inst(o) == i]
            pe, pb, b = [], [], {}
            for o in mine:
                d, srv, n = _gtid(o["gtid"])
                if n > b.get((d, srv), -1):
                    b = dict(b)
                    b[(d, srv)] = n
                pe.append(o["e"])
                pb.append(b)
            per[i] = (pe, pb)

        def lacks(z, ends_, prefix_):
            k = bisect.bisect_left(ends_, z["s"]) - 1
            if k < 0:
                return None
            st = _gtid_state(z.get("bst"))
            return [f"{d}-{srv}-{n}" for (d, srv), n in prefix_[k].items() if st.get((d, srv), -1) < n] or None

        bad = []
        for z in self.acked:
            if "bst" not in z:
                continue
            missing = lacks(z, ends, prefix)
            if missing:
                bad.append((z, missing))
        windows = []
        for z, missing in sorted(bad, key=lambda x: x[0]["s"]):
            against = {i for i, (pe, pb) in per.items() if lacks(z, pe, pb)}
            if windows and z["s"] <= windows[-1]["end"] + 1.0:
                w = windows[-1]
                w["end"] = max(w["end"], z["e"])
                w["writes"] += 1
                w["nodes"].add(self.node_name(z["node"]))
            else:
                w = {"start": z["s"], "end": z["e"], "writes": 1, "nodes": {self.node_name(z["node"])},
                     "first": {**_brief(z), "lacks": missing[:3]}, "instances": set(), "across": False}
                windows.append(w)
            w["instances"] |= against | {inst(z)}
            w["across"] = w["across"] or bool(against - {inst(z)})
        for w in windows:
            w["nodes"] = sorted(w["nodes"])
            w["start_rel"] = round(w["start"] - self.r["t_start"], 3)
            w["duration_s"] = round(w["end"] - w["start"], 3)
            w["instances"] = sorted(w["instances"])
            if not self.multi:
                del w["instances"], w["across"]
        same = [w for w in windows if not w.get("across")]
        across = [w for w in windows if w.get("across")]
        self.violation("dual-primary windows (a write taken on a history lacking an earlier acknowledged write)",
                       len(same), same[:10])
        self.violation("dual-primary windows across instances (a write through one instance taken on a history "
                       "lacking a write acknowledged through the other)", len(across), across[:10])
        per_node = {}
        for o in self.acked:
            k = self.node_name(o.get("node")) if o.get("node") else "(answer lost after the OK)"
            per_node[k] = per_node.get(k, 0) + 1
        out = {"dual_primary_windows": windows, "older_timeline_writes": None, "acknowledged_by_node": per_node,
               "without_gtid": sum(1 for o in self.acked if not o.get("gtid")),
               "without_facts": sum(1 for o in self.acked if "bst" not in o)}
        if self.multi:
            out["across_instance_windows"] = len(across)
            out["acknowledged_by_instance"] = {}
            for o in self.acked:
                k = inst(o)
                out["acknowledged_by_instance"][k] = out["acknowledged_by_instance"].get(k, 0) + 1
        return out

    NOT_PRIMARY_SLACK_S = 3.0

    def my_not_primary(self):
        """Acknowledged writes whose server said, in the harness's samples, that it was
        replicating or read-only from before the write was sent until after it was
        acknowledged. Samples are recorded on change (and every 5 s) about every 0.5 s: a
        state recorded at t held from t until some time after the previous sample
        before the next change record, so that next record must come more than
        NOT_PRIMARY_SLACK_S after the acknowledgement."""
        truth = {}
        for s in sorted(self.r.get("truth") or [], key=lambda x: x["t"]):
            truth.setdefault(s["node"], []).append(s)
        times = {n: [s["t"] for s in ss] for n, ss in truth.items()}
        bad = []
        for o in self.acked:
            name = self.node_name(o.get("node"))
            ss = truth.get(name)
            if not ss:
                continue
            k = bisect.bisect_right(times[name], o["s"]) - 1
            if k < 0:
                continue
            a = ss[k]
            if not a.get("up") or a.get("primary") or a.get("primary") is None:
                continue
            # The next record showing anything else.
            nxt = next((s for s in ss[k + 1:] if not s.get("up") or s.get("primary")), None)
            if nxt is not None and nxt["t"] - self.NOT_PRIMARY_SLACK_S <= o["e"]:
                continue
            if nxt is None and ss[-1]["t"] < o["e"]:
                continue  # no sample after the write
            bad.append({**_brief(o), "node_state": {k2: a.get(k2) for k2 in ("ro", "src", "io", "sql")},
                        "state_since_rel": round(a["t"] - self.r["t_start"], 3)})
        return bad

    def my_check_reads(self):
        """Read-your-writes on the same rw session (session pooling: one server
        connection per client). No causal tokens on MySQL."""
        present = self.r["final"]["tables"].get("chaos_raw", set())
        reads = [o for o in self.ops if o["k"] == "raw_own"]
        ok = [o for o in reads if o["o"] == "ack"]
        misses = [o for o in ok if o.get("n") == 0]
        by_node = {}
        for o in ok:
            k = self.node_name(o.get("node"))
            by_node[k] = by_node.get(k, 0) + 1
        ro = [o for o in self.ops if o["k"] == "r"]
        ro_by = {}
        for o in ro:
            if o.get("o") == "ack":
                k = self.node_name(o.get("node"))
                ro_by[k] = ro_by.get(k, 0) + 1
        out = {"raw_own": {"what": "same rw session (read-your-writes)", "reads": len(reads), "answered": len(ok),
                           "errors": len(reads) - len(ok), "stale": len(misses), "excused_no_primary": 0,
                           "missed_lost_write": sum(1 for o in misses if o["id"] not in present),
                           "served_by": by_node, "stale_samples": [_brief(o) for o in misses[:5]]},
               "ro_probe": {"what": "ro probe (availability only)", "reads": len(ro),
                            "answered": sum(1 for o in ro if o.get("o") == "ack"),
                            "errors": sum(1 for o in ro if o.get("o") != "ack"), "served_by": ro_by}}
        self.violation("read-your-writes misses (same rw session)", len(misses), [_brief(o) for o in misses[:10]])
        return out

    def split_brain_window(self, o):
        """The split-brain fault during which old primary `o['node']` took this write
        after a standby had been promoted, if any."""
        name = self.node_name(o.get("node"))
        for f in self.r["faults"]:
            if f["kind"] != "split_brain" or not f.get("t_inject"):
                continue
            if f["detail"].get("old_primary") == name and f["t_inject"] <= o["e"] <= (f["t_heal"] or 0) + 1:
                return f
        return None

    # ---- which node took writes, in what order ----------------------------------------------
    @staticmethod
    def _order_prefix(writes):
        """For writes sorted by end: (ends, prefix), prefix[i] = (newest timeline among
        writes 0..i, the nodes that took writes on it)."""
        ends, prefix = [], []
        best_tl, nodes = -1, set()
        for o in writes:
            if o["tl"] > best_tl:
                best_tl, nodes = o["tl"], {o["node"]}
            elif o["tl"] == best_tl:
                nodes = nodes | {o["node"]}
            ends.append(o["e"])
            prefix.append((best_tl, nodes))
        return ends, prefix

    @staticmethod
    def _out_of_order(y, ends, prefix):
        """Was a write acknowledged (in `prefix`) before y was sent, on a newer timeline
        or on another node of y's timeline?"""
        i = bisect.bisect_left(ends, y["s"]) - 1
        if i < 0:
            return False
        tl, ns = prefix[i]
        return y["tl"] < tl or (y["tl"] == tl and bool(ns - {y["node"]}))

    def check_order(self):
        acked = [o for o in self.acked if o.get("tl") is not None]
        by_end = sorted(acked, key=lambda o: o["e"])
        ends, prefix = self._order_prefix(by_end)
        # The same rule against each instance's writes alone: a write out of order
        # against the other instance's writes makes a window across instances. (Out of
        # order against all writes = out of order against some instance's.)
        per = {i: self._order_prefix([o for o in by_end if inst(o) == i]) for i in {inst(o) for o in by_end}}
        bad = []
        for y in acked:
            if self._out_of_order(y, ends, prefix):
                bad.append(y)
        windows = []
        for y in sorted(bad, key=lambda o: o["s"]):
            against = {i for i, (e, p) in per.items() if self._out_of_order(y, e, p)}
            if windows and y["s"] <= windows[-1]["end"] + 1.0:
                w = windows[-1]
                w["end"] = max(w["end"], y["e"])
                w["writes"] += 1
                w["nodes"].add(self.node_name(y["node"]))
            else:
                w = {"start": y["s"], "end": y["e"], "writes": 1, "nodes": {self.node_name(y["node"])},
                     "instances": set(), "across": False}
                windows.append(w)
            w["instances"] |= against | {inst(y)}
            w["across"] = w["across"] or bool(against - {inst(y)})
        for w in windows:
            w["nodes"] = sorted(w["nodes"])
            w["start_rel"] = round(w["start"] - self.r["t_start"], 3)
            w["duration_s"] = round(w["end"] - w["start"], 3)
            w["instances"] = sorted(w["instances"])
            if not self.multi:
                del w["instances"], w["across"]
        self.violation("dual-primary windows (writes out of timeline order)",
                       sum(1 for w in windows if not w.get("across")), [w for w in windows if not w.get("across")][:10])
        across = [w for w in windows if w.get("across")]
        self.violation("dual-primary windows across instances (a write through one instance taken by another "
                       "node after a write through the other was acknowledged)", len(across), across[:10])

        # Writes sent after Switchyard already showed a primary on a newer timeline
        # (each instance by what its own /status showed).
        seen = {}
        for i, samples in self.status_by.items():
            seen_t, seen_tl = [], []
            newest = -1
            for st in samples:
                for n in st.get("nodes") or []:
                    name, health, role, tl = n
                    if role == "primary" and health == "up" and tl is not None and tl > newest:
                        newest = tl
                        seen_t.append(st.get("te", st["t"]))
                        seen_tl.append(tl)
            seen[i] = (seen_t, seen_tl)
        older = []
        for y in acked:
            seen_t, seen_tl = seen.get(inst(y), ([], []))
            i = bisect.bisect_left(seen_t, y["s"]) - 1
            if i >= 0 and y["tl"] < seen_tl[i]:
                older.append({**_brief(y), "newer_timeline_seen": seen_tl[i],
                              "seen_before_s": round(y["s"] - seen_t[i], 3)})
        self.violation("writes to a primary on an older timeline than Switchyard had seen", len(older), older[:10])
        per_node = {}
        for o in acked:
            k = f"{self.node_name(o['node'])} (timeline {o['tl']})"
            per_node[k] = per_node.get(k, 0) + 1
        out = {"dual_primary_windows": windows, "older_timeline_writes": len(older),
               "acknowledged_by_node": per_node}
        if self.multi:
            out["across_instance_windows"] = len(across)
            out["acknowledged_by_instance"] = {}
            for o in acked:
                k = inst(o)
                out["acknowledged_by_instance"][k] = out["acknowledged_by_instance"].get(k, 0) + 1
        return out

    # ---- coordination (several instances) ----------------------------------------------------
    def cut_off_spans(self, samples):
        """[(start, end)] during which an instance's /status said it was cut off from
        etcd, bracketed conservatively: from the answer of the first sample saying so
        to the request of the last poll still saying so (`tp` of the next sample)."""
        spans, start, last = [], None, None
        for st in sorted(samples, key=lambda o: o["t"]):
            cut = not st.get("err") and bool((st.get("co") or {}).get("cut"))
            if cut and start is None:
                start = st.get("te", st["t"])
            elif not cut and start is not None:
                end = st.get("tp") if st.get("tp") is not None else last.get("te", last["t"])
                spans.append((start, max(start, end)))
                start = None
            last = st
        if start is not None:
            spans.append((start, max(start, last.get("te", last["t"]))))
        return spans

    def check_coordination(self):
        acked = [o for o in self.acked if o.get("node")]
        out = {"instances": {}}
        # Every publication any instance showed: epoch -> nodes (one, unless etcd lied).
        published = {}
        for st in self.status:
            co = st.get("co") or {}
            if co.get("pub") and co.get("ep") is not None:
                published.setdefault(co["ep"], set()).add(co["pub"])
        off_published, while_cut = [], []
        for i, samples in self.status_by.items():
            seen = [(st.get("te", st["t"]), st["co"]) for st in samples
                    if not st.get("err") and st.get("co") and st["co"].get("ep") is not None]
            seen_t = [t for t, _ in seen]
            mine = [o for o in acked if inst(o) == i]
            for y in mine:
                k = bisect.bisect_left(seen_t, y["s"]) - 1
                if k < 0:
                    continue
                co = seen[k][1]
                allowed = {n for ep, ns in published.items() if ep >= co["ep"] for n in ns}
                if self.node_name(y["node"]) not in allowed:
                    off_published.append({**_brief(y), "sy": i, "published_seen": co.get("pub"),
                                          "epoch_seen": co["ep"], "seen_before_s": round(y["s"] - seen[k][0], 3)})
            spans = self.cut_off_spans(samples)
            starts = [a for a, _ in spans]
            for y in mine:
                k = bisect.bisect_right(starts, y["s"]) - 1
                if k >= 0 and y["e"] <= spans[k][1]:
                    while_cut.append({**_brief(y), "sy": i, "cut_off_from_rel": round(spans[k][0] - self.r["t_start"], 3),
                                      "cut_off_until_rel": round(spans[k][1] - self.r["t_start"], 3)})
            leaders = []
            for st in samples:
                ld = (st.get("co") or {}).get("leader")
                if ld and (not leaders or leaders[-1] != ld):
                    leaders.append(ld)
            out["instances"][i] = {"cut_off_spans": len(spans),
                                   "cut_off_s": round(sum(b - a for a, b in spans), 2),
                                   "leaders_seen": leaders,
                                   "max_epoch": max((co["ep"] for _, co in seen), default=None)}
        out["publications"] = {str(ep): sorted(ns) for ep, ns in sorted(published.items())}
        out["off_published"] = len(off_published)
        out["while_cut_off"] = len(while_cut)
        self.violation("writes through an instance to a node not published as primary at the epoch it had seen",
                       len(off_published), off_published[:10])
        self.violation("writes acknowledged through an instance while its /status said it was cut off from etcd",
                       len(while_cut), while_cut[:10])
        return out

    # ---- reads ---------------------------------------------------------------------------------
    def check_reads(self):
        present = self.r["final"]["tables"].get("chaos_raw", set())
        acked_raw = {o["id"] for o in self.ops if o["k"] == "raw_w" and o["o"] == "ack"}
        out = {}
        stale_all = []
        for kind, label in (("raw_own", "same connection, rw split (read-your-writes)"),
                            ("raw_causal", "other connection, ro + causal token")):
            reads = [o for o in self.ops if o["k"] == kind]
            ok = [o for o in reads if o["o"] == "ack"]
            misses = [o for o in ok if o.get("n") == 0 and o["id"] in acked_raw]
            lost_write = [o for o in misses if o["id"] not in present]
            no_primary = [o for o in misses if o["id"] in present and self.held_out(o)]
            stale = [o for o in misses if o["id"] in present and not self.held_out(o)]
            by_node = {}
            for o in ok:
                k = self.node_name(o.get("node"))
                by_node[k] = by_node.get(k, 0) + 1
            out[kind] = {"what": label, "reads": len(reads), "answered": len(ok),
                         "errors": len(reads) - len(ok), "stale": len(stale),
                         "excused_no_primary": len(no_primary), "missed_lost_write": len(lost_write),
                         "served_by": by_node, "stale_samples": [_brief(o) for o in stale[:5]]}
            stale_all += stale
        if self.r.get("gate_stale_reads", True):
            self.violation("stale reads", len(stale_all), [_brief(o) for o in stale_all[:10]])
        else:
            self.result["info"]["stale_reads_not_gating"] = len(stale_all)
        return out

    def held_out(self, o):
        """May this read have missed its own write by the documented rule? Only after the
        cluster had no primary for the whole read hold: Switchyard holds such a read for
        `failover_hold_ms` from the primary's loss, then lets the standbys that are left
        serve it. The loss came no earlier than the last /status sample that showed a
        primary, so a read answered less than the hold after that sample was served
        inside the hold and is not excused (a 20 ms no-primary window no sample caught,
        as in seed 5's 30-minute run, counts as stale)."""
        if not self.no_primary_around(o):
            return False
        samples = self.status_by.get(inst(o), [])
        seen = [s["t"] for s in samples if s.get("primary") and not s.get("err") and s["t"] <= o["e"]]
        last_primary = seen[-1] if seen else self.r["t_start"]
        return o["e"] - last_primary >= self.r.get("read_hold_s", 0)

    def no_primary_around(self, o, before=1.0):
        """Did the /status of the instance that served read `o` show no primary (or not
        answer) around it?"""
        samples = self.status_by.get(inst(o), [])
        ts = [s.get("te", s["t"]) for s in samples]
        i = max(0, bisect.bisect_left(ts, o["s"] - before) - 1)
        for st in samples[i:]:
            t = st.get("te", st["t"])
            if t > o["e"]:
                break
            if st.get("err") or not st.get("primary"):
                return True
        return False

    # ---- errors --------------------------------------------------------------------------------
    def fault_context(self, o):
        """in_flight: a fault was injected while the op ran; during: sent while a fault
        was in force or being recovered from (until writes were back, or heal + 10 s);
        outside: neither."""
        faults = [f for f in self.r["faults"] if f.get("t_inject") is not None]
        for f in faults if o["k"] != "c" else ():  # a failed connection attempt carried no transaction
            if o["s"] < (f.get("t_struck") or f["t_inject"]) and o["e"] >= f["t_inject"]:
                return "in_flight", f
        for f in reversed(faults):  # the latest fault injected before the op was sent
            ti = f["t_inject"]
            end = max(f.get("t_heal") or ti, f.get("_back_until") or 0) + 10.0
            if ti <= o["s"] <= end:
                return "during", f
        return "outside", None

    def errors_by_sqlstate(self):
        table = {}
        outside = []
        for o in self.ops:
            if o["k"] in ("st", "ev") or o.get("o") == "ack":
                continue
            group = {"w": "write", "raw_w": "write", "c": "connect " + o.get("ep", ""), "r": "read ro",
                     "raw_own": "read split", "raw_causal": "read ro+token"}.get(o["k"], "token show/set")
            ctx, f = self.fault_context(o)
            key = (group, _key_error(o), o.get("o"))
            row = table.setdefault(key, {"op": group, "sqlstate": key[1], "outcome": o.get("o"),
                                         "in_flight": 0, "during": 0, "outside": 0,
                                         "on_fault_node": 0, "sample": (o.get("err") or "")[:140]})
            row[ctx] += 1
            if f is not None and self._names_node(o, f):
                row["on_fault_node"] += 1
            if ctx == "outside":
                outside.append(_brief(o))
        rows = sorted(table.values(), key=lambda r: -(r["in_flight"] + r["during"] + r["outside"]))
        return {"rows": rows, "outside_samples": outside[:10], "outside_total": len(outside)}

    def _names_node(self, o, f):
        msg = o.get("err") or ""
        return any(f'"{n}"' in msg or f" {n} " in msg for n in f.get("affects", []))

    # ---- recovery ------------------------------------------------------------------------------
    def recovery(self):
        faults = [f for f in self.r["faults"] if f.get("t_inject")]
        t_end = self.r["t_end"]
        # Writes: the insert clients (connection failures included). Reads: the ro probe
        # and the causal reads (the read-after-write pairs stop at a failed write, so
        # they alone would miss read outages).
        wops = [o for o in self.ops if o["k"] == "w" or (o["k"] == "c" and o.get("wk", "").startswith("w"))]
        rops = [o for o in self.ops if o["k"] in ("r", "raw_causal")
                or (o["k"] == "c" and o.get("ep") == "ro")]
        timeout = self.r.get("op_timeout", 10)
        out = []
        for i, f in enumerate(faults):
            ti = f["t_inject"]
            until = faults[i + 1]["t_inject"] if i + 1 < len(faults) else t_end
            row = {"kind": f["kind"], "target": f.get("target"), "at_s": round(ti - self.r["t_start"], 2),
                   "hold_s": f["hold"], "heal_s": round((f.get("t_heal") or ti) - ti, 2),
                   "detail": f.get("detail"), "error": f.get("error")}
            for label, ops in (("writes", wops), ("reads", rops)):
                row[label], back = self._outage(ti, until, ops, timeout)
                if label == "writes" and back is not None:
                    f["_back_until"] = back
            if self.multi:
                # An instance's fault stalls its own clients; the table's columns mix both.
                row["writes_by_instance"] = {
                    name: self._outage(ti, until, [o for o in wops if inst(o) == name], timeout)[0]
                    for name in sorted({inst(o) for o in wops})}
            out.append(row)
        return out

    @staticmethod
    def _outage(ti, until, ops, timeout):
        """Errors, time until back and longest stall of `ops` for a fault injected at
        `ti`, up to the next fault (`until`); and when they were back (None: no error,
        or not back before the next fault)."""
        # In force at the injection or sent after it, and over before the next fault
        # (what is in flight then belongs to that one).
        win = [o for o in ops if ti - timeout <= o["s"] and ti <= o["e"] < until]
        errs = [o for o in win if o.get("o") != "ack"]
        oks = sorted(o["e"] for o in win if o.get("o") == "ack")
        # The longest time without any success, from the injection on: an outage
        # clients waited through (Switchyard holds new transactions up to
        # connect_timeout_ms while there is no primary) shows here, not as errors.
        stall, prev = 0.0, ti
        for t in oks:
            stall, prev = max(stall, t - prev), t
        stall = max(stall, (until - prev) if not oks else 0.0)
        if not errs:
            return {"errors": 0, "back_s": 0.0, "stall_s": round(stall, 2)}, None
        last_err = max(o["e"] for o in errs)
        back = min((o["e"] for o in win if o.get("o") == "ack" and o["s"] >= last_err), default=None)
        first_err = min(o["e"] for o in errs)
        return {"errors": len(errs), "first_error_s": round(first_err - ti, 2),
                "back_s": None if back is None else round(back - ti, 2), "stall_s": round(stall, 2)}, back

    # ---- Switchyard itself -----------------------------------------------------------------------
    def check_proxy(self):
        """Per instance: exits the harness did not cause, panics, open files idle at the
        end against idle at the start."""
        crashes, panics, out = [], [], []
        for p in self.proxies:
            name = p.get("name", SOLE)
            crashes += [dict(i, sy=name) if self.multi else i
                        for i in p["incarnations"] if i.get("ended_by") == "crash"]
            panics += [f"{name}: {x}" if self.multi else x for x in p["panics"]]
            base, end = p.get("idle_start") or {}, p.get("idle_end") or {}
            growth = None
            if base.get("fds") is not None and end.get("fds") is not None:
                growth = end["fds"] - base["fds"]
                if growth > self.r["fd_bound"]:
                    self.violation(f"file descriptor growth beyond {self.r['fd_bound']}"
                                   + (f" ({name})" if self.multi else ""), growth,
                                   {"idle_start": base, "idle_end": end})
            p["fd_growth"] = growth
            out.append(p)
        self.violation("Switchyard crashes (exits the harness did not cause)", len(crashes), crashes)
        self.violation("Switchyard panics in its log", len(panics), panics[:5])
        return out


def _gtid(text):
    d, s, n = str(text).split("-")
    return int(d), int(s), int(n)


def _gtid_state(text):
    """'0-1-100,0-2-120' -> {(domain, server_id): seqno}."""
    out = {}
    for part in (text or "").split(","):
        part = part.strip()
        if part:
            d, s, n = _gtid(part)
            out[(d, s)] = n
    return out


def _brief(o):
    keep = ("k", "id", "node", "tl", "lsn", "gtid", "semi", "o", "st", "err", "n", "rec", "sy")
    out = {k: o[k] for k in keep if k in o}
    out["s"] = round(o["s"], 3) if "s" in o else None
    out["e"] = round(o["e"], 3) if "e" in o else None
    return out

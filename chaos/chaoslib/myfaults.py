"""Faults for `--engine mariadb`: the same kinds and schedule as faults.py, with what
differs for MariaDB.

- Roles are the servers' own: the primary is writable and replicates from nobody;
  promotion (`Cluster.promote`) stops the IO thread, applies the relay log, then
  `STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = 0`.
- An old primary rejoins by GTID (`MASTER_USE_GTID = current_pos`); when the new
  primary answers error 1236 (it has transactions the new one lacks: diverged) it is
  rebuilt (mariadb.py). No pg_rewind.
- `--failover automatic`: Switchyard promotes, repoints the other replica, and fences an
  old primary that comes back (read-only, sessions killed), then rejoins it or reports
  it diverged (`remark` in /status). The harness only restarts processes, waits for
  that verdict, and rebuilds a node Switchyard reports diverged; if no verdict comes in
  time it rejoins the node itself (and says so).
- `disk_full_standby` fills the tmpfs holding the relay log of n3 (while it is a
  replica): its IO thread cannot write what it receives.
"""

import json
import os
import time

from .common import log
from .faults import Injector
from .mariadb import Diverged

VERDICT_TIMEOUT_S = 25.0


class MyInjector(Injector):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.verdicts = []       # {t, node, verdict, remark, action}
        self.acted_remark = {}   # node -> the remark the harness last acted on
        self.pending_old = {}    # old primaries Switchyard replaced: node -> its remark before

    # ---- Switchyard's view ------------------------------------------------------------------
    def remark(self, node):
        """The remark any instance's /status has for `node` now (None if none)."""
        for p in self.proxies:
            try:
                st = p.status(timeout=1.5)
            except Exception:
                continue
            for n in st["clusters"][0]["nodes"]:
                if n["name"] == node and n.get("remark"):
                    return n["remark"]
        return None

    def switchyard_primary(self):
        for p in self.proxies:
            try:
                return p.status(timeout=1.5)["clusters"][0].get("primary")
            except Exception:
                continue
        return None

    # ---- keeping the cluster whole --------------------------------------------------------------
    def ensure_healthy(self, timeout=15):
        self.net.heal_all()
        c = self.c
        problems = []
        if self.etcd is not None:
            problems += [f"etcd {m} does not start" for m in self.etcd.ensure_running()]
        if self.automatic:
            self.follow_promotions()
        if not c.running(c.primary):
            log(f"primary {c.primary} is not running; starting it")
            try:
                c.start(c.primary)
            except Exception as e:
                return [f"primary {c.primary} does not start: {e}"]
        for s in c.standbys():
            if not c.running(s):
                try:
                    c.start(s)
                except Exception as e:
                    log(f"{s} does not start ({str(e)[-200:]}); rebuilding it")
                    try:
                        c.rebuild(s, c.primary, why="did not start")
                    except Exception as e2:
                        return [f"{s} cannot be rebuilt: {e2}"]
        for s in c.standbys():
            try:
                self.settle(s)
            except Exception as e:
                log(f"settling {s} failed: {e}")
                problems.append(f"{s}: {str(e)[:200]}")
        missing = c.wait_streaming(c.standbys(), timeout=timeout)
        for s in missing:
            log(f"{s} does not replicate from {c.primary} after {timeout}s; rejoining it")
            try:
                self.rejoin_replica(s, why="not replicating before the next fault")
            except Exception as e:
                log(f"rejoin of {s} failed: {e}")
        if missing:
            missing = c.wait_streaming(c.standbys(), timeout=timeout)
        problems += [f"{s} not replicating" for s in missing]
        if len(self.proxies) > 1:
            problems += self.wait_agreed()
        return problems

    def settle(self, s):
        """Make replica `s` replicate from the primary, if it does not."""
        c = self.c
        p = c.nodes[c.primary]
        st = c.state(s)
        if s in self.pending_old:
            self.settle_old_primary(s, self.pending_old.pop(s))
            return
        if st is None:
            # Hung (a relay log that hit a full disk waits a minute between retries):
            # as an operator, restart it.
            log(f"{s} does not answer; restarting it")
            c.kill9(s)
            c.start(s)
            st = c.state(s)
            if st is None:
                raise RuntimeError(f"{s} does not answer after a restart")
        if st["source"] == p.addr and st["replicating"] and st["io_errno"] != 1236 and not st["sql_errno"]:
            return
        if st["source"] == p.addr and (st["io_errno"] == 1236 or st["sql_errno"]):
            # It was made a replica of the primary (by Switchyard or the harness) and
            # replication cannot go on: its history is not a prefix of the primary's.
            why = st["io_error"] if st["io_errno"] else st["sql_error"]
            log(f"{s} replicates from {c.primary} but fails: {why[:200]}; rebuilding it")
            self.verdicts.append({"t": time.time(), "node": s, "verdict": "replication failed after rejoin",
                                  "remark": self.remark(s), "action": "rebuilt", "error": why[:300]})
            c.rebuild(s, c.primary, why=f"replication failed: {why[:200]}")
            return
        if not st["replicating"]:
            # An old primary (writable, or fenced read-only by Switchyard).
            if self.automatic:
                self.settle_old_primary(s)
            else:
                c.rejoin(s, c.primary)
            return
        # Replicating from another node: repoint.
        self.rejoin_replica(s, why=f"replicated from {st['source']}")

    def rejoin_replica(self, s, why=""):
        """Repoint replica `s` to the primary from its own position; rebuild it if it has
        diverged."""
        c = self.c
        if not c.running(s):
            c.start(s)
        st = c.state(s) or {}
        mode = "slave_pos" if st.get("replicating") else "current_pos"
        c.follow(s, c.primary, mode)
        try:
            ok = c.check_replicating(s, c.primary)
            c.note("repoint", s, f"to {c.primary} ({mode})" + ("" if ok else "; not caught up within 15 s"))
            return "repointed"
        except Diverged as d:
            c.rebuild(s, c.primary, why=f"diverged ({why}): {str(d)[:200]}")
            return "rebuilt (diverged)"

    def settle_old_primary(self, node, before=None):
        """Automatic failover: an old primary that is back. Wait for Switchyard's verdict
        (it fences it, then rejoins it or reports it diverged); rebuild it if diverged;
        rejoin it as an operator if no verdict comes. Returns what happened."""
        c = self.c
        if before is None:
            before = self.acted_remark.get(node)
        deadline = time.monotonic() + VERDICT_TIMEOUT_S
        rm = None
        while time.monotonic() < deadline:
            st = c.state(node)
            p = c.nodes[c.primary]
            # Made a replica of the primary (only Switchyard does that to an old primary
            # here); a connection still "Connecting" is left to the replication checks.
            if st and st["source"] == p.addr and st["io_errno"] != 1236 and st["read_only"] and \
                    (st["io"] == "Yes" or st["io"] == "Connecting") and st["sql"] == "Yes":
                rm = self.remark(node)
                self.verdicts.append({"t": time.time(), "node": node, "verdict": "rejoined by switchyard",
                                      "remark": rm, "action": None})
                self.acted_remark[node] = rm
                c.nodes[node].read_only_at_start = True
                c.note("rejoin", node, f"as replica of {c.primary} by switchyard")
                return "switchyard rejoined"
            if st and st["source"] == p.addr and st["io_errno"] == 1236:
                break  # rejoined by Switchyard but the primary refuses it: handled below
            rm = self.remark(node)
            if rm and rm != before and rm.startswith("diverged"):
                self.verdicts.append({"t": time.time(), "node": node, "verdict": "diverged (switchyard)",
                                      "remark": rm, "action": "rebuilt"})
                self.acted_remark[node] = rm
                if st and not st["read_only"]:
                    self.verdicts[-1]["still_writable"] = True
                c.rebuild(node, c.primary, why=f"switchyard: {rm[:200]}")
                return "rebuilt (switchyard said diverged)"
            if rm and rm != before and rm.startswith("fenced, not rejoined"):
                break
            self.wait(0.3)
        # No verdict in time (or "not rejoined"): as an operator.
        rm = self.remark(node)
        verdict = "no verdict within %.0f s" % VERDICT_TIMEOUT_S if not (rm and rm != before) else rm[:200]
        log(f"{node}: switchyard's verdict: {verdict}; rejoining it as an operator")
        method = c.rejoin(node, c.primary, why="old primary, no switchyard verdict")
        self.verdicts.append({"t": time.time(), "node": node, "verdict": verdict, "remark": rm,
                              "action": f"harness {method}"})
        self.acted_remark[node] = rm
        return f"harness {method} ({verdict})"

    def follow_promotions(self):
        """Switchyard may have promoted a replica during the last fault: the primary is
        the writable node that replicates from nobody (the one that is not the old
        primary, if two are)."""
        c = self.c
        found = c.primaries()
        if not found:
            return
        if c.primary in found and len(found) == 1:
            return
        cands = [n for n in found if n != c.primary]
        if len(cands) == 1:
            new = cands[0]
        else:
            sy = self.switchyard_primary()
            new = sy if sy in cands else max(cands, key=lambda n: found[n])
        if new != c.primary:
            log(f"switchyard promoted {new}; following")
            old = c.primary
            self.pending_old[old] = self.acted_remark.get(old)
            c.adopt_primary(new, "switchyard")

    def wait_promoted(self, old, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [n for n in self.c.primaries() if n != old]
            if found:
                return found[0] if len(found) == 1 else (self.switchyard_primary() or found[0])
            self.wait(0.2)
        return None

    # ---- faults that differ -----------------------------------------------------------------------
    def _kill_primary_failover(self, f, rec):
        c = self.c
        old = c.primary
        self._mark(rec, old, [old])
        before = self.remark(old)
        c.kill9(old)
        if self.automatic:
            rec["t_struck"] = time.time()
            new = self.wait_promoted(old)
            if new is not None:
                rec["detail"]["promoted"] = new
                rec["detail"]["promoted_by"] = "switchyard"
                rec["detail"]["failover_s"] = round(time.time() - rec["t_inject"], 2)
                c.adopt_primary(new, "switchyard")
                self._healed(rec)
                self._hold(rec, f["hold"])  # the old primary stays down a while
                c.start(old)  # writable, as its my.cnf says: Switchyard must fence it
                rec["detail"]["rejoin"] = self.settle_old_primary(old, before)
                return
            log("no automatic failover within 30 s; promoting as an operator")
            rec["detail"]["promoted_by"] = "harness (no automatic failover within 30 s)"
        else:
            self._hold(rec, f["hold"])
        new, seq = c.most_caught_up(c.standbys())
        if new is None:
            raise RuntimeError("no running replica to promote")
        rec["detail"]["promoted"] = new
        rec["detail"]["promoted_received_seqno"] = seq
        c.promote(new)
        for s in c.standbys():
            if s != old:
                rec["detail"][f"repoint_{s}"] = self.rejoin_replica(s, why="after failover")
        self._healed(rec)
        rec["detail"]["rejoin"] = c.rejoin(old, new)

    def _split_brain(self, f, rec):
        """Promote a replica while the primary runs: two writable primaries. Switchyard
        (no timelines on MySQL) must refuse writes while it sees both. Healed as an
        operator: the old primary stopped and rejoined (rebuilt if it took writes the
        new one lacks), the other replica repointed (rebuilt likewise)."""
        c = self.c
        old = c.primary
        self._mark(rec, None, [old])
        new, seq = c.most_caught_up(c.standbys())
        if new is None:
            raise RuntimeError("no running replica to promote")
        rec["target"], rec["affects"] = new, [old, new]
        log(f"split_brain: promoting {new} while {old} runs")
        rec["detail"].update({"old_primary": old, "promoted": new, "promoted_received_seqno": seq})
        c.promote(new)
        rec["detail"]["t_promoted"] = time.time()
        self._hold(rec, f["hold"])
        rec["detail"]["rejoin"] = c.rejoin(old, new, why="split brain")
        for s in c.standbys():
            if s != old:
                rec["detail"][f"rejoin_{s}"] = self.rejoin_replica(s, why="split brain")
        self._healed(rec)

    def _disk_full_standby(self, f, rec):
        c = self.c
        node = next((n for n in c.nodes.values() if n.tmpfs), None)
        if node is None or node.name == c.primary:
            rec["skipped"] = "the tmpfs node is the primary now"
            log(f"fault disk_full_standby skipped: {rec['skipped']}")
            return
        self._mark(rec, node.name, [node.name])
        filler = os.path.join(node.tmpfs, "filler")
        st = os.statvfs(node.tmpfs)
        free = st.f_bavail * st.f_frsize
        fd = os.open(filler, os.O_CREAT | os.O_WRONLY, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(4096, free - 4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        rec["detail"]["filled_bytes"] = free
        try:
            self._hold(rec, f["hold"])
        finally:
            os.unlink(filler)
        if not c.running(node.name):
            rec["detail"]["restarted"] = True
            c.start(node.name)
        else:
            # MariaDB retries a write that hit a full disk once a minute, and meanwhile
            # SHOW SLAVE STATUS waits too: restart it if it does not answer, as an
            # operator would.
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and c.state(node.name, timeout=1) is None:
                self.wait(0.2)
            if c.state(node.name, timeout=1) is None:
                rec["detail"]["restarted"] = "hung after the disk was freed: kill -9 and start"
                c.kill9(node.name)
                c.start(node.name)
        self._healed(rec)

    def summary(self):
        return {"verdicts": self.verdicts}


def dumps(o):
    return json.dumps(o, default=str)

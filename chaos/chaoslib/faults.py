"""Faults: a schedule drawn from the seed, and the code that injects and heals each one.

The schedule is a list of (kind, hold, gap, pick) drawn from `random.Random(seed)`:
first the core kinds (`CORE`) once in a shuffled order, then every available kind once
in a shuffled order, again and again, so a short run exercises the core and a long one
every kind many times. Targets are
roles ("the primary", "a standby"), resolved when the fault runs against the
operator's view of the cluster (`Cluster.primary`); `pick` chooses among candidates, so
the same seed gives the same sequence of faults. (Which standby is "most caught up" at
a promotion depends on timing and can differ between two runs of a seed.)

Each fault is injected, held for `hold` seconds, healed, and followed by a quiet gap
in which the cluster converges; the record keeps the times, so the checker can
measure how long writes and reads took to come back.

With two Switchyard instances (`--instances 2`) every fault on Switchyard (kill, term,
freeze, reload) and every fault on its network (partitions from a server, lossy
link) strikes one instance, chosen from the seed by role (`inst`: 0 = the
coordination leader when the fault runs, 1 = the other one; drawn from a random stream
of its own so that the one-instance schedule of a seed stays what it was). Two kinds
exist only then: `partition_proxy_etcd` (an instance's namespace drops everything to
and from etcd) and `kill_etcd` (kill -9 of an etcd member, restarted after the hold).
Faults on the servers strike the cluster both instances share.
"""

import os
import random
import signal
import time

from .common import log

# kind: (needs network namespaces, hold range in seconds)
# (`INSTANCE_KINDS` below need two Switchyard instances and etcd.)
KINDS = {
    "kill_primary_failover": (False, (1.0, 2.5)),   # kill -9 primary, operator promotes + repoints + rejoins
    "kill_primary_restart": (False, (1.0, 4.0)),    # kill -9 primary, restart it (crash recovery)
    "kill_standby": (False, (2.0, 6.0)),
    "freeze_primary": (False, (2.0, 6.0)),          # SIGSTOP / SIGCONT
    "freeze_standby": (False, (2.0, 6.0)),
    "kill_proxy": (False, (0.3, 1.5)),              # kill -9 Switchyard, restart
    "term_proxy": (False, (0.3, 1.0)),              # SIGTERM (graceful), restart while clients retry
    "freeze_proxy": (False, (1.0, 4.0)),
    "reload_proxy": (False, (2.0, 5.0)),            # SIGHUP with a changed config, twice
    "split_brain": (False, (2.0, 6.0)),             # promote a standby while the primary runs
    "disk_full_standby": (False, (3.0, 6.0)),       # fill the standby's WAL tmpfs
    "partition_proxy_primary": (True, (2.0, 6.0)),
    "partition_proxy_standby": (True, (2.0, 6.0)),
    "partition_primary_standbys": (True, (3.0, 8.0)),
    "partition_asymmetric": (True, (2.0, 6.0)),     # proxy hears nothing from the primary
    "lossy_link": (True, (3.0, 6.0)),               # iptables random drop between proxy and a node
    "slow_link": (True, (3.0, 6.0)),                # tbf bandwidth limit on a node's egress
    "delay_link": (True, (3.0, 6.0)),               # tc netem delay (only where the kernel has netem)
    # Long enough, mostly, for the instance to give up its lease (chaos/run --lease-s,
    # 2 s by default: cut off after about 1.8 s).
    "partition_proxy_etcd": (True, (3.0, 7.0)),     # one instance cannot reach etcd
    "kill_etcd": (False, (2.0, 6.0)),               # kill -9 of an etcd member, restart
}
INSTANCE_KINDS = {"partition_proxy_etcd", "kill_etcd"}


def available_kinds(net, tmpfs_ok, only=None, exclude=(), instances=1):
    out = []
    for k, (needs_net, _) in KINDS.items():
        if k in INSTANCE_KINDS and instances < 2:
            continue
        if needs_net and net.kind != "netns":
            continue
        if k == "delay_link" and not net.netem:
            continue
        if k == "disk_full_standby" and not tmpfs_ok:
            continue
        if only and k not in only:
            continue
        if k in exclude:
            continue
        out.append(k)
    return out


# The first round draws only from these, so that a short run (a few minutes: six or
# seven faults) always exercises what the product's promises rest on; later rounds draw
# from every kind.
# With two instances the kinds only they have are core too (they are not available
# with one, so the one-instance schedule is unchanged).
CORE = ["kill_primary_failover", "split_brain", "kill_proxy", "freeze_primary", "partition_proxy_primary",
        "reload_proxy", "kill_standby", "partition_proxy_etcd", "kill_etcd"]


def schedule(seed, kinds, count=200, instances=1):
    """The fault plan for `seed`: [{kind, hold, gap, pick}] (+ `inst`, the instance a
    Switchyard fault strikes, with several instances)."""
    rng = random.Random(seed)
    # A stream of its own: drawing from `rng` would change every later draw, and so the
    # one-instance schedule of every seed.
    inst_rng = random.Random(f"instances-{seed}")
    plan = []
    first = True
    while len(plan) < count:
        order = sorted(k for k in kinds if k in CORE) if first else sorted(kinds)
        if not order:
            order = sorted(kinds)
        first = False
        rng.shuffle(order)
        for k in order:
            lo, hi = KINDS[k][1]
            plan.append({"kind": k, "hold": round(rng.uniform(lo, hi), 2), "gap": round(rng.uniform(4.0, 7.0), 2),
                         "pick": rng.random()})
            if instances > 1:
                plan[-1]["inst"] = inst_rng.randrange(instances)
    return plan[:count]


def _pick(items, p):
    items = sorted(items)
    return items[min(len(items) - 1, int(p * len(items)))] if items else None


class Injector:
    def __init__(self, cluster, proxies, net, wait, automatic=False, etcd=None):
        self.c, self.proxies, self.net = cluster, proxies, net
        self.etcd = etcd  # with several instances
        # failover = "automatic": Switchyard promotes; the harness only follows and
        # rejoins old primaries.
        self.automatic = automatic
        self.wait = wait  # wait(seconds): sleeps while watching for a Switchyard crash
        self.reload_flip = False

    def proxy_for(self, f, rec=None):
        """The instance a Switchyard fault strikes (the only one, with one). Like the
        servers' faults, by role when the fault runs: `inst` 0 is the coordination
        leader of the moment, 1 the other instance."""
        if len(self.proxies) == 1:
            return self.proxies[0]
        leader = next((v[0] for v in (p.coordination_view(timeout=1) for p in self.proxies) if v and v[0]), None)
        ordered = sorted(self.proxies, key=lambda p: p.name != leader)  # the leader first
        p = ordered[f.get("inst", 0) % len(ordered)]
        if rec is not None:
            rec["detail"]["instance_role"] = "leader" if p.name == leader else "follower"
        return p

    # ---- keeping the cluster whole between faults -------------------------------------
    def ensure_healthy(self, timeout=40):
        """Before a fault: every server running, every standby streaming from the
        primary. Repairs what an earlier fault left behind (a node that would not start
        after a rejoin gets a new base backup). Returns a list of problems left."""
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
                    log(f"{s} does not start ({str(e)[-200:]}); new base backup")
                    try:
                        c.basebackup(s, c.primary)
                        c.start(s)
                    except Exception as e2:
                        return [f"{s} cannot be rebuilt: {e2}"]
        missing = c.wait_streaming(c.standbys(), timeout=timeout)
        for s in missing:
            # Following an old timeline it cannot leave (diverged): rewind it.
            log(f"{s} is not streaming from {c.primary} after {timeout}s; rejoining it")
            try:
                c.rejoin(s, c.primary)
            except Exception as e:
                log(f"rejoin of {s} failed: {e}")
        if missing:
            missing = c.wait_streaming(c.standbys(), timeout=timeout)
        problems += [f"{s} not streaming" for s in missing]
        if len(self.proxies) > 1:
            problems += self.wait_agreed()
        return problems

    def wait_agreed(self, timeout=20.0):
        """Several instances: before the next fault, every instance in touch with etcd
        and all agreeing on the leader and the published primary (so that each fault
        starts from one agreed state and its effects are its own)."""
        deadline = time.monotonic() + timeout
        views = []
        while time.monotonic() < deadline:
            views = [p.coordination_view(timeout=1) for p in self.proxies]
            if all(v is not None and v[0] and not v[1] and v[2] for v in views) \
                    and len({(v[0], v[2], v[3]) for v in views}) == 1:
                return []
            self.wait(0.3)
        desc = "; ".join(f"{p.name}: " + ("no answer" if v is None else
                                           f"leader {v[0]}, published {v[2]} (epoch {v[3]})"
                                           + (f", cut off: {v[1]}" if v[1] else ""))
                         for p, v in zip(self.proxies, views))
        log(f"instances not agreed after {timeout:.0f}s: {desc}")
        return [f"instances not agreed: {desc}"]

    def follow_promotions(self):
        """Under automatic failover, Switchyard may have promoted a standby during the
        last fault (a kill or a freeze of the primary held long enough). The primary is
        the server on the newest timeline that is not in recovery; any other server
        still out of recovery (an old primary restarted or thawed, fenced read-only by
        Switchyard) is rejoined as its standby."""
        c = self.c
        found = c.primaries()
        if not found:
            return
        newest = max(found, key=lambda n: (found[n], n == c.primary))
        if newest != c.primary:
            log(f"switchyard promoted {newest} (timeline {found[newest]}); following")
            c.adopt_primary(newest, "switchyard")
        for name in found:
            if name != newest:
                log(f"{name} is still a primary (timeline {found[name]}, fenced by switchyard); rejoining it")
                c.rejoin(name, newest)

    def wait_promoted(self, old, timeout=30.0):
        """The standby Switchyard promoted after `old` went away, or None in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {n: tl for n, tl in self.c.primaries().items() if n != old}
            if found:
                return max(found, key=found.get)
            self.wait(0.2)
        return None

    # ---- one fault ---------------------------------------------------------------------
    def run(self, f):
        rec = {"kind": f["kind"], "hold": f["hold"], "t_inject": None, "t_heal": None, "t_done": None,
               "target": None, "affects": [], "detail": {}, "skipped": None}
        fn = getattr(self, "_" + f["kind"])
        try:
            fn(f, rec)
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"fault {f['kind']} failed: {rec['error']}")
            self.net.heal_all()
        if self.automatic and f["kind"] in ("kill_primary_restart", "freeze_primary", "partition_proxy_primary",
                                            "partition_asymmetric", "lossy_link", "slow_link"):
            # Whether Switchyard failed over during this fault (the next ensure_healthy
            # follows it).
            rec["detail"]["primaries_after"] = self.c.primaries()
        rec["t_done"] = time.time()
        if rec["t_heal"] is None:
            rec["t_heal"] = rec["t_done"]
        return rec

    def _mark(self, rec, target, affects):
        rec["target"] = target
        rec["affects"] = affects
        rec["t_inject"] = time.time()
        log(f"FAULT {rec['kind']} -> {target or '(chosen next)'} (hold {rec['hold']}s)")

    def _hold(self, rec, seconds):
        """Hold the fault. The first call marks when the fault took effect (its action
        returned): an operation running across [t_inject, t_struck] was in flight."""
        if rec.get("t_struck") is None:
            rec["t_struck"] = time.time()
        self.wait(seconds)

    def _healed(self, rec):
        rec["t_heal"] = time.time()

    # servers ---------------------------------------------------------------------------
    def _kill_primary_failover(self, f, rec):
        c = self.c
        old = c.primary
        self._mark(rec, old, [old])
        c.kill9(old)
        if self.automatic:
            rec["t_struck"] = time.time()
            new = self.wait_promoted(old)
            if new is not None:
                rec["detail"]["promoted"] = new
                rec["detail"]["promoted_by"] = "switchyard"
                rec["detail"]["failover_s"] = round(time.time() - rec["t_inject"], 2)
                c.adopt_primary(new, "switchyard")
                self._healed(rec)  # Switchyard repointed the other standby itself
                self._hold(rec, f["hold"])  # the old primary stays down a while
                rec["detail"]["rejoin"] = c.rejoin(old, new)
                return
            log("no automatic failover within 30 s; promoting as an operator")
            rec["detail"]["promoted_by"] = "harness (no automatic failover within 30 s)"
        else:
            self._hold(rec, f["hold"])  # the operator notices
        new, lsn = c.most_caught_up(c.standbys())
        if new is None:
            raise RuntimeError("no running standby to promote")
        rec["detail"]["promoted"] = new
        rec["detail"]["promoted_receive_lsn"] = lsn
        c.promote(new)
        for s in c.standbys():
            if s != old:
                c.repoint(s, new)
        self._healed(rec)  # writes can resume on the new primary from here
        rec["detail"]["rejoin"] = c.rejoin(old, new)

    def _kill_primary_restart(self, f, rec):
        c = self.c
        self._mark(rec, c.primary, [c.primary])
        c.kill9(c.primary)
        self._hold(rec, f["hold"])
        c.start(c.primary)
        self._healed(rec)

    def _kill_standby(self, f, rec):
        c = self.c
        s = _pick(c.standbys(), f["pick"])
        self._mark(rec, s, [s])
        c.kill9(s)
        self._hold(rec, f["hold"])
        c.start(s)
        self._healed(rec)

    def _freeze(self, f, rec, node):
        self._mark(rec, node, [node])
        pids = self.c.freeze(node)
        try:
            self._hold(rec, f["hold"])
        finally:
            self.c.thaw(pids)
        self._healed(rec)

    def _freeze_primary(self, f, rec):
        self._freeze(f, rec, self.c.primary)

    def _freeze_standby(self, f, rec):
        self._freeze(f, rec, _pick(self.c.standbys(), f["pick"]))

    def _split_brain(self, f, rec):
        """Promote a standby while the primary keeps running: two servers now say they
        are primary, the new one on a newer timeline. Switchyard must send writes only to
        the newer one from the first health check that shows it. Healed as an operator
        would: the old primary is stopped, rewound and restarted as a standby of the new
        one; the other standby is repointed."""
        c = self.c
        old = c.primary
        # Marked before choosing: a write the old primary acknowledges from here on may
        # be missing on the standby chosen, even with synchronous replication.
        self._mark(rec, None, [old])
        new, lsn = c.most_caught_up(c.standbys())
        if new is None:
            raise RuntimeError("no running standby to promote")
        rec["target"], rec["affects"] = new, [old, new]
        log(f"split_brain: promoting {new} while {old} runs")
        rec["detail"].update({"old_primary": old, "promoted": new, "promoted_receive_lsn": lsn})
        c.promote(new)
        rec["detail"]["t_promoted"] = time.time()
        self._hold(rec, f["hold"])
        rec["detail"]["rejoin"] = c.rejoin(old, new)
        # The other standby kept following the old primary past the fork, so it cannot
        # just be repointed: it is rewound too (pg_rewind finds nothing to do if it had
        # not diverged).
        for s in c.standbys():
            if s != old:
                rec["detail"][f"rejoin_{s}"] = c.rejoin(s, new)
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
            pass  # as full as it gets
        finally:
            os.close(fd)
        rec["detail"]["filled_bytes"] = free
        # Writing into an already allocated segment needs no space: make the primary
        # switch segments so the standby has to create a new one.
        c.try_psql(c.primary, "SELECT pg_switch_wal()", timeout=5)
        try:
            self._hold(rec, f["hold"])
        finally:
            os.unlink(filler)
        if not c.running(node.name):
            rec["detail"]["restarted"] = True
            c.start(node.name)
        self._healed(rec)

    # Switchyard ----------------------------------------------------------------------------
    def _kill_proxy(self, f, rec, sig=signal.SIGKILL):
        p = self.proxy_for(f, rec)
        self._mark(rec, p.name, [p.name])
        rec["detail"]["pid"] = p.pid
        p.kill(sig)
        self._hold(rec, f["hold"])
        p.start()
        self._healed(rec)

    def _term_proxy(self, f, rec):
        self._kill_proxy(f, rec, signal.SIGTERM)

    def _freeze_proxy(self, f, rec):
        p = self.proxy_for(f, rec)
        self._mark(rec, p.name, [p.name])
        p.freeze()
        try:
            self._hold(rec, f["hold"])
        finally:
            p.thaw()
        self._healed(rec)

    def _reload_proxy(self, f, rec):
        """SIGHUP twice under load: first with changed health and lag settings, then back
        (one instance: the other keeps its settings, as in a rolling change)."""
        p = self.proxy_for(f, rec)
        self._mark(rec, p.name, [p.name])
        base = (p.health_interval_ms, p.max_lag_ms)
        p.health_interval_ms, p.max_lag_ms = 300, 4000
        p.write_config()
        p.reload()
        self._hold(rec, f["hold"] / 2)
        p.health_interval_ms, p.max_lag_ms = base
        p.write_config()
        p.reload()
        self._hold(rec, f["hold"] / 2)
        rec["detail"]["alive_after"] = p.proc.poll() is None
        self._healed(rec)

    # etcd (several instances) ----------------------------------------------------------------
    def _watch_cut_off(self, rec, proxies, seconds):
        """Hold for `seconds` while polling the instances: when each one's /status first
        said it was cut off from etcd (seconds from the injection)."""
        end = time.time() + seconds
        while time.time() < end:
            for p in proxies:
                v = p.coordination_view(timeout=0.5)
                if v is not None and v[1] and "cut_off_after_s" not in rec["detail"].get(p.name, {}):
                    rec["detail"].setdefault(p.name, {})["cut_off_after_s"] = round(time.time() - rec["t_inject"], 2)
            self._hold(rec, min(0.2, max(0.0, end - time.time())))

    def _watch_back(self, rec, timeout=20.0):
        """After the heal: when each instance that had been cut off was back in touch
        (seconds from the heal)."""
        deadline = time.time() + timeout
        left = {p.name: p for p in self.proxies if "cut_off_after_s" in rec["detail"].get(p.name, {})}
        while left and time.time() < deadline:
            for name, p in list(left.items()):
                v = p.coordination_view(timeout=0.5)
                if v is not None and not v[1]:
                    rec["detail"].setdefault(name, {})["back_after_heal_s"] = round(time.time() - rec["t_heal"], 2)
                    del left[name]
            self.wait(0.2)

    def _partition_proxy_etcd(self, f, rec):
        """One instance loses etcd: every packet to and from each member dropped in its
        namespace (a black hole: its calls wait out their timeouts). Within its lease it
        must stop routing writes (reads go on) while the other goes on, leading alone
        once the lease lapses."""
        p = self.proxy_for(f, rec)
        self._mark(rec, p.name, [p.name])
        for ip in self.etcd.ips():
            self._drop_between(p.member, ip)
        self._watch_cut_off(rec, [p], f["hold"])
        self.net.heal(p.member)
        self._healed(rec)
        self._watch_back(rec)

    def _kill_etcd(self, f, rec):
        """kill -9 of an etcd member (with one member: all of etcd, so every instance is
        cut off after its lease and must stop routing writes until etcd is back; with
        three: the raft leader), restarted after the hold with its data."""
        members = sorted(self.etcd.members)
        m = (self.etcd.leader() or _pick(members, f["pick"])) if len(members) > 1 else members[0]
        self._mark(rec, f"etcd {m}", [m])
        rec["detail"]["pid"] = self.etcd.kill(m)
        self._watch_cut_off(rec, self.proxies, f["hold"])
        self.etcd.start(m)
        self._healed(rec)
        self._watch_back(rec)

    # network -------------------------------------------------------------------------------
    def _drop_between(self, member, ip, direction="both", extra=()):
        if direction in ("both", "in"):
            self.net.iptables(member, "-A", "CHAOS_IN", "-s", ip, *extra, "-j", "DROP")
        if direction in ("both", "out"):
            self.net.iptables(member, "-A", "CHAOS_OUT", "-d", ip, *extra, "-j", "DROP")

    def _partition_proxy(self, f, rec, node):
        p = self.proxy_for(f, rec)
        self._mark(rec, node, [node])
        self._on_instance(rec, p)
        self._drop_between(p.member, self.c.nodes[node].host)
        self._hold(rec, f["hold"])
        self.net.heal(p.member)
        self._healed(rec)

    def _on_instance(self, rec, p):
        """A network fault between one instance and a server: say which instance."""
        if len(self.proxies) > 1:
            rec["detail"]["instance"] = p.name
            rec["affects"] = rec["affects"] + [p.name]

    def _partition_proxy_primary(self, f, rec):
        self._partition_proxy(f, rec, self.c.primary)

    def _partition_proxy_standby(self, f, rec):
        self._partition_proxy(f, rec, _pick(self.c.standbys(), f["pick"]))

    def _partition_primary_standbys(self, f, rec):
        p = self.c.primary
        self._mark(rec, p, [p] + self.c.standbys())
        for s in self.c.standbys():
            self._drop_between(p, self.c.nodes[s].host)
        self._hold(rec, f["hold"])
        self.net.heal(p)
        self._healed(rec)

    def _partition_asymmetric(self, f, rec):
        """The proxy's packets reach the primary, the primary's never come back."""
        n = self.c.primary
        p = self.proxy_for(f, rec)
        self._mark(rec, n, [n])
        self._on_instance(rec, p)
        self._drop_between(p.member, self.c.nodes[n].host, direction="in")
        self._hold(rec, f["hold"])
        self.net.heal(p.member)
        self._healed(rec)

    def _lossy_link(self, f, rec):
        node = _pick(list(self.c.nodes), f["pick"])
        prob = round(0.2 + 0.2 * f["pick"], 2)
        p = self.proxy_for(f, rec)
        self._mark(rec, node, [node])
        self._on_instance(rec, p)
        rec["detail"]["drop_probability"] = prob
        self._drop_between(p.member, self.c.nodes[node].host,
                           extra=("-m", "statistic", "--mode", "random", "--probability", str(prob)))
        self._hold(rec, f["hold"])
        self.net.heal(p.member)
        self._healed(rec)

    def _slow_link(self, f, rec):
        node = _pick(list(self.c.nodes), f["pick"])
        self._mark(rec, node, [node])
        rec["detail"]["tbf"] = "rate 256kbit burst 16kbit latency 400ms"
        self.net.tc(node, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "256kbit", "burst", "16kbit",
                    "latency", "400ms")
        self._hold(rec, f["hold"])
        self.net.heal(node)
        self._healed(rec)

    def _delay_link(self, f, rec):
        node = _pick(list(self.c.nodes), f["pick"])
        self._mark(rec, node, [node])
        rec["detail"]["netem"] = "delay 150ms 50ms loss 5%"
        self.net.tc(node, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "150ms", "50ms", "loss", "5%")
        self._hold(rec, f["hold"])
        self.net.heal(node)
        self._healed(rec)

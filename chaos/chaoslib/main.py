"""chaos/run: build the cluster and the network, start Switchyard and the workloads,
inject the seeded faults, then check and report. See chaos/README.md.

Exit status: 0 when the checker finds no violation, 1 when it finds one, 2 when the
harness itself could not run (setup failed, interrupted).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from . import common
from .checker import Check
from .cluster import DB, PASSWORD, PG_BIN_DEFAULT, USER, Cluster, cleanup_leftover_mounts
from .common import install_signal_handlers, log, parse_duration, raise_nofile
from .etcd import Etcd
from .faults import KINDS, Injector, available_kinds, schedule
from .load import Load
from .netns import Loopback, Netns
from .observe import Observer
from .proxy import Proxy, scan_log
from .report import render_markdown, render_text

CHAOS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(CHAOS_DIR)
WARMUP_S = 8.0    # load only, before the first fault
TAIL_S = 12.0     # no fault starts later than this before the end: time to recover


def parse_args(argv):
    p = argparse.ArgumentParser(prog="chaos/run", description=(
        "Fault suite for Switchyard: a primary + 2 standbys in network namespaces, Switchyard "
        "in front, recorded workloads, seeded faults, a checker. Exit 0 = no violation."))
    p.add_argument("--engine", choices=("postgresql", "mariadb"), default="postgresql",
                   help="postgresql (default): PostgreSQL 15 primary + 2 streaming standbys; mariadb: MariaDB 10.11 "
                        "primary + 2 GTID replicas, Switchyard with engine = \"mysql\" (chaos/README.md)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--duration", default="120s", help="length of the loaded phase (e.g. 90s, 30m)")
    p.add_argument("--binary", default=os.environ.get("SWITCHYARD_BIN") or os.path.join(REPO, "target/release/switchyard"),
                   help="Switchyard binary (copied before use); default $SWITCHYARD_BIN or target/release/switchyard")
    p.add_argument("--sync", action="store_true",
                   help="synchronous replication (ANY 1 of the standbys; with --engine mariadb: semi-synchronous, "
                        "AFTER_SYNC): then any lost acknowledged write fails the run")
    p.add_argument("--failover", choices=("operator", "automatic"), default="operator",
                   help="who promotes after the primary is killed: the harness as an operator, or Switchyard "
                        "(failover = \"automatic\"; the harness only rejoins old primaries)")
    p.add_argument("--instances", type=int, choices=(1, 2), default=1,
                   help="Switchyard instances: 2 = two instances agreeing through etcd ([coordination]), "
                        "the workload spread over both, faults striking either (default 1)")
    p.add_argument("--etcd-members", type=int, choices=(1, 3), default=1,
                   help="etcd members with --instances 2 (1: killing it is a whole coordination outage)")
    p.add_argument("--lease-s", type=int, default=2, help="[coordination] lease_s with --instances 2")
    p.add_argument("--max-ops", type=int, default=3_000_000,
                   help="cap on recorded operations (5 min record ~270k; the checker holds them all in memory)")
    p.add_argument("--insert-workers", type=int, default=4)
    p.add_argument("--raw-pairs", type=int, default=2, help="read-after-write client pairs")
    p.add_argument("--pause-ms", type=int, default=10, help="pause between a client's operations")
    p.add_argument("--op-timeout", type=float, default=10.0, help="client-side bound on one statement (s)")
    p.add_argument("--pgbench-clients", type=int, default=60, help="pgbench clients in all (0: no pgbench)")
    p.add_argument("--pgbench-rate", type=int, default=300, help="pgbench tps in all (-R; 0: unthrottled)")
    p.add_argument("--health-interval-ms", type=int, default=400)
    p.add_argument("--faults", default="", help="comma list: only these kinds (default: all available): "
                   + ", ".join(KINDS))
    p.add_argument("--exclude-faults", default="", help="comma list of kinds not to run")
    p.add_argument("--no-netns", action="store_true", help="loopback only, process faults only")
    p.add_argument("--subnet", default="10.77.0", help="first three octets of the private /24")
    p.add_argument("--tmpfs-mb", type=int, default=320, help="size of the WAL tmpfs of n3 (disk-full fault; 0: none)")
    p.add_argument("--fd-bound", type=int, default=32, help="allowed growth of Switchyard's open files, idle to idle")
    p.add_argument("--no-gate-stale-reads", action="store_true", help="report stale reads without failing the run")
    p.add_argument("--pg-bin", default=PG_BIN_DEFAULT)
    p.add_argument("--workdir", default=None, help="where to put the run (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep data directories (logs are always kept)")
    p.add_argument("--results", metavar="NAME", default=None,
                   help="also write chaos/results/<date>-<NAME>.md and .json")
    p.add_argument("--json", default=None, help="where to write the JSON report (default: <workdir>/report.json)")
    p.add_argument("--recheck", metavar="WORKDIR", default=None,
                   help="run the checker again on a finished run's work directory (no cluster)")
    p.add_argument("--workload-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.duration_s = parse_duration(a.duration)
    return a


def main(argv):
    args = parse_args(argv)
    if args.workload_child:
        with open(args.workload_child) as f:
            spec = json.load(f)
        if spec.get("engine") == "mariadb":
            from .myworkload import child_main as my_child_main
            return my_child_main(spec)
        from .workload import child_main
        return child_main(args.workload_child)
    if args.load_child:
        from .myload import child_main as load_child_main
        with open(args.load_child) as f:
            return load_child_main(json.load(f))
    if args.recheck:
        return recheck(args.recheck, args)
    install_signal_handlers()
    raise_nofile(20000)
    run = Run(args)
    try:
        return run.execute()
    except KeyboardInterrupt:
        log("interrupted")
        return 2
    except Exception:
        # The harness failed (setup, a fault it could not undo): not a verdict on Switchyard.
        import traceback
        log("HARNESS ERROR:\n" + traceback.format_exc())
        return 2
    finally:
        run.teardown()


class Run:
    def __init__(self, args):
        self.a = args
        self.my = args.engine == "mariadb"
        self.net = self.cluster = self.proxy = self.observer = self.load = self.etcd = None
        self.proxies = []
        self.child = None
        self.workdir = None
        self.notes = []

    # ---- the run ----------------------------------------------------------------------------
    def execute(self):
        a = self.a
        if not os.path.exists(a.binary):
            log(f"no Switchyard binary at {a.binary} (build it, or pass --binary / SWITCHYARD_BIN)")
            return 2
        self.workdir = a.workdir or tempfile.mkdtemp(prefix=f"chaos-{a.seed}-")
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)
        common.LOG_FILE = os.path.join(self.workdir, "harness.log")
        log(f"chaos run: {a.engine}, seed {a.seed}, duration {a.duration_s:.0f}s, "
            f"{('semi-sync' if self.my else 'sync') if a.sync else 'async'} "
            f"replication, {a.failover} failover, "
            + (f"{a.instances} Switchyard instances with {a.etcd_members} etcd member(s), lease {a.lease_s} s, "
               if a.instances > 1 else "")
            + f"binary {a.binary}, workdir {self.workdir}")
        if a.instances > 1 and not Etcd.available():
            log("--instances 2 needs etcd (/usr/bin/etcd; Debian: apt-get install etcd-server)")
            return 2

        self.setup_network()
        self.setup_cluster()
        self.setup_etcd()
        self.setup_proxy()

        kinds = available_kinds(self.net, tmpfs_ok=any(n.tmpfs for n in self.cluster.nodes.values()),
                                only=set(filter(None, a.faults.split(","))) or None,
                                exclude=set(filter(None, a.exclude_faults.split(","))),
                                instances=a.instances)
        plan = schedule(a.seed, kinds, instances=a.instances)
        log(f"fault kinds available: {', '.join(kinds)}")

        time.sleep(2)
        idle_start = {p.name: p.resources() for p in self.proxies}
        if self.my:
            from .observe import MyObserver
            self.observer = MyObserver(self.cluster, self.proxies)
        else:
            self.observer = Observer(self.cluster, self.proxies)
        self.observer.start()

        self.t_start = time.time()
        self.t_end = self.t_start + a.duration_s
        self.start_workload()
        if self.my:
            from .myload import LoadChild
            from .mariadb import DB as MY_DB, PASSWORD as MY_PASSWORD, USER as MY_USER
            self.load = LoadChild(self.net, self.proxies, a.pgbench_clients, a.pgbench_rate, self.t_end, self.workdir,
                                  MY_USER, MY_PASSWORD, MY_DB)
        else:
            self.load = Load(self.net, self.proxies, a.pgbench_clients, a.pgbench_rate, self.t_end)
        self.load.start()

        inj_cls = Injector
        if self.my:
            from .myfaults import MyInjector
            inj_cls = MyInjector
        injector = self.injector = inj_cls(self.cluster, self.proxies, self.net, self.wait,
                                           automatic=a.failover == "automatic", etcd=self.etcd)
        faults = self.run_faults(injector, plan)
        self.wait(max(0.0, self.t_end - time.time()))
        log("loaded phase over; stopping load")
        self.load.stop()
        self.stop_workload()

        # Settle: network healed, cluster whole, pools back to idle, then measure.
        self.net.heal_all()
        problems = injector.ensure_healthy(timeout=30)
        if problems:
            self.notes.append("cluster not whole at the end: " + "; ".join(problems))
        self.wait(6)
        idle_end = {p.name: p.resources() for p in self.proxies}
        self.observer.stop()
        final = self.my_final_state() if self.my else self.final_state()

        ops = self.read_ops()
        proxies = []
        for p in self.proxies:
            panics, warn_counts, _ = scan_log(p.log_path)
            mine = [r for r in self.observer.resources if r.get("sy") == p.name]
            proxies.append({"name": p.name, "incarnations": p.incarnations, "panics": panics,
                            "log_warnings": warn_counts, "idle_start": idle_start[p.name],
                            "idle_end": idle_end[p.name],
                            "max_rss_kib": max((r.get("rss_kib") or 0 for r in mine), default=None),
                            "max_fds": max((r.get("fds") or 0 for r in mine), default=None)})
        run = {
            "ops": ops, "faults": faults, "final": final, "sync": a.sync,
            "node_by_addr": {n.addr: n.name for n in self.cluster.nodes.values()},
            "t_start": self.t_start, "t_end": self.t_end, "op_timeout": a.op_timeout,
            "fd_bound": a.fd_bound, "gate_stale_reads": not a.no_gate_stale_reads,
            # Switchyard's failover_hold_ms as configured by proxy.py (not set: 10 s with
            # automatic failover, else connect_timeout_ms = 5 s): how long a read that must
            # see a client's writes waits for a primary before standbys may serve it.
            "read_hold_s": 10.0 if a.failover == "automatic" else 5.0,
            # One entry per Switchyard instance ("switchyard" when there is one).
            "proxies": proxies,
            "engine": a.engine,
        }
        if self.my:
            # Which node a GTID's server_id is, and each node's own view over time (the
            # "write taken by a node that was not the primary" rule).
            run["node_by_sid"] = {str(n.server_id): n.name for n in self.cluster.nodes.values()}
            run["truth"] = self.observer.truth
            run["rebuilds"] = self.cluster.rebuilds
        report = self.build_report(faults, final, kinds)
        save_checker_input(self.workdir, run, report)
        return check_and_report(run, report, self.a)

    # ---- setup ------------------------------------------------------------------------------------
    def setup_network(self):
        a = self.a
        names = [("n1", 11), ("n2", 12), ("n3", 13), ("px", 2)]
        if a.instances > 1:
            # The second instance in a namespace of its own (the workload stays in px
            # and reaches it across the bridge), and etcd in namespaces of its own, so
            # that an instance can be partitioned from etcd alone.
            names += [("px2", 3)] + [(f"et{i + 1}", 21 + i) for i in range(a.etcd_members)]
        ok, why = (False, "--no-netns") if a.no_netns else Netns.available()
        if ok:
            Netns.cleanup_leftovers()  # first: kills what still runs there (servers using the tmpfs)
        if os.geteuid() == 0:
            cleanup_leftover_mounts()
        if ok:  # not `if root`: --no-netns must give loopback as root too
            self.net = Netns(a.subnet)
            self.net.setup(names)
        else:
            log(f"NETWORK NAMESPACES UNAVAILABLE ({why}): loopback only, process faults only")
            self.notes.append(f"network namespaces unavailable ({why}): no network faults")
            self.net = Loopback()
            self.net.setup(names)

    def setup_cluster(self):
        a = self.a
        if self.my:
            from .mariadb import MariaCluster
            self.cluster = MariaCluster(self.net, self.workdir, sync=a.sync)
            if a.tmpfs_mb and os.geteuid() == 0:
                self.cluster.add_tmpfs_relay("n3", a.tmpfs_mb)
            self.cluster.setup()
            return
        self.cluster = Cluster(self.net, self.workdir, a.pg_bin, sync=a.sync)
        self.cluster.init_primary("n1")
        if a.tmpfs_mb and os.geteuid() == 0:
            self.cluster.add_tmpfs_wal("n3", a.tmpfs_mb)
        self.cluster.add_standby("n2")
        self.cluster.add_standby("n3")
        missing = self.cluster.wait_streaming(["n2", "n3"], timeout=60)
        if missing:
            raise RuntimeError(f"standbys not streaming: {missing}")
        if a.sync:
            self.cluster.enable_sync()

    def setup_etcd(self):
        if self.a.instances < 2:
            return
        self.etcd = Etcd(self.net, self.workdir, [f"et{i + 1}" for i in range(self.a.etcd_members)])
        self.etcd.start_all()

    def setup_proxy(self):
        a = self.a
        if a.instances == 1:
            layout = [("switchyard", "px")]
        else:
            layout = [(f"sy{i + 1}", "px" if i == 0 else f"px{i + 1}") for i in range(a.instances)]
        copied = None
        for name, member in layout:
            coord = None
            if self.etcd is not None:
                coord = {"etcd": self.etcd.urls(), "instance": name, "lease_s": a.lease_s}
            p = Proxy(self.net, self.cluster, self.workdir, a.binary, a.health_interval_ms, failover=a.failover,
                      name=name, member=member, coordination=coord, copied_binary=copied)
            copied = p.binary
            self.proxies.append(p)  # first: teardown stops it even if the start fails
            p.start()
        self.proxy = self.proxies[0]
        deadline = time.monotonic() + 30
        for p in self.proxies:
            while True:
                st = p.status()["clusters"][0]
                up = [n for n in st["nodes"] if n["health"] == "up"]
                # With coordination: in touch with etcd and writing to the published n1.
                if st.get("primary") == "n1" and len(up) == 3 and (self.etcd is None or st.get("published") == "n1"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Switchyard {p.name} does not see the cluster: {st}")
                time.sleep(0.2)
        if len(self.proxies) > 1:
            # Same Injector check as before every fault.
            probs = Injector(self.cluster, self.proxies, self.net, self.wait).wait_agreed(timeout=30)
            if probs:
                raise RuntimeError("; ".join(probs))
            v = self.proxy.coordination_view()
            log(f"instances agree: leader {v[0]}, published {v[2]} (epoch {v[3]})")

    def start_workload(self):
        a = self.a
        self.ops_path = os.path.join(self.workdir, "ops.jsonl")
        spec = {"host": self.proxy.host, "rw": self.proxy.rw, "ro": self.proxy.ro, "admin": self.proxy.admin,
                "instances": [{"name": p.name, "host": p.host, "rw": p.rw, "ro": p.ro, "admin": p.admin}
                              for p in self.proxies],
                "user": USER, "password": PASSWORD, "db": DB, "end_time": self.t_end, "engine": a.engine,
                "insert_workers": a.insert_workers, "raw_pairs": a.raw_pairs, "max_ops": a.max_ops,
                "op_timeout": a.op_timeout, "connect_timeout": 6.0, "pause_ms": a.pause_ms,
                "status_interval_ms": 200, "out": self.ops_path}
        if self.my:
            from .mariadb import DB as MY_DB, PASSWORD as MY_PASSWORD, USER as MY_USER
            spec.update(user=MY_USER, password=MY_PASSWORD, db=MY_DB)
        spec_path = os.path.join(self.workdir, "workload.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        argv = self.net.prefix("px") + [sys.executable, os.path.join(CHAOS_DIR, "run"), "--workload-child", spec_path]
        out = open(os.path.join(self.workdir, "workload.log"), "ab")
        self.child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      start_new_session=True)
        out.close()
        log(f"workload: {a.insert_workers} insert clients, {a.raw_pairs} read-after-write pairs (pid {self.child.pid})")

    def stop_workload(self):
        if self.child is None:
            return
        try:
            self.child.wait(max(5.0, self.t_end - time.time() + self.a.op_timeout + 10))
        except subprocess.TimeoutExpired:
            log("workload did not stop in time; SIGTERM")
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(10)
            except subprocess.TimeoutExpired:
                self.child.kill()
                self.child.wait(5)
        if self.child.returncode not in (0, None):
            self.notes.append(f"workload child exited with {self.child.returncode} (see workload.log)")

    # ---- the fault loop ------------------------------------------------------------------------------
    def wait(self, seconds):
        """Sleep, while watching for Switchyard exiting by itself (a crash: recorded and
        restarted, so the run goes on) and for the workload child dying."""
        end = time.time() + seconds
        while True:
            for p in self.proxies:
                if p.check_crashed() is not None:
                    try:
                        p.start()
                    except Exception as e:
                        log(f"restart of {p.name} after crash failed: {e}")
            if self.etcd is not None:
                for m in self.etcd.check_exited():
                    self.notes.append(f"etcd {m} exited by itself (see etcd/{m}.log); restarted before the next fault")
            left = end - time.time()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def run_faults(self, injector, plan):
        records = []
        self.wait(WARMUP_S)
        for f in plan:
            if time.time() + f["hold"] + 8 > self.t_end - TAIL_S:
                break
            problems = injector.ensure_healthy()
            if problems:
                log("cluster not whole before the next fault: " + "; ".join(problems))
                self.notes.append("before fault %d: %s" % (len(records) + 1, "; ".join(problems)))
            if time.time() + f["hold"] + 8 > self.t_end - TAIL_S:
                break
            rec = injector.run(f)
            records.append(rec)
            self.wait(f["gap"])
        log(f"{len(records)} faults injected")
        return records

    # ---- the end ---------------------------------------------------------------------------------------
    def final_state(self):
        c = self.cluster
        primary = c.primary
        # Let the standbys catch up, so their counts can be compared too.
        time.sleep(1)
        tables = {}
        for t in ("chaos_writes", "chaos_raw"):
            out = c.psql(primary, f"SELECT id FROM {t}", db=DB, timeout=60)
            tables[t] = {int(x) for x in out.split()} if out else set()
        tl_hex = c.try_psql(primary, "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
        counts = {}
        for n in c.nodes:
            v = c.try_psql(n, "SELECT count(*) FROM chaos_writes", db=DB, timeout=10)
            counts[n] = int(v) if v else None
        tl = int(tl_hex, 16) if tl_hex else None
        return {"primary": primary, "timeline": tl,
                "history": c.timeline_history(primary, tl) if tl else {}, "tables": tables, "row_counts": counts,
                "recovery": c.try_psql(primary, "SELECT pg_is_in_recovery()")}

    def my_final_state(self):
        """--engine mariadb: the primary's tables and GTID state, each node's row count."""
        from .mariadb import DB as MY_DB
        c = self.cluster
        primary = c.primary
        c.wait_caught_up(primary, timeout=20)
        tables = {}
        for t in ("chaos_writes", "chaos_raw"):
            rows = c.sql(primary, f"SELECT id FROM {t}", db=MY_DB, timeout=120)
            tables[t] = {int(r[0]) for r in rows}
        counts = {}
        for n in c.nodes:
            v = c.try_sql(n, "SELECT count(*) FROM chaos_writes", db=MY_DB, timeout=20)
            counts[n] = int(v[0][0]) if v else None
        st = c.state(primary) or {}
        return {"primary": primary, "timeline": None, "history": {}, "tables": tables, "row_counts": counts,
                "gtid_binlog_state": st.get("gtid_binlog_state"), "gtid_binlog_pos": st.get("gtid_binlog_pos"),
                "recovery": None if not st else ("replica" if st.get("replicating") else
                                                 ("read-only" if st.get("read_only") else "primary"))}

    def read_ops(self):
        ops = []
        try:
            with open(self.ops_path) as f:
                for line in f:
                    try:
                        ops.append(json.loads(line))
                    except ValueError:
                        pass  # a torn last line if the child was killed
        except OSError:
            pass
        return ops

    def build_report(self, faults, final, kinds):
        a = self.a
        final = dict(final)
        final["tables"] = {k: len(v) for k, v in final["tables"].items()}
        final["history"] = {str(k): v for k, v in final["history"].items()}
        counts = {}
        for f in faults:
            if f.get("t_inject"):
                counts[f["kind"]] = counts.get(f["kind"], 0) + 1
        return {
            "when": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M:%S UTC"),
            "machine": {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count()},
            "command": "chaos/run " + " ".join(sys.argv[1:]),
            "seed": a.seed, "duration_s": a.duration_s, "sync": a.sync, "failover": a.failover,
            "instances": a.instances,
            "etcd": None if self.etcd is None else {"members": sorted(self.etcd.members), "lease_s": a.lease_s,
                                                    "history": self.etcd.history},
            "network": self.net.kind,
            "netem": getattr(self.net, "netem", False),
            "binary": a.binary, "workdir": self.workdir,
            "fault_kinds_available": kinds, "faults_run": counts,
            "faults_not_exercised": sorted(set(kinds) - set(counts)),
            "faults_skipped": [f"{f['kind']} ({f['skipped'] or f.get('error')})" for f in faults
                               if not f.get("t_inject")],
            "fault_records": faults,
            "operator_actions": self.cluster.history,
            "final": final,
            "load": self.load.summary() if self.load else {},
            "truth_dual_primary_s": dual_primary_seconds(self.observer.truth if self.observer else []),
            "notes": self.notes,
            "engine": a.engine,
            "rebuilds": getattr(self.cluster, "rebuilds", []),
            "switchyard_verdicts": getattr(getattr(self, "injector", None), "verdicts", []),
        }

    def teardown(self):
        for what, fn in (("load", lambda: self.load and (self.load.kill() if hasattr(self.load, "kill")
                                                          else self.load.stop())),
                         ("workload", self._kill_child),
                         ("observer", lambda: self.observer and self.observer.stop()),
                         ("switchyard", self._stop_proxies),
                         ("etcd", lambda: self.etcd and self.etcd.stop_all()),
                         ("cluster", lambda: self.cluster and self.cluster.stop_all()),
                         ("network", lambda: self.net and self.net.teardown())):
            try:
                fn()
            except Exception as e:
                log(f"teardown of {what} failed: {e}")
        if self.workdir and self.cluster and not self.a.keep:
            for n in self.cluster.nodes.values():
                shutil.rmtree(n.data, ignore_errors=True)
            if self.etcd:
                for m in self.etcd.members.values():
                    shutil.rmtree(m.data, ignore_errors=True)
            if self.proxies:
                try:
                    os.unlink(self.proxies[0].binary)  # the copy (shared by the instances): 85 MB per run otherwise
                except OSError:
                    pass
        if self.workdir:
            log(f"logs kept in {self.workdir}")

    def _stop_proxies(self):
        for p in self.proxies:
            try:
                p.shutdown()
            except Exception as e:
                log(f"teardown of {p.name} failed: {e}")

    def _kill_child(self):
        if self.child is not None and self.child.poll() is None:
            self.child.kill()
            self.child.wait(5)


def check_and_report(run, report, a):
    """Run the checker, print the tables, write the JSON (and the results files)."""
    report = dict(report, check=Check(run).run())
    text = render_text(report)
    print(text, flush=True)
    path = a.json or os.path.join(report["workdir"], "report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1, default=_json_default)
    log(f"JSON report: {path}")
    if a.results:
        day = datetime.date.today().isoformat()
        base = os.path.join(CHAOS_DIR, "results", f"{day}-{a.results}")
        with open(base + ".json", "w") as f:
            json.dump(report, f, indent=1, default=_json_default)
        with open(base + ".md", "w") as f:
            f.write(render_markdown(report, text))
        log(f"results: {base}.md / .json")
    return 0 if report["check"]["passed"] else 1


def save_checker_input(workdir, run, report):
    """Everything the checker read except ops.jsonl, so `--recheck WORKDIR` can run it
    again (after a change to the checker) without running the cluster."""
    data = {"run": {k: v for k, v in run.items() if k != "ops"}, "report": report}
    data["run"]["final"] = dict(run["final"], tables={k: sorted(v) for k, v in run["final"]["tables"].items()})
    with open(os.path.join(workdir, "checker_input.json"), "w") as f:
        json.dump(data, f, default=_json_default)


def recheck(workdir, a):
    with open(os.path.join(workdir, "checker_input.json")) as f:
        data = json.load(f)
    run = data["run"]
    run["final"]["tables"] = {k: set(v) for k, v in run["final"]["tables"].items()}
    run["final"]["history"] = {int(k): v for k, v in run["final"]["history"].items()}
    run["ops"] = []
    with open(os.path.join(workdir, "ops.jsonl")) as f:
        for line in f:
            try:
                run["ops"].append(json.loads(line))
            except ValueError:
                pass
    if a.no_gate_stale_reads:
        run["gate_stale_reads"] = False
    return check_and_report(run, data["report"], a)


def dual_primary_seconds(truth):
    """Seconds during which two servers said they were primary (the split-brain fault
    makes this happen on purpose; what matters is that writes did not follow)."""
    state, total, since = {}, 0.0, None
    for s in sorted(truth, key=lambda r: r["t"]):
        state[s["node"]] = bool(s.get("primary"))
        n = sum(state.values())
        if n >= 2 and since is None:
            since = s["t"]
        elif n < 2 and since is not None:
            total += s["t"] - since
            since = None
    return round(total, 2)


def _json_default(o):
    if isinstance(o, set):
        return sorted(o)
    return str(o)

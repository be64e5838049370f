"""etcd for two Switchyard instances (`chaos/run --instances 2`): Debian's `etcd`
binary, one member per network namespace (`et1`, `et2`, ...), data and logs in the
run's work directory (`etcd/`).

One member is the default: then killing it is a whole coordination outage (both
instances must stop routing writes once their lease is up, and come back when it
returns), which is the harder case for the proxies. With `--etcd-members 3` a kill
takes the raft leader and the others elect a new one (what tests/coordination.rs
measures). Elections are quick, as in tests/common/etcd.rs: heartbeat 100 ms,
election timeout 1 s.
"""

import json
import os
import signal
import subprocess
import time
import urllib.request

from .common import alive, call_in_netns, free_port, log

CLIENT_PORT, PEER_PORT = 2379, 2380
ETCD_BIN = "/usr/bin/etcd"


class EtcdMember:
    def __init__(self, name, ip, client, peer, base):
        self.name, self.ip, self.client, self.peer = name, ip, client, peer
        self.data = os.path.join(base, f"{name}.data")
        self.log = os.path.join(base, f"{name}.log")
        self.proc = None
        self.killed = False   # the running process was stopped by the harness
        self.noted = False    # its exit was already recorded

    @property
    def client_url(self):
        return f"http://{self.ip}:{self.client}"

    @property
    def peer_url(self):
        return f"http://{self.ip}:{self.peer}"


class Etcd:
    def __init__(self, net, base, names):
        """names: the network members (namespaces) that hold one etcd member each."""
        self.net = net
        self.dir = os.path.join(base, "etcd")
        os.makedirs(self.dir, exist_ok=True)
        self.members = {}
        for name in names:
            if net.kind == "netns":
                client, peer = CLIENT_PORT, PEER_PORT
            else:
                client, peer = free_port(), free_port()
            self.members[name] = EtcdMember(name, net.ip_of(name), client, peer, self.dir)
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members.values())
        self.history = []   # {t, event, member}: kills, restarts, exits nobody asked for

    @staticmethod
    def available():
        return os.access(ETCD_BIN, os.X_OK)

    def urls(self):
        return [m.client_url for m in self.members.values()]

    def ips(self):
        return sorted({m.ip for m in self.members.values()})

    # ---- processes ------------------------------------------------------------------
    def start_all(self, timeout=30):
        for name in self.members:
            self.start(name, wait=False)
        for name in self.members:
            self.wait_healthy(name, timeout)
        log(f"etcd: {', '.join(f'{m.name} {m.client_url}' for m in self.members.values())}")

    def start(self, name, wait=True, timeout=30):
        m = self.members[name]
        # With an existing data directory etcd ignores the --initial-* flags and rejoins
        # with what it stored, so the same command restarts a killed member.
        argv = self.net.prefix(name) + [
            ETCD_BIN, "--name", name, "--data-dir", m.data,
            "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", self.initial, "--initial-cluster-state", "new",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-outputs", "stderr"]
        out = open(m.log, "ab")
        m.killed = m.noted = False
        m.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                  start_new_session=True)
        out.close()
        if wait:
            self.wait_healthy(name, timeout)

    def wait_healthy(self, name, timeout=30):
        m = self.members[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m.proc.poll() is not None:
                raise RuntimeError(f"etcd {name} exited with {m.proc.returncode}; see {m.log}")
            try:
                if '"true"' in self._get(name, "/health", timeout=1):
                    return
            except Exception:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"etcd {name} not healthy after {timeout}s; see {m.log}")

    def running(self, name):
        p = self.members[name].proc
        return p is not None and p.poll() is None

    def kill(self, name, sig=signal.SIGKILL):
        p = self.members[name].proc
        if p is None or p.poll() is not None:
            return None
        pid = p.pid
        self.members[name].killed = True
        os.kill(pid, sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)
            p.wait(5)
        self.history.append({"t": time.time(), "event": f"harness {signal.Signals(sig).name}", "member": name})
        return pid

    def check_exited(self):
        """Members that exited without the harness asking: recorded once (then restarted
        by `ensure_running` before the next fault). Not a verdict on Switchyard: the
        report lists them under the notes."""
        out = []
        for name, m in self.members.items():
            if m.proc is None or m.proc.poll() is None or m.killed or m.noted:
                continue
            m.noted = True
            self.history.append({"t": time.time(), "event": f"exited by itself ({m.proc.returncode})",
                                 "member": name})
            log(f"ETCD {name} EXITED BY ITSELF with status {m.proc.returncode}; see {m.log}")
            out.append(name)
        return out

    def ensure_running(self):
        """Start every member that is not running. Returns the ones that would not."""
        bad = []
        for name in self.members:
            if not self.running(name):
                try:
                    self.start(name)
                    self.history.append({"t": time.time(), "event": "restarted", "member": name})
                except Exception as e:
                    log(f"etcd {name} does not start: {e}")
                    bad.append(name)
        return bad

    def stop_all(self):
        for name, m in self.members.items():
            if m.proc is not None and m.proc.poll() is None:
                try:
                    m.killed = True
                    os.kill(m.proc.pid, signal.SIGCONT)
                    os.kill(m.proc.pid, signal.SIGTERM)
                    m.proc.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    if alive(m.proc.pid):
                        os.kill(m.proc.pid, signal.SIGKILL)
                        m.proc.wait(5)

    # ---- observation ---------------------------------------------------------------
    def _get(self, name, path, timeout=2, body=None):
        m = self.members[name]
        url = m.client_url + path

        def go():
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            req = urllib.request.Request(url, data=None if body is None else body.encode(),
                                         headers={"content-type": "application/json"})
            with opener.open(req, timeout=timeout) as r:
                return r.read().decode()
        return call_in_netns(self.net.ns_of(name), go, timeout=timeout + 2)

    def leader(self):
        """The member that is the raft leader now (None if none answers as one)."""
        for name in self.members:
            if not self.running(name):
                continue
            try:
                st = json.loads(self._get(name, "/v3/maintenance/status", body="{}"))
            except Exception:
                continue
            if st.get("leader") and st.get("leader") == (st.get("header") or {}).get("member_id"):
                return name
        return None

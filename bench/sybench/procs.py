"""Processes the bench starts, and what /proc says about them.

Everything started goes through `Registry`, which stops it again (LIFO) on normal exit,
on an exception, on Ctrl-C and on SIGTERM.
"""

import itertools
import os
import signal
import socket
import subprocess
import threading
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# The next port to try (`next()` on a count is atomic under the GIL: no lock needed).
_next_port = itertools.count()


def free_port():
    """A port free on 127.0.0.1 at the time of asking, for a server about to listen on it.

    Taken from below the kernel's ephemeral range when there is room: a port that
    bind(0) hands out may go, before the server binds it, to an outgoing connection's
    source port, and the server then fails with "Address already in use". Below that
    range only listeners take ports. The same rule as `free_port` in
    src/demo/postgres.rs.
    """
    lowest = 10_000
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = min(int(f.read().split()[0]), 65_535)
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32_768
    if ephemeral_low >= lowest + 1_000:
        span = ephemeral_low - lowest
        start = (os.getpid() * 7_919) % span
        for _ in range(span):
            port = lowest + (start + next(_next_port)) % span
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Registry:
    """Cleanup actions, run last-in first-out exactly once."""

    def __init__(self):
        self._actions = []
        self._lock = threading.Lock()
        self._done = False

    def add(self, what, fn):
        with self._lock:
            self._actions.append((what, fn))

    def spawn(self, what, argv, log_path, **kw):
        """Start a long-running process in its own session, output to `log_path`."""
        out = open(log_path, "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, **kw)
        out.close()
        self.add(what, lambda: stop_process(p))
        return p

    def cleanup(self):
        with self._lock:
            if self._done:
                return
            self._done = True
            actions = list(reversed(self._actions))
        for what, fn in actions:
            try:
                fn()
            except Exception as e:  # keep cleaning up the rest
                log(f"cleanup of {what} failed: {e}")


def stop_process(p, grace=5.0):
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)


def install_signal_handlers():
    """SIGTERM behaves like Ctrl-C: unwinds through `finally` blocks so cleanup runs."""

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)
    # Also when started from a non-interactive shell in the background, where SIGINT is
    # ignored at exec and Python would keep ignoring it.
    signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_nofile(want=20000):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# ---- /proc ---------------------------------------------------------------------------

def cpu_times(pid):
    """(utime, stime) of the whole process (all threads), in seconds: user space and
    the kernel working for it (system calls, and the loopback TCP delivery a send does)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def reset_hwm(pid):
    """Reset VmHWM (peak RSS) to the current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class ResourceWatch:
    """CPU seconds and peak RSS of one process between start() and stop().

    Peak RSS is the larger of VmHWM (reset at start) and VmRSS sampled every 50 ms."""

    def __init__(self, pid):
        self.pid = pid
        self._stop = threading.Event()
        self.max_rss = 0
        self.hwm_reset = False

    def start(self):
        if self.pid is None:
            return self
        self.hwm_reset = reset_hwm(self.pid)
        self.user0, self.sys0 = cpu_times(self.pid)
        self.rss0 = status_kib(self.pid, "VmRSS")
        self.max_rss = self.rss0 or 0
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            try:
                rss = status_kib(self.pid, "VmRSS") or 0
            except OSError:
                return
            self.max_rss = max(self.max_rss, rss)

    def stop(self):
        if self.pid is None:
            return {}
        self._stop.set()
        self._t.join()
        try:
            user, sys_ = cpu_times(self.pid)
            user, sys_ = user - self.user0, sys_ - self.sys0
            hwm = status_kib(self.pid, "VmHWM") or 0
            rss = status_kib(self.pid, "VmRSS") or 0
        except OSError:
            return {"proxy_died": True}
        peak = max(self.max_rss, hwm if self.hwm_reset else 0)
        return {"cpu_s": round(user + sys_, 3), "user_s": round(user, 3), "sys_s": round(sys_, 3), "peak_rss_kib": peak, "rss_start_kib": self.rss0, "rss_end_kib": rss}


def alive(pid):
    """True if `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2:].split()[0] not in ("Z", "X")


def children_of(pid):
    """Direct children of `pid` (by scanning /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
            ppid = int(data[data.rindex(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid:
            out.append(int(d))
    return out


# ---- other load on the machine -------------------------------------------------------

def _proc_table():
    """{pid: (ppid, uid, cpu_s, name)} for every process with a command (no kernel threads)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                data = f.read()
            st = os.stat(f"/proc/{d}")
        except OSError:
            continue
        name = data[data.index("(") + 1:data.rindex(")")]
        fields = data[data.rindex(")") + 2:].split()
        flags = int(fields[6])
        if flags & 0x00200000:  # PF_KTHREAD
            continue
        # utime + stime + cutime + cstime: children that ended (and were reaped) in
        # between count through their parent.
        cpu = (int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])) / CLK_TCK
        out[int(d)] = (int(fields[1]), st.st_uid, cpu, name)
    return out


class ForeignLoad:
    """CPU used by processes that are not the bench's: neither descendants of this process
    nor owned by `postgres` (the servers and PgBouncer). Another build or test run on the
    same 2 cores shows up here."""

    def __init__(self, postgres_uid=None):
        self.me = os.getpid()
        self.pg_uid = postgres_uid

    def _foreign(self):
        t = _proc_table()
        ours = {self.me}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _, _) in t.items():
                if pid not in ours and ppid in ours:
                    ours.add(pid)
                    changed = True
        return {pid: (cpu, name) for pid, (ppid, uid, cpu, name) in t.items()
                if pid not in ours and uid != self.pg_uid}

    def snapshot(self):
        return self._foreign()

    @staticmethod
    def delta(a, b):
        """(total CPU s, {name: CPU s}) used by foreign processes between snapshots a and b
        (a process started in between counts with all its CPU)."""
        total, by = 0.0, {}
        for pid, (cpu, name) in b.items():
            d = cpu - a[pid][0] if pid in a else cpu
            if d > 0:
                total += d
                by[name] = by.get(name, 0.0) + d
        return round(total, 2), {k: round(v, 2) for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:4]}

    def wait_quiet(self, max_wait_s, window_s=2.0, limit_share=0.05):
        """Wait until foreign processes use under `limit_share` of one core over a window,
        at most `max_wait_s`. Returns the seconds waited."""
        t0 = time.monotonic()
        while True:
            a = self.snapshot()
            time.sleep(window_s)
            total, _ = self.delta(a, self.snapshot())
            if total / window_s < limit_share or time.monotonic() - t0 >= max_wait_s:
                return time.monotonic() - t0

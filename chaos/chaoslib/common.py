"""Small helpers shared by the chaos modules: logging, bounded subprocess calls, the
current time as every module records it, LSN arithmetic, running code inside a
network namespace.

Times are wall-clock seconds (`time.time()`) everywhere, because three kinds of
process write them (this harness, the workload child, Switchyard's own events in
`/status`) and only the wall clock is common to all three.
"""

import ctypes
import os
import re
import subprocess
import threading
import time

# Reused from bench/sybench (chaos/run puts bench/ on sys.path).
from sybench.procs import (alive, children_of, free_port,  # noqa: F401
                           install_signal_handlers, raise_nofile, status_kib)

_T0 = time.time()
_log_lock = threading.Lock()
LOG_FILE = None  # set by main: everything logged also goes there


def now():
    return time.time()


def log(msg):
    line = f"[{time.strftime('%H:%M:%S')} +{time.time() - _T0:6.1f}s] {msg}"
    with _log_lock:
        print(line, flush=True)
        if LOG_FILE:
            try:
                with open(LOG_FILE, "a") as f:
                    f.write(line + "\n")
            except OSError:
                pass


def run(argv, timeout=60, check=True, env=None, input=None):
    """Run a command to completion, bounded by `timeout` seconds. Returns the
    CompletedProcess (stdout/stderr as text); on timeout returncode is None."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=env, input=input, stdin=None if input is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        p = subprocess.CompletedProcess(argv, None, _text(e.stdout), _text(e.stderr) + f"\n(timed out after {timeout}s)")
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({p.returncode}):\n{p.stdout}{p.stderr}")
    return p


def _text(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def parse_duration(text):
    """'90s', '30m', '1h', '120' (seconds) -> seconds (float)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*(ms|s|m|h)?\s*", str(text))
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 30m)")
    v = float(m.group(1))
    return v * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


def lsn_int(text):
    """'16/B374D848' -> integer byte position (None for None/'')."""
    if not text:
        return None
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


# ---- network namespaces from inside this process --------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def call_in_netns(ns, fn, *args, timeout=30):
    """Run fn(*args) on a fresh thread that has joined network namespace `ns` (setns(2)
    moves only the calling thread), so sockets it opens live in that namespace. With
    ns None, just a thread. Returns fn's result or raises its exception."""
    box = {}

    def body():
        try:
            if ns:
                fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns({ns})")
                finally:
                    os.close(fd)
            box["v"] = fn(*args)
        except BaseException as e:  # handed to the caller
            box["e"] = e

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} in {ns} did not finish within {timeout}s")
    if "e" in box:
        raise box["e"]
    return box.get("v")

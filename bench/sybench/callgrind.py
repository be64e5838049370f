"""Counting a proxy's instructions under Valgrind's callgrind: shared by
`bench/instructions` (PostgreSQL) and `bench/mysql --instructions`. Python 3, stdlib only."""

import os
import socket
import subprocess
import time


def valgrind_prefix(dump_dir):
    """The argv prefix that runs a proxy under callgrind, its dumps in `dump_dir`."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump_dir}/callgrind.out.%p",
            "--dump-instr=no", "--compress-strings=no"]


def control(flag, pid, port, user=None):
    """`callgrind_control FLAG PID`. vgdb delivers the command when the process next runs:
    a proxy asleep in epoll_wait runs again only on an event, so a TCP connection to it,
    closed at once, wakes it (a few thousand instructions, against millions measured)."""
    runas = ["runuser", "-u", user, "--"] if user else []
    ctl = subprocess.Popen(runas + ["callgrind_control", flag, str(pid)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    time.sleep(1)
    with socket.create_connection(("127.0.0.1", port), timeout=10):
        pass
    said = ctl.communicate(timeout=120)[0]
    if ctl.returncode != 0 or "OK" not in said:
        raise RuntimeError(f"callgrind_control {flag} {pid} failed: {said}")
    return said


def dumped(dump_dir, pid, part, said, what):
    """The path of dump `part` of process `pid`, once written in full."""
    dump = os.path.join(dump_dir, f"callgrind.out.{pid}.{part}")
    deadline = time.monotonic() + 60
    while not (os.path.exists(dump) and os.path.getsize(dump) > 0):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no dump {dump} after callgrind_control -d: {said}")
        time.sleep(0.5)
    time.sleep(1)  # written in full
    return dump


def self_costs(dump):
    """Instructions per function (self cost) in a callgrind dump. callgrind_annotate
    attributes everything to the thread's entry point when Rust code is inlined across
    files, so the dump is read here: cost lines count for the current `fn=`, except the
    line after a `calls=`, which is the callee's inclusive cost. (Needs the dump written
    with --compress-strings=no, as `valgrind_prefix` asks.)"""
    costs = {}
    fn, after_call = None, False
    with open(dump) as f:
        for line in f:
            if line.startswith("fn="):
                fn = line[3:].strip()
            elif line.startswith("calls="):
                after_call = True
            elif line[:1].isdigit() or line[:1] in "+-*":
                if after_call:
                    after_call = False
                    continue
                parts = line.split()
                if len(parts) >= 2:
                    costs[fn] = costs.get(fn, 0) + int(parts[1])
    return costs


def per_unit(c1, n1, c2, n2):
    """Instructions per unit (transaction, query) in each function: the difference of two
    runs of n1 and n2 units, which leaves out what every run costs alike (logins)."""
    return {f: (c2.get(f, 0) - c1.get(f, 0)) / (n2 - n1) for f in set(c1) | set(c2)}


def write_functions(path, header, per):
    """The functions file: instructions per unit spent in each function itself."""
    total = sum(per.values())
    with open(path, "w") as f:
        f.write(header)
        for name, v in sorted(per.items(), key=lambda kv: -kv[1]):
            if v < 0.5:
                break
            f.write(f"{v:9.1f} {100 * v / total:5.1f} %  {name}\n")

"""Run one pgbench case and turn its output and per-transaction logs into figures."""

import glob
import os
import re
import shlex
import subprocess
import time

WORKLOADS = {
    "select": {"label": "select-only (-S)", "args": ["-S"]},
    "tpcb": {"label": "TPC-B-like", "args": []},
    # Each client picks a script per transaction: one TPC-B write in five, so reads
    # often follow the same client's write (what read-your-writes is for).
    "mix": {"label": "1 TPC-B : 4 select-only", "args": ["-b", "tpcb-like@1", "-b", "select-only@4"]},
    # A new connection per transaction (-C): connect, SCRAM login, one select-only
    # transaction, disconnect -- what an application that does not keep its connections
    # does (Django with CONN_MAX_AGE = 0). Each transaction is one client login, so tps
    # is connections/s.
    "connect": {"label": "connect (-C -S): a new connection per transaction", "args": ["-C", "-S"]},
}
PROTOCOLS = ["simple", "extended", "prepared"]


def connect_allowance(clients):
    """Seconds added to -T for connecting the clients: pgbench's -T clock starts before the
    connections are made (SCRAM logins cost ~4 ms each here), and tps is computed
    without initial connection time, so this keeps the measured window near `duration`."""
    return 0 if clients < 100 else int(clients * 0.005) + 1


def pgbench_argv(host, port, user, db, workload, protocol, clients, duration, jobs, log_prefix):
    j = max(1, min(jobs, clients))
    t = duration + connect_allowance(clients)
    return (["pgbench", "-h", host, "-p", str(port), "-U", user, "-n", "-T", str(t),
             "-c", str(clients), "-j", str(j), "-M", protocol]
            + WORKLOADS[workload]["args"]
            + ["-l", f"--log-prefix={log_prefix}", db])


def connect_argvs(host, port, user, db, protocol, clients, duration, procs, log_prefix):
    """The connect workload as `procs` pgbench processes (0: one per client) sharing the
    clients, each with one thread per client (-j = -c). pgbench connects synchronously,
    so clients sharing a thread never log in at the same time; and its threads slow each
    other's SCRAM client proofs down (PBKDF2 through OpenSSL: measured here, 16 threads of
    one process used 4.3 to 6.8 ms of CPU per login against 2.9 to 3.7 ms in 16
    processes, and swung between the two from run to run), which would make the client
    rather than the proxy what the figure measures."""
    procs = max(1, min(procs or clients, clients))
    out = []
    for i in range(procs):
        c = clients // procs + (1 if i < clients % procs else 0)
        out.append(pgbench_argv(host, port, user, db, "connect", protocol, c, duration, c, f"{log_prefix}-p{i}"))
    return out


def display_command(argv, password_env="PGPASSWORD", env_extra=None):
    """The command as a person would type it (log prefix shortened; extra environment such
    as PGSSLMODE shown before it)."""
    shown = [re.sub(r"^--log-prefix=.*/", "--log-prefix=", a) for a in argv]
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in (env_extra or {}).items())
    return f"{env}{password_env}=*** " + " ".join(shlex.quote(a) for a in shown)


def percentile(sorted_vals, q):
    """Nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return None
    k = max(0, min(len(sorted_vals) - 1, int(-(-q * len(sorted_vals) // 100)) - 1))
    return sorted_vals[k]


def aggregate_logs(prefix, cycles=False):
    """avg/p50/p99 latency (ms) from pgbench --log files: one line per transaction,
    `client_id transaction_no time_us script_no time_epoch time_us_frac`.

    `cycles` (with -C): also the time between two consecutive transaction ends of the same
    client, i.e. one whole cycle of disconnect, connect, login and transaction (the
    latency pgbench logs starts after the login). Meaningful when each client has its own
    thread (-j = -c): pgbench connects synchronously, so clients sharing a thread wait
    for each other's logins."""
    lat = []
    failed = 0
    ends = {}
    files = glob.glob(prefix + ".*")
    for path in files:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                try:
                    lat.append(int(parts[2]))
                except ValueError:  # "failed" / "skipped"
                    failed += 1
                if cycles and len(parts) >= 6:
                    try:
                        ends.setdefault((path, parts[0]), []).append(int(parts[4]) * 1_000_000 + int(parts[5]))
                    except ValueError:
                        pass
        os.unlink(path)
    lat.sort()
    if not lat:
        return {"log_txns": 0, "log_failed": failed}
    out = {}
    if cycles:
        cyc = []
        for t in ends.values():
            t.sort()
            cyc += [b - a for a, b in zip(t, t[1:])]
        cyc.sort()
        if cyc:
            out = {"cycle_n": len(cyc), "cycle_avg_ms": sum(cyc) / len(cyc) / 1000.0,
                   "cycle_p50_ms": percentile(cyc, 50) / 1000.0, "cycle_p99_ms": percentile(cyc, 99) / 1000.0,
                   "cycle_max_ms": cyc[-1] / 1000.0}
    return {
        **out,
        "log_txns": len(lat),
        "log_failed": failed,
        "avg_ms": sum(lat) / len(lat) / 1000.0,
        "p50_ms": percentile(lat, 50) / 1000.0,
        "p99_ms": percentile(lat, 99) / 1000.0,
        "max_ms": lat[-1] / 1000.0,
    }


def parse_output(stdout, stderr):
    out = {}
    # Without -C: "(without initial connection time)"; with -C: "(including reconnection times)".
    m = re.search(r"^tps = ([\d.]+) \((without initial connection time|including reconnection times)\)", stdout, re.M)
    if m:
        out["tps"] = float(m.group(1))
    m = re.search(r"average connection time = ([\d.]+) ms", stdout)
    if m:
        out["conn_avg_ms"] = float(m.group(1))
    for key, pat in [("txns", r"number of transactions actually processed: (\d+)"),
                     ("failed_txns", r"number of failed transactions: (\d+)"),
                     ("pgbench_avg_ms", r"latency average = ([\d.]+) ms"),
                     ("conn_time_ms", r"initial connection time = ([\d.]+) ms")]:
        m = re.search(pat, stdout)
        if m:
            out[key] = float(m.group(1)) if "." in m.group(1) else int(m.group(1))
    errors = [l for l in stderr.splitlines() if "error" in l.lower() or "fatal" in l.lower()]
    aborted = len(re.findall(r"client \d+ aborted", stderr))
    out["aborted_clients"] = aborted
    if errors:
        out["errors"] = errors[:5]
        out["error_lines"] = len(errors)
    return out


def run_parallel(argvs, password, timeout, log_prefix, env_extra=None):
    """Several pgbench processes at once (the connect workload): their figures summed
    (tps, transactions, failures) or weighted by transactions (average connection time,
    latency), their per-transaction logs read together."""
    import tempfile

    if len(argvs) == 1:
        return run_case(argvs[0], password, timeout, env_extra)
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="15", PGAPPNAME="sybench", **(env_extra or {}))
    t0 = time.monotonic()
    running = []
    for argv in argvs:
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        running.append((subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=env), out, err))
    parts, rcs = [], []
    for p, out, err in running:
        try:
            rc = p.wait(max(1.0, timeout - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rc = "timeout"
        out.seek(0)
        err.seek(0)
        stderr = err.read() + (f"\npgbench did not finish within {timeout}s (killed)" if rc == "timeout" else "")
        parts.append(parse_output(out.read(), stderr))
        rcs.append(rc)
        out.close()
        err.close()
    res = {"processes": len(argvs), "rc": next((rc for rc in rcs if rc != 0), 0),
           "wall_s": round(time.monotonic() - t0, 2)}
    if all("tps" in x for x in parts):
        res["tps"] = round(sum(x["tps"] for x in parts), 3)
    for k in ("txns", "failed_txns", "aborted_clients", "error_lines"):
        if any(k in x for x in parts):
            res[k] = sum(x.get(k, 0) for x in parts)
    n = sum(x.get("txns", 0) for x in parts)
    for k in ("conn_avg_ms", "pgbench_avg_ms"):
        if n and all(k in x for x in parts):
            res[k] = round(sum(x[k] * x.get("txns", 0) for x in parts) / n, 3)
    errors = [e for x in parts for e in x.get("errors", [])]
    if errors:
        res["errors"] = errors[:5]
    if "timeout" in rcs:
        res.setdefault("errors", []).append(f"pgbench did not finish within {timeout}s")
    res.update(aggregate_logs(log_prefix + "-p*", cycles=True))
    return res


def run_case(argv, password, timeout, env_extra=None):
    """Run pgbench; figures from its output and per-transaction logs (with -C also the
    connect cycles, see aggregate_logs). `env_extra`: e.g. {"PGSSLMODE": "require"}."""
    env = dict(os.environ, PGPASSWORD=password, PGCONNECT_TIMEOUT="15", PGAPPNAME="sybench", **(env_extra or {}))
    t0 = time.monotonic()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
        rc, stdout, stderr = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc = "timeout"
        stdout = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        stderr += f"\npgbench did not finish within {timeout}s (killed)"
    wall = time.monotonic() - t0
    res = parse_output(stdout, stderr)
    res["rc"] = rc
    res["wall_s"] = round(wall, 2)
    prefix = next(a.split("=", 1)[1] for a in argv if a.startswith("--log-prefix="))
    res.update(aggregate_logs(prefix, cycles="-C" in argv))
    if rc == "timeout":
        res.setdefault("errors", []).append(f"pgbench did not finish within {timeout}s")
    return res

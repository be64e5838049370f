"""compat/run: client libraries' own test suites, direct and through Switchyard."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict

from sybench.procs import Registry, install_signal_handlers, log, raise_nofile

from . import report, results
from .env import TARGETS, Proxy, Servers, safe, snapshot_binary
from .suites import REPO, SUITES, cache_dir

ALLOWLIST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "allowlist.toml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="compat/run",
        description="Run psycopg's, SQLAlchemy's and Django's own test suites directly against "
        "PostgreSQL and through Switchyard; list the tests that fail only through Switchyard.",
    )
    p.add_argument("--suite", action="append", choices=[*SUITES, "all"],
                   help="suite to run (repeatable; default: all)")
    p.add_argument("--target", action="append", choices=list(TARGETS),
                   help="where to point the suite (repeatable; default: all four). "
                   "direct always runs too: it is the baseline")
    p.add_argument("--slice", action="store_true",
                   help="the short slices (a few minutes per target) instead of the full suites")
    p.add_argument("--junit-dir", default=None,
                   help="where junit XML, suite logs and proxy logs go "
                   "(default: ~/.cache/switchyard-compat/last-run)")
    p.add_argument("--report", default=None, help="also write a Markdown report to this file")
    p.add_argument("--allowlist", default=ALLOWLIST)
    p.add_argument("--run-timeout", type=int, default=None,
                   help="seconds one suite may take on one target (default: 1800 for a slice, "
                   "14400 full)")
    p.add_argument("--from-dir", action="store_true",
                   help="run nothing: report on the junit XML and logs already in --junit-dir "
                   "(after editing the allowlist, say)")
    p.add_argument("--baseline-from", metavar="DIR", default=None,
                   help="do not run direct: take its results from an earlier run's --junit-dir "
                   "(same suites, same --slice)")
    p.add_argument("--keep", action="store_true",
                   help="keep the cluster's data directory and logs (printed at the end)")
    a = p.parse_args(argv)
    suites = a.suite or ["all"]
    a.suites = list(SUITES) if "all" in suites else list(OrderedDict.fromkeys(suites))
    targets = a.target or list(TARGETS)
    a.targets = ["direct"] + [t for t in TARGETS if t in targets and t != "direct"]
    if a.run_timeout is None:
        a.run_timeout = 1800 if a.slice else 14400
    return a


def find_binary():
    env = os.environ.get("SWITCHYARD_BIN")
    if env:
        if not os.path.isfile(env):
            raise RuntimeError(f"SWITCHYARD_BIN={env}: no such file")
        return env
    cands = [os.path.join(REPO, "target", k, "switchyard") for k in ("release", "debug")]
    cands = [c for c in cands if os.path.isfile(c)]
    if not cands:
        raise RuntimeError("no switchyard binary: cargo build, or set SWITCHYARD_BIN")
    return max(cands, key=os.path.getmtime)


def run_one(suite, target, port, outdir, workdir, timeout):
    tag = f"{suite.name}-{safe(target)}"
    junit = os.path.join(outdir, f"{tag}.xml")
    logpath = os.path.join(outdir, f"{tag}.log")
    for p in (junit, logpath):
        if os.path.exists(p):
            os.remove(p)
    argv, cwd, env = suite.command(port, junit, workdir, tag)
    res = results.RunResult(suite.name, target, log=logpath)
    log(f"{suite.name} -> {target} (port {port}): {' '.join(argv[:3])} ... > {logpath}")
    start = time.monotonic()
    completed = True
    with open(logpath, "wb") as out:
        out.write(f"$ cd {cwd} && {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            res.exit_code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            completed = False
            log(f"{suite.name} -> {target}: still running after {timeout}s, stopping it")
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
            res.exit_code = proc.returncode
        except BaseException:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise
    res.seconds = time.monotonic() - start
    with open(logpath, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    if not completed:
        text += f"\nTimeout: the run was stopped after {timeout}s\n"
    with open(os.path.join(outdir, f"{tag}.json"), "w") as f:
        json.dump({"seconds": res.seconds, "exit_code": res.exit_code, "completed": completed}, f)
    suite.read(res, junit, text, completed)
    c = res.counts()
    log(f"{suite.name} -> {target}: {c['passed']} passed, {c['failed']} failed, "
        f"{c['error']} errors, {c['skipped']} skipped in {res.seconds:.0f}s (exit {res.exit_code})")
    return res


def main(argv=None):
    args = parse_args(argv)
    install_signal_handlers()
    raise_nofile()
    allowlist = results.load_allowlist(args.allowlist)
    binary = find_binary() if len(args.targets) > 1 else None
    info = binary_info(args)  # now: the binary may be rebuilt while the suites run
    outdir = os.path.abspath(args.junit_dir or os.path.join(cache_dir(), "last-run"))
    if args.from_dir:
        return report_only(args, allowlist, outdir)
    if args.baseline_from and os.path.abspath(args.baseline_from) == outdir:
        raise SystemExit("--baseline-from must not be the --junit-dir (it is emptied first)")
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):
        if f.endswith((".xml", ".log", ".toml", ".json")):
            os.remove(os.path.join(outdir, f))
    suites = [SUITES[s](full=not args.slice) for s in args.suites]
    for s in suites:
        s.prepare()

    registry = Registry()
    workdir = tempfile.mkdtemp(prefix="switchyard-compat-")
    os.chmod(workdir, 0o755)
    runs = {}  # (suite, target) -> RunResult
    started = time.strftime("%Y-%m-%d %H:%M")
    try:
        if binary:
            log(f"switchyard binary: {binary} (built {time.ctime(os.path.getmtime(binary))})")
            binary = snapshot_binary(binary, workdir)
        servers = Servers(workdir, registry)
        for suite in suites:
            for target in args.targets:
                if target == "direct" and args.baseline_from:
                    saved = load_saved(suite.name, "direct", suite.full, args.baseline_from)
                    if saved is None:
                        raise RuntimeError(f"no {suite.name} direct results in {args.baseline_from}")
                    log(f"{suite.name} -> direct: results of {args.baseline_from}")
                    runs[suite.name, target] = saved
                    continue
                if suite.database:
                    servers.fresh_database(suite.database, suite.db_setup)
                proxy = None
                if target != "direct":
                    try:
                        proxy = Proxy(binary, servers, target, workdir, registry)
                    except RuntimeError as e:
                        log(f"error: {e}")
                        for f in os.listdir(workdir):
                            if f.startswith("switchyard-"):
                                shutil.copy(os.path.join(workdir, f), outdir)
                        r = runs[suite.name, target] = results.RunResult(suite.name, target)
                        r.add(results.RUN_ID, results.ERROR, str(e))
                        continue
                port = proxy.rw if proxy else servers.primary_port
                try:
                    runs[suite.name, target] = run_one(suite, target, port, outdir, workdir,
                                                       args.run_timeout)
                finally:
                    if proxy:
                        if not proxy.alive() and (suite.name, target) in runs:
                            log(f"switchyard ({target}) exited with {proxy.proc.returncode}")
                            runs[suite.name, target].add(
                                results.RUN_ID, results.ERROR,
                                f"switchyard exited with {proxy.proc.returncode} during the run")
                        proxy.stop()
                        shutil.copy(proxy.log, outdir)
                        shutil.copy(proxy.config, outdir)
                    servers.leftover_prepared_xacts()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        registry.cleanup()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    with open(os.path.join(outdir, "run.json"), "w") as f:
        json.dump({"binary": info, "started": started}, f)
    return finish(args, allowlist, runs, info, started, outdir)


def load_saved(name, target, full, outdir):
    """A run's results from the junit XML / log / json compat/run left in `outdir`."""
    suite = SUITES[name](full=full)
    tag = f"{name}-{safe(target)}"
    logpath = os.path.join(outdir, f"{tag}.log")
    if not os.path.exists(logpath):
        return None
    meta = {"seconds": 0.0, "exit_code": 1, "completed": True}
    if os.path.exists(os.path.join(outdir, f"{tag}.json")):
        with open(os.path.join(outdir, f"{tag}.json")) as f:
            meta = json.load(f)
    res = results.RunResult(name, target, seconds=meta["seconds"], exit_code=meta["exit_code"],
                            log=logpath)
    with open(logpath, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    suite.read(res, os.path.join(outdir, f"{tag}.xml"), text, meta["completed"])
    return res


def report_only(args, allowlist, outdir):
    runs = {}
    for name in args.suites:
        for target in args.targets:
            res = load_saved(name, target, not args.slice, outdir)
            if res is not None:
                runs[name, target] = res
    started = time.strftime("%Y-%m-%d %H:%M", time.localtime(min(
        (os.path.getmtime(r.log) for r in runs.values()), default=time.time())))
    binary = "-"
    if os.path.exists(os.path.join(outdir, "run.json")):
        with open(os.path.join(outdir, "run.json")) as f:
            meta = json.load(f)
        binary, started = meta.get("binary", binary), meta.get("started", started)
    return finish(args, allowlist, runs, binary, started, outdir)


def finish(args, allowlist, runs, binary, started, outdir):
    rep = report.build(runs, args, allowlist, binary, started)
    print(report.text(rep), flush=True)
    if args.report:
        with open(args.report, "w") as f:
            f.write(report.markdown(rep))
        log(f"wrote {args.report}")
    log(f"junit XML and logs: {outdir}")
    return 1 if rep["blocking"] else 0


def binary_info(args):
    if len(args.targets) <= 1:
        return ""
    b = find_binary()
    try:
        head = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    return f"{b} (built {time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(b)))}; repo at {head})"


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Run part of Django's own test suite against a PostgreSQL or MySQL/MariaDB server.

Usage:
    python3 django_suite.py --port P [--engine postgresql|mysql] [--host 127.0.0.1]
        [--user app] [--password app]
        [--labels basic queries transactions backends] [--workdir DIR] [--parallel N]
        [--verbosity 0-3] [--use-tz] [--db-prefix NAME] [--no-install] [--no-preclean]

Point --port at the database server itself for a baseline, or at Switchyard to run the
same tests through the proxy, and compare the two summary lines.

--engine picks Django's backend: postgresql (the default; psycopg 3 or psycopg2) or
mysql (django.db.backends.mysql with mysqlclient, charset utf8mb4; for MariaDB too).
Everything below holds for both unless it says otherwise.

What it does:
  1. Reads the installed Django version (`import django`) and fetches the matching
     source distribution from PyPI with pip (the only network access):
         python3 -m pip download --no-deps --no-binary :all: django==<version> -d <workdir>
     The tarball and its extracted tree are cached in the workdir
     (default ~/.cache/switchyard/django-suite) and reused by later runs.
  2. Installs with pip what the suite needs for the chosen labels and is missing:
     psycopg-pool (backends.postgresql's pool tests, when psycopg 3 is in use),
     mysqlclient (--engine mysql, if MySQLdb is missing) and
     tblib (--parallel other than 1: the parallel runner must pickle tracebacks).
     --no-install only warns instead. Both are listed in requirements.txt too.
  3. Writes the settings module <workdir>/switchyard_django_suite_settings.py with
     the `default` and `other` aliases (databases <prefix>_default / <prefix>_other;
     the runner creates and drops test_<prefix>_default etc. itself, so the user
     needs CREATEDB; on MySQL, CREATE and DROP on test_<prefix>_%, and with
     --parallel > 1 the runner clones databases with the mysqldump and mysql CLIs
     through the same host and port), CONN_MAX_AGE 0, and otherwise Django's own reference test
     settings (tests/test_sqlite.py), USE_TZ = False included: the suite is written
     for that, and with USE_TZ = True (--use-tz) runtests.py's warnings-as-errors
     turn every naive datetime in a test into an error (66 of these labels' tests,
     setUpClass of whole classes among them, fail even against plain PostgreSQL).
     --engine mysql writes <workdir>/switchyard_django_suite_mysql_<prefix>.py
     instead, so that it never rewrites the settings of a PostgreSQL run (or of
     another prefix's run) going on at the same time.
  4. Drops test databases left over by an interrupted earlier run (PostgreSQL: WITH
     (FORCE), so stale sessions don't block it; MySQL: with MySQLdb, SHOW DATABASES
     LIKE 'test\_<prefix>\_%' then DROP DATABASE; --no-preclean skips this), then runs
         python3 tests/runtests.py --settings=switchyard_django_suite_settings \
             --noinput --parallel N --verbosity=V <labels>
     from the extracted tree (its own `django` package first on PYTHONPATH),
     streaming the runner's output to stdout. --noinput also makes the runner destroy
     an old test database instead of asking.
  5. Prints one final line, parsed from unittest's "Ran ..." and "OK/FAILED (...)"
     lines:
         django-suite: ran=<N> failures=<F> errors=<E> skipped=<S> expected_failures=<X> seconds=<T>
     (seconds is unittest's own time; wall time if the runner never got that far)
     and exits with the runner's exit code.

Lines of this script's own, other than the summary, start with "[django-suite]".
"""
import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

DEFAULT_LABELS = ["basic", "queries", "transactions", "backends"]
SETTINGS_MODULE = "switchyard_django_suite_settings"
DEFAULT_WORKDIR = Path.home() / ".cache" / "switchyard" / "django-suite"


def log(message):
    print(f"[django-suite] {message}", flush=True)


def die(message, code=2):
    log(f"error: {message}")
    sys.exit(code)


def parse_args():
    parser = argparse.ArgumentParser(
        description="Run part of Django's own test suite against PostgreSQL or MySQL."
    )
    parser.add_argument(
        "--engine",
        choices=["postgresql", "mysql"],
        default="postgresql",
        help="Django database backend: postgresql (psycopg) or mysql (mysqlclient; "
        "MariaDB too) (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", default="app")
    parser.add_argument("--password", default="app")
    parser.add_argument(
        "--labels",
        nargs="+",
        default=DEFAULT_LABELS,
        help="test labels for runtests.py (default: %(default)s)",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument(
        "--parallel",
        default="1",
        help="test processes for runtests.py: a number or 'auto' (default: 1)",
    )
    parser.add_argument(
        "--verbosity",
        type=int,
        choices=[0, 1, 2, 3],
        default=1,
        help="runtests.py --verbosity; 2 lists every test with its outcome, handy "
        "for diffing two runs (default: 1)",
    )
    parser.add_argument(
        "--db-prefix",
        default="django_suite",
        help="database names are <prefix>_default / <prefix>_other; use another "
        "prefix to run two suites against one cluster at once (default: %(default)s)",
    )
    parser.add_argument(
        "--use-tz",
        action="store_true",
        help="USE_TZ = True in the settings; Django's suite is written for USE_TZ = "
        "False (its own tests/test_sqlite.py) and then errors on naive datetimes in "
        "~66 tests of these labels, whole test classes included",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="do not pip-install missing test dependencies, only warn",
    )
    parser.add_argument(
        "--no-preclean",
        action="store_true",
        help="do not drop leftover test_<prefix>_* databases before the run",
    )
    args = parser.parse_args()
    if args.parallel != "auto":
        try:
            if int(args.parallel) < 1:
                raise ValueError
        except ValueError:
            parser.error("--parallel must be a positive number or 'auto'")
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", args.db_prefix):
        parser.error("--db-prefix must be a lowercase SQL identifier")
    return args


# ---------------------------------------------------------------------------
# Django's source distribution


def django_version():
    try:
        import django
    except ImportError:
        die("Django is not installed (pip install -r tests/python/requirements.txt)")
    return django.__version__


def find_sdist(directory, version):
    """The sdist tarball for `version` in `directory` (Django-x.tar.gz or django-x.tar.gz)."""
    if not directory.is_dir():
        return None
    wanted = f"django-{version}.tar.gz"
    for path in directory.iterdir():
        if path.is_file() and path.name.lower() == wanted:
            return path
    return None


def ensure_sdist(version, workdir):
    tarball = find_sdist(workdir, version)
    if tarball is not None:
        log(f"using cached {tarball}")
        return tarball
    log(f"downloading the Django {version} source distribution with pip")
    # Download into a scratch directory and move the tarball in only when complete,
    # so an interrupted download never looks like a cached one.
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=workdir))
    try:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps",
            "--no-binary", ":all:", f"django=={version}", "-d", str(scratch),
        ]
        log("$ " + " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            die(f"pip could not download django=={version}")
        got = find_sdist(scratch, version)
        if got is None:
            die(f"pip download did not produce django-{version}.tar.gz in {scratch}")
        tarball = workdir / got.name
        os.replace(got, tarball)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tarball


def ensure_source_tree(tarball, version, workdir):
    """Extract the sdist once; returns the tree holding django/ and tests/runtests.py."""
    srcdir = workdir / f"django-{version}"
    if (srcdir / "tests" / "runtests.py").is_file() and (srcdir / "django").is_dir():
        return srcdir
    if srcdir.exists():
        log(f"removing incomplete {srcdir}")
        shutil.rmtree(srcdir)
    log(f"extracting {tarball.name}")
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=workdir))
    try:
        with tarfile.open(tarball) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(scratch, filter="data")
            else:
                tar.extractall(scratch)
        tops = [p for p in scratch.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / "tests" / "runtests.py").is_file():
            die(f"{tarball} does not hold <top>/tests/runtests.py")
        os.replace(tops[0], srcdir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return srcdir


# ---------------------------------------------------------------------------
# Test dependencies


def have(module):
    return importlib.util.find_spec(module) is not None


def dist_version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def labels_cover(labels, target):
    """True if running `labels` runs (part of) the test package `target`."""
    if not labels:
        return True  # the whole suite
    for label in labels:
        if label == target or label.startswith(target + ".") or target.startswith(label + "."):
            return True
    return False


def ensure_test_deps(labels, parallel, no_install, engine="postgresql"):
    needed = []
    if engine == "mysql":
        if not have("MySQLdb"):
            needed.append(("mysqlclient>=1.4.3", "the MySQL backend"))
    else:
        psycopg3 = have("psycopg")
        if not psycopg3 and not have("psycopg2"):
            needed.append(("psycopg[binary]>=3.1.8", "the PostgreSQL backend"))
            psycopg3 = True
        if psycopg3 and labels_cover(labels, "backends.postgresql"):
            pool = dist_version("psycopg-pool")
            if pool is None or version_tuple(pool) < (3, 2):
                needed.append(("psycopg-pool>=3.2.0", "backends.postgresql's connection pool tests"))
    if parallel != "1" and not have("tblib"):
        needed.append(("tblib>=1.5.0", "tracebacks of failures under --parallel"))
    if not needed:
        return
    specs = [spec for spec, _ in needed]
    for spec, why in needed:
        log(f"needs {spec} for {why}")
    if no_install:
        log("--no-install: not installing them; affected tests will error")
        return
    cmd = [sys.executable, "-m", "pip", "install", *specs]
    log("$ " + " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        die("pip install failed")
    importlib.invalidate_caches()


# ---------------------------------------------------------------------------
# Settings and database cleanup


def settings_module(args):
    """The settings module's name: the PostgreSQL one is fixed; a MySQL run's has its
    engine and prefix in it, so concurrent runs never rewrite each other's."""
    if args.engine == "mysql":
        return f"switchyard_django_suite_mysql_{args.db_prefix}"
    return SETTINGS_MODULE


def write_settings(args, workdir):
    def alias(suffix):
        if args.engine == "mysql":
            return {
                "ENGINE": "django.db.backends.mysql",
                "HOST": args.host,
                "PORT": str(args.port),
                "USER": args.user,
                "PASSWORD": args.password,
                "NAME": f"{args.db_prefix}_{suffix}",
                "CONN_MAX_AGE": 0,
                "OPTIONS": {"charset": "utf8mb4"},
                "TEST": {"CHARSET": "utf8mb4"},
            }
        return {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": args.host,
            "PORT": str(args.port),
            "USER": args.user,
            "PASSWORD": args.password,
            "NAME": f"{args.db_prefix}_{suffix}",
            "CONN_MAX_AGE": 0,
        }

    text = f'''"""Django test-suite settings written by tests/python/django_suite.py. Do not edit."""

DATABASES = {{
    "default": {alias("default")!r},
    "other": {alias("other")!r},
}}

SECRET_KEY = "django_tests_secret_key"

PASSWORD_HASHERS = [
    "django.contrib.auth.hashers.MD5PasswordHasher",
]

DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

USE_TZ = {bool(args.use_tz)!r}
'''
    path = workdir / f"{settings_module(args)}.py"
    tmp = path.with_suffix(".py.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    shutil.rmtree(workdir / "__pycache__", ignore_errors=True)
    log(f"wrote {path}")


def preclean_mysql(args, pattern):
    """preclean() for --engine mysql: with MySQLdb, no default database."""
    try:
        import MySQLdb

        conn = MySQLdb.connect(
            host=args.host, port=args.port, user=args.user,
            password=args.password, connect_timeout=10, charset="utf8mb4",
        )
        try:
            cur = conn.cursor()
            cur.execute("SHOW DATABASES LIKE %s", (pattern,))
            names = sorted(row[0] for row in cur.fetchall())
            for name in names:
                quoted = "`" + name.replace("`", "``") + "`"
                log(f"dropping leftover database {name}")
                cur.execute(f"DROP DATABASE IF EXISTS {quoted}")
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"warning: could not drop leftover test databases: {exc!r}")


def preclean(args):
    """Drop test_<prefix>_* databases an interrupted run may have left behind.

    runtests.py --noinput drops an old test database by itself, but a plain DROP
    fails while sessions are still connected to it; WITH (FORCE) (PostgreSQL 13+)
    ends them first. Any problem here is only a warning: the runner tries anyway.
    """
    pattern = "test\\_" + args.db_prefix.replace("_", "\\_") + "\\_%"
    if args.engine == "mysql":
        preclean_mysql(args, pattern)
        return
    params = dict(
        host=args.host, port=args.port, user=args.user,
        password=args.password, dbname="postgres", connect_timeout=10,
    )
    try:
        try:
            import psycopg

            conn = psycopg.connect(**params, autocommit=True)
        except ImportError:
            import psycopg2

            conn = psycopg2.connect(**params)
            conn.autocommit = True
        try:
            cur = conn.cursor()
            cur.execute("SHOW server_version_num")
            force = int(cur.fetchone()[0]) >= 130000
            cur.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1",
                (pattern,),
            )
            names = [row[0] for row in cur.fetchall()]
            for name in names:
                quoted = '"' + name.replace('"', '""') + '"'
                log(f"dropping leftover database {name}")
                cur.execute(
                    f"DROP DATABASE IF EXISTS {quoted}" + (" WITH (FORCE)" if force else "")
                )
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - best effort
        log(f"warning: could not drop leftover test databases: {exc!r}")


# ---------------------------------------------------------------------------
# Running and summarising

RAN_RE = re.compile(r"^Ran (\d+) tests? in ([0-9.]+)s\s*$")
RESULT_RE = re.compile(r"^(OK|FAILED)(?: \((.*)\))?\s*$")


class Summary:
    def __init__(self):
        self.ran = 0
        self.seconds = None
        self.counts = {}

    def feed(self, line):
        m = RAN_RE.match(line)
        if m:
            self.ran = int(m.group(1))
            self.seconds = float(m.group(2))
            self.counts = {}
            return
        m = RESULT_RE.match(line)
        if m and self.seconds is not None:
            self.counts = {}
            for part in (m.group(2) or "").split(","):
                key, sep, value = part.strip().partition("=")
                if sep and value.strip().isdigit():
                    self.counts[key.strip()] = int(value)

    def line(self, wall):
        c = self.counts
        seconds = self.seconds if self.seconds is not None else wall
        return (
            f"django-suite: ran={self.ran} failures={c.get('failures', 0)} "
            f"errors={c.get('errors', 0)} skipped={c.get('skipped', 0)} "
            f"expected_failures={c.get('expected failures', 0)} seconds={seconds:.3f}"
        )


def run_suite(args, srcdir, workdir):
    env = dict(os.environ)
    # The settings module lives in the workdir; the extracted tree's own `django`
    # package goes first so the tests run against exactly the code they were written
    # for (the same version as the installed one).
    path = [str(workdir), str(srcdir)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("DJANGO_SETTINGS_MODULE", None)
    cmd = [
        sys.executable, "-u", "runtests.py", f"--settings={settings_module(args)}",
        "--noinput", "--parallel", args.parallel, f"--verbosity={args.verbosity}",
        *args.labels,
    ]
    log(f"$ cd {srcdir / 'tests'} && " + " ".join(cmd))
    summary = Summary()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=srcdir / "tests", env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    out = sys.stdout.buffer
    try:
        for raw in proc.stdout:
            out.write(raw)
            out.flush()
            summary.feed(raw.decode("utf-8", "replace").rstrip("\r\n"))
        rc = proc.wait()
    except KeyboardInterrupt:
        # The runner got the same SIGINT (same process group); let it clean up.
        try:
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        except (subprocess.TimeoutExpired, OSError):
            proc.kill()
            rc = proc.wait()
        rc = rc if rc else 130
    wall = time.monotonic() - start
    log(f"runner exit code {rc}, wall time {wall:.1f}s")
    print(summary.line(wall), flush=True)
    # A signal death shows as a negative code; report it the way a shell would.
    return rc if rc >= 0 else 128 - rc


def main():
    args = parse_args()
    workdir = args.workdir.expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    version = django_version()
    log(f"Django {version}; server {args.host}:{args.port} as {args.user}")
    if args.engine != "postgresql":
        log(f"engine {args.engine}")
    tarball = ensure_sdist(version, workdir)
    srcdir = ensure_source_tree(tarball, version, workdir)
    ensure_test_deps(args.labels, args.parallel, args.no_install, args.engine)
    write_settings(args, workdir)
    if not args.no_preclean:
        preclean(args)
    sys.exit(run_suite(args, srcdir, workdir))


if __name__ == "__main__":
    main()

"""The three suites: where their tests come from, how they are run against one port,
and how their outcomes are read."""

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sybench.procs import log

from . import results
from .env import PASSWORD, USER

REPO = Path(__file__).resolve().parents[2]

PSYCOPG_VERSION = "3.3.4"
SQLALCHEMY_VERSION = "2.0.58"

PSYCOPG_SLICE = [
    "tests/test_notify.py", "tests/test_connection.py", "tests/test_column.py", "tests/pool/",
    "tests/test_copy.py", "tests/test_cursor*.py", "tests/test_pipeline*.py",
    "tests/test_prepared*.py", "tests/test_transaction*.py",
]
PSYCOPG_FULL = ["tests/"]

SQLALCHEMY_SLICE = ["test/dialect/postgresql"]
SQLALCHEMY_FULL = [
    "test/dialect", "test/sql", "test/engine",
    "test/orm/test_query.py", "test/orm/test_transaction.py",
]

# The labels tests/pooling.rs runs (the slice), and a wider set of database-heavy ones.
DJANGO_SLICE = ["basic", "queries", "transactions", "backends"]
DJANGO_FULL = DJANGO_SLICE + [
    "aggregation", "annotations", "expressions", "lookup", "model_fields", "bulk_create",
    "get_or_create", "select_for_update", "delete", "update", "prefetch_related",
    "many_to_one", "select_related",
]


def cache_dir():
    d = Path(os.environ.get("SWITCHYARD_COMPAT_CACHE", Path.home() / ".cache" / "switchyard-compat"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def suites_dir():
    """Where psycopg's tests tarball lives: $SWITCHYARD_SUITES, ../shared/suites beside
    the repository, or /work/shared/suites."""
    for cand in (os.environ.get("SWITCHYARD_SUITES"), REPO.parent / "shared" / "suites",
                 "/work/shared/suites"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    raise RuntimeError("psycopg's tests not found: set SWITCHYARD_SUITES to the folder "
                       f"holding psycopg-{PSYCOPG_VERSION}-tests.tar.gz")


def extract(tarball, dest, marker):
    """Extract `tarball` (one top folder) to `dest` once; `marker` proves it is complete."""
    if (dest / marker).exists():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    log(f"extracting {tarball} to {dest}")
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        with tarfile.open(tarball) as tar:
            tar.extractall(scratch, filter="data")
        tops = [p for p in scratch.iterdir() if p.is_dir()]
        if len(tops) != 1 or not (tops[0] / marker).exists():
            raise RuntimeError(f"{tarball} does not hold <top>/{marker}")
        os.replace(tops[0], dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def check_version(module, dist, want):
    import importlib.metadata

    try:
        have = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        have = None
    if have != want:
        raise RuntimeError(f"{dist}=={want} is needed (found {have}): run scripts/install-deps.sh "
                           "or pip install -r tests/python/requirements.txt")


def clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    # harness.pytest_marks, the pytest plugin of ours
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "compat")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Suite:
    name = ""
    database = None
    db_setup = ()

    def __init__(self, full):
        self.full = full

    def prepare(self):
        pass

    def command(self, port, junit, workdir):
        raise NotImplementedError

    def read(self, result, junit, log_text, completed):
        raise NotImplementedError


class PytestSuite(Suite):
    def pytest_args(self, junit, workdir, tag):
        return [
            sys.executable, "-m", "pytest",
            "-p", "no:randomly",              # the same order through every target
            "-o", "junit_family=xunit1",      # testcases carry their file
            "-o", f"cache_dir={workdir}/pytest-cache-{tag}",
            f"--junitxml={junit}",
            "--timeout=300",                  # a hang is a failure, not the end of the run
            "-p", "harness.pytest_marks",     # markers into the junit XML
        ] + ([] if self.full else [
            # The slices run in the default test command, on a debug build, on a machine
            # that may be busy: a test failing three times in a row fails; one that
            # passes on a rerun is reported as such in the junit XML, not hidden.
            "--reruns", "2",
        ])

    def read(self, result, junit, log_text, completed):
        if os.path.exists(junit):
            try:
                results.read_junit(junit, result)
            except Exception as e:  # noqa: BLE001 - a truncated file after a crash
                log(f"could not read {junit}: {e}")
        # pytest: 0 all passed, 1 some failed; anything else is a broken run.
        ok = completed and result.exit_code in (0, 1) and os.path.exists(junit)
        if ok:
            result.add(results.RUN_ID, results.PASSED)
        else:
            result.add(results.RUN_ID, results.ERROR, last_error_line(log_text) or
                       f"pytest exit code {result.exit_code}")


class Psycopg(PytestSuite):
    name = "psycopg"
    database = "psycopg_test"

    def prepare(self):
        check_version("psycopg", "psycopg", PSYCOPG_VERSION)
        tarball = suites_dir() / f"psycopg-{PSYCOPG_VERSION}-tests.tar.gz"
        self.root = extract(tarball, cache_dir() / f"psycopg-{PSYCOPG_VERSION}", "tests/conftest.py")
        # tests/fix_proxy.py starts `tools/pproxy_fix.py` (a pproxy launcher of psycopg's
        # source tree, not in the tarball): on Python < 3.14 pproxy's own main does.
        shim = self.root / "tools" / "pproxy_fix.py"
        if not shim.exists():
            shim.parent.mkdir(exist_ok=True)
            shim.write_text("import sys\nfrom pproxy.server import main\n\nsys.exit(main())\n")

    def paths(self):
        out = []
        for pat in (PSYCOPG_FULL if self.full else PSYCOPG_SLICE):
            got = sorted(glob.glob(pat, root_dir=self.root))
            if not got:
                raise RuntimeError(f"psycopg suite: nothing matches {pat}")
            out += got
        return out

    def command(self, port, junit, workdir, tag):
        env = clean_env()
        env["PSYCOPG_TEST_DSN"] = (f"host=127.0.0.1 port={port} user={USER} password={PASSWORD} "
                                   f"dbname={self.database}")
        # The static typing checks run mypy on example files: minutes of CPU, no database.
        argv = self.pytest_args(junit, workdir, tag) + ["-v", "-m", "not mypy"]
        if not self.full:
            # psycopg's `timing` tests assert elapsed times ("can fail on cheese
            # hardware", its conftest says): through a debug build on a busy machine
            # they measure the machine. They run in the full suites (release build).
            argv[argv.index("not mypy")] = "not mypy and not timing"
            # The client's memory-leak checks: half the slice's time (about 190 s of
            # 390 s direct), and nothing a proxy could change.
            argv += ["-k", "not test_leak and not _leaks"]
        argv += self.paths()
        return argv, self.root, env


class SQLAlchemy(PytestSuite):
    name = "sqlalchemy"
    database = "sqla_test"
    db_setup = (
        f"CREATE SCHEMA test_schema AUTHORIZATION {USER}",
        f"CREATE SCHEMA test_schema_2 AUTHORIZATION {USER}",
        "CREATE EXTENSION hstore",
        "CREATE EXTENSION citext",
        "ALTER DATABASE sqla_test SET default_text_search_config = 'pg_catalog.english'",
    )

    def prepare(self):
        d = cache_dir()
        tarball = d / f"sqlalchemy-{SQLALCHEMY_VERSION}.tar.gz"
        if not tarball.exists():
            log(f"downloading the SQLAlchemy {SQLALCHEMY_VERSION} source distribution with pip")
            scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=d))
            try:
                subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "--no-binary", ":all:", f"SQLAlchemy=={SQLALCHEMY_VERSION}",
                                "-d", str(scratch)], check=True)
                got = [p for p in scratch.iterdir() if p.name.lower() == tarball.name]
                if not got:
                    raise RuntimeError("pip download gave no SQLAlchemy sdist")
                os.replace(got[0], tarball)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self.root = extract(tarball, d / f"sqlalchemy-{SQLALCHEMY_VERSION}", "test/conftest.py")

    def command(self, port, junit, workdir, tag):
        env = clean_env()
        env.pop("PYTHONNOUSERSITE", None)  # test/conftest.py then imports ./lib (this version)
        argv = self.pytest_args(junit, workdir, tag) + [
            "--dburi", f"postgresql+psycopg2://{USER}:{PASSWORD}@127.0.0.1:{port}/{self.database}",
            "-m", "not memory_intensive and not mypy",
            "--maxfail=100000", "-p", "no:cov",
            *(SQLALCHEMY_FULL if self.full else SQLALCHEMY_SLICE),
        ]
        return argv, self.root, env


class Django(Suite):
    name = "django"

    def prepare(self):
        check_version("django", "Django", DJANGO_VERSION)

    def command(self, port, junit, workdir, tag):
        env = clean_env()
        argv = [
            sys.executable, str(REPO / "tests/python/django_suite.py"),
            "--host", "127.0.0.1", "--port", str(port), "--user", USER, "--password", PASSWORD,
            "--parallel", "2", "--verbosity", "2", "--no-install",
            "--labels", *(DJANGO_FULL if self.full else DJANGO_SLICE),
        ]
        return argv, REPO, env

    def read(self, result, junit, log_text, completed):
        results.read_django(log_text, result)
        ran = "django-suite: ran=" in log_text and "\nRan " in log_text
        if completed and ran and result.exit_code in (0, 1):
            result.add(results.RUN_ID, results.PASSED)
        else:
            result.add(results.RUN_ID, results.ERROR,
                       last_error_line(log_text) or f"runner exit code {result.exit_code}")


DJANGO_VERSION = "5.2.19"

SUITES = {"psycopg": Psycopg, "sqlalchemy": SQLAlchemy, "django": Django}


def last_error_line(text):
    """The last line that looks like an exception or an error message."""
    for line in reversed(text.splitlines()):
        s = line.strip()
        if results.EXC_RE.match(s) or s.startswith(("ERROR", "FATAL", "Error", "error:")):
            return s[:400]
    return ""

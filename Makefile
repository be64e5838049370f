# The two commands of the README's quick start.
.PHONY: demo test deps compat compat-slice fuzz profile instructions chaos bench-failover dist helm-check

deps:
	@scripts/install-deps.sh

# A local primary + two streaming standbys with Switchyard in front (Ctrl-C cleans up).
demo: deps
	cargo run --release -- demo

# Everything: unit tests, then integration tests against real PostgreSQL clusters and
# real clients (psql, pgbench, psycopg 2/3, Django).
test: deps
	cargo test --all-targets --features fuzzing --no-fail-fast -- --test-threads=1

# Client libraries' own test suites (psycopg 3.3.4, SQLAlchemy 2.0.58, Django 5.2's
# runner) directly against PostgreSQL and through Switchyard in session, transaction
# and transaction + read/write split mode; fails on a test that passes direct and fails
# through Switchyard unless compat/allowlist.toml lists it. See compat/README.md.
# The full suites take about 85 minutes on 2 cores (psycopg ~15 min per target); the
# results go to compat/results/LATEST.md.
compat: deps
	cargo build --release
	SWITCHYARD_BIN=target/release/switchyard compat/run --report compat/results/LATEST.md

# The short slices of the same suites (minutes per target).
compat-slice: deps
	cargo build
	SWITCHYARD_BIN=target/debug/switchyard compat/run --slice

# Long fuzz runs: every decoder and the transaction-pooling machine, 1,000,000 seeded
# random inputs per target (SEED=n for another sequence). A failing input is printed as
# hex; `target/release/examples/fuzz replay TARGET HEX` runs it again.
SEED ?= 1
fuzz:
	cargo build --release --features fuzzing --example fuzz
	target/release/examples/fuzz all 1000000 $(SEED)

# perf profile of the transaction-mode data path under pgbench -S (flame graph with
# inferno: cargo install inferno).
profile:
	cargo build --release
	bench/profile --out bench/results/profile-$$(date +%Y-%m-%d)

# Instructions per pgbench -S transaction under callgrind, Switchyard beside PgBouncer,
# both protocols (bench/instructions; needs valgrind), about 4 minutes.
instructions:
	cargo build --release
	bench/instructions --mode simple
	bench/instructions --mode extended

# The fault suite's long runs: 30 minutes per seed, asynchronous and synchronous
# replication (chaos/README.md); reports go to chaos/results/. `make test` runs the
# short fixed-seed run (tests/chaos_short.rs).
SEEDS ?= 1 2 3
chaos: deps
	cargo build --release
	for s in $(SEEDS); do \
	  chaos/run --binary target/release/switchyard --seed $$s --duration 30m --results 30m-seed$$s || exit 1; \
	  chaos/run --binary target/release/switchyard --seed $$s --duration 30m --sync --results 30m-sync-seed$$s || exit 1; \
	done

# Failover and switchover timings (automatic failover after kill -9 / SIGSTOP, one
# instance and two through etcd; switchover hold), 3 rounds, about 5 minutes.
bench-failover: deps
	bench/failover --rounds 3

# Release artifacts in dist/ (packaging/dist): switchyard_VERSION_amd64.deb,
# switchyard-VERSION-x86_64-linux.tar.gz and the OCI image archive switchyard-VERSION.oci.tar
# (built with buildah, as root; NO_IMAGE=1 skips it). `packaging/check dist` (root)
# installs, checks and purges them. See docs/src/operations/install.md.
dist: deps
	cargo build --release
	packaging/dist $(if $(NO_IMAGE),--no-image) target/release/switchyard dist

# The Helm chart deploy/helm/switchyard (deploy/helm/check): helm lint --strict and helm
# template with Helm 3 and 4 and each values file of its ci/, the manifests validated
# against the Kubernetes schemas and what the chart promises, the ConfigMap's configs
# with `switchyard check` (SWITCHYARD_BIN, default target/debug/switchyard if built),
# and the values it must refuse. Installs its tools itself. See
# docs/src/operations/kubernetes.md.
helm-check:
	deploy/helm/check

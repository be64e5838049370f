# The two commands of the README's quick start.
.PHONY: demo test deps

deps:
	@scripts/install-deps.sh

# A local primary + two streaming standbys with Switchyard in front (Ctrl-C cleans up).
demo: deps
	cargo run --release -- demo

# Everything: unit tests, then integration tests against real PostgreSQL clusters and
# real clients (psql, pgbench, psycopg 2/3, Django).
test: deps
	cargo test --all-targets -- --test-threads=1

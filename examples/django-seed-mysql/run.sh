#!/usr/bin/env bash
# The first seed article's app behind Switchyard: start the MariaDB demo cluster (a
# primary, two GTID replicas), migrate, run the app, kill both replicas while it runs
# (the article's "slave is down"), and show that it kept serving, its reads now on the
# primary.
#
# SECONDS_TOTAL (30) and KILL_AFTER (8) set the run's length and when the replicas
# stop; RW_PORT, RO_PORT, HTTP_PORT the demo's ports; SWITCHYARD its binary (built with
# cargo when missing).
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
sy=${SWITCHYARD:-$root/target/release/switchyard}
if [[ ! -x $sy ]]; then
    (cd "$root" && cargo build --release --quiet)
fi
total=${SECONDS_TOTAL:-30}
kill_after=${KILL_AFTER:-8}
rw=${RW_PORT:-6446} ro=${RO_PORT:-6447} http=${HTTP_PORT:-9931}

log=$(mktemp)
"$sy" demo --engine mariadb --rw-port "$rw" --ro-port "$ro" --http-port "$http" >"$log" 2>&1 &
demo=$!
trap 'kill -INT $demo 2>/dev/null || true; wait $demo 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 240); do
    grep -q "failover2 up standby" "$log" && break
    kill -0 $demo 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
done
grep -q "failover2 up standby" "$log" || { cat "$log"; echo "the demo cluster did not come up"; exit 1; }
echo "== demo cluster up; Switchyard on ports $rw (default) and $ro (follower)"

export SY_RW_PORT=$rw SY_RO_PORT=$ro
python3 manage.py migrate --noinput -v 0
python3 manage.py keep_serving --wait-only
echo "== migrated; the app runs for $total s, the replicas stop after $kill_after s"
python3 manage.py keep_serving --seconds "$total" &
app=$!
sleep "$kill_after"
for replica in failover1 failover2; do
    sock=$(grep -o "/[^ ]*/$replica.sock" "$log" | head -1)
    pid=$(pgrep -f -- "--socket=$sock" | head -1)
    echo "== killing replica $replica (kill -9 $pid)"
    kill -9 "$pid"
done
wait $app
echo "== what Switchyard saw:"
grep -E "^\[[0-9:]+\] cluster main" "$log" | tail -2

#!/usr/bin/env bash
# The second seed article's app behind Switchyard: start the demo cluster (a primary,
# two standbys, Switchyard with failover = "automatic"), migrate, run the app, kill the
# primary while it runs, and show that it kept serving.
#
# SECONDS_TOTAL (30) and KILL_AFTER (8) set the run's length and when the primary
# dies; RW_PORT, RO_PORT, HTTP_PORT the demo's ports; SWITCHYARD its binary (built with
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
rw=${RW_PORT:-6432} ro=${RO_PORT:-6433} http=${HTTP_PORT:-9930}

log=$(mktemp)
"$sy" demo --rw-port "$rw" --ro-port "$ro" --http-port "$http" --failover automatic >"$log" 2>&1 &
demo=$!
trap 'kill -INT $demo 2>/dev/null || true; wait $demo 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 240); do
    grep -q "failover2 up standby" "$log" && break
    kill -0 $demo 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.5
done
grep -q "failover2 up standby" "$log" || { cat "$log"; echo "the demo cluster did not come up"; exit 1; }
echo "== demo cluster up; Switchyard on port $rw"

export SY_RW_PORT=$rw
python3 manage.py migrate --noinput -v 0
python3 manage.py keep_serving --wait-only
echo "== migrated; the app runs for $total s, the primary dies after $kill_after s"
python3 manage.py keep_serving --seconds "$total" &
app=$!
sleep "$kill_after"
stop=$(grep -o "runuser -u postgres -- .* -m immediate stop" "$log" | head -1)
echo "== killing the primary: $stop"
eval "$stop" >/dev/null
wait $app
echo "== what Switchyard saw:"
grep -E "^\[[0-9:]+\] cluster main" "$log" | tail -3

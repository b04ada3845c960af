#!/usr/bin/env bash
# Server time per command while `relq-bench redis` consumes: starts the scenario, waits until it
# is consuming (the preload is done), resets INFO commandstats, samples for a few seconds and
# prints each command's calls and microseconds per call (a script's EVALSHA includes the
# commands it ran, which are listed too).
#
#   bench/redis-commandstats.sh [SCENARIO] [BINARY]
#   bench/redis-commandstats.sh worker-concurrent target/release/relq-bench
#   bench/redis-commandstats.sh worker-retry-throughput /tmp/relq-old   (an old `relq` binary)
set -euo pipefail
scenario=${1:-worker-concurrent}
bin=${2:-target/release/relq-bench}
command -v redis-cli >/dev/null || { echo "MISSING: redis-cli (apt-get install redis-server)" >&2; exit 1; }
case "$(basename "$bin")" in relq-bench*) cmd=(redis) ;; *) cmd=(bench redis) ;; esac
out=$(mktemp)
trap 'rm -f "$out"; kill "$pid" 2>/dev/null || true' EXIT
"$bin" --json "${cmd[@]}" --only "$scenario" --messages 1000000 >"$out" 2>&1 &
pid=$!
# The scenario's own redis-server: the newest one started after the bench.
port=""
for _ in $(seq 1 100); do
  port=$(pgrep -n -a redis-server | awk -F: '{print $NF}' || true)
  [ -n "$port" ] && redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
[ -n "$port" ] || { echo "no redis-server found" >&2; exit 1; }
# Consuming once acks appear.
for _ in $(seq 1 600); do
  redis-cli -p "$port" info commandstats | grep -q '^cmdstat_xack:' && break
  sleep 0.1
done
redis-cli -p "$port" config resetstat >/dev/null
sleep "${SAMPLE:-3}"
redis-cli -p "$port" info commandstats | grep '^cmdstat_' | grep -v ':calls=0,' \
  | sed -E 's/^cmdstat_([^:]+):calls=([0-9]+),usec=([0-9]+),usec_per_call=([0-9.]+).*/\1 \2 \3 \4/' \
  | sort -k3 -nr | awk 'BEGIN {printf "%-24s %10s %12s %12s\n", "command", "calls", "usec", "usec/call"} {printf "%-24s %10d %12d %12.2f\n", $1, $2, $3, $4}'

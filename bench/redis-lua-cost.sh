#!/usr/bin/env bash
# What a Lua script costs Redis per stream entry: the same work inside and outside EVAL, on a
# throwaway redis-server with 300 entries of 100 bytes pending for one consumer. Each line runs
# one script 200 times and prints the server's microseconds per EVAL (INFO commandstats).
#
#   bench/redis-lua-cost.sh
set -euo pipefail
command -v redis-server >/dev/null || { echo "MISSING: redis-server (apt-get install redis-server)" >&2; exit 1; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir" --daemonize yes --pidfile "$dir/pid" >/dev/null
trap 'kill "$(cat "$dir/pid")" 2>/dev/null; rm -rf "$dir"' EXIT
r() { redis-cli -p "$port" "$@"; }
for _ in $(seq 1 50); do r ping >/dev/null 2>&1 && break; sleep 0.1; done
data=$(printf 'x%.0s' $(seq 1 100))
for _ in $(seq 1 300); do echo "XADD s * type job data $data"; done | r >/dev/null
r XGROUP CREATE s g 0 >/dev/null
r XREADGROUP GROUP g a COUNT 1000 STREAMS s '>' >/dev/null
claim='local ids = redis.call("XRANGE", KEYS[1], "-", "+", "COUNT", 50); local args = {KEYS[1], "g", "b", 0}; for _, e in ipairs(ids) do args[#args+1] = e[1] end;'
declare -a names scripts
names+=("empty script"); scripts+=('return 1')
names+=("XRANGE 50 entries into Lua"); scripts+=('local ids = redis.call("XRANGE", KEYS[1], "-", "+", "COUNT", 50); return #ids')
names+=("XCLAIM 50 FORCE RETRYCOUNT, count returned"); scripts+=("$claim"' args[#args+1]="FORCE"; args[#args+1]="RETRYCOUNT"; args[#args+1]=2; return #redis.call("XCLAIM", unpack(args))')
names+=("XCLAIM 50 FORCE RETRYCOUNT, entries returned"); scripts+=("$claim"' args[#args+1]="FORCE"; args[#args+1]="RETRYCOUNT"; args[#args+1]=2; return redis.call("XCLAIM", unpack(args))')
names+=("XCLAIM 50 JUSTID"); scripts+=("$claim"' args[#args+1]="JUSTID"; return #redis.call("XCLAIM", unpack(args))')
names+=("50 ZADD calls"); scripts+=('for i = 1, 50 do redis.call("ZADD", "z", i, "m" .. i) end return 1')
names+=("50 XACK calls (nothing pending)"); scripts+=('for i = 1, 50 do redis.call("XACK", KEYS[1], "g", "0-1") end return 1')
printf '%-48s %10s   %s\n' "script" "us/EVAL" "inner commands (us/call)"
for i in "${!names[@]}"; do
  sha=$(r SCRIPT LOAD "${scripts[$i]}")
  r config resetstat >/dev/null
  for _ in $(seq 1 200); do echo "EVALSHA $sha 1 s"; done | r >/dev/null
  stats=$(r info commandstats)
  eval_us=$(grep '^cmdstat_evalsha:' <<<"$stats" | sed -E 's/.*usec_per_call=([0-9.]+).*/\1/')
  inner=$(grep '^cmdstat_' <<<"$stats" | grep -vE '^cmdstat_(evalsha|config|command)' | sed -E 's/^cmdstat_([^:]+):.*usec_per_call=([0-9.]+).*/\1 \2/' | tr '\n' ' ')
  printf '%-48s %10s   %s\n' "${names[$i]}" "$eval_us" "$inner"
done

#!/usr/bin/env bash
# CPU instructions per message of the consumer runtime on the in-memory backend, counted by
# callgrind (deterministic, unlike wall-clock time on a shared machine). Runs
# `relq bench memory` at two sizes under `valgrind --tool=callgrind` and reports the
# difference per message, so start-up and shut-down costs cancel out.
#
#   bench/callgrind.sh [BINARY ...]     (default target/release/relq-bench; a relq binary from
#                                        before relq-bench existed runs as `relq bench memory`)
#   SMALL=10000 LARGE=50000 bench/callgrind.sh target/release/relq-bench /tmp/relq-old
set -euo pipefail
command -v valgrind >/dev/null || { echo "MISSING: valgrind (apt-get install valgrind)" >&2; exit 1; }
small=${SMALL:-10000}
large=${LARGE:-50000}
[ "$#" -eq 0 ] && set -- target/release/relq-bench
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
instructions() { # binary, messages -> total instructions executed (every thread)
  # relq-bench takes `memory`; an old relq binary `bench memory` (valgrind does not follow the
  # exec by which a new relq hands `bench` to relq-bench, so measure relq-bench itself).
  case "$(basename "$1")" in relq-bench*) cmd=(memory) ;; *) cmd=(bench memory) ;; esac
  valgrind --tool=callgrind --callgrind-out-file="$out/cg" "$1" "${cmd[@]}" --current-thread --messages "$2" >/dev/null 2>"$out/log" \
    || { cat "$out/log" >&2; exit 1; }
  awk '/^summary:/ {print $2}' "$out/cg"
}
for bin in "$@"; do
  a=$(instructions "$bin" "$small")
  b=$(instructions "$bin" "$large")
  per=$(( (b - a) / (large - small) ))
  printf '%s: %d instructions per message (%d at %d messages, %d at %d)\n' "$bin" "$per" "$a" "$small" "$b" "$large"
done

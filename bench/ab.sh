#!/usr/bin/env bash
# Interleaved A/B runs of one benchmark: old, new, old, new, ... in the same sitting, so the
# machine's drift (15-40% between runs here) hits both builds alike. Prints each pair's figures
# and ratio, then the median ratio.
#
#   bench/ab.sh PAIRS FIELD 'OLD COMMAND' 'NEW COMMAND'
#
# Each command ends its output with a JSON document; FIELD is a key of it (dots for nesting).
#   bench/ab.sh 5 consume_messages_per_second \
#     '/tmp/relq-old --json bench memory --messages 1000000' \
#     'target/release/relq-bench --json memory --messages 1000000'
set -euo pipefail
[ "$#" -eq 4 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
pairs=$1 field=$2 old=$3 new=$4
command -v python3 >/dev/null || { echo "MISSING: python3" >&2; exit 1; }
value() { # command -> the field of the JSON document that ends its output
  bash -c "$1" 2>/dev/null | python3 -c '
import json, sys
lines = sys.stdin.read().splitlines()
# The last line that starts a document which parses to the end of the output.
for i in reversed(range(len(lines))):
    if lines[i].startswith("{"):
        try:
            v = json.loads("\n".join(lines[i:]))
            break
        except ValueError:
            continue
else:
    sys.exit("no JSON document at the end of the output")
for k in sys.argv[1].split("."):
    v = v[k]
print(v)' "$field"
}
ratios=()
for i in $(seq 1 "$pairs"); do
  a=$(value "$old")
  b=$(value "$new")
  line=$(python3 -c "
a, b = $a, $b
f = lambda v: f'{v:,.0f}' if abs(v) >= 100 else f'{v:.3g}'
print(f'{b / a:.2f} old {f(a)}  new {f(b)}')")
  r=${line%% *}
  ratios+=("$r")
  printf 'pair %d: %s  new/old %s\n' "$i" "${line#* }" "$r"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {m = NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2; printf "median new/old: %.2f (%d pairs)\n", m, NR}'

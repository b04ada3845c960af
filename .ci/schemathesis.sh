#!/usr/bin/env bash
# Property-based tests of the admin API from its own OpenAPI document (schemathesis, PyPI):
# no 5xx, every response matches the schema (status codes, content types, bodies, headers), and
# schema-violating requests are rejected. Runs against a `relq serve` on a data directory the
# demo filled (topics, groups, dead letters), with an admin token.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${RELQ_CI_VENV:-/tmp/relq-ci-venv}"
if [ ! -x "$venv/bin/schemathesis" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r .ci/requirements.txt
fi
"$venv/bin/schemathesis" --version

cargo build --quiet --bin relq
relq=target/debug/relq
data=$(mktemp -d)
log=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$data" "$log"' EXIT
"$relq" --url "file://$data" demo --messages 400 --json > /dev/null
token=$(openssl rand -hex 16)
RELQ_ADMIN_TOKEN=$token "$relq" --url "file://$data" --json serve --bind 127.0.0.1:0 > "$log" &
pid=$!
for _ in $(seq 100); do
  grep -q listening "$log" && break
  sleep 0.1
done
base=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["listening"])' "$log")
echo "relq serve at $base"
# positive_data_acceptance is excluded: some schema-valid requests are refused on purpose
# (a replay must choose ids, a filter or all; a type must be a valid name; a time must exist).
# use_after_free (ST301) is excluded: `DELETE /api/jobs/{id}` cancels a background job, which
# stays listed in state "cancelled" so an operator sees what it did; the stateful phase flagged
# that in one CI run of several (when it happened to cancel a live replay job). The deletes of
# topics, groups and dead letters are checked by the Rust tests (a deleted one is gone).
# Follow-up: a per-operation exclusion, or cancelling with `POST /api/jobs/{id}/cancel`.
"$venv/bin/schemathesis" run "$base/openapi.json" \
  --checks all --exclude-checks positive_data_acceptance,use_after_free \
  -H "Authorization: Bearer $token" \
  --max-examples 40 --seed 1 --workers 1

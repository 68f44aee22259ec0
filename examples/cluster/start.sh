#!/usr/bin/env bash
# Three Confab nodes on this machine, on the local PostgreSQL and Redis,
# behind HAProxy. Ctrl-C stops everything.
#
#   examples/cluster/start.sh            # build (release) and run
#   DATABASE=postgres://… BROKER=redis://… examples/cluster/start.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."

DATABASE="${DATABASE:-postgres://postgres@127.0.0.1:5432/confab_cluster}"
BROKER="${BROKER:-redis://127.0.0.1:6379/?prefix=confab-example}"
export CONFAB_FRONT="${CONFAB_FRONT:-127.0.0.1:8080}"
export CONFAB_N1="${CONFAB_N1:-127.0.0.1:8081}"
export CONFAB_N2="${CONFAB_N2:-127.0.0.1:8082}"
export CONFAB_N3="${CONFAB_N3:-127.0.0.1:8083}"
export CONFAB_STATS="${CONFAB_STATS:-127.0.0.1:8404}"

command -v haproxy >/dev/null || { echo "needs haproxy: apt install haproxy" >&2; exit 1; }
if [[ -z "${CONFAB:-}" ]]; then
  (cd "$root" && cargo build --release --bin confab)
  CONFAB="$root/target/release/confab"
fi

# The database, once (PostgreSQL's trust auth as on a development machine).
db="${DATABASE##*/}"
admin="${DATABASE%/*}/postgres"
if ! psql "$admin" -Atc "select 1 from pg_database where datname = '$db'" | grep -q 1; then
  psql "$admin" -qc "create database \"$db\""
fi
"$CONFAB" db migrate --database "$DATABASE"

pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
mkdir -p "$here/logs"
for i in 1 2 3; do
  var="CONFAB_N$i"
  "$CONFAB" serve --database "$DATABASE" --broker "$BROKER" --node "n$i" \
    --http "${!var}" --line off >"$here/logs/n$i.log" 2>&1 &
  pids+=($!)
  echo "node n$i: pid $!, http://${!var}, log examples/cluster/logs/n$i.log"
done
haproxy -f "$here/haproxy.cfg" -db >"$here/logs/haproxy.log" 2>&1 &
pids+=($!)
echo "HAProxy: pid $!; chat at http://$CONFAB_FRONT/ (ws://$CONFAB_FRONT/ws), stats at http://$CONFAB_STATS/"
echo "Kill a node (kill -9 PID) and watch its clients move; Ctrl-C stops all."
wait -n "${pids[@]}" || true

#!/bin/bash
# Fan-out on one node and on a cluster of three (PostgreSQL + Redis), same
# machine, same run; the CPU each node and Redis spent. Needs the release
# build, the local PostgreSQL and Redis.
#   cargo build --release -p confab-server -p confab-bench
#   bench/fanout-cluster.sh            # results in bench/results/DATE/cluster
# CONFAB (the server binary) and OUT (the results' directory) may be set.
set -u
cd "$(dirname "$0")/.."
CONFAB=${CONFAB:-./target/release/confab}
OUT=${OUT:-bench/results/$(date +%F)/cluster}
mkdir -p "$OUT"
DB=postgres://postgres@127.0.0.1:5432/confab_bench_cluster
REDIS_PID=$(pgrep -x redis-server | head -1)
TICK=$(getconf CLK_TCK)

cpu() { awk '{print $14 + $15}' /proc/$1/stat; }   # user + system ticks
busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }   # machine, ticks
pg_cpu() { local t=0; for p in $(pgrep -x postgres); do t=$((t + $(cpu $p))); done; echo $t; }
fresh_db() {
  psql -q -h 127.0.0.1 -U postgres -c "drop database if exists confab_bench_cluster" \
    -c "create database confab_bench_cluster" 2>/dev/null
}
start_nodes() {   # N nodes; N=1 without a broker
  PIDS=(); SERVERS=""
  local prefix="bench-$$-$RANDOM"
  for i in $(seq 1 "$1"); do
    local port=$((18080 + i)) broker=()
    [ "$1" -gt 1 ] && broker=(--broker "redis://127.0.0.1:6379/?prefix=$prefix" --node "n$i")
    "$CONFAB" serve --config bench/confab.toml --http 127.0.0.1:$port \
      --database "$DB?pool_size=16&sslmode=disable" "${broker[@]}" > "$OUT/node-$1-$i.log" 2>&1 &
    PIDS+=($!)
    SERVERS="${SERVERS:+$SERVERS,}127.0.0.1:$port"
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:$port/healthz && break; sleep 0.1; done
  done
}
stop_nodes() { kill "${PIDS[@]}"; wait "${PIDS[@]}" 2>/dev/null; }

run() {   # nodes rooms members publishers rate
  local name="fanout-$1node-$2x$3-$5"
  local before=() r0 m0 g0; for p in "${PIDS[@]}"; do before+=($(cpu $p)); done
  r0=$(cpu $REDIS_PID); m0=$(busy); g0=$(pg_cpu)
  local t0=$(date +%s.%N)
  ./target/release/confab-bench --out "$OUT/$name.json" fanout --server "$SERVERS" \
    --rooms $2 --members $3 --publishers $4 --rate $5 --body 100 --duration-secs 10 2>/dev/null | tail -1
  local t1=$(date +%s.%N) cpus="" i=0
  for p in "${PIDS[@]}"; do
    cpus="$cpus $(echo "scale=2; ($(cpu $p) - ${before[$i]}) / $TICK / ($t1 - $t0)" | bc)"; i=$((i + 1))
  done
  local rcpu=$(echo "scale=2; ($(cpu $REDIS_PID) - $r0) / $TICK / ($t1 - $t0)" | bc)
  local mcpu=$(echo "scale=2; ($(busy) - $m0) / $TICK / ($t1 - $t0)" | bc)
  local gcpu=$(echo "scale=2; ($(pg_cpu) - $g0) / $TICK / ($t1 - $t0)" | bc)
  echo "$name node-cpu:$cpus redis-cpu: $rcpu postgres-cpu: $gcpu machine-busy: $mcpu of 2" | tee -a "$OUT/cpu.txt"
}

: > "$OUT/cpu.txt"
for nodes in 1 3; do
  fresh_db
  start_nodes $nodes
  for rate in 50 100 200; do run $nodes 1 1000 4 $rate; done
  for rate in 1000 2000 3000; do run $nodes 100 10 48 $rate; done
  stop_nodes
done

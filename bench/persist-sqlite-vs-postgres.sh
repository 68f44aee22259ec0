#!/bin/bash
# persist on SQLite and PostgreSQL, same machine, same run.
set -u
cd /work/main
OUT=bench/results/2026-11-22/pg
mkdir -p $OUT
run_server() {
  ./target/release/confab serve --config bench/confab.toml --http 127.0.0.1:18080 --database "$1" > $OUT/server-$2.log 2>&1 &
  echo $! > /tmp/bench-server.pid
  for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18080/healthz && break; sleep 0.1; done
}
stop_server() { kill $(cat /tmp/bench-server.pid); wait $(cat /tmp/bench-server.pid) 2>/dev/null; }
for backend in ${BACKENDS:-sqlite postgres}; do
  for senders in 50 200; do
    for mode in own one; do
      rm -rf /tmp/benchdb; mkdir -p /tmp/benchdb
      psql -q -h 127.0.0.1 -U postgres -c "drop database if exists confab_bench" -c "create database confab_bench" 2>/dev/null
      if [ $backend = sqlite ]; then db="sqlite:///tmp/benchdb/confab.db"; else db="postgres://postgres@127.0.0.1:5432/confab_bench?pool_size=16&sslmode=disable"; fi
      run_server "$db" "$backend-$senders-$mode"
      flag=""; [ $mode = one ] && flag="--one-room"
      ./target/release/confab-bench --out $OUT/persist-$backend-$senders-$mode.json persist --server 127.0.0.1:18080 --senders $senders --duration-secs 10 $flag 2>/dev/null | tail -3
      echo "== $backend $senders $mode"
      python3 -c "import json;d=json.load(open('$OUT/persist-$backend-$senders-$mode.json'));r=d.get('result',d);print(json.dumps({k:r[k] for k in r if k in ('acks_per_s','ack_latency','refused','out_of_order','acked')}))"
      curl -s http://127.0.0.1:18080/metrics | grep -E '^confab_store_commit_batch_size_(sum|count)' 
      stop_server
    done
  done
done

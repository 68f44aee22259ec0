#!/bin/bash
# What a server shows under one fan-out run: latencies from its /metrics (a
# send's accept to answer, deliveries, commits and their sizes), each
# thread's run time and run-queue wait (/proc/PID/task/*/schedstat), and
# the bytes it wrote to the block device per message stored (/proc/PID/io),
# all between 4 s and 8 s into the run.
#
#   bench/probe.sh BIN RATE [ROOMS MEMBERS PUBLISHERS]
#
# A fresh server (bench/confab.toml, a new SQLite database under $WORK,
# /tmp/confab-probe by default) on 127.0.0.1:18080; the fan-out is 100
# rooms of 10 members and 32 publishers unless given, 100-byte bodies, for
# 10 s. Environment variables reach the server (a throwaway build reads
# its switches from them). Needs a release build of confab-bench.
set -euo pipefail
bin=$1 rate=$2 rooms=${3:-100} members=${4:-10} publishers=${5:-32}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/confab-probe}
http=127.0.0.1:18080
rm -rf "$work"
mkdir -p "$work/db"
"$bin" serve --config "$root/bench/confab.toml" --http $http \
    --database "sqlite://$work/db/c.db" > "$work/server.log" 2>&1 &
server=$!
trap 'kill $server 2> /dev/null || true' EXIT
for _ in $(seq 100); do curl -sf http://$http/readyz > /dev/null && break; sleep 0.1; done
snap() {
    curl -s http://$http/metrics > "$work/metrics$1"
    for t in /proc/$server/task/*; do echo "$(cat "$t/comm") $(cat "$t/schedstat")"; done > "$work/sched$1"
    date +%s%N >> "$work/sched$1"
    grep '^write_bytes' /proc/$server/io > "$work/io$1"
}
(sleep 4; snap 1; sleep 4; snap 2) &
probe=$!
"$root/target/release/confab-bench" fanout --server-pid $server --server $http \
    --rooms "$rooms" --members "$members" --publishers "$publishers" --body 100 \
    --duration-secs 10 --rate "$rate" 2>&1 \
    | grep -E 'latency|CPU per' | sed 's/.*latency/latency/'
wait $probe
WORK=$work python3 - <<'PY'
import os, re
w = os.environ['WORK']

def metrics(f):
    d = {}
    for line in open(f):
        m = re.match(r'(\S+?)(\{.*\})? (\S+)$', line.strip())
        if m and not line.startswith('#'):
            d[(m.group(1), m.group(2) or '')] = float(m.group(3))
    return d

a, b = metrics(f'{w}/metrics1'), metrics(f'{w}/metrics2')

def hist(name, label=''):
    delta = lambda k: b[k] - a.get(k, 0)
    keys = [k for k in b if label in k[1]]
    n = sum(delta(k) for k in keys if k[0] == name + '_count')
    if not n:
        return 'none'
    total = sum(delta(k) for k in keys if k[0] == name + '_sum')
    buckets = sorted((float(re.search(r'le="([^"]+)"', k[1]).group(1)), delta(k))
                     for k in keys if k[0] == name + '_bucket')
    q = lambda p: next(le for le, c in buckets if c >= p * n)
    return f'n {n:.0f} mean {total / n:.5g}  p50<={q(.5)} p90<={q(.9)} p99<={q(.99)}'

print('send answered (s):', hist('confab_request_seconds', '"send"'))
print('delivered (s):    ', hist('confab_delivery_latency_seconds', 'ws'))
print('commit (s):       ', hist('confab_store_commit_seconds'))
print('commit (jobs):    ', hist('confab_store_commit_batch_size'))

s1 = open(f'{w}/sched1').read().split('\n')
s2 = open(f'{w}/sched2').read().split('\n')
wall = (int(s2[-2]) - int(s1[-2])) / 1e6

def threads(lines):
    d = {}
    for line in lines[:-2]:
        f = line.split()
        d[f[0]] = [x + int(y) for x, y in zip(d.get(f[0], [0, 0, 0]), f[1:])]
    return d

t1, t2 = threads(s1), threads(s2)
for name, (run, wait, slices) in t2.items():
    run0, wait0, slices0 = t1.get(name, [0, 0, 0])
    if (run - run0) / 1e6 > 10:
        print(f'{name:18} run {(run - run0) / 1e6:6.0f} ms  run-queue wait {(wait - wait0) / 1e6:6.0f} ms'
              f'  slices {slices - slices0:6d}  of {wall:.0f} ms')

stored = lambda m: m.get(('confab_messages_stored_total', ''), 0)
io = lambda n: int(open(f'{w}/io{n}').read().split()[-1])
messages = stored(b) - stored(a)
if messages:
    written = io(2) - io(1)
    print(f'messages stored {messages:.0f}, block bytes written {written / 1e6:.1f} MB'
          f' = {written / messages:.0f} B a message')
PY

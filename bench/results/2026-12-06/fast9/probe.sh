#!/bin/bash
# probe.sh BIN RATE: one fanout 100 x 10 against a fresh server, and what the
# server shows between 4 s and 8 s into it: latencies from /metrics (a
# send's accept to answer, deliveries, commits), each thread's run time and
# run-queue wait (/proc/PID/task/*/schedstat), and the bytes it wrote to the
# block device (/proc/PID/io) per message stored. Environment variables
# reach the server (the throwaway builds of experiments.patch read theirs).
# Run from the repository's root, after a release build.
set -u
bin=$1 rate=$2 work=${WORK:-/tmp/bench}
pkill -f "confab serve" 2>/dev/null; sleep 0.3
rm -rf "$work/db"; mkdir -p "$work/db"
"$bin" serve --config /work/main/bench/confab.toml --http 127.0.0.1:18080 \
    --database "sqlite://$work/db/c.db" > "$work/server.log" 2>&1 &
spid=$!
for _ in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz > /dev/null && break; sleep 0.1; done
snap() {
    curl -s http://127.0.0.1:18080/metrics > "$work/m$1"
    for t in /proc/$spid/task/*; do echo "$(cat "$t/comm") $(cat "$t/schedstat")"; done > "$work/s$1"
    date +%s%N >> "$work/s$1"
    grep -E "^write_bytes" /proc/$spid/io > "$work/io$1"
}
(sleep 4; snap 1; sleep 4; snap 2) & probe=$!
target/release/confab-bench fanout --server-pid $spid --server 127.0.0.1:18080 \
    --rooms 100 --members 10 --publishers 32 --body 100 --duration-secs 10 --rate "$rate" 2>&1 \
    | grep -E "latency|CPU per" | sed 's/.*latency/latency/'
wait $probe
kill $spid; wait $spid 2> /dev/null
WORK=$work python3 - <<'PY'
import os, re
w = os.environ['WORK']
def metrics(f):
    d = {}
    for l in open(f):
        m = re.match(r'(\S+?)(\{.*\})? (\S+)$', l.strip())
        if m and not l.startswith('#'):
            d[(m.group(1), m.group(2) or '')] = float(m.group(3))
    return d
a, b = metrics(f'{w}/m1'), metrics(f'{w}/m2')
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
s1, s2 = open(f'{w}/s1').read().split('\n'), open(f'{w}/s2').read().split('\n')
wall = (int(s2[-2]) - int(s1[-2])) / 1e6
def threads(lines):
    d = {}
    for l in lines[:-2]:
        f = l.split()
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
    print(f'messages stored {messages:.0f}, block bytes written {written / 1e6:.1f} MB = {written / messages:.0f} B a message')
PY

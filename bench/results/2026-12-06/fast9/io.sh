#!/bin/bash
# io.sh BIN RATE : block-device bytes the server wrote per message (/proc/PID/io write_bytes), 4 s mid-run, and the WAL frames
bin=$1 rate=$2
pkill -f "confab serve" 2>/dev/null; sleep 0.3
rm -rf /tmp/bench/db; mkdir -p /tmp/bench/db
$bin serve --config /work/main/bench/confab.toml --http 127.0.0.1:18080 --database sqlite:///tmp/bench/db/c.db >/tmp/bench/server.log 2>&1 &
spid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
(sleep 4; grep -E "^write_bytes|^wchar" /proc/$spid/io > /tmp/bench/io1; curl -s http://127.0.0.1:18080/metrics | grep -E "^confab_messages_stored_total|^confab_store_commit_seconds_count" >> /tmp/bench/io1; sleep 4; grep -E "^write_bytes|^wchar" /proc/$spid/io > /tmp/bench/io2; curl -s http://127.0.0.1:18080/metrics | grep -E "^confab_messages_stored_total|^confab_store_commit_seconds_count" >> /tmp/bench/io2) & ppid=$!
/work/main/target/release/confab-bench fanout --server-pid $spid --server 127.0.0.1:18080 --rooms 100 --members 10 --publishers 32 --body 100 --duration-secs 10 --rate $rate 2>&1 | grep -E "latency|CPU per" | sed 's/.*latency/latency/'
wait $ppid
kill $spid; wait $spid 2>/dev/null
ls -la /tmp/bench/db/
python3 - <<'PY'
def r(f): return {l.split()[0].rstrip(':'):float(l.split()[-1]) for l in open(f)}
a=r('/tmp/bench/io1'); b=r('/tmp/bench/io2')
m=b['confab_messages_stored_total']-a['confab_messages_stored_total']
c=b['confab_store_commit_seconds_count']-a['confab_store_commit_seconds_count']
wb=b['write_bytes']-a['write_bytes']
print('messages %d commits %d  block bytes written %.1f MB = %.0f B/message, %.0f B/commit'%(m,c,wb/1e6,wb/m,wb/c))
PY

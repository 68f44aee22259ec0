#!/bin/bash
# sched.sh BIN RATE: one fanout 100x10; each server thread's run time and run-queue wait (/proc/PID/task/*/schedstat) over 4 s mid-run
bin=$1 rate=$2
pkill -f "confab serve" 2>/dev/null; sleep 0.3
rm -rf /tmp/bench/db; mkdir -p /tmp/bench/db
$bin serve --config /work/main/bench/confab.toml --http 127.0.0.1:18080 --database sqlite:///tmp/bench/db/c.db >/tmp/bench/server.log 2>&1 &
spid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
(sleep 4; for t in /proc/$spid/task/*; do echo "$(cat $t/comm) $(cat $t/schedstat)"; done > /tmp/bench/s1; date +%s%N >> /tmp/bench/s1; sleep 4; for t in /proc/$spid/task/*; do echo "$(cat $t/comm) $(cat $t/schedstat)"; done > /tmp/bench/s2; date +%s%N >> /tmp/bench/s2) & ppid=$!
/work/main/target/release/confab-bench fanout --server-pid $spid --server 127.0.0.1:18080 --rooms 100 --members 10 --publishers 32 --body 100 --duration-secs 10 --rate $rate 2>&1 | grep -E "latency|CPU per" | sed 's/.*latency/latency/'
wait $ppid
kill $spid; wait $spid 2>/dev/null
python3 - <<'PY'
a=open('/tmp/bench/s1').read().split('\n'); b=open('/tmp/bench/s2').read().split('\n')
wall=(int(b[-2])-int(a[-2]))/1e6
def p(ls):
    d={}
    for l in ls[:-2]:
        f=l.split(); d.setdefault(f[0],[0,0,0]); d[f[0]]=[x+int(y) for x,y in zip(d[f[0]],f[1:])]
    return d
A=p(a);B=p(b)
for k in B:
    r=(B[k][0]-A.get(k,[0,0,0])[0])/1e6; w=(B[k][1]-A.get(k,[0,0,0])[1])/1e6; n=B[k][2]-A.get(k,[0,0,0])[2]
    if r>10: print('%-18s run %6.0f ms  runq-wait %6.0f ms  slices %6d  of wall %.0f ms'%(k,r,w,n,wall))
PY

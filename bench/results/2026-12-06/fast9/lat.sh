#!/bin/bash
# lat.sh BIN RATE [env] : one fanout 100x10; server-side latency from /metrics between 3 s and 7 s
bin=$1 rate=$2
pkill -f "confab serve" 2>/dev/null; sleep 0.3
rm -rf /tmp/bench/db; mkdir -p /tmp/bench/db
$bin serve --config /work/main/bench/confab.toml --http 127.0.0.1:18080 --database sqlite:///tmp/bench/db/c.db >/tmp/bench/server.log 2>&1 &
spid=$!
for i in $(seq 100); do curl -sf http://127.0.0.1:18080/readyz >/dev/null && break; sleep 0.1; done
(sleep 4; curl -s http://127.0.0.1:18080/metrics > /tmp/bench/m1; sleep 4; curl -s http://127.0.0.1:18080/metrics > /tmp/bench/m2) & mp=$!
/work/main/target/release/confab-bench fanout --server-pid $spid --server 127.0.0.1:18080 --rooms 100 --members 10 --publishers 32 --body 100 --duration-secs 10 --rate $rate 2>&1 | grep -E "latency|CPU per" | sed 's/.*latency/latency/'
wait $mp
kill $spid; wait $spid 2>/dev/null
python3 - <<'PY'
import re
def load(f):
    d={}
    for l in open(f):
        if l.startswith('#'): continue
        m=re.match(r'(\S+?)(\{.*\})? (\S+)$',l.strip())
        if m: d[(m.group(1),m.group(2) or '')]=float(m.group(3))
    return d
a=load('/tmp/bench/m1'); b=load('/tmp/bench/m2')
def hist(name,flt=''):
    bk=sorted([(float(re.search(r'le="([^"]+)"',k[1]).group(1)),b[k]-a.get(k,0)) for k in b if k[0]==name+'_bucket' and flt in k[1]])
    s=sum(b[k]-a.get(k,0) for k in b if k[0]==name+'_sum' and flt in k[1]); c=sum(b[k]-a.get(k,0) for k in b if k[0]==name+'_count' and flt in k[1])
    if not c: return 'none'
    def q(p):
        for le,n in bk:
            if n>=p*c: return le
    return 'n %d mean %.2f ms  p50<=%s p90<=%s p99<=%s'%(c,s/c*1e3,q(.5),q(.9),q(.99))
names=sorted(set(k[0][:-7] for k in b if k[0].endswith('_bucket')))
for n in names:
    if 'delivery' in n: print(n, hist(n,'ws'))
    elif 'request' in n: print(n, hist(n,'send'))
    elif 'commit' in n: print(n, hist(n))
PY

#!/bin/bash
# How long a send waits when the network to PostgreSQL goes silent: no
# close, no reset, every packet dropped (a cable, a firewall, a host gone).
#
#   sudo bench/pg-netcut.sh [BIN] [SECONDS]
#
# A server (BIN, target/release/confab by default) in a network namespace of
# its own reaches the local PostgreSQL (127.0.0.1:5432, user postgres)
# through a veth pair and socat, on a fresh database `confab_netcut`. A line
# client sends a message (stored), the host's end of the pair stops
# answering (its address removed: what the server sends is dropped there in
# silence), and the client sends another: the script prints how long its
# answer took, or that none came within SECONDS (default 300). (A blackhole
# route in the server's namespace is not the same test: the server's own
# kernel then refuses to send, and counts its retries differently.) Extra
# URL parameters come from PARAMS (`PARAMS='?tcp_user_timeout=5000'`). Needs root, iproute2,
# socat, psql and python3; touches no other database or interface.
set -euo pipefail
bin=${1:-target/release/confab} wait=${2:-300}
work=$(mktemp -d)
cleanup() {
    set +e
    if [ -n "${srv:-}" ]; then
        kill "$srv" 2> /dev/null
        wait "$srv" 2> /dev/null
    fi
    pkill -f "TCP-LISTEN:15432,bind=10.77.0.1"
    ip netns del cfab 2> /dev/null
    ip link del cfh 2> /dev/null
    psql -h 127.0.0.1 -U postgres -qAt \
        -c "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = 'confab_netcut'" \
        -c "DROP DATABASE IF EXISTS confab_netcut" > /dev/null
    rm -rf "$work"
}
trap cleanup EXIT
ip netns add cfab
ip link add cfh type veth peer name cfn
ip link set cfn netns cfab
ip addr add 10.77.0.1/24 dev cfh
ip link set cfh up
# A host that forwards would answer a packet for an address it no longer
# has with an ICMP error; this one must drop it without a word.
sysctl -qw net.ipv4.conf.cfh.forwarding=0
ip netns exec cfab ip addr add 10.77.0.2/24 dev cfn
ip netns exec cfab ip link set cfn up
ip netns exec cfab ip link set lo up
socat TCP-LISTEN:15432,bind=10.77.0.1,fork,reuseaddr TCP:127.0.0.1:5432 &
psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS confab_netcut" -c "CREATE DATABASE confab_netcut"
ip netns exec cfab "$bin" serve --http 127.0.0.1:18090 --line 127.0.0.1:18091 \
    --database "postgres://postgres@10.77.0.1:15432/confab_netcut${PARAMS:-}" > "$work/server.log" 2>&1 &
srv=$!
for _ in $(seq 100); do
    ip netns exec cfab curl -sf http://127.0.0.1:18090/readyz > /dev/null && break
    sleep 0.1
done
ip netns exec cfab env WORK="$work" WAIT="$wait" python3 - <<'PY' &
import os, socket, time
work = os.environ["WORK"]
s = socket.create_connection(("127.0.0.1", 18091))
s.settimeout(float(os.environ["WAIT"]))
f = s.makefile("rb")
def send(line):
    s.sendall((line + "\n").encode())
def until(pred):
    while True:
        line = f.readline().decode().rstrip()
        if pred(line):
            return line
answer = lambda l: l.startswith("[cut #") or l.startswith("!")
send("/nick cutter"); until(lambda l: "cutter" in l)
send("/join cut"); until(lambda l: "cut" in l)
send("before the cut"); print("before the cut:", until(answer))
open(f"{work}/ready", "w").close()
while not os.path.exists(f"{work}/cut"):
    time.sleep(0.05)
t = time.monotonic()
send("during the cut")
try:
    # The answer first: an f-string evaluates left to right.
    line = until(answer)
    print(f"during the cut: answered after {time.monotonic() - t:.1f} s: {line}")
except socket.timeout:
    print(f"during the cut: no answer after {time.monotonic() - t:.1f} s")
PY
client=$!
while [ ! -e "$work/ready" ]; do sleep 0.05; done
# Everything the server sends to the database's side now goes nowhere: the
# host drops packets for an address it does not have, sending nothing back
# (no reset, no ICMP); the server's kernel sees only silence.
ip addr del 10.77.0.1/24 dev cfh
touch "$work/cut"
wait $client

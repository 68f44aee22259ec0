#!/usr/bin/env python3
"""Idle line connections: how much server memory each costs.

    bench/line-idle.py SERVER_PID CONNECTIONS LINE_PORT

Opens CONNECTIONS TCP connections to the line listener (source addresses
spread over 127.0.0.0/8), logs each in as a guest (`/nick`), waits 5 s and
prints the server's RSS growth per connection. (`confab-bench idle` does
the same for WebSocket.)
"""

import os
import resource
import socket
import sys
import time


def rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"no process {pid}")


def main():
    pid, n, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    base = rss(pid)
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.{1 + i // 62500}.{(i // 250) % 250}.{1 + i % 250}", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(f"/nick l{i}x{os.getpid()}\n".encode())
        socks.append(s)
    for s in socks:
        s.settimeout(30)
        seen = b""
        while b"* you are" not in seen:
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit(f"closed: {seen!r}")
            seen += chunk
    time.sleep(5)
    grown = rss(pid) - base
    print(f"line idle: {n} connections, server RSS +{grown // n} bytes/connection")


if __name__ == "__main__":
    main()

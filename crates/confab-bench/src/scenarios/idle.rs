//! `idle`: N logged-in WebSocket connections held open. What they cost the
//! server: resident memory (from /proc of `--server-pid`), the kernel's
//! socket memory (/proc/net/sockstat) and CPU while idle.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::json;

use crate::cpu::Cpu;
use crate::{client, source_addr, Progress};

pub struct Options {
    pub server: SocketAddr,
    pub server_pid: u32,
    pub connections: usize,
    pub concurrency: usize,
    /// How long to hold the connections (CPU is measured over this).
    pub hold: Duration,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub connections: usize,
    pub connected: usize,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Server RSS growth per connection.
    pub rss_per_connection_bytes: f64,
    pub sockstat_before_pages: u64,
    pub sockstat_after_pages: u64,
    /// Kernel TCP buffer memory per connection (both ends are on this machine).
    pub kernel_per_connection_bytes: f64,
    /// Server CPU while the connections were idle, in % of one core.
    pub idle_cpu_percent: f64,
    pub connect_seconds: f64,
    /// (RSS + kernel) per connection × 1,000,000, in GiB.
    pub projected_gib_per_million: f64,
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for {pid}"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

/// The `mem` of TCP in /proc/net/sockstat, in pages.
pub fn tcp_mem_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("TCP:"))?.to_owned();
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "mem" {
                    return words.next()?.parse().ok();
                }
            }
            None
        })
        .unwrap_or(0)
}

pub async fn run(o: Options) -> anyhow::Result<Outcome> {
    let rss_before = rss_kib(o.server_pid)?;
    let sock_before = tcp_mem_pages();
    let started = Instant::now();
    let mut progress = Progress::new("idle");
    let mut held = Vec::with_capacity(o.connections);
    let run_id = std::process::id();
    let mut next = 0;
    while next < o.connections {
        let batch: Vec<_> = (next..(next + o.concurrency.max(1)).min(o.connections))
            .map(|i| {
                let server = o.server;
                tokio::spawn(async move {
                    let mut ws = client::connect(server, source_addr(i)).await?;
                    client::call(
                        &mut ws,
                        json!({"type":"guest","user":format!("i{run_id}x{i}")}),
                    )
                    .await?;
                    anyhow::Ok(ws)
                })
            })
            .collect();
        next += batch.len();
        for t in batch {
            if let Ok(Ok(ws)) = t.await {
                held.push(ws);
            }
        }
        progress.show(next as u64, o.connections as u64, "connections");
    }
    progress.finish();
    let connect_seconds = started.elapsed().as_secs_f64();
    // Let the server settle before measuring.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_before = Cpu::of(o.server_pid).unwrap_or_default();
    let t = Instant::now();
    // Keep reading (answering the server's pings) while holding.
    let readers: Vec<_> = held
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                use futures_util::StreamExt;
                while let Some(Ok(_)) = ws.next().await {}
            })
        })
        .collect();
    tokio::time::sleep(o.hold).await;
    let idle_cpu_percent = (Cpu::of(o.server_pid).unwrap_or_default().total() - cpu_before.total())
        / t.elapsed().as_secs_f64()
        * 100.0;
    let rss_after = rss_kib(o.server_pid)?;
    let sock_after = tcp_mem_pages();
    let connected = readers.len();
    for r in readers {
        r.abort();
    }
    let per = |after: u64, before: u64, unit: f64| {
        (after.saturating_sub(before)) as f64 * unit / connected.max(1) as f64
    };
    let rss_per = per(rss_after, rss_before, 1024.0);
    let kernel_per = per(sock_after, sock_before, 4096.0);
    Ok(Outcome {
        connections: o.connections,
        connected,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        rss_per_connection_bytes: rss_per,
        sockstat_before_pages: sock_before,
        sockstat_after_pages: sock_after,
        kernel_per_connection_bytes: kernel_per,
        idle_cpu_percent,
        connect_seconds,
        projected_gib_per_million: (rss_per + kernel_per) * 1e6 / (1u64 << 30) as f64,
    })
}

//! `connect`: connections plus logins per second, as guests or with
//! `resume`; K workers, each connecting, logging in and closing in a loop,
//! with the lean client (`client::Lean`): the load generator shares the
//! server's cores, and tungstenite cost it more than the server spent.

use std::net::SocketAddr;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::Counter;
use crate::report::{Latency, Percentiles};
use crate::{client, source_addr, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Guest,
    Resume,
}

pub struct Options {
    pub server: SocketAddr,
    pub connections: usize,
    pub concurrency: usize,
    pub mode: Mode,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub mode: Mode,
    pub connections: usize,
    pub concurrency: usize,
    pub logged_in: u64,
    pub failed: u64,
    pub duration_s: f64,
    pub per_s: f64,
    /// From opening the TCP connection to the login's `ok`.
    pub latency: Percentiles,
}

pub async fn run(o: Options) -> anyhow::Result<Outcome> {
    let workers = o.concurrency.max(1).min(o.connections.max(1));
    let run_id = std::process::id();
    // Resume needs accounts and tokens: one per worker, made up front.
    let mut tokens = Vec::new();
    if o.mode == Mode::Resume {
        for w in 0..workers {
            let mut ws = client::connect(o.server, source_addr(w)).await?;
            let user = format!("b{run_id}x{w}");
            let r = client::call(
                &mut ws,
                json!({"type":"register","user":user,"password":"bench-password"}),
            )
            .await?;
            tokens.push(r["token"].as_str().unwrap_or_default().to_owned());
            let _ = ws.close(None).await;
        }
    }
    let done = Counter::default();
    let failed = Counter::default();
    let started = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let (done, failed) = (done.clone(), failed.clone());
            let token = tokens.get(w).cloned();
            let share = o.connections / workers + usize::from(w < o.connections % workers);
            let server = o.server;
            tokio::spawn(async move {
                let mut latency = Latency::default();
                for i in 0..share {
                    let t = Instant::now();
                    let login = async {
                        let mut ws = client::Lean::connect(server, source_addr(w)).await?;
                        let request = match &token {
                            Some(token) => json!({"type":"resume","token":token}),
                            None => json!({"type":"guest","user":format!("g{run_id}x{w}x{i}")}),
                        };
                        ws.call(request).await?;
                        let _ = ws.close().await;
                        anyhow::Ok(())
                    };
                    match login.await {
                        Ok(()) => {
                            latency.record(t.elapsed());
                            done.add(1);
                        }
                        Err(_) => failed.add(1),
                    }
                }
                latency
            })
        })
        .collect();
    let mut progress = Progress::new("connect");
    let total = o.connections as u64;
    while done.get() + failed.get() < total {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        progress.show(done.get() + failed.get(), total, "connections");
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    progress.finish();
    let mut latency = Latency::default();
    for t in tasks {
        latency.add(&t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Outcome {
        mode: o.mode,
        connections: o.connections,
        concurrency: workers,
        logged_in: done.get(),
        failed: failed.get(),
        duration_s: elapsed,
        per_s: done.get() as f64 / elapsed,
        latency: latency.percentiles(),
    })
}

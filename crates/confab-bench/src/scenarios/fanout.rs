//! `fanout`: R rooms × M members, P publishers at a fixed open-loop total
//! rate, bodies of B bytes. Every body carries its publisher, a per
//! (publisher, room) counter and its send time, so every subscriber counts
//! what it lost, got twice or out of order, and the latency of each
//! delivery. The same scenario runs against Confab, NATS and Redis.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use super::Counter;
use crate::cpu::{Cpu, CpuPerMessage};
use crate::report::{Latency, Percentiles};
use crate::{client, peers, source_addr, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Confab,
    Nats,
    Redis,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub system: System,
    /// Where clients connect, round robin: one server, or the nodes of a
    /// Confab cluster (members of one room land on different nodes).
    pub servers: Vec<SocketAddr>,
    pub rooms: usize,
    pub members: usize,
    pub publishers: usize,
    /// Messages per second, all publishers together.
    pub rate: u64,
    pub body: usize,
    pub duration: Duration,
    /// How long to wait for the last deliveries (and acks); what has not
    /// arrived by then counts as lost.
    pub drain: Duration,
    /// The server's processes (a cluster's nodes), when on this machine:
    /// their CPU from the first publish to the last delivery is reported
    /// per message. Empty: not measured.
    pub server_pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub system: System,
    pub rooms: usize,
    pub members: usize,
    pub publishers: usize,
    pub rate: u64,
    pub body_bytes: usize,
    pub duration_s: f64,
    pub published: u64,
    pub refused: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub deliveries_per_s: f64,
    pub latency: Percentiles,
    /// The server's CPU per accepted message, when its processes were
    /// given.
    pub server_cpu: Option<CpuPerMessage>,
    #[serde(skip)]
    pub histogram: Latency,
}

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    latency: Latency,
    unique: u64,
    duplicated: u64,
    out_of_order: u64,
}

/// Per publisher: the counters received (a bitset) and the last one.
#[derive(Default)]
struct Track {
    bits: Vec<u64>,
    last: u64,
}

impl Seen {
    fn payload(&mut self, tracks: &mut Vec<Track>, base: Instant, body: &str) {
        let mut parts = body.splitn(4, ':');
        let (Some(p), Some(n), Some(sent)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let (Ok(p), Ok(n), Ok(sent)) = (
            p.trim_start_matches('p').parse::<usize>(),
            n.parse::<u64>(),
            sent.parse::<u64>(),
        ) else {
            return;
        };
        let now = base.elapsed().as_micros() as u64;
        self.latency.record_us(now.saturating_sub(sent));
        if tracks.len() <= p {
            tracks.resize_with(p + 1, Track::default);
        }
        let t = &mut tracks[p];
        let (word, bit) = ((n / 64) as usize, n % 64);
        if t.bits.len() <= word {
            t.bits.resize(word + 1, 0);
        }
        if t.bits[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        t.bits[word] |= 1 << bit;
        self.unique += 1;
        if n < t.last {
            self.out_of_order += 1;
        }
        t.last = t.last.max(n);
    }
}

fn room_name(r: usize) -> String {
    format!("fan{r}x{}", std::process::id() % 100_000)
}

/// The rooms publisher `i` of `p` publishes to.
fn rooms_of(i: usize, p: usize, rooms: usize) -> Vec<usize> {
    if rooms >= p {
        (0..rooms).filter(|r| r % p == i).collect()
    } else {
        vec![i % rooms]
    }
}

/// Report a member's setup to the run, then (if it succeeded) wait for
/// the start.
async fn set_up<T>(
    outcome: anyhow::Result<T>,
    ready: &mpsc::UnboundedSender<anyhow::Result<()>>,
    go: &mut watch::Receiver<bool>,
) -> anyhow::Result<T> {
    match outcome {
        Ok(value) => {
            let _ = ready.send(Ok(()));
            go.wait_for(|go| *go).await?;
            Ok(value)
        }
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("{e:#}")));
            Err(e)
        }
    }
}

pub async fn run(o: Options) -> anyhow::Result<Outcome> {
    let base = Instant::now();
    let delivered = Counter::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscribers = o.rooms * o.members;
    // Each member reports its setup (joined, or why not), then waits for
    // `go`: one that failed ends the run with its error, not a wait for it.
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<anyhow::Result<()>>();
    let (go_tx, go) = watch::channel(false);
    let mut progress = Progress::new("fanout setup");
    let mut subs = Vec::new();
    let run_id = std::process::id();
    for r in 0..o.rooms {
        for m in 0..o.members {
            let i = r * o.members + m;
            let (o2, delivered, mut stop) = (o.clone(), delivered.clone(), stop_rx.clone());
            let (ready, mut go) = (ready_tx.clone(), go.clone());
            subs.push(tokio::spawn(async move {
                let mut seen = Seen::default();
                let mut tracks = Vec::new();
                let room = room_name(r);
                match o2.system {
                    System::Confab => {
                        let server = o2.servers[i % o2.servers.len()];
                        let joined = async {
                            let mut ws = client::Lean::connect(server, source_addr(i)).await?;
                            ws.call(json!({"type":"guest","user":format!("s{run_id}x{i}")}))
                                .await?;
                            ws.call(json!({"type":"join","room":room})).await?;
                            anyhow::Ok(ws)
                        };
                        let mut ws = set_up(joined.await, &ready, &mut go).await?;
                        loop {
                            tokio::select! {
                                _ = stop.changed() => break,
                                frame = ws.next() => match frame? {
                                    client::LeanFrame::Text(t) => {
                                        if let Some(body) = client::message_body(t) {
                                            seen.payload(&mut tracks, base, body);
                                            delivered.add(1);
                                        }
                                    }
                                    client::LeanFrame::Closed => break,
                                },
                            }
                        }
                    }
                    System::Nats | System::Redis => {
                        let subscribed = async {
                            let (mut reader, mut w) = if o2.system == System::Nats {
                                peers::nats(o2.servers[0]).await?
                            } else {
                                peers::redis(o2.servers[0]).await?
                            };
                            peers::subscribe(&mut reader, &mut w, &room).await?;
                            anyhow::Ok((reader, w))
                        };
                        let (mut reader, _w) = set_up(subscribed.await, &ready, &mut go).await?;
                        loop {
                            tokio::select! {
                                _ = stop.changed() => break,
                                payload = reader.next() => match payload? {
                                    Some(body) => {
                                        seen.payload(&mut tracks, base, &body);
                                        delivered.add(1);
                                    }
                                    None => break,
                                },
                            }
                        }
                    }
                }
                anyhow::Ok(seen)
            }));
            progress.show(i as u64 + 1, subscribers as u64, "subscribers");
        }
    }
    progress.finish();
    drop(ready_tx);
    for _ in 0..subscribers {
        match ready.recv().await {
            Some(Ok(())) => {}
            Some(Err(e)) => anyhow::bail!("a member could not join: {e:#}"),
            None => anyhow::bail!("a member ended before joining"),
        }
    }
    let _ = go_tx.send(true);
    // Redis confirms SUBSCRIBE asynchronously; give it a moment after the
    // start (NATS and Confab confirmed before it).
    if o.system == System::Redis {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Sent, and refused by the server (Confab answers every send).
    let published = Counter::default();
    let refused = Counter::default();
    let server_cpu = || match o.server_pids.is_empty() {
        true => None,
        false => Cpu::of_all(&o.server_pids),
    };
    let cpu_before = server_cpu();
    let start = Instant::now();
    let stop_at = start + o.duration;
    let period = Duration::from_secs_f64(o.publishers as f64 / o.rate.max(1) as f64);
    let pad = "x".repeat(o.body.saturating_sub(24));
    let mut pubs = Vec::new();
    for i in 0..o.publishers {
        let o2 = o.clone();
        let (published, refused, pad) = (published.clone(), refused.clone(), pad.clone());
        let rooms = rooms_of(i, o.publishers, o.rooms);
        pubs.push(tokio::spawn(async move {
            let mut counters = vec![0u64; o2.rooms];
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            let mut k = 0usize;
            // The next room, round robin, and a body naming this publisher,
            // its counter for the room and the send time.
            let next = |k: &mut usize, counters: &mut [u64]| {
                let r = rooms[*k % rooms.len()];
                *k += 1;
                let sent = base.elapsed().as_micros() as u64;
                let body = format!("p{i}:{}:{sent}:{pad}", counters[r]);
                counters[r] += 1;
                (r, body)
            };
            match o2.system {
                System::Confab => {
                    let server = o2.servers[i % o2.servers.len()];
                    let mut ws = client::connect(server, source_addr(subscribers + i)).await?;
                    client::call(
                        &mut ws,
                        json!({"type":"guest","user":format!("p{run_id}x{i}")}),
                    )
                    .await?;
                    for r in &rooms {
                        client::call(&mut ws, json!({"type":"join","room":room_name(*r)})).await?;
                    }
                    let (mut sink, mut stream) = ws.split();
                    // This publisher's answers, to know when all have come;
                    // everything else is read and dropped.
                    let answered = Counter::default();
                    let (refused2, answered2) = (refused.clone(), answered.clone());
                    let drain = tokio::spawn(async move {
                        while let Some(Ok(frame)) = stream.next().await {
                            if let Message::Text(t) = frame {
                                if t.starts_with("{\"type\":\"ok\"") {
                                    answered2.add(1);
                                } else if t.starts_with("{\"type\":\"error\"") {
                                    refused2.add(1);
                                    answered2.add(1);
                                }
                            }
                        }
                    });
                    while Instant::now() < stop_at {
                        tick.tick().await;
                        let (r, body) = next(&mut k, &mut counters);
                        let request = json!({"type":"send","room":room_name(r),"body":body});
                        sink.send(Message::text(request.to_string())).await?;
                        published.add(1);
                    }
                    // Wait for the acks of what was sent, then stop draining.
                    let sent_total: u64 = counters.iter().sum();
                    let until = Instant::now() + o2.drain;
                    while answered.get() < sent_total && Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    drain.abort();
                }
                System::Nats | System::Redis => {
                    let nats = o2.system == System::Nats;
                    let (mut reader, mut w) = if nats {
                        peers::nats(o2.servers[0]).await?
                    } else {
                        peers::redis(o2.servers[0]).await?
                    };
                    // Read and drop the replies (Redis answers every PUBLISH).
                    let drain =
                        tokio::spawn(async move { while let Ok(Some(_)) = reader.next().await {} });
                    while Instant::now() < stop_at {
                        tick.tick().await;
                        let (r, body) = next(&mut k, &mut counters);
                        w.write_all(&peers::publish_frame(nats, &room_name(r), &body))
                            .await?;
                        published.add(1);
                    }
                    // End the sending side and read the replies to the end,
                    // rather than drop the connection with replies unread:
                    // that resets it, and the reset can throw away the last
                    // publishes before the server reads them (Redis answers
                    // every PUBLISH; the sweep counted those as lost).
                    w.shutdown().await?;
                    let _ = tokio::time::timeout(o2.drain, drain).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    let mut progress = Progress::new(&format!("fanout {:?}", o.system).to_lowercase());
    let total = o.duration.as_millis() as u64;
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let done = (start.elapsed().as_millis() as u64).min(total);
        progress.show(done, total, &format!("ms, {} delivered", delivered.get()));
    }
    for p in pubs {
        p.await??;
    }
    // Every accepted message goes to every member of its room.
    let expected = (published.get() - refused.get()) * o.members as u64;
    // Wait for the last deliveries, at most the drain time.
    let until = Instant::now() + o.drain;
    while delivered.get() < expected && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(server_cpu())
        .and_then(|(before, after)| after.per_message(&before, published.get() - refused.get()));
    progress.show(total, total, &format!("ms, {} delivered", delivered.get()));
    progress.finish();
    let _ = stop_tx.send(true);
    let mut all = Seen::default();
    for s in subs {
        let seen = s.await??;
        all.latency.add(&seen.latency);
        all.unique += seen.unique;
        all.duplicated += seen.duplicated;
        all.out_of_order += seen.out_of_order;
    }
    Ok(Outcome {
        system: o.system,
        rooms: o.rooms,
        members: o.members,
        publishers: o.publishers,
        rate: o.rate,
        body_bytes: o.body,
        duration_s: elapsed,
        published: published.get(),
        refused: refused.get(),
        expected,
        delivered: all.unique,
        lost: expected.saturating_sub(all.unique),
        duplicated: all.duplicated,
        out_of_order: all.out_of_order,
        deliveries_per_s: all.unique as f64 / elapsed,
        latency: all.latency.percentiles(),
        server_cpu: cpu,
        histogram: all.latency,
    })
}

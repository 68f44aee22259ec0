//! `persist`: S senders, each keeping W messages unacknowledged (W = 1:
//! the next is sent as soon as the last is acknowledged, durable; W > 1:
//! pipelined), each into a room of its own or all into one. Acknowledged
//! messages per second, and the time from send to ack.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::Counter;
use crate::report::{Latency, Percentiles};
use crate::{client, source_addr, Progress};

pub struct Options {
    pub server: SocketAddr,
    pub senders: usize,
    pub duration: Duration,
    pub body: usize,
    /// All senders into one room, instead of a room each.
    pub one_room: bool,
    /// Messages each sender keeps unacknowledged (1: wait for each ack).
    pub window: usize,
}

#[derive(Debug, Serialize)]
pub struct Outcome {
    pub senders: usize,
    pub one_room: bool,
    pub window: usize,
    pub duration_s: f64,
    pub acked: u64,
    pub refused: u64,
    /// Acks whose seq was not the one after the previous (in a room of its
    /// own a sender's seqs are 1, 2, 3, …), or, in one shared room, not
    /// above it.
    pub out_of_order: u64,
    pub acks_per_s: f64,
    pub ack_latency: Percentiles,
    #[serde(skip)]
    pub latency: Latency,
}

pub async fn run(o: Options) -> anyhow::Result<Outcome> {
    let acked = Counter::default();
    let pad = "x".repeat(o.body.saturating_sub(8));
    let mut senders = Vec::new();
    for i in 0..o.senders {
        let mut ws = client::connect(o.server, source_addr(i)).await?;
        client::call(
            &mut ws,
            json!({"type":"guest","user":format!("w{i}x{}", std::process::id())}),
        )
        .await?;
        let room = match o.one_room {
            true => format!("persistx{}", std::process::id() % 100_000),
            false => format!("persist{i}x{}", std::process::id() % 100_000),
        };
        let joined = client::call(&mut ws, json!({"type":"join","room":room})).await?;
        senders.push((ws, room, joined["last_seq"].as_u64().unwrap_or(0)));
    }
    let started = Instant::now();
    let deadline = started + o.duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|(mut ws, room, mut last)| {
            let acked = acked.clone();
            let pad = pad.clone();
            let one_room = o.one_room;
            let window = o.window.max(1);
            tokio::spawn(async move {
                let mut latency = Latency::default();
                let (mut refused, mut out_of_order) = (0u64, 0u64);
                let mut n = 0u64;
                // When each unacknowledged message was sent, oldest first:
                // replies come in request order.
                let mut unacked = VecDeque::with_capacity(window);
                loop {
                    let mut fed = false;
                    while unacked.len() < window && Instant::now() < deadline {
                        n += 1;
                        let body = format!("{n}:{pad}");
                        let request = json!({"type":"send","id":n,"room":room,"body":body});
                        unacked.push_back(Instant::now());
                        if ws.feed(Message::text(request.to_string())).await.is_err() {
                            break;
                        }
                        fed = true;
                    }
                    if fed && ws.flush().await.is_err() {
                        break;
                    }
                    let Some(sent) = unacked.pop_front() else {
                        break;
                    };
                    // Until the reply to the oldest request (echoes may come first).
                    let reply = loop {
                        match ws.next().await {
                            Some(Ok(Message::Text(t)))
                                if t.starts_with("{\"type\":\"ok\"")
                                    || t.starts_with("{\"type\":\"error\"") =>
                            {
                                break Some(t)
                            }
                            Some(Ok(_)) => continue,
                            _ => break None,
                        }
                    };
                    let Some(reply) = reply else { break };
                    if reply.starts_with("{\"type\":\"error\"") {
                        refused += 1;
                        continue;
                    }
                    latency.record(sent.elapsed());
                    acked.add(1);
                    let seq = client::message_seq(&reply).unwrap_or(0);
                    let in_order = match one_room {
                        true => seq > last,
                        false => seq == last + 1,
                    };
                    if !in_order {
                        out_of_order += 1;
                    }
                    last = seq;
                }
                (latency, refused, out_of_order)
            })
        })
        .collect();
    let mut progress = Progress::new("persist");
    let total = o.duration.as_millis() as u64;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let done = (started.elapsed().as_millis() as u64).min(total);
        progress.show(done, total, &format!("ms, {} acked", acked.get()));
    }
    progress.finish();
    let mut latency = Latency::default();
    let (mut refused, mut out_of_order) = (0, 0);
    for t in tasks {
        let (l, r, o) = t.await?;
        latency.add(&l);
        refused += r;
        out_of_order += o;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(Outcome {
        senders: o.senders,
        one_room: o.one_room,
        window: o.window,
        duration_s: elapsed,
        acked: acked.get(),
        refused,
        out_of_order,
        acks_per_s: acked.get() as f64 / elapsed,
        ack_latency: latency.percentiles(),
        latency,
    })
}

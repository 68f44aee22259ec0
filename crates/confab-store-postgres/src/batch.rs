//! Group commit: messages to rooms are stored in batches.
//!
//! A message waits on a channel; one task takes every message that is
//! waiting (up to [`MAX_BATCH`]), stores them with one call of
//! `confab_append_batch` in one transaction, and hands each its result only
//! after the commit. So concurrent senders share one commit (and one fsync
//! with `synchronous_commit = on`), also when they all write to one room,
//! where one transaction per message would serialise on the room's row
//! lock at one commit per message. A few workers do this at once: while
//! one batch commits, the next gathers and runs.
//!
//! Cancel-safe like the SQLite writer: a caller that stops waiting after
//! its message was queued does not stop it from being stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use confab_core::store::{sanctioned, Appended, NewMessage, Queued, StoreResult};
use confab_core::StoreError;
use confab_proto::{Message, SanctionKind};
use tokio::sync::{mpsc, oneshot};

use crate::pool::Connections;
use crate::{pg_error, seq};

/// Most messages in one batch: bounds the latency one commit adds and the
/// size of the call.
const MAX_BATCH: usize = 1024;
/// Messages waiting before senders wait to enqueue.
const QUEUE: usize = 16 * 1024;
/// Batches in flight at once. One alone leaves the CPUs idle while its
/// commit waits for the disk; batches that share a room still take turns
/// on its row lock, and lock their rooms in one order, so they cannot
/// deadlock.
const WORKERS: usize = 4;

/// Told of every batch: how many messages it held and how long it took.
pub type CommitObserver = Box<dyn Fn(usize, Duration) + Send + Sync>;

struct Job {
    message: NewMessage,
    reply: oneshot::Sender<StoreResult<Appended>>,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) batches: AtomicU64,
    pub(crate) messages: AtomicU64,
    observer: OnceLock<CommitObserver>,
}

pub(crate) struct Batcher {
    jobs: mpsc::Sender<Job>,
    pub(crate) counters: Arc<Counters>,
}

impl Batcher {
    pub(crate) fn start(pool: Connections) -> Batcher {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..WORKERS {
            tokio::spawn(run(pool.clone(), rx.clone(), counters.clone()));
        }
        Batcher { jobs, counters }
    }

    pub(crate) fn observe(&self, observer: CommitObserver) {
        let _ = self.counters.observer.set(observer);
    }

    /// Queue a room message (not a direct one) for the next batch; the
    /// future resolves after its commit.
    pub(crate) async fn queue(&self, message: NewMessage) -> StoreResult<Queued> {
        let (reply, rx) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the message writer has stopped".into());
        self.jobs
            .send(Job { message, reply })
            .await
            .map_err(|_| stopped())?;
        Ok(Box::pin(async move { rx.await.map_err(|_| stopped())? }))
    }
}

type JobQueue = tokio::sync::Mutex<mpsc::Receiver<Job>>;

/// One worker: takes what is waiting (the others wait their turn at the
/// queue meanwhile), stores it, repeats; until every sender is gone (the
/// store was dropped).
async fn run(pool: Connections, rx: Arc<JobQueue>, counters: Arc<Counters>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let mut queue = rx.lock().await;
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            break;
        }
        let started = Instant::now();
        let jobs = batch.len();
        let results = match store(&pool, &batch, queue).await {
            Ok(results) => results.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::warn!(error = %e, messages = jobs, "a batch of messages failed");
                vec![Err(e); jobs]
            }
        };
        for (job, result) in batch.drain(..).zip(results) {
            let _ = job.reply.send(result.and_then(|r| r));
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters.messages.fetch_add(jobs as u64, Ordering::Relaxed);
        if let Some(observe) = counters.observer.get() {
            observe(jobs, started.elapsed());
        }
    }
}

/// One transaction for the whole batch: each message's own outcome, or the
/// error that failed them all (nothing of the batch is then stored, unless
/// the commit's answer was lost: a retry with its nonce finds it).
///
/// The batch locks its rooms before it lets go of the queue (`taken`), so
/// batches hold their rooms in the order they were taken: messages queued
/// one after another keep their order in a room although several batches
/// are in flight, while batches of other rooms still overlap.
async fn store(
    pool: &Connections,
    batch: &[Job],
    taken: tokio::sync::MutexGuard<'_, mpsc::Receiver<Job>>,
) -> StoreResult<Vec<StoreResult<Appended>>> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await.map_err(pg_error)?;
    // Columns borrowed from the jobs: nothing is copied but the pointers.
    let column =
        |f: fn(&NewMessage) -> &str| -> Vec<&str> { batch.iter().map(|j| f(&j.message)).collect() };
    let rooms = column(|m| m.room.as_str());
    let lock = tx
        .prepare_cached("SELECT 1 FROM rooms WHERE name = ANY($1) ORDER BY id FOR UPDATE")
        .await
        .map_err(pg_error)?;
    tx.query(&lock, &[&rooms]).await.map_err(pg_error)?;
    drop(taken);
    let keys = column(|m| m.sender.key());
    let senders = column(|m| m.sender.as_str());
    let bodies = column(|m| m.body.as_str());
    let ts: Vec<i64> = batch.iter().map(|j| j.message.ts).collect();
    let nonces: Vec<Option<&str>> = batch.iter().map(|j| j.message.nonce.as_deref()).collect();
    let stmt = tx
        .prepare_cached("SELECT * FROM confab_append_batch($1, $2, $3, $4, $5, $6)")
        .await
        .map_err(pg_error)?;
    let rows = tx
        .query(&stmt, &[&rooms, &keys, &senders, &bodies, &ts, &nonces])
        .await
        .map_err(pg_error)?;
    tx.commit().await.map_err(pg_error)?;
    if rows.len() != batch.len() {
        return Err(StoreError::Internal(format!(
            "a batch of {} messages answered {} rows",
            batch.len(),
            rows.len()
        )));
    }
    Ok(batch
        .iter()
        .zip(rows)
        .map(|(job, row)| {
            let status: i16 = row.get(0);
            let message = || Message {
                room: job.message.room.as_str().to_owned(),
                seq: seq(row.get(1)),
                user: row.get(2),
                body: row.get(3),
                ts: row.get(4),
                nonce: row.get(5),
                ..Message::default()
            };
            match status {
                0 | 1 => Ok(Appended {
                    message: message(),
                    duplicate: status == 1,
                    new_members: Vec::new(),
                }),
                2 => Err(StoreError::NoSuchRoom),
                3 => Err(StoreError::NotMember),
                4 => Err(sanctioned(SanctionKind::Mute, &job.message.room, None)),
                other => Err(StoreError::Internal(format!("append status {other}"))),
            }
        })
        .collect())
}

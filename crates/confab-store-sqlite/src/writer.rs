//! The writer thread: the only connection that writes.
//!
//! Jobs queue on a bounded channel. The thread takes every job that is
//! waiting (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE … COMMIT`
//! with a savepoint each (a job that fails rolls back alone), and only after
//! the commit hands each job its result. So no caller ever sees a write that
//! is not durable, and concurrent callers share one fsync.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use confab_core::store::StoreResult;
use confab_core::StoreError;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::db_error;

/// Most jobs in one transaction: bounds the latency one commit adds.
const MAX_BATCH: usize = 1024;
/// Jobs waiting for the writer before callers wait to enqueue.
const QUEUE: usize = 16 * 1024;

/// One caller's write: run inside the batch's transaction, then completed
/// with the outcome of the commit.
trait Job: Send {
    /// Run the statements; returns whether they succeeded.
    fn run(&mut self, conn: &Connection) -> bool;
    /// Hand the caller its result, or `commit`'s error.
    fn complete(self: Box<Self>, commit: StoreResult<()>);
}

struct Pending<F, T> {
    f: Option<F>,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<F, T> Job for Pending<F, T>
where
    F: FnOnce(&Connection) -> StoreResult<T> + Send,
    T: Send,
{
    fn run(&mut self, conn: &Connection) -> bool {
        let f = self.f.take().expect("a job runs once");
        let result = f(conn);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn complete(self: Box<Self>, commit: StoreResult<()>) {
        let result = match (commit, self.result) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(result)) => result,
            (Ok(()), None) => Err(StoreError::Internal("a job was never run".into())),
        };
        let _ = self.reply.send(result);
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (or attempted).
    pub transactions: u64,
    /// Jobs run.
    pub jobs: u64,
}

/// Told of every commit: how many jobs it held and how long it took.
pub type CommitObserver = Box<dyn Fn(usize, Duration) + Send + Sync>;

#[derive(Default)]
struct Counters {
    transactions: AtomicU64,
    jobs: AtomicU64,
    observer: OnceLock<CommitObserver>,
}

pub(crate) struct Writer {
    jobs: mpsc::Sender<Box<dyn Job>>,
    counters: Arc<Counters>,
}

impl Writer {
    pub(crate) fn start(conn: Connection) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        std::thread::Builder::new()
            .name("confab-sqlite-writer".into())
            .spawn(move || run(conn, rx, &c))
            .expect("spawning the writer thread");
        Writer { jobs: tx, counters }
    }

    pub(crate) fn observe(&self, observer: CommitObserver) {
        let _ = self.counters.observer.set(observer);
    }

    pub(crate) fn stats(&self) -> WriterStats {
        WriterStats {
            transactions: self.counters.transactions.load(Ordering::Relaxed),
            jobs: self.counters.jobs.load(Ordering::Relaxed),
        }
    }

    /// Run `f` in the next transaction; resolves after the commit. If the
    /// future is dropped after the job was queued, the job still runs and
    /// commits: cancelling never half-applies a write.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending {
            f: Some(f),
            result: None,
            reply,
        });
        let stopped = || StoreError::Unavailable("the storage writer has stopped".into());
        self.jobs.send(job).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Box<dyn Job>>, counters: &Counters) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        counters.transactions.fetch_add(1, Ordering::Relaxed);
        let jobs = batch.len();
        counters.jobs.fetch_add(jobs as u64, Ordering::Relaxed);
        let started = Instant::now();
        commit_batch(&conn, &mut batch);
        if let Some(observe) = counters.observer.get() {
            observe(jobs, started.elapsed());
        }
    }
    tracing::debug!("storage writer stopped");
}

fn commit_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        let e = db_error(e);
        tracing::error!(error = %e, "cannot begin a transaction");
        for job in batch.drain(..) {
            job.complete(Err(e.clone()));
        }
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    for mut job in batch.drain(..) {
        let savepoint = conn.execute_batch("SAVEPOINT job");
        let ok = job.run(conn);
        let release = if ok {
            conn.execute_batch("RELEASE job")
        } else {
            conn.execute_batch("ROLLBACK TO job; RELEASE job")
        };
        if let Some(e) = savepoint.err().or(release.err()) {
            tracing::error!(error = %e, "savepoint failed");
        }
        completions.push(job);
    }
    let outcome = conn.execute_batch("COMMIT").map_err(db_error);
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "commit failed; rolling back the batch");
        let _ = conn.execute_batch("ROLLBACK");
    }
    for job in completions {
        job.complete(outcome.clone());
    }
}

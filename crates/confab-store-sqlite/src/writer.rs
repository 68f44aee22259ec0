//! The writer thread: the only connection that writes.
//!
//! Jobs queue on a bounded channel. The thread takes every job that is
//! waiting (up to [`MAX_BATCH`]), runs them in one `BEGIN IMMEDIATE … COMMIT`
//! (a job that fails rolls back alone: to a savepoint of its own, or by
//! having written nothing, below), and only after
//! the commit hands each job its result. So no caller ever sees a write that
//! is not durable, and concurrent callers share one fsync.
//!
//! A job that refuses before it writes ([`Kind::RefusingFirst`]: an edit,
//! which checks everything, then writes) needs no savepoint: failing, it
//! has nothing to roll back. The writer checks that promise
//! (`total_changes`): such a job that fails after a write anyway (an I/O
//! error mid-way) aborts the batch, as below. A room's plain message
//! ([`Kind::Staging`]) writes nothing at all: it stages its row
//! ([`Staged`]), and the writer writes the staged rows together before the
//! next job of another kind and before the commit; a flush that fails
//! aborts the batch.
//!
//! Failures are loud. A job that panics fails alone (rolled back to its
//! savepoint, its caller told `internal`); a savepoint that cannot be taken
//! or released aborts the whole batch, since what it holds is then unknown.
//! If the thread itself dies (a panic outside a job), it says so with an
//! error, every waiting and later caller gets `unavailable`, and
//! [`Writer::failed`] resolves so that the server can stop: a thread whose
//! state is unknown is not restarted in place.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use confab_core::store::StoreResult;
use confab_core::StoreError;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

use crate::db_error;
use crate::staged::Staged;

/// Most jobs in one transaction: bounds the latency one commit adds.
const MAX_BATCH: usize = 1024;
/// Jobs waiting for the writer before callers wait to enqueue.
const QUEUE: usize = 16 * 1024;

/// What a job promises about its writes, which decides what the writer
/// does around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// It may fail after writing: it runs under a savepoint of its own.
    Guarded,
    /// When it fails, it fails before its first write: no savepoint.
    RefusingFirst,
    /// It writes nothing and may only stage message rows, seeing those
    /// staged before it: it runs without flushing them first. Refuses, if
    /// it does, before staging anything.
    Staging,
}

/// One caller's write: run inside the batch's transaction, then completed
/// with the outcome of the commit.
trait Job: Send {
    fn kind(&self) -> Kind;
    /// Run the statements; returns whether they succeeded.
    fn run(&mut self, conn: &Connection, staged: &mut Staged) -> bool;
    /// Hand the caller its result, or `commit`'s error.
    fn complete(self: Box<Self>, commit: StoreResult<()>);
}

struct Pending<F, T> {
    f: Option<F>,
    kind: Kind,
    result: Option<StoreResult<T>>,
    reply: oneshot::Sender<StoreResult<T>>,
}

impl<F, T> Job for Pending<F, T>
where
    F: FnOnce(&Connection, &mut Staged) -> StoreResult<T> + Send,
    T: Send,
{
    fn kind(&self) -> Kind {
        self.kind
    }

    fn run(&mut self, conn: &Connection, staged: &mut Staged) -> bool {
        let f = self.f.take().expect("a job runs once");
        let result = catch_unwind(AssertUnwindSafe(|| f(conn, staged))).unwrap_or_else(|panic| {
            let what = panic_text(&*panic);
            tracing::error!(panic = %what, "a storage job panicked; it is rolled back");
            Err(StoreError::Internal(format!(
                "a storage job panicked: {what}"
            )))
        });
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
    /// Set, once, to why the thread died.
    died: watch::Receiver<Option<StoreError>>,
}

/// Held by the writer thread: dropped when it ends, by a return or by a
/// panic. Ending while callers can still send is a death, and says so.
struct Lifeline {
    died: watch::Sender<Option<StoreError>>,
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!(
                "the storage writer died; every write now fails with `unavailable` \
                 and the server stops"
            );
            let e = StoreError::Unavailable("the storage writer died".into());
            let _ = self.died.send(Some(e));
        }
    }
}

impl Writer {
    pub(crate) fn start(conn: Connection) -> Writer {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Counters::default());
        let (died_tx, died) = watch::channel(None);
        let c = counters.clone();
        std::thread::Builder::new()
            .name("confab-sqlite-writer".into())
            .spawn(move || {
                let _lifeline = Lifeline { died: died_tx };
                run(conn, rx, &c)
            })
            .expect("spawning the writer thread");
        Writer {
            jobs: tx,
            counters,
            died,
        }
    }

    /// Resolves with the reason once the thread has died. Cancel-safe.
    pub(crate) async fn failed(&self) -> StoreError {
        let mut died = self.died.clone();
        let reason = died
            .wait_for(Option::is_some)
            .await
            .map(|e| e.clone().expect("waited for it"));
        match reason {
            Ok(e) => e,
            // The thread ended without dying: the store was dropped.
            Err(_) => std::future::pending().await,
        }
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
        self.queue(f).await?.await
    }

    /// Queue `f` behind every job queued before it (it runs after them, in
    /// the same transaction or a later one) and return; the returned future
    /// resolves with its result after the commit.
    pub(crate) async fn queue<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<impl Future<Output = StoreResult<T>> + Send + 'static> {
        self.queue_as(Kind::Guarded, move |conn, _| f(conn)).await
    }

    /// [`Writer::queue`] for a job that keeps the promise of its `kind`
    /// (one without a savepoint: about a quarter of a message's time on
    /// the writer went to its savepoint), and sees the rows staged before
    /// it.
    pub(crate) async fn queue_as<T: Send + 'static>(
        &self,
        kind: Kind,
        f: impl FnOnce(&Connection, &mut Staged) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<impl Future<Output = StoreResult<T>> + Send + 'static> {
        let (reply, rx) = oneshot::channel();
        let job: Box<dyn Job> = Box::new(Pending {
            f: Some(f),
            kind,
            result: None,
            reply,
        });
        self.jobs.send(job).await.map_err(|_| stopped(&self.died))?;
        let died = self.died.clone();
        Ok(async move { rx.await.map_err(|_| stopped(&died))? })
    }
}

/// Why a job got no answer: the thread died (and why), or it stopped.
fn stopped(died: &watch::Receiver<Option<StoreError>>) -> StoreError {
    died.borrow()
        .clone()
        .unwrap_or_else(|| StoreError::Unavailable("the storage writer has stopped".into()))
}

fn run(conn: Connection, mut rx: mpsc::Receiver<Box<dyn Job>>, counters: &Counters) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut staged = Staged::default();
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
        commit_batch(&conn, &mut batch, &mut staged);
        if let Some(observe) = counters.observer.get() {
            observe(jobs, started.elapsed());
        }
    }
    tracing::debug!("storage writer stopped");
}

fn commit_batch(conn: &Connection, batch: &mut Vec<Box<dyn Job>>, staged: &mut Staged) {
    if let Err(e) = exec(conn, "BEGIN IMMEDIATE") {
        let e = db_error(e);
        tracing::error!(error = %e, "cannot begin a transaction");
        for job in batch.drain(..) {
            job.complete(Err(e.clone()));
        }
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    let mut broken = None;
    for mut job in batch.drain(..) {
        if broken.is_none() {
            broken = run_job(conn, &mut *job, staged).err();
        }
        completions.push(job);
    }
    match &broken {
        None => broken = staged.flush(conn).err(),
        Some(_) => staged.clear(),
    }
    let aborted = broken.is_some();
    let outcome = match broken {
        Some(e) => {
            tracing::error!(error = %e, "a batch cannot be committed whole; rolling it back");
            Err(e)
        }
        None => exec(conn, "COMMIT").map_err(db_error),
    };
    if let Err(e) = &outcome {
        if !aborted {
            tracing::error!(error = %e, "commit failed; rolling back the batch");
        }
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                // Neither committed nor rolled back: nothing more can be
                // trusted on this connection.
                panic!("cannot roll back a failed batch: {e}");
            }
        }
    }
    if outcome.is_err() {
        // What was read of the senders may have been the batch's own
        // writes, now undone.
        staged.senders.forget();
    }
    for job in completions {
        job.complete(outcome.clone());
    }
}

/// Run one job of the batch, keeping the promise of its kind. An error
/// means what the transaction holds is unknown: the batch is abandoned.
/// (A job that fails alone is not an error here: its caller is told.)
fn run_job(conn: &Connection, job: &mut dyn Job, staged: &mut Staged) -> StoreResult<()> {
    let kind = job.kind();
    if kind != Kind::Staging {
        // It may read or change what is staged: it sees it written.
        staged.flush(conn)?;
    }
    let done = run_promised(conn, job, kind, staged);
    if kind != Kind::Staging {
        // It may have changed what is kept of the senders (`senders.rs`).
        staged.senders.forget();
    }
    done
}

/// Run the job as its kind promises: under a savepoint of its own, or
/// checked to have written nothing if it failed.
fn run_promised(
    conn: &Connection,
    job: &mut dyn Job,
    kind: Kind,
    staged: &mut Staged,
) -> StoreResult<()> {
    if kind != Kind::Guarded {
        let before = (conn.total_changes(), staged.len());
        let ok = job.run(conn, staged);
        if !ok && ((conn.total_changes(), staged.len()) != before || conn.is_autocommit()) {
            // It promised to refuse before writing, and wrote or staged
            // (or its error ended the transaction): what is left is
            // unknown.
            return Err(StoreError::Internal(
                "a job failed after writing, with no savepoint to undo it".into(),
            ));
        }
        return Ok(());
    }
    // A job's savepoint is what lets it fail alone: without one, what
    // the transaction holds is unknown, and the batch is abandoned.
    exec(conn, "SAVEPOINT job").map_err(db_error)?;
    let ok = job.run(conn, staged);
    if ok {
        exec(conn, "RELEASE job")
    } else {
        // What it staged goes with its savepoint (nothing was staged
        // before it: it ran after a flush).
        staged.clear();
        exec(conn, "ROLLBACK TO job").and_then(|()| exec(conn, "RELEASE job"))
    }
    .map_err(db_error)
}

/// Run a statement of the batch's own (a savepoint, the commit) prepared
/// once: parsing them anew for every job was a tenth of the writer's time.
fn exec(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

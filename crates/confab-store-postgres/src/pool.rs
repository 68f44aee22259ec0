//! Waiting for a pooled connection: as long as the database answers.
//!
//! A burst (a class of a thousand joining one room at once) queues far more
//! requests than the pool has connections, and the last of them may wait
//! seconds for a healthy database. A database that went away must still
//! answer `unavailable` soon rather than leave clients hanging. So a
//! request waits for its connection while other requests get theirs: it
//! gives up only after a whole window ([`WINDOW`]) in which the pool handed
//! out no connection at all, or after [`MOST`] in all. It keeps its place
//! in the pool's queue meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_core::store::StoreResult;
use confab_core::StoreError;
use deadpool_postgres::{Object, Pool};

use crate::pool_error;

/// A wait for a connection during which no other request got one (nor
/// could one be made) means the database does not answer.
pub(crate) const WINDOW: Duration = Duration::from_secs(2);

/// The longest wait for a connection, however busy the pool.
const MOST: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(crate) struct Connections {
    pool: Pool,
    /// Connections handed out so far.
    handed: Arc<AtomicU64>,
    window: Duration,
}

impl Connections {
    pub(crate) fn new(pool: Pool) -> Connections {
        Connections {
            pool,
            handed: Arc::default(),
            window: WINDOW,
        }
    }

    /// A connection, once one is free (see the module's words).
    pub(crate) async fn get(&self) -> StoreResult<Object> {
        let started = Instant::now();
        let get = self.pool.get();
        tokio::pin!(get);
        let mut seen = self.handed.load(Ordering::Relaxed);
        loop {
            match tokio::time::timeout(self.window, &mut get).await {
                Ok(got) => {
                    let client = got.map_err(pool_error)?;
                    self.handed.fetch_add(1, Ordering::Relaxed);
                    return Ok(client);
                }
                Err(_) => {
                    let now = self.handed.load(Ordering::Relaxed);
                    if now == seen || started.elapsed() >= MOST {
                        return Err(StoreError::Unavailable("PostgreSQL does not answer".into()));
                    }
                    seen = now;
                }
            }
        }
    }

    pub(crate) fn pool(&self) -> &Pool {
        &self.pool
    }

    #[cfg(test)]
    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = window;
    }
}

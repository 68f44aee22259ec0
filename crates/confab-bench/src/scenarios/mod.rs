//! The scenarios. Each is bounded by a count or a duration and stops by
//! itself; each returns a serialisable result with its own consistency
//! counts (lost, duplicated, out of order, refused).

pub mod connect;
pub mod fanout;
pub mod idle;
pub mod persist;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A counter shared by the tasks of a scenario and its progress line.
#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicU64>);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

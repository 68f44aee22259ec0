//! The Confab server: storage and engine set-up, the HTTP listener with its
//! WebSocket endpoint, and graceful shutdown. `main.rs` is only the command
//! line; everything else is here so tests can run a real server in-process.
//!
//! - [`config`]: settings and their defaults.
//! - [`ws`]: the WebSocket transport (`GET /ws`).
//! - [`line`]: the line transport (plain TCP, for `nc` and `telnet`).
//!
//! The caller binds: [`run`] takes listeners that are already bound (tests
//! bind port 0) and a future that resolves when it is time to stop.

mod admission;
pub mod config;
mod http;
pub mod line;
pub mod ws;

use std::future::Future;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use confab_core::{Chat, DynStore, MemoryBroker, StoreError};
use confab_store_sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use confab_core::{ContentFilter, FilterRule, Rate, RateLimits};
pub use config::{Config, Database, Durability};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// How long the last words to a slow consumer (a close frame, a last line)
/// may wait for room in its socket. The connection is already gone for
/// everyone else: its session closed before this starts.
pub(crate) const SLOW_CONSUMER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Run a socket write unless the core evicts the connection first: a write
/// to a client that stopped reading can wait forever, and the eviction
/// must not wait for it. `None` when evicted.
pub(crate) async fn unless_evicted<T>(
    evicted: &CancellationToken,
    write: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = evicted.cancelled() => None,
        done = write => Some(done),
    }
}

/// The bound listeners the server serves.
pub struct Listeners {
    /// HTTP, with the WebSocket endpoint at `/ws`.
    pub http: TcpListener,
    /// The line protocol, when enabled.
    pub line: Option<TcpListener>,
}

/// What every connection task shares.
pub(crate) struct App {
    pub(crate) chat: Chat,
    pub(crate) config: Config,
    /// Cancelled when the server starts draining.
    pub(crate) draining: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) gate: Arc<admission::Gate>,
}

/// Open the store the configuration names.
pub async fn open_store(config: &Config) -> Result<DynStore, StoreError> {
    match &config.database {
        Database::Sqlite { path, durability } => {
            let store = SqliteStore::open(path, *durability).await?;
            tracing::info!(path = %path.display(), "storage: SQLite");
            Ok(Arc::new(store))
        }
    }
}

/// Serve until `shutdown` resolves, then drain: stop accepting, let every
/// connection finish the request in hand, send it `shutdown` and close it
/// with 1001, wait up to the grace period, and return once storage has
/// committed everything acknowledged.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Listeners { http, line } = listeners;
    let store = open_store(&config).await?;
    let chat = Chat::new(
        store.clone(),
        Arc::new(MemoryBroker::new()),
        config.chat.clone(),
    )
    .await?;
    let draining = CancellationToken::new();
    let app = Arc::new(App {
        chat,
        gate: admission::Gate::new(config.max_connections, config.max_connections_per_ip),
        config: config.clone(),
        draining: draining.clone(),
        tasks: TaskTracker::new(),
    });
    let router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(app.clone());
    tracing::info!(addr = %http.local_addr()?, "listening for HTTP and WebSocket");
    app.tasks.spawn(http::serve(app.clone(), http, router));
    if let Some(line) = line {
        tracing::info!(addr = %line.local_addr()?, "listening for the line protocol");
        app.tasks.spawn(line::serve(app.clone(), line));
    }

    shutdown.await;
    tracing::info!("shutting down: draining connections");
    draining.cancel();
    app.tasks.close();
    if tokio::time::timeout(config.shutdown_grace, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = app.tasks.len(),
            "grace period over; closing the remaining connections"
        );
    }
    // Every acknowledged write was committed before its ack; this waits for
    // anything still queued behind them.
    store.ping().await?;
    tracing::info!("stopped");
    Ok(())
}

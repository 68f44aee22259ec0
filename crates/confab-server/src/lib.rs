//! The Confab server: storage and engine set-up, the listeners, TLS and
//! graceful shutdown. `main.rs` is only the command line; everything else
//! is here so tests can run a real server in-process.
//!
//! - [`config`]: the server's settings and their defaults.
//! - [`copy`]: `confab db copy`, a SQLite deployment moved to PostgreSQL.
//! - [`settings`]: the configuration file, environment and flags.
//! - [`ws`]: the WebSocket transport (`GET /ws`).
//! - [`line`]: the line transport (plain TCP, for `nc` and `telnet`).
//! - `http`: the HTTP accept loop; `admission`: connection limits;
//!   `tls`: rustls with a reloadable certificate.
//! - [`proxy`]: the client's real address behind trusted proxies
//!   (`X-Forwarded-For`, `Forwarded`, the PROXY protocol), and the
//!   networks exempt from per-address limits.
//!
//! The caller binds: [`start`] takes listeners that are already bound (tests
//! bind port 0) and returns a [`Server`] to reload and stop.

mod admin;
mod admission;
pub mod config;
pub mod copy;
mod driver;
mod http;
pub mod line;
mod metrics;
pub mod proxy;
pub mod settings;
mod through;
mod tls;
mod web;
pub mod ws;
mod wsframe;

use std::future::Future;
use std::sync::Arc;

use axum::routing::get;
use axum::Router;
use confab_broker_redis::RedisBroker;
use confab_core::broker::{Broker, LocalBroker};
use confab_core::{Chat, DynStore, Outbound, StoreError};
use confab_store_sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use confab_core::{ContentFilter, FilterRule, Rate, RateLimits};
pub use config::{Config, Database, Durability};
pub use tls::{TlsError, TlsFiles};

use metrics::{Metrics, Transport};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("broker: {0}")]
    Broker(#[from] confab_broker_redis::ConnectError),
}

/// Why a session the cluster lost is closed (WebSocket 1012, a line `!`).
pub(crate) const STALE_SESSION: &str = "connect again: this node lost its place in the cluster";

/// How long the last words to a slow consumer (a close frame, a last line)
/// may wait for room in its socket. The connection is already gone for
/// everyone else: its session closed before this starts.
pub(crate) const SLOW_CONSUMER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Run a socket write unless the connection is evicted first: a write to
/// a client that stopped reading can wait forever, and the eviction must
/// not wait for it. A write that waits longer than `stall` evicts the
/// connection as a slow consumer itself (a client that sends requests and
/// never reads fills the socket with replies alone: nothing else would
/// notice). `None` when evicted.
pub(crate) async fn unless_evicted<T>(
    conn: &confab_core::conn::Closer,
    stall: std::time::Duration,
    write: impl Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = conn.closed() => None,
        done = tokio::time::timeout(stall, write) => match done {
            Ok(done) => Some(done),
            Err(_) => {
                conn.close(confab_core::CloseReason::SlowConsumer);
                None
            }
        },
    }
}

/// How events are encoded on `transport`.
pub(crate) fn format(transport: Transport) -> confab_proto::Format {
    match transport {
        Transport::Ws => confab_proto::Format::Json,
        Transport::Line => confab_proto::Format::Line,
    }
}

/// Encode one queued item for `transport` (the driver counts deliveries,
/// per batch: [`metrics::Metrics::delivered`]).
pub(crate) fn encode(transport: Transport, item: &Outbound) -> std::borrow::Cow<'_, bytes::Bytes> {
    use std::borrow::Cow;
    match item {
        Outbound::Reply(reply) => Cow::Owned(match transport {
            Transport::Ws => confab_proto::json::encode_reply(reply),
            Transport::Line => confab_proto::line::format_reply(reply),
        }),
        Outbound::Event(shared) => Cow::Borrowed(shared.encoded(format(transport))),
        Outbound::Raw(bytes) => Cow::Borrowed(bytes),
    }
}

/// Raise the soft open-files limit to the hard one: every connection is a
/// descriptor, and the usual soft default (1024) is far too low.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        lim.rlim_cur
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
    config: std::sync::RwLock<Arc<Config>>,
    /// Cancelled when the server starts draining.
    pub(crate) draining: CancellationToken,
    pub(crate) tasks: TaskTracker,
    pub(crate) gate: Arc<admission::Gate>,
    pub(crate) tls: Option<tls::Tls>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) started: std::time::Instant,
    /// Why the server stopped by itself (its storage failed for good).
    failure: std::sync::OnceLock<StoreError>,
}

impl App {
    fn new(config: Config, chat: Chat, tls: Option<tls::Tls>, metrics: Arc<Metrics>) -> Arc<App> {
        Arc::new(App {
            chat,
            gate: admission::Gate::new(config.max_connections, config.max_connections_per_ip),
            config: std::sync::RwLock::new(Arc::new(config)),
            draining: CancellationToken::new(),
            tasks: TaskTracker::new(),
            tls,
            metrics,
            started: std::time::Instant::now(),
            failure: std::sync::OnceLock::new(),
        })
    }

    /// The configuration in force; a connection reads it when it starts.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.config.read().expect("config poisoned").clone()
    }

    /// Admit a chat connection from `client` (its real address), and open
    /// its session: per-address limits count it unless it is exempt.
    pub(crate) fn admit(
        &self,
        config: &Config,
        client: std::net::IpAddr,
    ) -> Result<admission::Admitted, admission::Full> {
        self.gate.admit(limited(config, client).then_some(client))
    }

    /// A session for a connection from `client`.
    pub(crate) fn open(
        &self,
        config: &Config,
        client: std::net::IpAddr,
    ) -> (confab_core::Session, confab_core::ConnReceiver) {
        self.chat.open(confab_core::Peer {
            addr: Some(client),
            limited: limited(config, client),
        })
    }
}

/// Whether per-address limits count `client`: not when it is in an
/// exempt network.
fn limited(config: &Config, client: std::net::IpAddr) -> bool {
    !config.exempt_networks.contains(client)
}

/// Open the store the configuration names; commits are reported to
/// `metrics` when given.
pub async fn open_store(config: &Config) -> Result<DynStore, StoreError> {
    open_observed_store(config, None).await
}

async fn open_observed_store(
    config: &Config,
    metrics: Option<Arc<Metrics>>,
) -> Result<DynStore, StoreError> {
    match &config.database {
        Database::Sqlite { path, durability } => {
            let store = SqliteStore::open(path, *durability).await?;
            if let Some(metrics) = metrics {
                store.observe_commits(Box::new(move |jobs, took| metrics.committed(jobs, took)));
            }
            tracing::info!(path = %path.display(), "storage: SQLite");
            Ok(Arc::new(store))
        }
        Database::Postgres { url, pool_size } => {
            let store = Arc::new(confab_store_postgres::PgStore::open(url, *pool_size).await?);
            if let Some(metrics) = metrics {
                let weak = Arc::downgrade(&store);
                metrics.watch_pool(Box::new(move || weak.upgrade().map(|s| s.pool_status())));
                store.observe_commits(Box::new(move |jobs, took| metrics.committed(jobs, took)));
            }
            let at = confab_store_postgres::describe(url)?;
            tracing::info!(database = %at, pool_size, "storage: PostgreSQL");
            Ok(store)
        }
    }
}

/// Drain by ourselves when the store fails for good: serving on would
/// answer every write `unavailable` while load balancers keep sending
/// traffic. [`Server::wait`] then returns the failure, and the process
/// exits non-zero for its supervisor to restart it.
async fn stop_on_failure(app: Arc<App>, store: DynStore) {
    tokio::select! {
        e = store.failed() => {
            tracing::error!(error = %e, "storage failed and cannot recover: stopping");
            let _ = app.failure.set(e);
            app.draining.cancel();
        }
        _ = app.draining.cancelled() => {}
    }
}

/// The schema version of the configured database and this binary's, or
/// `None` when it has no Confab schema yet. Changes nothing.
pub async fn schema_version(config: &Config) -> Result<Option<(u32, u32)>, StoreError> {
    match &config.database {
        Database::Sqlite { path, .. } => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || confab_store_sqlite::schema_version(&path))
                .await
                .map_err(|e| StoreError::Internal(e.to_string()))?
        }
        Database::Postgres { url, .. } => {
            let store = confab_store_postgres::PgStore::connect(url, 1)?;
            let (current, ours) = store.schema_version().await?;
            Ok((current > 0).then_some((current, ours)))
        }
    }
}

/// A running server.
pub struct Server {
    app: Arc<App>,
    store: DynStore,
}

/// Open storage, start the engine and serve the listeners.
pub async fn start(config: Config, listeners: Listeners) -> Result<Server, ServerError> {
    let metrics = Arc::new(Metrics::new());
    // The broker first: a Redis that refuses or a node name in use stops
    // the start before the database is touched.
    let broker = join_cluster(&config).await?;
    let started = async {
        let store = open_observed_store(&config, Some(metrics.clone())).await?;
        serve(config, listeners, store, metrics, broker.clone()).await
    };
    leave_unless_started(started.await, &broker).await
}

/// [`start`] on a store the caller opened (`config.database` is not used).
pub async fn start_on(
    config: Config,
    listeners: Listeners,
    store: DynStore,
) -> Result<Server, ServerError> {
    let broker = join_cluster(&config).await?;
    let started = serve(
        config,
        listeners,
        store,
        Arc::new(Metrics::new()),
        broker.clone(),
    );
    leave_unless_started(started.await, &broker).await
}

/// This node's broker: its cluster's (Redis), or a bus of its own.
async fn join_cluster(config: &Config) -> Result<Arc<dyn Broker>, ServerError> {
    Ok(match &config.broker {
        None => Arc::new(LocalBroker::new(&config.node)),
        Some(url) => Arc::new(RedisBroker::connect(url, &config.node).await?),
    })
}

/// A start that failed after joining the cluster leaves it again, so that
/// the node's name is free for the next try.
async fn leave_unless_started(
    started: Result<Server, ServerError>,
    broker: &Arc<dyn Broker>,
) -> Result<Server, ServerError> {
    if started.is_err() {
        broker.leave().await;
    }
    started
}

async fn serve(
    config: Config,
    listeners: Listeners,
    store: DynStore,
    metrics: Arc<Metrics>,
    broker: Arc<dyn Broker>,
) -> Result<Server, ServerError> {
    let Listeners { http, line } = listeners;
    let tls = config.tls.as_ref().map(tls::Tls::new).transpose()?;
    let chat = Chat::new(store.clone(), broker, config.chat.clone()).await?;
    chat.set_observer(metrics.clone());
    let app = App::new(config, chat, tls, metrics.clone());
    app.tasks.spawn(stop_on_failure(app.clone(), store.clone()));
    let router = Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(admin::ready))
        .route("/metrics", get(admin::metrics))
        .merge(admin::routes())
        .merge(web::routes())
        .with_state(app.clone());
    let scheme = if app.tls.is_some() { "TLS" } else { "plain" };
    tracing::info!(addr = %http.local_addr()?, scheme, "listening for HTTP and WebSocket");
    app.tasks.spawn(http::serve(app.clone(), http, router));
    if let Some(line) = line {
        tracing::info!(addr = %line.local_addr()?, scheme, "listening for the line protocol");
        app.tasks.spawn(line::serve(app.clone(), line));
    }
    Ok(Server { app, store })
}

impl Server {
    /// Apply a new configuration while running, without dropping anyone:
    /// the TLS certificate, connection limits, rate limits, the filter,
    /// guests, and the timeouts and sizes of new connections. The
    /// listeners, the database and turning TLS on or off need a restart.
    /// On an error nothing changes.
    pub async fn reload(&self, config: Config) -> Result<(), ServerError> {
        match (&self.app.tls, &config.tls) {
            (Some(tls), Some(files)) => {
                tls.reload(files)?;
                tracing::info!("reloaded the TLS certificate");
            }
            (None, None) => {}
            _ => tracing::warn!("turning TLS on or off needs a restart"),
        }
        self.app
            .gate
            .set_limits(config.max_connections, config.max_connections_per_ip);
        self.app.chat.set_config(config.chat.clone());
        *self.app.config.write().expect("config poisoned") = Arc::new(config);
        Ok(())
    }

    /// Start draining: stop accepting, let every connection finish the
    /// request in hand, send it `shutdown` and close it.
    pub fn begin_shutdown(&self) {
        if !self.app.draining.is_cancelled() {
            tracing::info!("shutting down: draining connections");
        }
        self.app.draining.cancel();
    }

    /// Resolves when the server starts draining: asked to by
    /// [`Server::begin_shutdown`], or by itself when its storage failed.
    pub async fn stopping(&self) {
        self.app.draining.cancelled().await
    }

    /// Wait for a drain to finish (at most the grace period), and return
    /// once storage has committed everything acknowledged. An error when
    /// the server stopped because its storage failed.
    pub async fn wait(self) -> Result<(), ServerError> {
        self.app.draining.cancelled().await;
        self.app.tasks.close();
        let grace = self.app.config().shutdown_grace;
        if tokio::time::timeout(grace, self.app.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.app.tasks.len(),
                "grace period over; closing the remaining connections"
            );
        }
        self.app.chat.leave_cluster().await;
        if let Some(e) = self.app.failure.get() {
            return Err(e.clone().into());
        }
        // Every acknowledged write was committed before its ack; this waits
        // for the storage to answer once more behind anything still queued.
        self.store.ping().await?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Serve until `shutdown` resolves, then drain and return.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let server = start(config, listeners).await?;
    tokio::select! {
        _ = shutdown => server.begin_shutdown(),
        _ = server.stopping() => {}
    }
    server.wait().await
}

/// An `App` on the in-memory store and no broker, for tests of the
/// transports' pieces.
#[cfg(test)]
pub(crate) async fn test_app() -> Arc<App> {
    let config = Config::default();
    let store: DynStore = Arc::new(confab_core::store::memory::MemoryStore::new());
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new(&config.node));
    let chat = Chat::new(store, broker, config.chat.clone())
        .await
        .expect("a chat on the memory store");
    App::new(config, chat, None, Arc::new(Metrics::new()))
}

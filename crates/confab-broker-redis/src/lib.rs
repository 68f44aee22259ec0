//! The Redis broker: how the nodes of a Confab cluster reach each other.
//!
//! - **Events**: Redis pub/sub, one channel per topic (`P:r:ROOM`,
//!   `P:u:USER`, `P:all`, with `P` the key prefix). A node subscribes to
//!   what its hub asks for, on one connection of its own; it publishes on
//!   another, from one task, so its events leave in the order they were
//!   published. Pub/sub is at most once: when the subscriber reconnects
//!   (Redis restarted, the connection dropped, Redis cut us off for a full
//!   output buffer) or a subscription takes effect, the hub is told
//!   ([`BrokerSink::missed`]) and reads those rooms from storage; when
//!   publishing fails, the rooms' heads are kept and announced once it
//!   works again.
//! - **Registry** (Lua scripts, atomic): `P:on:USER` (the nodes a user is
//!   connected to), `P:conns:NODE` (its users), `P:guest:USER` (the node
//!   holding a guest name, and the name), `P:node:NODE` (alive while the
//!   key lives; it holds this process's instance id, so two nodes with one
//!   name cannot both run), `P:nodes` (every node not yet buried).
//! - **Liveness**: each node refreshes its key every 2 s; a node whose
//!   key expired (10 s, see [`Liveness`]) is dead, and one living node (the
//!   one that takes `P:reap:NODE`) takes its users out of the registry and
//!   has its hub clean up after those who were connected nowhere else.
//! - **Throttles**: GCRA buckets in `P:throttle:KEY`, on Redis's clock.

#[cfg(feature = "testing")]
pub mod testing;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_core::broker::{
    wire, Broker, BrokerError, BrokerEvent, BrokerSink, BrokerStats, Orphan, Topic,
};
use confab_core::conn::publisher_turn;
use confab_core::{Rate, RoomName, UserName};
use futures_util::{FutureExt, StreamExt};
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::mpsc;

/// How often a node refreshes its liveness key and looks for dead nodes,
/// and how long its key outlives the last refresh (a node silent that
/// long is dead).
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    pub heartbeat: Duration,
    pub ttl: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
        }
    }
}
/// How long a command may take before the broker counts Redis as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Events waiting to be published; past this, publishes are dropped (and
/// their rooms' heads kept).
const PUBLISH_QUEUE: usize = 65_536;
/// Events sent to Redis in one pipeline, at most.
const PUBLISH_BATCH: usize = 256;
/// Channels per SUBSCRIBE command when resubscribing.
const SUBSCRIBE_CHUNK: usize = 1000;
/// The most events from other nodes delivered in one publisher's turn
/// (see `confab_core::conn::publisher_turn`) before the task lets others
/// run.
const RECEIVE_TURN: usize = 64;
/// The subscriber's reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid broker URL {0:?}: {1}")]
    Url(String, String),
    #[error("cannot reach Redis at {0}: {1}")]
    Unreachable(String, String),
    #[error(
        "a node named {0:?} is already running in this cluster (or was killed less than \
         {1} s ago): give each node its own name with --node"
    )]
    NameTaken(String, u64),
}

/// Where the broker connects, from `redis://HOST[:PORT][/DB][?prefix=P]`.
#[derive(Clone)]
pub struct BrokerUrl {
    /// The URL Redis's client gets (without our parameters).
    redis: String,
    /// Prepended to every key and channel: clusters (and tests) sharing a
    /// Redis each have their own.
    pub prefix: String,
}

impl std::fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerUrl")
            .field("redis", &mask(&self.redis))
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl BrokerUrl {
    pub fn parse(url: &str) -> Result<BrokerUrl, ConnectError> {
        let bad = |why: &str| ConnectError::Url(mask(url), why.to_owned());
        let Some(rest) = url.strip_prefix("redis://") else {
            return Err(if url.starts_with("rediss://") {
                bad("TLS to Redis (rediss://) is not supported; reach Redis over a private network")
            } else {
                bad("the broker is Redis: redis://HOST[:PORT][/DB]")
            });
        };
        let (base, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut prefix = "confab".to_owned();
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("prefix", p)) if valid_prefix(p) => prefix = p.to_owned(),
                Some(("prefix", _)) => {
                    return Err(bad("prefix is 1 to 64 letters, digits, '_', '-' or '.'"))
                }
                _ => kept.push(pair),
            }
        }
        let redis = if kept.is_empty() {
            format!("redis://{base}")
        } else {
            format!("redis://{base}?{}", kept.join("&"))
        };
        redis::Client::open(redis.as_str()).map_err(|e| bad(&e.to_string()))?;
        Ok(BrokerUrl { redis, prefix })
    }
}

fn valid_prefix(p: &str) -> bool {
    (1..=64).contains(&p.len())
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A URL with its password replaced, for messages and logs.
pub fn mask(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[derive(Debug, Default)]
struct Stats {
    published: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    malformed: AtomicU64,
    reconnects: AtomicU64,
}

pub struct RedisBroker {
    shared: Arc<Shared>,
    out: mpsc::Sender<BrokerEvent>,
    subs: mpsc::UnboundedSender<Sub>,
    /// The subscriber starts when a hub attaches: until then nobody could
    /// be told what was missed.
    subs_rx: Mutex<Option<mpsc::UnboundedReceiver<Sub>>>,
    /// Users a previous run of this node (killed, restarted under its
    /// name) left behind, for the hub to clean up after.
    predecessor: Mutex<Vec<Orphan>>,
}

struct Shared {
    node: String,
    instance: String,
    prefix: String,
    client: redis::Client,
    conn: ConnectionManager,
    sink: OnceLock<Weak<dyn BrokerSink>>,
    subscribed: AtomicBool,
    publishing: AtomicBool,
    /// Heads of rooms whose messages were not published.
    unsent: Mutex<HashMap<RoomName, u64>>,
    stats: Stats,
    scripts: Scripts,
    liveness: Liveness,
}

/// A change of the subscriber's channels.
enum Sub {
    /// `room` when the channel carries a room's messages (its subscription
    /// taking effect is reported `missed`).
    Add {
        channel: String,
        room: Option<RoomName>,
    },
    Remove(String),
}

impl Sub {
    fn apply(&self, wanted: &mut HashSet<String>) {
        match self {
            Sub::Add { channel, .. } => wanted.insert(channel.clone()),
            Sub::Remove(channel) => wanted.remove(channel),
        };
    }
}

/// What a heartbeat found.
#[derive(Debug, PartialEq, Eq)]
enum Beat {
    Alive,
    /// Another living process holds this node's name.
    Taken,
    /// The key had expired and another node buried this one meanwhile.
    Buried,
}

impl RedisBroker {
    /// Connect as node `node`, claim its name, and start the broker's
    /// tasks. Fails, having started nothing, when Redis cannot be reached
    /// or another living node has the name.
    pub async fn connect(url: &BrokerUrl, node: &str) -> Result<RedisBroker, ConnectError> {
        Self::connect_with(url, node, Liveness::default()).await
    }

    pub async fn connect_with(
        url: &BrokerUrl,
        node: &str,
        liveness: Liveness,
    ) -> Result<RedisBroker, ConnectError> {
        let unreachable =
            |e: redis::RedisError| ConnectError::Unreachable(mask(&url.redis), e.to_string());
        let client = redis::Client::open(url.redis.as_str()).map_err(unreachable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let conn = tokio::time::timeout(
            COMMAND_TIMEOUT * 2,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| ConnectError::Unreachable(mask(&url.redis), "timed out".into()))?
        .map_err(unreachable)?;
        let mut instance = [0u8; 8];
        getrandom::fill(&mut instance).expect("the OS has randomness");
        let shared = Arc::new(Shared {
            node: node.to_owned(),
            instance: instance.iter().map(|b| format!("{b:02x}")).collect(),
            prefix: url.prefix.clone(),
            client,
            conn,
            sink: OnceLock::new(),
            subscribed: AtomicBool::new(false),
            publishing: AtomicBool::new(true),
            unsent: Mutex::default(),
            stats: Stats::default(),
            scripts: Scripts::new(),
            liveness,
        });
        let redis_down =
            |e: redis::RedisError| ConnectError::Unreachable(mask(&url.redis), e.to_string());
        if shared.heartbeat().await.map_err(redis_down)? == Beat::Taken {
            let ttl = liveness.ttl.as_secs();
            return Err(ConnectError::NameTaken(node.to_owned(), ttl));
        }
        // A previous run under this name that was killed: take over its
        // burial before anyone connects here.
        let predecessor = shared.orphans(node).await.map_err(redis_down)?;
        shared.forget(node, true).await.map_err(redis_down)?;
        let (out, out_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (subs, subs_rx) = mpsc::unbounded_channel();
        let weak = Arc::downgrade(&shared);
        tokio::spawn(publisher(weak.clone(), out_rx));
        tokio::spawn(heartbeats(weak, liveness));
        tracing::info!(node, prefix = %url.prefix, "joined the cluster");
        Ok(RedisBroker {
            shared,
            out,
            subs,
            subs_rx: Mutex::new(Some(subs_rx)),
            predecessor: Mutex::new(predecessor),
        })
    }
}

impl Shared {
    fn key(&self, parts: &[&str]) -> String {
        let mut key = self.prefix.clone();
        for p in parts {
            key.push(':');
            key.push_str(p);
        }
        key
    }

    fn channel(&self, topic: &Topic) -> String {
        match topic {
            Topic::Room(room) => self.key(&["r", room.as_str()]),
            Topic::User(key) => self.key(&["u", key]),
            Topic::Everyone => self.key(&["all"]),
        }
    }

    fn sink(&self) -> Option<Arc<dyn BrokerSink>> {
        self.sink.get().and_then(Weak::upgrade)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Refresh (or take) this node's liveness key.
    async fn heartbeat(&self) -> redis::RedisResult<Beat> {
        let mut conn = self.conn();
        let claimed: i64 = self
            .scripts
            .claim_node
            .key(self.key(&["node", &self.node]))
            .key(self.key(&["nodes"]))
            .key(self.key(&["buried", &self.node]))
            .arg(&self.instance)
            .arg(self.liveness.ttl.as_millis() as u64)
            .arg(&self.node)
            .invoke_async(&mut conn)
            .await?;
        Ok(match claimed {
            0 => Beat::Taken,
            2 => Beat::Buried,
            _ => Beat::Alive,
        })
    }

    /// Bury the nodes whose keys expired, one at a time, each by the one
    /// living node that takes its reaping lock.
    async fn reap(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn();
        let nodes: Vec<String> = conn.smembers(self.key(&["nodes"])).await?;
        for node in nodes.into_iter().filter(|n| *n != self.node) {
            let alive: bool = conn.exists(self.key(&["node", &node])).await?;
            if alive {
                continue;
            }
            let lock: Option<String> = redis::cmd("SET")
                .arg(self.key(&["reap", &node]))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async(&mut conn)
                .await?;
            if lock.is_none() {
                continue; // another node is burying it
            }
            // Should it come back (it was cut off, not dead), it learns it
            // was buried when it takes its key again.
            let _: () = conn.set_ex(self.key(&["buried", &node]), 1, 3600).await?;
            let orphans = self.orphans(&node).await?;
            tracing::warn!(%node, "a node stopped heartbeating; burying it");
            match self.sink() {
                Some(sink) => sink.orphaned(node, orphans),
                None => return Ok(()),
            }
        }
        Ok(())
    }

    async fn forget(&self, node: &str, alive: bool) -> redis::RedisResult<()> {
        let _: i64 = self
            .scripts
            .forget
            .arg(node)
            .arg(&self.prefix)
            .arg(if alive { "alive" } else { "gone" })
            .invoke_async(&mut self.conn())
            .await?;
        Ok(())
    }

    /// Take `node` out of its users' entries; the users it left connected
    /// nowhere.
    async fn orphans(&self, node: &str) -> redis::RedisResult<Vec<Orphan>> {
        let found: Vec<String> = self
            .scripts
            .orphans
            .arg(node)
            .arg(&self.prefix)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(found
            .chunks(2)
            .filter_map(|pair| {
                let guest = !pair[1].is_empty();
                let name = if guest { &pair[1] } else { &pair[0] };
                let user = UserName::parse(name).ok()?;
                Some(Orphan { user, guest })
            })
            .collect())
    }

    /// Deliver an event another node published (this node's own come
    /// back too: they were delivered when published).
    fn receive(&self, node: &str, msg: &redis::Msg) {
        match wire::decode(msg.get_payload_bytes()) {
            Ok((from, _)) if from == node => {}
            Ok((_, event)) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                if let Some(hub) = self.sink() {
                    hub.deliver(&event);
                }
            }
            Err(e) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, channel = msg.get_channel_name(), "dropping an event from another node");
            }
        }
    }

    fn keep_unsent(&self, events: &[BrokerEvent]) {
        let mut unsent = self.unsent.lock().expect("unsent poisoned");
        for event in events {
            if let BrokerEvent::Message { message, .. } = event {
                let head = unsent
                    .entry(RoomName::from_trusted(message.room.clone()))
                    .or_default();
                *head = (*head).max(message.seq);
            }
        }
    }

    async fn send(&self, events: &[BrokerEvent]) -> redis::RedisResult<()> {
        let mut pipe = redis::pipe();
        for event in events {
            for (topic, one) in event.split() {
                pipe.publish(self.channel(&topic), wire::encode(&self.node, &one))
                    .ignore();
            }
        }
        if pipe.is_empty() {
            return Ok(()); // a presence change of a user in no room
        }
        pipe.query_async::<()>(&mut self.conn()).await
    }

    /// Announce the heads of rooms whose publishes failed.
    async fn flush_unsent(&self) -> redis::RedisResult<()> {
        let heads: Vec<BrokerEvent> = {
            let unsent = self.unsent.lock().expect("unsent poisoned");
            unsent
                .iter()
                .map(|(room, seq)| BrokerEvent::Head {
                    room: room.clone(),
                    seq: *seq,
                })
                .collect()
        };
        if heads.is_empty() {
            return Ok(());
        }
        self.send(&heads).await?;
        let mut unsent = self.unsent.lock().expect("unsent poisoned");
        for head in heads {
            if let BrokerEvent::Head { room, seq } = head {
                if unsent.get(&room) == Some(&seq) {
                    unsent.remove(&room);
                }
            }
        }
        tracing::info!("announced the rooms whose messages could not be published");
        Ok(())
    }
}

/// Publish queued events in order, in pipelines.
async fn publisher(shared: Weak<Shared>, mut rx: mpsc::Receiver<BrokerEvent>) {
    let mut retry = tokio::time::interval(Duration::from_millis(250));
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch = Vec::new();
        tokio::select! {
            first = rx.recv() => match first {
                Some(event) => batch.push(event),
                None => break,
            },
            _ = retry.tick() => {}
        }
        while batch.len() < PUBLISH_BATCH {
            match rx.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let sent = match shared.flush_unsent().await {
            Ok(()) if batch.is_empty() => Ok(()),
            Ok(()) => shared.send(&batch).await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {
                shared
                    .stats
                    .published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if !shared.publishing.swap(true, Ordering::Relaxed) {
                    tracing::info!("publishing to Redis again");
                }
            }
            Err(e) => {
                shared.keep_unsent(&batch);
                shared
                    .stats
                    .dropped
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                if shared.publishing.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "cannot publish to Redis; delivering on this node only");
                }
            }
        }
    }
}

/// Keep one pub/sub connection subscribed to the topics the hub asks for,
/// through reconnects.
async fn subscriber(shared: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Sub>) {
    let mut wanted: HashSet<String> = HashSet::new();
    let mut backoff = BACKOFF_MIN;
    let mut first = true;
    loop {
        let Some(sh) = shared.upgrade() else { return };
        let connected = tokio::time::timeout(COMMAND_TIMEOUT, sh.client.get_async_pubsub()).await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                if sh.subscribed.swap(false, Ordering::Relaxed) || first {
                    tracing::warn!(%error, "cannot subscribe to Redis; retrying");
                }
                first = false;
                drop(sh);
                // Keep taking the hub's changes while waiting.
                let until = tokio::time::sleep(backoff);
                tokio::pin!(until);
                loop {
                    tokio::select! {
                        _ = &mut until => break,
                        sub = rx.recv() => match sub {
                            Some(sub) => sub.apply(&mut wanted),
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let channels: Vec<&String> = wanted.iter().collect();
        let mut ok = true;
        for chunk in channels.chunks(SUBSCRIBE_CHUNK) {
            if !answered(sink.subscribe(chunk)).await {
                ok = false;
                break;
            }
        }
        if !ok {
            // Connected but refused the subscriptions: wait as after a
            // failed connect (the hub's changes queue meanwhile).
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
            continue;
        }
        backoff = BACKOFF_MIN;
        if !first {
            sh.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                channels = wanted.len(),
                "subscribed to Redis again; catching up from storage"
            );
        }
        first = false;
        sh.subscribed.store(true, Ordering::Relaxed);
        // Whatever was published while we were not subscribed is in the
        // store: every room catches up (the registry is told again too).
        if let Some(hub) = sh.sink() {
            hub.missed(None);
        }
        let node = sh.node.clone();
        let every = sh.liveness.heartbeat;
        drop(sh);
        // A connection Redis stopped answering on is found by a ping.
        let mut ping = tokio::time::interval(every);
        ping.tick().await;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(sh) = shared.upgrade() else { return };
                    // What Redis has already sent is delivered in one
                    // publisher's turn, as a local send's events are: an
                    // idle member's socket is written once at the turn's
                    // end, with every event of the turn, instead of its
                    // task being woken for each.
                    let ended = publisher_turn(|| {
                        let mut msg = msg;
                        for _ in 1..RECEIVE_TURN {
                            sh.receive(&node, &msg);
                            match stream.next().now_or_never() {
                                Some(Some(next)) => msg = next,
                                Some(None) => return true,
                                None => return false,
                            }
                        }
                        sh.receive(&node, &msg);
                        false
                    });
                    if ended {
                        break;
                    }
                }
                sub = rx.recv() => {
                    let Some(sub) = sub else { return };
                    sub.apply(&mut wanted);
                    // Meanwhile nothing else of this loop runs, the pings
                    // neither: a (un)subscription Redis does not answer
                    // ends the connection as a ping would.
                    let done = match &sub {
                        Sub::Add { channel, .. } => answered(sink.subscribe(channel)).await,
                        Sub::Remove(channel) => answered(sink.unsubscribe(channel)).await,
                    };
                    if !done {
                        break;
                    }
                    // Messages committed before the subscription took
                    // effect went by: read them from the store.
                    if let Sub::Add { room: Some(room), .. } = sub {
                        if let Some(hub) = shared.upgrade().and_then(|sh| sh.sink()) {
                            hub.missed(Some(vec![room]));
                        }
                    }
                }
                _ = ping.tick() => {
                    // Subscribed, Redis answers PING with ["pong", ""].
                    if !answered(sink.ping::<redis::Value>()).await {
                        break;
                    }
                }
            }
        }
        if let Some(sh) = shared.upgrade() {
            sh.subscribed.store(false, Ordering::Relaxed);
            tracing::warn!("lost the Redis subscription; reconnecting");
        }
    }
}

/// Whether Redis answered a command within [`COMMAND_TIMEOUT`], without
/// an error. A connection whose packets are dropped in silence would
/// otherwise hold the command until TCP gives up, some 15 minutes.
async fn answered<T>(command: impl Future<Output = redis::RedisResult<T>>) -> bool {
    matches!(
        tokio::time::timeout(COMMAND_TIMEOUT, command).await,
        Ok(Ok(_))
    )
}

/// Keep this node alive in the registry and bury dead ones.
async fn heartbeats(shared: Weak<Shared>, liveness: Liveness) {
    let mut tick = tokio::time::interval(liveness.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    // Since when this node has beaten without a gap. It judges others
    // only after a whole TTL of its own beats: after an outage that
    // silenced every node, each had its chance to beat again first.
    let mut beating_since: Option<Instant> = None;
    let mut last_beat: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(sh) = shared.upgrade() else { return };
        let beat = match sh.heartbeat().await {
            Ok(Beat::Buried) => {
                if let Some(hub) = sh.sink() {
                    hub.rejoined();
                }
                beating_since = None;
                last_beat = None;
                Ok(())
            }
            Ok(Beat::Alive) => {
                let now = Instant::now();
                if last_beat.is_none_or(|t| now - t > liveness.ttl / 2) {
                    beating_since = Some(now);
                }
                last_beat = Some(now);
                match beating_since {
                    Some(since) if now - since >= liveness.ttl => sh.reap().await,
                    _ => Ok(()),
                }
            }
            Ok(Beat::Taken) => {
                tracing::error!(node = %sh.node, "another process took this node's name");
                Ok(())
            }
            Err(e) => Err(e),
        };
        match beat {
            Ok(()) if !healthy => {
                tracing::info!("Redis answers heartbeats again");
                healthy = true;
            }
            Err(e) if healthy => {
                tracing::warn!(error = %e, "heartbeat to Redis failed");
                healthy = false;
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn node(&self) -> &str {
        &self.shared.node
    }

    fn attach(&self, sink: Weak<dyn BrokerSink>) {
        let _ = self.shared.sink.set(sink);
        if let Some(rx) = self.subs_rx.lock().expect("poisoned").take() {
            tokio::spawn(subscriber(Arc::downgrade(&self.shared), rx));
        }
        let orphans = std::mem::take(&mut *self.predecessor.lock().expect("poisoned"));
        if let (false, Some(hub)) = (orphans.is_empty(), self.shared.sink()) {
            tracing::info!(
                users = orphans.len(),
                "cleaning up after this node's previous run"
            );
            hub.orphaned(self.shared.node.clone(), orphans);
        }
    }

    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError> {
        if let Some(hub) = self.shared.sink() {
            hub.deliver(&event);
        }
        if let Err(e) = self.out.try_send(event) {
            let event = e.into_inner();
            self.shared.keep_unsent(std::slice::from_ref(&event));
            self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(BrokerError("the publish queue is full".into()));
        }
        Ok(())
    }

    fn subscribe(&self, topic: Topic) {
        let channel = self.shared.channel(&topic);
        let room = match topic {
            Topic::Room(room) => Some(room),
            Topic::User(_) | Topic::Everyone => None,
        };
        let _ = self.subs.send(Sub::Add { channel, room });
    }

    fn unsubscribe(&self, topic: Topic) {
        let _ = self.subs.send(Sub::Remove(self.shared.channel(&topic)));
    }

    async fn present(&self, user: &UserName, guest: bool, here: bool) -> Result<bool, BrokerError> {
        let sh = &self.shared;
        let done: i64 = sh
            .scripts
            .present
            .key(sh.key(&["on", user.key()]))
            .key(sh.key(&["conns", &sh.node]))
            .key(sh.key(&["guest", user.key()]))
            .arg(&sh.node)
            .arg(user.key())
            .arg(u8::from(here))
            .arg(u8::from(guest))
            .arg(user.as_str())
            .invoke_async(&mut sh.conn())
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    async fn claim_guest(&self, user: &UserName) -> Result<bool, BrokerError> {
        let sh = &self.shared;
        let done: i64 = sh
            .scripts
            .claim_guest
            .key(sh.key(&["guest", user.key()]))
            .key(sh.key(&["on", user.key()]))
            .key(sh.key(&["conns", &sh.node]))
            .arg(&sh.node)
            .arg(user.as_str())
            .arg(user.key())
            .invoke_async(&mut sh.conn())
            .await
            .map_err(unavailable)?;
        Ok(done == 1)
    }

    async fn guest(&self, key: &str) -> Result<Option<UserName>, BrokerError> {
        let sh = &self.shared;
        let held: Option<String> = sh
            .conn()
            .get(sh.key(&["guest", key]))
            .await
            .map_err(unavailable)?;
        Ok(held
            .as_deref()
            .and_then(|h| h.split_once('\n'))
            .and_then(|(_, name)| UserName::parse(name).ok()))
    }

    async fn elsewhere(&self, keys: &[&str]) -> Result<Vec<bool>, BrokerError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let sh = &self.shared;
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.smembers(sh.key(&["on", key]));
        }
        let nodes: Vec<Vec<String>> = pipe
            .query_async(&mut sh.conn())
            .await
            .map_err(unavailable)?;
        Ok(nodes
            .iter()
            .map(|nodes| nodes.iter().any(|n| *n != sh.node))
            .collect())
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, BrokerError> {
        let Some((period, burst)) = rate.gcra() else {
            return Ok(Ok(()));
        };
        let sh = &self.shared;
        let wait_us: i64 = sh
            .scripts
            .throttle
            .key(sh.key(&["throttle", key]))
            .arg(period.as_micros() as u64)
            .arg(burst)
            .invoke_async(&mut sh.conn())
            .await
            .map_err(unavailable)?;
        Ok(if wait_us < 0 {
            Ok(())
        } else {
            Err(Duration::from_micros(wait_us as u64))
        })
    }

    async fn alone(&self) -> Result<bool, BrokerError> {
        let sh = &self.shared;
        let mut conn = sh.conn();
        let nodes: Vec<String> = conn
            .smembers(sh.key(&["nodes"]))
            .await
            .map_err(unavailable)?;
        for node in nodes.iter().filter(|n| **n != sh.node) {
            let alive: bool = conn
                .exists(sh.key(&["node", node]))
                .await
                .map_err(unavailable)?;
            if alive {
                return Ok(false);
            }
        }
        Ok(true)
    }

    async fn forget_node(&self, node: &str) -> Result<(), BrokerError> {
        let sh = &self.shared;
        if node == sh.node {
            return Ok(()); // our previous run: cleared when we connected
        }
        sh.forget(node, false).await.map_err(unavailable)
    }

    fn connected(&self) -> bool {
        self.shared.subscribed.load(Ordering::Relaxed)
            && self.shared.publishing.load(Ordering::Relaxed)
    }

    fn stats(&self) -> BrokerStats {
        let s = &self.shared.stats;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        BrokerStats {
            published: get(&s.published),
            received: get(&s.received),
            dropped: get(&s.dropped),
            malformed: get(&s.malformed),
            reconnects: get(&s.reconnects),
        }
    }

    async fn leave(&self) {
        let sh = &self.shared;
        let left: redis::RedisResult<i64> = sh
            .scripts
            .leave
            .key(sh.key(&["node", &sh.node]))
            .arg(&sh.instance)
            .arg(&sh.node)
            .arg(&sh.prefix)
            .invoke_async(&mut sh.conn())
            .await;
        match left {
            Ok(_) => tracing::info!(node = %sh.node, "left the cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "leaving the cluster; the others will bury this node")
            }
        }
    }
}

fn unavailable(e: redis::RedisError) -> BrokerError {
    BrokerError(e.to_string())
}

/// The registry's atomic operations. Keys a script computes itself (from
/// the prefix it is given) keep this to a single Redis, not Redis Cluster.
struct Scripts {
    claim_node: Script,
    present: Script,
    claim_guest: Script,
    throttle: Script,
    orphans: Script,
    forget: Script,
    leave: Script,
}

/// `P:guest:USER` holds "NODE\nNAME".
const HOLDER: &str =
    "local function holder(g) if g then return string.match(g, '^([^\\n]*)') end return nil end\n";

/// Removes what a node held: its guest names, its users' entries, its
/// record. ARGV: node, prefix, and "alive" when the node itself clears
/// what its previous run left; otherwise a node that came back (its key
/// lives again) is left alone.
const FORGET: &str = "
local node, p = ARGV[1], ARGV[2]
if ARGV[3] ~= 'alive' and redis.call('EXISTS', p .. ':node:' .. node) == 1 then return 0 end
local conns = p .. ':conns:' .. node
for _, u in ipairs(redis.call('SMEMBERS', conns)) do
  local gk = p .. ':guest:' .. u
  if holder(redis.call('GET', gk)) == node then redis.call('DEL', gk) end
  redis.call('SREM', p .. ':on:' .. u, node)
end
redis.call('DEL', conns)
if ARGV[3] ~= 'alive' then redis.call('SREM', p .. ':nodes', node) end
redis.call('DEL', p .. ':reap:' .. node)
return 1
";

impl Scripts {
    fn new() -> Self {
        let with_holder = |body: &str| Script::new(&format!("{HOLDER}{body}"));
        Scripts {
            // KEYS: node key, nodes set, buried marker. ARGV: instance,
            // ttl ms, node. 0: another instance holds the name; 2: taken
            // again after others buried this node; 1: alive.
            claim_node: Script::new(
                "local v = redis.call('GET', KEYS[1])
                 if v and v ~= ARGV[1] then return 0 end
                 redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
                 redis.call('SADD', KEYS[2], ARGV[3])
                 if not v and redis.call('DEL', KEYS[3]) == 1 then return 2 end
                 return 1",
            ),
            // KEYS: on:USER, conns:NODE, guest:USER.
            // ARGV: node, user key, here, guest, name.
            present: with_holder(
                "local node, here = ARGV[1], ARGV[3] == '1'
                 if ARGV[4] == '1' then
                   local h = holder(redis.call('GET', KEYS[3]))
                   if here then
                     if h and h ~= node then return 0 end
                     if not h then redis.call('SET', KEYS[3], node .. '\\n' .. ARGV[5]) end
                   elseif h == node then
                     redis.call('DEL', KEYS[3])
                   end
                 end
                 if here then
                   redis.call('SADD', KEYS[1], node)
                   redis.call('SADD', KEYS[2], ARGV[2])
                 else
                   redis.call('SREM', KEYS[1], node)
                   redis.call('SREM', KEYS[2], ARGV[2])
                 end
                 return 1",
            ),
            // KEYS: guest:USER, on:USER, conns:NODE. ARGV: node, name, user key.
            claim_guest: with_holder(
                "local h = holder(redis.call('GET', KEYS[1]))
                 if h then if h == ARGV[1] then return 1 else return 0 end end
                 for _, n in ipairs(redis.call('SMEMBERS', KEYS[2])) do
                   if n ~= ARGV[1] then return 0 end
                 end
                 redis.call('SET', KEYS[1], ARGV[1] .. '\\n' .. ARGV[2])
                 redis.call('SADD', KEYS[3], ARGV[3])
                 return 1",
            ),
            // GCRA on Redis's clock, in microseconds. KEYS: the bucket.
            // ARGV: period, burst. Returns -1, or how long to wait.
            throttle: Script::new(
                "local t = redis.call('TIME')
                 local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
                 local period, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
                 local tat = tonumber(redis.call('GET', KEYS[1]) or now)
                 if tat < now then tat = now end
                 local tolerance = period * (burst - 1)
                 if tat - now > tolerance then return math.ceil(tat - now - tolerance) end
                 tat = tat + period
                 redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
                 return -1",
            ),
            // ARGV: dead node, prefix. Takes the node out of its users'
            // entries; returns [key, guest name or ''] of each user it
            // left connected nowhere.
            orphans: with_holder(
                "local node, p = ARGV[1], ARGV[2]
                 local out = {}
                 for _, u in ipairs(redis.call('SMEMBERS', p .. ':conns:' .. node)) do
                   local on = p .. ':on:' .. u
                   redis.call('SREM', on, node)
                   if redis.call('SCARD', on) == 0 then
                     local g = redis.call('GET', p .. ':guest:' .. u)
                     local name = ''
                     if holder(g) == node then name = string.match(g, '\\n(.*)$') end
                     table.insert(out, u)
                     table.insert(out, name)
                   end
                 end
                 return out",
            ),
            // ARGV: node, prefix.
            forget: with_holder(FORGET),
            // KEYS: node key. ARGV: instance, node, prefix.
            leave: with_holder(&format!(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
                 ARGV[1] = ARGV[2]
                 ARGV[2] = ARGV[3]
                 ARGV[3] = 'gone'
                 {FORGET}"
            )),
        }
    }
}

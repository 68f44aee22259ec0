//! [`Chat`]: the engine one server runs. It owns the store, the broker and
//! the local hub, and opens a [`Session`] for each connection.

use std::net::IpAddr;
use std::sync::{Arc, OnceLock, RwLock};

use confab_proto::{ErrorCode, Event};
use std::time::Duration;

use crate::auth::Passwords;
use crate::broker::{Broker, BrokerError, BrokerEvent, BrokerSink};
use crate::conn::{self, ConnIds, ConnReceiver};
use crate::error::StoreError;
use crate::hub::Connected;
use crate::hub::Hub;
use crate::limits::{ContentFilter, RateLimits, SharedLimiters};
use crate::names::UserName;
use crate::session::Session;
use crate::store::DynStore;

/// Where a connection comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Peer {
    /// The client's address (behind a trusted proxy, the one it reports).
    pub addr: Option<IpAddr>,
    /// Whether per-address limits count it (not in an exempt network).
    pub limited: bool,
}

/// The engine's settings. Transports have their own (frame sizes, heartbeats).
#[derive(Debug, Clone)]
pub struct ChatConfig {
    /// Largest message body, in bytes of UTF-8.
    pub max_body_bytes: usize,
    /// Largest room topic, in characters.
    pub max_topic_chars: usize,
    /// Items one connection may have queued before it is closed as a slow
    /// consumer.
    pub outbound_queue: usize,
    pub allow_guests: bool,
    /// The most public rooms one user may be a member of.
    pub max_rooms_per_user: u32,
    /// The most messages one `sync` reply carries, over all its rooms.
    pub max_sync_messages: u32,
    /// How long a room waits for a missing seq before reading it from storage.
    pub gap_fill_delay: Duration,
    /// How many password hashes may run at once.
    pub hash_concurrency: usize,
    pub rate_limits: RateLimits,
    /// Refuses message bodies and topics matching its rules.
    pub filter: ContentFilter,
}

impl Default for ChatConfig {
    fn default() -> Self {
        ChatConfig {
            max_body_bytes: 4096,
            max_topic_chars: 256,
            outbound_queue: 1024,
            allow_guests: true,
            max_rooms_per_user: 1000,
            // At most ~9 MB of JSON with 4 KiB bodies.
            max_sync_messages: 2000,
            gap_fill_delay: Duration::from_millis(100),
            hash_concurrency: std::thread::available_parallelism().map_or(2, |n| n.get()),
            rate_limits: RateLimits::default(),
            filter: ContentFilter::default(),
        }
    }
}

/// The chat engine; cheap to clone.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: DynStore,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) hub: Arc<Hub>,
    policy: RwLock<Arc<Policy>>,
    pub(crate) passwords: Passwords,
    pub(crate) observer: OnceLock<Arc<dyn Observer>>,
    ids: ConnIds,
}

/// Told of what the engine does, for metrics. Called on the session's task:
/// must not block.
pub trait Observer: Send + Sync + 'static {
    /// A request was answered: `Ok`, or the error code, `took` after it
    /// arrived (its storage operations included).
    fn request(&self, kind: &'static str, result: Result<(), ErrorCode>, took: Duration);
    /// A new message was stored (a duplicate nonce is not one).
    fn message_stored(&self);
}

/// The settings that can change while the server runs, with the shared
/// rate-limit buckets built from them. Sessions pick up a new policy at
/// their next request.
pub(crate) struct Policy {
    pub(crate) config: ChatConfig,
    pub(crate) limiters: SharedLimiters,
}

impl Policy {
    fn new(config: ChatConfig) -> Arc<Policy> {
        Arc::new(Policy {
            limiters: SharedLimiters::new(&config.rate_limits),
            config,
        })
    }
}

impl Inner {
    pub(crate) fn policy(&self) -> Arc<Policy> {
        self.policy.read().expect("policy poisoned").clone()
    }
}

/// How often idle per-user and per-IP buckets are forgotten.
const LIMITER_GC_INTERVAL: Duration = Duration::from_secs(60);
/// How often the store's log of deleted users is read: a deleted user's
/// connections close within this long, whoever deleted them.
const REMOVED_USERS_POLL: Duration = Duration::from_secs(1);

impl Chat {
    /// Start the engine on a store and a broker. Guest memberships left
    /// over from a crash are removed when this node is alone: no guest is
    /// connected yet.
    pub async fn new(
        store: DynStore,
        broker: Arc<dyn Broker>,
        config: ChatConfig,
    ) -> Result<Chat, StoreError> {
        // Guest memberships left over from a crash: only a node alone in
        // its cluster may know that no guest is connected.
        match broker.alone().await {
            Ok(true) => store.drop_all_guests().await?,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "keeping guest memberships: the broker is unavailable")
            }
        }
        let removed_since = store.removed_users(None).await?.cursor;
        let hub = Hub::new(store.clone(), broker.clone(), config.gap_fill_delay);
        let inner = Arc::new(Inner {
            store,
            broker,
            hub,
            passwords: Passwords::new(config.hash_concurrency),
            policy: RwLock::new(Policy::new(config)),
            observer: OnceLock::new(),
            ids: ConnIds::default(),
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LIMITER_GC_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(inner) => {
                        inner.policy().limiters.forget_idle();
                        inner.hub.forget_old_presence();
                    }
                    None => break,
                }
            }
        });
        tokio::spawn(close_removed_users(Arc::downgrade(&inner), removed_since));
        Ok(Chat { inner })
    }

    /// A session for a new connection from `peer`, and the transport's end
    /// of its queue.
    pub fn open(&self, peer: Peer) -> (Session, ConnReceiver) {
        let queue = self.inner.policy().config.outbound_queue;
        let (conn, rx) = conn::channel(self.inner.ids.next(), queue, peer.addr);
        let limited = peer.addr.filter(|_| peer.limited);
        (Session::new(self.inner.clone(), conn, limited), rx)
    }

    /// Report to `observer` from now on (once; later calls are ignored).
    pub fn set_observer(&self, observer: Arc<dyn Observer>) {
        let _ = self.inner.observer.set(observer);
    }

    /// This node's name in its cluster.
    pub fn node(&self) -> &str {
        self.inner.broker.node()
    }

    /// Whether the broker is connected (always, on a single node), and
    /// what it carried.
    pub fn broker_status(&self) -> (bool, crate::broker::BrokerStats) {
        (self.inner.broker.connected(), self.inner.broker.stats())
    }

    /// Leave the cluster (a graceful stop, after the connections closed).
    pub async fn leave_cluster(&self) {
        self.inner.broker.leave().await
    }

    /// The users connected to this node, with their connections.
    pub fn online(&self) -> Vec<Connected> {
        self.inner.hub.online()
    }

    /// (users connected to this node, rooms with a connected member).
    pub fn counts(&self) -> (usize, usize) {
        self.inner.hub.counts()
    }

    /// Send a notice to everyone connected, on every node.
    pub async fn notice(&self, text: &str) -> Result<(), BrokerError> {
        let event = Event::Notice {
            text: text.to_owned(),
        };
        self.inner
            .broker
            .publish(BrokerEvent::Everyone { event })
            .await
    }

    /// Delete a hub with its channels and their history (the operators'
    /// tool): every member is told (`kicked`, by "an administrator") and
    /// stops receiving them, on every node. Returns how many members the
    /// hub had. What cannot be published is logged: the hub is gone either
    /// way, and clients find it gone at their next request.
    pub async fn delete_hub(&self, hub: &crate::names::HubName) -> Result<usize, StoreError> {
        let gone = self.inner.store.delete_hub(hub).await?;
        let members = gone.first().map_or(0, |(_, users)| users.len());
        let mut events = Vec::new();
        for user in gone
            .first()
            .map(|(_, users)| users.as_slice())
            .unwrap_or(&[])
        {
            events.push(BrokerEvent::User {
                user: user.key().to_owned(),
                event: Event::Kicked {
                    place: confab_proto::Place::hub(hub.as_str()),
                    by: "an administrator".into(),
                    reason: "the hub was deleted".into(),
                },
                skip: crate::broker::Skip::Nobody,
            });
        }
        for (room, users) in gone {
            for user in users {
                events.push(BrokerEvent::Membership {
                    room: room.clone(),
                    user,
                    joined: false,
                    last_seq: 0,
                });
            }
        }
        for event in events {
            if let Err(e) = self.inner.broker.publish(event).await {
                tracing::warn!(error = %e, hub = %hub, "telling the members of a deleted hub");
            }
        }
        Ok(members)
    }

    /// Delete a message as the operator `by` (the operators' tool): the
    /// deletion is an entry of the room's log in `by`'s name, delivered to
    /// the members like any. Refused (`forbidden`) when `by` is no
    /// operator; `not_found` for no such room or message.
    pub async fn delete_message(
        &self,
        room: &crate::names::RoomName,
        seq: confab_proto::Seq,
        by: &UserName,
    ) -> Result<confab_proto::Message, crate::ChatError> {
        let store = &self.inner.store;
        // The entry names the operator as registered.
        let by = match store.user(by).await? {
            Some(record) if store.operator(&record.name).await? => record.name,
            _ => return Err(crate::ChatError::forbidden(format!("{by} is no operator"))),
        };
        let entry = crate::store::NewMessage {
            room: room.clone(),
            sender: by,
            body: String::new(),
            nonce: None,
            ts: crate::store::now_ms(),
            direct: None,
            amend: Some(crate::store::Amend::Delete {
                target: seq,
                moderator: true,
            }),
        };
        let stored = store.append(entry).await.map_err(|e| match e {
            StoreError::NoSuchRoom => {
                crate::ChatError::not_found(format!("no room named {}", room.shown()))
            }
            e => e.into(),
        })?;
        let message = stored.message.clone();
        let event = BrokerEvent::Message {
            message: stored.message,
            accepted: None,
        };
        if let Err(e) = self.inner.broker.publish(event).await {
            // Stored: members catch up with `sync`.
            tracing::warn!(error = %e, "publishing a deletion");
        }
        Ok(message)
    }

    /// Close every connection of `user`, on every node.
    pub async fn disconnect(&self, user: &UserName) -> Result<(), BrokerError> {
        let user = user.key().to_owned();
        self.inner
            .broker
            .publish(BrokerEvent::Disconnect { user })
            .await
    }

    pub fn store(&self) -> &DynStore {
        &self.inner.store
    }

    /// The settings in force.
    pub fn config(&self) -> ChatConfig {
        self.inner.policy().config.clone()
    }

    /// Change the settings while running: limits, rate limits (with fresh
    /// buckets), the filter, guests, the queue size of new connections.
    /// `gap_fill_delay` and `hash_concurrency` keep their start values.
    pub fn set_config(&self, config: ChatConfig) {
        *self.inner.policy.write().expect("policy poisoned") = Policy::new(config);
    }
}

/// Close the connections of users deleted since `cursor`, by this server
/// or any other process on the database (`confab user delete`), until the
/// engine is dropped. A failed read is retried at the next tick.
async fn close_removed_users(inner: std::sync::Weak<Inner>, mut cursor: u64) {
    let mut tick = tokio::time::interval(REMOVED_USERS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        match inner.store.removed_users(Some(cursor)).await {
            Ok(removed) => {
                cursor = removed.cursor;
                for user in removed.users {
                    tracing::info!(%user, "closing the connections of a deleted user");
                    let user = user.key().to_owned();
                    inner.hub.deliver(&BrokerEvent::Disconnect { user });
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading deleted users"),
        }
    }
}

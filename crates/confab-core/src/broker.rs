//! The seam between the nodes of a cluster.
//!
//! Each node's [`Hub`](crate::hub::Hub) fans events out to its own
//! connections; a [`Broker`] carries them to the other nodes' hubs and
//! keeps what must be known cluster-wide: who is connected where
//! (presence, guest names), the per-account login throttle, and which
//! nodes are alive.
//!
//! - Events go to [`Topic`]s: a room, a user, everyone. A node receives
//!   only the topics its hub subscribes to, the rooms and users with a
//!   connection here. The publishing node's own hub gets every event at
//!   once, without a round trip, so a node serves its own clients while
//!   the bus is down.
//! - Delivery between nodes is at most once. What it loses is found again
//!   in storage: a broker that (re)subscribes after a time it may have
//!   missed events says so ([`BrokerSink::missed`]) and the hub reads the
//!   rooms' new messages from the store; a node whose publishes failed
//!   announces the rooms' heads once it can ([`BrokerEvent::Head`]).
//! - Between nodes, events travel in the versioned [`wire`] format.
//!
//! [`LocalBroker`] is a single server: a cluster of one, with nothing to
//! carry and nobody else to ask. [`MemoryBroker`] on a shared
//! [`MemoryBus`] is several nodes in one process (for tests).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_proto::{Event, Message, Seq};
use serde::{Deserialize, Serialize};

use crate::conn::ConnId;
use crate::limits::Rate;
use crate::names::{RoomName, UserName};

/// Which connections an event skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Nobody,
    /// The connection that caused it (it got a reply instead). Only
    /// meaningful on the node it is on: on the wire it is [`Skip::Nobody`].
    Conn(ConnId),
    /// Every connection of this user (by key).
    User(String),
}

/// What a node subscribes to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Room(RoomName),
    /// A user, by key: read markers, membership changes, disconnects.
    User(String),
    /// Operators' notices.
    Everyone,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BrokerEvent {
    /// A committed message, delivered to the room's members in seq order.
    /// `accepted` is when this node accepted it (not carried between nodes).
    Message {
        message: Message,
        #[serde(skip)]
        accepted: Option<Instant>,
    },
    /// Every message of `room` up to `seq` is committed: a node whose
    /// publishes were lost says so once it can, and hubs read what they
    /// have not delivered from the store.
    Head { room: RoomName, seq: Seq },
    /// An event for a room's connected members: joined, left, topic, typing.
    Room {
        room: RoomName,
        event: Event,
        skip: Skip,
    },
    /// An event for every connection of one user (by key): read markers.
    User {
        user: String,
        event: Event,
        skip: Skip,
    },
    /// A membership began or ended: the user's connections start or stop
    /// receiving the room. `last_seq` is the room's last seq when it began.
    Membership {
        room: RoomName,
        user: UserName,
        joined: bool,
        last_seq: Seq,
    },
    /// A user's first connection opened or last one closed, in the
    /// cluster as far as the publisher knows; observers are the connected
    /// members of `rooms`. Between nodes it travels once per room, and
    /// hubs tell each observer once.
    Presence {
        user: UserName,
        online: bool,
        rooms: Vec<RoomName>,
    },
    /// An event for every connected user (operators' notices).
    Everyone { event: Event },
    /// Close every connection of a user (by key), on every node.
    Disconnect { user: String },
}

impl BrokerEvent {
    /// The event as it goes to each of its topics: a presence change once
    /// per room (naming only that room), anything else once.
    pub fn split(&self) -> Vec<(Topic, Cow<'_, BrokerEvent>)> {
        let room = |r: &RoomName| Topic::Room(r.clone());
        let topic = match self {
            BrokerEvent::Message { message, .. } => {
                Topic::Room(RoomName::from_trusted(message.room.clone()))
            }
            BrokerEvent::Head { room: r, .. } | BrokerEvent::Room { room: r, .. } => room(r),
            BrokerEvent::User { user, .. } | BrokerEvent::Disconnect { user } => {
                Topic::User(user.clone())
            }
            BrokerEvent::Membership { user, .. } => Topic::User(user.key().to_owned()),
            BrokerEvent::Everyone { .. } => Topic::Everyone,
            BrokerEvent::Presence {
                user,
                online,
                rooms,
            } => {
                return rooms
                    .iter()
                    .map(|r| {
                        let one = BrokerEvent::Presence {
                            user: user.clone(),
                            online: *online,
                            rooms: vec![r.clone()],
                        };
                        (room(r), Cow::Owned(one))
                    })
                    .collect()
            }
        };
        vec![(topic, Cow::Borrowed(self))]
    }
}

/// Counts of what a broker carried between nodes, since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BrokerStats {
    pub published: u64,
    pub received: u64,
    /// Events not published (the bus was down, the queue full).
    pub dropped: u64,
    /// Events from other nodes that could not be read.
    pub malformed: u64,
    /// Times the subscription was set up again after being lost.
    pub reconnects: u64,
}

/// A user whose only node died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    pub user: UserName,
    pub guest: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// Where a broker delivers: its node's hub. Calls must not block: they
/// happen on the broker's tasks and publishers' tasks.
pub trait BrokerSink: Send + Sync + 'static {
    fn deliver(&self, event: &BrokerEvent);
    /// Events of these rooms (`None`: of every topic) may have been lost
    /// before now: a reconnect, or a subscription that just took effect.
    fn missed(&self, rooms: Option<Vec<RoomName>>);
    /// These users were connected only to `node`, which died. The sink
    /// cleans up after them (presence, guest memberships), then calls
    /// [`Broker::forget_node`].
    fn orphaned(&self, node: String, users: Vec<Orphan>);
    /// This node is back after the others buried it (it was cut off from
    /// the cluster for longer than its liveness allows): its guests lost
    /// their memberships and every user here was shown offline.
    fn rejoined(&self) {}
}

/// Carries events between the nodes of a cluster and keeps its shared
/// state. Every method but `publish` and the subscriptions may fail when
/// the broker is unavailable; callers fall back to what this node knows.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// This node's name.
    fn node(&self) -> &str;
    /// Register this node's hub; the broker holds it weakly.
    fn attach(&self, sink: Weak<dyn BrokerSink>);
    /// Deliver `event` to this node's hub at once, and to the other nodes
    /// subscribed to its topics. Events from one publisher arrive in the
    /// order they were published. Never waits for the network: a broker
    /// that cannot publish remembers the rooms' heads and announces them
    /// when it can.
    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError>;
    /// Receive a topic's events from other nodes, from now on; when it
    /// takes effect later, the broker reports the room [`BrokerSink::missed`].
    /// Called under the hub's lock: must not block.
    fn subscribe(&self, topic: Topic);
    fn unsubscribe(&self, topic: Topic);

    /// Record that `user` has (`here`) or no longer has a connection on
    /// this node. `Ok(false)`: a guest name this node may not hold (another
    /// node's guest has it).
    async fn present(&self, user: &UserName, guest: bool, here: bool) -> Result<bool, BrokerError>;
    /// Take a guest name for this node: `false` when a connected user or
    /// guest holds it anywhere in the cluster.
    async fn claim_guest(&self, user: &UserName) -> Result<bool, BrokerError>;
    /// The connected guest with this key, on any node.
    async fn guest(&self, key: &str) -> Result<Option<UserName>, BrokerError>;
    /// Whether each user (by key) has a connection on another node than
    /// this one (this node's hub knows its own).
    async fn elsewhere(&self, keys: &[&str]) -> Result<Vec<bool>, BrokerError>;
    /// Take one token from the cluster-wide bucket `key`, or say how long
    /// until one is free.
    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, BrokerError>;
    /// Whether no other node is alive (a node that starts alone may clear
    /// what a crashed cluster left behind).
    async fn alone(&self) -> Result<bool, BrokerError>;
    /// The clean-up after a dead node is done: free its guest names and
    /// forget it.
    async fn forget_node(&self, node: &str) -> Result<(), BrokerError>;
    /// Whether the broker is connected (for readiness and metrics).
    fn connected(&self) -> bool {
        true
    }
    /// What it carried, for metrics.
    fn stats(&self) -> BrokerStats {
        BrokerStats::default()
    }
    /// Leave the cluster: this node is stopping.
    async fn leave(&self) {}
}

#[cfg(any(test, feature = "testing"))]
#[path = "broker_contract.rs"]
pub mod contract;

/// The versioned format of events between nodes: a JSON envelope
/// `{"v":1,"node":NAME,"event":{"kind":…}}`. Nothing process-local
/// crosses: no connection ids, no `Instant`s.
pub mod wire {
    use super::*;

    /// The version this build writes and reads.
    pub const VERSION: u32 = 1;

    #[derive(Serialize, Deserialize)]
    struct Envelope<'a> {
        v: u32,
        node: Cow<'a, str>,
        event: Cow<'a, BrokerEvent>,
    }

    #[derive(Debug, thiserror::Error)]
    pub enum WireError {
        #[error("wire format version {0}, this node reads {VERSION}")]
        Version(u32),
        #[error("malformed event: {0}")]
        Malformed(String),
    }

    pub fn encode(node: &str, event: &BrokerEvent) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            v: VERSION,
            node: Cow::Borrowed(node),
            event: Cow::Borrowed(event),
        })
        .expect("events serialise")
    }

    /// The publishing node and the event.
    pub fn decode(bytes: &[u8]) -> Result<(String, BrokerEvent), WireError> {
        #[derive(Deserialize)]
        struct Version {
            v: u32,
        }
        match serde_json::from_slice::<Envelope<'static>>(bytes) {
            Ok(envelope) if envelope.v == VERSION => {
                Ok((envelope.node.into_owned(), envelope.event.into_owned()))
            }
            Ok(envelope) => Err(WireError::Version(envelope.v)),
            // Another version's events may not read as ours at all.
            Err(e) => match serde_json::from_slice::<Version>(bytes) {
                Ok(Version { v }) if v != VERSION => Err(WireError::Version(v)),
                _ => Err(WireError::Malformed(e.to_string())),
            },
        }
    }

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum WireSkip {
        Nobody,
        User(String),
    }

    impl Serialize for Skip {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            match self {
                Skip::User(key) => WireSkip::User(key.clone()),
                Skip::Nobody | Skip::Conn(_) => WireSkip::Nobody,
            }
            .serialize(s)
        }
    }

    impl<'de> Deserialize<'de> for Skip {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
            Ok(match WireSkip::deserialize(d)? {
                WireSkip::Nobody => Skip::Nobody,
                WireSkip::User(key) => Skip::User(key),
            })
        }
    }
}

/// A single server's broker: publishing is delivering to its own hub; the
/// cluster's state is what the hub knows (it is the whole cluster).
pub struct LocalBroker {
    node: String,
    sink: OnceLock<Weak<dyn BrokerSink>>,
}

impl LocalBroker {
    pub fn new(node: &str) -> Self {
        LocalBroker {
            node: node.to_owned(),
            sink: OnceLock::new(),
        }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    fn node(&self) -> &str {
        &self.node
    }

    fn attach(&self, sink: Weak<dyn BrokerSink>) {
        let _ = self.sink.set(sink);
    }

    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError> {
        if let Some(hub) = self.sink.get().and_then(Weak::upgrade) {
            hub.deliver(&event);
        }
        Ok(())
    }

    fn subscribe(&self, _: Topic) {}

    fn unsubscribe(&self, _: Topic) {}

    async fn present(&self, _: &UserName, _: bool, _: bool) -> Result<bool, BrokerError> {
        Ok(true)
    }

    async fn claim_guest(&self, _: &UserName) -> Result<bool, BrokerError> {
        Ok(true) // the hub refuses a name held here
    }

    async fn guest(&self, _: &str) -> Result<Option<UserName>, BrokerError> {
        Ok(None) // nowhere else
    }

    async fn elsewhere(&self, keys: &[&str]) -> Result<Vec<bool>, BrokerError> {
        Ok(vec![false; keys.len()])
    }

    async fn throttle(&self, _: &str, _: Rate) -> Result<Result<(), Duration>, BrokerError> {
        Ok(Ok(())) // the node's own buckets are the cluster's
    }

    async fn alone(&self) -> Result<bool, BrokerError> {
        Ok(true)
    }

    async fn forget_node(&self, _: &str) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// Nodes in one process: tests put several engines on one bus to run a
/// cluster without a network, every event crossing in wire form. A
/// [`MemoryBroker::new`] is a bus of one.
#[derive(Default)]
pub struct MemoryBus {
    state: Mutex<BusState>,
}

#[derive(Default)]
struct BusState {
    nodes: HashMap<String, BusNode>,
    /// User key → the nodes it is connected to.
    present: HashMap<String, HashSet<String>>,
    /// Guest key → (its node, its name).
    guests: HashMap<String, (String, UserName)>,
    /// Throttle key → theoretical arrival time of the next token (GCRA).
    throttles: HashMap<String, Instant>,
}

#[derive(Default)]
struct BusNode {
    sink: Option<Weak<dyn BrokerSink>>,
    topics: HashSet<Topic>,
}

impl MemoryBus {
    pub fn new() -> Arc<MemoryBus> {
        Arc::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BusState> {
        self.state.lock().expect("bus poisoned")
    }

    /// Deliver `event` from `from` to every other node subscribed to its
    /// topics, in wire form.
    fn send(&self, from: &str, event: &BrokerEvent) {
        let mut deliveries = Vec::new();
        {
            let st = self.lock();
            for (topic, one) in event.split() {
                let bytes = wire::encode(from, &one);
                for (name, node) in &st.nodes {
                    if name != from && node.topics.contains(&topic) {
                        if let Some(sink) = node.sink.as_ref().and_then(Weak::upgrade) {
                            deliveries.push((sink, bytes.clone()));
                        }
                    }
                }
            }
        }
        for (sink, bytes) in deliveries {
            let (_, event) = wire::decode(&bytes).expect("our own encoding decodes");
            sink.deliver(&event);
        }
    }
}

/// The in-process broker.
pub struct MemoryBroker {
    bus: Arc<MemoryBus>,
    node: String,
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A single node.
    pub fn new() -> Self {
        Self::on(MemoryBus::new(), "local")
    }

    /// Node `node` of the cluster on `bus`.
    pub fn on(bus: Arc<MemoryBus>, node: &str) -> Self {
        bus.lock().nodes.insert(node.to_owned(), BusNode::default());
        MemoryBroker {
            bus,
            node: node.to_owned(),
        }
    }

    fn with_node<T>(&self, f: impl FnOnce(&mut BusNode) -> T) -> Option<T> {
        self.bus.lock().nodes.get_mut(&self.node).map(f)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn node(&self) -> &str {
        &self.node
    }

    fn attach(&self, sink: Weak<dyn BrokerSink>) {
        self.with_node(|n| n.sink = Some(sink));
    }

    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError> {
        let sink = self
            .with_node(|n| n.sink.as_ref().and_then(Weak::upgrade))
            .flatten();
        if let Some(sink) = sink {
            sink.deliver(&event);
        }
        self.bus.send(&self.node, &event);
        Ok(())
    }

    fn subscribe(&self, topic: Topic) {
        self.with_node(|n| n.topics.insert(topic));
    }

    fn unsubscribe(&self, topic: Topic) {
        self.with_node(|n| n.topics.remove(&topic));
    }

    async fn present(&self, user: &UserName, guest: bool, here: bool) -> Result<bool, BrokerError> {
        let mut st = self.bus.lock();
        let key = user.key();
        if guest {
            let holder = st.guests.get(key).map(|(node, _)| node.clone());
            match (holder, here) {
                (Some(node), true) if node != self.node => return Ok(false),
                (None, true) => {
                    st.guests
                        .insert(key.to_owned(), (self.node.clone(), user.clone()));
                }
                (Some(node), false) if node == self.node => {
                    st.guests.remove(key);
                }
                _ => {}
            }
        }
        let nodes = st.present.entry(key.to_owned()).or_default();
        if here {
            nodes.insert(self.node.clone());
        } else {
            nodes.remove(&self.node);
            if nodes.is_empty() {
                st.present.remove(key);
            }
        }
        Ok(true)
    }

    async fn claim_guest(&self, user: &UserName) -> Result<bool, BrokerError> {
        let mut st = self.bus.lock();
        let key = user.key();
        if let Some((node, _)) = st.guests.get(key) {
            return Ok(*node == self.node);
        }
        if st.present.get(key).is_some_and(|n| !n.is_empty()) {
            return Ok(false);
        }
        st.guests
            .insert(key.to_owned(), (self.node.clone(), user.clone()));
        Ok(true)
    }

    async fn guest(&self, key: &str) -> Result<Option<UserName>, BrokerError> {
        Ok(self
            .bus
            .lock()
            .guests
            .get(key)
            .map(|(_, name)| name.clone()))
    }

    async fn elsewhere(&self, keys: &[&str]) -> Result<Vec<bool>, BrokerError> {
        let st = self.bus.lock();
        Ok(keys
            .iter()
            .map(|k| {
                st.present
                    .get(*k)
                    .is_some_and(|nodes| nodes.iter().any(|n| *n != self.node))
            })
            .collect())
    }

    async fn throttle(&self, key: &str, rate: Rate) -> Result<Result<(), Duration>, BrokerError> {
        let Some((period, burst)) = rate.gcra() else {
            return Ok(Ok(()));
        };
        let now = Instant::now();
        let mut st = self.bus.lock();
        // GCRA: a request may go while the theoretical arrival time is at
        // most `burst - 1` periods ahead.
        let tat = st.throttles.get(key).copied().unwrap_or(now).max(now);
        let ahead = tat - now;
        let tolerance = period * (burst - 1);
        if ahead > tolerance {
            return Ok(Err(ahead - tolerance));
        }
        st.throttles.insert(key.to_owned(), tat + period);
        Ok(Ok(()))
    }

    async fn alone(&self) -> Result<bool, BrokerError> {
        Ok(self.bus.lock().nodes.len() == 1)
    }

    async fn forget_node(&self, node: &str) -> Result<(), BrokerError> {
        self.bus.lock().guests.retain(|_, (n, _)| n != node);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::broker_contract_tests!(later: false, async {
        let bus = MemoryBus::new();
        let nodes: Vec<Arc<dyn Broker>> = ["a", "b", "c"]
            .iter()
            .map(|n| Arc::new(MemoryBroker::on(bus.clone(), n)) as Arc<dyn Broker>)
            .collect();
        Some(contract::Cluster::new(nodes, ()))
    });
}

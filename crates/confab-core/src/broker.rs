//! Carries what one session causes to every node's [`Hub`](crate::hub::Hub).
//! Today there is one node and [`MemoryBroker`] hands events straight to
//! the local hub; a Redis broker will carry the same [`BrokerEvent`]s
//! between nodes, and each node's hub fans them out to its own sessions.

use std::sync::{Arc, RwLock};
use std::time::Instant;

use async_trait::async_trait;
use confab_proto::{Event, Message, Seq};

use crate::conn::ConnId;
use crate::names::{RoomName, UserName};

/// Which connections an event skips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    Nobody,
    /// The connection that caused it (it got a reply instead).
    Conn(ConnId),
    /// Every connection of this user (by key).
    User(String),
}

#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A committed message, delivered to the room's members in seq order.
    /// `accepted` is when this node accepted it (not carried between nodes).
    Message {
        message: Message,
        accepted: Option<Instant>,
    },
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
    /// A user's first connection opened or last one closed; observers are
    /// the connected members of `rooms`.
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

#[derive(Debug, thiserror::Error)]
#[error("broker unavailable: {0}")]
pub struct BrokerError(pub String);

/// Where a broker delivers: each node's hub.
pub trait BrokerSink: Send + Sync + 'static {
    /// Must not block: deliveries happen on the publisher's task.
    fn deliver(&self, event: &BrokerEvent);
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Deliver `event` to every attached sink, on every node. Events from
    /// one publisher arrive in the order they were published.
    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError>;
    /// Register this node's sink.
    fn attach(&self, sink: Arc<dyn BrokerSink>);
}

/// The single-node broker: publishing is delivering, synchronously.
#[derive(Default)]
pub struct MemoryBroker {
    sinks: RwLock<Vec<Arc<dyn BrokerSink>>>,
}

impl MemoryBroker {
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, event: BrokerEvent) -> Result<(), BrokerError> {
        for sink in self.sinks.read().expect("broker poisoned").iter() {
            sink.deliver(&event);
        }
        Ok(())
    }

    fn attach(&self, sink: Arc<dyn BrokerSink>) {
        self.sinks.write().expect("broker poisoned").push(sink);
    }
}

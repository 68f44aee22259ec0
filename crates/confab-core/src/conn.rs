//! One connection as the core sees it: a bounded outbound queue and a way to
//! close it. The transport owns the other end ([`ConnReceiver`]) and writes
//! what comes out of it to the socket.
//!
//! Publishers never wait on a connection: [`Conn::push`] is `try_send`, and a
//! full queue closes the connection as a slow consumer instead of dropping
//! the event or slowing the publisher down.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use confab_proto::{Reply, SharedEvent};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Identifies a connection within this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Something to write to one connection.
#[derive(Debug)]
pub enum Outbound {
    /// The reply to one of this connection's requests.
    Reply(Reply),
    /// An event, possibly shared with many connections.
    Event(Arc<SharedEvent>),
    /// Bytes the transport queued for its own connection (a greeting, a
    /// `PONG`), written as they are, in order with the rest.
    Raw(bytes::Bytes),
}

/// Why the server closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue overflowed: the client does not read fast enough.
    SlowConsumer,
    /// The client kept going past its rate limits. What is queued (the
    /// refusal) is still written before the close.
    Abuse,
    /// An operator disconnected the user.
    Kicked,
    /// The cluster lost what this session stood on (this node was cut off
    /// from it long enough to be presumed dead, or a guest of the same
    /// name won on another node): the client connects again.
    Stale,
}

#[derive(Debug, Default)]
struct Control {
    closed: CancellationToken,
    reason: OnceLock<CloseReason>,
    /// The client's address, when the transport has one (for operators).
    addr: Option<IpAddr>,
}

/// The core's handle on a connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Conn {
    id: ConnId,
    tx: mpsc::Sender<Outbound>,
    control: Arc<Control>,
}

/// The transport's end of a connection.
#[derive(Debug)]
pub struct ConnReceiver {
    pub id: ConnId,
    rx: mpsc::Receiver<Outbound>,
    control: Arc<Control>,
}

/// Allocates connection ids.
#[derive(Debug, Default)]
pub struct ConnIds(AtomicU64);

impl ConnIds {
    pub fn next(&self) -> ConnId {
        ConnId(self.0.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

/// A connection from `addr` with an outbound queue of `capacity` items.
pub fn channel(id: ConnId, capacity: usize, addr: Option<IpAddr>) -> (Conn, ConnReceiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let control = Arc::new(Control {
        addr,
        ..Control::default()
    });
    (
        Conn {
            id,
            tx,
            control: control.clone(),
        },
        ConnReceiver { id, rx, control },
    )
}

impl Conn {
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queue an item without waiting. A full queue closes the connection as
    /// a slow consumer; returns whether the item was queued.
    pub fn push(&self, item: Outbound) -> bool {
        match self.tx.try_send(item) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queue a reply, waiting for room: a client that pipelines requests
    /// without reading replies only slows itself down. Cancel-safe; gives
    /// up when the connection closes.
    pub async fn send(&self, item: Outbound) {
        tokio::select! {
            _ = self.tx.send(item) => {}
            _ = self.control.closed.cancelled() => {}
        }
    }

    /// Ask the transport to close the connection. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        self.control.close(reason);
    }

    pub fn is_closed(&self) -> bool {
        self.control.closed.is_cancelled()
    }

    /// The client's address, when the transport gave one.
    pub fn addr(&self) -> Option<IpAddr> {
        self.control.addr
    }
}

/// See [`ConnReceiver::closer`].
#[derive(Clone)]
pub struct Closer {
    control: Arc<Control>,
}

impl Closer {
    /// Resolves when the connection is to close.
    pub async fn closed(&self) {
        self.control.closed.cancelled().await
    }

    /// Close the connection (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        self.control.close(reason);
    }
}

impl Control {
    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closed.cancel();
    }
}

impl ConnReceiver {
    /// The next item to write; `None` once every sender is gone.
    /// Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.rx.recv().await
    }

    /// The next item if one is queued now (to coalesce writes).
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok()
    }

    /// Cancelled when the core asks to close the connection; then
    /// [`ConnReceiver::reason`] says why.
    pub fn close_signal(&self) -> CancellationToken {
        self.control.closed.clone()
    }

    /// A handle for the transport's writer: it waits for the close signal,
    /// and gives it itself when a write to the socket stalls.
    pub fn closer(&self) -> Closer {
        Closer {
            control: self.control.clone(),
        }
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.control.reason.get().cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_proto::{Event, OkBody};

    fn event() -> Outbound {
        Outbound::Event(Arc::new(SharedEvent::new(Event::Presence {
            user: "a".into(),
            online: true,
        })))
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let (conn, mut rx) = channel(ConnId(1), 2, None);
        assert!(conn.push(event()));
        assert!(conn.push(event()));
        assert!(!conn.is_closed());
        assert!(!conn.push(event()), "third item does not fit");
        assert!(conn.is_closed());
        assert!(rx.close_signal().is_cancelled());
        assert_eq!(rx.reason(), Some(CloseReason::SlowConsumer));
        assert!(rx.recv().await.is_some(), "what was queued stays queued");
    }

    #[tokio::test]
    async fn send_gives_up_when_closed() {
        let (conn, _rx) = channel(ConnId(1), 1, None);
        conn.push(event());
        conn.close(CloseReason::SlowConsumer);
        let reply = Outbound::Reply(confab_proto::Reply {
            id: None,
            result: Ok(OkBody::Pong),
        });
        conn.send(reply).await; // would wait forever on a full queue
    }
}

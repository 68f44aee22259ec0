//! One connection as the core sees it: a bounded outbound queue and a way to
//! close it. The transport owns the other end ([`ConnReceiver`]) and writes
//! what comes out of it to the socket.
//!
//! Publishers never wait on a connection: [`Conn::push`] never blocks, and
//! a full queue closes the connection as a slow consumer instead of
//! dropping the event or slowing the publisher down.
//!
//! The queue is a [`Batch`] under a mutex that is never held across an
//! `.await`: it holds no memory while it is empty (most connections, most
//! of the time), allocates nothing while it holds one item (the oldest is
//! kept inline), and the transport takes everything queued at once
//! ([`ConnReceiver::recv_all`]), one lock per write instead of one per
//! item. The transport's waker is kept under that same lock, so a push is
//! one lock and, when the transport waits, one wake: no [`Notify`] of its
//! own to register with and leave on every wake-up (the `Notify`
//! bookkeeping of the queue and the driver was 6.5 % of the server's
//! samples in the fan-out profile).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use confab_proto::{Reply, SharedEvent};
use tokio::sync::Notify;

/// Identifies a connection within this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId(pub u64);

/// Something to write to one connection.
#[derive(Debug)]
pub enum Outbound {
    /// The reply to one of this connection's requests (boxed: replies are
    /// large and rare next to events).
    Reply(Box<Reply>),
    /// An event, possibly shared with many connections.
    Event(Arc<SharedEvent>),
    /// Bytes the transport queued for its own connection (a `PONG`),
    /// written as they are, in order with the rest. Boxed, as replies are:
    /// every connection's queue keeps an item inline, and an item is the
    /// size of its largest variant.
    Raw(Box<bytes::Bytes>),
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

/// Queued items, oldest first: what the transport takes at once.
///
/// The oldest item is kept inline, so a queue that holds one item at a
/// time allocates nothing. Under fan-out that is most of them: each event
/// wakes its connection, which takes it alone. Held in a `VecDeque` alone,
/// each delivery allocated a buffer on the publisher's thread that the
/// connection's task freed on another: the larger part of malloc's share
/// of the fan-out profile.
#[derive(Debug, Default)]
pub struct Batch {
    /// `None` only when `rest` is empty too.
    first: Option<Outbound>,
    rest: VecDeque<Outbound>,
}

impl Batch {
    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Outbound> {
        self.first.iter().chain(&self.rest)
    }

    fn push_back(&mut self, item: Outbound) {
        match self.first {
            None => self.first = Some(item),
            Some(_) => self.rest.push_back(item),
        }
    }

    fn pop_front(&mut self) -> Option<Outbound> {
        let item = self.first.take()?;
        self.first = self.rest.pop_front();
        Some(item)
    }

    /// Bytes of memory held beside the inline item.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.rest.capacity() * std::mem::size_of::<Outbound>()
    }
}

impl IntoIterator for Batch {
    type Item = Outbound;
    type IntoIter = std::iter::Chain<
        std::option::IntoIter<Outbound>,
        std::collections::vec_deque::IntoIter<Outbound>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.first.into_iter().chain(self.rest)
    }
}

/// The queue, and the transport's waker while it waits for an item.
#[derive(Debug, Default)]
struct Queue {
    items: Batch,
    waiting: Option<Waker>,
}

/// What the core's handles and the transport's end share.
#[derive(Debug)]
struct Shared {
    /// Woken (through `waiting`) when an item is queued or the last
    /// sender leaves.
    queue: Mutex<Queue>,
    capacity: usize,
    /// Wakes senders waiting for room.
    room: Notify,
    /// Live [`Conn`] handles.
    senders: AtomicUsize,
    /// The transport's end was dropped: nothing will be read any more.
    receiver_gone: AtomicBool,
    /// Set once the core (or the transport) closes the connection; then
    /// `reason` says why, and `closing` has woken every waiter.
    closed: AtomicBool,
    closing: Notify,
    reason: OnceLock<CloseReason>,
    /// The client's address, when the transport has one (for operators).
    addr: Option<IpAddr>,
}

/// The core's handle on a connection; cheap to clone.
#[derive(Debug)]
pub struct Conn {
    id: ConnId,
    shared: Arc<Shared>,
}

/// The transport's end of a connection.
#[derive(Debug)]
pub struct ConnReceiver {
    pub id: ConnId,
    shared: Arc<Shared>,
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
    let shared = Arc::new(Shared {
        queue: Mutex::default(),
        capacity: capacity.max(1),
        room: Notify::new(),
        senders: AtomicUsize::new(1),
        receiver_gone: AtomicBool::new(false),
        closed: AtomicBool::new(false),
        closing: Notify::new(),
        reason: OnceLock::new(),
        addr,
    });
    (
        Conn {
            id,
            shared: shared.clone(),
        },
        ConnReceiver { id, shared },
    )
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("connection queue poisoned")
    }

    /// Queue `item` if there is room, waking the transport; the item
    /// back when the queue is full.
    fn enqueue(&self, item: Outbound) -> Result<(), Outbound> {
        let mut queue = self.queue();
        if queue.items.len() >= self.capacity {
            return Err(item);
        }
        queue.items.push_back(item);
        let waiting = queue.waiting.take();
        drop(queue);
        if let Some(waker) = waiting {
            waker.wake();
        }
        Ok(())
    }

    /// Wake the transport if it waits (the last sender left).
    fn wake_receiver(&self) {
        let waiting = self.queue().waiting.take();
        if let Some(waker) = waiting {
            waker.wake();
        }
    }

    /// Take what is queued (one item, or all) with `take`, if anything is.
    /// With a context, wait for it: `Pending` with the waker kept, or
    /// `Ready(None)` once every sender is gone and nothing is queued.
    fn poll_take<T>(
        &self,
        cx: Option<&mut Context<'_>>,
        take: impl FnOnce(&mut Batch) -> T,
    ) -> Poll<Option<T>> {
        let mut queue = self.queue();
        if queue.items.is_empty() {
            let Some(cx) = cx else {
                return Poll::Ready(None);
            };
            // Checked under the lock that the last sender's wake takes.
            if self.senders.load(Ordering::Acquire) == 0 {
                return Poll::Ready(None);
            }
            match &mut queue.waiting {
                Some(w) if w.will_wake(cx.waker()) => {}
                waiting => *waiting = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let before = queue.items.len();
        let taken = take(&mut queue.items);
        let left = queue.items.len();
        if left == 0 {
            // Give the memory back: an idle connection holds none.
            queue.items.rest = VecDeque::new();
        }
        drop(queue);
        // Senders wait for room only when the queue was full.
        if before >= self.capacity && left < self.capacity {
            self.room.notify_waiters();
        }
        Poll::Ready(Some(taken))
    }

    /// What `take` takes if anything is queued, without waiting.
    fn take_now<T>(&self, take: impl FnOnce(&mut Batch) -> T) -> Option<T> {
        match self.poll_take(None, take) {
            Poll::Ready(taken) => taken,
            Poll::Pending => None,
        }
    }

    fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.closing.notify_waiters();
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the connection is closed. Cancel-safe.
    async fn closed(&self) {
        let closing = self.closing.notified();
        let mut closing = std::pin::pin!(closing);
        // Registered before the check: a close in between still wakes it.
        closing.as_mut().enable();
        if !self.is_closed() {
            closing.await;
        }
    }
}

impl Clone for Conn {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Conn {
            id: self.id,
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.wake_receiver();
        }
    }
}

impl Conn {
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// Queue an item without waiting. A full queue closes the connection as
    /// a slow consumer; returns whether the item was queued.
    pub fn push(&self, item: Outbound) -> bool {
        if self.shared.receiver_gone.load(Ordering::Acquire) {
            return false;
        }
        match self.shared.enqueue(item) {
            Ok(()) => true,
            Err(_) => {
                self.close(CloseReason::SlowConsumer);
                false
            }
        }
    }

    /// Queue a reply, waiting for room: a client that pipelines requests
    /// without reading replies only slows itself down. Cancel-safe; gives
    /// up when the connection closes.
    pub async fn send(&self, item: Outbound) {
        let gone = || self.shared.receiver_gone.load(Ordering::Acquire) || self.is_closed();
        if gone() {
            return;
        }
        // Mostly there is room: no waiting to register for.
        let mut item = match self.shared.enqueue(item) {
            Ok(()) => return,
            Err(back) => back,
        };
        loop {
            // Registered before the check, so a pop in between wakes it.
            let room = self.shared.room.notified();
            let mut room = std::pin::pin!(room);
            room.as_mut().enable();
            if gone() {
                return;
            }
            match self.shared.enqueue(item) {
                Ok(()) => return,
                Err(back) => item = back,
            }
            tokio::select! {
                _ = room => {}
                _ = self.shared.closed() => return,
            }
        }
    }

    /// Ask the transport to close the connection. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        self.shared.close(reason);
    }

    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// The client's address, when the transport gave one.
    pub fn addr(&self) -> Option<IpAddr> {
        self.shared.addr
    }
}

/// See [`ConnReceiver::closer`].
#[derive(Clone)]
pub struct Closer {
    shared: Arc<Shared>,
}

impl Closer {
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    /// Resolves when the connection is to close.
    pub async fn closed(&self) {
        self.shared.closed().await
    }

    /// Close the connection (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        self.shared.close(reason);
    }
}

impl ConnReceiver {
    /// The next item to write; `None` once every sender is gone and the
    /// queue is empty. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| {
            self.shared
                .poll_take(Some(cx), |items| items.pop_front().expect("not empty"))
        })
        .await
    }

    /// Everything queued, oldest first, once something is (with the memory
    /// that held it); `None` once every sender is gone and the queue is
    /// empty. Cancel-safe.
    pub async fn recv_all(&mut self) -> Option<Batch> {
        std::future::poll_fn(|cx| self.poll_recv_all(cx)).await
    }

    /// [`ConnReceiver::recv_all`], polled.
    pub fn poll_recv_all(&mut self, cx: &mut Context<'_>) -> Poll<Option<Batch>> {
        self.shared.poll_take(Some(cx), std::mem::take)
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.shared.take_now(Batch::pop_front).flatten()
    }

    /// Everything queued now, oldest first, with one lock; the queue's
    /// memory goes with it.
    pub fn take_all(&mut self) -> Batch {
        self.shared.take_now(std::mem::take).unwrap_or_default()
    }

    /// A handle for the transport's writer: it waits for the close signal,
    /// and gives it itself when a write to the socket stalls.
    pub fn closer(&self) -> Closer {
        Closer {
            shared: self.shared.clone(),
        }
    }

    pub fn reason(&self) -> Option<CloseReason> {
        self.shared.reason.get().cloned()
    }
}

impl Drop for ConnReceiver {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
        // What was queued will never be written.
        drop(std::mem::take(&mut self.shared.queue().items));
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

    #[test]
    fn an_item_is_two_words() {
        // Every connection's queue holds one inline: large variants are
        // boxed.
        assert_eq!(std::mem::size_of::<Outbound>(), 16);
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer() {
        let (conn, mut rx) = channel(ConnId(1), 2, None);
        assert!(conn.push(event()));
        assert!(conn.push(event()));
        assert!(!conn.is_closed());
        assert!(!conn.push(event()), "third item does not fit");
        assert!(conn.is_closed());
        assert!(rx.shared.is_closed());
        assert_eq!(rx.reason(), Some(CloseReason::SlowConsumer));
        assert!(rx.recv().await.is_some(), "what was queued stays queued");
    }

    #[tokio::test]
    async fn send_gives_up_when_closed() {
        let (conn, _rx) = channel(ConnId(1), 1, None);
        conn.push(event());
        conn.close(CloseReason::SlowConsumer);
        conn.send(pong()).await; // would wait forever on a full queue
    }

    fn pong() -> Outbound {
        Outbound::Reply(Box::new(confab_proto::Reply {
            id: None,
            result: Ok(OkBody::Pong),
        }))
    }

    fn held(rx: &ConnReceiver) -> usize {
        rx.shared.queue().items.held()
    }

    #[tokio::test]
    async fn an_empty_queue_holds_no_memory() {
        let (conn, mut rx) = channel(ConnId(1), 8, None);
        assert_eq!(held(&rx), 0);
        conn.push(event());
        assert_eq!(held(&rx), 0, "one item is kept inline");
        conn.push(event());
        assert!(held(&rx) > 0);
        assert!(rx.try_recv().is_some());
        assert!(held(&rx) > 0, "one is still queued");
        assert!(rx.recv().await.is_some());
        assert_eq!(held(&rx), 0, "given back once empty");
        conn.push(event());
        assert_eq!(rx.take_all().len(), 1);
        assert_eq!(held(&rx), 0);
    }

    #[tokio::test]
    async fn send_waits_for_room_and_keeps_the_order() {
        let (conn, mut rx) = channel(ConnId(1), 2, None);
        conn.push(event());
        conn.push(event());
        let sender = conn.clone();
        let waiting = tokio::spawn(async move { sender.send(pong()).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no room yet");
        let first = rx.take_all();
        assert_eq!(first.len(), 2);
        waiting.await.unwrap();
        assert!(matches!(rx.recv().await, Some(Outbound::Reply(_))));
        assert!(!conn.is_closed(), "waiting for room is not overflowing");
    }

    #[tokio::test]
    async fn closing_wakes_whoever_waits_for_it() {
        let (conn, rx) = channel(ConnId(1), 1, None);
        conn.push(event());
        let closer = rx.closer();
        let watching = tokio::spawn(async move { closer.closed().await });
        let sender = conn.clone();
        let sending = tokio::spawn(async move { sender.send(pong()).await });
        tokio::task::yield_now().await;
        assert!(!watching.is_finished() && !sending.is_finished());
        conn.close(CloseReason::Kicked);
        conn.close(CloseReason::SlowConsumer);
        watching.await.unwrap();
        sending.await.unwrap();
        assert_eq!(
            rx.reason(),
            Some(CloseReason::Kicked),
            "the first reason wins"
        );
    }

    #[tokio::test]
    async fn the_transport_waits_for_everything_queued_at_once() {
        let (conn, mut rx) = channel(ConnId(1), 8, None);
        let receiving = tokio::spawn(async move {
            let first = rx.recv_all().await.expect("a batch");
            (first.len(), rx)
        });
        tokio::task::yield_now().await;
        assert!(!receiving.is_finished(), "nothing queued yet");
        conn.push(event());
        let (n, mut rx) = receiving.await.unwrap();
        assert_eq!(n, 1, "woken by the push");
        conn.push(event());
        conn.push(event());
        assert_eq!(
            rx.recv_all().await.map(|b| b.len()),
            Some(2),
            "both at once"
        );
        assert_eq!(held(&rx), 0, "the queue's memory went with them");
        drop(conn);
        assert!(rx.recv_all().await.is_none(), "every sender is gone");
    }

    #[tokio::test]
    async fn the_ends_notice_each_other_going() {
        let (conn, mut rx) = channel(ConnId(1), 4, None);
        let other = conn.clone();
        conn.push(event());
        drop(conn);
        drop(other);
        assert!(rx.recv().await.is_some(), "what was queued is still read");
        assert!(rx.recv().await.is_none(), "every sender is gone");

        let (conn, rx) = channel(ConnId(2), 1, None);
        conn.push(event());
        let sender = conn.clone();
        let waiting = tokio::spawn(async move { sender.send(pong()).await });
        drop(rx);
        waiting.await.unwrap(); // a full queue nobody reads: it gives up
        assert!(!conn.push(event()), "nothing is queued for nobody");
    }
}

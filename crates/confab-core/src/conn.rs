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
//!
//! **Write-through.** A transport whose socket can be written from any
//! thread (plain TCP) gives the queue a [`WriteThrough`]. An event queued
//! for such a connection while nothing else is queued or being written,
//! inside a [`publisher_turn`], does not wake the connection's task: the
//! connection is *claimed* for the turn, and when the turn ends the
//! publisher's thread writes what the queue holds straight to the socket,
//! as Redis writes to its clients after each turn of its loop. What the
//! socket does not take, or what is not an event, goes back to the task.
//! Order holds because only one side writes at a time: the task marks
//! itself writing (under the queue's lock) from the moment it takes items
//! or writes bytes of its own until they are all written, and a turn
//! writes only while the task is not writing, under the lock, so the
//! task's next take waits for it. A delivery then costs no wake-up and no
//! poll of the member's task, which were most of its latency on a busy
//! machine. A turn claims at most [`TURN_CLAIMS`] connections; the rest
//! are woken as before, so that a large room's fan-out is still shared by
//! every worker thread.

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
    /// How a publisher's thread may write to the socket itself.
    through: Option<Through>,
    /// A publisher's turn will write what is queued when it ends (or wake
    /// the transport): no wake-up meanwhile.
    claimed: bool,
    /// The transport is writing (what it took, or bytes of its own): no
    /// turn writes until it is done.
    writing: bool,
}

/// A transport's way to let a publisher's thread write to its socket
/// (see the module's words on write-through).
pub trait WriteThrough: Send + Sync {
    /// Append `item` as it goes on the wire.
    fn encode(&self, item: &Outbound, out: &mut Vec<u8>);
    /// Write what the socket takes of `bytes` now, without waiting: how
    /// much it took (0 when it is full).
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize>;
    /// These items went to the socket (for the transport's counts).
    fn written(&self, items: &Batch);
}

#[derive(Clone)]
struct Through(Arc<dyn WriteThrough>);

impl std::fmt::Debug for Through {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Through")
    }
}

thread_local! {
    /// The connections claimed by this thread's current turn, if it is in
    /// one.
    static TURN: std::cell::RefCell<Option<Vec<Arc<Shared>>>> =
        const { std::cell::RefCell::new(None) };
    /// This thread's buffer for what a turn writes, kept warm.
    static TURN_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most a thread's turn buffer keeps between turns.
const TURN_BUF_KEPT: usize = 64 * 1024;

/// The most connections one turn writes to; the others' tasks are woken,
/// so that a large room's fan-out is shared by every worker thread rather
/// than written by one.
const TURN_CLAIMS: usize = 128;

/// Run `f` as a publisher's turn: events it queues for idle connections
/// that take write-through are written by this thread when it returns
/// (or unwinds), one write per connection, instead of waking each
/// connection's task. Turns nest: an inner one writes at its own end.
pub fn publisher_turn<T>(f: impl FnOnce() -> T) -> T {
    struct Turn(Option<Vec<Arc<Shared>>>);
    impl Drop for Turn {
        fn drop(&mut self) {
            let outer = self.0.take();
            let claimed = TURN.with_borrow_mut(|turn| std::mem::replace(turn, outer));
            for shared in claimed.into_iter().flatten() {
                shared.write_through();
            }
        }
    }
    let outer = TURN.with_borrow_mut(|turn| turn.replace(Vec::new()));
    let _turn = Turn(outer);
    f()
}

/// Whether this thread is in a publisher's turn ([`publisher_turn`]):
/// where a broker delivers what other nodes published matters for
/// write-through, and its tests check it.
pub fn in_publisher_turn() -> bool {
    TURN.with_borrow(Option::is_some)
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

/// Wake the transport if it waits for the queue, after letting go of it.
fn wake(mut queue: std::sync::MutexGuard<'_, Queue>) {
    let waiting = queue.waiting.take();
    drop(queue);
    if let Some(waker) = waiting {
        waker.wake();
    }
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("connection queue poisoned")
    }

    /// Queue `item` if there is room, waking the transport (or claiming
    /// the connection for this thread's turn); the item back when the
    /// queue is full.
    fn enqueue(self: &Arc<Self>, item: Outbound) -> Result<(), Outbound> {
        let mut queue = self.queue();
        if queue.items.len() >= self.capacity {
            return Err(item);
        }
        let event = matches!(item, Outbound::Event(_));
        queue.items.push_back(item);
        if queue.claimed {
            // The turn that claimed it writes this too, or wakes the
            // transport for it.
            return Ok(());
        }
        if event && queue.items.len() == 1 && !queue.writing && queue.through.is_some() {
            let claimed = TURN.with_borrow_mut(|turn| match turn {
                Some(claimed) if claimed.len() < TURN_CLAIMS => {
                    claimed.push(self.clone());
                    true
                }
                _ => false,
            });
            if claimed {
                queue.claimed = true;
                return Ok(());
            }
        }
        wake(queue);
        Ok(())
    }

    /// A turn ends: write what is queued to the socket if the transport is
    /// not writing and it is all events, else wake the transport for it.
    /// What the socket does not take is queued for the transport, first.
    fn write_through(&self) {
        let mut queue = self.queue();
        queue.claimed = false;
        let through = match &queue.through {
            Some(through)
                if !queue.writing
                    && !self.is_closed()
                    && queue.items.iter().all(|i| matches!(i, Outbound::Event(_))) =>
            {
                through.0.clone()
            }
            _ => return wake(queue),
        };
        let before = queue.items.len();
        let items = std::mem::take(&mut queue.items);
        TURN_BUF.with_borrow_mut(|buf| {
            buf.clear();
            for item in items.iter() {
                through.encode(item, buf);
            }
            let mut written = 0;
            while written < buf.len() {
                match through.try_write(&buf[written..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => written += n,
                }
            }
            if written < buf.len() {
                // The transport writes the rest, and finds any error.
                let rest = bytes::Bytes::copy_from_slice(&buf[written..]);
                queue.items.push_back(Outbound::Raw(Box::new(rest)));
            }
            if buf.capacity() > TURN_BUF_KEPT {
                *buf = Vec::new();
            }
        });
        through.written(&items);
        self.taken(queue, before, true);
    }

    /// Items were taken from a queue that held `before`: give its memory
    /// back once it is empty (an idle connection holds none), let go of it
    /// (waking the transport for what is left, if `wake_rest`), and wake
    /// the senders waiting for room (they wait only when it was full).
    fn taken(&self, mut queue: std::sync::MutexGuard<'_, Queue>, before: usize, wake_rest: bool) {
        let left = queue.items.len();
        if left == 0 {
            queue.items.rest = VecDeque::new();
        }
        match left > 0 && wake_rest {
            true => wake(queue),
            false => drop(queue),
        }
        if before >= self.capacity && left < self.capacity {
            self.room.notify_waiters();
        }
    }

    /// Wake the transport if it waits (the last sender left).
    fn wake_receiver(&self) {
        wake(self.queue());
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
        // Until it has written what it takes, no turn writes.
        queue.writing = true;
        let taken = take(&mut queue.items);
        self.taken(queue, before, false);
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

    /// Let publishers' turns write to the socket through `through` (see
    /// the module's words), or no more. Dropping the receiver ends it too.
    pub fn write_through(&self, through: Option<Arc<dyn WriteThrough>>) {
        self.shared.queue().through = through.map(Through);
    }

    /// The transport writes bytes of its own: no turn writes until
    /// [`ConnReceiver::written`].
    pub fn writing(&self) {
        self.shared.queue().writing = true;
    }

    /// Everything the transport took or wrote of its own is on the socket:
    /// turns may write again.
    pub fn written(&self) {
        self.shared.queue().writing = false;
    }
}

impl Drop for ConnReceiver {
    fn drop(&mut self) {
        self.shared.receiver_gone.store(true, Ordering::Release);
        self.shared.room.notify_waiters();
        // What was queued will never be written, and no turn writes to the
        // socket any more.
        let mut queue = self.shared.queue();
        let items = std::mem::take(&mut queue.items);
        let through = queue.through.take();
        drop(queue);
        drop((items, through));
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

    /// A socket that takes at most `room` bytes in all, recording them.
    #[derive(Default)]
    struct Socket {
        taken: Mutex<Vec<u8>>,
        room: AtomicUsize,
        counted: AtomicUsize,
    }

    impl Socket {
        fn with_room(room: usize) -> Arc<Socket> {
            let socket = Arc::new(Socket::default());
            socket.room.store(room, Ordering::Relaxed);
            socket
        }

        fn taken(&self) -> Vec<u8> {
            self.taken.lock().unwrap().clone()
        }
    }

    impl WriteThrough for Socket {
        fn encode(&self, item: &Outbound, out: &mut Vec<u8>) {
            match item {
                Outbound::Event(shared) => match &shared.event {
                    Event::Presence { user, .. } => out.extend_from_slice(user.as_bytes()),
                    other => panic!("unexpected {other:?}"),
                },
                _ => panic!("only events are written through"),
            }
        }

        fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
            let n = bytes.len().min(self.room.load(Ordering::Relaxed));
            self.room.fetch_sub(n, Ordering::Relaxed);
            self.taken.lock().unwrap().extend_from_slice(&bytes[..n]);
            Ok(n)
        }

        fn written(&self, items: &Batch) {
            self.counted.fetch_add(items.len(), Ordering::Relaxed);
        }
    }

    fn said(who: &str) -> Outbound {
        Outbound::Event(Arc::new(SharedEvent::new(Event::Presence {
            user: who.into(),
            online: true,
        })))
    }

    /// A connection with write-through to `socket`, and a waker that
    /// counts its wake-ups registered as the transport's.
    fn through(socket: &Arc<Socket>) -> (Conn, ConnReceiver, Arc<Wakes>) {
        let (conn, mut rx) = channel(ConnId(1), 8, None);
        rx.write_through(Some(socket.clone() as Arc<dyn WriteThrough>));
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        assert!(rx
            .poll_recv_all(&mut Context::from_waker(&waker))
            .is_pending());
        (conn, rx, wakes)
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    impl Wakes {
        fn count(&self) -> usize {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn a_turn_writes_its_events_to_an_idle_connection_itself() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, wakes) = through(&socket);
        publisher_turn(|| {
            assert!(conn.push(said("a")));
            assert!(conn.push(said("b")));
            assert!(socket.taken().is_empty(), "written when the turn ends");
        });
        assert_eq!(socket.taken(), b"ab");
        assert_eq!(socket.counted.load(Ordering::Relaxed), 2);
        assert_eq!(wakes.count(), 0, "the transport's task is not woken");
        assert!(rx.try_recv().is_none());
        assert_eq!(held(&rx), 0);
    }

    #[test]
    fn a_turn_writes_to_so_many_connections_and_wakes_the_rest() {
        let socket = Socket::with_room(usize::MAX);
        let conns: Vec<_> = (0..=TURN_CLAIMS).map(|_| through(&socket)).collect();
        publisher_turn(|| {
            for (conn, _, _) in &conns {
                assert!(conn.push(said("a")));
            }
        });
        assert_eq!(socket.taken().len(), TURN_CLAIMS);
        let woken: usize = conns.iter().map(|(_, _, wakes)| wakes.count()).sum();
        assert_eq!(woken, 1, "the last one's task writes its own");
    }

    #[test]
    fn outside_a_turn_the_transport_is_woken() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, wakes) = through(&socket);
        assert!(conn.push(said("a")));
        assert_eq!(wakes.count(), 1);
        assert!(socket.taken().is_empty());
        assert!(rx.try_recv().is_some());
    }

    #[test]
    fn no_turn_writes_while_the_transport_is_writing() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, wakes) = through(&socket);
        assert!(conn.push(said("a")));
        let taken = rx.take_all(); // the transport writes "a" now
        assert_eq!(taken.len(), 1);
        publisher_turn(|| assert!(conn.push(said("b"))));
        assert!(socket.taken().is_empty(), "b would overtake a");
        assert_eq!(wakes.count(), 1, "woken for a, and not again for b");
        // The transport takes b after a; once everything is written, turns
        // write again.
        assert_eq!(rx.take_all().len(), 1);
        rx.written();
        publisher_turn(|| assert!(conn.push(said("c"))));
        assert_eq!(socket.taken(), b"c");
    }

    #[test]
    fn bytes_of_the_transport_s_own_hold_turns_off_until_written() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, _wakes) = through(&socket);
        rx.writing(); // a ping, say
        publisher_turn(|| assert!(conn.push(said("a"))));
        assert!(socket.taken().is_empty());
        assert!(rx.try_recv().is_some(), "queued for the transport");
    }

    #[test]
    fn what_the_socket_does_not_take_goes_to_the_transport_first() {
        let socket = Socket::with_room(3);
        let (conn, mut rx, wakes) = through(&socket);
        publisher_turn(|| {
            assert!(conn.push(said("ab")));
            assert!(conn.push(said("cd")));
        });
        assert_eq!(socket.taken(), b"abc");
        assert_eq!(wakes.count(), 1);
        match rx.try_recv() {
            Some(Outbound::Raw(rest)) => assert_eq!(&rest[..], b"d"),
            other => panic!("expected the rest, got {other:?}"),
        }
        // Later events queue behind it, for the transport.
        publisher_turn(|| assert!(conn.push(said("e"))));
        assert_eq!(socket.taken(), b"abc");
    }

    #[test]
    fn a_turn_leaves_anything_but_events_to_the_transport() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, wakes) = through(&socket);
        publisher_turn(|| {
            assert!(conn.push(said("a")));
            assert!(conn.push(pong()));
            assert_eq!(wakes.count(), 0, "claimed: the turn decides");
        });
        assert!(socket.taken().is_empty());
        assert_eq!(wakes.count(), 1);
        assert_eq!(rx.take_all().len(), 2, "in order, for the transport");
    }

    #[test]
    fn a_turn_writes_nothing_once_write_through_ends() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, mut rx, wakes) = through(&socket);
        publisher_turn(|| {
            assert!(conn.push(said("a")));
            rx.write_through(None);
        });
        assert!(socket.taken().is_empty());
        assert_eq!(wakes.count(), 1);
        assert!(rx.try_recv().is_some());
        drop(rx);
        assert_eq!(Arc::strong_count(&socket), 1, "the socket is let go");
    }

    #[test]
    fn dropping_the_receiver_lets_the_socket_go() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, rx, _wakes) = through(&socket);
        assert_eq!(Arc::strong_count(&socket), 2);
        drop(rx);
        assert_eq!(Arc::strong_count(&socket), 1);
        publisher_turn(|| assert!(!conn.push(said("a")), "nobody reads any more"));
        assert!(socket.taken().is_empty());
    }

    #[test]
    fn a_turn_that_unwinds_still_writes_what_it_claimed() {
        let socket = Socket::with_room(usize::MAX);
        let (conn, _rx, _wakes) = through(&socket);
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            publisher_turn(|| {
                conn.push(said("a"));
                panic!("a handler failed");
            })
        }));
        assert!(unwound.is_err());
        assert_eq!(socket.taken(), b"a");
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

//! One connection, one task: the driver owns the socket, reads, writes and
//! keeps time, for every transport. What differs between transports (the
//! framing, what a frame asks of the session, heartbeats, last words) is a
//! [`Protocol`]; WebSocket JSON and the line protocol are two of them.
//!
//! ```text
//! socket ─► Input ─► Protocol::decode ─► Protocol::serve ─► Session ─► queue
//!   ▲                                                                   │
//!   └──────────── one write per wake-up ◄── Protocol::header ◄─ encode ◄─┘
//! ```
//!
//! An idle connection holds no buffer: input is read onto the stack and
//! kept only while a frame is incomplete ([`Input`]); a lone item goes out
//! with one `writev` of its header and its encoded bytes (an event's are
//! shared by every member), several are gathered into the thread's buffer
//! and written with one write: the connection keeps only what the socket
//! did not take. The
//! session's work on a frame is boxed, so the connection's future is small
//! while it waits. While the session works (a request can wait on storage,
//! or for room in its own queue), the driver keeps writing what is queued:
//! a connection never waits on itself.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use confab_core::conn::{publisher_turn, Batch, Closer};
use confab_core::{CloseReason, ConnReceiver, Outbound, Session};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

use tracing::Instrument;

use crate::admission::Admitted;
use crate::metrics::Transport;
use crate::proxy::Client;
use crate::through::SharedTcp;
use crate::{encode, App, SLOW_CONSUMER_GRACE};

/// Largest single read from a socket. It is read onto the stack, and only
/// what an incomplete frame needs is kept.
pub(crate) const READ_CHUNK: usize = 4096;

/// Why a connection ends.
#[derive(Debug)]
pub(crate) enum End<C> {
    /// The client went away, or its socket failed: nothing more to write.
    Gone,
    /// The server drains: what was read is answered, then goodbye.
    Shutdown,
    /// The protocol's own ending (a close frame, a last line), after what
    /// is queued.
    Close(C),
    /// The core closed the connection.
    Evicted(CloseReason),
}

/// What makes a transport of the [driver](self).
pub(crate) trait Protocol: Send + 'static {
    /// A decoded unit of input.
    type Frame: Send;
    /// The protocol's own endings.
    type Close: Send + Sync;
    /// What goes on the wire before an encoded reply or event (a
    /// WebSocket frame's header; nothing before a line).
    type Header: AsRef<[u8]>;
    const TRANSPORT: Transport;

    /// Bytes written first (the WebSocket `hello`, the line greeting).
    fn greeting(&self, app: &App) -> Bytes;
    /// How many bytes to read at most now: the line protocol never holds
    /// more than its line limit.
    fn room(&self, _input: &BytesMut) -> usize {
        READ_CHUNK
    }
    /// The next whole frame in `input`, its bytes consumed; `None` until
    /// one is whole.
    fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Self::Frame>, End<Self::Close>>;
    /// Act on a frame: requests for the session, answers of the protocol's
    /// own (a pong) through [`Session::write_raw`].
    fn serve<'a>(
        &'a mut self,
        session: &'a mut Session,
        frame: Self::Frame,
    ) -> impl Future<Output = Option<End<Self::Close>>> + Send + 'a;
    /// The header of an encoded reply or event of `len` bytes.
    fn header(len: usize) -> Self::Header;
    /// The client sent something (it is alive).
    fn heard(&mut self);
    /// When [`Protocol::tick`] is due, if ever.
    fn next_tick(&self) -> Option<Instant>;
    /// The tick is due: bytes to write (a ping, a warning), or the end.
    fn tick(&mut self) -> Result<Option<Bytes>, End<Self::Close>>;
    /// The ending when the client does not log in in time.
    fn login_timeout(&self) -> Self::Close;
    /// The last bytes of an ending (after what is queued, unless evicted).
    fn farewell(&self, app: &App, end: &End<Self::Close>) -> Option<Bytes>;
    /// What the ending still needs on the socket after the farewell (the
    /// WebSocket closing handshake, a linger); nothing by default.
    fn linger<'a, S: AsyncRead + Unpin + Send>(
        &'a mut self,
        _io: &'a mut S,
        _input: &'a mut Input,
        _end: &'a End<Self::Close>,
    ) -> impl Future<Output = ()> + Send + 'a {
        std::future::ready(())
    }
}

/// What a connection has read and not decoded yet. Holds no memory unless
/// a frame is incomplete.
#[derive(Default)]
pub(crate) struct Input {
    pub(crate) bytes: BytesMut,
}

impl Input {
    /// Read at most `room` bytes (and at most [`READ_CHUNK`]); 0 at the end
    /// of the stream.
    pub(crate) async fn read_from<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        room: usize,
    ) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_from(io, room, cx)).await
    }

    fn poll_read_from<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
        room: usize,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<usize>> {
        // On the stack of this poll only: a connection waiting for input
        // holds no buffer. Not zeroed: the read arm is polled on every
        // wake-up of the connection, most of which read nothing, and
        // clearing 4 KiB each time was 1 % of the fan-out's samples.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk[..room.clamp(1, READ_CHUNK)]);
        ready!(Pin::new(io).poll_read(cx, &mut read))?;
        self.bytes.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    }

    /// Give the buffer back once everything in it is decoded. (An empty
    /// `BytesMut` split from a larger one has no capacity of its own but
    /// still holds the allocation: replace it whatever its capacity.)
    pub(crate) fn release_if_done(&mut self) {
        if self.bytes.is_empty() {
            self.bytes = BytesMut::new();
        }
    }

    /// Bytes of memory the input holds.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.bytes.capacity()
    }
}

/// The writing half of the driver: the socket, the connection's queue and
/// the bytes of an interrupted write.
struct Wire<S> {
    io: S,
    rx: ConnReceiver,
    closer: Closer,
    stall: std::time::Duration,
    /// Bytes being written; after an interrupted write, what is left.
    out: Vec<u8>,
    /// A write failed or the connection was evicted: write nothing more
    /// but last words.
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Wire<S> {
    /// Run a session future to its end while writing what is queued: the
    /// session may wait for room in this very queue.
    async fn drive<T, P: Protocol>(&mut self, app: &App, work: impl Future<Output = T>) -> T {
        // Each poll of the session's work is a publisher's turn: the events
        // it publishes to idle connections are written when the poll ends,
        // by this thread (`confab_core::conn::publisher_turn`).
        let mut work = pin!(work);
        let mut work = std::future::poll_fn(move |cx| publisher_turn(|| work.as_mut().poll(cx)));
        loop {
            if self.broken {
                return work.await;
            }
            tokio::select! {
                biased;
                done = &mut work => return done,
                items = self.rx.recv_all() => match items {
                    Some(items) => {
                        self.stage::<P>(app, items);
                        self.flush().await
                    }
                    None => self.broken = true,
                },
            }
        }
    }

    /// Start writing what was taken from the queue: [`Wire::flush`]
    /// writes the rest. Not async, so that no future holds the batch
    /// (each would be room in every idle connection's future).
    fn stage<P: Protocol>(&mut self, app: &App, items: Batch) {
        app.metrics.delivered(P::TRANSPORT, items.iter());
        // Once closed, what was taken is kept in the output: an eviction
        // for abuse still writes it (the refusal that says why).
        let now = self.out.is_empty() && !self.closer.is_closed();
        if now && items.len() == 1 && self.io.is_write_vectored() {
            if let Some(item) = items.into_iter().next() {
                self.write_one::<P>(item);
            }
        } else if now {
            self.write_gathered::<P>(items);
        } else {
            self.gather::<P>(items);
        }
    }

    /// Write several items with one write from this thread's gather
    /// buffer, which stays allocated (and warm) from one wake-up to the
    /// next, whichever connection it serves: what the socket does not
    /// take now is copied to the output, for [`Wire::flush`]. A buffer of
    /// the connection's own, allocated and freed on every such wake-up, was
    /// 2-3 % of the server's samples at 700,000 deliveries a second.
    fn write_gathered<P: Protocol>(&mut self, items: Batch) {
        GATHERED.with_borrow_mut(|buf| {
            buf.clear();
            gather_into::<P>(buf, items);
            match write_slice_now(&mut self.io, buf) {
                Ok(written) => self.out.extend_from_slice(&buf[written..]),
                Err(_) => self.broken = true,
            }
            if buf.capacity() > GATHERED_KEPT {
                *buf = Vec::new();
            }
        });
    }

    /// Write a lone item (under fan-out, most wake-ups take one event)
    /// straight from its encoded bytes, which every member shares: one
    /// `writev` of header and payload, no gather buffer. What the socket
    /// does not take now is copied to the output, for [`Wire::flush`].
    fn write_one<P: Protocol>(&mut self, item: Outbound) {
        let (header, payload) = on_the_wire::<P>(&item);
        let header = header.as_ref().map_or(&[][..], AsRef::as_ref);
        if write_parts_now(&mut self.io, header, &payload, &mut self.out).is_err() {
            self.broken = true;
        }
    }

    /// Write the output unless evicted first (a write that stalls evicts),
    /// and give its buffer back.
    ///
    /// Most writes go at once (the socket has room): those arm no timer
    /// and register with nothing. Only a write the socket cannot take
    /// whole races the stall deadline and the eviction, boxed (rare, and
    /// large next to an idle connection's future).
    async fn flush(&mut self) {
        if self.closer.is_closed() {
            self.broken = true;
            return;
        }
        let done = match self.write_now() {
            Some(done) => Some(done),
            None => {
                let write = write_out(&mut self.io, &mut self.out);
                Box::pin(crate::unless_evicted(&self.closer, self.stall, write)).await
            }
        };
        match done {
            Some(Ok(())) => {
                self.out = Vec::new();
                self.rx.written();
            }
            Some(Err(_)) | None => self.broken = true,
        }
    }

    /// Write what the socket takes now, without waiting: the outcome once
    /// all of it is written (or the write failed), `None` while some is
    /// left (the socket is full; the rest is in `out`).
    fn write_now(&mut self) -> Option<std::io::Result<()>> {
        // The no-op waker is replaced by the task's own when the rest is
        // waited for.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match pin!(write_out(&mut self.io, &mut self.out)).poll(&mut cx) {
            Poll::Ready(done) => Some(done),
            Poll::Pending => None,
        }
    }

    /// Append these items to the output, encoded: behind bytes already
    /// waiting, or kept as last words once closed.
    fn gather<P: Protocol>(&mut self, items: Batch) {
        gather_into::<P>(&mut self.out, items);
    }

    async fn write_raw(&mut self, bytes: &[u8]) {
        self.rx.writing();
        self.out.extend_from_slice(bytes);
        self.flush().await;
    }

    /// How a broken wire ends.
    fn ending<C>(&self) -> End<C> {
        match self.rx.reason() {
            Some(reason) => End::Evicted(reason),
            None => End::Gone,
        }
    }
}

/// Write `out`; on return (or cancellation) `out` holds what is not
/// written yet.
async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, out: &mut Vec<u8>) -> std::io::Result<()> {
    while !out.is_empty() {
        let n = io.write(out).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.drain(..n);
    }
    io.flush().await
}

thread_local! {
    /// This thread's buffer for [`Wire::write_gathered`].
    static GATHERED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The most a thread's gather buffer keeps between wake-ups: a larger
/// one (a burst to one connection) is given back.
const GATHERED_KEPT: usize = 64 * 1024;

/// Append these items to `out`, encoded, reserving once (grown item by
/// item, it was reallocated several times a batch: 3.4 % of the server's
/// samples in the 100 x 10 fan-out, 1.4 % after).
fn gather_into<P: Protocol>(out: &mut Vec<u8>, items: Batch) {
    out.reserve(items.iter().map(wire_size_hint::<P>).sum::<usize>());
    for item in items {
        put_on_the_wire::<P>(&item, out);
    }
}

/// Append `item` to `out` as it goes on the wire.
pub(crate) fn put_on_the_wire<P: Protocol>(item: &Outbound, out: &mut Vec<u8>) {
    let (header, payload) = on_the_wire::<P>(item);
    if let Some(header) = header {
        out.extend_from_slice(header.as_ref());
    }
    out.extend_from_slice(&payload);
}

/// Write what the socket takes of `bytes` now, without waiting: how much
/// it took (0 when it is full).
fn write_slice_now<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> std::io::Result<usize> {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut written = 0;
    while written < bytes.len() {
        match Pin::new(&mut *io).poll_write(&mut cx, &bytes[written..]) {
            Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

/// About how many bytes an item takes on the wire: an event's or raw
/// bytes' exactly (with room for the header), a reply's a guess (it is not
/// encoded yet).
fn wire_size_hint<P: Protocol>(item: &Outbound) -> usize {
    /// Most replies to a `send` (`ok` with an id, a seq and a time).
    const REPLY: usize = 96;
    let payload = match item {
        Outbound::Reply(_) => REPLY,
        Outbound::Event(shared) => shared.encoded(crate::format(P::TRANSPORT)).len(),
        Outbound::Raw(bytes) => bytes.len(),
    };
    payload + std::mem::size_of::<P::Header>()
}

/// An item as it goes on the wire: the protocol's header (none for raw
/// bytes, which go as they are) and the encoded payload.
fn on_the_wire<'a, P: Protocol>(
    item: &'a Outbound,
) -> (Option<P::Header>, std::borrow::Cow<'a, Bytes>) {
    let payload = encode(P::TRANSPORT, item);
    let header = match item {
        Outbound::Raw(_) => None,
        _ => Some(P::header(payload.len())),
    };
    (header, payload)
}

/// Write `header` and `payload` with one vectored write, without waiting;
/// what the socket does not take is appended to `out` (empty before).
fn write_parts_now<S: AsyncWrite + Unpin>(
    io: &mut S,
    header: &[u8],
    payload: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    if header.is_empty() && payload.is_empty() {
        return Ok(()); // an event a protocol does not show (typing, on lines)
    }
    let parts = [
        std::io::IoSlice::new(header),
        std::io::IoSlice::new(payload),
    ];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let written = match Pin::new(io).poll_write_vectored(&mut cx, &parts) {
        Poll::Ready(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
        Poll::Ready(written) => written?,
        Poll::Pending => 0,
    };
    match written.checked_sub(header.len()) {
        Some(sent) => out.extend_from_slice(&payload[sent..]),
        None => {
            out.extend_from_slice(&header[written..]);
            out.extend_from_slice(payload);
        }
    }
    Ok(())
}

/// A connection's driver, boxed: what the accepting task runs once the
/// connection is open (the opening's state is gone by then).
pub(crate) type Opened = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What a connection starts with besides its socket: bytes to write before
/// the greeting, in the same write (the response that upgraded it), and
/// bytes already read (what a client sent right after its request).
#[derive(Default)]
pub(crate) struct Opening {
    pub(crate) written: Vec<u8>,
    pub(crate) read: BytesMut,
}

/// A connection from `client` on `io`, speaking `protocol`: its session,
/// its `conn` log span, and the future that drives it to its end.
///
/// Not an `async fn`: what an async fn is given stays in its future after
/// it is moved on, so a layer that took the session by value and handed it
/// down would hold it twice (400 bytes, in every idle connection).
pub(crate) fn run<P, S>(
    app: Arc<App>,
    io: S,
    client: Client,
    protocol: P,
    admitted: Admitted,
    opening: Opening,
) -> impl Future<Output = ()> + Send
where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (session, rx) = app.open(&app.config(), client.ip);
    let span = tracing::info_span!(
        "conn",
        id = rx.id.0,
        transport = P::TRANSPORT.label(),
        peer = %client,
        proxy = client.via.map(tracing::field::display),
        user = tracing::field::Empty
    );
    let wire = Wire {
        io,
        closer: rx.closer(),
        rx,
        stall: app.config().write_stall,
        out: opening.written,
        broken: false,
    };
    let input = Input {
        bytes: opening.read,
    };
    connection(app, wire, session, protocol, admitted, input, span)
}

async fn connection<P, S>(
    app: Arc<App>,
    mut wire: Wire<S>,
    mut session: Session,
    mut protocol: P,
    _admitted: Admitted,
    mut input: Input,
    span: tracing::Span,
) where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _open = app.metrics.connection(P::TRANSPORT);
    span.in_scope(|| tracing::debug!("connected"));
    wire.write_raw(&protocol.greeting(&app)).await;
    // A socket that publishers can write to as well: their turns write
    // events to it (`confab_core::conn`).
    if let Some(socket) = (&wire.io as &dyn std::any::Any).downcast_ref::<SharedTcp<P>>() {
        wire.rx.write_through(Some(socket.through()));
    }
    let end = match wire.broken {
        true => wire.ending(),
        false => {
            serve(
                &app,
                &mut wire,
                &mut session,
                &mut protocol,
                &mut input,
                &span,
            )
            .await
        }
    };
    // Rare and large: boxed, so that it does not weigh on every idle
    // connection's future.
    Box::pin(finish(&app, wire, session, protocol, input, end).instrument(span.clone())).await;
    span.in_scope(|| tracing::debug!("disconnected"));
}

/// Read, serve and write until the connection ends.
///
/// The connection's `span` is entered only where something may log: the
/// session's work on a frame, its answers, the protocol's tick. A wake-up
/// that only writes events enters nothing (entering the span on every
/// poll of the connection was 4 % of the fan-out's samples).
async fn serve<P, S>(
    app: &App,
    wire: &mut Wire<S>,
    session: &mut Session,
    protocol: &mut P,
    input: &mut Input,
    span: &tracing::Span,
) -> End<P::Close>
where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let login_deadline = Instant::now() + app.config().login_timeout;
    // The futures every wake-up waits on live as long as the loop: made
    // anew on each turn, each would register with (and leave) the close
    // signal, the server's drain token (shared by every connection) and
    // the timer wheel on every event delivered. One timer (each costs its
    // room in every idle connection): the login deadline while logged
    // out, and the protocol's; reset only when it moves.
    let closer = wire.closer.clone();
    let mut closed = pin!(closer.closed());
    let mut draining = pin!(app.draining.cancelled());
    let mut timer = pin!(tokio::time::sleep_until(Instant::now() + NO_DEADLINE));
    let mut timer_due = None;
    let mut login = None;
    // Something besides events happened (the client wrote, a request was
    // answered, the timer fired): frames to serve, deadlines to move. A
    // wake-up that only wrote events changes neither.
    let mut moved = true;
    let mut turns = Turns::default();
    loop {
        if moved {
            // Serve every whole frame read so far.
            loop {
                match protocol.decode(&mut input.bytes) {
                    Ok(Some(frame)) => {
                        let served = protocol.serve(session, frame).instrument(span.clone());
                        if let Some(end) = Box::pin(wire.drive::<_, P>(app, served)).await {
                            return end;
                        }
                        if wire.broken {
                            return wire.ending();
                        }
                    }
                    Ok(None) => break,
                    Err(end) => return end,
                }
            }
            input.release_if_done();
            login = (!session.logged_in()).then_some(login_deadline);
            let due = match (login, protocol.next_tick()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if due != timer_due {
                timer
                    .as_mut()
                    .reset(due.unwrap_or_else(|| Instant::now() + NO_DEADLINE));
                timer_due = due;
            }
        }
        let room = protocol.room(&input.bytes);
        // Events first: under fan-out most wake-ups are one event and
        // nothing else, and polling every other source on each of them
        // was 5 % of the fan-out's samples. The others keep their wakers
        // meanwhile. After EVENTS_FIRST turns in a row that took events,
        // one turn takes them last, so that a stream of events cannot
        // starve the rest: the reads that carry the client's pongs, the
        // timer, the drain. Among the rest, the timer and the drain come
        // before the reads, which a flooding client keeps ready.
        let events_first = turns.events_first();
        let woke = std::future::poll_fn(|cx| {
            if events_first {
                if let Poll::Ready(items) = wire.rx.poll_recv_all(cx) {
                    return Poll::Ready(Woke::Events(items));
                }
            }
            if closed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Closed);
            }
            if draining.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Draining);
            }
            if timer_due.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Timer);
            }
            if session.poll_stored(cx).is_ready() {
                return Poll::Ready(Woke::Stored);
            }
            if let Poll::Ready(read) = input.poll_read_from(&mut wire.io, room, cx) {
                return Poll::Ready(Woke::Read(read));
            }
            if !events_first {
                if let Poll::Ready(items) = wire.rx.poll_recv_all(cx) {
                    return Poll::Ready(Woke::Events(items));
                }
            }
            Poll::Pending
        })
        .await;
        let events = matches!(woke, Woke::Events(_));
        moved = !events;
        turns.woke(events_first, events);
        // What a wake-up does (serve a frame, answer) is boxed where it is
        // large: it would otherwise take its room in every idle
        // connection's future. Frames already read are served above,
        // before a drain can be noticed.
        match woke {
            Woke::Closed => return wire.ending(),
            Woke::Events(Some(items)) => {
                wire.stage::<P>(app, items);
                wire.flush().await
            }
            Woke::Events(None) => return End::Gone,
            Woke::Stored => {
                let answer = session.answer().instrument(span.clone());
                Box::pin(wire.drive::<_, P>(app, answer)).await
            }
            Woke::Draining => return End::Shutdown,
            Woke::Read(Ok(0) | Err(_)) => return End::Gone,
            Woke::Read(Ok(_)) => protocol.heard(),
            Woke::Timer => {
                // Fired: set again on the next turn, even to the same time.
                timer_due = None;
                if login.is_some_and(|at| Instant::now() >= at) {
                    return End::Close(protocol.login_timeout());
                }
                match span.in_scope(|| protocol.tick()) {
                    Ok(Some(bytes)) => Box::pin(wire.write_raw(&bytes)).await,
                    Ok(None) => {}
                    Err(end) => return end,
                }
            }
        }
        if wire.broken {
            return wire.ending();
        }
    }
}

/// What woke a connection's [`serve`] loop.
enum Woke {
    /// Everything queued; `None` once nothing more can be.
    Events(Option<Batch>),
    Closed,
    Draining,
    Timer,
    /// The oldest request in flight has its outcome.
    Stored,
    /// Bytes read (0 at the end of the stream).
    Read(std::io::Result<usize>),
}

/// Wake-ups in a row that take events before anything else; the next
/// takes them last.
const EVENTS_FIRST: u32 = 16;

/// Whether the next wake-up polls the queue first: not after
/// [`EVENTS_FIRST`] turns in a row that took events that way.
#[derive(Default)]
struct Turns {
    events_in_a_row: u32,
}

impl Turns {
    fn events_first(&self) -> bool {
        self.events_in_a_row < EVENTS_FIRST
    }

    /// A wake-up that polled the queue first (or last) took `events`.
    fn woke(&mut self, events_first: bool, events: bool) {
        self.events_in_a_row = match events_first && events {
            true => self.events_in_a_row + 1,
            false => 0,
        };
    }
}

/// How far away the timer is set while there is no deadline.
const NO_DEADLINE: std::time::Duration = std::time::Duration::from_secs(86_400 * 365);

/// End a connection: answer what is in flight, end the session, write the
/// last words, and close the socket.
async fn finish<P, S>(
    app: &App,
    mut wire: Wire<S>,
    mut session: Session,
    mut protocol: P,
    mut input: Input,
    end: End<P::Close>,
) where
    P: Protocol,
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // Replies to what was read are written below, unless evicted.
    wire.drive::<_, P>(app, session.settle()).await;
    // From here on only this task writes: the last words come last.
    wire.rx.write_through(None);
    let end = match (end, wire.rx.reason()) {
        (End::Evicted(reason), _) => End::Evicted(reason),
        (_, Some(reason)) => End::Evicted(reason),
        (end, None) => end,
    };
    // Presence and guest memberships end now: the last words may wait.
    session.close().await;
    let drain = match &end {
        End::Gone => return,
        End::Evicted(reason) => {
            match reason {
                CloseReason::Kicked => tracing::info!("disconnected by an administrator"),
                CloseReason::Stale => tracing::info!("closing a session the cluster lost"),
                CloseReason::SlowConsumer => {
                    app.metrics.evicted(P::TRANSPORT);
                    tracing::info!("closing a slow consumer");
                }
                CloseReason::Abuse => tracing::info!("closing a connection that kept flooding"),
            }
            // The refusal that says why is still queued.
            *reason == CloseReason::Abuse
        }
        End::Shutdown | End::Close(_) => true,
    };
    if drain {
        let items = wire.rx.take_all();
        app.metrics.delivered(P::TRANSPORT, items.iter());
        wire.gather::<P>(items);
    }
    if let Some(words) = protocol.farewell(app, &end) {
        wire.out.extend_from_slice(&words);
    }
    // A client that does not read gets a few seconds for its last words,
    // evicted or not.
    let last = async {
        write_out(&mut wire.io, &mut wire.out).await?;
        protocol.linger(&mut wire.io, &mut input, &end).await;
        wire.io.shutdown().await
    };
    let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, last).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle connection costs is mostly its future, in one block of
    /// the allocator: mimalloc's blocks here are 1,792 and 2,048 bytes, so a
    /// few bytes past 1,792 cost 256 a connection (the 4 KiB target has
    /// less room than that). Measured in the test build, whose futures are
    /// no smaller than the release build's.
    #[tokio::test]
    async fn a_connection_future_fits_its_allocator_block() {
        let app = crate::test_app().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, addr) = listener.accept().await.unwrap();
        let client = Client {
            ip: addr.ip(),
            port: Some(addr.port()),
            via: None,
        };
        let socket = SharedTcp::<crate::ws::WebSocket>::new(stream, app.clone());
        let protocol = crate::ws::WebSocket::new(&app);
        let admitted = app.gate.admit(None).unwrap();
        let future = run(
            app.clone(),
            socket,
            client,
            protocol,
            admitted,
            Opening::default(),
        );
        let size = std::mem::size_of_val(&future);
        eprintln!("a WebSocket connection's future: {size} bytes");
        assert!(size <= 1792, "{size} bytes: past the 1,792-byte block");
    }

    #[tokio::test]
    async fn input_is_held_only_while_a_frame_is_incomplete() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut input = Input::default();
        assert_eq!(input.held(), 0);
        client.write_all(b"a whole line\nhalf a l").await.unwrap();
        input.read_from(&mut server, READ_CHUNK).await.unwrap();
        // The whole line is taken; half a line stays, and its buffer.
        let line = input.bytes.split_to(13);
        assert_eq!(&line[..], b"a whole line\n");
        drop(line);
        input.release_if_done();
        assert!(input.held() > 0);
        client.write_all(b"ine\n").await.unwrap();
        input.read_from(&mut server, READ_CHUNK).await.unwrap();
        assert_eq!(&input.bytes[..], b"half a line\n");
        input.bytes.clear();
        input.release_if_done();
        assert_eq!(input.held(), 0, "nothing held between frames");
    }

    /// Takes at most `most` bytes a write (none: not ready), of the
    /// first buffer only, as a vectored write may, and `budget` in all
    /// (then it is full). Never has anything to read.
    struct Trickle {
        most: usize,
        budget: usize,
        got: Vec<u8>,
    }

    impl Trickle {
        fn taking(most: usize) -> Trickle {
            Trickle {
                most,
                budget: usize::MAX,
                got: Vec::new(),
            }
        }
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.most).min(self.budget);
            if n == 0 {
                return Poll::Pending;
            }
            self.budget -= n;
            self.got.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn what_a_vectored_write_leaves_is_kept_in_order() {
        let (header, payload) = (b"head".as_slice(), b"the payload".as_slice());
        let mut io = Trickle::taking(1);
        let mut out = Vec::new();
        write_parts_now(&mut io, b"", b"", &mut out).expect("nothing to write is no error");
        assert!(io.got.is_empty() && out.is_empty());
        for most in [0, 1, 3, 4, 5, 15, 100] {
            let mut io = Trickle::taking(most);
            let mut out = Vec::new();
            write_parts_now(&mut io, header, payload, &mut out).unwrap();
            io.got.extend_from_slice(&out);
            assert_eq!(io.got, b"headthe payload", "at most {most} bytes a write");
        }
    }

    #[test]
    fn what_a_gathered_write_leaves_is_kept_in_order() {
        let raw = |s: &'static str| Outbound::Raw(Box::new(Bytes::from_static(s.as_bytes())));
        let whole = b"one two three four five";
        for budget in [0, 1, 7, 12, whole.len(), 100] {
            let (conn, rx) = confab_core::conn::channel(confab_core::conn::ConnId(1), 16, None);
            let mut wire = Wire {
                io: Trickle {
                    budget,
                    ..Trickle::taking(7)
                },
                closer: rx.closer(),
                rx,
                stall: std::time::Duration::from_secs(1),
                out: Vec::new(),
                broken: false,
            };
            for word in ["one ", "two ", "three ", "four ", "five"] {
                conn.push(raw(word));
            }
            let items = wire.rx.take_all();
            wire.write_gathered::<crate::line::Lines>(items);
            assert!(!wire.broken);
            let taken = budget.min(whole.len());
            assert_eq!(wire.io.got, whole[..taken], "the socket took {budget}");
            assert_eq!(wire.out, whole[taken..], "the connection keeps the rest");
            GATHERED.with_borrow(|buf| assert!(buf.capacity() <= GATHERED_KEPT));
        }
    }

    #[test]
    fn a_stream_of_events_cannot_starve_the_rest() {
        // Events are ready at every wake-up, and so is something else
        // (the client's pong, the timer): it goes first once the queue
        // goes last.
        let mut turns = Turns::default();
        let mut others = Vec::new();
        for turn in 0..100 {
            let first = turns.events_first();
            turns.woke(first, first);
            if !first {
                others.push(turn);
            }
        }
        assert_eq!(others.len(), 100 / (EVENTS_FIRST as usize + 1));
        assert_eq!(others[0], EVENTS_FIRST as usize);
        // A wake-up for anything else starts the count again.
        let mut turns = Turns::default();
        for _ in 0..EVENTS_FIRST - 1 {
            turns.woke(true, true);
        }
        turns.woke(true, false);
        turns.woke(true, true);
        assert!(turns.events_first());
    }

    #[tokio::test]
    async fn reads_take_no_more_than_the_room() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(&[b'x'; 10_000]).await.unwrap();
        let mut input = Input::default();
        assert_eq!(input.read_from(&mut server, 10).await.unwrap(), 10);
        assert_eq!(
            input.read_from(&mut server, 1 << 20).await.unwrap(),
            READ_CHUNK
        );
    }
}

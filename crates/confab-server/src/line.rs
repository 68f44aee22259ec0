//! The line transport: plain TCP for `nc` and `telnet`.
//!
//! Shaped like the WebSocket transport: the reader (the connection's task)
//! frames lines with a bounded [`LineDecoder`], turns each into a
//! [`Request`] for the [`Session`] and keeps the one piece of state a
//! terminal needs, the current room; the writer drains the connection's
//! queue, formatting replies and events as lines (an event once for every
//! line client, through [`SharedEvent`](confab_proto::SharedEvent)).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use confab_core::{ChatError, CloseReason, ConnReceiver, Session};
use confab_proto::line::{self, context, LineCommand, LineDecoder, LineFrame, Usage};
use confab_proto::{Envelope, Event, Request, RequestId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::{Admitted, Full};
use crate::http::ACCEPT_BACKOFF;
use crate::metrics::Transport;
use crate::proxy::{self, Client};
use crate::{encode, unless_evicted, App, SLOW_CONSUMER_GRACE};

/// Largest single read from a socket.
const READ_CHUNK: usize = 4096;
/// Messages `/history` shows when not told how many.
const DEFAULT_HISTORY: u32 = 20;
enum Ending {
    Shutdown,
    /// Write this last line, then close.
    Bye(&'static str),
    /// Silent for this long: say so, then close.
    Idle(Duration),
    Gone,
}

const BYE: &str = "* bye\n";
const LOGIN_TIMEOUT: &str = "! unauthorized: you did not log in in time; disconnecting\n";

/// Accept line connections until the server drains.
pub(crate) async fn serve(app: Arc<App>, listener: TcpListener) {
    loop {
        tokio::select! {
            _ = app.draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    app.tasks.spawn(handshake(app.clone(), stream, peer));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a line connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Who the client is (from a PROXY header when the peer is a trusted
/// proxy), then TLS when configured, then serve the connection, or tell it
/// why not. All of it within the handshake timeout.
async fn handshake(app: Arc<App>, mut stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    if let Err(e) = keep_alive(&stream) {
        tracing::warn!(%peer, error = %e, "cannot set TCP keepalive");
    }
    let config = app.config();
    let client = if config.trusted_proxies.contains(peer.ip()) {
        let header = proxy::read_proxy_header(&mut stream);
        match tokio::time::timeout(config.handshake_timeout, header).await {
            Ok(Ok(source)) => Client::proxied(peer, source),
            Ok(Err(e)) => {
                tracing::warn!(%peer, error = %e, "refused a connection from a trusted proxy");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "no PROXY header in time");
                return;
            }
        }
    } else {
        Client::direct(peer)
    };
    let admitted = app.admit(&config, client.ip);
    match &app.tls {
        None => admit(app, stream, client, admitted).await,
        Some(tls) => {
            let handshake = tls.acceptor.accept(stream);
            match tokio::time::timeout(config.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => admit(app, stream, client, admitted).await,
                Ok(Err(e)) => tracing::debug!(peer = %client, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(peer = %client, "TLS handshake timed out"),
            }
        }
    }
}

async fn admit<S: Stream>(
    app: Arc<App>,
    mut stream: S,
    client: Client,
    admitted: Result<Admitted, Full>,
) {
    match admitted {
        Ok(admitted) => connection(app, stream, client, admitted).await,
        Err(full) => {
            let line = format!("! unavailable: {}\n", full.message());
            let refusal = async {
                stream.write_all(line.as_bytes()).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), refusal).await;
        }
    }
}

/// Idle time before the first keepalive probe, the time between probes,
/// and how many go unanswered before the kernel gives up: a terminal that
/// vanished without closing (a laptop lid closed, a network gone) is found
/// in about 90 s, and its presence goes offline, instead of after hours.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 3;
/// How long written data may stay unacknowledged before the connection is
/// dropped: keepalive probes only run on an idle connection, not one with
/// a chat line stuck in its send queue.
const USER_TIMEOUT: Duration = Duration::from_secs(90);

/// TCP keepalive and a send timeout on a line connection (its liveness:
/// nobody at a terminal answers pings).
fn keep_alive(stream: &TcpStream) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))
}

/// What a line connection runs over: TCP, or TLS over TCP.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<S: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for S {}

async fn connection<S: Stream>(app: Arc<App>, stream: S, client: Client, admitted: Admitted) {
    let (session, rx) = app.open(&app.config(), client.ip);
    let span = tracing::info_span!(
        "conn",
        id = rx.id.0,
        transport = "line",
        peer = %client,
        proxy = client.via.map(tracing::field::display),
        user = tracing::field::Empty
    );
    run_connection(app, stream, session, rx, admitted)
        .instrument(span)
        .await;
}

async fn run_connection<S: Stream>(
    app: Arc<App>,
    stream: S,
    session: Session,
    rx: ConnReceiver,
    _admitted: Admitted,
) {
    let _open = app.metrics.connection(Transport::Line);
    tracing::debug!("connected");
    let (reader, writer) = tokio::io::split(stream);
    let (ending_tx, ending_rx) = oneshot::channel();
    let writer_gone = CancellationToken::new();
    // The writer logs under the connection's span too.
    let writer = tokio::spawn(
        write_loop(app.clone(), writer, rx, ending_rx, writer_gone.clone()).in_current_span(),
    );
    let (mut session, ending) = read_loop(&app, session, reader, &writer_gone).await;
    // Sends still in flight are answered before the writer is told to end.
    session.settle().await;
    let _ = ending_tx.send(ending);
    session.close().await;
    let _ = writer.await;
    tracing::debug!("disconnected");
}

async fn read_loop(
    app: &App,
    session: Session,
    mut reader: impl AsyncRead + Unpin,
    writer_gone: &CancellationToken,
) -> (Session, Ending) {
    let mut terminal = Terminal {
        session,
        current: None,
        max_line: app.config().max_line_bytes,
    };
    let config = app.config();
    let mut decoder = LineDecoder::new(config.max_line_bytes);
    let mut buf = BytesMut::new();
    let login_deadline = tokio::time::Instant::now() + config.login_timeout;
    let mut idle = config.line_idle.map(Idle::new);
    loop {
        while let Some(frame) = decoder.decode(&mut buf) {
            if let Some(ending) = terminal.frame(frame).await {
                return (terminal.session, ending);
            }
        }
        let room = decoder.room(&buf).min(READ_CHUNK);
        let mut limited = (&mut reader).take(room as u64);
        let idle_deadline = idle.as_ref().map(Idle::deadline);
        // Biased: input that already arrived is served before a drain.
        let read = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(login_deadline), if !terminal.session.logged_in() => {
                return (terminal.session, Ending::Bye(LOGIN_TIMEOUT));
            }
            _ = terminal.session.stored() => {
                terminal.session.answer().await;
                continue;
            }
            read = limited.read_buf(&mut buf) => read,
            _ = sleep_until_some(idle_deadline) => {
                let idle = idle.as_mut().expect("a deadline");
                match idle.lapsed() {
                    Some(warning) => {
                        terminal.session.write_raw(Bytes::from(warning)).await;
                        continue;
                    }
                    None => return (terminal.session, Ending::Idle(idle.limit)),
                }
            }
            _ = app.draining.cancelled() => return (terminal.session, Ending::Shutdown),
            _ = writer_gone.cancelled() => return (terminal.session, Ending::Gone),
        };
        match read {
            Ok(0) | Err(_) => return (terminal.session, Ending::Gone),
            Ok(_) => {
                if let Some(idle) = &mut idle {
                    idle.input();
                }
            }
        }
    }
}

/// Sleep until the deadline; without one, forever.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The idle rule of a line connection: after `limit` without input it is
/// closed, and a twelfth of `limit` before that (5 minutes of an hour) it
/// is warned. Any input, an empty line or `PING` too, starts it over.
struct Idle {
    limit: Duration,
    last_input: tokio::time::Instant,
    warned: bool,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle {
            limit,
            last_input: tokio::time::Instant::now(),
            warned: false,
        }
    }

    fn input(&mut self) {
        self.last_input = tokio::time::Instant::now();
        self.warned = false;
    }

    /// When the next warning or the close is due.
    fn deadline(&self) -> tokio::time::Instant {
        let grace = if self.warned {
            Duration::ZERO
        } else {
            self.limit / 12
        };
        self.last_input + self.limit - grace
    }

    /// The deadline passed: the warning to write, or `None` to close.
    fn lapsed(&mut self) -> Option<String> {
        if self.warned {
            return None;
        }
        self.warned = true;
        Some(format!(
            "* you have been idle for {}; send anything (an empty line will do) within {} to stay connected\n",
            words(self.limit - self.limit / 12),
            words(self.limit / 12)
        ))
    }
}

/// A duration as people say it: `55 minutes`, `1 hour`, `300 ms`.
fn words(d: Duration) -> String {
    if d.subsec_millis() != 0 {
        return format!("{} ms", d.as_millis());
    }
    let s = d.as_secs();
    let plural = |n: u64, unit: &str| format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
    if s >= 3600 && s.is_multiple_of(3600) {
        plural(s / 3600, "hour")
    } else if s >= 60 && s.is_multiple_of(60) {
        plural(s / 60, "minute")
    } else {
        plural(s, "second")
    }
}

/// A session seen from a terminal: the current room, and commands turned
/// into requests.
struct Terminal {
    session: Session,
    current: Option<String>,
    max_line: usize,
}

impl Terminal {
    async fn frame(&mut self, frame: LineFrame) -> Option<Ending> {
        match frame {
            LineFrame::Line(text) => return self.line(&text).await,
            LineFrame::TooLong => {
                let e = ChatError::too_large(format!(
                    "a line has at most {} bytes; this one was discarded",
                    self.max_line
                ));
                self.session.refuse(None, e).await;
            }
            LineFrame::BadUtf8 => {
                let e = ChatError::bad_request("the line is not valid UTF-8; it was discarded");
                self.session.refuse(None, e).await;
            }
        }
        None
    }

    async fn line(&mut self, text: &str) -> Option<Ending> {
        let command = match line::parse(text) {
            Ok(command) => command,
            Err(Usage(usage)) => {
                self.session
                    .refuse(None, ChatError::bad_request(usage))
                    .await;
                return None;
            }
        };
        match command {
            LineCommand::Nothing => {}
            LineCommand::Quit => return Some(Ending::Bye(BYE)),
            LineCommand::Ping(token) => {
                let pong = match token {
                    Some(t) => format!("PONG {t}\n"),
                    None => "PONG\n".to_owned(),
                };
                self.session.write_raw(Bytes::from(pong)).await;
            }
            LineCommand::Help => {
                self.session
                    .write_raw(Bytes::from_static(line::HELP.as_bytes()))
                    .await
            }
            LineCommand::Nick(user) => {
                self.request(context::AUTH, Request::Guest { user }).await;
            }
            LineCommand::Register { user, password } => {
                self.request(context::AUTH, Request::Register { user, password })
                    .await;
            }
            LineCommand::Login { user, password } => {
                self.request(context::AUTH, Request::Login { user, password })
                    .await;
            }
            LineCommand::Join(room) => {
                let room = room.to_ascii_lowercase();
                if self
                    .request(context::JOIN, Request::Join { room: room.clone() })
                    .await
                {
                    self.current = Some(room);
                }
            }
            LineCommand::Leave(room) => {
                let room = self.room_or_current(room).await?;
                let ctx = format!("{} {room}", context::LEAVE);
                if self
                    .request(&ctx, Request::Leave { room: room.clone() })
                    .await
                    && self.current.as_deref() == Some(&room)
                {
                    self.current = None;
                }
            }
            LineCommand::Rooms { all } => {
                let rooms = Request::Rooms {
                    all,
                    after: None,
                    limit: None,
                };
                self.request(context::ROOMS, rooms).await;
            }
            LineCommand::Who(room) => {
                if let Some(room) = self.room_or_current(room).await {
                    let ctx = format!("{} {room}", context::WHO);
                    let members = Request::Members {
                        room,
                        after: None,
                        limit: None,
                    };
                    self.request(&ctx, members).await;
                }
            }
            LineCommand::Msg { to, text } => {
                let dm = Request::Dm {
                    to,
                    body: text,
                    nonce: None,
                };
                self.request(context::SAY, dm).await;
            }
            LineCommand::Topic(topic) => {
                let room = self.room_or_current(None).await?;
                match topic {
                    Some(topic) => {
                        self.request(context::TOPIC_SET, Request::Topic { room, topic })
                            .await;
                    }
                    // Joining the current room again changes nothing and
                    // answers with its topic.
                    None => {
                        self.request(context::TOPIC_SHOW, Request::Join { room })
                            .await;
                    }
                }
            }
            LineCommand::History(n) => {
                if let Some(room) = self.room_or_current(None).await {
                    let history = Request::History {
                        room,
                        before: None,
                        after: None,
                        limit: Some(n.unwrap_or(DEFAULT_HISTORY)),
                    };
                    self.request(context::HISTORY, history).await;
                }
            }
            LineCommand::Say(body) => {
                if let Some(room) = self.room_or_current(None).await {
                    let send = Request::Send {
                        room,
                        body,
                        nonce: None,
                    };
                    self.request(context::SAY, send).await;
                }
            }
        }
        None
    }

    /// The room named, or the current one; without either, says so.
    async fn room_or_current(&mut self, room: Option<String>) -> Option<String> {
        match room.or_else(|| self.current.clone()) {
            Some(room) => Some(room.to_ascii_lowercase()),
            None => {
                let e = ChatError::bad_request("you are not in a room: /join ROOM first");
                self.session.refuse(None, e).await;
                None
            }
        }
    }

    async fn request(&mut self, ctx: &str, request: Request) -> bool {
        let envelope = Envelope {
            id: Some(RequestId::Str(ctx.to_owned())),
            request,
        };
        let was_in = self.session.logged_in();
        let ok = self.session.handle(envelope).await;
        if !was_in {
            if let Some(user) = self.session.user() {
                tracing::Span::current().record("user", user.as_str());
            }
        }
        ok
    }
}

async fn write_loop(
    app: Arc<App>,
    mut out: impl AsyncWrite + Unpin,
    mut rx: ConnReceiver,
    mut ending: oneshot::Receiver<Ending>,
    gone: CancellationToken,
) {
    let greeting = format!(
        "* welcome to {} {}: /nick NAME to chat as a guest, /register NAME PASSWORD, /login NAME PASSWORD; /help for more\n",
        confab_proto::SERVER_NAME,
        confab_proto::VERSION
    );
    let closer = rx.closer();
    let stall = app.config().write_stall;
    let mut written = unless_evicted(&closer, stall, out.write_all(greeting.as_bytes())).await;
    while let Some(Ok(())) = written {
        written = tokio::select! {
            biased;
            _ = closer.closed() => None,
            end = &mut ending => {
                let last: Option<Bytes> = match end.unwrap_or(Ending::Gone) {
                    Ending::Gone => None,
                    Ending::Bye(last) => Some(Bytes::from_static(last.as_bytes())),
                    Ending::Idle(limit) => {
                        tracing::debug!("closing an idle line connection");
                        Some(Bytes::from(format!("* idle for {}: disconnecting\n", words(limit))))
                    }
                    Ending::Shutdown => Some(line::format_event(&Event::Shutdown {
                        reason: "the server is shutting down".into(),
                        reconnect_ms: app.config().reconnect_ms,
                    })),
                };
                if let Some(last) = last {
                    let mut batch = Vec::new();
                    while let Some(item) = rx.try_recv() {
                        batch.extend_from_slice(&encode(&app, Transport::Line, item));
                    }
                    batch.extend_from_slice(&last);
                    let _ = out.write_all(&batch).await;
                    let _ = out.shutdown().await;
                }
                break;
            }
            item = rx.recv() => match item {
                Some(item) => {
                    // Everything queued now, in one write.
                    let mut batch = encode(&app, Transport::Line, item).to_vec();
                    while let Some(item) = rx.try_recv() {
                        batch.extend_from_slice(&encode(&app, Transport::Line, item));
                    }
                    unless_evicted(&closer, stall, out.write_all(&batch)).await
                }
                None => break,
            },
        };
    }
    match rx.reason() {
        Some(CloseReason::Kicked) => {
            tracing::info!("disconnected by an administrator");
            gone.cancel();
            let words = b"! disconnected by an administrator\n";
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, out.write_all(words)).await;
        }
        Some(CloseReason::Stale) => {
            tracing::info!("closing a session the cluster lost");
            gone.cancel();
            let words = format!("! {}\n", crate::STALE_SESSION);
            let _ =
                tokio::time::timeout(SLOW_CONSUMER_GRACE, out.write_all(words.as_bytes())).await;
        }
        Some(CloseReason::SlowConsumer) => {
            app.metrics.evicted(Transport::Line);
            tracing::info!("closing a slow consumer");
            // Let the session go first: the last line may wait for room.
            gone.cancel();
            // A write cut short may have left half a line: start afresh.
            let words = b"\n! slow_consumer: you are not reading fast enough; disconnecting\n";
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, out.write_all(words)).await;
        }
        Some(CloseReason::Abuse) => {
            tracing::info!("closing a connection that kept flooding");
            gone.cancel();
            // The refusal that says why is still queued.
            let mut batch = Vec::new();
            while let Some(item) = rx.try_recv() {
                batch.extend_from_slice(&encode(&app, Transport::Line, item));
            }
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, out.write_all(&batch)).await;
        }
        None => {}
    }
    gone.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn line_sockets_keep_alive() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        keep_alive(&accepted).unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(USER_TIMEOUT));
    }

    #[test]
    fn idle_times_in_words() {
        assert_eq!(words(Duration::from_secs(3300)), "55 minutes");
        assert_eq!(words(Duration::from_secs(3600)), "1 hour");
        assert_eq!(words(Duration::from_secs(1)), "1 second");
        assert_eq!(words(Duration::from_millis(1100)), "1100 ms");
    }
}

//! The line transport: plain TCP for `nc` and `telnet`.
//!
//! A [`Protocol`](crate::driver::Protocol) of the connection
//! [driver](crate::driver), like the WebSocket transport: lines framed by
//! a bounded [`LineDecoder`], each turned into a [`Request`] for the
//! [`Session`], with the one piece of state a terminal needs, the current
//! room; replies and events formatted as lines (an event once for every
//! line client, through [`SharedEvent`](confab_proto::SharedEvent)); the
//! idle rule as the driver's timer.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use confab_core::{ChatError, CloseReason, Session};
use confab_proto::line::{self, context, LineCommand, LineDecoder, LineFrame, Moderation, Usage};
use confab_proto::{Envelope, Event, Place, Request, RequestId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use crate::admission::{Admitted, Full};
use crate::driver::{self, End, READ_CHUNK};
use crate::http::ACCEPT_BACKOFF;
use crate::metrics::Transport;
use crate::proxy::{self, Client};
use crate::through::SharedTcp;
use crate::App;

/// Messages `/history` shows when not told how many.
const DEFAULT_HISTORY: u32 = 20;

/// How a line connection ends by its own rules.
#[derive(Debug)]
pub(crate) enum Closing {
    /// Write this last line, then close.
    Bye(&'static str),
    /// Silent for this long: say so, then close.
    Idle(Duration),
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
                    let app = app.clone();
                    app.tasks.clone().spawn(async move {
                        // Boxed, and gone once done: what the handshake
                        // holds (a PROXY header, TLS) is not kept for as
                        // long as the connection lives.
                        if let Some(connection) = Box::pin(handshake(app, stream, peer)).await {
                            connection.await;
                        }
                    });
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
/// proxy), then TLS when configured: the connection to serve, or `None`
/// when it is refused (and told why). All of it within the handshake
/// timeout.
async fn handshake(
    app: Arc<App>,
    mut stream: TcpStream,
    peer: SocketAddr,
) -> Option<driver::Opened> {
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
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "no PROXY header in time");
                return None;
            }
        }
    } else {
        Client::direct(peer)
    };
    let admitted = app.admit(&config, client.ip);
    match &app.tls {
        None => {
            let stream = SharedTcp::<Lines>::new(stream, app.clone());
            admit(app, stream, client, admitted).await
        }
        Some(tls) => {
            let handshake = tls.acceptor.accept(stream);
            match tokio::time::timeout(config.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => admit(app, stream, client, admitted).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %client, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(peer = %client, "TLS handshake timed out");
                    None
                }
            }
        }
    }
}

async fn admit<S: Stream>(
    app: Arc<App>,
    mut stream: S,
    client: Client,
    admitted: Result<Admitted, Full>,
) -> Option<driver::Opened> {
    match admitted {
        Ok(admitted) => {
            let protocol = lines(&app);
            Some(Box::pin(driver::run(
                app,
                stream,
                client,
                protocol,
                admitted,
                driver::Opening::default(),
            )))
        }
        Err(full) => {
            let line = format!("! unavailable: {}\n", full.message());
            let refusal = async {
                stream.write_all(line.as_bytes()).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), refusal).await;
            None
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

/// A line connection's protocol state, fresh.
fn lines(app: &App) -> Lines {
    let config = app.config();
    Lines {
        decoder: LineDecoder::new(config.max_line_bytes),
        current: None,
        max_line: config.max_line_bytes,
        idle: config.line_idle.map(Idle::new),
    }
}

/// The line protocol's state: the decoder, the current room, the idle rule.
pub(crate) struct Lines {
    decoder: LineDecoder,
    current: Option<String>,
    max_line: usize,
    idle: Option<Idle>,
}

impl driver::Protocol for Lines {
    type Frame = LineFrame;
    type Close = Closing;
    type Header = [u8; 0];
    const TRANSPORT: Transport = Transport::Line;

    fn greeting(&self, _app: &App) -> Bytes {
        Bytes::from(format!(
            "* welcome to {} {}: /nick NAME to chat as a guest, /register NAME PASSWORD, /login NAME PASSWORD; /help for more\n",
            confab_proto::SERVER_NAME,
            confab_proto::VERSION
        ))
    }

    fn room(&self, input: &BytesMut) -> usize {
        self.decoder.room(input).min(READ_CHUNK)
    }

    fn decode(&mut self, input: &mut BytesMut) -> Result<Option<LineFrame>, End<Closing>> {
        Ok(self.decoder.decode(input))
    }

    async fn serve(&mut self, session: &mut Session, frame: LineFrame) -> Option<End<Closing>> {
        let mut terminal = Terminal {
            session,
            current: &mut self.current,
            max_line: self.max_line,
        };
        terminal.frame(frame).await
    }

    fn header(_len: usize) -> [u8; 0] {
        []
    }

    fn heard(&mut self) {
        if let Some(idle) = &mut self.idle {
            idle.input();
        }
    }

    fn next_tick(&self) -> Option<Instant> {
        self.idle.as_ref().map(Idle::deadline)
    }

    fn tick(&mut self) -> Result<Option<Bytes>, End<Closing>> {
        let Some(idle) = &mut self.idle else {
            return Ok(None);
        };
        if Instant::now() < idle.deadline() {
            return Ok(None);
        }
        match idle.lapsed() {
            Some(warning) => Ok(Some(Bytes::from(warning))),
            None => Err(End::Close(Closing::Idle(idle.limit))),
        }
    }

    fn login_timeout(&self) -> Closing {
        Closing::Bye(LOGIN_TIMEOUT)
    }

    fn farewell(&self, app: &App, end: &End<Closing>) -> Option<Bytes> {
        Some(match end {
            End::Gone => return None,
            End::Shutdown => line::format_event(&Event::Shutdown {
                reason: "the server is shutting down".into(),
                reconnect_ms: app.config().reconnect_ms,
            }),
            End::Close(Closing::Bye(last)) => Bytes::from_static(last.as_bytes()),
            End::Close(Closing::Idle(limit)) => {
                tracing::debug!("closing an idle line connection");
                Bytes::from(format!("* idle for {}: disconnecting\n", words(*limit)))
            }
            End::Evicted(reason) => match reason {
                CloseReason::Kicked => Bytes::from_static(b"! disconnected by an administrator\n"),
                CloseReason::Stale => Bytes::from(format!("! {}\n", crate::STALE_SESSION)),
                // A write cut short may have left half a line: start afresh.
                CloseReason::SlowConsumer => Bytes::from_static(
                    b"\n! slow_consumer: you are not reading fast enough; disconnecting\n",
                ),
                // The refusal that says why is queued before it.
                CloseReason::Abuse => return None,
            },
        })
    }
}

/// The idle rule of a line connection: after `limit` without input it is
/// closed, and a twelfth of `limit` before that (5 minutes of an hour) it
/// is warned. Any input, an empty line or `PING` too, starts it over.
struct Idle {
    limit: Duration,
    last_input: Instant,
    warned: bool,
}

impl Idle {
    fn new(limit: Duration) -> Idle {
        Idle {
            limit,
            last_input: Instant::now(),
            warned: false,
        }
    }

    fn input(&mut self) {
        self.last_input = Instant::now();
        self.warned = false;
    }

    /// When the next warning or the close is due.
    fn deadline(&self) -> Instant {
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

/// A moderation command's request, and what its `ok` reads.
fn moderation(
    action: Moderation,
    place: Place,
    user: String,
    duration_ms: Option<i64>,
    reason: Option<String>,
) -> (Request, String) {
    let until = match duration_ms {
        Some(ms) => format!(" for {}", words(Duration::from_millis(ms.max(0) as u64))),
        None => String::new(),
    };
    let at = place.label();
    let (done, request) = match action {
        Moderation::Kick => (
            format!("{user} was put out of {at}"),
            Request::Kick {
                place,
                user,
                reason,
            },
        ),
        Moderation::Ban => (
            format!("{user} is banned from {at}{until}"),
            Request::Ban {
                place,
                user,
                reason,
                duration_ms,
            },
        ),
        Moderation::Mute => (
            format!("{user} is muted in {at}{until}"),
            Request::Mute {
                place,
                user,
                reason,
                duration_ms,
            },
        ),
        Moderation::Unban => (
            format!("{user} may join {at} again"),
            Request::Unban { place, user },
        ),
        Moderation::Unmute => (
            format!("{user} may speak in {at} again"),
            Request::Unmute { place, user },
        ),
    };
    (request, done)
}

/// A session seen from a terminal: the current room, and commands turned
/// into requests.
struct Terminal<'a> {
    session: &'a mut Session,
    current: &'a mut Option<String>,
    max_line: usize,
}

impl Terminal<'_> {
    async fn frame(&mut self, frame: LineFrame) -> Option<End<Closing>> {
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

    async fn line(&mut self, text: &str) -> Option<End<Closing>> {
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
            LineCommand::Quit => return Some(End::Close(Closing::Bye(BYE))),
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
            LineCommand::Join(room, invite) => {
                let room = room.to_ascii_lowercase();
                if self
                    .request(
                        context::JOIN,
                        Request::Join {
                            room: room.clone(),
                            invite,
                        },
                    )
                    .await
                {
                    *self.current = Some(room);
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
                    *self.current = None;
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
                        self.request(context::TOPIC_SHOW, Request::Join { room, invite: None })
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
            LineCommand::Edit { seq, text } => {
                let room = self.room_or_current(None).await?;
                let edit = Request::Edit {
                    room,
                    seq,
                    body: text,
                    nonce: None,
                };
                self.request(context::SAY, edit).await;
            }
            LineCommand::Delete(seq) => {
                let room = self.room_or_current(None).await?;
                let delete = Request::Delete {
                    room,
                    seq,
                    nonce: None,
                };
                self.request(context::SAY, delete).await;
            }
            LineCommand::Role { hub, user, role } => {
                let place = self.place(hub).await?;
                // The `role` event tells everyone, this connection included.
                self.request(context::SAY, Request::Role { place, user, role })
                    .await;
            }
            LineCommand::Bans(hub) => {
                let place = self.place(hub).await?;
                let ctx = format!("{} {}", context::BANS, place.label());
                self.request(&ctx, Request::Bans { place }).await;
            }
            LineCommand::Moderate {
                hub,
                action,
                user,
                duration_ms,
                reason,
            } => {
                let place = self.place(hub).await?;
                let (request, done) = moderation(action, place, user, duration_ms, reason);
                self.request(&format!("{}{done}", context::DONE), request)
                    .await;
            }
            LineCommand::Hubs { all } => {
                self.request(context::SAY, Request::Hubs { all }).await;
            }
            LineCommand::HubShow(hub) => {
                self.request(context::SAY, Request::Hub { hub }).await;
            }
            LineCommand::HubCreate {
                hub,
                private,
                title,
            } => {
                let create = Request::HubCreate {
                    hub: hub.clone(),
                    title,
                    private,
                };
                self.enter_hub(hub, create).await;
            }
            LineCommand::HubJoin { hub, invite } => {
                let join = Request::HubJoin {
                    hub: hub.clone(),
                    invite,
                };
                self.enter_hub(hub, join).await;
            }
            LineCommand::HubLeave(hub) => {
                let ctx = format!("{}you left hub {hub}", context::DONE);
                let prefix = format!("{}/", hub.to_ascii_lowercase());
                if self.request(&ctx, Request::HubLeave { hub }).await
                    && self
                        .current
                        .as_ref()
                        .is_some_and(|c| c.starts_with(&prefix))
                {
                    *self.current = None;
                }
            }
            LineCommand::ChannelCreate {
                room,
                private,
                topic,
            } => {
                let Some((hub, channel)) = room.split_once('/') else {
                    let e = ChatError::bad_request("usage: /channel HUB/CHANNEL [private] [TOPIC]");
                    self.session.refuse(None, e).await;
                    return None;
                };
                let create = Request::ChannelCreate {
                    hub: hub.to_owned(),
                    channel: channel.to_owned(),
                    private,
                    topic,
                };
                self.request(context::SAY, create).await;
            }
            LineCommand::Invite { place, user } => {
                let place = match place.contains('/') {
                    true => Place::room(place),
                    false => Place::hub(place),
                };
                let invite = Request::Invite {
                    place,
                    user,
                    expires_ms: None,
                };
                self.request(context::SAY, invite).await;
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

    /// A hub named, or else the current room.
    async fn place(&mut self, hub: Option<String>) -> Option<Place> {
        match hub {
            Some(hub) => Some(Place::hub(hub)),
            None => self.room_or_current(None).await.map(Place::room),
        }
    }

    /// Create or join a hub; once in, its first channel is the current room.
    async fn enter_hub(&mut self, hub: String, request: Request) {
        if self.request(context::SAY, request).await {
            *self.current = Some(format!(
                "{}/{}",
                hub.to_ascii_lowercase(),
                confab_core::store::FIRST_CHANNEL
            ));
        }
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

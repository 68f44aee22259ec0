//! The WebSocket transport: `GET /ws`, one JSON object per text frame.
//!
//! The upgrade is answered here (RFC 6455 section 4.2); the connection is
//! then one task, the [driver](crate::driver), with this module's
//! [`Protocol`]: frames decoded by [`wsframe`](crate::wsframe), requests
//! for the session, a ping every heartbeat, close frames with the
//! contract's codes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use confab_core::{ChatError, CloseReason, Session};
use confab_proto::{json, Event, Limits};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncRead;
use tokio::time::Instant;

use crate::admission::Admitted;
use crate::driver::{self, End, Input, Opening};
use crate::metrics::Transport;
use crate::proxy::Client;
use crate::wsframe::{self, Frame, FrameError};
use crate::App;

/// Close codes of the contract.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const NOT_UTF8: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Service restart: connect again.
    pub const RECONNECT: u16 = 1012;
    pub const ABUSE: u16 = 4029;
}

/// How long the socket stays open after a 1009 close. The oversized frame's
/// bytes are still unread (it is refused by its header, which is what keeps
/// memory bounded), and closing a socket with unread input sends a TCP
/// reset that makes the peer discard our close frame unread. Lingering
/// gives the client time to read it (nginx's lingering close).
const LINGER_AFTER_TOO_BIG: Duration = Duration::from_secs(1);

/// How long the server waits for the client's close frame after its own
/// (RFC 6455 section 7.1.1): closing with unread input would reset the
/// connection, and the client could lose our close frame.
const CLOSING_HANDSHAKE: Duration = Duration::from_secs(1);

/// An upgrade request that passed every check: its answer's key, the
/// client, and its place among the connections.
pub(crate) struct Accepted {
    accept: HeaderValue,
    client: Client,
    admitted: Admitted,
}

/// Why an upgrade request is refused: a bad request (400, 426) or no room
/// now (503).
struct Refusal {
    status: StatusCode,
    why: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, why) = (self.status, self.why);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            ([(header::RETRY_AFTER, "5")], (status, why)).into_response()
        } else {
            ([(header::SEC_WEBSOCKET_VERSION, "13")], (status, why)).into_response()
        }
    }
}

/// Check an upgrade request from `peer` and take its place, or the refusal.
fn handshake(app: &App, peer: SocketAddr, headers: &HeaderMap) -> Result<Accepted, Refusal> {
    let unavailable = |why| Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        why,
    };
    let accept = accept_key(headers).map_err(|(status, why)| Refusal { status, why })?;
    if app.draining.is_cancelled() {
        return Err(unavailable("the server is shutting down"));
    }
    let config = app.config();
    let client = Client::behind(peer, headers, &config.trusted_proxies);
    match app.admit(&config, client.ip) {
        Ok(admitted) => Ok(Accepted {
            accept,
            client,
            admitted,
        }),
        Err(full) => Err(unavailable(full.message())),
    }
}

/// `GET /ws` through hyper: a request after others on a kept-alive
/// connection, or one refused (the first request of a connection is
/// answered by [`first_request`]).
pub(crate) async fn upgrade(
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    State(app): State<Arc<App>>,
    mut request: Request,
) -> Response {
    let accepted = match handshake(&app, peer, request.headers()) {
        Ok(accepted) => accepted,
        Err(refused) => return refused.into_response(),
    };
    let upgraded = hyper::upgrade::on(&mut request);
    let tracker = app.tasks.clone();
    let Accepted {
        accept,
        client,
        admitted,
    } = accepted;
    tracker.spawn(async move {
        match upgraded.await {
            Ok(upgraded) => {
                let protocol = WebSocket::new(&app);
                let io = TokioIo::new(upgraded);
                driver::run(app, io, client, protocol, admitted, Opening::default()).await
            }
            Err(e) => tracing::debug!(peer = %client, error = %e, "the upgrade failed"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    response
}

/// The first request of a connection, if it is a WebSocket upgrade that
/// passes every check: the connection becomes the driver's in the task
/// that accepted it, with no HTTP machinery, no second task, and the 101
/// written with the `hello` in one write. `None` leaves the request to
/// hyper, which answers refusals (through [`upgrade`], the same checks).
pub(crate) fn first_request(
    app: &App,
    peer: SocketAddr,
    request: &httparse::Request<'_, '_>,
) -> Option<Accepted> {
    let path = request.path?;
    let path = path.split_once('?').map_or(path, |(path, _)| path);
    if request.method != Some("GET") || request.version != Some(1) || path != "/ws" {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(request.headers.len());
    for h in request.headers.iter() {
        let name = header::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        headers.append(name, HeaderValue::from_bytes(h.value).ok()?);
    }
    handshake(app, peer, &headers).ok()
}

/// The WebSocket connection of an upgrade accepted by [`first_request`]:
/// `rest` is what the client sent after its request.
pub(crate) fn upgraded<S>(
    app: Arc<App>,
    io: S,
    accepted: Accepted,
    rest: BytesMut,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut written = Vec::with_capacity(160);
    written.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
          sec-websocket-accept: ",
    );
    written.extend_from_slice(accepted.accept.as_bytes());
    written.extend_from_slice(b"\r\n\r\n");
    let protocol = WebSocket::new(&app);
    let opening = Opening {
        written,
        read: rest,
    };
    driver::run(
        app,
        io,
        accepted.client,
        protocol,
        accepted.admitted,
        opening,
    )
}

/// The `Sec-WebSocket-Accept` for a valid upgrade request, or why not.
fn accept_key(headers: &HeaderMap) -> Result<HeaderValue, (StatusCode, &'static str)> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        let why = "this endpoint speaks WebSocket: send an upgrade request";
        return Err((StatusCode::BAD_REQUEST, why));
    }
    let version = headers.get(header::SEC_WEBSOCKET_VERSION);
    if version.map(|v| v.as_bytes()) != Some(b"13") {
        return Err((StatusCode::UPGRADE_REQUIRED, "WebSocket version 13 only"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err((StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key"));
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok(HeaderValue::from_str(&accept).expect("base64 is a valid header value"))
}

/// A close frame to send.
#[derive(Debug)]
pub(crate) struct Closing {
    code: u16,
    reason: &'static str,
}

pub(crate) struct WebSocket {
    decoder: wsframe::Decoder,
    heartbeat: Duration,
    next_ping: Instant,
    last_heard: Instant,
}

impl WebSocket {
    pub(crate) fn new(app: &App) -> WebSocket {
        let config = app.config();
        let now = Instant::now();
        WebSocket {
            decoder: wsframe::Decoder::new(config.max_frame_bytes),
            heartbeat: config.heartbeat,
            next_ping: now + config.heartbeat,
            last_heard: now,
        }
    }

    /// Two heartbeat intervals without a frame (or a pong) is a dead peer.
    fn idle_deadline(&self) -> Instant {
        self.last_heard + self.heartbeat * 2
    }
}

fn closing(code: u16, reason: &'static str) -> End<Closing> {
    End::Close(Closing { code, reason })
}

impl driver::Protocol for WebSocket {
    type Frame = Frame;
    type Close = Closing;
    type Header = wsframe::OutHeader;
    const TRANSPORT: Transport = Transport::Ws;

    fn greeting(&self, app: &App) -> Bytes {
        let hello = Event::Hello {
            server: confab_proto::SERVER_NAME.into(),
            version: confab_proto::VERSION.into(),
            node: app.chat.node().to_owned(),
            heartbeat_ms: self.heartbeat.as_millis() as u64,
            limits: Limits {
                max_body_bytes: app.chat.config().max_body_bytes,
                max_frame_bytes: app.config().max_frame_bytes,
            },
        };
        let mut out = Vec::new();
        wsframe::put(wsframe::TEXT, &json::encode_event(&hello), &mut out);
        out.into()
    }

    fn decode(&mut self, input: &mut BytesMut) -> Result<Option<Frame>, End<Closing>> {
        self.decoder.decode(input).map_err(|e| match e {
            FrameError::TooBig => closing(close::TOO_BIG, "frame too large"),
            FrameError::NotUtf8 => closing(close::NOT_UTF8, "a text frame that is not UTF-8"),
            FrameError::Protocol(why) => closing(close::PROTOCOL, why),
        })
    }

    async fn serve(&mut self, session: &mut Session, frame: Frame) -> Option<End<Closing>> {
        match frame {
            Frame::Text(text) => match json::decode_request(text.as_bytes()) {
                Ok(envelope) => {
                    let was_in = session.logged_in();
                    session.handle(envelope).await;
                    if !was_in {
                        if let Some(user) = session.user() {
                            tracing::Span::current().record("user", user.as_str());
                        }
                    }
                }
                Err(error) => session.reject(error).await,
            },
            Frame::Binary => {
                let e = ChatError::bad_request("binary frames are not accepted: send JSON text");
                session.refuse(None, e).await;
            }
            Frame::Ping(payload) => {
                let mut pong = Vec::new();
                wsframe::put(wsframe::PONG, &payload, &mut pong);
                session.write_raw(pong.into()).await;
            }
            Frame::Pong => {}
            // The client closes: answer with its code.
            Frame::Close(code) => return Some(closing(code.unwrap_or(close::NORMAL), "")),
        }
        None
    }

    fn header(len: usize) -> wsframe::OutHeader {
        wsframe::OutHeader::new(wsframe::TEXT, len)
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
    }

    fn next_tick(&self) -> Option<Instant> {
        Some(self.next_ping.min(self.idle_deadline()))
    }

    fn tick(&mut self) -> Result<Option<Bytes>, End<Closing>> {
        let now = Instant::now();
        if now >= self.idle_deadline() {
            return Err(closing(close::POLICY, "idle timeout"));
        }
        if now < self.next_ping {
            return Ok(None);
        }
        self.next_ping = now + self.heartbeat;
        let mut ping = Vec::new();
        wsframe::put(wsframe::PING, &[], &mut ping);
        Ok(Some(ping.into()))
    }

    fn login_timeout(&self) -> Closing {
        Closing {
            code: close::POLICY,
            reason: "login timeout",
        }
    }

    fn farewell(&self, app: &App, end: &End<Closing>) -> Option<Bytes> {
        let mut out = Vec::new();
        let (code, reason) = match end {
            End::Gone => return None,
            End::Shutdown => {
                let notice = Event::Shutdown {
                    reason: "the server is shutting down".into(),
                    reconnect_ms: app.config().reconnect_ms,
                };
                wsframe::put(wsframe::TEXT, &json::encode_event(&notice), &mut out);
                (close::GOING_AWAY, "server shutting down")
            }
            End::Close(Closing { code, reason }) => (*code, *reason),
            End::Evicted(reason) => match reason {
                CloseReason::Kicked => (close::POLICY, "disconnected by an administrator"),
                CloseReason::Stale => (close::RECONNECT, crate::STALE_SESSION),
                CloseReason::SlowConsumer => (close::SLOW_CONSUMER, "slow consumer"),
                CloseReason::Abuse => (close::ABUSE, "rate limit abuse"),
            },
        };
        wsframe::put_close(code, reason, &mut out);
        Some(out.into())
    }

    async fn linger<S: AsyncRead + Unpin + Send>(
        &mut self,
        io: &mut S,
        input: &mut Input,
        end: &End<Closing>,
    ) {
        match end {
            End::Close(c) if c.code == close::TOO_BIG => {
                tokio::time::sleep(LINGER_AFTER_TOO_BIG).await;
            }
            End::Shutdown
            | End::Close(Closing {
                code: close::POLICY,
                ..
            }) => {
                // Read (and drop) what the client still sends, until its close.
                let _ = tokio::time::timeout(CLOSING_HANDSHAKE, async {
                    loop {
                        match self.decoder.decode(&mut input.bytes) {
                            Ok(Some(Frame::Close(_))) | Err(_) => return,
                            Ok(Some(_)) => continue,
                            Ok(None) => {}
                        }
                        match input.read_from(io, driver::READ_CHUNK).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => {}
                        }
                    }
                })
                .await;
            }
            _ => {}
        }
    }
}

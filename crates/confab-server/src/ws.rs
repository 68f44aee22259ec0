//! The WebSocket transport: `GET /ws`, one JSON object per text frame.
//!
//! Each connection is two tasks. The reader (the upgrade's own task) decodes
//! frames and drives the [`Session`], one request at a time; the writer
//! drains the connection's outbound queue to the socket, coalescing what is
//! queued into one flush, and sends heartbeat pings. The reader watches for
//! idleness, frames over the limit and shutdown; it tells the writer how to
//! close through a oneshot. The core closes a slow consumer through the
//! queue's close signal.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use confab_core::{ChatError, CloseReason, ConnReceiver, Outbound, Session};
use confab_proto::{json, Event, Limits};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admission::Admitted;
use crate::metrics::Transport;
use crate::proxy::Client;
use crate::{encode, unless_evicted, App, SLOW_CONSUMER_GRACE};

/// Close codes of the contract.
pub mod close {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Service restart: connect again.
    pub const RECONNECT: u16 = 1012;
    pub const ABUSE: u16 = 4029;
}

/// The WebSocket read and write buffer size.
const IO_BUFFER: usize = 4096;

/// How long the socket stays open after a 1009 close. The oversized frame's
/// bytes are still unread (tungstenite refuses a frame by its header, which
/// is what keeps memory bounded), and closing a socket with unread input
/// sends a TCP reset that makes the peer discard our close frame unread.
/// Lingering gives the client time to read it (nginx's lingering close).
const LINGER_AFTER_TOO_BIG: std::time::Duration = std::time::Duration::from_secs(1);

/// How the reader asks the writer to end the connection.
enum Ending {
    /// Drain the queue, send `shutdown`, close with 1001.
    Shutdown,
    /// Close with this code and reason.
    Close(u16, &'static str),
    /// The client went away: nothing more to send.
    Gone,
}

pub(crate) async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    State(app): State<Arc<App>>,
) -> Response {
    let unavailable = |why: &'static str| {
        let headers = [(header::RETRY_AFTER, "5")];
        (StatusCode::SERVICE_UNAVAILABLE, headers, why).into_response()
    };
    if app.draining.is_cancelled() {
        return unavailable("the server is shutting down");
    }
    let config = app.config();
    let client = Client::behind(peer, &headers, &config.trusted_proxies);
    let admitted = match app.admit(&config, client.ip) {
        Ok(admitted) => admitted,
        Err(full) => return unavailable(full.message()),
    };
    let max = config.max_frame_bytes;
    // tungstenite's default read and write buffers are 128 KiB each, most
    // of an idle connection's memory (145 KB measured). 4 KiB chunks cost
    // nothing in throughput: our writer flushes per batch, and frames up
    // to the limit still arrive whole.
    ws.read_buffer_size(IO_BUFFER)
        .write_buffer_size(IO_BUFFER)
        .max_frame_size(max)
        .max_message_size(max)
        .on_upgrade(move |socket| {
            let tracker = app.tasks.clone();
            tracker.track_future(connection(app, socket, client, admitted))
        })
}

async fn connection(app: Arc<App>, socket: WebSocket, client: Client, admitted: Admitted) {
    let (session, rx) = app.open(&app.config(), client.ip);
    let span = tracing::info_span!(
        "conn",
        id = rx.id.0,
        transport = "ws",
        peer = %client,
        proxy = client.via.map(tracing::field::display),
        user = tracing::field::Empty
    );
    run_connection(app, socket, session, rx, admitted)
        .instrument(span)
        .await;
}

async fn run_connection(
    app: Arc<App>,
    socket: WebSocket,
    session: Session,
    rx: ConnReceiver,
    _admitted: Admitted,
) {
    let _open = app.metrics.connection(Transport::Ws);
    tracing::debug!("connected");
    let (sink, stream) = socket.split();
    let (ending_tx, ending_rx) = oneshot::channel();
    let writer_gone = CancellationToken::new();
    // The writer logs under the connection's span too.
    let writer = tokio::spawn(
        write_loop(app.clone(), sink, rx, ending_rx, writer_gone.clone()).in_current_span(),
    );
    let (mut session, mut stream, ending) = read_loop(&app, session, stream, &writer_gone).await;
    // Sends still in flight are answered before the writer is told to end.
    session.settle().await;
    let handshake = matches!(ending, Ending::Shutdown | Ending::Close(close::POLICY, _));
    let _ = ending_tx.send(ending);
    let finish_reading = async {
        if handshake {
            closing_handshake(&mut stream).await;
        }
    };
    tokio::join!(session.close(), finish_reading);
    let _ = writer.await;
    tracing::debug!("disconnected");
}

/// After the server's close frame, read (and drop) what the client still
/// sends until its own close arrives, for at most a second: closing the
/// socket with unread input would reset the connection, and the client
/// could lose our close frame (RFC 6455 section 7.1.1).
async fn closing_handshake(stream: &mut SplitStream<WebSocket>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(frame)) = stream.next().await {
            if matches!(frame, WsMessage::Close(_)) {
                break;
            }
        }
    })
    .await;
}

async fn read_loop(
    app: &App,
    mut session: Session,
    mut stream: SplitStream<WebSocket>,
    writer_gone: &CancellationToken,
) -> (Session, SplitStream<WebSocket>, Ending) {
    // Two heartbeat intervals without a frame (or a pong) is a dead peer.
    let idle = app.config().heartbeat * 2;
    let login_deadline = tokio::time::Instant::now() + app.config().login_timeout;
    loop {
        // Biased: a request already received is served before a shutdown
        // is noticed, so requests in flight get their replies.
        let next = tokio::select! {
            biased;
            _ = tokio::time::sleep_until(login_deadline), if !session.logged_in() => {
                return (session, stream, Ending::Close(close::POLICY, "login timeout"));
            }
            _ = session.stored() => {
                session.answer().await;
                continue;
            }
            next = tokio::time::timeout(idle, stream.next()) => next,
            _ = app.draining.cancelled() => return (session, stream, Ending::Shutdown),
            _ = writer_gone.cancelled() => return (session, stream, Ending::Gone),
        };
        let frame = match next {
            Err(_) => {
                return (
                    session,
                    stream,
                    Ending::Close(close::POLICY, "idle timeout"),
                )
            }
            Ok(None) => return (session, stream, Ending::Gone),
            Ok(Some(Err(e))) => {
                let too_big = matches!(
                    e.into_inner().downcast_ref::<tungstenite::Error>(),
                    Some(tungstenite::Error::Capacity(_))
                );
                let ending = if too_big {
                    Ending::Close(close::TOO_BIG, "frame too large")
                } else {
                    Ending::Gone
                };
                return (session, stream, ending);
            }
            Ok(Some(Ok(frame))) => frame,
        };
        match frame {
            WsMessage::Text(text) => match json::decode_request(text.as_bytes()) {
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
            WsMessage::Binary(_) => {
                let e = ChatError::bad_request("binary frames are not accepted: send JSON text");
                session.refuse(None, e).await;
            }
            WsMessage::Close(_) => return (session, stream, Ending::Gone),
            // Pings are answered by the library; any frame proves liveness.
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
        }
    }
}

async fn write_loop(
    app: Arc<App>,
    mut sink: SplitSink<WebSocket, WsMessage>,
    mut rx: ConnReceiver,
    mut ending: oneshot::Receiver<Ending>,
    gone: CancellationToken,
) {
    let hello = Event::Hello {
        server: confab_proto::SERVER_NAME.into(),
        version: confab_proto::VERSION.into(),
        node: app.chat.node().to_owned(),
        heartbeat_ms: app.config().heartbeat.as_millis() as u64,
        limits: Limits {
            max_body_bytes: app.chat.config().max_body_bytes,
            max_frame_bytes: app.config().max_frame_bytes,
        },
    };
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + app.config().heartbeat,
        app.config().heartbeat,
    );
    let closer = rx.closer();
    let stall = app.config().write_stall;
    let hello = text(json::encode_event(&hello));
    let mut written = unless_evicted(&closer, stall, sink.send(hello)).await;
    while let Some(Ok(())) = written {
        // Biased: the reader sends its ending before the session (and so
        // the queue) goes away, and the ending must win over the queue's end.
        written = tokio::select! {
            biased;
            _ = closer.closed() => None,
            end = &mut ending => {
                match end.unwrap_or(Ending::Gone) {
                    Ending::Gone => {}
                    Ending::Close(code, reason) => {
                        let _ = close_with(&mut sink, code, reason).await;
                        if code == close::TOO_BIG {
                            tokio::time::sleep(LINGER_AFTER_TOO_BIG).await;
                        }
                    }
                    Ending::Shutdown => {
                        let _ = drain_and_shut_down(&app, &mut sink, &mut rx).await;
                    }
                }
                break;
            }
            item = rx.recv() => match item {
                Some(item) => {
                    let batch = write_batch(&app, &mut sink, &mut rx, item);
                    unless_evicted(&closer, stall, batch).await
                }
                None => break,
            },
            _ = ping.tick() => {
                unless_evicted(&closer, stall, sink.send(WsMessage::Ping(Bytes::new()))).await
            }
        };
    }
    match rx.reason() {
        Some(CloseReason::Kicked) => {
            tracing::info!("disconnected by an administrator");
            gone.cancel();
            let last = close_with(&mut sink, close::POLICY, "disconnected by an administrator");
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, last).await;
        }
        Some(CloseReason::Stale) => {
            tracing::info!("closing a session the cluster lost");
            gone.cancel();
            let last = close_with(&mut sink, close::RECONNECT, crate::STALE_SESSION);
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, last).await;
        }
        Some(CloseReason::SlowConsumer) => {
            app.metrics.evicted(Transport::Ws);
            tracing::info!("closing a slow consumer");
            // Let the session go first: the close frame may wait for room.
            gone.cancel();
            let last = close_with(&mut sink, close::SLOW_CONSUMER, "slow consumer");
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, last).await;
        }
        Some(CloseReason::Abuse) => {
            tracing::info!("closing a connection that kept flooding");
            gone.cancel();
            let last = async {
                while let Some(item) = rx.try_recv() {
                    sink.feed(text(encode(&app, Transport::Ws, item))).await?;
                }
                close_with(&mut sink, close::ABUSE, "rate limit abuse").await
            };
            let _ = tokio::time::timeout(SLOW_CONSUMER_GRACE, last).await;
        }
        None => {}
    }
    gone.cancel();
}

/// Write `first` and whatever else is queued now, then flush once.
async fn write_batch(
    app: &App,
    sink: &mut SplitSink<WebSocket, WsMessage>,
    rx: &mut ConnReceiver,
    first: Outbound,
) -> Result<(), axum::Error> {
    sink.feed(text(encode(app, Transport::Ws, first))).await?;
    while let Some(item) = rx.try_recv() {
        sink.feed(text(encode(app, Transport::Ws, item))).await?;
    }
    sink.flush().await
}

async fn drain_and_shut_down(
    app: &App,
    sink: &mut SplitSink<WebSocket, WsMessage>,
    rx: &mut ConnReceiver,
) -> Result<(), axum::Error> {
    while let Some(item) = rx.try_recv() {
        sink.feed(text(encode(app, Transport::Ws, item))).await?;
    }
    let notice = Event::Shutdown {
        reason: "the server is shutting down".into(),
        reconnect_ms: app.config().reconnect_ms,
    };
    sink.feed(text(json::encode_event(&notice))).await?;
    close_with(sink, close::GOING_AWAY, "server shutting down").await
}

async fn close_with(
    sink: &mut SplitSink<WebSocket, WsMessage>,
    code: u16,
    reason: &'static str,
) -> Result<(), axum::Error> {
    sink.send(WsMessage::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    })))
    .await
}

fn text(bytes: Bytes) -> WsMessage {
    // Our encoder writes JSON, which is always UTF-8; the check is a copy-free scan.
    WsMessage::Text(Utf8Bytes::try_from(bytes).expect("JSON is UTF-8"))
}

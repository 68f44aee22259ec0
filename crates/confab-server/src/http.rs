//! The HTTP listener: our own accept loop, for what `axum::serve` does not
//! offer: a deadline for the request headers (so a connection that opens
//! and says nothing costs a task for `handshake_timeout` at most), the peer
//! address for every request, a graceful drain, and WebSocket connections
//! without hyper: the first request's head is read here, and an upgrade to
//! WebSocket is answered here and driven in the same task (about a fifth of
//! the server's time per connection was hyper's and a second task's). Every
//! other request goes to hyper and the router, with the bytes read so far.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::through::SharedTcp;
use crate::{driver, ws, App};

/// How long accepting waits after an error (out of descriptors, say).
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Accept HTTP connections until the server drains.
pub(crate) async fn serve(app: Arc<App>, listener: TcpListener, router: Router) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = app.draining.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let router = router.clone();
        app.tasks.clone().spawn(async move {
            // Boxed, and gone once done: what opening a connection holds
            // (TLS, the request, hyper for plain HTTP) is not kept for as
            // long as a WebSocket connection lives.
            if let Some(websocket) = Box::pin(connection(app, router, stream, peer)).await {
                websocket.await;
            }
        });
    }
}

/// Serve a connection's HTTP requests; a WebSocket upgrade in its first
/// request is returned to run instead.
async fn connection(
    app: Arc<App>,
    router: Router,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<driver::Opened> {
    match &app.tls {
        None => {
            let stream = SharedTcp::<ws::WebSocket>::new(stream, app.clone());
            serve_connection(&app, router, stream, peer).await
        }
        Some(tls) => {
            let handshake = tls.acceptor.accept(stream);
            match tokio::time::timeout(app.config().handshake_timeout, handshake).await {
                Ok(Ok(stream)) => serve_connection(&app, router, stream, peer).await,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    None
                }
            }
        }
    }
}

/// What the first request's head says.
enum First {
    /// A WebSocket upgrade, accepted; the bytes after the head.
    Upgrade(ws::Accepted, BytesMut),
    /// Anything else, for hyper: the bytes read so far.
    Http(Bytes),
    /// Closed, or silent past the deadline, before a whole head.
    Gone,
}

/// The longest request head read here; a longer one goes to hyper, which
/// has its own limit.
const MAX_HEAD: usize = 16 * 1024;
/// Headers parsed here at most (more go to hyper).
const MAX_HEADERS: usize = 32;

/// Read the first request's head and see whether it upgrades to WebSocket
/// ([`ws::first_request`]).
async fn first<S: AsyncRead + Unpin>(app: &App, stream: &mut S, peer: SocketAddr) -> First {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return First::Gone,
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                return match ws::first_request(app, peer, &request) {
                    Some(accepted) => First::Upgrade(accepted, buf.split_off(len)),
                    None => First::Http(buf.freeze()),
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            // Too long, too many headers, or not HTTP: hyper answers it.
            _ => return First::Http(buf.freeze()),
        }
    }
}

async fn serve_connection<S>(
    app: &Arc<App>,
    router: Router,
    mut stream: S,
    peer: SocketAddr,
) -> Option<driver::Opened>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let config = app.config();
    let head = tokio::select! {
        head = tokio::time::timeout(config.handshake_timeout, first(app, &mut stream, peer)) => {
            head.unwrap_or(First::Gone)
        }
        _ = app.draining.cancelled() => First::Gone,
    };
    match head {
        First::Upgrade(accepted, rest) => {
            Some(Box::pin(ws::upgraded(app.clone(), stream, accepted, rest)))
        }
        First::Http(read) => {
            serve_http(app, router, Rewind { read, io: stream }, peer).await;
            None
        }
        First::Gone => {
            tracing::debug!(%peer, "closed or silent before a whole request");
            None
        }
    }
}

async fn serve_http<S>(app: &App, router: Router, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        async move { router.call(request).await }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(app.config().handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = app.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// A stream that first gives back bytes already read from it.
struct Rewind<S> {
    read: Bytes,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.read.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

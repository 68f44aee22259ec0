//! The HTTP listener: our own accept loop on hyper, for what `axum::serve`
//! does not offer: a deadline for the request headers (so a connection that
//! opens and says nothing costs a task for `handshake_timeout` at most),
//! the peer address for every request, and a graceful drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower_service::Service;

use crate::App;

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
        app.tasks
            .spawn(connection(app.clone(), router.clone(), stream, peer));
    }
}

async fn connection(app: Arc<App>, router: Router, stream: TcpStream, peer: SocketAddr) {
    match &app.tls {
        None => serve_connection(&app, router, stream, peer).await,
        Some(tls) => {
            let handshake = tls.acceptor.accept(stream);
            match tokio::time::timeout(app.config().handshake_timeout, handshake).await {
                Ok(Ok(stream)) => serve_connection(&app, router, stream, peer).await,
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        }
    }
}

async fn serve_connection<S>(app: &App, router: Router, stream: S, peer: SocketAddr)
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

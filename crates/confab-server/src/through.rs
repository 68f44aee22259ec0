//! Write-through on plain TCP (see `confab_core::conn`): the socket is
//! shared between the connection's driver, which reads and writes it as
//! any stream, and the connection's queue, through which a publisher's
//! thread writes events to it at the end of its turn. TLS streams need
//! `&mut` to write, so they do not take part.

use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use confab_core::conn::{Batch, WriteThrough};
use confab_core::Outbound;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::driver::{put_on_the_wire, Protocol};
use crate::App;

/// A TCP stream that a connection's queue can write to as well, for a
/// connection speaking `P`: one allocation holds the socket and what the
/// queue needs to write to it (a connection that stays idle pays for it).
pub(crate) struct SharedTcp<P>(Arc<Socket<P>>);

struct Socket<P> {
    stream: TcpStream,
    app: Arc<App>,
    protocol: PhantomData<fn() -> P>,
}

impl<P: Protocol> SharedTcp<P> {
    pub(crate) fn new(stream: TcpStream, app: Arc<App>) -> Self {
        SharedTcp(Arc::new(Socket {
            stream,
            app,
            protocol: PhantomData,
        }))
    }

    /// Write-through to this socket.
    pub(crate) fn through(&self) -> Arc<dyn WriteThrough> {
        self.0.clone()
    }
}

impl<P> AsyncRead for SharedTcp<P> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &self.0.stream;
        loop {
            ready!(stream.poll_read_ready(cx))?;
            match stream.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                done => return Poll::Ready(done.map(drop)),
            }
        }
    }
}

impl<P> AsyncWrite for SharedTcp<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_written(&self.0.stream, cx, |stream| stream.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        poll_written(&self.0.stream, cx, |stream| stream.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Shut down the sending side (the queue may still hold the socket).
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let socket = socket2::SockRef::from(&self.0.stream);
        Poll::Ready(socket.shutdown(std::net::Shutdown::Write))
    }
}

/// Wait until `stream` is writable and `write` takes something (a
/// readiness that turns out stale is waited for again).
fn poll_written(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut write: impl FnMut(&TcpStream) -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_write_ready(cx))?;
        match write(stream) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            done => return Poll::Ready(done),
        }
    }
}

impl<P: Protocol> WriteThrough for Socket<P> {
    fn encode(&self, item: &Outbound, out: &mut Vec<u8>) {
        put_on_the_wire::<P>(item, out);
    }

    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self.stream.try_write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            done => done,
        }
    }

    fn written(&self, items: &Batch) {
        self.app.metrics.delivered(P::TRANSPORT, items.iter());
    }
}

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
use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
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
            let wanted = buf.remaining();
            let mut read = 0;
            let outcome = stream.try_io(Interest::READABLE, || {
                // SAFETY: `recv` only writes into what it is given.
                let unfilled = unsafe { buf.unfilled_mut() };
                read = SockRef::from(stream).recv(unfilled)?;
                // SAFETY: `recv` initialised the first `read` bytes.
                unsafe { buf.assume_init(read) };
                buf.advance(read);
                match read > 0 && read < wanted && DRAINED_BY_A_SHORT_READ {
                    // The socket is drained: the readiness goes with it (the
                    // error clears it, and the bytes are returned below), so
                    // that the next poll waits for the next event instead of
                    // finding nothing with a `recv` of its own.
                    true => Err(io::ErrorKind::WouldBlock.into()),
                    false => Ok(()),
                }
            });
            match outcome {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && read == 0 => continue,
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Poll::Ready(Err(e)),
                _ => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// Whether a read that leaves room in its buffer shows the socket
/// drained: it does with edge-triggered epoll, which wakes a socket again
/// for anything that arrives after that read, as tokio's own streams rely
/// on (and an end of stream stays ready: tokio never clears a closed
/// state). Elsewhere a read goes on until it would block.
const DRAINED_BY_A_SHORT_READ: bool = cfg!(target_os = "linux");

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::ws::WebSocket;

    async fn pair() -> (TcpStream, SharedTcp<WebSocket>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        (peer, SharedTcp::new(stream, crate::test_app().await))
    }

    /// Whether a read would wait, found with one poll.
    fn waits(shared: &mut SharedTcp<WebSocket>) -> bool {
        let mut room = [0u8; 64];
        let mut buf = ReadBuf::new(&mut room);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        Pin::new(shared).poll_read(&mut cx, &mut buf).is_pending()
    }

    /// A read that leaves room in its buffer takes the socket's readiness
    /// with it: what arrives after it still wakes the reader, and so does
    /// the end of the stream, also when it comes with the last bytes.
    #[tokio::test]
    async fn a_short_read_misses_nothing_that_comes_after_it() {
        let (mut peer, mut shared) = pair().await;
        let mut buf = [0u8; 64];
        let mut read = async |shared: &mut SharedTcp<WebSocket>| {
            let n = tokio::time::timeout(Duration::from_secs(10), shared.read(&mut buf))
                .await
                .expect("the reader was woken")
                .unwrap();
            buf[..n].to_vec()
        };
        peer.write_all(b"first").await.unwrap();
        assert_eq!(read(&mut shared).await, b"first");
        assert!(waits(&mut shared), "nothing is there: a read waits");
        peer.write_all(b"second").await.unwrap();
        assert_eq!(read(&mut shared).await, b"second");
        // The last bytes and the end together: both reach the reader.
        peer.write_all(b"last").await.unwrap();
        peer.shutdown().await.unwrap();
        assert_eq!(read(&mut shared).await, b"last");
        assert_eq!(
            read(&mut shared).await,
            b"",
            "the end is read after a short read"
        );
    }

    /// A read given a full buffer's worth leaves the rest for the next.
    #[tokio::test]
    async fn a_full_read_leaves_the_rest_ready() {
        let (mut peer, mut shared) = pair().await;
        peer.write_all(&[7u8; 100]).await.unwrap();
        let mut first = [0u8; 60];
        shared.read_exact(&mut first).await.unwrap();
        let mut rest = [0u8; 64];
        let n = shared.read(&mut rest).await.unwrap();
        assert_eq!(n, 40);
        assert!(rest[..n].iter().all(|&b| b == 7));
    }
}

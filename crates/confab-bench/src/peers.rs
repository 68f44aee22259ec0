//! The peers a user might pick instead, spoken to directly: NATS core
//! (`SUB`/`PUB`/`MSG`) and Redis pub/sub (`SUBSCRIBE`/`PUBLISH`). Just what
//! the fan-out scenario needs; no persistence on either side.

use std::net::SocketAddr;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub enum Reader {
    Nats(BufReader<OwnedReadHalf>),
    Redis(BufReader<OwnedReadHalf>),
}

async fn line(r: &mut BufReader<OwnedReadHalf>, buf: &mut String) -> anyhow::Result<()> {
    buf.clear();
    if r.read_line(buf).await? == 0 {
        bail!("the peer closed the connection");
    }
    Ok(())
}

/// A NATS connection: (reader, writer) after CONNECT.
pub async fn nats(addr: SocketAddr) -> anyhow::Result<(Reader, OwnedWriteHalf)> {
    let stream = TcpStream::connect(addr)
        .await
        .context("connecting to NATS")?;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut buf = String::new();
    line(&mut r, &mut buf).await?; // INFO
    w.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")
        .await?;
    Ok((Reader::Nats(r), w))
}

/// A Redis connection: (reader, writer).
pub async fn redis(addr: SocketAddr) -> anyhow::Result<(Reader, OwnedWriteHalf)> {
    let stream = TcpStream::connect(addr)
        .await
        .context("connecting to Redis")?;
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    Ok((Reader::Redis(BufReader::with_capacity(64 * 1024, r)), w))
}

/// Subscribe to `subject` (NATS) or `channel` (Redis).
pub async fn subscribe(
    reader: &mut Reader,
    w: &mut OwnedWriteHalf,
    name: &str,
) -> anyhow::Result<()> {
    match reader {
        Reader::Nats(r) => {
            w.write_all(format!("SUB {name} 1\r\nPING\r\n").as_bytes())
                .await?;
            let mut buf = String::new();
            loop {
                line(r, &mut buf).await?;
                if buf.starts_with("PONG") {
                    return Ok(());
                }
            }
        }
        Reader::Redis(_) => {
            let cmd = format!("*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{name}\r\n", name.len());
            w.write_all(cmd.as_bytes()).await?;
            // The confirmation arrives as a push; `next` skips it.
            Ok(())
        }
    }
}

/// One publish, written (not flushed separately: the writer is unbuffered).
pub fn publish_frame(nats: bool, name: &str, payload: &str) -> Vec<u8> {
    if nats {
        format!("PUB {name} {}\r\n{payload}\r\n", payload.len()).into_bytes()
    } else {
        format!(
            "*3\r\n$7\r\nPUBLISH\r\n${}\r\n{name}\r\n${}\r\n{payload}\r\n",
            name.len(),
            payload.len()
        )
        .into_bytes()
    }
}

impl Reader {
    /// The next delivered payload; `None` at the end of the stream.
    pub async fn next(&mut self) -> anyhow::Result<Option<String>> {
        let mut buf = String::new();
        match self {
            Reader::Nats(r) => loop {
                buf.clear();
                if r.read_line(&mut buf).await? == 0 {
                    return Ok(None);
                }
                if let Some(rest) = buf.strip_prefix("MSG ") {
                    let size: usize = rest
                        .split_whitespace()
                        .last()
                        .context("MSG size")?
                        .parse()?;
                    let mut payload = vec![0; size + 2];
                    r.read_exact(&mut payload).await?;
                    payload.truncate(size);
                    return Ok(Some(String::from_utf8(payload)?));
                }
                if buf.starts_with("PING") {
                    // Answered by the publisher side; subscribers only read.
                    continue;
                }
            },
            Reader::Redis(r) => loop {
                // A push: *3 $7 message $N channel $M payload (or subscribe).
                buf.clear();
                if r.read_line(&mut buf).await? == 0 {
                    return Ok(None);
                }
                if !buf.starts_with('*') {
                    continue;
                }
                let mut parts = Vec::new();
                let n: usize = buf[1..].trim().parse()?;
                for _ in 0..n {
                    buf.clear();
                    r.read_line(&mut buf).await?;
                    if let Some(len) = buf.strip_prefix('$') {
                        let len: usize = len.trim().parse()?;
                        let mut data = vec![0; len + 2];
                        r.read_exact(&mut data).await?;
                        data.truncate(len);
                        parts.push(String::from_utf8(data)?);
                    } else {
                        parts.push(buf.trim().to_owned());
                    }
                }
                if parts.first().map(String::as_str) == Some("message") && parts.len() == 3 {
                    return Ok(parts.pop());
                }
            },
        }
    }
}

//! A lean Confab WebSocket client for load: requests are written as JSON
//! text, and the hot path (message events) is read without a JSON parse.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// A TCP connection from `source` (a loopback address) to `addr`.
async fn tcp(addr: SocketAddr, source: IpAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(source, 0))
        .context("binding a source address")?;
    let stream = socket.connect(addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connect from `source` (a loopback address) to the server at `addr`, and
/// read the `hello`.
pub async fn connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<Ws> {
    let stream = tcp(addr, source).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .context("WebSocket upgrade")?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.contains("\"hello\"") => Ok(ws),
        other => bail!("expected hello, got {other:?}"),
    }
}

/// Send a request and wait for its reply (skipping events); errors become `Err`.
pub async fn call(ws: &mut Ws, mut request: Value) -> anyhow::Result<Value> {
    request["id"] = json!("c");
    ws.send(Message::text(request.to_string())).await?;
    while let Some(frame) = ws.next().await {
        if let Message::Text(t) = frame? {
            let v: Value = serde_json::from_str(&t)?;
            if v["id"] == "c" {
                if v["type"] == "error" {
                    bail!("{}: {}", v["code"], v["message"]);
                }
                return Ok(v);
            }
        }
    }
    bail!("the connection closed")
}

/// The body of a `message` event, without parsing the whole frame: the
/// bench writes bodies without quotes or escapes.
pub fn message_body(frame: &str) -> Option<&str> {
    if !frame.starts_with("{\"type\":\"message\"") {
        return None;
    }
    let start = frame.find("\"body\":\"")? + 8;
    let len = frame[start..].find('"')?;
    Some(&frame[start..start + len])
}

/// The `seq` of a `message` event.
pub fn message_seq(frame: &str) -> Option<u64> {
    let start = frame.find("\"seq\":")? + 6;
    let digits = frame[start..].find(|c: char| !c.is_ascii_digit())?;
    frame[start..start + digits].parse().ok()
}

pub fn split(ws: Ws) -> (SplitSink<Ws, Message>, SplitStream<Ws>) {
    ws.split()
}

/// A WebSocket client without tungstenite, for the fan-out's many
/// subscribers: the upgrade written by hand, frames read straight from a
/// buffered socket (the server's frames are unmasked and whole), so that
/// reading a Confab event costs the load generator about what reading a
/// Redis or NATS message costs it (`peers`): the same harness for all.
pub struct Lean {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
    payload: Vec<u8>,
}

/// A frame the [`Lean`] client reads.
pub enum LeanFrame<'a> {
    Text(&'a str),
    /// The server closed the connection (or sent a close frame).
    Closed,
}

impl Lean {
    /// Connect from `source` to the server at `addr`, upgrade, and read
    /// the `hello`.
    pub async fn connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<Lean> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let (r, mut writer) = tcp(addr, source).await?.into_split();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        writer.write_all(request.as_bytes()).await?;
        let mut reader = tokio::io::BufReader::with_capacity(16 * 1024, r);
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        if !line.starts_with("HTTP/1.1 101") {
            bail!("WebSocket upgrade refused: {}", line.trim_end());
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).await? == 0 {
                bail!("the connection closed during the upgrade");
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut lean = Lean {
            reader,
            writer,
            payload: Vec::new(),
        };
        match lean.next().await? {
            LeanFrame::Text(t) if t.contains("\"hello\"") => Ok(lean),
            LeanFrame::Text(t) => bail!("expected hello, got {t}"),
            LeanFrame::Closed => bail!("closed before hello"),
        }
    }

    /// Send one text frame (masked, as a client must; the key is zero,
    /// which leaves the payload as it is).
    pub async fn send(&mut self, text: &str) -> anyhow::Result<()> {
        self.write_frame(0x1, text.as_bytes()).await
    }

    async fn write_frame(&mut self, opcode: u8, payload: &[u8]) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut frame = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= usize::from(u16::MAX) => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(payload);
        self.writer.write_all(&frame).await?;
        Ok(())
    }

    /// The next text frame; pings are answered on the way. Not
    /// cancel-safe (a frame half read is lost): stop reading for good.
    pub async fn next(&mut self) -> anyhow::Result<LeanFrame<'_>> {
        use tokio::io::AsyncReadExt;
        loop {
            let mut head = [0u8; 2];
            if self.reader.read_exact(&mut head).await.is_err() {
                return Ok(LeanFrame::Closed);
            }
            let len = match head[1] & 0x7F {
                126 => u64::from(self.reader.read_u16().await?),
                127 => self.reader.read_u64().await?,
                n => u64::from(n),
            };
            self.payload.resize(len as usize, 0);
            self.reader.read_exact(&mut self.payload).await?;
            match head[0] & 0x0F {
                0x1 => break,
                0x8 => return Ok(LeanFrame::Closed),
                0x9 => {
                    let ping = std::mem::take(&mut self.payload);
                    self.write_frame(0xA, &ping).await?;
                }
                _ => {}
            }
        }
        Ok(LeanFrame::Text(std::str::from_utf8(&self.payload)?))
    }

    /// Close as a client does: a close frame, then the end of the stream.
    pub async fn close(mut self) -> anyhow::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.write_frame(0x8, &1000u16.to_be_bytes()).await?;
        self.writer.shutdown().await?;
        Ok(())
    }

    /// Send a request and wait for its reply (skipping events); errors
    /// become `Err`.
    pub async fn call(&mut self, mut request: Value) -> anyhow::Result<Value> {
        request["id"] = json!("c");
        self.send(&request.to_string()).await?;
        loop {
            match self.next().await? {
                LeanFrame::Text(t) => {
                    if !t.contains("\"id\":\"c\"") {
                        continue;
                    }
                    let v: Value = serde_json::from_str(t)?;
                    if v["id"] == "c" {
                        if v["type"] == "error" {
                            bail!("{}: {}", v["code"], v["message"]);
                        }
                        return Ok(v);
                    }
                }
                LeanFrame::Closed => bail!("the connection closed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server frame: final, unmasked.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test]
    async fn lean_client_upgrades_answers_pings_and_reads_text() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut request = vec![0; 4096];
            let n = s.read(&mut request).await.unwrap();
            assert!(request[..n].starts_with(b"GET /ws HTTP/1.1\r\n"));
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
                .await
                .unwrap();
            s.write_all(&frame(0x1, br#"{"type":"hello"}"#))
                .await
                .unwrap();
            s.write_all(&frame(0x9, b"hb")).await.unwrap();
            s.write_all(&frame(0x1, br#"{"type":"message"}"#))
                .await
                .unwrap();
            // The pong: masked (with a zero key), carrying the ping's payload.
            let mut pong = [0u8; 8];
            s.read_exact(&mut pong).await.unwrap();
            assert_eq!(pong, [0x8A, 0x82, 0, 0, 0, 0, b'h', b'b']);
            s.write_all(&frame(0x8, &1000u16.to_be_bytes()))
                .await
                .unwrap();
        });
        let mut lean = Lean::connect(addr, "127.0.0.1".parse().unwrap())
            .await
            .unwrap();
        match lean.next().await.unwrap() {
            LeanFrame::Text(t) => assert_eq!(t, r#"{"type":"message"}"#),
            LeanFrame::Closed => panic!("closed early"),
        }
        assert!(matches!(lean.next().await.unwrap(), LeanFrame::Closed));
        server.await.unwrap();
    }
}

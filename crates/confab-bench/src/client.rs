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

/// Connect from `source` (a loopback address) to the server at `addr`, and
/// read the `hello`.
pub async fn connect(addr: SocketAddr, source: IpAddr) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(source, 0))
        .context("binding a source address")?;
    let stream = socket.connect(addr).await.context("connecting")?;
    stream.set_nodelay(true)?;
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

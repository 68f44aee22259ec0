//! The real `confab` binary under load: SIGTERM and SIGKILL in the middle of
//! a stream of sends, a restart, and an audit of every acknowledgement.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Confab;
use confab_store_postgres::testing::TestSchema;
use confab_testkit::serde_json::{json, Value};
use confab_testkit::tokio_tungstenite::tungstenite::Message;
use confab_testkit::{Store, WsClient};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::watch;

type Acks = Arc<Mutex<Vec<(u64, String)>>>;

/// Send numbered messages until the connection dies, honouring rate limits
/// as a real client does; record every acknowledgement.
async fn sender(url: String, name: String, acks: Acks, started: watch::Sender<usize>) {
    let Ok((mut ws, _)) = confab_testkit::tokio_tungstenite::connect_async(&url).await else {
        return;
    };
    let mut id = 0u64;
    let mut call = async |ws: &mut _, request: Value| -> Option<Value> {
        let ws: &mut confab_testkit::tokio_tungstenite::WebSocketStream<_> = ws;
        id += 1;
        let mut request = request;
        request["id"] = json!(id);
        ws.send(Message::text(request.to_string())).await.ok()?;
        loop {
            let Some(Ok(Message::Text(text))) = ws.next().await else {
                return None;
            };
            let frame: Value = confab_testkit::serde_json::from_str(&text).ok()?;
            if frame["id"] == json!(id) {
                return Some(frame);
            }
        }
    };
    call(&mut ws, json!({"type":"guest","user":name})).await;
    call(&mut ws, json!({"type":"join","room":"load"})).await;
    let mut n = 0;
    loop {
        let body = format!("{name}-{n}");
        let request = json!({"type":"send","room":"load","body":body,"nonce":body});
        let Some(reply) = call(&mut ws, request).await else {
            return;
        };
        match reply["type"].as_str() {
            Some("ok") => {
                let mut acks = acks.lock().unwrap();
                acks.push((reply["seq"].as_u64().unwrap(), body));
                started.send_replace(acks.len());
                n += 1;
            }
            _ if reply["code"] == "rate_limited" => {
                let wait = reply["retry_after_ms"].as_u64().unwrap_or(10);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            // Shutting down or unavailable: stop like a client would.
            _ => return,
        }
    }
}

/// Start load on `store`, let `signal` hit the server once 300 messages
/// were acknowledged, restart, and audit.
async fn load_then(store: Store, signal: i32, expect_clean_exit: bool) {
    let dir = tempfile::tempdir().unwrap();
    let schema = match store {
        Store::Sqlite => None,
        Store::Postgres => TestSchema::create().await,
    };
    let db = match &schema {
        None => format!("sqlite://{}", dir.path().join("confab.db").display()),
        Some(schema) => schema.url.clone(),
    };
    let server = Confab::start(&db).await;
    let mut auditor = WsClient::connect(&server.url()).await;
    auditor.register("auditor").await;
    auditor.join("load").await;

    let acks: Acks = Arc::default();
    let (progress, mut watch_progress) = watch::channel(0);
    let senders: Vec<_> = (0..16)
        .map(|i| {
            tokio::spawn(sender(
                server.url(),
                format!("s{i}"),
                acks.clone(),
                progress.clone(),
            ))
        })
        .collect();
    watch_progress
        .wait_for(|n| *n >= 300)
        .await
        .expect("load started");
    server.signal(signal);
    let status = server.exit().await;
    if expect_clean_exit {
        assert_eq!(status.code(), Some(0), "a graceful exit: {status:?}");
    } else {
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(signal)
        );
    }
    for s in senders {
        s.await.unwrap();
    }
    drop(auditor);

    let server = Confab::start(&db).await;
    let mut auditor = WsClient::connect(&server.url()).await;
    auditor.login("auditor").await;
    let stored = auditor.whole_history("load").await;
    let acks = acks.lock().unwrap().clone();
    assert!(acks.len() >= 300);
    common::assert_holds_every_ack(&stored, &acks);
    let mut bodies: Vec<_> = stored.values().collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), stored.len(), "no message stored twice");
    drop(server);
}

async fn sigterm_under_load_loses_no_ack(store: Store) {
    load_then(store, libc::SIGTERM, true).await;
}

async fn sigkill_under_load_loses_no_ack(store: Store) {
    load_then(store, libc::SIGKILL, false).await;
}

confab_testkit::on_each_store!(
    sigterm_under_load_loses_no_ack,
    sigkill_under_load_loses_no_ack,
);

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("confab.db").display());
    let mut server = Confab::start(&db).await;
    // An HTTP request with half its headers sent keeps the drain busy until
    // the header deadline (10 s, past the 5 s grace): a second signal must
    // not wait for it.
    let mut half = tokio::net::TcpStream::connect(server.http).await.unwrap();
    use tokio::io::AsyncWriteExt;
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let (_silent, _) = confab_testkit::tokio_tungstenite::connect_async(server.url())
        .await
        .unwrap();
    server.signal(libc::SIGTERM);
    server.log("shutting down").await;
    server.signal(libc::SIGTERM);
    let started = std::time::Instant::now();
    assert_eq!(server.exit().await.code(), Some(130));
    assert!(started.elapsed() < Duration::from_secs(4), "exited at once");
}

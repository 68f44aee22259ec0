//! TLS on both listeners, and reloading the certificate without dropping
//! anyone.

use confab_testkit::serde_json::json;
use confab_testkit::{LineClient, TestCert, TestServer, WsClient};

async fn tls_server() -> (TestServer, TestCert, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cert = TestCert::new(dir.path(), "first");
    let files = cert.files.clone();
    let server = TestServer::with_config(move |c| c.tls = Some(files)).await;
    (server, cert, dir)
}

async fn wss(server: &TestServer, cert: &TestCert) -> (WsClient, Vec<u8>) {
    let (stream, presented) = cert.connect(server.addr).await;
    let url = format!("wss://localhost:{}/ws", server.addr.port());
    (WsClient::upgrade(&url, stream).await, presented)
}

#[tokio::test]
async fn websocket_and_line_over_tls() {
    let (server, cert, _dir) = tls_server().await;
    let (mut web, presented) = wss(&server, &cert).await;
    assert_eq!(presented, cert.der);
    web.register("secure").await;
    web.join("vault").await;

    let (stream, _) = cert.connect(server.line_addr).await;
    let mut line = LineClient::over(stream).await;
    assert!(line.greeting.starts_with("* welcome to confab"));
    line.say("/nick lineuser").await;
    line.say("/join vault").await;
    assert_eq!(web.event_of("joined").await["user"], "lineuser");
    line.say("over tls").await;
    assert_eq!(web.event_of("message").await["body"], "over tls");
    web.send("vault", "back over tls").await;
    assert_eq!(line.pending().await, ["[vault #2] secure: back over tls"]);

    // Plain TCP is not served on a TLS listener.
    let mut plain = tokio::net::TcpStream::connect(server.line_addr)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain.write_all(b"/nick plain\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("welcome"));
}

#[tokio::test]
async fn a_reload_changes_the_certificate_for_new_connections_only() {
    let (server, first, _dir) = tls_server().await;
    let (mut old_ws, presented) = wss(&server, &first).await;
    assert_eq!(presented, first.der);
    old_ws.guest("stayer").await;
    old_ws.join("r").await;
    let (old_line_stream, _) = first.connect(server.line_addr).await;
    let mut old_line = LineClient::over(old_line_stream).await;
    old_line.say("/nick oldline").await;
    old_line.say("/join r").await;
    old_ws.event_of("joined").await;

    let dir = first.files.cert.parent().unwrap().to_path_buf();
    let second = TestCert::new(&dir, "second");
    second.install_at(&first.files);
    server.reload().await.expect("the reload works");

    // New connections get the new certificate (and trust only it).
    let (mut new_ws, presented) = wss(&server, &second).await;
    assert_eq!(presented, second.der);
    new_ws.guest("newcomer").await;
    let (_, presented) = second.connect(server.line_addr).await;
    assert_eq!(presented, second.der);

    // Open connections were not dropped.
    old_ws.send("r", "still here").await;
    assert_eq!(old_ws.event_of("message").await["body"], "still here");
    assert_eq!(old_line.pending().await, ["[r #1] stayer: still here"]);
    assert_eq!(old_ws.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn a_broken_reload_keeps_the_certificate_in_use() {
    let (server, first, _dir) = tls_server().await;
    std::fs::write(&first.files.key, "not a key").unwrap();
    let err = server.reload().await.unwrap_err();
    assert!(err.to_string().contains("TLS"), "{err}");
    let (_, presented) = first.connect(server.addr).await;
    assert_eq!(presented, first.der, "still the first certificate");
}

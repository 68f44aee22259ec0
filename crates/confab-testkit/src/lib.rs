//! Test helpers: [`TestServer`] runs a real Confab server in-process on
//! `127.0.0.1:0` with a temporary database; [`WsClient`] is a small
//! WebSocket client that pairs replies with requests and queues the events
//! that arrive in between; [`LineClient`] is a line-protocol client.
//!
//! Nothing here sleeps to wait: the server is ready when `spawn` returns
//! (the listener is bound before `run` starts), and every read has a
//! generous timeout that only fires when a test is about to fail anyway.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use confab_broker_redis::testing::Prefix;
use confab_server::{Config, Database, Server};
use confab_store_postgres::testing::TestSchema;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::WebSocketStream;

pub use confab_server;
pub use serde_json;
pub use tokio_tungstenite;
pub use tokio_tungstenite::tungstenite::Message;

/// How long any single read may take before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Which storage a test server runs on. Suites that must hold on every
/// backend take one and run once per backend ([`on_each_store!`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A file in a temporary directory.
    Sqlite,
    /// A schema of its own on the server `CONFAB_TEST_POSTGRES` names.
    Postgres,
}

impl Store {
    pub async fn spawn(self) -> TestServer {
        self.with_config(|_| {}).await
    }

    /// A server on this store whose configuration `tweak` adjusts.
    pub async fn with_config(self, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("temporary directory");
        let (database, schema) = match self {
            Store::Sqlite => (
                format!("sqlite://{}", dir.path().join("confab.db").display()),
                None,
            ),
            Store::Postgres => {
                let schema = TestSchema::create()
                    .await
                    .expect("CONFAB_TEST_POSTGRES names the test server");
                (schema.url.clone(), Some(schema))
            }
        };
        let mut config = Config {
            database: Database::parse(&database).expect("valid URL"),
            ..Config::default()
        };
        tweak(&mut config);
        TestServer::start(
            config,
            Arc::new(Data {
                dir,
                _schema: schema,
                _prefix: None,
            }),
        )
        .await
    }

    /// Whether the PostgreSQL runs are skipped (no `CONFAB_TEST_POSTGRES`);
    /// says so when they are.
    pub fn postgres_skipped() -> bool {
        let skipped = std::env::var_os(confab_store_postgres::testing::VAR).is_none();
        if skipped {
            eprintln!(
                "skipped: set {}=postgres://postgres@127.0.0.1:5432/postgres to run this on PostgreSQL",
                confab_store_postgres::testing::VAR
            );
        }
        skipped
    }
}

/// Turn `async fn NAME(store: Store)` test bodies into one `#[tokio::test]`
/// per store: `sqlite::NAME`, and `postgres::NAME` (skipped without
/// `CONFAB_TEST_POSTGRES`).
#[macro_export]
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name($crate::Store::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    if $crate::Store::postgres_skipped() {
                        return;
                    }
                    super::$name($crate::Store::Postgres).await
                }
            )*
        }
    };
}

/// What a test server's data lives in, kept across restarts.
struct Data {
    dir: tempfile::TempDir,
    /// Held for its drop, which drops the PostgreSQL schema.
    _schema: Option<TestSchema>,
    /// Held for its drop, which deletes the cluster's Redis keys.
    _prefix: Option<Prefix>,
}

/// Nodes of one cluster in this process: one fresh PostgreSQL schema, one
/// Redis key prefix, nodes named n0, n1, …
pub struct TestCluster {
    pub nodes: Vec<TestServer>,
    data: Arc<Data>,
    base: Config,
}

impl TestCluster {
    /// `n` nodes on the shared test Redis; `None` (having said so) when
    /// `CONFAB_TEST_POSTGRES` or `CONFAB_TEST_REDIS` is not set.
    pub async fn spawn(n: usize) -> Option<TestCluster> {
        let redis = confab_broker_redis::testing::shared_redis()?;
        Self::on(n, &redis, |_| {}).await
    }

    /// `n` nodes on the Redis at `redis`, each configured by `tweak`.
    pub async fn on(n: usize, redis: &str, tweak: impl Fn(&mut Config)) -> Option<TestCluster> {
        if Store::postgres_skipped() {
            return None;
        }
        let schema = TestSchema::create()
            .await
            .expect("CONFAB_TEST_POSTGRES names the test server");
        let prefix = Prefix::new(redis);
        let base = Config {
            database: Database::parse(&schema.url).expect("valid URL"),
            broker: Some(prefix.broker_url()),
            ..Config::default()
        };
        let data = Arc::new(Data {
            dir: tempfile::tempdir().expect("temporary directory"),
            _schema: Some(schema),
            _prefix: Some(prefix),
        });
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            data,
            base,
        };
        for i in 0..n {
            let mut config = cluster.base.clone();
            config.node = format!("n{i}");
            tweak(&mut config);
            let node = TestServer::start(config, cluster.data.clone()).await;
            cluster.nodes.push(node);
        }
        Some(cluster)
    }

    /// A connected client of node `i`.
    pub async fn client(&self, i: usize) -> WsClient {
        self.nodes[i].client().await
    }

    /// Start one more node, named `name`, in this cluster.
    pub async fn start_node(&self, name: &str) -> TestServer {
        let mut config = self.base.clone();
        config.node = name.to_owned();
        TestServer::start(config, self.data.clone()).await
    }
}

/// A running server and the directory holding its database.
pub struct TestServer {
    /// The HTTP and WebSocket listener.
    pub addr: SocketAddr,
    /// The line-protocol listener.
    pub line_addr: SocketAddr,
    pub config: Config,
    data: Arc<Data>,
    server: Server,
}

impl TestServer {
    pub async fn spawn() -> TestServer {
        Self::with_config(|_| {}).await
    }

    /// A server on SQLite whose configuration `tweak` adjusts.
    pub async fn with_config(tweak: impl FnOnce(&mut Config)) -> TestServer {
        Store::Sqlite.with_config(tweak).await
    }

    async fn start(config: Config, data: Arc<Data>) -> TestServer {
        let bind = || async {
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("binding port 0")
        };
        let (http, line) = (bind().await, bind().await);
        let addr = http.local_addr().expect("local address");
        let line_addr = line.local_addr().expect("local address");
        let listeners = confab_server::Listeners {
            http,
            line: Some(line),
        };
        let server = confab_server::start(config.clone(), listeners)
            .await
            .expect("the server starts");
        TestServer {
            addr,
            line_addr,
            config,
            data,
            server,
        }
    }

    /// The directory of the database (and of any files a test puts there).
    pub fn dir(&self) -> &std::path::Path {
        self.data.dir.path()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// A connected line client that has read the greeting.
    pub async fn line_client(&self) -> LineClient {
        LineClient::connect(self.line_addr).await
    }

    /// A connected client that has read the `hello`.
    pub async fn client(&self) -> WsClient {
        WsClient::connect(&self.ws_url()).await
    }

    /// Apply the configuration again, as SIGHUP does (re-reading the
    /// certificate files).
    pub async fn reload(&self) -> Result<(), confab_server::ServerError> {
        self.server.reload(self.config.clone()).await
    }

    /// Change the configuration while running, as SIGHUP does.
    pub async fn reload_with(
        &mut self,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<(), confab_server::ServerError> {
        tweak(&mut self.config);
        self.server.reload(self.config.clone()).await
    }

    /// Start a graceful shutdown without waiting for it.
    pub fn begin_shutdown(&self) {
        self.server.begin_shutdown();
    }

    /// Shut down gracefully and wait until the server has stopped.
    pub async fn stop(self) -> StoppedServer {
        self.server.begin_shutdown();
        self.server.wait().await.expect("a clean stop");
        StoppedServer {
            config: self.config,
            data: self.data,
        }
    }

    /// Stop, then start again on the same database (on new ports).
    pub async fn restart(self) -> TestServer {
        self.stop().await.start().await
    }
}

/// A server that stopped; its database is still there.
pub struct StoppedServer {
    config: Config,
    data: Arc<Data>,
}

impl StoppedServer {
    pub async fn start(self) -> TestServer {
        TestServer::start(self.config, self.data).await
    }
}

/// Any byte stream a client can run over: TCP, or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxedIo = Box<dyn Io>;

/// The WebSocket stream the clients use.
pub type Ws = WebSocketStream<BoxedIo>;

/// A WebSocket client for tests.
pub struct WsClient {
    ws: Ws,
    next_id: u64,
    /// Events that arrived while waiting for a reply.
    events: VecDeque<Value>,
    pub hello: Value,
}

impl WsClient {
    pub async fn connect(url: &str) -> WsClient {
        let addr = url
            .split("//")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("ws://HOST:PORT/...");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Self::upgrade(url, Box::new(tcp)).await
    }

    /// Upgrade an open stream (TCP or TLS) at `url`; reads the `hello`.
    pub async fn upgrade(url: &str, stream: BoxedIo) -> WsClient {
        let (ws, _) = tokio_tungstenite::client_async(url, stream)
            .await
            .expect("WebSocket upgrade");
        Self::over(ws).await
    }

    /// A client over an already upgraded WebSocket; reads the `hello`.
    pub async fn over(ws: Ws) -> WsClient {
        let mut client = WsClient {
            ws,
            next_id: 0,
            events: VecDeque::new(),
            hello: Value::Null,
        };
        client.hello = client.frame().await;
        assert_eq!(client.hello["type"], "hello", "first frame is hello");
        client
    }

    /// Send a raw WebSocket message.
    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// Send a JSON value as a text frame, as is.
    pub async fn send_json(&mut self, value: &Value) {
        self.send_raw(Message::text(value.to_string())).await;
    }

    /// The next JSON frame from the server (pings are answered and skipped).
    pub async fn frame(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(READ_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("connection ended")
                .expect("read error");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Send a request with a fresh id and return its reply; events that
    /// arrive first are kept for [`WsClient::event`].
    pub async fn request(&mut self, mut request: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        request["id"] = json!(id);
        self.send_json(&request).await;
        self.reply_to(json!(id)).await
    }

    /// Wait for the reply carrying `id`, queueing events meanwhile.
    pub async fn reply_to(&mut self, id: Value) -> Value {
        loop {
            let frame = self.frame().await;
            if is_reply(&frame) && frame.get("id") == Some(&id) {
                return frame;
            }
            assert!(
                !is_reply(&frame),
                "unexpected reply {frame} (waiting for id {id})"
            );
            self.events.push_back(frame);
        }
    }

    /// A request that must succeed; returns the `ok` reply.
    pub async fn ok(&mut self, request: Value) -> Value {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["type"], "ok", "{request} failed: {reply}");
        reply
    }

    /// A request that must fail; returns the error code.
    pub async fn error(&mut self, request: Value) -> String {
        let reply = self.request(request.clone()).await;
        assert_eq!(reply["type"], "error", "{request} should fail: {reply}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
        reply["code"].as_str().expect("error code").to_owned()
    }

    /// The next event (queued or arriving).
    pub async fn event(&mut self) -> Value {
        if let Some(e) = self.events.pop_front() {
            return e;
        }
        let frame = self.frame().await;
        assert!(!is_reply(&frame), "expected an event, got reply {frame}");
        frame
    }

    /// The next event, which must be of type `kind`.
    pub async fn event_of(&mut self, kind: &str) -> Value {
        let e = self.event().await;
        assert_eq!(e["type"], kind, "expected a {kind} event, got {e}");
        e
    }

    /// Whether an event matching `pred` has arrived (and is still queued).
    pub fn has_event(&self, pred: impl Fn(&Value) -> bool) -> bool {
        self.events.iter().any(pred)
    }

    /// Assert that no event is waiting, after a round trip that lets
    /// anything already queued for this client arrive.
    pub async fn assert_no_event(&mut self) {
        let pong = self.request(json!({"type": "ping"})).await;
        assert_eq!(pong["type"], "pong");
        assert!(
            self.events.is_empty(),
            "unexpected events: {:?}",
            self.events
        );
    }

    /// [`WsClient::closed`], or `None` when the connection was reset
    /// instead: a server that closes a socket with input it has not read
    /// (requests of a client it cut off) makes the kernel send a reset,
    /// which discards the close frame on its way.
    pub async fn closed_or_reset(&mut self) -> Option<(u16, String)> {
        self.close_frame().await.ok()
    }

    /// Read until the server closes; returns the close code and reason.
    /// Frames before the close are discarded.
    pub async fn closed(&mut self) -> (u16, String) {
        self.close_frame()
            .await
            .unwrap_or_else(|why| panic!("{why}"))
    }

    /// The close frame's code and reason, or how the connection ended
    /// without one.
    async fn close_frame(&mut self) -> Result<(u16, String), String> {
        loop {
            let msg = tokio::time::timeout(READ_TIMEOUT, self.ws.next())
                .await
                .expect("timed out waiting for the close");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return Ok((u16::from(frame.code), frame.reason.to_string()))
                }
                Some(Ok(Message::Close(None))) => {
                    return Ok((u16::from(CloseCode::Status), String::new()))
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    return Err(format!("connection failed without a close frame: {e}"))
                }
                None => return Err("connection ended without a close frame".into()),
            }
        }
    }

    // --- shorthands ---

    /// Register `user` (password `password-<user>`); returns the token.
    pub async fn register(&mut self, user: &str) -> String {
        let r = self
            .ok(json!({"type":"register","user":user,"password":password(user)}))
            .await;
        r["token"].as_str().expect("token").to_owned()
    }

    pub async fn login(&mut self, user: &str) -> String {
        let r = self
            .ok(json!({"type":"login","user":user,"password":password(user)}))
            .await;
        r["token"].as_str().expect("token").to_owned()
    }

    /// Every message of `room`, page by page: seq to body.
    pub async fn whole_history(&mut self, room: &str) -> std::collections::BTreeMap<u64, String> {
        let mut stored = std::collections::BTreeMap::new();
        let mut after = 0;
        loop {
            let page = self
                .ok(json!({"type":"history","room":room,"after":after,"limit":500}))
                .await;
            for m in page["messages"].as_array().expect("messages") {
                let seq = m["seq"].as_u64().expect("a seq");
                stored.insert(seq, m["body"].as_str().unwrap_or_default().to_owned());
                after = seq;
            }
            if page["more"] == false {
                return stored;
            }
        }
    }

    pub async fn guest(&mut self, user: &str) {
        self.ok(json!({"type":"guest","user":user})).await;
    }

    pub async fn join(&mut self, room: &str) -> Value {
        self.ok(json!({"type":"join","room":room})).await
    }

    /// Send a message; returns its seq.
    pub async fn send(&mut self, room: &str, body: &str) -> u64 {
        let r = self
            .ok(json!({"type":"send","room":room,"body":body}))
            .await;
        r["seq"].as_u64().expect("seq")
    }
}

/// Read `reader`'s `message` events on a task until one whose body is
/// `END`, checking they come with seqs 1, 2, 3, …; the task returns how many.
pub fn count_messages_in_order(mut reader: WsClient) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            let e = reader.event().await;
            if e["type"] == "message" {
                seen += 1;
                assert_eq!(e["seq"], seen, "in order, nothing lost");
                if e["body"] == "END" {
                    return seen;
                }
            }
        }
    })
}

/// Send 4 KB messages to `room` until the server cuts `victim` off (its
/// presence ends), then `END`; returns how many were sent before `END`.
pub async fn flood_until_cut_off(sender: &mut WsClient, room: &str, victim: &str) -> u64 {
    let body = "z".repeat(4000);
    let mut sent = 0;
    while !sender.has_event(|e| e["type"] == "presence" && e["user"] == victim) {
        sent += 1;
        assert!(sent < 20_000, "{victim} was never cut off");
        sender.send(room, &body).await;
    }
    sender.send(room, "END").await;
    sent
}

/// The password the shorthands use for `user`.
pub fn password(user: &str) -> String {
    format!("password-{user}")
}

fn is_reply(frame: &Value) -> bool {
    matches!(frame["type"].as_str(), Some("ok" | "error" | "pong"))
}

/// A line-protocol client for tests.
pub struct LineClient {
    reader: tokio::io::BufReader<tokio::io::ReadHalf<BoxedIo>>,
    writer: tokio::io::WriteHalf<BoxedIo>,
    pings: u64,
    pub greeting: String,
}

/// A TCP connection to `addr` from the loopback address `from` (tests
/// of per-address limits use 127.0.0.2 and up).
pub async fn connect_from(from: [u8; 4], addr: SocketAddr) -> BoxedIo {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((from, 0)))
        .expect("bind a loopback source address");
    Box::new(socket.connect(addr).await.expect("connect"))
}

impl LineClient {
    pub async fn connect(addr: SocketAddr) -> LineClient {
        Self::over(Box::new(TcpStream::connect(addr).await.expect("connect"))).await
    }

    /// A line client over a connected stream (TCP or TLS); reads the greeting.
    pub async fn over(stream: BoxedIo) -> LineClient {
        let (r, w) = tokio::io::split(stream);
        let mut client = LineClient {
            reader: tokio::io::BufReader::new(r),
            writer: w,
            pings: 0,
            greeting: String::new(),
        };
        client.greeting = client.line().await;
        client
    }

    /// Send one line (a newline is added).
    pub async fn send(&mut self, line: &str) {
        self.write_raw(format!("{line}\n").as_bytes()).await;
    }

    /// Send bytes as they are.
    pub async fn write_raw(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        self.writer.write_all(bytes).await.expect("write");
    }

    /// The next line, without its newline; panics at the end of the stream.
    pub async fn line(&mut self) -> String {
        self.next_line()
            .await
            .expect("the server closed the connection")
    }

    async fn next_line(&mut self) -> Option<String> {
        use tokio::io::AsyncBufReadExt;
        let mut line = String::new();
        let n = tokio::time::timeout(READ_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .expect("timed out waiting for a line")
            .expect("read");
        (n > 0).then(|| line.trim_end_matches('\n').to_owned())
    }

    /// Send `line`, then return every line the server writes up to a PING
    /// round trip: its replies, and every event already queued for us.
    pub async fn say(&mut self, line: &str) -> Vec<String> {
        self.send(line).await;
        self.pending().await
    }

    /// Every line already on its way to us, proven by a PING round trip.
    pub async fn pending(&mut self) -> Vec<String> {
        self.pings += 1;
        let pong = format!("PONG sync-{}", self.pings);
        self.send(&format!("PING sync-{}", self.pings)).await;
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            if line == pong {
                return lines;
            }
            lines.push(line);
        }
    }

    /// Read until the server closes; returns the lines read.
    pub async fn until_closed(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Some(line) = self.next_line().await {
            lines.push(line);
        }
        lines
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1, written as PEM
/// files into `dir`.
pub struct TestCert {
    pub files: confab_server::TlsFiles,
    /// The certificate in DER, to compare with what a server presents.
    pub der: Vec<u8>,
    pem: String,
}

impl TestCert {
    pub fn new(dir: &std::path::Path, name: &str) -> TestCert {
        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(names).expect("generating a certificate");
        let files = confab_server::TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.pem()).expect("writing the certificate");
        std::fs::write(&files.key, signing_key.serialize_pem()).expect("writing the key");
        TestCert {
            files,
            der: cert.der().to_vec(),
            pem: cert.pem(),
        }
    }

    /// Copy this certificate over another's files (for reloads).
    pub fn install_at(&self, files: &confab_server::TlsFiles) {
        std::fs::copy(&self.files.cert, &files.cert).expect("copying the certificate");
        std::fs::copy(&self.files.key, &files.key).expect("copying the key");
    }

    /// Connect to `addr` over TLS trusting only this certificate; returns
    /// the stream and the certificate the server presented.
    pub async fn connect(&self, addr: SocketAddr) -> (BoxedIo, Vec<u8>) {
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
        use tokio_rustls::rustls::{ClientConfig, RootCertStore};
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(self.pem.as_bytes()).expect("PEM"))
            .expect("a root");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("a name");
        let tls = connector.connect(name, tcp).await.expect("TLS handshake");
        let presented = tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec();
        (Box::new(tls), presented)
    }
}

/// An HTTP/1.1 request over a fresh connection: the status and the body.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(READ_TIMEOUT, stream.read_to_end(&mut response))
        .await
        .expect("timed out waiting for a response")
        .expect("read");
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_owned()
    };
    (status, body)
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}

//! Three real `confab` nodes on one PostgreSQL schema and one Redis key
//! prefix: SIGKILL (or SIGTERM) one while clients on all three send with
//! nonces; its
//! clients reconnect to the others, `resume`, retry, `sync`; then every
//! acknowledged message is audited (none lost, none twice, one gapless
//! order seen by every member). Skipped without `CONFAB_TEST_POSTGRES` and
//! `CONFAB_TEST_REDIS`.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::Confab;
use confab_broker_redis::testing::{shared_redis, Prefix};
use confab_store_postgres::testing::TestSchema;
use confab_testkit::serde_json::{json, Value};
use confab_testkit::tokio_tungstenite::tungstenite::Message;
use confab_testkit::tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};
use confab_testkit::{Store, WsClient};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One client's connection, with what it saw of the room.
struct Client {
    ws: Ws,
    id: u64,
    /// Messages of the room by seq, live or synced.
    seen: BTreeMap<u64, String>,
    /// The last live message on this connection: each next one follows it
    /// without a gap (what went by before it came is fetched by `sync`).
    last_live: u64,
}

impl Client {
    async fn connect(url: &str) -> Option<Client> {
        let (ws, _) = connect_async(url).await.ok()?;
        Some(Client {
            ws,
            id: 0,
            seen: BTreeMap::new(),
            last_live: 0,
        })
    }

    /// A request's reply; events read meanwhile are recorded. `None` when
    /// the connection died.
    async fn call(&mut self, mut request: Value) -> Option<Value> {
        self.id += 1;
        request["id"] = json!(self.id);
        self.ws
            .send(Message::text(request.to_string()))
            .await
            .ok()?;
        loop {
            let frame = self.frame().await?;
            if frame["id"] == json!(self.id) {
                return Some(frame);
            }
        }
    }

    /// The next frame; a message of the room is also recorded. `None`
    /// when the connection died.
    async fn frame(&mut self) -> Option<Value> {
        loop {
            let Ok(Some(Ok(msg))) =
                tokio::time::timeout(Duration::from_secs(20), self.ws.next()).await
            else {
                return None;
            };
            let Message::Text(text) = msg else { continue };
            let frame: Value = confab_testkit::serde_json::from_str(&text).ok()?;
            if frame["type"] == "message" && frame["room"] == "load" {
                let seq = frame["seq"].as_u64().unwrap();
                assert!(
                    self.last_live == 0 || seq == self.last_live + 1,
                    "live messages gapless and in order: {seq} after {}",
                    self.last_live
                );
                self.last_live = seq;
                self.seen
                    .insert(seq, frame["body"].as_str().unwrap().to_owned());
            }
            return Some(frame);
        }
    }

    /// Fetch what went by while away.
    async fn sync(&mut self) -> Option<()> {
        loop {
            let after = self.seen.keys().last().copied().unwrap_or(0);
            let r = self
                .call(json!({"type":"sync","cursors":{"load":after},"limit":500}))
                .await?;
            let mut more = r["more"] == true;
            for room in r["rooms"].as_array()? {
                more |= room["more"] == true;
                for m in room["messages"].as_array()? {
                    let seq = m["seq"].as_u64()?;
                    self.seen.insert(seq, m["body"].as_str()?.to_owned());
                }
            }
            if !more {
                return Some(());
            }
        }
    }
}

type Acks = Arc<Mutex<Vec<(u64, String)>>>;

/// A member that sends `total` messages with nonces, moving to the next
/// node whenever its node dies, then reads until `done` says everyone
/// finished; returns what it saw.
/// What the members share.
#[derive(Clone)]
struct Run {
    urls: Vec<String>,
    acks: Acks,
    /// How many acks so far.
    progress: watch::Sender<usize>,
    /// Everyone finished sending.
    done: watch::Receiver<bool>,
    /// Stop sending (before `total`).
    stop: watch::Receiver<bool>,
    /// How many members stopped sending.
    stopped: watch::Sender<usize>,
    /// Everyone joined.
    joined: Arc<tokio::sync::Barrier>,
}

async fn member(run: Run, mut node: usize, name: String, total: usize) -> BTreeMap<u64, String> {
    let Run {
        urls,
        acks,
        progress,
        mut done,
        stop,
        stopped,
        joined,
    } = run;
    let mut c = Client::connect(&urls[node]).await.unwrap();
    let r = c
        .call(json!({"type":"register","user":name,"password":"password-123"}))
        .await
        .unwrap();
    let token = r["token"].as_str().unwrap().to_owned();
    c.call(json!({"type":"join","room":"load"})).await.unwrap();
    // Every member is in before anyone sends: all must see everything.
    joined.wait().await;
    let mut n = 0;
    while n < total && !*stop.borrow() {
        let body = format!("{name}-{n}");
        let sent = c
            .call(json!({"type":"send","room":"load","body":body,"nonce":body}))
            .await;
        match sent {
            Some(r) if r["type"] == "ok" => {
                let mut acks = acks.lock().unwrap();
                acks.push((r["seq"].as_u64().unwrap(), body));
                progress.send_replace(acks.len());
                n += 1;
            }
            Some(r) if r["code"] == "rate_limited" => {
                let wait = r["retry_after_ms"].as_u64().unwrap_or(10);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Some(r) => panic!("{name}: {r}"),
            None => {
                // The node died (or is going): the next one, `resume`,
                // `sync`, then the same nonce again.
                node = (node + 1) % urls.len();
                let seen = std::mem::take(&mut c.seen);
                c = reconnect(&urls, &mut node, &token).await;
                c.seen = seen;
                c.sync().await.expect("sync after moving");
            }
        }
    }
    stopped.send_modify(|n| *n += 1);
    // Keep reading until everyone finished, then catch up once more.
    loop {
        let finished = *done.borrow();
        if finished {
            break;
        }
        tokio::select! {
            _ = done.changed() => {}
            frame = c.frame() => if frame.is_none() {
                node = (node + 1) % urls.len();
                let seen = std::mem::take(&mut c.seen);
                c = reconnect(&urls, &mut node, &token).await;
                c.seen = seen;
            },
        }
    }
    c.sync().await.expect("a last sync");
    c.seen
}

/// History is gapless, holds every ack once, and every member saw exactly
/// it.
async fn audit(url: &str, acks: &Acks, views: &[BTreeMap<u64, String>]) {
    let mut auditor = WsClient::connect(url).await;
    auditor.register("auditor").await;
    auditor.join("load").await;
    let stored = auditor.whole_history("load").await;
    let acks = acks.lock().unwrap().clone();
    common::assert_holds_every_ack(&stored, &acks);
    assert_eq!(stored.len(), acks.len(), "nothing stored twice");
    for view in views {
        assert_eq!(view, &stored, "every member saw the one order");
    }
}

/// Connect to the next node that takes the client back (through a
/// balancer: the one address, until a live node answers), within 15 s.
async fn reconnect(urls: &[String], node: &mut usize, token: &str) -> Client {
    connect_to_any(urls, node, Some(token)).await
}

/// Connect to `urls[node]`, or the next one, until one opens (and resumes
/// `token`, if any), within 15 s.
async fn connect_to_any(urls: &[String], node: &mut usize, token: Option<&str>) -> Client {
    let attempt = async {
        loop {
            if let Some(mut c) = Client::connect(&urls[*node]).await {
                let Some(token) = token else { return c };
                let resumed = c.call(json!({"type":"resume","token":token})).await;
                if resumed.is_some_and(|r| r["type"] == "ok") {
                    return c;
                }
            }
            *node = (*node + 1) % urls.len();
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .expect("a node took the client")
}

#[tokio::test]
async fn a_killed_node_loses_nothing_acknowledged() {
    a_node_stops_under_load(libc::SIGKILL).await;
}

/// A graceful stop (a rolling restart's step): `shutdown` moves the
/// node's clients.
#[tokio::test]
async fn a_stopped_node_moves_its_clients_without_loss() {
    a_node_stops_under_load(libc::SIGTERM).await;
}

async fn a_node_stops_under_load(signal: i32) {
    let Some(shared) = Shared::create(false).await else {
        return;
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(shared.node(&format!("n{i}"), &[]).await);
    }
    let urls: Vec<String> = nodes.iter().map(Confab::url).collect();

    // A user on the node that will die, who does not come back.
    let mut ghost = WsClient::connect(&urls[2]).await;
    ghost.register("ghost").await;
    ghost.join("load").await;
    let mut watcher = WsClient::connect(&urls[0]).await;
    watcher.register("watcher").await;
    watcher.join("load").await;

    let acks: Acks = Arc::default();
    let (progress, mut progressed) = watch::channel(0);
    let (finish, done) = watch::channel(false);
    const EACH: usize = 40;
    let run = Run {
        urls: urls.clone(),
        acks: acks.clone(),
        progress,
        done,
        stop: watch::channel(false).1,
        stopped: watch::channel(0).0,
        joined: Arc::new(tokio::sync::Barrier::new(6)),
    };
    let members: Vec<_> = (0..6)
        .map(|i| tokio::spawn(member(run.clone(), i % 3, format!("m{i}"), EACH)))
        .collect();
    progressed.wait_for(|n| *n >= 60).await.unwrap();
    let killed_at = std::time::Instant::now();
    nodes[2].signal(signal);
    let all = tokio::time::timeout(
        Duration::from_secs(60),
        progressed.wait_for(|n| *n >= 6 * EACH),
    );
    assert!(all.await.is_ok(), "every member finished sending");
    finish.send_replace(true);
    let mut views = Vec::new();
    for m in members {
        let view = tokio::time::timeout(Duration::from_secs(60), m).await;
        views.push(view.expect("a member finished").unwrap());
    }

    assert_eq!(acks.lock().unwrap().len(), 6 * EACH);
    audit(&urls[1], &acks, &views).await;

    // The dead node's user is shown offline by the living nodes, once its
    // liveness key expires (10 s): poll the member list meanwhile.
    loop {
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "offline within 30 s"
        );
        let r = watcher.ok(json!({"type":"members","room":"load"})).await;
        let members = r["members"].as_array().unwrap();
        let ghost = members.iter().find(|m| m["user"] == "ghost").unwrap();
        if ghost["online"] == false {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    loop {
        let e = watcher.event().await;
        if e["type"] == "presence" && e["user"] == "ghost" && e["online"] == false {
            break;
        }
    }
    assert!(
        killed_at.elapsed() < Duration::from_secs(30),
        "offline within 30 s"
    );
    drop(ghost);
    drop(shared);
}

/// A free port on loopback (bound and let go), below the kernel's
/// ephemeral range. A port is let go here and bound again later by a node
/// or HAProxy (a node that restarts binds it a second time); one from the
/// ephemeral range can be taken meanwhile as the local port of any
/// outgoing connection (HAProxy's, a client's), and the node then fails to
/// start (`a_rolling_restart_loses_nothing` did, once).
fn free_addr() -> String {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000.min(ephemeral / 2);
    let span = u32::from(ephemeral - low);
    // Tests run in parallel: start somewhere else each time.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
        ^ std::process::id();
    for i in 0..span {
        let port = low + ((seed.wrapping_add(i.wrapping_mul(7_919))) % span) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return l.local_addr().unwrap().to_string();
        }
    }
    panic!("no free port on loopback below {ephemeral}");
}

/// What the nodes of one test share: a PostgreSQL schema and a Redis key
/// prefix (both removed when dropped), and the broker URL naming it.
struct Shared {
    schema: TestSchema,
    /// Held for its drop.
    _prefix: Prefix,
    broker: String,
}

impl Shared {
    /// Start node `name` of this cluster, with more arguments.
    async fn node(&self, name: &str, args: &[&str]) -> Confab {
        let mut all = vec!["--broker", &self.broker, "--node", name];
        all.extend_from_slice(args);
        Confab::start_with(&self.schema.url, &all).await
    }

    /// `None` (having said why) without PostgreSQL or Redis, or without
    /// HAProxy when the test needs it.
    async fn create(haproxy: bool) -> Option<Shared> {
        if Store::postgres_skipped() {
            return None;
        }
        let redis = shared_redis()?;
        if haproxy && !haproxy_installed() {
            return None;
        }
        let prefix = Prefix::new(&redis);
        Some(Shared {
            schema: TestSchema::create().await.unwrap(),
            broker: format!("{redis}?prefix={}", prefix.prefix),
            _prefix: prefix,
        })
    }
}

/// Whether `haproxy` is installed; says so when it is not.
fn haproxy_installed() -> bool {
    let found = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok();
    if !found {
        eprintln!("skipped: haproxy is not installed (apt install haproxy; .ci/run does)");
    }
    found
}

/// The example's HAProxy in front of `backends`: its WebSocket URL, and
/// the process (killed when dropped).
fn haproxy(backends: &[String]) -> (String, tokio::process::Child) {
    let front = free_addr();
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/cluster/haproxy.cfg"
    );
    let child = tokio::process::Command::new("haproxy")
        .args(["-f", cfg, "-db"])
        .env("CONFAB_FRONT", &front)
        .env("CONFAB_STATS", free_addr())
        .envs((1..=3).map(|i| (format!("CONFAB_N{i}"), &backends[i - 1])))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting haproxy");
    (format!("ws://{front}/ws"), child)
}

/// A connection through a proxy that may not accept yet, or whose backend
/// just died: tried again until it opens (at most 10 s).
async fn connect_retrying(url: &str) -> Client {
    connect_to_any(&[url.to_owned()], &mut 0, None).await
}

/// The example's HAProxy (`examples/cluster/haproxy.cfg`) in front of three
/// nodes: kill the node some clients are on; they reconnect through the
/// same address, land on the others, `resume` and `sync`, and deliver
/// again. Prints the failover time (BENCHMARKS.md).
#[tokio::test]
async fn behind_the_example_haproxy_clients_move_off_a_killed_node() {
    let Some(shared) = Shared::create(true).await else {
        return;
    };
    let mut nodes = Vec::new();
    for i in 1..=3 {
        nodes.push(shared.node(&format!("n{i}"), &[]).await);
    }
    let backends: Vec<String> = nodes.iter().map(|n| n.http.to_string()).collect();
    let (url, _haproxy) = haproxy(&backends);
    let connect = || connect_retrying(&url);

    // Twelve members through the one address, spread over the nodes.
    let mut members = Vec::new();
    for i in 0..12 {
        let mut c = connect().await;
        let hello = c.frame().await.unwrap();
        let node = hello["node"].as_str().unwrap().to_owned();
        let r = c
            .call(json!({"type":"register","user":format!("u{i}"),"password":"password-123"}))
            .await
            .unwrap();
        let token = r["token"].as_str().unwrap().to_owned();
        c.call(json!({"type":"join","room":"load"})).await.unwrap();
        members.push((c, node, token));
    }
    let victim = members[0].1.clone();
    let index = victim[1..].parse::<usize>().unwrap() - 1;
    let (moving, staying): (Vec<_>, Vec<_>) = members
        .into_iter()
        .partition(|(_, node, _)| *node == victim);
    let (mut speaker, _, _) = staying
        .into_iter()
        .next()
        .expect("a member on another node");

    let killed = std::time::Instant::now();
    nodes[index].signal(libc::SIGKILL);
    let mut moved = Vec::new();
    for (mut c, _, token) in moving {
        while c.frame().await.is_some() {} // the connection dies
        let back = loop {
            let mut c = connect().await;
            let Some(hello) = c.frame().await else {
                continue;
            };
            if hello["node"] == victim.as_str() {
                continue; // not marked down yet
            }
            let resumed = c.call(json!({"type":"resume","token":token})).await;
            if resumed.is_some_and(|r| r["type"] == "ok") {
                break c;
            }
        };
        moved.push(back);
    }
    let seq = speaker
        .call(json!({"type":"send","room":"load","body":"after","nonce":"after"}))
        .await
        .unwrap()["seq"]
        .as_u64()
        .unwrap();
    for c in &mut moved {
        while !c.seen.contains_key(&seq) {
            c.frame().await.expect("delivering on the new node");
        }
    }
    eprintln!(
        "failover: {} clients of a killed node delivering again on the others after {} ms",
        moved.len(),
        killed.elapsed().as_millis()
    );
    drop(shared);
}

/// A rolling restart behind the example's HAProxy: each node in turn stops
/// gracefully and starts again under its name and port while members send
/// with nonces through the one address; nothing acknowledged is lost or
/// doubled, and every member saw one gapless order.
#[tokio::test]
async fn a_rolling_restart_loses_nothing() {
    let Some(shared) = Shared::create(true).await else {
        return;
    };
    let backends: Vec<String> = (0..3).map(|_| free_addr()).collect();
    let start = |i: usize| {
        let (shared, http) = (&shared, backends[i].clone());
        async move {
            let name = format!("n{}", i + 1);
            shared.node(&name, &["--http", &http]).await
        }
    };
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Some(start(i).await));
    }
    let (url, _haproxy) = haproxy(&backends);
    drop(connect_retrying(&url).await); // HAProxy accepts

    let acks: Acks = Arc::default();
    let (progress, mut progressed) = watch::channel(0);
    let (finish, done) = watch::channel(false);
    let (stop_sending, stop) = watch::channel(false);
    let (stopped, mut all_stopped) = watch::channel(0);
    let run = Run {
        urls: vec![url.clone()],
        acks: acks.clone(),
        progress,
        done,
        stop,
        stopped,
        joined: Arc::new(tokio::sync::Barrier::new(6)),
    };
    let members: Vec<_> = (0..6)
        .map(|i| tokio::spawn(member(run.clone(), 0, format!("m{i}"), usize::MAX)))
        .collect();
    for (i, slot) in nodes.iter_mut().enumerate() {
        let before = *progressed.borrow();
        progressed.wait_for(|n| *n >= before + 30).await.unwrap();
        let node = slot.take().unwrap();
        node.signal(libc::SIGTERM);
        assert_eq!(node.exit().await.code(), Some(0), "a graceful stop");
        *slot = Some(start(i).await);
    }
    let before = *progressed.borrow();
    progressed.wait_for(|n| *n >= before + 30).await.unwrap();
    stop_sending.send_replace(true);
    // Members stop sending after the message in hand, then read on until
    // told that everyone stopped.
    all_stopped.wait_for(|n| *n == 6).await.unwrap();
    finish.send_replace(true);
    let mut views = Vec::new();
    for m in members {
        let view = tokio::time::timeout(Duration::from_secs(60), m).await;
        views.push(view.expect("a member finished").unwrap());
    }
    audit(&url, &acks, &views).await;
    drop(shared);
}

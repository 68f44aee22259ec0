//! Confab on PostgreSQL, over the wire: the schema tools, the guarantees
//! across a restart, and a deletion seen through the database. Each test
//! gets a schema of its own on the server `CONFAB_TEST_POSTGRES` names, and
//! skips (saying so) without it.

use std::process::Stdio;

use confab_broker_redis::testing::CutProxy;
use confab_store_postgres::testing::TestSchema;
use confab_testkit::confab_server::Database;
use confab_testkit::serde_json::json;
use confab_testkit::TestServer;

async fn on_postgres(schema: &TestSchema) -> TestServer {
    let url = schema.url.clone();
    TestServer::with_config(move |c| c.database = Database::parse(&url).unwrap()).await
}

async fn confab(args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(args)
        .env_remove("CONFAB_DATABASE")
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn db_migrate_and_status() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let url = schema.url.as_str();
    let (ok, text) = confab(&["db", "status", "--database", url]).await;
    assert!(ok && text.contains("no Confab schema yet"), "{text}");
    let current = format!(
        "schema version {}, up to date",
        confab_store_postgres::MIGRATIONS.len()
    );
    let (ok, text) = confab(&["db", "migrate", "--database", url]).await;
    assert!(ok && text.contains(&current), "{text}");
    let (ok, text) = confab(&["db", "status", "--database", url]).await;
    assert!(ok && text.contains(&current), "{text}");
    let (ok, text) = confab(&[
        "db",
        "status",
        "--database",
        "postgres://nobody@127.0.0.1:1/x",
    ])
    .await;
    assert!(!ok && text.contains("unavailable"), "{text}");
}

#[tokio::test]
async fn chat_survives_a_restart_on_postgres() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let server = on_postgres(&schema).await;
    let mut alice = server.client().await;
    let token = alice.register("alice").await;
    alice.join("pg").await;
    let first = alice
        .ok(json!({"type":"send","room":"pg","body":"stored in postgres","nonce":"n-1"}))
        .await;
    let retry = alice
        .ok(json!({"type":"send","room":"pg","body":"stored in postgres","nonce":"n-1"}))
        .await;
    assert_eq!(first["seq"], retry["seq"], "exactly once with a nonce");
    let mut bob = server.client().await;
    bob.register("bob").await;
    bob.join("pg").await;
    alice.send("pg", "second").await;

    let server = server.restart().await;
    let mut again = server.client().await;
    again.ok(json!({"type":"resume","token":token})).await;
    let history = again.ok(json!({"type":"history","room":"pg"})).await;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["stored in postgres", "second"]);
    let mut bob = server.client().await;
    bob.login("bob").await;
    let sync = bob.ok(json!({"type":"sync"})).await;
    assert_eq!(sync["rooms"][0]["messages"][0]["seq"], 1);
    assert_eq!(
        sync["rooms"][0]["messages"].as_array().unwrap().len(),
        2,
        "offline delivery from the read marker"
    );

    // The operator's view of the store: pool, batches, request latency.
    again.send("pg", "third").await;
    let (status, metrics) = confab_testkit::http(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    for line in [
        "confab_store_pool_connections{state=\"max\"} 16",
        "confab_store_commit_batch_size_count 1",
        "confab_request_seconds_count{type=\"send\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    assert!(metrics.contains("confab_store_pool_connections{state=\"in_use\"}"));
}

/// Send `n` numbered messages with nonces, retrying a refused one with the
/// same nonce as a client does; returns (acks as (seq, body), refusals).
async fn send_through(url: String, name: String, n: usize) -> (Vec<(u64, String)>, Vec<String>) {
    let mut c = confab_testkit::WsClient::connect(&url).await;
    c.guest(&name).await;
    c.join("cut").await;
    let (mut acks, mut refusals) = (Vec::new(), Vec::new());
    for i in 0..n {
        let body = format!("{name}-{i}");
        loop {
            let started = std::time::Instant::now();
            let r = c
                .request(json!({"type":"send","room":"cut","body":body,"nonce":body}))
                .await;
            assert!(
                started.elapsed() < std::time::Duration::from_secs(8),
                "a request hung while PostgreSQL was away"
            );
            if r["type"] == "ok" {
                acks.push((r["seq"].as_u64().unwrap(), body.clone()));
                break;
            }
            refusals.push(r["code"].as_str().unwrap_or("?").to_owned());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    (acks, refusals)
}

#[tokio::test]
async fn cut_off_from_postgres_the_server_refuses_then_recovers_and_loses_nothing() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let base = std::env::var(confab_store_postgres::testing::VAR).unwrap();
    let target = base
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_owned();
    let link = CutProxy::start(target.clone()).await;
    let through = schema.url.replacen(&target, &link.addr.to_string(), 1);
    let server = TestServer::with_config(move |c| {
        c.database = Database::parse(&through).unwrap();
        c.chat.rate_limits = confab_testkit::confab_server::RateLimits::off();
    })
    .await;
    let ready = |addr| async move {
        confab_testkit::http(addr, "GET", "/readyz", &[], "")
            .await
            .0
    };
    assert_eq!(ready(server.addr).await, 200);

    let senders: Vec<_> = (0..4)
        .map(|i| tokio::spawn(send_through(server.ws_url(), format!("s{i}"), 150)))
        .collect();
    // Let some messages through, then cut PostgreSQL off mid-stream.
    let mut watcher = server.client().await;
    watcher.register("watcher").await;
    watcher.join("cut").await;
    let mut heard = std::collections::HashSet::new();
    let mut seen = 0;
    while heard.len() < 4 || seen < 40 {
        // Senders may still be joining: their `joined` events come too.
        let m = watcher.event().await;
        if m["type"] != "message" {
            continue;
        }
        heard.insert(m["user"].as_str().unwrap().to_owned());
        seen += 1;
    }
    link.cut(true);
    assert_eq!(ready(server.addr).await, 503, "/readyz turns red");
    link.cut(false);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while ready(server.addr).await != 200 {
        assert!(std::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let (mut acks, mut refusals) = (Vec::new(), Vec::new());
    for s in senders {
        let (a, r) = s.await.unwrap();
        acks.extend(a);
        refusals.extend(r);
    }
    assert_eq!(acks.len(), 600, "every message acknowledged in the end");
    assert!(
        !refusals.is_empty() && refusals.iter().all(|code| code == "unavailable"),
        "refused while cut off, with `unavailable` only: {refusals:?}"
    );
    // Every acknowledged message is there, once, with no gap.
    let stored = watcher.whole_history("cut").await;
    assert_eq!(stored.len(), 600, "nothing stored twice or lost");
    assert_eq!(*stored.keys().last().unwrap(), 600, "gapless");
    for (seq, body) in &acks {
        assert_eq!(stored.get(seq), Some(body), "ack {seq} is in history");
    }
}

#[tokio::test]
async fn a_sqlite_deployment_moves_to_postgres_and_its_clients_do_not_notice() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    // Life on SQLite: accounts, a room with a topic, a direct conversation,
    // messages with nonces, read markers.
    let server = TestServer::spawn().await;
    let mut alice = server.client().await;
    let alice_token = alice.register("Alice").await;
    alice.join("plaza").await;
    alice
        .ok(json!({"type":"topic","room":"plaza","topic":"moving day"}))
        .await;
    let mut bob = server.client().await;
    let bob_token = bob.register("bob").await;
    bob.join("plaza").await;
    for i in 1..=5 {
        alice
            .ok(json!({"type":"send","room":"plaza","body":format!("m{i}"),"nonce":format!("n{i}")}))
            .await;
    }
    alice
        .ok(json!({"type":"dm","to":"bob","body":"psst"}))
        .await;
    bob.ok(json!({"type":"read","room":"plaza","seq":3})).await;
    // Roles, a ban, an edit and a deletion come along too.
    alice
        .ok(json!({"type":"role","room":"plaza","user":"bob","role":"moderator"}))
        .await;
    alice
        .ok(json!({"type":"ban","room":"plaza","user":"eve","reason":"ahead of time"}))
        .await;
    alice
        .ok(json!({"type":"edit","room":"plaza","seq":2,"body":"m2 again"}))
        .await;
    alice
        .ok(json!({"type":"delete","room":"plaza","seq":1}))
        .await;
    let sqlite = format!("sqlite://{}", server.dir().join("confab.db").display());
    let dir = server.dir().to_path_buf();
    let stopped = server.stop().await;

    // A target with data is refused unless told to replace it.
    seed(&schema.url).await;
    let (ok, text) = confab(&["db", "copy", "--from", &sqlite, "--to", &schema.url]).await;
    assert!(!ok && text.contains("--replace"), "{text}");
    let (ok, text) = confab(&[
        "db",
        "copy",
        "--from",
        &sqlite,
        "--to",
        &schema.url,
        "--replace",
    ])
    .await;
    assert!(ok, "{text}");
    assert!(
        text.contains(
            "copied 2 users, 2 tokens, 2 rooms, 4 memberships, 1 bans and mutes and 8 messages"
        ),
        "{text}"
    );
    assert!(text.contains("checked"), "{text}");
    assert!(dir.exists());
    drop(stopped);

    // On PostgreSQL: old tokens resume, old cursors sync, nonces still hold.
    let url = schema.url.clone();
    let server =
        TestServer::with_config(move |c| c.database = Database::parse(&url).unwrap()).await;
    let mut bob = server.client().await;
    assert_eq!(
        bob.ok(json!({"type":"resume","token":bob_token})).await["user"],
        "bob"
    );
    let sync = bob.ok(json!({"type":"sync"})).await;
    let rooms: Vec<(String, Vec<u64>)> = sync["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let seqs = r["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_u64().unwrap())
                .collect();
            (r["room"].as_str().unwrap().to_owned(), seqs)
        })
        .collect();
    assert_eq!(
        rooms,
        [
            ("dm:alice:bob".to_owned(), vec![1]),
            ("plaza".to_owned(), vec![4, 5, 6, 7])
        ],
        "from the read markers, as before"
    );
    let mut alice = server.client().await;
    alice.ok(json!({"type":"resume","token":alice_token})).await;
    let again = alice
        .ok(json!({"type":"send","room":"plaza","body":"m3","nonce":"n3"}))
        .await;
    assert_eq!(again["seq"], 3, "the nonce finds the original");
    let next = alice.send("plaza", "first on postgres").await;
    assert_eq!(next, 8);
    let joined = alice.join("plaza").await;
    assert_eq!(joined["topic"], "moving day");
    let roles: Vec<(&str, &str)> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("Alice", "owner"), ("bob", "moderator")]);
    let bans = alice.ok(json!({"type":"bans","room":"plaza"})).await;
    assert_eq!(bans["bans"][0]["user"], "eve");
    assert_eq!(bans["bans"][0]["reason"], "ahead of time");
    let page = alice
        .ok(json!({"type":"history","room":"plaza","before":3}))
        .await;
    assert_eq!(page["messages"][0]["deleted"], true);
    assert!(page["messages"][0].get("body").is_none());
    assert_eq!(page["messages"][1]["body"], "m2 again");
    assert!(page["messages"][1]["edited_ts"].is_i64());
    // Passwords too: the hashes came along.
    server.client().await.login("bob").await;
}

/// Put a user into the database at `url`, so that it is not empty.
async fn seed(url: &str) {
    use confab_core::Store;
    let store = confab_store_postgres::PgStore::open(url, 1).await.unwrap();
    let squatter = confab_core::UserName::parse("squatter").unwrap();
    store.create_user(&squatter, "h").await.unwrap();
}

#[tokio::test]
async fn user_administration_on_postgres_reaches_a_running_server() {
    let Some(schema) = TestSchema::create().await else {
        return;
    };
    let url = schema.url.as_str();
    let user = |args: &'static [&'static str], stdin: &'static str| {
        let url = url.to_owned();
        async move {
            use tokio::io::AsyncWriteExt;
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"))
                .arg("user")
                .args(args)
                .args(["--database", &url])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).await.unwrap();
            drop(input);
            let out = child.wait_with_output().await.unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        }
    };
    assert_eq!(
        user(&["add", "Dana"], "dana-password\n").await,
        (true, "added Dana\n".into())
    );
    let server = on_postgres(&schema).await;
    let mut dana = server.client().await;
    dana.ok(json!({"type":"login","user":"dana","password":"dana-password"}))
        .await;
    assert_eq!(user(&["list"], "").await, (true, "Dana\n".into()));
    // Deleted by another process: the server closes her connection, through
    // the log in the database.
    assert_eq!(
        user(&["delete", "dana"], "").await,
        (true, "deleted dana\n".into())
    );
    assert_eq!(
        dana.closed().await,
        (1008, "disconnected by an administrator".into())
    );
}

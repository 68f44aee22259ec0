//! What an operator uses: health checks, metrics, the admin API, user
//! administration, and the logs.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use confab_testkit::serde_json::{self, json, Value};
use confab_testkit::{http, TestServer, WsClient};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const TOKEN: &str = "admin-secret-token";

async fn admin_server() -> TestServer {
    TestServer::with_config(|c| {
        c.admin_token = Some(confab_testkit::confab_server::settings::Secret::new(TOKEN));
    })
    .await
}

/// Parse the Prometheus text format: `name{labels}` to value.
fn scrape(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.parse().expect("a number"))
        })
        .collect()
}

async fn metrics(server: &TestServer) -> HashMap<String, f64> {
    let (status, body) = http(server.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    scrape(&body)
}

#[tokio::test]
async fn health_and_readiness() {
    let server = TestServer::spawn().await;
    assert_eq!(
        http(server.addr, "GET", "/healthz", &[], "").await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http(server.addr, "GET", "/readyz", &[], "").await,
        (200, "ready\n".into())
    );
}

#[tokio::test]
async fn readiness_follows_the_write_path() {
    let server = TestServer::spawn().await;
    // Another process takes SQLite's write lock and keeps it: reads still
    // work, but nothing can commit, so the server is not ready.
    let db = rusqlite::Connection::open(server.dir().join("confab.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (status, body) = http(server.addr, "GET", "/readyz", &[], "").await;
    assert_eq!(status, 503, "{body}");
    db.execute_batch("COMMIT").unwrap();
    assert_eq!(
        http(server.addr, "GET", "/readyz", &[], "").await,
        (200, "ready\n".into())
    );
}

#[tokio::test]
async fn a_dead_storage_writer_stops_the_server() {
    use confab_testkit::confab_server::{self, Durability};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let store =
        confab_store_sqlite::SqliteStore::open(dir.path().join("confab.db"), Durability::Full)
            .await
            .unwrap();
    // A bug outside any job (here in the commit observer) kills the writer
    // thread once armed.
    let armed = Arc::new(AtomicBool::new(false));
    let trigger = armed.clone();
    store.observe_commits(Box::new(move |_, _| {
        assert!(!trigger.load(Ordering::SeqCst), "injected writer bug");
    }));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let http_listener = bind().await.unwrap();
    let addr = http_listener.local_addr().unwrap();
    let listeners = confab_server::Listeners {
        http: http_listener,
        line: Some(bind().await.unwrap()),
    };
    let server = confab_server::start_on(Default::default(), listeners, Arc::new(store))
        .await
        .unwrap();
    let mut c = WsClient::connect(&format!("ws://{addr}/ws")).await;
    c.register("doomed").await;
    c.join("r").await;
    armed.store(true, Ordering::SeqCst);
    // The thread dies after the next commit it reports: the join's (whose
    // report may still be on its way) or this message's. Either way the
    // message is answered, acknowledged or `unavailable`, never left hanging.
    let reply = c
        .request(json!({"type":"send","room":"r","body":"last words"}))
        .await;
    assert!(
        reply["type"] == "ok" || reply["code"] == "unavailable",
        "{reply}"
    );
    // Then the server stops by itself and says so.
    loop {
        match c.event().await["type"].as_str() {
            Some("shutdown") => break,
            Some("message") => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(c.closed().await.0, 1001);
    let e = server
        .wait()
        .await
        .expect_err("a failure, for a non-zero exit");
    assert!(e.to_string().contains("writer died"), "{e}");
}

#[tokio::test]
async fn metrics_move_when_messages_flow() {
    let server = TestServer::spawn().await;
    let before = metrics(&server).await;
    assert_eq!(before.get("confab_messages_stored_total"), Some(&0.0));

    let mut a = server.client().await;
    a.register("metered").await;
    a.join("m").await;
    let mut b = server.line_client().await;
    b.say("/nick watcher").await;
    b.say("/join m").await;
    a.send("m", "one").await;
    a.send("m", "two").await;
    assert_eq!(b.pending().await.len(), 2);
    assert_eq!(
        a.error(json!({"type":"join","room":"bad room"})).await,
        "bad_request"
    );
    a.event_of("joined").await;

    let after = metrics(&server).await;
    let get = |k: &str| {
        after
            .get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {after:?}"))
    };
    assert_eq!(get("confab_messages_stored_total"), 2.0);
    assert_eq!(get(r#"confab_connections{transport="ws"}"#), 1.0);
    assert_eq!(get(r#"confab_connections{transport="line"}"#), 1.0);
    assert_eq!(
        get(r#"confab_logins_total{method="register",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"confab_logins_total{method="guest",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        get(r#"confab_requests_total{result="ok",type="send"}"#),
        2.0
    );
    assert_eq!(
        get(r#"confab_requests_total{result="bad_request",type="join"}"#),
        1.0
    );
    // Each message went to both connections.
    assert_eq!(get(r#"confab_deliveries_total{transport="ws"}"#), 2.0);
    assert_eq!(get(r#"confab_deliveries_total{transport="line"}"#), 2.0);
    assert_eq!(
        get(r#"confab_delivery_latency_seconds_count{transport="ws"}"#),
        2.0
    );
    assert!(get(r#"confab_delivery_latency_seconds_bucket{transport="line",le="+Inf"}"#) >= 2.0);
    assert!(get("confab_store_commit_batch_size_count") >= 1.0);
    assert!(get("confab_store_commit_seconds_sum") > 0.0);
    assert!(after.contains_key(r#"confab_store_commit_seconds_bucket{le="0.001"}"#));
    assert_eq!(get("confab_users_online"), 2.0);
    assert_eq!(get("confab_rooms_active"), 1.0);
}

#[tokio::test]
async fn the_admin_api_wants_its_token() {
    let off = TestServer::spawn().await;
    let (status, _) = http(off.addr, "GET", "/admin/stats", &[], "").await;
    assert_eq!(status, 404, "no token configured: no admin API");

    let server = admin_server().await;
    let (status, body) = http(server.addr, "GET", "/admin/stats", &[], "").await;
    assert_eq!(status, 401, "{body}");
    let wrong = [("Authorization", "Bearer not-the-token")];
    assert_eq!(
        http(server.addr, "GET", "/admin/stats", &wrong, "").await.0,
        401
    );
    let wrong_scheme = [("Authorization", TOKEN)];
    assert_eq!(
        http(server.addr, "GET", "/admin/users", &wrong_scheme, "")
            .await
            .0,
        401
    );
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let (status, body) = http(server.addr, "GET", "/admin/stats", &auth, "").await;
    assert_eq!(status, 200, "{body}");
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["version"], "0.1.0");
    assert_eq!(stats["draining"], false);
}

#[tokio::test]
async fn admins_see_users_and_rooms_disconnect_users_and_send_notices() {
    let server = admin_server().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let mut web = server.client().await;
    web.register("webber").await;
    web.join("lobby").await;
    let mut web2 = server.client().await;
    web2.login("webber").await;
    let mut line = server.line_client().await;
    line.say("/nick liner").await;
    line.say("/join lobby").await;
    web.event_of("joined").await;
    web2.event_of("joined").await;

    let (_, body) = http(server.addr, "GET", "/admin/users", &auth, "").await;
    let users: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        users["users"],
        json!([
            {"user":"liner","guest":true,"connections":1,"addresses":["127.0.0.1"]},
            {"user":"webber","guest":false,"connections":2,"addresses":["127.0.0.1","127.0.0.1"]}
        ])
    );
    let (_, body) = http(server.addr, "GET", "/admin/rooms", &auth, "").await;
    let rooms: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        rooms["rooms"],
        json!([{"room":"lobby","topic":"","member_count":2,"last_seq":0}])
    );
    let (_, body) = http(server.addr, "GET", "/admin/stats", &auth, "").await;
    let stats: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(stats["connections"], json!({"ws":2,"line":1}));
    assert_eq!(stats["users_online"], 2);

    let (status, body) = http(
        server.addr,
        "POST",
        "/admin/notice",
        &auth,
        r#"{"text":"maintenance at 5"}"#,
    )
    .await;
    assert_eq!((status, body.as_str()), (200, r#"{"users":2}"#));
    assert_eq!(
        web.event_of("notice").await,
        json!({"type":"notice","text":"maintenance at 5"})
    );
    assert_eq!(web2.event_of("notice").await["text"], "maintenance at 5");
    assert_eq!(line.pending().await, ["* notice: maintenance at 5"]);
    let (status, _) = http(
        server.addr,
        "POST",
        "/admin/notice",
        &auth,
        r#"{"txt":"typo"}"#,
    )
    .await;
    assert_eq!(status, 400);

    let (status, body) = http(
        server.addr,
        "POST",
        "/admin/users/WEBBER/disconnect",
        &auth,
        "",
    )
    .await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"connections":2,"user":"WEBBER"}"#)
    );
    assert_eq!(
        web.closed().await,
        (1008, "disconnected by an administrator".into())
    );
    assert_eq!(web2.closed().await.0, 1008);
    let (status, _) = http(
        server.addr,
        "POST",
        "/admin/users/liner/disconnect",
        &auth,
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        line.until_closed().await,
        ["* webber is offline", "! disconnected by an administrator"]
    );
}

#[tokio::test]
async fn admins_ban_users_from_the_whole_server() {
    let server = admin_server().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let mut vic = server.client().await;
    let token = vic.register("Vic").await;
    let mut vic_line = server.line_client().await;
    vic_line.say("/login vic password-Vic").await;
    let ban = |body: &'static str| http(server.addr, "POST", "/admin/users/vic/ban", &auth, body);

    // Bad input changes nothing.
    for body in [
        r#"{"duration_ms":-1}"#,
        r#"{"duration_ms":"soon"}"#,
        r#"{"until":1}"#,
    ] {
        assert_eq!(ban(body).await.0, 400, "{body}");
    }
    let (status, _) = http(server.addr, "POST", "/admin/users/ghost/ban", &auth, "").await;
    assert_eq!(status, 404, "no such user");
    vic.assert_no_event().await;

    // A ban: every connection closes now, and no way back in.
    let (status, body) = ban(r#"{"reason":"spam","duration_ms":3600000}"#).await;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["user"], "Vic");
    assert!(reply["until_ts"].as_i64().unwrap() > 0);
    assert_eq!(
        vic.closed().await,
        (1008, "disconnected by an administrator".into())
    );
    assert_eq!(
        vic_line.until_closed().await,
        ["! disconnected by an administrator"]
    );
    let mut again = server.client().await;
    let refused = again
        .request(json!({"type":"login","user":"vic","password":"password-Vic"}))
        .await;
    assert_eq!(refused["code"], "forbidden");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .starts_with("you are banned from this server until "),
        "{refused}"
    );
    assert!(refused["message"].as_str().unwrap().ends_with(": spam"));
    assert_eq!(
        again.error(json!({"type":"resume","token":token})).await,
        "forbidden"
    );
    assert_eq!(
        again.error(json!({"type":"guest","user":"vic"})).await,
        "conflict",
        "the name stays registered"
    );
    // Lifted: back in; lifting again says there was nothing.
    let unban = || http(server.addr, "POST", "/admin/users/vic/unban", &auth, "");
    assert_eq!(
        unban().await,
        (200, r#"{"user":"Vic","was_banned":true}"#.into())
    );
    assert_eq!(
        unban().await,
        (200, r#"{"user":"Vic","was_banned":false}"#.into())
    );
    again.login("Vic").await;
}

#[tokio::test]
async fn admins_list_and_delete_hubs() {
    let server = admin_server().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let mut ann = server.client().await;
    ann.register("ann").await;
    ann.ok(json!({"type":"hub_create","hub":"open"})).await;
    ann.ok(json!({"type":"hub_create","hub":"hidden","private":true}))
        .await;
    let mut bob = server.client().await;
    bob.register("bob").await;
    bob.ok(json!({"type":"hub_join","hub":"open"})).await;
    bob.send("open/general", "soon gone").await;

    let (status, body) = http(server.addr, "GET", "/admin/hubs", &auth, "").await;
    assert_eq!(status, 200);
    let hubs: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        hubs["hubs"],
        json!([{"hub":"hidden","title":"","private":true,"member_count":1},
               {"hub":"open","title":"","private":false,"member_count":2}]),
        "private hubs too"
    );
    let (status, body) = http(server.addr, "POST", "/admin/hubs/open/delete", &auth, "").await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"hub":"open","members":2}"#)
    );
    let kicked = loop {
        let e = bob.event().await;
        if e["type"] == "kicked" {
            break e;
        }
    };
    assert_eq!(
        kicked,
        json!({"type":"kicked","hub":"open","by":"an administrator","reason":"the hub was deleted"})
    );
    assert_eq!(bob.ok(json!({"type":"rooms"})).await["rooms"], json!([]));
    assert_eq!(
        bob.error(json!({"type":"history","room":"open/general"}))
            .await,
        "not_found"
    );
    let (status, _) = http(server.addr, "POST", "/admin/hubs/open/delete", &auth, "").await;
    assert_eq!(status, 404);
    let (status, _) = http(server.addr, "POST", "/admin/hubs/a%20b/delete", &auth, "").await;
    assert_eq!(status, 400);
    // The name can be used again, from nothing.
    let fresh = bob.ok(json!({"type":"hub_create","hub":"open"})).await;
    assert_eq!(fresh["channels"][0]["last_seq"], 0);
}

#[tokio::test]
async fn operators_delete_messages_through_the_admin_api() {
    let server = admin_server().await;
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let mut ann = server.client().await;
    ann.register("ann").await;
    ann.join("room").await;
    let seq = ann.send("room", "regrettable").await;
    let _ = ann.event_of("message").await;
    let mut olga = server.client().await;
    olga.register("Olga").await;
    let delete = |body: &'static str| {
        http(
            server.addr,
            "POST",
            "/admin/rooms/room/messages/1/delete",
            &auth,
            body,
        )
    };
    assert_eq!(delete(r#"{"by":"olga"}"#).await.0, 403, "no operator yet");
    assert_eq!(delete("{}").await.0, 400);
    let store = confab_testkit::confab_server::open_store(&server.config)
        .await
        .unwrap();
    let olga_name = confab_core::UserName::parse("olga").unwrap();
    store.set_operator(&olga_name, true).await.unwrap();
    let (status, body) = delete(r#"{"by":"olga"}"#).await;
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"delete":1,"room":"room","seq":2}"#)
    );
    let entry = ann.event_of("message").await;
    assert_eq!(
        (&entry["user"], &entry["delete"]),
        (&json!("Olga"), &json!(seq))
    );
    let page = ann.ok(json!({"type":"history","room":"room"})).await;
    assert!(!page.to_string().contains("regrettable"));
    assert_eq!(delete(r#"{"by":"olga"}"#).await.0, 404, "deleted already");
    let (status, _) = http(
        server.addr,
        "POST",
        "/admin/rooms/nowhere/messages/1/delete",
        &auth,
        r#"{"by":"olga"}"#,
    )
    .await;
    assert_eq!(status, 404);
    // Over the protocol too, an operator deletes in a room it is not in.
    let other = ann.send("room", "another").await;
    olga.ok(json!({"type":"delete","room":"room","seq":other}))
        .await;
}

fn confab() -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_confab"));
    for (k, _) in std::env::vars() {
        if k.starts_with("CONFAB_") {
            c.env_remove(k);
        }
    }
    c
}

/// `confab user ACTION… --database DB`: flags go after the action too.
async fn user_command(db: &str, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = confab()
        .arg("user")
        .args(args)
        .args(["--database", db])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .await
        .unwrap();
    let out = child.wait_with_output().await.unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test]
async fn user_commands_then_a_login_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("confab.db").display());
    assert_eq!(
        user_command(&db, &["add", "Carol"], "first-password\n").await,
        (true, "added Carol\n".into())
    );
    let (ok, text) = user_command(&db, &["add", "carol"], "other-password\n").await;
    assert!(!ok && text.contains("taken"), "{text}");
    let (ok, text) = user_command(&db, &["add", "dave"], "short\n").await;
    assert!(!ok && text.contains("at least 8"), "{text}");
    user_command(&db, &["add", "erin"], "erin-password\n").await;
    assert_eq!(
        user_command(&db, &["list"], "").await,
        (true, "Carol\nerin\n".into())
    );
    assert_eq!(
        user_command(&db, &["op", "carol"], "").await,
        (true, "carol is an operator now\n".into())
    );
    assert_eq!(
        user_command(&db, &["deop", "carol"], "").await,
        (true, "carol is no operator now\n".into())
    );
    let (ok, text) = user_command(&db, &["op", "nobody"], "").await;
    assert!(!ok && text.contains("no user named nobody"), "{text}");

    let server = TestServer::with_config(|c| {
        c.database = confab_testkit::confab_server::Database::parse(&db).unwrap();
    })
    .await;
    let mut c = server.client().await;
    let r = c
        .ok(json!({"type":"login","user":"carol","password":"first-password"}))
        .await;
    let token = r["token"].as_str().unwrap().to_owned();

    let (ok, text) = user_command(&db, &["passwd", "carol"], "second-password\n").await;
    assert!(ok, "{text}");
    let mut again = server.client().await;
    assert_eq!(
        again.error(json!({"type":"resume","token":token})).await,
        "unauthorized",
        "tokens revoked"
    );
    assert_eq!(
        again
            .error(json!({"type":"login","user":"carol","password":"first-password"}))
            .await,
        "unauthorized"
    );
    again
        .ok(json!({"type":"login","user":"carol","password":"second-password"}))
        .await;

    // Erin is connected on both transports when another process deletes
    // her: the server closes both within its poll of the deletion log.
    let mut erin_ws = server.client().await;
    erin_ws
        .ok(json!({"type":"login","user":"erin","password":"erin-password"}))
        .await;
    let mut erin_line = server.line_client().await;
    erin_line.say("/login erin erin-password").await;
    assert_eq!(
        user_command(&db, &["delete", "erin"], "").await,
        (true, "deleted erin\n".into())
    );
    assert_eq!(
        erin_ws.closed().await,
        (1008, "disconnected by an administrator".into())
    );
    assert_eq!(
        erin_line.until_closed().await,
        ["! disconnected by an administrator"]
    );
    let mut gone = server.client().await;
    assert_eq!(
        gone.error(json!({"type":"login","user":"erin","password":"erin-password"}))
            .await,
        "unauthorized"
    );
    let (ok, text) = user_command(&db, &["delete", "erin"], "").await;
    assert!(!ok && text.contains("no user named erin"), "{text}");
}

#[tokio::test]
async fn json_logs_carry_the_connection_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("confab.db").display());
    let mut child = confab()
        .args([
            "serve",
            "--http",
            "127.0.0.1:0",
            "--line",
            "off",
            "--database",
            &db,
        ])
        .args(["--log-format", "json", "--log-level", "info"])
        .env("CONFAB_ADMIN_TOKEN", TOKEN)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let mut next = async || -> Value {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("a log line")
            .unwrap()
            .expect("confab is running");
        seen.push(line.clone());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    };
    let addr: std::net::SocketAddr = loop {
        let entry = next().await;
        if entry["fields"]["message"] == "listening for HTTP and WebSocket" {
            break entry["fields"]["addr"].as_str().unwrap().parse().unwrap();
        }
    };
    let mut c = WsClient::connect(&format!("ws://{addr}/ws")).await;
    c.ok(json!({"type":"register","user":"logged","password":"sekrit-password"}))
        .await;
    c.join("r").await;
    c.send("r", "a very private body").await;
    let bearer = format!("Bearer {TOKEN}");
    http(
        addr,
        "POST",
        "/admin/users/logged/disconnect",
        &[("Authorization", bearer.as_str())],
        "",
    )
    .await;
    let kicked = loop {
        let entry = next().await;
        if entry["fields"]["message"] == "disconnected by an administrator" {
            break entry;
        }
    };
    let span = &kicked["span"];
    assert_eq!(span["name"], "conn");
    assert_eq!(span["transport"], "ws");
    assert_eq!(span["user"], "logged");
    assert!(span["id"].as_u64().is_some());
    assert!(span["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    let all = seen.join("\n");
    for secret in ["sekrit-password", "a very private body", TOKEN] {
        assert!(!all.contains(secret), "{secret} was logged");
    }
}

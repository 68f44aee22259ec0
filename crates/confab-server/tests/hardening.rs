//! Limits, timeouts, rate limits and the content filter, each provoked
//! over the wire.

use std::time::Duration;

use confab_testkit::confab_server::config::Networks;
use confab_testkit::confab_server::{Config, FilterRule, Rate, RateLimits};
use confab_testkit::serde_json::json;
use confab_testkit::tokio_tungstenite::tungstenite;
use confab_testkit::{connect_from, LineClient, TestServer, WsClient};
use tokio::io::AsyncReadExt;

/// The HTTP status of a refused WebSocket upgrade from `from`.
async fn refused_upgrade(server: &TestServer, from: [u8; 4]) -> u16 {
    let stream = connect_from(from, server.addr).await;
    match confab_testkit::tokio_tungstenite::client_async(server.ws_url(), stream).await {
        Err(tungstenite::Error::Http(response)) => response.status().as_u16(),
        Ok(_) => panic!("the upgrade was accepted"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

async fn ws_from(server: &TestServer, from: [u8; 4]) -> WsClient {
    WsClient::upgrade(&server.ws_url(), connect_from(from, server.addr).await).await
}

#[tokio::test]
async fn connection_limits_refuse_clearly() {
    let server = TestServer::with_config(|c| {
        c.max_connections = 4;
        c.max_connections_per_ip = 2;
        c.exempt_networks = Networks::default(); // loopback is exempt by default
    })
    .await;
    // Two from 127.0.0.1 fill its share, over either transport.
    let _a = ws_from(&server, [127, 0, 0, 1]).await;
    let _b = LineClient::over(connect_from([127, 0, 0, 1], server.line_addr).await).await;
    assert_eq!(refused_upgrade(&server, [127, 0, 0, 1]).await, 503);
    let mut refused = LineClient::over(connect_from([127, 0, 0, 1], server.line_addr).await).await;
    assert_eq!(
        refused.greeting,
        "! unavailable: too many connections from your address"
    );
    assert!(refused.until_closed().await.is_empty());
    // Another address still gets in, until the server is full.
    let mut c = ws_from(&server, [127, 0, 0, 2]).await;
    c.guest("c").await;
    let _d = ws_from(&server, [127, 0, 0, 3]).await;
    assert_eq!(refused_upgrade(&server, [127, 0, 0, 4]).await, 503);
    let full = LineClient::over(connect_from([127, 0, 0, 4], server.line_addr).await).await;
    assert_eq!(
        full.greeting,
        "! unavailable: the server has too many connections; try again later"
    );
    // Plain HTTP is not a chat connection and is not counted.
    assert_eq!(c.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn silent_connections_time_out_and_slow_nobody_down() {
    // Short deadlines, but long enough for the real client to log in on a
    // busy machine.
    let server = TestServer::with_config(|c| {
        c.handshake_timeout = Duration::from_millis(500);
        c.login_timeout = Duration::from_secs(3);
    })
    .await;
    // 200 connections that open and say nothing, on each listener.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
        silent.push(
            tokio::net::TcpStream::connect(server.line_addr)
                .await
                .unwrap(),
        );
    }
    // A real client is served as usual meanwhile.
    let mut real = server.client().await;
    real.register("real").await;
    real.join("r").await;
    assert_eq!(real.send("r", "not slowed down").await, 1);
    // Then every silent connection is closed by the server.
    for mut s in silent {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a silent connection was not closed");
    }
    // The logged-in client is not subject to the login timeout.
    assert_eq!(real.request(json!({"type":"ping"})).await["type"], "pong");
}

#[tokio::test]
async fn connections_that_never_log_in_are_closed() {
    let server = TestServer::with_config(|c| c.login_timeout = Duration::from_millis(300)).await;
    let mut ws = server.client().await;
    assert_eq!(ws.closed().await, (1008, "login timeout".to_owned()));
    let mut line = server.line_client().await;
    assert_eq!(
        line.until_closed().await,
        ["! unauthorized: you did not log in in time; disconnecting"]
    );
}

fn limits(tweak: impl FnOnce(&mut RateLimits)) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        let mut l = RateLimits::off();
        tweak(&mut l);
        c.chat.rate_limits = l;
    }
}

#[tokio::test]
async fn message_bursts_are_allowed_floods_refused_truthfully() {
    // A token every 2 s: five sends take far less, so the sixth waits.
    let server = TestServer::with_config(limits(|l| l.messages = Some(Rate::new(0.5, 5)))).await;
    let mut c = server.client().await;
    c.guest("burst").await;
    c.join("r").await;
    for _ in 0..5 {
        c.send("r", "ok").await;
    }
    let refused = c
        .request(json!({"type":"send","room":"r","body":"one too many"}))
        .await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    let wait = refused["retry_after_ms"].as_u64().unwrap();
    assert!((1..=2000).contains(&wait), "a token every 2 s: {wait}");
    // Waiting what it said is enough.
    tokio::time::sleep(Duration::from_millis(wait)).await;
    c.send("r", "after waiting").await;
    // Other requests are not messages.
    c.ok(json!({"type":"rooms"})).await;
}

#[tokio::test]
async fn a_user_is_limited_across_connections() {
    let server =
        TestServer::with_config(limits(|l| l.user_messages = Some(Rate::new(0.01, 3)))).await;
    let mut a = server.client().await;
    a.register("multi").await;
    a.join("r").await;
    let mut b = server.client().await;
    b.login("multi").await;
    a.send("r", "1").await;
    a.send("r", "2").await;
    b.send("r", "3").await;
    let refused = b
        .request(json!({"type":"send","room":"r","body":"4"}))
        .await;
    assert_eq!(refused["code"], "rate_limited");
    let mut other = server.client().await;
    other.guest("other").await;
    other.join("r").await;
    other.send("r", "someone else is fine").await;
}

#[tokio::test]
async fn requests_in_general_are_limited() {
    let server = TestServer::with_config(limits(|l| l.requests = Some(Rate::new(0.01, 4)))).await;
    let mut c = server.client().await;
    c.guest("asker").await;
    for _ in 0..3 {
        c.ok(json!({"type":"rooms"})).await;
    }
    assert_eq!(c.error(json!({"type":"rooms"})).await, "rate_limited");
    assert_eq!(
        c.request(json!({"type":"ping"})).await["type"],
        "pong",
        "ping is free"
    );
}

#[tokio::test]
async fn password_guessing_is_slowed_per_address_and_per_account() {
    let server = TestServer::with_config(|c| {
        limits(|l| {
            l.auth_per_account = Some(Rate::new(0.01, 3));
            l.auth_per_ip = Some(Rate::new(0.01, 6));
        })(c);
        c.exempt_networks = Networks::default();
    })
    .await;
    let mut owner = server.client().await;
    owner.register("target").await; // 1 for target, 1 for the address
    let mut c = server.client().await;
    let guess = |pw: &str| json!({"type":"login","user":"target","password":pw});
    assert_eq!(c.error(guess("wrong-one")).await, "unauthorized");
    assert_eq!(c.error(guess("wrong-two")).await, "unauthorized");
    // The account's bucket is empty: even the right password waits.
    let limited = c.request(guess("password-target")).await;
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retry_after_ms"].as_u64().unwrap() > 1000);
    // Another account from the same address: two left for the address.
    let mut d = server.client().await;
    d.register("second").await;
    let mut e = server.client().await;
    e.register("third").await;
    let mut f = server.client().await;
    let r = f
        .request(json!({"type":"register","user":"fourth","password":"long enough"}))
        .await;
    assert_eq!(r["code"], "rate_limited", "the address's bucket is empty");
    // From another address, registering works.
    let mut g = ws_from(&server, [127, 0, 0, 9]).await;
    g.register("fifth").await;
}

#[tokio::test]
async fn repeated_abuse_closes_with_4029() {
    let server = TestServer::with_config(limits(|l| {
        l.messages = Some(Rate::new(0.01, 2));
        l.abuse_refusals = 3;
        l.abuse_window = Duration::from_secs(60);
    }))
    .await;
    let mut c = server.client().await;
    c.guest("flooder").await;
    c.join("r").await;
    c.send("r", "1").await;
    c.send("r", "2").await;
    assert_eq!(
        c.error(json!({"type":"send","room":"r","body":"3"})).await,
        "rate_limited"
    );
    assert_eq!(
        c.error(json!({"type":"send","room":"r","body":"4"})).await,
        "rate_limited"
    );
    let last = c
        .request(json!({"type":"send","room":"r","body":"5"}))
        .await;
    assert_eq!(last["code"], "rate_limited");
    assert!(last["message"].as_str().unwrap().contains("disconnecting"));
    assert_eq!(c.closed().await, (4029, "rate limit abuse".to_owned()));

    let mut line = server.line_client().await;
    line.say("/nick lineflood").await;
    line.say("/join r").await;
    line.say("1").await;
    line.say("2").await;
    line.say("3").await;
    line.say("4").await;
    line.send("5").await;
    assert_eq!(
        line.until_closed().await,
        ["! rate_limited: too many messages, too often: disconnecting"]
    );
}

#[tokio::test]
async fn the_content_filter_refuses_with_its_reason() {
    let server = TestServer::with_config(|c| {
        c.chat.filter = confab_testkit::confab_server::ContentFilter::new(&[FilterRule {
            pattern: r"\bbuy\s+now\b".into(),
            reason: "no advertising".into(),
        }])
        .unwrap();
    })
    .await;
    let mut c = server.client().await;
    c.guest("seller").await;
    c.join("market").await;
    let r = c
        .request(json!({"type":"send","room":"market","body":"BUY  now!"}))
        .await;
    assert_eq!(
        (r["code"].as_str(), r["message"].as_str()),
        (
            Some("forbidden"),
            Some("refused by the content filter: no advertising")
        )
    );
    let r = c
        .request(json!({"type":"topic","room":"market","topic":"buy now"}))
        .await;
    assert_eq!(r["code"], "forbidden");
    c.send("market", "buyers welcome").await;
    let mut line = server.line_client().await;
    line.say("/nick liner").await;
    line.say("/join market").await;
    assert_eq!(
        line.say("buy now").await,
        ["! forbidden: refused by the content filter: no advertising"]
    );
}

#[tokio::test]
async fn a_developers_own_scripts_on_loopback_are_not_throttled_per_address() {
    // The defaults: 20 logins at once per address, 256 connections.
    let server = TestServer::with_config(|c| c.max_connections_per_ip = 5).await;
    let mut clients = Vec::new();
    for i in 0..30 {
        let name = format!("script{i}");
        let mut c = server.client().await;
        c.register(&name).await;
        let mut again = server.client().await;
        again.login(&name).await;
        clients.extend([c, again]);
    }
    // An address outside the exempt networks is still limited.
    let server = TestServer::with_config(|c| {
        c.max_connections_per_ip = 5;
        c.exempt_networks = Networks::parse(&["127.0.0.1/32"]).unwrap();
    })
    .await;
    let _held: Vec<_> = futures_util::future::join_all(
        (0..5).map(|_| async { ws_from(&server, [127, 0, 0, 2]).await }),
    )
    .await;
    assert_eq!(refused_upgrade(&server, [127, 0, 0, 2]).await, 503);
    let _more: Vec<_> = futures_util::future::join_all(
        (0..8).map(|_| async { ws_from(&server, [127, 0, 0, 1]).await }),
    )
    .await;
}

/// Connections through a proxy at 127.0.0.1, counted per client address.
async fn behind_a_proxy(trusted: &[&str]) -> TestServer {
    let trusted = Networks::parse(trusted).unwrap();
    TestServer::with_config(move |c| {
        c.max_connections_per_ip = 1;
        c.exempt_networks = Networks::default();
        c.trusted_proxies = trusted;
        c.admin_token = Some(confab_testkit::confab_server::settings::Secret::new("t"));
    })
    .await
}

async fn ws_forwarded(server: &TestServer, header: (&str, &str)) -> Result<WsClient, u16> {
    use confab_testkit::tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use confab_testkit::tokio_tungstenite::tungstenite::Error;
    let mut request = server.ws_url().into_client_request().unwrap();
    let name = tungstenite::http::HeaderName::from_bytes(header.0.as_bytes()).unwrap();
    request
        .headers_mut()
        .insert(name, header.1.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let tcp: confab_testkit::BoxedIo = Box::new(tcp);
    match confab_testkit::tokio_tungstenite::client_async(request, tcp).await {
        Ok((ws, _)) => Ok(WsClient::over(ws).await),
        Err(Error::Http(response)) => Err(response.status().as_u16()),
        Err(e) => panic!("upgrade failed: {e}"),
    }
}

#[tokio::test]
async fn forwarded_headers_name_the_client_when_the_proxy_is_trusted() {
    let server = behind_a_proxy(&["127.0.0.1/32"]).await;
    let xff = ("x-forwarded-for", "203.0.113.1");
    let _first = ws_forwarded(&server, xff).await.unwrap();
    assert_eq!(
        ws_forwarded(&server, ("x-forwarded-for", "198.51.100.7, 203.0.113.1"))
            .await
            .err(),
        Some(503),
        "the same client (what it wrote itself is not believed)"
    );
    let _other = ws_forwarded(&server, ("forwarded", "for=203.0.113.2;proto=http"))
        .await
        .unwrap();
    let mut v6 = ws_forwarded(&server, ("forwarded", r#"for="[2001:db8::5]:4711""#))
        .await
        .unwrap();
    v6.guest("sixer").await;
    // Operators see the client's address, not the proxy's.
    let (_, users) = confab_testkit::http(
        server.addr,
        "GET",
        "/admin/users",
        &[("Authorization", "Bearer t")],
        "",
    )
    .await;
    assert!(users.contains(r#""addresses":["2001:db8::5"]"#), "{users}");

    // From a peer that is not a trusted proxy, the header means nothing:
    // every connection counts against 127.0.0.1 itself.
    let server = behind_a_proxy(&["10.0.0.0/8"]).await;
    let _first = ws_forwarded(&server, xff).await.unwrap();
    assert_eq!(
        ws_forwarded(&server, ("x-forwarded-for", "203.0.113.99"))
            .await
            .err(),
        Some(503)
    );
}

#[tokio::test]
async fn the_line_listener_takes_the_proxy_protocol_from_trusted_proxies() {
    use tokio::io::AsyncWriteExt;
    let server = behind_a_proxy(&["127.0.0.1/32"]).await;
    async fn to(addr: std::net::SocketAddr, header: Vec<u8>) -> LineClient {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&header).await.unwrap();
        LineClient::over(Box::new(tcp)).await
    }
    let through = |header: Vec<u8>| to(server.line_addr, header);
    let v1 = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 40000 7777\r\n").into_bytes();
    let mut first = through(v1("203.0.113.7")).await;
    assert!(
        first.greeting.starts_with("* welcome"),
        "{}",
        first.greeting
    );
    assert_eq!(
        first.say("/nick proxied").await,
        ["* you are proxied; /join ROOM to talk, /help for more"]
    );
    let again = through(v1("203.0.113.7")).await;
    assert_eq!(
        again.greeting,
        "! unavailable: too many connections from your address"
    );
    // Version 2, binary, from another client.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[203, 0, 113, 8, 127, 0, 0, 1, 0x9c, 0x40, 0x1e, 0x61]);
    let second = through(v2).await;
    assert!(
        second.greeting.starts_with("* welcome"),
        "{}",
        second.greeting
    );
    // A trusted proxy must send the header: a bare connection is dropped.
    let mut bare = tokio::net::TcpStream::connect(server.line_addr)
        .await
        .unwrap();
    bare.write_all(b"/nick sneaky\n/nick sneaky2\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut bare, &mut rest),
    )
    .await
    .unwrap()
    .ok();
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));

    // From an untrusted peer, a PROXY line is just a line.
    let untrusting = behind_a_proxy(&["10.0.0.0/8"]).await;
    let mut c = to(untrusting.line_addr, v1("203.0.113.7")).await;
    assert!(c.greeting.starts_with("* welcome"));
    let refusal = "! bad_request: you are not in a room: /join ROOM first";
    assert_eq!(
        c.say("hello").await,
        [refusal, refusal],
        "the header was read as a chat line, not believed"
    );
}

#[tokio::test]
async fn a_client_that_sends_and_never_reads_is_cut_off_when_its_writes_stall() {
    let server = TestServer::with_config(|c| {
        c.write_stall = Duration::from_millis(300);
        c.chat.rate_limits = RateLimits::off();
        c.database
            .set_durability(confab_testkit::confab_server::Durability::Normal);
    })
    .await;
    let mut seeder = server.client().await;
    seeder.register("seeder").await;
    seeder.join("big").await;
    let body = "z".repeat(4000);
    for _ in 0..100 {
        seeder.send("big", &body).await;
    }
    let mut stuck = server.client().await;
    stuck.register("stuck").await;
    stuck.join("big").await;
    // Only requests, each answered with about 400 KB, and nothing read:
    // only replies fill the socket, no event overflows the queue.
    for id in 0..100 {
        stuck
            .send_json(&json!({"type":"history","room":"big","limit":100,"id":id}))
            .await;
    }
    // The others see it go; it is closed as a slow consumer.
    let mut messages = 0;
    loop {
        let e = seeder.event().await;
        messages += u32::from(e["type"] == "message");
        if e["type"] == "presence" && e["user"] == "stuck" && e["online"] == false {
            break;
        }
    }
    // Closed as a slow consumer; the close frame may not arrive: the
    // requests it sent and the server never read make the close a reset.
    if let Some((code, _)) = stuck.closed_or_reset().await {
        assert_eq!(code, 4008);
    }
    seeder.send("big", "still here").await;
    loop {
        let e = seeder.event().await;
        if e["type"] == "message" {
            messages += 1;
            if e["body"] == "still here" {
                break;
            }
        }
    }
    assert_eq!(messages, 101, "the other member got every message");
}

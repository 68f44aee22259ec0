//! Every request, reply, event and provokable error code of the WebSocket
//! protocol, against a real server over a real socket.

use confab_testkit::confab_server::Rate;
use confab_testkit::serde_json::{json, Value};
use confab_testkit::Message;
use confab_testkit::{Store, TestServer, WsClient};

async fn registered(server: &TestServer, user: &str) -> WsClient {
    let mut c = server.client().await;
    c.register(user).await;
    c
}

async fn hello_ping_and_ids(store: Store) {
    let server = store.spawn().await;
    let mut c = server.client().await;
    assert_eq!(
        c.hello,
        json!({"type":"hello","server":"confab","version":"0.1.0","node":server.config.node,
               "heartbeat_ms":30000,"limits":{"max_body_bytes":4096,"max_frame_bytes":65536}})
    );
    assert_eq!(
        c.request(json!({"type":"ping"})).await,
        json!({"type":"pong","id":1})
    );
    c.send_json(&json!({"type":"ping","id":"abc"})).await;
    assert_eq!(c.frame().await, json!({"type":"pong","id":"abc"}));
    c.send_json(&json!({"type":"ping"})).await;
    assert_eq!(
        c.frame().await,
        json!({"type":"pong"}),
        "no id, none echoed"
    );
}

async fn malformed_frames_get_errors_and_keep_the_session(store: Store) {
    let server = store.spawn().await;
    let mut c = registered(&server, "alice").await;
    for bad in ["not json", "[1,2]", "{}", "{\"type\":17}", "\"str\""] {
        c.send_raw(Message::text(bad)).await;
        let e = c.frame().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{bad}: {e}"
        );
        assert!(e.get("id").is_none());
    }
    let e = c.request(json!({"type":"fly"})).await;
    assert_eq!(e["code"], "bad_request");
    assert_eq!(e["message"], "unknown request type `fly`");
    assert_eq!(e["id"], 2, "the id is echoed when it could be read");
    let e = c.request(json!({"type":"read","room":"x","seq":"5"})).await;
    assert_eq!(e["code"], "bad_request");
    c.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    let e = c.frame().await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("binary"));
    // Still logged in as alice.
    let r = c.join("general").await;
    assert_eq!(
        r["members"],
        json!([{"user":"alice","online":true,"role":"owner"}])
    );
}

/// RFC 6455 as clients use it: a text message may come in fragments, with
/// a control frame between them; a client's ping is answered; a frame
/// that breaks the protocol (unmasked) closes with 1002.
async fn fragmented_messages_are_whole_requests(store: Store) {
    use confab_testkit::tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use confab_testkit::tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let server = store.spawn().await;
    let mut c = server.client().await;
    let request = r#"{"type":"ping","id":"in pieces"}"#.as_bytes();
    let piece =
        |data: &[u8], opcode, last| Message::Frame(Frame::message(data.to_vec(), opcode, last));
    c.send_raw(piece(&request[..5], OpCode::Data(Data::Text), false))
        .await;
    c.send_raw(Message::Ping(vec![7u8].into())).await;
    c.send_raw(piece(&request[5..20], OpCode::Data(Data::Continue), false))
        .await;
    c.send_raw(piece(&request[20..], OpCode::Data(Data::Continue), true))
        .await;
    assert_eq!(c.frame().await, json!({"type":"pong","id":"in pieces"}));

    // An unmasked frame, written on the socket by hand.
    let (mut raw, _) = confab_testkit::tokio_tungstenite::client_async(
        server.ws_url(),
        tokio::net::TcpStream::connect(server.addr).await.unwrap(),
    )
    .await
    .unwrap();
    use confab_testkit::tokio_tungstenite::tungstenite::Message as M;
    use futures_util::StreamExt;
    let hello = raw.next().await.unwrap().unwrap();
    assert!(matches!(hello, M::Text(_)));
    let stream = raw.get_mut();
    tokio::io::AsyncWriteExt::write_all(stream, &[0x81, 0x02, b'h', b'i'])
        .await
        .unwrap();
    match raw.next().await {
        Some(Ok(M::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1002),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

/// Read an HTTP response head byte by byte (so nothing after it is taken).
async fn response_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let byte = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_u8())
            .await
            .expect("a response in time")
            .expect("a response");
        head.push(byte);
    }
    String::from_utf8(head).unwrap()
}

/// A client's text frame, masked, by hand.
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// An upgrade as clients really send it: the request in pieces, a frame
/// right behind it before any answer; and an upgrade that comes after
/// another request on a kept-alive connection.
async fn upgrades_in_pieces_with_a_frame_behind_and_after_another_request(store: Store) {
    use confab_testkit::tokio_tungstenite::{tungstenite::protocol::Role, WebSocketStream};
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    let server = store.spawn().await;
    let upgrade = "GET /ws?from=test HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\n\r\n";
    let (first, second) = upgrade.split_at(30);
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(first.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    tokio::task::yield_now().await;
    let mut rest = second.as_bytes().to_vec();
    rest.extend(masked_text(r#"{"type":"ping","id":"early"}"#));
    stream.write_all(&rest).await.unwrap();
    let head = response_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    // RFC 6455's own example key and answer.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let mut texts = Vec::new();
    for _ in 0..2 {
        let frame = ws.next().await.unwrap().unwrap();
        texts.push(serde_json::from_str::<Value>(frame.to_text().unwrap()).unwrap());
    }
    assert_eq!(texts[0]["type"], "hello");
    assert_eq!(texts[1], json!({"type":"pong","id":"early"}));

    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    stream.write_all(healthz.as_bytes()).await.unwrap();
    let head = response_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    let mut body = [0u8; 3];
    tokio::io::AsyncReadExt::read_exact(&mut stream, &mut body)
        .await
        .unwrap();
    assert_eq!(&body, b"ok\n");
    stream.write_all(upgrade.as_bytes()).await.unwrap();
    let head = response_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    let hello = ws.next().await.unwrap().unwrap();
    assert!(hello.to_text().unwrap().contains(r#""type":"hello""#));
}

/// What is not a WebSocket upgrade is refused with words: 400 without the
/// upgrade headers, 426 naming the version for another version.
async fn bad_upgrades_are_refused(store: Store) {
    let server = store.spawn().await;
    let (status, body) = confab_testkit::http(server.addr, "GET", "/ws", &[], "").await;
    assert_eq!((status, body.contains("WebSocket")), (400, true), "{body}");
    let upgrade = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "8"),
    ];
    let (status, body) = confab_testkit::http(server.addr, "GET", "/ws", &upgrade, "").await;
    assert_eq!(status, 426, "{body}");
    assert!(body.contains("version 13"), "{body}");
}

async fn frames_over_the_limit_close_with_1009(store: Store) {
    let server = store.spawn().await;
    let mut c = server.client().await;
    let big = format!(
        "{{\"type\":\"ping\",\"pad\":\"{}\"}}",
        "x".repeat(70 * 1024)
    );
    c.send_raw(Message::text(big)).await;
    assert_eq!(c.closed().await.0, 1009);
}

async fn only_login_requests_before_login(store: Store) {
    let server = store.spawn().await;
    let mut c = server.client().await;
    for req in [
        json!({"type":"join","room":"r"}),
        json!({"type":"send","room":"r","body":"x"}),
        json!({"type":"rooms"}),
        json!({"type":"sync"}),
        json!({"type":"logout"}),
    ] {
        assert_eq!(c.error(req).await, "unauthorized");
    }
}

async fn register_login_resume_logout(store: Store) {
    let server = store.spawn().await;
    let mut c = server.client().await;
    let r = c
        .ok(json!({"type":"register","user":"Alice","password":"password-Alice"}))
        .await;
    assert_eq!(r["user"], "Alice");
    let token = r["token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 64);
    assert_eq!(
        c.error(json!({"type":"login","user":"Alice","password":"password-Alice"}))
            .await,
        "bad_request",
        "already logged in"
    );

    let mut other = server.client().await;
    let pw = |u: &str, p: &str| json!({"type":"register","user":u,"password":p});
    assert_eq!(other.error(pw("alice", "long enough")).await, "conflict");
    assert_eq!(other.error(pw("bob", "short")).await, "bad_request");
    assert_eq!(other.error(pw("bob", &"x".repeat(257))).await, "too_large");
    assert_eq!(other.error(pw("9bob", "long enough")).await, "bad_request");

    let wrong = other
        .request(json!({"type":"login","user":"alice","password":"wrong password"}))
        .await;
    let unknown = other
        .request(json!({"type":"login","user":"nobody","password":"wrong password"}))
        .await;
    assert_eq!(wrong["code"], "unauthorized");
    assert_eq!(
        (wrong["code"].clone(), wrong["message"].clone()),
        (unknown["code"].clone(), unknown["message"].clone()),
        "unknown user and wrong password look the same"
    );
    let r = other
        .ok(json!({"type":"login","user":"ALICE","password":"password-Alice"}))
        .await;
    assert_eq!(r["user"], "Alice", "the name as registered");
    assert_ne!(r["token"].as_str().unwrap(), token, "a new token per login");

    let mut third = server.client().await;
    assert_eq!(
        third.ok(json!({"type":"resume","token":token})).await["user"],
        "Alice"
    );
    third.ok(json!({"type":"logout"})).await;
    assert_eq!(third.error(json!({"type":"rooms"})).await, "unauthorized");
    assert_eq!(
        third.request(json!({"type":"ping"})).await["type"],
        "pong",
        "still open"
    );
    let mut fourth = server.client().await;
    assert_eq!(
        fourth.error(json!({"type":"resume","token":token})).await,
        "unauthorized",
        "logout revoked the token"
    );
    assert_eq!(
        fourth
            .error(json!({"type":"resume","token":"nonsense"}))
            .await,
        "unauthorized"
    );
}

async fn guests_come_and_go(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    alice.join("lobby").await;

    let mut g = server.client().await;
    assert_eq!(
        g.ok(json!({"type":"guest","user":"Visitor"})).await,
        json!({"type":"ok","id":1,"user":"Visitor"})
    );
    let mut g2 = server.client().await;
    assert_eq!(
        g2.error(json!({"type":"guest","user":"visitor"})).await,
        "conflict"
    );
    assert_eq!(
        g2.error(json!({"type":"guest","user":"alice"})).await,
        "conflict"
    );
    assert_eq!(
        g2.error(json!({"type":"register","user":"visitor","password":"long enough"}))
            .await,
        "conflict",
        "a connected guest's name cannot be registered"
    );

    g.join("lobby").await;
    assert_eq!(
        alice.event_of("joined").await,
        json!({"type":"joined","room":"lobby","user":"Visitor"})
    );
    g.send("lobby", "hi from a guest").await;
    assert_eq!(alice.event_of("message").await["user"], "Visitor");
    drop(g);
    assert_eq!(
        alice.event_of("presence").await,
        json!({"type":"presence","user":"Visitor","online":false})
    );
    assert_eq!(
        alice.event_of("left").await,
        json!({"type":"left","room":"lobby","user":"Visitor"})
    );
    let members = alice.ok(json!({"type":"members","room":"lobby"})).await;
    assert_eq!(
        members["members"],
        json!([{"user":"alice","online":true,"role":"owner"}])
    );
    g2.guest("visitor").await; // the name is free again
}

async fn guests_can_be_turned_off(store: Store) {
    let server = store.with_config(|c| c.chat.allow_guests = false).await;
    let mut c = server.client().await;
    assert_eq!(
        c.error(json!({"type":"guest","user":"g"})).await,
        "forbidden"
    );
}

async fn rooms_members_topics_and_their_events(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    let mut bob = registered(&server, "bob").await;

    let r = alice.join("General").await;
    assert_eq!(
        r,
        json!({"type":"ok","id":2,"room":"general","topic":"","members":[{"user":"alice","online":true,"role":"owner"}],"members_more":false,"last_seq":0})
    );
    alice
        .ok(json!({"type":"topic","room":"general","topic":"All things"}))
        .await;
    assert_eq!(
        alice.event_of("topic").await,
        json!({"type":"topic","room":"general","topic":"All things","user":"alice"})
    );
    let r = bob.join("general").await;
    assert_eq!(r["topic"], "All things");
    assert_eq!(
        r["members"],
        json!([{"user":"alice","online":true,"role":"owner"},{"user":"bob","online":true,"role":"member"}])
    );
    assert_eq!(
        alice.event_of("joined").await,
        json!({"type":"joined","room":"general","user":"bob"})
    );
    bob.join("general").await; // joining again is fine and announces nothing
    alice.assert_no_event().await;

    alice.send("general", "one").await;
    alice.send("general", "two").await;
    bob.join("side").await;
    let rooms = bob.ok(json!({"type":"rooms"})).await;
    assert_eq!(
        rooms["rooms"],
        json!([
            {"room":"general","topic":"All things","member_count":2,"last_seq":2,"unread":2},
            {"room":"side","topic":"","member_count":1,"last_seq":0,"unread":0}
        ])
    );
    let all = alice.ok(json!({"type":"rooms","all":true})).await;
    assert_eq!(
        all["rooms"][1],
        json!({"room":"side","topic":"","member_count":1,"last_seq":0,"unread":0})
    );

    assert_eq!(
        bob.ok(json!({"type":"members","room":"side"})).await["members"],
        json!([{"user":"bob","online":true,"role":"owner"}])
    );
    assert_eq!(
        bob.error(json!({"type":"members","room":"nowhere"})).await,
        "not_found"
    );
    assert_eq!(
        bob.error(json!({"type":"join","room":"no spaces"})).await,
        "bad_request"
    );
    assert_eq!(
        bob.error(json!({"type":"join","room":"dm:alice:bob"}))
            .await,
        "bad_request"
    );
    assert_eq!(
        alice
            .error(json!({"type":"topic","room":"side","topic":"x"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        alice
            .error(json!({"type":"topic","room":"general","topic":"x".repeat(257)}))
            .await,
        "too_large"
    );

    bob.ok(json!({"type":"leave","room":"general"})).await;
    // alice drains the message echoes, then sees bob leave
    assert_eq!(alice.event_of("message").await["body"], "one");
    assert_eq!(alice.event_of("message").await["body"], "two");
    assert_eq!(
        alice.event_of("left").await,
        json!({"type":"left","room":"general","user":"bob"})
    );
    assert_eq!(
        bob.error(json!({"type":"leave","room":"general"})).await,
        "forbidden"
    );
    assert_eq!(
        bob.error(json!({"type":"leave","room":"nowhere"})).await,
        "not_found"
    );
    alice.send("general", "bob is gone").await;
    assert_eq!(bob.event_of("message").await["body"], "one");
    assert_eq!(bob.event_of("message").await["body"], "two");
    bob.assert_no_event().await;
}

async fn send_rules_and_echo(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    let mut bob = registered(&server, "bob").await;
    alice.join("r").await;
    assert_eq!(
        bob.error(json!({"type":"send","room":"r","body":"hi"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        bob.error(json!({"type":"send","room":"nowhere","body":"hi"}))
            .await,
        "not_found"
    );
    bob.join("r").await;
    alice.event_of("joined").await;

    for (body, code) in [
        (String::new(), "bad_request"),
        ("x".repeat(4097), "too_large"),
        ("nul\u{0}byte".into(), "bad_request"),
        ("bell\u{7}".into(), "bad_request"),
    ] {
        assert_eq!(
            alice
                .error(json!({"type":"send","room":"r","body":body}))
                .await,
            code
        );
    }
    assert_eq!(
        alice
            .error(json!({"type":"send","room":"r","body":"x","nonce":"n".repeat(65)}))
            .await,
        "bad_request"
    );

    let ok = alice
        .ok(json!({"type":"send","room":"r","body":"line one\n\tline two","nonce":"c-1"}))
        .await;
    assert_eq!(ok["seq"], 1);
    let ts = ok["ts"].as_i64().unwrap();
    let expected = json!({"type":"message","room":"r","seq":1,"user":"alice","body":"line one\n\tline two","ts":ts,"nonce":"c-1"});
    assert_eq!(
        alice.event().await,
        expected,
        "the sender's echo, after its ok"
    );
    assert_eq!(bob.event().await, expected);
    assert_eq!(
        alice.send("r", &"x".repeat(4096)).await,
        2,
        "4096 bytes fit"
    );

    let again = alice
        .ok(json!({"type":"send","room":"r","body":"line one\n\tline two","nonce":"c-1"}))
        .await;
    assert_eq!(
        (again["seq"].clone(), again["ts"].clone()),
        (json!(1), json!(ts))
    );
    assert_eq!(alice.event().await["seq"], 2);
    alice.assert_no_event().await;
    assert_eq!(bob.event().await["seq"], 2);
    bob.assert_no_event().await;
}

async fn history_pages(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    alice.join("r").await;
    for i in 1..=12 {
        alice.send("r", &format!("m{i}")).await;
    }
    let page = |r: &Value| {
        let seqs: Vec<u64> = r["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect();
        (seqs, r["more"].as_bool().unwrap())
    };
    let h = |extra: Value| {
        let mut req = json!({"type":"history","room":"r"});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        req
    };
    let r = alice.ok(h(json!({"limit":5}))).await;
    assert_eq!(page(&r), (vec![8, 9, 10, 11, 12], true));
    assert_eq!(r["room"], "r");
    assert_eq!(r["messages"][0]["body"], "m8");
    assert_eq!(
        page(&alice.ok(h(json!({"before":8,"limit":5}))).await),
        (vec![3, 4, 5, 6, 7], true)
    );
    assert_eq!(
        page(&alice.ok(h(json!({"before":3}))).await),
        (vec![1, 2], false)
    );
    assert_eq!(
        page(&alice.ok(h(json!({"after":9}))).await),
        (vec![10, 11, 12], false)
    );
    assert_eq!(
        page(&alice.ok(h(json!({"after":0,"limit":2}))).await),
        (vec![1, 2], true)
    );
    assert_eq!(page(&alice.ok(h(json!({}))).await).0.len(), 12);
    assert_eq!(
        alice.error(h(json!({"before":5,"after":2}))).await,
        "bad_request"
    );
    assert_eq!(alice.error(h(json!({"limit":501}))).await, "bad_request");
    assert_eq!(alice.error(h(json!({"limit":0}))).await, "bad_request");
    assert_eq!(
        alice
            .error(json!({"type":"history","room":"nowhere"}))
            .await,
        "not_found"
    );
    let mut bob = registered(&server, "bob").await;
    assert_eq!(bob.error(h(json!({}))).await, "forbidden");
}

async fn read_markers_typing_and_several_connections(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    let mut alice2 = server.client().await;
    alice2.login("alice").await;
    let mut bob = registered(&server, "bob").await;

    alice.join("r").await;
    // The user's other connections learn of the join too.
    assert_eq!(
        alice2.event_of("joined").await,
        json!({"type":"joined","room":"r","user":"alice"})
    );
    alice.assert_no_event().await;
    bob.join("r").await;
    // Both of alice's connections see bob join: the membership is the user's.
    assert_eq!(alice.event_of("joined").await["user"], "bob");
    assert_eq!(alice2.event_of("joined").await["user"], "bob");

    bob.send("r", "one").await;
    bob.send("r", "two").await;
    for c in [&mut alice, &mut alice2, &mut bob] {
        assert_eq!(c.event_of("message").await["seq"], 1);
        assert_eq!(c.event_of("message").await["seq"], 2);
    }
    alice.ok(json!({"type":"read","room":"r","seq":2})).await;
    assert_eq!(
        alice2.event_of("read").await,
        json!({"type":"read","room":"r","seq":2})
    );
    alice.assert_no_event().await;
    alice.ok(json!({"type":"read","room":"r","seq":1})).await;
    assert_eq!(alice2.event_of("read").await["seq"], 2, "never backward");
    assert_eq!(
        alice.error(json!({"type":"read","room":"r","seq":3})).await,
        "bad_request"
    );
    assert_eq!(
        bob.ok(json!({"type":"rooms"})).await["rooms"][0]["unread"],
        2
    );
    assert_eq!(
        alice.ok(json!({"type":"rooms"})).await["rooms"][0]["unread"],
        0
    );

    bob.ok(json!({"type":"typing","room":"r"})).await;
    assert_eq!(
        alice.event_of("typing").await,
        json!({"type":"typing","room":"r","user":"bob"})
    );
    assert_eq!(alice2.event_of("typing").await["user"], "bob");
    bob.assert_no_event().await;
    let mut carol = registered(&server, "carol").await;
    assert_eq!(
        carol.error(json!({"type":"typing","room":"r"})).await,
        "forbidden"
    );
    assert_eq!(
        carol.error(json!({"type":"read","room":"r","seq":1})).await,
        "forbidden"
    );
}

async fn presence_follows_first_and_last_connection(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    alice.join("r").await;
    let mut bob = registered(&server, "bob").await;
    bob.join("r").await;
    alice.join("s").await;
    bob.join("s").await;
    alice.event_of("joined").await;
    alice.event_of("joined").await;
    drop(bob);
    // One event although they share two rooms.
    assert_eq!(
        alice.event_of("presence").await,
        json!({"type":"presence","user":"bob","online":false})
    );
    alice.assert_no_event().await;

    let mut bob = server.client().await;
    bob.login("bob").await;
    assert_eq!(
        alice.event_of("presence").await,
        json!({"type":"presence","user":"bob","online":true})
    );
    let mut bob2 = server.client().await;
    bob2.login("bob").await;
    alice.assert_no_event().await; // not the first connection
    drop(bob2);
    bob.assert_no_event().await;
    alice.assert_no_event().await; // not the last either
    let members = alice.ok(json!({"type":"members","room":"r"})).await;
    assert_eq!(
        members["members"],
        json!([{"user":"alice","online":true,"role":"owner"},{"user":"bob","online":true,"role":"member"}])
    );
    bob.ok(json!({"type":"logout"})).await;
    assert_eq!(alice.event_of("presence").await["online"], false);
}

async fn direct_messages(store: Store) {
    let server = store.spawn().await;
    let mut alice = registered(&server, "alice").await;
    let mut bob = registered(&server, "Bob").await;
    assert_eq!(
        alice
            .error(json!({"type":"dm","to":"nobody","body":"hi"}))
            .await,
        "not_found"
    );
    assert_eq!(
        alice
            .error(json!({"type":"dm","to":"alice","body":"hi"}))
            .await,
        "bad_request"
    );
    let r = alice
        .ok(json!({"type":"dm","to":"bob","body":"psst","nonce":"d1"}))
        .await;
    assert_eq!(
        (r["room"].as_str(), r["seq"].as_u64()),
        (Some("dm:alice:bob"), Some(1))
    );
    let expected = json!({"type":"message","room":"dm:alice:bob","seq":1,"user":"alice","body":"psst","ts":r["ts"],"nonce":"d1"});
    assert_eq!(alice.event().await, expected);
    assert_eq!(bob.event().await, expected);
    bob.ok(json!({"type":"send","room":"dm:alice:bob","body":"hey"}))
        .await;
    assert_eq!(alice.event_of("message").await["user"], "Bob");
    let rooms = bob.ok(json!({"type":"rooms"})).await;
    assert_eq!(rooms["rooms"][0]["room"], "dm:alice:bob");
    let h = alice
        .ok(json!({"type":"history","room":"dm:alice:bob"}))
        .await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 2);
    let mut carol = registered(&server, "carol").await;
    assert_eq!(
        carol
            .error(json!({"type":"history","room":"dm:alice:bob"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        carol
            .error(json!({"type":"members","room":"dm:alice:bob"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        carol
            .error(json!({"type":"send","room":"dm:alice:bob","body":"x"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        alice.ok(json!({"type":"rooms","all":true})).await["rooms"],
        json!([])
    );
    // Direct messages to a connected guest work too.
    let mut g = server.client().await;
    g.guest("Gus").await;
    alice
        .ok(json!({"type":"dm","to":"gus","body":"welcome"}))
        .await;
    assert_eq!(g.event_of("message").await["room"], "dm:alice:gus");
}

async fn replies_a_client_can_grow_are_bounded_and_paged(store: Store) {
    let server = store
        .with_config(|c| {
            c.chat.max_sync_messages = 5;
            c.chat.max_rooms_per_user = 4;
            c.chat.rate_limits.room_creations = Some(Rate::per_hour(3));
        })
        .await;
    let mut alice = registered(&server, "alice").await;
    let mut bob = registered(&server, "bob").await;

    // Rooms created per user per hour: the fourth waits, truthfully.
    for r in ["r1", "r2", "r3"] {
        alice.join(r).await;
    }
    let refused = alice.request(json!({"type":"join","room":"r4"})).await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().unwrap() > 1000 * 1000);
    for r in ["r1", "r2", "r3"] {
        bob.join(r).await;
    }
    bob.join("b1").await;
    // Rooms per user: bob is in four, the cap.
    let capped = bob.request(json!({"type":"join","room":"b2"})).await;
    assert_eq!(capped["code"], "forbidden", "{capped}");
    assert!(capped["message"].as_str().unwrap().contains("4 rooms"));
    bob.ok(json!({"type":"leave","room":"b1"})).await;

    // sync: 3 rooms × 3 messages against a budget of 5.
    for r in ["r1", "r2", "r3"] {
        for i in 1..=3 {
            alice.send(r, &format!("{r}-{i}")).await;
        }
    }
    let sync = bob.ok(json!({"type":"sync","limit":2})).await;
    let rooms = sync["rooms"].as_array().unwrap();
    let seen: Vec<(&str, usize, bool)> = rooms
        .iter()
        .map(|r| {
            (
                r["room"].as_str().unwrap(),
                r["messages"].as_array().unwrap().len(),
                r["more"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("r1", 2, true), ("r2", 2, true), ("r3", 1, true)],
        "each page short only with `more`"
    );
    assert_eq!(sync["more"], false, "every room with news is in it");
    let sync = bob.ok(json!({"type":"sync","limit":5})).await;
    assert_eq!(sync["rooms"].as_array().unwrap().len(), 2);
    assert_eq!(sync["more"], true, "r3 was left for the next sync");
    let cursors = json!({"r1": 3, "r2": 3, "r3": 1});
    let rest = bob.ok(json!({"type":"sync","cursors":cursors})).await;
    assert_eq!(rest["rooms"][0]["room"], "r3");
    assert_eq!(rest["rooms"][0]["messages"].as_array().unwrap().len(), 2);
    assert_eq!(rest["more"], false);

    // rooms and members come in pages, with a cursor.
    let page = bob.ok(json!({"type":"rooms","limit":2})).await;
    let names = |v: &Value, key: &str, field: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r[field].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names(&page, "rooms", "room"), ["r1", "r2"]);
    assert_eq!(page["more"], true);
    let page = bob.ok(json!({"type":"rooms","limit":2,"after":"r2"})).await;
    assert_eq!(names(&page, "rooms", "room"), ["r3"]);
    assert_eq!(page["more"], false);
    let mut carol = registered(&server, "Carol").await;
    carol.join("r1").await;
    let page = bob
        .ok(json!({"type":"members","room":"r1","limit":2}))
        .await;
    assert_eq!(names(&page, "members", "user"), ["alice", "bob"]);
    assert_eq!(page["more"], true);
    let page = bob
        .ok(json!({"type":"members","room":"r1","limit":2,"after":"bob"}))
        .await;
    assert_eq!(names(&page, "members", "user"), ["Carol"]);
    assert_eq!(page["more"], false);
    assert_eq!(
        bob.error(json!({"type":"rooms","limit":5000})).await,
        "bad_request"
    );
}

async fn a_guests_room_goes_when_its_last_member_does(store: Store) {
    let server = store.spawn().await;
    let mut guest = server.client().await;
    guest.guest("drifter").await;
    guest.join("tmp").await;
    guest.send("tmp", "ephemeral").await;
    let mut lister = registered(&server, "lister").await;
    let listed = |v: Value| v["rooms"].as_array().unwrap().len();
    assert_eq!(
        listed(lister.ok(json!({"type":"rooms","all":true})).await),
        1
    );
    // A guest's login ends like its last connection does (the same code),
    // and the reply comes after it: no waiting on a disconnect.
    guest.ok(json!({"type":"logout"})).await;
    assert_eq!(
        listed(lister.ok(json!({"type":"rooms","all":true})).await),
        0
    );
    let again = lister.join("tmp").await;
    assert_eq!(again["last_seq"], 0, "its history went with it");
}

confab_testkit::on_each_store!(
    hello_ping_and_ids,
    malformed_frames_get_errors_and_keep_the_session,
    frames_over_the_limit_close_with_1009,
    fragmented_messages_are_whole_requests,
    bad_upgrades_are_refused,
    upgrades_in_pieces_with_a_frame_behind_and_after_another_request,
    only_login_requests_before_login,
    register_login_resume_logout,
    guests_come_and_go,
    guests_can_be_turned_off,
    rooms_members_topics_and_their_events,
    send_rules_and_echo,
    history_pages,
    read_markers_typing_and_several_connections,
    presence_follows_first_and_last_connection,
    direct_messages,
    replies_a_client_can_grow_are_bounded_and_paged,
    a_guests_room_goes_when_its_last_member_does,
);

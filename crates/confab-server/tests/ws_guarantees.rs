//! The four guarantees of the contract (durable before visible, gapless
//! order, exactly once with a nonce, offline delivery), and the server's
//! own promises: liveness, backpressure and a graceful shutdown.

use std::time::Duration;

use confab_testkit::confab_server::Durability;
use confab_testkit::confab_server::RateLimits;
use confab_testkit::serde_json::{json, Value};
use confab_testkit::{count_messages_in_order, flood_until_cut_off, Store};

fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect()
}

/// The newcomer's walk-through: two users, a room and a direct message,
/// one goes away, messages pile up, it comes back and syncs them.
async fn offline_messages_are_delivered_by_sync(store: Store) {
    let server = store.spawn().await;
    let mut alice = server.client().await;
    alice.register("alice").await;
    let mut bob = server.client().await;
    let bob_token = bob.register("bob").await;
    alice.join("general").await;
    bob.join("general").await;
    alice.event_of("joined").await;
    alice.send("general", "before").await;
    assert_eq!(bob.event_of("message").await["body"], "before");
    bob.ok(json!({"type":"read","room":"general","seq":1}))
        .await;
    drop(bob);
    assert_eq!(alice.event_of("message").await["body"], "before");
    assert_eq!(alice.event_of("presence").await["online"], false);

    for i in 1..=3 {
        alice.send("general", &format!("while away {i}")).await;
    }
    alice
        .ok(json!({"type":"dm","to":"bob","body":"call me"}))
        .await;

    let mut bob = server.client().await;
    bob.ok(json!({"type":"resume","token":bob_token})).await;
    let sync = bob.ok(json!({"type":"sync"})).await;
    let rooms = sync["rooms"].as_array().unwrap();
    assert_eq!(rooms.len(), 2, "{sync}");
    let by_name = |name: &str| rooms.iter().find(|r| r["room"] == name).unwrap().clone();
    let general = by_name("general");
    assert_eq!(
        seqs(&general["messages"]),
        vec![2, 3, 4],
        "from the read marker on"
    );
    assert_eq!(general["messages"][0]["body"], "while away 1");
    assert_eq!(general["more"], false);
    let dm = by_name("dm:alice:bob");
    assert_eq!(dm["messages"][0]["body"], "call me");

    // Explicit cursors and a per-room limit.
    let sync = bob
        .ok(json!({"type":"sync","cursors":{"general":2,"dm:alice:bob":1},"limit":1}))
        .await;
    assert_eq!(
        sync["rooms"],
        json!([{"room":"general","messages":[sync["rooms"][0]["messages"][0]],"more":true}])
    );
    assert_eq!(sync["rooms"][0]["messages"][0]["seq"], 3);
    assert_eq!(
        bob.error(json!({"type":"sync","cursors":{"Bad Room":1}}))
            .await,
        "bad_request"
    );
    // Live delivery resumes on the new connection.
    alice.send("general", "welcome back").await;
    assert_eq!(bob.event_of("message").await["seq"], 5);
}

async fn a_restart_keeps_history_memberships_markers_and_nonces(store: Store) {
    let server = store.spawn().await;
    let mut alice = server.client().await;
    let token = alice.register("alice").await;
    alice.join("keep").await;
    alice
        .ok(json!({"type":"topic","room":"keep","topic":"durable"}))
        .await;
    let first = alice
        .ok(json!({"type":"send","room":"keep","body":"one","nonce":"n-1"}))
        .await;
    alice.send("keep", "two").await;
    alice.ok(json!({"type":"read","room":"keep","seq":1})).await;
    drop(alice);

    let server = server.restart().await;
    let mut alice = server.client().await;
    alice.ok(json!({"type":"resume","token":token})).await;
    let rooms = alice.ok(json!({"type":"rooms"})).await;
    assert_eq!(
        rooms["rooms"],
        json!([{"room":"keep","topic":"durable","member_count":1,"last_seq":2,"unread":1}])
    );
    let h = alice.ok(json!({"type":"history","room":"keep"})).await;
    assert_eq!(seqs(&h["messages"]), vec![1, 2]);
    let retry = alice
        .ok(json!({"type":"send","room":"keep","body":"one","nonce":"n-1"}))
        .await;
    assert_eq!((&retry["seq"], &retry["ts"]), (&first["seq"], &first["ts"]));
    alice.assert_no_event().await;
    assert_eq!(alice.send("keep", "three").await, 3);
}

async fn a_retry_after_reconnecting_creates_no_duplicate(store: Store) {
    let server = store.spawn().await;
    let mut bob = server.client().await;
    bob.register("bob").await;
    bob.join("r").await;
    let mut alice = server.client().await;
    let token = alice.register("alice").await;
    alice.join("r").await;
    bob.event_of("joined").await;

    // The first attempt is sent, and the connection dies before the reply
    // is read.
    alice
        .send_json(&json!({"type":"send","room":"r","body":"hello","nonce":"retry-1"}))
        .await;
    let original = bob.event_of("message").await;
    drop(alice);
    bob.event_of("presence").await;

    let mut alice = server.client().await;
    alice.ok(json!({"type":"resume","token":token})).await;
    assert_eq!(bob.event_of("presence").await["online"], true);
    let retry = alice
        .ok(json!({"type":"send","room":"r","body":"hello","nonce":"retry-1"}))
        .await;
    assert_eq!(retry["seq"], original["seq"]);
    assert_eq!(retry["ts"], original["ts"]);
    bob.assert_no_event().await;
    let h = bob.ok(json!({"type":"history","room":"r"})).await;
    assert_eq!(h["messages"].as_array().unwrap().len(), 1);
}

async fn concurrent_senders_get_gapless_seqs_seen_in_one_order(store: Store) {
    const SENDERS: usize = 20;
    const EACH: usize = 10;
    let server = store.spawn().await;
    let mut watchers = Vec::new();
    for name in ["watcher1", "watcher2"] {
        let mut w = server.client().await;
        w.guest(name).await;
        w.join("busy").await;
        watchers.push(w);
    }
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let mut c = server.client().await;
        c.guest(&format!("s{i}")).await;
        c.join("busy").await;
        senders.push(c);
    }
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let mut acked = Vec::new();
                for j in 0..EACH {
                    acked.push(c.send("busy", &format!("{i}/{j}")).await);
                }
                (acked, c)
            })
        })
        .collect();
    let mut all_acked = Vec::new();
    let mut senders = Vec::new();
    for t in tasks {
        let (acked, c) = t.await.unwrap();
        assert!(acked.windows(2).all(|w| w[0] < w[1]));
        all_acked.extend(acked);
        senders.push(c);
    }
    all_acked.sort();
    let total = (SENDERS * EACH) as u64;
    assert_eq!(
        all_acked,
        (1..=total).collect::<Vec<_>>(),
        "gapless, each once"
    );

    // Every member, senders included, sees 1..=total in order.
    let mut orders = Vec::new();
    for c in watchers.iter_mut().chain(senders.iter_mut()) {
        let mut seen = Vec::new();
        while seen.len() < SENDERS * EACH {
            let e = c.event().await;
            if e["type"] == "message" {
                seen.push((
                    e["seq"].as_u64().unwrap(),
                    e["body"].as_str().unwrap().to_owned(),
                ));
            }
        }
        assert_eq!(
            seen.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (1..=total).collect::<Vec<_>>()
        );
        orders.push(seen);
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "one order for all");
}

async fn silent_connections_are_closed_and_their_presence_ends(store: Store) {
    let server = store
        .with_config(|c| c.heartbeat = Duration::from_millis(100))
        .await;
    let mut alice = server.client().await;
    alice.register("alice").await;
    alice.join("r").await;
    let mut bob = server.client().await;
    bob.register("bob").await;
    bob.join("r").await;
    alice.event_of("joined").await;
    // Bob stops reading (and so stops answering pings). Alice keeps reading,
    // and her client answers pings as it reads.
    let presence = alice.event_of("presence").await;
    assert_eq!(
        presence,
        json!({"type":"presence","user":"bob","online":false})
    );
    assert_eq!(bob.closed().await, (1008, "idle timeout".to_owned()));
}

async fn a_slow_consumer_is_cut_off_and_nobody_else_waits(store: Store) {
    let server = store
        .with_config(|c| {
            c.chat.outbound_queue = 8;
            // A flood on purpose: no rate limits, and commits that survive a
            // process crash are enough.
            c.chat.rate_limits = RateLimits::off();
            c.database.set_durability(Durability::Normal);
        })
        .await;
    let mut slow = server.client().await;
    slow.guest("slow").await;
    slow.join("firehose").await;
    let mut fast = server.client().await;
    fast.guest("fast").await;
    fast.join("firehose").await;
    let mut sender = server.client().await;
    sender.guest("sender").await;
    sender.join("firehose").await;
    fast.event_of("joined").await;

    // The fast member reads as the messages come, while the sender floods
    // until the slow reader is cut off, still not reading.
    let fast_reader = count_messages_in_order(fast);
    let sent = flood_until_cut_off(&mut sender, "firehose", "slow").await;
    assert_eq!(fast_reader.await.unwrap(), sent + 1);
    assert_eq!(slow.closed().await, (4008, "slow consumer".to_owned()));
}

async fn a_graceful_shutdown_says_goodbye_and_loses_no_ack(store: Store) {
    // 50 pipelined sends: past the default message burst on purpose.
    let server = store
        .with_config(|c| c.chat.rate_limits = RateLimits::off())
        .await;
    let mut alice = server.client().await;
    alice.register("alice").await;
    alice.join("r").await;
    let mut anon = server.client().await;
    // Requests pipelined while the shutdown begins: each one the server has
    // read is answered before the `shutdown` notice; the rest are not read.
    const SENT: usize = 50;
    for i in 0..SENT {
        let req =
            json!({"type":"send","id":i,"room":"r","body":format!("m{i}"),"nonce":format!("n{i}")});
        alice.send_json(&req).await;
    }
    server.begin_shutdown();
    let mut acked = Vec::new();
    loop {
        let frame = alice.frame().await;
        match frame["type"].as_str().unwrap() {
            "ok" => acked.push((
                frame["seq"].as_u64().unwrap(),
                frame["id"].as_u64().unwrap(),
            )),
            "message" => {}
            "shutdown" => {
                assert_eq!(frame["reconnect_ms"], 2000);
                break;
            }
            other => panic!("unexpected {other}: {frame}"),
        }
    }
    assert_eq!(alice.closed().await.0, 1001);
    assert_eq!(anon.event_of("shutdown").await["type"], "shutdown");
    assert_eq!(anon.closed().await.0, 1001);

    let server = server.stop().await.start().await;
    let mut alice = server.client().await;
    alice.login("alice").await;
    let h = alice
        .ok(json!({"type":"history","room":"r","limit":500}))
        .await;
    let stored: Vec<(u64, String)> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["seq"].as_u64().unwrap(),
                m["body"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (seq, id) in &acked {
        assert!(
            stored.contains(&(*seq, format!("m{id}"))),
            "acknowledged seq {seq} (m{id}) is in history"
        );
    }
    assert_eq!(
        stored.len(),
        acked.len(),
        "every stored message was acknowledged"
    );
    // The unanswered ones are safe to retry: their nonces create each once.
    for i in acked.len()..SENT {
        alice
            .ok(json!({"type":"send","room":"r","body":format!("m{i}"),"nonce":format!("n{i}")}))
            .await;
    }
    let h = alice
        .ok(json!({"type":"history","room":"r","limit":500}))
        .await;
    assert_eq!(seqs(&h["messages"]), (1..=SENT as u64).collect::<Vec<_>>());
}

/// A client sends a thousand messages and a few other requests without
/// waiting for any reply: the replies come in request order, the request
/// after the sends sees them, the sends are stored (and seen by another
/// member) in the order they were sent, and a refused send in the middle
/// is answered in its place.
async fn pipelined_requests_are_answered_in_order_and_stored_in_send_order(store: Store) {
    const SENT: u64 = 1000;
    let server = store
        .with_config(|c| {
            c.chat.rate_limits = RateLimits::off();
            // Nobody reads until everything is sent: room for every frame.
            c.chat.outbound_queue = 4096;
        })
        .await;
    let mut alice = server.client().await;
    alice.register("alice").await;
    alice.join("r").await;
    let mut bob = server.client().await;
    bob.guest("bob").await;
    bob.join("r").await;
    alice.event_of("joined").await;

    let mut requests = Vec::new();
    for i in 0..SENT {
        requests.push(json!({"type":"send","id":i,"room":"r","body":format!("m{i}")}));
        if i == SENT / 2 - 1 {
            requests.push(json!({"type":"history","id":"h","room":"r","limit":1}));
            requests.push(json!({"type":"send","id":"bad","room":"nowhere","body":"x"}));
            requests.push(json!({"type":"ping","id":"p"}));
            requests.push(json!({"type":"send","id":"empty","room":"r","body":""}));
        }
    }
    for request in &requests {
        alice.send_json(request).await;
    }
    let mut seqs = Vec::new();
    for request in &requests {
        let id = request["id"].clone();
        let reply = alice.reply_to(id.clone()).await;
        match id.as_str() {
            None => {
                assert_eq!(reply["type"], "ok", "{request}: {reply}");
                seqs.push(reply["seq"].as_u64().unwrap());
            }
            Some("h") => {
                let last = &reply["messages"][0];
                assert_eq!(last["body"], format!("m{}", SENT / 2 - 1), "{reply}");
                assert_eq!(last["seq"], SENT / 2);
            }
            Some("bad") => assert_eq!(reply["code"], "not_found", "{reply}"),
            Some("p") => assert_eq!(reply["type"], "pong"),
            Some("empty") => assert_eq!(reply["code"], "bad_request", "{reply}"),
            Some(other) => panic!("unexpected id {other}"),
        }
    }
    assert_eq!(seqs, (1..=SENT).collect::<Vec<_>>(), "stored in send order");
    for i in 0..SENT {
        let e = bob.event_of("message").await;
        assert_eq!(
            (e["seq"].as_u64(), &e["body"]),
            (Some(i + 1), &json!(format!("m{i}")))
        );
    }
    let history = alice.whole_history("r").await;
    let bodies: Vec<&String> = history.values().collect();
    let sent: Vec<String> = (0..SENT).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, sent.iter().collect::<Vec<_>>());
}

confab_testkit::on_each_store!(
    pipelined_requests_are_answered_in_order_and_stored_in_send_order,
    offline_messages_are_delivered_by_sync,
    a_restart_keeps_history_memberships_markers_and_nonces,
    a_retry_after_reconnecting_creates_no_duplicate,
    concurrent_senders_get_gapless_seqs_seen_in_one_order,
    silent_connections_are_closed_and_their_presence_ends,
    a_slow_consumer_is_cut_off_and_nobody_else_waits,
    a_graceful_shutdown_says_goodbye_and_loses_no_ack,
);

//! Several nodes, one chat (protocol section 4): three nodes in this
//! process sharing a fresh PostgreSQL schema and a Redis key prefix of
//! their own. Skipped (saying so) without `CONFAB_TEST_POSTGRES` and
//! `CONFAB_TEST_REDIS`; a Redis outage runs on a `redis-server` the test
//! starts and stops itself.

use confab_testkit::confab_server::settings::Secret;
use confab_testkit::confab_server::RateLimits;
use confab_testkit::serde_json::{json, Value};
use confab_testkit::{http, TestCluster, WsClient};

/// Read events until `n` messages of `room` arrived; returns their
/// (seq, body) in arrival order.
async fn messages(client: &mut WsClient, room: &str, n: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let e = client.event().await;
        if e["type"] == "message" && e["room"] == room {
            got.push((
                e["seq"].as_u64().unwrap(),
                e["body"].as_str().unwrap().to_owned(),
            ));
        }
    }
    got
}

/// The next event of type `kind`, skipping others.
async fn next_of(client: &mut WsClient, kind: &str) -> Value {
    loop {
        let e = client.event().await;
        if e["type"] == kind {
            return e;
        }
    }
}

#[tokio::test]
async fn one_room_one_gapless_order_on_every_node() {
    let Some(cluster) = TestCluster::spawn(3).await else {
        return;
    };
    let mut clients = Vec::new();
    for (i, name) in ["alice", "bob", "carol"].iter().enumerate() {
        let mut c = cluster.client(i).await;
        assert_eq!(c.hello["node"], format!("n{i}"), "hello names the node");
        c.register(name).await;
        c.join("lobby").await;
        clients.push(c);
    }
    // Everyone sends at once, from three nodes, with nonces.
    const EACH: usize = 25; // within the per-connection message burst
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                for k in 0..EACH {
                    c.ok(json!({"type":"send","room":"lobby","body":format!("{i}-{k}"),"nonce":format!("{i}-{k}")}))
                        .await;
                }
                let seen = messages(&mut c, "lobby", 3 * EACH).await;
                (c, seen)
            })
        })
        .collect();
    let mut seen_by = Vec::new();
    for t in tasks {
        seen_by.push(t.await.unwrap());
    }
    let first = seen_by[0].1.clone();
    let seqs: Vec<u64> = first.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=(3 * EACH) as u64).collect::<Vec<_>>(),
        "gapless, in order"
    );
    for (_, seen) in &seen_by {
        assert_eq!(seen, &first, "one order, seen identically on every node");
    }
    let (mut c, _) = seen_by.pop().unwrap();
    let stored = c.whole_history("lobby").await;
    assert_eq!(
        stored.len(),
        3 * EACH,
        "durable: every acknowledged message stored"
    );
    for (seq, body) in &first {
        assert_eq!(&stored[seq], body);
    }
}

#[tokio::test]
async fn a_retry_on_another_node_is_exactly_once() {
    let Some(cluster) = TestCluster::spawn(2).await else {
        return;
    };
    let mut a = cluster.client(0).await;
    let token = a.register("alice").await;
    a.join("lobby").await;
    let first = a
        .ok(json!({"type":"send","room":"lobby","body":"once","nonce":"n-1"}))
        .await;
    // The connection dropped before the ack was seen: retry on node 1.
    drop(a);
    let mut b = cluster.client(1).await;
    b.ok(json!({"type":"resume","token":token})).await;
    let retry = b
        .ok(json!({"type":"send","room":"lobby","body":"once","nonce":"n-1"}))
        .await;
    assert_eq!(retry["seq"], first["seq"]);
    assert_eq!(b.whole_history("lobby").await.len(), 1);
}

#[tokio::test]
async fn everything_reaches_users_on_other_nodes() {
    let Some(cluster) = TestCluster::spawn(3).await else {
        return;
    };
    let mut bob = cluster.client(1).await;
    bob.register("bob").await;
    bob.join("lobby").await;
    let mut alice = cluster.client(0).await;
    let token = alice.register("alice").await;
    let joined = alice.join("lobby").await;
    let members = joined["members"].as_array().unwrap();
    let bob_entry = members.iter().find(|m| m["user"] == "bob").unwrap();
    assert_eq!(bob_entry["online"], true, "presence across nodes");
    let e = next_of(&mut bob, "joined").await;
    assert_eq!(e["user"], "alice");

    // Typing and topics.
    alice.ok(json!({"type":"typing","room":"lobby"})).await;
    assert_eq!(next_of(&mut bob, "typing").await["user"], "alice");
    bob.ok(json!({"type":"topic","room":"lobby","topic":"cluster talk"}))
        .await;
    assert_eq!(next_of(&mut alice, "topic").await["topic"], "cluster talk");

    // Read markers reach alice's other device on a third node.
    let mut alice2 = cluster.client(2).await;
    alice2.ok(json!({"type":"resume","token":token})).await;
    let seq = bob.send("lobby", "hello").await;
    assert_eq!(messages(&mut alice2, "lobby", 1).await[0].0, seq);
    alice
        .ok(json!({"type":"read","room":"lobby","seq":seq}))
        .await;
    let read = next_of(&mut alice2, "read").await;
    assert_eq!(read["seq"], seq);

    // A guest on node 2 holds its name in the whole cluster, and gets
    // direct messages from node 0.
    let mut gus = cluster.client(2).await;
    gus.guest("Gus").await;
    let mut other = cluster.client(1).await;
    let err = other.error(json!({"type":"guest","user":"gus"})).await;
    assert_eq!(err, "conflict");
    let err = other
        .error(json!({"type":"register","user":"GUS","password":"password-gus"}))
        .await;
    assert_eq!(err, "conflict");
    alice
        .ok(json!({"type":"dm","to":"gus","body":"psst"}))
        .await;
    let dm = next_of(&mut gus, "message").await;
    assert_eq!(dm["body"], "psst");
    // Gone, the name is free on every node.
    drop(gus);
    let mut free = false;
    for _ in 0..200 {
        let mut c = cluster.client(1).await;
        let r = c.request(json!({"type":"guest","user":"gus"})).await;
        if r["type"] == "ok" {
            free = true;
            break;
        }
        // The first node records the departure asynchronously: a round
        // trip to node 0 lets it.
        alice.ok(json!({"type":"ping"})).await;
        tokio::task::yield_now().await;
    }
    assert!(free, "the guest name was released");

    // Leaving is seen on the other nodes.
    let mut dave = cluster.client(2).await;
    dave.register("dave").await;
    dave.join("lobby").await;
    assert_eq!(next_of(&mut bob, "joined").await["user"], "dave");
    dave.ok(json!({"type":"leave","room":"lobby"})).await;
    assert_eq!(next_of(&mut bob, "left").await["user"], "dave");

    // Alice's last connection goes: bob sees her offline.
    drop(alice);
    drop(alice2);
    loop {
        let e = next_of(&mut bob, "presence").await;
        if e["user"] == "alice" && e["online"] == false {
            break;
        }
    }
}

#[tokio::test]
async fn moderation_and_edits_hold_on_every_node() {
    let Some(cluster) = TestCluster::spawn(2).await else {
        return;
    };
    let mut boss = cluster.client(0).await;
    boss.register("boss").await;
    boss.join("hall").await;
    let mut eve = cluster.client(1).await;
    eve.register("eve").await;
    eve.join("hall").await;
    let mut watcher = cluster.client(1).await;
    watcher.register("watcher").await;
    watcher.join("hall").await;
    // An edit and a deletion made on one node arrive on the other in order.
    let seq = boss.send("hall", "helo").await;
    boss.ok(json!({"type":"edit","room":"hall","seq":seq,"body":"hello"}))
        .await;
    boss.ok(json!({"type":"delete","room":"hall","seq":seq}))
        .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = next_of(&mut watcher, "message").await;
        seen.push((e["seq"].clone(), e["edit"].clone(), e["delete"].clone()));
    }
    assert_eq!(
        seen,
        [
            (json!(1), Value::Null, Value::Null),
            (json!(2), json!(1), Value::Null),
            (json!(3), Value::Null, json!(1))
        ]
    );
    // A mute given on node 0 holds on node 1.
    boss.ok(json!({"type":"mute","room":"hall","user":"eve"}))
        .await;
    assert_eq!(
        eve.error(json!({"type":"send","room":"hall","body":"hm"}))
            .await,
        "forbidden"
    );
    // A ban on node 0 puts eve out on node 1 at once: she hears it, her
    // connection stops receiving the room, the others see her leave.
    boss.ok(json!({"type":"ban","room":"hall","user":"eve","reason":"enough"}))
        .await;
    assert_eq!(next_of(&mut eve, "kicked").await["reason"], "enough");
    assert_eq!(next_of(&mut watcher, "left").await["user"], "eve");
    boss.send("hall", "eve cannot read this").await;
    assert_eq!(
        next_of(&mut watcher, "message").await["body"],
        "eve cannot read this"
    );
    eve.assert_no_event().await;
    assert_eq!(
        eve.error(json!({"type":"join","room":"hall"})).await,
        "forbidden"
    );
}

#[tokio::test]
async fn hubs_span_the_nodes() {
    let Some(cluster) = TestCluster::spawn(2).await else {
        return;
    };
    let mut ann = cluster.client(0).await;
    ann.register("ann").await;
    ann.ok(json!({"type":"hub_create","hub":"far"})).await;
    let mut bob = cluster.client(1).await;
    bob.register("bob").await;
    bob.ok(json!({"type":"hub_join","hub":"far"})).await;
    assert_eq!(next_of(&mut ann, "hub_joined").await["user"], "bob");
    ann.ok(json!({"type":"channel_create","hub":"far","channel":"news"}))
        .await;
    assert_eq!(next_of(&mut bob, "channel").await["room"], "far/news");
    ann.send("far/news", "across").await;
    assert_eq!(next_of(&mut bob, "message").await["body"], "across");
    // A ban from the hub given on node 0 puts bob out on node 1.
    ann.ok(json!({"type":"ban","hub":"far","user":"bob"})).await;
    assert_eq!(next_of(&mut bob, "kicked").await["hub"], "far");
    ann.send("far/news", "not for bob").await;
    bob.assert_no_event().await;
}

#[tokio::test]
async fn login_attempts_are_throttled_across_the_cluster() {
    let Some(cluster) = TestCluster::spawn(3).await else {
        return;
    };
    let mut owner = cluster.client(0).await;
    owner.register("victim").await;
    let burst = RateLimits::default().auth_per_account.unwrap().burst as usize;
    let mut codes = Vec::new();
    for i in 0..burst + 3 {
        let mut c = cluster.client(i % 3).await;
        codes.push(
            c.error(json!({"type":"login","user":"victim","password":"guess-guess"}))
                .await,
        );
    }
    // The register itself took one token of the account's bucket.
    let refused = codes.iter().filter(|c| *c == "rate_limited").count();
    assert!(
        refused >= 3,
        "guesses spread over 3 nodes share one bucket: {codes:?}"
    );
}

#[tokio::test]
async fn a_message_missed_on_the_bus_arrives_from_storage() {
    if confab_testkit::Store::postgres_skipped() {
        return;
    }
    let mut redis = confab_broker_redis::testing::OwnRedis::start().await;
    let Some(cluster) = TestCluster::on(3, &redis.url(), |_| {}).await else {
        return;
    };
    let mut alice = cluster.client(0).await;
    alice.register("alice").await;
    alice.join("lobby").await;
    let mut bob = cluster.client(1).await;
    bob.register("bob").await;
    bob.join("lobby").await;
    let mut carol = cluster.client(2).await;
    carol.register("carol").await;
    carol.join("lobby").await;
    alice.send("lobby", "before").await;
    assert_eq!(messages(&mut bob, "lobby", 1).await[0].1, "before");
    assert_eq!(messages(&mut carol, "lobby", 1).await[0].1, "before");

    redis.stop().await;
    // Each node keeps serving its own clients, and says the broker is gone.
    let node = &cluster.nodes[0];
    loop {
        let (status, body) = http(node.addr, "GET", "/readyz", &[], "").await;
        assert_eq!(status, 200, "still ready: {body}");
        if body.contains("broker: not connected") {
            break;
        }
        tokio::task::yield_now().await;
    }
    let (_, metrics) = http(node.addr, "GET", "/metrics", &[], "").await;
    assert!(metrics.contains("confab_broker_connected 0"), "{metrics}");
    let seq = alice.send("lobby", "during").await;
    assert_eq!(messages(&mut alice, "lobby", 2).await[1].1, "during");
    redis.restart().await;
    // No later message follows: it comes from storage once the bus is back.
    let during = vec![(seq, "during".to_owned())];
    assert_eq!(messages(&mut bob, "lobby", 1).await, during);
    assert_eq!(messages(&mut carol, "lobby", 1).await, during);
    bob.send("lobby", "after").await;
    assert_eq!(messages(&mut alice, "lobby", 1).await[0].1, "after");
    assert_eq!(messages(&mut carol, "lobby", 1).await[0].1, "after");
}

#[tokio::test]
async fn operators_reach_users_on_every_node() {
    let Some(redis) = confab_broker_redis::testing::shared_redis() else {
        return;
    };
    let tweak = |c: &mut confab_testkit::confab_server::Config| {
        c.admin_token = Some(Secret::new("t"));
    };
    let Some(cluster) = TestCluster::on(2, &redis, tweak).await else {
        return;
    };
    let mut far = cluster.client(1).await;
    far.register("far").await;
    let auth = [("Authorization", "Bearer t")];
    let admin = cluster.nodes[0].addr;
    let (status, _) = http(
        admin,
        "POST",
        "/admin/notice",
        &auth,
        r#"{"text":"hi all"}"#,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(next_of(&mut far, "notice").await["text"], "hi all");
    let (status, _) = http(admin, "POST", "/admin/users/far/disconnect", &auth, "").await;
    assert_eq!(status, 200);
    let (code, reason) = far.closed().await;
    assert_eq!(reason, "disconnected by an administrator");
    assert_eq!(code, 1008, "kicked on the other node");
}

#[tokio::test]
async fn a_node_that_starts_keeps_the_guests_of_the_others() {
    let Some(cluster) = TestCluster::spawn(1).await else {
        return;
    };
    let mut gus = cluster.client(0).await;
    gus.guest("gus").await;
    gus.join("lobby").await;
    let late = cluster.start_node("late").await;
    let mut c = late.client().await;
    c.register("carol").await;
    let joined = c.join("lobby").await;
    let members: Vec<_> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap().to_owned(), m["online"].clone()))
        .collect();
    assert!(
        members.contains(&("gus".to_owned(), json!(true))),
        "the guest is still a member, online: {members:?}"
    );
}

#[tokio::test]
async fn a_node_that_cannot_join_touches_nothing() {
    if confab_testkit::Store::postgres_skipped() {
        return;
    }
    let schema = confab_store_postgres::testing::TestSchema::create()
        .await
        .unwrap();
    // Nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = confab_testkit::confab_server::Config {
        database: confab_testkit::confab_server::Database::parse(&schema.url).unwrap(),
        broker: Some(
            confab_broker_redis::BrokerUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap(),
        ),
        ..Default::default()
    };
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let listeners = confab_testkit::confab_server::Listeners {
        http: bind().await,
        line: None,
    };
    let Err(e) = confab_testkit::confab_server::start(config.clone(), listeners).await else {
        panic!("started without its broker");
    };
    assert!(e.to_string().contains("cannot reach Redis"), "{e}");
    let version = confab_testkit::confab_server::schema_version(&config)
        .await
        .unwrap();
    assert_eq!(version, None, "the database was not touched");
}

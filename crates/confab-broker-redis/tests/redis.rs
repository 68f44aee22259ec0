//! The Redis broker against a real Redis: the contract on the shared one
//! (`CONFAB_TEST_REDIS`, a key prefix per test), outages and dead nodes on
//! a `redis-server` each test starts itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use confab_broker_redis::testing::{shared_redis, CutProxy, OwnRedis, Prefix};
use confab_broker_redis::{BrokerUrl, ConnectError, Liveness, RedisBroker};
use confab_core::broker::contract::{message, Cluster, Recorder};
use confab_core::broker::{Broker, BrokerEvent, BrokerSink, Orphan, Topic};
use confab_core::conn::in_publisher_turn;
use confab_core::{RoomName, UserName};

async fn nodes(url: &BrokerUrl, names: &[&str], liveness: Liveness) -> Vec<Arc<dyn Broker>> {
    let mut out: Vec<Arc<dyn Broker>> = Vec::new();
    for name in names {
        let b = RedisBroker::connect_with(url, name, liveness)
            .await
            .unwrap();
        out.push(Arc::new(b));
    }
    out
}

confab_core::broker_contract_tests!(later: true, async {
    let url = shared_redis()?;
    let prefix = Prefix::new(&url);
    let nodes = nodes(&prefix.broker_url(), &["a", "b", "c"], Liveness::default()).await;
    Some(Cluster::new(nodes, prefix))
});

/// A hub stand-in that counts the events delivered outside a publisher's
/// turn.
#[derive(Default)]
struct TurnWatch {
    rec: Recorder,
    outside: AtomicUsize,
}

impl BrokerSink for TurnWatch {
    fn deliver(&self, event: &BrokerEvent) {
        if !in_publisher_turn() {
            self.outside.fetch_add(1, Ordering::Relaxed);
        }
        self.rec.deliver(event);
    }
    fn missed(&self, rooms: Option<Vec<RoomName>>) {
        self.rec.missed(rooms);
    }
    fn orphaned(&self, node: String, users: Vec<Orphan>) {
        self.rec.orphaned(node, users);
    }
}

#[tokio::test]
async fn other_nodes_events_are_delivered_in_a_publishers_turn() {
    let Some(url) = shared_redis() else { return };
    let prefix = Prefix::new(&url);
    let nodes = nodes(&prefix.broker_url(), &["a", "b"], Liveness::default()).await;
    let b = Arc::new(TurnWatch::default());
    nodes[1].attach(Arc::downgrade(&b) as Weak<dyn BrokerSink>);
    b.rec.until_missed(1).await;
    nodes[1].subscribe(Topic::Room(RoomName::parse("r").unwrap()));
    b.rec.until_missed(2).await;
    for seq in 1..=200 {
        nodes[0].publish(message("r", seq)).await.unwrap();
    }
    let got = b.rec.until("200 messages", |e| e.len() >= 200).await;
    let seqs: Vec<u64> = got
        .iter()
        .filter_map(|e| match e {
            BrokerEvent::Message { message, .. } => Some(message.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    // So that an idle member's socket is written by the subscriber's
    // thread at the turn's end, not by its task woken for each event.
    assert_eq!(b.outside.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn a_restarted_redis_is_caught_up_on() {
    let mut redis = OwnRedis::start().await;
    let url = BrokerUrl::parse(&redis.url()).unwrap();
    let nodes = nodes(&url, &["a", "b"], Liveness::default()).await;
    let (a, b) = (Recorder::attach(&nodes[0]), Recorder::attach(&nodes[1]));
    a.until_missed(1).await;
    b.until_missed(1).await;
    nodes[1].subscribe(Topic::Room(RoomName::parse("r").unwrap()));
    b.until_missed(2).await;
    nodes[0].publish(message("r", 1)).await.unwrap();
    b.until("r:1", |e| e.len() == 1).await;

    redis.stop().await;
    // Published while Redis is down: delivered on its own node, and its
    // room's head kept for later.
    nodes[0].publish(message("r", 2)).await.unwrap();
    assert_eq!(a.take().len(), 2);
    let before = b.missed_count();
    redis.restart().await;
    // The subscriber reconnects and says what it may have missed; the
    // publisher announces the head it could not send.
    b.until_missed(before + 1).await;
    let got = b
        .until("the head of r", |e| {
            e.iter()
                .any(|e| matches!(e, BrokerEvent::Head { seq: 2, .. }))
        })
        .await;
    assert!(got
        .iter()
        .all(|e| !matches!(e, BrokerEvent::Message { message, .. } if message.seq == 2)));
}

#[tokio::test]
async fn a_dead_node_is_buried_by_a_living_one() {
    let redis = OwnRedis::start().await;
    let url = BrokerUrl::parse(&redis.url()).unwrap();
    let quick = Liveness {
        heartbeat: Duration::from_millis(100),
        ttl: Duration::from_millis(600),
    };
    let mut cluster = nodes(&url, &["a", "b"], quick).await;
    let b = Recorder::attach(&cluster[1]);
    let a = cluster.remove(0);
    let gus = UserName::parse("Gus").unwrap();
    let ann = UserName::parse("ann").unwrap();
    assert!(a.claim_guest(&gus).await.unwrap());
    assert!(a.present(&gus, true, true).await.unwrap());
    assert!(a.present(&ann, false, true).await.unwrap());
    assert!(cluster[0].present(&ann, false, true).await.unwrap());
    assert!(!cluster[0].claim_guest(&gus).await.unwrap());
    drop(a); // no more heartbeats: killed

    let (node, orphans) = b.until_orphaned().await;
    assert_eq!(node, "a");
    assert_eq!(
        cluster[0].stats().reconnects,
        0,
        "the subscription's pings (every heartbeat) keep it, not break it"
    );
    assert_eq!(orphans.len(), 1, "ann is still on b: {orphans:?}");
    assert_eq!(orphans[0].user.as_str(), "Gus");
    assert!(orphans[0].guest);
    assert!(
        !cluster[0].claim_guest(&gus).await.unwrap(),
        "held until buried"
    );
    cluster[0].forget_node("a").await.unwrap();
    assert!(
        cluster[0].claim_guest(&gus).await.unwrap(),
        "free once buried"
    );
    assert!(cluster[0].alone().await.unwrap());
}

#[tokio::test]
async fn bad_brokers_are_refused_clearly() {
    let err = |url: &str| BrokerUrl::parse(url).err().unwrap().to_string();
    assert!(err("nats://127.0.0.1:4222").contains("the broker is Redis"));
    assert!(err("rediss://h:1").contains("not supported"));
    assert!(err("redis://h:1?prefix=a*b").contains("prefix"));
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = BrokerUrl::parse(&format!("redis://127.0.0.1:{port}")).unwrap();
    match RedisBroker::connect(&url, "n").await {
        Err(ConnectError::Unreachable(..)) => {}
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn two_nodes_cannot_share_a_name() {
    let Some(shared) = shared_redis() else { return };
    let prefix = Prefix::new(&shared);
    let url = prefix.broker_url();
    let _first = RedisBroker::connect(&url, "n1").await.unwrap();
    match RedisBroker::connect(&url, "n1").await {
        Err(e @ ConnectError::NameTaken(..)) => assert!(e.to_string().contains("--node")),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_node_restarted_under_its_name_buries_its_previous_run() {
    let redis = OwnRedis::start().await;
    let url = BrokerUrl::parse(&redis.url()).unwrap();
    let quick = Liveness {
        heartbeat: Duration::from_millis(100),
        ttl: Duration::from_millis(500),
    };
    let first = RedisBroker::connect_with(&url, "a", quick).await.unwrap();
    let gus = UserName::parse("Gus").unwrap();
    assert!(first.claim_guest(&gus).await.unwrap());
    assert!(first.present(&gus, true, true).await.unwrap());
    assert!(first
        .present(&UserName::parse("ann").unwrap(), false, true)
        .await
        .unwrap());
    drop(first); // killed
                 // Its name is taken until its key expires.
    let second = loop {
        match RedisBroker::connect_with(&url, "a", quick).await {
            Ok(b) => break b,
            Err(ConnectError::NameTaken(..)) => tokio::time::sleep(quick.heartbeat).await,
            Err(e) => panic!("{e}"),
        }
    };
    let second: Arc<dyn Broker> = Arc::new(second);
    let rec = Recorder::attach(&second);
    let (node, mut orphans) = rec.until_orphaned().await;
    assert_eq!(node, "a");
    orphans.sort_by(|x, y| x.user.key().cmp(y.user.key()));
    let names: Vec<_> = orphans.iter().map(|o| (o.user.as_str(), o.guest)).collect();
    assert_eq!(names, [("ann", false), ("Gus", true)]);
    let other = RedisBroker::connect_with(&url, "b", quick).await.unwrap();
    assert_eq!(
        other.elsewhere(&["ann", "gus"]).await.unwrap(),
        [false, false]
    );
    assert!(
        other.claim_guest(&gus).await.unwrap(),
        "the old run's guest name is free"
    );
}

#[tokio::test]
async fn nodes_do_not_bury_each_other_after_a_shared_outage() {
    let redis = OwnRedis::start().await;
    let target = &redis.url()["redis://".len()..];
    let (to_a, to_b) = (
        CutProxy::start(target.to_owned()).await,
        CutProxy::start(target.to_owned()).await,
    );
    let url = |p: &CutProxy| BrokerUrl::parse(&format!("redis://{}", p.addr)).unwrap();
    let quick = Liveness {
        heartbeat: Duration::from_millis(100),
        ttl: Duration::from_secs(2),
    };
    let a: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&url(&to_a), "a", quick)
            .await
            .unwrap(),
    );
    let b: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&url(&to_b), "b", quick)
            .await
            .unwrap(),
    );
    let recs = [Recorder::attach(&a), Recorder::attach(&b)];
    // Both lose Redis for longer than the TTL; every liveness key expires.
    to_a.cut(true);
    to_b.cut(true);
    tokio::time::sleep(quick.ttl + Duration::from_secs(1)).await;
    // A comes back first; B a moment later, well within a TTL.
    to_a.cut(false);
    tokio::time::sleep(Duration::from_millis(300)).await;
    to_b.cut(false);
    // An absence: give A more than a TTL of its own beats to do the wrong
    // thing.
    tokio::time::sleep(quick.ttl * 2).await;
    for rec in &recs {
        assert!(
            rec.orphans_reported().is_empty(),
            "a living node was buried"
        );
    }
    assert!(!a.alone().await.unwrap(), "both alive");
}

#[tokio::test]
async fn a_node_cut_off_too_long_is_buried_and_told_when_back() {
    let redis = OwnRedis::start().await;
    let to_a = CutProxy::start(redis.url()["redis://".len()..].to_owned()).await;
    let quick = Liveness {
        heartbeat: Duration::from_millis(100),
        ttl: Duration::from_millis(600),
    };
    let via_proxy = BrokerUrl::parse(&format!("redis://{}", to_a.addr)).unwrap();
    let a: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&via_proxy, "a", quick)
            .await
            .unwrap(),
    );
    let direct = BrokerUrl::parse(&redis.url()).unwrap();
    let b: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&direct, "b", quick)
            .await
            .unwrap(),
    );
    let (rec_a, rec_b) = (Recorder::attach(&a), Recorder::attach(&b));
    let gus = UserName::parse("gus").unwrap();
    assert!(a.claim_guest(&gus).await.unwrap());
    assert!(a.present(&gus, true, true).await.unwrap());
    // Only a loses Redis, for longer than its TTL: b buries it.
    to_a.cut(true);
    let (node, orphans) = rec_b.until_orphaned().await;
    assert_eq!((node.as_str(), orphans.len()), ("a", 1));
    b.forget_node("a").await.unwrap();
    to_a.cut(false);
    // Back, a learns it was buried (its guests lost their memberships).
    rec_a.until_rejoined().await;
}

/// Redis stops answering, nothing closed and nothing refused, while a
/// subscription is being taken: the subscriber gives that connection up
/// within seconds, as its pings would (they do not run while it waits),
/// rather than for as long as TCP would hold it, and takes every wanted
/// topic again once Redis answers.
#[tokio::test]
async fn a_subscription_redis_does_not_answer_is_given_up() {
    let redis = OwnRedis::start().await;
    let proxy = CutProxy::start(redis.url()["redis://".len()..].to_owned()).await;
    let via_proxy = BrokerUrl::parse(&format!("redis://{}", proxy.addr)).unwrap();
    let a: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&via_proxy, "a", Liveness::default())
            .await
            .unwrap(),
    );
    let direct = BrokerUrl::parse(&redis.url()).unwrap();
    let b: Arc<dyn Broker> = Arc::new(
        RedisBroker::connect_with(&direct, "b", Liveness::default())
            .await
            .unwrap(),
    );
    let rec = Recorder::attach(&a);
    rec.until_missed(1).await;
    assert!(a.connected());
    proxy.stall(true);
    a.subscribe(Topic::Room(RoomName::parse("r").unwrap()));
    // Nothing published meanwhile, so only the subscriber can say so.
    tokio::time::timeout(Duration::from_secs(10), async {
        while a.connected() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the unanswered subscription was given up");
    let before = rec.missed_count();
    proxy.stall(false);
    rec.until_missed(before + 1).await;
    b.publish(message("r", 1)).await.unwrap();
    rec.until("r:1 through the new subscription", |e| e.len() == 1)
        .await;
    assert!(a.stats().reconnects >= 1);
}

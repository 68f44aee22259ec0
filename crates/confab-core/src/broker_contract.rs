//! The suite every [`Broker`] must pass, run on several nodes of one
//! cluster. A backend's tests call [`broker_contract_tests!`](crate::broker_contract_tests)
//! with a future of `Option<Cluster>` (`None` skips) and whether its
//! subscriptions take effect later (and are reported `missed` then) or at
//! once.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use confab_proto::{Event, Message};
use tokio::sync::Notify;

use super::*;
use crate::conn::ConnId;
use crate::limits::Rate;

#[macro_export]
macro_rules! broker_contract_tests {
    (later: $later:expr, $make:expr) => {
        $crate::broker_contract_tests!(@each $later, $make;
            events_reach_the_subscribed_nodes_in_order,
            unsubscribed_topics_stop_arriving,
            nothing_process_local_crosses,
            presence_is_cluster_wide,
            guest_names_are_unique_in_the_cluster,
            throttles_are_shared,
            a_node_knows_whether_it_is_alone);
    };
    (@each $later:expr, $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some(cluster) = $make.await else {
                    return;
                };
                let cluster: $crate::broker::contract::Cluster = cluster;
                let cluster = cluster.later($later);
                $crate::broker::contract::$name(&cluster).await;
            }
        )*
    };
}

/// The nodes "a", "b" and "c" of a fresh cluster, and whatever must live
/// as long as the test (a guard that cleans up).
pub struct Cluster {
    pub nodes: Vec<Arc<dyn Broker>>,
    pub guard: Box<dyn std::any::Any + Send>,
    later: bool,
}

impl Cluster {
    pub fn new(nodes: Vec<Arc<dyn Broker>>, guard: impl std::any::Any + Send) -> Cluster {
        Cluster {
            nodes,
            guard: Box::new(guard),
            later: false,
        }
    }

    #[doc(hidden)]
    pub fn later(mut self, later: bool) -> Cluster {
        self.later = later;
        self
    }

    /// Attach a recorder to each node and wait until each is connected.
    async fn recorders(&self) -> Vec<Arc<Recorder>> {
        let recs: Vec<_> = self.nodes.iter().map(Recorder::attach).collect();
        if self.later {
            for rec in &recs {
                rec.until_missed(1).await;
            }
        }
        recs
    }

    /// Subscribe node `i` to a room and wait until it is in effect.
    async fn subscribe(&self, recs: &[Arc<Recorder>], i: usize, name: &str) {
        let before = *recs[i].missed.lock().unwrap();
        self.nodes[i].subscribe(Topic::Room(room(name)));
        if self.later {
            recs[i].until_missed(before + 1).await;
        }
    }
}

/// A hub stand-in that records what it is given.
#[derive(Default)]
pub struct Recorder {
    events: Mutex<Vec<BrokerEvent>>,
    missed: Mutex<usize>,
    orphans: Mutex<Vec<(String, Vec<Orphan>)>>,
    rejoined: Mutex<usize>,
    changed: Notify,
}

impl Recorder {
    pub fn attach(broker: &Arc<dyn Broker>) -> Arc<Recorder> {
        let rec = Arc::new(Recorder::default());
        let sink: Weak<dyn BrokerSink> = Arc::downgrade(&rec) as Weak<dyn BrokerSink>;
        broker.attach(sink);
        rec
    }

    /// Wait (at most 10 s) until `ready` holds for the events so far.
    pub async fn until(
        &self,
        what: &str,
        ready: impl Fn(&[BrokerEvent]) -> bool,
    ) -> Vec<BrokerEvent> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                {
                    let events = self.events.lock().unwrap();
                    if ready(&events) {
                        return events.clone();
                    }
                }
                notified.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(10), wait).await {
            Ok(events) => events,
            Err(_) => panic!(
                "timed out waiting for {what}; got {:?}",
                self.events.lock().unwrap()
            ),
        }
    }

    /// Wait until the broker reports its subscriptions in effect (`missed`
    /// at least `n` times).
    pub async fn until_missed(&self, n: usize) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if *self.missed.lock().unwrap() >= n {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the subscription took effect");
    }

    /// Wait (at most 10 s) until a dead node's users are reported.
    pub async fn until_orphaned(&self) -> (String, Vec<Orphan>) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if let Some(found) = self.orphans.lock().unwrap().pop() {
                    return found;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("a dead node's users reported")
    }

    /// The dead nodes' users reported so far.
    pub fn orphans_reported(&self) -> Vec<(String, Vec<Orphan>)> {
        self.orphans.lock().unwrap().clone()
    }

    /// Wait (at most 10 s) until the broker says this node was buried and
    /// is back.
    pub async fn until_rejoined(&self) {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                if *self.rejoined.lock().unwrap() > 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("told it was buried and is back")
    }

    pub fn missed_count(&self) -> usize {
        *self.missed.lock().unwrap()
    }

    pub fn take(&self) -> Vec<BrokerEvent> {
        std::mem::take(&mut self.events.lock().unwrap())
    }
}

impl BrokerSink for Recorder {
    fn deliver(&self, event: &BrokerEvent) {
        self.events.lock().unwrap().push(event.clone());
        self.changed.notify_waiters();
    }
    fn missed(&self, _rooms: Option<Vec<RoomName>>) {
        *self.missed.lock().unwrap() += 1;
        self.changed.notify_waiters();
    }
    fn orphaned(&self, node: String, users: Vec<Orphan>) {
        self.orphans.lock().unwrap().push((node, users));
        self.changed.notify_waiters();
    }
    fn rejoined(&self) {
        *self.rejoined.lock().unwrap() += 1;
        self.changed.notify_waiters();
    }
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn user(name: &str) -> UserName {
    UserName::parse(name).unwrap()
}

/// A committed message of `room` with `seq`, as a publisher hands it over.
pub fn message(room: &str, seq: u64) -> BrokerEvent {
    BrokerEvent::Message {
        message: Message {
            room: room.into(),
            seq,
            user: "alice".into(),
            body: format!("m{seq}"),
            ts: 1,
            nonce: None,
            ..Message::default()
        },
        accepted: Some(Instant::now()),
    }
}

fn seqs(events: &[BrokerEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            BrokerEvent::Message { message, .. } => Some(message.seq),
            _ => None,
        })
        .collect()
}

pub async fn events_reach_the_subscribed_nodes_in_order(c: &Cluster) {
    let (nodes, recs) = (&c.nodes, c.recorders().await);
    c.subscribe(&recs, 1, "lobby").await;
    // A user in no room came online: nothing to carry, nothing failed.
    let nowhere = BrokerEvent::Presence {
        user: user("loner"),
        online: true,
        rooms: Vec::new(),
    };
    nodes[0].publish(nowhere).await.unwrap();
    recs[0].take();
    for seq in 1..=50 {
        nodes[0].publish(message("lobby", seq)).await.unwrap();
    }
    let mine = recs[0].take();
    assert_eq!(
        seqs(&mine),
        (1..=50).collect::<Vec<_>>(),
        "the publisher's own hub, at once"
    );
    let theirs = recs[1].until("50 messages", |e| e.len() >= 50).await;
    assert_eq!(
        seqs(&theirs),
        (1..=50).collect::<Vec<_>>(),
        "in publish order"
    );
    assert_eq!(nodes[0].stats().dropped, 0, "nothing failed to publish");
    // A node that did not subscribe gets nothing: probe with a later
    // event it does subscribe to.
    c.subscribe(&recs, 2, "probe").await;
    nodes[0].publish(message("probe", 1)).await.unwrap();
    let third = recs[2].until("the probe", |e| !e.is_empty()).await;
    assert_eq!(third.len(), 1, "only its own topic: {third:?}");
}

pub async fn unsubscribed_topics_stop_arriving(c: &Cluster) {
    let (nodes, recs) = (&c.nodes, c.recorders().await);
    c.subscribe(&recs, 1, "a").await;
    c.subscribe(&recs, 1, "b").await;
    nodes[0].publish(message("a", 1)).await.unwrap();
    recs[1].until("a:1", |e| e.len() == 1).await;
    nodes[1].unsubscribe(Topic::Room(room("a")));
    // Order between nodes holds per publisher: once b:1 arrives, a:2
    // (published before it) would have.
    c.subscribe(&recs, 1, "b").await;
    nodes[0].publish(message("a", 2)).await.unwrap();
    nodes[0].publish(message("b", 1)).await.unwrap();
    let got = recs[1].until("b:1", |e| e.len() >= 2).await;
    let rooms: Vec<_> = got
        .iter()
        .map(|e| match e {
            BrokerEvent::Message { message, .. } => (message.room.clone(), message.seq),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(rooms, vec![("a".into(), 1), ("b".into(), 1)]);
}

pub async fn nothing_process_local_crosses(c: &Cluster) {
    let (nodes, recs) = (&c.nodes, c.recorders().await);
    c.subscribe(&recs, 1, "r").await;
    c.subscribe(&recs, 1, "s").await;
    nodes[0].publish(message("r", 7)).await.unwrap();
    let typing = BrokerEvent::Room {
        room: room("r"),
        event: Event::Typing {
            room: "r".into(),
            user: "alice".into(),
        },
        skip: Skip::Conn(ConnId(3)),
    };
    nodes[0].publish(typing).await.unwrap();
    let presence = BrokerEvent::Presence {
        user: user("alice"),
        online: true,
        rooms: vec![room("r"), room("s"), room("t")],
    };
    nodes[0].publish(presence).await.unwrap();
    let got = recs[1].until("4 events", |e| e.len() >= 4).await;
    match &got[0] {
        BrokerEvent::Message { message, accepted } => {
            assert_eq!(message.body, "m7");
            assert!(accepted.is_none(), "no Instant crosses");
        }
        other => panic!("{other:?}"),
    }
    match &got[1] {
        BrokerEvent::Room { skip, .. } => assert_eq!(*skip, Skip::Nobody, "no connection id"),
        other => panic!("{other:?}"),
    }
    // The presence change once per subscribed room, naming that room.
    let rooms: Vec<_> = got[2..]
        .iter()
        .map(|e| match e {
            BrokerEvent::Presence { rooms, .. } => rooms.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(rooms, vec![vec![room("r")], vec![room("s")]]);
    // What arrives in another version is refused, not misread.
    let mut future = wire::encode("x", &message("r", 1));
    let text = String::from_utf8(future.clone())
        .unwrap()
        .replace("\"v\":1", "\"v\":2");
    future = text.into_bytes();
    assert!(matches!(
        wire::decode(&future),
        Err(wire::WireError::Version(2))
    ));
}

pub async fn presence_is_cluster_wide(c: &Cluster) {
    let nodes = &c.nodes;
    let (a, b) = (&nodes[0], &nodes[1]);
    let alice = user("Alice");
    assert_eq!(b.elsewhere(&["alice"]).await.unwrap(), vec![false]);
    assert!(a.present(&alice, false, true).await.unwrap());
    assert_eq!(
        b.elsewhere(&["alice", "bob"]).await.unwrap(),
        vec![true, false]
    );
    assert_eq!(
        a.elsewhere(&["alice"]).await.unwrap(),
        vec![false],
        "not elsewhere than a"
    );
    assert!(b.present(&alice, false, true).await.unwrap());
    assert!(a.present(&alice, false, false).await.unwrap());
    assert_eq!(
        a.elsewhere(&["alice"]).await.unwrap(),
        vec![true],
        "still on b"
    );
    assert!(b.present(&alice, false, false).await.unwrap());
    assert_eq!(a.elsewhere(&["alice"]).await.unwrap(), vec![false]);
}

pub async fn guest_names_are_unique_in_the_cluster(c: &Cluster) {
    let nodes = &c.nodes;
    let (a, b) = (&nodes[0], &nodes[1]);
    let gus = user("Gus");
    assert!(a.claim_guest(&gus).await.unwrap());
    assert!(
        a.claim_guest(&gus).await.unwrap(),
        "its own node may take it again"
    );
    assert!(
        !b.claim_guest(&user("GUS")).await.unwrap(),
        "not another node"
    );
    assert!(a.present(&gus, true, true).await.unwrap());
    assert_eq!(b.guest("gus").await.unwrap().unwrap().as_str(), "Gus");
    assert!(
        !b.present(&gus, true, true).await.unwrap(),
        "b may not hold it"
    );
    assert!(a.present(&gus, true, false).await.unwrap());
    assert!(b.guest("gus").await.unwrap().is_none(), "free once gone");
    assert!(b.claim_guest(&gus).await.unwrap());
    // A registered user connected anywhere keeps guests off its name.
    assert!(a.present(&user("ann"), false, true).await.unwrap());
    assert!(!b.claim_guest(&user("ann")).await.unwrap());
}

pub async fn throttles_are_shared(c: &Cluster) {
    let nodes = &c.nodes;
    let rate = Rate::new(1.0 / 3600.0, 3);
    for node in nodes {
        assert_eq!(node.throttle("auth:x", rate).await.unwrap(), Ok(()));
    }
    for node in nodes {
        let wait = node.throttle("auth:x", rate).await.unwrap().unwrap_err();
        assert!(wait > Duration::from_secs(3000), "{wait:?}");
    }
    assert_eq!(
        nodes[0].throttle("auth:y", rate).await.unwrap(),
        Ok(()),
        "per key"
    );
}

pub async fn a_node_knows_whether_it_is_alone(c: &Cluster) {
    let nodes = &c.nodes;
    assert!(!nodes[0].alone().await.unwrap());
    let names: Vec<&str> = nodes.iter().map(|n| n.node()).collect();
    assert_eq!(names, ["a", "b", "c"]);
}

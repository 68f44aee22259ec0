//! The engine without a socket: sessions over channels, an in-memory store
//! and the in-memory broker.

use std::sync::Arc;
use std::time::Duration;

use confab_core::broker::BrokerSink;
use confab_core::hub::Hub;
use confab_core::store::memory::MemoryStore;
use confab_core::store::NewMessage;
use confab_core::{
    BrokerEvent, Chat, ChatConfig, CloseReason, ConnReceiver, DynStore, MemoryBroker, Outbound,
    RoomName, Session, UserName,
};
use confab_proto::{Envelope, ErrorCode, Event, Message, OkBody, Request};

async fn engine() -> (Chat, DynStore) {
    let store: DynStore = Arc::new(MemoryStore::new());
    (engine_on(store.clone()).await, store)
}

async fn engine_on(store: DynStore) -> Chat {
    Chat::new(store, Arc::new(MemoryBroker::new()), ChatConfig::default())
        .await
        .unwrap()
}

async fn call(
    s: &mut Session,
    rx: &mut ConnReceiver,
    request: Request,
) -> Result<OkBody, ErrorCode> {
    s.handle(Envelope { id: None, request }).await;
    s.settle().await; // a send is answered once it is durable
    match rx.try_recv() {
        Some(Outbound::Reply(reply)) => reply.result.map_err(|e| e.code),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn event(rx: &mut ConnReceiver) -> Option<Event> {
    match rx.try_recv()? {
        Outbound::Event(shared) => Some(shared.event.clone()),
        other => panic!("expected an event, got {other:?}"),
    }
}

fn guest(name: &str) -> Request {
    Request::Guest { user: name.into() }
}
fn join(room: &str) -> Request {
    Request::Join {
        room: room.into(),
        invite: None,
    }
}
fn send(room: &str, body: &str) -> Request {
    Request::Send {
        room: room.into(),
        body: body.into(),
        nonce: None,
    }
}

#[tokio::test]
async fn a_message_is_replied_then_fanned_out() {
    let (chat, _) = engine().await;
    let (mut a, mut arx) = chat.open(Default::default());
    let (mut b, mut brx) = chat.open(Default::default());
    call(&mut a, &mut arx, guest("ann")).await.unwrap();
    call(&mut b, &mut brx, guest("ben")).await.unwrap();
    call(&mut a, &mut arx, join("r")).await.unwrap();
    call(&mut b, &mut brx, join("r")).await.unwrap();
    assert!(matches!(event(&mut arx), Some(Event::Joined { user, .. }) if user == "ben"));

    let reply = call(&mut a, &mut arx, send("r", "hi")).await.unwrap();
    assert!(matches!(reply, OkBody::Sent { seq: 1, .. }));
    // The reply was taken first; the echo follows it.
    assert!(matches!(event(&mut arx), Some(Event::Message(m)) if m.body == "hi"));
    assert!(matches!(event(&mut brx), Some(Event::Message(m)) if m.seq == 1));
    assert!(event(&mut arx).is_none() && event(&mut brx).is_none());
}

/// Poll a future once, without waiting.
fn poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

/// Whether the session took the request without waiting.
fn handled_at_once(s: &mut Session, request: Request) -> bool {
    poll_once(std::pin::pin!(s.handle(Envelope { id: None, request }))).is_ready()
}

fn replies(rx: &mut ConnReceiver) -> Vec<Result<OkBody, ErrorCode>> {
    let mut replies = Vec::new();
    while let Some(item) = rx.try_recv() {
        if let Outbound::Reply(reply) = item {
            replies.push(reply.result.map_err(|e| e.code));
        }
    }
    replies
}

/// Sends do not wait for their commits: the session takes the next
/// request at once; their replies follow once durable, in order; any other
/// request waits for the sends before it and sees them.
#[tokio::test]
async fn sends_are_pipelined_and_answered_in_order() {
    let store = Arc::new(MemoryStore::new());
    let chat = engine_on(store.clone()).await;
    let (mut s, mut rx) = chat.open(Default::default());
    call(&mut s, &mut rx, guest("ann")).await.unwrap();
    call(&mut s, &mut rx, join("r")).await.unwrap();

    let held = store.hold_appends();
    for i in 0..3 {
        assert!(
            handled_at_once(&mut s, send("r", &format!("m{i}"))),
            "a send does not wait for its commit"
        );
    }
    // A bad send in the middle is refused in its place, not first.
    assert!(handled_at_once(&mut s, send("nowhere", "x")));
    assert!(
        replies(&mut rx).is_empty(),
        "nothing is answered before its commit"
    );
    assert!(poll_once(std::pin::pin!(s.stored())).is_pending());

    drop(held);
    s.stored().await;
    s.answer().await;
    let answered = replies(&mut rx);
    let seqs: Vec<_> = answered
        .iter()
        .map(|r| match r {
            Ok(OkBody::Sent { seq, .. }) => Ok(*seq),
            Err(code) => Err(*code),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(seqs, [Ok(1), Ok(2), Ok(3), Err(ErrorCode::NotFound)]);

    // History waits for the sends before it.
    let held = store.hold_appends();
    assert!(handled_at_once(&mut s, send("r", "m3")));
    let history = Request::History {
        room: "r".into(),
        before: None,
        after: None,
        limit: None,
    };
    let mut handled = std::pin::pin!(s.handle(Envelope {
        id: None,
        request: history,
    }));
    assert!(
        poll_once(handled.as_mut()).is_pending(),
        "history waits for the send before it"
    );
    drop(held);
    handled.await;
    let answered = replies(&mut rx);
    assert!(matches!(answered[0], Ok(OkBody::Sent { seq: 4, .. })));
    match &answered[1] {
        Ok(OkBody::History { messages, .. }) => assert_eq!(messages.len(), 4),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_command_table_checks_login_first() {
    let (chat, _) = engine().await;
    let (mut s, mut rx) = chat.open(Default::default());
    assert_eq!(
        call(&mut s, &mut rx, join("r")).await,
        Err(ErrorCode::Unauthorized)
    );
    assert_eq!(
        call(&mut s, &mut rx, Request::Ping {}).await,
        Ok(OkBody::Pong)
    );
    call(&mut s, &mut rx, guest("gil")).await.unwrap();
    assert_eq!(
        call(&mut s, &mut rx, guest("gil")).await,
        Err(ErrorCode::BadRequest)
    );
    assert_eq!(
        call(&mut s, &mut rx, send("r", "x")).await,
        Err(ErrorCode::NotFound)
    );
}

#[tokio::test]
async fn closing_a_guest_ends_its_memberships() {
    let (chat, store) = engine().await;
    let (mut a, mut arx) = chat.open(Default::default());
    let (mut g, mut grx) = chat.open(Default::default());
    call(&mut a, &mut arx, guest("ann")).await.unwrap();
    call(&mut g, &mut grx, guest("gus")).await.unwrap();
    call(&mut a, &mut arx, join("r")).await.unwrap();
    call(&mut g, &mut grx, join("r")).await.unwrap();
    event(&mut arx); // joined
    g.close().await;
    assert!(matches!(
        event(&mut arx),
        Some(Event::Presence { online: false, .. })
    ));
    assert!(matches!(event(&mut arx), Some(Event::Left { user, .. }) if user == "gus"));
    let members = store
        .members(&RoomName::parse("r").unwrap(), None, 1000)
        .await
        .unwrap();
    assert_eq!(members.len(), 1);
}

fn message(room: &str, seq: u64) -> Message {
    Message {
        room: room.into(),
        seq,
        user: "u".into(),
        body: format!("m{seq}"),
        ts: 0,
        nonce: None,
        ..Message::default()
    }
}

/// A hub on `store`, alone on its bus, filling gaps after 50 ms.
fn new_hub(store: DynStore) -> Arc<Hub> {
    Hub::new(
        store,
        Arc::new(MemoryBroker::new()),
        Duration::from_millis(50),
    )
}

/// A hub with one connected user in room `r` (whose last seq is 0).
fn hub_with_listener(store: DynStore) -> (Arc<Hub>, ConnReceiver) {
    let hub = new_hub(store);
    let (conn, rx) = confab_core::conn::channel(confab_core::conn::ConnId(1), 64, None);
    let user = UserName::parse("u").unwrap();
    hub.attach(&user, false, conn, &[(RoomName::parse("r").unwrap(), 0)])
        .unwrap();
    (hub, rx)
}

fn delivered(rx: &mut ConnReceiver) -> Vec<u64> {
    std::iter::from_fn(|| event(rx))
        .map(|e| match e {
            Event::Message(m) => m.seq,
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn the_hub_delivers_in_seq_order_whatever_the_publish_order() {
    let (hub, mut rx) = hub_with_listener(Arc::new(MemoryStore::new()));
    for seq in [2, 3, 1, 1, 5, 4, 2] {
        hub.deliver(&BrokerEvent::Message {
            message: message("r", seq),
            accepted: None,
        });
    }
    assert_eq!(
        delivered(&mut rx),
        vec![1, 2, 3, 4, 5],
        "ordered, duplicates dropped"
    );
}

/// Every connection of every member gets a room's events, and only those:
/// a user's later connections join the room's delivery, a closed one
/// leaves it, a member who leaves takes all theirs with them; `Skip`
/// spares the connection or the user it names.
#[tokio::test]
async fn a_room_delivers_to_each_connection_of_its_members_here() {
    use confab_core::broker::Skip;
    use confab_core::conn::{channel, ConnId};
    let hub = new_hub(Arc::new(MemoryStore::new()));
    let r = RoomName::parse("r").unwrap();
    let (ann, bob) = (
        UserName::parse("ann").unwrap(),
        UserName::parse("bob").unwrap(),
    );
    let (a1, mut rx_a1) = channel(ConnId(1), 64, None);
    let (a2, mut rx_a2) = channel(ConnId(2), 64, None);
    let (b1, mut rx_b1) = channel(ConnId(3), 64, None);
    hub.attach(&ann, false, a1, &[(r.clone(), 0)]).unwrap();
    hub.attach(&ann, false, a2, &[(r.clone(), 0)]).unwrap();
    hub.attach(&bob, false, b1, &[(r.clone(), 0)]).unwrap();
    let typing = |skip: Skip| BrokerEvent::Room {
        room: r.clone(),
        event: Event::Typing {
            room: "r".into(),
            user: "ann".into(),
        },
        skip,
    };
    let count = |rx: &mut ConnReceiver| std::iter::from_fn(|| event(rx)).count();
    let publish = |seq| {
        hub.deliver(&BrokerEvent::Message {
            message: message("r", seq),
            accepted: None,
        })
    };

    let online: Vec<(String, usize)> = hub
        .online()
        .into_iter()
        .map(|c| (c.user.name.as_str().to_owned(), c.connections))
        .collect();
    assert_eq!(online, [("ann".to_owned(), 2), ("bob".to_owned(), 1)]);
    publish(1);
    assert_eq!(
        [count(&mut rx_a1), count(&mut rx_a2), count(&mut rx_b1)],
        [1, 1, 1],
        "the second connection joined the room's delivery"
    );
    hub.deliver(&typing(Skip::Conn(ConnId(1))));
    assert_eq!(
        [count(&mut rx_a1), count(&mut rx_a2), count(&mut rx_b1)],
        [0, 1, 1]
    );
    hub.deliver(&typing(Skip::User("ann".into())));
    assert_eq!(
        [count(&mut rx_a1), count(&mut rx_a2), count(&mut rx_b1)],
        [0, 0, 1]
    );

    assert_eq!(hub.detach(&ann, ConnId(1)), None, "ann is still here");
    publish(2);
    assert_eq!(
        [count(&mut rx_a1), count(&mut rx_a2), count(&mut rx_b1)],
        [0, 1, 1],
        "a closed connection leaves the room's delivery"
    );

    hub.deliver(&BrokerEvent::Membership {
        room: r.clone(),
        user: ann.clone(),
        joined: false,
        last_seq: 0,
    });
    publish(3);
    assert_eq!([count(&mut rx_a2), count(&mut rx_b1)], [0, 1], "ann left");
    assert!(!hub.is_member("ann", &r));
}

/// A store with room "r", its member "u", and `n` messages committed.
async fn store_with_messages(n: usize) -> DynStore {
    let store: DynStore = Arc::new(MemoryStore::new());
    let (room, user) = (RoomName::parse("r").unwrap(), UserName::parse("u").unwrap());
    store
        .join(&room, &user, confab_core::store::JoinRules::open(false))
        .await
        .unwrap();
    for _ in 0..n {
        commit_one(&store).await;
    }
    store
}

/// Commit one more message to room "r".
async fn commit_one(store: &DynStore) {
    let m = NewMessage {
        room: RoomName::parse("r").unwrap(),
        sender: UserName::parse("u").unwrap(),
        body: "x".into(),
        nonce: None,
        ts: 0,
        direct: None,
        amend: None,
    };
    store.append(m).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_gap_no_publish_fills_is_read_from_the_store() {
    let (hub, mut rx) = hub_with_listener(store_with_messages(3).await);
    // Seqs 1 and 2 were committed but their publishes were lost.
    hub.deliver(&BrokerEvent::Message {
        message: message("r", 3),
        accepted: None,
    });
    assert!(delivered(&mut rx).is_empty(), "held back behind the gap");
    tokio::time::sleep(Duration::from_millis(60)).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(delivered(&mut rx), vec![1, 2, 3]);
}

#[tokio::test]
async fn missed_events_are_read_from_the_store_at_once() {
    let store = store_with_messages(2).await;
    let room = RoomName::parse("r").unwrap();
    let (hub, mut rx) = hub_with_listener(store.clone());
    // The bus lost both publishes and no later message follows: the
    // broker says the room may have missed events.
    hub.missed(Some(vec![room.clone()]));
    assert_eq!(delivered_soon(&mut rx, 2).await, vec![1, 2]);
    // A node announces a head it could not publish.
    commit_one(&store).await;
    hub.deliver(&BrokerEvent::Head {
        room: room.clone(),
        seq: 3,
    });
    assert_eq!(delivered_soon(&mut rx, 1).await, vec![3]);
}

/// The next `n` messages' seqs, as the hub's fill task delivers them.
async fn delivered_soon(rx: &mut ConnReceiver, n: usize) -> Vec<u64> {
    let wait = async {
        let mut got = Vec::new();
        while got.len() < n {
            tokio::task::yield_now().await;
            got.extend(delivered(rx));
        }
        got
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("delivered from the store")
}

#[tokio::test]
async fn a_node_back_from_burial_closes_its_guests_and_announces_its_users() {
    let hub = new_hub(Arc::new(MemoryStore::new()));
    let room = RoomName::parse("r").unwrap();
    let mut rxs = Vec::new();
    for (i, (name, guest)) in [("gus", true), ("ann", false), ("obs", false)]
        .into_iter()
        .enumerate()
    {
        let (conn, rx) = confab_core::conn::channel(confab_core::conn::ConnId(i as u64), 64, None);
        let user = UserName::parse(name).unwrap();
        hub.attach(&user, guest, conn, &[(room.clone(), 0)])
            .unwrap();
        rxs.push(rx);
    }
    hub.rejoined();
    assert_eq!(
        rxs[0].reason(),
        Some(CloseReason::Stale),
        "the guest reconnects"
    );
    assert_eq!(rxs[1].reason(), None, "a registered user stays");
    // Its users are announced again (the others were told they left).
    let wait = async {
        loop {
            tokio::task::yield_now().await;
            if let Some(Event::Presence { user, online }) = event(&mut rxs[2]) {
                return (user, online);
            }
        }
    };
    let seen = tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .unwrap();
    assert!(seen.1, "{seen:?}");
}

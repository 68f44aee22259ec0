//! Local fan-out: which of this node's connections receive what.
//!
//! The hub knows the users connected here, their connections and the rooms
//! they are members of. It receives [`BrokerEvent`]s and queues each event
//! once per recipient connection, encoded once for all of them. It tells
//! the broker which topics this node needs: a room while a member is
//! connected here, a user while they are.
//!
//! Messages of a room go out strictly in seq order. Publishers may deliver
//! out of order (two senders whose messages were committed in one batch
//! race to publish; several nodes publish to one room), so each room keeps
//! the next seq it expects and holds back anything after a gap. A gap that
//! is not filled by a late publish within `gap_fill_delay` is filled from
//! the store, where every seq below a published one is already committed.
//! When the broker says events may have been lost (it reconnected, a
//! subscription took effect, a node announces a room's head), the hub
//! reads the room's messages after the last one it delivered from the
//! store at once: a lost message arrives even when no later one follows.
//!
//! Which users are connected here is recorded in the broker's cluster-wide
//! registry by one task that, for each change, records the hub's state at
//! that moment: the registry converges on the truth whatever order changes
//! race in.
//!
//! Locking: the hub's mutex over who is connected and which rooms they are
//! in; one mutex per room over that room's delivery (its order, what is
//! held back, its members here); and one per user over their connections
//! here (`Present`, shared by the user's entry and their rooms). A room's
//! events are delivered under the room's lock alone: publishers to
//! different rooms do not wait for each other, and nothing waits for a
//! fan-out but the next event of the same room. Lock order: the hub's, a
//! room's, a user's; never the other way. None is held across an
//! `.await`; the work under them is map look-ups, queue pushes and the
//! broker's non-blocking subscription calls, never I/O. The maps hash with
//! foldhash, not SipHash: a room message looks every member up. foldhash
//! is seeded at random per process, so user names cannot be chosen to
//! collide in advance.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use confab_proto::{Event, Message, Seq, SharedEvent};
use tokio::sync::mpsc;

use crate::broker::{Broker, BrokerEvent, BrokerSink, Orphan, Skip, Topic};
use crate::conn::{CloseReason, Conn, ConnId, Outbound};
use crate::error::ChatError;
use crate::names::{RoomName, UserName};
use crate::store::DynStore;

type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// How many messages one gap-filling read fetches at most.
const GAP_FILL_BATCH: u32 = 500;
/// A presence change reaches a node once per room it shares with the
/// user; copies arriving within this window tell each observer once.
const PRESENCE_COPIES: Duration = Duration::from_secs(2);
/// Rooms whose heads one catch-up query reads.
const CATCH_UP_CHUNK: usize = 1000;
/// How long a catch-up read that failed waits before trying again.
const CATCH_UP_RETRY: Duration = Duration::from_secs(1);

pub struct Hub {
    state: Mutex<State>,
    store: DynStore,
    broker: Arc<dyn Broker>,
    gap_fill_delay: Duration,
    /// Users whose registration in the broker may be stale.
    registry: mpsc::UnboundedSender<(UserName, bool)>,
    me: Weak<Hub>,
}

#[derive(Default)]
struct State {
    /// Users with at least one connection here, by key.
    users: HashMap<String, UserEntry>,
    /// Rooms with at least one connected member here.
    rooms: HashMap<RoomName, RoomEntry>,
    /// Recent presence changes by user key, and whom they were told to.
    presence: HashMap<String, PresenceTold>,
    /// When `presence` was last cleared of old changes.
    presence_pruned: Option<Instant>,
}

struct PresenceTold {
    online: bool,
    at: Instant,
    told: HashSet<String>,
}

struct UserEntry {
    name: UserName,
    guest: bool,
    here: Arc<Present>,
    rooms: HashSet<RoomName>,
}

/// A user's connections here, held by the user's entry and by every room
/// the user is in here: a room reaches them under its own lock, and a
/// user's second connection is one push, not one per room. Its lock is
/// the last taken (after the hub's and a room's).
struct Present {
    key: String,
    conns: Mutex<Vec<Conn>>,
}

impl Present {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Conn>> {
        self.conns.lock().expect("connections poisoned")
    }

    /// Queue `shared` for each of these connections but those `skip` names.
    fn push(&self, shared: &Arc<SharedEvent>, skip: &Skip) {
        if matches!(skip, Skip::User(k) if *k == self.key) {
            return;
        }
        for conn in self.conns().iter() {
            if *skip != Skip::Conn(conn.id()) {
                conn.push(Outbound::Event(shared.clone()));
            }
        }
    }
}

struct RoomEntry {
    /// Keys of the connected members (for the hub, without the room's
    /// lock; the same members as `RoomFan::members`).
    members: HashSet<String>,
    /// The room's delivery, under its own lock.
    fan: Fan,
}

/// What delivering a room's events takes: kept apart from the hub's state
/// so that a room fans out under its own lock.
struct RoomFan {
    /// The seq of the next message to deliver.
    next_seq: Seq,
    /// Messages that arrived after a gap, waiting for it to close.
    pending: BTreeMap<Seq, Arc<SharedEvent>>,
    /// A task is filling the room from the store.
    filling: bool,
    /// Read the store up to its end: events may have been lost.
    catch_up: bool,
    /// The members here, with their connections.
    members: Vec<Arc<Present>>,
}

type Fan = Arc<Mutex<RoomFan>>;

fn lock_fan(fan: &Fan) -> std::sync::MutexGuard<'_, RoomFan> {
    fan.lock().expect("room poisoned")
}

/// A connected user, as `dm` needs to find guests.
#[derive(Debug, Clone)]
pub struct OnlineUser {
    pub name: UserName,
    pub guest: bool,
}

/// A user connected here, as operators see it.
#[derive(Debug, Clone)]
pub struct Connected {
    pub user: OnlineUser,
    pub connections: usize,
    /// The client addresses of those connections that have one.
    pub addresses: Vec<std::net::IpAddr>,
}

impl Hub {
    /// A hub for this node, attached to `broker`. Must be called within a
    /// Tokio runtime: it starts the task that keeps the registry.
    pub fn new(store: DynStore, broker: Arc<dyn Broker>, gap_fill_delay: Duration) -> Arc<Hub> {
        let (registry, changes) = mpsc::unbounded_channel();
        let hub = Arc::new_cyclic(|me| Hub {
            state: Mutex::default(),
            store,
            broker: broker.clone(),
            gap_fill_delay,
            registry,
            me: me.clone(),
        });
        let sink: Weak<dyn BrokerSink> = Arc::downgrade(&hub) as Weak<dyn BrokerSink>;
        broker.attach(sink);
        broker.subscribe(Topic::Everyone);
        tokio::spawn(keep_registry(Arc::downgrade(&hub), changes));
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("hub poisoned")
    }

    /// Register a logged-in connection with the rooms its user is in (and
    /// each room's last seq). Returns whether it is the user's first
    /// connection here. A name held by a connected guest is a `conflict`.
    pub fn attach(
        &self,
        user: &UserName,
        guest: bool,
        conn: Conn,
        rooms: &[(RoomName, Seq)],
    ) -> Result<bool, ChatError> {
        let mut st = self.lock();
        if let Some(entry) = st.users.get(user.key()) {
            if entry.guest || guest {
                return Err(ChatError::conflict(format!(
                    "the name {user} is in use by a connected guest"
                )));
            }
            entry.here.conns().push(conn);
            return Ok(false);
        }
        st.users.insert(
            user.key().to_owned(),
            UserEntry {
                name: user.clone(),
                guest,
                here: Arc::new(Present {
                    key: user.key().to_owned(),
                    conns: Mutex::new(vec![conn]),
                }),
                rooms: HashSet::default(),
            },
        );
        self.broker.subscribe(Topic::User(user.key().to_owned()));
        for (room, last_seq) in rooms {
            st.subscribe(&*self.broker, room, user.key(), *last_seq);
        }
        let _ = self.registry.send((user.clone(), guest));
        Ok(true)
    }

    /// Remove a connection. When it was the user's last one here, returns
    /// the rooms the user was in.
    pub fn detach(&self, user: &UserName, conn: ConnId) -> Option<Vec<RoomName>> {
        let mut st = self.lock();
        let entry = st.users.get(user.key())?;
        {
            let mut conns = entry.here.conns();
            conns.retain(|c| c.id() != conn);
            if !conns.is_empty() {
                return None;
            }
        }
        let entry = st.users.remove(user.key()).expect("present");
        self.broker.unsubscribe(Topic::User(user.key().to_owned()));
        for room in &entry.rooms {
            st.unsubscribe_room(&*self.broker, room, user.key());
        }
        let _ = self.registry.send((entry.name, entry.guest));
        Some(entry.rooms.into_iter().collect())
    }

    pub fn is_online(&self, user_key: &str) -> bool {
        self.lock().users.contains_key(user_key)
    }

    pub fn online_user(&self, user_key: &str) -> Option<OnlineUser> {
        self.lock().users.get(user_key).map(|u| OnlineUser {
            name: u.name.clone(),
            guest: u.guest,
        })
    }

    /// The users connected here, with their connections, by name.
    pub fn online(&self) -> Vec<Connected> {
        let st = self.lock();
        let mut users: Vec<_> = st
            .users
            .values()
            .map(|u| {
                let conns = u.here.conns();
                Connected {
                    user: OnlineUser {
                        name: u.name.clone(),
                        guest: u.guest,
                    },
                    connections: conns.len(),
                    addresses: conns.iter().filter_map(Conn::addr).collect(),
                }
            })
            .collect();
        users.sort_by(|a, b| a.user.name.key().cmp(b.user.name.key()));
        users
    }

    /// (users connected here, rooms with a connected member here).
    pub fn counts(&self) -> (usize, usize) {
        let st = self.lock();
        (st.users.len(), st.rooms.len())
    }

    /// Whether a connected user is a member of `room` (as far as this node knows).
    pub fn is_member(&self, user_key: &str, room: &RoomName) -> bool {
        self.lock()
            .users
            .get(user_key)
            .is_some_and(|u| u.rooms.contains(room))
    }

    /// Fill `room` from the store after `delay`, unless a fill is running.
    fn schedule_fill(&self, room: RoomName, delay: Duration) {
        let Some(hub) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            hub.fill(room).await;
        });
    }

    /// Read the room's missing messages from the store until no gap is
    /// left and, when asked to catch up, until the store has no more.
    async fn fill(&self, room: RoomName) {
        loop {
            let (after, want, to_end) = {
                let Some(fan) = self.fan(&room) else {
                    return;
                };
                let mut entry = lock_fan(&fan);
                let after = entry.next_seq - 1;
                match entry.pending.keys().next() {
                    Some(&first) => (after, (first - after - 1).min(GAP_FILL_BATCH as Seq), false),
                    None if entry.catch_up => {
                        entry.catch_up = false;
                        (after, GAP_FILL_BATCH as Seq, true)
                    }
                    None => {
                        entry.filling = false;
                        return;
                    }
                }
            };
            let fetched = self.store.messages_after(&room, after, want as u32).await;
            if self.take_fill(&room, fetched, after, want, to_end) {
                tokio::time::sleep(CATCH_UP_RETRY).await;
            }
        }
    }

    /// Deliver what a fill read. Returns whether to wait before the next
    /// read (the store failed).
    fn take_fill(
        &self,
        room: &RoomName,
        fetched: Result<Vec<Message>, crate::StoreError>,
        after: Seq,
        want: Seq,
        to_end: bool,
    ) -> bool {
        let Some(fan) = self.fan(room) else {
            return false;
        };
        let mut entry = lock_fan(&fan);
        match fetched {
            Ok(messages) if !messages.is_empty() => {
                let full = messages.len() as Seq == want;
                for m in &messages {
                    entry.message(m, None);
                }
                if to_end && full {
                    entry.catch_up = true;
                }
            }
            Ok(_) if to_end => {} // caught up
            Err(e) if to_end => {
                tracing::warn!(%room, error = %e, "catching up from storage; retrying");
                entry.catch_up = true;
                return true;
            }
            outcome => {
                // The store does not have what a later seq proves was
                // committed, or cannot be read: deliver what we hold
                // rather than stall the room. Clients see the gap in
                // the seqs and fetch it with `history`.
                let Some(&until) = entry.pending.keys().next() else {
                    return false; // a late publish closed the gap meanwhile
                };
                tracing::warn!(%room, after, until, ?outcome, "skipping an unfillable gap");
                entry.next_seq = until;
                entry.drain();
            }
        }
        false
    }

    /// The delivery of `room`, if it has a member here.
    fn fan(&self, room: &RoomName) -> Option<Fan> {
        self.lock().rooms.get(room).map(|e| e.fan.clone())
    }

    /// Read these rooms (every room with a member here, for `None`) to
    /// the store's end, now. One query per chunk of rooms finds those the
    /// store has more of; only they are read.
    fn catch_up(&self, rooms: Option<Vec<RoomName>>) {
        let rooms = match rooms {
            Some(rooms) => rooms,
            None => self.lock().rooms.keys().cloned().collect(),
        };
        let Some(hub) = self.me.upgrade() else { return };
        if rooms.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for chunk in rooms.chunks(CATCH_UP_CHUNK) {
                let behind = match hub.store.last_seqs(chunk).await {
                    Ok(heads) => {
                        let st = hub.lock();
                        chunk
                            .iter()
                            .zip(heads)
                            .filter(|(r, head)| {
                                st.rooms
                                    .get(*r)
                                    .is_some_and(|e| *head >= lock_fan(&e.fan).next_seq)
                            })
                            .map(|(r, _)| r.clone())
                            .collect()
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading rooms' heads; reading every room");
                        chunk.to_vec()
                    }
                };
                hub.read_to_end(behind);
            }
        });
    }

    /// Start reading these rooms to the store's end.
    fn read_to_end(&self, rooms: Vec<RoomName>) {
        let st = self.lock();
        let mut start = Vec::new();
        for room in rooms {
            if let Some(e) = st.rooms.get(&room) {
                let mut entry = lock_fan(&e.fan);
                entry.catch_up = true;
                if !entry.filling {
                    entry.filling = true;
                    start.push(room);
                }
            }
        }
        drop(st);
        for room in start {
            self.schedule_fill(room, Duration::ZERO);
        }
    }

    /// Close every connection of a user here.
    fn close_user(&self, key: &str, reason: CloseReason) {
        if let Some(u) = self.lock().users.get(key) {
            for conn in u.here.conns().iter() {
                conn.close(reason);
            }
        }
    }

    /// Have the registry record whether `user` is connected here now.
    /// Drop what the hub remembers of past presence changes once it can no
    /// longer matter (called now and then: after a burst of logins, the
    /// last ones would otherwise stay until the next change).
    pub fn forget_old_presence(&self) {
        self.lock().forget_presence(Instant::now());
    }

    pub fn recheck(&self, user: &UserName, guest: bool) {
        let _ = self.registry.send((user.clone(), guest));
    }

    /// Tell the registry again about every user connected here (the
    /// broker lost or could not take what it was told).
    fn reassert(&self) {
        for u in self.lock().users.values() {
            let _ = self.registry.send((u.name.clone(), u.guest));
        }
    }

    /// Clean up after users whose only node died: their presence, a
    /// guest's memberships; then free the node's guest names.
    async fn bury(&self, node: String, orphans: Vec<Orphan>) {
        tracing::info!(%node, users = orphans.len(), "a node died; cleaning up after its users");
        let keys: Vec<&str> = orphans.iter().map(|o| o.user.key()).collect();
        let back = match self.broker.elsewhere(&keys).await {
            Ok(back) => back,
            Err(_) => vec![false; keys.len()],
        };
        let mut events = Vec::new();
        for (orphan, back) in orphans.iter().zip(back) {
            if back || self.is_online(orphan.user.key()) {
                continue; // reconnected already
            }
            let user = &orphan.user;
            let rooms = if orphan.guest {
                match self.store.drop_guest(user).await {
                    Ok(rooms) => rooms,
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "dropping a dead node's guest");
                        Vec::new()
                    }
                }
            } else {
                match self.store.rooms(user, false, None, u32::MAX).await {
                    Ok(views) => views.into_iter().map(|v| v.room).collect(),
                    Err(_) => Vec::new(),
                }
            };
            if orphan.guest {
                for room in &rooms {
                    events.push(BrokerEvent::Room {
                        room: room.clone(),
                        event: Event::Left {
                            room: room.as_str().to_owned(),
                            user: user.as_str().to_owned(),
                        },
                        skip: Skip::Nobody,
                    });
                }
            }
            events.push(BrokerEvent::Presence {
                user: user.clone(),
                online: false,
                rooms,
            });
        }
        for event in events {
            let _ = self.broker.publish(event).await;
        }
        if let Err(e) = self.broker.forget_node(&node).await {
            tracing::warn!(%node, error = %e, "forgetting a dead node");
        }
    }
}

/// Record in the broker whether each changed user is connected here, as
/// the hub has it when the change is taken up.
async fn keep_registry(hub: Weak<Hub>, mut changes: mpsc::UnboundedReceiver<(UserName, bool)>) {
    while let Some((user, guest)) = changes.recv().await {
        let Some(hub) = hub.upgrade() else { break };
        let here = hub.is_online(user.key());
        match hub.broker.present(&user, guest, here).await {
            Ok(true) => {}
            Ok(false) => {
                // Two nodes let one guest name in while they could not
                // see each other; the other node's guest keeps it.
                tracing::warn!(%user, "a guest name taken on another node; closing ours");
                hub.close_user(user.key(), CloseReason::Stale);
            }
            Err(e) => tracing::debug!(%user, error = %e, "recording presence"),
        }
    }
}

impl BrokerSink for Hub {
    fn deliver(&self, event: &BrokerEvent) {
        let mut st = self.lock();
        match event {
            BrokerEvent::Message { message, accepted } => {
                let room = RoomName::from_trusted(message.room.clone());
                let Some(fan) = st.rooms.get(&room).map(|e| e.fan.clone()) else {
                    return;
                };
                // The room's own lock from here: other rooms go on.
                drop(st);
                if lock_fan(&fan).message(message, *accepted) {
                    self.schedule_fill(room, self.gap_fill_delay);
                }
            }
            BrokerEvent::Head { room, seq } => {
                let behind = st
                    .rooms
                    .get(room)
                    .is_some_and(|e| *seq >= lock_fan(&e.fan).next_seq);
                drop(st);
                if behind {
                    self.read_to_end(vec![room.clone()]);
                }
            }
            BrokerEvent::Room { room, event, skip } => {
                let Some(fan) = st.rooms.get(room).map(|e| e.fan.clone()) else {
                    return;
                };
                drop(st);
                let shared = Arc::new(SharedEvent::new(event.clone()));
                lock_fan(&fan).fan_out(&shared, skip);
            }
            BrokerEvent::User { user, event, skip } => {
                if let Some(u) = st.users.get(user) {
                    let shared = Arc::new(SharedEvent::new(event.clone()));
                    u.here.push(&shared, skip);
                }
            }
            BrokerEvent::Membership {
                room,
                user,
                joined,
                last_seq,
            } => {
                if !st.users.contains_key(user.key()) {
                    return;
                }
                if *joined {
                    st.subscribe(&*self.broker, room, user.key(), *last_seq);
                } else {
                    st.unsubscribe(&*self.broker, room, user.key());
                }
            }
            BrokerEvent::Everyone { event } => {
                let shared = Arc::new(SharedEvent::new(event.clone()));
                for u in st.users.values() {
                    u.here.push(&shared, &Skip::Nobody);
                }
            }
            BrokerEvent::Disconnect { user } => {
                drop(st);
                self.close_user(user, CloseReason::Kicked);
            }
            BrokerEvent::Presence {
                user,
                online,
                rooms,
            } => st.presence(user, *online, rooms),
        }
    }

    fn missed(&self, rooms: Option<Vec<RoomName>>) {
        if rooms.is_none() {
            self.reassert();
        }
        self.catch_up(rooms);
    }

    fn orphaned(&self, node: String, users: Vec<Orphan>) {
        let Some(hub) = self.me.upgrade() else { return };
        tokio::spawn(async move { hub.bury(node, users).await });
    }

    fn rejoined(&self) {
        // Guests lost their memberships (and may lose their names): they
        // connect again. Registered users are recorded and shown again.
        let online: Vec<BrokerEvent> = {
            let st = self.lock();
            for u in st.users.values().filter(|u| u.guest) {
                for conn in u.here.conns().iter() {
                    conn.close(CloseReason::Stale);
                }
            }
            st.users
                .values()
                .filter(|u| !u.guest)
                .map(|u| BrokerEvent::Presence {
                    user: u.name.clone(),
                    online: true,
                    rooms: u.rooms.iter().cloned().collect(),
                })
                .collect()
        };
        tracing::warn!(
            "this node was presumed dead by the cluster; closing its guests, announcing its users"
        );
        self.reassert();
        let Some(hub) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            for event in online {
                let _ = hub.broker.publish(event).await;
            }
        });
    }
}

impl State {
    fn subscribe(&mut self, broker: &dyn Broker, room: &RoomName, user_key: &str, last_seq: Seq) {
        let Some(user) = self.users.get_mut(user_key) else {
            return;
        };
        user.rooms.insert(room.clone());
        let entry = self.rooms.entry(room.clone()).or_insert_with(|| {
            broker.subscribe(Topic::Room(room.clone()));
            RoomEntry {
                members: HashSet::default(),
                fan: Arc::new(Mutex::new(RoomFan {
                    next_seq: last_seq + 1,
                    pending: BTreeMap::new(),
                    filling: false,
                    catch_up: false,
                    members: Vec::new(),
                })),
            }
        });
        if entry.members.insert(user_key.to_owned()) {
            lock_fan(&entry.fan).members.push(user.here.clone());
        }
    }

    fn unsubscribe(&mut self, broker: &dyn Broker, room: &RoomName, user_key: &str) {
        if let Some(user) = self.users.get_mut(user_key) {
            user.rooms.remove(room);
        }
        self.unsubscribe_room(broker, room, user_key);
    }

    fn unsubscribe_room(&mut self, broker: &dyn Broker, room: &RoomName, user_key: &str) {
        if let Some(entry) = self.rooms.get_mut(room) {
            if entry.members.remove(user_key) {
                lock_fan(&entry.fan).members.retain(|p| p.key != user_key);
            }
            if entry.members.is_empty() {
                self.rooms.remove(room);
                broker.unsubscribe(Topic::Room(room.clone()));
            }
        }
    }

    /// Forget presence changes too old to have copies still coming, and
    /// the map's room for them.
    fn forget_presence(&mut self, now: Instant) {
        self.presence_pruned = Some(now);
        self.presence.retain(|_, p| now - p.at < PRESENCE_COPIES);
        if self.presence.len() * 4 < self.presence.capacity() {
            self.presence.shrink_to_fit();
        }
    }

    /// Tell the connected members of `rooms` (but the user) that `user`
    /// came or went, each once however many copies arrive.
    fn presence(&mut self, user: &UserName, online: bool, rooms: &[RoomName]) {
        let now = Instant::now();
        // At most once per window: clearing on every change once the map
        // is large made a burst of logins quadratic (a fifth of the
        // server's time in the connect benchmark).
        let due = self
            .presence_pruned
            .is_none_or(|at| now - at >= PRESENCE_COPIES);
        if self.presence.len() > 1024 && due {
            self.forget_presence(now);
        }
        let told = self
            .presence
            .entry(user.key().to_owned())
            .or_insert_with(|| PresenceTold {
                online,
                at: now,
                told: HashSet::default(),
            });
        if told.online != online || now - told.at >= PRESENCE_COPIES {
            *told = PresenceTold {
                online,
                at: now,
                told: HashSet::default(),
            };
        }
        let observers: Vec<&String> = rooms
            .iter()
            .filter_map(|r| self.rooms.get(r))
            .flat_map(|e| e.members.iter())
            .filter(|k| *k != user.key() && told.told.insert((*k).clone()))
            .collect();
        if observers.is_empty() {
            return;
        }
        let shared = Arc::new(SharedEvent::new(Event::Presence {
            user: user.as_str().to_owned(),
            online,
        }));
        for key in observers {
            if let Some(u) = self.users.get(key) {
                u.here.push(&shared, &Skip::Nobody);
            }
        }
    }
}

impl RoomFan {
    /// Deliver or hold back one message. Returns whether a new gap opened
    /// and needs filling.
    fn message(&mut self, m: &Message, accepted: Option<Instant>) -> bool {
        if m.seq < self.next_seq || self.pending.contains_key(&m.seq) {
            return false; // delivered already
        }
        let shared = SharedEvent::new(Event::Message(m.clone())).accepted_at(accepted);
        self.pending.insert(m.seq, Arc::new(shared));
        if m.seq > self.next_seq {
            if self.filling {
                return false;
            }
            self.filling = true;
            return true;
        }
        self.drain();
        false
    }

    /// Deliver the held-back messages that are next in line.
    fn drain(&mut self) {
        while let Some(shared) = self.pending.remove(&self.next_seq) {
            self.fan_out(&shared, &Skip::Nobody);
            self.next_seq += 1;
        }
    }

    /// Queue `shared` for every connection of the room's members here.
    fn fan_out(&self, shared: &Arc<SharedEvent>, skip: &Skip) {
        for member in &self.members {
            member.push(shared, skip);
        }
    }
}

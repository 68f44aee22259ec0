//! Local fan-out: which of this node's connections receive what.
//!
//! The hub knows the users connected here, their connections and the rooms
//! they are members of. It receives [`BrokerEvent`]s and queues each event
//! once per recipient connection, encoded once for all of them.
//!
//! Messages of a room go out strictly in seq order. Publishers may deliver
//! out of order (two senders whose messages were committed in one batch
//! race to publish; later, several nodes publish to one room), so each room
//! keeps the next seq it expects and holds back anything after a gap. A gap
//! that is not filled by a late publish within `gap_fill_delay` is filled
//! from the store, where every seq below a published one is already
//! committed.
//!
//! Locking: one mutex over all state, never held across an `.await`; the
//! work under it is map look-ups and `try_send`s, never I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use confab_proto::{Event, Message, Seq, SharedEvent};

use crate::broker::{BrokerEvent, BrokerSink, Skip};
use crate::conn::{CloseReason, Conn, ConnId, Outbound};
use crate::error::ChatError;
use crate::names::{RoomName, UserName};
use crate::store::DynStore;

/// How many messages one gap-filling read fetches at most.
const GAP_FILL_BATCH: u32 = 500;

pub struct Hub {
    state: Mutex<State>,
    store: DynStore,
    gap_fill_delay: Duration,
    me: Weak<Hub>,
}

#[derive(Default)]
struct State {
    /// Users with at least one connection here, by key.
    users: HashMap<String, UserEntry>,
    /// Rooms with at least one connected member here.
    rooms: HashMap<RoomName, RoomEntry>,
}

struct UserEntry {
    name: UserName,
    guest: bool,
    conns: Vec<Conn>,
    rooms: HashSet<RoomName>,
}

struct RoomEntry {
    /// Keys of the connected members.
    members: HashSet<String>,
    /// The seq of the next message to deliver.
    next_seq: Seq,
    /// Messages that arrived after a gap, waiting for it to close.
    pending: BTreeMap<Seq, Arc<SharedEvent>>,
    filling: bool,
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
    pub fn new(store: DynStore, gap_fill_delay: Duration) -> Arc<Hub> {
        Arc::new_cyclic(|me| Hub {
            state: Mutex::default(),
            store,
            gap_fill_delay,
            me: me.clone(),
        })
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
        if let Some(entry) = st.users.get_mut(user.key()) {
            if entry.guest || guest {
                return Err(ChatError::conflict(format!(
                    "the name {user} is in use by a connected guest"
                )));
            }
            entry.conns.push(conn);
            return Ok(false);
        }
        st.users.insert(
            user.key().to_owned(),
            UserEntry {
                name: user.clone(),
                guest,
                conns: vec![conn],
                rooms: HashSet::new(),
            },
        );
        for (room, last_seq) in rooms {
            st.subscribe(room, user.key(), *last_seq);
        }
        Ok(true)
    }

    /// Remove a connection. When it was the user's last one here, returns
    /// the rooms the user was in.
    pub fn detach(&self, user: &UserName, conn: ConnId) -> Option<Vec<RoomName>> {
        let mut st = self.lock();
        let entry = st.users.get_mut(user.key())?;
        entry.conns.retain(|c| c.id() != conn);
        if !entry.conns.is_empty() {
            return None;
        }
        let entry = st.users.remove(user.key()).expect("present");
        for room in &entry.rooms {
            st.unsubscribe_room(room, user.key());
        }
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
            .map(|u| Connected {
                user: OnlineUser {
                    name: u.name.clone(),
                    guest: u.guest,
                },
                connections: u.conns.len(),
                addresses: u.conns.iter().filter_map(Conn::addr).collect(),
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

    fn schedule_gap_fill(&self, room: RoomName) {
        let Some(hub) = self.me.upgrade() else { return };
        tokio::spawn(async move {
            tokio::time::sleep(hub.gap_fill_delay).await;
            hub.fill_gap(room).await;
        });
    }

    async fn fill_gap(&self, room: RoomName) {
        loop {
            let (after, until) = {
                let mut st = self.lock();
                let Some(entry) = st.rooms.get_mut(&room) else {
                    return;
                };
                match entry.pending.keys().next() {
                    Some(&first) => (entry.next_seq - 1, first),
                    None => {
                        entry.filling = false;
                        return;
                    }
                }
            };
            let want = (until - after - 1).min(GAP_FILL_BATCH as Seq) as u32;
            let fetched = self.store.messages_after(&room, after, want).await;
            let mut st = self.lock();
            match fetched {
                Ok(messages) if !messages.is_empty() => {
                    for m in &messages {
                        st.message(m, None);
                    }
                }
                outcome => {
                    // The store does not have what a later seq proves was
                    // committed, or cannot be read: deliver what we hold
                    // rather than stall the room. Clients see the gap in
                    // the seqs and fetch it with `history`.
                    tracing::warn!(%room, after, until, ?outcome, "skipping an unfillable gap");
                    if let Some(entry) = st.rooms.get_mut(&room) {
                        entry.next_seq = until;
                    }
                    st.drain(&room);
                }
            }
        }
    }
}

impl BrokerSink for Hub {
    fn deliver(&self, event: &BrokerEvent) {
        let mut st = self.lock();
        match event {
            BrokerEvent::Message { message, accepted } => {
                if let Some(room) = st.message(message, *accepted) {
                    drop(st);
                    self.schedule_gap_fill(room);
                }
            }
            BrokerEvent::Room { room, event, skip } => {
                let shared = Arc::new(SharedEvent::new(event.clone()));
                if let Some(entry) = st.rooms.get(room) {
                    fan_out(&st.users, &entry.members, &shared, skip);
                }
            }
            BrokerEvent::User { user, event, skip } => {
                if let Some(u) = st.users.get(user) {
                    let shared = Arc::new(SharedEvent::new(event.clone()));
                    push_all(u, &shared, skip);
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
                    st.subscribe(room, user.key(), *last_seq);
                } else {
                    st.unsubscribe(room, user.key());
                }
            }
            BrokerEvent::Everyone { event } => {
                let shared = Arc::new(SharedEvent::new(event.clone()));
                for u in st.users.values() {
                    push_all(u, &shared, &Skip::Nobody);
                }
            }
            BrokerEvent::Disconnect { user } => {
                if let Some(u) = st.users.get(user) {
                    for conn in &u.conns {
                        conn.close(CloseReason::Kicked);
                    }
                }
            }
            BrokerEvent::Presence {
                user,
                online,
                rooms,
            } => {
                let observers: HashSet<&String> = rooms
                    .iter()
                    .filter_map(|r| st.rooms.get(r))
                    .flat_map(|e| e.members.iter())
                    .filter(|k| *k != user.key())
                    .collect();
                if observers.is_empty() {
                    return;
                }
                let shared = Arc::new(SharedEvent::new(Event::Presence {
                    user: user.as_str().to_owned(),
                    online: *online,
                }));
                for key in observers {
                    if let Some(u) = st.users.get(key) {
                        push_all(u, &shared, &Skip::Nobody);
                    }
                }
            }
        }
    }
}

impl State {
    fn subscribe(&mut self, room: &RoomName, user_key: &str, last_seq: Seq) {
        let Some(user) = self.users.get_mut(user_key) else {
            return;
        };
        user.rooms.insert(room.clone());
        self.rooms
            .entry(room.clone())
            .or_insert_with(|| RoomEntry {
                members: HashSet::new(),
                next_seq: last_seq + 1,
                pending: BTreeMap::new(),
                filling: false,
            })
            .members
            .insert(user_key.to_owned());
    }

    fn unsubscribe(&mut self, room: &RoomName, user_key: &str) {
        if let Some(user) = self.users.get_mut(user_key) {
            user.rooms.remove(room);
        }
        self.unsubscribe_room(room, user_key);
    }

    fn unsubscribe_room(&mut self, room: &RoomName, user_key: &str) {
        if let Some(entry) = self.rooms.get_mut(room) {
            entry.members.remove(user_key);
            if entry.members.is_empty() {
                self.rooms.remove(room);
            }
        }
    }

    /// Deliver or hold back one message. Returns the room when a new gap
    /// opened and needs filling.
    fn message(&mut self, m: &Message, accepted: Option<Instant>) -> Option<RoomName> {
        let room = RoomName::from_trusted(m.room.clone());
        let entry = self.rooms.get_mut(&room)?;
        if m.seq < entry.next_seq || entry.pending.contains_key(&m.seq) {
            return None; // delivered already
        }
        let shared = SharedEvent::new(Event::Message(m.clone())).accepted_at(accepted);
        entry.pending.insert(m.seq, Arc::new(shared));
        if m.seq > entry.next_seq {
            if entry.filling {
                return None;
            }
            entry.filling = true;
            return Some(room);
        }
        self.drain(&room);
        None
    }

    /// Deliver the held-back messages that are next in line.
    fn drain(&mut self, room: &RoomName) {
        let Some(entry) = self.rooms.get_mut(room) else {
            return;
        };
        while let Some(shared) = entry.pending.remove(&entry.next_seq) {
            fan_out(&self.users, &entry.members, &shared, &Skip::Nobody);
            entry.next_seq += 1;
        }
    }
}

fn fan_out(
    users: &HashMap<String, UserEntry>,
    members: &HashSet<String>,
    shared: &Arc<SharedEvent>,
    skip: &Skip,
) {
    for key in members {
        if let Some(u) = users.get(key) {
            push_all(u, shared, skip);
        }
    }
}

fn push_all(user: &UserEntry, shared: &Arc<SharedEvent>, skip: &Skip) {
    if matches!(skip, Skip::User(k) if *k == user.name.key()) {
        return;
    }
    for conn in &user.conns {
        if *skip != Skip::Conn(conn.id()) {
            conn.push(Outbound::Event(shared.clone()));
        }
    }
}

//! An in-memory [`Store`]: the reference for the contract suite and the
//! backend of the core's unit tests. Not for production: it forgets
//! everything when the process ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;
use confab_proto::{Message, Role, Sanction, SanctionKind, Seq};

use super::*;

#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// True while appends are held (see [`MemoryStore::hold_appends`]).
    held: tokio::sync::watch::Sender<bool>,
}

/// Appends stay unanswered while this lives: see
/// [`MemoryStore::hold_appends`].
pub struct HeldAppends<'a>(&'a MemoryStore);

impl Drop for HeldAppends<'_> {
    fn drop(&mut self) {
        self.0.held.send_replace(false);
    }
}

#[derive(Default)]
struct State {
    users: HashMap<String, UserRecord>,
    tokens: HashMap<TokenHash, UserName>,
    rooms: BTreeMap<RoomName, Room>,
    /// (cursor, user), ascending.
    removed: Vec<(u64, UserName)>,
    /// Keys of the users who are operators.
    operators: HashSet<String>,
    /// code -> invite
    invites: HashMap<String, InviteRow>,
}

#[derive(Default)]
struct Room {
    /// Created by a guest: removed once it has no members.
    guest_created: bool,
    topic: String,
    messages: Vec<Message>,
    /// user key -> membership
    members: BTreeMap<String, Membership>,
    /// (sender key, nonce) -> seq
    nonces: HashMap<(String, String), Seq>,
    /// (user key, kind) -> the ban or mute, in force or ended.
    sanctions: HashMap<(String, SanctionKind), Sanction>,
    /// A channel's hub (its room, `hub/`).
    hub: Option<RoomName>,
    /// A private channel, or hub.
    private: bool,
}

struct Membership {
    name: UserName,
    guest: bool,
    read_seq: Seq,
    role: Role,
}

impl Room {
    fn last_seq(&self) -> Seq {
        self.messages.len() as Seq
    }

    /// The user's sanction of this kind, if in force at `now`.
    fn sanction(&self, user: &UserName, kind: SanctionKind, now: i64) -> Option<&Sanction> {
        self.sanctions
            .get(&(user.key().to_owned(), kind))
            .filter(|s| in_force(s.until_ts, now))
    }

    fn refuse_sanctioned(
        &self,
        name: &RoomName,
        user: &UserName,
        kind: SanctionKind,
    ) -> StoreResult<()> {
        match self.sanction(user, kind, now_ms()) {
            Some(s) => Err(sanctioned(kind, name, s.until_ts)),
            None => Ok(()),
        }
    }

    /// Refuse to take the owner role from the room's only owner, `user`.
    fn keep_an_owner(&self, name: &RoomName, user: &UserName) -> StoreResult<()> {
        let owners = self.members.values().filter(|m| m.role == Role::Owner);
        if self.members[user.key()].role == Role::Owner && owners.count() == 1 {
            return Err(last_owner(user, name));
        }
        Ok(())
    }

    /// Check and apply an edit or deletion made by `sender`.
    fn amend(&mut self, amend: Amend, sender: &UserName, entry: &Message) -> StoreResult<()> {
        let index = (amend.target() as usize).wrapping_sub(1);
        let target = self.messages.get(index).map(|m| AmendTarget {
            sender_key: m.user.to_ascii_lowercase(),
            is_amend: m.amends().is_some(),
            deleted: m.deleted,
        });
        check_amend(amend, sender, target.as_ref())?;
        match amend {
            Amend::Edit(_) => {
                let m = &mut self.messages[index];
                m.body = entry.body.clone();
                m.edited_ts = Some(entry.ts);
            }
            Amend::Delete { target, .. } => {
                for m in &mut self.messages {
                    if m.seq == target || m.edit == Some(target) {
                        m.body = String::new();
                    }
                }
                self.messages[index].deleted = true;
            }
        }
        Ok(())
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Until the guard is dropped, appends are stored (in order, visible to
    /// reads) but their outcomes wait, as if the commit took that long: for
    /// tests of what waits on a commit and what does not.
    pub fn hold_appends(&self) -> HeldAppends<'_> {
        self.held.send_replace(true);
        HeldAppends(self)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().expect("memory store poisoned"))
    }
}

impl State {
    /// Remove `room` if a guest created it and nobody is left in it.
    fn sweep(&mut self, room: &RoomName) {
        if self
            .rooms
            .get(room)
            .is_some_and(|r| r.guest_created && r.members.is_empty())
        {
            self.rooms.remove(room);
        }
    }

    /// Public rooms the user is a member of.
    fn public_rooms_of(&self, user: &UserName) -> usize {
        self.rooms
            .iter()
            .filter(|(name, r)| !name.is_direct() && r.members.contains_key(user.key()))
            .count()
    }

    /// The room whose roles count in `room`: its hub's for a channel.
    fn authority(&self, room: &RoomName) -> StoreResult<RoomName> {
        let r = self.rooms.get(room).ok_or(StoreError::NoSuchRoom)?;
        Ok(r.hub.clone().unwrap_or_else(|| room.clone()))
    }

    /// A ban or mute of `kind` in the hub of `room`, if it has one.
    fn refuse_in_hub(
        &self,
        room: &RoomName,
        user: &UserName,
        kind: SanctionKind,
    ) -> StoreResult<()> {
        match self.rooms.get(room).and_then(|r| r.hub.as_ref()) {
            Some(hub) => self.rooms[hub].refuse_sanctioned(hub, user, kind),
            None => Ok(()),
        }
    }

    /// Whether a room is listed to everyone by `rooms` with `all`.
    fn listed(&self, name: &RoomName, r: &Room) -> bool {
        !name.is_direct()
            && !name.is_hub_room()
            && !r.private
            && r.hub.as_ref().is_none_or(|h| !self.rooms[h].private)
    }

    /// Use `code` to let `user` into `place`, spending it if it is a
    /// single user's.
    fn redeem(&mut self, code: Option<&str>, place: &RoomName, user: &UserName) -> StoreResult<()> {
        let code = code.ok_or_else(|| private_place(place))?;
        if check_invite(self.invites.get(code), place, user, now_ms())? {
            self.invites.remove(code);
        }
        Ok(())
    }

    fn member_room(&mut self, room: &RoomName, user: &UserName) -> StoreResult<&mut Room> {
        let r = self.rooms.get_mut(room).ok_or(StoreError::NoSuchRoom)?;
        if !r.members.contains_key(user.key()) {
            return Err(StoreError::NotMember);
        }
        Ok(r)
    }
}

fn add_member(room: &mut Room, user: &UserName, guest: bool, role: Role) -> bool {
    if room.members.contains_key(user.key()) {
        return false;
    }
    room.members.insert(
        user.key().to_owned(),
        Membership {
            name: user.clone(),
            guest,
            read_seq: 0,
            role,
        },
    );
    true
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_user(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        self.with(|s| {
            if s.users.contains_key(name.key()) {
                return Err(StoreError::Conflict(format!("user name {name}")));
            }
            s.users.insert(
                name.key().to_owned(),
                UserRecord {
                    name: name.clone(),
                    password_hash: password_hash.to_owned(),
                    banned: None,
                },
            );
            Ok(())
        })
    }

    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>> {
        Ok(self.with(|s| s.users.get(name.key()).cloned()))
    }

    async fn set_password(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        self.with(|s| {
            let user = s.users.get_mut(name.key()).ok_or_else(|| no_user(name))?;
            user.password_hash = password_hash.to_owned();
            s.tokens.retain(|_, u| u != name);
            Ok(())
        })
    }

    async fn list_users(&self) -> StoreResult<Vec<UserName>> {
        Ok(self.with(|s| {
            let mut names: Vec<_> = s.users.values().map(|u| u.name.clone()).collect();
            names.sort_by(|a, b| a.key().cmp(b.key()));
            names
        }))
    }

    async fn delete_user(&self, name: &UserName) -> StoreResult<()> {
        self.with(|s| {
            let record = s.users.remove(name.key()).ok_or_else(|| no_user(name))?;
            s.tokens.retain(|_, u| u != name);
            s.operators.remove(name.key());
            for room in s.rooms.values_mut() {
                room.members.remove(name.key());
            }
            let cursor = s.removed.last().map_or(0, |(c, _)| *c) + 1;
            s.removed.push((cursor, record.name));
            Ok(())
        })
    }

    async fn removed_users(&self, after: Option<u64>) -> StoreResult<RemovedUsers> {
        Ok(self.with(|s| {
            let last = s.removed.last().map_or(0, |(c, _)| *c);
            let Some(after) = after else {
                return RemovedUsers {
                    cursor: last,
                    users: Vec::new(),
                };
            };
            RemovedUsers {
                cursor: last.max(after),
                users: s
                    .removed
                    .iter()
                    .filter(|(c, _)| *c > after)
                    .map(|(_, u)| u.clone())
                    .collect(),
            }
        }))
    }

    async fn create_token(&self, user: &UserName, token: &TokenHash) -> StoreResult<()> {
        self.with(|s| s.tokens.insert(*token, user.clone()));
        Ok(())
    }

    async fn token_user(&self, token: &TokenHash) -> StoreResult<Option<UserRecord>> {
        Ok(self.with(|s| {
            let user = s.tokens.get(token)?;
            s.users.get(user.key()).cloned()
        }))
    }

    async fn ban_user(&self, user: &UserName, ban: ServerBan) -> StoreResult<()> {
        self.with(|s| {
            let record = s.users.get_mut(user.key()).ok_or_else(|| no_user(user))?;
            record.banned = Some(ban);
            Ok(())
        })
    }

    async fn unban_user(&self, user: &UserName) -> StoreResult<bool> {
        Ok(self.with(|s| {
            let ban = s.users.get_mut(user.key()).and_then(|r| r.banned.take());
            ban.is_some_and(|b| b.in_force(now_ms()))
        }))
    }

    async fn revoke_token(&self, token: &TokenHash) -> StoreResult<()> {
        self.with(|s| s.tokens.remove(token));
        Ok(())
    }

    async fn join(
        &self,
        room: &RoomName,
        user: &UserName,
        rules: JoinRules,
    ) -> StoreResult<Joined> {
        self.with(|s| {
            let member = s
                .rooms
                .get(room)
                .map(|r| r.members.contains_key(user.key()));
            match member {
                None if !rules.create => return Err(StoreError::NoSuchRoom),
                Some(true) => {}
                _ => {
                    if s.public_rooms_of(user) >= rules.max_rooms as usize {
                        return Err(too_many_rooms(rules.max_rooms));
                    }
                }
            }
            let role = match member {
                None if room.hub().is_some() => return Err(StoreError::NoSuchRoom),
                None => Role::Owner,
                Some(_) => Role::Member,
            };
            if member == Some(false) {
                s.rooms[room].refuse_sanctioned(room, user, SanctionKind::Ban)?;
                s.refuse_in_hub(room, user, SanctionKind::Ban)?;
                let r = &s.rooms[room];
                if let Some(hub) = r.hub.clone() {
                    if !s.rooms[&hub].members.contains_key(user.key()) {
                        return Err(not_in_hub(&room.hub().expect("a channel")));
                    }
                    if r.private {
                        s.redeem(rules.invite.as_deref(), room, user)?;
                    }
                }
            }
            let r = s.rooms.entry(room.clone()).or_insert_with(|| Room {
                guest_created: rules.guest,
                ..Room::default()
            });
            let newly_joined = add_member(r, user, rules.guest, role);
            Ok(Joined {
                topic: r.topic.clone(),
                last_seq: r.last_seq(),
                newly_joined,
            })
        })
    }

    async fn leave(&self, room: &RoomName, user: &UserName) -> StoreResult<()> {
        self.with(|s| {
            s.member_room(room, user)?.members.remove(user.key());
            s.sweep(room);
            Ok(())
        })
    }

    async fn drop_guest(&self, user: &UserName) -> StoreResult<Vec<RoomName>> {
        self.with(|s| {
            let mut left = Vec::new();
            for (name, room) in s.rooms.iter_mut() {
                if room.members.get(user.key()).is_some_and(|m| m.guest) {
                    room.members.remove(user.key());
                    left.push(name.clone());
                }
            }
            for room in &left {
                s.sweep(room);
            }
            Ok(left)
        })
    }

    async fn drop_all_guests(&self) -> StoreResult<()> {
        self.with(|s| {
            for room in s.rooms.values_mut() {
                room.members.retain(|_, m| !m.guest);
            }
            s.rooms
                .retain(|_, r| !(r.guest_created && r.members.is_empty()));
        });
        Ok(())
    }

    async fn members(
        &self,
        room: &RoomName,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(UserName, Role)>> {
        self.with(|s| {
            let r = s.rooms.get(room).ok_or(StoreError::NoSuchRoom)?;
            // In a channel, the roles are the hub's.
            let roles = &s.rooms[&s.authority(room)?].members;
            Ok(r.members
                .iter()
                .filter(|(key, _)| after.is_none_or(|a| key.as_str() > a))
                .take(limit as usize)
                .map(|(key, m)| (m.name.clone(), roles.get(key).map_or(m.role, |h| h.role)))
                .collect())
        })
    }

    async fn rooms(
        &self,
        user: &UserName,
        all: bool,
        after: Option<&RoomName>,
        limit: u32,
    ) -> StoreResult<Vec<RoomView>> {
        Ok(self.with(|s| {
            s.rooms
                .iter()
                .filter(|(name, _)| after.is_none_or(|a| *name > a))
                .filter_map(|(name, r)| {
                    let read_seq = r.members.get(user.key()).map(|m| m.read_seq);
                    let listed = if all {
                        s.listed(name, r)
                    } else {
                        read_seq.is_some()
                    };
                    listed.then(|| RoomView {
                        room: name.clone(),
                        topic: r.topic.clone(),
                        member_count: r.members.len() as u64,
                        last_seq: r.last_seq(),
                        read_seq,
                    })
                })
                .take(limit as usize)
                .collect()
        }))
    }

    async fn set_topic(&self, room: &RoomName, user: &UserName, topic: &str) -> StoreResult<()> {
        self.with(|s| {
            s.member_room(room, user)?.topic = topic.to_owned();
            Ok(())
        })
    }

    async fn role(&self, room: &RoomName, user: &UserName) -> StoreResult<Option<Role>> {
        self.with(|s| {
            let r = &s.rooms[&s.authority(room)?];
            Ok(r.members.get(user.key()).map(|m| m.role))
        })
    }

    async fn set_role(&self, room: &RoomName, user: &UserName, role: Role) -> StoreResult<()> {
        self.with(|s| {
            let room = &s.authority(room)?;
            let r = s.member_room(room, user)?;
            if role != Role::Owner {
                r.keep_an_owner(room, user)?;
            }
            r.members.get_mut(user.key()).expect("checked member").role = role;
            Ok(())
        })
    }

    async fn operator(&self, user: &UserName) -> StoreResult<bool> {
        Ok(self.with(|s| s.operators.contains(user.key())))
    }

    async fn set_operator(&self, user: &UserName, operator: bool) -> StoreResult<()> {
        self.with(|s| {
            if !s.users.contains_key(user.key()) {
                return Err(no_user(user));
            }
            if operator {
                s.operators.insert(user.key().to_owned());
            } else {
                s.operators.remove(user.key());
            }
            Ok(())
        })
    }

    async fn sanction(&self, room: &RoomName, sanction: NewSanction) -> StoreResult<Vec<RoomName>> {
        self.with(|s| {
            let r = s.rooms.get_mut(room).ok_or(StoreError::NoSuchRoom)?;
            let key = sanction.user.key().to_owned();
            r.sanctions
                .insert((key.clone(), sanction.kind), sanction.view());
            if sanction.kind != SanctionKind::Ban {
                return Ok(Vec::new());
            }
            // Out of the room, and of a hub's channels with it.
            let mut ended = Vec::new();
            for (name, r) in s.rooms.iter_mut() {
                let within = name == room || r.hub.as_ref() == Some(room);
                if within && r.members.remove(&key).is_some() {
                    ended.push(name.clone());
                }
            }
            s.sweep(room);
            Ok(ended)
        })
    }

    async fn lift(
        &self,
        room: &RoomName,
        user: &UserName,
        kind: SanctionKind,
    ) -> StoreResult<bool> {
        self.with(|s| {
            let r = s.rooms.get_mut(room).ok_or(StoreError::NoSuchRoom)?;
            let held = r.sanction(user, kind, now_ms()).is_some();
            r.sanctions.remove(&(user.key().to_owned(), kind));
            Ok(held)
        })
    }

    async fn sanctions(&self, room: &RoomName, now: i64) -> StoreResult<Vec<Sanction>> {
        self.with(|s| {
            let r = s.rooms.get(room).ok_or(StoreError::NoSuchRoom)?;
            let mut list: Vec<_> = r
                .sanctions
                .iter()
                .filter(|(_, s)| in_force(s.until_ts, now))
                .collect();
            list.sort_by(|(a, _), (b, _)| (&a.0, a.1.as_str()).cmp(&(&b.0, b.1.as_str())));
            Ok(list.into_iter().map(|(_, s)| s.clone()).collect())
        })
    }

    async fn create_hub(&self, hub: NewHub) -> StoreResult<()> {
        self.with(|s| {
            let room = RoomName::hub_room(&hub.hub);
            if s.rooms.contains_key(&room) {
                return Err(StoreError::Conflict(format!("hub name {}", hub.hub)));
            }
            let mut r = Room {
                topic: hub.title,
                private: hub.private,
                ..Room::default()
            };
            add_member(&mut r, &hub.owner, false, Role::Owner);
            let general = RoomName::channel(&hub.hub, FIRST_CHANNEL).expect("a valid name");
            let mut channel = Room {
                hub: Some(room.clone()),
                ..Room::default()
            };
            add_member(&mut channel, &hub.owner, false, Role::Member);
            s.rooms.insert(room, r);
            s.rooms.insert(general, channel);
            Ok(())
        })
    }

    async fn join_hub(
        &self,
        hub: &HubName,
        user: &UserName,
        guest: bool,
        invite: Option<&str>,
    ) -> StoreResult<HubJoined> {
        self.with(|s| {
            let room = RoomName::hub_room(hub);
            let r = s.rooms.get(&room).ok_or(StoreError::NoSuchRoom)?;
            if r.members.contains_key(user.key()) {
                return Ok(HubJoined::default());
            }
            r.refuse_sanctioned(&room, user, SanctionKind::Ban)?;
            if r.private {
                s.redeem(invite, &room, user)?;
            }
            add_member(
                s.rooms.get_mut(&room).expect("found"),
                user,
                guest,
                Role::Member,
            );
            let mut channels = Vec::new();
            for (name, c) in s.rooms.iter_mut() {
                let open = c.hub.as_ref() == Some(&room) && !c.private;
                if open && c.sanction(user, SanctionKind::Ban, now_ms()).is_none() {
                    add_member(c, user, guest, Role::Member);
                    channels.push((name.clone(), c.last_seq()));
                }
            }
            Ok(HubJoined {
                newly_joined: true,
                channels,
            })
        })
    }

    async fn leave_hub(&self, hub: &HubName, user: &UserName) -> StoreResult<Vec<RoomName>> {
        self.with(|s| {
            let room = RoomName::hub_room(hub);
            let r = s.member_room(&room, user)?;
            r.keep_an_owner(&room, user)?;
            r.members.remove(user.key());
            let mut left = Vec::new();
            for (name, c) in s.rooms.iter_mut() {
                if c.hub.as_ref() == Some(&room) && c.members.remove(user.key()).is_some() {
                    left.push(name.clone());
                }
            }
            Ok(left)
        })
    }

    async fn hubs(&self, user: Option<&UserName>, all: bool) -> StoreResult<Vec<HubView>> {
        Ok(self.with(|s| {
            s.rooms
                .iter()
                .filter(|(name, _)| name.is_hub_room())
                .filter_map(|(name, r)| {
                    let role = user.and_then(|u| r.members.get(u.key()).map(|m| m.role));
                    let listed = match user {
                        None => true,
                        Some(_) if all => !r.private,
                        Some(_) => role.is_some(),
                    };
                    listed.then(|| HubView {
                        hub: name.hub().expect("a hub"),
                        title: r.topic.clone(),
                        private: r.private,
                        member_count: r.members.len() as u64,
                        role,
                    })
                })
                .collect()
        }))
    }

    async fn hub(&self, hub: &HubName, user: &UserName) -> StoreResult<HubDetail> {
        self.with(|s| {
            let room = RoomName::hub_room(hub);
            let r = s.rooms.get(&room).ok_or(StoreError::NoSuchRoom)?;
            let role = r.members.get(user.key()).map(|m| m.role);
            if r.private && role.is_none() {
                return Err(private_place(&room));
            }
            let channels = s
                .rooms
                .iter()
                .filter(|(_, c)| c.hub.as_ref() == Some(&room))
                .filter_map(|(name, c)| {
                    let read_seq = c.members.get(user.key()).map(|m| m.read_seq);
                    (!c.private || read_seq.is_some()).then(|| ChannelView {
                        room: name.clone(),
                        topic: c.topic.clone(),
                        private: c.private,
                        last_seq: c.last_seq(),
                        read_seq,
                    })
                })
                .collect();
            Ok(HubDetail {
                title: r.topic.clone(),
                private: r.private,
                role,
                channels,
                members: r
                    .members
                    .values()
                    .map(|m| (m.name.clone(), m.role))
                    .collect(),
            })
        })
    }

    async fn delete_hub(&self, hub: &HubName) -> StoreResult<Vec<(RoomName, Vec<UserName>)>> {
        self.with(|s| {
            let room = RoomName::hub_room(hub);
            if !s.rooms.contains_key(&room) {
                return Err(StoreError::NoSuchRoom);
            }
            let gone: Vec<RoomName> = s
                .rooms
                .iter()
                .filter(|(name, r)| **name == room || r.hub.as_ref() == Some(&room))
                .map(|(name, _)| name.clone())
                .collect();
            s.invites.retain(|_, i| !gone.contains(&i.room));
            Ok(gone
                .into_iter()
                .map(|name| {
                    let r = s.rooms.remove(&name).expect("listed");
                    let members = r.members.into_values().map(|m| m.name).collect();
                    (name, members)
                })
                .collect())
        })
    }

    async fn create_channel(
        &self,
        channel: &RoomName,
        private: bool,
        topic: &str,
        by: &UserName,
    ) -> StoreResult<Vec<UserName>> {
        self.with(|s| {
            let hub = RoomName::hub_room(&channel.hub().ok_or(StoreError::NoSuchRoom)?);
            let h = s.rooms.get(&hub).ok_or(StoreError::NoSuchRoom)?;
            if s.rooms.contains_key(channel) {
                return Err(StoreError::Conflict(format!("channel name {channel}")));
            }
            let mut c = Room {
                hub: Some(hub.clone()),
                private,
                topic: topic.to_owned(),
                ..Room::default()
            };
            let members: Vec<(UserName, bool)> = if private {
                vec![(by.clone(), false)]
            } else {
                h.members
                    .values()
                    .map(|m| (m.name.clone(), m.guest))
                    .collect()
            };
            for (user, guest) in &members {
                add_member(&mut c, user, *guest, Role::Member);
            }
            s.rooms.insert(channel.clone(), c);
            Ok(members.into_iter().map(|(u, _)| u).collect())
        })
    }

    async fn create_invite(&self, invite: NewInvite) -> StoreResult<()> {
        self.with(|s| {
            if !s.rooms.contains_key(&invite.place) {
                return Err(StoreError::NoSuchRoom);
            }
            let row = InviteRow {
                room: invite.place,
                user_key: invite.user.map(|u| u.key().to_owned()),
                expires_ts: invite.expires_ts,
            };
            s.invites.insert(invite.code, row);
            Ok(())
        })
    }

    async fn queue_append(&self, m: NewMessage) -> StoreResult<Queued> {
        // Stored at once, in call order; the outcome is ready unless held.
        let outcome = self.with(|s| {
            let speaks = !matches!(m.amend, Some(Amend::Delete { .. }));
            let hub_mute = match speaks {
                true => s.refuse_in_hub(&m.room, &m.sender, SanctionKind::Mute),
                false => Ok(()),
            };
            let mut new_members = Vec::new();
            let room = match &m.direct {
                Some(d) => {
                    let r = s.rooms.entry(m.room.clone()).or_insert_with(|| Room {
                        guest_created: d.sender_guest,
                        ..Room::default()
                    });
                    if add_member(r, &m.sender, d.sender_guest, Role::Member) {
                        new_members.push(m.sender.clone());
                    }
                    if add_member(r, &d.peer, d.peer_guest, Role::Member) {
                        new_members.push(d.peer.clone());
                    }
                    r
                }
                None if Amend::by_moderator(m.amend) => {
                    s.rooms.get_mut(&m.room).ok_or(StoreError::NoSuchRoom)?
                }
                None => s.member_room(&m.room, &m.sender)?,
            };
            if let Some(nonce) = &m.nonce {
                let key = (m.sender.key().to_owned(), nonce.clone());
                if let Some(&seq) = room.nonces.get(&key) {
                    return Ok(Appended {
                        message: room.messages[seq as usize - 1].clone(),
                        duplicate: true,
                        new_members,
                    });
                }
            }
            if speaks {
                room.refuse_sanctioned(&m.room, &m.sender, SanctionKind::Mute)?;
                hub_mute?;
            }
            let (edit, delete) = m.amend.map_or((None, None), Amend::fields);
            let message = Message {
                room: m.room.as_str().to_owned(),
                seq: room.last_seq() + 1,
                user: m.sender.as_str().to_owned(),
                body: m.body,
                ts: m.ts,
                nonce: m.nonce.clone(),
                edit,
                delete,
                ..Message::default()
            };
            if let Some(amend) = m.amend {
                room.amend(amend, &m.sender, &message)?;
            }
            if let Some(nonce) = m.nonce {
                room.nonces
                    .insert((m.sender.key().to_owned(), nonce), message.seq);
            }
            room.messages.push(message.clone());
            Ok(Appended {
                message,
                duplicate: false,
                new_members,
            })
        });
        let mut held = self.held.subscribe();
        Ok(Box::pin(async move {
            let _ = held.wait_for(|held| !held).await;
            outcome
        }))
    }

    async fn history(
        &self,
        room: &RoomName,
        user: &UserName,
        page: Page,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        self.with(|s| {
            let r = s.member_room(room, user)?;
            let all = &r.messages;
            let limit = limit as usize;
            // Seq n is at index n - 1.
            let (from, to, more) = match page {
                Page::Latest => {
                    let from = all.len().saturating_sub(limit);
                    (from, all.len(), from > 0)
                }
                Page::Before(seq) => {
                    let end = (seq.saturating_sub(1) as usize).min(all.len());
                    let from = end.saturating_sub(limit);
                    (from, end, from > 0)
                }
                Page::After(seq) => {
                    let from = (seq as usize).min(all.len());
                    let to = (from + limit).min(all.len());
                    (from, to, to < all.len())
                }
            };
            Ok(HistoryPage {
                messages: all[from..to].to_vec(),
                more,
            })
        })
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: Seq,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        Ok(self.with(|s| {
            s.rooms.get(room).map_or_else(Vec::new, |r| {
                let from = (after as usize).min(r.messages.len());
                let to = (from + limit as usize).min(r.messages.len());
                r.messages[from..to].to_vec()
            })
        }))
    }

    async fn last_seqs(&self, rooms: &[RoomName]) -> StoreResult<Vec<Seq>> {
        Ok(self.with(|s| {
            rooms
                .iter()
                .map(|r| s.rooms.get(r).map_or(0, Room::last_seq))
                .collect()
        }))
    }

    async fn mark_read(&self, room: &RoomName, user: &UserName, seq: Seq) -> StoreResult<Seq> {
        self.with(|s| {
            let r = s.member_room(room, user)?;
            if seq > r.last_seq() {
                return Err(StoreError::Invalid(format!(
                    "seq {seq} is past the room's last message ({})",
                    r.last_seq()
                )));
            }
            let m = r.members.get_mut(user.key()).expect("checked member");
            m.read_seq = m.read_seq.max(seq);
            Ok(m.read_seq)
        })
    }

    async fn ping(&self) -> StoreResult<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    crate::store_contract_tests!(async {
        (
            std::sync::Arc::new(super::MemoryStore::new()) as crate::store::DynStore,
            (),
        )
    });
}

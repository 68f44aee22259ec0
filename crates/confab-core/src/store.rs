//! Durable state behind one trait, so that SQLite and PostgreSQL are
//! interchangeable. Every operation that has to be atomic (allocating a
//! `seq`, deduplicating a nonce, checking membership before a write) happens
//! inside the backend, in one transaction: the core never keeps a counter
//! of its own, so several servers can share one database.
//!
//! - [`memory`]: an in-memory backend for tests of the core.
//! - [`transfer`]: rows as `confab db copy` moves them between backends.
//! - [`contract`] (feature `testing`): the suite every backend must pass.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use confab_proto::{Message, Role, Sanction, SanctionKind, Seq};

use crate::error::StoreError;
use crate::names::{HubName, RoomName, UserName};

pub mod memory;
pub mod transfer;

#[cfg(any(test, feature = "testing"))]
pub mod contract;

pub type StoreResult<T> = Result<T, StoreError>;

/// A queued message's outcome, resolved once it is durable: see
/// [`Store::queue_append`].
pub type Queued = Pin<Box<dyn Future<Output = StoreResult<Appended>> + Send + Sync>>;

/// A SHA-256 digest of a session token: tokens are stored only as hashes.
pub type TokenHash = [u8; 32];

/// A registered user's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: UserName,
    /// An argon2 hash in PHC string form.
    pub password_hash: String,
    /// A ban from the whole server, if one was given (it may have ended:
    /// see [`ServerBan::in_force`]).
    pub banned: Option<ServerBan>,
}

/// A user's ban from the whole server: no login while it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerBan {
    pub reason: String,
    /// When it ends by itself (Unix ms); `None`: never.
    pub until_ts: Option<i64>,
}

impl ServerBan {
    pub fn in_force(&self, now: i64) -> bool {
        in_force(self.until_ts, now)
    }
}

/// How a [`Store::join`] may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRules {
    /// A guest's membership, which ends with [`Store::drop_guest`]; a room
    /// a guest creates is removed once it has no members.
    pub guest: bool,
    /// Create the room if it does not exist (else `NoSuchRoom`).
    pub create: bool,
    /// An invite code (for a private channel).
    pub invite: Option<String>,
    /// The most public rooms the user may be a member of: joining one more
    /// is `Limit`. Direct conversations do not count.
    pub max_rooms: u32,
}

/// A hub to create: see [`Store::create_hub`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewHub {
    pub hub: HubName,
    pub title: String,
    pub private: bool,
    pub owner: UserName,
}

/// The channel every hub starts with.
pub const FIRST_CHANNEL: &str = "general";

/// The result of [`Store::join_hub`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HubJoined {
    /// False when the user was already a member.
    pub newly_joined: bool,
    /// The channels this made the user a member of, with their last seq.
    pub channels: Vec<(RoomName, Seq)>,
}

/// A hub as [`Store::hubs`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubView {
    pub hub: HubName,
    pub title: String,
    pub private: bool,
    pub member_count: u64,
    /// The caller's role; `None` when not a member.
    pub role: Option<Role>,
}

/// A channel as a hub's detail shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelView {
    pub room: RoomName,
    pub topic: String,
    pub private: bool,
    pub last_seq: Seq,
    /// The caller's read marker; `None` when not a member.
    pub read_seq: Option<Seq>,
}

/// A hub as [`Store::hub`] shows it to one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubDetail {
    pub title: String,
    pub private: bool,
    /// The caller's role; `None` when not a member.
    pub role: Option<Role>,
    /// Public channels, and the private ones the caller is in, by name.
    pub channels: Vec<ChannelView>,
    /// By key.
    pub members: Vec<(UserName, Role)>,
}

/// An invite to record: see [`Store::create_invite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewInvite {
    pub code: String,
    /// A hub's room ([`RoomName::hub_room`]) or a private channel.
    pub place: RoomName,
    /// For this user only, and used once; `None`: for whoever has the code,
    /// until it expires.
    pub user: Option<UserName>,
    pub expires_ts: Option<i64>,
    pub by: UserName,
}

/// The refusal of an invite that is unknown, expired, used, for someone
/// else, or for another place: one answer for all, so that codes cannot
/// be probed.
pub fn bad_invite() -> StoreError {
    StoreError::Refused("the invite is not valid here: unknown, expired, used, or not yours".into())
}

/// An invite as a backend reads it, checked by [`check_invite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    pub room: RoomName,
    pub user_key: Option<String>,
    pub expires_ts: Option<i64>,
}

/// Whether `invite` lets `user` into `place` at `now`; returns whether it
/// is used up by this (a single user's invite is).
pub fn check_invite(
    invite: Option<&InviteRow>,
    place: &RoomName,
    user: &UserName,
    now: i64,
) -> StoreResult<bool> {
    let invite = invite.ok_or_else(bad_invite)?;
    let usable = invite.room == *place
        && invite.user_key.as_deref().is_none_or(|k| k == user.key())
        && in_force(invite.expires_ts, now);
    if !usable {
        return Err(bad_invite());
    }
    Ok(invite.user_key.is_some())
}

/// The refusals of the hub rules, the same from every backend.
pub fn not_in_hub(hub: &HubName) -> StoreError {
    StoreError::Refused(format!("join the hub {hub} first"))
}

pub fn private_place(place: &RoomName) -> StoreError {
    match place.hub() {
        Some(hub) if place.is_hub_room() => {
            StoreError::Refused(format!("the hub {hub} is private: it takes an invite"))
        }
        _ => StoreError::Refused(format!(
            "the channel {place} is private: it takes an invite"
        )),
    }
}

impl JoinRules {
    /// Create the room if needed; no cap.
    pub fn open(guest: bool) -> JoinRules {
        JoinRules {
            guest,
            create: true,
            invite: None,
            max_rooms: u32::MAX,
        }
    }
}

/// The result of `join`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub topic: String,
    pub last_seq: Seq,
    /// False when the user was already a member.
    pub newly_joined: bool,
}

/// A room as listed by `rooms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomView {
    pub room: RoomName,
    pub topic: String,
    pub member_count: u64,
    pub last_seq: Seq,
    /// The caller's read marker; `None` when the caller is not a member.
    pub read_seq: Option<Seq>,
}

/// A message to store. `ts` is chosen by the caller (the accepting server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub room: RoomName,
    pub sender: UserName,
    pub body: String,
    pub nonce: Option<String>,
    pub ts: i64,
    /// For a direct message: open the conversation if needed, making both
    /// users members, instead of requiring the sender to be one.
    pub direct: Option<DirectPeers>,
    /// An edit or a deletion of an earlier message of the room, instead
    /// of a new one: see [`Amend`].
    pub amend: Option<Amend>,
}

impl NewMessage {
    /// The message as stored with `seq`, its room's next (what a backend
    /// hands back once it is written).
    pub fn stored_as(self, seq: Seq) -> Message {
        let (edit, delete) = self.amend.map_or((None, None), Amend::fields);
        Message {
            room: self.room.as_str().to_owned(),
            seq,
            user: self.sender.as_str().to_owned(),
            body: self.body,
            ts: self.ts,
            nonce: self.nonce,
            edit,
            delete,
            ..Message::default()
        }
    }
}

/// What an edit or deletion entry does to the message it names, in the
/// transaction that stores the entry (after [`check_amend`]):
///
/// - `Edit`: the message's body becomes the entry's, its `edited_ts` the
///   entry's `ts`.
/// - `Delete`: the message's body, and the bodies of its earlier edit
///   entries, are overwritten with nothing and it is marked deleted; the
///   entry itself has no body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amend {
    Edit(Seq),
    Delete {
        target: Seq,
        /// The sender may delete other people's messages (a moderator).
        moderator: bool,
    },
}

impl Amend {
    /// A moderator's deletion, which needs no membership of the room (a
    /// hub's moderator outside one of its channels, an operator anywhere):
    /// the command table checked the role.
    pub fn by_moderator(amend: Option<Amend>) -> bool {
        matches!(
            amend,
            Some(Amend::Delete {
                moderator: true,
                ..
            })
        )
    }

    pub fn target(self) -> Seq {
        match self {
            Amend::Edit(seq) | Amend::Delete { target: seq, .. } => seq,
        }
    }

    /// The entry's `edit` and `delete` fields.
    pub fn fields(self) -> (Option<Seq>, Option<Seq>) {
        match self {
            Amend::Edit(seq) => (Some(seq), None),
            Amend::Delete { target, .. } => (None, Some(target)),
        }
    }
}

/// The message an [`Amend`] names, as a backend reads it in its
/// transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmendTarget {
    pub sender_key: String,
    /// The message is itself an edit or deletion entry.
    pub is_amend: bool,
    pub deleted: bool,
}

/// The rules of edits and deletions, the same in every backend: `target`
/// is the named message (`None`: no message has that seq).
pub fn check_amend(
    amend: Amend,
    sender: &UserName,
    target: Option<&AmendTarget>,
) -> StoreResult<()> {
    let seq = amend.target();
    let target = target.ok_or(StoreError::NoSuchMessage(seq))?;
    if target.is_amend {
        return Err(StoreError::Invalid(format!(
            "message {seq} is an edit or deletion, which cannot be changed"
        )));
    }
    if target.deleted {
        return Err(StoreError::NoSuchMessage(seq));
    }
    let own = target.sender_key == sender.key();
    match amend {
        Amend::Edit(_) if !own => Err(StoreError::Refused(format!(
            "message {seq} is not yours: only its author edits it"
        ))),
        Amend::Delete {
            moderator: false, ..
        } if !own => Err(StoreError::Refused(format!(
            "message {seq} is not yours: only its author or a moderator deletes it"
        ))),
        _ => Ok(()),
    }
}

/// A ban or a mute to record; see [`Store::sanction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSanction {
    pub user: UserName,
    pub kind: SanctionKind,
    pub by: UserName,
    pub reason: String,
    /// When it ends by itself (Unix ms); `None`: never.
    pub until_ts: Option<i64>,
}

impl NewSanction {
    pub fn view(&self) -> Sanction {
        Sanction {
            user: self.user.as_str().to_owned(),
            kind: self.kind,
            by: self.by.as_str().to_owned(),
            reason: self.reason.clone(),
            until_ts: self.until_ts,
        }
    }
}

/// The refusal to take the owner role from a room's last owner.
pub fn last_owner(user: &UserName, room: &RoomName) -> StoreError {
    StoreError::Refused(format!(
        "{user} is the last owner of {}: make someone else owner first",
        room.shown()
    ))
}

/// Whether a sanction ending at `until_ts` still holds at `now`.
pub fn in_force(until_ts: Option<i64>, now: i64) -> bool {
    until_ts.is_none_or(|until| until > now)
}

/// The refusal of a banned user's `join`, or a muted user's message, the
/// same from every backend.
pub fn sanctioned(kind: SanctionKind, room: &RoomName, until_ts: Option<i64>) -> StoreError {
    let what = match kind {
        SanctionKind::Ban => "banned from",
        SanctionKind::Mute => "muted in",
    };
    let until = match until_ts {
        Some(ts) => format!(" until {ts} (Unix ms)"),
        None => String::new(),
    };
    StoreError::Refused(format!("you are {what} {}{until}", room.shown()))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectPeers {
    pub sender_guest: bool,
    pub peer: UserName,
    pub peer_guest: bool,
}

/// The stored message, and whether it was already there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    pub message: Message,
    /// True when the nonce matched an earlier message: nothing was written
    /// and `message` is the original.
    pub duplicate: bool,
    /// Users that this append made members (a direct conversation's first
    /// message).
    pub new_members: Vec<UserName>,
}

/// Users deleted since a cursor, and the cursor to ask from next time.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemovedUsers {
    pub cursor: u64,
    pub users: Vec<UserName>,
}

/// How long a deletion stays in the log [`Store::removed_users`] reads:
/// far longer than any server goes between two polls.
pub const REMOVED_USERS_KEPT_MS: i64 = 24 * 3600 * 1000;

/// Which page of a room's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The newest messages.
    Latest,
    /// The newest messages below this seq.
    Before(Seq),
    /// The oldest messages above this seq.
    After(Seq),
}

/// Messages in ascending seq, and whether more exist in the page's direction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    pub more: bool,
}

/// Durable storage. All methods are cancel-safe in the sense that dropping
/// the future never leaves a half-applied change: a write that was already
/// handed to the backend either commits whole or not at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Register a user; `Conflict` when the name (without regard to case) exists.
    async fn create_user(&self, name: &UserName, password_hash: &str) -> StoreResult<()>;
    /// The registered user with this name (any case).
    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>>;

    /// Replace a user's password hash and revoke all of the user's tokens.
    /// `Invalid` when there is no such user.
    async fn set_password(&self, name: &UserName, password_hash: &str) -> StoreResult<()>;
    /// Every registered user, by name.
    async fn list_users(&self) -> StoreResult<Vec<UserName>>;
    /// Remove a user with its tokens and memberships (its messages stay).
    /// `Invalid` when there is no such user. The deletion is logged in the
    /// same transaction, for [`Store::removed_users`].
    async fn delete_user(&self, name: &UserName) -> StoreResult<()>;
    /// Users deleted after `after` (a cursor from an earlier call), oldest
    /// first; `None` starts from now (no users, the current cursor). Every
    /// server on the database polls this to close the connections of users
    /// deleted by another process (`confab user delete`) or node. Entries
    /// older than [`REMOVED_USERS_KEPT_MS`] may be forgotten.
    async fn removed_users(&self, after: Option<u64>) -> StoreResult<RemovedUsers>;

    async fn create_token(&self, user: &UserName, token: &TokenHash) -> StoreResult<()>;
    /// The user a live token belongs to.
    async fn token_user(&self, token: &TokenHash) -> StoreResult<Option<UserRecord>>;
    /// Ban a registered user from the whole server (`Invalid` when there is
    /// no such user), replacing an earlier ban. Logins are refused while it
    /// holds; closing the user's connections is the caller's part.
    async fn ban_user(&self, user: &UserName, ban: ServerBan) -> StoreResult<()>;
    /// Lift a server ban; returns whether one was in force.
    async fn unban_user(&self, user: &UserName) -> StoreResult<bool>;
    async fn revoke_token(&self, token: &TokenHash) -> StoreResult<()>;

    /// Make `user` a member of `room`, as `rules` allow. Joining a room one
    /// is already in always succeeds. A user banned from the room (or from
    /// its hub) is refused ([`sanctioned`]). Whoever creates a room is its
    /// owner. A channel is never created this way, and takes a member of
    /// its hub ([`not_in_hub`]); a private one takes an invite
    /// ([`private_place`], [`check_invite`]).
    async fn join(&self, room: &RoomName, user: &UserName, rules: JoinRules)
        -> StoreResult<Joined>;
    /// End a membership: `NoSuchRoom` or `NotMember` when there is none.
    /// A room a guest created goes, with its history, when its last member
    /// leaves.
    async fn leave(&self, room: &RoomName, user: &UserName) -> StoreResult<()>;
    /// Remove every membership of a guest; returns the rooms it was in
    /// (guest-created rooms left empty are removed).
    async fn drop_guest(&self, user: &UserName) -> StoreResult<Vec<RoomName>>;
    /// Remove every guest membership (left over from a crash), and the
    /// guest-created rooms that leaves empty.
    async fn drop_all_guests(&self) -> StoreResult<()>;

    /// Up to `limit` members of a room (`NoSuchRoom` if it does not exist)
    /// with their roles, in the order of their keys (names without regard
    /// to case), starting after the key `after`.
    async fn members(
        &self,
        room: &RoomName,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(UserName, Role)>>;
    /// Up to `limit` of the user's rooms, or with `all` of every public
    /// room, by name, starting after the name `after`.
    async fn rooms(
        &self,
        user: &UserName,
        all: bool,
        after: Option<&RoomName>,
        limit: u32,
    ) -> StoreResult<Vec<RoomView>>;
    /// Set a room's topic; the user must be a member.
    async fn set_topic(&self, room: &RoomName, user: &UserName, topic: &str) -> StoreResult<()>;

    /// The user's role in the room; `None` when not a member
    /// (`NoSuchRoom` when the room does not exist). In a channel: the
    /// user's role in its hub (a hub's roles apply in all its channels).
    async fn role(&self, room: &RoomName, user: &UserName) -> StoreResult<Option<Role>>;
    /// Give a member a role (`NoSuchRoom`, `NotMember`); in a channel, the
    /// role in its hub. Taking the owner role from a room's last owner is
    /// `Refused`: a room that has an owner keeps one.
    async fn set_role(&self, room: &RoomName, user: &UserName, role: Role) -> StoreResult<()>;
    /// Whether the registered user is a server operator (an owner of every
    /// room). A user that does not exist is not.
    async fn operator(&self, user: &UserName) -> StoreResult<bool>;
    /// Make a registered user an operator, or not (`Invalid` when there is
    /// no such user).
    async fn set_operator(&self, user: &UserName, operator: bool) -> StoreResult<()>;
    /// Record a ban or a mute in a room (`NoSuchRoom`), replacing the
    /// user's earlier one of that kind. A ban also ends the user's
    /// membership, in the same transaction (of a hub: with its channels'):
    /// returns the rooms it ended.
    async fn sanction(&self, room: &RoomName, sanction: NewSanction) -> StoreResult<Vec<RoomName>>;
    /// End a ban or a mute before its time; returns whether one was in force.
    async fn lift(&self, room: &RoomName, user: &UserName, kind: SanctionKind)
        -> StoreResult<bool>;
    /// The bans and mutes in force in a room at `now` (Unix ms), by user
    /// key and kind (`NoSuchRoom`). Ones that ended are never listed, and
    /// never refuse anything: nothing needs to lift them.
    async fn sanctions(&self, room: &RoomName, now: i64) -> StoreResult<Vec<Sanction>>;

    /// Create a hub (`Conflict` when the name is taken) with its channel
    /// [`FIRST_CHANNEL`], the owner a member of both.
    async fn create_hub(&self, hub: NewHub) -> StoreResult<()>;
    /// Make a user a member of a hub and of each of its public channels
    /// (`NoSuchRoom`; banned: [`sanctioned`]; a private hub takes an
    /// invite). Joining a hub one is in changes nothing.
    async fn join_hub(
        &self,
        hub: &HubName,
        user: &UserName,
        guest: bool,
        invite: Option<&str>,
    ) -> StoreResult<HubJoined>;
    /// End a hub membership and the user's channel memberships in it;
    /// returns the channels left. `NotMember`; the last owner is refused.
    async fn leave_hub(&self, hub: &HubName, user: &UserName) -> StoreResult<Vec<RoomName>>;
    /// The user's hubs, or with `all` every public hub, by name; with no
    /// user, every hub, private ones included (for operators' tools).
    async fn hubs(&self, user: Option<&UserName>, all: bool) -> StoreResult<Vec<HubView>>;
    /// Remove a hub with its channels, their history, memberships, bans
    /// and invites (`NoSuchRoom`). Returns each room that went, the hub's
    /// own first, with who was in it.
    async fn delete_hub(&self, hub: &HubName) -> StoreResult<Vec<(RoomName, Vec<UserName>)>>;
    /// A hub as `user` sees it (`NoSuchRoom`; a private hub to someone not
    /// in it: `Refused`).
    async fn hub(&self, hub: &HubName, user: &UserName) -> StoreResult<HubDetail>;
    /// Create a channel of its hub (`NoSuchRoom` without the hub,
    /// `Conflict` when it exists). A public channel has every member of
    /// the hub as a member; a private one its creator. Returns the members.
    async fn create_channel(
        &self,
        channel: &RoomName,
        private: bool,
        topic: &str,
        by: &UserName,
    ) -> StoreResult<Vec<UserName>>;
    /// Record an invite (`NoSuchRoom` when its place does not exist).
    async fn create_invite(&self, invite: NewInvite) -> StoreResult<()>;

    /// Take a message's place in the store's order and return without
    /// waiting for the commit; the [`Queued`] future resolves with its
    /// outcome once it is durable (or failed). Storing it means: allocate
    /// the room's next seq, or return the original when the sender already
    /// sent this nonce to this room. The sender must be a member, unless
    /// `direct` opens the conversation or a moderator deletes
    /// ([`Amend::by_moderator`]), and not muted in the room
    /// ([`sanctioned`]), unless the entry is a deletion. An [`Amend`] is
    /// checked with [`check_amend`] and applied in the same transaction.
    ///
    /// Messages queued one after another (each call returned before the
    /// next was made) are stored in that order, so their seqs in a room
    /// ascend in the same order: what pipelined sends stand on. Dropping
    /// the `Queued` future does not withdraw the message.
    async fn queue_append(&self, message: NewMessage) -> StoreResult<Queued>;
    /// [`Store::queue_append`], then wait until the message is durable.
    async fn append(&self, message: NewMessage) -> StoreResult<Appended> {
        self.queue_append(message).await?.await
    }
    /// A page of a room's history; `user` must be a member.
    async fn history(
        &self,
        room: &RoomName,
        user: &UserName,
        page: Page,
        limit: u32,
    ) -> StoreResult<HistoryPage>;
    /// Up to `limit` messages after `after`, ascending, with no membership
    /// check: for the server's own use (filling a gap in live delivery).
    /// A room that does not exist has no messages.
    async fn messages_after(
        &self,
        room: &RoomName,
        after: Seq,
        limit: u32,
    ) -> StoreResult<Vec<Message>>;
    /// Each room's last seq, in the order given (0 for a room that does
    /// not exist): which rooms a hub that may have missed events must read.
    async fn last_seqs(&self, rooms: &[RoomName]) -> StoreResult<Vec<Seq>>;
    /// Move the read marker forward (never back); returns the marker now.
    /// `Invalid` when `seq` is past the room's last message.
    async fn mark_read(&self, room: &RoomName, user: &UserName, seq: Seq) -> StoreResult<Seq>;

    /// Whether the store can serve requests, writes included (for
    /// readiness checks): a store that answers reads but cannot commit is
    /// not ready.
    async fn ping(&self) -> StoreResult<()>;

    /// Resolves, with the reason, once the store has failed for good and
    /// cannot recover by itself (its writer died): the server should stop,
    /// and its supervisor start it again. Never resolves by default.
    /// Cancel-safe.
    async fn failed(&self) -> StoreError {
        std::future::pending().await
    }
}

pub type DynStore = Arc<dyn Store>;

/// The refusal of an operation on a user that does not exist, the same
/// from every backend.
pub fn no_user(name: &UserName) -> StoreError {
    StoreError::Invalid(format!("no user named {name}"))
}

/// A user name read back from storage (it was valid when written).
pub fn stored_user_name(name: String) -> StoreResult<UserName> {
    UserName::parse(&name).map_err(|_| StoreError::Internal(format!("stored user name {name:?}")))
}

/// A role read back from storage (its rank, 0 to 3).
pub fn stored_role(rank: i64) -> StoreResult<Role> {
    Role::from_rank(rank).ok_or_else(|| StoreError::Internal(format!("stored role {rank}")))
}

/// Now, in Unix milliseconds: the time backends stamp rows with.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The refusal of a join past [`JoinRules::max_rooms`], the same from
/// every backend.
pub fn too_many_rooms(max: u32) -> StoreError {
    StoreError::Limit(format!(
        "you are in {max} rooms, the most this server allows; leave one first"
    ))
}

//! The protocol's vocabulary. Names arrive here as plain strings: validating
//! them (syntax, case folding) is the core's job, so that every transport
//! gets the same rules.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A room's message sequence number: 1, 2, 3, … with no gaps.
pub type Seq = u64;

/// The client's request id, echoed on the reply. A string of at most
/// [`RequestId::MAX_LEN`] characters or an integer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum RequestId {
    Int(i64),
    Str(String),
}

impl RequestId {
    pub const MAX_LEN: usize = 64;
}

/// A request with the id it came with.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: Option<RequestId>,
    pub request: Request,
}

/// Everything a client may ask. Field names are the wire names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Register {
        user: String,
        password: String,
    },
    Login {
        user: String,
        password: String,
    },
    Guest {
        user: String,
    },
    Resume {
        token: String,
    },
    Logout {},
    Ping {},
    Join {
        room: String,
        /// An invite code, for a private channel.
        #[serde(default)]
        invite: Option<String>,
    },
    Leave {
        room: String,
    },
    Rooms {
        #[serde(default)]
        all: bool,
        /// The page after this room name (the last of the previous page).
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Members {
        room: String,
        /// The page after this user name (the last of the previous page).
        #[serde(default)]
        after: Option<String>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Topic {
        room: String,
        topic: String,
    },
    Send {
        room: String,
        body: String,
        #[serde(default)]
        nonce: Option<String>,
    },
    Dm {
        to: String,
        body: String,
        #[serde(default)]
        nonce: Option<String>,
    },
    History {
        room: String,
        #[serde(default)]
        before: Option<Seq>,
        #[serde(default)]
        after: Option<Seq>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Sync {
        #[serde(default)]
        cursors: BTreeMap<String, Seq>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Read {
        room: String,
        seq: Seq,
    },
    Typing {
        room: String,
    },
    /// Give `user` a role in a hub or a room.
    Role {
        #[serde(flatten)]
        place: Place,
        user: String,
        role: Role,
    },
    Kick {
        #[serde(flatten)]
        place: Place,
        user: String,
        #[serde(default)]
        reason: Option<String>,
    },
    Ban {
        #[serde(flatten)]
        place: Place,
        user: String,
        #[serde(default)]
        reason: Option<String>,
        /// How long the ban lasts; forever without.
        #[serde(default)]
        duration_ms: Option<i64>,
    },
    Unban {
        #[serde(flatten)]
        place: Place,
        user: String,
    },
    Mute {
        #[serde(flatten)]
        place: Place,
        user: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        duration_ms: Option<i64>,
    },
    Unmute {
        #[serde(flatten)]
        place: Place,
        user: String,
    },
    /// The bans and mutes in force in a hub or a room.
    Bans {
        #[serde(flatten)]
        place: Place,
    },
    HubCreate {
        hub: String,
        #[serde(default)]
        title: Option<String>,
        #[serde(default)]
        private: bool,
    },
    HubJoin {
        hub: String,
        #[serde(default)]
        invite: Option<String>,
    },
    HubLeave {
        hub: String,
    },
    Hubs {
        #[serde(default)]
        all: bool,
    },
    /// A hub's snapshot.
    Hub {
        hub: String,
    },
    ChannelCreate {
        hub: String,
        channel: String,
        #[serde(default)]
        private: bool,
        #[serde(default)]
        topic: Option<String>,
    },
    /// An invite code to a hub or a private channel: for one user, or for
    /// anyone who has it; until it expires.
    Invite {
        #[serde(flatten)]
        place: Place,
        #[serde(default)]
        user: Option<String>,
        #[serde(default)]
        expires_ms: Option<i64>,
    },
    /// Replace the body of one's own message: a new entry of the log.
    Edit {
        room: String,
        seq: Seq,
        body: String,
        #[serde(default)]
        nonce: Option<String>,
    },
    /// Take a message back: a new entry of the log, and the message's text
    /// (with its earlier edits') is gone from the server.
    Delete {
        room: String,
        seq: Seq,
        #[serde(default)]
        nonce: Option<String>,
    },
}

impl Request {
    /// The wire name of the request, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Register { .. } => "register",
            Request::Login { .. } => "login",
            Request::Guest { .. } => "guest",
            Request::Resume { .. } => "resume",
            Request::Logout {} => "logout",
            Request::Ping {} => "ping",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Rooms { .. } => "rooms",
            Request::Members { .. } => "members",
            Request::Topic { .. } => "topic",
            Request::Send { .. } => "send",
            Request::Dm { .. } => "dm",
            Request::History { .. } => "history",
            Request::Sync { .. } => "sync",
            Request::Read { .. } => "read",
            Request::Typing { .. } => "typing",
            Request::Role { .. } => "role",
            Request::Kick { .. } => "kick",
            Request::Ban { .. } => "ban",
            Request::Unban { .. } => "unban",
            Request::Mute { .. } => "mute",
            Request::Unmute { .. } => "unmute",
            Request::Bans { .. } => "bans",
            Request::HubCreate { .. } => "hub_create",
            Request::HubJoin { .. } => "hub_join",
            Request::HubLeave { .. } => "hub_leave",
            Request::Hubs { .. } => "hubs",
            Request::Hub { .. } => "hub",
            Request::ChannelCreate { .. } => "channel_create",
            Request::Invite { .. } => "invite",
            Request::Edit { .. } => "edit",
            Request::Delete { .. } => "delete",
        }
    }
}

/// Where a request acts, or an event happened: a hub (and with it its
/// channels) or a room. A request names exactly one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Place {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
}

impl Place {
    pub fn room(room: impl Into<String>) -> Place {
        Place {
            room: Some(room.into()),
            hub: None,
        }
    }

    pub fn hub(hub: impl Into<String>) -> Place {
        Place {
            hub: Some(hub.into()),
            room: None,
        }
    }

    /// `#room` or `hub NAME`, for people.
    pub fn label(&self) -> String {
        match (&self.hub, &self.room) {
            (Some(hub), _) => format!("hub {hub}"),
            (None, Some(room)) => format!("#{room}"),
            (None, None) => String::new(),
        }
    }
}

/// A member's standing in a room, lowest first: each may do what the ones
/// below may, and more.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    #[default]
    Member,
    Moderator,
    Admin,
    Owner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Member, Role::Moderator, Role::Admin, Role::Owner];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Moderator => "moderator",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// The number storage keeps (0 to 3, in rank order).
    pub fn rank(self) -> i16 {
        self as i16
    }

    pub fn from_rank(rank: i64) -> Option<Role> {
        Role::ALL.get(usize::try_from(rank).ok()?).copied()
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// What a ban or a mute keeps a user from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SanctionKind {
    /// Out of the room, and refused `join`.
    Ban,
    /// Refused `send` and `edit`.
    Mute,
}

impl SanctionKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SanctionKind::Ban => "ban",
            SanctionKind::Mute => "mute",
        }
    }
}

/// A ban or a mute in force, as `bans` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sanction {
    pub user: String,
    pub kind: SanctionKind,
    pub by: String,
    #[serde(default)]
    pub reason: String,
    /// When it ends by itself (Unix ms); `None`: never.
    pub until_ts: Option<i64>,
}

/// The stable, machine-readable error codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    RateLimited,
    TooLarge,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A refused request: a code for programs, a message for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }
}

/// A stored entry of a room's log, as the wire shows it (and as the
/// `message` event): a message, or an edit or a deletion of one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Message {
    pub room: String,
    pub seq: Seq,
    pub user: String,
    /// Empty, and then left out on the wire, exactly when there is no text:
    /// a deletion entry, or a message that was deleted (a sent body is
    /// never empty).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// Server time in Unix milliseconds when the message was accepted.
    pub ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
    /// This entry replaces the body of the message with this seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edit: Option<Seq>,
    /// This entry deletes the message with this seq.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<Seq>,
    /// In `history` and `sync`: when the message's body was last replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edited_ts: Option<i64>,
    /// In `history` and `sync`: the message was deleted (its text is gone).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

impl Message {
    /// An edit or a deletion entry (which cannot be edited or deleted).
    pub fn amends(&self) -> Option<Seq> {
        self.edit.or(self.delete)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub user: String,
    pub online: bool,
    pub role: Role,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomEntry {
    pub room: String,
    pub topic: String,
    pub member_count: u64,
    pub last_seq: Seq,
    pub unread: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncRoom {
    pub room: String,
    pub messages: Vec<Message>,
    pub more: bool,
}

/// The result fields of a successful reply; each variant is what one kind
/// of request answers with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum OkBody {
    /// The answer to `ping`, sent as `{"type":"pong"}`.
    Pong,
    /// A reply with no fields.
    Done {},
    Auth {
        user: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    Joined {
        room: String,
        topic: String,
        /// The first page of members; `members_more` when there are more
        /// (fetched with `members` and `after`).
        members: Vec<Member>,
        members_more: bool,
        last_seq: Seq,
    },
    Rooms {
        rooms: Vec<RoomEntry>,
        more: bool,
    },
    Members {
        members: Vec<Member>,
        more: bool,
    },
    Sent {
        room: String,
        seq: Seq,
        ts: i64,
    },
    History {
        room: String,
        messages: Vec<Message>,
        more: bool,
    },
    Sync {
        rooms: Vec<SyncRoom>,
        /// Rooms with messages after their cursor were left out (the reply
        /// reached its total budget): sync again from the new cursors.
        more: bool,
    },
    Bans {
        bans: Vec<Sanction>,
    },
    Hub(HubSnapshot),
    Hubs {
        hubs: Vec<HubEntry>,
    },
    Invite {
        code: String,
        expires_ts: Option<i64>,
    },
    /// `channel_create`'s answer.
    Channel {
        room: String,
    },
}

/// A hub as `hub`, `hub_create` and `hub_join` show it to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubSnapshot {
    pub hub: String,
    pub title: String,
    pub private: bool,
    /// The caller's role; `None` when not a member.
    pub role: Option<Role>,
    pub channels: Vec<ChannelEntry>,
    pub members: Vec<HubMember>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelEntry {
    pub room: String,
    pub topic: String,
    pub private: bool,
    pub last_seq: Seq,
    /// Messages after the caller's read marker; `None` when not a member.
    pub unread: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubMember {
    pub user: String,
    pub role: Role,
    pub online: bool,
}

/// A hub as `hubs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HubEntry {
    pub hub: String,
    pub title: String,
    pub private: bool,
    pub member_count: u64,
    /// The caller's role; `None` when not a member.
    pub role: Option<Role>,
}

/// The one reply every request gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: Option<RequestId>,
    pub result: Result<OkBody, ErrorBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_frame_bytes: usize,
}

/// Everything the server sends that is not a reply. It also travels
/// between the nodes of a cluster, inside their own versioned envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Hello {
        server: String,
        version: String,
        /// The node of a cluster that answered.
        node: String,
        heartbeat_ms: u64,
        limits: Limits,
    },
    Message(Message),
    Joined {
        room: String,
        user: String,
    },
    Left {
        room: String,
        user: String,
    },
    Topic {
        room: String,
        topic: String,
        user: String,
    },
    Read {
        room: String,
        seq: Seq,
    },
    Typing {
        room: String,
        user: String,
    },
    Presence {
        user: String,
        online: bool,
    },
    Shutdown {
        reason: String,
        reconnect_ms: u64,
    },
    /// A message from the server's operators to everyone connected.
    Notice {
        text: String,
    },
    /// A member's role changed (to every member of the hub or room).
    Role {
        #[serde(flatten)]
        place: Place,
        user: String,
        role: Role,
        by: String,
    },
    /// This user was put out of the hub or room (to each of their
    /// connections); the other members see `left` / `hub_left`.
    Kicked {
        #[serde(flatten)]
        place: Place,
        by: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    HubJoined {
        hub: String,
        user: String,
    },
    HubLeft {
        hub: String,
        user: String,
    },
    /// A channel was created (to the hub's members who can see it).
    Channel {
        hub: String,
        room: String,
        private: bool,
        topic: String,
    },
}

/// The encodings the server writes, one per transport family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Line,
}

impl Format {
    const COUNT: usize = 2;

    fn index(self) -> usize {
        match self {
            Format::Json => 0,
            Format::Line => 1,
        }
    }
}

/// An event fanned out to many connections: encoded at most once per
/// [`Format`], by whichever connection writes it first, and the same bytes
/// are shared by every other recipient.
#[derive(Debug)]
pub struct SharedEvent {
    pub event: Event,
    /// When the server accepted what this event announces (a message's
    /// `send`), for measuring delivery latency.
    pub accepted: Option<std::time::Instant>,
    encoded: [std::sync::OnceLock<bytes::Bytes>; Format::COUNT],
}

impl SharedEvent {
    pub fn new(event: Event) -> Self {
        SharedEvent {
            event,
            accepted: None,
            encoded: Default::default(),
        }
    }

    pub fn accepted_at(mut self, at: Option<std::time::Instant>) -> Self {
        self.accepted = at;
        self
    }

    /// The event's bytes in `format`, encoded at the first call: every
    /// connection writes the same bytes, borrowed.
    pub fn encoded(&self, format: Format) -> &bytes::Bytes {
        self.encoded[format.index()].get_or_init(|| match format {
            Format::Json => crate::json::encode_event(&self.event),
            Format::Line => crate::line::format_event(&self.event),
        })
    }
}

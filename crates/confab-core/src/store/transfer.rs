//! Rows as they move between backends (`confab db copy`): everything a
//! deployment holds, in plain values, with rooms named rather than numbered
//! (each backend numbers its rooms itself).

/// A registered user and its argon2 hash (copied as is: passwords stay
/// valid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub key: String,
    pub name: String,
    pub password_hash: String,
    pub created_at: i64,
    /// A server operator.
    pub operator: bool,
    /// A ban from the whole server: its reason and end, when banned.
    pub banned: bool,
    pub ban_reason: Option<String>,
    pub ban_until: Option<i64>,
}

/// A session token, by its SHA-256 (copied as is: tokens stay valid).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub hash: Vec<u8>,
    pub user_key: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRow {
    pub name: String,
    pub topic: String,
    pub last_seq: i64,
    pub direct: bool,
    pub guest_created: bool,
    pub created_at: i64,
    /// A channel's hub: the name of the hub's own room (`hub/`).
    pub hub: Option<String>,
    pub private: bool,
}

/// An invite code to a hub's room or a private channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InviteRow {
    pub code: String,
    pub room: String,
    pub user_key: Option<String>,
    pub expires_ts: Option<i64>,
    pub by_name: String,
    pub created_at: i64,
}

/// A registered user's membership, with its read marker. (Guest
/// memberships end with the guest's connection and are not copied.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub room: String,
    pub user_key: String,
    pub user_name: String,
    pub read_seq: i64,
    pub joined_at: i64,
    /// The role's rank, 0 (member) to 3 (owner).
    pub role: i16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRow {
    pub room: String,
    pub seq: i64,
    pub sender_key: String,
    pub sender: String,
    pub body: String,
    pub ts: i64,
    pub nonce: Option<String>,
    pub edit_of: Option<i64>,
    pub delete_of: Option<i64>,
    pub edited_ts: Option<i64>,
    pub deleted: bool,
}

/// A ban (kind 0) or mute (kind 1) in a room, in force or ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanctionRow {
    pub room: String,
    pub user_key: String,
    pub kind: i16,
    pub user_name: String,
    pub by_name: String,
    pub reason: String,
    pub until_ts: Option<i64>,
    pub created_at: i64,
}

/// What a database holds, to check a copy: counts, and every room's last
/// seq with the highest seq stored in it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Census {
    pub users: u64,
    pub tokens: u64,
    pub rooms: u64,
    pub members: u64,
    pub messages: u64,
    pub sanctions: u64,
    pub invites: u64,
    /// (room, last_seq, highest stored seq), by name.
    pub last_seqs: Vec<(String, i64, i64)>,
}

//! Validated names. A [`UserName`] keeps the spelling it was registered
//! with and compares by its lowercase key; a [`RoomName`] is always
//! lowercase. Direct-message conversations are rooms named `dm:A:B`.

use std::fmt;

use crate::error::ChatError;

/// A user name: `^[A-Za-z][A-Za-z0-9_-]{0,31}$`, unique without regard to case.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UserName {
    display: String,
    key: String,
}

impl UserName {
    pub const MAX_LEN: usize = 32;

    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let bytes = raw.as_bytes();
        let valid = !bytes.is_empty()
            && bytes.len() <= Self::MAX_LEN
            && bytes[0].is_ascii_alphabetic()
            && bytes[1..]
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-');
        if !valid {
            return Err(ChatError::bad_request(format!(
                "invalid user name {raw:?}: a letter, then up to 31 letters, digits, '_' or '-'"
            )));
        }
        Ok(UserName {
            display: raw.to_owned(),
            key: raw.to_ascii_lowercase(),
        })
    }

    /// The name as registered (or as the guest chose it).
    pub fn as_str(&self) -> &str {
        &self.display
    }

    /// The case-folded identity of the name.
    pub fn key(&self) -> &str {
        &self.key
    }
}

impl PartialEq for UserName {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for UserName {}

impl std::hash::Hash for UserName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}

impl fmt::Display for UserName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// A room name, always lowercase: a public room (`^[a-z0-9][a-z0-9_-]{0,63}$`
/// after lowercasing), a hub's channel `hub/channel` (each part of that
/// syntax), or a direct conversation `dm:a:b` with `a < b`. Internally a
/// hub itself is the room `hub/` ([`RoomName::hub_room`]): its members,
/// roles and bans are the hub's. No client can name that room.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct RoomName(String);

impl RoomName {
    pub const MAX_LEN: usize = 64;
    const DM_PREFIX: &'static str = "dm:";

    /// Parse a name a client gave: a public room or a direct conversation.
    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let lower = raw.to_ascii_lowercase();
        if let Some(rest) = lower.strip_prefix(Self::DM_PREFIX) {
            let (a, b) = rest.split_once(':').ok_or_else(|| Self::invalid(raw))?;
            let (a, b) = (UserName::parse(a)?, UserName::parse(b)?);
            if a.key() >= b.key() {
                return Err(ChatError::bad_request(format!(
                    "invalid room name {raw:?}: a direct conversation is dm:A:B with A before B"
                )));
            }
            return Ok(RoomName(lower));
        }
        Self::parse_public(raw)
    }

    /// Parse the name of a public room or a channel; `dm:` names are
    /// refused.
    pub fn parse_public(raw: &str) -> Result<Self, ChatError> {
        let lower = raw.to_ascii_lowercase();
        let valid = match lower.split_once('/') {
            Some((hub, channel)) => simple_name(hub) && simple_name(channel),
            None => simple_name(&lower),
        };
        if !valid {
            return Err(Self::invalid(raw));
        }
        Ok(RoomName(lower))
    }

    fn invalid(raw: &str) -> ChatError {
        ChatError::bad_request(format!(
            "invalid room name {raw:?}: a letter or digit, then up to 63 letters, digits, '_' \
             or '-' (a hub's channel: HUB/CHANNEL, each part so)"
        ))
    }

    /// A hub's channel: `hub/channel`.
    pub fn channel(hub: &HubName, channel: &str) -> Result<Self, ChatError> {
        if !simple_name(&channel.to_ascii_lowercase()) {
            return Err(ChatError::bad_request(format!(
                "invalid channel name {channel:?}: a letter or digit, then up to 63 letters, \
                 digits, '_' or '-'"
            )));
        }
        Ok(RoomName(format!("{hub}/{}", channel.to_ascii_lowercase())))
    }

    /// The room that holds a hub's members, roles and bans: `hub/`.
    pub fn hub_room(hub: &HubName) -> Self {
        RoomName(format!("{hub}/"))
    }

    /// The hub of a channel (or of a hub's own room).
    pub fn hub(&self) -> Option<HubName> {
        let (hub, _) = self.0.split_once('/')?;
        Some(HubName(hub.to_owned()))
    }

    /// The room as people read it: `general`, `rust/general`, or `hub rust`
    /// for a hub's own room.
    pub fn shown(&self) -> String {
        match self.0.strip_suffix('/') {
            Some(hub) => format!("hub {hub}"),
            None => self.0.clone(),
        }
    }

    /// Whether this is a hub's own room (`hub/`), not a room or channel.
    pub fn is_hub_room(&self) -> bool {
        self.0.ends_with('/')
    }

    /// The conversation between two users: `dm:A:B`, keys in byte order.
    pub fn direct(a: &UserName, b: &UserName) -> Self {
        let (x, y) = if a.key() <= b.key() {
            (a.key(), b.key())
        } else {
            (b.key(), a.key())
        };
        RoomName(format!("{}{x}:{y}", Self::DM_PREFIX))
    }

    /// Trust a name that came from our own storage.
    pub fn from_trusted(name: String) -> Self {
        RoomName(name)
    }

    pub fn is_direct(&self) -> bool {
        self.0.starts_with(Self::DM_PREFIX)
    }

    /// For a direct conversation, the two user keys.
    pub fn direct_users(&self) -> Option<(&str, &str)> {
        self.0.strip_prefix(Self::DM_PREFIX)?.split_once(':')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// `^[a-z0-9][a-z0-9_-]{0,63}$`: a room's, a hub's or a channel's name.
fn simple_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= RoomName::MAX_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

/// A hub's name, lowercase, with the syntax of a room's.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HubName(String);

impl HubName {
    pub fn parse(raw: &str) -> Result<Self, ChatError> {
        let lower = raw.to_ascii_lowercase();
        if !simple_name(&lower) {
            return Err(ChatError::bad_request(format!(
                "invalid hub name {raw:?}: a letter or digit, then up to 63 letters, digits, \
                 '_' or '-'"
            )));
        }
        Ok(HubName(lower))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HubName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for RoomName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Names travel between nodes (see `broker::wire`); what arrives is parsed
// again, like any input.
impl TryFrom<String> for UserName {
    type Error = ChatError;
    fn try_from(raw: String) -> Result<Self, ChatError> {
        UserName::parse(&raw)
    }
}

impl From<UserName> for String {
    fn from(name: UserName) -> String {
        name.as_str().to_owned()
    }
}

impl TryFrom<String> for RoomName {
    type Error = ChatError;
    fn try_from(raw: String) -> Result<Self, ChatError> {
        // Between nodes a hub's own room travels too.
        match raw.strip_suffix('/') {
            Some(hub) => Ok(RoomName::hub_room(&HubName::parse(hub)?)),
            None => RoomName::parse(&raw),
        }
    }
}

impl From<RoomName> for String {
    fn from(name: RoomName) -> String {
        name.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_follow_the_contract() {
        for ok in ["a", "Alice", "bob_2", "x-y", &"a".repeat(32)] {
            assert!(UserName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1abc", "_a", "a b", "ä", "a:b", &"a".repeat(33)] {
            assert!(UserName::parse(bad).is_err(), "{bad}");
        }
        let a = UserName::parse("Alice").unwrap();
        assert_eq!(a, UserName::parse("ALICE").unwrap());
        assert_eq!(a.as_str(), "Alice");
        assert_eq!(a.key(), "alice");
    }

    #[test]
    fn room_names_are_lowercased_and_checked() {
        assert_eq!(RoomName::parse("General").unwrap().as_str(), "general");
        for ok in ["0", "a-b_c", &"r".repeat(64)] {
            assert!(RoomName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a b", "a.b", &"r".repeat(65)] {
            assert!(RoomName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn direct_rooms_are_ordered_pairs() {
        let (a, b) = (
            UserName::parse("Bob").unwrap(),
            UserName::parse("alice").unwrap(),
        );
        let room = RoomName::direct(&a, &b);
        assert_eq!(room.as_str(), "dm:alice:bob");
        assert_eq!(RoomName::direct(&b, &a), room);
        assert!(room.is_direct());
        assert_eq!(room.direct_users(), Some(("alice", "bob")));
        assert_eq!(RoomName::parse("DM:Alice:Bob").unwrap(), room);
        assert!(RoomName::parse("dm:bob:alice").is_err());
        assert!(RoomName::parse("dm:bob").is_err());
        assert!(RoomName::parse_public("dm:alice:bob").is_err());
    }

    #[test]
    fn channels_and_hubs() {
        let channel = RoomName::parse("Rust/General").unwrap();
        assert_eq!(channel.as_str(), "rust/general");
        let hub = HubName::parse("RUST").unwrap();
        assert_eq!(channel.hub(), Some(hub.clone()));
        assert_eq!(RoomName::channel(&hub, "General").unwrap(), channel);
        assert_eq!(RoomName::hub_room(&hub).as_str(), "rust/");
        assert!(RoomName::hub_room(&hub).is_hub_room());
        assert!(!channel.is_hub_room());
        assert_eq!(RoomName::parse("general").unwrap().hub(), None);
        for bad in ["rust/", "/general", "a/b/c", "rust/gen eral", "rust/-x"] {
            assert!(RoomName::parse(bad).is_err(), "{bad}");
        }
        assert!(HubName::parse("a/b").is_err());
        let between_nodes: RoomName = "rust/".to_owned().try_into().unwrap();
        assert!(between_nodes.is_hub_room());
        assert!(RoomName::channel(&hub, "a/b").is_err());
    }
}

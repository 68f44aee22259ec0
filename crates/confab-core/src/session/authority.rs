//! Who may do what: the command table ([`need`]) and the one check that
//! reads it ([`Session::authorize`]). A handler runs only after its row
//! passed, so no handler carries a permission check of its own; the one
//! rule that depends on the message itself (a deletion by its author or
//! by a moderator) is passed down as the caller's [`Standing`].

use confab_proto::{Place, Request, Role};
use Role::{Admin, Member, Moderator};

use super::Session;
use crate::error::ChatError;
use crate::names::{HubName, RoomName, UserName};

/// What a request needs before its handler runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Nothing: answered at any time (`ping`).
    Nothing,
    /// A connection not logged in yet.
    LoggedOut,
    /// A logged-in connection; anything more (membership, say) is the
    /// store's to check, in the transaction that acts.
    Login,
    /// At least `role` in the room the request names (a server operator
    /// has every role). With `over`, also a role above that of the user
    /// the request acts on: nobody acts on an equal or a superior,
    /// operators aside.
    Rank { role: Role, over: bool },
}

/// The command table: one row per request.
pub(crate) fn need(request: &Request) -> Need {
    use Request::*;
    let rank = |role, over| Need::Rank { role, over };
    match request {
        Ping {} => Need::Nothing,
        Register { .. } | Login { .. } | Guest { .. } | Resume { .. } => Need::LoggedOut,
        Logout {} | Join { .. } | Leave { .. } | Rooms { .. } | Members { .. } => Need::Login,
        // In a hub's channel, moderators set topics; in a room, everyone.
        Topic { room, .. } if room.contains('/') => rank(Moderator, false),
        Topic { .. } => Need::Login,
        HubCreate { .. } | HubJoin { .. } | HubLeave { .. } | Hubs { .. } | Hub { .. } => {
            Need::Login
        }
        ChannelCreate { .. } | Invite { .. } => rank(Admin, false),
        Send { .. } | Dm { .. } | History { .. } | Sync { .. } | Read { .. } | Typing { .. } => {
            Need::Login
        }
        // Only its author edits a message (the store knows the author).
        Edit { .. } => Need::Login,
        // Its author, or a moderator: the handler learns which it is.
        Delete { .. } => rank(Member, false),
        Kick { .. } | Ban { .. } | Unban { .. } | Mute { .. } | Unmute { .. } => {
            rank(Moderator, true)
        }
        Bans { .. } => rank(Moderator, false),
        Request::Role { .. } => rank(Admin, true),
    }
}

/// A user's standing in a room.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Standing {
    /// `None`: not a member.
    pub role: Option<Role>,
    pub operator: bool,
}

impl Standing {
    /// The role that counts: an operator is an owner everywhere.
    pub fn rank(self) -> Option<Role> {
        if self.operator {
            Some(Role::Owner)
        } else {
            self.role
        }
    }

    pub fn at_least(self, role: Role) -> bool {
        self.rank().is_some_and(|r| r >= role)
    }
}

/// The room a [`Need::Rank`] request acts in (a hub's own room for a
/// hub), and the user it acts on.
fn scope(request: &Request) -> Result<(RoomName, Option<&str>), ChatError> {
    use Request::*;
    match request {
        // Direct conversations too: an author deletes there.
        Delete { room, .. } => Ok((RoomName::parse(room)?, None)),
        Topic { room, .. } => Ok((RoomName::parse_public(room)?, None)),
        ChannelCreate { hub, .. } => Ok((RoomName::hub_room(&HubName::parse(hub)?), None)),
        Bans { place } | Invite { place, .. } => Ok((place_room(place)?, None)),
        Kick { place, user, .. }
        | Ban { place, user, .. }
        | Unban { place, user }
        | Mute { place, user, .. }
        | Unmute { place, user }
        | Role { place, user, .. } => Ok((place_room(place)?, Some(user))),
        _ => unreachable!("only ranked requests have a scope"),
    }
}

/// The room a request's `hub` or `room` names: a hub's own room for a hub.
pub(crate) fn place_room(place: &Place) -> Result<RoomName, ChatError> {
    match (&place.hub, &place.room) {
        (Some(hub), None) => Ok(RoomName::hub_room(&HubName::parse(hub)?)),
        (None, Some(room)) => RoomName::parse_public(room),
        _ => Err(ChatError::bad_request("name a hub or a room (one of them)")),
    }
}

impl Session {
    /// The caller's standing in the request's room, if it is at least
    /// `role` (and above the target's, with `over`); else `forbidden`.
    pub(super) async fn authorize(
        &self,
        request: &Request,
        role: Role,
        over: bool,
    ) -> Result<Standing, ChatError> {
        let (room, target) = scope(request)?;
        let me = self.me().user.clone();
        let mine = self.standing(&room, &me).await?;
        if !mine.at_least(role) {
            let place = room.shown();
            return Err(match mine.role {
                None => ChatError::forbidden(format!("you are not a member of {place}")),
                Some(_) => ChatError::forbidden(format!(
                    "that needs the role {} in {place} or higher",
                    role.as_str()
                )),
            });
        }
        if over && !mine.operator {
            let target = UserName::parse(target.expect("an acting request names a user"))?;
            let theirs = self.standing(&room, &target).await?;
            if theirs.rank() >= mine.rank() {
                return Err(ChatError::forbidden(format!(
                    "{target} is {} of {}: you act only on those below you",
                    theirs.rank().unwrap_or_default().as_str(),
                    room.shown()
                )));
            }
            if let Request::Role { role: given, .. } = request {
                if mine.rank() != Some(Role::Owner) && Some(*given) >= mine.rank() {
                    return Err(ChatError::forbidden(format!(
                        "only an owner gives the role {}",
                        given.as_str()
                    )));
                }
            }
        }
        Ok(mine)
    }

    /// A user's standing in a room (`not_found` when there is no room).
    async fn standing(&self, room: &RoomName, user: &UserName) -> Result<Standing, ChatError> {
        let store = &self.chat.store;
        let role = store.role(room, user).await.map_err(|e| match e {
            crate::StoreError::NoSuchRoom => no_such(room),
            e => e.into(),
        })?;
        // Guests are never operators: no need to ask.
        let guest = self
            .chat
            .hub
            .online_user(user.key())
            .is_some_and(|u| u.guest);
        let operator = !guest && store.operator(user).await?;
        Ok(Standing { role, operator })
    }
}

/// `not_found` for a room or hub that does not exist.
pub(crate) fn no_such(room: &RoomName) -> ChatError {
    match room.hub() {
        Some(hub) if room.is_hub_room() => ChatError::not_found(format!("no hub named {hub}")),
        Some(_) => ChatError::not_found(format!("no channel named {room}")),
        None => ChatError::not_found(format!("no room named {room}")),
    }
}

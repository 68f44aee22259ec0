//! Roles, kicks, bans and mutes. Who may do them was settled by the
//! command table before these run (see [`super::authority`]); what is left
//! is checking the input and acting.

use confab_proto::{Event, OkBody, Role, SanctionKind};

use super::{check_text, left_event, Done, Handled, Session};
use crate::broker::{BrokerEvent, Skip};
use crate::error::ChatError;
use crate::names::{RoomName, UserName};
use crate::store::{now_ms, NewSanction};

/// The longest ban or mute with an end: ten years. Longer is a mistake
/// (milliseconds taken for seconds); leave the duration out for good.
pub const MAX_SANCTION_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

impl Session {
    pub(super) async fn set_role(&mut self, room: &str, user: &str, role: Role) -> Handled {
        let room = RoomName::parse_public(room)?;
        let user = self.known_name(user).await?;
        self.chat
            .store
            .set_role(&room, &user, role)
            .await
            .map_err(|e| not_in(e, &user, &room))?;
        let by = self.me().user.as_str().to_owned();
        Ok(Done::empty().then(BrokerEvent::Room {
            event: Event::Role {
                room: room.as_str().to_owned(),
                user: user.as_str().to_owned(),
                role,
                by,
            },
            room,
            skip: Skip::Nobody,
        }))
    }

    pub(super) async fn kick(&mut self, room: &str, user: &str, reason: Option<String>) -> Handled {
        let room = RoomName::parse_public(room)?;
        let user = self.known_name(user).await?;
        let reason = self.reason(reason)?;
        self.chat
            .store
            .leave(&room, &user)
            .await
            .map_err(|e| not_in(e, &user, &room))?;
        Ok(self.put_out(Done::empty(), room, user, reason))
    }

    /// A ban or mute from a request's fields, checked.
    pub(super) async fn new_sanction(
        &self,
        kind: SanctionKind,
        user: &str,
        reason: Option<String>,
        duration_ms: Option<i64>,
    ) -> Result<NewSanction, ChatError> {
        let until_ts = match duration_ms {
            None => None,
            Some(ms @ 1..=MAX_SANCTION_MS) => Some(now_ms() + ms),
            Some(ms) => {
                return Err(ChatError::bad_request(format!(
                    "duration_ms {ms} is out of range: 1 to {MAX_SANCTION_MS} \
                     (ten years); leave it out for no end"
                )))
            }
        };
        Ok(NewSanction {
            user: self.known_name(user).await?,
            kind,
            by: self.me().user.clone(),
            reason: self.reason(reason)?,
            until_ts,
        })
    }

    pub(super) async fn sanction(&mut self, room: &str, sanction: NewSanction) -> Handled {
        let room = RoomName::parse_public(room)?;
        let (user, reason) = (sanction.user.clone(), sanction.reason.clone());
        let ended = self.chat.store.sanction(&room, sanction).await?;
        let done = Done::empty();
        Ok(if ended {
            self.put_out(done, room, user, reason)
        } else {
            done
        })
    }

    pub(super) async fn lift(&mut self, room: &str, user: &str, kind: SanctionKind) -> Handled {
        let room = RoomName::parse_public(room)?;
        let user = UserName::parse(user)?;
        if !self.chat.store.lift(&room, &user, kind).await? {
            return Err(ChatError::not_found(format!(
                "{user} has no {} in force in {room}",
                kind.as_str()
            )));
        }
        Ok(Done::empty())
    }

    pub(super) async fn bans(&mut self, room: &str) -> Handled {
        let room = RoomName::parse_public(room)?;
        let bans = self.chat.store.sanctions(&room, now_ms()).await?;
        Ok(Done::reply(OkBody::Bans { bans }))
    }

    /// The events of a membership ended by a moderator: `kicked` to each
    /// of the user's connections, `left` to the other members, and the
    /// user's connections stop receiving the room, on every node.
    fn put_out(&self, done: Done, room: RoomName, user: UserName, reason: String) -> Done {
        let by = self.me().user.as_str().to_owned();
        done.then(BrokerEvent::User {
            user: user.key().to_owned(),
            event: Event::Kicked {
                room: room.as_str().to_owned(),
                by,
                reason,
            },
            skip: Skip::Nobody,
        })
        .then(left_event(&room, &user, Skip::User(user.key().to_owned())))
        .then(BrokerEvent::Membership {
            room,
            user,
            joined: false,
            last_seq: 0,
        })
    }

    /// A user name as the user spells it: a registered user's, a
    /// connected guest's, or as given (someone not here now, banned ahead).
    async fn known_name(&self, raw: &str) -> Result<UserName, ChatError> {
        let name = UserName::parse(raw)?;
        if let Some(record) = self.chat.store.user(&name).await? {
            return Ok(record.name);
        }
        Ok(self.connected_guest(name.key()).await.unwrap_or(name))
    }

    /// A moderator's reason: optional, one line's worth.
    fn reason(&self, reason: Option<String>) -> Result<String, ChatError> {
        let reason = reason.unwrap_or_default();
        let max = self.policy.config.max_topic_chars;
        if reason.chars().count() > max {
            return Err(ChatError::too_large(format!(
                "a reason has at most {max} characters"
            )));
        }
        check_text("reason", &reason)?;
        Ok(reason)
    }
}

/// A store's "not a member" about someone else, as the client should read
/// it: that user is not in the room.
fn not_in(e: crate::StoreError, user: &UserName, room: &RoomName) -> ChatError {
    match e {
        crate::StoreError::NotMember => ChatError::not_found(format!("{user} is not in {room}")),
        crate::StoreError::NoSuchRoom => ChatError::not_found(format!("no room named {room}")),
        e => e.into(),
    }
}

//! Roles, kicks, bans and mutes. Who may do them was settled by the
//! command table before these run (see [`super::authority`]); what is left
//! is checking the input and acting.

use confab_proto::{Event, OkBody, Place, Role, SanctionKind};

use super::authority::place_room;
use super::{check_text, left_event, Done, Handled, Session};
use crate::broker::{BrokerEvent, Skip};
use crate::error::ChatError;
use crate::names::{RoomName, UserName};
use crate::store::{now_ms, NewSanction};

/// The longest ban or mute with an end: ten years. Longer is a mistake
/// (milliseconds taken for seconds); leave the duration out for good.
pub const MAX_SANCTION_MS: i64 = 10 * 365 * 24 * 3600 * 1000;

impl Session {
    pub(super) async fn set_role(&mut self, place: &Place, user: &str, role: Role) -> Handled {
        // A role in a channel is the role in its hub.
        let room = match place_room(place)? {
            channel if channel.hub().is_some() => {
                RoomName::hub_room(&channel.hub().expect("a channel"))
            }
            room => room,
        };
        let user = self.known_name(user).await?;
        self.chat
            .store
            .set_role(&room, &user, role)
            .await
            .map_err(|e| not_in(e, &user, &room))?;
        let by = self.me().user.as_str().to_owned();
        Ok(Done::empty().then(BrokerEvent::Room {
            event: Event::Role {
                place: place_of(&room),
                user: user.as_str().to_owned(),
                role,
                by,
            },
            room,
            skip: Skip::Nobody,
        }))
    }

    pub(super) async fn kick(
        &mut self,
        place: &Place,
        user: &str,
        reason: Option<String>,
    ) -> Handled {
        let room = place_room(place)?;
        let user = self.known_name(user).await?;
        let reason = self.reason(reason)?;
        let store = &self.chat.store;
        let ended = match room.hub() {
            Some(hub) if room.is_hub_room() => {
                let mut ended = store.leave_hub(&hub, &user).await;
                if let Ok(channels) = &mut ended {
                    channels.insert(0, room.clone());
                }
                ended
            }
            _ => store.leave(&room, &user).await.map(|()| vec![room.clone()]),
        };
        let ended = ended.map_err(|e| not_in(e, &user, &room))?;
        Ok(self.put_out(Done::empty(), &room, ended, user, reason))
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

    pub(super) async fn sanction(&mut self, place: &Place, sanction: NewSanction) -> Handled {
        let room = place_room(place)?;
        let (user, reason) = (sanction.user.clone(), sanction.reason.clone());
        let ended = self.chat.store.sanction(&room, sanction).await?;
        Ok(self.put_out(Done::empty(), &room, ended, user, reason))
    }

    pub(super) async fn lift(&mut self, place: &Place, user: &str, kind: SanctionKind) -> Handled {
        let room = place_room(place)?;
        let user = UserName::parse(user)?;
        if !self.chat.store.lift(&room, &user, kind).await? {
            return Err(ChatError::not_found(format!(
                "{user} has no {} in force in {}",
                kind.as_str(),
                room.shown()
            )));
        }
        Ok(Done::empty())
    }

    pub(super) async fn bans(&mut self, place: &Place) -> Handled {
        let room = place_room(place)?;
        let bans = self.chat.store.sanctions(&room, now_ms()).await?;
        Ok(Done::reply(OkBody::Bans { bans }))
    }

    /// The events of memberships a moderator ended (`ended`: the rooms, a
    /// hub's own first, then its channels): `kicked` once to each of the
    /// user's connections, `left` / `hub_left` to the other members, and
    /// the user's connections stop receiving each room, on every node.
    fn put_out(
        &self,
        mut done: Done,
        place: &RoomName,
        ended: Vec<RoomName>,
        user: UserName,
        reason: String,
    ) -> Done {
        if ended.is_empty() {
            return done;
        }
        let by = self.me().user.as_str().to_owned();
        done = done.then(BrokerEvent::User {
            user: user.key().to_owned(),
            event: Event::Kicked {
                place: place_of(place),
                by,
                reason,
            },
            skip: Skip::Nobody,
        });
        for room in ended {
            done = done
                .then(left_event(&room, &user, Skip::User(user.key().to_owned())))
                .then(BrokerEvent::Membership {
                    room,
                    user: user.clone(),
                    joined: false,
                    last_seq: 0,
                });
        }
        done
    }

    /// A user name as the user spells it: a registered user's, a
    /// connected guest's, or as given (someone not here now, banned ahead).
    pub(super) async fn known_name(&self, raw: &str) -> Result<UserName, ChatError> {
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

/// A room as an event names it: `hub` for a hub's own room.
pub(super) fn place_of(room: &RoomName) -> Place {
    match room.hub() {
        Some(hub) if room.is_hub_room() => Place::hub(hub.as_str()),
        _ => Place::room(room.as_str()),
    }
}

/// A store's "not a member" about someone else, as the client should read
/// it: that user is not in the room.
fn not_in(e: crate::StoreError, user: &UserName, room: &RoomName) -> ChatError {
    match e {
        crate::StoreError::NotMember => {
            ChatError::not_found(format!("{user} is not in {}", room.shown()))
        }
        crate::StoreError::NoSuchRoom => super::authority::no_such(room),
        e => e.into(),
    }
}

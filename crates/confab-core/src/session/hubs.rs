//! Hubs and their channels. A hub is kept as a room of its own, `hub/`
//! ([`RoomName::hub_room`]): its members, roles and bans are the hub's, its
//! room events (`hub_joined`, `hub_left`, `channel`, `role`) reach every
//! connected member, and the moderation requests work on it unchanged.
//! Channels are rooms `hub/channel` with every guarantee of a room.

use confab_proto::{ChannelEntry, Event, HubEntry, HubMember, HubSnapshot, OkBody, Place, Seq};

use super::authority::{no_such, place_room};
use super::moderation::MAX_SANCTION_MS;
use super::{check_text, left_event, Done, Handled, Session};
use crate::auth;
use crate::broker::{BrokerEvent, Skip};
use crate::error::ChatError;
use crate::names::{HubName, RoomName, UserName};
use crate::store::{now_ms, NewHub, NewInvite};
use crate::StoreError;

impl Session {
    pub(super) async fn hub_create(
        &mut self,
        hub: &str,
        title: Option<String>,
        private: bool,
    ) -> Handled {
        let hub = HubName::parse(hub)?;
        let me = self.me();
        if me.guest {
            return Err(ChatError::forbidden(
                "guests cannot create hubs: register first",
            ));
        }
        let owner = me.user.clone();
        let title = self.short_text("title", title.unwrap_or_default())?;
        if let Err(wait) = self.policy.limiters.room_creation(owner.key()) {
            return Err(self.refused(wait, "new hubs"));
        }
        let new = NewHub {
            hub: hub.clone(),
            title,
            private,
            owner: owner.clone(),
        };
        self.chat.store.create_hub(new).await.map_err(|e| match e {
            StoreError::Conflict(_) => ChatError::conflict(format!("the hub name {hub} is taken")),
            e => e.into(),
        })?;
        let general = RoomName::channel(&hub, crate::store::FIRST_CHANNEL)?;
        let mut done = self.hub_snapshot(&hub).await?;
        for room in [RoomName::hub_room(&hub), general] {
            done = done.then(self.membership(room, owner.clone(), 0));
        }
        Ok(done)
    }

    pub(super) async fn hub_join(&mut self, hub: &str, invite: Option<String>) -> Handled {
        let hub = HubName::parse(hub)?;
        let me = self.me();
        let (user, guest) = (me.user.clone(), me.guest);
        let joined = self
            .chat
            .store
            .join_hub(&hub, &user, guest, invite.as_deref())
            .await
            .map_err(|e| match e {
                StoreError::NoSuchRoom => no_such(&RoomName::hub_room(&hub)),
                e => e.into(),
            })?;
        let mut done = self.hub_snapshot(&hub).await?;
        if !joined.newly_joined {
            return Ok(done);
        }
        let room = RoomName::hub_room(&hub);
        done = done
            .then(self.membership(room.clone(), user.clone(), 0))
            .then(BrokerEvent::Room {
                event: Event::HubJoined {
                    hub: hub.to_string(),
                    user: user.as_str().to_owned(),
                },
                room,
                skip: Skip::Conn(self.conn.id()),
            });
        for (channel, last_seq) in joined.channels {
            done = done
                .then(self.membership(channel.clone(), user.clone(), last_seq))
                .then(BrokerEvent::Room {
                    event: Event::Joined {
                        room: channel.as_str().to_owned(),
                        user: user.as_str().to_owned(),
                    },
                    room: channel,
                    skip: Skip::Conn(self.conn.id()),
                });
        }
        Ok(done)
    }

    pub(super) async fn hub_leave(&mut self, hub: &str) -> Handled {
        let hub = HubName::parse(hub)?;
        let user = self.me().user.clone();
        let room = RoomName::hub_room(&hub);
        let channels = self
            .chat
            .store
            .leave_hub(&hub, &user)
            .await
            .map_err(|e| match e {
                StoreError::NoSuchRoom => no_such(&room),
                StoreError::NotMember => ChatError::forbidden(format!("you are not in hub {hub}")),
                e => e.into(),
            })?;
        // The events first, so the user's other connections still get them.
        let skip = || Skip::Conn(self.conn.id());
        let mut done = Done::empty();
        for left in std::iter::once(&room).chain(&channels) {
            done = done.then(left_event(left, &user, skip()));
        }
        for left in std::iter::once(room).chain(channels) {
            done = done.then(BrokerEvent::Membership {
                room: left,
                user: user.clone(),
                joined: false,
                last_seq: 0,
            });
        }
        Ok(done)
    }

    pub(super) async fn hubs(&mut self, all: bool) -> Handled {
        let hubs = self.chat.store.hubs(Some(&self.me().user), all).await?;
        let hubs = hubs
            .into_iter()
            .map(|h| HubEntry {
                hub: h.hub.to_string(),
                title: h.title,
                private: h.private,
                member_count: h.member_count,
                role: h.role,
            })
            .collect();
        Ok(Done::reply(OkBody::Hubs { hubs }))
    }

    /// The hub as the caller sees it: the reply of `hub`, `hub_create` and
    /// `hub_join`.
    pub(super) async fn hub_snapshot(&self, hub: &HubName) -> Handled {
        let user = &self.me().user;
        let detail = self.chat.store.hub(hub, user).await.map_err(|e| match e {
            StoreError::NoSuchRoom => no_such(&RoomName::hub_room(hub)),
            e => e.into(),
        })?;
        let online = self.online(detail.members.iter().map(|(u, _)| u)).await;
        let members = detail
            .members
            .iter()
            .zip(online)
            .map(|((u, role), online)| HubMember {
                user: u.as_str().to_owned(),
                role: *role,
                online,
            })
            .collect();
        let channels = detail
            .channels
            .into_iter()
            .map(|c| ChannelEntry {
                room: c.room.as_str().to_owned(),
                topic: c.topic,
                private: c.private,
                last_seq: c.last_seq,
                unread: c.read_seq.map(|r| c.last_seq.saturating_sub(r)),
            })
            .collect();
        Ok(Done::reply(OkBody::Hub(HubSnapshot {
            hub: hub.to_string(),
            title: detail.title,
            private: detail.private,
            role: detail.role,
            channels,
            members,
        })))
    }

    pub(super) async fn channel_create(
        &mut self,
        hub: &str,
        channel: &str,
        private: bool,
        topic: Option<String>,
    ) -> Handled {
        let hub = HubName::parse(hub)?;
        let room = RoomName::channel(&hub, channel)?;
        let topic = self.short_text("topic", topic.unwrap_or_default())?;
        let me = self.me().user.clone();
        let members = self
            .chat
            .store
            .create_channel(&room, private, &topic, &me)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => ChatError::conflict(format!("{room} exists")),
                StoreError::NoSuchRoom => no_such(&RoomName::hub_room(&hub)),
                e => e.into(),
            })?;
        let mut done = Done::reply(OkBody::Channel {
            room: room.as_str().to_owned(),
        });
        for user in members {
            done = done.then(self.membership(room.clone(), user, 0));
        }
        let event = Event::Channel {
            hub: hub.to_string(),
            room: room.as_str().to_owned(),
            private,
            topic,
        };
        // A private channel is seen by those in it: its creator, so far.
        Ok(done.then(if private {
            BrokerEvent::User {
                user: me.key().to_owned(),
                event,
                skip: Skip::Nobody,
            }
        } else {
            BrokerEvent::Room {
                event,
                room: RoomName::hub_room(&hub),
                skip: Skip::Nobody,
            }
        }))
    }

    pub(super) async fn invite(
        &mut self,
        place: &Place,
        user: Option<String>,
        expires_ms: Option<i64>,
    ) -> Handled {
        let room = place_room(place)?;
        let Some(hub) = room.hub() else {
            return Err(ChatError::bad_request(
                "invites are to hubs and private channels; anyone may join a room",
            ));
        };
        if !room.is_hub_room() {
            let seen = self.chat.store.hub(&hub, &self.me().user).await?;
            if seen.channels.iter().any(|c| c.room == room && !c.private) {
                return Err(ChatError::bad_request(format!(
                    "{room} is public: the hub's members join it without an invite"
                )));
            }
        }
        let user: Option<UserName> = match user {
            Some(u) => Some(self.known_name(&u).await?),
            None => None,
        };
        let expires_ts = match expires_ms {
            None => None,
            Some(ms @ 1..=MAX_SANCTION_MS) => Some(now_ms() + ms),
            Some(ms) => {
                return Err(ChatError::bad_request(format!(
                    "expires_ms {ms} is out of range: 1 to {MAX_SANCTION_MS}; leave it out \
                     for no end"
                )))
            }
        };
        let code = auth::random_hex(12);
        let invite = NewInvite {
            code: code.clone(),
            place: room.clone(),
            user,
            expires_ts,
            by: self.me().user.clone(),
        };
        self.chat
            .store
            .create_invite(invite)
            .await
            .map_err(|e| match e {
                StoreError::NoSuchRoom => no_such(&room),
                e => e.into(),
            })?;
        Ok(Done::reply(OkBody::Invite { code, expires_ts }))
    }

    /// A membership that began: the user's connections start receiving
    /// the room, on every node.
    fn membership(&self, room: RoomName, user: UserName, last_seq: Seq) -> BrokerEvent {
        BrokerEvent::Membership {
            room,
            user,
            joined: true,
            last_seq,
        }
    }

    /// A title or a topic: at most a topic's length, no control characters.
    fn short_text(&self, field: &str, text: String) -> Result<String, ChatError> {
        let max = self.policy.config.max_topic_chars;
        if text.chars().count() > max {
            return Err(ChatError::too_large(format!(
                "a {field} has at most {max} characters"
            )));
        }
        check_text(field, &text)?;
        self.policy.config.filter.check(&text)?;
        Ok(text)
    }
}

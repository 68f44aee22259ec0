//! One connection's state machine: who is logged in, and what each request
//! does. Transports feed it decoded requests; it queues exactly one reply
//! per request on the connection, then publishes what the request caused.
//!
//! The reply goes first, so a sender sees its `ok` before the `message`
//! event of its own message. Requests of one connection are answered in
//! the order they came. A `send` is pipelined: it takes its place in the
//! store's order and the session goes on to the next request while it
//! commits, up to [`MAX_IN_FLIGHT`] at once; its reply and its event follow
//! once it is durable, in order. Every other request first waits for the
//! sends before it, so it sees their effects (a `history` after a `send`
//! holds it). `handle` must be driven to completion (not dropped half-way),
//! and a transport polls [`Session::stored`] and calls [`Session::answer`]
//! while it waits for input: that is what guarantees every stored message
//! is answered and published.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use confab_proto::json::DecodeError;
use confab_proto::{
    Envelope, ErrorBody, Event, Member, OkBody, Reply, Request, RequestId, Role, RoomEntry,
    SanctionKind, Seq, SyncRoom,
};

use self::authority::{need, Need, Standing};
use crate::auth;
use crate::broker::{BrokerEvent, Skip};
use crate::chat::{Inner, Policy};
use crate::conn::{CloseReason, Conn, Outbound};
use crate::error::ChatError;
use crate::limits::{ConnLimiter, Refusal};
use crate::names::{HubName, RoomName, UserName};
use crate::store::{now_ms, Amend, DirectPeers, JoinRules, NewMessage, Page, TokenHash};

mod authority;
mod hubs;
mod moderation;

pub use moderation::MAX_SANCTION_MS;

/// Page size of `history` and `sync` when the client gives none.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page a client may ask for.
pub const MAX_PAGE: u32 = 500;
/// Longest nonce, in characters.
const MAX_NONCE_CHARS: usize = 64;
/// Page size of `rooms` and `members` (and the members in a `join` reply)
/// when the client gives none.
pub const DEFAULT_LIST_PAGE: u32 = 500;
/// Largest page of `rooms` and `members`.
pub const MAX_LIST_PAGE: u32 = 1000;
/// Everything, for the server's own listings.
const ALL: u32 = u32::MAX;
/// Most requests of one connection in flight at once (sends waiting for
/// their commits): the next waits for the oldest, and the transport reads
/// no further meanwhile.
pub const MAX_IN_FLIGHT: usize = 64;

pub struct Session {
    chat: Arc<Inner>,
    conn: Conn,
    /// The client's address as per-address limits count it; `None` when
    /// the transport exempts it (loopback, say) or has none.
    peer: Option<IpAddr>,
    /// The policy this session's limiter was built from.
    policy: Arc<Policy>,
    limiter: ConnLimiter,
    /// Set when a refusal found the client abusive: close after the reply.
    abusive: bool,
    /// When the request being handled arrived.
    accepted: Instant,
    /// Boxed: inline it took 88 bytes of every connection's future, logged
    /// in or not, and kept the driver's future in the allocator's next
    /// larger block (BENCHMARKS.md, write-through: an idle connection).
    login: Option<Box<Login>>,
    /// Requests not answered yet, oldest first. Empty (and unallocated)
    /// unless sends are waiting for their commits.
    in_flight: VecDeque<InFlight>,
}

/// A request whose reply is not queued yet.
struct InFlight {
    id: Option<RequestId>,
    kind: &'static str,
    accepted: Instant,
    /// Close the connection as abusive once the reply is queued.
    abusive: bool,
    outcome: Later,
}

/// A handler's outcome: known now, or once what it stored is durable.
enum Later {
    Now(Option<Handled>),
    Stored(Pin<Box<dyn Future<Output = Handled> + Send + Sync>>),
}

impl Later {
    fn now(outcome: Handled) -> Later {
        Later::Now(Some(outcome))
    }

    fn refused(&self) -> bool {
        matches!(self, Later::Now(Some(Err(_))))
    }

    /// Poll until the outcome is known, and keep it.
    fn poll_known(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Later::Stored(stored) = self {
            let outcome = std::task::ready!(stored.as_mut().poll(cx));
            *self = Later::now(outcome);
        }
        Poll::Ready(())
    }
}

impl Future for Later {
    type Output = Handled;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Handled> {
        std::task::ready!(self.poll_known(cx));
        match &mut *self {
            Later::Now(outcome) => Poll::Ready(outcome.take().expect("polled after completion")),
            Later::Stored(_) => unreachable!("known"),
        }
    }
}

struct Login {
    user: UserName,
    guest: bool,
    /// The token this connection logged in with, revoked by `logout`.
    token: Option<TokenHash>,
}

/// What a handler produced: the reply, then events to publish after it.
struct Done {
    reply: OkBody,
    then: Vec<BrokerEvent>,
}

impl Done {
    fn reply(reply: OkBody) -> Self {
        Done {
            reply,
            then: Vec::new(),
        }
    }
    fn empty() -> Self {
        Self::reply(OkBody::Done {})
    }
    fn then(mut self, event: BrokerEvent) -> Self {
        self.then.push(event);
        self
    }
}

type Handled = Result<Done, ChatError>;

impl Session {
    pub(crate) fn new(chat: Arc<Inner>, conn: Conn, peer: Option<IpAddr>) -> Self {
        let policy = chat.policy();
        Session {
            limiter: ConnLimiter::new(&policy.config.rate_limits),
            policy,
            chat,
            conn,
            peer,
            abusive: false,
            accepted: Instant::now(),
            login: None,
            in_flight: VecDeque::new(),
        }
    }

    /// Whether the connection is logged in.
    pub fn logged_in(&self) -> bool {
        self.login.is_some()
    }

    /// The logged-in user, if any.
    pub fn user(&self) -> Option<&UserName> {
        self.login.as_ref().map(|l| &l.user)
    }

    /// Execute one request. A `send` is queued (see the module's words)
    /// and answered later; any other request waits for the requests before
    /// it, then queues its reply and publishes its effects. Returns false
    /// when the request was refused (a queued `send` counts as accepted:
    /// its outcome comes in its reply).
    pub async fn handle(&mut self, envelope: Envelope) -> bool {
        let Envelope { id, request } = envelope;
        let kind = request.kind();
        let pipelined = matches!(request, Request::Send { .. });
        if !pipelined {
            self.settle().await;
        } else if self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_oldest().await;
        }
        self.accepted = Instant::now();
        let outcome = self.execute(request).await;
        let refused = outcome.refused();
        self.in_flight.push_back(InFlight {
            id,
            kind,
            accepted: self.accepted,
            abusive: std::mem::take(&mut self.abusive),
            outcome,
        });
        if !pipelined {
            self.settle().await;
        }
        !refused
    }

    /// Resolves once the oldest request in flight has its outcome; never
    /// while none is in flight. Then [`Session::answer`] answers it.
    /// Cancel-safe: the outcome is kept.
    pub async fn stored(&mut self) {
        std::future::poll_fn(|cx| self.poll_stored(cx)).await
    }

    /// [`Session::stored`], polled.
    pub fn poll_stored(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.in_flight.front_mut() {
            Some(oldest) => oldest.outcome.poll_known(cx),
            None => Poll::Pending,
        }
    }

    /// Answer, oldest first, the requests in flight whose outcome is known,
    /// up to the first that is still waiting.
    pub async fn answer(&mut self) {
        while self.oldest_known() {
            self.settle_oldest().await;
        }
    }

    /// Whether a request is in flight and the oldest has its outcome.
    fn oldest_known(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.in_flight
            .front_mut()
            .is_some_and(|oldest| oldest.outcome.poll_known(&mut cx).is_ready())
    }

    /// Wait for every request in flight and answer it.
    pub async fn settle(&mut self) {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
    }

    /// Wait for the oldest request in flight (if any), answer it: queue its
    /// reply, then publish its effects.
    async fn settle_oldest(&mut self) {
        let Some(oldest) = self.in_flight.front_mut() else {
            return;
        };
        let outcome = (&mut oldest.outcome).await;
        let oldest = self.in_flight.pop_front().expect("the oldest");
        if self.in_flight.is_empty() {
            // Give the memory back: an idle session holds none.
            self.in_flight = VecDeque::new();
        }
        let (result, then) = match outcome {
            Ok(done) => (Ok(done.reply), done.then),
            Err(e) => {
                tracing::debug!(
                    request = oldest.kind,
                    code = e.code.as_str(),
                    "refused: {}",
                    e.message
                );
                (Err(ErrorBody::from(e)), Vec::new())
            }
        };
        if let Some(observer) = self.chat.observer.get() {
            let outcome = result.as_ref().map(|_| ()).map_err(|e| e.code);
            observer.request(oldest.kind, outcome, oldest.accepted.elapsed());
        }
        self.reply(oldest.id, result).await;
        self.publish(then).await;
        if oldest.abusive {
            self.conn.close(CloseReason::Abuse);
        }
    }

    /// Queue transport-specific bytes, in order with replies and events.
    pub async fn write_raw(&mut self, bytes: bytes::Bytes) {
        self.settle().await;
        self.conn.send(Outbound::Raw(Box::new(bytes))).await;
    }

    /// Answer a frame that could not be decoded.
    pub async fn reject(&mut self, error: DecodeError) {
        self.settle().await;
        let Reply { id, result } = error.into_reply();
        self.reply(id, result).await;
    }

    /// Answer with an error the transport found (a frame too large, say).
    pub async fn refuse(&mut self, id: Option<RequestId>, error: ChatError) {
        self.settle().await;
        self.reply(id, Err(error.into())).await;
    }

    /// The connection is gone: answer and publish what is in flight, then
    /// end the login (presence, guest memberships).
    pub async fn close(mut self) {
        self.settle().await;
        let then = self.detach().await;
        self.publish(then).await;
    }

    async fn reply(&self, id: Option<RequestId>, result: Result<OkBody, ErrorBody>) {
        let reply = Box::new(Reply { id, result });
        self.conn.send(Outbound::Reply(reply)).await;
    }

    async fn publish(&self, events: Vec<BrokerEvent>) {
        for event in events {
            if let Err(e) = self.chat.broker.publish(event).await {
                // The change is stored; members catch up with `sync`.
                tracing::warn!(error = %e, "publish failed");
            }
        }
    }

    /// Run a request's handler, if [`Session::check`] lets it.
    async fn execute(&mut self, request: Request) -> Later {
        let standing = match self.check(&request).await {
            Ok(standing) => standing,
            Err(e) => return Later::now(Err(e)),
        };
        match request {
            Request::Send { room, body, nonce } => match RoomName::parse(&room) {
                Ok(room) => self.post(room, body, nonce, None).await,
                Err(e) => Later::now(Err(e)),
            },
            request => Later::now(self.run(request, standing).await),
        }
    }

    /// The command table at work: rate limits, then what [`need`] says the
    /// request needs. Returns the caller's standing in the request's room
    /// when the request needs a role there (else the default).
    async fn check(&mut self, request: &Request) -> Result<Standing, ChatError> {
        let need = need(request);
        if let Need::Nothing = need {
            return Ok(Standing::default());
        }
        self.admit(request)?;
        match (need, self.login.as_deref()) {
            (Need::LoggedOut, Some(l)) => Err(ChatError::bad_request(format!(
                "already logged in as {}; log out first",
                l.user
            ))),
            (Need::LoggedOut, None) => Ok(Standing::default()),
            (_, None) => Err(ChatError::unauthorized(
                "log in first: register, login, guest or resume",
            )),
            (Need::Login, Some(_)) => Ok(Standing::default()),
            (Need::Rank { role, over }, Some(_)) => self.authorize(request, role, over).await,
            (Need::Nothing, _) => unreachable!("answered above"),
        }
    }

    /// The handlers of every request but `send`. `standing` is the
    /// caller's in the request's room, for the requests that need one.
    async fn run(&mut self, request: Request, standing: Standing) -> Handled {
        match request {
            Request::Ping {} => Ok(Done::reply(OkBody::Pong)),
            Request::Register { user, password } => self.register(&user, password).await,
            Request::Login { user, password } => self.login(&user, password).await,
            Request::Guest { user } => self.guest(&user).await,
            Request::Resume { token } => self.resume(&token).await,
            Request::Logout {} => self.logout().await,
            Request::Join { room, invite } => self.join(&room, invite).await,
            Request::Leave { room } => self.leave(&room).await,
            Request::Rooms { all, after, limit } => self.rooms(all, after, limit).await,
            Request::Members { room, after, limit } => self.members(&room, after, limit).await,
            Request::Topic { room, topic } => self.topic(&room, topic).await,
            Request::Send { .. } => unreachable!("sends are queued by execute"),
            Request::Dm { to, body, nonce } => self.dm(&to, body, nonce).await,
            Request::History {
                room,
                before,
                after,
                limit,
            } => self.history(&room, before, after, limit).await,
            Request::Sync { cursors, limit } => self.sync(cursors, limit).await,
            Request::Read { room, seq } => self.read(&room, seq).await,
            Request::Typing { room } => self.typing(&room),
            Request::Role { place, user, role } => self.set_role(&place, &user, role).await,
            Request::Kick {
                place,
                user,
                reason,
            } => self.kick(&place, &user, reason).await,
            Request::Ban {
                place,
                user,
                reason,
                duration_ms,
            } => {
                let ban = self.new_sanction(SanctionKind::Ban, &user, reason, duration_ms);
                let ban = ban.await?;
                self.sanction(&place, ban).await
            }
            Request::Mute {
                place,
                user,
                reason,
                duration_ms,
            } => {
                let mute = self.new_sanction(SanctionKind::Mute, &user, reason, duration_ms);
                let mute = mute.await?;
                self.sanction(&place, mute).await
            }
            Request::Unban { place, user } => self.lift(&place, &user, SanctionKind::Ban).await,
            Request::Unmute { place, user } => self.lift(&place, &user, SanctionKind::Mute).await,
            Request::Bans { place } => self.bans(&place).await,
            Request::HubCreate {
                hub,
                title,
                private,
            } => self.hub_create(&hub, title, private).await,
            Request::HubJoin { hub, invite } => self.hub_join(&hub, invite).await,
            Request::HubLeave { hub } => self.hub_leave(&hub).await,
            Request::Hubs { all } => self.hubs(all).await,
            Request::Hub { hub } => self.hub_snapshot(&HubName::parse(&hub)?).await,
            Request::ChannelCreate {
                hub,
                channel,
                private,
                topic,
            } => self.channel_create(&hub, &channel, private, topic).await,
            Request::Invite {
                place,
                user,
                expires_ms,
            } => self.invite(&place, user, expires_ms).await,
            Request::Edit {
                room,
                seq,
                body,
                nonce,
            } => {
                let room = RoomName::parse(&room)?;
                let amend = Some(Amend::Edit(seq));
                self.post_entry(room, body, nonce, None, amend).await.await
            }
            Request::Delete { room, seq, nonce } => {
                let room = RoomName::parse(&room)?;
                let amend = Some(Amend::Delete {
                    target: seq,
                    moderator: standing.at_least(Role::Moderator),
                });
                self.post_entry(room, String::new(), nonce, None, amend)
                    .await
                    .await
            }
        }
    }

    /// The rate limits a request passes before anything else happens.
    fn admit(&mut self, request: &Request) -> Result<(), ChatError> {
        let current = self.chat.policy();
        if !Arc::ptr_eq(&current, &self.policy) {
            self.limiter = ConnLimiter::new(&current.config.rate_limits);
            self.policy = current;
        }
        let limits = &self.policy.limiters;
        let (verdict, what) = match request {
            Request::Send { .. } | Request::Dm { .. } => {
                let user = self.login.as_ref().map(|l| l.user.key());
                let verdict = self.limiter.message().and_then(|()| match user {
                    Some(key) => limits.user_message(key),
                    None => Ok(()),
                });
                (verdict, "messages")
            }
            Request::Register { user, .. } | Request::Login { user, .. } => {
                let account = user.to_ascii_lowercase();
                (limits.auth(self.peer, Some(&account)), "login attempts")
            }
            Request::Resume { .. } => (limits.auth(self.peer, None), "login attempts"),
            _ => (Ok(()), "requests"),
        };
        let verdict = self.limiter.request().and(verdict);
        let Err(wait) = verdict else { return Ok(()) };
        Err(self.refused(wait, what))
    }

    /// A rate-limit refusal of `what`, to wait `wait`; repeated, it closes
    /// the connection.
    fn refused(&mut self, wait: std::time::Duration, what: &str) -> ChatError {
        match self.limiter.refuse(wait, what) {
            Refusal::Retry(e) => e,
            Refusal::Abuse(e) => {
                self.abusive = true;
                e
            }
        }
    }

    fn me(&self) -> &Login {
        self.login
            .as_deref()
            .expect("the command table checked the login")
    }

    // --- accounts -------------------------------------------------------

    async fn register(&mut self, user: &str, password: String) -> Handled {
        let name = UserName::parse(user)?;
        auth::check_password(&password)?;
        self.throttle_account(&name).await?;
        if self.connected_guest(name.key()).await.is_some() {
            return Err(ChatError::conflict(format!(
                "the name {name} is in use by a connected guest"
            )));
        }
        let hash = self.chat.passwords.hash(password).await?;
        self.chat
            .store
            .create_user(&name, &hash)
            .await
            .map_err(|e| match e {
                crate::StoreError::Conflict(_) => {
                    ChatError::conflict(format!("the user name {name} is already taken"))
                }
                e => e.into(),
            })?;
        self.start_with_token(name).await
    }

    async fn login(&mut self, user: &str, password: String) -> Handled {
        let name = UserName::parse(user)?;
        self.throttle_account(&name).await?;
        let record = self.chat.store.user(&name).await?;
        let hash = record.as_ref().map(|r| r.password_hash.clone());
        if !self.chat.passwords.verify(password, hash).await? {
            return Err(ChatError::unauthorized("unknown user or wrong password"));
        }
        let record = record.expect("verified");
        refuse_banned(&record)?;
        self.start_with_token(record.name).await
    }

    /// The cluster-wide bucket of password attempts on one account (each
    /// node also keeps its own, checked before): a guesser gains nothing
    /// from spreading attempts over the nodes. When the broker cannot
    /// answer, the node's own bucket is what holds.
    async fn throttle_account(&mut self, name: &UserName) -> Result<(), ChatError> {
        let Some(rate) = self.policy.config.rate_limits.auth_per_account else {
            return Ok(());
        };
        let key = format!("auth:{}", name.key());
        match self.chat.broker.throttle(&key, rate).await {
            Ok(Err(wait)) => Err(self.refused(wait, "login attempts")),
            Ok(Ok(())) => Ok(()),
            Err(e) => {
                tracing::debug!(error = %e, "cluster login throttle unavailable");
                Ok(())
            }
        }
    }

    /// The connected guest with this key, here or on another node.
    async fn connected_guest(&self, key: &str) -> Option<UserName> {
        match self.chat.hub.online_user(key) {
            Some(u) if u.guest => Some(u.name),
            Some(_) => None,
            None => self.chat.broker.guest(key).await.ok().flatten(),
        }
    }

    async fn start_with_token(&mut self, name: UserName) -> Handled {
        let (token, hash) = auth::new_token();
        self.chat.store.create_token(&name, &hash).await?;
        let done = self.start(name.clone(), false, Some(hash)).await?;
        Ok(Done {
            reply: OkBody::Auth {
                user: name.as_str().to_owned(),
                token: Some(token),
            },
            ..done
        })
    }

    async fn guest(&mut self, user: &str) -> Handled {
        if !self.policy.config.allow_guests {
            return Err(ChatError::forbidden("guests are turned off on this server"));
        }
        let name = UserName::parse(user)?;
        if self.chat.store.user(&name).await?.is_some() {
            return Err(ChatError::conflict(format!(
                "{name} is a registered user; log in instead"
            )));
        }
        match self.chat.broker.claim_guest(&name).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(ChatError::conflict(format!(
                    "the name {name} is in use on another node"
                )))
            }
            // Alone, this node can only vouch for its own connections.
            Err(e) => tracing::debug!(error = %e, "claiming a guest name"),
        }
        let started = self.start(name.clone(), true, None).await;
        if started.is_err() {
            // Not connected after all: the claim goes with the registry's
            // next look at this name.
            self.chat.hub.recheck(&name, true);
        }
        started
    }

    async fn resume(&mut self, token: &str) -> Handled {
        let hash = auth::token_hash(token);
        let Some(record) = self.chat.store.token_user(&hash).await? else {
            return Err(ChatError::unauthorized("invalid or revoked token"));
        };
        refuse_banned(&record)?;
        self.start(record.name, false, Some(hash)).await
    }

    /// Log this connection in: attach it to the hub with the user's rooms;
    /// the first connection of a user announces its presence.
    async fn start(&mut self, user: UserName, guest: bool, token: Option<TokenHash>) -> Handled {
        let rooms: Vec<(RoomName, Seq)> = if guest {
            Vec::new()
        } else {
            let views = self.chat.store.rooms(&user, false, None, ALL).await?;
            views.into_iter().map(|v| (v.room, v.last_seq)).collect()
        };
        let first = self
            .chat
            .hub
            .attach(&user, guest, self.conn.clone(), &rooms)?;
        let mut done = Done::reply(OkBody::Auth {
            user: user.as_str().to_owned(),
            token: None,
        });
        if first && !self.elsewhere(&user).await {
            done = done.then(BrokerEvent::Presence {
                user: user.clone(),
                online: true,
                rooms: rooms.into_iter().map(|(r, _)| r).collect(),
            });
        }
        self.login = Some(Box::new(Login { user, guest, token }));
        Ok(done)
    }

    async fn logout(&mut self) -> Handled {
        if let Some(token) = self.me().token {
            self.chat.store.revoke_token(&token).await?;
        }
        let then = self.detach().await;
        Ok(Done {
            reply: OkBody::Done {},
            then,
        })
    }

    /// End this connection's login. The user's last connection takes its
    /// presence down, and a guest's memberships with it.
    async fn detach(&mut self) -> Vec<BrokerEvent> {
        let Some(login) = self.login.take() else {
            return Vec::new();
        };
        let Some(rooms) = self.chat.hub.detach(&login.user, self.conn.id()) else {
            return Vec::new();
        };
        let mut events = Vec::new();
        if !self.elsewhere(&login.user).await {
            events.push(BrokerEvent::Presence {
                user: login.user.clone(),
                online: false,
                rooms,
            });
        }
        if login.guest {
            match self.chat.store.drop_guest(&login.user).await {
                Ok(left) => {
                    for room in left {
                        events.push(left_event(&room, &login.user, Skip::Nobody));
                        events.push(BrokerEvent::Membership {
                            room,
                            user: login.user.clone(),
                            joined: false,
                            last_seq: 0,
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, user = %login.user, "dropping a guest"),
            }
        }
        events
    }

    /// Whether `user` is connected to another node (as far as the broker
    /// can tell).
    async fn elsewhere(&self, user: &UserName) -> bool {
        let answer = self.chat.broker.elsewhere(&[user.key()]).await;
        answer.is_ok_and(|v| v.first() == Some(&true))
    }

    // --- rooms ----------------------------------------------------------

    async fn join(&mut self, room: &str, invite: Option<String>) -> Handled {
        let room = RoomName::parse_public(room)?;
        let me = self.me();
        let user = me.user.clone();
        let mut rules = JoinRules {
            guest: me.guest,
            create: false,
            invite,
            max_rooms: self.policy.config.max_rooms_per_user,
        };
        let store = self.chat.store.clone();
        let joined = match store.join(&room, &user, rules.clone()).await {
            // Channels are made by `channel_create`, never by a join.
            Err(crate::StoreError::NoSuchRoom) if room.hub().is_some() => {
                return Err(authority::no_such(&room))
            }
            // A new room: its creation counts against the user's hourly
            // allowance first.
            Err(crate::StoreError::NoSuchRoom) => {
                if let Err(wait) = self.policy.limiters.room_creation(user.key()) {
                    return Err(self.refused(wait, "new rooms"));
                }
                rules.create = true;
                store.join(&room, &user, rules).await?
            }
            joined => joined?,
        };
        let (members, members_more) = self.member_page(&room, None, DEFAULT_LIST_PAGE).await?;
        let me = self.me();
        let mut done = Done::reply(OkBody::Joined {
            room: room.as_str().to_owned(),
            topic: joined.topic,
            members,
            members_more,
            last_seq: joined.last_seq,
        })
        .then(BrokerEvent::Membership {
            room: room.clone(),
            user: me.user.clone(),
            joined: true,
            last_seq: joined.last_seq,
        });
        if joined.newly_joined {
            done = done.then(BrokerEvent::Room {
                event: Event::Joined {
                    room: room.as_str().to_owned(),
                    user: me.user.as_str().to_owned(),
                },
                room,
                skip: Skip::Conn(self.conn.id()),
            });
        }
        Ok(done)
    }

    async fn leave(&mut self, room: &str) -> Handled {
        let room = RoomName::parse(room)?;
        let user = self.me().user.clone();
        self.chat.store.leave(&room, &user).await?;
        // `left` first, so the user's other connections still receive it.
        Ok(Done::empty()
            .then(left_event(&room, &user, Skip::Conn(self.conn.id())))
            .then(BrokerEvent::Membership {
                room,
                user,
                joined: false,
                last_seq: 0,
            }))
    }

    async fn rooms(&mut self, all: bool, after: Option<String>, limit: Option<u32>) -> Handled {
        let limit = list_limit(limit)?;
        let after = after.map(|a| RoomName::parse(&a)).transpose()?;
        let (views, more) = one_page(
            self.chat
                .store
                .rooms(&self.me().user, all, after.as_ref(), limit + 1)
                .await?,
            limit,
        );
        let rooms = views
            .into_iter()
            // A hub's own room holds its members; the hub is no room.
            .filter(|v| !v.room.is_hub_room())
            .map(|v| RoomEntry {
                room: v.room.as_str().to_owned(),
                topic: v.topic,
                member_count: v.member_count,
                last_seq: v.last_seq,
                unread: v.read_seq.map_or(0, |r| v.last_seq.saturating_sub(r)),
            })
            .collect();
        Ok(Done::reply(OkBody::Rooms { rooms, more }))
    }

    async fn members(&mut self, room: &str, after: Option<String>, limit: Option<u32>) -> Handled {
        let room = RoomName::parse(room)?;
        if let Some((a, b)) = room.direct_users() {
            let me = self.me().user.key();
            if me != a && me != b {
                return Err(ChatError::forbidden("not your conversation"));
            }
        }
        // A channel's members are for those who can see the channel: not
        // outsiders of a private hub, nor of a private channel.
        if let Some(hub) = room.hub() {
            let seen = self.chat.store.hub(&hub, &self.me().user).await;
            let seen = seen.map_err(|e| match e {
                crate::StoreError::NoSuchRoom => authority::no_such(&room),
                e => e.into(),
            })?;
            if !seen.channels.iter().any(|c| c.room == room) {
                return Err(ChatError::forbidden(format!("{room} is private")));
            }
        }
        let after = after.map(|a| a.to_ascii_lowercase());
        let (members, more) = self
            .member_page(&room, after.as_deref(), list_limit(limit)?)
            .await?;
        Ok(Done::reply(OkBody::Members { members, more }))
    }

    /// A page of members after the key `after`, and whether more follow.
    async fn member_page(
        &self,
        room: &RoomName,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Member>, bool), ChatError> {
        let (users, more) = one_page(
            self.chat.store.members(room, after, limit + 1).await?,
            limit,
        );
        let online = self.online(users.iter().map(|(u, _)| u)).await;
        let members = users
            .iter()
            .zip(online)
            .map(|((u, role), online)| Member {
                online,
                user: u.as_str().to_owned(),
                role: *role,
            })
            .collect();
        Ok((members, more))
    }

    /// Whether each user is connected, here or on another node.
    async fn online<'a>(&self, users: impl Iterator<Item = &'a UserName>) -> Vec<bool> {
        let keys: Vec<&str> = users.map(|u| u.key()).collect();
        let elsewhere = match self.chat.broker.elsewhere(&keys).await {
            Ok(flags) => flags,
            Err(_) => vec![false; keys.len()],
        };
        keys.iter()
            .zip(elsewhere)
            .map(|(key, elsewhere)| elsewhere || self.chat.hub.is_online(key))
            .collect()
    }

    async fn topic(&mut self, room: &str, topic: String) -> Handled {
        let room = RoomName::parse(room)?;
        if topic.chars().count() > self.policy.config.max_topic_chars {
            return Err(ChatError::too_large(format!(
                "a topic has at most {} characters",
                self.policy.config.max_topic_chars
            )));
        }
        check_text("topic", &topic)?;
        self.policy.config.filter.check(&topic)?;
        let user = self.me().user.clone();
        self.chat.store.set_topic(&room, &user, &topic).await?;
        Ok(Done::empty().then(BrokerEvent::Room {
            event: Event::Topic {
                room: room.as_str().to_owned(),
                topic,
                user: user.as_str().to_owned(),
            },
            room,
            skip: Skip::Nobody,
        }))
    }

    // --- messages -------------------------------------------------------

    async fn dm(&mut self, to: &str, body: String, nonce: Option<String>) -> Handled {
        let peer = UserName::parse(to)?;
        let me = self.me();
        if peer == me.user {
            return Err(ChatError::bad_request(
                "a direct message needs another user",
            ));
        }
        let (peer, peer_guest) = match self.chat.store.user(&peer).await? {
            Some(record) => (record.name, false),
            None => match self.connected_guest(peer.key()).await {
                Some(name) => (name, true),
                None => return Err(ChatError::not_found(format!("no user named {peer}"))),
            },
        };
        let room = RoomName::direct(&me.user, &peer);
        let direct = DirectPeers {
            sender_guest: me.guest,
            peer,
            peer_guest,
        };
        self.post(room, body, nonce, Some(direct)).await.await
    }

    /// Queue a message for storage; once it is committed, the reply and
    /// its publication.
    async fn post(
        &mut self,
        room: RoomName,
        body: String,
        nonce: Option<String>,
        direct: Option<DirectPeers>,
    ) -> Later {
        self.post_entry(room, body, nonce, direct, None).await
    }

    /// [`Session::post`] of any entry of a room's log: a message, or an
    /// edit or deletion of one (which has no body).
    async fn post_entry(
        &mut self,
        room: RoomName,
        body: String,
        nonce: Option<String>,
        direct: Option<DirectPeers>,
        amend: Option<Amend>,
    ) -> Later {
        let checked = match amend {
            Some(Amend::Delete { .. }) => Ok(()),
            _ => self.check_body(&body),
        };
        if let Err(e) = checked {
            return Later::now(Err(e));
        }
        if let Some(n) = &nonce {
            if n.is_empty() || n.chars().count() > MAX_NONCE_CHARS {
                return Later::now(Err(ChatError::bad_request(format!(
                    "a nonce has 1 to {MAX_NONCE_CHARS} characters"
                ))));
            }
        }
        let queued = self.chat.store.queue_append(NewMessage {
            room: room.clone(),
            sender: self.me().user.clone(),
            body,
            nonce,
            ts: now_ms(),
            direct,
            amend,
        });
        let queued = match queued.await {
            Ok(queued) => queued,
            Err(e) => return Later::now(Err(e.into())),
        };
        let chat = self.chat.clone();
        let accepted = self.accepted;
        Later::Stored(Box::pin(async move {
            let stored = queued.await?;
            let m = &stored.message;
            let mut done = Done::reply(OkBody::Sent {
                room: m.room.clone(),
                seq: m.seq,
                ts: m.ts,
            });
            for user in stored.new_members {
                done = done.then(BrokerEvent::Membership {
                    room: room.clone(),
                    user,
                    joined: true,
                    last_seq: m.seq - 1,
                });
            }
            if !stored.duplicate {
                if let Some(observer) = chat.observer.get() {
                    observer.message_stored();
                }
                done = done.then(BrokerEvent::Message {
                    message: stored.message,
                    accepted: Some(accepted),
                });
            }
            Ok(done)
        }))
    }

    fn check_body(&self, body: &str) -> Result<(), ChatError> {
        if body.is_empty() {
            return Err(ChatError::bad_request("the body is empty"));
        }
        let max = self.policy.config.max_body_bytes;
        if body.len() > max {
            return Err(ChatError::too_large(format!(
                "the body has {} bytes; at most {max} are allowed",
                body.len()
            )));
        }
        check_text("body", body)?;
        self.policy.config.filter.check(body)
    }

    async fn history(
        &mut self,
        room: &str,
        before: Option<Seq>,
        after: Option<Seq>,
        limit: Option<u32>,
    ) -> Handled {
        let room = RoomName::parse(room)?;
        let page = match (before, after) {
            (None, None) => Page::Latest,
            (Some(b), None) => Page::Before(b),
            (None, Some(a)) => Page::After(a),
            (Some(_), Some(_)) => {
                return Err(ChatError::bad_request("give `before` or `after`, not both"))
            }
        };
        let limit = page_limit(limit)?;
        let page = self
            .chat
            .store
            .history(&room, &self.me().user, page, limit)
            .await?;
        Ok(Done::reply(OkBody::History {
            room: room.as_str().to_owned(),
            messages: page.messages,
            more: page.more,
        }))
    }

    async fn sync(&mut self, cursors: BTreeMap<String, Seq>, limit: Option<u32>) -> Handled {
        let limit = page_limit(limit)?;
        let mut given = BTreeMap::new();
        for (room, seq) in cursors {
            given.insert(RoomName::parse(&room)?, seq);
        }
        let user = self.me().user.clone();
        let mut rooms = Vec::new();
        // The reply's total budget: rooms past it are left for the next
        // sync (`more`), and a room cut short by it says `more` itself.
        let mut budget = self.policy.config.max_sync_messages;
        let mut more = false;
        for view in self.chat.store.rooms(&user, false, None, ALL).await? {
            let cursor = given
                .get(&view.room)
                .copied()
                .unwrap_or(view.read_seq.unwrap_or(0));
            if view.last_seq <= cursor {
                continue;
            }
            if budget == 0 {
                more = true;
                break;
            }
            let page = match self
                .chat
                .store
                .history(&view.room, &user, Page::After(cursor), limit.min(budget))
                .await
            {
                Ok(page) => page,
                // Left on another connection since the listing: skip it.
                Err(crate::StoreError::NotMember) => continue,
                Err(e) => return Err(e.into()),
            };
            budget -= page.messages.len() as u32;
            rooms.push(SyncRoom {
                room: view.room.as_str().to_owned(),
                messages: page.messages,
                more: page.more,
            });
        }
        Ok(Done::reply(OkBody::Sync { rooms, more }))
    }

    async fn read(&mut self, room: &str, seq: Seq) -> Handled {
        let room = RoomName::parse(room)?;
        let user = self.me().user.clone();
        let marker = self.chat.store.mark_read(&room, &user, seq).await?;
        Ok(Done::empty().then(BrokerEvent::User {
            user: user.key().to_owned(),
            event: Event::Read {
                room: room.as_str().to_owned(),
                seq: marker,
            },
            skip: Skip::Conn(self.conn.id()),
        }))
    }

    fn typing(&mut self, room: &str) -> Handled {
        let room = RoomName::parse(room)?;
        let user = &self.me().user;
        if !self.chat.hub.is_member(user.key(), &room) {
            return Err(ChatError::forbidden(format!("not a member of {room}")));
        }
        Ok(Done::empty().then(BrokerEvent::Room {
            event: Event::Typing {
                room: room.as_str().to_owned(),
                user: user.as_str().to_owned(),
            },
            room,
            skip: Skip::User(user.key().to_owned()),
        }))
    }
}

/// A user banned from the whole server may not log in.
fn refuse_banned(record: &crate::store::UserRecord) -> Result<(), ChatError> {
    match &record.banned {
        Some(ban) if ban.in_force(now_ms()) => {
            let until = ban
                .until_ts
                .map_or(String::new(), |ts| format!(" until {ts} (Unix ms)"));
            let reason = match ban.reason.as_str() {
                "" => String::new(),
                r => format!(": {r}"),
            };
            Err(ChatError::forbidden(format!(
                "you are banned from this server{until}{reason}"
            )))
        }
        _ => Ok(()),
    }
}

/// `left` to a room's members, or `hub_left` to a hub's when the room is
/// a hub's own.
fn left_event(room: &RoomName, user: &UserName, skip: Skip) -> BrokerEvent {
    let user = user.as_str().to_owned();
    let event = match room.hub() {
        Some(hub) if room.is_hub_room() => Event::HubLeft {
            hub: hub.to_string(),
            user,
        },
        _ => Event::Left {
            room: room.as_str().to_owned(),
            user,
        },
    };
    BrokerEvent::Room {
        room: room.clone(),
        event,
        skip,
    }
}

/// Text fields carry no control characters but newline and tab.
fn check_text(field: &str, text: &str) -> Result<(), ChatError> {
    match text
        .chars()
        .find(|c| c.is_control() && *c != '\n' && *c != '\t')
    {
        Some(c) => Err(ChatError::bad_request(format!(
            "the {field} contains the control character U+{:04X}",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// A page of `limit` from `limit + 1` items asked for, and whether more
/// exist (the extra item says so).
fn one_page<T>(mut items: Vec<T>, limit: u32) -> (Vec<T>, bool) {
    let more = items.len() > limit as usize;
    items.truncate(limit as usize);
    (items, more)
}

fn list_limit(limit: Option<u32>) -> Result<u32, ChatError> {
    match limit.unwrap_or(DEFAULT_LIST_PAGE) {
        n @ 1..=MAX_LIST_PAGE => Ok(n),
        n => Err(ChatError::bad_request(format!(
            "limit {n} is out of range: 1 to {MAX_LIST_PAGE}"
        ))),
    }
}

fn page_limit(limit: Option<u32>) -> Result<u32, ChatError> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ChatError::bad_request(format!(
            "limit {n} is out of range: 1 to {MAX_PAGE}"
        ))),
    }
}

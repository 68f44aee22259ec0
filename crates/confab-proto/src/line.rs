//! The line protocol, for people at a terminal (`nc`, `telnet`): one
//! command or message per line, UTF-8, `\n` or `\r\n`.
//!
//! - [`LineDecoder`]: bytes to lines, with a hard limit. A line over the
//!   limit is reported as soon as the limit is passed and its bytes are
//!   dropped up to the next newline, so memory never grows past the limit.
//! - [`parse`]: a line to a [`LineCommand`].
//! - [`format_event`], [`format_reply`]: events and replies to lines.
//!   Information lines start with `* `, errors with `! code: `, chat lines
//!   with `[room] `.
//!
//! Replies carry no request type, so the transport puts the command that
//! caused a request in its `id` ([`context`]) and [`format_reply`] reads
//! it back.

use std::fmt::Write;

use bytes::{Buf, Bytes, BytesMut};

use crate::types::{Event, Message, OkBody, Reply, RequestId, Role, Seq};

/// One decoded unit of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineFrame {
    /// A complete line, without its `\n` or `\r\n`.
    Line(String),
    /// A line passed the limit; its bytes are being discarded.
    TooLong,
    /// A complete line that is not UTF-8.
    BadUtf8,
}

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineDecoder {
    max: usize,
    /// Dropping the rest of an over-long line, up to its newline.
    discarding: bool,
}

impl LineDecoder {
    pub fn new(max: usize) -> Self {
        LineDecoder {
            max,
            discarding: false,
        }
    }

    /// How many more bytes the transport may read into `buf` now: never
    /// more than one past the limit, so an over-long line is caught before
    /// it is buffered.
    pub fn room(&self, buf: &BytesMut) -> usize {
        if self.discarding {
            return self.max.max(1);
        }
        (self.max + 1).saturating_sub(buf.len()).max(1)
    }

    /// The next frame in `buf`, consuming its bytes; `None` when more input
    /// is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<LineFrame> {
        loop {
            let newline = buf.iter().position(|b| *b == b'\n');
            if self.discarding {
                match newline {
                    Some(i) => {
                        buf.advance(i + 1);
                        self.discarding = false;
                        continue;
                    }
                    None => {
                        buf.clear();
                        return None;
                    }
                }
            }
            return match newline {
                Some(i) if i > self.max => {
                    buf.advance(i + 1);
                    Some(LineFrame::TooLong)
                }
                Some(i) => {
                    let mut line = buf.split_to(i + 1);
                    line.truncate(i);
                    if line.last() == Some(&b'\r') {
                        line.truncate(i - 1);
                    }
                    Some(match String::from_utf8(line.to_vec()) {
                        Ok(s) => LineFrame::Line(s),
                        Err(_) => LineFrame::BadUtf8,
                    })
                }
                None if buf.len() > self.max => {
                    buf.clear();
                    self.discarding = true;
                    Some(LineFrame::TooLong)
                }
                None => None,
            };
        }
    }
}

/// What a line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineCommand {
    /// `PING [token]`, answered `PONG [token]` at any time.
    Ping(Option<String>),
    Help,
    Nick(String),
    Register {
        user: String,
        password: String,
    },
    Login {
        user: String,
        password: String,
    },
    /// `/join ROOM [CODE]` (CODE: an invite to a private channel).
    Join(String, Option<String>),
    Leave(Option<String>),
    Rooms {
        all: bool,
    },
    Who(Option<String>),
    Msg {
        to: String,
        text: String,
    },
    /// `/topic` shows the current room's topic, `/topic TEXT` sets it.
    Topic(Option<String>),
    History(Option<u32>),
    /// `/edit SEQ TEXT`: replace one's message in the current room.
    Edit {
        seq: Seq,
        text: String,
    },
    /// `/delete SEQ`: take a message of the current room back.
    Delete(Seq),
    /// `/role USER ROLE` in the current room, or `/hub role HUB USER ROLE`.
    Role {
        hub: Option<String>,
        user: String,
        role: Role,
    },
    /// `/kick USER [REASON]`, `/ban USER [DURATION] [REASON]`,
    /// `/mute USER [DURATION] [REASON]`, `/unban USER`, `/unmute USER`, in
    /// the current room; the same after `/hub … HUB` in a hub.
    Moderate {
        hub: Option<String>,
        action: Moderation,
        user: String,
        duration_ms: Option<i64>,
        reason: Option<String>,
    },
    /// `/bans`: who is banned or muted in the current room; `/hub bans
    /// HUB`: in a hub.
    Bans(Option<String>),
    /// `/hubs [all]`.
    Hubs {
        all: bool,
    },
    /// `/hub HUB`: its channels and members.
    HubShow(String),
    /// `/hub create HUB [private] [TITLE]`.
    HubCreate {
        hub: String,
        private: bool,
        title: Option<String>,
    },
    /// `/hub join HUB [CODE]`.
    HubJoin {
        hub: String,
        invite: Option<String>,
    },
    /// `/hub leave HUB`.
    HubLeave(String),
    /// `/channel HUB/CHANNEL [private] [TOPIC]`.
    ChannelCreate {
        room: String,
        private: bool,
        topic: Option<String>,
    },
    /// `/invite HUB [USER]` or `/invite HUB/CHANNEL [USER]`.
    Invite {
        place: String,
        user: Option<String>,
    },
    Quit,
    /// A plain line: a message to the current room. `//text` sends `/text`.
    Say(String),
    /// A blank line: nothing to do.
    Nothing,
}

/// What `/kick`, `/ban`, `/mute`, `/unban` and `/unmute` do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moderation {
    Kick,
    Ban,
    Mute,
    Unban,
    Unmute,
}

/// A terminal's duration: a whole number and a unit, `30s`, `10m`, `2h`,
/// `7d`; in milliseconds. `None` when the word is not one.
pub fn parse_duration(word: &str) -> Option<i64> {
    let unit = word.chars().last()?;
    let digits = &word[..word.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = digits.parse().ok()?;
    let ms = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return None,
    };
    n.checked_mul(ms)
}

/// A line that is not a valid command: the text says how to use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage(pub String);

/// The commands, for `/help`.
pub const HELP: &str = "\
* commands:
*   /nick NAME                  chat as a guest
*   /register NAME PASSWORD     create an account (password: 8 to 256 characters,
*                               the rest of the line, spaces included)
*   /login NAME PASSWORD        log in
*   /join ROOM                  join ROOM (created if new) and talk in it
*   /leave [ROOM]               leave ROOM (default: the current room)
*   /rooms [all]                your rooms with unread counts, or every public room
*   /who [ROOM]                 members of ROOM and who is online
*   /msg USER TEXT              a direct message
*   /topic [TEXT]               show or set the current room's topic
*   /history [N]                the last N messages of the current room (default 20)
*   /edit SEQ TEXT              replace your message #SEQ of the current room
*   /delete SEQ                 delete message #SEQ (yours; anyone's for moderators)
* moderation, in the current room (moderators and up; /role: admins and owners):
*   /kick USER [REASON]         put USER out of the room
*   /ban USER [DURATION] [REASON]   kick and keep out; DURATION like 30s, 10m, 2h, 7d
*   /mute USER [DURATION] [REASON]  keep USER from sending
*   /unban USER, /unmute USER   end a ban or a mute
*   /bans                       who is banned or muted
*   /role USER ROLE             ROLE: member, moderator, admin or owner
* hubs (communities of channels, HUB/CHANNEL, joined like rooms):
*   /hubs [all]                 your hubs, or every public hub
*   /hub HUB                    its channels and members
*   /hub create HUB [private] [TITLE]
*   /hub join HUB [CODE]        (CODE: an invite, for a private hub)
*   /hub leave HUB
*   /channel HUB/CHANNEL [private] [TOPIC]   a new channel (admins and owners)
*   /invite HUB|HUB/CHANNEL [USER]           an invite code (for USER only, once)
*   /hub kick|ban|mute|unban|unmute HUB USER …, /hub bans HUB, /hub role HUB USER ROLE
*   /join HUB/CHANNEL [CODE]    a channel (CODE: an invite to a private one)
*   /quit                       leave
*   PING [TOKEN]                answered PONG [TOKEN]
* any other line is a message to the current room; start it with // to send a leading /
";

/// Parse one line.
pub fn parse(line: &str) -> Result<LineCommand, Usage> {
    let usage = |u: &str| Err(Usage(format!("usage: {u}")));
    if line.trim().is_empty() {
        return Ok(LineCommand::Nothing);
    }
    if let Some(rest) = line.strip_prefix("PING") {
        if rest.is_empty() || rest.starts_with(' ') {
            let token = rest.trim();
            return Ok(LineCommand::Ping(
                (!token.is_empty()).then(|| token.to_owned()),
            ));
        }
    }
    let Some(command) = line.strip_prefix('/') else {
        return Ok(LineCommand::Say(line.to_owned()));
    };
    if command.starts_with('/') {
        return Ok(LineCommand::Say(command.to_owned()));
    }
    let (name, raw_rest) = command.split_once(' ').unwrap_or((command, ""));
    let rest = raw_rest.trim();
    let mut words = rest.split_whitespace();
    let count = words.clone().count();
    match name.to_ascii_lowercase().as_str() {
        "help" => Ok(LineCommand::Help),
        "nick" if count == 1 => Ok(LineCommand::Nick(rest.to_owned())),
        "nick" => usage("/nick NAME"),
        "register" | "login" if count >= 2 => {
            // The password is the rest of the line after the one character
            // that ends the name: spaces inside it, or at either end, are
            // part of it (the contract allows them; the web allows them).
            let (user, password) = raw_rest
                .trim_start()
                .split_once(char::is_whitespace)
                .expect("two words");
            let (user, password) = (user.to_owned(), password.to_owned());
            Ok(if name.eq_ignore_ascii_case("register") {
                LineCommand::Register { user, password }
            } else {
                LineCommand::Login { user, password }
            })
        }
        "register" => usage("/register NAME PASSWORD"),
        "login" => usage("/login NAME PASSWORD"),
        "join" if count == 1 || count == 2 => Ok(LineCommand::Join(
            words.next().expect("one").to_owned(),
            words.next().map(str::to_owned),
        )),
        "join" => usage("/join ROOM"),
        "leave" | "part" if count <= 1 => Ok(LineCommand::Leave(words.next().map(str::to_owned))),
        "leave" | "part" => usage("/leave [ROOM]"),
        "rooms" | "list" if rest.is_empty() => Ok(LineCommand::Rooms { all: false }),
        "rooms" | "list" if rest == "all" => Ok(LineCommand::Rooms { all: true }),
        "rooms" | "list" => usage("/rooms [all]"),
        "who" | "names" if count <= 1 => Ok(LineCommand::Who(words.next().map(str::to_owned))),
        "who" | "names" => usage("/who [ROOM]"),
        "msg" | "dm" if count >= 2 => {
            // The same whitespace that counted the words splits them: a
            // vertical tab between the two once panicked here (found by
            // fuzzing).
            let (to, text) = rest.split_once(char::is_whitespace).expect("two words");
            Ok(LineCommand::Msg {
                to: to.to_owned(),
                text: text.trim_start().to_owned(),
            })
        }
        "msg" | "dm" => usage("/msg USER TEXT"),
        "topic" => Ok(LineCommand::Topic(
            (!rest.is_empty()).then(|| rest.to_owned()),
        )),
        "history" if rest.is_empty() => Ok(LineCommand::History(None)),
        "history" => match rest.parse::<u32>() {
            Ok(n) if n > 0 => Ok(LineCommand::History(Some(n))),
            _ => usage("/history [N], N a positive number"),
        },
        "edit" if count >= 2 => {
            let (seq, text) = rest.split_once(char::is_whitespace).expect("two words");
            match seq.trim_start_matches('#').parse() {
                Ok(seq) => Ok(LineCommand::Edit {
                    seq,
                    text: text.trim_start().to_owned(),
                }),
                Err(_) => usage("/edit SEQ TEXT, SEQ the number shown as #SEQ"),
            }
        }
        "edit" => usage("/edit SEQ TEXT"),
        "delete" if count == 1 => match rest.trim_start_matches('#').parse() {
            Ok(seq) => Ok(LineCommand::Delete(seq)),
            Err(_) => usage("/delete SEQ, SEQ the number shown as #SEQ"),
        },
        "delete" => usage("/delete SEQ"),
        "role" if count == 2 => role(None, &mut words),
        "role" => usage("/role USER ROLE"),
        "bans" if rest.is_empty() => Ok(LineCommand::Bans(None)),
        "hubs" if rest.is_empty() => Ok(LineCommand::Hubs { all: false }),
        "hubs" if rest == "all" => Ok(LineCommand::Hubs { all: true }),
        "hubs" => usage("/hubs [all]"),
        "hub" => hub_command(rest),
        "channel" if count >= 1 => {
            let (room, rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let (private, topic) = private_then_text(rest);
            Ok(LineCommand::ChannelCreate {
                room: room.to_owned(),
                private,
                topic,
            })
        }
        "channel" => usage("/channel HUB/CHANNEL [private] [TOPIC]"),
        "invite" if (1..=2).contains(&count) => Ok(LineCommand::Invite {
            place: words.next().expect("one").to_owned(),
            user: words.next().map(str::to_owned),
        }),
        "invite" => usage("/invite HUB or HUB/CHANNEL [USER]"),
        "bans" => usage("/bans"),
        "kick" | "ban" | "mute" | "unban" | "unmute" if count >= 1 => moderate(name, rest, None),
        "kick" => usage("/kick USER [REASON]"),
        "ban" | "mute" => usage(&format!("/{name} USER [DURATION] [REASON]")),
        "unban" | "unmute" => usage(&format!("/{name} USER")),
        "quit" | "exit" => Ok(LineCommand::Quit),
        _ => Err(Usage(format!("unknown command /{name}; /help lists them"))),
    }
}

/// `/role USER ROLE`'s words (after `/hub role HUB` for a hub).
fn role<'a>(
    hub: Option<String>,
    words: &mut impl Iterator<Item = &'a str>,
) -> Result<LineCommand, Usage> {
    let (Some(user), Some(role), None) = (words.next(), words.next(), words.next()) else {
        return Err(Usage("usage: /role USER ROLE".into()));
    };
    match Role::parse(&role.to_ascii_lowercase()) {
        Some(role) => Ok(LineCommand::Role {
            hub,
            user: user.to_owned(),
            role,
        }),
        None => Err(Usage(
            "usage: /role USER ROLE, ROLE one of member, moderator, admin, owner".into(),
        )),
    }
}

/// `/kick`, `/ban`, `/mute`, `/unban`, `/unmute`: `rest` is `USER
/// [DURATION] [REASON]`, in the current room or (`hub`) in a hub.
fn moderate(name: &str, rest: &str, hub: Option<String>) -> Result<LineCommand, Usage> {
    let usage = |u: &str| Err(Usage(format!("usage: {u}")));
    let action = match name.to_ascii_lowercase().as_str() {
        "kick" => Moderation::Kick,
        "ban" => Moderation::Ban,
        "mute" => Moderation::Mute,
        "unban" => Moderation::Unban,
        _ => Moderation::Unmute,
    };
    let (user, mut rest) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    rest = rest.trim_start();
    let mut duration_ms = None;
    if matches!(action, Moderation::Ban | Moderation::Mute) {
        let (word, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        // A word that starts like a number is meant as a duration.
        if word.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+') {
            match parse_duration(word) {
                Some(ms) => duration_ms = Some(ms),
                None => {
                    return usage(&format!(
                        "/{name} USER [DURATION] [REASON], DURATION a whole number \
                         with s, m, h or d (10m, 2h, 7d), not {word:?}"
                    ))
                }
            }
            rest = after.trim_start();
        }
    }
    let reason = (!rest.is_empty()).then(|| rest.to_owned());
    match (action, reason) {
        (Moderation::Unban | Moderation::Unmute, Some(_)) => usage(&format!("/{name} USER")),
        (action, reason) => Ok(LineCommand::Moderate {
            hub,
            action,
            user: user.to_owned(),
            duration_ms,
            reason,
        }),
    }
}

/// `[private] [TEXT]`: whether the first word is `private`, and the text.
fn private_then_text(rest: &str) -> (bool, Option<String>) {
    let rest = rest.trim();
    let (first, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let (private, text) = if first.eq_ignore_ascii_case("private") {
        (true, after.trim())
    } else {
        (false, rest)
    };
    (private, (!text.is_empty()).then(|| text.to_owned()))
}

/// `/hub HUB`, `/hub create|join|leave HUB …`, and moderation in a hub:
/// `/hub kick|ban|mute|unban|unmute|bans|role HUB …`.
fn hub_command(rest: &str) -> Result<LineCommand, Usage> {
    let usage = |u: &str| Err(Usage(format!("usage: {u}")));
    let mut words = rest.split_whitespace();
    let (Some(first), second) = (words.next(), words.next()) else {
        return usage("/hub HUB, or /hub create|join|leave HUB; /help lists the rest");
    };
    let after_hub = || {
        let rest = rest.trim_start()[first.len()..].trim_start();
        rest.split_once(char::is_whitespace)
            .map_or("", |(_, r)| r.trim_start())
    };
    let hub = second.map(str::to_owned);
    match (first.to_ascii_lowercase().as_str(), hub) {
        (name, None) if !["create", "join", "leave", "bans"].contains(&name) => {
            Ok(LineCommand::HubShow(first.to_owned()))
        }
        ("create", Some(hub)) => {
            let (private, title) = private_then_text(after_hub());
            Ok(LineCommand::HubCreate {
                hub,
                private,
                title,
            })
        }
        ("join", Some(hub)) => match words.next() {
            invite if words.next().is_none() => Ok(LineCommand::HubJoin {
                hub,
                invite: invite.map(str::to_owned),
            }),
            _ => usage("/hub join HUB [CODE]"),
        },
        ("leave", Some(hub)) if words.next().is_none() => Ok(LineCommand::HubLeave(hub)),
        ("bans", Some(hub)) if words.next().is_none() => Ok(LineCommand::Bans(Some(hub))),
        ("role", Some(hub)) => role(Some(hub), &mut words),
        (action @ ("kick" | "ban" | "mute" | "unban" | "unmute"), Some(hub))
            if !after_hub().is_empty() =>
        {
            moderate(action, after_hub(), Some(hub))
        }
        (action, _) => usage(&format!("/hub {action} HUB …; /help lists the forms")),
    }
}

/// Request ids the line transport uses, so that [`format_reply`] knows what
/// a reply answers.
pub mod context {
    pub const AUTH: &str = "auth";
    pub const JOIN: &str = "join";
    pub const LEAVE: &str = "leave";
    pub const ROOMS: &str = "rooms";
    pub const WHO: &str = "who";
    pub const SAY: &str = "say";
    pub const TOPIC_SET: &str = "topic";
    /// A `join` of the current room, to show its topic.
    pub const TOPIC_SHOW: &str = "topic?";
    pub const HISTORY: &str = "history";
    /// `bans` of the place (`#room`, `hub NAME`) named after it.
    pub const BANS: &str = "bans";
    /// A request whose `ok` is shown as the text after this prefix.
    pub const DONE: &str = "done:";
}

/// A chat line for a message: `[room #seq] user: body`, or
/// `[dm #seq] user: body` in a direct conversation; the seq is what `/edit`
/// and `/delete` name. Each line of a multi-line body gets the prefix. An
/// edit reads `user edited #seq: body`, a deletion `user deleted #seq`, a
/// deleted message (in history) `user: (deleted)`.
pub fn format_message(m: &Message, out: &mut String) {
    let room = if m.room.starts_with("dm:") {
        "dm"
    } else {
        &m.room
    };
    let prefix = format!("[{room} #{}] {}", m.seq, m.user);
    if let Some(seq) = m.delete {
        let _ = writeln!(out, "{prefix} deleted #{seq}");
        return;
    }
    let what = match (m.edit, m.deleted || m.body.is_empty(), m.edited_ts) {
        (_, true, _) => {
            let _ = writeln!(out, "{prefix}: (deleted)");
            return;
        }
        (Some(seq), _, _) => format!(" edited #{seq}"),
        (None, _, Some(_)) => " (edited)".to_owned(),
        (None, _, None) => String::new(),
    };
    for part in m.body.split('\n') {
        let _ = writeln!(out, "{prefix}{what}: {part}");
    }
}

/// An event as lines; empty for events a terminal does not show (typing,
/// read markers: they would only be noise).
pub fn format_event(event: &Event) -> Bytes {
    let mut out = String::new();
    match event {
        Event::Hello { .. } | Event::Typing { .. } | Event::Read { .. } => {}
        Event::Message(m) => format_message(m, &mut out),
        Event::Joined { room, user } => {
            let _ = writeln!(out, "* {user} joined #{room}");
        }
        Event::Left { room, user } => {
            let _ = writeln!(out, "* {user} left #{room}");
        }
        Event::Topic { room, topic, user } => {
            let _ = writeln!(out, "* {user} set the topic of #{room}: {topic}");
        }
        Event::Notice { text } => {
            for part in text.split('\n') {
                let _ = writeln!(out, "* notice: {part}");
            }
        }
        Event::Presence { user, online } => {
            let state = if *online { "online" } else { "offline" };
            let _ = writeln!(out, "* {user} is {state}");
        }
        Event::Role {
            place,
            user,
            role,
            by,
        } => {
            let _ = writeln!(
                out,
                "* {by} made {user} {} of {}",
                role.as_str(),
                place.label()
            );
        }
        Event::HubJoined { hub, user } => {
            let _ = writeln!(out, "* {user} joined hub {hub}");
        }
        Event::HubLeft { hub, user } => {
            let _ = writeln!(out, "* {user} left hub {hub}");
        }
        Event::Channel {
            room,
            topic,
            private,
            ..
        } => {
            let private = if *private { "private " } else { "" };
            let _ = write!(out, "* new {private}channel #{room}");
            if !topic.is_empty() {
                let _ = write!(out, ": {topic}");
            }
            out.push('\n');
        }
        Event::Kicked { place, by, reason } => {
            let _ = write!(out, "* {by} put you out of {}", place.label());
            if !reason.is_empty() {
                let _ = write!(out, ": {reason}");
            }
            out.push('\n');
        }
        Event::Shutdown {
            reason,
            reconnect_ms,
        } => {
            let _ = writeln!(
                out,
                "* {reason}; try again in {} s",
                reconnect_ms.div_ceil(1000)
            );
        }
    }
    Bytes::from(out)
}

/// A reply as lines. Errors are `! code: message`; what an `ok` shows
/// depends on the request, named by the reply's id (see [`context`]).
pub fn format_reply(reply: &Reply) -> Bytes {
    let mut out = String::new();
    let ctx = match &reply.id {
        Some(RequestId::Str(s)) => s.as_str(),
        _ => "",
    };
    match &reply.result {
        Err(e) => {
            let _ = write!(out, "! {}: {}", e.code.as_str(), e.message);
            if let Some(ms) = e.retry_after_ms {
                let _ = write!(out, " (retry in {ms} ms)");
            }
            out.push('\n');
        }
        Ok(body) => format_ok(ctx, body, &mut out),
    }
    Bytes::from(out)
}

fn format_ok(ctx: &str, body: &OkBody, out: &mut String) {
    match body {
        OkBody::Auth { user, .. } => {
            let _ = writeln!(out, "* you are {user}; /join ROOM to talk, /help for more");
        }
        OkBody::Joined { room, topic, .. } if ctx == context::TOPIC_SHOW => {
            let _ = match topic.as_str() {
                "" => writeln!(out, "* #{room} has no topic"),
                t => writeln!(out, "* topic of #{room}: {t}"),
            };
        }
        OkBody::Joined {
            room,
            topic,
            members,
            members_more,
            ..
        } => {
            let _ = writeln!(out, "* now talking in #{room}");
            if !topic.is_empty() {
                let _ = writeln!(out, "* topic: {topic}");
            }
            let _ = writeln!(out, "* members: {}", member_list(members));
            if *members_more {
                let _ = writeln!(out, "* and more: the first {} are shown", members.len());
            }
        }
        OkBody::Members { members, more } => {
            let room = ctx.strip_prefix(context::WHO).unwrap_or("").trim();
            let _ = writeln!(out, "* in #{room}: {}", member_list(members));
            if *more {
                let _ = writeln!(out, "* and more: the first {} are shown", members.len());
            }
        }
        OkBody::Rooms { rooms, more } => {
            if rooms.is_empty() {
                let _ = writeln!(out, "* no rooms yet: /join ROOM creates one");
            }
            for r in rooms {
                let name = r
                    .room
                    .strip_prefix("dm:")
                    .map_or(format!("#{}", r.room), |pair| {
                        format!("dm with {}", pair.replace(':', " and "))
                    });
                let _ = write!(out, "* {name}: {} members", r.member_count);
                if r.unread > 0 {
                    let _ = write!(out, ", {} unread", r.unread);
                }
                if !r.topic.is_empty() {
                    let _ = write!(out, " - {}", r.topic);
                }
                out.push('\n');
            }
            if *more {
                let _ = writeln!(out, "* and more: the first {} are shown", rooms.len());
            }
        }
        OkBody::History { messages, more, .. } => {
            for m in messages {
                format_message(m, out);
            }
            if messages.is_empty() {
                out.push_str("* no messages yet\n");
            } else if *more {
                out.push_str("* older messages exist: /history N for more\n");
            }
        }
        OkBody::Done {} if ctx.starts_with(context::LEAVE) => {
            let room = ctx[context::LEAVE.len()..].trim();
            let _ = writeln!(out, "* you left #{room}");
        }
        OkBody::Bans { bans } => {
            let place = ctx.strip_prefix(context::BANS).unwrap_or("").trim();
            if bans.is_empty() {
                let _ = writeln!(out, "* nobody is banned or muted in {place}");
            }
            for b in bans {
                let _ = write!(out, "* {} {} by {}", b.user, b.kind.as_str(), b.by);
                match b.until_ts {
                    Some(ts) => {
                        let _ = write!(out, " until {ts}");
                    }
                    None => out.push_str(" for good"),
                }
                if !b.reason.is_empty() {
                    let _ = write!(out, ": {}", b.reason);
                }
                out.push('\n');
            }
        }
        OkBody::Hub(h) => {
            let private = if h.private { " (private)" } else { "" };
            let _ = write!(out, "* hub {}{private}", h.hub);
            if !h.title.is_empty() {
                let _ = write!(out, " - {}", h.title);
            }
            if let Some(role) = h.role {
                let _ = write!(out, "; you are {}", role.as_str());
            }
            out.push('\n');
            let channels: Vec<String> = h
                .channels
                .iter()
                .map(|c| match c.unread {
                    Some(n) if n > 0 => format!("#{} ({n} unread)", c.room),
                    Some(_) => format!("#{}", c.room),
                    None => format!("#{} (not joined)", c.room),
                })
                .collect();
            let _ = writeln!(out, "* channels: {}", channels.join(", "));
            let members: Vec<crate::types::Member> = h
                .members
                .iter()
                .map(|m| crate::types::Member {
                    user: m.user.clone(),
                    online: m.online,
                    role: m.role,
                })
                .collect();
            let _ = writeln!(out, "* members: {}", member_list(&members));
        }
        OkBody::Hubs { hubs } => {
            if hubs.is_empty() {
                let _ = writeln!(out, "* no hubs yet: /hub create NAME makes one");
            }
            for h in hubs {
                let _ = write!(out, "* hub {}: {} members", h.hub, h.member_count);
                if h.private {
                    out.push_str(", private");
                }
                if let Some(role) = h.role {
                    let _ = write!(out, ", you are {}", role.as_str());
                }
                if !h.title.is_empty() {
                    let _ = write!(out, " - {}", h.title);
                }
                out.push('\n');
            }
        }
        OkBody::Invite { code, expires_ts } => {
            let _ = write!(out, "* invite code: {code}");
            if let Some(ts) = expires_ts {
                let _ = write!(out, " (expires at {ts}, Unix ms)");
            }
            out.push('\n');
        }
        OkBody::Channel { room } => {
            let _ = writeln!(out, "* created #{room}");
        }
        OkBody::Done {} if ctx.starts_with(context::DONE) => {
            let _ = writeln!(out, "* {}", ctx[context::DONE.len()..].trim());
        }
        // The event that follows shows these (the echo, the topic).
        OkBody::Done {} | OkBody::Sent { .. } | OkBody::Pong | OkBody::Sync { .. } => {}
    }
}

fn member_list(members: &[crate::types::Member]) -> String {
    members
        .iter()
        .map(|m| {
            let role = (m.role != crate::types::Role::Member).then(|| m.role.as_str());
            let online = m.online.then_some("online");
            match (role, online) {
                (None, None) => m.user.clone(),
                (Some(a), None) | (None, Some(a)) => format!("{} ({a})", m.user),
                (Some(role), Some(online)) => format!("{} ({role}, {online})", m.user),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{ErrorBody, ErrorCode, Member, RoomEntry};

    fn decode_all(d: &mut LineDecoder, buf: &mut BytesMut) -> Vec<LineFrame> {
        std::iter::from_fn(|| d.decode(buf)).collect()
    }

    #[test]
    fn splits_lines_however_the_bytes_arrive() {
        let mut d = LineDecoder::new(64);
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in b"/join a\r\nhello\nsec".iter() {
            buf.extend_from_slice(&[*b]);
            frames.extend(decode_all(&mut d, &mut buf));
        }
        assert_eq!(
            frames,
            vec![
                LineFrame::Line("/join a".into()),
                LineFrame::Line("hello".into())
            ]
        );
        buf.extend_from_slice(b"ond\n\nthird\n");
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![
                LineFrame::Line("second".into()),
                LineFrame::Line(String::new()),
                LineFrame::Line("third".into())
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn over_long_lines_are_reported_once_and_dropped() {
        let mut d = LineDecoder::new(8);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"123456789");
        assert_eq!(decode_all(&mut d, &mut buf), vec![LineFrame::TooLong]);
        assert!(buf.is_empty(), "nothing of it is kept");
        for _ in 0..100 {
            assert!(d.room(&buf) <= 8);
            buf.extend_from_slice(b"xxxxxxxx");
            assert_eq!(decode_all(&mut d, &mut buf), vec![]);
            assert!(buf.is_empty());
        }
        buf.extend_from_slice(b"tail\nok\n");
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![LineFrame::Line("ok".into())]
        );
        // A long line that arrives whole, with its newline.
        buf.extend_from_slice(b"0123456789\nfine\n");
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![LineFrame::TooLong, LineFrame::Line("fine".into())]
        );
        // Exactly the limit is fine.
        buf.extend_from_slice(b"12345678\n");
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![LineFrame::Line("12345678".into())]
        );
        assert_eq!(d.room(&buf), 9);
    }

    #[test]
    fn invalid_utf8_is_its_own_frame() {
        let mut d = LineDecoder::new(64);
        let mut buf = BytesMut::from(&b"ok\n\xff\xfe\nnext\n"[..]);
        assert_eq!(
            decode_all(&mut d, &mut buf),
            vec![
                LineFrame::Line("ok".into()),
                LineFrame::BadUtf8,
                LineFrame::Line("next".into())
            ]
        );
    }

    #[test]
    fn durations_in_words() {
        assert_eq!(parse_duration("30s"), Some(30_000));
        assert_eq!(parse_duration("10m"), Some(600_000));
        assert_eq!(parse_duration("2h"), Some(7_200_000));
        assert_eq!(parse_duration("7d"), Some(604_800_000));
        assert_eq!(parse_duration("0m"), Some(0), "the server refuses it");
        for bad in [
            "",
            "m",
            "5",
            "5x",
            "-",
            "-5m",
            "+5m",
            "1.5h",
            "99999999999999999d",
            "5é",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn parses_commands() {
        use LineCommand::*;
        let cases = [
            ("PING", Ping(None)),
            ("PING abc", Ping(Some("abc".into()))),
            ("/help", Help),
            ("/nick Al", Nick("Al".into())),
            (
                "/register al secret12",
                Register {
                    user: "al".into(),
                    password: "secret12".into(),
                },
            ),
            (
                "/LOGIN al secret12",
                Login {
                    user: "al".into(),
                    password: "secret12".into(),
                },
            ),
            (
                "/register al correct horse battery",
                Register {
                    user: "al".into(),
                    password: "correct horse battery".into(),
                },
            ),
            (
                "/login  al  two spaces ",
                Login {
                    user: "al".into(),
                    password: " two spaces ".into(),
                },
            ),
            ("/join general", Join("general".into(), None)),
            (
                "/join club/inner c0de",
                Join("club/inner".into(), Some("c0de".into())),
            ),
            ("/hubs", Hubs { all: false }),
            ("/hubs all", Hubs { all: true }),
            ("/hub rust", HubShow("rust".into())),
            (
                "/hub create rust private Rust people",
                HubCreate {
                    hub: "rust".into(),
                    private: true,
                    title: Some("Rust people".into()),
                },
            ),
            (
                "/hub create rust",
                HubCreate {
                    hub: "rust".into(),
                    private: false,
                    title: None,
                },
            ),
            (
                "/hub join club c0de",
                HubJoin {
                    hub: "club".into(),
                    invite: Some("c0de".into()),
                },
            ),
            ("/hub leave rust", HubLeave("rust".into())),
            ("/hub bans rust", Bans(Some("rust".into()))),
            (
                "/hub ban rust eve 1d spam",
                Moderate {
                    hub: Some("rust".into()),
                    action: Moderation::Ban,
                    user: "eve".into(),
                    duration_ms: Some(86_400_000),
                    reason: Some("spam".into()),
                },
            ),
            (
                "/hub role rust bob admin",
                Role {
                    hub: Some("rust".into()),
                    user: "bob".into(),
                    role: crate::types::Role::Admin,
                },
            ),
            (
                "/channel rust/dev private Secret plans",
                ChannelCreate {
                    room: "rust/dev".into(),
                    private: true,
                    topic: Some("Secret plans".into()),
                },
            ),
            (
                "/invite rust bob",
                Invite {
                    place: "rust".into(),
                    user: Some("bob".into()),
                },
            ),
            ("/leave", Leave(None)),
            ("/leave x", Leave(Some("x".into()))),
            ("/rooms", Rooms { all: false }),
            ("/rooms all", Rooms { all: true }),
            ("/who", Who(None)),
            ("/who r", Who(Some("r".into()))),
            (
                "/msg bob hi there  you",
                Msg {
                    to: "bob".into(),
                    text: "hi there  you".into(),
                },
            ),
            ("/topic", Topic(None)),
            ("/topic Rust and tea", Topic(Some("Rust and tea".into()))),
            ("/history", History(None)),
            ("/history 5", History(Some(5))),
            (
                "/edit 12 fixed  text",
                Edit {
                    seq: 12,
                    text: "fixed  text".into(),
                },
            ),
            (
                "/edit #3 x",
                Edit {
                    seq: 3,
                    text: "x".into(),
                },
            ),
            ("/delete 7", Delete(7)),
            ("/delete #7", Delete(7)),
            (
                "/role bob Moderator",
                Role {
                    hub: None,
                    user: "bob".into(),
                    role: crate::types::Role::Moderator,
                },
            ),
            ("/bans", Bans(None)),
            (
                "/kick bob being rude",
                Moderate {
                    hub: None,
                    action: Moderation::Kick,
                    user: "bob".into(),
                    duration_ms: None,
                    reason: Some("being rude".into()),
                },
            ),
            (
                "/ban bob 2h spam",
                Moderate {
                    hub: None,
                    action: Moderation::Ban,
                    user: "bob".into(),
                    duration_ms: Some(7_200_000),
                    reason: Some("spam".into()),
                },
            ),
            (
                "/ban bob spam again",
                Moderate {
                    hub: None,
                    action: Moderation::Ban,
                    user: "bob".into(),
                    duration_ms: None,
                    reason: Some("spam again".into()),
                },
            ),
            (
                "/mute bob 30s",
                Moderate {
                    hub: None,
                    action: Moderation::Mute,
                    user: "bob".into(),
                    duration_ms: Some(30_000),
                    reason: None,
                },
            ),
            (
                "/unmute bob",
                Moderate {
                    hub: None,
                    action: Moderation::Unmute,
                    user: "bob".into(),
                    duration_ms: None,
                    reason: None,
                },
            ),
            ("/quit", Quit),
            ("/quit see you", Quit),
            ("hello /world", Say("hello /world".into())),
            ("//join is a command", Say("/join is a command".into())),
            ("PINGU", Say("PINGU".into())),
            ("   ", Nothing),
        ];
        for (line, expected) in cases {
            assert_eq!(parse(line), Ok(expected), "{line}");
        }
        for bad in [
            "/join",
            "/nick",
            "/msg bob",
            "/history x",
            "/history 0",
            "/rooms some",
            "/frobnicate",
            "/edit 3",
            "/edit x text",
            "/delete",
            "/delete -1",
            "/delete 1 2",
            "/role bob",
            "/role bob king",
            "/kick",
            "/ban bob -5m spam",
            "/ban bob 10y",
            "/mute bob 5",
            "/unban bob because",
            "/bans r",
            "/hub",
            "/hub join",
            "/hub create",
            "/hub ban rust",
            "/hub leave a b",
            "/hub role rust bob",
            "/channel",
            "/invite",
            "/invite a b c",
            "/join a b c",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse("/frob").unwrap_err().0,
            "unknown command /frob; /help lists them"
        );
    }

    #[test]
    fn fuzz_regressions() {
        // crash-261d191940e881395b77c05befcb0f86c508a386: words counted with
        // Unicode whitespace, split on ' ' only.
        assert_eq!(
            parse("/msg G\u{b}**"),
            Ok(LineCommand::Msg {
                to: "G".into(),
                text: "**".into()
            })
        );
        assert_eq!(
            parse("/msg bob\tsee\u{a0}you"),
            Ok(LineCommand::Msg {
                to: "bob".into(),
                text: "see\u{a0}you".into()
            })
        );
    }

    fn msg(room: &str, body: &str) -> Message {
        Message {
            room: room.into(),
            seq: 1,
            user: "alice".into(),
            body: body.into(),
            ts: 0,
            nonce: None,
            ..Message::default()
        }
    }

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn formats_events() {
        assert_eq!(
            text(format_event(&Event::Message(msg("general", "hello")))),
            "[general #1] alice: hello\n"
        );
        assert_eq!(
            text(format_event(&Event::Message(msg("dm:alice:bob", "hi")))),
            "[dm #1] alice: hi\n"
        );
        assert_eq!(
            text(format_event(&Event::Message(msg("r", "one\ntwo")))),
            "[r #1] alice: one\n[r #1] alice: two\n"
        );
        let edit = Message {
            seq: 2,
            edit: Some(1),
            ..msg("r", "fixed")
        };
        assert_eq!(
            text(format_event(&Event::Message(edit))),
            "[r #2] alice edited #1: fixed\n"
        );
        let delete = Message {
            seq: 3,
            delete: Some(1),
            ..msg("r", "")
        };
        assert_eq!(
            text(format_event(&Event::Message(delete))),
            "[r #3] alice deleted #1\n"
        );
        let mut shown = String::new();
        let edited = Message {
            edited_ts: Some(5),
            ..msg("r", "now")
        };
        format_message(&edited, &mut shown);
        let deleted = Message {
            deleted: true,
            ..msg("r", "")
        };
        format_message(&deleted, &mut shown);
        assert_eq!(
            shown,
            "[r #1] alice (edited): now\n[r #1] alice: (deleted)\n"
        );
        let role = Event::Role {
            place: crate::types::Place::room("r"),
            user: "bob".into(),
            role: crate::types::Role::Moderator,
            by: "alice".into(),
        };
        assert_eq!(
            text(format_event(&role)),
            "* alice made bob moderator of #r\n"
        );
        let kicked = Event::Kicked {
            place: crate::types::Place::room("r"),
            by: "alice".into(),
            reason: "spam".into(),
        };
        assert_eq!(
            text(format_event(&kicked)),
            "* alice put you out of #r: spam\n"
        );
        let from_hub = Event::Kicked {
            place: crate::types::Place::hub("rust"),
            by: "alice".into(),
            reason: String::new(),
        };
        assert_eq!(
            text(format_event(&from_hub)),
            "* alice put you out of hub rust\n"
        );
        let channel = Event::Channel {
            hub: "rust".into(),
            room: "rust/dev".into(),
            private: false,
            topic: "hacking".into(),
        };
        assert_eq!(
            text(format_event(&channel)),
            "* new channel #rust/dev: hacking\n"
        );
        let joined = Event::Joined {
            room: "r".into(),
            user: "bob".into(),
        };
        assert_eq!(text(format_event(&joined)), "* bob joined #r\n");
        let presence = Event::Presence {
            user: "bob".into(),
            online: false,
        };
        assert_eq!(text(format_event(&presence)), "* bob is offline\n");
        let typing = Event::Typing {
            room: "r".into(),
            user: "bob".into(),
        };
        assert!(format_event(&typing).is_empty());
    }

    #[test]
    fn formats_replies() {
        let err = Reply {
            id: Some(RequestId::Str(context::SAY.into())),
            result: Err(ErrorBody::new(ErrorCode::RateLimited, "slow down")),
        };
        assert_eq!(text(format_reply(&err)), "! rate_limited: slow down\n");
        let who = Reply {
            id: Some(RequestId::Str(format!("{} r", context::WHO))),
            result: Ok(OkBody::Members {
                members: vec![
                    Member {
                        user: "a".into(),
                        online: true,
                        role: crate::types::Role::Owner,
                    },
                    Member {
                        user: "b".into(),
                        online: false,
                        role: crate::types::Role::Member,
                    },
                ],
                more: true,
            }),
        };
        assert_eq!(
            text(format_reply(&who)),
            "* in #r: a (owner, online), b\n* and more: the first 2 are shown\n"
        );
        let rooms = Reply {
            id: Some(RequestId::Str(context::ROOMS.into())),
            result: Ok(OkBody::Rooms {
                rooms: vec![RoomEntry {
                    room: "dm:alice:bob".into(),
                    topic: String::new(),
                    member_count: 2,
                    last_seq: 3,
                    unread: 1,
                }],
                more: false,
            }),
        };
        assert_eq!(
            text(format_reply(&rooms)),
            "* dm with alice and bob: 2 members, 1 unread\n"
        );
        let sent = Reply {
            id: Some(RequestId::Str(context::SAY.into())),
            result: Ok(OkBody::Sent {
                room: "r".into(),
                seq: 1,
                ts: 0,
            }),
        };
        assert!(format_reply(&sent).is_empty(), "the echo shows it");
    }
}

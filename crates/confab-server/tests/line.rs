//! The line protocol over raw TCP, and its users meeting WebSocket users.

use confab_testkit::confab_server::Durability;
use confab_testkit::confab_server::RateLimits;
use confab_testkit::serde_json::json;
use confab_testkit::{
    count_messages_in_order, flood_until_cut_off, password, LineClient, TestServer,
};

/// A line client logged in as guest `name`, in room `room`.
async fn guest_in(server: &TestServer, name: &str, room: &str) -> LineClient {
    let mut c = server.line_client().await;
    c.say(&format!("/nick {name}")).await;
    c.say(&format!("/join {room}")).await;
    c
}

#[tokio::test]
async fn greeting_ping_help_and_errors_before_login() {
    let server = TestServer::spawn().await;
    let mut c = server.line_client().await;
    assert!(
        c.greeting.starts_with("* welcome to confab 0.1.0"),
        "{}",
        c.greeting
    );
    c.send("PING").await;
    assert_eq!(c.line().await, "PONG");
    c.send("PING 12345").await;
    assert_eq!(c.line().await, "PONG 12345");
    let help = c.say("/help").await;
    assert!(
        help.len() > 10 && help.iter().all(|l| l.starts_with("* ")),
        "{help:?}"
    );
    assert!(help.iter().any(|l| l.contains("/msg USER TEXT")));
    assert_eq!(
        c.say("/join general").await,
        ["! unauthorized: log in first: register, login, guest or resume"]
    );
    assert_eq!(
        c.say("/frobnicate").await,
        ["! bad_request: unknown command /frobnicate; /help lists them"]
    );
    assert_eq!(c.say("/join").await, ["! bad_request: usage: /join ROOM"]);
    assert_eq!(
        c.say("").await,
        Vec::<String>::new(),
        "a blank line is nothing"
    );
}

#[tokio::test]
async fn every_command() {
    let server = TestServer::spawn().await;
    let mut c = server.line_client().await;
    assert_eq!(
        c.say("/register Lena secret-pw").await,
        ["* you are Lena; /join ROOM to talk, /help for more"]
    );
    assert_eq!(
        c.say("hello?").await,
        ["! bad_request: you are not in a room: /join ROOM first"]
    );
    assert_eq!(
        c.say("/join General").await,
        [
            "* now talking in #general",
            "* members: Lena (owner, online)"
        ]
    );
    assert_eq!(
        c.say("hello, room").await,
        ["[general #1] Lena: hello, room"]
    );
    assert_eq!(
        c.say("//slash at the start").await,
        ["[general #2] Lena: /slash at the start"]
    );
    assert_eq!(c.say("/topic").await, ["* #general has no topic"]);
    assert_eq!(
        c.say("/topic Rust and tea").await,
        ["* Lena set the topic of #general: Rust and tea"]
    );
    assert_eq!(c.say("/topic").await, ["* topic of #general: Rust and tea"]);
    assert_eq!(c.say("/who").await, ["* in #general: Lena (owner, online)"]);
    assert_eq!(
        c.say("/rooms").await,
        ["* #general: 1 members, 2 unread - Rust and tea"]
    );
    assert_eq!(
        c.say("/history").await,
        [
            "[general #1] Lena: hello, room",
            "[general #2] Lena: /slash at the start"
        ]
    );
    assert_eq!(
        c.say("/history 1").await,
        [
            "[general #2] Lena: /slash at the start",
            "* older messages exist: /history N for more"
        ]
    );
    c.say("/join side").await;
    assert_eq!(
        c.say("in side").await,
        ["[side #1] Lena: in side"],
        "/join switches rooms"
    );
    assert_eq!(
        c.say("/who general").await,
        ["* in #general: Lena (owner, online)"]
    );
    assert_eq!(
        c.say("/rooms all").await,
        [
            "* #general: 1 members, 2 unread - Rust and tea",
            "* #side: 1 members, 1 unread"
        ]
    );
    assert_eq!(c.say("/leave general").await, ["* you left #general"]);
    assert_eq!(
        c.say("still in side").await,
        ["[side #2] Lena: still in side"]
    );
    assert_eq!(c.say("/leave").await, ["* you left #side"]);
    assert_eq!(
        c.say("nowhere").await,
        ["! bad_request: you are not in a room: /join ROOM first"]
    );
    assert_eq!(
        c.say("/msg nobody hi").await,
        ["! not_found: no user named nobody"]
    );
    assert_eq!(
        c.say("/history 0").await,
        ["! bad_request: usage: /history [N], N a positive number"]
    );
    c.send("/quit bye all").await;
    assert_eq!(c.until_closed().await, ["* bye"]);

    // The account works from another line connection.
    let mut again = server.line_client().await;
    assert_eq!(
        again.say("/login lena wrong-password").await,
        ["! unauthorized: unknown user or wrong password"]
    );
    assert_eq!(
        again.say("/login lena secret-pw").await,
        ["* you are Lena; /join ROOM to talk, /help for more"]
    );
    assert_eq!(again.say("/nick other").await.len(), 1, "already logged in");
}

#[tokio::test]
async fn framing_survives_what_tcp_does() {
    let server = TestServer::spawn().await;
    let mut c = guest_in(&server, "bytes", "r").await;
    // One byte at a time.
    for b in b"one byte at a time\r\n" {
        c.write_raw(&[*b]).await;
    }
    assert_eq!(c.line().await, "[r #1] bytes: one byte at a time");
    // Many lines in one write.
    c.write_raw(b"first\nsecond\r\nthird\n").await;
    assert_eq!(
        c.pending().await,
        [
            "[r #2] bytes: first",
            "[r #3] bytes: second",
            "[r #4] bytes: third"
        ]
    );
    // Invalid UTF-8.
    c.write_raw(b"bad \xff\xfe bytes\n").await;
    assert_eq!(
        c.pending().await,
        ["! bad_request: the line is not valid UTF-8; it was discarded"]
    );
    // A megabyte without a newline: refused as soon as it passes the limit,
    // discarded up to its end, and the connection goes on.
    let mega = vec![b'x'; 1024 * 1024];
    for chunk in mega.chunks(64 * 1024) {
        c.write_raw(chunk).await;
    }
    c.write_raw(b"\nafter the flood\n").await;
    assert_eq!(
        c.pending().await,
        [
            "! too_large: a line has at most 8192 bytes; this one was discarded",
            "[r #5] bytes: after the flood"
        ]
    );
    // A body over the message limit but under the line limit.
    let long = "y".repeat(5000);
    assert_eq!(
        c.say(&long).await,
        ["! too_large: the body has 5000 bytes; at most 4096 are allowed"]
    );
}

#[tokio::test]
async fn line_and_websocket_users_talk() {
    let server = TestServer::spawn().await;
    let mut web = server.client().await;
    web.register("webby").await;
    web.join("mixed").await;

    let mut term = server.line_client().await;
    term.say("/register termy secret-pw").await;
    assert_eq!(
        term.say("/join mixed").await,
        [
            "* now talking in #mixed",
            "* members: termy (online), webby (owner, online)"
        ]
    );
    assert_eq!(web.event_of("joined").await["user"], "termy");

    // Line to WebSocket.
    term.say("hello from a terminal").await;
    let m = web.event_of("message").await;
    assert_eq!(
        (m["user"].as_str(), m["body"].as_str()),
        (Some("termy"), Some("hello from a terminal"))
    );
    // WebSocket to line.
    web.send("mixed", "hello from a browser").await;
    assert_eq!(
        web.event_of("message").await["body"],
        "hello from a browser"
    );
    assert_eq!(
        term.pending().await,
        ["[mixed #2] webby: hello from a browser"]
    );
    // Direct messages, both ways.
    term.say("/msg webby just you and me").await;
    let dm = web.event_of("message").await;
    assert_eq!(dm["room"], "dm:termy:webby");
    assert_eq!(dm["body"], "just you and me");
    web.ok(json!({"type":"dm","to":"termy","body":"got it"}))
        .await;
    assert_eq!(term.pending().await, ["[dm #2] webby: got it"]);
    // Topics, typing (not shown), presence, leaves.
    web.ok(json!({"type":"topic","room":"mixed","topic":"mixed company"}))
        .await;
    web.ok(json!({"type":"typing","room":"mixed"})).await;
    assert_eq!(
        term.pending().await,
        ["* webby set the topic of #mixed: mixed company"]
    );
    web.ok(json!({"type":"leave","room":"mixed"})).await;
    assert_eq!(term.pending().await, ["* webby left #mixed"]);
    web.join("mixed").await;
    assert_eq!(term.pending().await, ["* webby joined #mixed"]);
    drop(web);
    assert_eq!(term.line().await, "* webby is offline");
    let mut web = server.client().await;
    web.login("webby").await;
    assert_eq!(term.pending().await, ["* webby is online"]);

    // The terminal user's account works over WebSocket, with its history.
    let mut term_on_web = server.client().await;
    let r = term_on_web
        .ok(json!({"type":"login","user":"TERMY","password":"secret-pw"}))
        .await;
    assert_eq!(r["user"], "termy");
    let h = term_on_web
        .ok(json!({"type":"history","room":"mixed"}))
        .await;
    assert_eq!(h["messages"][0]["body"], "hello from a terminal");
    // And a web account works on the line.
    let mut web_on_line = server.line_client().await;
    let pw = password("webby");
    assert_eq!(
        web_on_line.say(&format!("/login webby {pw}")).await,
        ["* you are webby; /join ROOM to talk, /help for more"]
    );
}

#[tokio::test]
async fn a_slow_line_reader_is_cut_off_with_a_last_line() {
    let server = TestServer::with_config(|c| {
        c.chat.outbound_queue = 8;
        // A flood on purpose: no rate limits, and commits that survive a
        // process crash are enough.
        c.chat.rate_limits = RateLimits::off();
        c.database.set_durability(Durability::Normal);
    })
    .await;
    let mut slow = guest_in(&server, "slow", "firehose").await;
    let mut fast = server.client().await;
    fast.guest("fast").await;
    fast.join("firehose").await;
    let mut sender = server.client().await;
    sender.guest("sender").await;
    sender.join("firehose").await;

    // The fast member reads as the messages come, while the sender floods
    // until the slow reader is cut off, still not reading.
    let fast_reader = count_messages_in_order(fast);
    let sent = flood_until_cut_off(&mut sender, "firehose", "slow").await;
    assert_eq!(fast_reader.await.unwrap(), sent + 1);
    let lines = slow.until_closed().await;
    assert_eq!(
        lines.last().map(String::as_str),
        Some("! slow_consumer: you are not reading fast enough; disconnecting")
    );
}

#[tokio::test]
async fn a_password_with_spaces_works_from_a_terminal() {
    let server = TestServer::spawn().await;
    // Registered on the web, with spaces inside and at the end.
    let mut web = server.client().await;
    web.ok(json!({"type":"register","user":"spacey","password":"correct horse battery "}))
        .await;
    let mut term = server.line_client().await;
    assert_eq!(
        term.say("/login spacey correct horse battery").await,
        ["! unauthorized: unknown user or wrong password"],
        "the trailing space is part of the password"
    );
    assert_eq!(
        term.say("/login spacey correct horse battery ").await,
        ["* you are spacey; /join ROOM to talk, /help for more"]
    );
    // Registered on the line, used on the web.
    let mut other = server.line_client().await;
    assert_eq!(
        other.say("/register staple two words here").await,
        ["* you are staple; /join ROOM to talk, /help for more"]
    );
    server
        .client()
        .await
        .ok(json!({"type":"login","user":"staple","password":"two words here"}))
        .await;
    assert_eq!(
        other.say("/register").await,
        ["! bad_request: usage: /register NAME PASSWORD"]
    );
}

#[tokio::test]
async fn an_idle_terminal_is_warned_then_closed_and_goes_offline() {
    let server = TestServer::with_config(|c| {
        c.line_idle = Some(std::time::Duration::from_millis(1200));
    })
    .await;
    let mut web = server.client().await;
    web.register("watcher").await;
    web.join("lobby").await;
    let mut term = guest_in(&server, "dozy", "lobby").await;
    assert_eq!(web.event_of("joined").await["user"], "dozy");
    // Any input, even an empty line, starts the clock over: an empty line
    // every 300 ms for two idle periods draws no warning. (The pauses are
    // the subject here, and leave 800 ms of slack on a loaded machine.)
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(300));
    for _ in 0..8 {
        tick.tick().await;
        term.send("").await;
    }
    assert_eq!(term.pending().await, Vec::<String>::new(), "no warning");
    // Silent now: warned, then closed, and the room sees the guest go
    // offline and leave.
    let warning = "* you have been idle for 1100 ms; send anything (an empty line will do) within 100 ms to stay connected";
    assert_eq!(term.line().await, warning);
    assert_eq!(
        term.until_closed().await,
        ["* idle for 1200 ms: disconnecting"]
    );
    let presence = web.event_of("presence").await;
    assert_eq!(
        (presence["user"].as_str(), presence["online"].as_bool()),
        (Some("dozy"), Some(false))
    );
    assert_eq!(web.event_of("left").await["user"], "dozy");
}

#[tokio::test]
async fn terminals_edit_delete_and_moderate() {
    let server = TestServer::spawn().await;
    let mut boss = guest_in(&server, "boss", "den").await;
    let mut pest = guest_in(&server, "pest", "den").await;
    assert_eq!(boss.pending().await, ["* pest joined #den"]);
    // Chat lines carry the seq that /edit and /delete name.
    assert_eq!(pest.say("helo").await, ["[den #1] pest: helo"]);
    assert_eq!(
        pest.say("/edit 1 hello").await,
        ["[den #2] pest edited #1: hello"]
    );
    assert_eq!(
        boss.say("/edit 1 mine").await,
        [
            "[den #1] pest: helo",
            "[den #2] pest edited #1: hello",
            "! forbidden: message 1 is not yours: only its author edits it"
        ]
    );
    assert_eq!(
        pest.say("/history").await,
        [
            "[den #1] pest (edited): hello",
            "[den #2] pest edited #1: hello"
        ]
    );
    // The room's creator owns it: it deletes anyone's message.
    assert_eq!(boss.say("/delete #1").await, ["[den #3] boss deleted #1"]);
    assert_eq!(
        pest.say("/history").await,
        [
            "[den #3] boss deleted #1",
            "[den #1] pest: (deleted)",
            "[den #2] pest: (deleted)",
            "[den #3] boss deleted #1"
        ]
    );
    assert_eq!(
        pest.say("/mute boss").await,
        ["! forbidden: that needs the role moderator in den or higher"]
    );
    assert_eq!(
        boss.say("/mute pest 10m flooding").await,
        ["* pest is muted in #den for 10 minutes"]
    );
    let refused = pest.say("quiet now?").await;
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].starts_with("! forbidden: you are muted in den until "),
        "{refused:?}"
    );
    let bans = boss.say("/bans").await;
    assert_eq!(bans.len(), 1);
    assert!(
        bans[0].starts_with("* pest mute by boss until ") && bans[0].ends_with(": flooding"),
        "{bans:?}"
    );
    assert_eq!(
        boss.say("/unmute pest").await,
        ["* pest may speak in #den again"]
    );
    assert_eq!(
        boss.say("/role pest moderator").await,
        ["* boss made pest moderator of #den"]
    );
    assert_eq!(
        boss.say("/role pest king").await,
        ["! bad_request: usage: /role USER ROLE, ROLE one of member, moderator, admin, owner"]
    );
    assert_eq!(
        boss.say("/ban pest -5m").await,
        [
            "! bad_request: usage: /ban USER [DURATION] [REASON], DURATION a whole number \
          with s, m, h or d (10m, 2h, 7d), not \"-5m\""
        ]
    );
    assert_eq!(
        boss.say("/ban pest 1d spam").await,
        [
            "* pest is banned from #den for 24 hours",
            "* pest left #den"
        ]
    );
    let told = pest.pending().await;
    assert_eq!(
        told.last().map(String::as_str),
        Some("* boss put you out of #den: spam"),
        "{told:?}"
    );
    let refused = pest.say("/join den").await;
    assert!(
        refused.len() == 1 && refused[0].starts_with("! forbidden: you are banned from den until "),
        "{refused:?}"
    );
    assert_eq!(
        boss.say("/kick pest").await,
        ["! not_found: pest is not in den"]
    );
}

#[tokio::test]
async fn terminals_make_and_moderate_hubs() {
    let server = TestServer::spawn().await;
    let mut ann = server.line_client().await;
    ann.say("/register ann secret-pw").await;
    let mut bob = server.line_client().await;
    bob.say("/register bob secret-pw").await;
    assert_eq!(
        ann.say("/hubs all").await,
        ["* no hubs yet: /hub create NAME makes one"]
    );
    assert_eq!(ann.say("/hub create rust Rust people").await.len(), 3);
    // The hub's first channel is the current room.
    assert_eq!(
        ann.say("hello hub").await,
        ["[rust/general #1] ann: hello hub"]
    );
    assert_eq!(
        ann.say("/channel rust/dev hacking").await,
        ["* created #rust/dev", "* new channel #rust/dev: hacking"]
    );
    assert_eq!(
        bob.say("/hubs all").await,
        ["* hub rust: 1 members - Rust people"]
    );
    assert_eq!(
        bob.say("/hub join rust").await,
        [
            "* hub rust - Rust people; you are member",
            "* channels: #rust/dev, #rust/general (1 unread)",
            "* members: ann (owner, online), bob (online)"
        ]
    );
    assert_eq!(
        bob.say("in the hub").await,
        ["[rust/general #2] bob: in the hub"]
    );
    let seen = ann.pending().await;
    assert!(
        seen.contains(&"* bob joined hub rust".to_owned()),
        "{seen:?}"
    );
    assert_eq!(
        ann.say("/hub role rust bob moderator").await,
        ["* ann made bob moderator of hub rust"]
    );
    assert_eq!(
        ann.say("/hub mute rust bob 10m").await,
        ["* bob is muted in hub rust for 10 minutes"]
    );
    let refused = bob.say("quiet?").await;
    assert!(
        refused
            .last()
            .is_some_and(|l| l.starts_with("! forbidden: you are muted in rust/general until ")),
        "{refused:?}"
    );
    let bans = ann.say("/hub bans rust").await;
    assert!(
        bans.len() == 1 && bans[0].starts_with("* bob mute by ann until "),
        "{bans:?}"
    );
    assert_eq!(
        ann.say("/hub unmute rust bob").await,
        ["* bob may speak in hub rust again"]
    );
    // A private hub: an invite code lets bob in.
    ann.say("/hub create club private").await;
    let refused = bob.say("/hub join club").await;
    assert_eq!(
        refused,
        ["! forbidden: the hub club is private: it takes an invite"]
    );
    let invite = ann.say("/invite club bob").await;
    let code = invite[0]
        .strip_prefix("* invite code: ")
        .unwrap()
        .to_owned();
    assert_eq!(bob.say(&format!("/hub join club {code}")).await.len(), 3);
    assert_eq!(
        ann.pending().await,
        ["* bob joined hub club", "* bob joined #club/general"]
    );
    assert_eq!(
        ann.say("/hub kick club bob").await,
        [
            "* bob was put out of hub club",
            "* bob left hub club",
            "* bob left #club/general"
        ]
    );
    assert_eq!(
        bob.pending().await.last().map(String::as_str),
        Some("* ann put you out of hub club")
    );
    assert_eq!(bob.say("/hub leave rust").await, ["* you left hub rust"]);
    assert_eq!(
        ann.pending().await,
        [
            "* bob left hub rust",
            "* bob left #rust/dev",
            "* bob left #rust/general"
        ]
    );
    assert_eq!(
        ann.say("/hub leave rust").await,
        ["! forbidden: ann is the last owner of hub rust: make someone else owner first"]
    );
}

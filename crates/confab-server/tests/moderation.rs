//! Section 3 of the contract over the wire: roles, kicks, bans, mutes,
//! edits and deletions, on every store.

use std::time::Duration;

use confab_testkit::serde_json::{json, Value};
use confab_testkit::{Store, TestServer, WsClient};

async fn registered(server: &TestServer, user: &str) -> WsClient {
    let mut c = server.client().await;
    c.register(user).await;
    c
}

/// Make `user` a server operator, as `confab user op` does: through a
/// second handle on the server's database.
async fn make_operator(server: &TestServer, user: &str) {
    let store = confab_testkit::confab_server::open_store(&server.config)
        .await
        .unwrap();
    let name = confab_core::UserName::parse(user).unwrap();
    store.set_operator(&name, true).await.unwrap();
}

/// The next event of type `kind`, passing over others.
async fn next_of(c: &mut WsClient, kind: &str) -> Value {
    loop {
        let e = c.event().await;
        if e["type"] == kind {
            return e;
        }
    }
}

/// Who acts, in the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Actor {
    Outsider,
    Member,
    Moderator,
    Admin,
    Owner,
    Operator,
}

const ACTORS: [Actor; 6] = [
    Actor::Outsider,
    Actor::Member,
    Actor::Moderator,
    Actor::Admin,
    Actor::Owner,
    Actor::Operator,
];
const ROLES: [&str; 4] = ["member", "moderator", "admin", "owner"];
const ACTIONS: [&str; 7] = ["kick", "ban", "unban", "mute", "unmute", "role", "bans"];

impl Actor {
    fn user(self) -> &'static str {
        match self {
            Actor::Outsider => "outsider",
            Actor::Member => "a-member",
            Actor::Moderator => "a-moderator",
            Actor::Admin => "a-admin",
            Actor::Owner => "a-owner",
            Actor::Operator => "a-operator",
        }
    }

    /// The rank a role in the room gives (the operator's is the owner's).
    fn rank(self) -> Option<usize> {
        match self {
            Actor::Outsider => None,
            Actor::Member => Some(0),
            Actor::Moderator => Some(1),
            Actor::Admin => Some(2),
            Actor::Owner | Actor::Operator => Some(3),
        }
    }
}

/// What the contract says: the action's least role, and a role above the
/// target's, operators aside. `unban` acts on a user the ban put out of
/// the room (no role left), `bans` on nobody.
fn allowed(actor: Actor, action: &str, target: usize) -> bool {
    let needed = if action == "role" { 2 } else { 1 };
    let Some(rank) = actor.rank() else {
        return false;
    };
    if actor == Actor::Operator {
        return true;
    }
    rank >= needed && (matches!(action, "unban" | "bans") || rank > target)
}

async fn every_moderation_request_by_every_role_on_every_role(store: Store) {
    role_matrix(store, "room").await;
}

async fn the_same_in_hubs(store: Store) {
    role_matrix(store, "hub").await;
}

/// Every moderation request by every role on every role, in rooms or (the
/// `scope` being "hub") in hubs, where the same roles are the hub's.
async fn role_matrix(store: Store, scope: &str) {
    // 168 rooms or hubs, made by one user.
    let server = store
        .with_config(|c| c.chat.rate_limits = confab_core::RateLimits::off())
        .await;
    let mut actors = Vec::new();
    for actor in ACTORS {
        actors.push(registered(&server, actor.user()).await);
    }
    make_operator(&server, Actor::Operator.user()).await;
    let mut targets = Vec::new();
    for role in ROLES {
        targets.push(registered(&server, &format!("t-{role}")).await);
    }
    let mut checked = 0;
    for (n, action) in ACTIONS.iter().enumerate() {
        for (t, target_role) in ROLES.iter().enumerate() {
            for (a, actor) in ACTORS.iter().enumerate() {
                let room = format!("m{n}-{t}-{a}");
                let target = format!("t-{target_role}");
                // The owner creates the room; everyone with a role joins
                // and gets it from the owner (the operator is no member).
                let owner = 4;
                let enter = match scope {
                    "hub" => json!({"type":"hub_join","hub":room}),
                    _ => json!({"type":"join","room":room}),
                };
                if scope == "hub" {
                    actors[owner]
                        .ok(json!({"type":"hub_create","hub":room}))
                        .await;
                } else {
                    actors[owner].join(&room).await;
                }
                // `{"room": …}` or `{"hub": …}` with the rest of a request.
                let at = |mut request: Value| {
                    request[scope] = json!(room);
                    request
                };
                for (i, role) in ["member", "moderator", "admin"].iter().enumerate() {
                    actors[i + 1].ok(enter.clone()).await;
                    if *role != "member" {
                        let user = ACTORS[i + 1].user();
                        actors[owner]
                            .ok(at(json!({"type":"role","user":user,"role":role})))
                            .await;
                    }
                }
                targets[t].ok(enter.clone()).await;
                if *target_role != "member" {
                    actors[owner]
                        .ok(at(json!({"type":"role","user":target,"role":target_role})))
                        .await;
                }
                match *action {
                    "unban" | "unmute" => {
                        let kind = if *action == "unban" { "ban" } else { "mute" };
                        actors[5].ok(at(json!({"type":kind,"user":target}))).await;
                    }
                    _ => {}
                }
                let request = match *action {
                    "bans" => at(json!({"type":"bans"})),
                    // A role the admins may give, other than the target's.
                    "role" => {
                        let given = if *target_role == "member" {
                            "moderator"
                        } else {
                            "member"
                        };
                        at(json!({"type":"role","user":target,"role":given}))
                    }
                    action => at(json!({"type":action,"user":target})),
                };
                let reply = actors[a].request(request.clone()).await;
                let expected = allowed(*actor, action, t);
                let got = if reply["type"] == "ok" {
                    "ok"
                } else {
                    reply["code"].as_str().unwrap()
                };
                assert_eq!(
                    got,
                    if expected { "ok" } else { "forbidden" },
                    "{actor:?} {request} on a {target_role}: {reply}"
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, ACTIONS.len() * ROLES.len() * ACTORS.len());
}

async fn kicks_bans_and_mutes_hold_and_end(store: Store) {
    let server = store.spawn().await;
    let mut boss = registered(&server, "boss").await;
    let mut eve = registered(&server, "eve").await;
    let mut eve_phone = server.client().await;
    eve_phone.login("eve").await;
    let mut bob = registered(&server, "bob").await;
    boss.join("town").await;
    eve.join("town").await;
    bob.join("town").await;
    let members = boss.ok(json!({"type":"members","room":"town"})).await;
    assert_eq!(
        members["members"][0],
        json!({"user":"bob","online":true,"role":"member"})
    );
    assert_eq!(members["members"][1]["role"], "owner");

    // A kick: every connection of eve hears it, the others see her leave.
    boss.ok(json!({"type":"kick","room":"town","user":"EVE","reason":"cool off"}))
        .await;
    for c in [&mut eve, &mut eve_phone] {
        assert_eq!(
            next_of(c, "kicked").await,
            json!({"type":"kicked","room":"town","by":"boss","reason":"cool off"})
        );
    }
    let left = next_of(&mut bob, "left").await;
    assert_eq!(left, json!({"type":"left","room":"town","user":"eve"}));
    boss.send("town", "after the kick").await;
    eve.assert_no_event().await;
    assert_eq!(
        eve.error(json!({"type":"send","room":"town","body":"hey"}))
            .await,
        "forbidden"
    );
    // A kick is not a ban: she may come back.
    eve.join("town").await;
    assert_eq!(
        boss.error(json!({"type":"kick","room":"town","user":"nobody"}))
            .await,
        "not_found"
    );

    // A ban for good: out at once, refused at the door, after a restart too.
    boss.ok(json!({"type":"ban","room":"town","user":"eve","reason":"spam"}))
        .await;
    assert_eq!(next_of(&mut eve, "kicked").await["reason"], "spam");
    assert_eq!(
        eve.error(json!({"type":"join","room":"town"})).await,
        "forbidden"
    );
    let server = server.restart().await;
    let mut boss = server.client().await;
    boss.login("boss").await;
    let mut eve = server.client().await;
    eve.login("eve").await;
    assert_eq!(
        eve.error(json!({"type":"join","room":"town"})).await,
        "forbidden"
    );
    let bans = boss.ok(json!({"type":"bans","room":"town"})).await;
    assert_eq!(
        bans["bans"],
        json!([{"user":"eve","kind":"ban","by":"boss","reason":"spam","until_ts":null}])
    );
    boss.ok(json!({"type":"unban","room":"town","user":"eve"}))
        .await;
    assert_eq!(
        boss.error(json!({"type":"unban","room":"town","user":"eve"}))
            .await,
        "not_found",
        "nothing to lift"
    );
    eve.join("town").await;

    // A mute: she stays, but may not send or edit; it ends by itself.
    let seq = eve.send("town", "before").await;
    boss.ok(json!({"type":"mute","room":"town","user":"eve","duration_ms":60_000}))
        .await;
    assert_eq!(
        eve.error(json!({"type":"send","room":"town","body":"x"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        eve.error(json!({"type":"edit","room":"town","seq":seq,"body":"x"}))
            .await,
        "forbidden"
    );
    let until = boss.ok(json!({"type":"bans","room":"town"})).await["bans"][0]["until_ts"]
        .as_i64()
        .unwrap();
    assert!(until > 0);
    boss.ok(json!({"type":"mute","room":"town","user":"eve","duration_ms":1}))
        .await;
    // The one wait on a clock here: a mute of 1 ms has ended 20 ms later.
    tokio::time::sleep(Duration::from_millis(20)).await;
    eve.send("town", "free again").await;
    let bans = boss.ok(json!({"type":"bans","room":"town"})).await;
    assert_eq!(bans["bans"], json!([]), "ended ones are not listed");

    // A ban that ends lets the user back in.
    boss.ok(json!({"type":"ban","room":"town","user":"eve","duration_ms":1}))
        .await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    eve.join("town").await;

    // Bad input: clear errors, nothing applied.
    for (request, code) in [
        (
            json!({"type":"ban","room":"town","user":"eve","duration_ms":-5}),
            "bad_request",
        ),
        (
            json!({"type":"ban","room":"town","user":"eve","duration_ms":0}),
            "bad_request",
        ),
        (
            json!({"type":"mute","room":"town","user":"eve","duration_ms":i64::MAX}),
            "bad_request",
        ),
        (
            json!({"type":"ban","room":"town","user":"bad name"}),
            "bad_request",
        ),
        (
            json!({"type":"ban","room":"nowhere","user":"eve"}),
            "not_found",
        ),
        (
            json!({"type":"ban","room":"dm:boss:eve","user":"eve"}),
            "bad_request",
        ),
        (
            json!({"type":"role","room":"town","user":"eve","role":"king"}),
            "bad_request",
        ),
        (
            json!({"type":"role","room":"town","user":"ghost","role":"admin"}),
            "not_found",
        ),
        (
            json!({"type":"kick","room":"town","user":"eve","reason":"a\u{7}b"}),
            "bad_request",
        ),
    ] {
        assert_eq!(boss.error(request.clone()).await, code, "{request}");
    }
    let bans = boss.ok(json!({"type":"bans","room":"town"})).await;
    assert_eq!(bans["bans"], json!([]), "no refused request left a ban");
    eve.send("town", "still here").await;
}

async fn roles_are_given_by_the_rules(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut ben = registered(&server, "ben").await;
    let mut cat = registered(&server, "cat").await;
    ann.join("club").await;
    ben.join("club").await;
    cat.join("club").await;
    ann.ok(json!({"type":"role","room":"club","user":"ben","role":"admin"}))
        .await;
    let event = next_of(&mut cat, "role").await;
    assert_eq!(
        event,
        json!({"type":"role","room":"club","user":"ben","role":"admin","by":"ann"})
    );
    // An admin gives moderator, not admin or owner.
    ben.ok(json!({"type":"role","room":"club","user":"cat","role":"moderator"}))
        .await;
    for role in ["admin", "owner"] {
        assert_eq!(
            ben.error(json!({"type":"role","room":"club","user":"cat","role":role}))
                .await,
            "forbidden",
            "{role}"
        );
    }
    // The owner gives ownership; the last owner keeps it.
    assert_eq!(
        ann.error(json!({"type":"role","room":"club","user":"ann","role":"admin"}))
            .await,
        "forbidden",
        "nobody acts on an equal, themselves included"
    );
    ann.ok(json!({"type":"role","room":"club","user":"cat","role":"owner"}))
        .await;
    assert_eq!(
        cat.error(json!({"type":"role","room":"club","user":"ann","role":"member"}))
            .await,
        "forbidden",
        "owners do not demote owners"
    );
    // An operator may, down to the last owner.
    let mut op = registered(&server, "op").await;
    make_operator(&server, "op").await;
    op.ok(json!({"type":"role","room":"club","user":"ann","role":"member"}))
        .await;
    assert_eq!(
        op.error(json!({"type":"role","room":"club","user":"cat","role":"member"}))
            .await,
        "forbidden",
        "a room keeps its last owner"
    );
    op.ok(json!({"type":"kick","room":"club","user":"cat"}))
        .await;
    // A room without an owner gets one from an operator.
    op.ok(json!({"type":"role","room":"club","user":"ben","role":"owner"}))
        .await;
    let members = ben.ok(json!({"type":"members","room":"club"})).await;
    let roles: Vec<(&str, &str)> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["user"].as_str().unwrap(), m["role"].as_str().unwrap()))
        .collect();
    assert_eq!(roles, [("ann", "member"), ("ben", "owner")]);
}

fn bodies(page: &Value) -> Vec<Value> {
    page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            json!({"seq":m["seq"],"body":m.get("body"),"edit":m.get("edit"),
                   "delete":m.get("delete"),"deleted":m.get("deleted"),
                   "edited":m.get("edited_ts").is_some()})
        })
        .collect()
}

async fn edits_and_deletions_are_entries_of_the_log(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut bob = registered(&server, "bob").await;
    ann.join("pub").await;
    bob.join("pub").await;
    ann.send("pub", "helo wrold").await;
    let _ = bob.event_of("message").await;
    let edit = ann
        .ok(json!({"type":"edit","room":"pub","seq":1,"body":"hello world","nonce":"e-1"}))
        .await;
    assert_eq!(edit["seq"], 2);
    let event = bob.event_of("message").await;
    assert_eq!(
        (&event["seq"], &event["edit"], &event["body"]),
        (&json!(2), &json!(1), &json!("hello world"))
    );
    // Exactly once: the retry is the same entry, and no event goes out.
    let again = ann
        .ok(json!({"type":"edit","room":"pub","seq":1,"body":"hello world","nonce":"e-1"}))
        .await;
    assert_eq!((&again["seq"], &again["ts"]), (&edit["seq"], &edit["ts"]));
    bob.assert_no_event().await;
    // Only the author edits; the author or a moderator deletes.
    for (request, code) in [
        (
            json!({"type":"edit","room":"pub","seq":1,"body":"mine"}),
            "forbidden",
        ),
        (json!({"type":"delete","room":"pub","seq":1}), "forbidden"),
        (
            json!({"type":"edit","room":"pub","seq":2,"body":"x"}),
            "bad_request",
        ),
        (
            json!({"type":"edit","room":"pub","seq":99,"body":"x"}),
            "not_found",
        ),
        (
            json!({"type":"edit","room":"pub","seq":1,"body":""}),
            "bad_request",
        ),
        (
            json!({"type":"delete","room":"nowhere","seq":1}),
            "not_found",
        ),
    ] {
        assert_eq!(bob.error(request.clone()).await, code, "{request}");
    }
    assert_eq!(
        ann.error(json!({"type":"edit","room":"pub","seq":2,"body":"x"}))
            .await,
        "bad_request",
        "an edit entry is not edited"
    );
    let seq = bob.send("pub", "spam spam").await;
    assert_eq!(bob.event_of("message").await["seq"], seq, "the echo");
    // Ann owns the room: she deletes bob's message as a moderator would.
    let deleted = ann
        .ok(json!({"type":"delete","room":"pub","seq":seq}))
        .await;
    let event = bob.event_of("message").await;
    assert_eq!(event["delete"], seq);
    assert!(event.get("body").is_none(), "{event}");
    assert_eq!(event["seq"], deleted["seq"]);
    ann.ok(json!({"type":"delete","room":"pub","seq":1})).await;
    assert_eq!(
        ann.error(json!({"type":"edit","room":"pub","seq":1,"body":"back"}))
            .await,
        "not_found",
        "a deleted message"
    );
    assert_eq!(
        ann.error(json!({"type":"delete","room":"pub","seq":4}))
            .await,
        "bad_request",
        "a deletion is not deleted"
    );
    // History and sync show the log as it is now, with nothing of the
    // deleted text left.
    let page = bob.ok(json!({"type":"history","room":"pub"})).await;
    assert_eq!(
        bodies(&page),
        vec![
            json!({"seq":1,"body":null,"edit":null,"delete":null,"deleted":true,"edited":true}),
            json!({"seq":2,"body":null,"edit":1,"delete":null,"deleted":null,"edited":false}),
            json!({"seq":3,"body":null,"edit":null,"delete":null,"deleted":true,"edited":false}),
            json!({"seq":4,"body":null,"edit":null,"delete":3,"deleted":null,"edited":false}),
            json!({"seq":5,"body":null,"edit":null,"delete":1,"deleted":null,"edited":false}),
        ]
    );
    let text = page.to_string();
    assert!(!text.contains("helo") && !text.contains("hello") && !text.contains("spam"));
    let sync = bob.ok(json!({"type":"sync","cursors":{"pub":0}})).await;
    assert_eq!(bodies(&sync["rooms"][0]), bodies(&page));
    // An edit that stays shows its body and when it changed.
    let seq = bob.send("pub", "tpyo").await;
    bob.ok(json!({"type":"edit","room":"pub","seq":seq,"body":"typo"}))
        .await;
    let page = bob
        .ok(json!({"type":"history","room":"pub","after":5}))
        .await;
    assert_eq!(page["messages"][0]["body"], "typo");
    assert!(page["messages"][0]["edited_ts"].as_i64().unwrap() > 0);
}

async fn edits_and_deletions_in_direct_conversations(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut bob = registered(&server, "bob").await;
    let sent = ann
        .ok(json!({"type":"dm","to":"bob","body":"secret"}))
        .await;
    let room = sent["room"].as_str().unwrap().to_owned();
    let _ = bob.event_of("message").await;
    assert_eq!(
        bob.error(json!({"type":"delete","room":room,"seq":1}))
            .await,
        "forbidden",
        "nobody moderates a direct conversation"
    );
    ann.ok(json!({"type":"delete","room":room,"seq":1})).await;
    assert_eq!(bob.event_of("message").await["delete"], 1);
    let page = bob.ok(json!({"type":"history","room":room})).await;
    assert!(!page.to_string().contains("secret"));
}

confab_testkit::on_each_store!(
    every_moderation_request_by_every_role_on_every_role,
    the_same_in_hubs,
    kicks_bans_and_mutes_hold_and_end,
    roles_are_given_by_the_rules,
    edits_and_deletions_are_entries_of_the_log,
    edits_and_deletions_in_direct_conversations,
);

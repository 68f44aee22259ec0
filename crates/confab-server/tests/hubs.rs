//! Section 3 of the contract over the wire: hubs, their channels, invites,
//! and roles and moderation at the scale of a hub, on every store.

use confab_testkit::serde_json::{json, Value};
use confab_testkit::{Store, TestServer, WsClient};

async fn registered(server: &TestServer, user: &str) -> WsClient {
    let mut c = server.client().await;
    c.register(user).await;
    c
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

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v[key].as_str().unwrap().to_owned())
        .collect()
}

async fn hubs_channels_and_their_events(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut bob = registered(&server, "bob").await;

    let made = ann
        .ok(json!({"type":"hub_create","hub":"Rust","title":"Rustaceans"}))
        .await;
    assert_eq!(
        made,
        json!({"type":"ok","id":2,"hub":"rust","title":"Rustaceans","private":false,"role":"owner",
               "channels":[{"room":"rust/general","topic":"","private":false,"last_seq":0,"unread":0}],
               "members":[{"user":"ann","role":"owner","online":true}]})
    );
    assert_eq!(
        bob.error(json!({"type":"hub_create","hub":"rust"})).await,
        "conflict"
    );
    let mut guest = server.client().await;
    guest.guest("visitor").await;
    assert_eq!(
        guest
            .error(json!({"type":"hub_create","hub":"visits"}))
            .await,
        "forbidden"
    );
    for bad in ["", "a b", "rust/general", "-x"] {
        assert_eq!(
            ann.error(json!({"type":"hub_create","hub":bad})).await,
            "bad_request",
            "{bad:?}"
        );
    }

    // Bob finds it, joins, and is in its public channels.
    let all = bob.ok(json!({"type":"hubs","all":true})).await;
    assert_eq!(
        all["hubs"],
        json!([{"hub":"rust","title":"Rustaceans","private":false,"member_count":1,"role":null}])
    );
    let snapshot = bob.ok(json!({"type":"hub_join","hub":"rust"})).await;
    assert_eq!(snapshot["role"], "member");
    assert_eq!(snapshot["channels"][0]["unread"], 0);
    assert_eq!(
        next_of(&mut ann, "hub_joined").await,
        json!({"type":"hub_joined","hub":"rust","user":"bob"})
    );
    assert_eq!(
        next_of(&mut ann, "joined").await,
        json!({"type":"joined","room":"rust/general","user":"bob"})
    );
    let mine = bob.ok(json!({"type":"hubs"})).await;
    assert_eq!(mine["hubs"][0]["role"], "member");
    assert_eq!(mine["hubs"][0]["member_count"], 2);
    // A channel is a room: send, events, history, rooms.
    bob.send("rust/general", "hello hub").await;
    assert_eq!(next_of(&mut ann, "message").await["body"], "hello hub");
    let rooms = bob.ok(json!({"type":"rooms"})).await;
    assert_eq!(names(&rooms["rooms"], "room"), ["rust/general"]);

    // Only admins and owners make channels; members learn of them and are
    // in them at once.
    assert_eq!(
        bob.error(json!({"type":"channel_create","hub":"rust","channel":"dev"}))
            .await,
        "forbidden"
    );
    let made = ann
        .ok(json!({"type":"channel_create","hub":"rust","channel":"Dev","topic":"hacking"}))
        .await;
    assert_eq!(made["room"], "rust/dev");
    assert_eq!(
        next_of(&mut bob, "channel").await,
        json!({"type":"channel","hub":"rust","room":"rust/dev","private":false,"topic":"hacking"})
    );
    bob.send("rust/dev", "first in dev").await;
    assert_eq!(
        ann.error(json!({"type":"channel_create","hub":"rust","channel":"dev"}))
            .await,
        "conflict"
    );
    assert_eq!(
        ann.error(json!({"type":"channel_create","hub":"nope","channel":"x"}))
            .await,
        "not_found"
    );
    // In a channel, members do not set the topic; moderators do.
    assert_eq!(
        bob.error(json!({"type":"topic","room":"rust/dev","topic":"mine"}))
            .await,
        "forbidden"
    );
    ann.ok(json!({"type":"topic","room":"rust/dev","topic":"compilers"}))
        .await;
    // Channels take the hub; none is made by a join.
    let mut carol = registered(&server, "carol").await;
    assert_eq!(
        carol.error(json!({"type":"join","room":"rust/dev"})).await,
        "forbidden"
    );
    assert_eq!(
        ann.error(json!({"type":"join","room":"rust/nope"})).await,
        "not_found"
    );
    // The hub's roles are the channels' roles.
    ann.ok(json!({"type":"role","hub":"rust","user":"bob","role":"moderator"}))
        .await;
    assert_eq!(
        next_of(&mut bob, "role").await,
        json!({"type":"role","hub":"rust","user":"bob","role":"moderator","by":"ann"})
    );
    let members = bob.ok(json!({"type":"members","room":"rust/dev"})).await;
    assert_eq!(
        members["members"],
        json!([{"user":"ann","online":true,"role":"owner"},{"user":"bob","online":true,"role":"moderator"}])
    );
    bob.ok(json!({"type":"topic","room":"rust/dev","topic":"by a moderator"}))
        .await;

    // Leaving: the last owner stays; others leave every channel with it.
    assert_eq!(
        ann.error(json!({"type":"hub_leave","hub":"rust"})).await,
        "forbidden"
    );
    bob.ok(json!({"type":"hub_leave","hub":"rust"})).await;
    assert_eq!(next_of(&mut ann, "hub_left").await["user"], "bob");
    let rooms = bob.ok(json!({"type":"rooms"})).await;
    assert_eq!(rooms["rooms"], json!([]));
    assert_eq!(
        bob.error(json!({"type":"send","room":"rust/general","body":"x"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        bob.error(json!({"type":"hub_leave","hub":"rust"})).await,
        "forbidden"
    );
}

async fn private_hubs_and_channels_take_invites(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut carol = registered(&server, "carol").await;
    let mut dave = registered(&server, "dave").await;
    ann.ok(json!({"type":"hub_create","hub":"club","private":true}))
        .await;
    assert_eq!(
        carol.ok(json!({"type":"hubs","all":true})).await["hubs"],
        json!([]),
        "a private hub is not listed"
    );
    for request in [
        json!({"type":"hub_join","hub":"club"}),
        json!({"type":"hub","hub":"club"}),
        json!({"type":"hub_join","hub":"club","invite":"made-up"}),
    ] {
        assert_eq!(carol.error(request.clone()).await, "forbidden", "{request}");
    }
    // An invite for carol: hers, once.
    let invite = ann
        .ok(json!({"type":"invite","hub":"club","user":"Carol"}))
        .await;
    let code = invite["code"].as_str().unwrap().to_owned();
    assert_eq!(invite["expires_ts"], Value::Null);
    assert_eq!(
        dave.error(json!({"type":"hub_join","hub":"club","invite":code}))
            .await,
        "forbidden"
    );
    carol
        .ok(json!({"type":"hub_join","hub":"club","invite":code}))
        .await;
    // A shareable one that expires.
    let open = ann
        .ok(json!({"type":"invite","hub":"club","expires_ms":3_600_000}))
        .await;
    assert!(open["expires_ts"].as_i64().unwrap() > 0);
    dave.ok(json!({"type":"hub_join","hub":"club","invite":open["code"]}))
        .await;
    // Bad invites: clear errors.
    ann.join("plain").await;
    for (request, code) in [
        (
            json!({"type":"invite","hub":"club","expires_ms":-1}),
            "bad_request",
        ),
        (json!({"type":"invite","room":"plain"}), "bad_request"),
        (json!({"type":"invite","room":"nowhere"}), "not_found"),
        (
            json!({"type":"invite","room":"club/general"}),
            "bad_request",
        ),
        (json!({"type":"invite"}), "bad_request"),
        (
            json!({"type":"invite","hub":"club","room":"club/general"}),
            "bad_request",
        ),
        (json!({"type":"invite","hub":"nowhere"}), "not_found"),
    ] {
        assert_eq!(ann.error(request.clone()).await, code, "{request}");
    }
    assert_eq!(
        carol.error(json!({"type":"invite","hub":"club"})).await,
        "forbidden",
        "members do not invite"
    );

    // A private channel: seen and joined by invite only.
    ann.ok(json!({"type":"channel_create","hub":"club","channel":"inner","private":true}))
        .await;
    let seen = carol.ok(json!({"type":"hub","hub":"club"})).await;
    assert_eq!(names(&seen["channels"], "room"), ["club/general"]);
    // Who is in a private channel, or a private hub, is not for outsiders.
    assert_eq!(
        carol
            .error(json!({"type":"members","room":"club/inner"}))
            .await,
        "forbidden"
    );
    let mut erin = registered(&server, "erin").await;
    assert_eq!(
        erin.error(json!({"type":"members","room":"club/general"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        erin.error(json!({"type":"members","room":"nohub/general"}))
            .await,
        "not_found"
    );
    assert_eq!(
        carol
            .error(json!({"type":"join","room":"club/inner"}))
            .await,
        "forbidden"
    );
    let invite = ann
        .ok(json!({"type":"invite","room":"club/inner","user":"carol"}))
        .await;
    carol
        .ok(json!({"type":"join","room":"club/inner","invite":invite["code"]}))
        .await;
    let seen = carol.ok(json!({"type":"hub","hub":"club"})).await;
    assert_eq!(
        names(&seen["channels"], "room"),
        ["club/general", "club/inner"]
    );
    assert_eq!(names(&seen["members"], "user"), ["ann", "carol", "dave"]);
}

async fn moderation_at_the_scale_of_a_hub(store: Store) {
    let server = store.spawn().await;
    let mut ann = registered(&server, "ann").await;
    let mut eve = registered(&server, "eve").await;
    let mut mo = registered(&server, "mo").await;
    ann.ok(json!({"type":"hub_create","hub":"town"})).await;
    ann.ok(json!({"type":"channel_create","hub":"town","channel":"square"}))
        .await;
    eve.ok(json!({"type":"hub_join","hub":"town"})).await;
    mo.ok(json!({"type":"hub_join","hub":"town"})).await;

    // A mute in the hub holds in every channel.
    ann.ok(json!({"type":"mute","hub":"town","user":"mo"}))
        .await;
    for room in ["town/general", "town/square"] {
        assert_eq!(
            mo.error(json!({"type":"send","room":room,"body":"hm"}))
                .await,
            "forbidden",
            "{room}"
        );
    }
    let bans = ann.ok(json!({"type":"bans","hub":"town"})).await;
    assert_eq!(bans["bans"][0]["kind"], "mute");
    ann.ok(json!({"type":"unmute","hub":"town","user":"mo"}))
        .await;
    mo.send("town/square", "back").await;

    // A ban from the hub: out of the hub and every channel at once.
    ann.ok(json!({"type":"ban","hub":"town","user":"eve","reason":"trouble"}))
        .await;
    assert_eq!(
        next_of(&mut eve, "kicked").await,
        json!({"type":"kicked","hub":"town","by":"ann","reason":"trouble"})
    );
    assert_eq!(
        next_of(&mut mo, "hub_left").await,
        json!({"type":"hub_left","hub":"town","user":"eve"})
    );
    ann.send("town/square", "eve is gone").await;
    assert_eq!(next_of(&mut mo, "message").await["body"], "eve is gone");
    eve.assert_no_event().await;
    assert_eq!(eve.ok(json!({"type":"rooms"})).await["rooms"], json!([]));
    assert_eq!(
        eve.error(json!({"type":"hub_join","hub":"town"})).await,
        "forbidden"
    );
    // A kick from the hub: out, and free to come back.
    ann.ok(json!({"type":"kick","hub":"town","user":"mo"}))
        .await;
    assert_eq!(next_of(&mut mo, "kicked").await["hub"], "town");
    mo.ok(json!({"type":"hub_join","hub":"town"})).await;
    // A ban from one channel keeps the hub.
    ann.ok(json!({"type":"ban","room":"town/square","user":"mo"}))
        .await;
    assert_eq!(
        next_of(&mut mo, "kicked").await,
        json!({"type":"kicked","room":"town/square","by":"ann"})
    );
    mo.send("town/general", "still in the hub").await;
    assert_eq!(
        mo.error(json!({"type":"join","room":"town/square"})).await,
        "forbidden"
    );
}

confab_testkit::on_each_store!(
    hubs_channels_and_their_events,
    private_hubs_and_channels_take_invites,
    moderation_at_the_scale_of_a_hub,
);

//! The contract every [`Store`] backend passes. Each check takes a fresh,
//! empty store; [`store_contract_tests!`](crate::store_contract_tests)
//! turns them into one `#[tokio::test]` each for a backend's factory.

use std::collections::HashSet;

use confab_proto::{Role, SanctionKind};

use crate::names::HubName;

use super::*;

fn user(name: &str) -> UserName {
    UserName::parse(name).unwrap()
}

fn room(name: &str) -> RoomName {
    RoomName::parse(name).unwrap()
}

fn msg(r: &str, sender: &str, body: &str, nonce: Option<&str>) -> NewMessage {
    NewMessage {
        room: room(r),
        sender: user(sender),
        body: body.to_owned(),
        nonce: nonce.map(str::to_owned),
        ts: 1_700_000_000_000,
        direct: None,
        amend: None,
    }
}

/// A direct message from `sender` to `peer`, which opens their
/// conversation; `guests` says which of the two are guests.
fn direct(sender: &str, peer: &str, body: &str, guests: (bool, bool)) -> NewMessage {
    let (from, to) = (user(sender), user(peer));
    let mut m = msg("x", sender, body, None);
    m.room = RoomName::direct(&from, &to);
    m.direct = Some(DirectPeers {
        sender_guest: guests.0,
        peer: to,
        peer_guest: guests.1,
    });
    m
}

fn amend(r: &str, sender: &str, body: &str, amend: Amend) -> NewMessage {
    NewMessage {
        amend: Some(amend),
        ts: 1_700_000_000_500,
        ..msg(r, sender, body, None)
    }
}

fn delete(target: Seq, moderator: bool) -> Amend {
    Amend::Delete { target, moderator }
}

fn ban(u: &str, kind: SanctionKind, until_ts: Option<i64>) -> NewSanction {
    NewSanction {
        user: user(u),
        kind,
        by: user("mod"),
        reason: "spam".into(),
        until_ts,
    }
}

/// Generate a `#[tokio::test]` per contract check. `$make` is an expression
/// evaluating to a future of `(DynStore, guard)`; the guard (a temporary
/// directory, say) lives as long as the test.
#[macro_export]
macro_rules! store_contract_tests {
    ($make:expr) => {
        $crate::store_contract_tests!(optional async { Some($make.await) });
    };
    // `$make` evaluates to a future of `Option<(DynStore, guard)>`: `None`
    // skips the test (a backend whose server is not configured says why).
    (optional $make:expr) => {
        $crate::store_contract_tests!(@each $make;
            users_are_unique_without_regard_to_case,
            tokens_resolve_until_revoked,
            users_are_administered,
            deletions_are_logged_for_every_server,
            join_creates_rooms_and_memberships,
            leave_ends_membership,
            appends_number_messages_gaplessly,
            only_members_append,
            nonces_deduplicate_per_sender_and_room,
            direct_messages_open_the_conversation,
            history_pages_in_both_directions,
            read_markers_only_move_forward,
            rooms_lists_memberships_and_public_rooms,
            topics_are_set_by_members,
            guest_memberships_are_dropped,
            every_guest_membership_is_dropped_however_made,
            rooms_created_by_guests_go_when_empty,
            joins_follow_their_rules,
            rooms_and_members_come_in_pages,
            last_seqs_name_each_room,
            concurrent_appends_stay_gapless,
            queued_appends_keep_their_order,
            creators_own_rooms_and_roles_are_kept,
            operators_are_registered_users,
            bans_end_membership_and_refuse_joins,
            mutes_refuse_messages_until_they_end,
            edits_replace_the_body_in_place,
            deletions_leave_no_text_behind,
            edits_and_deletions_follow_the_rules,
            hubs_hold_channels_and_members,
            private_hubs_and_channels_take_invites,
            hub_bans_and_mutes_reach_its_channels,
            server_bans_are_kept_with_the_user,
            deleting_a_hub_removes_everything_of_it);
    };
    (@each $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test]
            async fn $name() {
                let Some((store, _guard)) = $make.await else {
                    return;
                };
                $crate::store::contract::$name(store).await;
            }
        )*
    };
}

pub async fn users_are_unique_without_regard_to_case(s: DynStore) {
    s.create_user(&user("Alice"), "hash-a").await.unwrap();
    let err = s.create_user(&user("aLICE"), "hash-b").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let rec = s.user(&user("ALICE")).await.unwrap().unwrap();
    assert_eq!(
        rec.name.as_str(),
        "Alice",
        "answers with the name as registered"
    );
    assert_eq!(rec.password_hash, "hash-a");
    assert_eq!(s.user(&user("bob")).await.unwrap(), None);
}

pub async fn tokens_resolve_until_revoked(s: DynStore) {
    s.create_user(&user("Alice"), "h").await.unwrap();
    let (t1, t2) = ([1u8; 32], [2u8; 32]);
    s.create_token(&user("Alice"), &t1).await.unwrap();
    s.create_token(&user("Alice"), &t2).await.unwrap();
    assert_eq!(
        s.token_user(&t1).await.unwrap().unwrap().name.as_str(),
        "Alice"
    );
    s.revoke_token(&t1).await.unwrap();
    assert_eq!(s.token_user(&t1).await.unwrap(), None);
    assert!(
        s.token_user(&t2).await.unwrap().is_some(),
        "other tokens live on"
    );
    assert_eq!(s.token_user(&[3u8; 32]).await.unwrap(), None);
}

pub async fn users_are_administered(s: DynStore) {
    s.create_user(&user("Bob"), "h1").await.unwrap();
    s.create_user(&user("alice"), "h2").await.unwrap();
    let names: Vec<_> = s
        .list_users()
        .await
        .unwrap()
        .iter()
        .map(|u| u.as_str().to_owned())
        .collect();
    assert_eq!(names, ["alice", "Bob"], "sorted without regard to case");

    s.create_token(&user("bob"), &[9; 32]).await.unwrap();
    s.set_password(&user("BOB"), "h3").await.unwrap();
    assert_eq!(
        s.user(&user("bob")).await.unwrap().unwrap().password_hash,
        "h3"
    );
    assert_eq!(
        s.token_user(&[9; 32]).await.unwrap(),
        None,
        "a new password revokes tokens"
    );

    s.create_token(&user("bob"), &[8; 32]).await.unwrap();
    s.join(&room("r"), &user("bob"), JoinRules::open(false))
        .await
        .unwrap();
    s.join(&room("r"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    s.append(msg("r", "bob", "kept", None)).await.unwrap();
    s.delete_user(&user("Bob")).await.unwrap();
    assert_eq!(s.user(&user("bob")).await.unwrap(), None);
    assert_eq!(s.token_user(&[8; 32]).await.unwrap(), None);
    assert_eq!(s.members(&room("r"), None, 1000).await.unwrap().len(), 1);
    let page = s
        .history(&room("r"), &user("alice"), Page::Latest, 5)
        .await
        .unwrap();
    assert_eq!(page.messages[0].body, "kept", "messages stay");
    assert!(matches!(
        s.delete_user(&user("bob")).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.set_password(&user("nobody"), "h").await,
        Err(StoreError::Invalid(_))
    ));
}

pub async fn deletions_are_logged_for_every_server(s: DynStore) {
    s.create_user(&user("early"), "h").await.unwrap();
    s.delete_user(&user("early")).await.unwrap();
    let start = s.removed_users(None).await.unwrap();
    assert!(start.users.is_empty(), "None starts from now");
    let none = s.removed_users(Some(start.cursor)).await.unwrap();
    assert_eq!(none, start, "nothing new");
    for name in ["Ann", "bob"] {
        s.create_user(&user(name), "h").await.unwrap();
    }
    s.set_password(&user("ann"), "h2").await.unwrap();
    s.delete_user(&user("ann")).await.unwrap();
    s.delete_user(&user("BOB")).await.unwrap();
    let later = s.removed_users(Some(start.cursor)).await.unwrap();
    let names: Vec<&str> = later.users.iter().map(|u| u.as_str()).collect();
    assert_eq!(names, ["Ann", "bob"], "in order, as registered");
    assert!(later.cursor > start.cursor);
    assert!(s
        .removed_users(Some(later.cursor))
        .await
        .unwrap()
        .users
        .is_empty());
}

pub async fn join_creates_rooms_and_memberships(s: DynStore) {
    let j = s
        .join(&room("general"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    assert_eq!(
        j,
        Joined {
            topic: String::new(),
            last_seq: 0,
            newly_joined: true
        }
    );
    let again = s
        .join(&room("general"), &user("Alice"), JoinRules::open(false))
        .await
        .unwrap();
    assert!(!again.newly_joined);
    s.join(&room("general"), &user("Bob"), JoinRules::open(false))
        .await
        .unwrap();
    let mut names: Vec<_> = s
        .members(&room("general"), None, 1000)
        .await
        .unwrap()
        .iter()
        .map(|(u, _)| u.as_str().to_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["Bob", "alice"]);
    assert_eq!(
        s.members(&room("nowhere"), None, 1000).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
}

pub async fn leave_ends_membership(s: DynStore) {
    s.join(&room("r"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    s.leave(&room("r"), &user("ALICE")).await.unwrap();
    assert!(s.members(&room("r"), None, 1000).await.unwrap().is_empty());
    assert_eq!(
        s.leave(&room("r"), &user("alice")).await.unwrap_err(),
        StoreError::NotMember
    );
    assert_eq!(
        s.leave(&room("nowhere"), &user("alice")).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
}

pub async fn appends_number_messages_gaplessly(s: DynStore) {
    s.join(&room("r"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    s.join(&room("q"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    for expected in 1..=3 {
        let a = s.append(msg("r", "Alice", "hi", None)).await.unwrap();
        assert_eq!(a.message.seq, expected);
        assert!(!a.duplicate);
        assert_eq!(a.message.user, "Alice");
        assert_eq!(a.message.room, "r");
        assert_eq!(a.message.ts, 1_700_000_000_000);
    }
    let other = s.append(msg("q", "alice", "x", None)).await.unwrap();
    assert_eq!(other.message.seq, 1, "each room numbers its own messages");
    let j = s
        .join(&room("r"), &user("bob"), JoinRules::open(false))
        .await
        .unwrap();
    assert_eq!(j.last_seq, 3);
}

pub async fn only_members_append(s: DynStore) {
    s.join(&room("r"), &user("alice"), JoinRules::open(false))
        .await
        .unwrap();
    assert_eq!(
        s.append(msg("r", "bob", "hi", None)).await.unwrap_err(),
        StoreError::NotMember
    );
    assert_eq!(
        s.append(msg("nowhere", "alice", "hi", None))
            .await
            .unwrap_err(),
        StoreError::NoSuchRoom
    );
    let page = s
        .history(&room("r"), &user("alice"), Page::Latest, 10)
        .await
        .unwrap();
    assert!(page.messages.is_empty(), "a refused append stores nothing");
}

pub async fn nonces_deduplicate_per_sender_and_room(s: DynStore) {
    for u in ["alice", "bob"] {
        s.join(&room("r"), &user(u), JoinRules::open(false))
            .await
            .unwrap();
        s.join(&room("q"), &user(u), JoinRules::open(false))
            .await
            .unwrap();
    }
    let first = s
        .append(msg("r", "alice", "one", Some("n1")))
        .await
        .unwrap();
    assert_eq!(first.message.nonce.as_deref(), Some("n1"));
    let mut retry = msg("r", "ALICE", "one again", Some("n1"));
    retry.ts += 5000;
    let again = s.append(retry).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message, first.message, "the original, seq and ts");
    let bob = s.append(msg("r", "bob", "b", Some("n1"))).await.unwrap();
    assert!(!bob.duplicate, "another sender's nonce is another message");
    let elsewhere = s.append(msg("q", "alice", "q", Some("n1"))).await.unwrap();
    assert!(
        !elsewhere.duplicate,
        "another room's nonce is another message"
    );
    let plain = s.append(msg("r", "alice", "p", None)).await.unwrap();
    assert_eq!(plain.message.seq, 3, "duplicates take no seq");
}

pub async fn direct_messages_open_the_conversation(s: DynStore) {
    let dm = RoomName::direct(&user("bob"), &user("alice"));
    let mut m = direct("bob", "Alice", "hello", (false, false));
    m.nonce = Some("d1".into());
    let a = s.append(m.clone()).await.unwrap();
    assert_eq!(a.message.seq, 1);
    let mut new: Vec<_> = a.new_members.iter().map(|u| u.key().to_owned()).collect();
    new.sort();
    assert_eq!(new, ["alice", "bob"]);
    m.nonce = None;
    let b = s.append(m).await.unwrap();
    assert_eq!(b.message.seq, 2);
    assert!(b.new_members.is_empty());
    let rooms = s.rooms(&user("alice"), false, None, 1000).await.unwrap();
    assert_eq!(rooms.len(), 1);
    assert_eq!(rooms[0].room, dm);
    assert!(
        s.rooms(&user("alice"), true, None, 1000)
            .await
            .unwrap()
            .is_empty(),
        "direct conversations are not public"
    );
}

pub async fn history_pages_in_both_directions(s: DynStore) {
    let (r, a) = (room("r"), user("alice"));
    s.join(&r, &a, JoinRules::open(false)).await.unwrap();
    let empty = s.history(&r, &a, Page::Latest, 10).await.unwrap();
    assert_eq!(empty, HistoryPage::default());
    for i in 1..=10 {
        s.append(msg("r", "alice", &format!("m{i}"), None))
            .await
            .unwrap();
    }
    let seqs = |p: &HistoryPage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();
    let p = s.history(&r, &a, Page::Latest, 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![8, 9, 10], true));
    assert_eq!(p.messages[0].body, "m8");
    let p = s.history(&r, &a, Page::Latest, 10).await.unwrap();
    assert_eq!((seqs(&p).len(), p.more), (10, false));
    let p = s.history(&r, &a, Page::Before(8), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![5, 6, 7], true));
    let p = s.history(&r, &a, Page::Before(4), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![1, 2, 3], false));
    let p = s.history(&r, &a, Page::Before(1), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![], false));
    let p = s.history(&r, &a, Page::Before(100), 2).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![9, 10], true));
    let p = s.history(&r, &a, Page::After(0), 4).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![1, 2, 3, 4], true));
    let p = s.history(&r, &a, Page::After(7), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![8, 9, 10], false));
    let p = s.history(&r, &a, Page::After(10), 3).await.unwrap();
    assert_eq!((seqs(&p), p.more), (vec![], false));
    let raw = s.messages_after(&r, 8, 10).await.unwrap();
    assert_eq!(raw.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
    assert_eq!(s.messages_after(&r, 2, 1).await.unwrap()[0].seq, 3);
    assert!(s
        .messages_after(&room("nowhere"), 0, 5)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.history(&r, &user("bob"), Page::Latest, 3)
            .await
            .unwrap_err(),
        StoreError::NotMember
    );
    assert_eq!(
        s.history(&room("nowhere"), &a, Page::Latest, 3)
            .await
            .unwrap_err(),
        StoreError::NoSuchRoom
    );
}

pub async fn read_markers_only_move_forward(s: DynStore) {
    let (r, a) = (room("r"), user("alice"));
    s.join(&r, &a, JoinRules::open(false)).await.unwrap();
    for _ in 0..5 {
        s.append(msg("r", "alice", "x", None)).await.unwrap();
    }
    assert_eq!(s.mark_read(&r, &a, 3).await.unwrap(), 3);
    assert_eq!(s.mark_read(&r, &a, 2).await.unwrap(), 3, "never backward");
    assert_eq!(s.mark_read(&r, &a, 5).await.unwrap(), 5);
    assert!(matches!(
        s.mark_read(&r, &a, 6).await.unwrap_err(),
        StoreError::Invalid(_)
    ));
    assert_eq!(
        s.mark_read(&r, &user("bob"), 1).await.unwrap_err(),
        StoreError::NotMember
    );
    let view = s.rooms(&a, false, None, 1000).await.unwrap();
    assert_eq!(view[0].read_seq, Some(5));
}

pub async fn rooms_lists_memberships_and_public_rooms(s: DynStore) {
    let (a, b) = (user("alice"), user("bob"));
    s.join(&room("one"), &a, JoinRules::open(false))
        .await
        .unwrap();
    s.join(&room("one"), &b, JoinRules::open(false))
        .await
        .unwrap();
    s.join(&room("two"), &b, JoinRules::open(false))
        .await
        .unwrap();
    s.append(msg("one", "bob", "x", None)).await.unwrap();
    s.append(msg("one", "bob", "y", None)).await.unwrap();
    let mine = s.rooms(&a, false, None, 1000).await.unwrap();
    assert_eq!(
        mine,
        vec![RoomView {
            room: room("one"),
            topic: String::new(),
            member_count: 2,
            last_seq: 2,
            read_seq: Some(0),
        }]
    );
    let mut all = s.rooms(&a, true, None, 1000).await.unwrap();
    all.sort_by(|x, y| x.room.cmp(&y.room));
    assert_eq!(all.len(), 2);
    assert_eq!(all[1].room, room("two"));
    assert_eq!(all[1].read_seq, None, "not a member of two");
    assert_eq!(all[1].member_count, 1);
}

pub async fn topics_are_set_by_members(s: DynStore) {
    let (r, a) = (room("r"), user("alice"));
    s.join(&r, &a, JoinRules::open(false)).await.unwrap();
    s.set_topic(&r, &a, "Rust and tea").await.unwrap();
    let j = s
        .join(&r, &user("bob"), JoinRules::open(false))
        .await
        .unwrap();
    assert_eq!(j.topic, "Rust and tea");
    assert_eq!(
        s.set_topic(&r, &user("carol"), "x").await.unwrap_err(),
        StoreError::NotMember
    );
}

/// A guest's memberships come from its joins and from direct messages
/// either way; a drop takes those queued before it, and a guest who
/// comes back after a drop is dropped again.
pub async fn every_guest_membership_is_dropped_however_made(s: DynStore) {
    let (g, reg) = (user("Visitor"), user("reg"));
    assert!(
        s.drop_guest(&g).await.unwrap().is_empty(),
        "nothing to drop"
    );
    // Made a member by a registered user's direct message.
    let dm = RoomName::direct(&reg, &g);
    let queued = s
        .queue_append(direct("reg", "Visitor", "hi", (false, true)))
        .await
        .unwrap();
    // Dropped by a drop asked for before that message is committed.
    let left = s.drop_guest(&g).await.unwrap();
    queued.await.unwrap();
    assert_eq!(left, vec![dm.clone()]);
    assert!(s.rooms(&g, false, None, 10).await.unwrap().is_empty());
    assert!(s.drop_guest(&g).await.unwrap().is_empty(), "dropped once");
    // Back, by a join and a message of its own.
    s.join(&room("lobby"), &g, JoinRules::open(true))
        .await
        .unwrap();
    s.append(direct("Visitor", "reg", "back", (true, false)))
        .await
        .unwrap();
    let mut left = s.drop_guest(&g).await.unwrap();
    left.sort();
    assert_eq!(left, vec![dm.clone(), room("lobby")]);
    assert_eq!(s.members(&dm, None, 10).await.unwrap().len(), 1);
    assert!(s.rooms(&g, false, None, 10).await.unwrap().is_empty());
}

pub async fn guest_memberships_are_dropped(s: DynStore) {
    let g = user("Guesty");
    s.join(&room("a"), &g, JoinRules::open(true)).await.unwrap();
    s.join(&room("b"), &g, JoinRules::open(true)).await.unwrap();
    s.join(&room("a"), &user("reg"), JoinRules::open(false))
        .await
        .unwrap();
    let mut left = s.drop_guest(&g).await.unwrap();
    left.sort();
    assert_eq!(left, vec![room("a"), room("b")]);
    assert_eq!(s.members(&room("a"), None, 1000).await.unwrap().len(), 1);
    assert_eq!(
        s.members(&room("b"), None, 1000).await.unwrap_err(),
        StoreError::NoSuchRoom,
        "a guest's room goes when the guest does"
    );
    s.join(&room("c"), &user("other"), JoinRules::open(true))
        .await
        .unwrap();
    s.join(&room("d"), &user("reg"), JoinRules::open(false))
        .await
        .unwrap();
    s.join(&room("d"), &user("visitor"), JoinRules::open(true))
        .await
        .unwrap();
    s.drop_all_guests().await.unwrap();
    assert_eq!(
        s.members(&room("c"), None, 1000).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
    assert_eq!(s.members(&room("a"), None, 1000).await.unwrap().len(), 1);
    assert_eq!(
        s.members(&room("d"), None, 1000).await.unwrap().len(),
        1,
        "a registered user's room stays"
    );
}

pub async fn rooms_created_by_guests_go_when_empty(s: DynStore) {
    let (g, reg) = (user("guesty"), user("reg"));
    s.join(&room("g"), &g, JoinRules::open(true)).await.unwrap();
    s.join(&room("g"), &reg, JoinRules::open(false))
        .await
        .unwrap();
    s.append(msg("g", "guesty", "old", None)).await.unwrap();
    s.leave(&room("g"), &g).await.unwrap();
    assert_eq!(s.members(&room("g"), None, 10).await.unwrap().len(), 1);
    s.leave(&room("g"), &reg).await.unwrap();
    assert_eq!(
        s.members(&room("g"), None, 10).await.unwrap_err(),
        StoreError::NoSuchRoom,
        "the last member left"
    );
    let again = s
        .join(&room("g"), &reg, JoinRules::open(false))
        .await
        .unwrap();
    assert_eq!(
        again.last_seq, 0,
        "a new room: the old history went with it"
    );
    s.leave(&room("g"), &reg).await.unwrap();
    assert!(
        s.members(&room("g"), None, 10).await.is_ok(),
        "a registered user's room stays, empty"
    );
}

pub async fn joins_follow_their_rules(s: DynStore) {
    let a = user("alice");
    let strict = JoinRules {
        invite: None,
        guest: false,
        create: false,
        max_rooms: 2,
    };
    assert_eq!(
        s.join(&room("new"), &a, strict.clone()).await.unwrap_err(),
        StoreError::NoSuchRoom,
        "no creating"
    );
    for r in ["one", "two", "three"] {
        s.join(&room(r), &user("owner"), JoinRules::open(false))
            .await
            .unwrap();
    }
    s.join(&room("one"), &a, strict.clone()).await.unwrap();
    s.join(&room("two"), &a, strict.clone()).await.unwrap();
    assert!(matches!(
        s.join(&room("three"), &a, strict.clone())
            .await
            .unwrap_err(),
        StoreError::Limit(_)
    ));
    assert!(
        !s.join(&room("two"), &a, strict.clone())
            .await
            .unwrap()
            .newly_joined,
        "joining a room one is in passes the cap"
    );
    s.append(direct("owner", a.as_str(), "hi", (false, false)))
        .await
        .unwrap();
    s.leave(&room("one"), &a).await.unwrap();
    s.join(&room("three"), &a, strict)
        .await
        .expect("direct conversations do not count");
}

pub async fn rooms_and_members_come_in_pages(s: DynStore) {
    let names = ["b", "a", "d", "c", "e"];
    for n in names {
        s.join(
            &room(&format!("r{n}")),
            &user("pager"),
            JoinRules::open(false),
        )
        .await
        .unwrap();
        s.join(
            &room("big"),
            &user(&format!("User{n}")),
            JoinRules::open(false),
        )
        .await
        .unwrap();
    }
    let page = |views: Vec<RoomView>| -> Vec<String> {
        views
            .into_iter()
            .map(|v| v.room.as_str().to_owned())
            .collect()
    };
    let me = user("pager");
    let first = s.rooms(&me, false, None, 2).await.unwrap();
    assert_eq!(page(first), ["ra", "rb"]);
    let next = s.rooms(&me, false, Some(&room("rb")), 2).await.unwrap();
    assert_eq!(page(next), ["rc", "rd"]);
    let last = s.rooms(&me, false, Some(&room("rd")), 2).await.unwrap();
    assert_eq!(page(last), ["re"]);
    let all = s.rooms(&me, true, None, 3).await.unwrap();
    assert_eq!(page(all), ["big", "ra", "rb"]);
    let all = s.rooms(&me, true, Some(&room("rc")), 100).await.unwrap();
    assert_eq!(page(all), ["rd", "re"]);

    let members = |after: Option<&'static str>| {
        let s = s.clone();
        async move {
            s.members(&room("big"), after, 2)
                .await
                .unwrap()
                .into_iter()
                .map(|(u, _)| u.as_str().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(members(None).await, ["Usera", "Userb"]);
    assert_eq!(members(Some("userb")).await, ["Userc", "Userd"]);
    assert_eq!(members(Some("userd")).await, ["Usere"]);
}

pub async fn last_seqs_name_each_room(s: DynStore) {
    for (r, n) in [("a", 3), ("b", 0), ("c", 1)] {
        s.join(&room(r), &user("alice"), JoinRules::open(false))
            .await
            .unwrap();
        for _ in 0..n {
            s.append(msg(r, "alice", "x", None)).await.unwrap();
        }
    }
    let asked = [room("c"), room("nowhere"), room("a"), room("b"), room("a")];
    assert_eq!(
        s.last_seqs(&asked).await.unwrap(),
        vec![1, 0, 3, 0, 3],
        "in the order asked; 0 for a room that does not exist"
    );
    assert!(s.last_seqs(&[]).await.unwrap().is_empty());
}

pub async fn concurrent_appends_stay_gapless(s: DynStore) {
    const SENDERS: usize = 20;
    const EACH: usize = 25;
    for i in 0..SENDERS {
        s.join(
            &room("busy"),
            &user(&format!("u{i}")),
            JoinRules::open(false),
        )
        .await
        .unwrap();
    }
    let tasks: Vec<_> = (0..SENDERS)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut seqs = Vec::new();
                for j in 0..EACH {
                    let m = msg("busy", &format!("u{i}"), &format!("{i}-{j}"), None);
                    seqs.push(s.append(m).await.unwrap().message.seq);
                }
                seqs
            })
        })
        .collect();
    let mut all = HashSet::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "one sender's order");
        all.extend(seqs);
    }
    let expected: HashSet<Seq> = (1..=(SENDERS * EACH) as Seq).collect();
    assert_eq!(all, expected, "every seq once, no gaps");
    let page = s
        .history(&room("busy"), &user("u0"), Page::After(0), 500)
        .await
        .unwrap();
    assert_eq!(page.messages.len(), SENDERS * EACH);
}

/// Pipelined sends: each caller queues messages without waiting for their
/// commits, several callers at once, into two rooms; each caller's messages
/// get ascending seqs in each room, in the order queued, and a message
/// whose outcome nobody waits for is stored all the same.
pub async fn queued_appends_keep_their_order(s: DynStore) {
    const CALLERS: usize = 4;
    const EACH: usize = 250;
    for r in ["p", "q"] {
        for i in 0..CALLERS {
            s.join(&room(r), &user(&format!("u{i}")), JoinRules::open(false))
                .await
                .unwrap();
        }
    }
    let tasks: Vec<_> = (0..CALLERS)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut queued = Vec::new();
                for j in 0..EACH {
                    let r = if j % 3 == 0 { "q" } else { "p" };
                    let m = msg(r, &format!("u{i}"), &format!("{i}-{j}"), None);
                    let outcome = s.queue_append(m).await.unwrap();
                    if j % 8 == 0 {
                        // Small batches, many in flight.
                        tokio::task::yield_now().await;
                    }
                    if j == 7 {
                        drop(outcome); // nobody waits for this one
                    } else {
                        queued.push((r, j, outcome));
                    }
                }
                let mut seqs = Vec::new();
                for (r, j, outcome) in queued {
                    let m = outcome.await.unwrap().message;
                    assert_eq!(m.body, format!("{i}-{j}"));
                    seqs.push((r, m.seq));
                }
                seqs
            })
        })
        .collect();
    for t in tasks {
        let seqs = t.await.unwrap();
        for r in ["p", "q"] {
            let mine: Vec<Seq> = seqs.iter().filter(|(x, _)| *x == r).map(|x| x.1).collect();
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "one caller's queued messages in {r} in queue order: {mine:?}"
            );
        }
    }
    let mut stored = 0;
    for r in ["p", "q"] {
        let mut messages: Vec<Message> = Vec::new();
        loop {
            let after = messages.last().map_or(0, |m| m.seq);
            let page = s
                .history(&room(r), &user("u0"), Page::After(after), 500)
                .await
                .unwrap();
            messages.extend(page.messages);
            if !page.more {
                break;
            }
        }
        for i in 0..CALLERS {
            let order: Vec<usize> = messages
                .iter()
                .filter(|m| m.user == format!("u{i}"))
                .map(|m| m.body.split_once('-').unwrap().1.parse().unwrap())
                .collect();
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{r}: {order:?}");
        }
        let seqs: Vec<Seq> = messages.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as Seq).collect::<Vec<_>>(), "gapless");
        stored += messages.len();
    }
    assert_eq!(stored, CALLERS * EACH, "the unawaited messages too");
}

pub async fn creators_own_rooms_and_roles_are_kept(s: DynStore) {
    let rules = JoinRules::open(false);
    s.join(&room("r"), &user("Ann"), rules.clone())
        .await
        .unwrap();
    s.join(&room("r"), &user("bob"), rules.clone())
        .await
        .unwrap();
    let role = |u: &'static str| {
        let s = s.clone();
        async move { s.role(&room("r"), &user(u)).await.unwrap() }
    };
    assert_eq!(role("ann").await, Some(Role::Owner), "the creator owns it");
    assert_eq!(role("bob").await, Some(Role::Member));
    assert_eq!(role("carol").await, None, "not a member");
    assert_eq!(
        s.role(&room("nowhere"), &user("ann")).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
    s.set_role(&room("r"), &user("BOB"), Role::Moderator)
        .await
        .unwrap();
    assert_eq!(role("bob").await, Some(Role::Moderator));
    let members = s.members(&room("r"), None, 10).await.unwrap();
    assert_eq!(
        members,
        vec![(user("Ann"), Role::Owner), (user("bob"), Role::Moderator)]
    );
    let err = s.set_role(&room("r"), &user("carol"), Role::Admin).await;
    assert_eq!(err.unwrap_err(), StoreError::NotMember);
    // The last owner keeps the role until there is another.
    let err = s.set_role(&room("r"), &user("ann"), Role::Admin).await;
    assert!(matches!(err, Err(StoreError::Refused(_))), "{err:?}");
    s.set_role(&room("r"), &user("bob"), Role::Owner)
        .await
        .unwrap();
    s.set_role(&room("r"), &user("ann"), Role::Admin)
        .await
        .unwrap();
    assert_eq!(role("ann").await, Some(Role::Admin));
    // A role ends with the membership.
    s.leave(&room("r"), &user("ann")).await.unwrap();
    s.join(&room("r"), &user("ann"), rules.clone())
        .await
        .unwrap();
    assert_eq!(role("ann").await, Some(Role::Member));
}

pub async fn operators_are_registered_users(s: DynStore) {
    s.create_user(&user("Olga"), "h").await.unwrap();
    assert!(!s.operator(&user("olga")).await.unwrap());
    assert!(!s.operator(&user("nobody")).await.unwrap());
    s.set_operator(&user("OLGA"), true).await.unwrap();
    assert!(s.operator(&user("olga")).await.unwrap());
    s.set_operator(&user("olga"), false).await.unwrap();
    assert!(!s.operator(&user("olga")).await.unwrap());
    let err = s.set_operator(&user("nobody"), true).await.unwrap_err();
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    s.set_operator(&user("olga"), true).await.unwrap();
    s.delete_user(&user("olga")).await.unwrap();
    s.create_user(&user("olga"), "h").await.unwrap();
    assert!(!s.operator(&user("olga")).await.unwrap(), "not inherited");
}

pub async fn bans_end_membership_and_refuse_joins(s: DynStore) {
    let rules = JoinRules::open(false);
    s.join(&room("r"), &user("mod"), rules.clone())
        .await
        .unwrap();
    s.join(&room("r"), &user("Eve"), rules.clone())
        .await
        .unwrap();
    let ended = s
        .sanction(&room("r"), ban("eve", SanctionKind::Ban, None))
        .await
        .unwrap();
    assert_eq!(ended, vec![room("r")], "the ban ended a membership");
    assert_eq!(s.role(&room("r"), &user("eve")).await.unwrap(), None);
    let err = s
        .join(&room("r"), &user("EVE"), rules.clone())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    // A ban of someone not in the room holds too.
    let ended = s
        .sanction(
            &room("r"),
            ban("zed", SanctionKind::Ban, Some(now_ms() + 60_000)),
        )
        .await
        .unwrap();
    assert!(ended.is_empty());
    assert!(s
        .join(&room("r"), &user("zed"), rules.clone())
        .await
        .is_err());
    let listed = s.sanctions(&room("r"), now_ms()).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].user, "eve");
    assert_eq!(listed[0].by, "mod");
    assert_eq!(listed[0].reason, "spam");
    assert_eq!(listed[0].until_ts, None);
    assert_eq!(listed[1].kind, SanctionKind::Ban);
    assert!(listed[1].until_ts.is_some());
    // Lifting: once; then the user may join again.
    assert!(s
        .lift(&room("r"), &user("Eve"), SanctionKind::Ban)
        .await
        .unwrap());
    assert!(!s
        .lift(&room("r"), &user("eve"), SanctionKind::Ban)
        .await
        .unwrap());
    s.join(&room("r"), &user("eve"), rules.clone())
        .await
        .unwrap();
    // A ban that has ended holds nothing, and is not listed.
    s.sanction(
        &room("r"),
        ban("old", SanctionKind::Ban, Some(now_ms() - 1)),
    )
    .await
    .unwrap();
    s.join(&room("r"), &user("old"), rules.clone())
        .await
        .unwrap();
    let listed = s.sanctions(&room("r"), now_ms()).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert!(!s
        .lift(&room("r"), &user("old"), SanctionKind::Ban)
        .await
        .unwrap());
    let err = s.sanctions(&room("nowhere"), 0).await.unwrap_err();
    assert_eq!(err, StoreError::NoSuchRoom);
    let err = s
        .sanction(&room("nowhere"), ban("x", SanctionKind::Ban, None))
        .await;
    assert_eq!(err.unwrap_err(), StoreError::NoSuchRoom);
}

pub async fn mutes_refuse_messages_until_they_end(s: DynStore) {
    let rules = JoinRules::open(false);
    s.join(&room("r"), &user("mod"), rules.clone())
        .await
        .unwrap();
    s.join(&room("r"), &user("Eve"), rules.clone())
        .await
        .unwrap();
    s.append(msg("r", "eve", "before", None)).await.unwrap();
    let ended = s
        .sanction(&room("r"), ban("eve", SanctionKind::Mute, None))
        .await
        .unwrap();
    assert!(ended.is_empty(), "a mute keeps the membership");
    let err = s.append(msg("r", "eve", "during", None)).await.unwrap_err();
    assert!(matches!(err, StoreError::Refused(_)), "{err:?}");
    let edit = amend("r", "eve", "changed", Amend::Edit(1));
    assert!(matches!(s.append(edit).await, Err(StoreError::Refused(_))));
    // Deleting one's own message is no speech: allowed.
    s.append(amend("r", "eve", "", delete(1, false)))
        .await
        .unwrap();
    // Replacing a mute with one that has ended lets the user speak.
    s.sanction(
        &room("r"),
        ban("eve", SanctionKind::Mute, Some(now_ms() - 1)),
    )
    .await
    .unwrap();
    let m = s.append(msg("r", "eve", "after", None)).await.unwrap();
    assert_eq!(m.message.seq, 3, "refused messages took no seq");
    s.sanction(&room("r"), ban("eve", SanctionKind::Mute, None))
        .await
        .unwrap();
    assert!(s
        .lift(&room("r"), &user("eve"), SanctionKind::Mute)
        .await
        .unwrap());
    s.append(msg("r", "eve", "again", None)).await.unwrap();
}

pub async fn edits_replace_the_body_in_place(s: DynStore) {
    s.join(&room("r"), &user("ann"), JoinRules::open(false))
        .await
        .unwrap();
    s.append(msg("r", "ann", "helo", Some("n1"))).await.unwrap();
    let first = s
        .append(NewMessage {
            nonce: Some("e1".into()),
            ..amend("r", "ann", "hello", Amend::Edit(1))
        })
        .await
        .unwrap();
    assert!(!first.duplicate);
    let entry = &first.message;
    assert_eq!(
        (entry.seq, entry.edit, entry.body.as_str()),
        (2, Some(1), "hello")
    );
    // Exactly once: the same nonce is the same entry.
    let again = s
        .append(NewMessage {
            nonce: Some("e1".into()),
            ..amend("r", "ann", "hello", Amend::Edit(1))
        })
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.message, first.message);
    s.append(amend("r", "ann", "hello!", Amend::Edit(1)))
        .await
        .unwrap();
    let page = s
        .history(&room("r"), &user("ann"), Page::Latest, 10)
        .await
        .unwrap();
    let m = &page.messages;
    assert_eq!(m.len(), 3, "the edits are entries of the log");
    assert_eq!(m[0].body, "hello!", "the message as it is now");
    assert_eq!(m[0].edited_ts, Some(1_700_000_000_500));
    assert_eq!(m[0].nonce.as_deref(), Some("n1"));
    assert_eq!((m[1].edit, m[1].body.as_str()), (Some(1), "hello"));
    assert_eq!((m[2].edit, m[2].body.as_str()), (Some(1), "hello!"));
    assert_eq!(m[2].edited_ts, None);
    let after = s.messages_after(&room("r"), 0, 10).await.unwrap();
    assert_eq!(&after, m, "the server's own reads agree");
}

pub async fn deletions_leave_no_text_behind(s: DynStore) {
    let rules = JoinRules::open(false);
    s.join(&room("r"), &user("ann"), rules.clone())
        .await
        .unwrap();
    s.join(&room("r"), &user("mod"), rules.clone())
        .await
        .unwrap();
    s.append(msg("r", "ann", "secret one", None)).await.unwrap();
    s.append(amend("r", "ann", "secret two", Amend::Edit(1)))
        .await
        .unwrap();
    s.append(msg("r", "ann", "stays", None)).await.unwrap();
    let gone = s
        .append(amend("r", "ann", "", delete(1, false)))
        .await
        .unwrap()
        .message;
    assert_eq!(
        (gone.seq, gone.delete, gone.body.as_str()),
        (4, Some(1), "")
    );
    let page = s
        .history(&room("r"), &user("ann"), Page::Latest, 10)
        .await
        .unwrap();
    let m = &page.messages;
    assert_eq!(m.len(), 4);
    assert!(m[0].deleted && m[0].body.is_empty(), "{:?}", m[0]);
    assert_eq!(m[1].edit, Some(1));
    assert!(m[1].body.is_empty(), "its edits lose their text too");
    assert!(!m[1].deleted, "the edit entry itself was not deleted");
    assert_eq!(m[2].body, "stays");
    assert_eq!(m[3].delete, Some(1));
    // A moderator deletes someone else's message.
    s.append(amend("r", "mod", "", delete(3, true)))
        .await
        .unwrap();
    // So does one who is not in the room (an operator, a hub's moderator).
    s.append(msg("r", "ann", "more", None)).await.unwrap();
    s.append(amend("r", "op", "", delete(6, true)))
        .await
        .unwrap();
    let e = s.append(amend("r", "op", "", delete(2, false))).await;
    assert_eq!(e.unwrap_err(), StoreError::NotMember, "not as an author");
    let all = s.messages_after(&room("r"), 0, 10).await.unwrap();
    assert!(all[2].deleted && all[5].deleted);
    assert!(
        all.iter().all(|m| !m.body.contains("secret")),
        "no text of a deleted message: {all:?}"
    );
}

pub async fn edits_and_deletions_follow_the_rules(s: DynStore) {
    let rules = JoinRules::open(false);
    s.join(&room("r"), &user("ann"), rules.clone())
        .await
        .unwrap();
    s.join(&room("r"), &user("bob"), rules.clone())
        .await
        .unwrap();
    s.append(msg("r", "ann", "one", None)).await.unwrap();
    s.append(amend("r", "ann", "uno", Amend::Edit(1)))
        .await
        .unwrap();
    let refused = |m: NewMessage| {
        let s = s.clone();
        async move { s.append(m).await.unwrap_err() }
    };
    let e = refused(amend("r", "bob", "mine now", Amend::Edit(1))).await;
    assert!(matches!(e, StoreError::Refused(_)), "someone else's: {e:?}");
    let e = refused(amend("r", "bob", "", delete(1, false))).await;
    assert!(
        matches!(e, StoreError::Refused(_)),
        "not a moderator: {e:?}"
    );
    let e = refused(amend("r", "ann", "x", Amend::Edit(2))).await;
    assert!(matches!(e, StoreError::Invalid(_)), "an edit entry: {e:?}");
    let e = refused(amend("r", "ann", "", delete(2, false))).await;
    assert!(matches!(e, StoreError::Invalid(_)), "an edit entry: {e:?}");
    for seq in [0, 3, 99] {
        let e = refused(amend("r", "ann", "x", Amend::Edit(seq))).await;
        assert_eq!(e, StoreError::NoSuchMessage(seq));
    }
    let e = refused(amend("r", "carol", "x", Amend::Edit(1))).await;
    assert_eq!(e, StoreError::NotMember);
    s.append(amend("r", "ann", "", delete(1, false)))
        .await
        .unwrap();
    let e = refused(amend("r", "ann", "back", Amend::Edit(1))).await;
    assert_eq!(e, StoreError::NoSuchMessage(1), "a deleted message");
    let e = refused(amend("r", "ann", "", delete(1, false))).await;
    assert_eq!(e, StoreError::NoSuchMessage(1), "deleted already");
    let e = refused(amend("r", "ann", "", delete(3, false))).await;
    assert!(
        matches!(e, StoreError::Invalid(_)),
        "a deletion entry: {e:?}"
    );
    // Nothing refused took a seq.
    assert_eq!(s.last_seqs(&[room("r")]).await.unwrap(), vec![3]);
}

fn hub(name: &str) -> HubName {
    HubName::parse(name).unwrap()
}

async fn new_hub(s: &DynStore, name: &str, owner: &str, private: bool) {
    s.create_user(&user(owner), "h").await.ok();
    s.create_hub(NewHub {
        hub: hub(name),
        title: format!("{name} people"),
        private,
        owner: user(owner),
    })
    .await
    .unwrap();
}

fn invite(
    code: &str,
    place: RoomName,
    for_user: Option<&str>,
    expires_ts: Option<i64>,
) -> NewInvite {
    NewInvite {
        code: code.into(),
        place,
        user: for_user.map(user),
        expires_ts,
        by: user("ann"),
    }
}

pub async fn hubs_hold_channels_and_members(s: DynStore) {
    new_hub(&s, "rust", "ann", false).await;
    let hub_room = RoomName::hub_room(&hub("rust"));
    assert_eq!(
        s.role(&hub_room, &user("ann")).await.unwrap(),
        Some(Role::Owner)
    );
    assert_eq!(
        s.role(&room("rust/general"), &user("ann")).await.unwrap(),
        Some(Role::Owner),
        "a hub's roles count in its channels"
    );
    let again = s
        .create_hub(NewHub {
            hub: hub("RUST"),
            title: String::new(),
            private: false,
            owner: user("bob"),
        })
        .await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");

    let joined = s
        .join_hub(&hub("rust"), &user("Bob"), false, None)
        .await
        .unwrap();
    assert!(joined.newly_joined);
    assert_eq!(joined.channels, vec![(room("rust/general"), 0)]);
    let again = s
        .join_hub(&hub("rust"), &user("bob"), false, None)
        .await
        .unwrap();
    assert_eq!(again, HubJoined::default());
    assert_eq!(
        s.role(&room("rust/general"), &user("bob")).await.unwrap(),
        Some(Role::Member)
    );
    let members = s
        .create_channel(&room("rust/dev"), false, "hacking", &user("ann"))
        .await
        .unwrap();
    assert_eq!(members.len(), 2, "every member of the hub: {members:?}");
    let secret = s
        .create_channel(&room("rust/secret"), true, "", &user("ann"))
        .await
        .unwrap();
    assert_eq!(secret, vec![user("ann")]);
    let dup = s
        .create_channel(&room("rust/dev"), false, "", &user("ann"))
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let none = s
        .create_channel(&room("go/dev"), false, "", &user("ann"))
        .await;
    assert_eq!(none.unwrap_err(), StoreError::NoSuchRoom);
    // Channels are rooms: messages, history, members with the hub's roles.
    s.append(msg("rust/dev", "bob", "hi", None)).await.unwrap();
    let members = s.members(&room("rust/dev"), None, 10).await.unwrap();
    assert_eq!(
        members,
        vec![(user("ann"), Role::Owner), (user("Bob"), Role::Member)]
    );

    let mine = s.hubs(Some(&user("bob")), false).await.unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(
        (
            mine[0].hub.as_str(),
            mine[0].title.as_str(),
            mine[0].member_count,
            mine[0].role
        ),
        ("rust", "rust people", 2, Some(Role::Member))
    );
    let all = s.hubs(Some(&user("carol")), true).await.unwrap();
    assert_eq!((all.len(), all[0].role), (1, None));
    assert!(s
        .hubs(Some(&user("carol")), false)
        .await
        .unwrap()
        .is_empty());

    let seen = s.hub(&hub("rust"), &user("bob")).await.unwrap();
    let channels: Vec<(&str, Option<Seq>, Seq)> = seen
        .channels
        .iter()
        .map(|c| (c.room.as_str(), c.read_seq, c.last_seq))
        .collect();
    assert_eq!(
        channels,
        [("rust/dev", Some(0), 1), ("rust/general", Some(0), 0)],
        "not the private channel bob is not in"
    );
    assert_eq!(seen.role, Some(Role::Member));
    assert_eq!(seen.members.len(), 2);
    let owner_sees = s.hub(&hub("rust"), &user("ann")).await.unwrap();
    assert_eq!(owner_sees.channels.len(), 3);
    let stranger = s.hub(&hub("rust"), &user("carol")).await.unwrap();
    assert_eq!((stranger.role, stranger.channels[0].read_seq), (None, None));
    assert_eq!(
        s.hub(&hub("nowhere"), &user("ann")).await.unwrap_err(),
        StoreError::NoSuchRoom
    );

    // Every public room lists public channels, never a hub's own room or
    // a private channel.
    let listed: Vec<String> = s
        .rooms(&user("carol"), true, None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.room.as_str().to_owned())
        .collect();
    assert_eq!(listed, ["rust/dev", "rust/general"]);
    // Channels take the hub first, and are never made by a join.
    let rules = JoinRules::open(false);
    let e = s
        .join(&room("rust/dev"), &user("carol"), rules.clone())
        .await;
    assert!(matches!(e, Err(StoreError::Refused(_))), "{e:?}");
    let e = s
        .join(&room("rust/nope"), &user("ann"), rules.clone())
        .await;
    assert_eq!(e.unwrap_err(), StoreError::NoSuchRoom);
    // A hub role given in a channel is the hub's.
    s.set_role(&room("rust/dev"), &user("bob"), Role::Moderator)
        .await
        .unwrap();
    assert_eq!(
        s.role(&hub_room, &user("bob")).await.unwrap(),
        Some(Role::Moderator)
    );

    // Leaving the hub leaves its channels; its last owner stays.
    let mut left = s.leave_hub(&hub("rust"), &user("bob")).await.unwrap();
    left.sort();
    assert_eq!(left, vec![room("rust/dev"), room("rust/general")]);
    assert_eq!(s.role(&room("rust/dev"), &user("bob")).await.unwrap(), None);
    assert!(s
        .history(&room("rust/dev"), &user("bob"), Page::Latest, 5)
        .await
        .is_err());
    let e = s.leave_hub(&hub("rust"), &user("ann")).await.unwrap_err();
    assert!(matches!(e, StoreError::Refused(_)), "{e:?}");
    let e = s.leave_hub(&hub("rust"), &user("bob")).await.unwrap_err();
    assert_eq!(e, StoreError::NotMember);
}

pub async fn private_hubs_and_channels_take_invites(s: DynStore) {
    new_hub(&s, "club", "ann", true).await;
    let club = RoomName::hub_room(&hub("club"));
    let refused = |e: StoreResult<HubJoined>| matches!(e, Err(StoreError::Refused(_)));
    assert!(refused(
        s.join_hub(&hub("club"), &user("carol"), false, None).await
    ));
    assert!(
        s.hubs(Some(&user("carol")), true).await.unwrap().is_empty(),
        "not listed"
    );
    assert!(matches!(
        s.hub(&hub("club"), &user("carol")).await,
        Err(StoreError::Refused(_))
    ));
    assert!(s
        .rooms(&user("carol"), true, None, 10)
        .await
        .unwrap()
        .is_empty());
    // A single user's invite: for that user, once.
    s.create_invite(invite("for-carol", club.clone(), Some("carol"), None))
        .await
        .unwrap();
    assert!(refused(
        s.join_hub(&hub("club"), &user("dave"), false, Some("for-carol"))
            .await
    ));
    let joined = s
        .join_hub(&hub("club"), &user("Carol"), false, Some("for-carol"))
        .await
        .unwrap();
    assert!(joined.newly_joined);
    s.leave_hub(&hub("club"), &user("carol")).await.unwrap();
    assert!(refused(
        s.join_hub(&hub("club"), &user("carol"), false, Some("for-carol"))
            .await
    ));
    // A shareable one until it expires; an expired one, an unknown one,
    // one for another place: refused alike.
    s.create_invite(invite("open", club.clone(), None, Some(now_ms() + 60_000)))
        .await
        .unwrap();
    s.create_invite(invite("old", club.clone(), None, Some(now_ms() - 1)))
        .await
        .unwrap();
    for u in ["carol", "dave"] {
        s.join_hub(&hub("club"), &user(u), false, Some("open"))
            .await
            .unwrap();
    }
    for code in ["old", "nope"] {
        assert!(refused(
            s.join_hub(&hub("club"), &user("erin"), false, Some(code))
                .await
        ));
    }
    let e = s
        .create_invite(invite("x", room("nowhere"), None, None))
        .await;
    assert_eq!(e.unwrap_err(), StoreError::NoSuchRoom);

    // A private channel: hub members join with an invite to it.
    s.create_channel(&room("club/inner"), true, "", &user("ann"))
        .await
        .unwrap();
    let mut rules = JoinRules::open(false);
    let e = s
        .join(&room("club/inner"), &user("carol"), rules.clone())
        .await;
    assert!(matches!(e, Err(StoreError::Refused(_))), "{e:?}");
    s.create_invite(invite("inner", room("club/inner"), None, None))
        .await
        .unwrap();
    rules.invite = Some("open".into());
    let e = s
        .join(&room("club/inner"), &user("carol"), rules.clone())
        .await;
    assert!(
        matches!(e, Err(StoreError::Refused(_))),
        "the hub's invite: {e:?}"
    );
    rules.invite = Some("inner".into());
    s.join(&room("club/inner"), &user("carol"), rules.clone())
        .await
        .unwrap();
    let seen = s.hub(&hub("club"), &user("carol")).await.unwrap();
    assert!(seen
        .channels
        .iter()
        .any(|c| c.room == room("club/inner") && c.private));
}

pub async fn hub_bans_and_mutes_reach_its_channels(s: DynStore) {
    new_hub(&s, "town", "ann", false).await;
    let town = RoomName::hub_room(&hub("town"));
    for u in ["eve", "mo"] {
        s.join_hub(&hub("town"), &user(u), false, None)
            .await
            .unwrap();
    }
    s.create_channel(&room("town/square"), false, "", &user("ann"))
        .await
        .unwrap();
    // A ban from the hub ends the membership of the hub and its channels.
    let ban = NewSanction {
        user: user("eve"),
        kind: SanctionKind::Ban,
        by: user("ann"),
        reason: String::new(),
        until_ts: None,
    };
    let mut ended = s.sanction(&town, ban.clone()).await.unwrap();
    ended.sort();
    assert_eq!(
        ended,
        vec![town.clone(), room("town/general"), room("town/square")]
    );
    let e = s.join_hub(&hub("town"), &user("eve"), false, None).await;
    assert!(matches!(e, Err(StoreError::Refused(_))), "{e:?}");
    // A mute in the hub holds in every channel.
    s.sanction(
        &town,
        NewSanction {
            user: user("mo"),
            kind: SanctionKind::Mute,
            ..ban.clone()
        },
    )
    .await
    .unwrap();
    for r in ["town/general", "town/square"] {
        let e = s.append(msg(r, "mo", "hm", None)).await.unwrap_err();
        assert!(matches!(e, StoreError::Refused(_)), "{r}: {e:?}");
    }
    assert!(s
        .lift(&town, &user("mo"), SanctionKind::Mute)
        .await
        .unwrap());
    s.append(msg("town/square", "mo", "free", None))
        .await
        .unwrap();
    // A ban from one channel keeps the hub and the other channels.
    let ended = s
        .sanction(
            &room("town/square"),
            NewSanction {
                user: user("mo"),
                ..ban
            },
        )
        .await
        .unwrap();
    assert_eq!(ended, vec![room("town/square")]);
    assert_eq!(
        s.role(&town, &user("mo")).await.unwrap(),
        Some(Role::Member)
    );
    let e = s
        .join(&room("town/square"), &user("mo"), JoinRules::open(false))
        .await;
    assert!(matches!(e, Err(StoreError::Refused(_))), "{e:?}");
    s.append(msg("town/general", "mo", "still here", None))
        .await
        .unwrap();
}

pub async fn server_bans_are_kept_with_the_user(s: DynStore) {
    s.create_user(&user("Vic"), "h").await.unwrap();
    let token = [9; 32];
    s.create_token(&user("vic"), &token).await.unwrap();
    assert_eq!(s.user(&user("vic")).await.unwrap().unwrap().banned, None);
    let ban = ServerBan {
        reason: "spam".into(),
        until_ts: Some(now_ms() + 60_000),
    };
    s.ban_user(&user("VIC"), ban.clone()).await.unwrap();
    let record = s.user(&user("vic")).await.unwrap().unwrap();
    assert_eq!(record.banned, Some(ban.clone()));
    let by_token = s.token_user(&token).await.unwrap().unwrap();
    assert_eq!(
        (by_token.name.as_str(), by_token.banned),
        ("Vic", Some(ban))
    );
    assert!(s.unban_user(&user("vic")).await.unwrap());
    assert!(!s.unban_user(&user("vic")).await.unwrap());
    assert_eq!(s.user(&user("vic")).await.unwrap().unwrap().banned, None);
    let e = s
        .ban_user(
            &user("nobody"),
            ServerBan {
                reason: String::new(),
                until_ts: None,
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
}

pub async fn deleting_a_hub_removes_everything_of_it(s: DynStore) {
    new_hub(&s, "gone", "ann", true).await;
    new_hub(&s, "stays", "ann", false).await;
    s.create_channel(&room("gone/x"), false, "", &user("ann"))
        .await
        .unwrap();
    s.append(msg("gone/x", "ann", "bye", None)).await.unwrap();
    let every = s.hubs(None, false).await.unwrap();
    let names: Vec<&str> = every.iter().map(|h| h.hub.as_str()).collect();
    assert_eq!(names, ["gone", "stays"], "private hubs too, for operators");
    let gone = RoomName::hub_room(&hub("gone"));
    s.create_invite(invite("code", gone.clone(), None, None))
        .await
        .unwrap();
    let removed = s.delete_hub(&hub("gone")).await.unwrap();
    let rooms: Vec<&str> = removed.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(rooms, ["gone/", "gone/general", "gone/x"]);
    assert_eq!(removed[0].1, vec![user("ann")]);
    assert_eq!(
        s.hub(&hub("gone"), &user("ann")).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
    assert_eq!(s.last_seqs(&[room("gone/x")]).await.unwrap(), vec![0]);
    assert!(s
        .messages_after(&room("gone/x"), 0, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.delete_hub(&hub("gone")).await.unwrap_err(),
        StoreError::NoSuchRoom
    );
    // The name is free again, with nothing of the old hub in it.
    new_hub(&s, "gone", "bob", false).await;
    assert_eq!(s.role(&gone, &user("ann")).await.unwrap(), None);
    assert_eq!(s.hubs(None, false).await.unwrap().len(), 2);
}

/// A database from before roles and hubs, once its backend migrated it:
/// what each backend's migration test seeded in the old schema (the
/// registered user `Ann`, the room `old` with members Ann and bob, and
/// message 1 of Ann, `still here`, ts 5, nonce `n-1`) is all there, the
/// room has no owner, and the room goes on.
pub async fn keeps_a_database_from_before_roles(s: DynStore) {
    let old = room("old");
    assert_eq!(
        s.members(&old, None, 10).await.unwrap(),
        vec![(user("Ann"), Role::Member), (user("bob"), Role::Member)],
        "no owner until an operator gives one"
    );
    let page = s
        .history(&old, &user("ann"), Page::Latest, 10)
        .await
        .unwrap();
    assert_eq!(
        page.messages,
        vec![Message {
            room: "old".into(),
            seq: 1,
            user: "Ann".into(),
            body: "still here".into(),
            ts: 5,
            nonce: Some("n-1".into()),
            ..Message::default()
        }]
    );
    assert!(!s.operator(&user("ann")).await.unwrap());
    assert_eq!(s.user(&user("ann")).await.unwrap().unwrap().banned, None);
    assert!(s.sanctions(&old, 0).await.unwrap().is_empty());
    assert!(s.hubs(None, false).await.unwrap().is_empty());
    // The room goes on: edits of the old message, new messages.
    let edit = amend("old", "ann", "edited", Amend::Edit(1));
    assert_eq!(s.append(edit).await.unwrap().message.seq, 2);
    let more = s.append(msg("old", "bob", "and on", None)).await.unwrap();
    assert_eq!(more.message.seq, 3);
}

//! What a room's message reads before it is staged (the room's id and last
//! seq, whether the sender is a member, a mute), kept by the writer from
//! one message to the next.
//!
//! That read was one statement per message, 15 % of the writer's time in
//! the 100 rooms x 10 members fan-out, and under load it reads the same
//! rows again and again. It can be kept because the writer is the file's
//! only writer (as for the guests in `lib.rs`), and kept exactly because
//! the writer forgets it whenever it could have changed: after every job
//! that is not a plain message (a join, a kick, a mute, a room's removal,
//! an edit...: only a [`Kind::Staging`](crate::writer::Kind) job promises
//! to write nothing but staged rows), and when a batch is rolled back
//! (what it read may have been its own writes). So what is kept was read
//! since the last job that could change it. A mute's end is kept,
//! not whether it is in force: that is judged at each message, as before.
//!
//! A room's last seq is the one value that moves under plain messages:
//! staged rows move it ([`Staged::last_seq`](crate::staged::Staged)), and
//! their flush writes it, which updates it here.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;

use confab_proto::Seq;

/// Senders kept at most; past it the writer starts again from nothing
/// (a few MB; a busy server's senders are re-read once).
const KEPT: usize = 65_536;

/// A room's row as a message reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SenderRoom {
    pub(crate) room_id: i64,
    pub(crate) last_seq: Seq,
    pub(crate) member: bool,
    /// The latest end of a mute of the sender in the room or its hub
    /// (`i64::MAX` for one without an end).
    pub(crate) mute: Option<i64>,
}

struct Entry {
    room: String,
    user_key: String,
    room_id: i64,
    member: bool,
    mute: Option<i64>,
}

#[derive(Default)]
pub(crate) struct Senders {
    /// By a hash of (room name, user key): a key of owned strings would
    /// cost two allocations at every look-up. A hit compares the entry.
    entries: HashMap<u64, Entry>,
    /// Each kept room's last seq as stored (committed, or written by this
    /// transaction's flushes).
    last_seq: HashMap<i64, Seq>,
    hasher: RandomState,
}

impl Senders {
    /// What was read for `user_key` in `room`, if it is kept.
    pub(crate) fn get(&self, room: &str, user_key: &str) -> Option<SenderRoom> {
        let e = self.entries.get(&self.key(room, user_key))?;
        if e.room != room || e.user_key != user_key {
            return None;
        }
        Some(SenderRoom {
            room_id: e.room_id,
            last_seq: *self.last_seq.get(&e.room_id)?,
            member: e.member,
            mute: e.mute,
        })
    }

    /// Keep what was just read from the database.
    pub(crate) fn keep(&mut self, room: &str, user_key: &str, read: SenderRoom) {
        if self.entries.len() >= KEPT {
            self.forget();
        }
        let key = self.key(room, user_key);
        self.entries.insert(
            key,
            Entry {
                room: room.to_owned(),
                user_key: user_key.to_owned(),
                room_id: read.room_id,
                member: read.member,
                mute: read.mute,
            },
        );
        self.last_seq.insert(read.room_id, read.last_seq);
    }

    /// The room's last seq was written.
    pub(crate) fn stored(&mut self, room_id: i64, seq: Seq) {
        if let Some(kept) = self.last_seq.get_mut(&room_id) {
            *kept = seq;
        }
    }

    /// Forget everything: it may no longer be so.
    pub(crate) fn forget(&mut self) {
        self.entries.clear();
        self.last_seq.clear();
    }

    fn key(&self, room: &str, user_key: &str) -> u64 {
        self.hasher.hash_one((room, user_key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(room_id: i64, last_seq: Seq) -> SenderRoom {
        SenderRoom {
            room_id,
            last_seq,
            member: true,
            mute: None,
        }
    }

    #[test]
    fn keeps_by_room_and_sender_and_follows_the_last_seq() {
        let mut s = Senders::default();
        assert_eq!(s.get("r", "ann"), None);
        s.keep("r", "ann", read(1, 5));
        assert_eq!(s.get("r", "ann"), Some(read(1, 5)));
        assert_eq!(s.get("r", "bob"), None);
        assert_eq!(s.get("s", "ann"), None);
        s.stored(1, 7);
        s.stored(2, 9); // not kept: nothing to follow
        assert_eq!(s.get("r", "ann"), Some(read(1, 7)));
        s.keep("r", "bob", read(1, 7));
        s.stored(1, 8);
        assert_eq!(s.get("r", "bob").map(|r| r.last_seq), Some(8));
        s.forget();
        assert_eq!(s.get("r", "ann"), None);
        assert_eq!(s.get("r", "bob"), None);
    }
}

//! Messages stored at the end of their batch: one multi-row `INSERT` for
//! many messages and one `UPDATE` of each room's `last_seq`, instead of an
//! insert and an update per message.
//!
//! A message's append checks everything (the room, the membership, a mute,
//! its nonce) and then *stages* its row here rather than writing it. The
//! writer [flushes](Staged::flush) what is staged before any job that may
//! read or change `messages` or `rooms.last_seq` (every job but another
//! plain message) and before the commit, so such a job sees the database
//! as if each message had been written in its turn. Between two flushes,
//! the appends themselves see the staged rows through [`Staged::last_seq`]
//! and [`Staged::original`]: a room's next seq and an earlier message with
//! the same nonce.
//!
//! Nothing staged is visible outside the writer's connection before the
//! commit, and nothing is acknowledged before it: a flush that fails (an
//! I/O error, a constraint the checks missed) fails the whole batch.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::LazyLock;

use confab_core::store::StoreResult;
use confab_proto::{Message, Seq};
use rusqlite::types::ToSql;
use rusqlite::Connection;

use crate::db_error;
use crate::senders::Senders;

/// Rows in one `INSERT`, largest first: a batch of `n` messages takes
/// `n / 64` statements of 64 rows, then eights, then singles. A few fixed
/// shapes keep every statement prepared once (a statement per count would
/// push the others out of the connection's cache).
const CHUNKS: [usize; 3] = [64, 8, 1];
/// Values in one row of the insert.
const COLUMNS: usize = 9;

struct Row {
    room_id: i64,
    sender_key: String,
    message: Message,
}

/// What the batch's appends staged since the last flush, and what the
/// writer keeps of their rooms and senders between them.
#[derive(Default)]
pub(crate) struct Staged {
    pub(crate) senders: Senders,
    rows: Vec<Row>,
    /// Each room's last seq as its staged rows leave it.
    last_seq: HashMap<i64, Seq>,
    /// The first staged row with each nonce, by a hash of (room, sender
    /// key, nonce): every message with a nonce is looked up here, and a
    /// key of owned strings would cost two allocations each time. A look-up
    /// compares the row itself, so a collision can only hide an earlier
    /// row; its resend is then staged again, breaks the unique nonce index
    /// at the flush, and fails the batch (nothing is acknowledged).
    nonces: HashMap<u64, usize>,
    hasher: RandomState,
}

impl Staged {
    /// Rows staged since the last flush.
    pub(crate) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The room's last seq if a staged row moved it past the stored one.
    pub(crate) fn last_seq(&self, room_id: i64) -> Option<Seq> {
        self.last_seq.get(&room_id).copied()
    }

    /// A staged message of `sender` in the room with this nonce.
    pub(crate) fn original(&self, room_id: i64, sender_key: &str, nonce: &str) -> Option<Message> {
        let &i = self
            .nonces
            .get(&self.nonce_key(room_id, sender_key, nonce))?;
        let row = &self.rows[i];
        let same = row.room_id == room_id
            && row.sender_key == sender_key
            && row.message.nonce.as_deref() == Some(nonce);
        same.then(|| row.message.clone())
    }

    fn nonce_key(&self, room_id: i64, sender_key: &str, nonce: &str) -> u64 {
        self.hasher.hash_one((room_id, sender_key, nonce))
    }

    /// Stage a message as the room's next one (`message.seq` is the
    /// room's last seq + 1, seen through [`Staged::last_seq`]).
    pub(crate) fn push(&mut self, room_id: i64, sender_key: String, message: Message) {
        debug_assert!(self.last_seq(room_id).is_none_or(|s| s + 1 == message.seq));
        self.last_seq.insert(room_id, message.seq);
        if let Some(nonce) = &message.nonce {
            let key = self.nonce_key(room_id, &sender_key, nonce);
            self.nonces.entry(key).or_insert(self.rows.len());
        }
        self.rows.push(Row {
            room_id,
            sender_key,
            message,
        });
    }

    /// Forget everything staged (written, or rolled back with the batch);
    /// what is kept of the senders stays.
    pub(crate) fn clear(&mut self) {
        self.rows.clear();
        self.last_seq.clear();
        self.nonces.clear();
    }

    /// Write what is staged: the rows in the order they were staged, then
    /// each room's `last_seq` once. Empty afterwards, whatever the outcome
    /// (a failure leaves the transaction to be rolled back).
    pub(crate) fn flush(&mut self, conn: &Connection) -> StoreResult<()> {
        let result = self.write(conn);
        if result.is_ok() {
            for (&room_id, &seq) in &self.last_seq {
                self.senders.stored(room_id, seq);
            }
        }
        self.clear();
        result
    }

    fn write(&self, conn: &Connection) -> StoreResult<()> {
        let mut rows = &self.rows[..];
        for size in CHUNKS {
            while rows.len() >= size {
                let (chunk, rest) = rows.split_at(size);
                insert(conn, chunk)?;
                rows = rest;
            }
        }
        let mut update = conn
            .prepare_cached("UPDATE rooms SET last_seq = ?1 WHERE id = ?2")
            .map_err(db_error)?;
        for (room_id, seq) in &self.last_seq {
            update.execute((seq, room_id)).map_err(db_error)?;
        }
        Ok(())
    }
}

/// One `INSERT` of `rows` (one of the [`CHUNKS`] sizes).
fn insert(conn: &Connection, rows: &[Row]) -> StoreResult<()> {
    let sql = CHUNKS
        .iter()
        .position(|&size| size == rows.len())
        .map(|i| INSERTS[i].as_str())
        .expect("a chunk has one of the prepared sizes");
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let mut values: Vec<&dyn ToSql> = Vec::with_capacity(rows.len() * COLUMNS);
    for row in rows {
        let m = &row.message;
        values.extend([
            &row.room_id as &dyn ToSql,
            &m.seq,
            &row.sender_key,
            &m.user,
            &m.body,
            &m.ts,
            &m.nonce,
            &m.edit,
            &m.delete,
        ]);
    }
    stmt.execute(&values[..]).map(drop).map_err(db_error)
}

/// The insert of each of the [`CHUNKS`] sizes.
static INSERTS: LazyLock<[String; CHUNKS.len()]> = LazyLock::new(|| CHUNKS.map(insert_sql));

fn insert_sql(rows: usize) -> String {
    let row = format!("({})", ["?"; COLUMNS].join(", "));
    // OR FAIL: a row that breaks a constraint fails the statement without
    // undoing the rows before it, so SQLite keeps no statement journal
    // for it (with the default, ABORT, a multi-row insert wrote every page
    // it changed to a sub-journal first: a tenth of the writer's time).
    // Nothing is lost by it: a flush that fails aborts the whole batch.
    format!(
        "INSERT OR FAIL INTO messages
         (room_id, seq, sender_key, sender, body, ts, nonce, edit_of, delete_of)
         VALUES {}",
        vec![row; rows].join(", ")
    )
}

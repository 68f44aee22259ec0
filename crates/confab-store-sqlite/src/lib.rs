//! Embedded SQLite storage for Confab: the default backend, a single file
//! created on first start.
//!
//! - [`SqliteStore`]: the [`Store`] implementation.
//! - `writer`: the one thread that writes, committing many jobs per
//!   transaction (group commit).
//! - `staged`: messages written at the end of their batch, many rows per
//!   `INSERT` and each room's `last_seq` once.
//! - `senders`: what a message reads of its room and sender, kept by the
//!   writer between messages.
//! - [`SqliteExport`]: every row read out, for `confab db copy`.
//! - `schema.sql` and [`MIGRATIONS`]: the schema, embedded in the binary and
//!   applied on open by `PRAGMA user_version`.
//!
//! Why rusqlite and not sqlx here: sqlx's SQLite driver runs each connection
//! on a worker thread of its own and hands every statement across a
//! channel. Group commit wants the opposite: one thread that owns the
//! connection and runs a whole batch of jobs without a hop per statement.
//! Reads run on tokio's blocking pool over a small pool of connections,
//! but for reads of a row or two by key (a user at login, a token), which
//! run where they are asked: a hand-off to a pool thread and back costs
//! more than they do ([`SqliteStore::lookup`]).

mod export;
mod senders;
mod staged;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use confab_core::names::HubName;
use confab_core::store::{
    check_amend, check_invite, in_force, last_owner, no_user, not_in_hub, now_ms, private_place,
    sanctioned, stored_role, stored_user_name as user_name, too_many_rooms, Amend, AmendTarget,
    Appended, ChannelView, DirectPeers, HistoryPage, HubDetail, HubJoined, HubView, InviteRow,
    JoinRules, Joined, NewHub, NewInvite, NewMessage, NewSanction, Page, Queued, RemovedUsers,
    RoomView, ServerBan, StoreResult, TokenHash, UserRecord, FIRST_CHANNEL, REMOVED_USERS_KEPT_MS,
};
use confab_core::{RoomName, Store, StoreError, UserName};
use confab_proto::{Message, Role, Sanction, SanctionKind, Seq};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::Semaphore;

use crate::senders::SenderRoom;
use crate::staged::Staged;
use crate::writer::Kind;

pub use export::SqliteExport;
pub use writer::{CommitObserver, WriterStats};

/// The schema, one entry per version; `PRAGMA user_version` says how many
/// have been applied.
pub const MIGRATIONS: &[&str] = &[
    include_str!("schema.sql"),
    include_str!("schema_2.sql"),
    include_str!("schema_3.sql"),
    include_str!("schema_4.sql"),
];

/// Reader connections kept open at most (WAL lets them read concurrently
/// with the writer).
const READERS: usize = 4;

pub struct SqliteStore {
    writer: Arc<writer::Writer>,
    readers: Arc<Readers>,
    guests: Arc<GuestRows>,
    purger: Purger,
}

/// The guests that may hold memberships, by key, so that a guest who
/// joined nothing leaves without a writer job (a thread hand-off there and
/// back, at every guest's disconnect). Exact because this process is the
/// file's only writer (two nodes cannot share a SQLite file): filled from
/// the file on open, marked *before* a write that may add a guest
/// membership is queued, and forgotten only by a [`Store::drop_guest`]
/// whose job was queued after every such write (a generation per name: a
/// write queued after the drop keeps the name).
#[derive(Default)]
struct GuestRows {
    names: Mutex<HashMap<String, u64>>,
}

impl GuestRows {
    /// A write queued after this may add a membership of this guest.
    fn mark(&self, key: &str) {
        let mut names = self.names.lock().expect("guests poisoned");
        match names.get_mut(key) {
            Some(generation) => *generation += 1,
            None => {
                names.insert(key.to_owned(), 0);
            }
        }
    }

    /// The generation to drop, or `None` when the guest holds nothing.
    fn held(&self, key: &str) -> Option<u64> {
        self.names
            .lock()
            .expect("guests poisoned")
            .get(key)
            .copied()
    }

    /// The drop of `generation` is committed: forget the name unless a
    /// write was queued since.
    fn dropped(&self, key: &str, generation: u64) {
        let mut names = self.names.lock().expect("guests poisoned");
        if names.get(key) == Some(&generation) {
            names.remove(key);
        }
    }
}

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    /// Connections for [`SqliteStore::lookup`]: at most one per thread that
    /// calls it at once. They never wait for a lock (busy timeout 0).
    inline: Mutex<Vec<Connection>>,
}

/// How durable a commit is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// fsync on every commit: an acknowledged message survives a power cut.
    #[default]
    Full,
    /// fsync at checkpoints only: survives a crash of the process, not of
    /// the machine.
    Normal,
}

impl SqliteStore {
    /// Open (creating if needed) the database at `path`, and apply pending
    /// migrations.
    pub async fn open(path: impl AsRef<Path>, durability: Durability) -> StoreResult<Self> {
        let path = path.as_ref().to_path_buf();
        let p = path.clone();
        // What the file holds is read here too, off the runtime: a guest
        // row is a scan, and the history a stop left behind its removed
        // room a seek per room.
        let (conn, guests, orphans) = tokio::task::spawn_blocking(move || {
            let conn = open_writer(&p, durability)?;
            let guests = guests_with_rows(&conn)?;
            let orphans = orphaned_rooms(&conn)?;
            Ok::<_, StoreError>((conn, guests, orphans))
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))??;
        // Room for every statement the writer runs, the batch's own too.
        conn.set_prepared_statement_cache_capacity(64);
        let guests = GuestRows {
            names: Mutex::new(guests),
        };
        let writer = Arc::new(writer::Writer::start(conn));
        let purger = Purger::start(&writer);
        purger.purge(orphans);
        Ok(SqliteStore {
            guests: Arc::new(guests),
            writer,
            purger,
            readers: Arc::new(Readers {
                path,
                idle: Mutex::new(Vec::new()),
                permits: Arc::new(Semaphore::new(READERS)),
                inline: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Be told of every commit (once; later calls are ignored).
    pub fn observe_commits(&self, observer: CommitObserver) {
        self.writer.observe(observer);
    }

    /// Counts of the writer's transactions and jobs so far.
    pub fn writer_stats(&self) -> WriterStats {
        self.writer.stats()
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let permit = self
            .readers
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.take()?;
            let result = f(&conn);
            readers.idle.lock().expect("pool poisoned").push(conn);
            drop(permit);
            result
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?
    }

    /// A read of a few rows by key (a user by name, a token), run on the
    /// calling thread. Such a read takes microseconds from cached pages,
    /// less than handing it to a pool thread and waking the caller again
    /// (BENCHMARKS.md: server CPU per guest login fell by up to a fifth). A
    /// read that would wait for a lock (WAL readers rarely do) is not waited
    /// for here but run again on the pool, which waits; anything that scans
    /// goes to the pool ([`SqliteStore::read`]) from the start.
    async fn lookup<T: Send + 'static>(
        &self,
        f: impl Fn(&Connection) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        match self.readers.inline(&f) {
            Some(Err(StoreError::Unavailable(_))) | None => self.read(move |c| f(c)).await,
            Some(done) => done,
        }
    }
}

impl Readers {
    fn take(&self) -> StoreResult<Connection> {
        if let Some(conn) = self.idle.lock().expect("pool poisoned").pop() {
            return Ok(conn);
        }
        self.open(std::time::Duration::from_secs(5))
    }

    fn open(&self, busy_timeout: std::time::Duration) -> StoreResult<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db_error)?;
        conn.busy_timeout(busy_timeout).map_err(db_error)?;
        Ok(conn)
    }

    /// Run `f` here on an inline connection; `None` if none could be had.
    fn inline<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> Option<StoreResult<T>> {
        let idle = self.inline.lock().expect("pool poisoned").pop();
        let conn = match idle {
            Some(conn) => conn,
            None => self.open(std::time::Duration::ZERO).ok()?,
        };
        let result = f(&conn);
        self.inline.lock().expect("pool poisoned").push(conn);
        Some(result)
    }
}

/// The schema version of the database file at `path` (without changing
/// it), and this binary's; `None` when there is no file yet.
pub fn schema_version(path: &Path) -> StoreResult<Option<(u32, u32)>> {
    if !path.exists() {
        return Ok(None);
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db_error)?;
    let version: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_error)?;
    Ok(Some((version, MIGRATIONS.len() as u32)))
}

fn open_writer(path: &Path, durability: Durability) -> StoreResult<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Unavailable(format!("creating {}: {e}", dir.display())))?;
    }
    let mut conn = Connection::open(path).map_err(db_error)?;
    let sync = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA busy_timeout = 5000;"
    ))
    .map_err(db_error)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Every guest that holds a membership in the file, for [`GuestRows`].
fn guests_with_rows(conn: &Connection) -> StoreResult<HashMap<String, u64>> {
    conn.prepare("SELECT DISTINCT user_key FROM members WHERE guest = 1")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, 0)))?.collect())
        .map_err(db_error)
}

fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let applied: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_error)?;
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "the database has schema version {applied}, newer than this server's {}",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction().map_err(db_error)?;
        tx.execute_batch(sql).map_err(db_error)?;
        tx.pragma_update(None, "user_version", i + 1)
            .map_err(db_error)?;
        tx.commit().map_err(db_error)?;
        tracing::info!(version = i + 1, "applied migration");
    }
    Ok(())
}

/// Change a user's row (`Invalid` when there is no such user).
fn update_user(
    conn: &Connection,
    user: &UserName,
    sql: &str,
    args: impl rusqlite::Params,
) -> StoreResult<()> {
    match conn.execute(sql, args).map_err(db_error)? {
        0 => Err(no_user(user)),
        _ => Ok(()),
    }
}

/// `SELECT` of the columns [`user_record`] reads, of `users u`, and the
/// rest of the query: one string made at compile time (these run at every
/// login).
macro_rules! select_user {
    ($rest:literal) => {
        concat!(
            "SELECT u.name, u.password_hash, u.banned, u.ban_reason, u.ban_until ",
            $rest
        )
    };
}

/// The one user a query of [`select_user!`] finds.
fn user_record(
    conn: &Connection,
    sql: &str,
    key: impl rusqlite::ToSql,
) -> StoreResult<Option<UserRecord>> {
    type Row = (String, String, bool, Option<String>, Option<i64>);
    let row: Option<Row> = conn
        .prepare_cached(sql)
        .and_then(|mut s| {
            s.query_row([key], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()
        })
        .map_err(db_error)?;
    row.map(|(name, password_hash, banned, reason, until_ts)| {
        Ok(UserRecord {
            name: user_name(name)?,
            password_hash,
            banned: banned.then(|| ServerBan {
                reason: reason.unwrap_or_default(),
                until_ts,
            }),
        })
    })
    .transpose()
}

/// A hub's name from its room's name (`hub/`), as stored.
fn stored_hub(room: &str) -> StoreResult<HubName> {
    room.strip_suffix('/')
        .and_then(|hub| HubName::parse(hub).ok())
        .ok_or_else(|| StoreError::Internal(format!("stored hub room {room:?}")))
}

pub(crate) fn db_error(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match e.sqlite_error_code() {
        Some(DatabaseBusy | DatabaseLocked | DiskFull | CannotOpen | SystemIoFailure) => {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

/// The room's id and last seq.
fn room_row(conn: &Connection, room: &str) -> StoreResult<Option<(i64, Seq)>> {
    conn.prepare_cached("SELECT id, last_seq FROM rooms WHERE name = ?1")
        .and_then(|mut s| {
            s.query_row([room], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db_error)
}

/// The room's id and last seq, if `user` is a member.
fn member_room(conn: &Connection, room: &RoomName, user: &UserName) -> StoreResult<(i64, Seq)> {
    let (id, last) = room_row(conn, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
    if !is_member(conn, id, user)? {
        return Err(StoreError::NotMember);
    }
    Ok((id, last))
}

/// Insert a membership if absent; returns whether it is new.
fn add_member(
    conn: &Connection,
    room_id: i64,
    user: &UserName,
    guest: bool,
    role: Role,
) -> StoreResult<bool> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO members (room_id, user_key, user_name, guest, joined_at, role)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )
    .and_then(|mut s| {
        s.execute(params![
            room_id,
            user.key(),
            user.as_str(),
            guest,
            now_ms(),
            role.rank()
        ])
    })
    .map(|n| n == 1)
    .map_err(db_error)
}

fn sanction_kind(kind: SanctionKind) -> i64 {
    match kind {
        SanctionKind::Ban => 0,
        SanctionKind::Mute => 1,
    }
}

/// Refuse a user with a ban or mute of `kind` in force in the room or in
/// its hub (on joining; a message's append reads mutes in
/// [`sender_room`]).
fn refuse_sanctioned(
    conn: &Connection,
    room_id: i64,
    room: &RoomName,
    user: &UserName,
    kind: SanctionKind,
) -> StoreResult<()> {
    let ends: Vec<Option<i64>> = conn
        .prepare_cached(
            "SELECT until_ts FROM sanctions WHERE user_key = ?2 AND kind = ?3
               AND room_id IN (?1, (SELECT hub_id FROM rooms WHERE id = ?1))",
        )
        .and_then(|mut s| {
            s.query_map(params![room_id, user.key(), sanction_kind(kind)], |r| {
                r.get(0)
            })?
            .collect()
        })
        .map_err(db_error)?;
    let now = now_ms();
    match ends.into_iter().find(|until| in_force(*until, now)) {
        Some(until) => Err(sanctioned(kind, room, until)),
        None => Ok(()),
    }
}

/// A room's hub (the id of the hub's own room), for a channel, and
/// whether the room is private.
fn hub_of(conn: &Connection, room_id: i64) -> StoreResult<(Option<i64>, bool)> {
    conn.prepare_cached("SELECT hub_id, private FROM rooms WHERE id = ?1")
        .and_then(|mut s| s.query_row([room_id], |r| Ok((r.get(0)?, r.get(1)?))))
        .map_err(db_error)
}

/// The room whose roles and bans count in `room_id` too: its hub's.
fn authority(conn: &Connection, room_id: i64) -> StoreResult<i64> {
    Ok(hub_of(conn, room_id)?.0.unwrap_or(room_id))
}

fn is_member(conn: &Connection, room_id: i64, user: &UserName) -> StoreResult<bool> {
    conn.prepare_cached("SELECT 1 FROM members WHERE room_id = ?1 AND user_key = ?2")
        .and_then(|mut s| s.exists(params![room_id, user.key()]))
        .map_err(db_error)
}

/// Let `user` into `place` with the invite `code`, spending it if it is a
/// single user's.
fn redeem(
    conn: &Connection,
    code: Option<&str>,
    place: &RoomName,
    user: &UserName,
) -> StoreResult<()> {
    let code = code.ok_or_else(|| private_place(place))?;
    let row = conn
        .prepare_cached(
            "SELECT r.name, i.user_key, i.expires_ts FROM invites i
             JOIN rooms r ON r.id = i.room_id WHERE i.code = ?1",
        )
        .and_then(|mut s| {
            s.query_row([code], |r| {
                Ok(InviteRow {
                    room: RoomName::from_trusted(r.get(0)?),
                    user_key: r.get(1)?,
                    expires_ts: r.get(2)?,
                })
            })
            .optional()
        })
        .map_err(db_error)?;
    if check_invite(row.as_ref(), place, user, now_ms())? {
        conn.execute("DELETE FROM invites WHERE code = ?1", [code])
            .map_err(db_error)?;
    }
    Ok(())
}

/// Remove `user` from the room `room_id` and, for a hub's room, from its
/// channels; returns the rooms left, the hub's own first.
fn remove_member(conn: &Connection, room_id: i64, user: &UserName) -> StoreResult<Vec<RoomName>> {
    let names: Vec<String> = conn
        .prepare_cached(
            "DELETE FROM members WHERE user_key = ?2
               AND room_id IN (SELECT id FROM rooms WHERE id = ?1 OR hub_id = ?1)
             RETURNING (SELECT name FROM rooms WHERE id = room_id)",
        )
        .and_then(|mut s| {
            s.query_map(params![room_id, user.key()], |r| r.get(0))?
                .collect()
        })
        .map_err(db_error)?;
    let mut rooms: Vec<RoomName> = names.into_iter().map(RoomName::from_trusted).collect();
    rooms.sort_by(|a, b| (!a.is_hub_room(), a).cmp(&(!b.is_hub_room(), b)));
    Ok(rooms)
}

/// Refuse to take the owner role from a room's only owner.
fn keep_an_owner(
    conn: &Connection,
    room_id: i64,
    room: &RoomName,
    user: &UserName,
) -> StoreResult<()> {
    let (now, owners): (Option<i64>, i64) = conn
        .prepare_cached(
            "SELECT (SELECT role FROM members WHERE room_id = ?1 AND user_key = ?2),
                    (SELECT COUNT(*) FROM members WHERE room_id = ?1 AND role = ?3)",
        )
        .and_then(|mut s| {
            s.query_row(params![room_id, user.key(), Role::Owner.rank()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
        .map_err(db_error)?;
    if now == Some(Role::Owner.rank() as i64) && owners == 1 {
        return Err(last_owner(user, room));
    }
    Ok(())
}

/// Check an edit or deletion of the room's message and apply it to the
/// message (and, for a deletion, its edit entries).
fn apply_amend(conn: &Connection, room_id: i64, m: &NewMessage, amend: Amend) -> StoreResult<()> {
    let seq = amend.target() as i64;
    let target = conn
        .prepare_cached(
            "SELECT sender_key, edit_of IS NOT NULL OR delete_of IS NOT NULL, deleted
             FROM messages WHERE room_id = ?1 AND seq = ?2",
        )
        .and_then(|mut s| {
            s.query_row(params![room_id, seq], |r| {
                Ok(AmendTarget {
                    sender_key: r.get(0)?,
                    is_amend: r.get(1)?,
                    deleted: r.get(2)?,
                })
            })
            .optional()
        })
        .map_err(db_error)?;
    check_amend(amend, &m.sender, target.as_ref())?;
    let (sql, args) = match amend {
        Amend::Edit(_) => (
            "UPDATE messages SET body = ?3, edited_ts = ?4 WHERE room_id = ?1 AND seq = ?2",
            params![room_id, seq, m.body, m.ts],
        ),
        Amend::Delete { .. } => (
            "UPDATE messages SET body = '', deleted = (seq = ?2)
             WHERE room_id = ?1 AND (seq = ?2 OR edit_of = ?2)",
            params![room_id, seq],
        ),
    };
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute(args))
        .map_err(db_error)?;
    Ok(())
}

fn create_room(conn: &Connection, room: &RoomName, by_guest: bool) -> StoreResult<i64> {
    let id = new_room_id(conn)?;
    conn.prepare_cached(
        "INSERT INTO rooms (id, name, direct, guest_created, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.insert(params![
            id,
            room.as_str(),
            room.is_direct(),
            by_guest,
            now_ms()
        ])
    })
    .map_err(db_error)
}

/// Remove guest-created rooms that nobody is in any more: the one room
/// `id`, or every such room. Their history goes after them, a chunk at a
/// time ([`Purger`]): the ids returned.
fn sweep_guest_rooms(conn: &Connection, id: Option<i64>) -> StoreResult<Vec<i64>> {
    let ids: Vec<i64> = conn
        .prepare_cached(
            "SELECT id FROM rooms r WHERE r.guest_created = 1
             AND (?1 IS NULL OR r.id = ?1)
             AND NOT EXISTS (SELECT 1 FROM members m WHERE m.room_id = r.id)",
        )
        .and_then(|mut s| s.query_map([id], |r| r.get(0))?.collect())
        .map_err(db_error)?;
    for &id in &ids {
        remove_room_row(conn, id)?;
    }
    Ok(ids)
}

/// Remove a room but for its history (left to the [`Purger`]).
fn remove_room_row(conn: &Connection, id: i64) -> StoreResult<()> {
    for table in ["sanctions", "invites"] {
        conn.prepare_cached(&format!("DELETE FROM {table} WHERE room_id = ?1"))
            .and_then(|mut s| s.execute([id]))
            .map_err(db_error)?;
    }
    conn.prepare_cached("DELETE FROM rooms WHERE id = ?1")
        .and_then(|mut s| s.execute([id]))
        .map_err(db_error)?;
    Ok(())
}

/// The id for a new room: past every room's, and past every id whose
/// history is still being purged, so that no room is ever handed the
/// messages of one removed before it.
fn new_room_id(conn: &Connection) -> StoreResult<i64> {
    conn.prepare_cached(
        "SELECT max((SELECT coalesce(max(id), 0) FROM rooms),
                    (SELECT coalesce(max(room_id), 0) FROM messages)) + 1",
    )
    .and_then(|mut s| s.query_row([], |r| r.get(0)))
    .map_err(db_error)
}

/// Rows of a removed room's history deleted per writer job. A room removed
/// with a long history must not hold the writer, and with it every other
/// room's messages, for as long as deleting all of it takes (200,000
/// messages: 0.25 to 1 s in one commit, the WAL grown to 70 MB). Messages
/// are stored in the order they came (`schema_4.sql`), so a room's rows
/// are spread over the pages of every room that spoke meanwhile, and each
/// row deleted may be a page written: 2,000 took 40-48 ms where all rooms
/// had taken turns, 256 take 2-5 ms.
#[cfg(not(test))]
const PURGE_CHUNK: i64 = 256;
#[cfg(test)]
const PURGE_CHUNK: i64 = 10;

/// Deletes the history of removed rooms behind their removal, a chunk
/// of [`PURGE_CHUNK`] messages per writer job, so that the jobs of
/// everyone else run in between. What a stop leaves is found when the file
/// is opened again ([`orphaned_rooms`]). Nothing reads such history
/// meanwhile: every read finds its room by name first, and a removed room's
/// id is never handed out again while history remains ([`new_room_id`]).
struct Purger {
    rooms: tokio::sync::mpsc::UnboundedSender<i64>,
    /// Rooms whose history is not yet all deleted.
    pending: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Purger {
    /// A task that runs the chunks while the store is alive.
    fn start(writer: &Arc<writer::Writer>) -> Purger {
        let (rooms, mut queue) = tokio::sync::mpsc::unbounded_channel::<i64>();
        let pending = Arc::new(tokio::sync::watch::Sender::new(0));
        let (writer, left) = (Arc::downgrade(writer), pending.clone());
        tokio::spawn(async move {
            while let Some(id) = queue.recv().await {
                loop {
                    let Some(writer) = writer.upgrade() else {
                        return; // the store is gone: the next open goes on
                    };
                    match writer.run(move |c| purge_chunk(c, id)).await {
                        Ok(true) => continue,
                        Ok(false) => break,
                        Err(e) => {
                            tracing::warn!(room_id = id, error = %e,
                                "deleting a removed room's history failed; the next start goes on");
                            break;
                        }
                    }
                }
                left.send_modify(|n| *n -= 1);
            }
        });
        Purger { rooms, pending }
    }

    fn purge(&self, ids: Vec<i64>) {
        for id in ids {
            self.pending.send_modify(|n| *n += 1);
            if self.rooms.send(id).is_err() {
                self.pending.send_modify(|n| *n -= 1);
            }
        }
    }
}

/// Delete the oldest chunk of a removed room's history; whether any was
/// left to delete.
fn purge_chunk(c: &Connection, room_id: i64) -> StoreResult<bool> {
    let first: Option<Seq> = c
        .prepare_cached("SELECT min(seq) FROM messages WHERE room_id = ?1")
        .and_then(|mut s| s.query_row([room_id], |r| r.get(0)))
        .map_err(db_error)?;
    let Some(first) = first else {
        return Ok(false);
    };
    c.prepare_cached("DELETE FROM messages WHERE room_id = ?1 AND seq < ?2")
        .and_then(|mut s| s.execute(params![room_id, first as i64 + PURGE_CHUNK]))
        .map_err(db_error)?;
    Ok(true)
}

/// Ids that have history but no room: rooms removed before a stop let
/// their history be deleted. A seek per room id in `messages_by_seq`.
fn orphaned_rooms(c: &Connection) -> StoreResult<Vec<i64>> {
    let mut next = c
        .prepare("SELECT room_id FROM messages WHERE room_id > ?1 ORDER BY room_id LIMIT 1")
        .map_err(db_error)?;
    let mut room = c
        .prepare("SELECT 1 FROM rooms WHERE id = ?1")
        .map_err(db_error)?;
    let (mut orphans, mut after) = (Vec::new(), i64::MIN);
    while let Some(id) = next
        .query_row([after], |r| r.get::<_, i64>(0))
        .optional()
        .map_err(db_error)?
    {
        if !room.exists([id]).map_err(db_error)? {
            orphans.push(id);
        }
        after = id;
    }
    Ok(orphans)
}

const MESSAGE_COLUMNS: &str =
    "seq, sender, body, ts, nonce, edit_of, delete_of, edited_ts, deleted";

fn message_row(room: &str, r: &rusqlite::Row<'_>) -> rusqlite::Result<Message> {
    Ok(Message {
        room: room.to_owned(),
        seq: r.get(0)?,
        user: r.get(1)?,
        body: r.get(2)?,
        ts: r.get(3)?,
        nonce: r.get(4)?,
        edit: r.get(5)?,
        delete: r.get(6)?,
        edited_ts: r.get(7)?,
        deleted: r.get(8)?,
    })
}

fn query_messages(
    conn: &Connection,
    room: &str,
    sql: &str,
    args: impl rusqlite::Params,
) -> StoreResult<Vec<Message>> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_error)?;
    let rows = stmt
        .query_map(args, |r| message_row(room, r))
        .map_err(db_error)?;
    rows.collect::<Result<_, _>>().map_err(db_error)
}

/// What a message's append reads of its room in one statement (unless the
/// writer kept it, `senders.rs`): the room's id and last seq, whether the
/// sender is a member, and the latest end of a mute of the sender in the
/// room or its hub (`i64::MAX` for one without an end). The two mutes are
/// two lookups by key: `room_id IN (r.id, r.hub_id)` built a temporary
/// table on every message (a third of the statement's time).
fn sender_room(conn: &Connection, room: &RoomName, user: &UserName) -> StoreResult<SenderRoom> {
    conn.prepare_cached(
        "SELECT r.id, r.last_seq,
                EXISTS (SELECT 1 FROM members m WHERE m.room_id = r.id AND m.user_key = ?2),
                (SELECT COALESCE(s.until_ts, 9223372036854775807) FROM sanctions s
                  WHERE s.room_id = r.id AND s.user_key = ?2 AND s.kind = 1),
                (SELECT COALESCE(s.until_ts, 9223372036854775807) FROM sanctions s
                  WHERE s.room_id = r.hub_id AND s.user_key = ?2 AND s.kind = 1)
         FROM rooms r WHERE r.name = ?1",
    )
    .and_then(|mut s| {
        s.query_row(params![room.as_str(), user.key()], |r| {
            let (room, hub): (Option<i64>, Option<i64>) = (r.get(3)?, r.get(4)?);
            Ok(SenderRoom {
                room_id: r.get(0)?,
                last_seq: r.get(1)?,
                member: r.get(2)?,
                mute: room.max(hub),
            })
        })
        .optional()
    })
    .map_err(db_error)?
    .ok_or(StoreError::NoSuchRoom)
}

/// Check a message and stage it as its room's next one (written with the
/// rest of its batch, [`staged`]). Amends and direct messages run after a
/// flush, so for them `staged` holds nothing yet.
fn append(conn: &Connection, staged: &mut Staged, m: NewMessage) -> StoreResult<Appended> {
    let mut new_members = Vec::new();
    let mut muted_until = None;
    let (room_id, last_seq) = match &m.direct {
        Some(DirectPeers {
            sender_guest,
            peer,
            peer_guest,
        }) => {
            let (id, last) = match room_row(conn, m.room.as_str())? {
                Some(row) => row,
                None => (create_room(conn, &m.room, *sender_guest)?, 0),
            };
            if add_member(conn, id, &m.sender, *sender_guest, Role::Member)? {
                new_members.push(m.sender.clone());
            }
            if add_member(conn, id, peer, *peer_guest, Role::Member)? {
                new_members.push(peer.clone());
            }
            (id, last)
        }
        None => {
            let (room, user) = (m.room.as_str(), m.sender.key());
            let read = match staged.senders.get(room, user) {
                Some(kept) => kept,
                None => {
                    let read = sender_room(conn, &m.room, &m.sender)?;
                    staged.senders.keep(room, user, read);
                    read
                }
            };
            if !read.member && !Amend::by_moderator(m.amend) {
                return Err(StoreError::NotMember);
            }
            muted_until = read.mute;
            (read.room_id, read.last_seq)
        }
    };
    let last_seq = staged.last_seq(room_id).unwrap_or(last_seq);
    if let Some(nonce) = &m.nonce {
        if let Some(message) = original(conn, staged, room_id, &m, nonce)? {
            return Ok(Appended {
                message,
                duplicate: true,
                new_members,
            });
        }
    }
    let speaks = !matches!(m.amend, Some(Amend::Delete { .. }));
    if let Some(end) = muted_until.filter(|end| speaks && *end > now_ms()) {
        let until = (end != i64::MAX).then_some(end);
        return Err(sanctioned(SanctionKind::Mute, &m.room, until));
    }
    if let Some(amend) = m.amend {
        apply_amend(conn, room_id, &m, amend)?;
    }
    let sender_key = m.sender.key().to_owned();
    let message = m.stored_as(last_seq + 1);
    staged.push(room_id, sender_key, message.clone());
    Ok(Appended {
        message,
        duplicate: false,
        new_members,
    })
}

/// The sender's earlier message in the room with this nonce, staged or
/// stored.
fn original(
    conn: &Connection,
    staged: &Staged,
    room_id: i64,
    m: &NewMessage,
    nonce: &str,
) -> StoreResult<Option<Message>> {
    if let Some(message) = staged.original(room_id, m.sender.key(), nonce) {
        return Ok(Some(message));
    }
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM messages
         WHERE room_id = ?1 AND sender_key = ?2 AND nonce = ?3"
    );
    let stored = query_messages(
        conn,
        m.room.as_str(),
        &sql,
        params![room_id, m.sender.key(), nonce],
    )?;
    Ok(stored.into_iter().next())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_user(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        let (name, hash) = (name.clone(), password_hash.to_owned());
        self.writer
            .run(move |c| {
                let n = c
                    .prepare_cached(
                        "INSERT OR IGNORE INTO users (key, name, password_hash, created_at)
                         VALUES (?1, ?2, ?3, ?4)",
                    )
                    .and_then(|mut s| s.execute(params![name.key(), name.as_str(), hash, now_ms()]))
                    .map_err(db_error)?;
                if n == 0 {
                    return Err(StoreError::Conflict(format!("user name {name}")));
                }
                Ok(())
            })
            .await
    }

    async fn user(&self, name: &UserName) -> StoreResult<Option<UserRecord>> {
        let key = name.key().to_owned();
        self.lookup(move |c| user_record(c, select_user!("FROM users u WHERE u.key = ?1"), &key))
            .await
    }

    async fn set_password(&self, name: &UserName, password_hash: &str) -> StoreResult<()> {
        let (name, hash) = (name.clone(), password_hash.to_owned());
        self.writer
            .run(move |c| {
                update_user(
                    c,
                    &name,
                    "UPDATE users SET password_hash = ?2 WHERE key = ?1",
                    params![name.key(), hash],
                )?;
                c.execute("DELETE FROM tokens WHERE user_key = ?1", [name.key()])
                    .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn list_users(&self) -> StoreResult<Vec<UserName>> {
        self.read(|c| {
            let names: Vec<String> = c
                .prepare("SELECT name FROM users ORDER BY key")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(db_error)?;
            names.into_iter().map(user_name).collect()
        })
        .await
    }

    async fn delete_user(&self, name: &UserName) -> StoreResult<()> {
        let name = name.clone();
        self.writer
            .run(move |c| {
                let shown: String = c
                    .query_row(
                        "DELETE FROM users WHERE key = ?1 RETURNING name",
                        [name.key()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_error)?
                    .ok_or_else(|| no_user(&name))?;
                c.execute("DELETE FROM tokens WHERE user_key = ?1", [name.key()])
                    .map_err(db_error)?;
                c.execute("DELETE FROM members WHERE user_key = ?1", [name.key()])
                    .map_err(db_error)?;
                let now = now_ms();
                c.execute(
                    "DELETE FROM removed_users WHERE removed_at < ?1",
                    [now - REMOVED_USERS_KEPT_MS],
                )
                .map_err(db_error)?;
                c.execute(
                    "INSERT INTO removed_users (user_name, removed_at) VALUES (?1, ?2)",
                    params![shown, now],
                )
                .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn removed_users(&self, after: Option<u64>) -> StoreResult<RemovedUsers> {
        self.read(move |c| {
            // AUTOINCREMENT never hands out an id twice, even after pruning,
            // so the sequence's value is the cursor of the newest entry.
            let last: u64 = c
                .query_row(
                    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'removed_users'), 0)",
                    [],
                    |r| r.get(0),
                )
                .map_err(db_error)?;
            let Some(after) = after else {
                return Ok(RemovedUsers {
                    cursor: last,
                    users: Vec::new(),
                });
            };
            let rows: Vec<(u64, String)> = c
                .prepare_cached(
                    "SELECT id, user_name FROM removed_users WHERE id > ?1 ORDER BY id",
                )
                .and_then(|mut s| {
                    s.query_map([after], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect()
                })
                .map_err(db_error)?;
            Ok(RemovedUsers {
                cursor: rows.last().map_or(after.max(last), |(id, _)| *id),
                users: rows
                    .into_iter()
                    .map(|(_, name)| user_name(name))
                    .collect::<StoreResult<_>>()?,
            })
        })
        .await
    }

    async fn create_token(&self, user: &UserName, token: &TokenHash) -> StoreResult<()> {
        let (key, token) = (user.key().to_owned(), *token);
        self.writer
            .run(move |c| {
                c.prepare_cached(
                    "INSERT INTO tokens (hash, user_key, created_at) VALUES (?1, ?2, ?3)",
                )
                .and_then(|mut s| s.execute(params![&token[..], key, now_ms()]))
                .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn token_user(&self, token: &TokenHash) -> StoreResult<Option<UserRecord>> {
        let token = *token;
        self.lookup(move |c| {
            let sql =
                select_user!("FROM tokens t JOIN users u ON u.key = t.user_key WHERE t.hash = ?1");
            user_record(c, sql, &token[..])
        })
        .await
    }

    async fn ban_user(&self, user: &UserName, ban: ServerBan) -> StoreResult<()> {
        let user = user.clone();
        self.writer
            .run(move |c| {
                update_user(
                    c,
                    &user,
                    "UPDATE users SET banned = 1, ban_reason = ?2, ban_until = ?3 WHERE key = ?1",
                    params![user.key(), ban.reason, ban.until_ts],
                )
            })
            .await
    }

    async fn unban_user(&self, user: &UserName) -> StoreResult<bool> {
        let user = user.clone();
        self.writer
            .run(move |c| {
                let until: Option<Option<i64>> = c
                    .query_row(
                        "UPDATE users SET banned = 0, ban_reason = NULL, ban_until = NULL
                         WHERE key = ?1 AND banned = 1 RETURNING ban_until",
                        [user.key()],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(db_error)?;
                Ok(until.is_some_and(|until| in_force(until, now_ms())))
            })
            .await
    }

    async fn revoke_token(&self, token: &TokenHash) -> StoreResult<()> {
        let token = *token;
        self.writer
            .run(move |c| {
                c.prepare_cached("DELETE FROM tokens WHERE hash = ?1")
                    .and_then(|mut s| s.execute([&token[..]]))
                    .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn join(
        &self,
        room: &RoomName,
        user: &UserName,
        rules: JoinRules,
    ) -> StoreResult<Joined> {
        let (room, user) = (room.clone(), user.clone());
        if rules.guest {
            self.guests.mark(user.key());
        }
        self.writer
            .run(move |c| {
                let id = match room_row(c, room.as_str())? {
                    Some((id, _)) => Some(id),
                    // Channels are made by create_channel only.
                    None if rules.create && room.hub().is_none() => None,
                    None => return Err(StoreError::NoSuchRoom),
                };
                let member = match id {
                    Some(id) => c
                        .prepare_cached(
                            "SELECT 1 FROM members WHERE room_id = ?1 AND user_key = ?2",
                        )
                        .and_then(|mut s| s.exists(params![id, user.key()]))
                        .map_err(db_error)?,
                    None => false,
                };
                if !member && rules.max_rooms != u32::MAX {
                    let public: u32 = c
                        .prepare_cached(
                            "SELECT COUNT(*) FROM members m JOIN rooms r ON r.id = m.room_id
                             WHERE m.user_key = ?1 AND r.direct = 0",
                        )
                        .and_then(|mut s| s.query_row([user.key()], |r| r.get(0)))
                        .map_err(db_error)?;
                    if public >= rules.max_rooms {
                        return Err(too_many_rooms(rules.max_rooms));
                    }
                }
                let (id, role) = match id {
                    Some(id) => {
                        if !member {
                            refuse_sanctioned(c, id, &room, &user, SanctionKind::Ban)?;
                            if let (Some(hub), private) = hub_of(c, id)? {
                                if !is_member(c, hub, &user)? {
                                    return Err(not_in_hub(&room.hub().expect("a channel")));
                                }
                                if private {
                                    redeem(c, rules.invite.as_deref(), &room, &user)?;
                                }
                            }
                        }
                        (id, Role::Member)
                    }
                    None => (create_room(c, &room, rules.guest)?, Role::Owner),
                };
                let newly_joined = add_member(c, id, &user, rules.guest, role)?;
                let (topic, last_seq) = c
                    .prepare_cached("SELECT topic, last_seq FROM rooms WHERE id = ?1")
                    .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))))
                    .map_err(db_error)?;
                Ok(Joined {
                    topic,
                    last_seq,
                    newly_joined,
                })
            })
            .await
    }

    async fn leave(&self, room: &RoomName, user: &UserName) -> StoreResult<()> {
        let (room, user) = (room.clone(), user.clone());
        let removed = self
            .writer
            .run(move |c| {
                let (id, _) = member_room(c, &room, &user)?;
                c.prepare_cached("DELETE FROM members WHERE room_id = ?1 AND user_key = ?2")
                    .and_then(|mut s| s.execute(params![id, user.key()]))
                    .map_err(db_error)?;
                sweep_guest_rooms(c, Some(id))
            })
            .await?;
        self.purger.purge(removed);
        Ok(())
    }

    async fn drop_guest(&self, user: &UserName) -> StoreResult<Vec<RoomName>> {
        let Some(generation) = self.guests.held(user.key()) else {
            return Ok(Vec::new());
        };
        let key = user.key().to_owned();
        let (left, removed) = self
            .writer
            .run(move |c| {
                let rooms: Vec<(i64, String)> = c
                    .prepare_cached(
                        "DELETE FROM members WHERE user_key = ?1 AND guest = 1
                         RETURNING room_id, (SELECT name FROM rooms WHERE id = room_id)",
                    )
                    .and_then(|mut s| {
                        s.query_map([key], |r| Ok((r.get(0)?, r.get(1)?)))?
                            .collect::<Result<_, _>>()
                    })
                    .map_err(db_error)?;
                let mut removed = Vec::new();
                for (id, _) in &rooms {
                    removed.extend(sweep_guest_rooms(c, Some(*id))?);
                }
                let left = rooms
                    .into_iter()
                    .map(|(_, name)| RoomName::from_trusted(name))
                    .collect();
                Ok((left, removed))
            })
            .await?;
        self.purger.purge(removed);
        self.guests.dropped(user.key(), generation);
        Ok(left)
    }

    async fn drop_all_guests(&self) -> StoreResult<()> {
        // A guest write queued meanwhile runs after this one and keeps its
        // mark; the marks of before go once this has committed.
        let before: Vec<(String, u64)> = {
            let names = self.guests.names.lock().expect("guests poisoned");
            names.iter().map(|(k, g)| (k.clone(), *g)).collect()
        };
        let removed = self
            .writer
            .run(|c| {
                c.execute("DELETE FROM members WHERE guest = 1", [])
                    .map_err(db_error)?;
                sweep_guest_rooms(c, None)
            })
            .await?;
        self.purger.purge(removed);
        for (key, generation) in before {
            self.guests.dropped(&key, generation);
        }
        Ok(())
    }

    async fn members(
        &self,
        room: &RoomName,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(UserName, Role)>> {
        let (room, after) = (room.clone(), after.unwrap_or("").to_owned());
        self.read(move |c| {
            let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
            // In a channel, the roles are the hub's.
            let roles = authority(c, id)?;
            let rows: Vec<(String, i64)> = c
                .prepare_cached(
                    "SELECT m.user_name, COALESCE(h.role, m.role) FROM members m
                     LEFT JOIN members h ON h.room_id = ?4 AND h.user_key = m.user_key
                     WHERE m.room_id = ?1 AND m.user_key > ?2
                     ORDER BY m.user_key LIMIT ?3",
                )
                .and_then(|mut s| {
                    s.query_map(params![id, after, limit, roles], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect()
                })
                .map_err(db_error)?;
            rows.into_iter()
                .map(|(name, role)| Ok((user_name(name)?, stored_role(role)?)))
                .collect()
        })
        .await
    }

    async fn role(&self, room: &RoomName, user: &UserName) -> StoreResult<Option<Role>> {
        let (room, key) = (room.clone(), user.key().to_owned());
        self.read(move |c| {
            let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
            let id = authority(c, id)?;
            let role: Option<i64> = c
                .prepare_cached("SELECT role FROM members WHERE room_id = ?1 AND user_key = ?2")
                .and_then(|mut s| s.query_row(params![id, key], |r| r.get(0)).optional())
                .map_err(db_error)?;
            role.map(stored_role).transpose()
        })
        .await
    }

    async fn set_role(&self, room: &RoomName, user: &UserName, role: Role) -> StoreResult<()> {
        let (room, user) = (room.clone(), user.clone());
        self.writer
            .run(move |c| {
                let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                let id = authority(c, id)?;
                if !is_member(c, id, &user)? {
                    return Err(StoreError::NotMember);
                }
                if role != Role::Owner {
                    keep_an_owner(c, id, &room, &user)?;
                }
                c.prepare_cached(
                    "UPDATE members SET role = ?3 WHERE room_id = ?1 AND user_key = ?2",
                )
                .and_then(|mut s| s.execute(params![id, user.key(), role.rank()]))
                .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn operator(&self, user: &UserName) -> StoreResult<bool> {
        let key = user.key().to_owned();
        self.lookup(move |c| {
            c.prepare_cached("SELECT operator FROM users WHERE key = ?1")
                .and_then(|mut s| s.query_row([&key], |r| r.get(0)).optional())
                .map(|op| op.unwrap_or(false))
                .map_err(db_error)
        })
        .await
    }

    async fn set_operator(&self, user: &UserName, operator: bool) -> StoreResult<()> {
        let user = user.clone();
        self.writer
            .run(move |c| {
                update_user(
                    c,
                    &user,
                    "UPDATE users SET operator = ?2 WHERE key = ?1",
                    params![user.key(), operator],
                )
            })
            .await
    }

    async fn sanction(&self, room: &RoomName, sanction: NewSanction) -> StoreResult<Vec<RoomName>> {
        let room = room.clone();
        let (ended, removed) = self
            .writer
            .run(move |c| {
                let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                let s = &sanction;
                c.prepare_cached(
                    "INSERT OR REPLACE INTO sanctions
                     (room_id, user_key, kind, user_name, by_name, reason, until_ts, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )
                .and_then(|mut st| {
                    st.execute(params![
                        id,
                        s.user.key(),
                        sanction_kind(s.kind),
                        s.user.as_str(),
                        s.by.as_str(),
                        s.reason,
                        s.until_ts,
                        now_ms()
                    ])
                })
                .map_err(db_error)?;
                if s.kind != SanctionKind::Ban {
                    return Ok((Vec::new(), Vec::new()));
                }
                let ended = remove_member(c, id, &s.user)?;
                Ok((ended, sweep_guest_rooms(c, Some(id))?))
            })
            .await?;
        self.purger.purge(removed);
        Ok(ended)
    }

    async fn lift(
        &self,
        room: &RoomName,
        user: &UserName,
        kind: SanctionKind,
    ) -> StoreResult<bool> {
        let (room, key) = (room.clone(), user.key().to_owned());
        self.writer
            .run(move |c| {
                let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                let until: Option<Option<i64>> = c
                    .prepare_cached(
                        "DELETE FROM sanctions WHERE room_id = ?1 AND user_key = ?2 AND kind = ?3
                         RETURNING until_ts",
                    )
                    .and_then(|mut s| {
                        s.query_row(params![id, key, sanction_kind(kind)], |r| r.get(0))
                            .optional()
                    })
                    .map_err(db_error)?;
                Ok(until.is_some_and(|until| in_force(until, now_ms())))
            })
            .await
    }

    async fn sanctions(&self, room: &RoomName, now: i64) -> StoreResult<Vec<Sanction>> {
        let room = room.clone();
        self.read(move |c| {
            let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
            let mut stmt = c
                .prepare_cached(
                    "SELECT user_name, kind, by_name, reason, until_ts FROM sanctions
                     WHERE room_id = ?1 AND (until_ts IS NULL OR until_ts > ?2)
                     ORDER BY user_key, kind",
                )
                .map_err(db_error)?;
            let rows = stmt
                .query_map(params![id, now], |r| {
                    Ok(Sanction {
                        user: r.get(0)?,
                        kind: if r.get::<_, i64>(1)? == 0 {
                            SanctionKind::Ban
                        } else {
                            SanctionKind::Mute
                        },
                        by: r.get(2)?,
                        reason: r.get(3)?,
                        until_ts: r.get(4)?,
                    })
                })
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn rooms(
        &self,
        user: &UserName,
        all: bool,
        after: Option<&RoomName>,
        limit: u32,
    ) -> StoreResult<Vec<RoomView>> {
        let key = user.key().to_owned();
        let after = after.map_or(String::new(), |a| a.as_str().to_owned());
        self.read(move |c| {
            let sql = if all {
                "SELECT r.name, r.topic, r.last_seq, m.read_seq,
                        (SELECT COUNT(*) FROM members x WHERE x.room_id = r.id)
                 FROM rooms r LEFT JOIN members m ON m.room_id = r.id AND m.user_key = ?1
                 WHERE r.direct = 0 AND r.private = 0 AND r.name NOT LIKE '%/'
                   AND NOT EXISTS (SELECT 1 FROM rooms h WHERE h.id = r.hub_id AND h.private)
                   AND r.name > ?2 ORDER BY r.name LIMIT ?3"
            } else {
                "SELECT r.name, r.topic, r.last_seq, m.read_seq,
                        (SELECT COUNT(*) FROM members x WHERE x.room_id = r.id)
                 FROM members m JOIN rooms r ON r.id = m.room_id
                 WHERE m.user_key = ?1 AND r.name > ?2 ORDER BY r.name LIMIT ?3"
            };
            let mut stmt = c.prepare_cached(sql).map_err(db_error)?;
            let rows = stmt
                .query_map(params![key, after, limit], |r| {
                    Ok(RoomView {
                        room: RoomName::from_trusted(r.get(0)?),
                        topic: r.get(1)?,
                        last_seq: r.get(2)?,
                        read_seq: r.get(3)?,
                        member_count: r.get(4)?,
                    })
                })
                .map_err(db_error)?;
            rows.collect::<Result<_, _>>().map_err(db_error)
        })
        .await
    }

    async fn set_topic(&self, room: &RoomName, user: &UserName, topic: &str) -> StoreResult<()> {
        let (room, user, topic) = (room.clone(), user.clone(), topic.to_owned());
        self.writer
            .run(move |c| {
                let (id, _) = member_room(c, &room, &user)?;
                c.prepare_cached("UPDATE rooms SET topic = ?1 WHERE id = ?2")
                    .and_then(|mut s| s.execute(params![topic, id]))
                    .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn create_hub(&self, hub: NewHub) -> StoreResult<()> {
        self.writer
            .run(move |c| {
                let room = RoomName::hub_room(&hub.hub);
                if room_row(c, room.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!("hub name {}", hub.hub)));
                }
                let now = now_ms();
                let id = new_room_id(c)?;
                c.prepare_cached(
                    "INSERT INTO rooms (id, name, topic, direct, private, created_at)
                     VALUES (?1, ?2, ?3, 0, ?4, ?5)",
                )
                .and_then(|mut s| {
                    s.execute(params![id, room.as_str(), hub.title, hub.private, now])
                })
                .map_err(db_error)?;
                add_member(c, id, &hub.owner, false, Role::Owner)?;
                let general = RoomName::channel(&hub.hub, FIRST_CHANNEL)
                    .map_err(|e| StoreError::Internal(e.message))?;
                let channel = new_room_id(c)?;
                c.prepare_cached(
                    "INSERT INTO rooms (id, name, direct, hub_id, created_at)
                     VALUES (?1, ?2, 0, ?3, ?4)",
                )
                .and_then(|mut s| s.execute(params![channel, general.as_str(), id, now]))
                .map_err(db_error)?;
                add_member(c, channel, &hub.owner, false, Role::Member)?;
                Ok(())
            })
            .await
    }

    async fn join_hub(
        &self,
        hub: &HubName,
        user: &UserName,
        guest: bool,
        invite: Option<&str>,
    ) -> StoreResult<HubJoined> {
        let (room, user, invite) = (
            RoomName::hub_room(hub),
            user.clone(),
            invite.map(str::to_owned),
        );
        if guest {
            self.guests.mark(user.key());
        }
        self.writer
            .run(move |c| {
                let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                if is_member(c, id, &user)? {
                    return Ok(HubJoined::default());
                }
                refuse_sanctioned(c, id, &room, &user, SanctionKind::Ban)?;
                if hub_of(c, id)?.1 {
                    redeem(c, invite.as_deref(), &room, &user)?;
                }
                add_member(c, id, &user, guest, Role::Member)?;
                // Every public channel, but those the user is banned from.
                let open: Vec<(i64, String, Seq)> = c
                    .prepare_cached(
                        "SELECT r.id, r.name, r.last_seq FROM rooms r
                         WHERE r.hub_id = ?1 AND r.private = 0
                           AND NOT EXISTS (SELECT 1 FROM sanctions s
                               WHERE s.room_id = r.id AND s.user_key = ?2 AND s.kind = 0
                                 AND (s.until_ts IS NULL OR s.until_ts > ?3))
                         ORDER BY r.name",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![id, user.key(), now_ms()], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                        })?
                        .collect()
                    })
                    .map_err(db_error)?;
                let mut channels = Vec::new();
                for (channel, name, last_seq) in open {
                    if add_member(c, channel, &user, guest, Role::Member)? {
                        channels.push((RoomName::from_trusted(name), last_seq));
                    }
                }
                Ok(HubJoined {
                    newly_joined: true,
                    channels,
                })
            })
            .await
    }

    async fn leave_hub(&self, hub: &HubName, user: &UserName) -> StoreResult<Vec<RoomName>> {
        let (room, user) = (RoomName::hub_room(hub), user.clone());
        self.writer
            .run(move |c| {
                let (id, _) = member_room(c, &room, &user)?;
                keep_an_owner(c, id, &room, &user)?;
                let mut left = remove_member(c, id, &user)?;
                left.retain(|r| !r.is_hub_room());
                Ok(left)
            })
            .await
    }

    async fn hubs(&self, user: Option<&UserName>, all: bool) -> StoreResult<Vec<HubView>> {
        let key = user.map_or(String::new(), |u| u.key().to_owned());
        let every = user.is_none();
        self.read(move |c| {
            let sql = if every {
                "SELECT r.name, r.topic, r.private, NULL,
                        (SELECT COUNT(*) FROM members x WHERE x.room_id = r.id)
                 FROM rooms r WHERE r.name LIKE '%/' AND ?1 = '' ORDER BY r.name"
            } else if all {
                "SELECT r.name, r.topic, r.private, m.role,
                        (SELECT COUNT(*) FROM members x WHERE x.room_id = r.id)
                 FROM rooms r LEFT JOIN members m ON m.room_id = r.id AND m.user_key = ?1
                 WHERE r.name LIKE '%/' AND r.private = 0 ORDER BY r.name"
            } else {
                "SELECT r.name, r.topic, r.private, m.role,
                        (SELECT COUNT(*) FROM members x WHERE x.room_id = r.id)
                 FROM members m JOIN rooms r ON r.id = m.room_id
                 WHERE m.user_key = ?1 AND r.name LIKE '%/' ORDER BY r.name"
            };
            let rows: Vec<(String, String, bool, Option<i64>, u64)> = c
                .prepare_cached(sql)
                .and_then(|mut s| {
                    s.query_map([key], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect()
                })
                .map_err(db_error)?;
            rows.into_iter()
                .map(|(name, title, private, role, member_count)| {
                    Ok(HubView {
                        hub: stored_hub(&name)?,
                        title,
                        private,
                        member_count,
                        role: role.map(stored_role).transpose()?,
                    })
                })
                .collect()
        })
        .await
    }

    async fn hub(&self, hub: &HubName, user: &UserName) -> StoreResult<HubDetail> {
        let (room, key) = (RoomName::hub_room(hub), user.key().to_owned());
        self.read(move |c| {
            let (id, title, private): (i64, String, bool) = c
                .prepare_cached("SELECT id, topic, private FROM rooms WHERE name = ?1")
                .and_then(|mut s| {
                    s.query_row([room.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                        .optional()
                })
                .map_err(db_error)?
                .ok_or(StoreError::NoSuchRoom)?;
            let members: Vec<(String, i64, String)> = c
                .prepare_cached(
                    "SELECT user_name, role, user_key FROM members WHERE room_id = ?1
                     ORDER BY user_key",
                )
                .and_then(|mut s| {
                    s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(db_error)?;
            let role = members
                .iter()
                .find(|(_, _, k)| *k == key)
                .map(|(_, role, _)| stored_role(*role))
                .transpose()?;
            if private && role.is_none() {
                return Err(private_place(&room));
            }
            let channels: Vec<(String, String, bool, Seq, Option<Seq>)> = c
                .prepare_cached(
                    "SELECT r.name, r.topic, r.private, r.last_seq, m.read_seq FROM rooms r
                     LEFT JOIN members m ON m.room_id = r.id AND m.user_key = ?2
                     WHERE r.hub_id = ?1 AND (r.private = 0 OR m.user_key IS NOT NULL)
                     ORDER BY r.name",
                )
                .and_then(|mut s| {
                    s.query_map(params![id, key], |r| {
                        Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                    })?
                    .collect()
                })
                .map_err(db_error)?;
            Ok(HubDetail {
                title,
                private,
                role,
                channels: channels
                    .into_iter()
                    .map(|(name, topic, private, last_seq, read_seq)| ChannelView {
                        room: RoomName::from_trusted(name),
                        topic,
                        private,
                        last_seq,
                        read_seq,
                    })
                    .collect(),
                members: members
                    .into_iter()
                    .map(|(name, role, _)| Ok((user_name(name)?, stored_role(role)?)))
                    .collect::<StoreResult<_>>()?,
            })
        })
        .await
    }

    async fn delete_hub(&self, hub: &HubName) -> StoreResult<Vec<(RoomName, Vec<UserName>)>> {
        let room = RoomName::hub_room(hub);
        let (gone, removed) = self
            .writer
            .run(move |c| {
                let (id, _) = room_row(c, room.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                let rooms: Vec<(i64, String)> = c
                    .prepare_cached("SELECT id, name FROM rooms WHERE id = ?1 OR hub_id = ?1")
                    .and_then(|mut s| s.query_map([id], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                    .map_err(db_error)?;
                let (mut gone, mut removed) = (Vec::new(), Vec::new());
                for (room_id, name) in rooms {
                    let members: Vec<String> = c
                        .prepare_cached(
                            "DELETE FROM members WHERE room_id = ?1 RETURNING user_name",
                        )
                        .and_then(|mut s| s.query_map([room_id], |r| r.get(0))?.collect())
                        .map_err(db_error)?;
                    remove_room_row(c, room_id)?;
                    removed.push(room_id);
                    let mut members = members
                        .into_iter()
                        .map(user_name)
                        .collect::<StoreResult<Vec<_>>>()?;
                    members.sort_by(|a, b| a.key().cmp(b.key()));
                    gone.push((RoomName::from_trusted(name), members));
                }
                gone.sort_by(|(a, _), (b, _)| a.cmp(b));
                Ok((gone, removed))
            })
            .await?;
        self.purger.purge(removed);
        Ok(gone)
    }

    async fn create_channel(
        &self,
        channel: &RoomName,
        private: bool,
        topic: &str,
        by: &UserName,
    ) -> StoreResult<Vec<UserName>> {
        let (channel, topic, by) = (channel.clone(), topic.to_owned(), by.clone());
        self.writer
            .run(move |c| {
                let hub = channel.hub().ok_or(StoreError::NoSuchRoom)?;
                let (hub_id, _) = room_row(c, RoomName::hub_room(&hub).as_str())?
                    .ok_or(StoreError::NoSuchRoom)?;
                if room_row(c, channel.as_str())?.is_some() {
                    return Err(StoreError::Conflict(format!("channel name {channel}")));
                }
                let id = new_room_id(c)?;
                c.prepare_cached(
                    "INSERT INTO rooms (id, name, topic, direct, hub_id, private, created_at)
                     VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        channel.as_str(),
                        topic,
                        hub_id,
                        private,
                        now_ms()
                    ])
                })
                .map_err(db_error)?;
                if private {
                    add_member(c, id, &by, false, Role::Member)?;
                    return Ok(vec![by]);
                }
                let members: Vec<String> = c
                    .prepare_cached(
                        "INSERT INTO members (room_id, user_key, user_name, guest, joined_at, role)
                         SELECT ?1, user_key, user_name, guest, ?3, 0 FROM members
                         WHERE room_id = ?2 RETURNING user_name",
                    )
                    .and_then(|mut s| {
                        s.query_map(params![id, hub_id, now_ms()], |r| r.get(0))?
                            .collect()
                    })
                    .map_err(db_error)?;
                members.into_iter().map(user_name).collect()
            })
            .await
    }

    async fn create_invite(&self, invite: NewInvite) -> StoreResult<()> {
        self.writer
            .run(move |c| {
                let (id, _) = room_row(c, invite.place.as_str())?.ok_or(StoreError::NoSuchRoom)?;
                c.prepare_cached(
                    "INSERT INTO invites (code, room_id, user_key, expires_ts, by_name, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        invite.code,
                        id,
                        invite.user.as_ref().map(|u| u.key().to_owned()),
                        invite.expires_ts,
                        invite.by.as_str(),
                        now_ms()
                    ])
                })
                .map_err(db_error)?;
                Ok(())
            })
            .await
    }

    async fn queue_append(&self, message: NewMessage) -> StoreResult<Queued> {
        if let Some(peers) = &message.direct {
            if peers.sender_guest {
                self.guests.mark(message.sender.key());
            }
            if peers.peer_guest {
                self.guests.mark(peers.peer.key());
            }
        }
        // A room's message is refused (not a member, muted, a bad edit)
        // before its first write, and a plain one writes nothing but its
        // staged row; a direct message may open its conversation first,
        // and keeps a savepoint.
        let kind = match (&message.direct, message.amend) {
            (Some(_), _) => Kind::Guarded,
            (None, Some(_)) => Kind::RefusingFirst,
            (None, None) => Kind::Staging,
        };
        let job = move |c: &Connection, staged: &mut Staged| append(c, staged, message);
        Ok(Box::pin(self.writer.queue_as(kind, job).await?))
    }

    async fn history(
        &self,
        room: &RoomName,
        user: &UserName,
        page: Page,
        limit: u32,
    ) -> StoreResult<HistoryPage> {
        let (room, user) = (room.clone(), user.clone());
        self.read(move |c| {
            let (id, _) = member_room(c, &room, &user)?;
            // One row more than asked tells whether there are more.
            let probe = i64::from(limit) + 1;
            let (sql, bound, descending) = match page {
                Page::Latest => ("seq <= ?2 ORDER BY seq DESC", i64::MAX, true),
                Page::Before(b) => ("seq < ?2 ORDER BY seq DESC", b as i64, true),
                Page::After(a) => ("seq > ?2 ORDER BY seq ASC", a as i64, false),
            };
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages WHERE room_id = ?1 AND {sql} LIMIT ?3"
            );
            let mut messages = query_messages(c, room.as_str(), &sql, params![id, bound, probe])?;
            let more = messages.len() > limit as usize;
            messages.truncate(limit as usize);
            if descending {
                messages.reverse();
            }
            Ok(HistoryPage { messages, more })
        })
        .await
    }

    async fn messages_after(
        &self,
        room: &RoomName,
        after: Seq,
        limit: u32,
    ) -> StoreResult<Vec<Message>> {
        let room = room.clone();
        self.read(move |c| {
            let Some((id, _)) = room_row(c, room.as_str())? else {
                return Ok(Vec::new());
            };
            let sql = format!(
                "SELECT {MESSAGE_COLUMNS} FROM messages
                 WHERE room_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
            );
            query_messages(c, room.as_str(), &sql, params![id, after, limit])
        })
        .await
    }

    async fn last_seqs(&self, rooms: &[RoomName]) -> StoreResult<Vec<Seq>> {
        let rooms = rooms.to_vec();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT last_seq FROM rooms WHERE name = ?1")
                .map_err(db_error)?;
            rooms
                .iter()
                .map(|room| {
                    stmt.query_row([room.as_str()], |r| r.get(0))
                        .optional()
                        .map(|seq| seq.unwrap_or(0))
                        .map_err(db_error)
                })
                .collect()
        })
        .await
    }

    async fn mark_read(&self, room: &RoomName, user: &UserName, seq: Seq) -> StoreResult<Seq> {
        let (room, user) = (room.clone(), user.clone());
        self.writer
            .run(move |c| {
                let (id, last_seq) = member_room(c, &room, &user)?;
                if seq > last_seq {
                    return Err(StoreError::Invalid(format!(
                        "seq {seq} is past the room's last message ({last_seq})"
                    )));
                }
                c.prepare_cached(
                    "UPDATE members SET read_seq = MAX(read_seq, ?1)
                     WHERE room_id = ?2 AND user_key = ?3 RETURNING read_seq",
                )
                .and_then(|mut s| s.query_row(params![seq, id, user.key()], |r| r.get(0)))
                .map_err(db_error)
            })
            .await
    }

    async fn ping(&self) -> StoreResult<()> {
        let select = |c: &Connection| c.query_row("SELECT 1", [], |_| Ok(())).map_err(db_error);
        // Through the writer: a commit behind whatever is queued, so a
        // writer that is dead, stuck or locked out is not ready.
        self.writer.run(select).await?;
        self.read(select).await
    }

    async fn failed(&self) -> StoreError {
        self.writer.failed().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_core::DynStore;

    async fn fresh() -> (DynStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("confab.db"), Durability::Normal)
            .await
            .unwrap();
        (Arc::new(store) as DynStore, dir)
    }

    confab_core::store_contract_tests!(fresh());

    fn name(s: &str) -> UserName {
        UserName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn everything_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dir/confab.db");
        let room = RoomName::parse("r").unwrap();
        {
            let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
            s.create_user(&name("Alice"), "h").await.unwrap();
            s.create_token(&name("alice"), &[7; 32]).await.unwrap();
            s.join(&room, &name("alice"), JoinRules::open(false))
                .await
                .unwrap();
            s.set_topic(&room, &name("alice"), "t").await.unwrap();
            for _ in 0..3 {
                let m = NewMessage {
                    room: room.clone(),
                    sender: name("alice"),
                    body: "b".into(),
                    nonce: Some("n".into()),
                    ts: 5,
                    direct: None,
                    amend: None,
                };
                s.append(m).await.unwrap();
            }
            s.mark_read(&room, &name("alice"), 1).await.unwrap();
        }
        let s = SqliteStore::open(&path, Durability::Full).await.unwrap();
        assert_eq!(
            s.user(&name("alice")).await.unwrap().unwrap().name.as_str(),
            "Alice"
        );
        assert!(s.token_user(&[7; 32]).await.unwrap().is_some());
        let views = s.rooms(&name("alice"), false, None, 1000).await.unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!(
            (
                views[0].topic.as_str(),
                views[0].last_seq,
                views[0].read_seq
            ),
            ("t", 1, Some(1)),
            "one message: the nonce deduplicated the retries"
        );
    }

    #[tokio::test]
    async fn a_guest_who_joined_nothing_leaves_without_a_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.db");
        let room = RoomName::parse("r").unwrap();
        {
            let s = SqliteStore::open(&path, Durability::Normal).await.unwrap();
            let before = s.writer_stats();
            assert!(s.drop_guest(&name("idle")).await.unwrap().is_empty());
            assert_eq!(s.writer_stats(), before, "no job for a guest with no rows");
            s.join(&room, &name("Kept"), JoinRules::open(true))
                .await
                .unwrap();
            s.join(&room, &name("reg"), JoinRules::open(false))
                .await
                .unwrap();
        }
        // A guest membership in the file (a crash, say) is known on open.
        let s = SqliteStore::open(&path, Durability::Normal).await.unwrap();
        assert_eq!(s.drop_guest(&name("kept")).await.unwrap(), vec![room]);
        let before = s.writer_stats();
        assert!(s.drop_guest(&name("kept")).await.unwrap().is_empty());
        assert_eq!(s.writer_stats(), before, "forgotten once dropped");
    }

    /// Messages in the file whose room is gone.
    fn orphaned_messages(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row(
                "SELECT count(*) FROM messages WHERE room_id NOT IN (SELECT id FROM rooms)",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    async fn purged(s: &SqliteStore) {
        let mut pending = s.purger.pending.subscribe();
        pending.wait_for(|&n| n == 0).await.unwrap();
    }

    /// A guest room with a long history: its removal is one job, its
    /// history many, a chunk each; its name is free at once.
    #[tokio::test]
    async fn a_removed_rooms_history_goes_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        let s = SqliteStore::open(&path, Durability::Normal).await.unwrap();
        let room = RoomName::parse("r").unwrap();
        s.join(&room, &name("guest"), JoinRules::open(true))
            .await
            .unwrap();
        let n = PURGE_CHUNK as u64 * 4 + 3;
        for i in 0..n {
            send(&s, message("guest", &format!("m{i}"), None, None))
                .await
                .unwrap();
        }
        let before = s.writer_stats().transactions;
        assert_eq!(
            s.drop_guest(&name("guest")).await.unwrap(),
            vec![room.clone()]
        );
        // Gone at once, whatever is left of its history: a room of the
        // same name is a new one.
        let joined = s
            .join(&room, &name("next"), JoinRules::open(true))
            .await
            .unwrap();
        assert_eq!(joined.last_seq, 0);
        assert!(s.messages_after(&room, 0, 100).await.unwrap().is_empty());
        purged(&s).await;
        assert_eq!(orphaned_messages(&path), 0);
        let commits = s.writer_stats().transactions - before;
        assert!(
            commits > n / PURGE_CHUNK as u64,
            "{n} messages deleted in {commits} commits: more than {PURGE_CHUNK} in one"
        );
    }

    /// What a stop left of a removed room's history goes at the next open;
    /// until then no new room is given that room's id.
    #[tokio::test]
    async fn history_left_by_a_stop_is_deleted_at_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("o.db");
        let (r, r2) = (
            RoomName::parse("r").unwrap(),
            RoomName::parse("r2").unwrap(),
        );
        {
            let s = SqliteStore::open(&path, Durability::Normal).await.unwrap();
            s.join(&r, &name("ann"), JoinRules::open(false))
                .await
                .unwrap();
            for i in 0..25 {
                send(&s, message("ann", &format!("m{i}"), None, None))
                    .await
                    .unwrap();
            }
            // Removed, its history not yet deleted: as a stop leaves it.
            s.writer.run(|c| remove_room_row(c, 1)).await.unwrap();
            assert_eq!(orphaned_messages(&path), 25);
            s.join(&r2, &name("ann"), JoinRules::open(false))
                .await
                .unwrap();
            assert!(s.messages_after(&r2, 0, 100).await.unwrap().is_empty());
            let id = s.read(|c| room_row(c, "r2")).await.unwrap().unwrap().0;
            assert_ne!(id, 1, "the removed room's id, its history still there");
        }
        let s = SqliteStore::open(&path, Durability::Normal).await.unwrap();
        purged(&s).await;
        assert_eq!(orphaned_messages(&path), 0);
        assert!(s.messages_after(&r2, 0, 100).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn concurrent_writers_share_commits() {
        let (dir, store) = {
            let dir = tempfile::tempdir().unwrap();
            let s = SqliteStore::open(dir.path().join("c.db"), Durability::Full)
                .await
                .unwrap();
            (dir, Arc::new(s))
        };
        let room = RoomName::parse("r").unwrap();
        for i in 0..50 {
            store
                .join(&room, &name(&format!("u{i}")), JoinRules::open(false))
                .await
                .unwrap();
        }
        let before = store.writer_stats();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = store.clone();
                let room = room.clone();
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let m = NewMessage {
                            room: room.clone(),
                            sender: name(&format!("u{i}")),
                            body: "x".into(),
                            nonce: None,
                            ts: 0,
                            direct: None,
                            amend: None,
                        };
                        s.append(m).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let after = store.writer_stats();
        let jobs = after.jobs - before.jobs;
        let commits = after.transactions - before.transactions;
        assert_eq!(jobs, 500);
        assert!(
            commits < jobs,
            "500 concurrent appends took {commits} transactions: no group commit"
        );
        drop(dir);
    }

    #[tokio::test]
    async fn a_panicking_job_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("p.db"), Durability::Normal)
            .await
            .unwrap();
        s.create_user(&name("before"), "h").await.unwrap();
        let boom = s
            .writer
            .run(|c| -> StoreResult<()> {
                c.execute("DELETE FROM users", []).map_err(db_error)?;
                panic!("boom")
            })
            .await;
        match boom {
            Err(StoreError::Internal(m)) => assert!(m.contains("boom"), "{m}"),
            other => panic!("expected an internal error, got {other:?}"),
        }
        assert!(
            s.user(&name("before")).await.unwrap().is_some(),
            "the panicking job was rolled back"
        );
        s.create_user(&name("after"), "h").await.unwrap();
        s.ping().await.unwrap();
    }

    /// Jobs queued while the writer is held by `hold` share one batch.
    async fn hold(s: &SqliteStore) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (running, started) = tokio::sync::oneshot::channel();
        let job = s.writer.queue(move |_| {
            let _ = running.send(());
            let _ = held.recv();
            Ok(())
        });
        tokio::spawn(job.await.unwrap());
        // Its batch is taken: whatever is queued from now on waits for
        // the next one.
        started.await.unwrap();
        release
    }

    /// A trigger that fails every message's row as it is written.
    const TRAP: &str = "CREATE TRIGGER trap BEFORE INSERT ON messages
                        BEGIN SELECT RAISE(ABORT, 'trapped'); END";

    /// Queue a job that runs `sql`; its outcome after the commit.
    async fn queue_sql(
        s: &SqliteStore,
        sql: &'static str,
    ) -> impl std::future::Future<Output = StoreResult<()>> + use<> {
        s.writer
            .queue(move |c| c.execute_batch(sql).map_err(db_error))
            .await
            .unwrap()
    }

    fn add_user(c: &Connection, key: &str) -> StoreResult<()> {
        c.execute(
            "INSERT INTO users (key, name, password_hash, created_at) VALUES (?1, ?1, 'h', 0)",
            [key],
        )
        .map(drop)
        .map_err(db_error)
    }

    #[tokio::test]
    async fn a_job_without_a_savepoint_fails_alone_only_if_it_wrote_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("u.db"), Durability::Normal)
            .await
            .unwrap();
        let exists = |key: &'static str| {
            let s = &s;
            async move { s.user(&name(key)).await.unwrap().is_some() }
        };
        // A refusal before any write: the batch commits without it.
        let release = hold(&s).await;
        let a = s.writer.queue(|c| add_user(c, "a")).await.unwrap();
        let refused = s
            .writer
            .queue_as(Kind::RefusingFirst, |_, _| -> StoreResult<()> {
                Err(StoreError::Refused("no".into()))
            })
            .await
            .unwrap();
        let d = s
            .writer
            .queue_as(Kind::RefusingFirst, |c, _| add_user(c, "d"))
            .await
            .unwrap();
        release.send(()).unwrap();
        assert_eq!(a.await, Ok(()));
        assert_eq!(refused.await, Err(StoreError::Refused("no".into())));
        assert_eq!(d.await, Ok(()));
        assert!(exists("a").await && exists("d").await);
        // A failure after a write, with no savepoint: the whole batch goes.
        let release = hold(&s).await;
        let e = s.writer.queue(|c| add_user(c, "e")).await.unwrap();
        let broken = s
            .writer
            .queue_as(Kind::RefusingFirst, |c, _| {
                add_user(c, "c")?;
                Err::<(), _>(StoreError::Refused("too late".into()))
            })
            .await
            .unwrap();
        release.send(()).unwrap();
        assert!(matches!(e.await, Err(StoreError::Internal(_))));
        match broken.await {
            Err(StoreError::Internal(m)) => assert!(m.contains("no savepoint"), "{m}"),
            other => panic!("expected the batch to fail, got {other:?}"),
        }
        assert!(!exists("e").await && !exists("c").await, "rolled back");
        s.create_user(&name("after"), "h").await.unwrap();
    }

    fn message(sender: &str, body: &str, nonce: Option<&str>, amend: Option<Amend>) -> NewMessage {
        NewMessage {
            room: RoomName::parse("r").unwrap(),
            sender: name(sender),
            body: body.to_owned(),
            nonce: nonce.map(str::to_owned),
            ts: 1_700_000_000_000,
            direct: None,
            amend,
        }
    }

    /// A store with ann and bob in room `r`.
    async fn room_of_two() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("s.db"), Durability::Normal)
            .await
            .unwrap();
        for who in ["ann", "bob"] {
            let r = RoomName::parse("r").unwrap();
            s.join(&r, &name(who), JoinRules::open(false))
                .await
                .unwrap();
        }
        (s, dir)
    }

    #[tokio::test]
    async fn messages_staged_in_a_batch_are_seen_by_every_later_job() {
        let (s, _dir) = room_of_two().await;
        let before = s.writer_stats();
        let release = hold(&s).await;
        let q = |m| s.queue_append(m);
        let one = q(message("ann", "one", Some("n1"), None)).await.unwrap();
        let resent = q(message("ann", "resent", Some("n1"), None)).await.unwrap();
        let two = q(message("bob", "two", None, None)).await.unwrap();
        // Any other job reads the database as if each message had been
        // written in its turn.
        let seen = s
            .writer
            .queue(|c| {
                c.query_row(
                    "SELECT last_seq, (SELECT count(*) FROM messages) FROM rooms WHERE name = 'r'",
                    [],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .map_err(db_error)
            })
            .await
            .unwrap();
        let edit = q(message("ann", "one, edited", None, Some(Amend::Edit(1))))
            .await
            .unwrap();
        let again = q(message("ann", "resent", Some("n1"), None)).await.unwrap();
        let stranger = q(message("cy", "hello?", None, None)).await.unwrap();
        let bobs_n1 = q(message("bob", "three", Some("n1"), None)).await.unwrap();
        release.send(()).unwrap();

        let one = one.await.unwrap();
        assert_eq!((one.message.seq, one.duplicate), (1, false));
        let resent = resent.await.unwrap();
        assert_eq!((resent.message.seq, resent.duplicate), (1, true));
        assert_eq!(resent.message.body, "one");
        assert_eq!(two.await.unwrap().message.seq, 2);
        assert_eq!(seen.await, Ok((2, 2)));
        assert_eq!(edit.await.unwrap().message.seq, 3);
        let again = again.await.unwrap();
        assert_eq!((again.message.seq, again.duplicate), (1, true));
        assert_eq!(again.message.body, "one, edited", "the stored original now");
        assert_eq!(stranger.await.map(drop), Err(StoreError::NotMember));
        assert_eq!(bobs_n1.await.unwrap().message.seq, 4);
        let batches = s.writer_stats().transactions - before.transactions;
        assert!(
            batches <= 2,
            "one batch, with the held job or after it: {batches}"
        );

        let r = RoomName::parse("r").unwrap();
        assert_eq!(s.last_seqs(std::slice::from_ref(&r)).await.unwrap(), [4]);
        let stored = s.messages_after(&r, 0, 10).await.unwrap();
        let seqs: Vec<_> = stored.iter().map(|m| (m.seq, m.body.as_str())).collect();
        assert_eq!(
            seqs,
            [
                (1, "one, edited"),
                (2, "two"),
                (3, "one, edited"),
                (4, "three")
            ]
        );
        // The next batch goes on from the flushed last_seq.
        let next = q(message("bob", "four", None, None)).await.unwrap();
        assert_eq!(next.await.unwrap().message.seq, 5);
    }

    #[tokio::test]
    async fn messages_are_kept_in_the_order_they_came_and_found_by_room_and_seq() {
        let (s, dir) = room_of_two().await;
        for who in ["ann", "bob"] {
            let other = RoomName::parse("o").unwrap();
            s.join(&other, &name(who), JoinRules::open(false))
                .await
                .unwrap();
        }
        let o = |sender, body| NewMessage {
            room: RoomName::parse("o").unwrap(),
            ..message(sender, body, None, None)
        };
        for m in [
            message("ann", "r1", None, None),
            o("bob", "o1"),
            message("bob", "r2", None, None),
            o("ann", "o2"),
        ] {
            seq_of(send(&s, m).await);
        }
        let c = Connection::open(dir.path().join("s.db")).unwrap();
        let bodies: Vec<String> = c
            .prepare("SELECT body FROM messages ORDER BY rowid")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            bodies,
            ["r1", "o1", "r2", "o2"],
            "at the table's end, one after another"
        );
        let plan: String = c
            .query_row(
                "EXPLAIN QUERY PLAN SELECT body FROM messages WHERE room_id = 1 AND seq > 0",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("messages_by_seq"), "{plan}");
        let twice = c.execute(
            "INSERT INTO messages (room_id, seq, sender_key, sender, body, ts)
             SELECT room_id, seq, sender_key, sender, body, ts FROM messages LIMIT 1",
            [],
        );
        assert!(twice.is_err(), "one message per room and seq");
    }

    #[tokio::test]
    async fn a_staged_row_that_cannot_be_written_fails_its_whole_batch() {
        let (s, _dir) = room_of_two().await;
        let release = hold(&s).await;
        // A job of the same batch, before the messages, that makes their
        // flush fail at the commit.
        let trap = queue_sql(&s, TRAP).await;
        let one = s
            .queue_append(message("ann", "one", None, None))
            .await
            .unwrap();
        let two = s
            .queue_append(message("bob", "two", None, None))
            .await
            .unwrap();
        release.send(()).unwrap();
        assert!(trap.await.is_err(), "rolled back with the batch");
        assert!(one.await.is_err() && two.await.is_err());
        let r = RoomName::parse("r").unwrap();
        assert_eq!(s.last_seqs(std::slice::from_ref(&r)).await.unwrap(), [0]);
        assert!(s.messages_after(&r, 0, 10).await.unwrap().is_empty());
        // Nothing of it is left: not the trigger, not the rows, not a seq.
        let next = s
            .queue_append(message("ann", "again", None, None))
            .await
            .unwrap();
        assert_eq!(next.await.unwrap().message.seq, 1);
    }

    async fn send(s: &SqliteStore, m: NewMessage) -> StoreResult<Appended> {
        s.queue_append(m).await?.await
    }

    /// The seq a message was stored as (it must have been).
    fn seq_of(appended: StoreResult<Appended>) -> Seq {
        appended.expect("stored").message.seq
    }

    #[tokio::test]
    async fn what_the_writer_keeps_of_a_sender_follows_every_change() {
        let (s, _dir) = room_of_two().await;
        let r = RoomName::parse("r").unwrap();
        send(&s, message("ann", "one", None, None)).await.unwrap();
        // Muted, then not, then gone: each seen by the next message.
        let mute = NewSanction {
            user: name("ann"),
            kind: SanctionKind::Mute,
            by: name("bob"),
            reason: String::new(),
            until_ts: None,
        };
        s.sanction(&r, mute).await.unwrap();
        let muted = send(&s, message("ann", "two", None, None)).await;
        let refusal = sanctioned(SanctionKind::Mute, &r, None);
        assert_eq!(muted.map(drop), Err(refusal));
        s.lift(&r, &name("ann"), SanctionKind::Mute).await.unwrap();
        assert_eq!(seq_of(send(&s, message("ann", "two", None, None)).await), 2);
        s.leave(&r, &name("ann")).await.unwrap();
        let gone = send(&s, message("ann", "three", None, None)).await;
        assert_eq!(gone.map(drop), Err(StoreError::NotMember));

        // Within one batch: a job of another kind between two messages.
        let release = hold(&s).await;
        let first = s
            .queue_append(message("bob", "three", None, None))
            .await
            .unwrap();
        let leave = queue_sql(&s, "DELETE FROM members WHERE user_key = 'bob'").await;
        let second = s
            .queue_append(message("bob", "four", None, None))
            .await
            .unwrap();
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().message.seq, 3);
        assert_eq!(leave.await, Ok(()));
        assert_eq!(second.await.map(drop), Err(StoreError::NotMember));
        assert_eq!(s.last_seqs(std::slice::from_ref(&r)).await.unwrap(), [3]);
    }

    #[tokio::test]
    async fn what_the_writer_read_in_a_batch_rolled_back_is_forgotten() {
        let (s, _dir) = room_of_two().await;
        let release = hold(&s).await;
        // cy joins and speaks in a batch whose flush then fails.
        let join = queue_sql(
            &s,
            "INSERT INTO members (room_id, user_key, user_name, guest, joined_at)
             SELECT id, 'cy', 'cy', 0, 0 FROM rooms WHERE name = 'r'",
        )
        .await;
        let trap = queue_sql(&s, TRAP).await;
        let spoke = s
            .queue_append(message("cy", "hi", None, None))
            .await
            .unwrap();
        release.send(()).unwrap();
        let (join, trap, spoke) = (join.await, trap.await, spoke.await.map(drop));
        assert!(
            join.is_err() && trap.is_err() && spoke.is_err(),
            "rolled back: {join:?} {trap:?} {spoke:?}"
        );
        let again = send(&s, message("cy", "hi?", None, None)).await;
        assert_eq!(again.map(drop), Err(StoreError::NotMember));
        assert_eq!(seq_of(send(&s, message("ann", "one", None, None)).await), 1);
    }

    #[tokio::test]
    async fn a_dead_writer_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(dir.path().join("d.db"), Durability::Normal)
            .await
            .unwrap();
        // A panic outside any job (here in the commit observer, after the
        // second commit's replies) kills the thread. Set before the first
        // commit: the observer runs after a batch's replies are sent, so one
        // set after `ping` returned could still be called for its batch.
        let commits = std::sync::atomic::AtomicUsize::new(0);
        s.observe_commits(Box::new(move |_, _| {
            if commits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                panic!("observer bug")
            }
        }));
        s.ping().await.unwrap();
        s.create_user(&name("last"), "h").await.unwrap();
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), s.failed())
            .await
            .expect("the death is reported");
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(matches!(s.ping().await, Err(StoreError::Unavailable(_))));
        assert!(matches!(
            s.create_user(&name("next"), "h").await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(
            s.user(&name("last")).await.unwrap().is_some(),
            "what was acknowledged stays"
        );
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.db");
        drop(SqliteStore::open(&path, Durability::Normal).await.unwrap());
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        match SqliteStore::open(&path, Durability::Normal).await {
            Err(StoreError::Unavailable(m)) => assert!(m.contains("newer"), "{m}"),
            other => panic!("expected a refusal, got {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn a_database_from_before_roles_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v2.db");
        // A database as version 2 left it: a room, two members, a message.
        let c = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..2] {
            c.execute_batch(sql).unwrap();
        }
        c.pragma_update(None, "user_version", 2).unwrap();
        c.execute_batch(
            "INSERT INTO users VALUES ('ann', 'Ann', 'h', 1);
             INSERT INTO rooms (id, name, topic, last_seq, direct, created_at)
                 VALUES (7, 'old', 'from before', 1, 0, 1);
             INSERT INTO members VALUES (7, 'ann', 'Ann', 0, 1, 1), (7, 'bob', 'bob', 0, 0, 1);
             INSERT INTO messages VALUES (7, 1, 'ann', 'Ann', 'still here', 5, 'n-1');",
        )
        .unwrap();
        drop(c);
        let store: DynStore = Arc::new(SqliteStore::open(&path, Durability::Normal).await.unwrap());
        assert_eq!(schema_version(&path).unwrap(), Some((4, 4)));
        confab_core::store::contract::keeps_a_database_from_before_roles(store).await;
    }
}

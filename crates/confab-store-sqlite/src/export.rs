//! Reading a whole database out, for `confab db copy`: every row, in plain
//! values, a chunk at a time, on tokio's blocking pool.

use std::path::Path;
use std::sync::{Arc, Mutex};

use confab_core::store::transfer::{
    Census, InviteRow, MemberRow, MessageRow, RoomRow, SanctionRow, TokenRow, UserRow,
};
use confab_core::store::StoreResult;
use confab_core::StoreError;
use rusqlite::{params, Connection, OpenFlags};

use crate::db_error;

/// A read-only view of a Confab SQLite database.
pub struct SqliteExport {
    conn: Arc<Mutex<Connection>>,
}

impl SqliteExport {
    /// Open the database at `path` read-only; it must exist and have the
    /// schema of this binary (serve or `db migrate` it first).
    pub async fn open(path: &Path) -> StoreResult<SqliteExport> {
        let path = path.to_path_buf();
        let conn = tokio::task::spawn_blocking(move || {
            if !path.exists() {
                return Err(StoreError::Invalid(format!(
                    "no database at {}",
                    path.display()
                )));
            }
            let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
                .map_err(db_error)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))
                .map_err(db_error)?;
            let version: usize = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(db_error)?;
            if version != crate::MIGRATIONS.len() {
                return Err(StoreError::Invalid(format!(
                    "{} has schema version {version}, this binary {}: serve it (or confab db \
                     migrate) with this binary first",
                    path.display(),
                    crate::MIGRATIONS.len()
                )));
            }
            Ok(conn)
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))??;
        Ok(SqliteExport {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&conn.lock().expect("export poisoned")))
            .await
            .map_err(|e| StoreError::Internal(e.to_string()))?
            .map_err(db_error)
    }

    pub async fn census(&self) -> StoreResult<Census> {
        self.with(|c| {
            let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0).map(|n| n as u64));
            let mut stmt = c.prepare(
                "SELECT r.name, r.last_seq, COALESCE(MAX(m.seq), 0) FROM rooms r
                 LEFT JOIN messages m ON m.room_id = r.id GROUP BY r.id ORDER BY r.name",
            )?;
            let last_seqs = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<Result<_, _>>()?;
            Ok(Census {
                users: count("SELECT COUNT(*) FROM users")?,
                tokens: count("SELECT COUNT(*) FROM tokens")?,
                rooms: count("SELECT COUNT(*) FROM rooms")?,
                members: count("SELECT COUNT(*) FROM members WHERE guest = 0")?,
                // Not the history of removed rooms still being deleted.
                messages: count(
                    "SELECT COUNT(*) FROM messages WHERE room_id IN (SELECT id FROM rooms)",
                )?,
                sanctions: count("SELECT COUNT(*) FROM sanctions")?,
                invites: count("SELECT COUNT(*) FROM invites")?,
                last_seqs,
            })
        })
        .await
    }

    pub async fn users(&self) -> StoreResult<Vec<UserRow>> {
        self.with(|c| {
            c.prepare(
                "SELECT key, name, password_hash, created_at, operator, banned, ban_reason,
                        ban_until
                 FROM users ORDER BY key",
            )?
            .query_map([], |r| {
                Ok(UserRow {
                    key: r.get(0)?,
                    name: r.get(1)?,
                    password_hash: r.get(2)?,
                    created_at: r.get(3)?,
                    operator: r.get(4)?,
                    banned: r.get(5)?,
                    ban_reason: r.get(6)?,
                    ban_until: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn tokens(&self) -> StoreResult<Vec<TokenRow>> {
        self.with(|c| {
            c.prepare("SELECT hash, user_key, created_at FROM tokens")?
                .query_map([], |r| {
                    Ok(TokenRow {
                        hash: r.get(0)?,
                        user_key: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                })?
                .collect()
        })
        .await
    }

    pub async fn rooms(&self) -> StoreResult<Vec<RoomRow>> {
        self.with(|c| {
            c.prepare(
                "SELECT r.name, r.topic, r.last_seq, r.direct, r.guest_created, r.created_at,
                        (SELECT h.name FROM rooms h WHERE h.id = r.hub_id), r.private
                 FROM rooms r ORDER BY r.name",
            )?
            .query_map([], |r| {
                Ok(RoomRow {
                    name: r.get(0)?,
                    topic: r.get(1)?,
                    last_seq: r.get(2)?,
                    direct: r.get(3)?,
                    guest_created: r.get(4)?,
                    created_at: r.get(5)?,
                    hub: r.get(6)?,
                    private: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn members(&self) -> StoreResult<Vec<MemberRow>> {
        self.with(|c| {
            c.prepare(
                "SELECT r.name, m.user_key, m.user_name, m.read_seq, m.joined_at, m.role
                 FROM members m JOIN rooms r ON r.id = m.room_id WHERE m.guest = 0",
            )?
            .query_map([], |r| {
                Ok(MemberRow {
                    room: r.get(0)?,
                    user_key: r.get(1)?,
                    user_name: r.get(2)?,
                    read_seq: r.get(3)?,
                    joined_at: r.get(4)?,
                    role: r.get(5)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn invites(&self) -> StoreResult<Vec<InviteRow>> {
        self.with(|c| {
            c.prepare(
                "SELECT i.code, r.name, i.user_key, i.expires_ts, i.by_name, i.created_at
                 FROM invites i JOIN rooms r ON r.id = i.room_id",
            )?
            .query_map([], |r| {
                Ok(InviteRow {
                    code: r.get(0)?,
                    room: r.get(1)?,
                    user_key: r.get(2)?,
                    expires_ts: r.get(3)?,
                    by_name: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })?
            .collect()
        })
        .await
    }

    pub async fn sanctions(&self) -> StoreResult<Vec<SanctionRow>> {
        self.with(|c| {
            c.prepare(
                "SELECT r.name, s.user_key, s.kind, s.user_name, s.by_name, s.reason,
                        s.until_ts, s.created_at
                 FROM sanctions s JOIN rooms r ON r.id = s.room_id",
            )?
            .query_map([], |r| {
                Ok(SanctionRow {
                    room: r.get(0)?,
                    user_key: r.get(1)?,
                    kind: r.get(2)?,
                    user_name: r.get(3)?,
                    by_name: r.get(4)?,
                    reason: r.get(5)?,
                    until_ts: r.get(6)?,
                    created_at: r.get(7)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Up to `limit` messages of `room` after `after`, ascending.
    pub async fn messages(
        &self,
        room: &str,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<MessageRow>> {
        let room = room.to_owned();
        self.with(move |c| {
            c.prepare_cached(
                "SELECT m.seq, m.sender_key, m.sender, m.body, m.ts, m.nonce,
                        m.edit_of, m.delete_of, m.edited_ts, m.deleted
                 FROM messages m JOIN rooms r ON r.id = m.room_id
                 WHERE r.name = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3",
            )?
            .query_map(params![room, after, limit], |r| {
                Ok(MessageRow {
                    room: room.clone(),
                    seq: r.get(0)?,
                    sender_key: r.get(1)?,
                    sender: r.get(2)?,
                    body: r.get(3)?,
                    ts: r.get(4)?,
                    nonce: r.get(5)?,
                    edit_of: r.get(6)?,
                    delete_of: r.get(7)?,
                    edited_ts: r.get(8)?,
                    deleted: r.get(9)?,
                })
            })?
            .collect()
        })
        .await
    }
}

//! Writing a whole database in, for `confab db copy`: rows in bulk (one
//! statement of arrays per chunk, unnested by PostgreSQL), a census to check
//! the copy, and the emptiness check and wipe around it.

use confab_core::store::transfer::{
    Census, InviteRow, MemberRow, MessageRow, RoomRow, SanctionRow, TokenRow, UserRow,
};
use confab_core::store::StoreResult;

use crate::{pg_error, PgStore};

/// The tables a copy fills, children first.
const TABLES: &str = "invites, sanctions, messages, members, tokens, removed_users, rooms, users";

impl PgStore {
    /// Whether the database holds no user, room or message.
    pub async fn is_empty(&self) -> StoreResult<bool> {
        let c = self.client().await?;
        let row = c
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM rooms)",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(row.get(0))
    }

    /// Remove every user, room and message (the schema stays).
    pub async fn wipe(&self) -> StoreResult<()> {
        let c = self.client().await?;
        c.batch_execute(&format!("TRUNCATE {TABLES} RESTART IDENTITY"))
            .await
            .map_err(pg_error)
    }

    pub async fn census(&self) -> StoreResult<Census> {
        let c = self.client().await?;
        let count = |table: &'static str| {
            let c = &c;
            async move {
                c.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                    .await
                    .map(|r| r.get::<_, i64>(0) as u64)
                    .map_err(pg_error)
            }
        };
        let rows = c
            .query(
                "SELECT r.name, r.last_seq, COALESCE(MAX(m.seq), 0) FROM rooms r
                 LEFT JOIN messages m ON m.room_id = r.id GROUP BY r.id ORDER BY r.name",
                &[],
            )
            .await
            .map_err(pg_error)?;
        Ok(Census {
            users: count("users").await?,
            tokens: count("tokens").await?,
            rooms: count("rooms").await?,
            members: count("members").await?,
            messages: count("messages").await?,
            sanctions: count("sanctions").await?,
            invites: count("invites").await?,
            last_seqs: rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        })
    }

    pub async fn import_users(&self, rows: &[UserRow]) -> StoreResult<()> {
        let col = |f: fn(&UserRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let operators: Vec<bool> = rows.iter().map(|r| r.operator).collect();
        let banned: Vec<bool> = rows.iter().map(|r| r.banned).collect();
        let reasons: Vec<Option<&str>> = rows.iter().map(|r| r.ban_reason.as_deref()).collect();
        let until: Vec<Option<i64>> = rows.iter().map(|r| r.ban_until).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO users (key, name, password_hash, created_at, operator, banned,
                               ban_reason, ban_until)
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[],
                                  $6::bool[], $7::text[], $8::bigint[])",
            &[
                &col(|r| &r.key),
                &col(|r| &r.name),
                &col(|r| &r.password_hash),
                &created,
                &operators,
                &banned,
                &reasons,
                &until,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    pub async fn import_tokens(&self, rows: &[TokenRow]) -> StoreResult<()> {
        let hashes: Vec<&[u8]> = rows.iter().map(|r| r.hash.as_slice()).collect();
        let users: Vec<&str> = rows.iter().map(|r| r.user_key.as_str()).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO tokens (hash, user_key, created_at)
             SELECT * FROM UNNEST($1::bytea[], $2::text[], $3::bigint[])",
            &[&hashes, &users, &created],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    pub async fn import_rooms(&self, rows: &[RoomRow]) -> StoreResult<()> {
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
        let last: Vec<i64> = rows.iter().map(|r| r.last_seq).collect();
        let direct: Vec<bool> = rows.iter().map(|r| r.direct).collect();
        let guest: Vec<bool> = rows.iter().map(|r| r.guest_created).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let hubs: Vec<Option<&str>> = rows.iter().map(|r| r.hub.as_deref()).collect();
        let private: Vec<bool> = rows.iter().map(|r| r.private).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO rooms (name, topic, last_seq, direct, guest_created, created_at,
                               hub_id, private)
             SELECT u.name, u.topic, u.last_seq, u.direct, u.guest_created, u.created_at,
                    (SELECT h.id FROM rooms h WHERE h.name = u.hub), u.private
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bool[], $5::bool[],
                         $6::bigint[], $7::text[], $8::bool[])
                  AS u (name, topic, last_seq, direct, guest_created, created_at, hub, private)",
            &[
                &names, &topics, &last, &direct, &guest, &created, &hubs, &private,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Invites to rooms already imported, by room name.
    pub async fn import_invites(&self, rows: &[InviteRow]) -> StoreResult<()> {
        let col = |f: fn(&InviteRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let users: Vec<Option<&str>> = rows.iter().map(|r| r.user_key.as_deref()).collect();
        let expires: Vec<Option<i64>> = rows.iter().map(|r| r.expires_ts).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO invites (code, room_id, user_key, expires_ts, by_name, created_at)
             SELECT u.code, r.id, u.user_key, u.expires_ts, u.by_name, u.created_at
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[],
                         $6::bigint[])
                  AS u (code, room, user_key, expires_ts, by_name, created_at)
             JOIN rooms r ON r.name = u.room",
            &[
                &col(|r| &r.code),
                &col(|r| &r.room),
                &users,
                &expires,
                &col(|r| &r.by_name),
                &created,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Memberships of rooms already imported, by room name.
    pub async fn import_members(&self, rows: &[MemberRow]) -> StoreResult<()> {
        let rooms: Vec<&str> = rows.iter().map(|r| r.room.as_str()).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.user_key.as_str()).collect();
        let names: Vec<&str> = rows.iter().map(|r| r.user_name.as_str()).collect();
        let read: Vec<i64> = rows.iter().map(|r| r.read_seq).collect();
        let joined: Vec<i64> = rows.iter().map(|r| r.joined_at).collect();
        let roles: Vec<i16> = rows.iter().map(|r| r.role).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO members (room_id, user_key, user_name, guest, read_seq, joined_at, role)
             SELECT r.id, u.user_key, u.user_name, FALSE, u.read_seq, u.joined_at, u.role
             FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[],
                         $6::int2[])
                  AS u (room, user_key, user_name, read_seq, joined_at, role)
             JOIN rooms r ON r.name = u.room",
            &[&rooms, &keys, &names, &read, &joined, &roles],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Bans and mutes of rooms already imported, by room name.
    pub async fn import_sanctions(&self, rows: &[SanctionRow]) -> StoreResult<()> {
        let col = |f: fn(&SanctionRow) -> &str| rows.iter().map(f).collect::<Vec<_>>();
        let kinds: Vec<i16> = rows.iter().map(|r| r.kind).collect();
        let until: Vec<Option<i64>> = rows.iter().map(|r| r.until_ts).collect();
        let created: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
        let c = self.client().await?;
        c.execute(
            "INSERT INTO sanctions
             (room_id, user_key, kind, user_name, by_name, reason, until_ts, created_at)
             SELECT r.id, u.user_key, u.kind, u.user_name, u.by_name, u.reason, u.until_ts,
                    u.created_at
             FROM UNNEST($1::text[], $2::text[], $3::int2[], $4::text[], $5::text[],
                         $6::text[], $7::bigint[], $8::bigint[])
                  AS u (room, user_key, kind, user_name, by_name, reason, until_ts, created_at)
             JOIN rooms r ON r.name = u.room",
            &[
                &col(|r| &r.room),
                &col(|r| &r.user_key),
                &kinds,
                &col(|r| &r.user_name),
                &col(|r| &r.by_name),
                &col(|r| &r.reason),
                &until,
                &created,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }

    /// Messages of one room already imported, with their seqs.
    pub async fn import_messages(&self, room: &str, rows: &[MessageRow]) -> StoreResult<()> {
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
        let keys: Vec<&str> = rows.iter().map(|r| r.sender_key.as_str()).collect();
        let senders: Vec<&str> = rows.iter().map(|r| r.sender.as_str()).collect();
        let bodies: Vec<&str> = rows.iter().map(|r| r.body.as_str()).collect();
        let ts: Vec<i64> = rows.iter().map(|r| r.ts).collect();
        let nonces: Vec<Option<&str>> = rows.iter().map(|r| r.nonce.as_deref()).collect();
        let edit_of: Vec<Option<i64>> = rows.iter().map(|r| r.edit_of).collect();
        let delete_of: Vec<Option<i64>> = rows.iter().map(|r| r.delete_of).collect();
        let edited: Vec<Option<i64>> = rows.iter().map(|r| r.edited_ts).collect();
        let deleted: Vec<bool> = rows.iter().map(|r| r.deleted).collect();
        let c = self.client().await?;
        let stmt = c
            .prepare_cached(
                "INSERT INTO messages (room_id, seq, sender_key, sender, body, ts, nonce,
                                       edit_of, delete_of, edited_ts, deleted)
                 SELECT (SELECT id FROM rooms WHERE name = $1), u.*
                 FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::bigint[],
                             $7::text[], $8::bigint[], $9::bigint[], $10::bigint[],
                             $11::bool[]) AS u",
            )
            .await
            .map_err(pg_error)?;
        c.execute(
            &stmt,
            &[
                &room, &seqs, &keys, &senders, &bodies, &ts, &nonces, &edit_of, &delete_of,
                &edited, &deleted,
            ],
        )
        .await
        .map_err(pg_error)?;
        Ok(())
    }
}

-- Confab schema on PostgreSQL, version 4: roles, bans and mutes,
-- operators, edits and deletions as entries of a room's log, hubs and
-- their channels (the same as SQLite's version 3).

-- A member's role in the room: 0 member, 1 moderator, 2 admin, 3 owner.
-- Rooms from before roles have no owner until an operator gives one.
ALTER TABLE members ADD COLUMN role SMALLINT NOT NULL DEFAULT 0;

-- Server operators act as owners of every room.
ALTER TABLE users ADD COLUMN operator BOOLEAN NOT NULL DEFAULT FALSE;

-- A ban from the whole server (the admin API): no login while it holds
-- (`ban_until` NULL: for good).
ALTER TABLE users
    ADD COLUMN banned BOOLEAN NOT NULL DEFAULT FALSE,
    ADD COLUMN ban_reason TEXT,
    ADD COLUMN ban_until BIGINT;

-- Bans (kind 0) and mutes (kind 1), one of each kind per user and room.
-- `until_ts` NULL: for good. Ones that ended refuse nothing and are never
-- listed; the next sanction of the user replaces them.
CREATE TABLE sanctions (
    room_id    BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_key   TEXT COLLATE "C" NOT NULL,
    kind       SMALLINT NOT NULL,
    user_name  TEXT NOT NULL,
    by_name    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    until_ts   BIGINT,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_key, kind)
);

-- An edit entry names the message it changes (`edit_of`), a deletion entry
-- the message it deletes (`delete_of`). The message itself holds its
-- current body: `edited_ts` once edited; once deleted, `deleted` and its
-- body, and its edit entries' bodies, are overwritten with ''.
ALTER TABLE messages
    ADD COLUMN edit_of BIGINT,
    ADD COLUMN delete_of BIGINT,
    ADD COLUMN edited_ts BIGINT,
    ADD COLUMN deleted BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX messages_by_edit ON messages (room_id, edit_of) WHERE edit_of IS NOT NULL;

-- Hubs. A hub is the room named `HUB/`: its members are the hub's members,
-- with their hub roles, and its bans and mutes hold in all its channels.
-- A channel is a room `HUB/CHANNEL` whose `hub_id` is that room's id.
ALTER TABLE rooms
    ADD COLUMN hub_id BIGINT REFERENCES rooms (id) ON DELETE CASCADE,
    ADD COLUMN private BOOLEAN NOT NULL DEFAULT FALSE;
CREATE INDEX rooms_by_hub ON rooms (hub_id) WHERE hub_id IS NOT NULL;

-- Invite codes to a hub (its room) or a private channel: for one user and
-- used once (`user_key`), or for whoever has the code; until `expires_ts`.
CREATE TABLE invites (
    code       TEXT PRIMARY KEY,
    room_id    BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_key   TEXT COLLATE "C",
    expires_ts BIGINT,
    by_name    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- confab_append_batch as in version 3, and status 4: the sender is muted
-- in the room or in its hub (a mute in force now, by the database's clock). Edits and deletions
-- do not come this way: they are stored one at a time (lib.rs).
CREATE OR REPLACE FUNCTION confab_append_batch(
    p_rooms       TEXT[],
    p_sender_keys TEXT[],
    p_senders     TEXT[],
    p_bodies      TEXT[],
    p_ts          BIGINT[],
    p_nonces      TEXT[]
) RETURNS TABLE (
    r_status SMALLINT,
    r_seq    BIGINT,
    r_sender TEXT,
    r_body   TEXT,
    r_ts     BIGINT,
    r_nonce  TEXT
) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM rooms WHERE name = ANY (p_rooms) ORDER BY id FOR UPDATE;
    RETURN QUERY
    WITH input AS (
        SELECT u.ord, u.room, u.sender_key, u.sender, u.body, u.ts, u.nonce
          FROM unnest(p_rooms, p_sender_keys, p_senders, p_bodies, p_ts, p_nonces)
               WITH ORDINALITY AS u (room, sender_key, sender, body, ts, nonce, ord)
    ),
    checked AS (
        SELECT i.*, r.id AS room_id, r.last_seq,
               (r.id IS NOT NULL AND EXISTS (
                   SELECT 1 FROM members m
                    WHERE m.room_id = r.id AND m.user_key = i.sender_key)) AS member,
               EXISTS (
                   SELECT 1 FROM sanctions s
                    WHERE s.room_id IN (r.id, r.hub_id) AND s.user_key = i.sender_key
                      AND s.kind = 1
                      AND (s.until_ts IS NULL
                           OR s.until_ts > (extract(epoch FROM now()) * 1000)::BIGINT)
               ) AS muted,
               old.seq AS old_seq, old.sender AS old_sender, old.body AS old_body,
               old.ts AS old_ts
          FROM input i
          LEFT JOIN rooms r ON r.name = i.room
          LEFT JOIN messages old
                 ON i.nonce IS NOT NULL AND old.room_id = r.id
                AND old.sender_key = i.sender_key AND old.nonce = i.nonce
    ),
    ranked AS (
        SELECT c.*,
               CASE WHEN c.nonce IS NULL THEN 1
                    ELSE row_number() OVER (PARTITION BY c.room_id, c.sender_key, c.nonce
                                            ORDER BY c.ord)
               END AS nth
          FROM checked c
    ),
    fresh AS (
        SELECT k.*,
               k.last_seq + row_number() OVER (PARTITION BY k.room_id ORDER BY k.ord) AS new_seq
          FROM ranked k
         WHERE k.member AND NOT k.muted AND k.old_seq IS NULL AND k.nth = 1
    ),
    inserted AS (
        INSERT INTO messages (room_id, seq, sender_key, sender, body, ts, nonce)
        SELECT f.room_id, f.new_seq, f.sender_key, f.sender, f.body, f.ts, f.nonce
          FROM fresh f
        RETURNING 1
    ),
    bumped AS (
        UPDATE rooms r SET last_seq = t.top
          FROM (SELECT room_id, max(new_seq) AS top FROM fresh GROUP BY room_id) t
         WHERE r.id = t.room_id
        RETURNING 1
    )
    SELECT (CASE WHEN k.room_id IS NULL THEN 2
                 WHEN NOT k.member THEN 3
                 WHEN k.old_seq IS NOT NULL THEN 1
                 WHEN k.muted THEN 4
                 WHEN k.nth > 1 THEN 1
                 ELSE 0 END)::SMALLINT,
           COALESCE(k.old_seq, f.new_seq, first.new_seq),
           COALESCE(k.old_sender, f.sender, first.sender),
           COALESCE(k.old_body, f.body, first.body),
           COALESCE(k.old_ts, f.ts, first.ts),
           k.nonce
      FROM ranked k
      LEFT JOIN fresh f ON f.ord = k.ord
      LEFT JOIN fresh first
             ON k.nth > 1 AND first.room_id = k.room_id
            AND first.sender_key = k.sender_key AND first.nonce = k.nonce
     ORDER BY k.ord;
END
$$;

-- Confab schema, version 3: roles, bans and mutes, operators, edits
-- and deletions as entries of a room's log, hubs and their channels.

-- A member's role in the room: 0 member, 1 moderator, 2 admin, 3 owner.
-- Rooms from before roles have no owner until an operator gives one.
ALTER TABLE members ADD COLUMN role INTEGER NOT NULL DEFAULT 0;

-- Server operators act as owners of every room.
ALTER TABLE users ADD COLUMN operator INTEGER NOT NULL DEFAULT 0;

-- A ban from the whole server (the admin API): no login while it holds
-- (`ban_until` NULL: for good).
ALTER TABLE users ADD COLUMN banned INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN ban_reason TEXT;
ALTER TABLE users ADD COLUMN ban_until INTEGER;

-- Bans (kind 0) and mutes (kind 1), one of each kind per user and room.
-- `until_ts` NULL: for good. Ones that ended refuse nothing and are never
-- listed; the next sanction of the user replaces them.
CREATE TABLE sanctions (
    room_id    INTEGER NOT NULL,
    user_key   TEXT NOT NULL,
    kind       INTEGER NOT NULL,
    user_name  TEXT NOT NULL,
    by_name    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    until_ts   INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_key, kind)
) WITHOUT ROWID;

-- An edit entry names the message it changes (`edit_of`), a deletion entry
-- the message it deletes (`delete_of`). The message itself holds its
-- current body: `edited_ts` once edited; once deleted, `deleted` = 1 and
-- its body, and its edit entries' bodies, are overwritten with ''.
ALTER TABLE messages ADD COLUMN edit_of INTEGER;
ALTER TABLE messages ADD COLUMN delete_of INTEGER;
ALTER TABLE messages ADD COLUMN edited_ts INTEGER;
ALTER TABLE messages ADD COLUMN deleted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX messages_by_edit ON messages (room_id, edit_of) WHERE edit_of IS NOT NULL;

-- Hubs. A hub is the room named `HUB/`: its members are the hub's members,
-- with their hub roles, and its bans and mutes hold in all its channels.
-- A channel is a room `HUB/CHANNEL` whose `hub_id` is that room's id.
ALTER TABLE rooms ADD COLUMN hub_id INTEGER;
-- A private hub takes an invite to join; a private channel, an invite
-- (members of its hub only).
ALTER TABLE rooms ADD COLUMN private INTEGER NOT NULL DEFAULT 0;
CREATE INDEX rooms_by_hub ON rooms (hub_id) WHERE hub_id IS NOT NULL;

-- Invite codes to a hub (its room) or a private channel: for one user and
-- used once (`user_key`), or for whoever has the code; until `expires_ts`.
CREATE TABLE invites (
    code       TEXT PRIMARY KEY,
    room_id    INTEGER NOT NULL,
    user_key   TEXT,
    expires_ts INTEGER,
    by_name    TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

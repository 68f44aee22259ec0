-- Confab schema, version 4: messages stored in the order they come, and
-- found by room and seq through an index.
--
-- Until now `messages` was a WITHOUT ROWID table ordered by (room_id,
-- seq): each message was written into its room's place in the table, so a
-- commit holding messages of a hundred rooms rewrote (and now and then
-- split) a hundred pages of whole rows. Now a row goes at the end of the
-- table, where a commit's rows share a page or two, and only a small
-- entry goes to the room's place in `messages_by_seq`. The same columns,
-- the same constraints. Upgrading copies every message once.
CREATE TABLE messages_v4 (
    room_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    sender_key TEXT NOT NULL,
    sender     TEXT NOT NULL,
    body       TEXT NOT NULL,
    ts         INTEGER NOT NULL,
    nonce      TEXT,
    edit_of    INTEGER,
    delete_of  INTEGER,
    edited_ts  INTEGER,
    deleted    INTEGER NOT NULL DEFAULT 0
);
INSERT INTO messages_v4
    (room_id, seq, sender_key, sender, body, ts, nonce, edit_of, delete_of, edited_ts, deleted)
SELECT room_id, seq, sender_key, sender, body, ts, nonce, edit_of, delete_of, edited_ts, deleted
FROM messages ORDER BY room_id, seq;
DROP TABLE messages;
ALTER TABLE messages_v4 RENAME TO messages;
CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq);
-- As in versions 1 and 3.
CREATE UNIQUE INDEX messages_by_nonce ON messages (room_id, sender_key, nonce)
    WHERE nonce IS NOT NULL;
CREATE INDEX messages_by_edit ON messages (room_id, edit_of) WHERE edit_of IS NOT NULL;

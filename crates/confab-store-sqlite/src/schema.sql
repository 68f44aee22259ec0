-- Confab schema, version 1. Names are stored twice: `*_key` is the
-- lowercase identity, the other the spelling to show.

CREATE TABLE users (
    key           TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;

-- Session tokens, by the SHA-256 of the token: never the token itself.
CREATE TABLE tokens (
    hash       BLOB PRIMARY KEY,
    user_key   TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX tokens_by_user ON tokens (user_key);

-- `last_seq` is the room's message counter: a message takes last_seq + 1
-- in the transaction that stores it, so seqs are gapless.
CREATE TABLE rooms (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    topic      TEXT NOT NULL DEFAULT '',
    last_seq   INTEGER NOT NULL DEFAULT 0,
    direct     INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE members (
    room_id   INTEGER NOT NULL,
    user_key  TEXT NOT NULL,
    user_name TEXT NOT NULL,
    guest     INTEGER NOT NULL,
    read_seq  INTEGER NOT NULL DEFAULT 0,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_key)
) WITHOUT ROWID;
CREATE INDEX members_by_user ON members (user_key);

CREATE TABLE messages (
    room_id    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    sender_key TEXT NOT NULL,
    sender     TEXT NOT NULL,
    body       TEXT NOT NULL,
    ts         INTEGER NOT NULL,
    nonce      TEXT,
    PRIMARY KEY (room_id, seq)
) WITHOUT ROWID;
-- Exactly-once: one message per (room, sender, nonce), kept as long as
-- the message is.
CREATE UNIQUE INDEX messages_by_nonce ON messages (room_id, sender_key, nonce)
    WHERE nonce IS NOT NULL;

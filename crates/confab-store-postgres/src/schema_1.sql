-- Confab schema on PostgreSQL, version 1: the same tables as SQLite's
-- version 2. Names are stored twice: `*_key` is the lowercase identity, the
-- other the spelling to show. Columns that lists are ordered by use the "C"
-- collation (byte order), so pages come out as they do on SQLite.

CREATE TABLE users (
    key           TEXT COLLATE "C" PRIMARY KEY,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    BIGINT NOT NULL
);

-- Session tokens, by the SHA-256 of the token: never the token itself.
CREATE TABLE tokens (
    hash       BYTEA PRIMARY KEY,
    user_key   TEXT COLLATE "C" NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX tokens_by_user ON tokens (user_key);

-- `last_seq` is the room's message counter: a message takes last_seq + 1
-- in the transaction that stores it, so seqs are gapless.
CREATE TABLE rooms (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT COLLATE "C" NOT NULL UNIQUE,
    topic         TEXT NOT NULL DEFAULT '',
    last_seq      BIGINT NOT NULL DEFAULT 0,
    direct        BOOLEAN NOT NULL,
    guest_created BOOLEAN NOT NULL DEFAULT FALSE,
    created_at    BIGINT NOT NULL
);

CREATE TABLE members (
    room_id   BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    user_key  TEXT COLLATE "C" NOT NULL,
    user_name TEXT NOT NULL,
    guest     BOOLEAN NOT NULL,
    read_seq  BIGINT NOT NULL DEFAULT 0,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_key)
);
CREATE INDEX members_by_user ON members (user_key);

CREATE TABLE messages (
    room_id    BIGINT NOT NULL REFERENCES rooms (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    sender_key TEXT NOT NULL,
    sender     TEXT NOT NULL,
    body       TEXT NOT NULL,
    ts         BIGINT NOT NULL,
    nonce      TEXT,
    PRIMARY KEY (room_id, seq)
);
-- Exactly-once: one message per (room, sender, nonce), kept as long as the
-- message is.
CREATE UNIQUE INDEX messages_by_nonce ON messages (room_id, sender_key, nonce)
    WHERE nonce IS NOT NULL;

-- Users deleted, in order, for every server to close their connections.
CREATE TABLE removed_users (
    id         BIGSERIAL PRIMARY KEY,
    user_name  TEXT NOT NULL,
    removed_at BIGINT NOT NULL
);

-- Confab schema, version 2.

-- Users deleted, in order: every server on the database polls this log and
-- closes the deleted users' connections, whichever process or node deleted
-- them. Entries older than a day are pruned by the next deletion.
-- AUTOINCREMENT: an id is never reused, so a cursor stays valid.
CREATE TABLE removed_users (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_name  TEXT NOT NULL,
    removed_at INTEGER NOT NULL
);

-- A room created by a guest is removed, history and all, once nobody is a
-- member any more: guests come and go, their rooms should not pile up.
ALTER TABLE rooms ADD COLUMN guest_created INTEGER NOT NULL DEFAULT 0;

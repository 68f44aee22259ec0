-- Confab schema on PostgreSQL, version 3: confab_append_batch set-based.
--
-- Same arguments, same answers as version 2 (one row per message, in
-- order; status 0 stored, 1 a duplicate nonce with the original's fields,
-- 2 no such room, 3 not a member), but one statement for the whole batch
-- instead of five per message: the per-statement work of the PL/pgSQL loop
-- was most of PostgreSQL's time (BENCHMARKS.md).
--
-- After the rooms are locked (in id order, as before), the statement sees
-- every message committed before it; within the batch, the first message
-- with a given (room, sender, nonce) is stored and the later ones answer
-- as its duplicates. Each room's new messages take last_seq + 1, + 2, … in
-- the batch's order, and last_seq moves to the highest.
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
         WHERE k.member AND k.old_seq IS NULL AND k.nth = 1
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
                 WHEN k.old_seq IS NOT NULL OR k.nth > 1 THEN 1
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

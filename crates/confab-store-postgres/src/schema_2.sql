-- Confab schema on PostgreSQL, version 2: group commit.
--
-- confab_append_batch stores a batch of room messages (the i-th element of
-- each array is one message) in the caller's transaction, in one round
-- trip, and answers one row per message, in order:
--   status 0: stored, with its new seq;
--   status 1: a duplicate nonce: the original message's fields;
--   status 2: no such room;  status 3: the sender is not a member.
-- A message that is refused does not abort the others.
--
-- The rooms of the batch are locked first, in id order: a batch on
-- another node that wants some of the same rooms waits for this one's
-- commit instead of deadlocking with it. Under the lock, each statement
-- sees what other transactions committed before (READ COMMITTED), so the
-- nonce check and the next seq hold across nodes.
CREATE FUNCTION confab_append_batch(
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
DECLARE
    i      INTEGER;
    v_room BIGINT;
    v_seq  BIGINT;
BEGIN
    PERFORM 1 FROM rooms WHERE name = ANY (p_rooms) ORDER BY id FOR UPDATE;
    FOR i IN 1 .. COALESCE(array_length(p_rooms, 1), 0) LOOP
        r_status := NULL; r_seq := NULL; r_sender := NULL;
        r_body := NULL; r_ts := NULL; r_nonce := NULL;
        SELECT id INTO v_room FROM rooms WHERE name = p_rooms[i];
        IF NOT FOUND THEN
            r_status := 2;
            RETURN NEXT;
            CONTINUE;
        END IF;
        PERFORM 1 FROM members WHERE room_id = v_room AND user_key = p_sender_keys[i];
        IF NOT FOUND THEN
            r_status := 3;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF p_nonces[i] IS NOT NULL THEN
            SELECT m.seq, m.sender, m.body, m.ts, m.nonce
              INTO r_seq, r_sender, r_body, r_ts, r_nonce
              FROM messages m
             WHERE m.room_id = v_room AND m.sender_key = p_sender_keys[i]
               AND m.nonce = p_nonces[i];
            IF FOUND THEN
                r_status := 1;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        UPDATE rooms SET last_seq = last_seq + 1 WHERE id = v_room
            RETURNING last_seq INTO v_seq;
        INSERT INTO messages (room_id, seq, sender_key, sender, body, ts, nonce)
            VALUES (v_room, v_seq, p_sender_keys[i], p_senders[i], p_bodies[i],
                    p_ts[i], p_nonces[i]);
        r_status := 0; r_seq := v_seq; r_sender := p_senders[i];
        r_body := p_bodies[i]; r_ts := p_ts[i]; r_nonce := p_nonces[i];
        RETURN NEXT;
    END LOOP;
END
$$;

#!/usr/bin/env python3
"""WAL frames per message for the messages table's shape, rows spread over
rooms at random, committed in batches (BENCHMARKS.md, 2026-12-06 night).

    python3 btree-sim.py            # every layout, 100 rooms, batches of 80 and 400

Layouts: `wr` the table as it is (WITHOUT ROWID, primary key (room_id, seq));
`rowid` a rowid table keyed by room << 32 | seq; `arrival` rows in arrival
order with a unique (room_id, seq) index. 100,000 rows first, then 60,000
counted (frames from the WAL's growth, autocheckpoint off).
"""
import os, random, sqlite3, tempfile

COLS = "room_id, seq, sender_key, sender, body, ts, nonce, edit_of, delete_of"


def run(layout, batch, rooms=100, total=60000, warm=100000, page_size=4096):
    with tempfile.TemporaryDirectory() as d:
        measure(os.path.join(d, "t.db"), layout, batch, rooms, total, warm, page_size)


def measure(path, layout, batch, rooms, total, warm, page_size):
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(f"pragma page_size={page_size}")
    c.execute("pragma journal_mode=wal")
    c.execute("pragma synchronous=normal")
    c.execute("pragma wal_autocheckpoint=0")
    rest = "sender_key text, sender text, body text, ts int, nonce text, edit_of int, delete_of int"
    if layout == "wr":
        c.execute(f"create table m (room_id int not null, seq int not null, {rest}, primary key (room_id, seq)) without rowid")
    elif layout == "rowid":
        c.execute(f"create table m (id integer primary key, room_id int not null, seq int not null, {rest})")
    else:
        c.execute(f"create table m (id integer primary key, room_id int not null, seq int not null, {rest})")
        c.execute("create unique index m_room_seq on m (room_id, seq)")
    seq = [0] * rooms
    body = "p12:123456:1234567890123:" + "x" * 76

    def insert(n):
        rows = []
        for _ in range(n):
            r = random.randrange(rooms)
            seq[r] += 1
            row = (r, seq[r], "guest:abcdef12", "abcdef12", body, 1765000000000, None, None, None)
            rows.append(((r << 32) + seq[r],) + row if layout == "rowid" else row)
        cols = ("id, " if layout == "rowid" else "") + COLS
        marks = ",".join("?" * len(rows[0]))
        c.execute("begin immediate")
        c.executemany(f"insert into m ({cols}) values ({marks})", rows)
        c.execute("commit")

    done = 0
    while done < warm:
        insert(1000)
        done += 1000
    c.execute("pragma wal_checkpoint(truncate)")
    done = 0
    while done < total:
        insert(batch)
        done += batch
    frames = os.path.getsize(path + "-wal") / (page_size + 24)
    print(f"{layout:8} rooms {rooms:4} batch {batch:4}: {frames / total:.2f} frames a message, "
          f"{frames / (total / batch):.0f} a commit", flush=True)
    c.close()


if __name__ == "__main__":
    for layout in ("wr", "rowid", "arrival"):
        for batch in (80, 400):
            run(layout, batch)
    run("wr", 400, rooms=1)

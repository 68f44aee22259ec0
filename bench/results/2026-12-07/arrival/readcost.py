import sqlite3, time, os, random
cols="room_id INTEGER NOT NULL, seq INTEGER NOT NULL, sender_key TEXT NOT NULL, sender TEXT NOT NULL, body TEXT NOT NULL, ts INTEGER NOT NULL, nonce TEXT, edit_of INTEGER, delete_of INTEGER, edited_ts INTEGER, deleted INTEGER NOT NULL DEFAULT 0"
for name, ddl in [("v3", f"CREATE TABLE messages ({cols}, PRIMARY KEY (room_id, seq)) WITHOUT ROWID"),
                  ("v4", f"CREATE TABLE messages ({cols}); CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq)")]:
    p=f"/tmp/rc-{name}.db"
    if os.path.exists(p): os.remove(p)
    c=sqlite3.connect(p); c.executescript("PRAGMA journal_mode=WAL;"+ddl)
    N=1_000_000; R=100
    t=time.time()
    rows=((i%R, i//R+1, "user%d"%(i%1000), "User", "x"*100, i, None, None, None, None, 0) for i in range(N))
    c.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows); c.commit()
    ins=time.time()-t
    c.close()
    # cold-ish: new connection, drop OS cache impossible; measure warm reads of latest 50 + random pages
    c=sqlite3.connect(p)
    q="SELECT seq, sender, body, ts, nonce, edit_of, delete_of, edited_ts, deleted FROM messages WHERE room_id=? AND seq < ? ORDER BY seq DESC LIMIT 50"
    t=time.time()
    for k in range(5000):
        r=random.randrange(R); b=random.randrange(100, N//R)
        c.execute(q,(r,b)).fetchall()
    rd=(time.time()-t)/5000*1e6
    print(name, "insert %.1fs"%ins, "read 50: %.0f us"%rd, "size %d MB"%(os.path.getsize(p)>>20))

import sqlite3, time, os
cols="room_id INTEGER NOT NULL, seq INTEGER NOT NULL, sender_key TEXT NOT NULL, sender TEXT NOT NULL, body TEXT NOT NULL, ts INTEGER NOT NULL, nonce TEXT, edit_of INTEGER, delete_of INTEGER, edited_ts INTEGER, deleted INTEGER NOT NULL DEFAULT 0"
for name, ddl in [("v3", f"CREATE TABLE messages ({cols}, PRIMARY KEY (room_id, seq)) WITHOUT ROWID"),
                  ("v4", f"CREATE TABLE messages ({cols}); CREATE UNIQUE INDEX messages_by_seq ON messages (room_id, seq)")]:
    p=f"/tmp/pc-{name}.db"
    for f in [p, p+"-wal", p+"-shm"]:
        if os.path.exists(f): os.remove(f)
    c=sqlite3.connect(p, isolation_level=None); c.execute("PRAGMA journal_mode=WAL"); c.execute("PRAGMA synchronous=FULL"); c.executescript(ddl)
    N=1_000_000; R=100
    c.execute("BEGIN")
    c.executemany("INSERT INTO messages VALUES (?,?,?,?,?,?,?,?,?,?,?)", ((i%R, i//R+1, "user%d"%(i%1000), "User", "x"*100, i, None, None, None, None, 0) for i in range(N)))
    c.execute("COMMIT"); c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    times=[]; frames=[]
    for k in range(5):
        w0=os.path.getsize(p+"-wal")
        t=time.time()
        c.execute("BEGIN IMMEDIATE"); c.execute("DELETE FROM messages WHERE room_id=? AND seq < ?", (7, 257+256*k)); c.execute("COMMIT")
        times.append((time.time()-t)*1000); frames.append((os.path.getsize(p+"-wal")-w0)//4120)
    print(name, "purge chunk of 256: ms", ["%.1f"%x for x in times], "WAL frames", frames)

import sqlite3, os, random, sys
def run(batch, rooms=100, total=60000, rowid=False, warm=100000):
    p='/tmp/sq/t.db'
    for f in (p, p+'-wal', p+'-shm'):
        if os.path.exists(f): os.remove(f)
    c=sqlite3.connect(p, isolation_level=None)
    c.execute('pragma journal_mode=wal'); c.execute('pragma synchronous=normal'); c.execute('pragma wal_autocheckpoint=0')
    if rowid:
        c.execute('create table m (id integer primary key, room_id int, seq int, sender_key text, sender text, body text, ts int, nonce text, edit_of int, delete_of int)')
    else:
        c.execute('create table m (room_id int not null, seq int not null, sender_key text, sender text, body text, ts int, nonce text, edit_of int, delete_of int, primary key(room_id, seq)) without rowid')
    seq=[0]*rooms
    body='p12:123456:1234567890123:'+'x'*76
    def ins(n):
        c.execute('begin immediate')
        rows=[]
        for i in range(n):
            r=random.randrange(rooms); seq[r]+=1
            rows.append(((r<<32)+seq[r], r, seq[r],'guest:abcdef12','abcdef12',body,1765000000000,None,None,None) if rowid else (r, seq[r],'guest:abcdef12','abcdef12',body,1765000000000,None,None,None))
        q='insert into m values (%s)'%','.join('?'*len(rows[0]))
        c.executemany(q, rows)
        c.execute('commit')
    # warm up
    done=0
    while done<warm: ins(1000); done+=1000
    c.execute('pragma wal_checkpoint(truncate)')
    w0=os.path.getsize(p+'-wal') if os.path.exists(p+'-wal') else 0
    done=0
    while done<total: ins(batch); done+=batch
    w1=os.path.getsize(p+'-wal')
    frames=(w1-w0)/4120
    print(f'rowid={rowid} batch={batch}: frames/msg {frames/total:.3f} frames/commit {frames/(total/batch):.1f}', flush=True)
for rowid in (False, True):
    for b in (50, 100, 400):
        run(b, rowid=rowid)

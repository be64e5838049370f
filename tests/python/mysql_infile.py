"""LOAD DATA LOCAL INFILE of ~10 MB through Switchyard (mysqlclient). The file is made of
0x11 bytes, COM_CHANGE_USER's command byte, so that file packets whose sequence id wraps
to 0 look exactly like that command: the relay must know they are file data.
argv: port workdir."""
import os
import sys

import MySQLdb

port, workdir = int(sys.argv[1]), sys.argv[2]
path = os.path.join(workdir, "infile.txt")
line = b"\x11" * 16000 + b"\n"
with open(path, "wb") as f:
    for _ in range(600):
        f.write(line)

conn = MySQLdb.connect(host="127.0.0.1", port=port, user="app", password="app", database="app", local_infile=1)
cur = conn.cursor()
cur.execute("CREATE TABLE bulk (v LONGTEXT) CHARACTER SET latin1")
cur.execute("LOAD DATA LOCAL INFILE %s INTO TABLE bulk CHARACTER SET latin1 FIELDS ESCAPED BY ''", (path,))
conn.commit()
cur.execute("SELECT COUNT(*), SUM(LENGTH(v)) FROM bulk")
count, total = cur.fetchone()
assert (count, int(total)) == (600, 600 * 16000), (count, total)
cur.execute("SELECT CURRENT_USER()")
assert cur.fetchone()[0] == "app@%"
print("INFILE-OK")

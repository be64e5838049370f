"""A client that pipelines and reads while it writes: a query with a large result, and
right behind it, without waiting, a large query. A direct connection copes: the server
writes the first result while the client drains it and keeps sending. A proxy that
stops reading one side while it is blocked writing to the other stalls here, both
directions full.

Usage: mysql_pipeline.py PORT SIZE. Prints "ok <bytes read>" or "stalled <bytes read>"."""
import socket
import sys
import threading
import time

import pymysql

port, size = int(sys.argv[1]), int(sys.argv[2])
conn = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app", database="app",
                       max_allowed_packet=4 * size)
sock = conn._sock  # logged in; from here on the protocol is spoken by hand
MAX = 0xFFFFFF


def command(payload):
    """COM_QUERY framed in packets of at most 16 MiB - 1 (a full one is followed by
    another, possibly empty)."""
    out, seq, pos = bytearray(), 0, 0
    while True:
        chunk = payload[pos:pos + MAX]
        out += len(chunk).to_bytes(3, "little") + bytes([seq & 0xFF]) + chunk
        pos += len(chunk)
        seq += 1
        if len(chunk) < MAX:
            return bytes(out)


first = command(b"\x03" + f"SELECT REPEAT('x', {size})".encode())
second = command(b"\x03SELECT LENGTH('" + b"y" * size + b"')")
want = str(size).encode()


def writer():
    try:
        sock.sendall(first + second)
    except OSError:
        pass


threading.Thread(target=writer, daemon=True).start()
got, tail = 0, b""
sock.settimeout(1.0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        data = sock.recv(1 << 20)
    except socket.timeout:
        continue
    if not data:
        break
    got += len(data)
    tail = (tail + data)[-4096:]
    # The second result's value (the first result holds only x's).
    if want in tail:
        print(f"ok {got}")
        sys.exit(0)
print(f"stalled {got}")
sys.exit(1)

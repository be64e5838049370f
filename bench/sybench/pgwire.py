"""A minimal asyncio PostgreSQL client (protocol 3.0): startup, trust / cleartext / md5 /
SCRAM-SHA-256 authentication, simple queries. Enough for 10,000 idle connections and
for failover probe loops without a driver per connection."""

import asyncio
import base64
import hashlib
import hmac
import os
import struct


class PgError(Exception):
    def __init__(self, fields):
        self.fields = fields
        self.sqlstate = fields.get("C", "?????")
        self.message = fields.get("M", "")
        super().__init__(f"{fields.get('S', 'ERROR')} {self.sqlstate}: {self.message}")


_salted_cache = {}


def _salted(password, salt, iters):
    key = (password, salt, iters)
    if key not in _salted_cache:
        _salted_cache[key] = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iters)
    return _salted_cache[key]


def _fields(body):
    out = {}
    for part in body.split(b"\0"):
        if part:
            out[chr(part[0])] = part[1:].decode(errors="replace")
    return out


class Conn:
    def __init__(self, reader, writer):
        self.r = reader
        self.w = writer
        self.params = {}

    @classmethod
    async def connect(cls, host, port, user, database, password=None, params=None):
        reader, writer = await asyncio.open_connection(host, port)
        c = cls(reader, writer)
        try:
            await c._startup(user, database, password, params or {})
        except BaseException:
            c.close()
            raise
        return c

    async def _read(self):
        head = await self.r.readexactly(5)
        typ, ln = head[:1], struct.unpack("!I", head[1:])[0]
        body = await self.r.readexactly(ln - 4) if ln > 4 else b""
        return typ, body

    def _send(self, typ, body):
        self.w.write(typ + struct.pack("!I", len(body) + 4) + body)

    async def _startup(self, user, database, password, params):
        kv = {"user": user, "database": database, **params}
        body = struct.pack("!I", 196608) + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in kv.items()) + b"\0"
        self.w.write(struct.pack("!I", len(body) + 4) + body)
        await self.w.drain()
        scram = None
        while True:
            typ, body = await self._read()
            if typ == b"R":
                code = struct.unpack("!I", body[:4])[0]
                if code == 0:
                    continue
                if password is None:
                    raise PgError({"C": "28000", "M": f"server asked for a password (auth code {code})"})
                if code == 3:
                    self._send(b"p", password.encode() + b"\0")
                elif code == 5:
                    salt = body[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    self._send(b"p", b"md5" + hashlib.md5(inner + salt).hexdigest().encode() + b"\0")
                elif code == 10:
                    mechs = body[4:].split(b"\0")
                    if b"SCRAM-SHA-256" not in mechs:
                        raise PgError({"C": "28000", "M": f"no supported SASL mechanism in {mechs}"})
                    nonce = base64.b64encode(os.urandom(18)).decode()
                    first_bare = f"n=,r={nonce}"
                    data = ("n,," + first_bare).encode()
                    self._send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data)
                    scram = {"nonce": nonce, "first_bare": first_bare}
                elif code == 11:
                    server_first = body[4:].decode()
                    attrs = dict(a.split("=", 1) for a in server_first.split(","))
                    if not attrs["r"].startswith(scram["nonce"]):
                        raise PgError({"C": "28000", "M": "SCRAM: server nonce does not extend ours"})
                    salted = _salted(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
                    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
                    stored_key = hashlib.sha256(client_key).digest()
                    final_wo_proof = f"c=biws,r={attrs['r']}"
                    auth_msg = f"{scram['first_bare']},{server_first},{final_wo_proof}".encode()
                    sig = hmac.new(stored_key, auth_msg, hashlib.sha256).digest()
                    proof = bytes(a ^ b for a, b in zip(client_key, sig))
                    self._send(b"p", f"{final_wo_proof},p={base64.b64encode(proof).decode()}".encode())
                elif code == 12:
                    continue
                else:
                    raise PgError({"C": "28000", "M": f"unsupported auth request {code}"})
                await self.w.drain()
            elif typ == b"S":
                k, v, _ = body.split(b"\0", 2)
                self.params[k.decode()] = v.decode()
            elif typ == b"K":
                pass
            elif typ == b"E":
                raise PgError(_fields(body))
            elif typ == b"Z":
                return
            # NoticeResponse and anything else: ignore

    async def query(self, sql):
        """Run one simple query; the rows of its last result as lists of str/None."""
        self._send(b"Q", sql.encode() + b"\0")
        await self.w.drain()
        rows, err = [], None
        while True:
            typ, body = await self._read()
            if typ == b"D":
                n = struct.unpack("!H", body[:2])[0]
                pos, row = 2, []
                for _ in range(n):
                    ln = struct.unpack("!i", body[pos:pos + 4])[0]
                    pos += 4
                    if ln < 0:
                        row.append(None)
                    else:
                        row.append(body[pos:pos + ln].decode())
                        pos += ln
                rows.append(row)
            elif typ == b"T":
                rows = []
            elif typ == b"E":
                err = PgError(_fields(body))
                if err.fields.get("S") in ("FATAL", "PANIC"):
                    raise err
            elif typ == b"Z":
                if err:
                    raise err
                return rows

    def close(self):
        try:
            self._send(b"X", b"")
        except Exception:
            pass
        try:
            self.w.close()
        except Exception:
            pass

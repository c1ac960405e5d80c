"""Who may do what, kept in Redis (REDIS_URL): every worker on every host knows each user, token and session at once,
and holds a guessing address back alike.

- `gpustats:user:<name>`: a hash (role, hash, epoch, created); `gpustats:users`: their names.
- `gpustats:credential:<digest>`: a hash (id, kind, name, role, prefix, devices, created);
  `gpustats:credentials`: id -> digest, to list and remove them; `gpustats:credential-used`:
  id -> when last used. A credential's `maker` is the user who made it.
- `gpustats:session:<digest>`: a signed-in session (kind, name, proof, created, used, address,
  agent), expiring 30 days after it was made or 7 after it was last used, whichever is first;
  `gpustats:sessions:<kind>:<name>`: its digests by when last used.
- `gpustats:signin:addr:<address>` and `gpustats:signin:user:<name>`: the guessing throttle's
  hashes (start, fails, until), expiring with their window: throttle.py's rules on Redis' own clock.
"""
import json
import logging
import math
import time

import redis

from gpustats.access.accounts import MOST_SESSIONS, SESSION_IDLE_S, SESSION_LIFE_S, AccountError
from gpustats.access.throttle import FIRST_WAIT_S, FREE_FAILS, WINDOW_S, user_delay
from gpustats.scaleout import PREFIX, Unavailable
from gpustats.tokens import PREFIX_CHARS

log = logging.getLogger("gpustats")
USERS, CREDENTIALS, USED, NEXT_ID = (PREFIX + "users", PREFIX + "credentials", PREFIX + "credential-used",
                                     PREFIX + "credential-id")
# KEYS: the user's hash, the set of names. ARGV: name, role, hash, created. Adds only a new name.
ADD_USER = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'role', ARGV[2], 'hash', ARGV[3], 'epoch', 0, 'created', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
# KEYS: the user's hash. ARGV: 'role' or 'hash', the value. Changes only a user that exists.
UPDATE_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[1] == 'hash' then redis.call('HINCRBY', KEYS[1], 'epoch', 1) end
return 1
"""
# KEYS: the session's hash, its name's sorted set. ARGV: digest, kind, name, proof, now, address, agent, most,
# the session key's prefix, idle seconds, life seconds. Keeps the name's `most` latest sessions.
ADD_SESSION = """
local now, idle, life = tonumber(ARGV[5]), tonumber(ARGV[10]), tonumber(ARGV[11])
redis.call('HSET', KEYS[1], 'kind', ARGV[2], 'name', ARGV[3], 'proof', ARGV[4], 'created', ARGV[5], 'used', ARGV[5],
           'address', ARGV[6], 'agent', ARGV[7])
redis.call('PEXPIREAT', KEYS[1], math.floor((now + math.min(idle, life)) * 1000))
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - idle)
for _, old in ipairs(redis.call('ZRANGE', KEYS[2], 0, -(tonumber(ARGV[8]) + 1))) do
  redis.call('DEL', ARGV[9] .. old)
  redis.call('ZREM', KEYS[2], old)
end
redis.call('PEXPIRE', KEYS[2], math.floor(idle * 1000))
return 1
"""
# KEYS: the session's hash, its name's sorted set. ARGV: digest, now, address, agent, idle seconds, life seconds.
# Only a session that still exists is marked used: an ended one is not brought back.
SESSION_USED = """
local created = tonumber(redis.call('HGET', KEYS[1], 'created'))
if not created then return 0 end
local now, idle, life = tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', KEYS[1], 'used', ARGV[2], 'address', ARGV[3], 'agent', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], math.floor(math.min(now + idle, created + life) * 1000))
redis.call('ZADD', KEYS[2], 'XX', now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], math.floor(idle * 1000))
return 1
"""
SESSION_FIELDS = ("kind", "name", "proof", "created", "used", "address", "agent")


def _session_key(secret_digest):
    return f"{PREFIX}session:{secret_digest}"


def _sessions_key(kind, name):
    return f"{PREFIX}sessions:{kind}:{name}"


def _user_key(name):
    return f"{PREFIX}user:{name}"


def _credential_key(secret_digest):
    return f"{PREFIX}credential:{secret_digest}"


def _text(fields, name):
    value = fields.get(name.encode())
    return None if value is None else value.decode()


class RedisAccounts:
    """Users and credentials in Redis, shared by every worker and host."""

    def __init__(self, client, clock=time.time):
        self._client, self._clock = client, clock
        self._add_user = client.register_script(ADD_USER)
        self._update_user = client.register_script(UPDATE_USER)
        self._add_session = client.register_script(ADD_SESSION)
        self._session_used = client.register_script(SESSION_USED)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def user(self, name):
        fields = self._call(self._client.hgetall, _user_key(name))
        if not fields:
            return None
        return {"name": name, "role": _text(fields, "role"), "hash": _text(fields, "hash"),
                "epoch": int(_text(fields, "epoch") or 0), "createdAt": float(_text(fields, "created") or 0)}

    def users(self):
        names = sorted(name.decode() for name in self._call(self._client.smembers, USERS))
        return [user for user in (self.user(name) for name in names) if user]

    def add_user(self, name, role, password_hash):
        if not self._call(self._add_user, keys=[_user_key(name), USERS], args=[name, role, password_hash, self._clock()]):
            raise AccountError(f"a user {name!r} exists already", status=409, field="name")

    def update_user(self, name, role=None, password_hash=None):
        field, value = ("hash", password_hash) if password_hash is not None else ("role", role)
        if not self._call(self._update_user, keys=[_user_key(name)], args=[field, value]):
            raise AccountError(f"no user {name!r}", status=404, field="name")

    def remove_user(self, name):
        pipe = self._client.pipeline()
        pipe.delete(_user_key(name))
        pipe.srem(USERS, name)
        if not self._call(pipe.execute)[0]:
            raise AccountError(f"no user {name!r}", status=404, field="name")

    def add_credential(self, kind, name, role, secret_digest, prefix, devices=None, maker=None, maker_since=None):
        credential_id = str(self._call(self._client.incr, NEXT_ID))
        pipe = self._client.pipeline()
        pipe.hset(_credential_key(secret_digest), mapping={
            "id": credential_id, "kind": kind, "name": name, "role": role, "prefix": prefix[:PREFIX_CHARS],
            "devices": json.dumps(devices) if devices else "", "created": self._clock(), "maker": maker or "",
            "makerSince": "" if maker_since is None else repr(float(maker_since))})
        pipe.hset(CREDENTIALS, credential_id, secret_digest)
        self._call(pipe.execute)
        return credential_id

    def credential(self, secret_digest):
        fields = self._call(self._client.hgetall, _credential_key(secret_digest))
        if not fields:
            return None
        credential_id = _text(fields, "id")
        used = self._call(self._client.hget, USED, credential_id)
        devices = _text(fields, "devices")
        return {"id": credential_id, "kind": _text(fields, "kind"), "name": _text(fields, "name"),
                "role": _text(fields, "role"), "prefix": _text(fields, "prefix"),
                "devices": json.loads(devices) if devices else None, "createdAt": float(_text(fields, "created")),
                "lastUsedAt": float(used) if used else None, "maker": _text(fields, "maker") or None,
                "makerSince": float(_text(fields, "makerSince")) if _text(fields, "makerSince") else None}

    def credentials(self, kind):
        digests = self._call(self._client.hgetall, CREDENTIALS)
        found = [self.credential(d.decode()) for _, d in sorted(digests.items(), key=lambda item: int(item[0]))]
        return [c for c in found if c and c["kind"] == kind]

    def remove_credential(self, kind, credential_id):
        secret_digest = self._call(self._client.hget, CREDENTIALS, credential_id)
        found = secret_digest and self.credential(secret_digest.decode())
        if not found or found["kind"] != kind:
            raise AccountError(f"no {kind} {credential_id!r}", status=404, field="id")
        self._forget_credential(credential_id, secret_digest)

    def _forget_credential(self, credential_id, secret_digest):
        pipe = self._client.pipeline()
        pipe.delete(_credential_key(secret_digest.decode()))
        pipe.hdel(CREDENTIALS, credential_id)
        pipe.hdel(USED, credential_id)
        self._call(pipe.execute)

    def used(self, credential_id, at):
        self._call(self._client.hset, USED, credential_id, at)

    def remove_credentials_made_by(self, maker, roles):
        """Remove the tokens and links `maker` made with one of `roles`; return how many."""
        removed = 0
        for credential_id, secret_digest in self._call(self._client.hgetall, CREDENTIALS).items():
            found = self.credential(secret_digest.decode())
            if found and found["maker"] == maker and found["role"] in roles:
                self._forget_credential(credential_id.decode(), secret_digest)
                removed += 1
        return removed

    def add_session(self, secret_digest, kind, name, proof, address, agent):
        self._call(self._add_session, keys=[_session_key(secret_digest), _sessions_key(kind, name)],
                   args=[secret_digest, kind, name, proof, self._clock(), address or "", agent or "", MOST_SESSIONS,
                         f"{PREFIX}session:", SESSION_IDLE_S, SESSION_LIFE_S])

    def session(self, secret_digest):
        values = self._call(self._client.hmget, _session_key(secret_digest), SESSION_FIELDS)
        if values[0] is None:
            return None
        kind, name, proof, created, used, address, agent = (v.decode() if v is not None else None for v in values)
        return {"id": secret_digest, "kind": kind, "name": name, "proof": proof, "createdAt": float(created),
                "lastUsedAt": float(used), "address": address or None, "agent": agent or None}

    def sessions(self, name):
        digests = [d.decode() for d in self._call(self._client.zrevrange, _sessions_key("user", name), 0, -1)]
        return [found for found in map(self.session, digests) if found is not None]

    def session_used(self, secret_digest, at, address, agent):
        found = self.session(secret_digest)
        if found is not None:
            self._call(self._session_used, keys=[_session_key(secret_digest), _sessions_key(found["kind"], found["name"])],
                       args=[secret_digest, at, address or "", agent or "", SESSION_IDLE_S, SESSION_LIFE_S])

    def remove_session(self, secret_digest):
        found = self.session(secret_digest)
        pipe = self._client.pipeline()
        pipe.delete(_session_key(secret_digest))
        if found is not None:
            pipe.zrem(_sessions_key(found["kind"], found["name"]), secret_digest)
        self._call(pipe.execute)

    def remove_sessions(self, name, keep=None):
        """Remove every session of the user `name` but `keep`'s; return how many."""
        index = _sessions_key("user", name)
        gone = [d.decode() for d in self._call(self._client.zrange, index, 0, -1) if d.decode() != keep]
        if gone:
            pipe = self._client.pipeline()
            pipe.delete(*map(_session_key, gone))
            pipe.zrem(index, *gone)
            self._call(pipe.execute)
        return len(gone)


# KEYS: the address's hash, the user's hash. ARGV: window, free fails, first wait. Returns the address's fails.
FAILED = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local window, free, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function count(key)
  local kept = redis.call('HMGET', key, 'start', 'fails')
  local start, fails = tonumber(kept[1]) or now, tonumber(kept[2]) or 0
  if now - start > window then start, fails = now, 0 end
  fails = fails + 1
  redis.call('HSET', key, 'start', start, 'fails', fails)
  return fails
end
local fails = count(KEYS[1])
local wait = 0
if fails >= free then wait = math.min(window, first * 2 ^ (fails - free)) end
redis.call('HSET', KEYS[1], 'until', now + wait)
redis.call('PEXPIRE', KEYS[1], math.ceil((window + wait) * 1000))
count(KEYS[2])
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000))
return fails
"""
# KEYS: the address's hash, the user's hash. ARGV: window. Returns {seconds the address waits, the user's fails}.
STATE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local untl = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
local user = redis.call('HMGET', KEYS[2], 'start', 'fails')
local fails = tonumber(user[2]) or 0
if now - (tonumber(user[1]) or now) > tonumber(ARGV[1]) then fails = 0 end
return {tostring(math.max(0, untl - now)), fails}
"""

# KEYS: the address's hash, the user's hash. ARGV: free fails. The right password: the address and
# the user each give back the try counted for it before the hash; the address's wrong ones still count.
SUCCEEDED = """
local fails = tonumber(redis.call('HGET', KEYS[1], 'fails'))
if fails and fails > 0 then
  redis.call('HSET', KEYS[1], 'fails', fails - 1)
  if fails - 1 < tonumber(ARGV[1]) then redis.call('HSET', KEYS[1], 'until', 0) end
end
fails = tonumber(redis.call('HGET', KEYS[2], 'fails'))
if fails and fails > 0 then redis.call('HSET', KEYS[2], 'fails', fails - 1) end
return 1
"""


class RedisSignInThrottle:
    """The guessing throttle for the whole fleet, in Redis."""

    def __init__(self, client):
        self._client = client
        self._failed = client.register_script(FAILED)
        self._state = client.register_script(STATE)
        self._succeeded = client.register_script(SUCCEEDED)

    @staticmethod
    def _keys(address, user):
        return [f"{PREFIX}signin:addr:{address}", f"{PREFIX}signin:user:{user}"]

    def _call(self, script, keys, args):
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def blocked_for(self, address):
        left, _ = self._call(self._state, self._keys(address, ""), [WINDOW_S])
        return math.ceil(float(left)) if float(left) > 0 else 0

    def delay_for(self, user):
        _, fails = self._call(self._state, self._keys("", user), [WINDOW_S])
        return user_delay(int(fails))

    def failed(self, address, user):
        fails = self._call(self._failed, self._keys(address, user), [WINDOW_S, FREE_FAILS, FIRST_WAIT_S])
        if int(fails) == FREE_FAILS:
            log.warning("sign-ins from %s are held back: %d wrong passwords within %d min", address, FREE_FAILS,
                        WINDOW_S // 60)

    def succeeded(self, address, user):
        address_key, user_key = self._keys(address, user)
        self._call(self._succeeded, [address_key, user_key], [FREE_FAILS])

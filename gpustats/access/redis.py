"""Users, API tokens and share links kept in Redis (REDIS_URL): every worker on every host knows each at once.

- `gpustats:user:<name>`: a hash (role, hash, epoch, created); `gpustats:users`: their names.
- `gpustats:credential:<digest>`: a hash (id, kind, name, role, prefix, devices, created);
  `gpustats:credentials`: id -> digest, to list and remove them; `gpustats:credential-used`:
  id -> when last used.
"""
import json
import time

import redis

from gpustats.access.accounts import AccountError
from gpustats.scaleout import PREFIX, Unavailable
from gpustats.tokens import PREFIX_CHARS

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

    def add_credential(self, kind, name, role, secret_digest, prefix, devices=None):
        credential_id = str(self._call(self._client.incr, NEXT_ID))
        pipe = self._client.pipeline()
        pipe.hset(_credential_key(secret_digest), mapping={
            "id": credential_id, "kind": kind, "name": name, "role": role, "prefix": prefix[:PREFIX_CHARS],
            "devices": json.dumps(devices) if devices else "", "created": self._clock()})
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
                "lastUsedAt": float(used) if used else None}

    def credentials(self, kind):
        digests = self._call(self._client.hgetall, CREDENTIALS)
        found = [self.credential(d.decode()) for _, d in sorted(digests.items(), key=lambda item: int(item[0]))]
        return [c for c in found if c and c["kind"] == kind]

    def remove_credential(self, kind, credential_id):
        secret_digest = self._call(self._client.hget, CREDENTIALS, credential_id)
        found = secret_digest and self.credential(secret_digest.decode())
        if not found or found["kind"] != kind:
            raise AccountError(f"no {kind} {credential_id!r}", status=404, field="id")
        pipe = self._client.pipeline()
        pipe.delete(_credential_key(secret_digest.decode()))
        pipe.hdel(CREDENTIALS, credential_id)
        pipe.hdel(USED, credential_id)
        self._call(pipe.execute)

    def used(self, credential_id, at):
        self._call(self._client.hset, USED, credential_id, at)

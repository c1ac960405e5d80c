"""Devices and their keys kept in Redis (REDIS_URL): every worker on every host knows each at once.

- `gpustats:dev:<name>`: a hash (created); `gpustats:devs`: the names.
- `gpustats:devkey:<digest>`: a hash (id, device, prefix, created); `gpustats:devkeys`: id -> digest;
  `gpustats:devkey-used`: id -> when last used.
- `gpustats:devs-version`: moved on by every change, so a worker reloads the keys only then.
"""
import time

import redis

from gpustats.devices.registry import DeviceError
from gpustats.scaleout import PREFIX, Unavailable
from gpustats.tokens import PREFIX_CHARS

DEVICES, KEYS, USED, VERSION, NEXT_ID = (PREFIX + "devs", PREFIX + "devkeys", PREFIX + "devkey-used",
                                         PREFIX + "devs-version", PREFIX + "devkey-id")
# KEYS: the device's hash, the names, the key's hash, id -> digest, version, id counter.
# ARGV: name, created, digest, prefix, add the device (1) or a key to one that exists (0).
ADD = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[5] == '1' and exists then return {err = 'exists'} end
if ARGV[5] == '0' and not exists then return {err = 'missing'} end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], 'created', ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[1])
end
local id = redis.call('INCR', KEYS[6])
redis.call('HSET', KEYS[3], 'id', id, 'device', ARGV[1], 'prefix', ARGV[4], 'created', ARGV[2])
redis.call('HSET', KEYS[4], id, ARGV[3])
redis.call('INCR', KEYS[5])
return id
"""


def _device_key(name):
    return f"{PREFIX}dev:{name}"


def _key_key(digest):
    return f"{PREFIX}devkey:{digest}"


def _text(fields, name):
    value = fields.get(name.encode())
    return None if value is None else value.decode()


class RedisDevices:
    """Devices and keys in Redis, shared by every worker and host."""

    def __init__(self, client, clock=time.time):
        self._client, self._clock = client, clock
        self._add = client.register_script(ADD)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def version(self):
        return int(self._call(self._client.get, VERSION) or 0)

    def _keys(self):
        """Return [(key id, digest, its hash's fields)] of every key, in one round trip after the list."""
        listed = sorted(self._call(self._client.hgetall, KEYS).items(), key=lambda item: int(item[0]))
        pipe = self._client.pipeline(transaction=False)
        for _, found_digest in listed:
            pipe.hgetall(_key_key(found_digest.decode()))
        fields = self._call(pipe.execute) if listed else []
        return [(key_id.decode(), found_digest.decode(), kept) for (key_id, found_digest), kept in zip(listed, fields)
                if kept]

    def keys(self):
        return {found_digest: (_text(fields, "device"), key_id) for key_id, found_digest, fields in self._keys()}

    def key(self, digest):
        fields = self._call(self._client.hgetall, _key_key(digest))
        return (_text(fields, "device"), _text(fields, "id")) if fields else None

    def devices(self):
        names = sorted(n.decode() for n in self._call(self._client.smembers, DEVICES))
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.hget(_device_key(name), "created")
        devices = {name: {"name": name, "createdAt": float(created), "keys": []}
                   for name, created in zip(names, self._call(pipe.execute) if names else []) if created}
        used = {k.decode(): float(v) for k, v in self._call(self._client.hgetall, USED).items()}
        for key_id, _, fields in self._keys():
            device = devices.get(_text(fields, "device"))
            if device is not None:
                device["keys"].append({"id": key_id, "prefix": _text(fields, "prefix"),
                                       "createdAt": float(_text(fields, "created")), "lastUsedAt": used.get(key_id)})
        return list(devices.values())

    def _insert(self, name, digest, prefix, new_device):
        try:
            return str(self._add(keys=[_device_key(name), DEVICES, _key_key(digest), KEYS, VERSION, NEXT_ID],
                                 args=[name, self._clock(), digest, prefix[:PREFIX_CHARS], int(new_device)]))
        except redis.ResponseError as error:
            if "exists" in str(error):
                raise DeviceError(f"a device {name!r} exists already", status=409, field="name") from None
            if "missing" in str(error):
                raise DeviceError(f"no device {name!r}", status=404, field="name") from None
            raise Unavailable(f"Redis: {error}") from None
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def add(self, name, digest, prefix):
        return self._insert(name, digest, prefix, True)

    def add_key(self, name, digest, prefix):
        return self._insert(name, digest, prefix, False)

    def _key_of(self, name, key_id):
        digest = self._call(self._client.hget, KEYS, key_id)
        fields = digest and self._call(self._client.hgetall, _key_key(digest.decode()))
        if not fields or _text(fields, "device") != name:
            raise DeviceError(f"{name!r} has no key {key_id!r}", status=404, field="keyId")
        return digest.decode()

    def remove_key(self, name, key_id):
        digest = self._key_of(name, key_id)
        pipe = self._client.pipeline()
        pipe.delete(_key_key(digest))
        pipe.hdel(KEYS, key_id)
        pipe.hdel(USED, key_id)
        pipe.incr(VERSION)
        self._call(pipe.execute)

    def remove(self, name):
        if not self._call(self._client.exists, _device_key(name)):
            raise DeviceError(f"no device {name!r}", status=404, field="name")
        pipe = self._client.pipeline()
        for key_id, found_digest, fields in self._keys():
            if _text(fields, "device") == name:
                pipe.delete(_key_key(found_digest))
                pipe.hdel(KEYS, key_id)
                pipe.hdel(USED, key_id)
        pipe.delete(_device_key(name))
        pipe.srem(DEVICES, name)
        pipe.incr(VERSION)
        self._call(pipe.execute)

    def used(self, times):
        if times:
            self._call(self._client.hset, USED, mapping=times)

"""The devices that may push, and their keys: added in the page or by `config.py`, or fixed in DEVICE_KEYS.

A push finds its device by the SHA-256 digest of its key in a map this worker holds in memory:
one digest and one dict lookup, as with DEVICE_KEYS alone. The map is loaded from the store
(devices/sqlite.py, devices/redis.py) and checked once a second against the store's version,
so a key added or removed anywhere takes effect within a second on every worker and host. A
key not in the map is looked up in the store once (it may have been added a moment ago on
another host), and a miss is remembered for a second. Keys are kept only as digests, with
their first 6 characters to tell them apart; when each was last used is written once a minute.
"""
import logging
import re
import threading
import time

from gpustats.background import watch
from gpustats.tokens import PREFIX_CHARS, digest, new_secret

log = logging.getLogger("gpustats")
# A letter or digit first: never "." or "..", path segments a browser drops from the page's form
# addresses (issue: such a device could not be removed), nor a name that reads as a flag.
DEVICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
STORED_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)  # what the rule let in before: still removable
CHECK_S = 1.0  # how often each worker asks the store whether anything changed
MISS_S = 1.0  # a key the store did not know is not asked about again for this long
USED_EVERY_S = 60.0
MOST_MISSES = 10_000


class DeviceError(ValueError):
    """A device or key that cannot be made or changed as asked; the message says why, `status` the answer."""

    def __init__(self, message, status=400, field=None):
        super().__init__(message)
        self.status, self.field = status, field


def check_name(name, stored=False):
    """Return `name` if a new device may have it (`stored`: if a device may already have it), else raise DeviceError."""
    if not isinstance(name, str) or not (STORED_NAME if stored else DEVICE_NAME).fullmatch(name):
        raise DeviceError("name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit", field="name")
    return name


class DeviceRegistry:
    """Every device's keys, from the store and DEVICE_KEYS, for this worker's pushes and the Devices page."""

    def __init__(self, store, env_keys, clock=time.monotonic):
        self.store = store
        self._env = {digest(key): (device, None) for key, device in env_keys.items()}  # key -> device
        self.env_devices = sorted(set(env_keys.values()))
        self._clock = clock
        self._lock = threading.Lock()
        self._keys, self._version = {}, None
        self._misses = {}  # digest -> when the store did not know it
        self._used = {}  # key id -> unix time, not yet written
        self._used_at = clock()
        self._closed = False
        self.refresh()

    def __bool__(self):
        return bool(self._env or self._keys or self._version)  # a store that ever had a key may get more

    def start(self):
        """Check the store for changes once a second, and write when keys were used once a minute, until close()."""
        watch("device-keys", CHECK_S, self._check, lambda: self._closed)

    def close(self):
        self._closed = True

    def refresh(self):
        """Load every key from the store now (after a change this worker made, and at start)."""
        version = self.store.version()
        keys = self.store.keys()
        with self._lock:
            self._keys, self._version, self._misses = keys, version, {}

    def _check(self):
        if self.store.version() != self._version:
            self.refresh()
        if self._clock() - self._used_at >= USED_EVERY_S:
            with self._lock:
                used, self._used, self._used_at = self._used, {}, self._clock()
            self.store.used(used)

    def device_for(self, key):
        """Return the device `key` belongs to, or None: one digest and a dict lookup, the store once for a new key."""
        found_digest = digest(key)
        found = self._env.get(found_digest) or self._keys.get(found_digest)
        if found is None:
            now = self._clock()
            if now - self._misses.get(found_digest, float("-inf")) < MISS_S:
                return None
            found = self.store.key(found_digest)  # added a moment ago, perhaps on another host
            with self._lock:
                if found is None:
                    if len(self._misses) >= MOST_MISSES:
                        self._misses.clear()
                    self._misses[found_digest] = now
                    return None
                self._keys[found_digest] = found
        device, key_id = found
        if key_id is not None:
            self._used[key_id] = time.time()
        return device

    # ---- what the Devices page and config.py change --------------------------------------------

    def _not_env(self, name):
        if name in self.env_devices:
            raise DeviceError(f"{name!r} is set in DEVICE_KEYS: change it in .env", status=409, field="name")

    def add(self, name):
        """Add a device; return (its first key, the key's id). The key is never kept, only its digest."""
        check_name(name)
        self._not_env(name)
        key = new_secret()
        key_id = self.store.add(name, digest(key), key[:PREFIX_CHARS])
        self.refresh()
        log.info("added the device %s (key %s...)", name, key[:PREFIX_CHARS])
        return key, key_id

    def add_key(self, name):
        """Add a key to a device (both work until the old one is removed); return (key, key id)."""
        self._not_env(check_name(name, stored=True))
        key = new_secret()
        key_id = self.store.add_key(name, digest(key), key[:PREFIX_CHARS])
        self.refresh()
        log.info("added a key to the device %s (%s...)", name, key[:PREFIX_CHARS])
        return key, key_id

    def remove_key(self, name, key_id):
        self._not_env(check_name(name, stored=True))
        self.store.remove_key(name, str(key_id))
        self.refresh()
        log.info("removed the key %s of the device %s", key_id, name)

    def remove(self, name):
        self._not_env(check_name(name, stored=True))
        self.store.remove(name)
        self.refresh()
        log.info("removed the device %s", name)

    def devices(self):
        """Return every device with its keys and where it is set: {"name", "keys", "source", "createdAt"}."""
        pending = dict(self._used)  # uses not written yet (once a minute), always the newer: "used never" never lies

        def key(k):
            return dict(k, lastUsedAt=pending.get(k["id"]) or k.get("lastUsedAt"))
        found = [dict(d, source="store", keys=[key(k) for k in d["keys"]]) for d in self.store.devices()]
        names = {d["name"] for d in found}
        found += [{"name": name, "keys": [], "source": "env", "createdAt": None}
                  for name in self.env_devices if name not in names]
        return sorted(found, key=lambda d: d["name"])

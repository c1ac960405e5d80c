"""Users, API tokens and share links: what each is, how secrets are kept, and a short cache over a store.

A store (access/sqlite.py, access/redis.py) keeps users (name, role, password hash, and an
epoch that a password change moves on, ending the user's other sessions), and credentials:
API tokens and share links, each kept as the SHA-256 digest of its secret with the first 6
characters to tell them apart. Passwords are kept only as Werkzeug's salted scrypt hashes,
computed in an OS thread: a hash is 50-100 ms of CPU that must not stall pushes or streams.

Every request asks who it is, so Accounts keeps what it read for CACHE_S: a change made on
another worker or host (or by `python config.py`) takes effect within that.
"""
import os
import re
import secrets
import threading
import time

from werkzeug.security import check_password_hash, generate_password_hash

from gpustats.offload import Worker
from gpustats.tokens import digest

ROLES = ("admin", "viewer")
USER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}", re.ASCII)
CACHE_S = 1.0
MOST_CACHED = 10_000  # entries a worker remembers; past it the cache starts afresh


class AccountError(ValueError):
    """A user, token or link that cannot be made or changed as asked; the message says why, `status` the answer."""

    def __init__(self, message, status=400, field=None):
        super().__init__(message)
        self.status, self.field = status, field


def check_name(name):
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise AccountError("name: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit",
                           field="name")
    return name


def check_role(role):
    if role not in ROLES:
        raise AccountError(f"role: {str(role)[:20]!r} is not admin or viewer", field="role")
    return role


def check_password(password):
    if not isinstance(password, str) or len(password) < 12 or len(password) > 1024:
        raise AccountError("password: 12 to 1024 characters", field="password")
    return password


# scrypt with N=2^14, r=8 (16 MiB a hash): 42 ms here. Werkzeug's default N=2^15 took 105 ms, and
# 20 sign-ins a second of it are two cores: more than this machine has. Hashes made with other
# parameters (Werkzeug's default, pbkdf2) still verify: each hash names its own.
METHOD = "scrypt:16384:8:1"
# A hash of a password nobody has: checked against for unknown users, so their answer takes as long.
_UNKNOWN = generate_password_hash(secrets.token_urlsafe(16), METHOD)


def _background():
    """Lower this thread's CPU priority to the least (Linux: nice 19 for the calling thread alone)."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    except (AttributeError, OSError):
        pass  # not Linux: the hash still runs beside the event loop, only at the same priority


class Hasher:
    """Slow hashes in an OS thread of their own, at the least CPU priority: sign-ins wait, pushes and streams do not.

    The thread drops the GIL while it hashes, and at nice 19 the event loop's thread wins every core it
    competes for: under load, sign-ins slow down rather than the fan-out.
    """

    def __init__(self):
        self._worker = Worker("password-hash")
        self._worker.run(_background)

    def hash(self, password):
        """Return Werkzeug's salted scrypt hash of `password`."""
        return self._worker.run(generate_password_hash, password, METHOD)

    def verify(self, stored, password):
        """Return whether `password` matches the hash `stored` (None: an unknown user, checked all the same)."""
        return self._worker.run(check_password_hash, stored or _UNKNOWN, password) and stored is not None


class Accounts:
    """Users, tokens and share links from a store, read through a cache of CACHE_S."""

    def __init__(self, store, clock=time.monotonic):
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._cache = {}  # key -> (read at, value)

    def _cached(self, key, read):
        now = self._clock()
        with self._lock:
            found = self._cache.get(key)
        if found is not None and now - found[0] < CACHE_S:
            return found[1]
        value = read()
        with self._lock:
            if len(self._cache) >= MOST_CACHED:
                self._cache.clear()  # many guessed tokens: forget them all rather than grow
            self._cache[key] = (now, value)
        return value

    def forget(self):
        """Drop what is cached: this worker changed something and reads it back at once."""
        with self._lock:
            self._cache.clear()

    def user(self, name):
        """Return {"name", "role", "hash", "epoch", "createdAt"} of a user, or None."""
        return self._cached(("user", name), lambda: self.store.user(name))

    def credential(self, secret):
        """Return the token or share link whose secret this is, or None; it costs a digest and, once a second, a lookup."""
        return self.kept(digest(secret))

    def kept(self, secret_digest):
        """Return the token or share link kept as `secret_digest` (a share link's session holds it), or None."""
        return self._cached(("credential", secret_digest), lambda: self.store.credential(secret_digest))

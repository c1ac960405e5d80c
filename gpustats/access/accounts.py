"""Users, API tokens and share links: what each is, how secrets are kept, and a short cache over a store.

A store (access/sqlite.py, access/redis.py) keeps users (name, role, password hash, and an
epoch that a password change moves on, ending the user's other sessions), and credentials:
API tokens and share links, each kept as the SHA-256 digest of its secret with the first 6
characters to tell them apart. Passwords are kept only as Werkzeug's salted scrypt hashes,
computed in an OS thread: a hash is slow on purpose, and must not stall pushes or streams.

A signed-in browser holds only a session's secret id in its cookie; the store keeps the session
(its digest, whose it is, when made and last used, from where), so signing out, a password
change or a user's removal ends it at once, and it ends by itself SESSION_LIFE_S after it was
made or SESSION_IDLE_S after it was last used.

Every request asks who it is, so Accounts keeps what it read for CACHE_S: a change made on
another worker or host (or by `python config.py`) takes effect within that.
"""
import functools
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
SESSION_LIFE_S, SESSION_IDLE_S = 30 * 86400, 7 * 86400
MOST_SESSIONS = 50  # a user's latest sessions kept; signing in again and again cannot grow the store
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


# scrypt with N=2^14, r=8 (16 MiB a hash): half the work of Werkzeug's default N=2^15, of which
# 20 sign-ins a second took more than this machine's two cores (docs/PERFORMANCE.md). Hashes made
# with other parameters (Werkzeug's default, pbkdf2) still verify: each hash names its own.
METHOD = "scrypt:16384:8:1"


@functools.cache
def _unknown():
    """Return a hash of a password nobody has: checked against for unknown users, so their answer takes as long.

    Made at the first unknown name rather than at import: 70 ms of scrypt on every start of every worker.
    """
    return generate_password_hash(secrets.token_urlsafe(16), METHOD)


def _check(stored, password):
    """Check `password` against `stored`, or against _unknown() where there is none (on the hashing thread)."""
    return check_password_hash(stored or _unknown(), password)


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
        return self._worker.run(_check, stored, password) and stored is not None


def lasts(session, now=None):
    """Return whether a session is within SESSION_LIFE_S of its making and SESSION_IDLE_S of its last use."""
    now = time.time() if now is None else now
    return now - session["createdAt"] <= SESSION_LIFE_S and now - session["lastUsedAt"] <= SESSION_IDLE_S


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
        if not isinstance(name, str) or not USER_NAME.fullmatch(name):
            return None  # no user has such a name: nothing is looked up, nothing kept
        return self._cached(("user", name), lambda: self.store.user(name))

    def session(self, secret_digest):
        """Return the session kept as `secret_digest` while it lasts, or None (never made, ended, or run out)."""
        found = self._cached(("session", secret_digest), lambda: self.store.session(secret_digest))
        return found if found is not None and lasts(found) else None

    def remove_user(self, name):
        """Remove a user, every session of theirs, and every token and link they made."""
        self.store.remove_user(name)
        self.store.remove_sessions(name)
        revoked = self.store.remove_credentials_made_by(name, ROLES)
        self.forget()
        return revoked

    def set_role(self, name, role):
        """Give a user `role`; the tokens they made above it are revoked. Return how many."""
        self.store.update_user(name, role=role)
        above = ROLES[:ROLES.index(role)]
        revoked = self.store.remove_credentials_made_by(name, above) if above else 0
        self.forget()
        return revoked

    def set_password(self, name, password_hash, keep=None):
        """Give a user a new password hash; every session of theirs ends but `keep`'s."""
        self.store.update_user(name, password_hash=password_hash)
        self.store.remove_sessions(name, keep=keep)
        self.forget()

    def credential(self, secret):
        """Return the token or share link whose secret this is, or None; it costs a digest and, once a second, a lookup."""
        return self.kept(digest(secret))

    def kept(self, secret_digest):
        """Return the token or share link kept as `secret_digest` (a share link's session holds it), or None."""
        return self._cached(("credential", secret_digest), lambda: self.store.credential(secret_digest))

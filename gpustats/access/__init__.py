"""Who may do what: device keys, the viewer login, and how much one client may hold of a worker.

Two contracts, each kept by both sides: AccountStore (sqlite.py, redis.py) and SignInThrottling
(throttle.py, redis.py).
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class AccountStore(Protocol):
    """Users, API tokens, share links and sessions: SqliteAccounts (sqlite.py) or RedisAccounts (redis.py).

    Records are dicts: a user {name, role, hash, epoch, createdAt}; a credential {id, kind,
    name, role, prefix, devices, createdAt, lastUsedAt, maker}; a session {id, kind, name,
    proof, createdAt, lastUsedAt, address, agent}. Redis down: Unavailable, nothing changed.
    """

    def user(self, name):
        """Return the user `name`, or None."""

    def users(self):
        """Return every user, by name."""

    def add_user(self, name, role, password_hash):
        """Add a user; AccountError 409 if the name is taken."""

    def update_user(self, name, role=None, password_hash=None):
        """Change a user's role, or its password hash (which moves its epoch on); AccountError 404 if there is none."""

    def remove_user(self, name):
        """Remove a user; AccountError 404 if there is none."""

    def add_credential(self, kind, name, role, secret_digest, prefix, devices=None, maker=None, maker_since=None):
        """Keep a token or share link (`kind`) by its secret's digest, with its maker and when that user was made; return its id."""

    def credential(self, secret_digest):
        """Return the credential whose secret has this digest, or None."""

    def credentials(self, kind):
        """Return every credential of `kind` (token, share), oldest first."""

    def remove_credential(self, kind, credential_id):
        """Remove a credential of `kind`; AccountError 404 if there is none."""

    def used(self, credential_id, at):
        """Keep when a credential was last used."""

    def remove_credentials_made_by(self, maker, roles):
        """Remove the tokens and links `maker` made with one of `roles`; return how many."""

    def add_session(self, secret_digest, kind, name, proof, address, agent):
        """Keep a new session; ended ones go, and a name keeps only its latest MOST_SESSIONS."""

    def session(self, secret_digest):
        """Return the session with this digest (its id), or None."""

    def sessions(self, name):
        """Return the user `name`'s sessions, the most recently used first."""

    def session_used(self, secret_digest, at, address, agent):
        """Keep when, from where and with what a session was last used; an ended one is not brought back."""

    def remove_session(self, secret_digest):
        """End one session (nothing if there is none)."""

    def remove_sessions(self, name, keep=None):
        """End every session of the user `name` but `keep`'s; return how many."""


@runtime_checkable
class SignInThrottling(Protocol):
    """The password-guessing throttle: SignInThrottle (throttle.py) in this process, RedisSignInThrottle (redis.py)."""

    def blocked_for(self, address):
        """Return the whole seconds `address` must wait before its next try, or 0."""

    def delay_for(self, user):
        """Return the seconds a sign-in as `user` waits first (many wrong passwords for it lately), or 0."""

    def failed(self, address, user):
        """Count a wrong password from `address` for `user`: past FREE_FAILS the address waits, doubling."""

    def succeeded(self, address, user):
        """The right password: that address starts afresh, and the user's count gives back the try counted for it."""

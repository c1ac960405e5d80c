"""Users, API tokens and share links kept in SQLite: in the file HISTORY_DB, beside history and alerts (no REDIS_URL).

SQLite blocks the thread that calls it, so every call goes to an OS thread of its own
(offload.Worker). `python config.py --add-user` and the running server use the same file.
"""
import json
import sqlite3
import time

from gpustats.access.accounts import MOST_SESSIONS, SESSION_IDLE_S, SESSION_LIFE_S, AccountError
from gpustats.database import sqlite_file
from gpustats.offload import Worker
from gpustats.tokens import PREFIX_CHARS

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL,
                                  epoch INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
                                        role TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
                                        devices TEXT, created REAL NOT NULL, used REAL, maker TEXT,
                                        maker_since REAL);
CREATE TABLE IF NOT EXISTS sessions (digest TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT NOT NULL,
                                     proof TEXT NOT NULL, created REAL NOT NULL, used REAL NOT NULL,
                                     address TEXT, agent TEXT);
CREATE INDEX IF NOT EXISTS sessions_by_name ON sessions (name, used);
"""
# Files made before tokens recorded their maker: the column is added, and their tokens' maker is unknown.
MIGRATIONS = ("ALTER TABLE credentials ADD COLUMN maker TEXT", "ALTER TABLE credentials ADD COLUMN maker_since REAL")


def _user(row):
    return None if row is None else {"name": row[0], "role": row[1], "hash": row[2], "epoch": row[3],
                                     "createdAt": row[4]}


def _credential(row):
    return None if row is None else {
        "id": str(row[0]), "kind": row[1], "name": row[2], "role": row[3], "prefix": row[4],
        "devices": json.loads(row[5]) if row[5] else None, "createdAt": row[6], "lastUsedAt": row[7],
        "maker": row[8], "makerSince": row[9]}


def _session(row):
    return None if row is None else {"id": row[0], "kind": row[1], "name": row[2], "proof": row[3],
                                     "createdAt": row[4], "lastUsedAt": row[5], "address": row[6], "agent": row[7]}


CREDENTIAL = "SELECT id, kind, name, role, prefix, devices, created, used, maker, maker_since FROM credentials"
SESSION = "SELECT digest, kind, name, proof, created, used, address, agent FROM sessions"


class SqliteAccounts:
    """Users and credentials in one SQLite file (or in memory, with no path)."""

    def __init__(self, path, clock=time.time):
        self._clock = clock
        self._worker = Worker("accounts")
        self._db = self._worker.run(sqlite_file, path, SCHEMA)
        self._worker.run(self._migrate)

    def _migrate(self):
        for statement in MIGRATIONS:
            try:
                self._db.execute(statement)
            except sqlite3.OperationalError:
                pass  # done already (duplicate column)

    def _run(self, sql, *args, many=False):
        def run():
            cursor = self._db.execute(sql, args)
            return cursor.fetchall() if many else (cursor.fetchone(), cursor.rowcount, cursor.lastrowid)
        return self._worker.run(run)

    def user(self, name):
        return _user(self._run("SELECT name, role, hash, epoch, created FROM users WHERE name = ?", name)[0])

    def users(self):
        return [_user(row) for row in self._run("SELECT name, role, hash, epoch, created FROM users ORDER BY name",
                                                 many=True)]

    def add_user(self, name, role, password_hash):
        try:
            self._run("INSERT INTO users (name, role, hash, created) VALUES (?, ?, ?, ?)", name, role, password_hash,
                      self._clock())
        except sqlite3.IntegrityError:
            raise AccountError(f"a user {name!r} exists already", status=409, field="name") from None

    def update_user(self, name, role=None, password_hash=None):
        if password_hash is not None:  # a new password ends every session signed in with the old one
            changed = self._run("UPDATE users SET hash = ?, epoch = epoch + 1 WHERE name = ?", password_hash, name)[1]
        else:
            changed = self._run("UPDATE users SET role = ? WHERE name = ?", role, name)[1]
        if not changed:
            raise AccountError(f"no user {name!r}", status=404, field="name")

    def remove_user(self, name):
        if not self._run("DELETE FROM users WHERE name = ?", name)[1]:
            raise AccountError(f"no user {name!r}", status=404, field="name")

    def add_credential(self, kind, name, role, secret_digest, prefix, devices=None, maker=None, maker_since=None):
        return str(self._run("INSERT INTO credentials (kind, name, role, digest, prefix, devices, created, maker, "
                             "maker_since) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", kind, name, role, secret_digest,
                             prefix[:PREFIX_CHARS], json.dumps(devices) if devices else None, self._clock(), maker,
                             maker_since)[2])

    def credential(self, secret_digest):
        return _credential(self._run(f"{CREDENTIAL} WHERE digest = ?", secret_digest)[0])

    def credentials(self, kind):
        return [_credential(row) for row in self._run(f"{CREDENTIAL} WHERE kind = ? ORDER BY id", kind, many=True)]

    def remove_credential(self, kind, credential_id):
        if not self._run("DELETE FROM credentials WHERE kind = ? AND id = ?", kind, credential_id)[1]:
            raise AccountError(f"no {kind} {credential_id!r}", status=404, field="id")

    def used(self, credential_id, at):
        self._run("UPDATE credentials SET used = ? WHERE id = ?", at, credential_id)

    def remove_credentials_made_by(self, maker, roles):
        """Remove the tokens and links `maker` made with one of `roles`; return how many."""
        marks = ",".join("?" * len(roles))
        return self._run(f"DELETE FROM credentials WHERE maker = ? AND role IN ({marks})", maker, *roles)[1]

    def add_session(self, secret_digest, kind, name, proof, address, agent):
        now = self._clock()

        def add():
            # Ended ones go (30 days old, or 7 unused), and a name keeps its MOST_SESSIONS latest.
            self._db.execute("DELETE FROM sessions WHERE created < ? OR used < ?",
                             (now - SESSION_LIFE_S, now - SESSION_IDLE_S))
            self._db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (secret_digest, kind, name, proof, now, now, address, agent))
            self._db.execute("DELETE FROM sessions WHERE kind = ? AND name = ? AND digest NOT IN (SELECT digest FROM "
                             "sessions WHERE kind = ? AND name = ? ORDER BY used DESC LIMIT ?)",
                             (kind, name, kind, name, MOST_SESSIONS))
        self._worker.run(add)

    def session(self, secret_digest):
        return _session(self._run(f"{SESSION} WHERE digest = ?", secret_digest)[0])

    def sessions(self, name):
        return [_session(row) for row in self._run(f"{SESSION} WHERE name = ? AND kind = 'user' ORDER BY used DESC",
                                                    name, many=True)]

    def session_used(self, secret_digest, at, address, agent):
        self._run("UPDATE sessions SET used = ?, address = ?, agent = ? WHERE digest = ?", at, address, agent,
                  secret_digest)

    def remove_session(self, secret_digest):
        self._run("DELETE FROM sessions WHERE digest = ?", secret_digest)

    def remove_sessions(self, name, keep=None):
        """Remove every session of the user `name` but `keep`'s; return how many."""
        return self._run("DELETE FROM sessions WHERE name = ? AND kind = 'user' AND digest IS NOT ?", name, keep)[1]

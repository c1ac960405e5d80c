"""Users, API tokens and share links kept in SQLite: in the file HISTORY_DB, beside history and alerts (no REDIS_URL).

SQLite blocks the thread that calls it, so every call goes to an OS thread of its own
(offload.Worker). `python config.py --add-user` and the running server use the same file.
"""
import json
import sqlite3
import time

from gpustats.access.accounts import AccountError
from gpustats.offload import Worker, sqlite_file
from gpustats.tokens import PREFIX_CHARS

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, role TEXT NOT NULL, hash TEXT NOT NULL,
                                  epoch INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, name TEXT NOT NULL,
                                        role TEXT NOT NULL, digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
                                        devices TEXT, created REAL NOT NULL, used REAL);
"""


def _user(row):
    return None if row is None else {"name": row[0], "role": row[1], "hash": row[2], "epoch": row[3],
                                     "createdAt": row[4]}


def _credential(row):
    return None if row is None else {
        "id": str(row[0]), "kind": row[1], "name": row[2], "role": row[3], "prefix": row[4],
        "devices": json.loads(row[5]) if row[5] else None, "createdAt": row[6], "lastUsedAt": row[7]}


CREDENTIAL = "SELECT id, kind, name, role, prefix, devices, created, used FROM credentials"


class SqliteAccounts:
    """Users and credentials in one SQLite file (or in memory, with no path)."""

    def __init__(self, path, clock=time.time):
        self._clock = clock
        self._worker = Worker("accounts")
        self._db = self._worker.run(sqlite_file, path, SCHEMA)


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

    def add_credential(self, kind, name, role, secret_digest, prefix, devices=None):
        return str(self._run("INSERT INTO credentials (kind, name, role, digest, prefix, devices, created) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?)", kind, name, role, secret_digest, prefix[:PREFIX_CHARS],
                             json.dumps(devices) if devices else None, self._clock())[2])

    def credential(self, secret_digest):
        return _credential(self._run(f"{CREDENTIAL} WHERE digest = ?", secret_digest)[0])

    def credentials(self, kind):
        return [_credential(row) for row in self._run(f"{CREDENTIAL} WHERE kind = ? ORDER BY id", kind, many=True)]

    def remove_credential(self, kind, credential_id):
        if not self._run("DELETE FROM credentials WHERE kind = ? AND id = ?", kind, credential_id)[1]:
            raise AccountError(f"no {kind} {credential_id!r}", status=404, field="id")

    def used(self, credential_id, at):
        self._run("UPDATE credentials SET used = ? WHERE id = ?", at, credential_id)

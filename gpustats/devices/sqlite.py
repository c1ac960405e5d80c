"""Devices and their keys kept in SQLite: in the file HISTORY_DB, beside history and accounts (no REDIS_URL).

Every change moves `version` on, so each worker (and `python config.py`) can tell in one
read whether to load the keys again. Calls run in an OS thread of their own.
"""
import sqlite3
import time

from gpustats.database import sqlite_file
from gpustats.devices.registry import DeviceError
from gpustats.offload import Worker
from gpustats.tokens import PREFIX_CHARS

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS device_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
                                        digest TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL, created REAL NOT NULL,
                                        used REAL);
CREATE TABLE IF NOT EXISTS devices_version (one INTEGER PRIMARY KEY CHECK (one = 1), version INTEGER NOT NULL);
INSERT OR IGNORE INTO devices_version VALUES (1, 0);
"""
BUMP = "UPDATE devices_version SET version = version + 1"


class SqliteDevices:
    """Devices and keys in one SQLite file (or in memory, with no path)."""

    def __init__(self, path, clock=time.time):
        self._clock = clock
        self._worker = Worker("devices")
        self._db = self._worker.run(sqlite_file, path, SCHEMA)


    def _change(self, work):
        """Run `work(db)` and move the version on, in one transaction; return what it returned."""
        def run():
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
                self._db.execute(BUMP)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result
        return self._worker.run(run)

    def version(self):
        return self._worker.run(lambda: self._db.execute("SELECT version FROM devices_version").fetchone()[0])

    def keys(self):
        """Return {digest: (device, key id)} of every key."""
        rows = self._worker.run(lambda: self._db.execute("SELECT digest, device, id FROM device_keys").fetchall())
        return {digest: (device, str(key_id)) for digest, device, key_id in rows}

    def key(self, digest):
        """Return (device, key id) of one key, or None."""
        row = self._worker.run(lambda: self._db.execute("SELECT device, id FROM device_keys WHERE digest = ?",
                                                        (digest,)).fetchone())
        return (row[0], str(row[1])) if row else None

    def devices(self):
        """Return [{"name", "createdAt", "keys": [{"id", "prefix", "createdAt", "lastUsedAt"}]}], by name."""
        def read():
            devices = {name: {"name": name, "createdAt": created, "keys": []} for name, created in
                       self._db.execute("SELECT name, created FROM devices ORDER BY name")}
            for key_id, device, prefix, created, used in self._db.execute(
                    "SELECT id, device, prefix, created, used FROM device_keys ORDER BY id"):
                if device in devices:
                    devices[device]["keys"].append({"id": str(key_id), "prefix": prefix, "createdAt": created,
                                                    "lastUsedAt": used})
            return list(devices.values())
        return self._worker.run(read)

    def add(self, name, digest, prefix):
        """Add a device with its first key; return the key's id. DeviceError 409 if the name is in use."""
        def work(db):
            try:
                db.execute("INSERT INTO devices VALUES (?, ?)", (name, self._clock()))
            except sqlite3.IntegrityError:
                raise DeviceError(f"a device {name!r} exists already", status=409, field="name") from None
            return self._insert_key(db, name, digest, prefix)
        return self._change(work)

    def _insert_key(self, db, name, digest, prefix):
        return str(db.execute("INSERT INTO device_keys (device, digest, prefix, created) VALUES (?, ?, ?, ?)",
                              (name, digest, prefix[:PREFIX_CHARS], self._clock())).lastrowid)

    def add_key(self, name, digest, prefix):
        def work(db):
            if not db.execute("SELECT 1 FROM devices WHERE name = ?", (name,)).fetchone():
                raise DeviceError(f"no device {name!r}", status=404, field="name")
            return self._insert_key(db, name, digest, prefix)
        return self._change(work)

    def remove_key(self, name, key_id):
        def work(db):
            if not db.execute("DELETE FROM device_keys WHERE device = ? AND id = ?", (name, key_id)).rowcount:
                raise DeviceError(f"{name!r} has no key {key_id!r}", status=404, field="keyId")
        self._change(work)

    def remove(self, name):
        def work(db):
            if not db.execute("DELETE FROM devices WHERE name = ?", (name,)).rowcount:
                raise DeviceError(f"no device {name!r}", status=404, field="name")
            db.execute("DELETE FROM device_keys WHERE device = ?", (name,))
        self._change(work)

    def used(self, times):
        """Keep when keys were last used: {key id: unix time}."""
        if times:
            self._worker.run(lambda: self._db.executemany("UPDATE device_keys SET used = ? WHERE id = ?",
                                                          [(t, key_id) for key_id, t in times.items()]))

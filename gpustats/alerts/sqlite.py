"""The alerts' state and outbox kept in SQLite (no REDIS_URL): in the file HISTORY_DB, beside history.

The rules' state and the recent alerts are kept there, so a deploy neither fires an alert
that is already firing nor forgets a job that is running. A firing or resolution is kept
there, with the messages that announce it, before any of them can be sent; each message
stays until it is sent or given up: a deploy loses none and sends none twice.
"""
import logging

from gpustats import offload
from gpustats.alerts.sender import MemoryOutbox, decode_item, encode_item
from gpustats.database import sqlite_file

log = logging.getLogger("gpustats")
SCHEMA = """
CREATE TABLE IF NOT EXISTS kept (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (row INTEGER PRIMARY KEY AUTOINCREMENT, destination TEXT NOT NULL, item TEXT NOT NULL);
"""


class SavedState:
    """One text kept in a table of the SQLite file `path`, and the outbox beside it; with no path, nothing is kept."""

    def __init__(self, path, name="alerts"):
        self._path, self._name = path, name
        self._worker = offload.Worker("alert-state") if path else None
        if self._worker:
            self._db = self._worker.run(sqlite_file, path, SCHEMA)

    def __bool__(self):
        return self._worker is not None

    def _run(self, fn, *args):
        return self._worker.run(fn, *args) if self._worker else None

    def load(self):
        """Return the saved text, or None."""
        row = self._run(lambda: self._db.execute("SELECT value FROM kept WHERE name = ?", (self._name,)).fetchone())
        return row[0] if row else None

    def save(self, text, queued=()):
        """Keep `text` (None: as it is), and add the outbox's `queued` [(destination id, Item)] in the same transaction."""
        self._run(self._save, text, queued)

    def _save(self, text, queued):
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if text is not None:
                self._db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?)", (self._name, text))
            for destination, item in queued:
                item.row = self._db.execute("INSERT INTO outbox (destination, item) VALUES (?, ?)",
                                            (destination, encode_item(item))).lastrowid
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def queued(self):
        """Return [(destination id, Item)] of the kept outbox, oldest first."""
        rows = self._run(lambda: self._db.execute("SELECT row, destination, item FROM outbox ORDER BY row").fetchall())
        return [(destination, decode_item(text, row)) for row, destination, text in rows or ()]

    def update(self, item):
        """Keep a queued item's new attempts, time and error."""
        self._run(lambda: self._db.execute("UPDATE outbox SET item = ? WHERE row = ?", (encode_item(item), item.row)))

    def forget(self, *rows):
        """Take queued items off: sent, failed for good, dropped, or for a destination no longer set."""
        self._run(lambda: self._db.executemany("DELETE FROM outbox WHERE row = ?", [(row,) for row in rows]))


class SqliteOutbox(MemoryOutbox):
    """The outbox in this process, kept beside the alerts' state: what waits at a deploy is sent after it."""

    def __init__(self, destinations, state, **settings):
        super().__init__(destinations, **settings)
        self._state = state
        kept, gone = [], []
        for destination, item in state.queued():
            (kept if destination in self._queues else gone).append((destination, item))
        if gone:  # its URL left ALERT_WEBHOOK_URLS
            state.forget(*(item.row for _, item in gone))
        if kept:
            log.info("%d alert messages kept from before the restart wait to be sent", len(kept))
        super().add(kept)

    def put(self, alert):
        """Queue `alert` for every destination, kept before the sender can see it."""
        items = self.prepare([alert])
        self._state.save(None, items)
        self.add(items)

    def later(self, destination, item, attempts, next_at, error):
        changed = super().later(destination, item, attempts, next_at, error)
        if changed is not None:
            self._state.update(changed)
        return changed

    def done(self, destination, item):
        taken = super().done(destination, item)
        if taken is not None:  # a send that succeeded: forgotten at once, so a restart never sends it again
            self._state.forget(taken.row)
        return taken

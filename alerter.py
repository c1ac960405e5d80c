"""Alerts evaluated in this process (no REDIS_URL): the rules, their saved state, the outbox.

The fleet hands every accepted push and every status change to push()/status() and
publishes what they return. The rules' state and the recent alerts are saved once a second
when they changed (and at exit) in the history database, so a deploy neither fires an alert
that is already firing nor forgets a job that is running.
"""
import sqlite3
import threading

import offload
from alerts import load_state, save_state
from fleet import watch

SAVE_S = 1.0


class SavedState:
    """One text kept in a table of the SQLite file `path`; with no path, nothing is kept."""

    def __init__(self, path, name="alerts"):
        self._path, self._name = path, name
        self._worker = offload.Worker("alert-state") if path else None
        if self._worker:
            self._db = self._worker.run(self._open)

    def _open(self):
        db = sqlite3.connect(self._path, timeout=10, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS kept (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        return db

    def load(self):
        """Return the saved text, or None."""
        if not self._worker:
            return None
        row = self._worker.run(lambda: self._db.execute("SELECT value FROM kept WHERE name = ?",
                                                        (self._name,)).fetchone())
        return row[0] if row else None

    def save(self, text):
        """Keep `text`."""
        if self._worker:
            self._worker.run(lambda: self._db.execute("INSERT OR REPLACE INTO kept VALUES (?, ?)", (self._name, text)))


class Alerter:
    """The alert rules for a fleet in this process, with their state kept and alerts queued to send."""

    def __init__(self, settings, board, outbox, state=None):
        self._board, self._outbox = board, outbox
        self._state = state or SavedState("")
        self._saved = self._state.load()  # the text last saved: an unchanged state is not written again
        self.rules, recent = load_state(self._saved, settings)
        board.restore(self.rules.active(), recent)
        self._lock = threading.Lock()
        self._changed = False
        self._closed = False

    def start(self):
        watch("alert-state", SAVE_S, self.flush, lambda: self._closed)

    def close(self):
        self._closed = True

    def push(self, event):
        """Return the alerts an accepted push fires or resolves, queued to send."""
        with self._lock:
            return self._queued(self.rules.push(event))

    def status(self, change):
        """Return the alerts a status change fires, queued to send."""
        with self._lock:
            return self._queued(self.rules.status(change))

    def _queued(self, alerts):
        self._changed = True  # hold-down timers move with every push, not only on a transition
        for alert in alerts:
            self._outbox.put(alert)
        return alerts

    def flush(self):
        """Save the rules' state and the recent alerts, if they changed."""
        with self._lock:
            if not self._changed:
                return
            self._changed = False
            text = save_state(self.rules, self._board)
        if text != self._saved:
            self._state.save(text)
            self._saved = text

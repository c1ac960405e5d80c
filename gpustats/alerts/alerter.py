"""Alerts evaluated in this process (no REDIS_URL): the rules run on each push, their state saved, alerts queued.

The fleet hands every accepted push and every status change to push()/status() and
publishes what they return. The rules' state and the recent alerts are saved once a second
when they changed (and at exit) in a SavedState (alerts/sqlite.py): with no HISTORY_DB,
nothing is kept and the rules run all the same.
"""
import logging
import sqlite3
import threading

from gpustats.alerts.rules import load_state, save_state
from gpustats.alerts.sqlite import SavedState
from gpustats.background import watch

log = logging.getLogger("gpustats")
SAVE_S = 1.0


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
        if not alerts:
            return alerts
        items = self._outbox.prepare(alerts)
        # Kept first, state and messages in one transaction: a worker killed after this sends them
        # once after its restart; one killed before it fires them again from the same pushes.
        text = save_state(self.rules, self._board)
        try:
            self._state.save(text, items)
            self._saved = text
        except sqlite3.Error as problem:  # a full disk: sent all the same, only not kept
            log.error("the alert state could not be kept (%s); its messages are sent but a restart forgets them",
                      problem)
        self._outbox.add(items)
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

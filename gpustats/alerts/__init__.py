"""Alerts: the rules, evaluating them in this process or for the fleet through Redis, delivery and its outboxes, formats.

Two contracts, each kept by both sides: AlertEvaluator (alerter.py, redis.py) and Outbox
(sender.py's MemoryOutbox, sqlite.py's SqliteOutbox, redis.py's RedisOutbox).
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class AlertEvaluator(Protocol):
    """What runs the rules: Alerter (alerter.py), fed each push by the fleet in this process, or RedisAlerter (redis.py).

    RedisAlerter reads the pushes and status changes from the shared event stream; Alerter is
    handed them by the in-process fleet (push(), status()), which alone calls those.
    Either way what fires shows in the fleet's alerts() and is queued in the outbox once.
    """

    def start(self):
        """Evaluate and keep the rules' state in the background, once a second, until close()."""

    def close(self):
        """Stop the background work; it only sets a flag, so a signal handler may call it."""

    def flush(self):
        """Do now what the background work does each second (as a worker exits): evaluate what is new, keep the state."""


@runtime_checkable
class Outbox(Protocol):
    """Alerts waiting to be sent: a FIFO queue per destination, in this process, in SQLite or in Redis.

    How an alerter queues into it is its own (prepare() and add() in this process, put_in() with
    Redis); put() and the sender's calls are the same on all three.
    """

    def put(self, alert):
        """Queue `alert` for every destination, to be sent within the outbox's give-up time."""

    def head(self, destination):
        """Return the next item (an Item) for `destination`, or None; it stays queued until done()."""

    def later(self, destination, item, attempts, next_at, error):
        """Record a failed attempt on the head, if it is still `item`; a stale `item` changes nothing."""

    def done(self, destination, item):
        """Take the head off, if it is still `item` (sent, failed for good, or dropped); a stale `item` changes nothing."""

    def pending(self):
        """Return how many messages wait, all destinations together."""

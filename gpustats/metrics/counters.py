"""What the server counts for /metrics: pushes by answer, alert notifications by result, viewers.

Counters (this one, or RedisCounters in metrics/redis.py) keep one contract, ServerCounts
(metrics/__init__.py): add() counts one, read() returns the counts and the open streams of
the whole server, start() and close() begin and end its background work, flush() writes what is still pending.
"""
import threading
from collections import Counter

# Each answer and result a user may alert on starts at 0, so its first occurrence is an
# increase Prometheus can see (a series born at 1 shows no increase()).
KNOWN = {"pushes": ("200", "400", "401", "408", "413", "415", "429", "503"),
         "notifications": ("sent", "retry", "failed", "dropped")}


def with_known(counts):
    """Return {name: {label: n}} with every known label present, 0 where nothing was counted."""
    return {name: {**dict.fromkeys(labels, 0), **counts.get(name, {})} for name, labels in KNOWN.items()}


class Counters:
    """Counts in this process: with one worker (no REDIS_URL), the whole server's."""

    def __init__(self):
        self._counts = {name: Counter() for name in KNOWN}
        self._lock = threading.Lock()
        self._subscribers = lambda: 0

    def start(self, subscribers):
        """Read the open streams from `subscribers()` at each read()."""
        self._subscribers = subscribers

    def close(self):
        pass  # nothing runs in the background

    def flush(self):
        pass  # nothing is pending: every count is in place at once

    def add(self, name, label):
        """Count one `label` (an HTTP code, a result) under `name` (pushes, notifications)."""
        with self._lock:
            self._counts[name][str(label)] += 1

    def read(self):
        """Return ({name: {label: n}}, open streams)."""
        with self._lock:
            counts = {name: dict(counted) for name, counted in self._counts.items()}
        return with_known(counts), self._subscribers()

"""Metrics: counts of pushes and alert sends (in this process or in Redis), and GET /metrics for Prometheus.

Both kinds of counters keep one contract, ServerCounts.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class ServerCounts(Protocol):
    """What the server counts: Counters (counters.py) in this process, RedisCounters (redis.py) for every worker and host."""

    def start(self, subscribers):
        """Begin the background work; each read() counts the open streams `subscribers()` returns."""

    def close(self):
        """Stop the background work; it only sets a flag, so a signal handler may call it."""

    def flush(self):
        """Write what is still pending (as a worker exits); with nothing pending (in this process) it does nothing."""

    def add(self, name, label):
        """Count one `label` (an HTTP code, a result) under `name` (pushes, notifications); never blocks on a store."""

    def read(self):
        """Return ({name: {label: n}} with every known label, open streams) for the whole server."""

"""History: the tiers kept and how pushes become buckets (tiers.py), the SQLite and Redis stores, GET /api/history.

Both stores keep one contract, HistoryStore. How pushes reach them differs, so it is not in it:
the in-process fleet hands SqliteHistory each one (add()); RedisHistory reads them from the
shared event stream.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class HistoryStore(Protocol):
    """A history store: SqliteHistory (sqlite.py: HISTORY_DB, or memory) or RedisHistory (redis.py)."""

    def start(self):
        """Write what pushes brought once a second in the background, until close()."""

    def close(self):
        """Stop the background work; it only sets a flag, so a signal handler may call it."""

    def flush(self):
        """Write what is pending now (as a worker exits); the background work does the same each second."""

    def gpus(self, device):
        """Return [(index, uuid, name, key for series())] of the device's GPUs by index, its host first at HOST (-1)
        where it has one (tiers.split_host() parts them); None if it has no history."""

    def series(self, key, tier, start, end, step):
        """Return one GPU's series from `start` to `end` in buckets of `step` (t, each field's means, energy); None if none is there."""

    def query(self, device, tier, start, end, step):
        """Return the whole answer for `device`, read GPU by GPU as the API does; None if it has no history."""

    def points(self, device):
        """Return how many points (seconds and buckets of every tier) are kept of `device`."""

    def delete(self, device):
        """Delete every point kept of `device`; return how many went (what points() said)."""

    def keep_status(self, device, status):
        """Keep a device's new status (stale, offline) for a restart.

        Only the in-process fleet calls it; RedisHistory's does nothing, as the Redis fleet keeps
        each device's state in Redis itself.
        """

    def forget_state(self, device):
        """Forget a removed device's kept state, so a restart does not bring it back (RedisHistory: nothing to forget, as above)."""

    def last_states(self):
        """Return every device's newest kept event with the status it last had; [] where the fleet keeps them (Redis)."""

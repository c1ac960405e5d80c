"""Jobs: the processes in pushes made into jobs (tracker.py), kept in SQLite or Redis, GET /api/jobs and /api/usage.

Both stores keep one contract, JobStore. How pushes reach them differs, so it is not in it:
the in-process fleet hands SqliteJobs each push and status change (add(), status()); RedisJobs
reads them from the shared event stream, as history and alerts do.
"""
from typing import Protocol, runtime_checkable

KEEP_S = 400 * 86400  # an ended job is kept this long (SPEC: with the history, 400 days)
PROGRESS_S = 10.0  # a running job's figures are written this often; at once when a job begins or ends


@runtime_checkable
class JobStore(Protocol):
    """A job store: SqliteJobs (sqlite.py: HISTORY_DB, or memory) or RedisJobs (redis.py)."""

    def start(self):
        """Track jobs from what pushes brought, and write them, once a second in the background, until close()."""

    def close(self):
        """Stop the background work; it only sets a flag, so a signal handler may call it."""

    def flush(self):
        """Track and write what is pending now (as a worker exits); the background work does the same each second."""

    def find(self, start, end, devices=None, user=None, running=False):
        """Yield the jobs that ran between `start` and `end`, newest first, read a page at a time.

        `devices` (a set) and `user` narrow them; `running` keeps only those still running.
        """

    def delete(self, device):
        """Delete every job of `device`, and forget its running ones; return how many went."""

"""Jobs kept in SQLite (no REDIS_URL): in HISTORY_DB beside the history, or in memory when it is empty.

A push only appends its event to a queue, as history's does. Once a second the tracker runs
over what gathered (on the event loop, in slices) and the writer's OS thread writes, in one
transaction, the jobs that began or ended. Running jobs are answered from the tracker itself,
as they are now; what is written of them (every CHECKPOINT_S, each device's jobs with its
tracking state) is what a restart goes on from after a crash: a worker that stops writes all
it has. Once every few minutes it deletes jobs that ended over 400 days ago. Queries read the
kept jobs in a reader thread on a connection of its own (WAL lets it read beside the writer),
a page at a time.
"""
import collections
import heapq
import itertools
import logging
import sqlite3
import threading
import time

import orjson

from gpustats import offload
from gpustats.background import Tally, watch
from gpustats.database import sqlite_file, transaction
from gpustats.history.tiers import TrustedClock
from gpustats.jobs import KEEP_S
from gpustats.jobs.tracker import Tracker, kept
from gpustats.offload import in_slices

log = logging.getLogger("gpustats")
# `until` is a job's end, or infinity while it runs: one index finds every job that ran after a time.
SCHEMA = """
CREATE TABLE IF NOT EXISTS job (id TEXT NOT NULL UNIQUE, device TEXT NOT NULL, user TEXT, started_at REAL NOT NULL,
                                until REAL NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS job_until ON job (until);
CREATE TABLE IF NOT EXISTS job_device (device TEXT PRIMARY KEY, state TEXT NOT NULL);
"""
PUT_JOB = ("INSERT INTO job VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET user = excluded.user, "
           "started_at = excluded.started_at, until = excluded.until, data = excluded.data")
PUT_DEVICE = "INSERT INTO job_device VALUES (?, ?) ON CONFLICT (device) DO UPDATE SET state = excluded.state"
RUNNING = float("inf")
MAX_PENDING = 100_000  # pushes and status changes waiting for the writer; past it the oldest go, counted
PAGE = 500  # jobs read at a time
# Running jobs' figures are written this often, for a restart after a crash (a stop writes them all).
# Every 10 s they cost a push 6 µs more in a fleet of 2,000 PCs (docs/PERFORMANCE.md, Jobs).
CHECKPOINT_S = 60.0


def row(job):
    """Return the job's row: its id, device, user, start, end (infinity while it runs) and the whole of it as JSON."""
    until = RUNNING if job["endedAt"] is None else job["endedAt"]
    return job["id"], job["device"], job["user"], job["startedAt"], until, orjson.dumps(kept(job)).decode()


def where(start, end, devices, user, running):
    """Return the WHERE clause and its parameters that pick the jobs that ran from `start` to `end`."""
    sql, args = ["until >= ? AND started_at < ?"], [start, end]
    if running:
        sql.append("until = ?")
        args.append(RUNNING)
    if devices is not None:
        sql.append(f"device IN ({', '.join('?' * len(devices))})")
        args += sorted(devices)
    if user is not None:
        sql.append("user = ?")
        args.append(user)
    return " AND ".join(sql), args


class SqliteJobs:
    """Every device's jobs in the SQLite file HISTORY_DB, tracked and written once a second off the push's path."""

    def __init__(self, path, max_gap_s, offline_after_s, clock=time.time, flush_s=1.0, prune_s=600.0,
                 steady=time.monotonic):
        self.path = path or None
        self._flush_s, self._prune_s, self._steady = flush_s, prune_s, steady
        self._trusted = TrustedClock(clock, steady)  # pruning never follows one reading of a stepped clock
        self._pending = collections.deque(maxlen=MAX_PENDING)
        self._dropped = 0
        self._closed = False
        self._writer = offload.Worker("job-writer")
        self._db = self._writer.run(sqlite_file, path, SCHEMA)
        if self.path is None:  # one in-memory database, one connection: one thread for all of it
            self._reader, self._read_db = self._writer, self._db
        else:
            self._reader = offload.Worker("job-reader")
            self._read_db = self._reader.run(sqlite_file, path, "")
        self._tracker = self._writer.run(self._load, max_gap_s, offline_after_s)
        self._moving = threading.Lock()  # one user of the tracker at a time: the loop's round, a query, a deletion
        self._pruned = float("-inf")
        self._failing = None
        self._lost = Tally(lambda counts: log.error("jobs cannot be written to %s (%s); they are written once it "
                                                    "works again (failed writes: %d)", self.path or "memory",
                                                    self._failing, counts["writes"]), clock=steady)

    def _load(self, max_gap_s, offline_after_s):
        """Return a tracker that goes on from the running jobs and device states kept."""
        running = [orjson.loads(data) for (data,) in self._db.execute("SELECT data FROM job WHERE until = ?",
                                                                      (RUNNING,))]
        devices = {device: orjson.loads(state) for device, state in self._db.execute("SELECT * FROM job_device")}
        return Tracker(max_gap_s, offline_after_s, running, devices)

    def start(self):
        """Track what pushes bring once a second, and write it (running jobs' figures every CHECKPOINT_S), until close()."""
        watch("job-writer", self._flush_s, lambda: self._track(CHECKPOINT_S), lambda: self._closed)

    def close(self):
        self._closed = True

    def add(self, event):
        """Queue an accepted push (its event) for the tracker; never blocks."""
        if len(self._pending) == MAX_PENDING:
            self._dropped += 1
        self._pending.append(("", event))

    def status(self, change):
        """Queue a device's status change (`event: status` data, or a removal) for the tracker, in order with pushes."""
        self._pending.append(("status", change))

    def flush(self):
        """Run the tracker over what gathered and write all that changed, in one transaction; prune now and then."""
        self._track(0.0)

    def _track(self, every_s):
        # The tracker runs here, on the event loop, in slices: in an OS thread its Python would hold the
        # GIL against the loop (offload.py). Only SQLite's work goes to the writer's thread, as bytes.
        with self._moving:
            taken = [self._pending.popleft() for _ in range(len(self._pending))]
            if self._dropped:
                log.error("jobs fell behind: %d pushes were dropped untracked", self._dropped)
                self._dropped = 0
            tracker = self._tracker
            for name, data in in_slices(taken, 50):  # about a millisecond a slice
                if name == "":
                    tracker.push(data)
                else:
                    tracker.status(data)
            jobs, devices = tracker.changed(every_s)
            steady = self._steady()
            prune_before = self._trusted.now() - KEEP_S if steady - self._pruned >= self._prune_s else None
            if not jobs and not devices and prune_before is None:
                return
            # Encoded now: the tracker goes on changing these jobs while the writer writes them.
            rows = [row(job) for job in jobs]
            states = [(device, None if state is None else orjson.dumps(state).decode()) for device, state in devices.items()]
            try:
                self._writer.run(self._write, rows, states, prune_before)
            except sqlite3.Error as problem:
                tracker.again(jobs, devices)  # written with the next round's
                if not isinstance(problem, sqlite3.OperationalError):
                    raise
                self._failing = str(problem)  # a full disk, a file gone read-only: kept, tried again
                self._lost.add("writes")
                return
            if self._failing:
                log.info("jobs are written again (%s is over)", self._failing)
                self._failing = None
                self._lost.clear()
            if prune_before is not None:
                self._pruned = steady

    def _write(self, rows, states, prune_before):
        with transaction(self._db):
            self._db.executemany(PUT_JOB, rows)
            self._db.executemany(PUT_DEVICE, [(device, state) for device, state in states if state is not None])
            self._db.executemany("DELETE FROM job_device WHERE device = ?",
                                 [(device,) for device, state in states if state is None])
            if prune_before is not None:
                self._db.execute("DELETE FROM job WHERE until < ?", (prune_before,))

    def find(self, start, end, devices=None, user=None, running=False):
        """Yield the jobs that ran between `start` and `end`, newest first, a page at a time: running ones as they are now."""
        with self._moving:
            live = self._running(end, devices, user)
        clause, args = where(start, end, devices, user, running)
        kept = self._reader.run(lambda: self._read_db.execute(
            f"SELECT started_at, id, rowid FROM job WHERE {clause} ORDER BY started_at DESC, id DESC", args).fetchall())
        order = heapq.merge([(job["startedAt"], job["id"], None) for job in live.values()],
                            [found for found in kept if found[1] not in live], reverse=True)
        while page := list(itertools.islice(order, PAGE)):
            rowids = [rowid for _, _, rowid in page if rowid is not None]
            rows = dict(self._reader.run(lambda: self._read_db.execute(
                f"SELECT rowid, data FROM job WHERE rowid IN ({', '.join('?' * len(rowids))})", rowids).fetchall()))
            for _, job_id, rowid in page:
                if rowid is None:
                    yield live[job_id]
                elif rowid in rows:  # else pruned or deleted meanwhile: gone
                    yield orjson.loads(rows[rowid])

    def _running(self, end, devices, user):
        """Return {id: a copy of each running job that began before `end`}, newest first."""
        found = sorted((job for job in self._tracker.running.values() if job["startedAt"] < end
                        and (devices is None or job["device"] in devices) and (user is None or job["user"] == user)),
                       key=lambda job: (job["startedAt"], job["id"]), reverse=True)
        for device in in_slices({job["device"] for job in found}, 100):
            self._tracker.settle(device)  # each as of its device's last push
        return {job["id"]: orjson.loads(orjson.dumps(job)) for job in found}

    def delete(self, device):
        """Delete every job of `device` and forget its running ones; return how many went."""
        self.flush()  # first what is queued: its removal ends the running jobs, and nothing of it comes back

        def work():  # in the writer's thread, after any write under way
            with transaction(self._db):
                gone = self._db.execute("DELETE FROM job WHERE device = ?", (device,)).rowcount
                self._db.execute("DELETE FROM job_device WHERE device = ?", (device,))
            return gone
        with self._moving:
            self._tracker.forget(device)
            return self._writer.run(work)


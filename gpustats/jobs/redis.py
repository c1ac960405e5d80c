"""Jobs kept in Redis, with REDIS_URL: tracked once for the fleet, the same on every host.

One worker at a time (whichever holds the `gpustats:tracker` lease) reads the shared event
stream in order from its cursor, as history and alerts do, runs the tracker over the pushes
and status changes there, and in one transaction writes the jobs that began or ended, the
running jobs' figures every PROGRESS_S (each device's with its tracking state) and the
cursor. A worker that lost its lease meanwhile writes nothing (the
cursor it watched has moved); a new one loads the running jobs and device states and picks
up where the last stopped. Every worker answers queries from what Redis holds.

- `gpustats:jobs:data`: a hash of job id -> the job as JSON.
- `gpustats:jobs:start` and `gpustats:jobs:end`: sorted sets of job ids by start and by end
  (infinity while running): the jobs that ran after a time are one range of the second.
- `gpustats:jobs:devices`: a hash of device -> its tracking state.
- `gpustats:jobs:deleted`: device -> when its jobs were deleted, for an hour: the tracker
  drops what it still holds of it and skips what the stream brought of it before then.
"""
import logging
import threading
import time

import orjson
import redis

from gpustats.history.tiers import TrustedClock
from gpustats.background import watch
from gpustats.jobs import KEEP_S, PROGRESS_S
from gpustats.jobs.tracker import Tracker, kept
from gpustats.offload import in_slices
from gpustats.scaleout import PREFIX, LeasedWork, Unavailable

log = logging.getLogger("gpustats")
CURSOR, LEASE = PREFIX + "jobs:cursor", PREFIX + "tracker"
DATA, STARTS, ENDS = PREFIX + "jobs:data", PREFIX + "jobs:start", PREFIX + "jobs:end"
STATES, DELETED = PREFIX + "jobs:devices", PREFIX + "jobs:deleted"
LEASE_MS = 3000
DELETED_KEEP_S = 3600
PAGE = 500


def _when(name, data):
    """Return the time a stream entry happened: a push's receipt, a status change's moment."""
    return data.get("receivedAt") if name == "" else data.get("at")


class RedisJobs(LeasedWork):
    """The fleet's jobs in Redis, tracked by one worker at a time from the shared event stream."""

    def __init__(self, client, max_gap_s, offline_after_s, clock=time.time, period_s=1.0, prune_s=600.0,
                 steady=time.monotonic, status=None):
        super().__init__(client, LEASE, "job-tracker", period_s, LEASE_MS, status)
        self._max_gap_s, self._offline_after_s = max_gap_s, offline_after_s
        self._clock, self._steady, self._prune_s = clock, steady, prune_s
        self._trusted = TrustedClock(clock, steady)
        self._tracker = None  # the running jobs and device states, as this worker loaded and moved them
        self._pruned = float("-inf")
        self._moving = threading.Lock()  # one round at a time: the loop's, and a worker's last one as it exits
        self._every_s = 0.0  # how fresh running jobs' figures are written this round

    def start(self):
        """Track from the stream while holding the lease, once a second, until close()."""
        try:  # before this worker takes a push: the first tracker ever starts at the stream's end
            self.begin_at_end(CURSOR)
        except redis.RedisError:
            pass  # Redis is down: the reader says so; _load() does it then
        watch(self._name, self._period_s, lambda: self._track(PROGRESS_S), lambda: self._closed)

    def flush(self):
        """Track what the stream brought since the cursor and write all that changed now, if this worker holds the lease."""
        self._track(0.0)

    def _track(self, every_s):
        with self._moving:
            self._every_s = every_s
            super().flush()

    def _load(self):
        self.begin_at_end(CURSOR)
        ids = self.client.zrangebyscore(ENDS, "+inf", "+inf")
        running = [orjson.loads(data) for data in (self.client.hmget(DATA, ids) if ids else []) if data]
        devices = {device.decode(): orjson.loads(state) for device, state in self.client.hgetall(STATES).items()}
        self._tracker = Tracker(self._max_gap_s, self._offline_after_s, running, devices)
        self._cursor = self.client.get(CURSOR).decode()

    def _round(self):
        tracker, steady = self._tracker, self._steady()
        prune = steady - self._pruned >= self._prune_s
        with self.client.pipeline() as pipe:
            pipe.watch(CURSOR, DELETED)  # another tracker, or a deletion, meanwhile: this one writes nothing
            written = pipe.get(CURSOR)
            if (written.decode() if written else None) != self._cursor:  # another tracker wrote since this one loaded
                self._loaded = False
                return
            deleted = {device.decode(): float(t) for device, t in pipe.hgetall(DELETED).items()}
            read, cursor = self._after_cursor("jobs")
            if cursor == self._cursor and not deleted and not prune:
                return
            for name, data in in_slices(read, 50):  # about a millisecond a slice, as the SQLite store's
                if deleted.get(data.get("device"), float("-inf")) >= (_when(name, data) or 0):
                    continue  # from before its jobs were deleted
                if name == "":
                    tracker.push(data)
                elif name == "status":
                    tracker.status(data)
            for device, at in deleted.items():
                tracker.forget(device, at)
            jobs, devices = tracker.changed(self._every_s)
            now = self._trusted.now()
            old = pipe.zrangebyscore(ENDS, "-inf", f"({now - KEEP_S}") if prune else []
            pipe.multi()
            if jobs:
                pipe.hset(DATA, mapping={job["id"]: orjson.dumps(kept(job)) for job in jobs})
                pipe.zadd(STARTS, {job["id"]: job["startedAt"] for job in jobs})
                pipe.zadd(ENDS, {job["id"]: float("inf") if job["endedAt"] is None else job["endedAt"] for job in jobs})
            states = {device: orjson.dumps(state) for device, state in devices.items() if state is not None}
            if states:
                pipe.hset(STATES, mapping=states)
            gone = [device for device, state in devices.items() if state is None]
            if gone:
                pipe.hdel(STATES, *gone)
            if old:
                pipe.hdel(DATA, *old)
                pipe.zrem(STARTS, *old)
                pipe.zrem(ENDS, *old)
            done = [device for device, at in deleted.items() if self._clock() - at > DELETED_KEEP_S]
            if done:
                pipe.hdel(DELETED, *done)
            pipe.set(CURSOR, cursor)
            pipe.execute()
        self._cursor = cursor
        if prune:
            self._pruned = steady

    def find(self, start, end, devices=None, user=None, running=False):
        """Yield the jobs that ran between `start` and `end`, newest first, a page at a time."""
        try:
            ids = self.client.zrangebyscore(ENDS, "+inf" if running else start, "+inf")
            if devices is not None:  # an id begins with its device's name and a colon, which no name holds
                ids = [i for i in ids if i.partition(b":")[0].decode() in devices]
            starts = self.client.zmscore(STARTS, ids) if ids else []
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None
        order = sorted(((t, i) for i, t in zip(ids, starts) if t is not None and t < end), reverse=True)
        for at in range(0, len(order), PAGE):
            page = [i for _, i in order[at:at + PAGE]]
            try:
                found = self.client.hmget(DATA, page)
            except redis.RedisError as error:
                raise Unavailable(f"Redis: {error}") from None
            for data in found:
                job = orjson.loads(data) if data else None  # pruned or deleted meanwhile: gone
                if job is not None and (user is None or job["user"] == user):
                    yield job

    def delete(self, device):
        """Delete every job of `device`; the tracker, wherever it runs, drops what it still holds of it. Return how many went."""
        try:
            ids = [i for i, _ in self.client.hscan_iter(DATA, match=f"{device}:*", count=1000)]
            pipe = self.client.pipeline(transaction=True)
            if ids:
                pipe.hdel(DATA, *ids)
                pipe.zrem(STARTS, *ids)
                pipe.zrem(ENDS, *ids)
            pipe.hdel(STATES, device)
            pipe.hset(DELETED, device, repr(self._clock()))
            pipe.execute()
            return len(ids)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

"""Counters for every worker on every host, kept in Redis: a scrape of any one describes the server.

A push costs no Redis call: each worker counts in memory and adds what it counted to
Redis' hashes once a second, in one MULTI, so a count is either added whole or kept for
the next try (Redis down: counted on, added when it is back). A scrape reads the hashes
plus this worker's counts not added yet, so another worker's count shows within a second.
Open streams are a number per worker, each in a key that expires 5 s after that worker
last wrote it: a worker that died drops out of the sum by itself.
"""
import secrets
import threading
from collections import Counter

import redis

from counters import KNOWN, with_known
from fleet import Unavailable, watch

PREFIX = "gpustats:"
COUNTS = PREFIX + "counts:"  # + name: a hash of label -> count
VIEWERS = PREFIX + "viewers"  # the set of workers that wrote a count of open streams
VIEWERS_TTL_MS = 5000


class RedisCounters:
    """Counts shared by every worker and host, through Redis."""

    def __init__(self, client, period_s=1.0):
        self.client = client
        self._period_s = period_s
        self._pending = {name: Counter() for name in KNOWN}  # counted here, not yet in Redis
        self._lock = threading.Lock()
        # Held by a flush and a read for their whole length: a read between a flush's taking
        # the pending counts and Redis' adding them would see them in neither place, and a
        # count that goes down is a counter reset to Prometheus.
        self._moving = threading.Lock()
        self._token = secrets.token_hex(8)
        self._own = f"{VIEWERS}:{self._token}"
        self._subscribers = lambda: 0
        self._closed = False

    def start(self, subscribers):
        """Add what this worker counted to Redis once a period, with its open streams (`subscribers()`)."""
        self._subscribers = subscribers
        watch("counts-flush", self._period_s, self.flush, lambda: self._closed)

    def close(self):
        self._closed = True

    def add(self, name, label):
        """Count one `label` under `name`; it reaches Redis with the next flush."""
        with self._lock:
            self._pending[name][str(label)] += 1

    def flush(self):
        """Add the pending counts and this worker's open streams to Redis; kept for next time if it is down."""
        with self._moving:
            self._flush()

    def _flush(self):
        with self._lock:
            taken, self._pending = self._pending, {name: Counter() for name in KNOWN}
        pipe = self.client.pipeline(transaction=True)
        for name, counted in taken.items():
            for label, n in counted.items():
                pipe.hincrby(COUNTS + name, label, n)
        pipe.set(self._own, self._subscribers(), px=VIEWERS_TTL_MS)
        pipe.sadd(VIEWERS, self._token)
        try:
            pipe.execute()
        except redis.RedisError:  # nothing was added (MULTI): count it again next time
            with self._lock:
                for name, counted in taken.items():
                    self._pending[name].update(counted)

    def read(self):
        """Return ({name: {label: n}}, open streams) for the whole server; raise Unavailable without Redis."""
        with self._moving:
            return self._read()

    def _read(self):
        try:
            pipe = self.client.pipeline(transaction=False)
            for name in KNOWN:
                pipe.hgetall(COUNTS + name)
            pipe.smembers(VIEWERS)
            *stored, workers = pipe.execute()
            others = sorted(w.decode() for w in workers if w.decode() != self._token)
            viewers = self.client.mget([f"{VIEWERS}:{w}" for w in others]) if others else []
            gone = [w for w, n in zip(others, viewers) if n is None]
            if gone:
                self.client.srem(VIEWERS, *gone)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None
        with self._lock:
            counts = {name: Counter(self._pending[name]) for name in KNOWN}
        for name, hash_ in zip(KNOWN, stored):
            counts[name].update({label.decode(): int(n) for label, n in hash_.items()})
        return with_known(counts), self._subscribers() + sum(int(n) for n in viewers if n is not None)

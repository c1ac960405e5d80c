"""Counters for every worker on every host, kept in Redis: a scrape of any one describes the server.

A push costs no Redis call: each worker counts in memory and adds its counts to Redis'
hashes once a second, and again before it answers a scrape, so every worker answers with
what Redis holds and a count never goes down from one scrape to the next, whichever
worker takes it. A batch of counts is added by a script that first marks its id done, so
a batch retried after an unclear failure (a timeout after Redis ran it) is never added
twice; while Redis is down the batches wait, in order, for it to come back.
Open streams are a number per worker, each in a key that expires 5 s after that worker
last wrote it: a worker that died drops out of the sum by itself.
"""
import secrets
import threading
from collections import Counter

import redis

from gpustats.background import watch
from gpustats.metrics.counters import KNOWN, with_known
from gpustats.scaleout import PREFIX, Unavailable

COUNTS = PREFIX + "counts:"  # + name: a hash of label -> count
VIEWERS = PREFIX + "viewers"  # the set of workers that wrote a count of open streams
VIEWERS_TTL_MS = 5000
DONE_TTL_MS = 3_600_000  # how long a batch's id is remembered: far past any retry
# KEYS: the batch's done mark. ARGV: its TTL, then (hash, label, n) triples. Adds them only once.
ADD_ONCE = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
for i = 2, #ARGV, 3 do redis.call('HINCRBY', ARGV[i], ARGV[i + 1], ARGV[i + 2]) end
return 1
"""


class RedisCounters:
    """Counts shared by every worker and host, through Redis."""

    def __init__(self, client, period_s=1.0, status=None):
        self.client = client
        self._status = status  # the fleet's RedisStatus: this write once a second keeps it current
        self._period_s = period_s
        self._pending = {name: Counter() for name in KNOWN}  # counted here, not yet in a batch
        self._batches = []  # [(id, [(hash, label, n)])] not yet added to Redis, oldest first
        self._lock = threading.Lock()
        self._moving = threading.Lock()  # one flush at a time: batches go to Redis in order
        self._token = secrets.token_hex(8)
        self._next_batch = 0
        self._own = f"{VIEWERS}:{self._token}"
        self._add_once = client.register_script(ADD_ONCE)
        self._subscribers = lambda: 0
        self._closed = False

    def start(self, subscribers):
        """Add what this worker counted to Redis once a period, with its open streams (`subscribers()`)."""
        self._subscribers = subscribers
        watch("counts-flush", self._period_s, self._flush_quietly, lambda: self._closed)

    def close(self):
        self._closed = True

    def add(self, name, label):
        """Count one `label` under `name`; it reaches Redis with the next flush."""
        with self._lock:
            self._pending[name][str(label)] += 1

    def flush(self):
        """Add every batch of counts to Redis, and this worker's open streams; raise redis.RedisError if down."""
        with self._moving:
            with self._lock:
                taken, self._pending = self._pending, {name: Counter() for name in KNOWN}
            triples = [(COUNTS + name, label, n) for name, counted in taken.items() for label, n in counted.items()]
            if triples:
                self._batches.append((f"{PREFIX}counted:{self._token}:{self._next_batch}", triples))
                self._next_batch += 1
            while self._batches:
                done, triples = self._batches[0]
                self._add_once(keys=[done], args=[DONE_TTL_MS, *(x for triple in triples for x in triple)])
                self._batches.pop(0)
            pipe = self.client.pipeline(transaction=False)
            pipe.set(self._own, self._subscribers(), px=VIEWERS_TTL_MS)
            pipe.sadd(VIEWERS, self._token)
            pipe.execute()

    def _flush_quietly(self):
        try:
            self.flush()
        except redis.RedisError as error:  # the batches wait for the next flush; the fleet's reader reports an outage
            if self._status is not None:
                self._status.refused("counter writes", error)
        else:
            if self._status is not None:
                self._status.wrote()

    def read(self):
        """Return ({name: {label: n}}, open streams) for the whole server, as Redis holds them; raise Unavailable without Redis."""
        try:
            self.flush()  # first: what this worker counted is in Redis, so any worker answers the same
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
        counts = {name: {label.decode(): int(n) for label, n in hash_.items()} for name, hash_ in zip(KNOWN, stored)}
        return with_known(counts), self._subscribers() + sum(int(n) for n in viewers if n is not None)

"""History kept in Redis, with REDIS_URL: every worker on every host answers the same history.

It is written from the event stream every host already shares, by one worker at a time
(whichever holds the `gpustats:historian` lease), in stream order: so energy, which needs
each GPU's samples in order, comes out the same whichever worker took each push. The
writer keeps its place in the stream (`gpustats:hist:cursor`: the last entry's id and
sequence number, so entries trimmed before it wrote them are logged) and each GPU's newest
sample in Redis and changes them in the same transaction as the buckets, so a new leader
picks up exactly where the last one stopped, and a writer that lost its lease meanwhile
writes nothing (the cursor it watched has moved).

Buckets live in strings of one chunk each (a minute of seconds, an hour of minutes, a day of
hours) that expire with their tier: a query reads a few large values rather than thousands
of small ones, and adds them up in slices that let pushes and streams go on between them.
"""
import json
import logging
import time

import redis

from gpustats.offload import cooperate, in_slices
from gpustats.scaleout import PREFIX, LeasedWork, Unavailable
from gpustats.history.tiers import HOUR, MINUTE, SECOND, WIDTH, Batch, Sampler, sample, series_of, whole

log = logging.getLogger("gpustats")
# Not "history:": the previous version kept a list per device at gpustats:history:<device>.
CURSOR, LAST, LEASE = PREFIX + "hist:cursor", PREFIX + "hist:last", PREFIX + "historian"
CHUNK_S = {SECOND: 60, MINUTE: 3600, HOUR: 86400}
LEASE_MS = 3000


def _chunk_key(tier, device, gpu, chunk):
    return f"{PREFIX}hist:{tier.name}:{device}:{gpu}:{chunk}"


def _gpus_key(device):
    return f"{PREFIX}hist:gpus:{device}"


def _text(value):
    return "" if value is None else repr(value)


def _number(text):
    return None if text == "" else float(text)


def parse_chunk(text):
    """Return {bucket start: [numbers or None]} from a chunk's `start,n,n,...;start,...`."""
    records = {}
    for record in filter(None, (text or "").split(";")):
        start, *numbers = record.split(",")
        records[int(start)] = [_number(n) for n in numbers]
    return records


def merge_chunk(text, tier, updates):
    """Return a chunk with `updates` ([(start, numbers)]) added: a second's newest values win, sums add."""
    records = parse_chunk(text)
    for start, numbers in updates:
        kept = records.get(start)
        if kept is None:
            records[start] = list(numbers)
        elif tier is SECOND:  # the newest values, and all the energy drawn up to them
            records[start] = list(numbers[:-1]) + [numbers[-1] + kept[-1]]
        else:
            records[start] = [a + b for a, b in zip(kept, numbers)]
    return ";".join(",".join([str(start)] + [_text(n) for n in numbers]) for start, numbers in sorted(records.items()))


def bucket_rows(texts, tier, start, end, step):
    """Return [(bucket start, sums)] over the chunks `texts`, in buckets of `step`."""
    buckets = {}
    for i, text in enumerate(texts):
        if i % 32 == 31:
            cooperate()  # a slice of parsing (docs/PERFORMANCE.md): pushes and streams go on between them
        for t, numbers in parse_chunk(text.decode() if text else "").items():
            if not start - tier.step_s < t <= end:
                continue  # every bucket that overlaps the range, the one `from` falls in included
            sums = buckets.setdefault(t - t % step, [0] * WIDTH)
            if tier is SECOND:  # values as pushed: each one is a sum of itself over a count of one
                for i, value in enumerate(numbers[:-1]):
                    if value is not None:
                        sums[2 * i] += value
                        sums[2 * i + 1] += 1
                sums[-1] += numbers[-1]
            else:
                for i, value in enumerate(numbers):
                    sums[i] += value
    return sorted(buckets.items())


class RedisHistory(LeasedWork):
    """The fleet's history in Redis, written by one worker at a time from the shared event stream."""

    def __init__(self, client, max_gap_s, clock=time.time, write_s=1.0, status=None):
        super().__init__(client, LEASE, "history-writer", write_s, LEASE_MS, status)
        self._max_gap_s = max_gap_s
        self._clock = clock
        self._sampler = None  # each GPU's newest sample, as the writer left them
        self._begun = False  # begin() kept a cursor: from then on a missing one was lost

    def start(self):
        """Write from the stream while holding the lease, once a second, until close()."""
        try:  # before this worker takes a push
            self.begin()
        except redis.RedisError:
            pass  # Redis is down: the reader says so; _load() keeps the cursor it finds then
        super().start()

    def begin(self):
        """Have the first writer ever start at the stream's end; a writer that finds no cursor later knows it lost it."""
        self.begin_at_end(CURSOR)
        self._begun = True

    def _load(self):
        cursor = self.client.get(CURSOR)
        if cursor is None and self._begun:
            # Issue 20: with an evicting maxmemory-policy Redis dropped the cursor, and the writer
            # started over from the stream's oldest entry and counted its energy again.
            log.warning("history's cursor %s is gone (evicted? Redis needs maxmemory-policy noeviction): it goes on "
                        "from the stream's end, and what came since its last write is not kept", CURSOR)
            self.begin_at_end(CURSOR)
            cursor = self.client.get(CURSOR)
        last = {}
        for key, value in self.client.hgetall(LAST).items():
            device, _, gpu = key.decode().rpartition("|")
            t, _, power = value.decode().partition("|")
            last[(device, int(gpu))] = (float(t), _number(power))
        self._cursor = cursor.decode() if cursor else "0-0|0"
        self._sampler = Sampler(self._max_gap_s, last)

    def _round(self):
        self.write()

    def write(self):
        """Write the stream's pushes after the cursor into their buckets, and move the cursor, as one step."""
        read, cursor = self._after_cursor("history")
        if cursor == self._cursor:
            return
        batch, now = Batch(), self._clock()
        for name, data in in_slices(read):
            if name == "":
                self._sampler.add(batch, sample(data), now)
        chunks = {}  # key -> (tier, chunk start, [(bucket start, numbers)])
        for (device, gpu, second), numbers in batch.seconds.items():
            self._chunk(chunks, SECOND, device, gpu, second).append((second, numbers))
        for tier, buckets in batch.buckets.items():
            for (device, gpu, start), sums in buckets.items():
                self._chunk(chunks, tier, device, gpu, start).append((start, sums))
        keys = list(chunks)
        with self.client.pipeline() as pipe:
            pipe.watch(CURSOR)  # another writer that moved it meanwhile makes this one write nothing
            kept = pipe.get(CURSOR)
            if kept is None and self._begun:  # evicted under it: this writer, holding the lease, knows where it was
                log.warning("history's cursor %s was gone (evicted? Redis needs maxmemory-policy noeviction); "
                            "this writer goes on from where it was and writes it again", CURSOR)
            elif (kept.decode() if kept else "0-0|0") != self._cursor:
                self._loaded = False
                return
            old = pipe.mget(keys) if keys else []
            pipe.multi()
            for key, text in zip(keys, old):
                tier, chunk, updates = chunks[key]
                merged = merge_chunk(text.decode() if text else "", tier, updates)
                pipe.set(key, merged, exat=chunk + CHUNK_S[tier] + tier.keep_s)
            for (device, gpu), meta in batch.gpus.items():
                pipe.hset(_gpus_key(device), str(gpu), json.dumps(meta))
                t, power = self._sampler.last[(device, gpu)]
                pipe.hset(LAST, f"{device}|{gpu}", f"{t!r}|{_text(power)}")
            pipe.set(CURSOR, cursor)
            pipe.execute()
        self._cursor = cursor

    @staticmethod
    def _chunk(chunks, tier, device, gpu, start):
        chunk = start - start % CHUNK_S[tier]
        return chunks.setdefault(_chunk_key(tier, device, gpu, chunk), (tier, chunk, []))[2]

    def gpus(self, device):
        """Return [(index, uuid, name, key for series())] of the device's GPUs, by index; None if it has no history."""
        try:
            meta = self.client.hgetall(_gpus_key(device))
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None
        gpus = sorted((int(gpu), *json.loads(value)) for gpu, value in meta.items())
        return [(index, uuid, name, (device, index)) for index, uuid, name in gpus] or None

    def series(self, key, tier, start, end, step):
        """Return one GPU's series; None if it has no point there. Added up in slices between pushes and streams."""
        device, gpu = key
        size, now = CHUNK_S[tier], self._clock()
        # Only chunks that can exist: a far-off from or to must not become millions of keys.
        first, last = max(start, now - tier.keep_s - size), min(end, now + size)
        chunks = range(int(first) - int(first) % size, int(last) + 1, size)
        if not chunks:
            return None
        try:
            texts = self.client.mget([_chunk_key(tier, device, gpu, chunk) for chunk in chunks])
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None
        rows = bucket_rows(texts, tier, start, end, step)
        return series_of(rows) if rows else None

    def query(self, device, tier, start, end, step):
        """Return the whole answer for `device` (tests, benchmarks; the API reads GPU by GPU); None if it has no history."""
        return whole(self, device, tier, start, end, step)

    def _chunks(self, device):
        # Names are letters, digits, '.', '_' and '-': nothing a glob pattern would read as its own.
        return list(self.client.scan_iter(f"{PREFIX}hist:*:{device}:*", count=1000))

    def points(self, device):
        """Return how many points (seconds and buckets of every tier) are kept of `device`."""
        try:
            keys = self._chunks(device)
            return sum(len(parse_chunk(text.decode())) for text in (self.client.mget(keys) if keys else []) if text)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def keep_status(self, device, status):
        """Nothing to do: with Redis the fleet keeps each device's state itself (fleet/redis.py)."""

    def forget_state(self, device):
        """Nothing to do: with Redis the fleet keeps each device's state itself (fleet/redis.py)."""

    def last_states(self):
        """Return nothing: with Redis the fleet keeps each device's state itself (fleet/redis.py)."""
        return []

    def delete(self, device):
        """Delete every point kept of `device`; return how many went."""
        try:
            gone, keys = self.points(device), self._chunks(device)
            pipe = self.client.pipeline()
            for key in keys:
                pipe.delete(key)
            pipe.delete(_gpus_key(device))
            last = [field for field in self.client.hkeys(LAST) if field.decode().rpartition("|")[0] == device]
            if last:
                pipe.hdel(LAST, *last)
            pipe.execute()
            return gone
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

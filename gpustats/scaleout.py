"""What every Redis part shares (REDIS_URL): the client, the key prefix and the event stream's keys, leases, and Redis' health.

The fleet (fleet/redis.py), history (history/redis.py), alerts (alerts/redis.py, their outbox),
counters (metrics/redis.py) and rate limits (ingest/redis.py) each take the
one client made here, and tell the one RedisStatus what Redis refused them, which /healthz reads.
"""
import json
import logging
import secrets
import time

import redis

from gpustats.background import Tally, counted, watch
from gpustats.offload import in_slices

log = logging.getLogger("gpustats")
PREFIX = "gpustats:"
# The event stream every worker and host reads, and the sequence number each of its entries carries.
STREAM, SEQUENCE = PREFIX + "events", PREFIX + "seq"
RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


class Unavailable(Exception):
    """The shared store cannot be reached right now: the caller answers 503 and nothing changed."""

    reason = "unavailable"


class OutOfMemory(Unavailable):
    """The shared store refuses writes for want of memory (Redis at maxmemory): 503, nothing changed."""

    reason = "out of memory"


OOM_HELD_S = 5.0  # /healthz says "out of memory" this long after Redis last refused a write for it


def out_of_memory(error):
    """Return whether a Redis error is a write refused at maxmemory (inside a script or MULTI too)."""
    return isinstance(error, redis.OutOfMemoryError) or (
        isinstance(error, redis.ResponseError) and "used memory > 'maxmemory'" in str(error))


class RedisStatus:
    """What /healthz says of Redis (up, down, out of memory), and one line a minute while writes are refused.

    With the default `maxmemory-policy noeviction`, Redis at maxmemory refuses every write but
    still answers reads: the reader sees it up while every push is a 503. Each refusal is
    counted here; the counters' write once a second keeps this current when nothing else writes.
    """

    def __init__(self, clock=time.monotonic):
        self.up = False  # the reader's view: can it read the stream
        self._clock = clock
        self._full_at = None
        self._refused = Tally(self._say_full)

    @staticmethod
    def _say_full(counts):
        log.error("Redis is out of memory (maxmemory, policy noeviction); writes it refused: %s. Pushes get 503 until "
                  "memory is freed or maxmemory raised (docs/SCALE-OUT.md: Redis settings)", counted(counts))

    def refused(self, what, error):
        """Count a write Redis refused; return the Unavailable to raise for it."""
        if out_of_memory(error):
            self._full_at = self._clock()
            self._refused.add(what)
            return OutOfMemory(f"Redis: {error}")
        return Unavailable(f"Redis: {error}")

    def wrote(self):
        """A write went through: memory is free again, once none was refused for OOM_HELD_S.

        At the edge of maxmemory some writes pass (a trimmed stream frees a little): not yet the end.
        """
        if self._full_at is not None and self._clock() - self._full_at >= OOM_HELD_S:
            self._full_at = None
            left = self._refused.clear()
            log.info("Redis takes writes again%s", f"; refused since the last line: {counted(left)}" if left else "")

    def health(self):
        if self._full_at is not None and self._clock() - self._full_at < OOM_HELD_S:
            return "out of memory"
        return "up" if self.up else "down"


class SharedRedis:
    """The Redis of REDIS_URL: one client (a small blocking pool) for every part of a worker, and its status."""

    def __init__(self, url):
        self.url = url
        # A small blocking pool for pushes, snapshots, sweeps and writers; the fleet's reader has its own connection.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=8, timeout=5, socket_timeout=5,
                                                     socket_connect_timeout=2, health_check_interval=15)
        self.client = redis.Redis(connection_pool=pool)
        self.status = RedisStatus()


def hold_lease(client, renew, key, token, ms):
    """Take the lease `key` for `token`, or renew it if `token` holds it; return whether it is held."""
    return bool(client.set(key, token, nx=True, px=ms) or renew(keys=[key], args=[token, ms]))


class LeasedWork:
    """Work for the whole fleet that one worker does at a time, while it holds the lease `key` in Redis.

    Each period (and at exit, flush()) the holder loads its state from Redis if it has not
    yet, then does a round. A round that finds Redis changed under it (another worker took
    over meanwhile: a WatchError, or a cursor it did not expect) sets `_loaded` False, and
    the next round starts again from what Redis holds.
    """

    MOST_ENTRIES = 5000  # stream entries one round takes

    def __init__(self, client, key, name, period_s, lease_ms=3000, status=None):
        self.client = client
        self._status = status or RedisStatus()  # the fleet's, which /healthz reads
        self._cursor = None  # "id|n": the last stream entry taken, and its sequence number
        self._key, self._name, self._period_s, self._lease_ms = key, name, period_s, lease_ms
        self._renew = client.register_script(RENEW)
        self._token = secrets.token_hex(8)
        self._loaded = False
        self._closed = False

    def start(self):
        """Do a round each period while holding the lease, until close()."""
        watch(self._name, self._period_s, self.flush, lambda: self._closed)

    def begin_at_end(self, key):
        """Keep the stream's end as the cursor at `key`, unless one is kept: what came before is not this work's."""
        last = self.client.xrevrange(STREAM, count=1)
        self.client.set(key, f"{last[0][0].decode()}|{int(last[0][1][b'n'])}" if last else "0-0|0", nx=True)

    def close(self):
        self._closed = True

    def flush(self):
        """Do a round now, if this worker holds the lease."""
        try:
            if not hold_lease(self.client, self._renew, self._key, self._token, self._lease_ms):
                self._loaded = False
                return
            if not self._loaded:
                self._load()
                self._loaded = True
            self._round()
        except (redis.ConnectionError, redis.TimeoutError, redis.WatchError):
            self._loaded = False  # start again from what Redis holds; the reader reports outages
        except redis.ResponseError as error:
            self._loaded = False
            if not out_of_memory(error):
                raise  # logged by watch(), once for as long as it repeats
            self._status.refused(f"{self._name} rounds", error)  # one line a minute for all of them
        except Exception:
            self._loaded = False
            raise  # logged loudly by watch(), which goes on

    def _after_cursor(self, what):
        """Return [(event name, data)] of the stream's entries after the cursor, in order, and the cursor after them.

        Entries trimmed from the stream before this work took them show as a gap in the sequence numbers: logged.
        """
        after, _, taken = self._cursor.partition("|")
        entries = self.client.xrange(STREAM, min="(" + after, max="+", count=self.MOST_ENTRIES)
        read, sequence = [], int(taken or 0)
        for _, fields in in_slices(entries):
            try:
                n, _, name, data = read_entry(fields)
            except (KeyError, ValueError, TypeError):
                continue  # the fleet's reader logs malformed entries
            if sequence and n > sequence + 1:
                log.warning("%s missed %d events: the stream was trimmed (RING_SIZE) before they were read",
                            what, n - sequence - 1)
            sequence = n
            read.append((name, data))
        return read, f"{entries[-1][0].decode()}|{sequence}" if entries else self._cursor


def read_entry(fields):
    """Return (sequence number, device, event name, data) of a stream entry; raise if it is not one of ours."""
    block = fields[b"b"]
    data = json.loads(b"".join(line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")))
    return int(fields[b"n"]), fields[b"d"].decode(), fields[b"e"].decode(), data

"""The fleet shared through Redis: any worker on any host takes pushes and serves viewers.

- State: a hash per device (its latest event, when it was received, its status), written by
  one Lua script together with the event.
- Events: one Redis stream (XADD ... MAXLEN ~ RING_SIZE). Its ids are ordered and the same
  on every host, and it keeps the recent past, so a viewer that moves to another host
  resumes exactly; pub/sub keeps nothing and would lose what a reconnecting reader missed.
- One reader per worker, on its own connection, feeds the local broadcaster and a mirror
  of the fleet in this process (loaded from Redis at start): viewers never touch Redis, and
  a snapshot or /healthz never waits on it. Pushes and sweeps share a small pool. A reader
  that fails says so and reconnects; it never dies quietly. Every entry carries a sequence
  number, so a reader that missed entries (trimmed, or lost with Redis' data) starts over
  from Redis' state and gives its viewers a fresh snapshot.
- Status changes are found by whichever worker holds a lease in Redis (renewed each sweep,
  taken over within seconds if that worker dies), so each is published once for the fleet.
"""
import json
import logging
import secrets
import threading
import time

import redis

import sse
from alerts import load_state
from offload import in_slices
from broadcaster import stream_key
from fleet import Fleet, OutOfMemory, Tally, Unavailable, counted, new_event, status_at, status_change, watch
from ratelimit_redis import RedisRateLimiter

log = logging.getLogger("gpustats")
PREFIX = "gpustats:"
STREAM, DEVICES, LEASE, SEQUENCE = PREFIX + "events", PREFIX + "devices", PREFIX + "sweeper", PREFIX + "seq"
READ_BLOCK_MS = 1000  # well under the socket timeout: redis-py 8 sets one by default

# KEYS: device hash, device set, stream, sequence. ARGV: device, event JSON, receivedAt, SSE data
# block, stream length. Returns the event's stream id. Each entry carries n, one more than the
# last: a reader that sees a jump knows it missed entries (trimmed before it read them, or lost
# with Redis' data).
COMMIT = """
redis.call('HSET', KEYS[1], 'event', ARGV[2], 'rx', ARGV[3], 'status', 'online')
redis.call('SADD', KEYS[2], ARGV[1])
local n = redis.call('INCR', KEYS[4])
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[1], 'e', '', 'b', ARGV[4], 'n', n)
"""
# KEYS: device hash, stream, sequence. ARGV: receivedAt and status read, new status, data block,
# device, stream length. Changes the status only if no push came in meanwhile and the status is
# still the one read (two sweepers after a lease lapse cannot turn it back).
SET_STATUS = """
local now = redis.call('HMGET', KEYS[1], 'rx', 'status')
if now[1] ~= ARGV[1] or now[2] ~= ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[3])
local n = redis.call('INCR', KEYS[3])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'd', ARGV[5], 'e', 'status', 'b', ARGV[4], 'n', n)
"""
RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
ALERTS = PREFIX + "alerts:state"  # the alerter's rules and recent alerts (alerter_redis.py)


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
                  "memory is freed or maxmemory raised (README: Redis settings)", counted(counts))

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


def saved_alerts(client):
    """Return (active, recent) alerts as the alerter last saved them."""
    rules, recent = load_state(client.get(ALERTS))
    return rules.active(), recent


def read_entry(fields):
    """Return (sequence number, device, event name, data) of a stream entry; raise if it is not one of ours."""
    block = fields[b"b"]
    data = json.loads(b"".join(line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")))
    return int(fields[b"n"]), fields[b"d"].decode(), fields[b"e"].decode(), data


def _device_key(name):
    return f"{PREFIX}device:{name}"


class RedisFleet:
    """Every host's one view of the fleet, in Redis."""

    shared_ids = True  # event ids are the stream's, valid on every host

    def __init__(self, url, stale_after_s, offline_after_s, ring_size, clock=time.time):
        self.stale_after_s, self.offline_after_s = stale_after_s, offline_after_s
        self._ring_size = ring_size
        self._clock = clock
        # A small blocking pool for pushes, snapshots and sweeps; the reader has its own connection.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=8, timeout=5, socket_timeout=5,
                                                     socket_connect_timeout=2, health_check_interval=15)
        self.client = redis.Redis(connection_pool=pool)
        self._reader = redis.Redis.from_url(url, socket_timeout=READ_BLOCK_MS / 1000 + 5, socket_connect_timeout=2)
        self._commit = self.client.register_script(COMMIT)
        self._set_status = self.client.register_script(SET_STATUS)
        self._renew = self.client.register_script(RENEW)
        self._token = secrets.token_hex(8)  # this worker's name on the sweeper lease
        self._broadcaster = None
        self._closed = False
        # What viewers are shown: a fleet in this process, loaded from Redis once and then kept
        # current by the reader from the stream, so a snapshot or /healthz never waits on Redis.
        self._mirror = self._new_mirror()
        self._last_n = None  # the last entry's sequence number
        self._last = None  # the last entry's id
        self.status = RedisStatus()  # up, down or out of memory, for /healthz

    def rate_limiter(self, name, rate, burst=None, counted_as="rate checks"):
        """Return a rate limiter shared by every worker and host; a check Redis refuses is `counted_as`."""
        return RedisRateLimiter(self.client, f"{PREFIX}rate:{name}:", rate, burst,
                                refused=lambda error: self.status.refused(counted_as, error))

    def _new_mirror(self):
        mirror = Fleet(self.stale_after_s, self.offline_after_s, clock=self._clock)
        mirror.attach(self._broadcaster)
        return mirror

    def start(self, broadcaster, sweep_s):
        """Read the stream into `broadcaster`, and sweep statuses while holding the lease."""
        self._broadcaster = broadcaster
        self._mirror.attach(broadcaster)
        self._lease_ms = int(max(3.0, 3 * sweep_s) * 1000)
        try:  # before this worker serves anyone, so nobody sees the recent past replayed as new
            self._sync(backfill=True)
            self.status.up = True
            self._check_eviction()
        except redis.RedisError as error:
            log.error("Redis is unreachable at start (%s): pushes get 503 until it is back; retrying", error)
        threading.Thread(target=self._read, name="redis-reader", daemon=True).start()
        watch("status-sweep", sweep_s, self._sweep_if_leader, lambda: self._closed)

    def _check_eviction(self):
        """Warn if Redis may evict keys: the stream, cursors and leases must stay (README: Redis settings)."""
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
        except redis.ResponseError:
            return  # CONFIG is renamed or refused on many managed Redis services: nothing to check
        if policy != "noeviction":
            log.warning("Redis' maxmemory-policy is %s: at maxmemory it may evict the event stream, the history "
                        "and alert cursors and the leases; set maxmemory-policy noeviction (README: Redis settings)",
                        policy)

    def close(self):
        """Stop the reader and the sweeps (on SIGTERM); the lease lapses and another worker sweeps."""
        self._closed = True

    def health(self):
        return {"redis": self.status.health()}

    def event(self, device, push):
        """Return the event every viewer gets for an accepted push; stores nothing."""
        return new_event(device, push, self._clock())

    def commit(self, event, encoded):
        """Store the event and append it to the stream in one step; return its stream id."""
        device, _, block = encoded
        try:
            event_id = self._commit(keys=[_device_key(device), DEVICES, STREAM, SEQUENCE],
                                    args=[device, sse.encode_json(event), repr(event["receivedAt"]), block,
                                          self._ring_size])
        except redis.RedisError as error:
            raise self.status.refused("pushes", error) from None
        self.status.wrote()
        return event_id.decode()

    # ---- reading the stream into the local broadcaster ------------------------------------------

    def _read(self):
        down_since = None
        while not self._closed:
            try:
                if self._last is None:  # Redis was down at start: viewers may have an empty fleet
                    self._sync(backfill=True, reset=True)
                for _, entries in self._reader.xread({STREAM: self._last}, count=1000, block=READ_BLOCK_MS) or ():
                    for entry_id, fields in entries:
                        self._take(entry_id, fields)
                if down_since is not None:
                    log.info("Redis is back after %.1f s; events flow again", time.monotonic() - down_since)
                    down_since = None
                self.status.up = True
            except redis.RedisError as error:
                self.status.up = False
                if down_since is None:
                    down_since = time.monotonic()
                    log.error("Redis is unreachable (%s): pushes get 503 until it is back; retrying", error)
                time.sleep(0.5)
            except Exception:  # a bug, not Redis: never a silent death
                log.exception("the Redis reader failed; restarting it")
                time.sleep(0.5)

    def _sync(self, backfill, reset=False):
        """Start from Redis' state now: load the mirror, and the stream's recent past into the ring."""
        entries = self._reader.xrevrange(STREAM, count=self._ring_size if backfill else 1)
        mirror = self._new_mirror()
        for event in self._read_devices():
            mirror.restore(event)
        mirror.restore_alerts(*saved_alerts(self.client))
        self._mirror = mirror
        if backfill:
            for entry_id, fields in reversed(entries):
                self._publish(entry_id, fields)
        self._last = entries[0][0].decode() if entries else "0-0"
        self._last_n = int(entries[0][1].get(b"n", 0)) if entries else 0
        if reset:
            self._broadcaster.reset()

    def _take(self, entry_id, fields):
        """Apply one new entry to the mirror and publish it; a gap in the sequence starts over."""
        if stream_key(entry_id.decode()) <= stream_key(self._last):
            return  # already in the mirror: read again after a start-over in the same batch
        try:
            n, device, name, data = read_entry(fields)
        except (KeyError, ValueError, TypeError):  # not one of ours: say so, skip it, never stall on it
            log.error("skipped a malformed entry %s in %s", entry_id, STREAM)
            self._last = entry_id.decode()
            return
        if self._last_n is not None and n != self._last_n + 1:
            log.warning("the event stream skipped from %s to %s (trimmed before this worker read it, or lost "
                        "with Redis' data): viewers get a fresh snapshot", self._last_n, n)
            self._sync(backfill=False, reset=True)
            return
        publish = lambda: self._publish(entry_id, fields)  # noqa: E731 under the mirror's lock: snapshots match it
        if name == "status":
            self._mirror.set_status(device, data["status"], publish)
        elif name == "alert":
            self._mirror.alert(data, publish)
        else:
            self._mirror.record(data, publish)
        self._last, self._last_n = entry_id.decode(), n

    def _publish(self, entry_id, fields):
        name = fields[b"e"].decode()
        head = sse.event_head(name) if name else b""
        self._broadcaster.publish_encoded((fields[b"d"].decode(), head, fields[b"b"]), event_id=entry_id.decode())

    # ---- reading the state ---------------------------------------------------------------------

    def snapshot(self):
        """Return the broadcaster's position and every device's state there, from this worker's mirror."""
        return self._mirror.snapshot()

    def devices(self):
        """Return every device's latest event data, from this worker's mirror."""
        return self._mirror.devices()

    def counts(self):
        """Return how many devices are online, stale and offline."""
        return self._mirror.counts()

    def alerts(self):
        """Return the active and recent alerts, from this worker's mirror."""
        return self._mirror.alerts()

    def _read_devices(self):
        """Yield the latest event of every device, as Redis keeps them."""
        names = sorted(name.decode() for name in self.client.smembers(DEVICES))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(_device_key(name), "event", "status")
        for state in pipe.execute():
            if state[0] is not None:
                yield dict(json.loads(state[0]), status=state[1].decode())

    # ---- statuses, once for the fleet ------------------------------------------------------------

    def _sweep_if_leader(self):
        try:
            if hold_lease(self.client, self._renew, LEASE, self._token, self._lease_ms):
                self._sweep()
        except redis.RedisError:
            pass  # the reader reports the outage; the next sweep tries again

    def _sweep(self):
        names = [name.decode() for name in self.client.smembers(DEVICES)]
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(_device_key(name), "rx", "status")
        now = self._clock()
        for name, (received, status) in zip(names, pipe.execute()):
            if received is None:
                continue
            new = status_at(float(received), now, self.stale_after_s, self.offline_after_s)
            if new != status.decode():  # SET_STATUS checks both again, atomically
                block = sse.data_block(status_change(name, new, float(received), now))
                self._set_status(keys=[_device_key(name), STREAM, SEQUENCE],
                                 args=[received, status, new, block, name, self._ring_size])


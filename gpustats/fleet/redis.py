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

from gpustats.alerts.redis import saved_alerts
from gpustats.background import watch
from gpustats.fleet.memory import Fleet, new_event, removal, status_at, status_change
from gpustats.scaleout import PREFIX, RENEW, SEQUENCE, STREAM, hold_lease, read_entry
from gpustats.stream import sse
from gpustats.stream.broadcaster import stream_key

log = logging.getLogger("gpustats")
DEVICES, LEASE = PREFIX + "devices", PREFIX + "sweeper"
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

# KEYS: device hash, device set, stream, sequence. ARGV: device, data block, stream length.
# Takes a removed device out, and says so on the stream once for the fleet.
FORGET = """
if redis.call('DEL', KEYS[1]) == 0 then return false end
redis.call('SREM', KEYS[2], ARGV[1])
local n = redis.call('INCR', KEYS[4])
return redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1], 'e', 'status', 'b', ARGV[2], 'n', n)
"""


def _device_key(name):
    return f"{PREFIX}device:{name}"


class RedisFleet:
    """Every host's one view of the fleet, in Redis."""

    shared_ids = True  # event ids are the stream's, valid on every host

    def __init__(self, shared, stale_after_s, offline_after_s, ring_size, clock=time.time):
        self.stale_after_s, self.offline_after_s = stale_after_s, offline_after_s
        self._ring_size = ring_size
        self._clock = clock
        self.client, self.status = shared.client, shared.status  # the status: up, down or out of memory, for /healthz
        # The reader blocks on the stream, so it has a connection of its own, not one of the pool's.
        self._reader = redis.Redis.from_url(shared.url, socket_timeout=READ_BLOCK_MS / 1000 + 5,
                                            socket_connect_timeout=2)
        self._commit = self.client.register_script(COMMIT)
        self._set_status = self.client.register_script(SET_STATUS)
        self._forget = self.client.register_script(FORGET)
        self._renew = self.client.register_script(RENEW)
        self._token = secrets.token_hex(8)  # this worker's name on the sweeper lease
        self._broadcaster = None
        self._closed = False
        # What viewers are shown: a fleet in this process, loaded from Redis once and then kept
        # current by the reader from the stream, so a snapshot or /healthz never waits on Redis.
        self._mirror = self._new_mirror()
        self._last_n = None  # the last entry's sequence number
        self._last = None  # the last entry's id

    def _new_mirror(self):
        mirror = Fleet(self.stale_after_s, self.offline_after_s, clock=self._clock)
        mirror.attach(self._broadcaster)
        return mirror

    def restore_kept(self, known):
        """Take nothing: Redis keeps each device's state across restarts, and the mirror loads it at start."""
        return 0

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
        """Warn if Redis may evict keys: the stream, cursors and leases must stay (docs/SCALE-OUT.md: Redis settings)."""
        try:
            policy = self.client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
        except redis.ResponseError:
            return  # CONFIG is renamed or refused on many managed Redis services: nothing to check
        if policy != "noeviction":
            log.warning("Redis' maxmemory-policy is %s: at maxmemory it may evict the event stream, the history "
                        "and alert cursors and the leases; set maxmemory-policy noeviction (docs/SCALE-OUT.md: Redis settings)",
                        policy)

    def close(self):
        """Stop the reader and the sweeps (on SIGTERM); the lease lapses and another worker sweeps."""
        self._closed = True

    def health(self):
        return {"redis": self.status.health()}

    def accept(self, device, push):
        """Store a checked push as its device's state and append it to the stream in one step; return its stream id.

        What can fail before Redis (ValueError: nothing in it can be sent) fails before anything is stored.
        History, the alert rules and this worker's mirror take it from the stream.
        """
        event = new_event(device, push, self._clock())
        block = sse.data_block(event, finite=True)  # checked: every number is finite
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

    def forget(self, device):
        """Take a removed device out of the fleet, on every host; viewers get `event: status` "removed"."""
        try:
            self._forget(keys=[_device_key(device), DEVICES, STREAM, SEQUENCE],
                         args=[device, sse.data_block(removal(device, self._clock())), self._ring_size])
        except redis.RedisError as error:
            raise self.status.refused("device removals", error) from None

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


"""The fleet shared through Redis: any worker on any host takes pushes and serves viewers.

- State: a hash per device (its latest event, when it was received, its status) and a
  list of its history points, written by one Lua script together with the event.
- Events: one Redis stream (XADD ... MAXLEN ~ RING_SIZE). Its ids are ordered and the same
  on every host, and it keeps the recent past, so a viewer that moves to another host
  resumes exactly; pub/sub keeps nothing and would lose what a reconnecting reader missed.
- One reader per worker, on its own connection, feeds the local broadcaster: viewers never
  touch Redis, so the per-viewer path is the in-process one. Pushes and snapshots share a
  small pool. A reader that fails says so and reconnects; it never dies quietly.
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
from fleet import HISTORY_FIELDS, HISTORY_STEP_S, Unavailable, new_event, status_at, status_change, watch
from ratelimit_redis import RedisRateLimiter

log = logging.getLogger("gpustats")
PREFIX = "gpustats:"
STREAM, DEVICES, LEASE = PREFIX + "events", PREFIX + "devices", PREFIX + "sweeper"
READ_BLOCK_MS = 1000  # well under the socket timeout: redis-py 8 sets one by default

# KEYS: device hash, device set, history list, stream. ARGV: device, event JSON, receivedAt,
# SSE data block, history point, history length, stream length. Returns the event's stream id.
COMMIT = """
redis.call('HSET', KEYS[1], 'event', ARGV[2], 'rx', ARGV[3], 'status', 'online')
redis.call('SADD', KEYS[2], ARGV[1])
local keep = tonumber(ARGV[6])
if keep > 0 then
  local last = redis.call('LINDEX', KEYS[3], -1)
  if last and tonumber(ARGV[3]) - tonumber(string.match(last, '^[^|]+')) < %(step)s then
    redis.call('LSET', KEYS[3], -1, ARGV[5])
  else
    redis.call('RPUSH', KEYS[3], ARGV[5])
    redis.call('LTRIM', KEYS[3], -keep, -1)
  end
end
return redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'd', ARGV[1], 'e', '', 'b', ARGV[4])
""" % {"step": HISTORY_STEP_S}
# KEYS: device hash, stream. ARGV: receivedAt read, new status, data block, device, stream length.
# Changes the status only if no push came in meanwhile and another sweep did not do it first.
SET_STATUS = """
local now = redis.call('HMGET', KEYS[1], 'rx', 'status')
if now[1] ~= ARGV[1] or now[2] == ARGV[2] then return false end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[4], 'e', 'status', 'b', ARGV[3])
"""
RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"


def _device_key(name):
    return f"{PREFIX}device:{name}"


def _history_key(name):
    return f"{PREFIX}history:{name}"


class RedisFleet:
    """Every host's one view of the fleet, in Redis."""

    shared_ids = True  # event ids are the stream's, valid on every host

    def __init__(self, url, stale_after_s, offline_after_s, history_s, ring_size, clock=time.time):
        self.stale_after_s, self.offline_after_s, self.history_s = stale_after_s, offline_after_s, history_s
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
        self._cache = (None, [])  # (reader position, snapshot of every device): rebuilt once per change
        self._position = 0
        self._counts = {"online": 0, "stale": 0, "offline": 0}
        self.redis_up = False

    def rate_limiter(self, name, rate, burst=None):
        """Return a rate limiter shared by every worker and host."""
        return RedisRateLimiter(self.client, f"{PREFIX}rate:{name}:", rate, burst)

    def start(self, broadcaster, sweep_s):
        """Read the stream into `broadcaster`, and sweep statuses while holding the lease."""
        self._broadcaster = broadcaster
        self._lease_ms = int(max(3.0, 3 * sweep_s) * 1000)
        threading.Thread(target=self._read, name="redis-reader", daemon=True).start()
        watch("status-sweep", sweep_s, self._sweep_if_leader, lambda: self._closed)

    def close(self):
        self._closed = True

    def health(self):
        return {"redis": "up" if self.redis_up else "down"}

    def event(self, device, push):
        """Return the event every viewer gets for an accepted push; stores nothing."""
        return new_event(device, push, self._clock())

    def commit(self, event, encoded):
        """Store the event and append it to the stream in one step; return its stream id."""
        device, _, block = encoded
        point = {str(g["index"]): [g.get(name) for name in HISTORY_FIELDS] for g in event["gpus"]}
        keep = int(self.history_s / HISTORY_STEP_S) + 1 if self.history_s else 0
        try:
            event_id = self._commit(
                keys=[_device_key(device), DEVICES, _history_key(device), STREAM],
                args=[device, sse.encode_json(event), repr(event["receivedAt"]), block,
                      f"{event['receivedAt']!r}|{sse.encode_json(point)}", keep, self._ring_size])
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None
        return event_id.decode()

    # ---- reading the stream into the local broadcaster ------------------------------------------

    def _read(self):
        last, down_since, check_gap = None, None, False
        while not self._closed:
            try:
                if last is None:
                    last = self._backfill()
                    self.redis_up = True
                elif check_gap and last != "0-0" and not self._reader.xrange(STREAM, last, last):
                    # What we read last is gone (Redis restarted empty, or trimmed past it):
                    # events may be lost in between, so every viewer gets a fresh snapshot.
                    log.warning("Redis lost events this worker had not read; viewers get a fresh snapshot")
                    self._broadcaster.reset()
                check_gap = False
                for _, entries in self._reader.xread({STREAM: last}, count=1000, block=READ_BLOCK_MS) or ():
                    for entry_id, fields in entries:
                        last = self._publish(entry_id, fields)
                if down_since is not None:
                    log.info("Redis is back after %.1f s; events flow again", time.monotonic() - down_since)
                    down_since = None
                self.redis_up = True
            except redis.RedisError as error:
                self.redis_up, check_gap = False, True
                if down_since is None:
                    down_since = time.monotonic()
                    log.error("Redis is unreachable (%s): pushes get 503 until it is back; retrying", error)
                time.sleep(0.5)
            except Exception:  # a bug, not Redis: never a silent death
                log.exception("the Redis reader failed; restarting it")
                time.sleep(0.5)

    def _backfill(self):
        """Load the stream's recent events into the ring, so resuming works on a fresh worker."""
        entries = self._reader.xrevrange(STREAM, count=self._ring_size)
        last = "0-0"
        for entry_id, fields in reversed(entries):
            last = self._publish(entry_id, fields)
        return last

    def _publish(self, entry_id, fields):
        entry_id = entry_id.decode()
        name = fields[b"e"].decode()
        head = sse.event_head(name) if name else b""
        self._position += 1
        self._broadcaster.publish_encoded((fields[b"d"].decode(), head, fields[b"b"]), event_id=entry_id)
        return entry_id

    # ---- reading the state ---------------------------------------------------------------------

    def snapshot(self, devices=None):
        """Return [(device, event data with each GPU's history)]: built once per change, from Redis."""
        position, every = self._cache
        if position != self._position:
            try:
                every, position = self._read_snapshot(), self._position
                self._cache = (position, every)
            except redis.RedisError as error:
                log.warning("snapshot from Redis failed (%s); serving the last one read", error)
        return [(name, event) for name, event in every if devices is None or name in devices]

    def _read_snapshot(self):
        names = sorted(name.decode() for name in self.client.smembers(DEVICES))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.hmget(_device_key(name), "event", "status")
            pipe.lrange(_history_key(name), 0, -1)
        replies = pipe.execute()
        cutoff = self._clock() - self.history_s
        result = []
        for name, (state, points) in zip(names, zip(replies[::2], replies[1::2])):
            if state[0] is None:
                continue
            event = dict(json.loads(state[0]), status=state[1].decode(), snapshot=True)
            history = [(float(t), json.loads(p)) for t, _, p in (point.decode().partition("|") for point in points)]
            history = [(t, p) for t, p in history if t >= cutoff]
            event["gpus"] = [dict(gpu, history=_series(history, str(gpu["index"]))) for gpu in event["gpus"]]
            result.append((name, event))
        return result

    def counts(self):
        """Return how many devices are online, stale and offline (the last known, if Redis is down)."""
        try:
            names = [name.decode() for name in self.client.smembers(DEVICES)]
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.hget(_device_key(name), "status")
            statuses = [s.decode() for s in pipe.execute() if s is not None]
            self._counts = {s: statuses.count(s) for s in ("online", "stale", "offline")}
        except redis.RedisError:
            pass
        return dict(self._counts)

    # ---- statuses, once for the fleet ------------------------------------------------------------

    def _sweep_if_leader(self):
        try:
            leader = (self.client.set(LEASE, self._token, nx=True, px=self._lease_ms)
                      or self._renew(keys=[LEASE], args=[self._token, self._lease_ms]))
            if leader:
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
            if new != status.decode():
                block = sse.data_block(status_change(name, new, float(received), now))
                self._set_status(keys=[_device_key(name), STREAM],
                                 args=[received, new, block, name, self._ring_size])


def _series(history, index):
    """Return one GPU's history as columns: t and each charted field."""
    points = [(t, p[index]) for t, p in history if index in p]
    series = {"t": [round(t, 3) for t, _ in points]}
    series.update((name, [values[i] for _, values in points]) for i, name in enumerate(HISTORY_FIELDS))
    return series

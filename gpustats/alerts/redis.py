"""Alerts with REDIS_URL: evaluated once for the fleet, however many workers and hosts take pushes.

One worker at a time (whichever holds the `gpustats:alerter` lease) reads the shared event
stream in order from its cursor, runs the rules over the pushes and status changes there,
and in one transaction appends each firing and resolution to the stream (`e: alert`, so
every worker's reader shows it to its viewers), queues it in the Redis outbox, and saves
the rules' state, the recent alerts and the cursor. A worker that lost its lease meanwhile
writes nothing (the cursor it watched has moved); a new one picks up where the last stopped.

Alerts waiting to be sent wait in Redis too: a list per destination (`gpustats:alerts:outbox:<id>`)
that every worker on every host queues to, and one worker sends from, whichever holds the
`gpustats:notifier` lease.
"""
import logging
import secrets
import time
from dataclasses import replace

import redis

from gpustats.alerts.rules import AlertBoard, load_state, save_state
from gpustats.alerts.sender import Item, decode_item, encode_item
from gpustats.offload import in_slices
from gpustats.scaleout import PREFIX, RENEW, SEQUENCE, STREAM, LeasedWork
from gpustats.stream import sse

log = logging.getLogger("gpustats")
CURSOR, LEASE = PREFIX + "alerts:cursor", PREFIX + "alerter"
ALERTS = PREFIX + "alerts:state"  # the rules' state and the recent alerts, which every worker's mirror loads
LEASE_MS = 3000
# KEYS: stream, sequence. ARGV: device, SSE data block, stream length. Like COMMIT in fleet/redis.py.
APPEND = """
local n = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1], 'e', 'alert', 'b', ARGV[2], 'n', n)
"""


def saved_alerts(client):
    """Return (active, recent) alerts as the alerter last saved them."""
    rules, recent = load_state(client.get(ALERTS))
    return rules.active(), recent


class RedisAlerter(LeasedWork):
    """The alert rules for the whole fleet, run by one worker at a time from the shared event stream."""

    def __init__(self, client, settings, outbox, ring_size, period_s=1.0, status=None):
        super().__init__(client, LEASE, "alerter", period_s, LEASE_MS, status)
        self._settings, self._outbox, self._ring_size = settings, outbox, ring_size
        self._rules = self._board = self._saved = None  # the state this worker evaluates with, once loaded

    def start(self):
        """Evaluate from the stream while holding the lease, once a second, until close()."""
        try:  # before this worker takes a push: the first alerter ever starts at the stream's end, its past is not news
            self.begin_at_end(CURSOR)
        except redis.RedisError:
            pass  # Redis is down: the reader says so; _load() does it then
        super().start()

    def _load(self):
        self.begin_at_end(CURSOR)
        text, cursor = self.client.get(ALERTS), self.client.get(CURSOR)
        self._saved = text.decode() if text else None
        self._rules, recent = load_state(self._saved, self._settings)
        self._board = AlertBoard()
        self._board.restore(self._rules.active(), recent)
        self._cursor = cursor.decode()

    def _round(self):
        read, cursor = self._after_cursor("alerts")
        if cursor == self._cursor:
            return
        alerts = []
        for name, data in in_slices(read):  # rules in slices: pushes and streams go on between
            try:
                if name == "":
                    alerts += self._rules.push(data)
                elif name == "status":
                    alerts += self._rules.status(data)
            except Exception:  # never stall on one entry: say so and go on
                log.exception("the alert rules failed on an entry of %s; skipped", data.get("device"))
        for alert in alerts:
            self._board.apply(alert)
        document = save_state(self._rules, self._board)
        with self.client.pipeline() as pipe:
            pipe.watch(CURSOR)  # another alerter that moved it meanwhile makes this one write nothing
            kept = pipe.get(CURSOR)
            if (kept.decode() if kept else None) != self._cursor:
                self._loaded = False
                return
            pipe.multi()
            for alert in alerts:
                pipe.eval(APPEND, 2, STREAM, SEQUENCE, alert["device"], sse.data_block(alert), self._ring_size)
                self._outbox.put_in(pipe, alert)
            if document != self._saved:  # most rounds only move the cursor
                pipe.set(ALERTS, document)
            pipe.set(CURSOR, cursor)
            pipe.execute()
        self._cursor, self._saved = cursor, document


OUTBOX = PREFIX + "alerts:outbox:"  # + a destination's id: its list
# KEYS: a destination's list. ARGV: the head as read, what replaces it ('' takes it off). Changes
# nothing if the head is no longer that item: after a lease lapsed, another worker may have sent it.
SWAP_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('LPOP', KEYS[1]) else redis.call('LSET', KEYS[1], 0, ARGV[2]) end
return 1
"""


class RedisOutbox:
    """A FIFO list per destination in Redis, shared by every worker and host."""

    def __init__(self, client, destinations, clock=time.time, give_up_s=600):
        self._client, self._clock, self._give_up_s = client, clock, give_up_s
        self._keys = {d.id: OUTBOX + d.id for d in destinations}
        self._swap = client.register_script(SWAP_HEAD)

    def put(self, alert):
        """Queue `alert` for every destination, to be sent within `give_up_s`."""
        pipe = self._client.pipeline(transaction=True)
        self.put_in(pipe, alert)
        pipe.execute()

    def put_in(self, pipe, alert):
        """Add the commands that queue `alert` to an open MULTI pipeline: they commit with it."""
        raw = encode_item(Item(alert, self._clock() + self._give_up_s))
        for key in self._keys.values():
            pipe.rpush(key, raw)

    def head(self, destination):
        """Return the next item for `destination`, or None."""
        raw = self._client.lindex(self._keys[destination.id], 0)
        return None if raw is None else decode_item(raw)

    def later(self, destination, item, attempts, next_at, error):
        """Record a failed attempt on the head, if it is still `item`."""
        changed = replace(item, attempts=attempts, next_at=next_at, error=error)
        self._swap(keys=[self._keys[destination.id]], args=[item.raw, encode_item(changed)])

    def done(self, destination, item):
        """Take the head off, if it is still `item`: sent, failed for good, or dropped."""
        self._swap(keys=[self._keys[destination.id]], args=[item.raw, ""])

    def pending(self):
        """Return how many messages wait, all destinations together."""
        pipe = self._client.pipeline(transaction=False)
        for key in self._keys.values():
            pipe.llen(key)
        return sum(pipe.execute())


class NotifierLease:
    """A lease in Redis: one worker of the fleet sends; if it dies, another takes over within `ms`."""

    def __init__(self, client, key=PREFIX + "notifier", ms=3000):
        self.ms = ms
        self._client, self._key = client, key
        self._token = secrets.token_hex(8)  # this worker's name on the lease
        self._renew = client.register_script(RENEW)

    def held(self):
        """Take the lease or renew it; return whether this worker holds it."""
        return bool(self._client.set(self._key, self._token, nx=True, px=self.ms)
                    or self._renew(keys=[self._key], args=[self._token, self.ms]))

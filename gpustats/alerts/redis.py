"""Alerts with REDIS_URL: evaluated once for the fleet, however many workers and hosts take pushes.

One worker at a time (whichever holds the `gpustats:alerter` lease) reads the shared event
stream in order from its cursor, runs the rules over the pushes and status changes there,
and in one transaction appends each firing and resolution to the stream (`e: alert`, so
every worker's reader shows it to its viewers), queues it in the Redis outbox, and saves
the rules' state, the recent alerts and the cursor. A worker that lost its lease meanwhile
writes nothing (the cursor it watched has moved); a new one picks up where the last stopped.
"""
import logging

import redis

from gpustats.alerts.rules import AlertBoard, load_state, save_state
from gpustats.offload import in_slices
from gpustats.scaleout import PREFIX, SEQUENCE, STREAM, LeasedWork
from gpustats.stream import sse

log = logging.getLogger("gpustats")
CURSOR, LEASE = PREFIX + "alerts:cursor", PREFIX + "alerter"
ALERTS = PREFIX + "alerts:state"  # the rules' state and the recent alerts, which every worker's mirror loads
LEASE_MS = 3000
# KEYS: stream, sequence. ARGV: device, SSE data block, stream length. Like COMMIT in fleet_redis.
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
        for name, data in in_slices(read):  # 5,000 entries are ~60 ms of rules: pushes and streams go on between
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

"""Alerts with REDIS_URL: evaluated once for the fleet, however many workers and hosts take pushes.

One worker at a time (whichever holds the `gpustats:alerter` lease) reads the shared event
stream in order from its cursor, runs the rules over the pushes and status changes there,
and in one transaction appends each firing and resolution to the stream (`e: alert`, so
every worker's reader shows it to its viewers), queues it in the Redis outbox, and saves
the rules' state, the recent alerts and the cursor. A worker that lost its lease meanwhile
writes nothing (the cursor it watched has moved); a new one picks up where the last stopped.
"""
import json
import logging

import redis

import sse
from alerts import AlertBoard, Rules
from offload import cooperate
from fleet_redis import ALERTS, PREFIX, SEQUENCE, STREAM, LeasedWork, read_entry

log = logging.getLogger("gpustats")
CURSOR, LEASE = PREFIX + "alerts:cursor", PREFIX + "alerter"
LEASE_MS = 3000
MOST_ENTRIES = 5000  # stream entries one round takes
# KEYS: stream, sequence. ARGV: device, SSE data block, stream length. Like COMMIT in fleet_redis.
APPEND = """
local n = redis.call('INCR', KEYS[2])
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'd', ARGV[1], 'e', 'alert', 'b', ARGV[2], 'n', n)
"""


class RedisAlerter(LeasedWork):
    """The alert rules for the whole fleet, run by one worker at a time from the shared event stream."""

    def __init__(self, client, settings, outbox, ring_size, period_s=1.0):
        super().__init__(client, LEASE, "alerter", period_s, LEASE_MS)
        self._settings, self._outbox, self._ring_size = settings, outbox, ring_size
        self._rules = self._board = self._cursor = self._saved = None  # the state this worker evaluates with, once loaded

    def start(self):
        """Evaluate from the stream while holding the lease, once a second, until close()."""
        try:  # before this worker takes a push
            self._begin_at_end()
        except redis.RedisError:
            pass  # Redis is down: the reader says so; _load() does it then
        super().start()

    def _begin_at_end(self):
        """Have the first alerter ever start at the stream's end: its past is not news."""
        last = self.client.xrevrange(STREAM, count=1)
        self.client.set(CURSOR, f"{last[0][0].decode()}|{int(last[0][1][b'n'])}" if last else "0-0|0", nx=True)

    def _load(self):
        self._begin_at_end()
        text, cursor = self.client.get(ALERTS), self.client.get(CURSOR)
        self._saved = text.decode() if text else None
        document = json.loads(text) if text else {}
        self._rules = Rules(self._settings, document.get("rules"))
        self._board = AlertBoard()
        self._board.restore(self._rules.active(), document.get("recent", ()))
        self._cursor = cursor.decode()

    def _round(self):
        after, _, seen = self._cursor.partition("|")
        entries = self.client.xrange(STREAM, min="(" + after, max="+", count=MOST_ENTRIES)
        if not entries:
            return
        alerts, sequence = [], int(seen or 0)
        for i, (_, fields) in enumerate(entries):
            if i % 200 == 199:
                cooperate()  # catching up on 5,000 entries is ~60 ms of rules: pushes and streams go on between
            try:
                n, _, name, data = read_entry(fields)
            except (KeyError, ValueError, TypeError):
                continue  # the fleet's reader logs malformed entries
            if sequence and n > sequence + 1:
                log.warning("alerts missed %d events: the stream was trimmed (RING_SIZE) before they were read",
                            n - sequence - 1)
            sequence = n
            try:
                if name == "":
                    alerts += self._rules.push(data)
                elif name == "status":
                    alerts += self._rules.status(data)
            except Exception:  # never stall on one entry: say so and go on
                log.exception("the alert rules failed on entry %s of %s; skipped", n, data.get("device"))
        for alert in alerts:
            self._board.apply(alert)
        cursor = f"{entries[-1][0].decode()}|{sequence}"
        document = sse.encode_json({"rules": self._rules.state(), "recent": self._board.view()["recent"]})
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

"""Alerts waiting to be sent, in Redis: every worker on every host queues, the lease holder sends."""
import secrets
import time
from dataclasses import replace

from gpustats.alerts.sender import Item, decode_item, encode_item
from gpustats.scaleout import RENEW

PREFIX = "gpustats:alerts:outbox:"
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
        self._keys = {d.id: PREFIX + d.id for d in destinations}
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

    def __init__(self, client, key="gpustats:notifier", ms=3000):
        self.ms = ms
        self._client, self._key = client, key
        self._token = secrets.token_hex(8)  # this worker's name on the lease
        self._renew = client.register_script(RENEW)

    def held(self):
        """Take the lease or renew it; return whether this worker holds it."""
        return bool(self._client.set(self._key, self._token, nx=True, px=self.ms)
                    or self._renew(keys=[self._key], args=[self._token, self.ms]))

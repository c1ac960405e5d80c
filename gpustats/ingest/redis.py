"""Token buckets kept in Redis, so a rate limit holds across every worker and host."""
import math

import redis

from gpustats.scaleout import PREFIX, Unavailable

# One bucket a key: refill by Redis' own clock (one clock for every host), then spend one
# token if asked and if there is one. Returns {allowed, tokens left as text}.
TAKE = """
local rate, burst, spend = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
tokens = math.min(burst, tokens + math.max(0, now - (tonumber(bucket[2]) or now)) * rate)
local allowed = tokens >= 1
if spend then
  if allowed then tokens = tokens - 1 end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
end
return {allowed and 1 or 0, tostring(tokens)}
"""


class RedisRateLimiter:
    """Allow `rate` events a second per key, in bursts of up to `burst`, for the whole fleet."""

    def __init__(self, client, name, rate, burst=None, status=None, counted_as="rate checks"):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self._prefix = f"{PREFIX}rate:{name}:"
        self._take = client.register_script(TAKE)
        # A check Redis refuses: counted as `counted_as` in the fleet's status (what /healthz says), then raised.
        self._refused = ((lambda error: status.refused(counted_as, error)) if status is not None
                         else (lambda error: Unavailable(f"Redis: {error}")))

    def _call(self, key, spend):
        try:
            allowed, tokens = self._take(keys=[self._prefix + key], args=[self.rate, self.burst, int(spend)])
        except redis.RedisError as error:
            raise self._refused(error) from None
        return 0 if allowed else max(1, math.ceil((1 - float(tokens)) / self.rate))

    def take(self, key):
        """Spend one token; return 0 if allowed, else the whole seconds to wait."""
        return self._call(key, True)

    def blocked_for(self, key):
        """Return 0 if `key` has a token left, else the whole seconds until it has; spend nothing."""
        return self._call(key, False)

"""Token buckets: the per-device push rate limit, and the slow-down for bad keys per address."""
import math
import threading
import time


class RateLimiter:
    """Allow `rate` events a second per key, in bursts of up to `burst`; remember at most `max_keys`."""

    def __init__(self, rate, burst=None, max_keys=100_000, clock=time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = {}  # key -> (tokens, last refill time), oldest first

    def _tokens(self, key, now):
        tokens, last = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _wait_s(self, tokens):
        return max(1, math.ceil((1 - tokens) / self.rate))

    def take(self, key):
        """Spend one token; return 0 if allowed, else the whole seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
            self._buckets.pop(key, None)
            if len(self._buckets) >= self.max_keys:
                # Forget the least recently seen key: many addresses cannot grow memory.
                self._buckets.pop(next(iter(self._buckets)))
            self._buckets[key] = (tokens - 1 if tokens >= 1 else tokens, now)
            return 0 if tokens >= 1 else self._wait_s(tokens)

    def blocked_for(self, key):
        """Return 0 if `key` has a token left, else the whole seconds until it has; spend nothing."""
        with self._lock:
            tokens = self._tokens(key, self._clock())
        return 0 if tokens >= 1 else self._wait_s(tokens)

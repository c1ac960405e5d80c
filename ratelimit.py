"""Per-device token buckets for the push rate limit."""
import math
import threading
import time


class RateLimiter:
    """Allow `rate` pushes a second per device, in bursts of up to `burst`."""

    def __init__(self, rate, burst=None, clock=time.monotonic):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, 2 * rate)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = {}  # device -> (tokens, last refill time)

    def take(self, device):
        """Spend one token; return 0 if allowed, else the whole seconds to wait."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(device, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[device] = (tokens - 1, now)
                return 0
            self._buckets[device] = (tokens, now)
            return max(1, math.ceil((1 - tokens) / self.rate))

"""Pushes from agents: POST /push-sse, the checks every push passes, and the rate limits (in this process or in Redis).

Both rate limiters keep one contract, RateLimit.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class RateLimit(Protocol):
    """Token buckets, one a key: RateLimiter (ratelimit.py) in this process, RedisRateLimiter (redis.py) for the fleet."""

    def take(self, key):
        """Spend one of `key`'s tokens; return 0 if allowed, else the whole seconds to wait (at least 1)."""

    def blocked_for(self, key):
        """Return 0 if `key` has a token left, else the whole seconds until it has; spend nothing."""

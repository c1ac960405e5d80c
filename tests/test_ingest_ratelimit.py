"""Token buckets, on a clock the test turns."""
from gpustats.ingest.ratelimit import RateLimiter


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_bursts_up_to_twice_the_rate_then_waits():
    clock = Clock()
    limiter = RateLimiter(5, clock=clock)
    assert [limiter.take("rig") for _ in range(11)] == [0] * 10 + [1]
    clock.now += 0.2
    assert limiter.take("rig") == 0 and limiter.take("rig") == 1


def test_keys_are_independent_and_peeking_spends_nothing():
    clock = Clock()
    limiter = RateLimiter(1 / 6, burst=3, clock=clock)
    for _ in range(3):
        assert limiter.blocked_for("10.0.0.1") == 0
        limiter.take("10.0.0.1")
    assert limiter.blocked_for("10.0.0.1") == 6 and limiter.blocked_for("10.0.0.2") == 0
    clock.now += 6
    assert limiter.blocked_for("10.0.0.1") == 0


def test_memory_is_bounded_by_forgetting_the_oldest_key():
    limiter = RateLimiter(1, burst=1, max_keys=100, clock=Clock())
    for i in range(1000):
        limiter.take(f"addr-{i}")
    assert len(limiter._buckets) == 100 and limiter.blocked_for("addr-999") == 1

"""Guessing passwords is throttled, for the sign-in form and HTTP Basic alike (SPEC, Access).

- An address with FREE_FAILS wrong passwords within WINDOW_S is answered 429 at once (no hash
  computed) until its wait is over; the wait starts at FIRST_WAIT_S and doubles with each
  further wrong password, up to WINDOW_S. Its first lock-out is logged once, with the address.
- A try is counted as wrong before its password is hashed, and taken back if it was right: tries
  sent at once cannot all be checked before the first of them is counted (issue 29). A right
  password gives back only that try: the address's wrong ones still count.
- Wrong passwords for one user, from any number of addresses, slow that user's sign-ins by
  USER_DELAY_S each past FREE_FAILS, up to MOST_USER_DELAY_S: never a lock-out, so the right
  password from an address that has not failed still gets in.

This one counts in the process (no REDIS_URL); RedisSignInThrottle (redis.py) counts for every worker and host.
"""
import logging
import math
import threading
import time

log = logging.getLogger("gpustats")
FREE_FAILS, WINDOW_S, FIRST_WAIT_S = 5, 900.0, 2.0
USER_DELAY_S, MOST_USER_DELAY_S = 0.1, 1.0
MOST_REMEMBERED = 10_000  # addresses and users each; past it the least recently counted are forgotten


def wait_after(fails):
    """Return how long an address waits after its `fails`-th wrong password in the window (0: none)."""
    return 0.0 if fails < FREE_FAILS else min(WINDOW_S, FIRST_WAIT_S * 2 ** (fails - FREE_FAILS))


def user_delay(fails):
    """Return how long a sign-in as a user waits, after `fails` wrong passwords for it in the window."""
    return min(MOST_USER_DELAY_S, USER_DELAY_S * max(0, fails - FREE_FAILS + 1))


class SignInThrottle:
    """The guessing throttle, counted in this process."""

    def __init__(self, clock=time.time):
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses = {}  # address -> (window start, fails, blocked until)
        self._users = {}  # user -> (window start, fails)

    def blocked_for(self, address):
        """Return the whole seconds `address` must wait before its next try, or 0."""
        with self._lock:
            start, fails, until = self._addresses.get(address, (0.0, 0, 0.0))
        left = until - self._clock()
        return math.ceil(left) if left > 0 else 0

    def delay_for(self, user):
        """Return the seconds a sign-in as `user` waits first (many wrong passwords for it lately)."""
        now = self._clock()
        with self._lock:
            start, fails = self._users.get(user, (now, 0))
        return 0.0 if now - start > WINDOW_S else user_delay(fails)

    def failed(self, address, user):
        """Count a wrong password from `address` for `user`."""
        now = self._clock()
        with self._lock:
            start, fails, _ = self._addresses.pop(address, (now, 0, 0.0))
            if now - start > WINDOW_S:
                start, fails = now, 0
            fails += 1
            self._remember(self._addresses, address, (start, fails, now + wait_after(fails)))
            user_start, user_fails = self._users.pop(user, (now, 0))
            if now - user_start > WINDOW_S:
                user_start, user_fails = now, 0
            self._remember(self._users, user, (user_start, user_fails + 1))
        if fails == FREE_FAILS:
            log.warning("sign-ins from %s are held back: %d wrong passwords within %d min", address, fails,
                        WINDOW_S // 60)

    def succeeded(self, address, user):
        """The right password: the address and the user each give back the try counted for it before the hash.

        The address does not start afresh: anyone who knows one password (the shared viewer login's)
        could otherwise guess 4 at the admin, sign in once, and guess 4 more, for ever (issue 29's review).
        """
        with self._lock:
            if address in self._addresses:
                start, fails, until = self._addresses[address]
                fails = max(0, fails - 1)
                self._addresses[address] = (start, fails, until if fails >= FREE_FAILS else 0.0)
            if user in self._users:
                start, fails = self._users[user]
                self._users[user] = (start, max(0, fails - 1))

    def _remember(self, table, key, value):
        """Keep `value` for `key`, first forgetting what has run out and, past MOST_REMEMBERED, the least recent."""
        now = self._clock()
        while table:
            oldest = next(iter(table))
            kept = table[oldest]
            if len(table) < MOST_REMEMBERED and (now - kept[0] <= WINDOW_S or (len(kept) > 2 and kept[2] > now)):
                break
            del table[oldest]  # run out, or one too many: a table cannot grow with the addresses and names tried
        table[key] = value

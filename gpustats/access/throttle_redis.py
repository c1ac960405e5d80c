"""The guessing throttle counted in Redis (REDIS_URL): every worker and host holds an address back alike.

The same rules as throttle.py, on Redis' own clock: `gpustats:signin:addr:<address>` and
`gpustats:signin:user:<name>` are hashes (start, fails, until) that expire with their window.
"""
import logging
import math

import redis

from gpustats.access.throttle import FIRST_WAIT_S, FREE_FAILS, WINDOW_S, user_delay
from gpustats.scaleout import PREFIX, Unavailable

log = logging.getLogger("gpustats")
# KEYS: the address's hash, the user's hash. ARGV: window, free fails, first wait. Returns the address's fails.
FAILED = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local window, free, first = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function count(key)
  local kept = redis.call('HMGET', key, 'start', 'fails')
  local start, fails = tonumber(kept[1]) or now, tonumber(kept[2]) or 0
  if now - start > window then start, fails = now, 0 end
  fails = fails + 1
  redis.call('HSET', key, 'start', start, 'fails', fails)
  return fails
end
local fails = count(KEYS[1])
local wait = 0
if fails >= free then wait = math.min(window, first * 2 ^ (fails - free)) end
redis.call('HSET', KEYS[1], 'until', now + wait)
redis.call('PEXPIRE', KEYS[1], math.ceil((window + wait) * 1000))
count(KEYS[2])
redis.call('PEXPIRE', KEYS[2], math.ceil(window * 1000))
return fails
"""
# KEYS: the address's hash, the user's hash. ARGV: window. Returns {seconds the address waits, the user's fails}.
STATE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1e6
local untl = tonumber(redis.call('HGET', KEYS[1], 'until')) or 0
local user = redis.call('HMGET', KEYS[2], 'start', 'fails')
local fails = tonumber(user[2]) or 0
if now - (tonumber(user[1]) or now) > tonumber(ARGV[1]) then fails = 0 end
return {tostring(math.max(0, untl - now)), fails}
"""

# KEYS: the address's hash, the user's hash. The right password: the address starts afresh, and the
# user's count gives back the try counted for it before the hash.
SUCCEEDED = """
redis.call('DEL', KEYS[1])
local fails = tonumber(redis.call('HGET', KEYS[2], 'fails'))
if fails and fails > 0 then redis.call('HSET', KEYS[2], 'fails', fails - 1) end
return 1
"""


class RedisSignInThrottle:
    """The guessing throttle for the whole fleet, in Redis."""

    def __init__(self, client):
        self._client = client
        self._failed = client.register_script(FAILED)
        self._state = client.register_script(STATE)
        self._succeeded = client.register_script(SUCCEEDED)

    @staticmethod
    def _keys(address, user):
        return [f"{PREFIX}signin:addr:{address}", f"{PREFIX}signin:user:{user}"]

    def _call(self, script, keys, args):
        try:
            return script(keys=keys, args=args)
        except redis.RedisError as error:
            raise Unavailable(f"Redis: {error}") from None

    def blocked_for(self, address):
        left, _ = self._call(self._state, self._keys(address, ""), [WINDOW_S])
        return math.ceil(float(left)) if float(left) > 0 else 0

    def delay_for(self, user):
        _, fails = self._call(self._state, self._keys("", user), [WINDOW_S])
        return user_delay(int(fails))

    def failed(self, address, user):
        fails = self._call(self._failed, self._keys(address, user), [WINDOW_S, FREE_FAILS, FIRST_WAIT_S])
        if int(fails) == FREE_FAILS:
            log.warning("sign-ins from %s are held back: %d wrong passwords within %d min", address, FREE_FAILS,
                        WINDOW_S // 60)

    def succeeded(self, address, user):
        address_key, user_key = self._keys(address, user)
        self._call(self._succeeded, [address_key, user_key], [])

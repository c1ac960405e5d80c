"""Every device's latest state and status: in this process (memory.py), or shared through Redis (redis.py).

Both keep one contract, LiveFleet: create_app(), the routes and the broadcaster use no other call.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class LiveFleet(Protocol):
    """A fleet: Fleet (memory.py) in this process, RedisFleet (redis.py) for every worker and host."""

    shared_ids: bool  # event ids are valid on every host (a Redis stream's), or this process's own

    def restore_kept(self, known):
        """Take each `known` device's state as it was kept at the last stop; return how many (0 where the store keeps it)."""

    def start(self, broadcaster, sweep_s):
        """Publish through `broadcaster`, and publish each status change (`event: status`) as devices go quiet."""

    def close(self):
        """Stop the background work; it only sets a flag, so a signal handler may call it."""

    def health(self):
        """Return what the fleet adds to /healthz: {}, or how Redis is ({"redis": "up"})."""

    def accept(self, device, push):
        """Store a checked push as `device`'s state and publish it, one step under the fleet's lock; return its event id.

        A push changes all or nothing: ValueError (something in it cannot be sent) comes before
        anything is stored, and a store that refuses it (Redis down: Unavailable) changed nothing.
        """

    def snapshot(self):
        """Return ((sequence, event id), [(device, its latest event data)]): every device as it was at that position."""

    def devices(self):
        """Return every device's latest event data, with its status, by name."""

    def counts(self):
        """Return how many devices are online, stale and offline: {"online": n, "stale": n, "offline": n}."""

    def alerts(self):
        """Return the alerts viewers are shown: {"active": [...], "recent": [...]}, newest first."""

    def forget(self, device):
        """Take a removed device out of the fleet and tell viewers (`event: status`, status "removed")."""

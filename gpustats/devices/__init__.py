"""Devices: the registry of devices and their keys (in SQLite or Redis, beside DEVICE_KEYS), its routes and the Devices page.

Both stores keep one contract, DeviceStore; the registry (registry.py) is its one caller.
"""
from typing import Protocol, runtime_checkable


@runtime_checkable
class DeviceStore(Protocol):
    """Devices and their keys, by the keys' digests: SqliteDevices (sqlite.py) or RedisDevices (redis.py).

    Every change moves version() on. Redis down: Unavailable, nothing changed.
    """

    def version(self):
        """Return a number that every change moves on, so a worker reloads the keys only then."""

    def keys(self):
        """Return {digest: (device, key id)} of every key."""

    def key(self, digest):
        """Return (device, key id) of one key, or None."""

    def devices(self):
        """Return [{"name", "createdAt", "keys": [{"id", "prefix", "createdAt", "lastUsedAt"}]}], by name."""

    def add(self, name, digest, prefix):
        """Add a device with its first key; return the key's id. DeviceError 409 if the name is in use."""

    def add_key(self, name, digest, prefix):
        """Add a key to a device; return its id. DeviceError 404 if there is no such device."""

    def remove_key(self, name, key_id):
        """Remove one of a device's keys; DeviceError 404 if the device has no such key."""

    def remove(self, name):
        """Remove a device and all its keys; DeviceError 404 if there is none."""

    def used(self, times):
        """Keep when keys were last used: {key id: unix time}."""

"""Devices: the registry of devices and their keys (in SQLite or Redis, beside DEVICE_KEYS), its routes and the Devices page."""

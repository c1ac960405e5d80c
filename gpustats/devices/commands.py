"""`python config.py --add-device NAME`, `--remove-device NAME` and `--list-devices`, on the running server's store."""
import socket
import sys

from gpustats.command_line import open_store, option
from gpustats.devices.install import commands
from gpustats.devices.redis import RedisDevices
from gpustats.devices.registry import DeviceError, DeviceRegistry
from gpustats.devices.sqlite import SqliteDevices
from gpustats.errors import ConfigError


def devices_command(argv, config, out=sys.stdout):
    """Run --add-device NAME, --remove-device NAME or --list-devices against the running server's store."""
    registry = DeviceRegistry(open_store(config, "devices", RedisDevices, SqliteDevices), config.device_keys)
    try:
        if "--list-devices" in argv:
            for device in registry.devices():
                keys = ", ".join(f"{k['prefix']}... (id {k['id']})" for k in device["keys"]) or "no keys"
                print(f"{device['name']:<24} {'in .env' if device['source'] == 'env' else keys}", file=out)
            return 0
        if "--remove-device" in argv:
            name = option(argv, "--remove-device")
            registry.remove(name)
            print(f"Removed the device {name}: its keys get 401 within a second; its history is kept.", file=out)
            return 0
        name = option(argv, "--add-device")
        key, _ = registry.add(name)
        base = config.alert_dashboard_url or f"http://{socket.gethostname() or 'SERVER'}:{config.port}"
        print(f"Added the device {name}. Its key, shown this once: {key}\n"
              f"On the PC, one of these installs the agent and starts it at boot or logon:", file=out)
        for system, command in commands(base, key).items():
            print(f"  {system}:\n    {command}", file=out)
        return 0
    except DeviceError as problem:
        raise ConfigError(str(problem)) from None

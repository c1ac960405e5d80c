"""Turn `.env` and the environment into one validated server config."""
import ipaddress
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

HERE = Path(__file__).resolve().parent
DEVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


class ConfigError(ValueError):
    """A setting with a value the server cannot run with; the message names it."""


@dataclass(frozen=True)
class Config:
    port: int = 3000
    device_keys: dict = field(default_factory=dict)  # key -> device name
    dashboard_user: str = "admin"
    dashboard_password: str = ""
    stale_after_s: float = 15.0
    offline_after_s: float = 60.0
    heartbeat_s: float = 15.0
    history_s: int = 600
    max_body_bytes: int = 65536
    push_rate_limit: float = 5.0
    cors_origins: tuple = ()
    max_subscribers: int = 10000
    viewer_timeout_s: float = 60.0
    trusted_proxies: tuple = ("127.0.0.1", "::1")
    # Not in the environment: sizes the tests shrink.
    ring_size: int = 1024
    sweep_s: float = 1.0

    @property
    def devices(self):
        """Return the device names that have at least one key."""
        return sorted(set(self.device_keys.values()))


def _number(name, raw, kind, low, high=None):
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a {'whole ' if kind is int else ''}number") from None
    if value != value or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"{name}: {raw!r} is out of range, it must be {bound}")
    return value


def _addresses(name, raw):
    addresses = tuple(a.strip() for a in raw.split(",") if a.strip())
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"{name}: {address!r} is not an IP address") from None
    return addresses


def parse_device_keys(raw):
    """Parse `name:key,name2:key2` into {key: name}; a device may have several keys."""
    keys = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, key = item.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not DEVICE_NAME.match(name):
            raise ConfigError(f"DEVICE_KEYS: {item.split(':')[0]!r} is not name:key with a name of "
                              "letters, digits, '.', '_' or '-'")
        if not DEVICE_KEY.match(key):
            raise ConfigError(f"DEVICE_KEYS: the key of {name!r} must be 16 to 256 letters, digits "
                              "or ._~+/=- (make one with: python config.py --new-key)")
        if keys.get(key, name) != name:
            raise ConfigError(f"DEVICE_KEYS: {name!r} and {keys[key]!r} share a key; each key is one device's")
        keys[key] = name
    return keys


def load_config(overrides=None, environ=None):
    """Build the config from .env, the environment (which wins) and then `overrides`."""
    environ = os.environ if environ is None else environ
    env_file = environ.get("ENV_FILE", str(HERE / ".env"))
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    values.update(environ)
    values.update({k: str(v) for k, v in (overrides or {}).items()})
    get = values.get
    stale = _number("STALE_AFTER_S", get("STALE_AFTER_S", "15"), float, 0.1)
    offline = _number("OFFLINE_AFTER_S", get("OFFLINE_AFTER_S", "60"), float, 0.1)
    if offline <= stale:
        raise ConfigError(f"OFFLINE_AFTER_S: {offline:g} must be longer than STALE_AFTER_S ({stale:g})")
    origins = tuple(o.strip().rstrip("/") for o in get("CORS_ORIGINS", "").split(",") if o.strip())
    return Config(
        port=_number("PORT", get("PORT", "3000"), int, 0, 65535),
        device_keys=parse_device_keys(get("DEVICE_KEYS", "")),
        dashboard_user=get("DASHBOARD_USER", "") or "admin",
        dashboard_password=get("DASHBOARD_PASSWORD", ""),
        stale_after_s=stale,
        offline_after_s=offline,
        heartbeat_s=_number("HEARTBEAT_S", get("HEARTBEAT_S", "15"), float, 0.05, 3600),
        history_s=_number("HISTORY_S", get("HISTORY_S", "600"), int, 0, 86400),
        max_body_bytes=_number("MAX_BODY_BYTES", get("MAX_BODY_BYTES", "65536"), int, 256, 16 << 20),
        push_rate_limit=_number("PUSH_RATE_LIMIT", get("PUSH_RATE_LIMIT", "5"), float, 0.01),
        cors_origins=origins,
        max_subscribers=_number("MAX_SUBSCRIBERS", get("MAX_SUBSCRIBERS", "10000"), int, 1),
        viewer_timeout_s=_number("VIEWER_TIMEOUT_S", get("VIEWER_TIMEOUT_S", "60"), float, 1, 86400),
        trusted_proxies=_addresses("TRUSTED_PROXIES", get("TRUSTED_PROXIES", "127.0.0.1,::1")),
        ring_size=_number("RING_SIZE", get("RING_SIZE", "1024"), int, 16, 1 << 20),
        sweep_s=min(1.0, stale / 4),
    )


def init_env_file(path, port=3000):
    """Write a first `.env` with one fresh device key (mode 600); never overwrite one."""
    device, key = "gpu-pc-1", secrets.token_urlsafe(24)
    text = (f"# Written by `make run` on first start. One name:key pair per GPU PC, comma-separated.\n"
            f"DEVICE_KEYS={device}:{key}\nPORT={port}\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return device, key


def agent_command(key, port):
    """Return the agent command line a user runs on a GPU PC for `key`."""
    host = socket.gethostname() or "SERVER"
    return f"python agent.py --url http://{host}:{port}/push-sse --key {key}"


def main(argv):
    """Run `--init-env` (write .env, print agent commands), `--new-key` or `--port`."""
    if "--new-key" in argv:
        print(secrets.token_urlsafe(24))
        return 0
    if "--port" in argv:
        try:
            print(load_config().port)
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        return 0
    if "--init-env" in argv:
        path = HERE / ".env"
        created = init_env_file(path)
        try:
            config = load_config()
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        if created:
            print(f"Wrote {path} with a device key for {created[0]!r}.")
        for key, device in config.device_keys.items():
            print(f"Agent command for {device}:  {agent_command(key, config.port)}")
        if not config.device_keys:
            print("DEVICE_KEYS is empty in .env: add name:key pairs (python config.py --new-key).")
        return 0
    print("usage: python config.py --init-env | --new-key | --port", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

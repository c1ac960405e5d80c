"""Turn `.env` and the environment into one validated server config.

Every setting is one row of SETTINGS: its variable, its default, how its value is read
and what it means. The README's configuration table is printed from it
(`python config.py --settings-table`) and a test checks the two agree.
"""
import ipaddress
import os
import re
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from gpustats.errors import ConfigError  # raised by the package too, which never imports config

HERE = Path(__file__).resolve().parent
DEVICE_KEY = re.compile(r"^[A-Za-z0-9._~+/=-]{16,256}$")


def _number(kind, low, high=None):
    def read(name, raw):
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}: {raw!r} is not a {'whole ' if kind is int else ''}number") from None
        if value != value or value in (float("inf"), float("-inf")) or value < low or (
                high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{name}: {raw!r} is out of range, it must be {bound}")
        return value
    return read


def _text(name, raw):
    return raw


def _addresses(name, raw):
    addresses = tuple(a.strip() for a in raw.split(",") if a.strip())
    for address in addresses:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"{name}: {address!r} is not an IP address") from None
    return addresses


def _origins(name, raw):
    return tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())


def _database(name, raw):
    raw = raw.strip()
    return str(HERE / raw) if raw else ""  # relative to the project, not to wherever gunicorn was started


def _redis_url(name, raw):
    raw = raw.strip()
    if raw and not raw.startswith(("redis://", "rediss://", "unix://")):
        # The URL may hold a password: name its scheme, never the whole of it.
        raise ConfigError(f"{name}: {raw.partition(':')[0]!r} is not redis://, rediss:// or unix://")
    if raw:
        from redis.connection import parse_url  # redis-py's own reading: what it accepts, we accept
        try:
            parse_url(raw)
        except ValueError as problem:
            raise ConfigError(f"{name}: not a Redis URL redis-py can use ({problem})") from None
    return raw


def _password(name, raw):
    if raw and len(raw) < 12:
        raise ConfigError(f"{name}: at least 12 characters (make run writes a random one)")
    return raw


def _secret(name, raw):
    if raw and len(raw) < 32:
        raise ConfigError(f"{name}: at least 32 characters (python config.py --new-key makes one)")
    return raw


def _switch(name, raw):
    if raw.strip() not in ("0", "1"):
        raise ConfigError(f"{name}: {raw!r} must be 1 (on) or 0 (off)")
    return raw.strip() == "1"


def _destinations(name, raw):
    from gpustats.alerts.formats import parse_destinations
    try:
        return parse_destinations(raw)
    except ValueError as problem:  # its message names the entry, never the URL's secret part
        raise ConfigError(f"{name}: {problem}") from None


# RFC 3986's characters less ': the address goes into the shell commands that install the agent
# (issue: a ' in it let the Windows one run iex), so quotes, spaces and the like are refused here too.
URL_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~:/?#[]@!$&()*+,;=%")


def _web_address(name, raw):
    raw = raw.strip().rstrip("/")
    if bad := next((c for c in raw if c not in URL_CHARACTERS), None):
        raise ConfigError(f"{name}: {bad!r} has no place in an address: no quotes, spaces or <>\\^`{{|}}")
    if raw and not re.match(r"^https?://[^\s/]+", raw):
        raise ConfigError(f"{name}: {raw!r} is not an http:// or https:// address")
    return raw


def parse_device_keys(name, raw):
    """Parse `name:key,name2:key2` into {key: name}; a device may have several keys."""
    from gpustats.devices.registry import DEVICE_NAME  # one rule for a device's name, wherever it comes in
    keys = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        device, sep, key = item.partition(":")
        device, key = device.strip(), key.strip()
        if not sep or not DEVICE_NAME.fullmatch(device):
            raise ConfigError(f"{name}: {item.split(':')[0]!r} is not name:key with a name of 1-64 "
                              "letters, digits, '.', '_' or '-', starting with a letter or digit")
        if not DEVICE_KEY.match(key):
            raise ConfigError(f"{name}: the key of {device!r} must be 16 to 256 letters, digits "
                              "or ._~+/=- (make one with: python config.py --new-key)")
        if keys.get(key, device) != device:
            raise ConfigError(f"{name}: {device!r} and {keys[key]!r} share a key; each key is one device's")
        keys[key] = device
    return keys


@dataclass(frozen=True)
class Setting:
    """One environment variable: where it goes in Config, its default, its reader, its meaning."""
    name: str
    field: str
    default: str
    read: object
    meaning: str


SETTINGS = (
    Setting("PORT", "port", "3000", _number(int, 0, 65535),
            "listen port (the Procfile binds `0.0.0.0:$PORT`)"),
    Setting("DEVICE_KEYS", "device_keys", "", parse_device_keys,
            "`name:key,name2:key2`; a device may have several keys. Empty: every push is refused with 401"),
    Setting("ADMIN_PASSWORD", "admin_password", "", _password,
            "the password of the user `admin` when the server first starts (written to `.env` by `make run`; "
            "change it in the page afterwards). Needed unless `DASHBOARD_PUBLIC=1`"),
    Setting("SECRET_KEY", "secret_key", "", _secret,
            "signs session cookies (written to `.env` by `make run`); the same on every host. Empty: a new one "
            "each start (everyone signs in again), refused with `REDIS_URL` or more than one worker"),
    Setting("DASHBOARD_PUBLIC", "dashboard_public", "0", _switch,
            "1: the read-only dashboard, stream, history, alerts and metrics need no sign-in (the original "
            "design); devices, users, links and tokens still need an admin"),
    Setting("DASHBOARD_USER", "dashboard_user", "admin", _text, "an extra viewer login's user name (kept from "
            "earlier versions)"),
    Setting("DASHBOARD_PASSWORD", "dashboard_password", "", _text,
            "an extra viewer login's password, for the form and HTTP Basic (kept from earlier versions); empty: none"),
    Setting("STALE_AFTER_S", "stale_after_s", "15", _number(float, 0.1),
            "a device with no push for this long turns stale"),
    Setting("OFFLINE_AFTER_S", "offline_after_s", "60", _number(float, 0.1),
            "a device with no push for this long turns offline; longer than `STALE_AFTER_S`"),
    Setting("HEARTBEAT_S", "heartbeat_s", "15", _number(float, 0.05, 3600),
            "a stream with nothing to send gets a `: heartbeat` comment at least this often"),
    Setting("HISTORY_S", "history_s", "600", _number(int, 10, 86400),
            "seconds of history the live charts show, and `/api/history`'s range when it names no `from`"),
    Setting("HISTORY_DB", "history_db", "history.sqlite3", _database,
            "the SQLite file history is kept in (30 days of minutes, 400 of hours; a path relative to "
            "`config.py`'s folder). Empty: kept in memory, gone at restart. Not used with `REDIS_URL`"),
    Setting("MAX_BODY_BYTES", "max_body_bytes", "65536", _number(int, 256, 16 << 20), "largest push accepted"),
    Setting("PUSH_RATE_LIMIT", "push_rate_limit", "5", _number(float, 0.01, 100_000),
            "pushes per second one device may send (bursts up to twice that), bad ones included; "
            "more get 429"),
    Setting("PUSH_BODY_TIMEOUT_S", "push_body_timeout_s", "10", _number(float, 0.1, 600),
            "a push whose body stops arriving for this long gets 408 and its connection is closed"),
    Setting("CORS_ORIGINS", "cors_origins", "", _origins,
            "other origins allowed to read the stream and `/healthz` (`*` for any)"),
    Setting("WORKER_CONNECTIONS", "worker_connections", "10000", _number(int, 20, 1_000_000),
            "connections one worker serves at once (`gunicorn.conf.py` hands it to gunicorn); streams "
            "may use at most 90 % of it, so pushes always get in. One address may hold at most 10 % of it "
            "(idle and silent connections included; never fewer than its streams and requests in progress may "
            "take; a trusted proxy apart); from 95 % on, the connections idle longest are closed first"),
    Setting("RESPONSE_TIMEOUT_S", "response_timeout_s", "60", _number(float, 1, 3600),
            "every answer but the stream is cut if it is not delivered within this long: a client that asks and "
            "never reads cannot hold a connection. One address may have at most 1 % of `WORKER_CONNECTIONS` "
            "(8 at least) requests in progress; past that, 429"),
    Setting("MAX_SUBSCRIBERS", "max_subscribers", "9000", _number(int, 1),
            "open streams allowed at once; past it `/gpu/stream` answers 503 with `Retry-After`. "
            "At most 90 % of `WORKER_CONNECTIONS`"),
    Setting("MAX_SUBSCRIBERS_PER_CLIENT", "max_subscribers_per_client", "100", _number(int, 1),
            "open streams allowed from one client address; past it 429 with `Retry-After`"),
    Setting("VIEWER_TIMEOUT_S", "viewer_timeout_s", "60", _number(float, 1, 86400),
            "a viewer that takes no data for this long is dropped (by the kernel, `TCP_USER_TIMEOUT`)"),
    Setting("RING_SIZE", "ring_size", "1024", _number(int, 16, 1 << 20),
            "recent events kept for viewers that reconnect with `Last-Event-ID` or fall behind; "
            "older ones get a fresh snapshot"),
    Setting("REDIS_URL", "redis_url", "", _redis_url,
            "`redis://host:6379/0` (`rediss://` for TLS): workers and hosts share one fleet through Redis "
            "(see Scale out). Empty: one process holds everything, nothing else to run"),
    Setting("WEB_CONCURRENCY", "web_concurrency", "1", _number(int, 1, 256),
            "gunicorn workers (`gunicorn.conf.py` hands it to gunicorn); more than one needs `REDIS_URL`"),
    Setting("ALERT_TEMP_C", "alert_temp_c", "85", _number(float, 0, 250),
            "`GpuHot`: a GPU at or above this temperature (°C) for `ALERT_FOR_S`; 0: off"),
    Setting("ALERT_VRAM_PCT", "alert_vram_pct", "95", _number(float, 0, 100),
            "`GpuMemoryFull`: memory used at or above this share (%) of total for `ALERT_FOR_S`; 0: off"),
    Setting("ALERT_HOST_MEMORY_PCT", "alert_host_memory_pct", "95", _number(float, 0, 100),
            "`HostMemoryFull`: a PC's memory used at or above this share (%) of total for `ALERT_FOR_S`; 0: off"),
    Setting("ALERT_DISK_PCT", "alert_disk_pct", "95", _number(float, 0, 100),
            "`DiskFull`: one of a PC's disks used at or above this share (%) of its size for `ALERT_FOR_S` "
            "(one alert per disk); 0: off"),
    Setting("ALERT_OFFLINE", "alert_offline", "1", _switch, "`DeviceOffline`: a device turns offline; 0: off"),
    Setting("ALERT_GPU_ERROR", "alert_gpu_error", "1", _switch,
            "`GpuError`: a GPU reports an error, or a device reports fewer GPUs than within 6 h; 0: off"),
    Setting("ALERT_JOB_MIN_S", "alert_job_min_s", "900", _number(float, 0),
            "`GpuJobDone`: a GPU busy (50 % or more) at least this long drops under 5 % for `ALERT_FOR_S`; 0: off"),
    Setting("ALERT_IDLE_HELD_MIB", "alert_idle_held_mib", "1024", _number(float, 0, 1 << 24),
            "`GpuIdleHeld`: a process holds at least this much GPU memory (MiB) on a GPU under 5 % (its own "
            "utilization where the agent sends it) for `ALERT_IDLE_HELD_S`; 0: off"),
    Setting("ALERT_IDLE_HELD_S", "alert_idle_held_s", "1800", _number(float, 1, 30 * 86400),
            "how long a process must hold memory idle before `GpuIdleHeld` fires"),
    Setting("ALERT_FOR_S", "alert_for_s", "120", _number(float, 0, 86400),
            "how long a condition must hold before its alert fires, and be false before it resolves"),
    Setting("ALERT_WEBHOOK_URLS", "alert_webhook_urls", "", _destinations,
            "where alerts are sent, comma-separated: `https://...` (Alertmanager webhook JSON), "
            "`ntfy+https://host/topic`, `discord+https://...`, `slack+https://...`. Empty: shown on the page only"),
    Setting("ALERT_DASHBOARD_URL", "alert_dashboard_url", "", _web_address,
            "the dashboard's public address, linked from each notification (`externalURL`); empty: no link"),
    Setting("TRUSTED_PROXIES", "trusted_proxies", "127.0.0.1,::1", _addresses,
            "proxies whose `X-Forwarded-For` gives the client's address (for the bad-key slow-down and "
            "the per-client stream cap)"),
)
# Streams may take at most this share of a worker's connections: the rest is for agents
# (each holds one keep-alive connection), page loads and refused viewers.
STREAM_SHARE = 0.9
# One address may have at most this share of them in requests in progress (streams apart), and
# at least REQUESTS_PER_CLIENT_LEAST: a browser loads a page over 6 connections at once.
REQUEST_SHARE, REQUESTS_PER_CLIENT_LEAST = 0.01, 8
# One address may hold at most this share of them, idle keep-alive and silent ones included, and never
# fewer than its streams and requests in progress may take: a lab behind one NAT holds one keep-alive
# connection per agent, and its browsers their streams.
CONNECTION_SHARE = 0.1


@dataclass(frozen=True)
class Config:
    """The validated settings; built only by load_config, so defaults live in SETTINGS alone."""
    port: int
    device_keys: dict  # key -> device name
    admin_password: str
    secret_key: str  # empty: a new one each start
    dashboard_public: bool
    dashboard_user: str
    dashboard_password: str
    stale_after_s: float
    offline_after_s: float
    heartbeat_s: float
    history_s: int
    history_db: str  # empty: in memory
    max_body_bytes: int
    push_rate_limit: float
    push_body_timeout_s: float
    cors_origins: tuple
    worker_connections: int
    response_timeout_s: float
    max_subscribers: int
    max_subscribers_per_client: int
    viewer_timeout_s: float
    ring_size: int
    redis_url: str
    web_concurrency: int
    alert_temp_c: float
    alert_vram_pct: float
    alert_host_memory_pct: float
    alert_disk_pct: float
    alert_offline: bool
    alert_gpu_error: bool
    alert_job_min_s: float
    alert_idle_held_mib: float
    alert_idle_held_s: float
    alert_for_s: float
    alert_webhook_urls: tuple  # of gpustats.alerts.formats.Destination
    alert_dashboard_url: str
    trusted_proxies: tuple
    sweep_s: float  # derived: how often statuses are checked

    @property
    def max_requests_per_client(self):
        """Return how many requests one address may have in progress at once (streams apart)."""
        return max(REQUESTS_PER_CLIENT_LEAST, int(self.worker_connections * REQUEST_SHARE))

    @property
    def max_connections_per_client(self):
        """Return how many connections one address may hold at once, idle ones included."""
        return max(int(self.worker_connections * CONNECTION_SHARE),
                   self.max_subscribers_per_client + self.max_requests_per_client)

    @property
    def devices(self):
        """Return the device names that have at least one key."""
        return sorted(set(self.device_keys.values()))

    @property
    def alert_settings(self):
        """Return the alert rules' thresholds."""
        from gpustats.alerts.rules import AlertSettings
        return AlertSettings(temp_c=self.alert_temp_c, vram_pct=self.alert_vram_pct, offline=self.alert_offline,
                             gpu_error=self.alert_gpu_error, job_min_s=self.alert_job_min_s, for_s=self.alert_for_s,
                             idle_held_mib=self.alert_idle_held_mib, idle_held_s=self.alert_idle_held_s,
                             host_memory_pct=self.alert_host_memory_pct, disk_pct=self.alert_disk_pct)


def load_config(overrides=None, environ=None):
    """Build the config from .env, the environment (which wins) and then `overrides`."""
    environ = os.environ if environ is None else environ
    env_file = environ.get("ENV_FILE", str(HERE / ".env"))
    values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
    values.update(environ)
    values.update({k: str(v) for k, v in (overrides or {}).items()})
    read = {s.field: s.read(s.name, values.get(s.name, s.default)) for s in SETTINGS}
    read["dashboard_user"] = read["dashboard_user"] or "admin"
    if read["offline_after_s"] <= read["stale_after_s"]:
        raise ConfigError(f"OFFLINE_AFTER_S: {read['offline_after_s']:g} must be longer than "
                          f"STALE_AFTER_S ({read['stale_after_s']:g})")
    if read["web_concurrency"] > 1 and not read["redis_url"]:
        raise ConfigError(f"WEB_CONCURRENCY: {read['web_concurrency']} workers need REDIS_URL to share one fleet; "
                          "set REDIS_URL or run 1 worker")
    most = int(read["worker_connections"] * STREAM_SHARE)
    if read["max_subscribers"] > most:
        raise ConfigError(f"MAX_SUBSCRIBERS: {read['max_subscribers']} leaves too few of WORKER_CONNECTIONS "
                          f"({read['worker_connections']}) for pushes; set it to {most} or less")
    if not read["admin_password"] and not read["dashboard_public"]:
        raise ConfigError("ADMIN_PASSWORD is not set and DASHBOARD_PUBLIC is not 1: set ADMIN_PASSWORD (make run "
                          "writes one to .env) to sign in, or DASHBOARD_PUBLIC=1 for an open read-only dashboard")
    if not read["secret_key"] and (read["redis_url"] or read["web_concurrency"] > 1):
        raise ConfigError("SECRET_KEY: needed with REDIS_URL or more than one worker, the same on every host, so a "
                          "session signed by one is valid on all (python config.py --new-key makes one)")
    return Config(**read, sweep_s=min(1.0, read["stale_after_s"] / 4))


def settings_table():
    """Return the README's configuration table, in Markdown."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if "," in s.default else (s.default or "empty")
        rows.append(f"| `{s.name}` | {default} | {s.meaning} |")
    return "\n".join(rows)


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


def add_secrets(path, environ=None):
    """Append to `.env` the ADMIN_PASSWORD and SECRET_KEY it lacks, fresh and random (mode 600); return the password written, or None.

    A value set in the environment counts as there; nothing already in the file is changed.
    """
    environ = os.environ if environ is None else environ
    kept = {k for k, v in dotenv_values(path).items() if v} | {k for k, v in environ.items() if v}
    password = secrets.token_urlsafe(15) if "ADMIN_PASSWORD" not in kept else None
    lines = ([f"ADMIN_PASSWORD={password}"] if password else []) + (
        [f"SECRET_KEY={secrets.token_urlsafe(32)}"] if "SECRET_KEY" not in kept else [])
    if not lines:
        return None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        os.fchmod(f.fileno(), 0o600)  # it holds a password now, whatever its mode was
        if f.tell() and not Path(path).read_bytes().endswith(b"\n"):
            f.write("\n")
        f.write("# Written by `make run`: the admin's first password, and the key that signs sessions.\n")
        f.write("\n".join(lines) + "\n")
    return password


def agent_env(key, port):
    """Return the `.env` lines that point an agent at this server with `key`.

    In a file only its owner reads, not on the command line, where `ps` shows it to every user.
    """
    host = socket.gethostname() or "SERVER"
    return f"PUSH_URL=http://{host}:{port}/push-sse\nDEVICE_KEY={key}"


def main(argv):
    """Run `--init-env` (write .env, print agent commands), `--new-key`, `--port`, `--settings-table`, or a store command."""
    if "--new-key" in argv:
        from gpustats.tokens import new_secret
        print(new_secret())
        return 0
    if "--settings-table" in argv:
        print(settings_table())
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
        password = add_secrets(path)
        try:
            config = load_config()
        except ConfigError as error:
            print(f"config error: {error}", file=sys.stderr)
            return 2
        host = socket.gethostname() or "SERVER"
        # A key is printed once, when it is made: a 40-PC DEVICE_KEYS printed 120 lines at every start (issue 30).
        if created:
            device, key = created
            print(f"Wrote {path} with a device key for {device!r}. On that GPU PC: copy agent.py beside a .env "
                  "holding the two lines below (chmod 600 .env), then run: python agent.py")
            print("\n".join(f"    {line}" for line in agent_env(key, config.port).splitlines()))
        if password:
            print(f"Sign in at http://{host}:{config.port}/ as admin, password {password}\n"
                  "  (shown this once: it is ADMIN_PASSWORD in .env; change it in the page once signed in)")
        else:
            print(f"Sign in at http://{host}:{config.port}/ (add PCs on its Devices page, /devices)")
        return 0
    if {"--add-device", "--remove-device", "--list-devices"} & set(argv):
        from gpustats.devices.commands import devices_command as command
    elif {"--add-user", "--add-token", "--list-users"} & set(argv):
        from gpustats.access.commands import accounts_command as command
    else:
        print("usage: python config.py --init-env | --new-key | --port | --settings-table | --add-user NAME --role "
              "admin|viewer | --add-token NAME --role admin|viewer | --list-users | --add-device NAME | "
              "--remove-device NAME | --list-devices", file=sys.stderr)
        return 2
    try:  # the commands that open the running server's stores live with the capability they manage
        return command(argv, load_config())
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What the store commands share (`python config.py --add-device NAME` and the like): a flag's value, and the store."""
import sqlite3

from gpustats.errors import ConfigError


def option(argv, flag, default=None):
    """Return the value that follows `flag` in `argv`, or `default` when the flag is not there."""
    if flag not in argv:
        return default
    at = argv.index(flag) + 1
    if at >= len(argv) or argv[at].startswith("--"):
        raise ConfigError(f"{flag} needs a value")
    return argv[at]


def open_store(config, what, in_redis, in_sqlite):
    """Return the running server's store of `what`: in_redis(its Redis client), or in_sqlite(its SQLite file)."""
    if config.redis_url:
        from gpustats.scaleout import SharedRedis
        return in_redis(SharedRedis(config.redis_url).client)
    if not config.history_db:
        raise ConfigError(f"HISTORY_DB is empty: {what} live in the server's memory alone; set HISTORY_DB or REDIS_URL")
    try:
        return in_sqlite(config.history_db)
    except sqlite3.Error as problem:  # one line, as the server says it at start, never a traceback
        raise ConfigError(f"HISTORY_DB: cannot use {config.history_db} as the history database: {problem}") from None

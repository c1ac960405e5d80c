"""gunicorn reads this file from its working directory: settings that must come from config.py.

The Procfile's shell sees only the real environment, so a value in `.env` would never
reach a command-line flag. Here gunicorn gets the same workers and connections that the
app checks its limits against, wherever they were set, and a bad setting stops the
server here, once, with one line, before any worker starts.
"""
import sys

from config import ConfigError, load_config

try:
    _config = load_config()
except ConfigError as problem:
    sys.exit(f"config error: {problem}")  # SystemExit passes gunicorn's config loader: no traceback

workers = _config.web_concurrency
worker_connections = _config.worker_connections
# With several workers, each binds its own SO_REUSEPORT socket and the kernel spreads new
# connections evenly over them. On one shared socket gevent workers took viewers about 2:1
# (686 and 1,314 of 2,000, measured), so one worker carried twice its share.
reuse_port = workers > 1
# An agent pushes every 2 s on one keep-alive connection. gunicorn's default keep-alive is 2 s,
# so it closed each agent's connection just about as the next push went out on it: a reset,
# and that push lost to the agent's backoff (make bench BENCH_ARGS=--ingest-fleet counts them).
# nginx keeps idle connections 75 s.
keepalive = 75


def worker_exit(server, worker):
    """Write what is still queued when a worker stops (a deploy, a restart): a second of history, the alerts' state, counts."""
    parts = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("gpustats", {})
    for name in ("history", "alerter", "counters"):
        if name in parts:
            try:
                parts[name].flush()
            except Exception:  # noqa: BLE001 the worker is going anyway; say so, never hang it
                server.log.exception("the last %s write failed", name)

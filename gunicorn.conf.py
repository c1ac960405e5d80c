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
# connections evenly over them. On one shared socket gevent workers took viewers unevenly, and
# one worker carried about twice its share (docs/PERFORMANCE.md).
reuse_port = workers > 1
# An agent pushes every 2 s on one keep-alive connection. gunicorn's default keep-alive is 2 s,
# so it closed each agent's connection just about as the next push went out on it: a reset,
# and that push lost to the agent's backoff (make bench BENCH_ARGS=--ingest-fleet counts them).
# nginx keeps idle connections 75 s. One address may hold only its share of the pool, and the
# connections idle longest are closed first when it runs low (post_worker_init, below).
keepalive = 75


def post_worker_init(worker):
    """Have the app count each connection the worker accepts, before any request (gpustats/access/connections.py).

    The gevent worker binds `handle` to its listening socket after this hook and calls it once
    per connection: a WSGI middleware alone never sees a connection that sends nothing.
    """
    from gunicorn.workers.base_async import AsyncWorker  # gthread's handle takes other arguments
    connections = getattr(worker.wsgi, "extensions", {}).get("gpustats", {}).get("connections")
    if connections is not None and isinstance(worker, AsyncWorker):
        worker.handle = connections.guard(worker.handle)


def worker_exit(server, worker):
    """Write what is still queued when a worker stops (a deploy, a restart): a second of history and jobs, the alerts' state, counts."""
    parts = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("gpustats", {})
    for name in ("history", "jobs", "alerter", "counters"):
        if name in parts:
            try:
                parts[name].flush()
            except Exception:  # noqa: BLE001 the worker is going anyway; say so, never hang it
                server.log.exception("the last %s write failed", name)

"""The GPU Stats Dashboard server: an app factory that wires config, fleet and broadcaster."""
import logging
import resource
import signal
import socket
import sys
import time
from types import SimpleNamespace

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from alerter import Alerter, SavedState, SqliteOutbox
from alerts import AlertBoard
from auth import DeviceKeys, client_address, viewer_allowed
from broadcaster import Broadcaster, ViewerLimit
from config import ConfigError, load_config
from counters import Counters
from fleet import Fleet, Unavailable
from history_api import register_history
from history_sqlite import SqliteHistory
from ingest import BAD_KEYS_BURST, BAD_KEYS_PER_S, error, register_ingest
from limits import ClientLimits
from metrics import register_metrics
from notify import MemoryOutbox, Sender
from pages import register_pages
from ratelimit import RateLimiter
from viewer_socket import viewer_socket

log = logging.getLogger("gpustats")
OPEN_ROUTES = {"/healthz", "/push-sse"}


def create_app(overrides=None):
    """Build an isolated app from the environment plus `overrides` (a dict of settings)."""
    config = load_config(overrides)
    app = Flask(__name__)
    parts = _parts(config)
    fleet, history = parts.fleet, parts.history
    broadcaster = Broadcaster(fleet.snapshot, ring_size=config.ring_size, heartbeat_s=config.heartbeat_s,
                              max_subscribers=config.max_subscribers,
                              max_per_client=config.max_subscribers_per_client, shared_ids=fleet.shared_ids)
    keys = DeviceKeys(config.device_keys)
    started = time.monotonic()
    app.extensions["gpustats"] = {"config": config, "broadcaster": broadcaster, **vars(parts)}
    if not keys:
        log.warning("DEVICE_KEYS is empty, so every push is refused with 401. Add a device with "
                    "DEVICE_KEYS=name:key in .env (make a key with: python config.py --new-key)")

    @app.before_request
    def require_viewer_login():
        if not config.dashboard_password or request.path in OPEN_ROUTES:
            return None
        if viewer_allowed(request.headers.get("Authorization"), config.dashboard_user,
                          config.dashboard_password):
            return None
        # JSON like every other error (a browser still gets its login prompt from the header).
        return error(401, "login required: send the viewer login (HTTP Basic, DASHBOARD_USER and DASHBOARD_PASSWORD)",
                     headers={"WWW-Authenticate": 'Basic realm="GPU Stats"'})

    @app.after_request
    def allow_origins(response):
        origin = request.headers.get("Origin")
        if origin and request.path in ("/gpu/stream", "/healthz") and (
                "*" in config.cors_origins or origin.rstrip("/") in config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response

    @app.errorhandler(HTTPException)
    def http_error(problem):
        headers = {k: v for k, v in problem.get_headers() if k.lower() != "content-type"}
        return error(problem.code, problem.description, headers=headers)

    @app.errorhandler(Unavailable)
    def unavailable(problem):
        return error(503, f"the shared store (Redis) is {problem.reason}; try again shortly",
                     headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def server_error(problem):
        log.exception("internal error on %s %s", request.method, request.path)
        return error(500, "internal server error; the server's log has the details")

    @app.get("/gpu/stream")
    def stream():
        address = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                                 config.trusted_proxies)
        devices = request.args.get("device")
        devices = {d.strip() for d in devices.split(",") if d.strip()} if devices else None
        _drop_when_stuck(request.environ.get("gunicorn.socket"), config.viewer_timeout_s)
        try:
            chunks = broadcaster.subscribe(devices, request.headers.get("Last-Event-ID"), client=address,
                                           viewer_socket=viewer_socket(request.environ))
        except ViewerLimit as refused:
            return error(refused.status, str(refused), headers={"Retry-After": "5"})
        # direct_passthrough hands gunicorn the generator itself: no per-event wrapper layers.
        return Response(chunks, content_type="text/event-stream", direct_passthrough=True, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz")
    def healthz():
        counts = fleet.counts()
        return jsonify(ok=True, devices=sum(counts.values()), **counts,
                       subscribers=broadcaster.subscribers, **fleet.health(),
                       uptimeS=round(time.monotonic() - started, 1))

    @app.get("/api/alerts")
    def alerts():
        return jsonify(fleet.alerts())

    register_ingest(app, config, keys, fleet, broadcaster, parts.push_limits, parts.bad_key_limits, parts.counters)
    register_history(app, config, history)
    register_metrics(app, fleet, parts.counters)
    register_pages(app, config)
    # Outside Flask, around everything: a refusal costs no routing, and the deadline covers the write.
    app.wsgi_app = ClientLimits(app.wsgi_app, config.response_timeout_s, config.max_requests_per_client,
                                config.trusted_proxies)
    fleet.start(broadcaster, config.sweep_s)
    parts.counters.start(lambda: broadcaster.subscribers)
    for part in (history, parts.alerter, parts.sender):
        part.start()
    return app


def _parts(config):
    """Choose the fleet, history, alerts, counters and rate limits: in this process, or shared through Redis."""
    destinations = config.alert_webhook_urls
    if config.redis_url:
        from alerter_redis import RedisAlerter
        from counters_redis import RedisCounters
        from fleet_redis import RedisFleet
        from history_redis import RedisHistory
        from outbox_redis import NotifierLease, RedisOutbox
        fleet = RedisFleet(config.redis_url, config.stale_after_s, config.offline_after_s, config.ring_size)
        status = fleet.status  # every part says what Redis refused there; /healthz reads it
        outbox, counters = RedisOutbox(fleet.client, destinations), RedisCounters(fleet.client, status=status)
        return SimpleNamespace(
            fleet=fleet, history=RedisHistory(fleet.client, config.stale_after_s, status=status),
            alerter=RedisAlerter(fleet.client, config.alert_settings, outbox, config.ring_size, status=status),
            sender=Sender(destinations, outbox, config.alert_dashboard_url, lease=NotifierLease(fleet.client),
                          counters=counters),
            counters=counters,
            push_limits=fleet.rate_limiter("push", config.push_rate_limit, counted_as="pushes"),
            bad_key_limits=fleet.rate_limiter("bad-key", BAD_KEYS_PER_S, burst=BAD_KEYS_BURST,
                                              counted_as="bad-key checks"))
    history = SqliteHistory(config.history_db, config.stale_after_s)
    state, board, counters = SavedState(config.history_db), AlertBoard(), Counters()
    outbox = SqliteOutbox(destinations, state) if state else MemoryOutbox(destinations)
    alerter = Alerter(config.alert_settings, board, outbox, state)
    return SimpleNamespace(
        fleet=Fleet(config.stale_after_s, config.offline_after_s, history, alerter, board), history=history,
        alerter=alerter, sender=Sender(destinations, outbox, config.alert_dashboard_url, counters=counters),
        counters=counters,
        push_limits=RateLimiter(config.push_rate_limit),
        bad_key_limits=RateLimiter(BAD_KEYS_PER_S, burst=BAD_KEYS_BURST))


def _drop_when_stuck(sock, timeout_s):
    """Have the kernel abort a viewer that acknowledges no data for `timeout_s`.

    TCP_USER_TIMEOUT also ends a peer that keeps a zero window (never reads). A socket
    timeout would do it in user space, but costs 6 us per delivered event under gevent.
    """
    if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout_s * 1000))
        except OSError:
            pass  # the viewer is gone already; its first write ends the stream


def wsgi_app():
    """Build the app for gunicorn; a bad setting exits with one line naming it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    try:
        app = create_app()
    except ConfigError as problem:
        log.error("config error: %s", problem)
        sys.exit(4)  # gunicorn's "App failed to load": it stops instead of respawning.
    _allow_open_files(app.extensions["gpustats"]["config"].worker_connections)
    # History reads run in OS threads (offload.py) beside the event loop's thread. When both want
    # the GIL, the loop's thread waits up to a switch interval each time it takes it back, after
    # every socket call: 5 ms by default. 1 ms bounds that wait (CPython issue 7946, the convoy).
    sys.setswitchinterval(0.001)
    parts = app.extensions["gpustats"]
    _end_streams_on_sigterm(*(parts[name] for name in ("broadcaster", "fleet", "history", "alerter", "sender", "counters")))
    return app


def _allow_open_files(connections):
    """Raise the soft open-files limit so the worker can hold WORKER_CONNECTIONS sockets.

    systemd and most shells start services with a soft limit of 1,024: far below the pool,
    so accept() would fail long before MAX_SUBSCRIBERS. The hard limit is usually higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64  # the listening socket, logs and Python's own files
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning("the open-files limit (ulimit -n) is %d, below WORKER_CONNECTIONS (%d): raise it "
                    "(LimitNOFILE= in a systemd unit) or lower WORKER_CONNECTIONS", raised, connections)


def _end_streams_on_sigterm(broadcaster, *background):
    """On SIGTERM, end every stream and the background work, then let gunicorn's handler run.

    Streams never finish by themselves, so without this a deploy would wait out the
    whole --graceful-timeout. gunicorn installs its handler before loading the app.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        broadcaster.close()
        for part in background:
            part.close()  # each only sets a flag: safe in a signal handler
        if callable(previous):
            previous(signum, frame)
    signal.signal(signal.SIGTERM, handler)

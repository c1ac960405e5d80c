"""The GPU Stats Dashboard server: an app factory that wires config, fleet and broadcaster."""
import logging
import signal
import socket
import sys
import threading
import time

from flask import Flask, Response, jsonify, request

import payload
from auth import DeviceKeys, client_address, presented_key, viewer_allowed
from broadcaster import Broadcaster
from config import ConfigError, load_config
from fleet import Fleet
from pages import register_pages
from ratelimit import RateLimiter

log = logging.getLogger("gpustats")
OPEN_ROUTES = {"/healthz", "/push-sse"}
# Bad keys from one address: 10 at once, then one every 6 s; past that, 429 before any check.
BAD_KEYS_BURST, BAD_KEYS_PER_S = 10, 1 / 6


def create_app(overrides=None):
    """Build an isolated app from the environment plus `overrides` (a dict of settings)."""
    config = load_config(overrides)
    app = Flask(__name__)
    fleet = Fleet(config.stale_after_s, config.offline_after_s, config.history_s)
    broadcaster = Broadcaster(fleet.snapshot, ring_size=config.ring_size, heartbeat_s=config.heartbeat_s)
    keys, limiter = DeviceKeys(config.device_keys), RateLimiter(config.push_rate_limit)
    bad_keys = RateLimiter(BAD_KEYS_PER_S, burst=BAD_KEYS_BURST)
    started = time.monotonic()
    app.extensions["gpustats"] = {"config": config, "fleet": fleet, "broadcaster": broadcaster}
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
        return Response("Login required.\n", 401, {"WWW-Authenticate": 'Basic realm="GPU Stats"'})

    @app.after_request
    def allow_origins(response):
        origin = request.headers.get("Origin")
        if origin and request.path in ("/gpu/stream", "/healthz") and (
                "*" in config.cors_origins or origin.rstrip("/") in config.cors_origins):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        return response

    @app.post("/push-sse")
    def push():
        address = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                                 config.trusted_proxies)
        wait = bad_keys.blocked_for(address)
        if wait:
            return _error(429, "too many bad device keys from this address", headers={"Retry-After": str(wait)})
        key = presented_key(request.headers)
        device = keys.device_for(key) if key else None
        if device is None:
            bad_keys.take(address)
            reason = ("no device keys are configured on this server (DEVICE_KEYS)" if not keys
                      else "unknown device key" if key
                      else "missing device key: send Authorization: Bearer <key>")
            return _error(401, reason, headers={"WWW-Authenticate": "Bearer"})
        if request.mimetype != "application/json":
            return _error(415, f"Content-Type must be application/json, not {request.mimetype or 'missing'!r}")
        if (request.content_length or 0) > config.max_body_bytes:
            return _too_large(config.max_body_bytes)
        body = request.stream.read(config.max_body_bytes + 1)
        if len(body) > config.max_body_bytes:
            return _too_large(config.max_body_bytes)
        try:
            push = payload.validate(payload.decode(body))
        except payload.PushError as error:
            return _error(400, str(error), field=error.field)
        wait = limiter.take(device)
        if wait:
            return _error(429, f"{device} pushes faster than {config.push_rate_limit:g}/s",
                          headers={"Retry-After": str(wait)})
        event_id = broadcaster.publish(device, fleet.record(device, push))
        return jsonify(ok=True, device=device, id=event_id)

    @app.get("/gpu/stream")
    def stream():
        if broadcaster.subscribers >= config.max_subscribers:
            return _error(503, "too many viewers are connected; try again shortly",
                          headers={"Retry-After": "5"})
        devices = request.args.get("device")
        devices = {d.strip() for d in devices.split(",") if d.strip()} if devices else None
        _drop_when_stuck(request.environ.get("gunicorn.socket"), config.viewer_timeout_s)
        chunks = broadcaster.subscribe(devices, request.headers.get("Last-Event-ID"))
        # direct_passthrough hands gunicorn the generator itself: no per-event wrapper layers.
        return Response(chunks, content_type="text/event-stream", direct_passthrough=True, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/healthz")
    def healthz():
        counts = fleet.counts()
        return jsonify(ok=True, devices=sum(counts.values()), **counts,
                       subscribers=broadcaster.subscribers,
                       uptimeS=round(time.monotonic() - started, 1))

    register_pages(app, config)
    _start_status_watch(fleet, broadcaster, config.sweep_s)
    return app


def _start_status_watch(fleet, broadcaster, period_s):
    """Publish `event: status` when a device turns stale or offline, with no push needed."""
    def watch():
        while True:
            time.sleep(period_s)
            for device, change in fleet.sweep():
                broadcaster.publish(device, change, event="status")

    threading.Thread(target=watch, name="status-watch", daemon=True).start()


def _drop_when_stuck(sock, timeout_s):
    """Have the kernel abort a viewer that acknowledges no data for `timeout_s`.

    TCP_USER_TIMEOUT also ends a peer that keeps a zero window (never reads). A socket
    timeout would do it in user space, but costs 6 us per delivered event under gevent.
    """
    if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout_s * 1000))


def _error(status, message, field=None, headers=None):
    body = {"ok": False, "error": message}
    if field:
        body["field"] = field
    return jsonify(body), status, headers or {}


def _too_large(limit):
    # Answered before the body is read; gunicorn then discards the rest as it streams in.
    return _error(413, f"body is larger than MAX_BODY_BYTES ({limit} bytes)")


def wsgi_app():
    """Build the app for gunicorn; a bad setting exits with one line naming it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    try:
        app = create_app()
    except ConfigError as error:
        log.error("config error: %s", error)
        sys.exit(4)  # gunicorn's "App failed to load": it stops instead of respawning.
    _end_streams_on_sigterm(app.extensions["gpustats"]["broadcaster"])
    return app


def _end_streams_on_sigterm(broadcaster):
    """On SIGTERM, end every stream at once, then let gunicorn's own handler run.

    Streams never finish by themselves, so without this a deploy would wait out the
    whole --graceful-timeout. gunicorn installs its handler before loading the app.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        broadcaster.close()
        if callable(previous):
            previous(signum, frame)
    signal.signal(signal.SIGTERM, handler)

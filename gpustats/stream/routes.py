"""GET /gpu/stream: Server-Sent Events for every viewer, through the broadcaster, and the origins allowed to read it."""
import re
import socket

from flask import Response, request

from gpustats.stream.broadcaster import ViewerLimit
from gpustats.stream.viewer_socket import viewer_socket
from gpustats.web import allowed_devices, error, requester_key

CORS_PATHS = ("/gpu/stream", "/healthz")
# Set in the environ of a request answered with a real stream: access/client_limits.py lifts the answer
# deadline for it alone, not for this path's 401, 405 or 429, which a client could pipeline and never read.
STREAMING = "gpustats.streaming"
EVERY = re.compile(r"[0-9]{1,2}", re.ASCII)
MOST_EVERY_S = 10  # within 3/4 of the default HEARTBEAT_S: a heartbeat due sooner is a write of its own


def register_stream(app, config, broadcaster):
    """Add `GET /gpu/stream`, and let CORS_ORIGINS read it and /healthz."""

    @app.after_request
    def allow_origins(response):
        # As the Fetch standard has it: an origin named in CORS_ORIGINS may read with its credentials
        # (its own origin echoed, and Allow-Credentials); `*` lets any origin read without them.
        origin = request.headers.get("Origin")
        if not origin or request.path not in CORS_PATHS:
            return response
        if origin.rstrip("/") in config.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.add("Vary", "Origin")
        elif "*" in config.cors_origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    @app.get("/gpu/stream")
    def stream():
        address = requester_key(config.trusted_proxies)
        devices = request.args.get("device")
        devices = {d.strip() for d in devices.split(",") if d.strip()} if devices else None
        every = request.args.get("every")
        if every is not None:
            if not EVERY.fullmatch(every) or not 1 <= int(every) <= MOST_EVERY_S:
                return error(400, f"every must be a whole number of seconds from 1 to {MOST_EVERY_S}", field="every")
            every = int(every)
        if allowed_devices() is not None:  # a share link: its devices, and within them what was asked
            devices = set(allowed_devices()) & devices if devices is not None else set(allowed_devices())
        _drop_when_stuck(request.environ.get("gunicorn.socket"), config.viewer_timeout_s)
        try:
            chunks = broadcaster.subscribe(devices, request.headers.get("Last-Event-ID"), client=address,
                                           viewer_socket=viewer_socket(request.environ), every=every)
        except ViewerLimit as refused:
            return error(refused.status, str(refused), headers={"Retry-After": "5"})
        request.environ[STREAMING] = True
        # direct_passthrough hands gunicorn the generator itself: no per-event wrapper layers.
        return Response(chunks, content_type="text/event-stream", direct_passthrough=True, headers={
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _drop_when_stuck(sock, timeout_s):
    """Have the kernel abort a viewer that acknowledges no data for `timeout_s`.

    TCP_USER_TIMEOUT also ends a peer that keeps a zero window (never reads). A socket
    timeout would do it in user space, at a cost per delivered event under gevent (docs/PERFORMANCE.md).
    """
    if sock is not None and hasattr(socket, "TCP_USER_TIMEOUT"):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout_s * 1000))
        except OSError:
            pass  # the viewer is gone already; its first write ends the stream

"""POST /push-sse: authenticate, rate-limit, read and check a push, then commit it whole or not at all."""
import logging
import socket

import orjson
from flask import request
from gunicorn.http.errors import ParseException

from gpustats.access.keys import presented_key
from gpustats.ingest import payload
from gpustats.tokens import digest
from gpustats.web import error, requester_key

log = logging.getLogger("gpustats")
# Bad keys from one address: 10 at once, then one every 6 s; past that, 429 before any check.
BAD_KEYS_BURST, BAD_KEYS_PER_S = 10, 1 / 6


class BodyError(Exception):
    """A body that could not be read whole; `status` is the HTTP answer to give."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def register_ingest(app, config, registry, fleet, push_limits, bad_key_limits, counters):
    """Add `POST /push-sse`, with its per-device rate limit and per-address bad-key slow-down."""

    @app.after_request
    def count_push(response):
        # Here, not in push(): a 503 (Redis down) or a 500 is answered by the app's error handlers.
        if request.endpoint == "push" and request.method == "POST":  # not a CORS preflight
            counters.add("pushes", response.status_code)
        return response

    @app.post("/push-sse")
    def push():
        key = presented_key(request.headers)
        device = registry.device_for(key) if key else None
        if device is None:
            address = requester_key(config.trusted_proxies)
            # Only bad keys are slowed: a valid agent behind the same address (a NAT, a proxy
            # missing from TRUSTED_PROXIES) is never held up by another's guesses.
            wait = bad_key_limits.blocked_for(address)
            if wait:
                return error(429, "too many bad device keys from this address", headers={"Retry-After": str(wait)})
            bad_key_limits.take(address)
            reason = ("no devices are set up on this server yet (add one on its Devices page)" if not registry
                      else "unknown device key" if key
                      else "missing device key: send Authorization: Bearer <key>")
            # Shown nowhere but here: a removed key still in use, or a PC set up wrong. Never the key itself,
            # and at most the bad-key slow-down's share a minute from one address.
            log.info("refused a push from %s: %s%s", address, reason,
                     f" (its digest begins {digest(key)[:8]})"
                     if key else "")
            return error(401, reason, headers={"WWW-Authenticate": "Bearer"})
        # Every authenticated push counts, a refused one too: a key cannot send junk without limit.
        wait = push_limits.take(device)
        if wait:
            return error(429, f"{device} pushes faster than {config.push_rate_limit:g}/s",
                         headers={"Retry-After": str(wait)})
        if request.mimetype != "application/json":
            return error(415, f"Content-Type must be application/json, not {request.mimetype or 'missing'!r}")
        try:
            body = read_body(request, config.max_body_bytes, config.push_body_timeout_s)
            if registry.device_for(key) != device:  # removed while its body arrived: it must not come back
                return error(401, "unknown device key", headers={"WWW-Authenticate": "Bearer"})
            # All that can fail happens before anything is stored: a push changes all or nothing.
            event_id = fleet.accept(device, payload.parse(body))
        except BodyError as problem:
            return error(problem.status, str(problem), field="body")
        except payload.PushError as problem:
            return error(400, str(problem), field=problem.field)
        except ValueError:  # validation lets nothing unsendable through; this is the last guard
            return error(400, "body: holds text or numbers that cannot be sent on", field="body")
        return accepted(device, event_id)

    def accepted(device, event_id):
        """The 200 answer, encoded by hand: jsonify's provider machinery cost a push as much as its validation."""
        body = b'{"device":%s,"id":%s,"ok":true}\n' % (orjson.dumps(device), orjson.dumps(event_id))
        return app.response_class(body, mimetype="application/json")


def read_body(request, limit, timeout_s):
    """Return the whole body, or raise BodyError: too large, cut short, stalled or unreadable."""
    expected = request.content_length
    if expected is not None and expected > limit:
        # Answered before the body is read; gunicorn then discards the rest as it streams in.
        raise BodyError(413, f"body is larger than MAX_BODY_BYTES ({limit} bytes)")
    sock = request.environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(timeout_s)  # between two reads, like nginx's client_body_timeout
    try:
        body = request.stream.read(limit + 1)
    except TimeoutError:
        _stop_reading(sock)
        raise BodyError(408, f"the body stopped arriving for {timeout_s:g} s (PUSH_BODY_TIMEOUT_S)") from None
    except (OSError, ParseException) as broken:  # a reset connection; a bad chunked body
        _stop_reading(sock)
        raise BodyError(400, f"body could not be read ({type(broken).__name__})") from None
    finally:
        if sock is not None:
            sock.settimeout(previous)
    if len(body) > limit:
        raise BodyError(413, f"body is larger than MAX_BODY_BYTES ({limit} bytes)")
    if expected is not None and len(body) < expected:
        # gunicorn marks its input as terminated, so nothing else checks the length.
        raise BodyError(400, f"body: ended after {len(body)} of the {expected} bytes its Content-Length announced")
    return body


def _stop_reading(sock):
    """Stop reading a broken request, so gunicorn closes the connection instead of waiting on it."""
    try:
        sock.shutdown(socket.SHUT_RD)
    except (AttributeError, OSError):
        pass  # no socket (the test client), or it is gone already



"""POST /push-sse: authenticate, rate-limit, read and check a push, then commit it whole or not at all.

The route is a plain WSGI callable in front of the Flask app (docs/PERFORMANCE.md, "Pushes"):
Flask's request and response objects, its hooks and its session cost a push a third of its CPU.
It answers as the app would, its JSON errors, status lines and headers included; every other
method on the path (a 405, an OPTIONS) and every other path go to Flask unchanged.
"""
import logging
import socket

import orjson
from flask import request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import HTTPException
from werkzeug.http import HTTP_STATUS_CODES, parse_options_header
from werkzeug.wrappers import Response
from werkzeug.wsgi import get_content_length, get_input_stream

from gpustats.access.keys import presented_key
from gpustats.ingest import payload
from gpustats.scaleout import Unavailable
from gpustats.tokens import digest
from gpustats.web import INTERNAL_ERROR, SECURITY_HEADERS, UNAVAILABLE, client_key, error_body

log = logging.getLogger("gpustats")
PATH = "/push-sse"
# Bad keys from one address: 10 at once, then one every 6 s; past that, 429 before any check.
BAD_KEYS_BURST, BAD_KEYS_PER_S = 10, 1 / 6
# werkzeug's status lines (its reason phrases in capitals), so an answer reads as Flask's did.
STATUS = {code: f"{code} {reason.upper()}" for code, reason in HTTP_STATUS_CODES.items()}
AFTER = tuple(SECURITY_HEADERS.items())  # what pages.py's after_request adds to every answer


class BodyError(Exception):
    """A body that could not be read whole; `status` is the HTTP answer to give."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def register_ingest(app, config, registry, fleet, push_limits, bad_key_limits, counters):
    """Serve `POST /push-sse` in front of the app, with its per-device rate limit and per-address bad-key slow-down."""
    route = PushRoute(app.wsgi_app, config, registry, fleet, push_limits, bad_key_limits, counters)

    # Flask keeps the rule, so its router answers the path's other methods as before (405 with
    # Allow, OPTIONS); a POST that reaches it by another spelling of the path is answered here.
    @app.post(PATH)
    def push():
        return Response.from_app(route.answer, request.environ)
    app.wsgi_app = route


class PushRoute:
    """WSGI: answer `POST /push-sse`; hand every other request to `app`."""

    def __init__(self, app, config, registry, fleet, push_limits, bad_key_limits, counters):
        self._app, self._config, self._registry, self._fleet = app, config, registry, fleet
        self._push_limits, self._bad_key_limits, self._counters = push_limits, bad_key_limits, counters

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != PATH or environ.get("REQUEST_METHOD") != "POST":
            return self._app(environ, start_response)
        return self.answer(environ, start_response)

    def answer(self, environ, start_response):
        """Answer a push, and count its answer's status (what /metrics and /healthz read)."""
        try:
            status, body, headers = self._push(environ)
        except Unavailable as problem:  # Redis down: as the app's error handler answers it
            status, body, headers = 503, error_body(UNAVAILABLE.format(problem.reason)), (("Retry-After", "5"),)
        except HTTPException as problem:
            status, body = problem.code, error_body(problem.description)
            headers = tuple((k, v) for k, v in problem.get_headers() if k.lower() != "content-type")
        except Exception:
            log.exception("internal error on %s %s", "POST", PATH)
            status, body, headers = 500, error_body(INTERNAL_ERROR), ()
        self._counters.add("pushes", status)
        start_response(STATUS[status], [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                                        *headers, *AFTER])
        return [body]

    def _address(self, environ):
        """The pushing client's address, as requester_key() gives it inside the app."""
        return client_key(environ.get("REMOTE_ADDR"), environ.get("HTTP_X_FORWARDED_FOR"), self._config.trusted_proxies)

    def _push(self, environ):
        """Return (status, body, extra headers) for a push."""
        config, registry = self._config, self._registry
        key = presented_key(environ.get("HTTP_AUTHORIZATION", ""), environ.get("HTTP_X_API_KEY", ""))
        device = registry.device_for(key) if key else None
        if device is None:
            address = self._address(environ)
            # Only bad keys are slowed: a valid agent behind the same address (a NAT, a proxy
            # missing from TRUSTED_PROXIES) is never held up by another's guesses.
            wait = self._bad_key_limits.blocked_for(address)
            if wait:
                return _error(429, "too many bad device keys from this address", headers=(("Retry-After", str(wait)),))
            self._bad_key_limits.take(address)
            reason = ("no devices are set up on this server yet (add one on its Devices page)" if not registry
                      else "unknown device key" if key
                      else "missing device key: send Authorization: Bearer <key>")
            return _refused_key(address, reason, key)
        # Every authenticated push counts, a refused one too: a key cannot send junk without limit.
        wait = self._push_limits.take(device)
        if wait:
            return _error(429, f"{device} pushes faster than {config.push_rate_limit:g}/s",
                          headers=(("Retry-After", str(wait)),))
        mimetype = _mimetype(environ.get("CONTENT_TYPE", ""))
        if mimetype != "application/json":
            return _error(415, f"Content-Type must be application/json, not {mimetype or 'missing'!r}")
        try:
            body = read_body(environ, config.max_body_bytes, config.push_body_timeout_s)
            if registry.device_for(key) != device:  # removed while its body arrived: it must not come back
                return _refused_key(self._address(environ), "unknown device key", key)
            # All that can fail happens before anything is stored: a push changes all or nothing.
            event_id = self._fleet.accept(device, payload.parse(body))
        except BodyError as problem:
            return _error(problem.status, str(problem), field="body")
        except payload.PushError as problem:
            return _error(400, str(problem), field=problem.field)
        except ValueError:  # validation lets nothing unsendable through; this is the last guard
            return _error(400, "body: holds text or numbers that cannot be sent on", field="body")
        # Encoded by hand: jsonify's provider machinery cost a push as much as its validation.
        return 200, b'{"device":%s,"id":%s,"ok":true}\n' % (orjson.dumps(device), orjson.dumps(event_id)), ()


def _error(status, message, field=None, headers=()):
    return status, error_body(message, field), headers


def _refused_key(address, reason, key):
    """Log a push refused for its key, and answer it 401.

    Shown nowhere but here: a removed key still in use, or a PC set up wrong. Never the key itself,
    and at most the bad-key slow-down's share a minute from one address.
    """
    log.info("refused a push from %s: %s%s", address, reason, f" (its digest begins {digest(key)[:8]})" if key else "")
    return _error(401, reason, headers=(("WWW-Authenticate", "Bearer"),))


def _mimetype(content_type):
    """Return the Content-Type's media type in lower case, as werkzeug's request.mimetype does."""
    if content_type == "application/json":
        return content_type
    return parse_options_header(content_type)[0].lower()


def read_body(environ, limit, timeout_s):
    """Return the whole body, or raise BodyError: too large, cut short, stalled or unreadable."""
    expected = get_content_length(environ)
    if expected is not None and expected > limit:
        # Answered before the body is read; gunicorn then discards the rest as it streams in.
        raise BodyError(413, f"body is larger than MAX_BODY_BYTES ({limit} bytes)")
    sock = environ.get("gunicorn.socket")
    previous = sock.gettimeout() if sock is not None else None
    if sock is not None:
        sock.settimeout(timeout_s)  # between two reads, like nginx's client_body_timeout
    try:
        body = get_input_stream(environ).read(limit + 1)
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

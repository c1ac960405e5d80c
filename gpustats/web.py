"""What every route shares: the JSON error answer, the client's address through trusted proxies, the app-wide error handlers."""
import ipaddress
import json
import logging
import re
import unicodedata
from datetime import datetime, timezone

from flask import current_app, g, request
from werkzeug.exceptions import HTTPException

from gpustats.scaleout import Unavailable

log = logging.getLogger("gpustats")
# Every answer carries these (pages.py adds them in Flask; the push route, outside it, writes them itself).
# No inline script or style, nothing from other origins: the page works with no CDN access.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                    "X-Frame-Options": "DENY", "Content-Security-Policy": CSP}
# The 503 and 500 answers' words, the app's error handlers' and the push route's alike.
UNAVAILABLE = "the shared store (Redis) is {}; try again shortly"
INTERNAL_ERROR = "internal server error; the server's log has the details"


def client_address(remote_addr, forwarded_for, trusted_proxies):
    """Return the client's address: X-Forwarded-For counts only when a trusted proxy sent it.

    Walk the header from the right (the entry our proxy appended) past trusted proxies;
    anything further left was written by the client and could be forged.
    """
    if remote_addr not in trusted_proxies or not forwarded_for:
        return remote_addr
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in trusted_proxies:
            return hop
    return remote_addr


def limit_key(address):
    """Return what a per-address limit counts `address` as: itself, or for IPv6 its /64.

    One IPv6 host is handed a whole /64 (and picks addresses in it at will): counted one by one,
    a single attacker would be 2^64 clients to every per-address limit.
    """
    if not address or ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", 1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


def client_key(remote_addr, forwarded_for, trusted_proxies):
    """Return the key of the request's client for per-address limits: its address through trusted proxies, IPv6 by /64."""
    return limit_key(client_address(remote_addr, forwarded_for, trusted_proxies))


def requester_key(trusted_proxies):
    """Return the key of this request's client for per-address limits (client_key of Flask's request)."""
    return client_key(request.remote_addr, request.headers.get("X-Forwarded-For"), trusted_proxies)


def error(status, message, field=None, headers=None):
    """Return a JSON error answer: {"ok": false, "error": message, "field": field}."""
    return current_app.response_class(error_body(message, field), mimetype="application/json"), status, headers or {}


def error_body(message, field=None):
    """Return a JSON error's body as bytes, as jsonify writes it: error()'s, and the push route's outside Flask."""
    body = {"ok": False, "error": message}
    if field:
        body["field"] = field
    return (json.dumps(body, ensure_ascii=True, sort_keys=True, separators=(",", ":")) + "\n").encode()


def is_https(trusted_proxies):
    """Return whether the browser's request came over HTTPS: to this server, or to a trusted proxy that says so."""
    if request.scheme == "https":
        return True
    return (request.remote_addr in trusted_proxies
            and request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower() == "https")


def public_url(config):
    """Return this server's address as its users reach it: ALERT_DASHBOARD_URL, else the request's own."""
    if config.alert_dashboard_url:
        return config.alert_dashboard_url
    return ("https" if is_https(config.trusted_proxies) else "http") + "://" + request.host


def allowed_devices():
    """Return the devices this request may see (a share link's), or None for every device."""
    return g.get("devices")


def register_errors(app):
    """Answer every error as JSON: HTTP's own, a shared store that is down (503), and anything unforeseen (500)."""

    @app.errorhandler(HTTPException)
    def http_error(problem):
        headers = {k: v for k, v in problem.get_headers() if k.lower() != "content-type"}
        return error(problem.code, problem.description, headers=headers)

    @app.errorhandler(Unavailable)
    def unavailable(problem):
        return error(503, UNAVAILABLE.format(problem.reason), headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def server_error(problem):
        log.exception("internal error on %s %s", request.method, request.path)
        return error(500, INTERNAL_ERROR)


class QueryError(ValueError):
    """A query parameter a route cannot answer; `field` names it (answered 400 with it)."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field


# Unix seconds as digits: float() would also take ' 1e3', '1_000', 'nan' and 'inf'.
UNIX_S = re.compile(r"[0-9]{1,11}(\.[0-9]{1,9})?", re.ASCII)


def unix_seconds(args, name, default):
    """Return the query parameter `name` as unix seconds (`default` if absent); raise QueryError naming it if it is not one."""
    raw = args.get(name)
    if raw is None:
        return default
    if not UNIX_S.fullmatch(raw):
        raise QueryError(name, f"{raw[:32]!r} is not a time in unix seconds, like {1763900000}")
    return float(raw) if "." in raw else int(raw)


def rfc3339(t):
    """Return unix seconds `t` as an RFC 3339 UTC time."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


FORMULA = ("=", "+", "-", "@")


def safe_cell(text):
    """Return agent-sent text safe to open in a spreadsheet: nothing it could run as a formula.

    Spreadsheets skip leading spaces (U+3000 too) and read full-width signs (＝ ＋ － ＠) as
    their ASCII forms, and a tab or carriage return first starts a formula in some (OWASP's
    CSV injection list): each of those gets the `'` guard as well.
    """
    text = text or ""
    first = unicodedata.normalize("NFKC", text.lstrip()[:1])
    return "'" + text if first in FORMULA or text[:1] in ("\t", "\r") else text

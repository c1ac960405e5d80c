"""Who is asking, and what they may do: sessions, API tokens, HTTP Basic, share links, the public dashboard (SPEC, Access).

Every request but the open ones (OPEN_PATHS) is answered for an Identity, found in this order:
- `Authorization: Bearer <token>`: an API token an admin made (viewer or admin);
- `Authorization: Basic`: the extra viewer login (DASHBOARD_USER/DASHBOARD_PASSWORD), or a
  user's own password; for reading only;
- the session cookie, signed with SECRET_KEY: a signed-in session's secret id, kept in the
  accounts store (a user's, while it lasts and the password it was signed in with stands;
  the extra viewer login's), or a share link's read-only view of some devices;
- DASHBOARD_PUBLIC=1: anyone may read.
None of those: an API call gets 401 JSON, a browser asking for a page is sent to /login.
A request that changes state and is signed in by the cookie must carry the page's CSRF token.
"""
import hmac
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for
from flask.sessions import SecureCookieSessionInterface

from gpustats.access.accounts import USER_NAME, AccountError, check_password, lasts
from gpustats.access.keys import basic_login, same_login
from gpustats.background import watch
from gpustats.tokens import digest, new_secret
from gpustats.web import client_address, error, is_https, limit_key

log = logging.getLogger("gpustats")
SESSIONLESS = {"/push-sse"}
OPEN_PATHS = {"/healthz", "/push-sse", "/login", "/agent.py", "/agent-requirements.txt", "/favicon.ico"}
OPEN_PREFIXES = ("/static/", "/s/")  # the pages' assets (code, no data); share links prove themselves
ADMIN_PREFIXES = ("/admin", "/api/users", "/api/tokens", "/api/shares", "/api/devices", "/devices")
# What a share link opens: the dashboard, its stream and history, the alerts and jobs, of its devices only.
SHARE_PATHS = {"/", "/jobs", "/gpu/stream", "/api/history", "/api/history.csv", "/api/alerts", "/api/jobs", "/api/jobs.csv",
               "/api/usage", "/api/usage.csv", "/logout"}
CHANGES = {"POST", "PUT", "PATCH", "DELETE"}
SESSION_DAYS = 30
BASIC_CACHE_S = 60.0  # a user's right Basic password is not hashed again for this long (a scrape every 15 s)
USED_EVERY_S = 60.0  # how often a token's, link's or session's "last used" is written
MOST_USED = 100_000  # "last used" times waiting to be written again; past it, written at the next use
NAME_CHARS = 64  # the longest user name there can be (accounts.USER_NAME)
HASHES_PER_ADDRESS = 2  # passwords from one address checked at once; more tries wait their turn as 429
AGENT_CHARS = 120  # of a session's User-Agent, kept to show where it is


@dataclass(frozen=True)
class Identity:
    """Who a request is: its kind (user, token, share, viewer-login, public), name and role, and what it may see."""
    kind: str
    name: str
    role: str
    devices: frozenset = None  # a share link's devices; None: every device
    by_cookie: bool = False  # signed in by the session cookie: a change needs the CSRF token
    read_only: bool = False  # HTTP Basic, a share link, the public dashboard
    made_by: str = None  # an API token's maker

    @property
    def admin(self):
        return self.role == "admin"

    @property
    def user(self):
        """Return the user this request acts for: a signed-in user, an API token's maker; None for others."""
        return self.name if self.kind == "user" else self.made_by


class Sessions(SecureCookieSessionInterface):
    """Flask's signed cookie, marked Secure when the request came over HTTPS, itself or through a trusted proxy."""

    def __init__(self, trusted_proxies):
        self._trusted = trusted_proxies

    def get_cookie_secure(self, app):
        return is_https(self._trusted)

    def open_session(self, app, request):
        # An agent's push proves itself with its device key and never has a session: none is
        # opened for it (a signer built and a cookie looked for at 1,000 pushes a second).
        if request.path in SESSIONLESS:
            return self.make_null_session(app)
        return super().open_session(app, request)


class OpenStreams:
    """The streams opened by a session or a share link, ended within a second of its revocation, on any host."""

    def __init__(self):
        self._lock = threading.Lock()
        self._streams = {}  # (kind, key) -> set of sockets

    def add(self, key, sock):
        if sock is not None:
            with self._lock:
                self._streams.setdefault(key, set()).add(sock)

    def sweep(self, still_valid):
        """Shut the streams of every key `still_valid(key)` refuses; forget closed ones."""
        with self._lock:
            for key in list(self._streams):
                self._streams[key] = {s for s in self._streams[key] if s.fileno() != -1}
                if not self._streams[key]:
                    del self._streams[key]
            streams = {key: list(socks) for key, socks in self._streams.items()}
        for key, socks in streams.items():
            if not still_valid(key):
                for sock in socks:
                    try:
                        sock.shutdown(2)  # the stream's next write fails: it ends, and the page reconnects to /login
                    except OSError:
                        pass


bp = Blueprint("login", __name__)


class Access:
    """One app's sign-ins and sessions: who a request is, and the streams to end once that no longer stands."""

    def __init__(self, config, accounts, hasher, throttle):
        self.config, self.accounts, self.hasher, self.throttle = config, accounts, hasher, throttle
        self.open_streams = OpenStreams()
        self._lock = threading.Lock()
        self._basic_ok = {}  # digest of a user's right Basic login -> (when, password epoch)
        self._used = {}  # credential or session id -> when its "last used" was written
        self._hashing = {}  # address -> passwords from it being checked now
        self.closed = False

    def close(self):
        """Stop the sweep of open streams (an app made and dropped in one process, as the tests make them)."""
        self.closed = True

    def address(self):
        return client_address(request.remote_addr, request.headers.get("X-Forwarded-For"),
                              self.config.trusted_proxies)

    def due(self, key):
        """Return whether `key`'s "last used" should be written now (once every USED_EVERY_S)."""
        now = time.time()
        with self._lock:
            if now - self._used.get(key, 0) < USED_EVERY_S:
                return False
            if len(self._used) >= MOST_USED:
                self._used.clear()
            self._used[key] = now
        return True

    def note_used(self, credential):
        if self.due(credential["id"]):
            self.accounts.store.used(credential["id"], time.time())

    def sign_in(self, name, password, users_only=False):
        """Return the user that `name` and `password` sign in as, or an answer: 400 no such name, 429 held back, 401 wrong."""
        if not isinstance(name, str) or len(name) > NAME_CHARS:
            return error(400, f"user: at most {NAME_CHARS} characters", field="user")  # nothing kept for it
        where = limit_key(self.address())
        wait = self.throttle.blocked_for(where)
        if wait:  # no hash for a held-back address: a guess costs a lookup
            return error(429, f"too many wrong passwords from this address; try again in {wait} s",
                         headers={"Retry-After": str(wait)})
        with self._lock:
            checking = self._hashing.get(where, 0)
            if checking < HASHES_PER_ADDRESS:
                self._hashing[where] = checking + 1
        if checking >= HASHES_PER_ADDRESS:  # a hundred guesses sent at once: two are checked, the rest wait
            return error(429, "passwords from this address are being checked already; try again in a second",
                         headers={"Retry-After": "1"})
        try:
            return self._check(where, name, password, users_only)
        finally:
            with self._lock:
                if self._hashing[where] > 1:
                    self._hashing[where] -= 1
                else:
                    del self._hashing[where]

    def _check(self, where, name, password, users_only=False):
        time.sleep(self.throttle.delay_for(name))  # many wrong guesses at this user lately: each try waits, none is locked out
        if not users_only and self.legacy_login(name, password):  # no hash, no try counted: nothing to give back
            return {"name": name, "role": "viewer", "epoch": None, "legacy": True}
        # Counted as wrong before the hash, and given back if right: tries sent at once are all counted
        # before any of them is checked, so the throttle's 5 per address holds.
        self.throttle.failed(where, name)
        user = self.accounts.user(name) if USER_NAME.fullmatch(name) else None
        if self.hasher.verify(user["hash"] if user else None, password):
            self.throttle.succeeded(where, name)
            return user
        return error(401, "wrong user or password")

    def start_session(self, kind, name, proof):
        """Sign this browser in: a new session in the store, and only its secret id (and a CSRF token) in the cookie."""
        secret = new_secret()
        self.accounts.store.add_session(digest(secret), kind, name, proof, self.address(),
                                        request.headers.get("User-Agent", "")[:AGENT_CHARS])
        session.clear()
        session.permanent = True
        session.update(i=secret, c=secrets.token_urlsafe(24))

    def valid(self, found):
        """Return whether the session `found` still stands: its user and their password, or the viewer login's."""
        if found is None:
            return False
        if found["kind"] == "viewer-login":
            password = self.config.dashboard_password
            return bool(password) and found["proof"] == digest(password)[:16]
        user = self.accounts.user(found["name"])
        return user is not None and found["proof"] == _proof(user)

    def legacy_login(self, name, password):
        """Return whether this is the extra viewer login of DASHBOARD_USER and DASHBOARD_PASSWORD."""
        return bool(self.config.dashboard_password) and same_login(name, password, self.config.dashboard_user,
                                                                   self.config.dashboard_password)

    def from_basic(self, header):
        """Return the read-only Identity of an `Authorization: Basic` header, or the answer to a bad one."""
        login = basic_login(header)
        if login is None:
            return error(401, "Authorization: Basic needs user:password")
        name, password = login
        wait = self.throttle.blocked_for(limit_key(self.address()))
        if wait:  # the viewer login too: it has no hash to slow a guess down
            return error(429, f"too many wrong passwords from this address; try again in {wait} s",
                         headers={"Retry-After": str(wait)})
        if self.legacy_login(name, password):
            return Identity("viewer-login", name, "viewer", read_only=True)
        key = digest(f"{name}\0{password}")
        with self._lock:
            cached = self._basic_ok.get(key)
        user = self.accounts.user(name)
        if cached and user and cached[1] == user["epoch"] and time.monotonic() - cached[0] < BASIC_CACHE_S:
            return Identity("user", name, user["role"], read_only=True)
        found = self.sign_in(name, password)
        if not isinstance(found, dict):
            return found
        with self._lock:
            if len(self._basic_ok) > 10_000:
                self._basic_ok.clear()
            self._basic_ok[key] = (time.monotonic(), found["epoch"])
        return Identity("user", name, found["role"], read_only=True)

    def identify(self):
        """Return the request's Identity, None for nobody, or an answer to give at once (a bad credential)."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            found = self.accounts.credential(value.strip())
            if found is None or found["kind"] != "token" or not self.maker_stands(found):
                return error(401, "unknown API token", headers={"WWW-Authenticate": "Bearer"})
            self.note_used(found)
            return Identity("token", found["name"], found["role"], made_by=found.get("maker"))
        if scheme.lower() == "basic":
            return self.from_basic(request.headers["Authorization"])
        if "i" in session:  # a signed-in session: valid while the store keeps it and its password stands
            session_id = digest(str(session["i"]))
            found = self.accounts.session(session_id)
            if self.valid(found):
                if self.due(session_id):
                    self.accounts.store.session_used(session_id, time.time(), self.address(),
                                                     request.headers.get("User-Agent", "")[:AGENT_CHARS])
                if found["kind"] == "viewer-login":
                    return Identity("viewer-login", self.config.dashboard_user, "viewer", by_cookie=True,
                                    read_only=True)
                return Identity("user", found["name"], self.accounts.user(found["name"])["role"], by_cookie=True)
            session.clear()  # signed out, run out, removed, or its password changed since
        elif "s" in session:
            found = self.share(session["s"])
            if found is not None:
                self.note_used(found)
                return Identity("share", found["name"], "viewer", frozenset(found["devices"] or ()) or None,
                                by_cookie=True, read_only=True)
            session.clear()
        if self.config.dashboard_public:
            return Identity("public", "", "viewer", read_only=True)
        return None

    def share(self, secret_digest):
        """Return the share link kept under `secret_digest`, or None."""
        found = self.accounts.kept(secret_digest)
        return found if found is not None and found["kind"] == "share" and self.maker_stands(found) else None

    def maker_stands(self, credential):
        """Return whether a token's or link's maker is still the user who made it, with the role it grants.

        Checked at each use, not only when a user is removed or demoted: a token made with a
        token in the second before its maker's removal reached this worker revoked nothing
        (issue 29's review). One made before makers were kept, or on the console, has none.
        """
        maker = credential.get("maker")
        if not maker:
            return True
        user = self.accounts.user(maker)
        if user is None or (credential.get("makerSince") is not None and user["createdAt"] != credential["makerSince"]):
            return False
        return credential["role"] != "admin" or user["role"] == "admin"

    def still_valid(self, key):
        """Return whether the session or share link behind an open stream's `key` still stands."""
        kind, value = key
        if kind == "session":
            return self.valid(self.accounts.session(value))
        return self.share(value) is not None


def register_login(app, config, accounts, hasher, throttle):
    """Ask every request but the open ones who it is; add /login, /logout, /account and /s/<token>."""
    app.secret_key = config.secret_key or secrets.token_urlsafe(32)
    if not config.secret_key:
        log.warning("SECRET_KEY is not set: sessions are signed with a key made at this start, so everyone signs in "
                    "again after a restart (make run writes one to .env)")
    app.session_interface = Sessions(config.trusted_proxies)
    # The cookie is sent again only when it changes: a session ends SESSION_DAYS after its sign-in,
    # or 7 days unused (accounts.py), however often it is used.
    app.config.update(SESSION_COOKIE_NAME="gpustats_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", PERMANENT_SESSION_LIFETIME=SESSION_DAYS * 86400,
                      SESSION_REFRESH_EACH_REQUEST=False)
    access = Access(config, accounts, hasher, throttle)
    app.extensions.setdefault("gpustats", {})["access"] = access
    app.register_blueprint(bp)
    watch("session-sweep", 1.0, lambda: access.open_streams.sweep(access.still_valid), lambda: access.closed)


def _access():
    return current_app.extensions["gpustats"]["access"]


@bp.before_app_request
def require_identity():
    """Answer a request that may not go on: nobody (401, or the sign-in page), a wrong role (403), no CSRF token."""
    path = request.path
    if request.url_rule is None or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return None  # no such route: its 404 (or 405) says so, signed in or not
    access = _access()
    found = access.identify()
    if found is not None and not isinstance(found, Identity):
        return found  # a bad token or password: its own answer
    if found is not None and found.kind == "public" and path.startswith(ADMIN_PREFIXES + ("/account",)):
        found = None  # the open dashboard reads; to manage anything, sign in
    if found is None:
        if _wants_page():
            return redirect(url_for("login.login_page", next=_local(request.full_path)))
        return error(401, "sign in first: a session (/login), an API token (Authorization: Bearer) or HTTP Basic",
                     headers={"WWW-Authenticate": 'Basic realm="GPU Stats"'} if access.config.dashboard_password
                     else {})
    g.identity = found
    if found.devices is not None:
        g.devices = found.devices  # the stream, history and alerts show these alone
    if found.kind == "share" and path not in SHARE_PATHS:
        return error(403, "a share link opens the dashboard of its devices, nothing else")
    if path.startswith(ADMIN_PREFIXES) and not found.admin:
        return error(403, "this needs an admin")
    if request.method in CHANGES:
        if found.read_only and path != "/logout":
            return error(403, "HTTP Basic and share links are for reading only; programs that change things "
                              "use an admin API token")
        if found.by_cookie and not _csrf_ok():
            return error(403, "the page's CSRF token is missing or wrong: reload the page and try again")
    if path == "/gpu/stream" and found.by_cookie:  # ended within a second once its session is no more
        key = ("share", session["s"]) if found.kind == "share" else ("session", digest(str(session["i"])))
        access.open_streams.add(key, request.environ.get("gunicorn.socket"))
    return None


@bp.app_context_processor
def page_context():
    identity = g.get("identity")
    if "c" not in session:
        session["c"] = secrets.token_urlsafe(24)
    return {"identity": identity, "csrf_token": session["c"]}


@bp.get("/login")
def login_page():
    return render_template("login.html", next=_local(request.args.get("next", "/")), problem=None)


@bp.post("/login")
def login():
    if not _from_this_site():
        return error(403, "a sign-in must come from this server's own page: reload it and try again")
    access = _access()
    name, password = request.form.get("user", ""), request.form.get("password", "")
    target = _local(request.form.get("next", "/"))
    found = access.sign_in(name, password)
    if not isinstance(found, dict):
        if _wants_page():
            problem = found[0].get_json()["error"]
            return render_template("login.html", next=target, problem=problem, user=name[:64]), found[1], found[2]
        return found
    if found.get("legacy"):
        access.start_session("viewer-login", found["name"], digest(access.config.dashboard_password)[:16])
    else:
        access.start_session("user", found["name"], _proof(found))
    log.info("%s signed in from %s", found["name"], access.address())
    return redirect(target, 303) if _wants_page() else ({"ok": True, "user": found["name"], "role": found["role"]}, 200)


@bp.post("/logout")
def logout():
    if "i" in session:  # ended in the store: a copy of this cookie signs nobody in, on any worker or host
        accounts = _access().accounts
        accounts.store.remove_session(digest(str(session["i"])))
        accounts.forget()
    session.clear()
    return redirect(url_for("login.login_page"), 303) if _wants_page() else ({"ok": True}, 200)


@bp.get("/s/<secret>")
def share(secret):
    found = _access().accounts.credential(secret)
    if found is None or found["kind"] != "share":
        return error(404, "this share link does not exist, or was revoked")
    session.clear()
    session.permanent = True
    session.update(s=digest(secret), c=secrets.token_urlsafe(24))
    # The link's devices, and the wall's scheme where the link asks for one (/s/<token>?theme=dark).
    query = {"device": ",".join(found["devices"] or ()), "theme": request.args.get("theme", "")}
    query = {key: value for key, value in query.items() if value and (key != "theme" or value in ("dark", "light"))}
    return redirect("/" + (f"?{urlencode(query, safe=',')}" if query else ""), 303)


@bp.route("/account", methods=["GET", "POST"])
def account():
    identity, access = g.identity, _access()
    if identity.kind != "user" or not identity.by_cookie:
        return error(403, "the account page is for a user signed in on this page")
    problem = done = None
    status = 200
    if request.method == "POST" and request.form.get("everywhere"):
        ended = access.accounts.store.remove_sessions(identity.name)
        access.accounts.forget()
        session.clear()
        log.info("%s signed out everywhere (%d sessions)", identity.name, ended)
        return redirect(url_for("login.login_page"), 303)
    if request.method == "POST":
        try:
            _change_password(access, identity.name)
            done = "Password changed. Your other sessions are signed out."
        except AccountError as problem_:
            problem, status = str(problem_), 429 if problem_.status == 429 else 400
    this = digest(str(session["i"]))
    sessions = [dict(found, current=found["id"] == this) for found in access.accounts.store.sessions(identity.name)
                if lasts(found) and access.valid(found)]
    return (render_template("account.html", problem=problem, done=done, sessions=sessions),
            status if problem else 200)


def _change_password(access, name):
    """Set `name`'s password from the account form; sign out their other sessions, keep this browser in."""
    accounts, hasher = access.accounts, access.hasher
    new = check_password(request.form.get("new", ""))
    # Through the sign-in's throttle and hash slots: a stolen cookie must not guess the password here instead.
    # The user's own password alone: DASHBOARD_USER is "admin" by default, and the shared viewer
    # password must not change the admin's.
    checked = access.sign_in(name, request.form.get("current", ""), users_only=True)
    if not isinstance(checked, dict):
        answer = checked[0].get_json()
        raise AccountError("current password: wrong" if checked[1] == 401 else answer["error"], status=checked[1])
    this = digest(str(session["i"]))
    accounts.set_password(name, hasher.hash(new), keep=this)
    accounts.store.remove_session(this)
    access.start_session("user", name, _proof(accounts.user(name)))  # this browser stays in
    log.info("%s changed their password", name)


def _proof(user):
    """Return what a user's session holds to prove it still stands: their password's epoch and the user's birth.

    A user removed and made again under the same name starts at epoch 0 again; their creation time
    tells the two apart, so no session of the first one signs in as the second.
    """
    return f"{user['epoch']}:{user['createdAt']!r}"


def _from_this_site():
    """Return whether a sign-in form was posted from this server's own page, not a form on another site.

    Browsers say where a request comes from: Sec-Fetch-Site, or Origin. Under this site's
    no-referrer policy Origin is "null" even from our own page, and browsers too old for
    Sec-Fetch-Site send only that, as they do from an attacker's page: then the form's CSRF
    token must match the cookie's. Programs send neither header.
    """
    site, origin = request.headers.get("Sec-Fetch-Site"), request.headers.get("Origin")
    if site is not None:
        return site in ("same-origin", "none") and (origin in (None, "null") or urlsplit(origin).netloc == request.host)
    if origin is None:
        return True
    if origin != "null":
        return urlsplit(origin).netloc == request.host
    return _csrf_ok()


def _csrf_ok():
    given = request.headers.get("X-CSRF-Token") or request.form.get("csrf_token") or ""
    kept = session.get("c") or ""
    return bool(kept) and hmac.compare_digest(given.encode(), kept.encode())


def _wants_page():
    """Return whether a browser asked for a page (not a script, a fetch or an EventSource)."""
    return "text/html" in request.headers.get("Accept", "") and not request.path.startswith(("/api/", "/gpu/"))


def _local(target):
    """Return `target` if it is a path on this server, else /: a sign-in never sends anyone elsewhere."""
    target = target or "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target.rstrip("?") or "/"

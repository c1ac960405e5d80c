"""Private by default (SPEC, Access), in-process with Flask's test client: sessions, roles, CSRF, tokens, links, guessing."""
import base64
import re
import time

import pytest

from conftest import ADMIN_PASSWORD, KEYS, PRIVATE, gpu, multi

READ_ROUTES = ["/gpu/stream", "/api/history?device=rig-1", "/api/history.csv?device=rig-1", "/api/alerts", "/metrics"]


@pytest.fixture(params=["sqlite", "redis"])
def make_app(make_app, request):
    """Build private apps in this process, on one SQLite file or one Redis (conftest's make_app, with PRIVATE)."""
    shared = {"REDIS_URL": request.getfixturevalue("redis_server").url} if request.param == "redis" else {}
    return lambda **settings: make_app(**{"PUSH_RATE_LIMIT": "1000", **PRIVATE, **shared, **settings})


def client(app, address="127.0.0.1"):
    """A test client whose requests come from `address`, as a browser elsewhere would."""
    c = app.test_client()
    c.environ_base["REMOTE_ADDR"] = address
    return c


def sign_in(c, user="admin", password=ADMIN_PASSWORD):
    answer = c.post("/login", data={"user": user, "password": password})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return csrf(c)


def csrf(c):
    """Return the CSRF token the page carries, as a browser's script would read it."""
    page = c.get("/", headers={"Accept": "text/html"})
    return re.search(r'<meta name="csrf-token" content="([^"]+)">', page.get_data(as_text=True))[1]


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_a_fresh_server_answers_nothing_without_a_sign_in(make_app):
    c = client(make_app())
    c.post("/push-sse", json=multi(gpu(0)), headers={"Authorization": f"Bearer {KEYS['rig-1']}"})
    for route in READ_ROUTES + ["/"]:
        answer = c.get(route)
        assert answer.status_code == 401 and answer.json["ok"] is False, route
    page = c.get("/?device=rig-1", headers={"Accept": "text/html"})
    assert page.status_code == 302 and page.headers["Location"] == "/login?next=/?device%3Drig-1"
    for route in ("/healthz", "/login", "/static/dashboard.css"):
        assert c.get(route).status_code == 200, route


def test_signing_in_gives_a_session_cookie_that_reads_everything_and_signing_out_ends_it(make_app):
    c = client(make_app())
    answer = c.post("/login", data={"user": "admin", "password": ADMIN_PASSWORD, "next": "/?device=rig-1"},
                    headers={"Accept": "text/html"})
    assert answer.status_code == 303 and answer.headers["Location"] == "/?device=rig-1"
    cookie = answer.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    for route in READ_ROUTES[1:]:
        assert c.get(route).status_code in (200, 404), route  # 404: rig-1 has no history yet
    assert c.post("/logout", data={"csrf_token": csrf(c)}).status_code == 200
    assert c.get("/api/alerts").status_code == 401


def test_behind_a_trusted_https_proxy_the_cookie_is_secure(make_app):
    app = make_app()
    https = {"X-Forwarded-Proto": "https"}
    trusted = client(app).post("/login", data={"user": "admin", "password": ADMIN_PASSWORD}, headers=https)
    assert "Secure" in trusted.headers["Set-Cookie"]
    forged = client(app, "203.0.113.7").post("/login", data={"user": "admin", "password": ADMIN_PASSWORD},
                                             headers=https)
    assert "Secure" not in forged.headers["Set-Cookie"]  # the header counts only from TRUSTED_PROXIES


def test_a_viewer_reads_but_cannot_reach_admin_routes(make_app):
    app = make_app()
    admin = client(app)
    token = sign_in(admin)
    made = admin.post("/api/users", json={"name": "vera", "password": "vera-password-1", "role": "viewer"},
                      headers={"X-CSRF-Token": token})
    assert made.status_code == 201
    vera = client(app)
    vera_token = sign_in(vera, "vera", "vera-password-1")
    assert vera.get("/api/alerts").status_code == 200
    for method, route in (("get", "/admin"), ("get", "/api/users"), ("post", "/api/users"), ("get", "/api/tokens"),
                          ("post", "/api/shares"), ("delete", "/api/users/admin")):
        answer = getattr(vera, method)(route, json={}, headers={"X-CSRF-Token": vera_token})
        assert answer.status_code == 403 and answer.json["error"] == "this needs an admin", route


def test_a_change_signed_in_by_the_cookie_needs_the_pages_csrf_token(make_app):
    c = client(make_app())
    token = sign_in(c)
    body = {"name": "eve", "password": "eve-password-12", "role": "admin"}
    assert c.post("/api/users", json=body).status_code == 403
    assert c.post("/api/users", json=body, headers={"X-CSRF-Token": "forged-" + token}).status_code == 403
    assert c.post("/api/users", data={**body, "csrf_token": token}).status_code == 201  # the page's form field
    assert c.post("/logout").status_code == 403  # a forged sign-out too


def test_http_basic_reads_with_a_users_password_but_changes_nothing(make_app):
    c = client(make_app())
    assert c.get("/api/alerts", headers=basic("admin", ADMIN_PASSWORD)).status_code == 200
    refused = c.post("/api/users", json={"name": "x", "password": "x" * 12}, headers=basic("admin", ADMIN_PASSWORD))
    assert refused.status_code == 403 and "for reading only" in refused.json["error"]
    assert c.get("/api/alerts", headers=basic("admin", "not-the-password")).status_code == 401


def test_the_extra_viewer_login_of_earlier_versions_keeps_working(make_app):
    app = make_app(DASHBOARD_USER="tv", DASHBOARD_PASSWORD="old-viewer-password")
    assert client(app).get("/metrics", headers=basic("tv", "old-viewer-password")).status_code == 200
    c = client(app)
    sign_in(c, "tv", "old-viewer-password")
    assert c.get("/api/alerts").status_code == 200 and c.get("/admin").status_code == 403


def test_changing_a_password_ends_the_users_other_sessions_but_not_this_one(make_app):
    app = make_app()
    here, there = client(app), client(app)
    token = sign_in(here)
    sign_in(there)
    changed = here.post("/account", data={"current": ADMIN_PASSWORD, "new": "a-brand-new-password",
                                          "csrf_token": token})
    assert changed.status_code == 200 and "Password changed" in changed.get_data(as_text=True)
    assert here.get("/api/alerts").status_code == 200
    time.sleep(1.1)  # another worker's cache would hold the old epoch this long
    assert there.get("/api/alerts").status_code == 401
    assert client(app).post("/login", data={"user": "admin", "password": ADMIN_PASSWORD}).status_code == 401


def test_api_tokens_are_shown_once_kept_as_digests_and_revocable(make_app, tmp_path):
    app = make_app()
    admin = client(app)
    csrf_token = sign_in(admin)
    viewer = admin.post("/api/tokens", json={"name": "prometheus", "role": "viewer"}, headers={"X-CSRF-Token": csrf_token})
    owner = admin.post("/api/tokens", json={"name": "script", "role": "admin"}, headers={"X-CSRF-Token": csrf_token})
    assert viewer.status_code == owner.status_code == 201
    secret = viewer.json["token"]
    if (tmp_path / "history.sqlite3").exists():
        assert secret.encode() not in (tmp_path / "history.sqlite3").read_bytes()  # only its digest is kept
    listed = admin.get("/api/tokens").json
    assert [t["name"] for t in listed] == ["prometheus", "script"] and listed[0]["prefix"] == secret[:6]
    assert all("token" not in t for t in listed)
    program = client(app)
    bearer = {"Authorization": f"Bearer {secret}"}
    assert program.get("/metrics", headers=bearer).status_code == 200
    assert program.get("/api/users", headers=bearer).status_code == 403  # a viewer's token
    made = program.post("/api/users", json={"name": "bot", "password": "bot-password-12"},
                        headers={"Authorization": f"Bearer {owner.json['token']}"})
    assert made.status_code == 201  # an admin's token changes things, with no CSRF token: no cookie
    assert admin.delete(f"/api/tokens/{viewer.json['id']}", headers={"X-CSRF-Token": csrf_token}).status_code == 200
    time.sleep(1.1)
    assert program.get("/metrics", headers=bearer).status_code == 401
    assert program.get("/metrics", headers={"Authorization": "Bearer " + "x" * 32}).status_code == 401


def test_a_share_link_shows_its_devices_read_only_until_revoked(make_app):
    app = make_app()
    for device in ("rig-1", "rig-2"):
        client(app).post("/push-sse", json=multi(gpu(0)), headers={"Authorization": f"Bearer {KEYS[device]}"})
    admin = client(app)
    token = sign_in(admin)
    link = admin.post("/api/shares", json={"name": "lab-tv", "devices": ["rig-1"]}, headers={"X-CSRF-Token": token})
    secret = link.json["url"].rsplit("/", 1)[1]
    tv = client(app)
    opened = tv.get(f"/s/{secret}")
    assert opened.status_code == 303 and opened.headers["Location"] == "/?device=rig-1"
    assert tv.get("/", headers={"Accept": "text/html"}).status_code == 200
    assert tv.get("/jobs", headers={"Accept": "text/html"}).status_code == 200  # its devices' jobs, from /api/jobs
    assert tv.get("/api/history?device=rig-1").status_code in (200, 404)
    assert tv.get("/api/history?device=rig-2").status_code == 404  # as if it did not exist
    for route in ("/metrics", "/api/users", "/admin", "/account"):
        assert tv.get(route).status_code == 403, route
    assert tv.post("/api/shares", json={"name": "mine"}, headers={"X-CSRF-Token": csrf(tv)}).status_code == 403
    assert client(app).get("/s/" + "x" * 32).status_code == 404
    shares = admin.get("/api/shares").json
    assert shares[0]["devices"] == ["rig-1"] and shares[0]["lastUsedAt"] is not None
    assert admin.delete(f"/api/shares/{link.json['id']}", headers={"X-CSRF-Token": token}).status_code == 200
    time.sleep(1.1)
    assert tv.get("/api/alerts").status_code == 401


def test_guessing_holds_the_address_back_without_locking_the_user_out(make_app, caplog):
    app = make_app()
    guesser = client(app, "198.51.100.9")
    codes = [guesser.post("/login", data={"user": "admin", "password": f"guess-{n:04d}-xx"}).status_code
             for n in range(50)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    held_back = [r.getMessage() for r in caplog.records if "are held back" in r.getMessage()]
    assert held_back == ["sign-ins from 198.51.100.9 are held back: 5 wrong passwords within 15 min"]  # once
    held = guesser.post("/login", data={"user": "admin", "password": ADMIN_PASSWORD})
    assert held.status_code == 429 and int(held.headers["Retry-After"]) >= 1  # even the right one waits
    started = time.monotonic()
    assert guesser.get("/metrics", headers=basic("admin", "guess-again-xx")).status_code == 429  # Basic alike
    refused_in = time.monotonic() - started
    assert refused_in < 0.03  # refused by a lookup, not a slow hash
    elsewhere = client(app, "203.0.113.50")
    started = time.monotonic()
    assert elsewhere.post("/login", data={"user": "admin", "password": ADMIN_PASSWORD}).status_code == 200
    took = time.monotonic() - started
    print(f"50 guesses: 5 x 401 then 45 x 429; a held-back guess refused in {refused_in * 1000:.1f} ms; "
          f"the right password from another address signed in in {took * 1000:.0f} ms")
    assert took < 1.5  # slowed by at most a second, never locked out


def test_the_open_dashboard_reads_without_a_sign_in_but_manages_nothing(make_app):
    c = client(make_app(DASHBOARD_PUBLIC="1"))
    for route in READ_ROUTES[1:] + ["/"]:
        assert c.get(route).status_code in (200, 404), route
    assert c.get("/api/users").status_code == 401
    assert c.get("/admin", headers={"Accept": "text/html"}).status_code == 302

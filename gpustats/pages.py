"""Serve the dashboard page and its static assets, with CSP, security and cache headers, and /healthz."""
import hashlib
import time
from pathlib import Path

from flask import g, jsonify, render_template, request, url_for

from gpustats.web import SECURITY_HEADERS
YEAR_S = 365 * 24 * 3600


def register_pages(app, config, fleet, broadcaster, history=None):
    """Add `GET /`, `GET /jobs`, versioned asset URLs, the headers every response gets, and `GET /healthz`."""
    started = time.monotonic()
    versions = {path.name: hashlib.sha256(path.read_bytes()).hexdigest()[:12]
                for path in Path(app.static_folder).iterdir() if path.is_file()}

    def asset(filename):
        # The content hash in the URL lets browsers keep an asset for a year and still
        # fetch the new one the moment it changes.
        return url_for("static", filename=filename, v=versions.get(filename, "0"))
    app.jinja_env.globals["asset"] = asset  # the sign-in and admin pages use it too

    @app.get("/")
    def dashboard():
        # ?pc=NAME: that PC's detail (charts, processes, energy); without it, the overview of every PC.
        # A share link's page is the wall's: kiosk mode, no controls but search (?kiosk=1 asks for it too).
        # ?theme=dark or light: that scheme whatever the system's, for a screen on a wall.
        identity = g.get("identity")
        kiosk = request.args.get("kiosk") == "1" or (identity is not None and identity.kind == "share")
        theme = request.args.get("theme")
        return render_template("index.html", asset=asset, history_s=config.history_s,
                               stale_after_s=config.stale_after_s, offline_after_s=config.offline_after_s,
                               detail=request.args.get("pc", "").strip()[:200], kiosk=kiosk,
                               theme=theme if theme in ("dark", "light") else None)

    @app.get("/jobs")
    def jobs_page():
        # Who runs what, for how long, at what cost: drawn by static/jobs.js from /api/jobs and /api/usage.
        return render_template("jobs.html")

    @app.get("/healthz")
    def healthz():
        counts = fleet.counts()
        backlog = getattr(history, "backlog", None)  # SQLite's writer queue; Redis history has none
        return jsonify(ok=True, devices=sum(counts.values()), **counts,
                       subscribers=broadcaster.subscribers, **fleet.health(),
                       **({"historyBacklog": backlog()} if backlog else {}),
                       uptimeS=round(time.monotonic() - started, 1))

    @app.after_request
    def headers(response):
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith("/static/") and response.status_code == 200:
            if request.args.get("v") == versions.get(request.path.rsplit("/", 1)[-1]):
                response.headers["Cache-Control"] = f"public, max-age={YEAR_S}, immutable"
            else:
                response.headers["Cache-Control"] = "no-cache"  # revalidate with the ETag
        elif request.path == "/":
            response.headers["Cache-Control"] = "no-cache"
        return response

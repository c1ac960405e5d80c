"""The viewer login (DASHBOARD_PASSWORD): every route but the open ones asks for it, over HTTP Basic."""
from flask import request

from gpustats.access.keys import viewer_allowed
from gpustats.web import error

OPEN_ROUTES = {"/healthz", "/push-sse"}


def register_login(app, config):
    """Ask every request but OPEN_ROUTES for the viewer login, when DASHBOARD_PASSWORD is set."""

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

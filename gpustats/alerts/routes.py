"""GET /api/alerts: the fleet's active alerts and the last 100, as the dashboard shows them."""
from flask import jsonify

from gpustats.web import allowed_devices


def register_alerts(app, fleet):
    """Add `GET /api/alerts`, behind the sign-in like the page; a share link sees its devices' alerts alone."""

    @app.get("/api/alerts")
    def alerts():
        view, devices = fleet.alerts(), allowed_devices()
        if devices is not None:
            view = {name: [a for a in found if a.get("device") in devices] for name, found in view.items()}
        return jsonify(view)

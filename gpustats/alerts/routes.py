"""GET /api/alerts: the fleet's active alerts and the last 100, as the dashboard shows them."""
from flask import jsonify


def register_alerts(app, fleet):
    """Add `GET /api/alerts`, behind the viewer login like the page."""

    @app.get("/api/alerts")
    def alerts():
        return jsonify(fleet.alerts())

"""The admin's devices: /api/devices as JSON (SPEC, Devices), the Devices page, and the agent served from here.

`GET /agent.py` and `GET /agent-requirements.txt` are open (they hold no secret): the install
commands download them, and an ETag lets an agent ask whether a newer one is out.
"""
import hashlib
import logging
from pathlib import Path

from flask import Blueprint, Response, current_app, g, jsonify, render_template, request

from gpustats.devices.install import commands, reaches_only_itself
from gpustats.devices.registry import DeviceError, check_name
from gpustats.web import error

log = logging.getLogger("gpustats")
ROOT = Path(__file__).resolve().parent.parent.parent
SERVED = {"/agent.py": ("agent.py", "text/x-python"), "/agent-requirements.txt": ("requirements-agent.txt", "text/plain")}


bp = Blueprint("devices", __name__)


class DeviceAdmin:
    """One app's parts for the devices' routes: the registry, fleet and history, and the agent files it serves."""

    def __init__(self, config, registry, fleet, history, public_url):
        self.config, self.registry, self.fleet, self.history = config, registry, fleet, history
        self.public_url = public_url  # () -> this server's address as its users reach it
        self.files = {path: (ROOT / name).read_bytes() for path, (name, _) in SERVED.items()}
        self.etags = {path: hashlib.sha256(body).hexdigest()[:16] for path, body in self.files.items()}

    def listed(self):
        """Return every device with its keys and what it last pushed, as /api/devices shows it."""
        states = {event["device"]: event for event in self.fleet.devices()}
        found = []
        for device in self.registry.devices():
            state = states.get(device["name"], {})
            found.append({
                "name": device["name"], "status": state.get("status", "never pushed"),
                "lastPushAt": state.get("receivedAt"), "agent": state.get("agent"),
                "gpus": [{"index": gpu.get("index"), "name": gpu.get("name")} for gpu in state.get("gpus") or []],
                "keys": device["keys"], "source": device["source"], "createdAt": device["createdAt"]})
        return found

    def install(self, key):
        return commands(self.public_url(), key)


def register_devices(app, config, registry, fleet, history, public_url):
    """Add /api/devices, the /devices page, and /agent.py with its requirements."""
    app.extensions.setdefault("gpustats", {})["device_admin"] = DeviceAdmin(config, registry, fleet, history,
                                                                            public_url)
    app.register_blueprint(bp)


def _admin():
    return current_app.extensions["gpustats"]["device_admin"]


def _serve(path):
    admin = _admin()
    etag = admin.etags[path]
    if request.if_none_match.contains(etag):
        return Response(status=304, headers={"ETag": f'"{etag}"'})
    return Response(admin.files[path], mimetype=SERVED[path][1], headers={
        "ETag": f'"{etag}"', "Cache-Control": "no-cache",  # kept, but asked about each time
        "Content-Disposition": f'inline; filename="{SERVED[path][0]}"'})


@bp.get("/agent.py")
def agent_file():
    return _serve("/agent.py")


@bp.get("/agent-requirements.txt")
def agent_requirements():
    return _serve("/agent-requirements.txt")


def _given():
    """Return the request's fields: its JSON object, or its form; JSON that is not an object gives none."""
    if not request.is_json:
        return request.form
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _wants_page():
    return not request.is_json and bool(request.form)


def _page(made=None, done=None, problem=None, asked=None):
    admin = _admin()
    base = admin.public_url()
    # Opened at localhost, the commands would point a remote PC at itself (issue 30): the page says so,
    # and lets the admin type the address PCs reach, unless ALERT_DASHBOARD_URL names it.
    local = not admin.config.alert_dashboard_url and reaches_only_itself(base)
    return render_template("devices.html", devices=admin.listed(), made=made, done=done, problem=problem,
                           asked=asked, base=base, local=local)


@bp.app_errorhandler(DeviceError)
def refused(problem):
    if _wants_page():
        return _page(problem=str(problem)), problem.status
    return error(problem.status, str(problem), field=problem.field)


@bp.get("/devices")
def devices_page():
    return _page()


@bp.get("/api/devices")
def devices():
    return jsonify(_admin().listed())


@bp.post("/api/devices")
def add_device():
    admin = _admin()
    name = check_name(_given().get("name"))
    key, key_id = admin.registry.add(name)
    made = {"name": name, "key": key, "keyId": key_id, "install": admin.install(key)}
    log.info("%s added the device %s", g.identity.name, name)
    if _wants_page():
        return _page(made=made, done=f"Added {name}."), 201
    return jsonify(made), 201


@bp.post("/api/devices/<name>/keys")
def add_key(name):
    admin = _admin()
    key, key_id = admin.registry.add_key(name)
    made = {"name": name, "key": key, "keyId": key_id, "install": admin.install(key)}
    if _wants_page():
        return _page(made=made, done=f"Added a key to {name}: both work until you remove the old one."), 201
    return jsonify({"key": key, "keyId": key_id}), 201


@bp.route("/api/devices/<name>/keys/<key_id>", methods=["DELETE", "POST"])
def remove_key(name, key_id):
    _admin().registry.remove_key(name, key_id)
    if _wants_page():
        return _page(done=f"Removed the key {key_id} of {name}: it gets 401 from now on.")
    return jsonify({"ok": True})


@bp.get("/api/devices/<name>")
def device(name):
    admin = _admin()
    check_name(name, stored=True)
    found = next((d for d in admin.listed() if d["name"] == name), None)
    if found is None:
        raise DeviceError(f"no device {name!r}", status=404, field="name")
    return jsonify({**found, "historyPoints": admin.history.points(name)})


@bp.route("/api/devices/<name>", methods=["DELETE", "POST"])
def remove_device(name):
    admin = _admin()
    body = _given() if request.method == "POST" else request.args
    keep = body.get("history", request.args.get("history", "keep"))
    if keep not in ("keep", "delete"):
        raise DeviceError("history: keep or delete", field="history")
    if request.method == "POST" and not body.get("confirmed"):  # the page asks first, with what would go
        check_name(name, stored=True)
        return _page(asked={"name": name, "history": keep,
                            "points": admin.history.points(name) if keep == "delete" else 0})
    admin.registry.remove(name)
    admin.fleet.forget(name)
    points = admin.history.delete(name) if keep == "delete" else 0
    jobs = current_app.extensions["gpustats"].get("jobs")
    if keep == "delete" and jobs is not None:
        jobs.delete(name)  # its jobs are kept with its history, and go with it
    log.info("%s removed the device %s (%s its history%s)", g.identity.name, name,
             "with" if keep == "delete" else "keeping", f": {points} points" if points else "")
    if _wants_page():
        return _page(done=f"Removed {name}" + (f" and its {points} history points." if keep == "delete" else
                                              "; its history is kept."))
    return jsonify({"ok": True, "name": name, "historyPointsDeleted": points})


@bp.post("/api/devices:remove")
def remove_named_device():
    # A browser drops a "." or ".." path segment (WHATWG URL; %2e too), so the page removes a
    # device of such a name, made before a name needed a letter or digit first, by its form's field.
    return remove_device(_given().get("name"))

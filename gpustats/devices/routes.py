"""The admin's devices: /api/devices as JSON (SPEC, Devices), the Devices page, and the agent served from here.

`GET /agent.py` and `GET /agent-requirements.txt` are open (they hold no secret): the install
commands download them, and an ETag lets an agent ask whether a newer one is out.
"""
import hashlib
import logging
from pathlib import Path

from flask import Response, g, jsonify, render_template, request

from gpustats.devices.install import commands, reaches_only_itself
from gpustats.devices.registry import DeviceError, check_name
from gpustats.web import error

log = logging.getLogger("gpustats")
ROOT = Path(__file__).resolve().parent.parent.parent
SERVED = {"/agent.py": ("agent.py", "text/x-python"), "/agent-requirements.txt": ("requirements-agent.txt", "text/plain")}


def register_devices(app, config, registry, fleet, history, public_url):
    """Add /api/devices, the /devices page, and /agent.py with its requirements."""
    files = {path: (ROOT / name).read_bytes() for path, (name, _) in SERVED.items()}
    etags = {path: hashlib.sha256(body).hexdigest()[:16] for path, body in files.items()}

    def serve(path):
        if request.if_none_match.contains(etags[path]):
            return Response(status=304, headers={"ETag": f'"{etags[path]}"'})
        return Response(files[path], mimetype=SERVED[path][1], headers={
            "ETag": f'"{etags[path]}"', "Cache-Control": "no-cache",  # kept, but asked about each time
            "Content-Disposition": f'inline; filename="{SERVED[path][0]}"'})

    app.add_url_rule("/agent.py", "agent_file", lambda: serve("/agent.py"))
    app.add_url_rule("/agent-requirements.txt", "agent_requirements", lambda: serve("/agent-requirements.txt"))

    def listed():
        states = {event["device"]: event for event in fleet.devices()}
        found = []
        for device in registry.devices():
            state = states.get(device["name"], {})
            found.append({
                "name": device["name"], "status": state.get("status", "never pushed"),
                "lastPushAt": state.get("receivedAt"), "agent": state.get("agent"),
                "gpus": [{"index": gpu.get("index"), "name": gpu.get("name")} for gpu in state.get("gpus") or []],
                "keys": device["keys"], "source": device["source"], "createdAt": device["createdAt"]})
        return found

    def given():
        return (request.get_json(silent=True) or {}) if request.is_json else request.form

    def wants_page():
        return not request.is_json and bool(request.form)

    def page(made=None, done=None, problem=None, asked=None):
        base = public_url()
        # Opened at localhost, the commands would point a remote PC at itself (issue 30): the page says so,
        # and lets the admin type the address PCs reach, unless ALERT_DASHBOARD_URL names it.
        local = not config.alert_dashboard_url and reaches_only_itself(base)
        return render_template("devices.html", devices=listed(), made=made, done=done, problem=problem, asked=asked,
                               base=base, local=local)

    def install(key):
        return commands(public_url(), key)

    @app.errorhandler(DeviceError)
    def refused(problem):
        if wants_page():
            return page(problem=str(problem)), problem.status
        return error(problem.status, str(problem), field=problem.field)

    @app.get("/devices")
    def devices_page():
        return page()

    @app.get("/api/devices")
    def devices():
        return jsonify(listed())

    @app.post("/api/devices")
    def add_device():
        name = check_name(given().get("name"))
        key, key_id = registry.add(name)
        made = {"name": name, "key": key, "keyId": key_id, "install": install(key)}
        log.info("%s added the device %s", g.identity.name, name)
        if wants_page():
            return page(made=made, done=f"Added {name}."), 201
        return jsonify(made), 201

    @app.post("/api/devices/<name>/keys")
    def add_key(name):
        key, key_id = registry.add_key(name)
        made = {"name": name, "key": key, "keyId": key_id, "install": install(key)}
        if wants_page():
            return page(made=made, done=f"Added a key to {name}: both work until you remove the old one."), 201
        return jsonify({"key": key, "keyId": key_id}), 201

    @app.route("/api/devices/<name>/keys/<key_id>", methods=["DELETE", "POST"])
    def remove_key(name, key_id):
        registry.remove_key(name, key_id)
        if wants_page():
            return page(done=f"Removed the key {key_id} of {name}: it gets 401 from now on.")
        return jsonify({"ok": True})

    @app.get("/api/devices/<name>")
    def device(name):
        check_name(name, stored=True)
        found = next((d for d in listed() if d["name"] == name), None)
        if found is None:
            raise DeviceError(f"no device {name!r}", status=404, field="name")
        return jsonify({**found, "historyPoints": history.points(name)})

    @app.route("/api/devices/<name>", methods=["DELETE", "POST"])
    def remove_device(name):
        body = given() if request.method == "POST" else request.args
        keep = body.get("history", request.args.get("history", "keep"))
        if keep not in ("keep", "delete"):
            raise DeviceError("history: keep or delete", field="history")
        if request.method == "POST" and not body.get("confirmed"):  # the page asks first, with what would go
            check_name(name, stored=True)
            return page(asked={"name": name, "history": keep, "points": history.points(name) if keep == "delete"
                               else 0})
        registry.remove(name)
        fleet.forget(name)
        points = history.delete(name) if keep == "delete" else 0
        log.info("%s removed the device %s (%s its history%s)", g.identity.name, name,
                 "with" if keep == "delete" else "keeping", f": {points} points" if points else "")
        if wants_page():
            return page(done=f"Removed {name}" + (f" and its {points} history points." if keep == "delete" else
                                                 "; its history is kept."))
        return jsonify({"ok": True, "name": name, "historyPointsDeleted": points})

    @app.post("/api/devices:remove")
    def remove_named_device():
        # A browser drops a "." or ".." path segment (WHATWG URL; %2e too), so the page removes a
        # device of such a name, made before a name needed a letter or digit first, by its form's field.
        return remove_device(given().get("name"))

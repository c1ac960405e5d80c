"""What admins manage: users, API tokens and share links, as JSON for programs and as the /admin page.

Each change is one route that takes JSON or the page's form: a form gets the page back with
what changed (and a new token or link, shown this once), JSON gets JSON. Secrets are made
here, shown once, and kept only as digests; passwords only as slow hashes.
"""
import logging

from flask import g, jsonify, render_template, request

from gpustats.access.accounts import AccountError, check_name, check_password, check_role
from gpustats.tokens import PREFIX_CHARS, digest, new_secret
from gpustats.web import error, public_url

log = logging.getLogger("gpustats")
KINDS = {"tokens": "token", "shares": "share"}
LABELS = {"token": "API token", "share": "share link"}


def register_admin(app, config, accounts, hasher, known_devices=lambda: []):
    """Add /api/users, /api/tokens, /api/shares and the /admin page; the login lets only admins in."""

    def given():
        return request.get_json(silent=True) or {} if request.is_json else request.form

    def answer(result, status=200, made=None):
        if request.is_json or not request.form:
            return jsonify(result), status
        return page(made=made, done=result.get("done")), status

    def page(made=None, done=None, problem=None):
        return render_template("admin.html", users=accounts.store.users(), tokens=accounts.store.credentials("token"),
                               shares=accounts.store.credentials("share"), made=made, done=done, problem=problem,
                               devices=known_devices())

    def changed():
        accounts.forget()  # read back at once on this worker; others within a second

    @app.errorhandler(AccountError)
    def refused(problem):
        if request.is_json or not request.form:
            return error(problem.status, str(problem), field=problem.field)
        return page(problem=str(problem)), problem.status

    @app.get("/admin")
    def admin_page():
        return page()

    @app.get("/api/users")
    def users():
        return jsonify([_public(user) for user in accounts.store.users()])

    @app.post("/api/users")
    def add_user():
        body = given()
        name, role = check_name(body.get("name")), check_role(body.get("role", "viewer"))
        accounts.store.add_user(name, role, hasher.hash(check_password(body.get("password"))))
        changed()
        log.info("%s added the user %s (%s)", g.identity.name, name, role)
        return answer({"ok": True, "name": name, "role": role, "done": f"Added {name} ({role})."}, 201)

    @app.route("/api/users/<name>", methods=["PATCH", "POST"])
    def change_user(name):
        body = given()
        if request.form.get("remove") or body.get("remove"):
            return remove_user(name)
        if body.get("role"):
            role = check_role(body["role"])
            if role != "admin":
                _keep_an_admin(accounts, name)
            revoked = accounts.set_role(name, role)
            done = f"{name} is now {role}." + (f" Revoked {revoked} admin tokens they made." if revoked else "")
        elif body.get("password"):
            accounts.set_password(name, hasher.hash(check_password(body["password"])))
            done = f"{name}'s password is reset; their sessions are signed out."
        else:
            raise AccountError("give a role or a password", field="role")
        changed()
        log.info("%s changed the user %s: %s", g.identity.name, name, done)
        return answer({"ok": True, "name": name, "done": done})

    @app.delete("/api/users/<name>")
    def remove_user(name):
        _keep_an_admin(accounts, name)
        if name == g.identity.name and g.identity.kind == "user":
            raise AccountError("you cannot remove yourself", status=409)
        revoked = accounts.remove_user(name)  # their sessions end, and the tokens and links they made
        changed()
        log.info("%s removed the user %s (and %d tokens and links they made)", g.identity.name, name, revoked)
        return answer({"ok": True, "name": name, "revoked": revoked,
                       "done": f"Removed {name}" + (f" and the {revoked} tokens and links they made." if revoked
                                                    else ".")})

    @app.get("/api/<any(tokens, shares):kinds>")
    def credentials(kinds):
        return jsonify([_credential(c) for c in accounts.store.credentials(KINDS[kinds])])

    @app.post("/api/<any(tokens, shares):kinds>")
    def add_credential(kinds):
        kind, body = KINDS[kinds], given()
        name = check_name(body.get("name"))
        role = check_role(body.get("role", "viewer")) if kind == "token" else "viewer"
        devices = None
        if kind == "share":
            raw = body.get("devices") or []
            devices = sorted({d.strip() for d in (raw.split(",") if isinstance(raw, str) else raw) if d.strip()})
            if any(not isinstance(d, str) or len(d) > 64 for d in devices):
                raise AccountError("devices: names of at most 64 characters", field="devices")
        secret = new_secret()
        credential_id = accounts.store.add_credential(kind, name, role, digest(secret), secret[:PREFIX_CHARS], devices,
                                                      maker=g.identity.user)
        changed()
        log.info("%s made the %s %s (%s)", g.identity.name, kind, name, role if kind == "token" else
                 ", ".join(devices or ["every device"]))
        base = public_url(config)  # ALERT_DASHBOARD_URL, or the address this request came to
        made = {"kind": kind, "name": name, "secret": secret, "url": f"{base}/s/{secret}" if kind == "share" else None}
        result = {"ok": True, "id": credential_id, "name": name, "role": role, "devices": devices,
                  "done": f"Made the {LABELS[kind]} {name}."}
        result["token" if kind == "token" else "url"] = secret if kind == "token" else made["url"]
        return answer(result, 201, made=made)

    @app.route("/api/<any(tokens, shares):kinds>/<credential_id>", methods=["DELETE", "POST"])
    def remove_credential(kinds, credential_id):
        accounts.store.remove_credential(KINDS[kinds], credential_id)
        changed()
        log.info("%s removed the %s %s", g.identity.name, KINDS[kinds], credential_id)
        return answer({"ok": True, "id": credential_id, "done": f"Removed the {LABELS[KINDS[kinds]]} {credential_id}."})


def _keep_an_admin(accounts, name):
    admins = [user["name"] for user in accounts.store.users() if user["role"] == "admin"]
    if admins == [name]:
        raise AccountError(f"{name} is the last admin: make another admin first", status=409)


def _public(user):
    return {"name": user["name"], "role": user["role"], "createdAt": user["createdAt"]}


def _credential(found):
    return {key: found.get(key) for key in ("id", "name", "role", "prefix", "devices", "createdAt", "lastUsedAt",
                                            "maker")}

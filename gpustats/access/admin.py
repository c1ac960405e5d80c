"""What admins manage: users, API tokens and share links, as JSON for programs and as the /admin page.

Each change is one route that takes JSON or the page's form: a form gets the page back with
what changed (and a new token or link, shown this once), JSON gets JSON. Secrets are made
here, shown once, and kept only as digests; passwords only as slow hashes.
"""
import logging
from dataclasses import dataclass

from flask import Blueprint, current_app, g, jsonify, render_template, request

from gpustats.access.accounts import AccountError, check_name, check_password, check_role
from gpustats.tokens import PREFIX_CHARS, digest, new_secret
from gpustats.web import error, public_url

log = logging.getLogger("gpustats")
KINDS = {"tokens": "token", "shares": "share"}
LABELS = {"token": "API token", "share": "share link"}


bp = Blueprint("admin", __name__)


@dataclass(frozen=True)
class Admin:
    """One app's parts for the admin's routes: the config, the accounts, the password hasher, the devices known."""
    config: object
    accounts: object
    hasher: object
    known_devices: object


def register_admin(app, config, accounts, hasher, known_devices=lambda: []):
    """Add /api/users, /api/tokens, /api/shares and the /admin page; the login lets only admins in."""
    app.extensions.setdefault("gpustats", {})["admin"] = Admin(config, accounts, hasher, known_devices)
    app.register_blueprint(bp)


def _admin():
    return current_app.extensions["gpustats"]["admin"]


def _given():
    """Return the request's fields: its JSON object, or its form; JSON that is not an object gives none."""
    if not request.is_json:
        return request.form
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _answer(result, status=200, made=None):
    if request.is_json or not request.form:
        return jsonify(result), status
    return _page(made=made, done=result.get("done")), status


def _page(made=None, done=None, problem=None):
    admin = _admin()
    store = admin.accounts.store
    return render_template("admin.html", users=store.users(), tokens=store.credentials("token"),
                           shares=store.credentials("share"), made=made, done=done, problem=problem,
                           devices=admin.known_devices())


def _changed():
    _admin().accounts.forget()  # read back at once on this worker; others within a second


@bp.app_errorhandler(AccountError)
def refused(problem):
    if request.is_json or not request.form:
        return error(problem.status, str(problem), field=problem.field)
    return _page(problem=str(problem)), problem.status


@bp.get("/admin")
def admin_page():
    return _page()


@bp.get("/api/users")
def users():
    return jsonify([_public(user) for user in _admin().accounts.store.users()])


@bp.post("/api/users")
def add_user():
    admin, body = _admin(), _given()
    name, role = check_name(body.get("name")), check_role(body.get("role", "viewer"))
    admin.accounts.store.add_user(name, role, admin.hasher.hash(check_password(body.get("password"))))
    _changed()
    log.info("%s added the user %s (%s)", g.identity.name, name, role)
    return _answer({"ok": True, "name": name, "role": role, "done": f"Added {name} ({role})."}, 201)


@bp.route("/api/users/<name>", methods=["PATCH", "POST"])
def change_user(name):
    admin, body = _admin(), _given()
    if request.form.get("remove") or body.get("remove"):
        return remove_user(name)
    if body.get("role"):
        role = check_role(body["role"])
        if role != "admin":
            _keep_an_admin(admin.accounts, name)
        revoked = admin.accounts.set_role(name, role)
        done = f"{name} is now {role}." + (f" Revoked {revoked} admin tokens they made." if revoked else "")
    elif body.get("password"):
        admin.accounts.set_password(name, admin.hasher.hash(check_password(body["password"])))
        done = f"{name}'s password is reset; their sessions are signed out."
    else:
        raise AccountError("give a role or a password", field="role")
    _changed()
    log.info("%s changed the user %s: %s", g.identity.name, name, done)
    return _answer({"ok": True, "name": name, "done": done})


@bp.delete("/api/users/<name>")
def remove_user(name):
    accounts = _admin().accounts
    _keep_an_admin(accounts, name)
    if name == g.identity.name and g.identity.kind == "user":
        raise AccountError("you cannot remove yourself", status=409)
    revoked = accounts.remove_user(name)  # their sessions end, and the tokens and links they made
    _changed()
    log.info("%s removed the user %s (and %d tokens and links they made)", g.identity.name, name, revoked)
    return _answer({"ok": True, "name": name, "revoked": revoked,
                    "done": f"Removed {name}" + (f" and the {revoked} tokens and links they made." if revoked
                                                 else ".")})


@bp.get("/api/<any(tokens, shares):kinds>")
def credentials(kinds):
    return jsonify([_credential(c) for c in _admin().accounts.store.credentials(KINDS[kinds])])


@bp.post("/api/<any(tokens, shares):kinds>")
def add_credential(kinds):
    admin, kind, body = _admin(), KINDS[kinds], _given()
    name = check_name(body.get("name"))
    role = check_role(body.get("role", "viewer")) if kind == "token" else "viewer"
    devices = _share_devices(body) if kind == "share" else None
    secret = new_secret()
    maker = g.identity.user
    made_by = admin.accounts.user(maker) if maker else None
    if maker and made_by is None:  # its maker was removed a moment ago, on another worker: it makes nothing more
        raise AccountError("this token's user no longer exists", status=401)
    credential_id = admin.accounts.store.add_credential(kind, name, role, digest(secret), secret[:PREFIX_CHARS],
                                                        devices, maker=maker,
                                                        maker_since=made_by["createdAt"] if made_by else None)
    _changed()
    log.info("%s made the %s %s (%s)", g.identity.name, kind, name, role if kind == "token" else
             ", ".join(devices or ["every device"]))
    base = public_url(admin.config)  # ALERT_DASHBOARD_URL, or the address this request came to
    made = {"kind": kind, "name": name, "secret": secret, "url": f"{base}/s/{secret}" if kind == "share" else None}
    result = {"ok": True, "id": credential_id, "name": name, "role": role, "devices": devices,
              "done": f"Made the {LABELS[kind]} {name}."}
    result["token" if kind == "token" else "url"] = secret if kind == "token" else made["url"]
    return _answer(result, 201, made=made)


@bp.route("/api/<any(tokens, shares):kinds>/<credential_id>", methods=["DELETE", "POST"])
def remove_credential(kinds, credential_id):
    _admin().accounts.store.remove_credential(KINDS[kinds], credential_id)
    _changed()
    log.info("%s removed the %s %s", g.identity.name, KINDS[kinds], credential_id)
    return _answer({"ok": True, "id": credential_id, "done": f"Removed the {LABELS[KINDS[kinds]]} {credential_id}."})


def _share_devices(body):
    """Return the devices a new share link opens, sorted, from a list or a comma-separated string ([]: every one)."""
    raw = body.get("devices") or []
    listed = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(listed, list) or any(not isinstance(d, str) or len(d.strip()) > 64 for d in listed):
        raise AccountError("devices: names of at most 64 characters", field="devices")
    return sorted({d.strip() for d in listed if d.strip()})


def _keep_an_admin(accounts, name):
    admins = [user["name"] for user in accounts.store.users() if user["role"] == "admin"]
    if admins == [name]:
        raise AccountError(f"{name} is the last admin: make another admin first", status=409)


def _public(user):
    return {"name": user["name"], "role": user["role"], "createdAt": user["createdAt"]}


def _credential(found):
    return {key: found.get(key) for key in ("id", "name", "role", "prefix", "devices", "createdAt", "lastUsedAt",
                                            "maker")}

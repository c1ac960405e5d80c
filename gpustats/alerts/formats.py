"""Write an alert in each receiver's own format: Alertmanager webhook, ntfy, Discord, Slack. No I/O."""
import base64
import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import unquote, urlsplit

KINDS = {"http": "webhook", "https": "webhook", "ntfy+http": "ntfy", "ntfy+https": "ntfy",
         "discord+http": "discord", "discord+https": "discord", "slack+http": "slack", "slack+https": "slack"}
JSON = {"Content-Type": "application/json"}
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt while an alert fires
TOPIC = re.compile(r"^[-_A-Za-z0-9]{1,64}$")  # ntfy's topic names
HOST = re.compile(r"^[A-Za-z0-9.:-]+$")
# Bidi overrides and isolates make a name read backwards ("Trojan Source"); line breaks would
# start a new Markdown line or header.
BIDI = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}
BREAKS = re.compile(r"[\r\n\t\v\f\x1c-\x1e\x85\u2028\u2029]+")
DISCORD_MARKDOWN = {c: "\\" + c for c in "\\*_~`|>#-[]()"}  # as discord.py's escape_markdown
DISCORD_MENTION = re.compile(r"@(everyone|here|[!&]?\d{17,20})")  # as discord.py's escape_mentions
SLACK = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}  # Slack's control characters, and only those


@dataclass(frozen=True)
class Destination:
    """One receiver of alert messages; `url`, `topic` and `auth` are secrets, `label` and `id` are not."""
    kind: str  # webhook, ntfy, discord or slack
    label: str  # kind and scheme://host: safe for logs
    id: str  # the first 12 hex digits of the entry's sha256
    url: str = field(repr=False)  # what to POST to
    topic: str = field(default="", repr=False)  # ntfy's; on ntfy.sh the topic name is the secret
    auth: str = field(default="", repr=False)  # ntfy's Authorization header


def parse_destinations(raw):
    """Read ALERT_WEBHOOK_URLS; a bad entry raises ValueError naming it by position, scheme and host."""
    found, seen = [], {}
    for n, entry in enumerate((e.strip() for e in raw.split(",") if e.strip()), 1):
        destination = _destination(n, entry)
        if destination.id in seen:
            raise ValueError(f"entry {n} ({_name(entry)}): the same as entry {seen[destination.id]}")
        seen[destination.id] = n
        found.append(destination)
    return tuple(found)


def _name(entry):
    """Name an entry by scheme and host: its path, query and userinfo may hold secrets."""
    parts = urlsplit(entry)
    if not parts.scheme or not entry[len(parts.scheme):].startswith("://"):
        return "…"  # "user:pass@host" reads as scheme "user": show none of it
    host = parts.hostname or ""
    return f"{parts.scheme.lower()}://{host if HOST.match(host) else ''}/…"


def _destination(n, entry):
    def bad(problem):
        return ValueError(f"entry {n} ({_name(entry)}): {problem}")
    parts = urlsplit(entry)
    kind = KINDS.get(parts.scheme.lower())
    if kind is None:
        raise bad("not a kind of URL this server sends to; use http(s)://, ntfy+https://host/topic, "
                  "discord+https://… or slack+https://…")
    host = parts.hostname or ""
    if not HOST.match(host):
        raise bad("has no host")
    try:
        port = parts.port
    except ValueError:
        raise bad("has a port that is not a number from 0 to 65535") from None
    scheme = parts.scheme.lower().rpartition("+")[2]
    netloc = (f"[{host}]" if ":" in host else host) + (f":{port}" if port is not None else "")
    query = f"?{parts.query}" if parts.query else ""
    ident = hashlib.sha256(entry.encode()).hexdigest()[:12]
    common = {"kind": kind, "label": f"{kind} {scheme}://{netloc}", "id": ident}
    if kind == "webhook":
        return Destination(url=parts._replace(fragment="").geturl(), **common)
    if kind == "ntfy":
        root, _, topic = parts.path.rstrip("/").rpartition("/")
        if not TOPIC.match(topic):
            raise bad("needs a topic: ntfy+https://host/topic (letters, digits, - and _, at most 64)")
        return Destination(url=f"{scheme}://{netloc}{root}/{query}", topic=topic, auth=_ntfy_auth(parts), **common)
    if parts.path.strip("/") == "":
        raise bad("has no webhook path")
    url = f"{scheme}://{parts.netloc}{parts.path}"
    if kind == "discord":  # without wait=true, Discord answers 204 even for a message it did not save
        params = [p for p in parts.query.split("&") if p and not p.startswith("wait=")]
        return Destination(url=f"{url}?{'&'.join(params + ['wait=true'])}", **common)
    return Destination(url=url + query, **common)


def _ntfy_auth(parts):
    """Read credentials the way Apprise and shoutrrr write them: user:pass@, token@ or :token@."""
    user, password = unquote(parts.username or ""), unquote(parts.password or "")
    if user and password:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return f"Bearer {password or user}" if password or user else ""


def clean(text):
    """Return agent-controlled text on one line: NFC, no control characters, no bidi overrides."""
    text = BREAKS.sub(" ", unicodedata.normalize("NFC", str(text)))
    return "".join(c for c in text if c not in BIDI and unicodedata.category(c) != "Cc").strip()


def fit(text, limit, escape=None):
    """Escape `text`, then cut it to `limit` code points ending in "…", never inside an escape."""
    pieces = [escape.get(c, c) for c in text] if escape else text
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    kept, size = [], 0
    for piece in pieces:
        if size + len(piece) > limit - 1:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept).rstrip() + "…"


def fit_bytes(text, limit):
    """Cut `text` to `limit` bytes of UTF-8 ending in "…", on a code point."""
    data = text.encode()
    return text if len(data) <= limit else data[:limit - 3].decode(errors="ignore").rstrip() + "…"


def where(alert):
    """Return "device:gpu", or "device" for a device alert."""
    return f"{alert['device']}:{alert['gpu']}" if alert.get("gpu") is not None else alert["device"]


def _value(value):
    if value is None or isinstance(value, bool):
        return None
    return str(value) if isinstance(value, int) else f"{value:.2f}".rstrip("0").rstrip(".")


def _time(text):
    try:
        return datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None


def lasted(alert):
    """Return how long a resolved alert fired, in words ("7 min"), or "" if its times do not say."""
    start, end = _time(alert.get("startsAt")), _time(alert.get("endsAt"))
    if start is None or end is None or end < start:
        return ""
    seconds = int((end - start).total_seconds())
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def _link(external_url):
    return external_url.rstrip("/") + "/" if external_url else ""


def _chat_skips(alert):
    # A finished job resolves the instant it fires: a chat "resolved" would be noise.
    return alert["alertname"] == "GpuJobDone" and alert["status"] == "resolved"


def _title(alert):
    return f"[{alert['status'].upper()}] {alert['alertname']} {where(alert)}"


def _when(alert):
    """Return the words for when: "since <start>", or "resolved <end> (after 7 min)"."""
    if alert["status"] == "firing":
        return f"since {alert['startsAt']}"
    took = lasted(alert)
    return f"resolved {alert.get('endsAt')}" + (f" (after {took})" if took else "")


def message(destination, alert, external_url):
    """Return (url, headers, body) of `alert` for `destination`, or None if it gets no message."""
    if destination.kind != "webhook" and _chat_skips(alert):
        return None
    return WRITERS[destination.kind](destination, alert, external_url)


def _webhook(destination, alert, external_url):
    labels = {"alertname": alert["alertname"], "device": alert["device"], "severity": alert["severity"]}
    if alert.get("gpu") is not None:
        labels["gpu"] = str(alert["gpu"])
    if alert.get("mount") is not None:  # DiskFull: one alert per disk, as its fingerprint says
        labels["mount"] = clean(alert["mount"])
    labels = dict(sorted(labels.items()))
    group = {k: v for k, v in labels.items() if k != "severity"}
    annotations = {"summary": clean(alert.get("summary") or "")}
    ends = (alert.get("endsAt") or ZERO_TIME) if alert["status"] == "resolved" else ZERO_TIME
    return destination.url, JSON, {
        "version": "4", "groupKey": "{}:{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in group.items()) + "}",
        "truncatedAlerts": 0, "status": alert["status"], "receiver": "gpustats", "groupLabels": group,
        "commonLabels": labels, "commonAnnotations": annotations, "externalURL": external_url.rstrip("/"),
        "alerts": [{"status": alert["status"], "labels": dict(labels), "annotations": dict(annotations),
                    "startsAt": alert["startsAt"], "endsAt": ends, "generatorURL": _link(external_url),
                    "fingerprint": alert["fingerprint"]}]}


def _ntfy(destination, alert, external_url):
    firing, done = alert["status"] == "firing", alert["alertname"] == "GpuJobDone"
    value = _value(alert.get("value"))
    detail = (f"value {value}, " if value and firing else "") + _when(alert)
    summary = fit_bytes(clean(alert.get("summary") or "") or "—", 4096 - len(detail.encode()) - 1)
    if not firing:
        priority, tag = 2, "white_check_mark"
    elif done:  # good news, not an emergency
        priority, tag = 3, "tada"
    elif alert["alertname"] == "GpuIdleHeld":  # memory someone else could use, not a fire
        priority, tag = 3, "zzz"
    else:
        priority, tag = 4, "rotating_light" if alert["severity"] == "critical" else "warning"
    body = {"topic": destination.topic, "title": clean(_title(alert)), "message": f"{summary}\n{detail}",
            "priority": priority, "tags": [tag, alert["alertname"]]}
    if external_url:
        body["click"] = _link(external_url)
    return destination.url, {**JSON, **({"Authorization": destination.auth} if destination.auth else {})}, body


def _discord_text(text, limit):
    """Defuse mentions and Markdown in agent text (allowed_mentions stops pings; this stops the look)."""
    return fit(DISCORD_MENTION.sub("@\u200b\\1", clean(text)), limit, DISCORD_MARKDOWN)


def _discord(destination, alert, external_url):
    firing = alert["status"] == "firing"
    named = [("Device", alert["device"]), ("GPU", alert.get("gpu")), ("Value", _value(alert.get("value"))),
             ("Severity", alert["severity"])]
    # Names, numbers and the title are the server's own ([A-Za-z0-9._-]), unescaped: Discord shows
    # the backslashes of escapes in a title that links (TASVideos/tasvideos#1753).
    fields = [{"name": name, "value": fit(clean(value), 1024) or "—", "inline": True}
              for name, value in named if value is not None]
    if alert.get("mount") is not None:  # the agent's text, not the server's: escaped like the summary
        fields.insert(1, {"name": "Mount", "value": _discord_text(alert["mount"], 1024) or "—", "inline": True})
    embed = {"title": fit(clean(_title(alert)), 256),
             "color": (3447003 if alert["alertname"] == "GpuJobDone" else 10038562) if firing else 3066993,
             "fields": fields, "footer": {"text": f"{alert['alertname']} · {alert['fingerprint']}"}}
    took = lasted(alert)
    ended = "" if firing else "\nResolved" + (f" after {took}" if took else "")
    # Discord caps the sum of every title, description, field and footer at 6000.
    room = 6000 - len(embed["title"]) - len(embed["footer"]["text"]) - len(ended) - sum(
        len(f["name"]) + len(f["value"]) for f in fields)
    embed["description"] = (_discord_text(alert.get("summary") or "", min(4096 - len(ended), room)) or "—") + ended
    stamp = alert["startsAt"] if firing else alert.get("endsAt")
    if _time(stamp) is not None:  # a bad timestamp makes Discord refuse the whole message
        embed["timestamp"] = stamp
    if external_url:
        embed["url"] = _link(external_url)
    return destination.url, JSON, {"username": "gpustats", "allowed_mentions": {"parse": []}, "embeds": [embed]}


def _slack(destination, alert, external_url):
    firing, status = alert["status"] == "firing", alert["status"].upper()
    mark = {"GpuJobDone": "🎉", "GpuIdleHeld": "💤"}.get(alert["alertname"], "🔥") if firing else "✅"
    summary = clean(alert.get("summary") or "") or "—"
    value = _value(alert.get("value"))
    context = " · ".join(([f"value {value}"] if value and firing else []) + [_when(alert), alert["fingerprint"]])
    elements = [{"type": "plain_text", "text": fit(context, 2000, SLACK)}]
    if external_url:
        elements.append({"type": "mrkdwn", "text": f"<{fit(_link(external_url), 1900, SLACK)}|dashboard>"})
    took = lasted(alert)
    text = f"{_title(alert)}: {summary}" if firing else _title(alert) + (f" (after {took})" if took else "")
    # Every text object is escaped: Slack parses & < > in plain_text too ("text objects").
    return destination.url, JSON, {"text": fit(clean(text), 3000, SLACK), "mrkdwn": False, "blocks": [
        {"type": "header", "text": {"type": "plain_text", "text": fit(
            f"{mark} {status}: {alert['alertname']} on {where(alert)}", 150, SLACK)}},
        {"type": "section", "text": {"type": "plain_text", "text": fit(summary, 3000, SLACK)}},
        {"type": "context", "elements": elements}]}


WRITERS = {"webhook": _webhook, "ntfy": _ntfy, "discord": _discord, "slack": _slack}

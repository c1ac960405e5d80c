"""GET /api/jobs, /api/usage and their .csv: who ran what on which GPUs, and who used how much.

Both read the store a page of jobs at a time and write the answer as they go, letting pushes
and streams in between; at most JOBS_AT_ONCE answers are in progress in a worker, and
JOBS_PER_CLIENT from one address, as for history. A share link sees its devices' jobs alone.
"""
import csv
import io
import itertools
import time

import orjson
from flask import Blueprint, Response, current_app, request

from gpustats.devices.registry import DEVICE_NAME
from gpustats.history.routes import Slots
from gpustats.jobs.report import BY, USAGE_FIELDS, usage, view
from gpustats.offload import cooperate
from gpustats.scaleout import Unavailable
from gpustats.web import QueryError, allowed_devices, error, requester_key, rfc3339, safe_cell, unix_seconds

DEFAULT_RANGE_S = 7 * 86400  # what a query that names no `from` covers: a lab's week
JOBS_AT_ONCE, JOBS_PER_CLIENT, SLOT_WAIT_S = 8, 4, 10.0
ROWS = 200  # jobs written at a time: one slice of work between pushes and streams
CSV_HEADER = ("id", "device", "gpus", "pid", "name", "command", "user", "startedAt", "startTime", "endedAt", "endTime",
              "ended", "durationS", "gpuHours", "peakMemory", "meanUtilization", "energyWh")

bp = Blueprint("jobs", __name__)


class JobRoutes:
    """One app's parts for the jobs' routes: the store, the settings, the clock and the answers in progress."""

    def __init__(self, config, jobs, clock):
        self.config, self.jobs, self.clock = config, jobs, clock
        self.slots = Slots(JOBS_AT_ONCE, JOBS_PER_CLIENT)


def register_jobs(app, config, jobs, clock=time.time):
    """Add /api/jobs and /api/usage with their CSV, behind the viewer login like the page."""
    app.extensions.setdefault("gpustats", {})["job_routes"] = JobRoutes(config, jobs, clock)
    app.register_blueprint(bp)


def read_query(args, now, usage_too=False):
    """Return {start, end, devices, user, running, by} from the query string; raise QueryError naming a bad one."""
    end = unix_seconds(args, "to", round(now, 3))  # a job begun this second is in it
    start = unix_seconds(args, "from", end - DEFAULT_RANGE_S)
    if start >= end:
        raise QueryError("from", f"{start:g} is not before to ({end:g})")
    devices = None
    if args.get("device"):
        devices = set(args["device"].split(","))
        bad = next((name for name in sorted(devices) if not DEVICE_NAME.fullmatch(name)), None)
        if bad is not None:
            raise QueryError("device", f"{bad[:64]!r} is not a device name (1-64 letters, digits, '.', '_' or '-')")
    user = args.get("user")
    if user is not None and not 0 < len(user) <= 128:
        raise QueryError("user", "1 to 128 characters: a user name as the agent sends it")
    running = args.get("running", "0")
    if running not in ("0", "1"):
        raise QueryError("running", f"{running[:32]!r} is not 1 (running jobs only) or 0")
    by = args.get("by", "user") if usage_too else None
    if usage_too and by not in BY:
        raise QueryError("by", f"{by[:32]!r} is not user or device")
    return {"start": start, "end": end, "devices": devices, "user": user, "running": running == "1", "by": by}


def _answer(render, mimetype, usage_too=False, filename=None):
    parts = current_app.extensions["gpustats"]["job_routes"]
    try:
        query = read_query(request.args, parts.clock(), usage_too)
    except QueryError as problem:
        return error(400, str(problem), field=problem.field)
    shown = allowed_devices()
    if shown is not None:  # a share link: its devices alone, and another device is as if it did not exist
        if query["devices"] is not None and not query["devices"] <= set(shown):
            return error(404, f"unknown device {sorted(query['devices'] - set(shown))[0][:64]!r}")
        query["devices"] = set(shown) if query["devices"] is None else query["devices"]
    address = requester_key(parts.config.trusted_proxies)
    if not parts.slots.take(address, SLOT_WAIT_S):
        return error(503, f"{JOBS_AT_ONCE} job answers are in progress; try again shortly", headers={"Retry-After": "2"})
    try:
        found = iter(parts.jobs.find(query["start"], query["end"], query["devices"], query["user"], query["running"]))
        head = next(found, None)  # read before the answer starts: a store that is down is a 503 here
        pieces = render(query, itertools.chain([head], found) if head is not None else found)
        first = next(pieces)
    except BaseException:
        parts.slots.give_back(address)
        raise
    headers = {"Cache-Control": "no-store"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    response = Response(_chained(first, pieces), mimetype=mimetype, headers=headers)
    response.call_on_close(lambda: parts.slots.give_back(address))
    return response


def _chained(first, rest):
    yield first
    try:
        yield from rest
    except Unavailable as problem:  # the answer has begun: end it short, say why once
        current_app.logger.warning("a jobs answer was cut short: %s", problem)


@bp.get("/api/jobs")
def jobs_json():
    return _answer(json_pieces, "application/json")


@bp.get("/api/jobs.csv")
def jobs_csv():
    return _answer(csv_pieces, "text/csv", filename="jobs.csv")


@bp.get("/api/usage")
def usage_json():
    return _answer(usage_json_pieces, "application/json", usage_too=True)


@bp.get("/api/usage.csv")
def usage_csv():
    return _answer(usage_csv_pieces, "text/csv", usage_too=True, filename="usage.csv")


def json_pieces(query, jobs):
    """Yield {"jobs": [...]} as JSON bytes, ROWS jobs at a time, letting the event loop run between them."""
    yield b'{"jobs":['
    chunk = []
    for n, job in enumerate(jobs):
        chunk.append((b"," if n else b"") + orjson.dumps(view(job)))
        if len(chunk) == ROWS:
            yield b"".join(chunk)
            chunk = []
            cooperate()
    yield b"".join(chunk) + b"]}"


def csv_pieces(query, jobs):
    """Yield the jobs as CSV bytes: a header, then one row per job, ROWS at a time."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    yield _taken(out)
    for n, job in enumerate(jobs):
        shown = view(job)
        writer.writerow([_cell(shown, field) for field in CSV_HEADER])
        if n % ROWS == ROWS - 1:
            yield _taken(out)
            cooperate()
    yield _taken(out)


def _cell(job, field):
    if field == "gpus":
        return " ".join(map(str, job["gpus"]))
    if field in ("startTime", "endTime"):
        t = job["startedAt" if field == "startTime" else "endedAt"]
        return "" if t is None else rfc3339(t)
    value = job[field]
    if field in ("name", "command", "user"):  # sent by agents: nothing a spreadsheet would run
        return safe_cell(value)
    return "" if value is None else value


def _usage(query, jobs):
    return {"from": query["start"], "to": query["end"], "by": query["by"],
            "rows": usage(jobs, query["start"], query["end"], query["by"])}


def usage_json_pieces(query, jobs):
    yield orjson.dumps(_usage(query, jobs))


def usage_csv_pieces(query, jobs):
    answer = _usage(query, jobs)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow((answer["by"], *USAGE_FIELDS))
    for row in answer["rows"]:
        writer.writerow((safe_cell(row["key"]), *("" if row[f] is None else row[f] for f in USAGE_FIELDS)))
    yield _taken(out)


def _taken(out):
    data = out.getvalue().encode()
    out.seek(0)
    out.truncate()
    return data


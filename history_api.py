"""GET /api/history and /api/history.csv: one device's GPUs over a range, in buckets of a step."""
import csv
import io
import json
import re
import threading
import time
import unicodedata

from flask import Response, request

from history import FIELDS, QueryError, RawJSON, answer, plan, rfc3339
from ingest import error
from offload import cooperate

# Unix seconds as digits: float() would also take ' 1e3', '1_000', 'nan' and 'inf'.
UNIX_S = re.compile(r"[0-9]{1,11}(\.[0-9]{1,9})?", re.ASCII)
STEP_S = re.compile(r"[0-9]{1,9}", re.ASCII)
CSV_HEADER = ("device", "gpu", "uuid", "name", "t", "time", *FIELDS, "energyWh")


def register_history(app, config, history, clock=time.time):
    """Add the history routes; they sit behind the viewer login like the page."""
    shared = SharedAnswers()

    def serve(render, mimetype, headers=None):
        now = clock()
        try:
            device, start, end, step = read_query(request.args, now, config.history_s)
            tier, step = plan(start, end, now, step)
        except QueryError as problem:
            return error(400, str(problem), field=problem.field)
        def read():
            result = history.query(device, tier, start, end, step)
            return None if result is None else render(result)
        body = shared.get((render, device, start, end, step), int(now), read)
        if body is None:
            if device not in config.devices:
                return error(404, f"unknown device {device[:64]!r}")
            body = render(answer(device, start, end, step, {}, {}))  # known, but it has not pushed yet
        return Response(body, mimetype=mimetype, headers={"Cache-Control": "no-store", **(headers or {})})

    @app.get("/api/history")
    def history_json():
        return serve(to_json, "application/json")

    @app.get("/api/history.csv")
    def history_csv():
        device = re.sub(r"[^A-Za-z0-9._-]", "_", request.args.get("device", ""))[:64]
        return serve(to_csv, "text/csv", {"Content-Disposition": f'attachment; filename="history-{device}.csv"'})


class SharedAnswers:
    """One answer for every request of the same query in the same second, computed once.

    After a deploy every open page reconnects and asks for the same history at once; they
    wait on the first one's answer instead of each queueing its own. Writes land once a
    second, so an answer cannot change within one.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._second, self._answers = None, {}  # key -> [done, body, problem]

    def get(self, key, second, compute):
        with self._lock:
            if second != self._second:
                self._second, self._answers = second, {}
            found = self._answers.get(key)
            if found is None:
                found = self._answers[key] = [threading.Event(), None, None]
                mine = True
            else:
                mine = False
        if mine:
            try:
                found[1] = compute()
            except BaseException as problem:  # a killed greenlet too: the others must not take "no history"
                found[2] = problem
                raise
            finally:
                found[0].set()
        found[0].wait()
        if found[2] is not None:
            raise found[2].with_traceback(None)  # each waiter's own traceback, not a growing shared one
        return found[1]


def read_query(args, now, history_s):
    """Return (device, from, to, step or None) from the query string; raise QueryError naming a bad one."""
    device = args.get("device", "")
    if not device:
        raise QueryError("device", "missing; name the device: ?device=NAME")
    end = _unix_s(args, "to", int(now))  # whole seconds: the same query in one second is the same
    start = _unix_s(args, "from", end - history_s)
    if start >= end:
        raise QueryError("from", f"{start:g} is not before to ({end:g})")
    step = args.get("step")
    if step is not None:
        if not STEP_S.fullmatch(step) or int(step) < 1:
            raise QueryError("step", f"{step[:32]!r} is not a whole number of seconds, 1 or more")
        step = int(step)
    return device, start, end, step


def _unix_s(args, name, default):
    raw = args.get(name)
    if raw is None:
        return default
    if not UNIX_S.fullmatch(raw):
        raise QueryError(name, f"{raw[:32]!r} is not a time in unix seconds, like {1763900000}")
    return float(raw) if "." in raw else int(raw)


def to_json(result):
    """Encode an answer as JSON bytes, a series at a time, letting the event loop run between them.

    Series SQLite built are sent as they are; 10,000 points of 8 GPUs in one json.dumps
    would hold the loop for ~50 ms.
    """
    def encode(value):
        if isinstance(value, RawJSON):
            return value
        if isinstance(value, list):
            cooperate()  # a series of up to 10,000 numbers is about 1 ms of work
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    gpus = ["{" + ",".join(f"{encode(key)}:{encode(value)}" for key, value in gpu.items() if key != "energyWhSteps")
            + "}" for gpu in result["gpus"]]
    head = encode({key: value for key, value in result.items() if key != "gpus"})
    return f'{head[:-1]},"gpus":[{",".join(gpus)}]}}'.encode()


def to_csv(result):
    """Encode an answer as CSV: a header, then one row per GPU and bucket, with that bucket's energy."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for gpu in result["gpus"]:
        gpu = {key: json.loads(value) if isinstance(value, RawJSON) else value for key, value in gpu.items()}
        for i, t in enumerate(gpu["t"]):
            if i % 100 == 99:
                cooperate()  # 100 rows are about 1 ms of work: pushes and streams go on between them
            writer.writerow((result["device"], gpu["index"], safe_cell(gpu["uuid"]), safe_cell(gpu["name"]), t, rfc3339(t),
                             *("" if gpu[f][i] is None else gpu[f][i] for f in FIELDS), gpu["energyWhSteps"][i]))
    return out.getvalue().encode()


FORMULA = ("=", "+", "-", "@")


def safe_cell(text):
    """Return agent-sent text safe to open in a spreadsheet: nothing it could run as a formula.

    Spreadsheets skip leading spaces (U+3000 too) and read full-width signs (＝ ＋ － ＠) as
    their ASCII forms, and a tab or carriage return first starts a formula in some (OWASP's
    CSV injection list): each of those gets the `'` guard as well.
    """
    text = text or ""
    first = unicodedata.normalize("NFKC", text.lstrip()[:1])
    return "'" + text if first in FORMULA or text[:1] in ("\t", "\r") else text

"""GET /api/history and /api/history.csv: one device's GPUs, and its host, over a range, in buckets of a step.

An answer is read and written one GPU at a time, so what a client that reads slowly (or
never) holds is one GPU's series, not the whole answer: 5 such clients of the CSV held
336 MiB before (issue 20). At most HISTORY_AT_ONCE answers are in progress in a worker, and
HISTORY_PER_CLIENT from one address; a request waits up to SLOT_WAIT_S for its turn.
"""
import csv
import io
import json
import logging
import re
import threading
import time

from flask import Response, request

from gpustats.history.tiers import FIELDS, SYSTEM_FIELDS, RawJSON, head, plan, split_host, system_of
from gpustats.offload import cooperate
from gpustats.scaleout import Unavailable
from gpustats.web import QueryError, allowed_devices, error, requester_key, rfc3339, safe_cell, unix_seconds

log = logging.getLogger("gpustats")
STEP_S = re.compile(r"[0-9]{1,9}", re.ASCII)
# The host's rows (gpu "system") fill the last four columns, and the GPUs' rows the others (docs/API.md).
HOST_COLUMNS = ("cpuPercent", "systemMemoryUsed", "netRx", "netTx")
CSV_HEADER = ("device", "gpu", "uuid", "name", "t", "time", *FIELDS, "energyWh", *HOST_COLUMNS)
HISTORY_AT_ONCE, HISTORY_PER_CLIENT, SLOT_WAIT_S = 8, 4, 10.0
CSV_ROWS = 200  # rows written at a time: one slice of work between pushes and streams (docs/PERFORMANCE.md)
SHARED_BYTES = 16 << 20  # series kept to share within a second, at most


def register_history(app, config, history, clock=time.time, known_devices=None):
    """Add the history routes; they sit behind the viewer login like the page."""
    shared = SharedAnswers()
    slots = Slots(HISTORY_AT_ONCE, HISTORY_PER_CLIENT)

    def serve(render, mimetype, headers=None):
        now = clock()
        try:
            device, start, end, step = read_query(request.args, now, config.history_s)
            tier, step = plan(start, end, now, step)
        except QueryError as problem:
            return error(400, str(problem), field=problem.field)
        if allowed_devices() is not None and device not in allowed_devices():  # a share link of other devices
            return error(404, f"unknown device {device[:64]!r}")
        address = requester_key(config.trusted_proxies)
        if not slots.take(address, SLOT_WAIT_S):
            return error(503, f"{HISTORY_AT_ONCE} history answers are in progress; try again shortly",
                         headers={"Retry-After": "2"})
        try:
            second = int(now)
            kept = shared.get(("gpus", device), second, lambda: history.gpus(device))
            if kept is None and device not in (known_devices() if known_devices else config.devices):
                slots.give_back(address)
                return error(404, f"unknown device {device[:64]!r}")

            def read(key):
                return shared.get(("series", key, tier, start, end, step), second,
                                  lambda: history.series(key, tier, start, end, step), weigh=_bytes)
            gpus, host = split_host(kept)
            series = _series(gpus, read)
            first = next(series, None)  # read before the answer starts: a store that is down is a 503 here
        except BaseException:
            slots.give_back(address)
            raise
        pieces = render(head(device, start, end, step), _chained(first, series), lambda: _system(host, read))
        response = Response(pieces, mimetype=mimetype, headers={"Cache-Control": "no-store", **(headers or {})})
        response.call_on_close(lambda: slots.give_back(address))
        return response

    @app.get("/api/history")
    def history_json():
        return serve(json_pieces, "application/json")

    @app.get("/api/history.csv")
    def history_csv():
        device = re.sub(r"[^A-Za-z0-9._-]", "_", request.args.get("device", ""))[:64]
        return serve(csv_pieces, "text/csv", {"Content-Disposition": f'attachment; filename="history-{device}.csv"'})


def _series(gpus, read):
    """Yield each GPU's series that has points, with its index, uuid and name, reading one at a time."""
    for index, uuid, name, key in gpus:
        found = read(key)
        if found:
            yield {"index": index, "uuid": uuid, "name": name, **found}


def _system(key, read):
    """Return the host's series as the answer's `system`, read after the GPUs; None if it has no points there."""
    if key is None:
        return None
    try:
        found = read(key)
    except Unavailable as problem:  # the answer has begun: it goes without the host, said once
        log.warning("a history answer went without its host: %s", problem)
        return None
    return system_of(found) if found else None


def _chained(first, rest):
    if first is None:
        return
    yield first
    try:
        yield from rest
    except Unavailable as problem:  # the answer has begun: end it short, say why once
        log.warning("a history answer was cut short: %s", problem)


def _bytes(series):
    """Return about how many bytes a series holds (to bound what is kept to share)."""
    if series is None:
        return 0
    return sum(len(value) if isinstance(value, RawJSON) else 8 * len(value) if isinstance(value, list) else 8
               for value in series.values())


class Slots:
    """At most `total` things in progress at once, `per_client` of them from one address; the rest wait their turn."""

    def __init__(self, total, per_client):
        self._total, self._per_client = total, per_client
        self._cond = threading.Condition()
        self._held, self._by = 0, {}  # in progress in all, and by address

    def take(self, address, wait_s):
        """Take a slot for `address`, waiting up to `wait_s`; return whether one was taken."""
        deadline = time.monotonic() + wait_s
        with self._cond:
            while self._held >= self._total or self._by.get(address, 0) >= self._per_client:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    if self._held < self._total and self._by.get(address, 0) < self._per_client:
                        break
                    return False
            self._held += 1
            self._by[address] = self._by.get(address, 0) + 1
            return True

    def give_back(self, address):
        with self._cond:
            self._held -= 1
            left = self._by[address] - 1
            if left:
                self._by[address] = left
            else:
                del self._by[address]
            self._cond.notify_all()


class SharedAnswers:
    """One result for every request of the same query in the same second, computed once.

    After a deploy every open page reconnects and asks for the same history at once; they
    wait on the first one's result instead of each queueing its own. Writes land once a
    second, so a result cannot change within one. At most SHARED_BYTES of results are kept
    for later requests; past that a result goes only to those already waiting for it.
    """

    def __init__(self, most_bytes=SHARED_BYTES):
        self._lock = threading.Lock()
        self._most = most_bytes
        self._second, self._answers, self._bytes = None, {}, 0  # key -> [done, result, problem]

    def get(self, key, second, compute, weigh=lambda result: 0):
        with self._lock:
            if second != self._second:
                self._second, self._answers, self._bytes = second, {}, 0
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
            size = weigh(found[1])
            with self._lock:
                self._bytes += size
                if self._bytes > self._most and self._answers.get(key) is found:
                    del self._answers[key]  # those waiting have it; nobody later
        found[0].wait()
        if found[2] is not None:
            raise found[2].with_traceback(None)  # each waiter's own traceback, not a growing shared one
        return found[1]


def read_query(args, now, history_s):
    """Return (device, from, to, step or None) from the query string; raise QueryError naming a bad one."""
    device = args.get("device", "")
    if not device:
        raise QueryError("device", "missing; name the device: ?device=NAME")
    end = unix_seconds(args, "to", int(now))  # whole seconds: the same query in one second is the same
    start = unix_seconds(args, "from", end - history_s)
    if start >= end:
        raise QueryError("from", f"{start:g} is not before to ({end:g})")
    step = args.get("step")
    if step is not None:
        if not STEP_S.fullmatch(step) or int(step) < 1:
            raise QueryError("step", f"{step[:32]!r} is not a whole number of seconds, 1 or more")
        step = int(step)
    return device, start, end, step


def json_pieces(head, series, system=lambda: None):
    """Yield an answer as JSON bytes, a series at a time, letting the event loop run between them; `system()` last.

    Series SQLite built are sent as they are; a whole answer in one json.dumps would hold
    the loop until it is done (docs/PERFORMANCE.md).
    """
    def encode(value):
        if isinstance(value, RawJSON):
            return value
        if isinstance(value, list):
            cooperate()  # a series at a time: pushes and streams go on between (docs/PERFORMANCE.md)
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    yield (encode(head)[:-1] + ',"gpus":[').encode()
    for n, gpu in enumerate(series):
        text = "{" + ",".join(f"{encode(key)}:{encode(value)}" for key, value in gpu.items() if key != "energyWhSteps")
        yield (("," if n else "") + text + "}").encode()
    host = system()
    if host is None:
        yield b"]}"
        return
    yield ('],"system":{' + ",".join(f"{encode(key)}:{encode(value)}" for key, value in host.items()) + "}}").encode()


def _parts(result):
    """Return a whole answer as what render() takes: its head, its GPUs and its host."""
    head = {key: value for key, value in result.items() if key not in ("gpus", "system")}
    return head, result["gpus"], lambda: result.get("system")


def to_json(result):
    """Return a whole answer as JSON bytes."""
    return b"".join(json_pieces(*_parts(result)))


def csv_pieces(head, series, system=lambda: None):
    """Yield an answer as CSV bytes: a header, then one row per GPU and bucket with that bucket's energy, CSV_ROWS at a time.

    Then the host's rows, gpu "system", in their own columns (HOST_COLUMNS) where it has points.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for gpu in series:
        gpu = {key: json.loads(value) if isinstance(value, RawJSON) else value for key, value in gpu.items()}
        uuid, name = safe_cell(gpu["uuid"]), safe_cell(gpu["name"])
        for i, t in enumerate(gpu["t"]):
            writer.writerow((head["device"], gpu["index"], uuid, name, t, rfc3339(t),
                             *("" if gpu[f][i] is None else gpu[f][i] for f in FIELDS), gpu["energyWhSteps"][i],
                             *NO_HOST))
            if i % CSV_ROWS == CSV_ROWS - 1:
                yield _taken(out)
                cooperate()  # pushes and streams go on between slices
    host = system()
    if host is not None:
        host = {key: json.loads(value) if isinstance(value, RawJSON) else value for key, value in host.items()}
        for i, t in enumerate(host["t"]):
            writer.writerow((head["device"], "system", "", "", t, rfc3339(t), *NO_GPU,
                             *("" if host[f][i] is None else host[f][i] for f in SYSTEM_FIELDS)))
            if i % CSV_ROWS == CSV_ROWS - 1:
                yield _taken(out)
                cooperate()
    yield _taken(out)


NO_HOST, NO_GPU = ("",) * len(HOST_COLUMNS), ("",) * (len(FIELDS) + 1)


def _taken(out):
    data = out.getvalue().encode()
    out.seek(0)
    out.truncate()
    return data


def to_csv(result):
    """Return a whole answer as CSV bytes."""
    return b"".join(csv_pieces(*_parts(result)))

"""Property-based attack on POST /push-sse against the real server: over 10,000 pushes a run.

From the structure of the JSON down to its text, its bytes and the HTTP framing around it.
Every push must be refused with a 4xx or accepted whole; never a 5xx, a hang or a dropped
connection. After each property's run, the stream every viewer read, the snapshot a new
viewer gets and /healthz must be exactly what the accepted pushes alone would give.
"""
import http.client
import json
import math
import re
import select
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpustats.ingest import payload
from gpustats.alerts.rules import SEVERITY
from conftest import KEYS, Server, Stream, gpu, host_system, multi, raw_exchange

FUZZ = dict(deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.function_scoped_fixture])
NUMBER_FIELDS = [name for name, check in payload.GPU_FIELDS.items() if check not in (payload._string, payload._boolean)]
STRING_FIELDS = [name for name, check in payload.GPU_FIELDS.items() if check is payload._string]
STALL_S = 0.1  # PUSH_BODY_TIMEOUT_S (its least) on the server the framing is fuzzed on; the others keep the default
# Cases each property sends; together over 10,000 a run.
BUDGET = {"wrong_types_for_numbers": 800, "wrong_types_for_strings": 600, "huge_and_negative_numbers": 800,
          "nan_and_infinity": 800, "deep_nesting": 500, "oversized": 400, "content_type": 500,
          "text": 2000, "bytes": 1700, "numbers": 1200, "duplicate_keys": 600, "wire": 300, "system": 800}


class Target:
    """The real server, one keep-alive client, viewers that read everything, and what they should see."""

    def __init__(self, tmp_path, **settings):
        self.server = Server({"PUSH_RATE_LIMIT": "100000", **settings,
                              # No status changes in the middle of a run: every event is a push's.
                              "STALE_AFTER_S": "3600", "OFFLINE_AFTER_S": "7200"}, tmp_path).start()
        self.connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        self.viewers = [Stream(self.server.port) for _ in range(3)]
        self.seen = [[] for _ in self.viewers]
        self.accepted = []  # ids of accepted pushes, in order
        self.expected = {}  # id -> the GPUs that push should show, as the server's own checks read them
        self.count = 0
        for viewer, seen in zip(self.viewers, self.seen):
            threading.Thread(target=self._read, args=(viewer, seen), daemon=True).start()

    @staticmethod
    def _read(viewer, seen):
        try:
            while True:
                event = viewer.next(timeout=3600)
                seen.append(event)
        except Exception as error:  # the stream ended: recorded, and checked by verify()
            seen.append({"event": ":ended", "id": None, "error": repr(error)})

    def post(self, body, content_type="application/json", key="rig-1"):
        """Send one push; return the answer after checking it is an accepted or refused push."""
        headers = {"Authorization": f"Bearer {KEYS[key]}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        self.count += 1
        # One keep-alive connection through http.client: requests' own work per call was half the run's time.
        # Like urllib3, a connection the server closed while idle (readable before we send) is opened anew;
        # one that drops after a push was sent fails the test.
        sock = self.connection.sock
        if sock is not None and select.select([sock], [], [], 0)[0]:
            self.connection.close()
        self.connection.request("POST", "/push-sse", body=body.encode() if isinstance(body, str) else body,
                                headers=headers)
        answer = self.connection.getresponse()
        return self.judge(answer.status, json.loads(answer.read()), body)

    def judge(self, status, answer, body=None):
        """Check an answer is 200 (then remember it) or a 4xx with a JSON message; return it."""
        assert status == 200 or 400 <= status < 500, (status, answer)
        if status == 200:
            assert answer["ok"] is True and answer["device"] == "rig-1"
            self.accepted.append(answer["id"])
            if body is not None:
                raw = body if isinstance(body, bytes) else body.encode()
                self.expected[answer["id"]] = payload.validate(payload.decode(raw))["gpus"]
        else:
            assert answer["ok"] is False and answer["error"], answer
        return status, answer

    def verify(self):
        """Assert the stream, a new viewer's snapshot and /healthz are those of the accepted pushes alone (and their alerts)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                len(pushes(seen)) < len(self.accepted) for seen in self.seen):
            time.sleep(0.02)
        latest = None
        for seen in self.seen:
            events = pushes(seen)
            for alert in (e["data"] for e in seen if e["event"] == "alert"):  # odd pushes may fire GpuError
                assert alert["device"] == "rig-1" and alert["alertname"] in SEVERITY and alert["summary"]
            assert [e["id"] for e in events] == self.accepted, events[-3:]  # nothing else, nothing lost
            for event in events:
                payload.validate({"gpus": event["data"]["gpus"]})  # what reached a viewer passes the checks
                assert event["data"]["gpus"] == self.expected.get(event["id"], event["data"]["gpus"])
                assert all(math.isfinite(v) for g in event["data"]["gpus"] for v in g.values()
                           if isinstance(v, float))
            latest = events[-1]["data"] if events else None
        snapshot, health = self.server.state()
        if latest is None:
            assert snapshot == [] and health["devices"] == 0
        else:
            [state] = snapshot
            state.pop("snapshot")
            assert state == latest
            assert health["devices"] == health["online"] == 1
        assert health["subscribers"] == len(self.viewers)
        assert "Traceback" not in self.server.output() and "[ERROR]" not in self.server.output()


def pushed():
    """Return a push as agent.py sends it since issue 34: GPUs and the PC around them."""
    return {**multi(gpu(0)), "system": host_system()}


def pushes(seen):
    """Return the events of pushes a viewer read: not comments, not the alerts the pushes fired."""
    return [e for e in seen if e["event"] not in (":comment", "alert")]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    target = Target(tmp_path_factory.mktemp("fuzz"))
    yield target
    target.server.kill()


@pytest.fixture(scope="module")
def stalling_target(tmp_path_factory):
    """A server of its own with a short PUSH_BODY_TIMEOUT_S, so stalled bodies are answered quickly."""
    target = Target(tmp_path_factory.mktemp("fuzz-wire"), PUSH_BODY_TIMEOUT_S=str(STALL_S))
    yield target
    target.server.kill()


def fuzz(name, strategy):
    """Run `strategy`'s examples (each a function of the target) for BUDGET[name] cases, then verify."""
    def run(target):
        sent = target.count

        @settings(max_examples=BUDGET[name], **FUZZ)
        @given(case=strategy)
        def property_(case):
            case(target)
        property_()
        assert target.count - sent >= BUDGET[name]
        target.verify()
    return run


def checked_status(body):
    """Return the status the server's own checks give `body`, run in-process: 200 or 400."""
    try:
        payload.validate(payload.decode(body))
    except payload.PushError:
        return 400
    return 200


def refused(target, body, content_type="application/json"):
    status, answer = target.post(body, content_type)
    assert 400 <= status < 500, (status, body[:200])
    return answer


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)


# Strategies are built once, here, not in every draw: Hypothesis checks each new strategy before
# its first draw, and those checks cost 3 s a run. What they draw is the same either way.

# ---- the structure of the JSON ---------------------------------------------------------------

NOT_A_NUMBER = json_values.filter(lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))))
NOT_A_STRING = json_values.filter(lambda v: v is not None and not isinstance(v, str))
NUMBER_FIELD, STRING_FIELD = st.sampled_from(NUMBER_FIELDS), st.sampled_from(STRING_FIELDS)


@st.composite
def wrong_type_for_a_number(draw):
    field = draw(NUMBER_FIELD)
    value = draw(NOT_A_NUMBER)

    def case(target):
        body = multi(gpu(0))
        body["gpus"][0][field] = value
        assert refused(target, json.dumps(body))["field"] in (f"gpus[0].{field}", "body")
    return case


@st.composite
def wrong_type_for_a_string(draw):
    field = draw(STRING_FIELD)
    value = draw(NOT_A_STRING)

    def case(target):
        body = multi(gpu(0))
        body["gpus"][0][field] = value
        refused(target, json.dumps(body))
    return case


def _past(bounds):
    """Numbers past `bounds`: huge, or negative where negatives make no sense."""
    low, high = bounds
    return st.one_of(st.floats(min_value=high, max_value=1e308, exclude_min=True),
                     st.integers(min_value=high + 1, max_value=10**400),
                     st.floats(min_value=-1e308, max_value=low, exclude_max=True),
                     st.integers(min_value=-10**400, max_value=low - 1))


PAST_BOUNDS = {field: _past(payload.GPU_FIELDS[field].bounds) for field in NUMBER_FIELDS}


@st.composite
def out_of_range(draw):
    """A field and a number past its bounds: huge, or negative where negatives make no sense."""
    field = draw(NUMBER_FIELD)
    value = draw(PAST_BOUNDS[field])

    def case(target):
        body = multi(gpu(0))
        body["gpus"][0][field] = value
        refused(target, json.dumps(body))
    return case


# What Python's and JavaScript's JSON parsers make NaN or Infinity of, and near misses.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "9e9999", "123456789e999999",
              "nan", "inf", "-inf", "+Infinity", "Infinity1", "NaN0", "1e", "--1", "0x10", "01", "1.e5", ".5"]


NON_FINITE_LITERAL, GPU_COUNT, GPU_OR_SAMPLED_AT = st.sampled_from(NON_FINITE), st.integers(1, 4), st.integers(0, 4)
SPACE = st.sampled_from(["", " ", "\n", "\t "])


@st.composite
def non_finite(draw):
    field, literal = draw(NUMBER_FIELD), draw(NON_FINITE_LITERAL)
    gpus, where = draw(GPU_COUNT), draw(GPU_OR_SAMPLED_AT)
    space = draw(SPACE)

    def case(target):
        body = multi(*[gpu(i) for i in range(gpus)])
        if where < gpus:
            body["gpus"][where][field] = "__X__"
        else:
            body["sampledAt"] = "__X__"
        text = json.dumps(body).replace('"__X__"', space + literal + space)
        assert target.post(text)[0] == 400
    return case


DEPTH, NESTING = st.integers(min_value=200, max_value=60000), st.sampled_from(["list", "dict", "gpus"])


@st.composite
def deep(draw):
    depth, kind = draw(DEPTH), draw(NESTING)

    def case(target):
        if kind == "list":
            text = "[" * depth + "]" * depth
        elif kind == "dict":
            text = '{"a":' * depth + "1" + "}" * depth
        else:
            text = '{"gpus": [' + '{"processes": [' * depth + "]}" * depth + "]}"
        status, _ = target.post(text)
        assert status == (413 if len(text) > 65536 else 400)
    return case


SIZED_FIELD, SIZE = st.sampled_from(STRING_FIELDS + ["processes", "gpus", "host"]), st.integers(129, 5000)


@st.composite
def oversized(draw):
    field, size = draw(SIZED_FIELD), draw(SIZE)

    def case(target):
        body = multi(gpu(0))
        if field == "processes":
            body["gpus"][0]["processes"] = [{"pid": i, "name": "p", "memoryUsed": 1} for i in range(min(size, 400))]
        elif field == "gpus":
            body["gpus"] = [gpu(i) for i in range(65 + size % 100)]
        elif field == "host":
            body["host"] = "h" * size
        else:
            body["gpus"][0][field] = "s" * size
        assert target.post(json.dumps(body))[0] in (400, 413)
    return case


content_types = st.one_of(st.none(), st.sampled_from(
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx",
     "text/json", "application/xml", "", "application"]), st.text(max_size=30).filter(
    lambda t: t.split(";")[0].strip().lower() != "application/json" and t == t.strip()
    and all(32 <= ord(c) < 127 for c in t)))


@st.composite
def wrong_content_type(draw):
    content_type = draw(content_types)

    def case(target):
        status, answer = target.post(json.dumps(multi(gpu(0))), content_type)
        assert status == 415 and "Content-Type" in answer["error"]
    return case


# ---- the text: what JSON strings can carry that UTF-8 or a page cannot -------------------------

# As written in JSON source: lone, swapped and cut surrogates; a valid pair; a BOM; NUL and
# other controls, escaped or raw; bidi overrides; line separators; plain text.
HOSTILE = [r"\ud800", r"\udbff", r"\udc00", r"\udfff", r"\udc00\ud800", r"\ud83d", r"\ud83d\ude00", "\U0001F600",
           r"\ufeff", "\ufeff", r"\u0000", "\x00", r"\u001b", "\x1f", r"\u007f", r"\u0085", "\u0085", r"\u2028",
           "\u2029", r"\u202e", "\u2066", r"\uffff", r"\ufffe", r"\"", r"\\", r"\/", "é", "°C", "名前", " "]
# Where it goes: a known string value, an unknown field's value, or a key (known or not).
PLACES = ["gpus[0].name", "gpus[0].uuid", "gpus[0].pstate", "gpus[0].error", "host", "error", "agent.version",
          "gpus[0].processes[0].name", "gpus[0].extra", "key:gpus[0].name", "key:gpus[0].extra", "key:top",
          "system.os", "system.cpuModel", "system.disks[0].mount", "system.extra"]


def _json_string_text(source):
    """Return the Python text a JSON string literal's source decodes to (surrogates kept as they are)."""
    return json.loads(f'"{source}"')


HOSTILE_PIECES = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=3).map(lambda t: json.dumps(t)[1:-1]),
                          min_size=1, max_size=4)
PLACE = st.sampled_from(PLACES)


@st.composite
def hostile_text(draw):
    pieces = draw(HOSTILE_PIECES)
    source, place = "".join(pieces), draw(PLACE)

    def case(target):
        body = pushed()
        marker = '"__X__"'
        if place.startswith("key:"):
            where = place[4:]
            if where == "top":
                body["__K__"] = 1
            else:
                del body["gpus"][0]["name"]
                body["gpus"][0]["__K__"] = "RTX" if where.endswith("name") else 1
            text = json.dumps(body).replace('"__K__"', f'"{source}"' if where != "gpus[0].name" else f'"na{source}me"')
        else:
            obj, field = _locate(body, place)
            obj[field] = "__X__"
            text = json.dumps(body).replace(marker, f'"{source}"')
        try:
            decoded = _json_string_text(source)
        except ValueError:  # a raw control character: not even valid JSON
            assert target.post(text.encode("utf-8", "surrogatepass"))[0] == 400
            return
        status, answer = target.post(text.encode("utf-8", "surrogatepass"))
        if place.startswith("key:") or place.endswith("extra"):
            # A key may collide with a real field (then it is checked, or twice given): the checks decide.
            assert status == checked_status(text.encode("utf-8", "surrogatepass")), (place, source, answer)
        elif payload.SURROGATE.search(decoded) or payload.CONTROL.search(decoded):
            assert status == 400 and answer["field"] == place, (source, answer)
        else:
            assert status == 200, (place, source, answer)
    return case


def _locate(body, place):
    """Return (object, field) that a path like gpus[0].processes[0].name names in `body`."""
    obj, parts = body, re.findall(r"[^.\[\]]+|\[\d+\]", place)
    for part in parts[:-1]:
        obj = obj[int(part[1:-1])] if part.startswith("[") else obj[part]
    return obj, parts[-1]


# ---- the bytes ---------------------------------------------------------------------------------

INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\xc3\x28", b"\xf0\x28\x8c\xbc"]
GOOD = json.dumps({**multi(gpu(0, name="RTX 4090 • 24 GB")), "sampledAt": 1763900000.25}, ensure_ascii=False).encode()


MANGLING = st.sampled_from(["invalid", "bom", "utf16", "utf32", "flip", "cut", "nul"])
WHERE_IN_GOOD = st.integers(0, len(GOOD))
INVALID_BYTES = st.sampled_from(INVALID_UTF8)
BOMS = st.sampled_from([b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"])
ENCODINGS = {kind: st.sampled_from([f"utf-{kind[3:]}", f"utf-{kind[3:]}-le", f"utf-{kind[3:]}-be"])
             for kind in ("utf16", "utf32")}
FLIP = st.integers(1, 255)


@st.composite
def mangled_bytes(draw):
    kind = draw(MANGLING)
    at = draw(WHERE_IN_GOOD)
    if kind == "invalid":
        body = GOOD[:at] + draw(INVALID_BYTES) + GOOD[at:]
    elif kind == "bom":
        body = draw(BOMS) + GOOD
    elif kind in ("utf16", "utf32"):
        body = GOOD.decode().encode(draw(ENCODINGS[kind]))
    elif kind == "flip":
        at = min(at, len(GOOD) - 1)
        body = GOOD[:at] + bytes([GOOD[at] ^ draw(FLIP)]) + GOOD[at + 1:]
    elif kind == "cut":
        body = GOOD[:min(at, len(GOOD) - 1)]
    else:
        body = GOOD[:at] + b"\x00" + GOOD[at:]

    def case(target):
        status, answer = target.post(body)
        try:
            body.decode("utf-8-sig")
        except UnicodeDecodeError:
            assert status == 400 and "UTF-8" in answer["error"], (body, answer)
            return
        assert status == checked_status(body), (body, answer)  # a flip may still make a valid push
    return case


# ---- numbers -----------------------------------------------------------------------------------

NUMBERS = ["-0", "-0.0", "0e0", "0E-0", "1e400", "-1e400", "1e-400", "1E+2", "2.5e1", "1" + "0" * 300,
           "9" * 4300, "9" * 4301, "-" + "9" * 5000, "0." + "1" * 1000, "00", "01", "1.", ".5", "+1", "1e", "0x1F",
           "1_000", "١٢", "12\u00a0", "5" + "0" * 20, "100.0000000000000001", "-1e-400", "3.4028235e38"]
NUMBER_PLACES = ["gpus[0].utilizationGpu", "gpus[0].temperatureGpu", "gpus[0].memoryUsed", "gpus[0].index",
                 "gpus[0].processes[0].pid", "sampledAt", "gpus[0].extra", "agent.version",
                 "system.cpuPercent", "system.cpuCount", "system.uptimeS", "system.disks[0].total", "system.extra"]


NUMBER_LITERAL = st.one_of(
    st.sampled_from(NUMBERS),
    st.integers(min_value=-10**600, max_value=10**600).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.builds(lambda sign, digits, exp: f"{sign}{digits}e{exp}", st.sampled_from(["", "-"]),
              st.integers(0, 10**20), st.integers(-500, 500)))
NUMBER_PLACE = st.sampled_from(NUMBER_PLACES)


@st.composite
def odd_number(draw):
    literal = draw(NUMBER_LITERAL)
    place = draw(NUMBER_PLACE)

    def case(target):
        body = pushed()
        obj, field = _locate(body, place)
        obj[field] = "__X__"
        text = json.dumps(body).replace('"__X__"', literal)
        status, answer = target.post(text.encode())
        try:
            value = json.loads(literal)
        except ValueError:
            assert status == 400 and answer["field"] == "body"
            return
        if place.endswith("extra"):
            assert status == 200  # unknown fields are dropped, whatever they hold
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and status == 200:
            assert math.isfinite(value) and checked_status(text.encode()) == 200
        else:
            assert status == 400 and answer["field"] == place, answer
    return case


LEVEL = st.sampled_from(["top", "agent", "gpu", "process", "system", "disk"])
KEY = (st.sampled_from(["name", "index", "gpus", "host", "pid", "version", "unknown", "\u0000", ""])
       | st.text(max_size=8))


@st.composite
def duplicate_key(draw):
    level = draw(LEVEL)
    key = draw(KEY)
    same = draw(st.booleans())

    def case(target):
        body = pushed()
        obj = {"top": body, "agent": body["agent"], "gpu": body["gpus"][0], "process": body["gpus"][0]["processes"][0],
               "system": body["system"], "disk": body["system"]["disks"][0]}[level]
        obj["__D1__"], obj["__D2__"] = 1, 1
        twin = '"x"' if same else '"y"'
        text = json.dumps(body).replace('"__D1__": 1', f'{json.dumps(key)}: "x"').replace(
            '"__D2__": 1', f'{json.dumps(key)}: {twin}')
        answer = refused(target, text.encode())
        assert answer["field"] == "body" and "appears twice" in answer["error"]
    return case


# ---- the host: anything in any place of `system` (issue 34) ---------------------------------------

SYSTEM_PLACE = st.sampled_from(["system", "system.disks", "system.disks[0]",
                                *(f"system.{name}" for name in payload.SYSTEM_FIELDS),
                                *(f"system.disks[0].{name}" for name in payload.DISK_FIELDS)])
DISK = st.fixed_dictionaries({"mount": st.text(max_size=12)}, optional={"total": st.integers(-2, 2**34),
                                                                         "used": st.integers(-2, 2**34)})
SYSTEM_VALUE = st.one_of(json_values, st.integers(-10**20, 10**20), st.floats(allow_nan=False),
                         st.text(max_size=140), st.lists(DISK, max_size=18))


@st.composite
def anything_in_system(draw):
    place, value = draw(SYSTEM_PLACE), draw(SYSTEM_VALUE)

    def case(target):
        body = pushed()
        if place == "system":
            body["system"] = value
        else:
            obj, field = _locate(body, place)
            obj[int(field[1:-1]) if field.startswith("[") else field] = value  # system.disks[0]: the first disk
        text = json.dumps(body).encode()  # Infinity too: json writes it, and the server must refuse it
        status, answer = target.post(text)
        assert status == checked_status(text), (place, value, answer)
        if status == 400:  # named where it is wrong, or the body when it nests past a push
            assert answer["field"] == "body" or answer["field"].startswith(place), (place, value, answer)
    return case


# ---- the HTTP framing around the body -------------------------------------------------------------

FRAMING = st.sampled_from(["short", "long-closed", "long-stalled", "cut-closed", "bad-length", "two-lengths",
                           "chunked-bad", "chunked-and-length", "exact"])
BY = st.integers(1, 200)


@st.composite
def broken_framing(draw):
    body = json.dumps(multi(gpu(0))).encode()
    kind = draw(FRAMING)
    by = draw(BY)
    start = b"POST /push-sse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + \
        KEYS["rig-1"].encode() + b"\r\n"
    close_write = kind.endswith("closed") or kind.startswith("chunked") or kind in ("bad-length", "two-lengths")
    if kind == "short":
        request = start + b"Content-Length: %d\r\n\r\n" % max(0, len(body) - by) + body
    elif kind in ("long-closed", "long-stalled"):
        request = start + b"Content-Length: %d\r\n\r\n" % (len(body) + by) + body
    elif kind == "cut-closed":
        request = start + b"Content-Length: %d\r\n\r\n" % len(body) + body[:max(0, len(body) - by)]
    elif kind == "bad-length":
        value = draw(st.sampled_from([b"abc", b"-5", b"1e3", b"0x10", b"%d, %d" % (len(body), len(body)), b"",
                                      b"+%d" % len(body), b"9" * 30]))
        request = start + b"Content-Length: " + value + b"\r\n\r\n" + body
    elif kind == "two-lengths":
        request = start + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (len(body), len(body) + by) + body
    elif kind == "chunked-bad":
        size = draw(st.sampled_from([b"zz", b"-1", b"%x" % (len(body) + by), b"%x;" % len(body), b""]))
        request = start + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + body + b"\r\n"
    elif kind == "chunked-and-length":
        request = (start + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)
                   + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    else:
        request = start + b"Content-Length: %d\r\n\r\n" % len(body) + body

    def case(target):
        target.count += 1
        started = time.monotonic()
        status, answer = raw_exchange(target.server.port, request, close_write)
        assert time.monotonic() - started < STALL_S + 3  # an answer always comes, a stall included
        if kind == "exact":
            target.judge(status, answer)
            assert status == 200
        elif kind == "long-stalled":
            assert status == 408 and "PUSH_BODY_TIMEOUT_S" in answer["error"]
        else:
            assert 400 <= status < 500, (kind, status, answer)  # ours as JSON, or gunicorn's own page
            if answer is not None:
                target.judge(status, answer)
    return case


test_wrong_types_for_numbers = fuzz("wrong_types_for_numbers", wrong_type_for_a_number())
test_wrong_types_for_strings = fuzz("wrong_types_for_strings", wrong_type_for_a_string())
test_huge_and_negative_numbers = fuzz("huge_and_negative_numbers", out_of_range())
test_nan_and_infinity_however_spelled = fuzz("nan_and_infinity", non_finite())
test_deep_nesting = fuzz("deep_nesting", deep())
test_oversized_strings_and_lists = fuzz("oversized", oversized())
test_wrong_or_missing_content_type = fuzz("content_type", wrong_content_type())
test_surrogates_bom_controls_and_bidi_in_keys_and_values = fuzz("text", hostile_text())
test_invalid_utf8_bom_other_encodings_flipped_and_cut_bytes = fuzz("bytes", mangled_bytes())
test_odd_numbers_huge_integers_and_negative_zero = fuzz("numbers", odd_number())
test_duplicate_keys_at_every_level = fuzz("duplicate_keys", duplicate_key())
test_anything_in_any_place_of_the_hosts_system = fuzz("system", anything_in_system())


def test_wrong_content_length_cut_stalled_and_chunked_bodies(stalling_target):
    fuzz("wire", broken_framing())(stalling_target)


def test_the_fuzz_sends_over_10000_cases_a_run():
    assert sum(BUDGET.values()) >= 10_000
    properties = [name for name in globals() if name.startswith("test_") and "10000" not in name]
    assert len(properties) == len(BUDGET)

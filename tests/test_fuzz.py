"""Property-based attack on POST /push-sse against the real server: over 10,000 bad pushes a run.

Every bad push must get a 4xx with a message, never a 5xx or a dropped connection; nothing
invalid may ever reach a viewer; and a good push right after still reaches every viewer.
"""
import json
import math
import threading

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import payload
from conftest import KEYS, Server, Stream, gpu, multi

EXAMPLES = 1500  # per property; eight properties: over 10,000 bad pushes a run
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
NUMBER_FIELDS = [name for name, check in payload.GPU_FIELDS.items() if check is not payload._string]
STRING_FIELDS = [name for name, check in payload.GPU_FIELDS.items() if check is payload._string]


class Target:
    """The real server, one keep-alive client, and viewers that read everything it streams."""

    def __init__(self, tmp_path):
        self.server = Server({"PUSH_RATE_LIMIT": "1000"}, tmp_path).start()
        self.session = requests.Session()
        self.viewers = [Stream(self.server.port) for _ in range(3)]
        self.seen = [[] for _ in self.viewers]
        self.count = 0
        for viewer, seen in zip(self.viewers, self.seen):
            threading.Thread(target=self._read, args=(viewer, seen), daemon=True).start()

    @staticmethod
    def _read(viewer, seen):
        try:
            while True:
                seen.append(viewer.next(timeout=3600, with_comments=True))
        except Exception as error:  # the stream ended: recorded, and checked at the end
            seen.append({"event": ":ended", "error": repr(error)})

    def post(self, body, content_type="application/json", key="rig-1"):
        headers = {"Authorization": f"Bearer {KEYS[key]}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        self.count += 1
        return self.session.post(self.server.url + "/push-sse", data=body, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    target = Target(tmp_path_factory.mktemp("fuzz"))
    yield target
    target.server.stop()


def refused(target, body, content_type="application/json"):
    answer = target.post(body, content_type)
    assert 400 <= answer.status_code < 500, (answer.status_code, body[:200])
    assert answer.json()["ok"] is False and answer.json()["error"]
    return answer


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)


@FUZZ
@given(field=st.sampled_from(NUMBER_FIELDS), value=json_values.filter(
    lambda v: v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))))
def test_wrong_types_for_numbers(target, field, value):
    body = multi(gpu(0))
    body["gpus"][0][field] = value
    assert refused(target, json.dumps(body)).json()["field"] in (f"gpus[0].{field}", "body")


@FUZZ
@given(field=st.sampled_from(STRING_FIELDS), value=json_values.filter(lambda v: v is not None and not isinstance(v, str)))
def test_wrong_types_for_strings(target, field, value):
    body = multi(gpu(0))
    body["gpus"][0][field] = value
    refused(target, json.dumps(body))


@st.composite
def out_of_range(draw):
    """A field and a number past its bounds: huge, or negative where negatives make no sense."""
    field = draw(st.sampled_from(NUMBER_FIELDS))
    low, high = payload.GPU_FIELDS[field].bounds
    value = draw(st.one_of(st.floats(min_value=high, max_value=1e308, exclude_min=True),
                           st.integers(min_value=high + 1, max_value=10**300),
                           st.floats(min_value=-1e308, max_value=low, exclude_max=True),
                           st.integers(min_value=-10**300, max_value=low - 1)))
    return field, value


@FUZZ
@given(case=out_of_range())
def test_huge_and_negative_numbers(target, case):
    field, value = case
    body = multi(gpu(0))
    body["gpus"][0][field] = value
    refused(target, json.dumps(body))


# What Python's and JavaScript's JSON parsers make NaN or Infinity of, and near misses.
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "9e9999", "123456789e999999",
              "nan", "inf", "-inf", "+Infinity", "Infinity1", "NaN0", "1e", "--1", "0x10", "01", "1.e5", ".5"]


@FUZZ
@given(field=st.sampled_from(NUMBER_FIELDS), literal=st.sampled_from(NON_FINITE), gpus=st.integers(1, 4),
       where=st.integers(0, 4), space=st.sampled_from(["", " ", "\n", "\t "]))
def test_nan_and_infinity_however_spelled(target, field, literal, gpus, where, space):
    body = multi(*[gpu(i) for i in range(gpus)])
    if where < gpus:
        body["gpus"][where][field] = "__X__"
    else:
        body["sampledAt"] = "__X__"
    text = json.dumps(body).replace('"__X__"', space + literal + space)
    assert refused(target, text).status_code == 400


@FUZZ
@given(depth=st.integers(min_value=200, max_value=60000), kind=st.sampled_from(["list", "dict", "gpus"]))
def test_deep_nesting(target, depth, kind):
    if kind == "list":
        text = "[" * depth + "]" * depth
    elif kind == "dict":
        text = '{"a":' * depth + "1" + "}" * depth
    else:
        text = '{"gpus": [' + '{"processes": [' * depth + "]}" * depth + "]}"
    if len(text) <= 65536:
        refused(target, text)
    else:
        assert target.post(text).status_code == 413


@FUZZ
@given(data=st.data())
def test_invalid_utf8_control_characters_and_truncated_bodies(target, data):
    good = json.dumps({**multi(gpu(0)), "sampledAt": 1763900000.25}).encode()  # same length every run
    kind = data.draw(st.sampled_from(["utf8", "raw-control", "escaped-control", "truncated"]))
    if kind == "utf8":
        at = data.draw(st.integers(0, len(good)))
        junk = data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80", b"\x80"]))
        body = good[:at] + junk + good[at:]
    elif kind == "raw-control":
        body = good.replace(b"NVIDIA GeForce", b"NVIDIA" + bytes([data.draw(st.integers(0, 31))]) + b"GeForce")
    elif kind == "escaped-control":
        char = data.draw(st.sampled_from([chr(c) for c in list(range(32)) + list(range(127, 160))]))
        body = json.dumps(multi(gpu(0, name=f"RTX{char}4090"))).encode()
    else:
        body = good[:data.draw(st.integers(0, len(good) - 1))]
    refused(target, body)


@FUZZ
@given(field=st.sampled_from(STRING_FIELDS + ["processes", "gpus", "host"]), size=st.integers(129, 5000))
def test_oversized_strings_and_lists(target, field, size):
    body = multi(gpu(0))
    if field == "processes":
        body["gpus"][0]["processes"] = [{"pid": i, "name": "p", "memoryUsed": 1} for i in range(min(size, 400))]
    elif field == "gpus":
        body["gpus"] = [gpu(i) for i in range(65 + size % 100)]
    elif field == "host":
        body["host"] = "h" * size
    else:
        body["gpus"][0][field] = "s" * size
    text = json.dumps(body)
    answer = target.post(text)
    assert answer.status_code in (400, 413) and answer.json()["error"]


@FUZZ
@given(content_type=st.one_of(st.none(), st.sampled_from(
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx",
     "text/json", "application/xml", "", "application"]), st.text(max_size=30).filter(
    lambda t: t.split(";")[0].strip().lower() != "application/json" and t == t.strip()
    and all(32 <= ord(c) < 127 for c in t))))
def test_wrong_or_missing_content_type(target, content_type):
    answer = target.post(json.dumps(multi(gpu(0))), content_type)
    assert answer.status_code == 415 and "Content-Type" in answer.json()["error"]


def test_zz_after_all_of_that_a_good_push_reaches_every_viewer_and_nothing_bad_ever_did(target):
    assert target.count >= 10_000
    answer = target.post(json.dumps(multi(gpu(0, utilizationGpu=42))))
    assert answer.status_code == 200
    event_id = answer.json()["id"]
    for viewer_seen in target.seen:
        for _ in range(100):
            if any(e.get("id") == event_id for e in viewer_seen):
                break
            threading.Event().wait(0.05)
        data_events = [e for e in viewer_seen if e.get("event") not in (":comment",)]
        assert [e["id"] for e in data_events] == [event_id], data_events[:3]  # nothing else, ever
        event = data_events[0]["data"]
        assert event["gpus"][0]["utilizationGpu"] == 42
        # What reached the viewer passes the server's own checks and holds only finite numbers.
        payload.validate({"gpus": event["gpus"]})
        json.loads(json.dumps(event), parse_constant=lambda c: pytest.fail(f"{c} on the stream"))
        assert all(math.isfinite(v) for g in event["gpus"] for v in g.values() if isinstance(v, float))

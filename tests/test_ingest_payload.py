"""Push validation: what is kept, what is refused, and the field each refusal names."""
import json

import pytest

from gpustats.ingest import payload
from conftest import gpu, host_system, multi


def check(body):
    return payload.validate(payload.decode(json.dumps(body).encode() if not isinstance(body, bytes) else body))


def refused(body):
    with pytest.raises(payload.PushError) as error:
        check(body)
    return error.value


def test_multi_gpu_push_keeps_every_known_field():
    push = check(multi(gpu(0), gpu(1)))
    assert push["host"] == "rig-1" and push["agent"] == {"version": "1.0.0", "backend": "nvml", "simulated": False}
    assert push["gpus"][1] == gpu(1)


def test_seed_single_gpu_object_becomes_a_one_gpu_push():
    push = check({"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65, "utilizationGpu": 80})
    assert push["gpus"] == [{"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65,
                             "utilizationGpu": 80, "index": 0}]


def test_unknown_fields_are_dropped_everywhere():
    body = multi(gpu(0, evil="<script>", processes=[{"pid": 1, "name": "x", "memoryUsed": 1, "cmd": "rm"}]))
    body["device"] = "someone-else"
    push = check(body)
    assert "device" not in push and "evil" not in push["gpus"][0]
    assert push["gpus"][0]["processes"] == [{"pid": 1, "name": "x", "memoryUsed": 1}]


def test_shared_memory_and_process_users_are_kept():
    # An APU, Apple Silicon or Jetson uses the system's memory; a shared machine says who holds a GPU.
    body = multi(gpu(0, vendor="AMD", memoryShared=True,
                     processes=[{"pid": 7, "name": "blender", "user": "ana", "memoryUsed": 512}]))
    kept = check(body)["gpus"][0]
    assert kept["memoryShared"] is True and kept["processes"] == [{"pid": 7, "name": "blender", "user": "ana",
                                                                    "memoryUsed": 512}]
    assert refused(multi(gpu(0, memoryShared="yes"))).field == "gpus[0].memoryShared"
    assert refused(multi(gpu(0, processes=[{"pid": 7, "user": 1000}]))).field == "gpus[0].processes[0].user"


def test_a_processs_command_and_start_are_kept_and_a_start_must_be_one():
    # Issue 33: two python3 jobs on one H200 are told apart by their command and their start.
    job = {"pid": 7, "name": "python3", "user": "ana", "memoryUsed": 512, "command": "python3 train.py",
           "startedAt": 1796400612.0}
    body = {**multi(gpu(0, processes=[job])), "sampledAt": 1796400700.25}
    assert check(body)["gpus"][0]["processes"] == [job]
    started = "gpus[0].processes[0].startedAt"
    for bad in (0, 946_684_799, "1796400612", 1e12):  # before 2000 (a clock never set), text, past any date
        assert refused({**body, "gpus": [gpu(0, processes=[{**job, "startedAt": bad}])]}).field == started
    late = refused({**body, "gpus": [gpu(0, processes=[{**job, "startedAt": 1796400700.25 + 61}])]})
    assert late.field == started and "after sampledAt" in str(late)
    with pytest.raises(payload.PushError):  # the route's one-walk parse refuses it too
        payload.parse(json.dumps({**body, "gpus": [gpu(0, processes=[{**job, "startedAt": 1796400800.0}])]}).encode())
    assert check({**body, "gpus": [gpu(0, processes=[{**job, "startedAt": 1796400700.25 + 59}])]})  # clocks a tick apart
    assert refused({**body, "gpus": [gpu(0, processes=[{**job, "command": "x" * 129}])]}).field == (
        "gpus[0].processes[0].command")


def test_null_means_not_reported_and_stays_null():
    assert check(multi(gpu(0, powerDraw=None)))["gpus"][0]["powerDraw"] is None


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e999"])
def test_nan_and_infinity_are_refused_however_spelled(literal):
    body = b'{"gpus": [{"index": 0, "temperatureGpu": ' + literal + b"}]}"
    error = refused(body)
    assert "temperatureGpu" in str(error) or "NaN" in str(error) or "Infinity" in str(error)


@pytest.mark.parametrize("field,value", [
    ("utilizationGpu", 101), ("utilizationGpu", -1), ("fanSpeed", 250), ("memoryUsed", -5),
    ("utilizationGpu", "80"), ("utilizationGpu", True), ("temperatureGpu", [65]), ("name", 7),
    ("index", 1.5), ("processes", "python"),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    error = refused(multi({**gpu(0), field: value}))
    assert error.field == f"gpus[0].{field}"


def test_strings_up_to_128_characters_are_kept_whole_longer_ones_refused():
    assert check(multi(gpu(0, name="y" * 128)))["gpus"][0]["name"] == "y" * 128
    assert refused(multi(gpu(0, name="x" * 129))).field == "gpus[0].name"


@pytest.mark.parametrize("text", ["a\x00b", "tab\there", "line\nbreak", "\x1b[31mred", "del\x7f", "c1\x85"])
def test_strings_with_control_characters_are_refused(text):
    assert refused(multi(gpu(0, name=text))).field == "gpus[0].name"
    assert check(multi(gpu(0, name="RTX 4090 • 24 GB — ünïcødé")))["gpus"][0]["name"].startswith("RTX")


def test_gpu_and_process_counts_are_capped():
    assert refused(multi(*[gpu(i) for i in range(payload.MAX_GPUS + 1)])).field == "gpus"
    procs = [{"pid": i, "name": "p", "memoryUsed": 1} for i in range(payload.MAX_PROCESSES + 1)]
    assert refused(multi(gpu(0, processes=procs))).field == "gpus[0].processes"
    assert len(check(multi(gpu(0, processes=procs[:-1])))["gpus"][0]["processes"]) == payload.MAX_PROCESSES


def test_duplicate_gpu_index_is_refused():
    assert refused(multi(gpu(0), gpu(0))).field == "gpus[1].index"


@pytest.mark.parametrize("body,field", [
    (b"\xff\xfe{}", "body"), (b'{"gpus": [', "body"), (b"[" * 100000 + b"]" * 100000, "body"),
    (b"[]", "body"), (b'"text"', "body"), (b"{}", "gpus"), (b'{"gpus": {}}', "gpus"),
    (b'{"gpus": [], "sampledAt": "now"}', "sampledAt"), (b'{"gpus": [], "agent": []}', "agent"),
    (b'{"gpus": ["x"]}', "gpus[0]"), (b'{"gpus": [], "sampledAt": 1' + b"0" * 5000 + b"}", "body"),
])
def test_malformed_bodies_are_refused(body, field):
    assert refused(body).field == field


def test_nesting_deeper_than_a_push_and_processes_without_pid_are_refused():
    nested = {"gpus": [{"processes": [{"pid": 1, "name": {"a": [[1]]}}]}]}
    assert refused(nested).field == "body"
    assert refused({"gpus": [{"processes": [{"name": "python"}]}]}).field == "gpus[0].processes[0].pid"


def test_missing_index_is_the_position():
    push = check({"gpus": [{"name": "a"}, {"name": "b"}]})
    assert [g["index"] for g in push["gpus"]] == [0, 1]


def test_a_sample_that_failed_whole_carries_its_error():
    push = check({"gpus": [], "error": "nvidia-smi failed (exit 9): NVIDIA-SMI has failed"})
    assert push["gpus"] == [] and push["error"].startswith("nvidia-smi failed")
    assert refused({"gpus": [], "error": 9}).field == "error"


# ---- the host: `system` (issue 34) ----------------------------------------------------------------

def test_the_hosts_system_is_kept_and_older_pushes_have_none():
    body = {**multi(gpu(0)), "system": host_system(fanRpm=1200, disks=[{"mount": "/", "total": 9, "used": 1,
                                                                         "inodes": 5}])}
    kept = check(body)["system"]
    assert kept == host_system(disks=[{"mount": "/", "total": 9, "used": 1}])  # unknown fields dropped
    assert check(multi(gpu(0)))["system"] is None  # an agent before issue 34
    assert check({"name": "NVIDIA RTX 3080", "temperatureGpu": 65, "system": host_system()})["system"] is None  # the seed's
    assert check({**multi(gpu(0)), "system": None})["system"] is None
    nulls = dict.fromkeys(host_system(), None)  # what a PC cannot give is null, every field
    assert check({**multi(gpu(0)), "system": nulls})["system"] == nulls
    assert check({**multi(gpu(0)), "gpus": [], "error": "no GPU found", "system": host_system()})["system"]


@pytest.mark.parametrize("field,value", [
    ("cpuPercent", 100.1), ("cpuPercent", -0.1), ("cpuPercent", "37.5"), ("cpuPercent", True),
    ("cpuCount", 0), ("cpuCount", 1.5), ("cpuCount", 100_001), ("load1", -1), ("load1", 1e7),
    ("memoryTotal", -1), ("memoryUsed", 2**33 + 1), ("swapUsed", [0]), ("netRx", -0.5), ("netTx", 1.1e12),
    ("temperatureCpu", 251), ("temperatureCpu", -101), ("uptimeS", -1), ("uptimeS", 4e9),
    ("os", "x" * 129), ("os", 24.04), ("cpuModel", "AMD\x1b[31m EPYC"), ("cpuModel", "\u202eCPU"),
    ("disks", {"mount": "/"}), ("disks", "/"),
])
def test_a_bad_system_value_is_refused_naming_it(field, value):
    value = value.encode().decode("unicode_escape") if isinstance(value, str) else value
    assert refused({**multi(gpu(0)), "system": host_system(**{field: value})}).field == f"system.{field}"


@pytest.mark.parametrize("disks,field", [
    ([{"mount": "/", "total": 1, "used": 1}] * 3, "system.disks[1].mount"),  # a mount twice: a chart twice
    ([{"total": 1, "used": 1}], "system.disks[0].mount"), ([{"mount": None, "used": 1}], "system.disks[0].mount"),
    ([{"mount": "/", "total": "1"}], "system.disks[0].total"), ([{"mount": "/", "used": -1}], "system.disks[0].used"),
    ([{"mount": "/", "used": 2**34}], "system.disks[0].used"), (["/"], "system.disks[0]"),
    ([{"mount": "m" * 129}], "system.disks[0].mount"), ([{"mount": f"/d{i}"} for i in range(17)], "system.disks"),
])
def test_bad_disks_are_refused_naming_the_disk(disks, field):
    assert refused({**multi(gpu(0)), "system": host_system(disks=disks)}).field == field


def test_sixteen_disks_with_nulls_pass():
    disks = [{"mount": f"/data{i}", "total": None, "used": None} for i in range(16)]
    assert check({**multi(gpu(0)), "system": host_system(disks=disks)})["system"]["disks"] == disks


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_nan_and_infinity_in_system_are_refused(literal):
    for place in (b'"cpuPercent": ', b'"disks": [{"mount": "/", "used": '):
        close = b"}" if place.startswith(b'"cpu') else b"}]}"
        error = refused(b'{"gpus": [], "system": {' + place + literal + close + b"}")
        assert error.field in ("system.cpuPercent", "system.disks[0].used", "body")


def test_a_system_that_is_no_object_is_refused():
    assert refused({**multi(gpu(0)), "system": [host_system()]}).field == "system"
    assert refused({**multi(gpu(0)), "system": "Ubuntu"}).field == "system"


@pytest.mark.parametrize("body", [
    json.dumps(multi(gpu(0), gpu(1))).encode(),
    json.dumps(multi(gpu(0, name="Radeon: RX 580"))).encode(),  # a colon in a string: proven the slow way
    b'{"gpus": [{"index": 0, "name": "a", "name": "b"}]}',  # a key twice
    b'{"gpus": [], "gpus": []}',
    b'{"gpus": [{"index": 0, "extra": {"a": {"b": {"c": 1}}}}]}',  # an unknown field nested too deeply
    b'{"gpus": [{"index": 0, "extra": {"a": 1}}], "x": [[[[1]]]]}',
    b'{"gpus": [{"index": 0, "processes": [{"pid": 1, "x": [1]}]}]}',  # one level past a process
    b'{"gpus": [{"index": 0, "processes": [{"pid": 1, "x": []}]}]}',
    b'\xef\xbb\xbf{"gpus": [{"index": 0}]}',  # a byte order mark
    b'{"gpus": [{"index": 5.0}, {"index": 5}]}',  # the same index, once as 5.0
    b'{"gpus": [{"index": 0, "temperatureGpu": 1e400}]}',
    b'{"gpus": [{"index": 0, "name": "\\ud800"}]}',
    b'{"gpus": [{"index": 0, "utilizationGpu": NaN}]}',
    b'{"name": "NVIDIA RTX 3080", "temperatureGpu": 65}',  # the seed's one GPU object
    b'{"gpus": [{"index": 0}], "agent": {"version": "1", "x": {"y": {"z": {"w": 1}}}}}',
    json.dumps({**multi(gpu(0)), "system": host_system()}).encode(),
    json.dumps({**multi(gpu(0)), "system": host_system(disks=[{"mount": "C:\\", "total": 1, "used": 1}])}).encode(),
    b'{"gpus": [], "system": {"cpuCount": 2, "cpuCount": 3}}',
    b'{"gpus": [], "system": {"disks": [{"mount": "/", "used": 1, "used": 2}]}}',
    b'{"gpus": [], "system": {"x": {"y": {"z": {"w": {"v": 1}}}}}}',  # an unknown field nested too deeply
    b'{"gpus": [], "system": {"disks": [{"mount": "/", "x": [[1]]}]}}',  # one level past a disk
    b'{"gpus": [], "system": {"disks": [{"mount": "/", "x": [1]}]}}',
    b'{"gpus": [], "system": {"disks": {"mount": "/"}}}',
    b'{"gpus": [], "system": {"disks": [{"mount": "/", "used": -1}]}}',
], ids=["two-gpus", "colon-in-a-string", "key-twice", "gpus-twice", "deep-unknown-field", "deep-top-level-field",
        "deep-process-field", "empty-process-list", "byte-order-mark", "index-5.0-and-5", "number-past-float",
        "lone-surrogate", "nan", "the-seeds-one-gpu", "deep-agent-field", "system", "system-colon-in-a-mount",
        "system-key-twice", "disk-key-twice", "deep-system-field", "deep-disk-field", "disk-at-the-depth-limit",
        "disks-not-a-list", "disk-out-of-range"])  # the same in every xdist process
def test_the_routes_one_pass_parse_answers_as_decode_then_validate(body):
    def answer(check):
        try:
            return check()
        except payload.PushError as error:
            return ("refused", error.field, str(error))
    assert answer(lambda: payload.parse(body)) == answer(lambda: payload.validate(payload.decode(body)))


@pytest.mark.parametrize("message, field", [("unknown device key", None), ("gpus[0].name: too long", "gpus[0].name"),
                                            ("rig-ü pushes faster than 5/s", None), ('a "quoted" \\ word', "body")])
def test_the_push_routes_error_bodies_are_flasks_byte_for_byte(message, field):
    # POST /push-sse answers outside Flask (issue 35), and web.error() writes the same body: both must read
    # as Flask's jsonify wrote them.
    from flask import Flask, jsonify

    from gpustats.web import error, error_body
    with Flask(__name__).app_context():
        flasks = jsonify({"ok": False, "error": message, **({"field": field} if field else {})}).get_data()
        response, status, headers = error(400, message, field=field)
    assert error_body(message, field) == flasks == response.get_data()

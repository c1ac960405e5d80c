"""POST /push-sse on the real gunicorn server: auth, answers, limits, and no side effects; both backends."""
import json
import time

import pytest
import requests

from conftest import KEYS, gpu, host_system, multi, raw_exchange, seq

pytestmark = pytest.mark.both_backends


def test_accepted_push_answers_ok_with_device_and_event_id(server, open_stream):
    stream = open_stream(server)
    answer = server.push(multi(gpu(0), gpu(1)), device="rig-2")
    assert answer.status_code == 200
    body = answer.json()
    assert body["ok"] is True and body["device"] == "rig-2"
    event = stream.next()
    assert event["id"] == body["id"] and event["data"]["device"] == "rig-2"
    assert event["data"]["gpus"][1] == gpu(1)


def test_x_api_key_header_works_too(server):
    answer = requests.post(server.url + "/push-sse", json=multi(), timeout=5,
                           headers={"X-API-Key": KEYS["rig-3"]})
    assert answer.status_code == 200 and answer.json()["device"] == "rig-3"


def test_the_key_decides_the_device_never_the_body(server, open_stream):
    stream = open_stream(server)
    body = multi(host="rig-2")
    body["device"] = "rig-2"
    answer = server.push(body, device="rig-1")
    assert answer.json()["device"] == "rig-1"
    assert stream.next()["data"]["device"] == "rig-1"
    assert server.health()["devices"] == 1


def test_missing_or_unknown_key_is_401_and_changes_nothing(server, open_stream):
    stream = open_stream(server)
    missing = requests.post(server.url + "/push-sse", json=multi(), timeout=5)
    assert missing.status_code == 401 and "missing device key" in missing.json()["error"]
    unknown = server.push(multi(), key="not-a-key-of-anyone-at-all")
    assert unknown.status_code == 401 and unknown.json()["error"] == "unknown device key"
    almost = server.push(multi(), key=KEYS["rig-1"][:-1])
    assert almost.status_code == 401
    assert server.health()["devices"] == 0
    assert stream.next(with_comments=True)["event"] == ":comment"


def test_seed_style_single_gpu_object_is_accepted(server, open_stream):
    stream = open_stream(server)
    seed = {"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65, "utilizationGpu": 80}
    assert server.push(seed).status_code == 200
    data = stream.next()["data"]
    assert data["gpus"] == [{**seed, "index": 0}]
    assert data["status"] == "online" and data["receivedAt"] > 0


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_nan_and_infinity_are_400_and_never_reach_a_viewer(server, open_stream):
    stream = open_stream(server)
    for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = json.dumps(multi()).replace('"powerDraw": 220.5', f'"powerDraw": {literal}')
        answer = server.push(body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, literal
        assert answer.json()["ok"] is False
    assert server.push(multi(gpu(0, powerDraw=100))).status_code == 200
    assert stream.next()["data"]["gpus"][0]["powerDraw"] == 100


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_wrong_content_type_is_415(server):
    answer = server.push(json.dumps(multi()), headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415 and "application/json" in answer.json()["error"]


def test_body_over_max_body_bytes_is_413(start_server):
    server = start_server(MAX_BODY_BYTES="1024")
    big = multi(*[gpu(i) for i in range(10)])
    answer = server.push(big)
    assert answer.status_code == 413 and "MAX_BODY_BYTES" in answer.json()["error"]
    chunked = server.push(iter([json.dumps(big).encode()]), headers={"Content-Type": "application/json"})
    assert chunked.status_code == 413
    assert server.push(multi()).status_code == 200


def test_pushing_too_fast_is_429_with_retry_after_for_that_device_only(start_server):
    server = start_server(PUSH_RATE_LIMIT="1")
    codes = [server.push(multi()).status_code for _ in range(4)]
    assert codes[:2] == [200, 200] and codes[-1] == 429  # bursts up to twice the rate
    limited = server.push(multi())
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    assert server.push(multi(), device="rig-2").status_code == 200


def test_no_device_keys_refuses_every_push_and_says_how_to_add_one(start_server):
    server = start_server(DEVICE_KEYS="")
    answer = server.push(multi(), key="whatever-key-1234567")
    assert answer.status_code == 401 and "add one on its Devices page" in answer.json()["error"]
    assert "no devices yet" in server.output() and "config.py --add-device NAME" in server.output()


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_an_8_mib_body_is_refused_at_once_without_being_read(server):
    import socket
    import time
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"POST /push-sse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEYS["rig-1"].encode() + b"\r\n"
                 b"Content-Length: 8388608\r\n\r\n" + b"[" * 65536)  # only the first 64 KiB is ever sent
    started = time.monotonic()
    answer = b""
    while b"MAX_BODY_BYTES" not in answer and time.monotonic() - started < 5:
        answer += sock.recv(4096)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413") and b"MAX_BODY_BYTES" in answer
    assert time.monotonic() - started < 1
    assert server.push(multi()).status_code == 200


# ---- a push is refused whole or accepted whole (issue 8) -------------------------------------

def test_a_lone_surrogate_is_400_and_changes_nothing_for_anyone(server, open_stream, backend):
    watcher = open_stream(server)
    good = server.push(multi(gpu(0, utilizationGpu=10))).json()["id"]
    assert watcher.next()["id"] == good
    before = server.state()
    for text in ('\\ud800x', '\\udfff', '\\udc00\\ud800', 'a\\ud83d'):  # lone, swapped, cut pair
        body = json.dumps(multi(gpu(0))).replace('"NVIDIA GeForce RTX 3080"', f'"{text}"')
        answer = server.push(body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["field"] == "gpus[0].name", answer.text
        assert "surrogate" in answer.json()["error"]
    assert server.state() == before  # a new viewer connects and sees exactly the good state
    after = server.push(multi(gpu(0, utilizationGpu=20))).json()["id"]
    if backend == "memory":  # in-process ids count up: no sequence number was used up by a refused push
        assert seq(after) == seq(good) + 1
    assert watcher.next()["id"] == after  # nothing was published in between
    assert "Traceback" not in server.output()


def test_a_bad_field_is_400_naming_it_and_changes_nothing(server):
    server.push(multi(gpu(0, utilizationGpu=10)))
    before = server.state()
    answer = server.push(multi(gpu(0, utilizationGpu=99), gpu(1, temperatureGpu="hot")))
    assert answer.status_code == 400
    assert answer.json()["field"] == "gpus[1].temperatureGpu"
    assert "gpus[1].temperatureGpu" in answer.json()["error"]
    assert server.state() == before
    [event] = before[0]
    assert [g["utilizationGpu"] for g in event["gpus"]] == [10]


def test_a_bad_system_is_400_naming_the_field_and_changes_nothing(server):
    # Issue 34: the PC around the GPUs is checked like a GPU; pushes without it (older agents) still pass.
    assert server.push(multi(gpu(0, utilizationGpu=10))).status_code == 200
    assert server.push({**multi(gpu(0, utilizationGpu=10)), "system": host_system()}).status_code == 200
    before = server.state()
    disks = [{"mount": "/", "total": 100, "used": 1}, {"mount": "/data", "total": 100, "used": 2},
             {"mount": "/scratch", "total": 100, "used": -3}]
    answer = server.push({**multi(gpu(0, utilizationGpu=99)), "system": host_system(disks=disks)})
    assert answer.status_code == 400 and answer.json()["field"] == "system.disks[2].used"
    assert server.state() == before


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_numbers_past_float_range_are_400_not_500(server):
    before = server.state()
    for number in ("1" + "0" * 400, "-" + "9" * 4000, "1" + "0" * 5000):
        body = json.dumps(multi(gpu(0))).replace('"utilizationGpu": 80', f'"utilizationGpu": {number}')
        answer = server.push(body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and len(answer.text) < 300, answer.text[:300]
    assert server.state() == before


def test_duplicate_keys_are_refused_and_a_leading_bom_is_not(server):
    text = json.dumps(multi(gpu(0)))
    duplicate = text.replace('"utilizationGpu": 80', '"utilizationGpu": 80, "utilizationGpu": 5')
    answer = server.push(duplicate, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400 and "'utilizationGpu' appears twice" in answer.json()["error"]
    assert server.push(b"\xef\xbb\xbf" + text.encode(), headers={"Content-Type": "application/json"}).status_code == 200


def test_bad_bodies_count_against_the_devices_rate_limit(start_server):
    server = start_server(PUSH_RATE_LIMIT="1")  # a burst of 2
    codes = [server.push(b"{not json", headers={"Content-Type": "application/json"}).status_code for _ in range(3)]
    assert codes == [400, 400, 429]
    assert server.push(multi(), headers={"Content-Type": "text/plain"}).status_code == 429
    assert server.push(multi(), device="rig-2").status_code == 200  # another device is not affected


def raw_push(server, head_length, body, close_write=False):
    """Send a push with a chosen Content-Length over a raw socket; return the status and JSON."""
    return raw_exchange(server.port, b"POST /push-sse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Authorization: Bearer " + KEYS["rig-1"].encode() + b"\r\n"
                        b"Content-Length: %d\r\n\r\n" % head_length + body, close_write)


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_a_body_cut_short_or_stalled_is_refused_and_changes_nothing(start_server):
    server = start_server(PUSH_BODY_TIMEOUT_S="0.5", PUSH_RATE_LIMIT="1000")
    before = server.state()
    body = json.dumps(multi()).encode()
    # Complete JSON, but the client promised more and hung up: the transfer was cut.
    status, answer = raw_push(server, len(body) + 40, body, close_write=True)
    assert status == 400 and "Content-Length announced" in answer["error"]
    started = time.monotonic()
    status, answer = raw_push(server, len(body) + 40, body)  # ... and stalls instead
    assert status == 408 and "PUSH_BODY_TIMEOUT_S" in answer["error"]
    assert time.monotonic() - started < 3
    status, answer = raw_push(server, len(body) - 5, body)  # a Content-Length short of the body
    assert status == 400
    assert server.state() == before
    assert server.push(multi()).status_code == 200


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_every_error_is_json_with_a_message_never_an_html_page_or_a_traceback(server):
    wrong_method = requests.get(server.url + "/push-sse", timeout=5)
    assert wrong_method.status_code == 405 and wrong_method.json()["ok"] is False
    assert "POST" in wrong_method.headers["Allow"]
    missing = requests.get(server.url + "/nothing-here", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]

"""GET /gpu/stream, /healthz and the viewer login on the real gunicorn server."""
import base64
import os
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import HEARTBEAT_S, PRIVATE, ROOT, dechunk, gpu, multi, procfile_command

pytestmark = pytest.mark.both_backends


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_stream_headers_and_retry_first(server, open_stream):
    stream = open_stream(server)
    assert stream.status == 200
    assert stream.header("Content-Type").startswith("text/event-stream")
    assert stream.header("Cache-Control") == "no-cache"
    assert stream.header("X-Accel-Buffering") == "no"
    stream.next(with_comments=True)
    assert stream.retry == 3000


def test_snapshot_on_connect_has_every_device_latest_state_only(server, open_stream):
    for util in (10, 20):
        server.push(multi(gpu(0, utilizationGpu=util), gpu(1)), device="rig-1")
    server.push(multi(gpu(0, utilizationGpu=30)), device="rig-2")
    stream = open_stream(server)
    first, second = stream.next(), stream.next()
    assert first["event"] is None and second["event"] is None  # unnamed: onmessage gets them
    assert [first["data"]["device"], second["data"]["device"]] == ["rig-1", "rig-2"]
    assert first["id"] and second["id"]
    assert first["data"]["gpus"][0]["utilizationGpu"] == 20 and first["data"]["snapshot"] is True
    # History is the API's: a snapshot stays small however long the charts are.
    assert all("history" not in g for g in first["data"]["gpus"] + second["data"]["gpus"])


def test_every_push_reaches_every_viewer_in_order(server, open_stream):
    streams = [open_stream(server) for _ in range(5)]
    sent = [server.push(multi(gpu(0, utilizationGpu=i))).json()["id"] for i in range(20)]
    for stream in streams:
        got = [stream.next() for _ in range(20)]
        assert [e["id"] for e in got] == sent
        assert [e["data"]["gpus"][0]["utilizationGpu"] for e in got] == list(range(20))


def test_device_turns_stale_then_offline_without_a_push(start_server, open_stream):
    server = start_server(STALE_AFTER_S="0.3", OFFLINE_AFTER_S="0.8")
    stream = open_stream(server)
    pushed = time.time()
    server.push(multi())
    assert stream.next()["data"]["status"] == "online"
    stale = stream.until(lambda e: e["event"] == "status", timeout=4)
    assert stale["data"]["status"] == "stale" and stale["data"]["device"] == "rig-1" and stale["id"]
    assert 0.25 <= time.time() - pushed < 2.2  # after STALE_AFTER_S, not before, nor long after
    offline = stream.until(lambda e: e["event"] == "status", timeout=4)
    assert offline["data"]["status"] == "offline"
    assert server.health()["offline"] == 1
    again = open_stream(server).next()
    assert again["data"]["status"] == "offline"  # the snapshot says so too
    server.push(multi())
    assert stream.until(lambda e: e["event"] is None)["data"]["status"] == "online"  # after its DeviceOffline alert


def test_device_filter_limits_snapshot_and_events(server, open_stream):
    server.push(multi(), device="rig-1")
    server.push(multi(), device="rig-2")
    stream = open_stream(server, "/gpu/stream?device=rig-2,rig-3")
    assert stream.next()["data"]["device"] == "rig-2"
    for device in ("rig-1", "rig-3", "rig-1", "rig-2"):
        server.push(multi(), device=device)
    assert [stream.next()["data"]["device"] for _ in range(2)] == ["rig-3", "rig-2"]


def test_a_stream_asked_for_every_second_gets_the_same_events_a_write_a_second(start_server, open_stream):
    server = start_server(PUSH_RATE_LIMIT="1000", HEARTBEAT_S="30")  # a heartbeat due would be a write of its own
    server.push(multi(), device="rig-1")
    prompt = open_stream(server)
    assert prompt.next()["data"]["snapshot"] is True
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"GET /gpu/stream?every=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"\r\n\r\n" not in received or not dechunk(received.partition(b"\r\n\r\n")[2]):
            received += sock.recv(65536)  # the headers, then the retry and the snapshot
        time.sleep(1.05 - time.time() % 1)  # just past a whole second: the pushes below fall in one
        sent, began = [], time.time()
        for n in range(5):
            sent.append(server.push(multi(gpu(0, utilizationGpu=n)), device="rig-1").json()["id"])
            time.sleep(0.1)
        seconds = int(time.time()) - int(began) + 1  # the whole seconds the pushes were taken in
        while received.count(b"\nid: ") < 6:  # the snapshot's, then the pushes'
            received += sock.recv(65536)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    chunks = dechunk(body)
    ids = [line[4:].decode() for line in b"".join(chunks[1:]).split(b"\n") if line.startswith(b"id: ")]
    assert ids == sent == [prompt.next()["id"] for _ in range(5)]
    assert len(chunks) - 1 <= seconds < 5, [c[:60] for c in chunks]  # a write a second, not one a push


@pytest.mark.no_backend
@pytest.mark.parametrize("every", ["0", "11", "1.5", "x", "", "\u00b2", "0001"])
def test_a_stream_asked_for_a_bad_every_is_refused_with_a_message_naming_it(server, every):
    answer = requests.get(server.url + "/gpu/stream", params={"every": every}, timeout=5)
    assert answer.status_code == 400 and answer.json()["field"] == "every"
    assert answer.json()["error"] == "every must be a whole number of seconds from 1 to 10"


def test_heartbeat_comments_keep_an_idle_stream_alive(server, open_stream):
    stream = open_stream(server)
    started = time.monotonic()
    for _ in range(3):
        assert stream.next(timeout=2, with_comments=True)["event"] == ":comment"
    assert time.monotonic() - started < 3 * float(HEARTBEAT_S) + 1


def test_reconnect_with_last_event_id_gets_only_what_was_missed(server, open_stream):
    stream = open_stream(server)
    seen = server.push(multi(gpu(0, utilizationGpu=1))).json()["id"]
    assert stream.next()["id"] == seen
    stream.close()
    missed = [server.push(multi(gpu(0, utilizationGpu=n))).json()["id"] for n in (2, 3)]
    resumed = open_stream(server, headers={"Last-Event-ID": seen})
    got = [resumed.next(), resumed.next()]
    assert [e["id"] for e in got] == missed
    assert "snapshot" not in got[0]["data"]


def test_ids_are_unique_across_restarts_and_an_old_id_resumes_only_where_events_outlive_it(
        server, open_stream, backend):
    before = server.push(multi()).json()["id"]
    server.restart()
    after = server.push(multi(gpu(0, utilizationGpu=7))).json()["id"]
    assert after != before
    stream = open_stream(server, headers={"Last-Event-ID": before})
    event = stream.next()
    if backend == "redis":  # the stream in Redis outlived the process: exactly what was missed
        assert event["id"] == after and "snapshot" not in event["data"]
    else:  # nothing outlived the process: a fresh snapshot, never the wrong events
        assert event["data"]["snapshot"] is True
    assert event["data"]["gpus"][0]["utilizationGpu"] == 7


def test_healthz_counts_devices_and_viewers_without_names(server, open_stream):
    server.push(multi(), device="rig-1")
    server.push(multi(), device="rig-2")
    streams = [open_stream(server) for _ in range(3)]
    for stream in streams:
        stream.next()
    health = server.health()
    assert health["ok"] is True and health["devices"] == 2 and health["online"] == 2
    assert health["subscribers"] == 3 and health["uptimeS"] >= 0
    assert "rig-1" not in requests.get(server.url + "/healthz", timeout=5).text


def test_viewer_login_guards_read_routes_but_not_pushes_or_healthz(start_server, open_stream):
    server = start_server(DASHBOARD_PASSWORD="s3cret", **PRIVATE)
    for path in ("/", "/gpu/stream"):
        answer = requests.get(server.url + path, timeout=5, stream=True)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(server.url + "/", auth=("admin", "nope"), timeout=5)
    assert wrong.status_code == 401
    assert requests.get(server.url + "/", auth=("admin", "s3cret"), timeout=5).status_code == 200
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    assert server.push(multi()).status_code == 200
    token = base64.b64encode(b"admin:s3cret").decode()
    stream = open_stream(server, headers={"Authorization": f"Basic {token}"})
    assert stream.next()["data"]["device"] == "rig-1"


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_cors_allows_only_configured_origins(start_server):
    server = start_server(CORS_ORIGINS="https://ops.example")
    ok = requests.get(server.url + "/healthz", headers={"Origin": "https://ops.example"}, timeout=5)
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ops.example"
    assert ok.headers["Access-Control-Allow-Credentials"] == "true"  # a named origin may send its cookie
    other = requests.get(server.url + "/healthz", headers={"Origin": "https://evil.example"}, timeout=5)
    assert "Access-Control-Allow-Origin" not in other.headers


@pytest.mark.no_backend
def test_cors_for_any_origin_never_lets_credentials_through(start_server):
    # The Fetch standard: `*` with credentials is refused by browsers, and echoing any origin with
    # Allow-Credentials would let every site read a signed-in viewer's stream.
    server = start_server(CORS_ORIGINS="*")
    answer = requests.get(server.url + "/healthz", headers={"Origin": "https://any.example"}, timeout=5)
    assert answer.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in answer.headers


@pytest.mark.no_backend  # HTTP parsing only: the backend plays no part
def test_dashboard_page_is_served(server):
    page = requests.get(server.url + "/", timeout=5)
    assert page.status_code == 200 and "gpu/stream" in requests.get(
        server.url + "/static/dashboard.js", timeout=5).text


def test_a_bad_setting_stops_the_server_with_one_line_naming_it():
    env = {**os.environ, "ENV_FILE": os.devnull, "PORT": "0", "HEARTBEAT_S": "often",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "config error: HEARTBEAT_S: 'often' is not a number" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_last_event_id_of_any_shape_gets_a_fresh_snapshot_never_an_error(server, open_stream):
    server.push(multi(gpu(0, utilizationGpu=5)))
    for last in ("\xb2-1", "9" * 5000 + "-1", "1-" + "9" * 5000, "-", "abc", "1-2-3", "\uff11-1".encode().decode("latin-1")):
        stream = open_stream(server, headers={"Last-Event-ID": last})
        assert stream.status == 200, last
        assert stream.next()["data"]["snapshot"] is True
    assert "Traceback" not in server.output()

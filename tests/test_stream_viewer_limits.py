"""The viewer caps on the real server: counted exactly, checked atomically, and never locking agents out."""
import threading
import time

import requests

from bench.harness import open_raw_stream
from conftest import KEYS, multi, wait_for


def test_a_burst_of_connects_never_passes_max_subscribers(start_server):
    server = start_server(MAX_SUBSCRIBERS="5", MAX_SUBSCRIBERS_PER_CLIENT="100")
    results, start = [], threading.Barrier(40)

    def connect(n):
        start.wait()
        results.append(open_raw_stream(server.port, f"127.0.1.{n}"))
    threads = [threading.Thread(target=connect, args=(n,)) for n in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for _, status, _ in results)
    assert statuses.count("HTTP/1.1 200 OK") == 5, statuses
    assert all(s.startswith("HTTP/1.1 503") for s in statuses if "200" not in s)
    assert server.health()["subscribers"] == 5
    for sock, _, _ in results:
        sock.close()
    wait_for(lambda: server.health()["subscribers"] == 0)


def test_the_count_is_exact_however_a_stream_ends(start_server, open_stream):
    server = start_server(MAX_SUBSCRIBERS="3")
    for _ in range(5):  # a HEAD request opens a stream that is never read: counted out at once
        assert requests.head(server.url + "/gpu/stream", timeout=5).status_code == 200
        assert server.health()["subscribers"] == 0
    for _ in range(2):  # a viewer that hangs up is counted out at its next write (a heartbeat)
        requests.get(server.url + "/gpu/stream?device=rig-1", timeout=5, stream=True).close()
    wait_for(lambda: server.health()["subscribers"] == 0)
    streams = [open_stream(server) for _ in range(3)]
    refused = requests.get(server.url + "/gpu/stream", timeout=5)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"].startswith("too many viewers")
    for stream in streams:
        stream.close()
    wait_for(lambda: server.health()["subscribers"] == 0)
    # Places are given back: three new viewers fit again.
    again = [open_stream(server) for _ in range(3)]
    assert [s.status for s in again] == [200] * 3 and server.health()["subscribers"] == 3


def test_one_address_cannot_take_every_stream(start_server):
    server = start_server(MAX_SUBSCRIBERS="20", MAX_SUBSCRIBERS_PER_CLIENT="4")
    mine = [open_raw_stream(server.port, "127.0.2.1") for _ in range(5)]
    assert [status for _, status, _ in mine].count("HTTP/1.1 200 OK") == 4
    sock, status, head = mine[-1]
    assert status.startswith("HTTP/1.1 429") and b"Retry-After: " in head
    other = open_raw_stream(server.port, "127.0.2.2")
    assert other[1] == "HTTP/1.1 200 OK"  # another client is not affected
    for sock, _, _ in mine + [other]:
        sock.close()


def test_behind_a_trusted_proxy_the_cap_applies_to_each_forwarded_client(start_server):
    server = start_server(MAX_SUBSCRIBERS_PER_CLIENT="2")
    get = lambda client: requests.get(server.url + "/gpu/stream", timeout=5, stream=True,  # noqa: E731
                                      headers={"X-Forwarded-For": client})
    held = [get("203.0.113.5"), get("203.0.113.5")]
    assert [r.status_code for r in held] == [200, 200]
    assert get("203.0.113.5").status_code == 429 and get("198.51.100.1").status_code == 200


def test_with_every_stream_taken_pushes_still_get_in_and_viewers_get_their_503(start_server):
    # The default sizes scaled down together: a pool of 200, of which streams may take 180.
    server = start_server(WORKER_CONNECTIONS="200", MAX_SUBSCRIBERS="180", MAX_SUBSCRIBERS_PER_CLIENT="60",
                          PUSH_RATE_LIMIT="1000")
    viewers = [open_raw_stream(server.port, f"127.0.3.{n % 3 + 1}") for n in range(180)]
    assert all(status == "HTTP/1.1 200 OK" for _, status, _ in viewers)
    assert server.health()["subscribers"] == 180
    sessions = [requests.Session() for _ in range(10)]  # ten agents, each with its keep-alive connection
    for _ in range(3):
        for n, session in enumerate(sessions):
            started = time.monotonic()
            answer = session.post(server.url + "/push-sse", json=multi(), timeout=5,
                                  headers={"Authorization": f"Bearer {KEYS[f'rig-{n % 9 + 1}']}"})
            assert answer.status_code == 200 and time.monotonic() - started < 1
    for n in range(10):
        started = time.monotonic()
        _, status, head = open_raw_stream(server.port, f"127.0.4.{n + 1}")
        assert status.startswith("HTTP/1.1 503") and b"Retry-After: " in head
        assert time.monotonic() - started < 1
    for sock, _, _ in viewers:
        sock.close()


def test_a_cap_that_leaves_no_room_for_pushes_stops_the_server_with_one_line(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import ROOT, procfile_command
    env = {**os.environ, "ENV_FILE": os.devnull, "PORT": "0", "WORKER_CONNECTIONS": "200", "MAX_SUBSCRIBERS": "200",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    result = subprocess.run(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("config error: MAX_SUBSCRIBERS: 200 leaves too few of WORKER_CONNECTIONS (200) for pushes; "
            "set it to 180 or less") in result.stderr


def test_connects_racing_on_os_threads_never_pass_the_cap(make_app):
    # In-process, with OS threads switching every microsecond inside the view: a cap checked
    # in one place and counted in another lets racing connects through; one step does not.
    import sys

    app = make_app(MAX_SUBSCRIBERS="8", MAX_SUBSCRIBERS_PER_CLIENT="1000", DEVICE_KEYS="")
    answers, start = [], threading.Barrier(64)

    def connect():
        client = app.test_client()
        start.wait()
        answers.append(client.get("/gpu/stream", buffered=False))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=connect) for _ in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert [a.status_code for a in answers].count(200) == 8
    assert app.test_client().get("/healthz").json["subscribers"] == 8
    for answer in answers:
        answer.close()
    assert app.test_client().get("/healthz").json["subscribers"] == 0

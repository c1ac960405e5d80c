"""Bad keys from one address, a killed worker, and shutdown: what a deploy and the internet do."""
import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import requests

from conftest import KEYS, PRIVATE, ROOT, Stream, gpu, multi


def push_from(server, source, key, forwarded_for=None):
    """POST a push from a given loopback address, as a client elsewhere would."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    conn.request("POST", "/push-sse", json.dumps(multi()), headers)
    answer = conn.getresponse()
    result = answer.status, answer.getheader("Retry-After"), answer.read()
    conn.close()
    return result


def test_repeated_bad_keys_from_one_address_are_slowed_down(server):
    codes = [push_from(server, "127.0.0.2", "guess-number-%02d-xxxxxxxx" % i)[0] for i in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429]
    status, retry_after, body = push_from(server, "127.0.0.2", "guess-number-12-xxxxxxxx")
    assert status == 429 and int(retry_after) >= 1 and b"bad device keys" in body
    # Another address is not affected, and a forged X-Forwarded-For from a client is ignored.
    assert push_from(server, "127.0.0.3", "guess-number-13-xxxxxxxx")[0] == 401
    assert push_from(server, "127.0.0.2", "guess-number-14-xxxxxxxx", forwarded_for="127.0.0.9")[0] == 429


def test_a_valid_key_is_never_slowed_by_bad_keys_from_its_address(server):
    # Issue 20: one bad guess a second from a NAT kept the valid agent behind it at 429 for 30 of 30 s.
    for i in range(12):
        push_from(server, "127.0.0.4", f"guess-number-{i:02d}-zzzzzzzz")
    assert push_from(server, "127.0.0.4", "guess-number-12-zzzzzzzz")[0] == 429
    for i in range(20):
        assert push_from(server, "127.0.0.4", KEYS["rig-1"])[0] == 200
        assert push_from(server, "127.0.0.4", f"guess-again-{i:02d}-zzzzzzzz")[0] == 429


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_one_slowed(server):
    for i in range(10):
        assert push_from(server, "127.0.0.1", f"guess-{i:02d}-yyyyyyyyyyyy", "203.0.113.9")[0] == 401
    assert push_from(server, "127.0.0.1", "guess-10-yyyyyyyyyyyy", "203.0.113.9")[0] == 429
    assert push_from(server, "127.0.0.1", "guess-11-yyyyyyyyyyyy", "198.51.100.7")[0] == 401
    # Only the entry the proxy appended counts; what the client wrote before it does not.
    assert push_from(server, "127.0.0.1", "guess-12-yyyyyyyyyyyy", "198.51.100.7, 203.0.113.9")[0] == 429
    assert push_from(server, "127.0.0.1", KEYS["rig-1"], "203.0.113.9")[0] == 200


def test_sigterm_ends_streams_at_once_so_a_deploy_does_not_hang(start_server):
    server = start_server()
    streams = [Stream(server.port) for _ in range(5)]
    for stream in streams:
        stream.next(with_comments=True)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    for stream in streams:
        try:
            while True:
                stream.next(timeout=5, with_comments=True)
        except EOFError:
            pass  # the stream ended cleanly
    server.process.wait(10)
    print(f"SIGTERM with 5 open streams: server gone in {time.monotonic() - started:.2f} s")
    # gunicorn polls once a second (alive, then its pool): about 2.8 s; without ending the
    # streams it would wait out --graceful-timeout (5 s) and more.
    assert time.monotonic() - started < 4


def test_sigterm_ends_agents_idle_keep_alive_connections_too(start_server):
    # gunicorn keeps an agent's connection 75 s between pushes (gunicorn.conf.py) and waits for
    # each at a stop: without ending them a deploy waits out --graceful-timeout (5 s) and more.
    server = start_server()
    agents = [requests.Session() for _ in range(5)]
    for session in agents:
        answer = session.post(server.url + "/push-sse", data=json.dumps(multi(gpu(0))), timeout=10,
                              headers={"Authorization": f"Bearer {KEYS['rig-1']}", "Content-Type": "application/json"})
        assert answer.status_code in (200, 429)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(10)
    assert time.monotonic() - started < 4


def test_a_killed_worker_comes_back_and_the_agents_rebuild_the_state(server, tmp_path):
    log = open(tmp_path / "agent.log", "w")
    agent = subprocess.Popen([sys.executable, str(ROOT / "agent.py"), "--url", server.url + "/push-sse",
                              "--key", KEYS["rig-5"], "--simulate", "1", "--interval", "0.3"],
                             stdout=log, stderr=subprocess.STDOUT)
    try:
        stream = Stream(server.port)
        stream.until(lambda e: e["data"].get("device") == "rig-5", timeout=10)
        old_worker = server.worker_pid
        os.kill(old_worker, signal.SIGKILL)
        try:
            while True:
                stream.next(timeout=10, with_comments=True)
        except (EOFError, OSError, http.client.HTTPException):
            pass  # the stream broke with the worker; a browser reconnects by itself
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (server.worker_pid == old_worker or not server._healthy(server.port)):
            time.sleep(0.1)
        assert server.worker_pid != old_worker
        again = Stream(server.port)
        event = again.until(lambda e: e["data"].get("device") == "rig-5", timeout=10)
        assert event["data"]["status"] == "online"
        assert server.health()["devices"] == 1 and agent.poll() is None
    finally:
        agent.terminate()
        agent.wait(10)
        log.close()


def test_no_secret_ever_reaches_the_log(start_server):
    server = start_server(DASHBOARD_PASSWORD="viewer-secret-123", **PRIVATE)
    server.push(multi())
    server.push(multi(), key="wrong-key-that-is-secret-too")
    server.stop()
    log = server.output()
    assert KEYS["rig-1"] not in log and "wrong-key-that-is-secret-too" not in log
    assert "viewer-secret-123" not in log


def test_background_work_that_keeps_failing_the_same_way_is_one_line(caplog):
    # Issue 20: Redis at maxmemory, or a full disk, had each background writer log a traceback every round.
    from gpustats.background import watch
    rounds, done = [], threading.Event()

    def work():
        rounds.append(1)
        if len(rounds) <= 20:
            raise OSError("No space left on device")
        if len(rounds) == 25:
            done.set()
    caplog.set_level(logging.INFO, "gpustats")
    watch("test-writer", 0.001, work, done.is_set)
    assert done.wait(10)
    lines = [r for r in caplog.records if "test-writer" in r.getMessage()]
    assert [r.getMessage() for r in lines] == [
        "test-writer failed; it goes on (this failure again is not logged)",
        "test-writer works again, after 19 more failures of that kind"]
    assert lines[0].exc_info is not None  # the first has its traceback

"""The shipped deploy/nginx.conf, run by a real nginx on loopback in front of the real server."""
import http.client
import json
import re
import socket
import subprocess
import time

import pytest

from conftest import HEARTBEAT_S, KEYS, ROOT, Stream, free_port, multi, require


def start_nginx(tmp_path, backends):
    """Start nginx with deploy/nginx.conf on a loopback port, its upstream set to `backends`' ports."""
    binary = require("nginx", "nginx")
    port = free_port()
    site = (ROOT / "deploy" / "nginx.conf").read_text()
    if len(backends) == 1:
        site = site.replace("server 127.0.0.1:3000;", f"server 127.0.0.1:{backends[0]};")
    else:  # the scale-out lines, as docs/SCALE-OUT.md says to write them: one per host
        site = re.sub(r"\n\s*server 127\.0\.0\.1:3000;[^\n]*", "", site)
        pattern = re.search(r"# (server 10\.0\.0\.2:3000 (.*))\n", site)
        hosts = "\n".join(f"    server 127.0.0.1:{p} {pattern[2]}" for p in backends)
        site = re.sub(r"    # server 10\.0\.0\.\d:3000 .*\n", "", site).replace("    keepalive", hosts + "\n    keepalive")
    site = re.sub(r"listen 80;\n\s*listen \[::\]:80;", f"listen 127.0.0.1:{port};", site)
    assert f"127.0.0.1:{port}" in site and all(f"127.0.0.1:{p}" in site for p in backends)
    (tmp_path / "logs").mkdir(exist_ok=True)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(f"""
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    include {tmp_path}/site.conf;
}}
""")
    process = subprocess.Popen([binary, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr",
                                "-g", "daemon off;"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process, port
        except OSError:
            if process.poll() is not None:
                pytest.fail("nginx did not start: " + process.stdout.read().decode())
            time.sleep(0.05)
    pytest.fail("nginx did not open its port")


@pytest.fixture
def proxy(server, tmp_path):
    """nginx with deploy/nginx.conf in front of the test server."""
    process, port = start_nginx(tmp_path, [server.port])
    yield port
    process.terminate()
    process.wait(10)


def push_via(port, source, key, forwarded_for=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    conn.request("POST", "/push-sse", json.dumps(multi()), headers)
    answer = conn.getresponse()
    status, body = answer.status, answer.read()
    conn.close()
    return status, body


def test_events_and_heartbeats_pass_through_without_buffering(server, proxy):
    stream = Stream(proxy, headers={"Accept-Encoding": "gzip, deflate, br"})  # as browsers ask
    assert stream.header("Content-Type").startswith("text/event-stream")
    started = time.monotonic()
    for _ in range(3):  # every HEARTBEAT_S; a buffering proxy would hold these back
        assert stream.next(timeout=2, with_comments=True)["event"] == ":comment"
    assert time.monotonic() - started < 3 * float(HEARTBEAT_S) + 1
    for n in range(5):
        sent = time.monotonic()
        assert push_via(proxy, "127.0.0.1", KEYS["rig-1"])[0] == 200
        event = stream.until(lambda e: e.get("data", {}).get("device") == "rig-1", timeout=2)
        assert time.monotonic() - sent < 0.5 and event["id"]
    stream.close()


def test_pushes_and_the_page_work_through_the_proxy(server, proxy):
    status, body = push_via(proxy, "127.0.0.1", KEYS["rig-2"])
    assert status == 200 and json.loads(body)["device"] == "rig-2"
    conn = http.client.HTTPConnection("127.0.0.1", proxy, timeout=5)
    conn.request("GET", "/")
    page = conn.getresponse()
    assert page.status == 200 and "Content-Security-Policy" in dict(page.getheaders())


def test_the_bad_key_slow_down_sees_each_clients_real_address(server, proxy):
    for i in range(10):
        assert push_via(proxy, "127.0.0.2", f"guessed-key-number-{i:02d}")[0] == 401
    assert push_via(proxy, "127.0.0.2", "guessed-key-number-10")[0] == 429
    # A client cannot dodge it by claiming another address: nginx sets the header itself.
    assert push_via(proxy, "127.0.0.2", "guessed-key-number-11", forwarded_for="127.0.0.77")[0] == 429
    # Another client behind the same proxy is not slowed down, nor is a valid key from the same one.
    assert push_via(proxy, "127.0.0.3", "guessed-key-number-12")[0] == 401
    assert push_via(proxy, "127.0.0.2", KEYS["rig-1"])[0] == 200


def test_two_hosts_behind_the_shipped_upstream_serve_one_fleet_and_survive_a_deploy(redis_server, start_server,
                                                                                     tmp_path):
    hosts = [start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000") for _ in range(2)]
    process, port = start_nginx(tmp_path, [host.port for host in hosts])
    viewers = [Stream(port) for _ in range(4)]  # nginx spreads them over both hosts
    try:
        sent = [json.loads(push_via(port, "127.0.0.1", KEYS["rig-1"])[1])["id"] for _ in range(6)]
        for viewer in viewers:
            assert [viewer.until(lambda e: e["event"] is None)["id"] for _ in range(6)] == sent
        hosts[0].stop()  # deploy host by host: the first one goes away
        missed = [json.loads(push_via(port, "127.0.0.1", KEYS["rig-2"])[1])["id"] for _ in range(3)]
        again = Stream(port, headers={"Last-Event-ID": sent[-1]})  # as a browser reconnects
        assert [again.until(lambda e: e["event"] is None)["id"] for _ in range(3)] == missed
        again.close()
    finally:
        for viewer in viewers:
            viewer.close()
        process.terminate()
        process.wait(10)

"""Connections that ask once, or never, and then wait: one address holds its share of the pool, and idle ones go first."""
import http.client
import json
import os
import re
import select
import socket
import time

from config import load_config
from conftest import KEYS, multi

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def share(**settings):
    """Return how many connections one address may hold on a server started with `settings`."""
    return load_config(settings, environ={**os.environ, "ENV_FILE": os.devnull}).max_connections_per_client


def open_connections(port, count, source, request=HEALTHZ, timeout=30):
    """Connect `count` sockets from `source`, send each `request` once connected, and return them unread."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(sock)
    waiting, poller = {sock.fileno(): sock for sock in socks}, select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout
    while waiting and time.monotonic() < deadline:  # each sends once connected: the server accepts at its pace
        for fd, _ in poller.poll(1000):
            try:
                waiting[fd].send(request)
            except OSError:
                pass  # refused and closed already
            poller.unregister(fd)
            del waiting[fd]
    return socks


def readable(socks, at_least=None, timeout=0.5):
    """Wait until `at_least` of `socks` (None: all it can in `timeout`) have something to read; return their indexes."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock.fileno(), select.POLLIN)
    index = {sock.fileno(): n for n, sock in enumerate(socks)}
    found, deadline = set(), time.monotonic() + timeout
    while (at_least is None or len(found) < at_least) and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            found.add(index[fd])
            poller.unregister(fd)
    return found


def status_of(sock):
    """Return the status code of the answer waiting on `sock`, or None if it was closed without one."""
    try:
        head = sock.recv(64)
    except OSError:
        return None
    return int(head.split(b" ")[1]) if head.startswith(b"HTTP/1.1 ") else None


def timed_pushes(port, source="127.0.0.3", count=20):
    """Return the seconds each of `count` pushes from `source` took on one keep-alive connection; all must be 200."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    took = []
    for _ in range(count):
        started = time.monotonic()
        conn.request("POST", "/push-sse", body=json.dumps(multi()),
                     headers={"Authorization": f"Bearer {KEYS['rig-1']}", "Content-Type": "application/json"})
        answer = conn.getresponse()
        answer.read()
        took.append(time.monotonic() - started)
        assert answer.status == 200
    conn.close()
    return took


def close_all(socks):
    for sock in socks:
        sock.close()


def test_one_address_cannot_hold_the_pool_with_idle_connections(start_server):
    # The attack on a fresh clone: 10,100 connections from one address, each sending one GET /healthz
    # and then nothing, filled the default pool of 10,000, and pushes from elsewhere got no answer.
    server = start_server(PUSH_RATE_LIMIT="1000")
    most = share()
    socks = open_connections(server.port, 10_100, "127.0.0.2")
    answered = readable(socks, len(socks), timeout=20)  # each answered, or refused and closed
    took = timed_pushes(server.port)
    statuses = [status_of(socks[n]) for n in answered]
    print(f"10,100 idle connections from one address at the default pool: {statuses.count(200)} answered, "
          f"{statuses.count(429)} refused; the slowest of 20 pushes from another took {max(took) * 1000:.1f} ms")
    assert max(took) < 1.0
    assert statuses.count(200) == most and statuses.count(429) == len(socks) - most
    close_all(socks)


def test_silent_connections_count_too(start_server):
    # Connections that send nothing at all held a place 75 s each, where no WSGI middleware sees them.
    settings = {"WORKER_CONNECTIONS": "200", "MAX_SUBSCRIBERS": "180", "MAX_SUBSCRIBERS_PER_CLIENT": "10"}
    server = start_server(PUSH_RATE_LIMIT="1000", **settings)
    most = share(**settings)
    socks = open_connections(server.port, 300, "127.0.0.2", request=b"")
    refused = readable(socks, len(socks) - most, timeout=10)
    took = timed_pushes(server.port)
    assert max(took) < 1.0
    assert len(refused) == len(socks) - most and all(status_of(socks[n]) == 429 for n in refused)
    close_all(socks)


def test_refused_connections_are_logged_once_a_minute(start_server):
    settings = {"WORKER_CONNECTIONS": "200", "MAX_SUBSCRIBERS": "180", "MAX_SUBSCRIBERS_PER_CLIENT": "10"}
    server = start_server(**settings)
    most = share(**settings)
    socks = open_connections(server.port, most + 5, "127.0.0.2", request=b"")
    assert len(readable(socks, 5, timeout=10)) == 5
    said = re.findall(r"refused connections from addresses that held (\d+) already \(the last from (\S+)\)",
                      server.output())
    assert said == [(str(most), "127.0.0.2")]  # the first at once, the 4 after it in a minute's line
    close_all(socks)


def test_the_connections_idle_longest_are_closed_first_when_the_pool_runs_low(start_server):
    # Many addresses, each under its share, can still fill the pool with idle connections.
    settings = {"WORKER_CONNECTIONS": "100", "MAX_SUBSCRIBERS": "90", "MAX_SUBSCRIBERS_PER_CLIENT": "2"}
    server = start_server(PUSH_RATE_LIMIT="1000", **settings)
    assert share(**settings) == 10
    socks = []
    for n in range(100):  # 10 from each of 10 addresses, each idle once answered, in this order
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5,
                                        source_address=(f"127.0.0.{n // 10 + 2}", 0))
        sock.sendall(HEALTHZ)
        answer = b""
        while not re.search(rb"\r\n\r\n\{.*\}", answer, re.S):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        socks.append(sock)
    took = timed_pushes(server.port, source="127.0.0.20")
    closed = readable(socks)
    assert all(socks[n].recv(64) == b"" for n in closed)
    print(f"a pool of 100 filled with idle connections: {len(closed)} closed, the slowest of 20 pushes "
          f"took {max(took) * 1000:.1f} ms")
    assert max(took) < 1.0
    assert closed == set(range(len(closed))) and 5 <= len(closed) <= 10, closed  # the oldest, and only a few
    assert "closed the connections idle longest" in server.output()
    assert "Traceback" not in server.output()  # gevent's own shutdown() made gunicorn log one per closed connection
    close_all(socks)


def test_an_ipv6_host_is_counted_by_its_64_and_a_trusted_proxy_not_at_all():
    from gpustats.access.connections import Connections
    connections = Connections(pool=100, per_client=2, trusted_proxies=("::1",))
    socks = [socket.socket(socket.AF_INET6) for _ in range(6)]
    admitted = [connections.admit(sock, address) for sock, address in zip(socks, [
        "2001:db8::1", "2001:db8::ffff:2", "2001:db8::3", "2001:db8:0:1::1", "::1", "::1"])]
    assert admitted == [True, True, False, True, True, True]  # one host picks addresses in its /64 at will
    close_all(socks)

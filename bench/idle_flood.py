"""The idle flood for `python -m bench --idle-flood N`: N connections from one address each ask once and then wait; time pushes.

An independent attack on a fresh clone opened 10,100 connections from one address, each sending
one `GET /healthz` and then nothing: at the default pool of 10,000 every push from another address
went unanswered. This runs that at the default sizes (this tree's server, or --server-dir's), then
sends pushes from another address on one keep-alive connection and prints how many were answered
200 and the slowest.
"""
import http.client
import json
import os
import resource
import select
import socket
import subprocess
import tempfile
import time

from bench import harness
from bench.harness import ms, pct

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
ATTACKER, AGENT = "127.0.0.2", "127.0.0.3"  # neither is a trusted proxy (127.0.0.1 is, by default)
PUSH_TIMEOUT_S = 5.0
GIVE_UP_AFTER = 3  # timeouts in a row: the pool is taken, and the rest would only wait as long


def flood(port, connections, timeout_s=30):
    """Connect `connections` sockets from ATTACKER, each sending HEALTHZ once connected; wait for each's answer or end."""
    socks = []
    for _ in range(connections):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((ATTACKER, 0))
        try:
            sock.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(sock)
    by_fd = {sock.fileno(): sock for sock in socks}
    poller, state = select.poll(), dict.fromkeys(by_fd, "connecting")
    for fd in state:
        poller.register(fd, select.POLLOUT)
    deadline = time.monotonic() + timeout_s
    while any(s != "settled" for s in state.values()) and time.monotonic() < deadline:
        for fd, _ in poller.poll(1000):
            if state[fd] == "connecting":  # connected, or refused: send, then wait for what comes back
                try:
                    by_fd[fd].send(HEALTHZ)
                except OSError:
                    pass
                state[fd] = "sent"
                poller.modify(fd, select.POLLIN)
            else:
                state[fd] = "settled"
                poller.unregister(fd)
    statuses = {}
    for sock in socks:
        try:
            head = sock.recv(64)
            what = head.split(b" ")[1].decode() if head.startswith(b"HTTP/1.1 ") else "closed"
        except BlockingIOError:
            what = "no answer"
        except OSError:
            what = "closed"
        statuses[what] = statuses.get(what, 0) + 1
    return socks, statuses


def pushes(port, keys, count):
    """Send `count` pushes from AGENT on one keep-alive connection; return (seconds, status or 'timeout') of each."""
    results, conn, in_a_row = [], None, 0
    for n in range(count):
        body = json.dumps({"host": "bench", "gpus": [harness.gpu_payload(i, n) for i in range(4)]})
        sent = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=PUSH_TIMEOUT_S,
                                                      source_address=(AGENT, 0))
            conn.request("POST", "/push-sse", body=body, headers={
                "Authorization": f"Bearer {keys[n % len(keys)]}", "Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            results.append((time.monotonic() - sent, answer.status))
            in_a_row = 0
        except OSError:
            results.append((time.monotonic() - sent, "timeout"))
            conn.close()
            conn, in_a_row = None, in_a_row + 1
            if in_a_row == GIVE_UP_AFTER:
                break
    return results


def idle_flood(connections, count=100, server_dir=harness.ROOT):
    """At the default sizes: `connections` idle ones from one address, then `count` pushes from another; print both."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    keys = [f"bench-key-{i}-0123456789abcdef" for i in range(harness.DEVICES)]
    port, log = harness.free_port(), tempfile.NamedTemporaryFile("w+", prefix="bench-idle-flood-", suffix=".log")
    server = harness.start_ours(port, keys, log, server_dir, PUSH_RATE_LIMIT="1000")
    try:
        started = time.monotonic()
        socks, statuses = flood(port, connections)
        settled = time.monotonic() - started
        held = len(subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"],
                                  capture_output=True, text=True).stdout.splitlines())
        results = pushes(port, keys, count)
    finally:
        server.terminate()
        server.wait(30)
        for sock in socks:
            sock.close()
    took = sorted(seconds for seconds, _ in results)
    answered = sum(1 for _, status in results if status == 200)
    print(f"server: {server_dir}; default sizes; {os.cpu_count()} cores; log {log.name}")
    print(f"{connections} connections from {ATTACKER}, each one GET /healthz and then idle, settled in "
          f"{settled:.1f} s: {', '.join(f'{n} {what}' for what, n in sorted(statuses.items()))}; "
          f"{held} established to the server's port")
    stopped = f" (stopped after {GIVE_UP_AFTER} timeouts of {PUSH_TIMEOUT_S:g} s in a row)" if len(results) < count else ""
    print(f"then pushes from {AGENT}: {answered} of {count} answered 200{stopped}; p50 {ms(pct(took, 0.5))}, "
          f"p99 {ms(pct(took, 0.99))}, slowest {ms(took[-1])}")

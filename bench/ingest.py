"""`make bench BENCH_ARGS=--ingest`: what a push costs, side by side with the Node seed, and a fleet of 2,000 PCs.

Two scenarios, each with 10 viewers reading every event:
- saturation (--ingest): one load generator keeps 8 keep-alive connections busy with 8-GPU
  pushes, each from the next of --devices devices (so no device passes PUSH_RATE_LIMIT).
  Both servers in turn, warmed up, the median of --repeat windows. CPU per accepted push is
  the server's CPU (its whole process tree, from /proc) over the window divided by the
  pushes answered 200 in it; the generator's and the viewers' CPU are shown apart.
- fleet (--ingest-fleet): --devices devices, each on its own keep-alive connection, push
  every --push-interval s (open loop, as agent.py does: never a backlog) for --duration s
  on one worker, with history on SQLite, alert rules and metrics on as in production.
  Push latency, push-to-viewer latency, the history writer's queue (the server logs it)
  and memory per device.

The load generator and the viewers are raw sockets on epoll in their own processes: a
requests session per push would cost more CPU than the server under test.
"""
import heapq
import json
import multiprocessing
import os
import re
import resource
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

import requests

from bench import harness

VIEWERS = 10
GPUS = 8


def keys_for(devices):
    return [f"ingest-bench-key-{i:05d}-{'x' * 16}" for i in range(devices)]


def body_template(gpus):
    """An 8-GPU push as agent.py sends it, with a slot for sampledAt (filled per push: every push is new)."""
    body = {"host": "bench", "sampledAt": 1.5,
            "agent": {"version": "bench", "backend": "simulated", "simulated": True},
            "gpus": [harness.gpu_payload(i, 3) for i in range(gpus)]}
    before, after = json.dumps(body, separators=(",", ":")).split('"sampledAt":1.5', 1)
    return before.encode() + b'"sampledAt":', after.encode()


def request_bytes(port, key, head, tail, now, address=None):
    body = head + f"{now:.3f}".encode() + tail
    forwarded = f"X-Forwarded-For: {address}\r\n" if address else ""
    return (f"POST /push-sse HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n{forwarded}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def address_of(device):
    """A PC's own address, as nginx passes it on: a fleet's PCs do not share one (the per-address limits)."""
    return f"10.{device >> 16 & 255}.{device >> 8 & 255}.{device & 255}"


class Connection:
    """One keep-alive connection: send a request, read its response (Content-Length framed)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setblocking(False)
        self.buffer, self.pending, self.sent_at, self.device = b"", b"", None, None

    def response(self):
        """Return the status of a complete response in the buffer (and consume it), else None."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1")
        length = int(re.search(r"(?im)^content-length:\s*(\d+)", head).group(1))
        if len(self.buffer) < end + 4 + length:
            return None
        self.buffer = self.buffer[end + 4 + length:]
        return int(head.split(" ", 2)[1])


def generate(port, keys, mode, connections, interval, warmup_s, window_s, results):
    """Push until warmup_s + window_s; report what was answered inside the window, and this process's CPU.

    mode "closed": `connections` connections, each sends the next push as soon as the last is
    answered. mode "open": one connection per device, each due every `interval` s.
    """
    head, tail = body_template(GPUS)
    conns = [Connection(port) for _ in range(connections if mode == "closed" else len(keys))]
    poller = select.epoll()
    by_fd = {c.sock.fileno(): c for c in conns}
    for fd in by_fd:
        poller.register(fd, select.EPOLLIN)
    start = time.monotonic()
    window = (start + warmup_s, start + warmup_s + window_s)
    latencies, statuses, cpu, sent_ok = [], {}, {}, []
    next_key = [0]
    due = []  # (when, connection index) for the open loop

    def send(conn, device):
        conn.device, conn.sent_at, conn.sent_wall = device, time.monotonic(), time.time()
        conn.pending = request_bytes(port, keys[device], head, tail, conn.sent_wall,
                                     address_of(device) if mode == "open" else None)
        flush(conn)

    def flush(conn):
        try:
            sent = conn.sock.send(conn.pending)
        except BlockingIOError:
            sent = 0
        conn.pending = conn.pending[sent:]
        poller.modify(conn.sock.fileno(), select.EPOLLIN | (select.EPOLLOUT if conn.pending else 0))

    if mode == "closed":
        for conn in conns:
            send(conn, next_key[0] % len(keys))
            next_key[0] += 1
    else:
        for i in range(len(conns)):  # spread over the interval, as agents started at random times
            heapq.heappush(due, (start + i * interval / len(conns), i))
    marked = set()
    while True:
        now = time.monotonic()
        for name, at in (("start", window[0]), ("end", window[1])):
            if name not in marked and now >= at:
                marked.add(name)
                times = os.times()
                cpu[name] = times.user + times.system
        if now >= window[1]:
            break
        while due and due[0][0] <= now:
            when, i = heapq.heappop(due)
            conn = conns[i]
            if conn.sent_at is None:
                send(conn, i)
                heapq.heappush(due, (when + interval, i))
            else:  # still waiting for the last answer: due again the moment it comes (agent.py's loop)
                conn.late = when + interval
        timeout = max(0.0, min((due[0][0] if due else now + 0.05), window[1]) - time.monotonic())
        for fd, mask in poller.poll(min(timeout, 0.05)):
            conn = by_fd[fd]
            if mask & select.EPOLLOUT and conn.pending:
                flush(conn)
            if not mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                continue
            try:
                data = conn.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionError:
                data = b""
            if not data:  # closed or reset under a push: counted as such, and a new connection, as agent.py's
                if conn.sent_at is not None and window[0] <= conn.sent_at <= window[1]:
                    statuses["closed"] = statuses.get("closed", 0) + 1
                poller.unregister(fd)
                del by_fd[fd]
                conn.sock.close()
                fresh = Connection(port)
                conn.sock, conn.buffer, conn.pending, conn.sent_at = fresh.sock, b"", b"", None
                by_fd[conn.sock.fileno()] = conn
                poller.register(conn.sock.fileno(), select.EPOLLIN)
                if mode == "closed":
                    send(conn, next_key[0] % len(keys))
                    next_key[0] += 1
                continue
            conn.buffer += data
            status = conn.response()
            if status is None:
                continue
            answered = time.monotonic()
            if window[0] <= conn.sent_at and answered <= window[1]:
                latencies.append(answered - conn.sent_at)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    sent_ok.append(conn.sent_wall)
            conn.sent_at = None
            if mode == "closed":
                send(conn, next_key[0] % len(keys))
                next_key[0] += 1
            elif getattr(conn, "late", None) is not None:
                late, conn.late = conn.late, None
                heapq.heappush(due, (max(late, answered), conns.index(conn)))
    latencies.sort()
    results.put({"statuses": statuses, "latencies": latencies, "cpu_s": cpu["end"] - cpu["start"],
                 "window_s": window_s, "sent": sent_ok})


def view(port, viewers, seconds, ready, results):
    """Hold `viewers` streams for `seconds`; count events and note push-to-viewer latency from sampledAt."""
    socks = []
    for _ in range(viewers):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"GET /gpu/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        sock.setblocking(False)
        socks.append(sock)
    ready.set()
    poller = select.epoll()
    for sock in socks:
        poller.register(sock.fileno(), select.EPOLLIN)
    by_fd = {s.fileno(): s for s in socks}
    tails, stamps, reads = {fd: b"" for fd in by_fd}, array("d"), array("d")  # each event's sampledAt, and when read
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fd, _ in poller.poll(0.2):
            try:
                data = by_fd[fd].recv(1 << 20)
            except BlockingIOError:
                continue
            now = time.time()
            chunk = tails[fd] + data
            parts = chunk.split(b"\n\n")
            tails[fd] = parts.pop()
            for part in parts:
                if b'"snapshot":true' in part:
                    continue
                found = harness.SAMPLED_AT.search(part)
                if found:
                    stamps.append(float(found.group(1)))
                    reads.append(now)
    times = os.times()
    results.put({"stamps": stamps.tobytes(), "reads": reads.tobytes(), "cpu_s": times.user + times.system})


def pct(values, q):
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def start_server(target, port, keys, log, node_dir, settings, server_dir=harness.ROOT):
    if target == "node-seed":
        return harness.start_node(port, log, node_dir)
    return harness.start_ours(port, keys, log, server_dir, **settings)


def one_window(target, args, keys, mode, connections, seconds, settings=None):
    """Start `target`, hold viewers, push for warm-up + `seconds`, and return the window's figures."""
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-ingest-{target}-", suffix=".log", delete=False)
    server_dir = getattr(args, "server_dir", harness.ROOT) if target != "before" else args.before
    server = start_server(target, port, keys, log, args.node_dir, settings or {}, server_dir)
    try:
        ready, results = multiprocessing.Event(), multiprocessing.Queue()
        viewers = multiprocessing.Process(target=view, args=(port, VIEWERS, args.warmup + seconds + 3, ready, results))
        viewers.start()
        ready.wait(30)
        time.sleep(0.5)
        pushed = multiprocessing.Queue()
        generator = multiprocessing.Process(target=generate, args=(port, keys, mode, connections, args.push_interval,
                                                                   args.warmup, seconds, pushed))
        memory_before = harness.server_peak_mib(server.pid)
        generator.start()
        time.sleep(args.warmup)
        cpu0, wall0 = harness.server_cpu_s(server.pid), time.monotonic()
        backlog = watch_backlog(port, wall0 + seconds) if target == "flask-gevent" else time.sleep(seconds) or []
        cpu1, wall1 = harness.server_cpu_s(server.pid), time.monotonic()
        load = pushed.get(timeout=120)
        seen = results.get(timeout=120)
        generator.join(30)
        viewers.join(30)
        rss = harness.server_memory_mib(server.pid)
        accepted = load["statuses"].get(200, 0)
        # The events of the pushes accepted in the window: each stamped with the sampledAt it was sent with.
        # In milliseconds: a server may print 1.120 as 1.12.
        sent = {round(float(f"{t:.3f}") * 1000) for t in load["sent"]}
        lags = sorted(read - stamp for stamp, read in zip(array("d", seen["stamps"]), array("d", seen["reads"]))
                      if round(stamp * 1000) in sent)
        return {"target": target, "accepted": accepted, "refused": sum(load["statuses"].values()) - accepted,
                "statuses": load["statuses"], "pushes_per_s": accepted / seconds,
                "cpu_ms_per_push": (cpu1 - cpu0) / max(accepted, 1) * 1000,
                "server_cores": (cpu1 - cpu0) / (wall1 - wall0),
                "push_p50_ms": pct(load["latencies"], 0.5), "push_p99_ms": pct(load["latencies"], 0.99),
                "push_max_ms": pct(load["latencies"], 1.0),
                "generator_cpu_s": load["cpu_s"], "viewer_cpu_s": seen["cpu_s"], "events": len(lags),
                "fanout_p50_ms": pct(lags, 0.5), "fanout_p99_ms": pct(lags, 0.99),
                "rss_mib": rss, "rss_before_mib": memory_before, "log": log.name,
                "backlog_max": max(backlog, default=None), "backlog_last": backlog[-1] if backlog else None}
    finally:
        stop(server)


def watch_backlog(port, until):
    """Ask /healthz once a second until `until`; return the history writer's backlog each time."""
    seen = []
    while time.monotonic() < until:
        time.sleep(max(0.0, min(1.0, until - time.monotonic())))
        try:
            seen.append(requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json().get("historyBacklog", 0))
        except (requests.RequestException, ValueError):
            seen.append(None)
    return [n for n in seen if n is not None]


def stop(process):
    process.terminate()
    try:
        process.wait(30)
    except Exception:
        process.kill()


def saturation(args):
    """Both servers in turn, `repeat` windows each; print the median row of each."""
    targets = ["flask-gevent", "node-seed"] if shutil.which("node") else ["flask-gevent"]
    if args.before:  # an older tree of this server, in turn with the others (git worktree add DIR COMMIT)
        targets.insert(1, "before")
    keys = keys_for(args.devices)
    print(f"{os.cpu_count()} cores shared by the server, the load generator and {VIEWERS} viewers; "
          f"8-GPU pushes on {args.connections} keep-alive connections, each from the next of {args.devices} devices; "
          f"{args.warmup:g} s of warm-up, then a {args.seconds:g} s window; median of {args.repeat}, servers in turn")
    rows = {t: [] for t in targets}
    for _ in range(args.repeat):
        for target in targets:
            row = one_window(target, args, keys, "closed", args.connections, args.seconds)
            rows[target].append(row)
            if args.json:
                print(json.dumps({k: v for k, v in row.items() if k != "log"}), file=sys.stderr)
    print("| server | pushes/s at saturation | CPU per accepted push | push p50 / p99 | events to viewers "
          "| load generator CPU per push (not counted) |")
    print("|---|---|---|---|---|---|")
    for target in targets:
        row = sorted(rows[target], key=lambda r: r["cpu_ms_per_push"])[len(rows[target]) // 2]
        print(f"| {target} | {row['pushes_per_s']:,.0f} | {row['cpu_ms_per_push']:.3f} ms | "
              f"{row['push_p50_ms']:.1f} / {row['push_p99_ms']:.1f} ms | {row['events']:,} of "
              f"{row['accepted'] * VIEWERS:,} | {row['generator_cpu_s'] / max(row['accepted'], 1) * 1000:.3f} ms |")
    if "node-seed" in targets:
        ours, node = (statistics.median(r["cpu_ms_per_push"] for r in rows[t]) for t in ("flask-gevent", "node-seed"))
        print(f"\nCPU per push, this server / the Node seed: {ours / node:.2f}x")


def fleet(args):
    """--devices devices on their own connections, each pushing every --push-interval s, for --seconds."""
    keys = keys_for(args.devices)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    print(f"{args.devices:,} devices, each on its own keep-alive connection, pushing 8 GPUs every "
          f"{args.push_interval:g} s for {args.seconds:g} s (after {args.warmup:g} s of warm-up) to one worker, "
          f"with history on SQLite, alert rules and metrics on; {VIEWERS} viewers")
    idle = idle_memory(args, keys)
    # Behind nginx, as docs/DEPLOY.md deploys it: each PC's own address comes in X-Forwarded-For.
    row = one_window("before" if args.before else "flask-gevent", args, keys, "open", 0, args.seconds,
                     {"TRUSTED_PROXIES": "127.0.0.1"})
    queue = (f"{row['backlog_max']:,} most, {row['backlog_last']:,} at the end" if row["backlog_max"] is not None
             else "not said (an older tree)")
    expected = args.devices / args.push_interval * args.seconds
    print(f"server: {args.before or 'this tree'}")
    print("| pushes answered 200 (refused) | rate | push p50 / p99 / max | push-to-viewer p50 / p99 "
          "| events to viewers | server CPU | history writer's queue, most seen | memory |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['accepted']:,} of about {expected:,.0f} ({row['refused']}) | {row['pushes_per_s']:,.0f}/s | "
          f"{row['push_p50_ms']:.1f} / {row['push_p99_ms']:.1f} / {row['push_max_ms']:.0f} ms | "
          f"{row['fanout_p50_ms']:.1f} / {row['fanout_p99_ms']:.1f} ms | {row['events']:,} | "
          f"{row['server_cores']:.2f} cores ({row['cpu_ms_per_push']:.3f} ms a push) | {queue} | "
          f"{row['rss_mib']:.0f} MiB, {idle:.0f} MiB with no device: "
          f"{(row['rss_mib'] - idle) * 1024 / args.devices:.1f} KiB per device |")
    if args.json:
        print(json.dumps({k: v for k, v in row.items() if k != "log"}), file=sys.stderr)


def idle_memory(args, keys):
    """The server's resident memory with the same keys and settings and no push yet."""
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-ingest-idle-", suffix=".log", delete=False)
    server = harness.start_ours(port, keys, log)
    try:
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        time.sleep(1)
        return harness.server_memory_mib(server.pid)
    finally:
        stop(server)



def floor(args):
    """CPU per request of gunicorn's gevent worker with a Flask route that does nothing, and with bare WSGI."""
    keys = keys_for(args.devices)
    print(f"8-GPU pushes on {args.connections} keep-alive connections, {args.warmup:g} s of warm-up, then "
          f"{args.seconds:g} s; median of {args.repeat}")
    print("| server | requests/s | CPU per request |")
    print("|---|---|---|")
    for name, target in (("gunicorn -k gevent, a bare Flask route", "bench.floor_app:flask_app"),
                         ("gunicorn -k gevent, a bare WSGI function", "bench.floor_app:wsgi")):
        rows = []
        for _ in range(args.repeat):
            port = harness.free_port()
            server = harness.subprocess.Popen(
                [str(Path(sys.executable).with_name("gunicorn")), "-c", os.devnull, target, "-k", "gevent",
                 "--bind", f"127.0.0.1:{port}"],
                cwd=harness.ROOT, stdout=harness.subprocess.DEVNULL, stderr=harness.subprocess.DEVNULL)
            try:
                harness.wait_up_any(port)
                pushed = multiprocessing.Queue()
                generator = multiprocessing.Process(target=generate, args=(port, keys, "closed", args.connections,
                                                                           2.0, args.warmup, args.seconds, pushed))
                generator.start()
                time.sleep(args.warmup)
                cpu0 = harness.server_cpu_s(server.pid)
                time.sleep(args.seconds)
                cpu1 = harness.server_cpu_s(server.pid)
                load = pushed.get(timeout=120)
                generator.join(30)
                n = load["statuses"].get(200, 0)
                rows.append((n / args.seconds, (cpu1 - cpu0) / max(n, 1) * 1000))
            finally:
                stop(server)
        rate, cpu = sorted(rows, key=lambda r: r[1])[len(rows) // 2]
        print(f"| {name} | {rate:,.0f} | {cpu:.3f} ms |")

"""Load benchmark: N stream subscribers, M pushes at R per second, against this server and the Node seed.

Prints delivered/expected, fan-out latency p50/p99 (push sent -> event read), server CPU
per delivered event and the server's peak memory, one Markdown row per server. Other
scenarios: --reconnect-storm (bench/storm.py), --history-load (bench/history_load.py), --idle-flood
(bench/idle_flood.py), --page (bench/page.py), --cap, --greedy, --agent;
--server-dir runs another tree's server, such as an older commit's, with this same bench.
"""
import argparse
import json
import multiprocessing
import os
import re
import resource
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench import harness
# ---- subscribers: each client process holds a share of the streams -------------------

def _connect(port):
    """Open one stream, retrying while the listen backlog is full; None if it never opens."""
    for attempt in range(50):
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /gpu/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            sock.setblocking(False)
            return sock
        except OSError:
            time.sleep(0.1 * (attempt + 1))
    return None


def _cpu_s():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _client_process(port, count, conn):
    """Hold `count` streams on one epoll loop and note when each event is read.

    Plain sockets on one epoll loop: a read is timed the moment it returns, with no task
    scheduling between the two, and its own CPU is reported apart from the server's.
    """
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    stats = {"arrivals": [], "failed": 0, "closed": 0, "streaming": 0}
    arrivals, poller, streams = stats["arrivals"], select.epoll(), {}
    for i in range(count):
        sock = _connect(port)
        if sock is None:
            stats["failed"] += 1
        else:
            streams[sock.fileno()] = [sock, b"", False]  # socket, unparsed bytes, streaming yet
            poller.register(sock.fileno(), select.EPOLLIN)
        if i % 100 == 99:
            time.sleep(0.05)  # ramp up: do not overflow the listen backlog
    time.sleep(0.5)
    before = _cpu_s()
    conn.send(("ready", len(streams)))
    while True:
        if conn.poll():
            if conn.recv() == "stop":
                break
            before = _cpu_s()  # "measure": the warm-up is over
        for fd, _ in poller.poll(0.05):
            stream = streams[fd]
            try:
                chunk = stream[0].recv(262144)
            except BlockingIOError:
                continue
            now = time.time()
            if not chunk:
                stats["closed"] += 1
                poller.unregister(fd)
                continue
            if not stream[2]:
                stats["streaming"], stream[2] = stats["streaming"] + 1, True
            buffer = stream[1] + chunk
            end = buffer.rfind(b"\n\n")
            if end < 0:
                stream[1] = buffer
                continue
            # (push sent, event read): a snapshot's sampledAt counts too, so callers window by send time.
            for value in harness.SAMPLED_AT.findall(buffer, 0, end):
                arrivals.append((float(value), now))
            stream[1] = buffer[end + 2:]
    stats["cpu_s"] = _cpu_s() - before  # the load generator's own work, never counted as the server's
    for stream in streams.values():
        stream[0].close()
    conn.send(("done", stats))


def _send_pushes(port, key, device, started, args, refused, pushes):
    session, count = requests.Session(), 0
    for n in range(device, pushes, harness.DEVICES):
        time.sleep(max(0.0, started + n / args.rate - time.monotonic()))
        body = {"host": f"bench-{device}", "sampledAt": time.time(),
                "agent": {"version": "bench", "backend": "simulated", "simulated": True},
                "gpus": [harness.gpu_payload(i, n) for i in range(args.gpus)]}
        answer = session.post(f"http://127.0.0.1:{port}/push-sse", data=json.dumps(body),
                              headers={"Content-Type": "application/json",
                                       "Authorization": f"Bearer {key}"}, timeout=60)
        count += answer.status_code != 200
    refused.append(count)


def _push_for(port, keys, args, pushes):
    """Send `pushes` pushes at args.rate, spread over the devices; return how many were refused.

    Open loop, as real agents push: one sender per device on a fixed schedule, so a slow
    server makes pushes pile up instead of slowing the senders down.
    """
    started, refused = time.monotonic(), []
    senders = [threading.Thread(target=_send_pushes, args=(port, keys[d], d, started, args, refused, pushes))
               for d in range(harness.DEVICES)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    return sum(refused)


def _stuck_viewer(port):
    """A viewer that connects and never reads, with a tiny receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /gpu/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    return sock


SIGN_IN_PASSWORD = "bench-admin-password"


def _sign_in_for(port, rate, stop, counts):
    """Sign in as admin `rate` times a second, each from a fresh session, until `stop` is set."""
    interval, due = 1 / rate, time.monotonic()
    while not stop.is_set():
        answer = requests.post(f"http://127.0.0.1:{port}/login", timeout=30,
                               data={"user": "admin", "password": SIGN_IN_PASSWORD})
        counts[answer.status_code] = counts.get(answer.status_code, 0) + 1
        due += interval
        time.sleep(max(0.0, due - time.monotonic()))


def run(target, args):
    keys = [f"bench-key-{i}-{os.urandom(8).hex()}" for i in range(harness.DEVICES)]
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-{target}-", suffix=".log", delete=False)
    # Every bench viewer comes from 127.0.0.1: lift the per-address cap, which is not what is measured here.
    ours = {"MAX_SUBSCRIBERS_PER_CLIENT": str(args.subscribers + args.stuck + 1)}
    signing_in = target.endswith("+sign-ins")
    if signing_in:  # the admin made from ADMIN_PASSWORD signs in over and over; viewers read the open dashboard
        target = target.removesuffix("+sign-ins")
        ours["ADMIN_PASSWORD"] = SIGN_IN_PASSWORD
    redis_server = None
    if target == "flask-redis":  # Redis' own CPU and memory count as the server's
        redis_server, url = harness.start_redis()
        ours.update(REDIS_URL=url, WEB_CONCURRENCY=str(args.workers))
    server = (harness.start_ours(port, keys, log, args.server_dir, **ours) if target != "node-seed"
              else harness.start_node(port, log, args.node_dir))
    pids = [server.pid] + ([redis_server.pid] if redis_server else [])
    clients = []
    try:
        share = [args.subscribers // args.clients + (i < args.subscribers % args.clients)
                 for i in range(args.clients)]
        for count in share:
            parent, child = multiprocessing.Pipe()
            proc = multiprocessing.Process(target=_client_process, args=(port, count, child), daemon=True)
            proc.start()
            clients.append((proc, parent))
        connected = sum(parent.recv()[1] for _, parent in clients)
        stuck = [_stuck_viewer(port) for _ in range(args.stuck)]
        # Warm-up, not measured: the same load for a while, so both servers have run every path
        # (Node's JIT has compiled the hot ones) before the CPU and the latencies count.
        _push_for(port, keys, args, round(args.warmup * args.rate))
        time.sleep(min(args.drain, 1.0))
        for _, parent in clients:
            parent.send("measure")
        measured_from = time.time()
        cpu_before = sum(harness.server_cpu_s(pid) for pid in pids)
        stop, sign_ins = threading.Event(), {}
        signer = threading.Thread(target=_sign_in_for, args=(port, args.sign_ins, stop, sign_ins), daemon=True)
        if signing_in:
            signer.start()
        started = time.monotonic()
        refused = _push_for(port, keys, args, args.pushes)
        push_s = time.monotonic() - started
        stop.set()
        expected = connected * args.pushes
        time.sleep(args.drain)
        cpu = sum(harness.server_cpu_s(pid) for pid in pids) - cpu_before
        peak = sum(harness.server_peak_mib(pid) for pid in pids)
        latencies, closed, client_cpu = [], 0, 0.0
        for _, parent in clients:
            parent.send("stop")
        for proc, parent in clients:
            _, stats = parent.recv()
            latencies += [read - sent for sent, read in stats["arrivals"] if sent >= measured_from]
            closed += stats["closed"]
            client_cpu += stats["cpu_s"]
            proc.join(5)
        for sock in stuck:
            sock.close()
    finally:
        for proc, _ in clients:
            proc.kill()
        server.terminate()
        server.wait(10)
        if redis_server:
            redis_server.terminate()
            redis_server.wait(10)
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    delivered = len(latencies)
    name = f"{target} x{args.workers}" if target == "flask-redis" else target
    if signing_in:
        name += f" + {args.sign_ins:g} sign-ins/s ({sign_ins.get(200, 0)} signed in)"
    return {"server": name, "subscribers": connected, "pushes": args.pushes,
            "rate": round(args.pushes / push_s, 1), "delivered": delivered, "expected": expected,
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
            "cpu_us_per_event": round(cpu / max(delivered, 1) * 1e6, 2), "cpu_s": round(cpu, 2),
            "peak_mib": round(peak, 1), "client_cpu_s": round(client_cpu, 2), "refused_pushes": refused, "streams_closed": closed}


def bench_agent(samples):
    """Measure the agent's CPU per sample on the nvidia-smi path, with the tests' fake nvidia-smi."""
    import agent
    fixtures = harness.ROOT / "tests" / "fixtures"
    scenario = Path(tempfile.mkdtemp()) / "scenario.json"
    scenario.write_text(json.dumps({"gpus": ["03-l40s-query-gpu-csv-595.txt",
                                             "05-windows-rtx2080super-query-gpu-csv-591.txt"]}))
    os.environ.update(FAKE_NVIDIA_SMI=str(scenario), PATH=f"{fixtures / 'bin'}{os.pathsep}{os.environ['PATH']}")
    backend = agent.GputilReader()
    for _ in range(3):
        json.dumps(agent.build_payload(backend))
    before, started = os.times(), time.monotonic()
    for _ in range(samples):
        json.dumps(agent.build_payload(backend))
    after, wall = os.times(), time.monotonic() - started
    own = (after.user - before.user + after.system - before.system) / samples * 1000
    child = (after.children_user - before.children_user + after.children_system - before.children_system)
    print(f"agent, gputil backend, 2 GPUs, {samples} samples: {own:.2f} ms CPU per sample in the agent itself, "
          f"{child / samples * 1000:.1f} ms in the 2 nvidia-smi runs (the fake, a Python script), "
          f"{wall / samples * 1000:.1f} ms wall per sample")
    bench_agent_amd(samples)
    bench_agent_host(samples)


def bench_agent_host(samples):
    """The host reader's CPU per sample (a push's `system`), on this machine's own /proc, /sys and file systems."""
    import agent
    import psutil
    started = time.process_time()
    reader = agent.HostReader(psutil)
    opening = (time.process_time() - started) * 1000
    for _ in range(3):
        json.dumps(reader.sample())
    before = os.times()
    for _ in range(samples):
        json.dumps(reader.sample())
    after = os.times()
    cost = (after.user - before.user + after.system - before.system) / samples * 1000
    system = reader.sample()
    print(f"agent, host (system, psutil {psutil.__version__}), this machine's {system['cpuCount']} CPUs, "
          f"{len(system['disks'])} disk(s), {len(reader.virtual)} interfaces, {samples} samples: "
          f"{cost:.2f} ms CPU per sample ({opening:.1f} ms once, at start)")


def bench_agent_amd(samples, processes=300, fds=40, clients=4):
    """The agent's CPU per sample on the AMD reader: two captured cards and a /proc of `processes` processes.

    Each process has `fds` descriptors, `clients` of the processes hold a GPU: the reader
    readlinks every descriptor it may see, as on a desktop, so this is most of its cost.
    """
    import agent
    captures = harness.ROOT / "tests" / "fixtures" / "gpus" / "amd"
    root = Path(tempfile.mkdtemp())
    fdinfo = (captures / "fdinfo" / "kernel-patch-2024-05-06-v1-drm-engine-gfx.txt").read_text()
    for number, (capture, address) in enumerate([("rx580", "0000:09:00.0"), ("rx6900xt", "0000:0c:00.0")]):
        card = root / "sys" / "class" / "drm" / f"card{number + 1}"
        card.mkdir(parents=True)
        (card / "device").symlink_to(captures / capture / "device")
    (root / "usr" / "share" / "libdrm").mkdir(parents=True)
    (root / "usr" / "share" / "libdrm" / "amdgpu.ids").symlink_to(captures / "amdgpu.ids")
    for pid in range(1000, 1000 + processes):
        base = root / "proc" / str(pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        (base / "comm").write_text("worker\n")
        (base / "status").write_text("Name:\tworker\nUid:\t1000\t1000\t1000\t1000\n")
        for fd in range(fds):
            drm = pid < 1000 + clients and fd == fds - 1
            (base / "fd" / str(fd)).symlink_to("/dev/dri/renderD128" if drm else f"socket:[{pid * 100 + fd}]")
            (base / "fdinfo" / str(fd)).write_text(fdinfo.replace("0000:04:00.0", "0000:09:00.0") if drm else "pos:\t0\n")
    costs = {}
    for kind, rescan_s in (("searching /proc", 0), ("reading known clients", 3600)):
        backend = agent.AmdReader(agent.SysRoot(root, reuse_s=0, rescan_s=rescan_s), which=lambda name: None)
        for _ in range(3):
            json.dumps(agent.build_payload(backend))
        before = os.times()
        for _ in range(samples):
            json.dumps(agent.build_payload(backend))
        after = os.times()
        costs[kind] = (after.user - before.user + after.system - before.system) / samples * 1000
    every = round(agent.RESCAN_S / 2)  # samples at the default 2 s interval between two searches of /proc
    average = (costs["searching /proc"] + (every - 1) * costs["reading known clients"]) / every
    print(f"agent, amd backend, 2 GPUs (RX 580, RX 6900 XT captures), {processes} processes with {fds} descriptors "
          f"each ({clients} on the GPU), {samples} samples: " + ", ".join(f"{v:.2f} ms CPU per sample {k}"
                                                                         for k, v in costs.items())
          + f"; {average:.2f} ms on average at the default 2 s interval (/proc searched every {agent.RESCAN_S:g} s)")
    shutil.rmtree(root)


def _drain(port, count, ready):
    """Hold `count` loopback connections to `port` and read whatever arrives, until closed."""
    streams = [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]
    poller = select.epoll()
    for sock in streams:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
    by_fd = {sock.fileno(): sock for sock in streams}
    ready.send("ready")
    while True:
        for fd, _ in poller.poll():
            if not by_fd[fd].recv(1 << 16):
                return


def bench_send_floor(viewers, size=2200, rounds=300):
    """Time the floor under any fan-out: one non-blocking send of an event to each of `viewers` sockets.

    No gevent, gunicorn or broadcaster: a bare Python loop over loopback sockets whose reader
    is another process, as in the load benchmark. What a send costs here, a fan-out pays too.
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=viewers)
    parent, child = multiprocessing.Pipe()
    reader = multiprocessing.Process(target=_drain, args=(listener.getsockname()[1], viewers, child), daemon=True)
    reader.start()
    socks = [listener.accept()[0] for _ in range(viewers)]
    parent.recv()
    for sock in socks:
        sock.setblocking(False)
    sends, data = [sock.send for sock in socks], b"x" * size
    before = _cpu_s()
    for _ in range(rounds):
        for send in sends:
            send(data)
        time.sleep(0.02)  # the reader catches up, as between two events
    cpu = _cpu_s() - before
    for sock in socks:
        sock.close()
    reader.join(10)
    print(f"{viewers} loopback sockets, {size}-byte sends, {rounds} rounds, {os.cpu_count()} cores: "
          f"{cpu / rounds / viewers * 1e6:.2f} µs of CPU per send")


def _open_stream(port, source):
    """Open one viewer from a loopback address; return its socket and HTTP status."""
    sock, status, _ = harness.open_raw_stream(port, source)
    return sock, int(status.split(" ")[1]) if status else 0


def bench_cap(pushes, server_dir=harness.ROOT):
    """At the default sizes: fill MAX_SUBSCRIBERS with streams, then time pushes and refused viewers."""
    import config
    defaults = {s.name: int(s.default) for s in config.SETTINGS
                if s.name in ("WORKER_CONNECTIONS", "MAX_SUBSCRIBERS", "MAX_SUBSCRIBERS_PER_CLIENT")}
    cap, per_client = defaults["MAX_SUBSCRIBERS"], defaults["MAX_SUBSCRIBERS_PER_CLIENT"]
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    keys = [f"bench-key-{i}-0123456789abcdef" for i in range(harness.DEVICES)]
    port, log = harness.free_port(), tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = harness.start_ours(port, keys, log, server_dir, PUSH_RATE_LIMIT="1000")
    worker = harness.tree_pids(server.pid)[-1]
    rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{worker}/status").read_text())[1])  # noqa: E731
    try:
        before, started, viewers = rss(), time.monotonic(), []
        for n in range(per_client):  # the first address takes its whole share; one more is refused
            viewers.append(_open_stream(port, "127.0.8.1"))
        sock, own_status = _open_stream(port, "127.0.8.1")
        sock.close()
        for n in range(per_client, cap):  # from cap / per_client addresses, as many clients would
            viewers.append(_open_stream(port, f"127.0.{8 + n // per_client // 250}.{1 + n // per_client % 250}"))
        opened = time.monotonic() - started
        assert all(status == 200 for _, status in viewers), "a viewer under the cap was refused"
        per_viewer_kib = (rss() - before) / cap
        session, latencies, codes = requests.Session(), [], []
        for n in range(pushes):
            body = {"host": "bench", "gpus": [harness.gpu_payload(i, n) for i in range(4)]}
            sent = time.monotonic()
            answer = session.post(f"http://127.0.0.1:{port}/push-sse", json=body, timeout=30,
                                  headers={"Authorization": f"Bearer {keys[n % harness.DEVICES]}"})
            latencies.append(time.monotonic() - sent)
            codes.append(answer.status_code)
        refusals, refused_codes = [], []
        for n in range(100):
            sent = time.monotonic()
            sock, status = _open_stream(port, f"127.0.200.{n + 1}")
            refusals.append(time.monotonic() - sent)
            refused_codes.append(status)
            sock.close()
        health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).json()
    finally:
        server.terminate()
        server.wait(30)
    latencies.sort()
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"defaults: WORKER_CONNECTIONS {defaults['WORKER_CONNECTIONS']}, MAX_SUBSCRIBERS {cap}, "
          f"MAX_SUBSCRIBERS_PER_CLIENT {per_client}; {os.cpu_count()} cores")
    print(f"{cap} streams open from {cap // per_client} addresses in {opened:.1f} s; /healthz subscribers "
          f"{health['subscribers']}; worker memory per idle viewer {per_viewer_kib:.1f} KiB")
    print(f"{pushes} pushes with every stream taken: {codes.count(200)} answered 200; p50 "
          f"{ms(latencies[len(latencies) // 2])}, p99 {ms(latencies[int(len(latencies) * 0.99)])}, "
          f"max {ms(latencies[-1])}")
    print(f"100 viewers past the cap: {refused_codes.count(503)} answered 503 with Retry-After, slowest in "
          f"{ms(max(refusals))}; one more stream from a full address: {own_status}")


def bench_greedy(connections, pushes=100, server_dir=harness.ROOT):
    """At the default sizes: `connections` from one address pipeline a static file and never read; time pushes."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    keys = [f"bench-key-{i}-0123456789abcdef" for i in range(harness.DEVICES)]
    port, log = harness.free_port(), tempfile.NamedTemporaryFile("w+", suffix=".log")
    server = harness.start_ours(port, keys, log, server_dir, PUSH_RATE_LIMIT="1000")
    request = b"GET /static/uPlot.iife.min.js HTTP/1.1\r\nHost: x\r\n\r\n" * 200  # 10 MB of answers each
    greedy, latencies, codes = [], [], []
    try:
        started = time.monotonic()
        for n in range(connections):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            sock.bind(("127.0.0.2", 0))
            try:
                sock.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            greedy.append(sock)
        waiting, deadline = {sock.fileno(): [sock, request] for sock in greedy}, time.monotonic() + 240
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLOUT)
        while waiting and time.monotonic() < deadline:  # each sends once connected: the server accepts at its pace
            for fd, _ in poller.poll(1000):
                sock, rest = waiting[fd]
                try:
                    rest = rest[sock.send(rest):]
                except BlockingIOError:
                    continue
                except OSError:  # refused and closed already
                    rest = b""
                waiting[fd][1] = rest
                if not rest:
                    del waiting[fd]
                    poller.unregister(fd)
        opened = time.monotonic() - started
        time.sleep(2)
        held = len(subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{port} )"], capture_output=True,
                                  text=True).stdout.splitlines()) if shutil.which("ss") else None
        session = requests.Session()
        for n in range(pushes):
            body = {"host": "bench", "gpus": [harness.gpu_payload(i, n) for i in range(4)]}
            sent = time.monotonic()
            try:
                answer = session.post(f"http://127.0.0.1:{port}/push-sse", json=body, timeout=10,
                                      headers={"Authorization": f"Bearer {keys[n % harness.DEVICES]}"})
                codes.append(answer.status_code)
            except requests.RequestException:
                codes.append("timeout")
                session = requests.Session()
            latencies.append(time.monotonic() - sent)
    finally:
        server.terminate()
        server.wait(30)
        for sock in greedy:
            sock.close()
    latencies.sort()
    ms = lambda v: f"{v * 1000:.1f} ms"  # noqa: E731
    print(f"{connections} connections from one address, each pipelining 200 GETs of a 51 KB file and reading "
          f"nothing (opened in {opened:.1f} s), default sizes; {os.cpu_count()} cores; the server held "
          f"{held if held is not None else '?'} connections open 2 s later")
    print(f"then {pushes} pushes from another address: {codes.count(200)} answered 200, "
          f"{codes.count('timeout')} timed out (10 s); p50 {ms(latencies[len(latencies) // 2])}, "
          f"p99 {ms(latencies[int(len(latencies) * 0.99)])}, max {ms(latencies[-1])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=["flask-gevent", "flask-redis", "node-seed", "both"], default="both",
                        help="flask-redis: REDIS_URL with --workers workers and a redis-server of its own")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers for flask-redis")
    parser.add_argument("--sweep", default="", metavar="N,N,...",
                        help="run each of these subscriber counts in turn (instead of -n)")
    parser.add_argument("--subscribers", "-n", type=int, default=1000)
    parser.add_argument("--pushes", "-m", type=int, default=400)
    parser.add_argument("--rate", "-r", type=float, default=20.0, help="pushes per second")
    parser.add_argument("--gpus", type=int, default=4, help="GPUs in each pushed payload")
    parser.add_argument("--clients", type=int, default=2, help="subscriber processes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of the same load before measuring")
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait after the last push")
    parser.add_argument("--stuck", type=int, default=0, help="extra viewers that connect and never read")
    parser.add_argument("--node-dir", default=os.path.join(tempfile.gettempdir(), "node-seed"))
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per server, interleaved; the row shows the median run")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run")
    parser.add_argument("--cap", type=int, metavar="PUSHES", default=0,
                        help="instead: fill the viewer cap at the default sizes and time PUSHES pushes")
    parser.add_argument("--sign-ins", type=float, metavar="PER_S", default=0,
                        help="also run flask-gevent while the admin signs in PER_S times a second (a slow hash each)")
    parser.add_argument("--greedy", type=int, metavar="CONNECTIONS", default=0,
                        help="at the default sizes, CONNECTIONS from one address ask and never read; time pushes")
    parser.add_argument("--idle-flood", type=int, metavar="CONNECTIONS", nargs="?", const=10_100, default=0,
                        help="at the default sizes, CONNECTIONS (10,100) from one address ask once and stay idle; "
                             "time pushes from another (bench/idle_flood.py)")
    parser.add_argument("--send-floor", action="store_true",
                        help="time a bare loop of non-blocking sends to -n loopback sockets: the floor of a fan-out")
    parser.add_argument("--agent", type=int, metavar="SAMPLES", default=0,
                        help="instead: measure the agent's CPU per sample: its GPU readers (nvidia-smi, amd) and the host")
    parser.add_argument("--server-dir", type=Path, default=harness.ROOT, metavar="DIR",
                        help="the tree whose server runs (default: this one), e.g. an older commit's export")
    live = parser.add_argument_group("--reconnect-storm and --history-load (bench/storm.py, bench/history_load.py)")
    live.add_argument("--reconnect-storm", action="store_true",
                      help="instead: --reconnecters viewers open a stream at once while devices push and "
                           "--stayers viewers stay; time their snapshots and the stayers' latency")
    live.add_argument("--history-load", action="store_true",
                      help="instead: --requesters clients query /api/history back to back for --load-s "
                           "while devices push and --stayers viewers watch")
    live.add_argument("--stayers", type=int, default=200, help="viewers connected throughout, whose "
                      "push-to-viewer latency is measured")
    live.add_argument("--reconnecters", type=int, default=1000, help="viewers that connect at once")
    live.add_argument("--push-interval", type=float, default=2.0,
                      help="seconds between one device's pushes, as agent.py's --interval")
    live.add_argument("--fill-s", type=float, default=120.0, help="seconds of history to build first, one "
                      "push per device every --fill-interval (the server keeps one point a second)")
    live.add_argument("--fill-interval", type=float, default=1.02,
                      help="seconds between one device's pushes while filling history")
    live.add_argument("--baseline-s", type=float, default=10.0, help="seconds measured before the load")
    live.add_argument("--after-s", type=float, default=5.0, help="seconds measured after the load")
    live.add_argument("--storm-timeout", type=float, default=120.0,
                      help="seconds to wait for every reconnecting viewer's snapshot")
    live.add_argument("--load-s", type=float, default=20.0, help="seconds of history queries")
    live.add_argument("--requesters", type=int, default=4, help="concurrent history requesters")
    live.add_argument("--history-from-s", type=float, default=30 * 86400,
                      help="each history query asks from now minus this many seconds")
    live.add_argument("--history-query", default="", metavar="PARAMS",
                      help="more query parameters for every history request, e.g. step=60")
    live.add_argument("--history-days", type=float, default=0.0, metavar="DAYS",
                      help="write this many days of history for the devices before the server starts")
    live.add_argument("--history-db", type=Path, metavar="FILE",
                      help="start from a copy of this HISTORY_DB file instead")
    ingest = parser.add_argument_group("--ingest and --ingest-fleet (bench/ingest.py)")
    ingest.add_argument("--ingest", action="store_true",
                        help="instead: CPU per push at saturation, side by side with the Node seed")
    ingest.add_argument("--ingest-fleet", action="store_true",
                        help="instead: --devices devices pushing every --push-interval s for --seconds to one worker")
    ingest.add_argument("--ingest-floor", action="store_true",
                        help="instead: CPU per request of gunicorn's gevent worker with a bare Flask route, and bare WSGI")
    ingest.add_argument("--devices", type=int, default=2000, help="devices, each with its own key")
    ingest.add_argument("--connections", type=int, default=8, help="keep-alive connections at saturation")
    ingest.add_argument("--seconds", type=float, default=10.0, help="seconds measured (after --warmup)")
    ingest.add_argument("--before", type=Path, metavar="DIR", help="also run an older tree of this server "
                        "(git worktree add DIR COMMIT), in turn; with --ingest-fleet, run it instead; "
                        "with --page, a git revision will do too")
    browser = parser.add_argument_group("--page (bench/page.py)")
    browser.add_argument("--page", action="store_true",
                      help="instead: the page's cost in headless Chromium while 40 PCs x 8 GPUs push every 2 s; "
                           "with --before, the older page's first")
    browser.add_argument("--page-path", default="/", metavar="PATH", help="what the browser opens, e.g. '/?pc=pc-01'")
    browser.add_argument("--page-minutes", type=float, default=10.0, help="minutes the page is measured visible")
    browser.add_argument("--page-window", type=float, default=60.0,
                      help="seconds between two readings of the JS heap (each after a forced GC)")
    browser.add_argument("--page-warmup", type=float, default=20.0, help="seconds open before anything is measured")
    browser.add_argument("--page-hidden-s", type=float, default=60.0, help="seconds measured with the tab hidden")
    browser.add_argument("--page-trace", action="store_true",
                         help="also trace the visible page for 10 s: a file for DevTools, and its biggest slices")
    browser.add_argument("--page-history-s", type=float, default=660.0,
                         help="seconds of the fleet's history written before the server starts (the live range: 600)")
    args = parser.parse_args()
    if args.page:
        from bench import page
        return page.page_cost(args)
    if args.ingest or args.ingest_fleet or args.ingest_floor:
        from bench import ingest
        return ingest.saturation(args) if args.ingest else ingest.fleet(args) if args.ingest_fleet else ingest.floor(args)
    if args.agent:
        return bench_agent(args.agent)
    if args.cap:
        return bench_cap(args.cap, args.server_dir)
    if args.greedy:
        return bench_greedy(args.greedy, server_dir=args.server_dir)
    if args.idle_flood:
        from bench import idle_flood
        return idle_flood.idle_flood(args.idle_flood, server_dir=args.server_dir)
    if args.send_floor:
        return bench_send_floor(args.subscribers)
    if args.reconnect_storm:
        from bench import storm
        return storm.reconnect_storm(args)
    if args.history_load:
        from bench import history_load
        return history_load.history_load(args)
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    targets = ["flask-gevent", "node-seed"] if args.target == "both" else [args.target]
    if args.sign_ins:  # side by side with the same server without them, in turn
        targets = [t for t in targets if t != "node-seed"] + ["flask-gevent+sign-ins"]
    if args.target == "flask-redis" and not shutil.which("redis-server"):
        sys.exit("redis-server is not installed: apt-get install redis-server")
    if "node-seed" in targets and not shutil.which("node"):
        sys.exit("node is not installed: run with --target flask-gevent")
    print(f"{os.cpu_count()} cores, shared by the servers and the load generator; {args.warmup:g} s of warm-up "
          f"before each run; " + (f"median of {args.repeat} runs, servers in turn" if args.repeat > 1 else "one run"))
    print("| server | subscribers | pushes/s | delivered/expected | fan-out p50 | fan-out p99 "
          "| server CPU per delivered event | peak memory | load generator CPU (not counted) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for subscribers in ([int(n) for n in args.sweep.split(",")] if args.sweep else [args.subscribers]):
        args.subscribers = subscribers
        rows = {target: [] for target in targets}
        for _ in range(args.repeat):
            for target in targets:
                rows[target].append(run(target, args))
                if args.json:
                    print(json.dumps(rows[target][-1]), file=sys.stderr)
        for target in targets:
            row = sorted(rows[target], key=lambda r: r["cpu_us_per_event"])[len(rows[target]) // 2]
            print(f"| {row['server']} | {row['subscribers']} | {row['rate']} | {row['delivered']}/{row['expected']} "
                  f"| {row['p50_ms']} ms | {row['p99_ms']} ms | {row['cpu_us_per_event']} µs "
                  f"| {row['peak_mib']} MiB | {row['client_cpu_s']} s |", flush=True)

if __name__ == "__main__":
    main()

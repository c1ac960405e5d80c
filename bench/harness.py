"""What the benchmarks share: starting the servers (this tree's, an older one's, the Node seed, Redis),
the pushed payload, live load (devices that push as agent.py does, viewer processes), and the meters.

bench/fanout.py (make bench), bench/storm.py, bench/history_load.py and bench/disk.py use it; it uses none of them.
"""
import asyncio
import atexit
import collections
import json
import multiprocessing
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent  # the project
NODE_SEED = ROOT.parent / "shared" / "peers" / "node-seed"
SAMPLED_AT = re.compile(rb'"sampledAt":([0-9.]+)')
DEVICES = 10
SNAPSHOT_MARK = b'"snapshot":true'
STORM_SPREAD_S = 0.5  # the reconnecters' requests go out evenly over this long, as after a deploy
SETTLE_S = 2.0  # after the stayers' own snapshots, before anything is measured
DRAIN_S = 3.0  # after the last push, for its events to reach the viewers
STORM_WINDOW_S = 5.0  # the storm's window lasts until the last snapshot, and at least this long
TABLE_HEAD = ("| window | length | pushes (refused) | delivered/expected | push-to-viewer p50 | p99 | max "
              "| push answered p50 | p99 | max | server CPU | whole machine's CPU |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|")


def machine_busy_s():
    """Return the CPU seconds all of this machine's cores have spent busy, from /proc/stat."""
    # Anything else running (tests, another bench) shows as what this has beyond the server and the bench.
    first = Path("/proc/stat").read_text().split("\n", 1)[0]
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, first.split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Mark points in time with the server's and the machine's CPU so far."""

    def __init__(self, pid):
        self.pid, self.marks = pid, {}

    def mark(self, name):
        self.marks[name] = (time.time(), server_cpu_s(self.pid), machine_busy_s())
        return self.marks[name][0]

    def between(self, start, end):
        """Return (start time, end time, server CPU s, machine CPU s) between two marks."""
        (t0, server0, machine0), (t1, server1, machine1) = self.marks[start], self.marks[end]
        return t0, t1, server1 - server0, machine1 - machine0


# ---- devices: one thread each, pushing as agent.py does ------------------------------------

class Devices:
    """Push from every device like agent.py's run_loop: every `interval` s, never a backlog."""

    def __init__(self, port, keys, gpus, interval, body=None):
        self.port, self.keys, self.gpus, self.interval = port, keys, gpus, interval
        self.body = body or self.bench_body  # body(device, n, sent) -> the n-th push of device number `device`
        self.pushes = []  # (sent, answered, HTTP status or the exception's name) of every push, wall clock
        self._stop = threading.Event()
        self._threads = []

    def bench_body(self, device, n, sent):
        """Return the n-th push of device number `device`: `gpus` of gpu_payload's GPUs."""
        return {"host": f"bench-{device}", "sampledAt": sent,
                "agent": {"version": "bench", "backend": "simulated", "simulated": True},
                "gpus": [gpu_payload(i, n) for i in range(self.gpus)]}

    def start(self):
        for device, key in enumerate(self.keys):
            thread = threading.Thread(target=self._push_loop, args=(device, key), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _push_loop(self, device, key):
        session, n = requests.Session(), 0
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self._stop.wait(device * self.interval / len(self.keys))  # spread the devices over the interval
        while not self._stop.is_set():
            started, sent = time.monotonic(), time.time()
            try:
                status = session.post(f"http://127.0.0.1:{self.port}/push-sse",
                                      data=json.dumps(self.body(device, n, sent)),
                                      headers=headers, timeout=60).status_code
            except requests.RequestException as problem:
                status = type(problem).__name__
            self.pushes.append((sent, time.time(), status))
            n += 1
            # As the agent: the next sample is due `interval` after this one began, however long this took.
            self._stop.wait(max(0.0, started + self.interval - time.monotonic()))


# ---- viewers: client processes holding stayers, and on command a storm of reconnecters ----


# ---- servers -----------------------------------------------------------------------

def tree_pids(pid):
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass
    return pids


def server_cpu_s(pid):
    """Return user+system CPU seconds of a process and its children, from /proc."""
    total = 0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


def server_memory_mib(pid, field="VmRSS"):
    """Return a process tree's summed resident memory (VmRSS), or another /proc status field, in MiB."""
    total = 0
    for p in tree_pids(pid):
        try:
            total += int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{p}/status").read_text())[1])
        except (OSError, TypeError):
            pass
    return total / 1024


def server_peak_mib(pid):
    """Return the summed peak resident memory (VmHWM) of a process tree, in MiB."""
    return server_memory_mib(pid, "VmHWM")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_raw_stream(port, source="127.0.0.1"):
    """Connect a viewer from a loopback address; return its socket, its status line and the answer's head."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(b"GET /gpu/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head.split(b"\r\n")[0].decode(), head


def wait_up(url, process, log):
    for _ in range(300):
        if process.poll() is not None:
            sys.exit(f"server exited: {Path(log.name).read_text()[-2000:]}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    sys.exit("server did not start")


def wait_up_any(port, timeout_s=15):
    """Wait until something accepts connections on `port`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"nothing listens on port {port}")


def start_ours(port, keys, log, server_dir=ROOT, **settings):
    """Start the server in `server_dir` (this tree, or an older one) with its Procfile's own command."""
    command = next(l for l in (Path(server_dir) / "Procfile").read_text().splitlines() if l.startswith("web:"))[4:]
    # History on disk as in production, but in a scratch file, never the tree's own (older trees ignore it).
    history_dir = tempfile.mkdtemp(prefix="bench-history-")
    atexit.register(shutil.rmtree, history_dir, True)
    env = {**os.environ, "ENV_FILE": os.devnull, "PORT": str(port),
           "DEVICE_KEYS": ",".join(f"bench-{i}:{k}" for i, k in enumerate(keys)),
           "HISTORY_DB": os.path.join(history_dir, "history.sqlite3"), "DASHBOARD_PUBLIC": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **settings}
    process = subprocess.Popen(["sh", "-c", "exec " + command.strip()], cwd=server_dir, env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    wait_up(f"http://127.0.0.1:{port}/healthz", process, log)
    workers, deadline = int(settings.get("WEB_CONCURRENCY", 1)), time.monotonic() + 30
    while Path(log.name).read_text().count("Booting worker") < workers and time.monotonic() < deadline:
        time.sleep(0.1)  # every worker up before viewers connect, or the first takes them all
    time.sleep(0.5 if workers > 1 else 0)
    return process


def start_redis():
    """Start a redis-server on a free port for one run, with no persistence."""
    port = free_port()
    process = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis
    for _ in range(100):
        try:
            redis.Redis(port=port, socket_timeout=1).ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.RedisError:
            time.sleep(0.05)
    sys.exit("redis-server did not start")


def start_node(port, log, node_dir):
    """Copy the Node seed out, install it once with npm ci, and start it."""
    node_dir = Path(node_dir)
    if not (node_dir / "node_modules").is_dir():
        shutil.copytree(NODE_SEED, node_dir, dirs_exist_ok=True)
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=node_dir, check=True)
    process = subprocess.Popen(["node", "server.js"], cwd=node_dir, env={**os.environ, "PORT": str(port)},
                               stdout=log, stderr=subprocess.STDOUT)
    wait_up(f"http://127.0.0.1:{port}/", process, log)
    return process


# ---- one run -----------------------------------------------------------------------

def gpu_payload(index, t):
    return {"index": index, "uuid": f"GPU-bench-{index}", "name": "NVIDIA GeForce RTX 4090",
            "vendor": "NVIDIA", "driverVersion": "560.94", "utilizationGpu": (t * 7 + index) % 100,
            "utilizationMemory": 40, "memoryTotal": 24564, "memoryUsed": 12000, "memoryFree": 12564,
            "temperatureGpu": 60 + index, "temperatureMemory": None, "powerDraw": 300.5,
            "powerLimit": 450, "fanSpeed": 50, "clockCore": 2520, "clockMemory": 10501, "pstate": "P2",
            "processes": [{"pid": 1000 + index, "name": "python", "memoryUsed": 11000}]}


# ---- live load: devices that push, viewers that stay ----------------------------------

async def subscriber(port, stats, ready):
    """Read one stream until it ends, noting (push sent, event read) for every event, as a page that stays would."""
    for attempt in range(50):
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            break
        except OSError:
            await asyncio.sleep(0.1 * (attempt + 1))
    else:
        stats["failed"] += 1
        ready()
        return
    writer.write(f"GET /gpu/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    ready()
    buffer, streaming = b"", False
    while True:
        chunk = await reader.read(262144)
        if not chunk:
            stats["closed"] += 1
            return
        now = time.time()
        if not streaming:
            stats["streaming"], streaming = stats["streaming"] + 1, True
        buffer += chunk
        end = buffer.rfind(b"\n\n")
        if end < 0:
            continue
        # (push sent, event read): a snapshot's sampledAt counts too, so callers window by send time.
        for value in SAMPLED_AT.findall(buffer, 0, end):
            stats["arrivals"].append((float(value), now))
        buffer = buffer[end + 2:]


async def _reconnecter(port, snapshots):
    """Open a stream as a page does after a deploy; record (asked, snapshot read, its bytes, problem)."""
    asked = time.time()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 24)
        writer.write(f"GET /gpu/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        asked = time.time()
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200") or b"transfer-encoding: chunked" not in head.lower():
            status = head.partition(b"\r\n")[0].decode(errors="replace")
            raise ValueError(f"{status}, not a chunked 200")
        size, marks = 0, 0
        while marks < DEVICES:  # one snapshot event per device, in the first chunk or (a server may) several
            length = int((await reader.readline()).split(b";")[0], 16)
            chunk = await reader.readexactly(length + 2)
            size, marks = size + length, marks + chunk.count(SNAPSHOT_MARK)
            if not marks and b"data:" in chunk:
                raise ValueError("the stream's first events carry no snapshot mark (\"snapshot\":true)")
        snapshots.append((asked, time.time(), size, None))
    except (OSError, ValueError, EOFError, asyncio.LimitOverrunError) as problem:
        snapshots.append((asked, None, 0, f"{type(problem).__name__}: {problem}"))
        return
    while await reader.read(262144):  # a page that stays: keep reading, as the stayers do
        pass


def _viewer_process(port, stayers, reconnecters, storm_timeout, conn):
    """Hold `stayers` streams; on "storm" open `reconnecters` more at once; on "stop" send back what was read."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    stats = {"arrivals": [], "failed": 0, "closed": 0, "streaming": 0}
    snapshots = []

    async def command():
        while not conn.poll():
            await asyncio.sleep(0.02)
        return conn.recv()

    async def run():
        tasks = []
        for i in range(stayers):
            tasks.append(asyncio.ensure_future(subscriber(port, stats, lambda: None)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # ramp up: do not overflow the listen backlog
        while stats["streaming"] + stats["failed"] + stats["closed"] < stayers:
            await asyncio.sleep(0.05)
        conn.send(("ready", stats["streaming"]))
        if await command() == "storm":
            for i in range(reconnecters):
                tasks.append(asyncio.ensure_future(_reconnecter(port, snapshots)))
                if i % 25 == 24:
                    await asyncio.sleep(STORM_SPREAD_S * 25 / reconnecters)
            deadline = time.monotonic() + storm_timeout
            while len(snapshots) < reconnecters and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            conn.send(("storm-done", list(snapshots)))
            await command()
        for task in tasks:
            task.cancel()
        conn.send(("done", stats))
    asyncio.run(run())


def start_viewers(port, stayers, reconnecters, processes, storm_timeout=0.0):
    """Start the viewer processes, each with its share; return them once every stayer streams, and the count."""
    clients = []
    for i in range(processes):
        parent, child = multiprocessing.Pipe()
        share = (stayers // processes + (i < stayers % processes),
                 reconnecters // processes + (i < reconnecters % processes))
        proc = multiprocessing.Process(target=_viewer_process, args=(port, *share, storm_timeout, child), daemon=True)
        proc.start()
        clients.append((proc, parent))
    return clients, sum(parent.recv()[1] for _, parent in clients)


def stop_viewers(clients):
    """Stop the viewer processes; return every (push sent, event read) the stayers saw."""
    arrivals = []
    for _, parent in clients:
        parent.send("stop")
    for proc, parent in clients:
        arrivals += parent.recv()[1]["arrivals"]
        proc.join(5)
    return arrivals


# ---- figures -------------------------------------------------------------------------

def pct(values, q):
    """Return the q-quantile of sorted `values` (nearest rank), or None."""
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def ms(seconds):
    """Format a duration: milliseconds below 10 s, seconds above."""
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def window_row(name, span, pushes, arrivals, viewers):
    """Return one Markdown row for the pushes sent in `span` (Meter.between) and the staying viewers' reads."""
    start, end, cpu_s, machine_s = span
    sent = [(s, answered, status) for s, answered, status in pushes if start <= s < end]
    accepted = sum(status == 200 for _, _, status in sent)
    refused = collections.Counter(status for _, _, status in sent if status != 200)
    latencies = sorted(read - s for s, read in arrivals if start <= s < end)
    answers = sorted(answered - s for s, answered, _ in sent)
    refused = ", ".join(f"{n} x {status}" for status, n in sorted(refused.items(), key=str)) or "0"
    return (f"| {name} | {end - start:.1f} s | {len(sent)} ({refused}) | {len(latencies)}/"
            f"{accepted * viewers} | {ms(pct(latencies, 0.5))} | {ms(pct(latencies, 0.99))} "
            f"| {ms(latencies[-1] if latencies else None)} | {ms(pct(answers, 0.5))} | {ms(pct(answers, 0.99))} "
            f"| {ms(answers[-1] if answers else None)} | {cpu_s:.2f} s ({cpu_s / (end - start) * 100:.0f} % of a core) "
            f"| {machine_s:.2f} s ({machine_s / (end - start) * 100:.0f} % of a core) |")


def wind_down(meter, args, devices, clients):
    """Measure the quiet after the load, stop the pushes, and return what every viewer read."""
    time.sleep(args.after_s)
    meter.mark("after")
    devices.stop()
    time.sleep(DRAIN_S)
    return stop_viewers(clients)


def shut_down(server, devices, processes):
    """Stop the client processes, the pushes and the server, whatever state the run ended in."""
    for proc in processes:
        proc.kill()
    devices.stop()
    server.terminate()
    server.wait(10)

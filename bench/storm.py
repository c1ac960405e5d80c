"""The reconnect storm for bench.py: M viewers open a stream at once while 10 devices push and N viewers stay.

After a deploy every open page reconnects within a second or so, and each new viewer gets a
snapshot of the fleet. This prints what that costs the viewers that stayed (push-to-viewer
latency before, during and after the storm), how long until every reconnecting viewer has its
whole snapshot, the snapshot's size and the server's CPU. The live-load parts (devices that
push as agent.py does, viewer processes, latency by window) are shared with bench_history.py.
"""
import asyncio
import collections
import json
import multiprocessing
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import requests

import bench
from bench import DEVICES

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
        self.marks[name] = (time.time(), bench.server_cpu_s(self.pid), machine_busy_s())
        return self.marks[name][0]

    def between(self, start, end):
        """Return (start time, end time, server CPU s, machine CPU s) between two marks."""
        (t0, server0, machine0), (t1, server1, machine1) = self.marks[start], self.marks[end]
        return t0, t1, server1 - server0, machine1 - machine0


# ---- devices: one thread each, pushing as agent.py does ------------------------------------

class Devices:
    """Push from every device like agent.py's run_loop: every `interval` s, never a backlog."""

    def __init__(self, port, keys, gpus, interval):
        self.port, self.keys, self.gpus, self.interval = port, keys, gpus, interval
        self.pushes = []  # (sent, answered, HTTP status or the exception's name) of every push, wall clock
        self._stop = threading.Event()
        self._threads = []

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
            body = {"host": f"bench-{device}", "sampledAt": sent,
                    "agent": {"version": "bench", "backend": "simulated", "simulated": True},
                    "gpus": [bench.gpu_payload(i, n) for i in range(self.gpus)]}
            try:
                status = session.post(f"http://127.0.0.1:{self.port}/push-sse", data=json.dumps(body),
                                      headers=headers, timeout=60).status_code
            except requests.RequestException as problem:
                status = type(problem).__name__
            self.pushes.append((sent, time.time(), status))
            n += 1
            # As the agent: the next sample is due `interval` after this one began, however long this took.
            self._stop.wait(max(0.0, started + self.interval - time.monotonic()))


# ---- viewers: client processes holding stayers, and on command a storm of reconnecters ----

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
            tasks.append(asyncio.ensure_future(bench._subscriber(port, stats, lambda: None)))
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


def probe_snapshot(port):
    """Read the first chunk one new viewer gets; return its bytes, devices, history points per GPU, seconds."""
    started = time.monotonic()
    with requests.get(f"http://127.0.0.1:{port}/gpu/stream", stream=True, timeout=60) as answer:
        first = next(answer.raw.read_chunked(decode_content=False))
    took = time.monotonic() - started
    events = []
    for block in first.split(b"\n\n"):
        data = [line[6:] for line in block.split(b"\n") if line.startswith(b"data: ")]
        if data:
            events.append(json.loads(b"\n".join(data)))
    points = [len(gpu.get("history", {}).get("t", ())) for event in events for gpu in event.get("gpus", ())]
    return len(first), len(events), points, took


def reconnect_storm(args):
    """Fill history, hold --stayers viewers, then open --reconnecters streams at once; print what it cost."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    keys = [f"bench-key-{i}-{os.urandom(8).hex()}" for i in range(DEVICES)]
    port = bench._free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-storm-", suffix=".log", delete=False)
    # Every bench viewer comes from 127.0.0.1: lift the per-address cap, which is not what is measured here.
    server = bench.start_ours(port, keys, log, args.server_dir,
                              MAX_SUBSCRIBERS_PER_CLIENT=str(args.stayers + args.reconnecters + 10))
    meter = Meter(server.pid)
    devices, clients = Devices(port, keys, args.gpus, args.fill_interval), []
    print(f"reconnect storm: the server in {args.server_dir} (flask-gevent, one worker), on {os.cpu_count()} "
          f"cores shared with the load generator; server log {log.name}", flush=True)
    try:
        devices.start()
        time.sleep(args.fill_s)
        devices.interval = args.push_interval
        size, events, points, took = probe_snapshot(port)
        print(f"history filled for {args.fill_s:g} s, one push per device every {args.fill_interval:g} s (the "
              f"server keeps one point a second per GPU; faster pushes replace the newest point, so they add none)")
        history = (f"{min(points)}-{max(points)} history points per GPU" if any(points) else "no history")
        print(f"a new viewer's snapshot now: {size:,} bytes, {events} device events, {history}; one viewer "
              f"alone read it in {ms(took)}", flush=True)
        print(f"pushes: {DEVICES} devices x {args.gpus} GPUs, one push per device every {args.push_interval:g} s "
              f"({DEVICES / args.push_interval:g} pushes/s)")
        clients, stayers = start_viewers(port, args.stayers, args.reconnecters, args.clients, args.storm_timeout)
        time.sleep(SETTLE_S)
        meter.mark("before")
        time.sleep(args.baseline_s)
        storm = meter.mark("storm")
        for _, parent in clients:
            parent.send("storm")
        snapshots = [s for _, parent in clients for s in parent.recv()[1]]
        meter.mark("last snapshot")
        done = [s for s in snapshots if s[1] is not None]
        last = max(s[1] for s in done) if len(done) == args.reconnecters else storm + args.storm_timeout
        time.sleep(max(0.0, storm + STORM_WINDOW_S - time.time()))
        meter.mark("storm end")
        arrivals = wind_down(meter, args, devices, clients)
    finally:
        shut_down(server, devices, [proc for proc, _ in clients])
    print(f"viewers: {stayers} stayed, in {args.clients} client processes with the reconnecters; "
          f"{args.reconnecters} reconnected, their requests sent within "
          f"{max(s[0] for s in snapshots) - min(s[0] for s in snapshots):.2f} s")
    print(TABLE_HEAD)
    for name, start, end in (("before", "before", "storm"),
                             (f"storm (until the last snapshot, at least {STORM_WINDOW_S:g} s)", "storm", "storm end"),
                             ("after", "storm end", "after")):
        print(window_row(name, meter.between(start, end), devices.pushes, arrivals, stayers))
    waits, sizes = sorted(s[1] - s[0] for s in done), sorted(s[2] for s in done)
    print(f"storm: {len(done)}/{args.reconnecters} reconnecting viewers had their whole snapshot "
          f"{ms(last - storm) if len(done) == args.reconnecters else 'not within ' + ms(args.storm_timeout)} "
          f"after the storm began (each waited p50 {ms(pct(waits, 0.5))}, max {ms(waits[-1] if waits else None)}); "
          f"snapshot {sizes[0] if sizes else 0:,} to {sizes[-1] if sizes else 0:,} bytes per viewer, "
          f"{sum(sizes) / 1e6:.1f} MB in all; server CPU {meter.between('storm', 'last snapshot')[2]:.2f} s "
          f"in that time")
    problems = sorted({s[3] for s in snapshots if s[3]})
    if problems:
        print(f"{len(snapshots) - len(done)} reconnecters failed: {'; '.join(problems[:5])}")


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

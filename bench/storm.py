"""The reconnect storm for `python -m bench --reconnect-storm`: M viewers open a stream at once while 10 devices push and N viewers stay.

After a deploy every open page reconnects within a second or so, and each new viewer gets a
snapshot of the fleet. This prints what that costs the viewers that stayed (push-to-viewer
latency before, during and after the storm), how long until every reconnecting viewer has its
whole snapshot, the snapshot's size and the server's CPU. The live-load parts (devices that
push as agent.py does, viewer processes, latency by window) are in bench/harness.py, shared with bench/history_load.py.
"""
import json
import os
import resource
import tempfile
import time

import requests

from bench import harness
from bench.harness import (DEVICES, SETTLE_S, STORM_WINDOW_S, TABLE_HEAD, Devices, Meter, ms, pct, shut_down,
                           start_viewers, wind_down, window_row)

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
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-storm-", suffix=".log", delete=False)
    # Every bench viewer comes from 127.0.0.1: lift the per-address cap, which is not what is measured here.
    server = harness.start_ours(port, keys, log, args.server_dir,
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



"""History queries under live load for `python -m bench --history-load`: do /api/history requests stall pushes or streams?

While 10 devices push and --stayers viewers watch, --requesters clients ask for
/api/history and /api/history.csv back to back for --load-s. Prints push-to-viewer latency
before, during and after the queries, and the queries' count and latency.
"""
import atexit
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import threading
import time

import requests

from bench import harness
from bench.harness import (DEVICES, SETTLE_S, TABLE_HEAD, Devices, Meter, ms, pct, shut_down, start_viewers,
                           wind_down, window_row)

PATHS = ("/api/history", "/api/history.csv")
DAY_S = 86400


def fill_history_db(path, args):
    """Write --history-days of the bench devices' history to `path` through the server tree's own SqliteHistory.

    The last day as agents push it (every --push-interval s), which fills the per-second tier;
    before that one push a minute, which fills every minute and hour bucket just as well.
    """
    sys.path.insert(0, str(args.server_dir))
    try:
        from gpustats.history.sqlite import SqliteHistory
    except ImportError as problem:
        sys.exit(f"--history-days needs the server's gpustats/history/sqlite.py in {args.server_dir}: {problem}")
    now = int(time.time())
    store = SqliteHistory(str(path), max_gap_s=15, clock=lambda: now)
    times = [float(t) for t in range(now - int(args.history_days * DAY_S), now - DAY_S, 60)]
    times += [now - DAY_S + k * args.push_interval for k in range(int((DAY_S - 10) / args.push_interval))]
    for n, t in enumerate(times):
        for device in range(DEVICES):
            store.add({"device": f"bench-{device}", "receivedAt": t,
                       "gpus": [harness.gpu_payload(i, n) for i in range(args.gpus)]})
        if n % 2000 == 1999:
            store.flush()
    store.flush()
    store.close()
    return len(times) * DEVICES


def _query(device, args):
    extra = f"&{args.history_query}" if args.history_query else ""
    return f"device={device}&from={int(time.time() - args.history_from_s)}{extra}"


def _requester_process(port, args, conn):
    """Ask for history back to back from --requesters threads for --load-s; send back every request's record."""
    records, deadline = [], time.monotonic() + args.load_s

    def ask(worker):
        session, n = requests.Session(), 0
        while time.monotonic() < deadline:
            path = PATHS[n % 2]
            url = f"http://127.0.0.1:{port}{path}?{_query(f'bench-{(worker + n // 2) % DEVICES}', args)}"
            sent = time.time()
            try:
                answer = session.get(url, timeout=60)
                status, size = answer.status_code, len(answer.content)
            except requests.RequestException:
                status, size = 0, 0
            records.append((path, sent, time.time() - sent, status, size))  # took: seconds to the whole answer
            n += 1
    threads = [threading.Thread(target=ask, args=(w,)) for w in range(args.requesters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    conn.send(records)


def check_route(port, args):
    """Exit with one line unless /api/history answers for a device that has pushed."""
    url = f"http://127.0.0.1:{port}/api/history?{_query('bench-0', args)}"
    for _ in range(50):  # a device that has just pushed may take a moment to reach the history
        answer = requests.get(url, timeout=30)
        if answer.status_code != 404:
            break
        time.sleep(0.1)
    if answer.status_code == 404:
        landed = "is there" if (args.server_dir / "gpustats" / "history" / "routes.py").exists() else "is not there yet"
        sys.exit(f"GET /api/history answered 404 for bench-0, a device that has pushed: the server in "
                 f"{args.server_dir} has no history API (its gpustats/history/routes.py {landed}). Answer: {answer.text[:200]!r}")
    if answer.status_code != 200:
        sys.exit(f"GET {url} answered {answer.status_code}: {answer.text[:300]!r}")


def history_load(args):
    """Hold --stayers viewers while devices push; query history back to back for --load-s; print what it cost."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    keys = [f"bench-key-{i}-{os.urandom(8).hex()}" for i in range(DEVICES)]
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-history-", suffix=".log", delete=False)
    settings = {"MAX_SUBSCRIBERS_PER_CLIENT": str(args.stayers + 10)}
    history = "empty at start"
    if args.history_db or args.history_days:
        settings["HISTORY_DB"] = os.path.join(tempfile.mkdtemp(prefix="bench-history-db-"), "history.sqlite3")
        atexit.register(shutil.rmtree, os.path.dirname(settings["HISTORY_DB"]), True)
    if args.history_db:  # a copy: the run writes to it
        shutil.copyfile(args.history_db, settings["HISTORY_DB"])
        history = f"a copy of {args.history_db}"
    elif args.history_days:
        started = time.monotonic()
        pushes = fill_history_db(settings["HISTORY_DB"], args)
        history = (f"{args.history_days:g} days of {DEVICES} devices x {args.gpus} GPUs written first "
                   f"({pushes:,} pushes in {time.monotonic() - started:.0f} s, "
                   f"{os.path.getsize(settings['HISTORY_DB']) / 2**20:.1f} MiB)")
    server = harness.start_ours(port, keys, log, args.server_dir, **settings)
    meter = Meter(server.pid)
    devices, clients, requester = Devices(port, keys, args.gpus, args.push_interval), [], None
    print(f"history load: the server in {args.server_dir} (flask-gevent, one worker), on {os.cpu_count()} cores "
          f"shared with the load generator; server log {log.name}\nhistory: {history}", flush=True)
    try:
        devices.start()
        time.sleep(args.push_interval + 0.5)  # every device has pushed once
        check_route(port, args)
        clients, stayers = start_viewers(port, args.stayers, 0, args.clients)
        time.sleep(SETTLE_S)
        meter.mark("before")
        time.sleep(args.baseline_s)
        meter.mark("load")
        parent, child = multiprocessing.Pipe()
        requester = multiprocessing.Process(target=_requester_process, args=(port, args, child), daemon=True)
        requester.start()
        records = parent.recv()
        meter.mark("load end")
        arrivals = wind_down(meter, args, devices, clients)
    finally:
        shut_down(server, devices, [proc for proc, _ in clients] + [requester] * bool(requester))
    print(f"pushes: {DEVICES} devices x {args.gpus} GPUs, one push per device every {args.push_interval:g} s; "
          f"viewers: {stayers} in {args.clients} client processes")
    extra = f"&{args.history_query}" if args.history_query else ""
    print(f"queries: {args.requesters} requesters back to back, alternating {' and '.join(PATHS)}, "
          f"?device=bench-N&from=<now - {args.history_from_s:g} s>{extra}")
    print(TABLE_HEAD)
    for name, start, end in (("before", "before", "load"), ("history queries", "load", "load end"),
                             ("after", "load end", "after")):
        print(window_row(name, meter.between(start, end), devices.pushes, arrivals, stayers))
    print("| path | requests | answered 200 | per second | bytes p50 | latency p50 | p99 | max |\n"
          "|---|---|---|---|---|---|---|---|")
    for path in PATHS:
        mine = [r for r in records if r[0] == path]
        took, sizes = sorted(r[2] for r in mine), sorted(r[4] for r in mine)
        print(f"| {path} | {len(mine)} | {sum(r[3] == 200 for r in mine)} | {len(mine) / args.load_s:.1f} "
              f"| {pct(sizes, 0.5) or 0:,} | {ms(pct(took, 0.5))} | {ms(pct(took, 0.99))} "
              f"| {ms(took[-1] if took else None)} |")
    refused = sorted({r[3] for r in records if r[3] != 200})
    if refused:
        print(f"history answers other than 200: {refused}")

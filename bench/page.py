"""`make bench BENCH_ARGS=--page`: what the page costs a browser while 40 PCs x 8 GPUs push every 2 s (issue 32).

Starts this tree's server (with --before, an older tree's too, in turn) and 40 PCs that push
as agent.py does, each at its own phase, with figures that move as a lab's do: jobs start and
end, utilization, memory, temperature and power wander. Opens the page in headless Chromium
at 1920x1080 and reads Chromium's own counters through CDP (Performance.getMetrics):
- the main thread's time a second (TaskDuration), and its script, layout and style shares,
  in --page-window windows after --page-warmup, for --page-minutes;
- the JS heap after a forced garbage collection at the start and the end of each window, on a
  server whose history already holds the charts' live range (--page-history-s), so the page's
  buffers are full from the start and the heap has no reason to grow;
- the same counters for --page-hidden-s while the tab is hidden behind another tab;
- with --page-trace, a 10-s trace of the visible page (for DevTools or Perfetto) and its main
  thread's biggest slices.
"""
import atexit
import collections
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness

PCS, GPUS, PUSH_INTERVAL_S = 40, 8, 2.0
VIEWPORT = {"width": 1920, "height": 1080}
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")  # as tests/conftest.py
# tests/conftest.py's CHROMIUM_ARGS less --disable-frame-rate-limit, a test speed-up no user's browser has:
# frames come at most 60 a second here, as on a 60 Hz screen.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
DURATIONS = ("TaskDuration", "ThreadTime", "ScriptDuration", "LayoutDuration", "RecalcStyleDuration",
             "TaskOtherDuration")
TRACE_S, TRACE_TOP = 10.0, 15
TRACE_CATEGORIES = ["devtools.timeline", "disabled-by-default-devtools.timeline", "toplevel", "blink", "v8"]
TRACE_WRAPPERS = {"RunTask", "ThreadControllerImpl::RunTask"}  # around every task: all of it, nothing to tell
MODELS = (("NVIDIA GeForce RTX 4090", 24564, 450), ("NVIDIA RTX A6000", 49140, 300),
          ("NVIDIA A100-SXM4-80GB", 81920, 400))
USERS = ("ana", "bo", "chen", "dmitri", "eva", "farid", "grace", "hiro", "ines")
PROGRAMS = ("python train.py", "torchrun", "python finetune.py", "vllm serve", "jupyter-kernel", "python eval.py")


# ---- the fleet: 40 PCs whose GPUs run jobs that start and end ----------------------------------

class Fleet:
    """The pushes of PCS simulated PCs of GPUS GPUs each: body(device, n, sent) is harness.Devices' body."""

    def __init__(self, seed=32):
        self.names = [f"pc-{i:02}" for i in range(1, PCS + 1)]
        # Each PC is touched only by its own pushing thread: a generator and GPUs of its own.
        self.rngs = [random.Random(seed * 1000 + d) for d in range(PCS)]
        self.gpus = [[self._new_gpu(d, index) for index in range(GPUS)] for d in range(PCS)]

    def _new_gpu(self, device, index):
        model, memory_total, power_limit = MODELS[device * 3 // PCS]
        gpu = {"model": model, "memoryTotal": memory_total, "powerLimit": power_limit, "job": None,
               "until": 0.0, "temperature": 35.0, "index": index, "pid": 1000 + index * 100}
        if self.rngs[device].random() < 0.7:  # most of a lab's GPUs are busy at any time
            self._start_job(device, gpu, time.time())
        else:
            gpu["until"] = time.time() + self.rngs[device].uniform(30, 300)
        return gpu

    def _start_job(self, device, gpu, now):
        rng = self.rngs[device]
        gpu["pid"] += rng.randint(1, 90)
        processes = [{"user": rng.choice(USERS), "name": rng.choice(PROGRAMS), "pid": gpu["pid"],
                      "share": rng.uniform(0.3, 0.95)}]
        if rng.random() < 0.25:  # a notebook beside the job, holding a little memory
            processes.append({"user": rng.choice(USERS), "name": "jupyter-kernel", "pid": gpu["pid"] + 1,
                              "share": rng.uniform(0.01, 0.05)})
        gpu["job"] = {"load": rng.uniform(40, 99), "hot": rng.random() < 0.06, "processes": processes}
        gpu["until"] = now + rng.uniform(120, 1200)  # jobs of 2 to 20 minutes: a 10-minute run sees many end

    def _sample(self, device, gpu, now):
        rng = self.rngs[device]
        if now >= gpu["until"]:
            if gpu["job"]:
                gpu["job"], gpu["until"] = None, now + rng.uniform(30, 300)
            else:
                self._start_job(device, gpu, now)
        job, total = gpu["job"], gpu["memoryTotal"]
        if job:
            util = job["load"] * (0.3 if rng.random() < 0.1 else 1) + rng.gauss(0, 5)  # dips: data loading
            processes = [{"pid": p["pid"], "name": p["name"], "user": p["user"],
                          "memoryUsed": int(total * p["share"] + rng.gauss(0, 64))} for p in job["processes"]]
        else:
            util, processes = rng.uniform(0, 2), []
        util = max(0, min(100, round(util)))
        used = min(total, sum(p["memoryUsed"] for p in processes) + 300 + rng.randint(0, 20))
        target = 32 + util * 0.5 + (20 if job and job["hot"] else 0)
        gpu["temperature"] += (target - gpu["temperature"]) * 0.3 + rng.gauss(0, 0.5)
        return {"index": gpu["index"], "uuid": f"GPU-{device:04x}{gpu['index']:04x}-bench-page",
                "name": gpu["model"], "vendor": "NVIDIA", "driverVersion": "560.94",
                "utilizationGpu": util, "utilizationMemory": round(util * 0.6), "memoryTotal": total,
                "memoryUsed": used, "memoryFree": total - used, "temperatureGpu": round(gpu["temperature"]),
                "temperatureMemory": None,
                "powerDraw": round(gpu["powerLimit"] * (0.08 + 0.85 * util / 100) + rng.gauss(0, 4), 1),
                "powerLimit": gpu["powerLimit"], "fanSpeed": round(30 + util * 0.5),
                "clockCore": 210 if not job else 1800 + rng.randint(0, 700), "clockMemory": 10501,
                "pstate": "P2" if job else "P8", "processes": processes}

    def body(self, device, n, sent):
        """Return PC number `device`'s n-th push, sampled now."""
        return {"host": self.names[device], "sampledAt": sent,
                "agent": {"version": "bench", "backend": "nvml", "simulated": True},
                "gpus": [self._sample(device, gpu, sent) for gpu in self.gpus[device]]}


# ---- Chromium, and its counters ------------------------------------------------------------------

def chromium_path():
    """Return where Chromium is, or end the bench with one line saying how to install it."""
    path = next((p for p in CHROMIUM if os.path.exists(p)), None)
    if path is None:
        sys.exit("Chromium is not installed: apt-get install chromium")
    if importlib.util.find_spec("playwright") is None:
        sys.exit("Playwright is not installed: .venv/bin/pip install -r requirements-test.txt")
    return path


def start_chromium(profile):
    """Start headless Chromium with a DevTools port; return its process and the browser's CDP address."""
    log = open(Path(profile) / "stderr.log", "w+")
    process = subprocess.Popen([chromium_path(), "--headless", "--remote-debugging-port=0",
                                f"--user-data-dir={profile}", *CHROMIUM_ARGS, "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        found = re.search(r"DevTools listening on (ws://\S+)", Path(log.name).read_text())
        if found:
            return process, found[1]
        time.sleep(0.1)
    stop_chromium(process)
    sys.exit(f"Chromium opened no DevTools port: {Path(log.name).read_text()[-500:]}")


def stop_chromium(process):
    """End the Chromium this bench started: the wrapper script and every process it started."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(10)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def counters(cdp):
    """Return Chromium's Performance.getMetrics for the page, by name (durations in seconds)."""
    return {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}


def after_gc(cdp):
    """Collect the page's garbage (JS and DOM), then return its counters."""
    cdp.send("HeapProfiler.collectGarbage")
    return counters(cdp)


def wait_for_visibility(page, state, timeout_s=10):
    """Wait until the page's document.visibilityState is `state`; return it, or end the bench."""
    deadline = time.monotonic() + timeout_s
    while page.evaluate("document.visibilityState") != state:
        if time.monotonic() > deadline:
            sys.exit(f"the tab did not become {state}: document.visibilityState is "
                     f"{page.evaluate('document.visibilityState')!r}")
        time.sleep(0.1)
    return state


def delta(before, after):
    """Return what the counters added between two readings: ms a second of each duration, and counts."""
    seconds = after["Timestamp"] - before["Timestamp"]
    # ThreadTime and TaskOtherDuration are newer than the rest: an older Chromium's figure is nan.
    spent = {name: (after.get(name, math.nan) - before.get(name, math.nan)) * 1000 / seconds for name in DURATIONS}
    return {**spent, "seconds": seconds, "layouts": after["LayoutCount"] - before["LayoutCount"],
            "styles": after["RecalcStyleCount"] - before["RecalcStyleCount"]}


# How tall the document is, and how many chart canvases it holds and shows on the first screen.
PAGE_SHAPE = """(() => {
  const boxes = [...document.querySelectorAll("canvas")].map(c => c.getBoundingClientRect());
  return {height: document.documentElement.scrollHeight, canvases: boxes.length,
          seen: boxes.filter(b => b.width > 0 && b.bottom > 0 && b.top < innerHeight).length};
})()"""


def record_trace(browser, page):
    """Trace the page for TRACE_S; return the trace file and its main thread's biggest slices, in ms a second."""
    path = tempfile.NamedTemporaryFile(prefix="bench-page-trace-", suffix=".json", delete=False).name
    browser.start_tracing(page=page, path=path, categories=TRACE_CATEGORIES)
    time.sleep(TRACE_S)
    browser.stop_tracing()
    trace = json.loads(Path(path).read_text())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    main = {(e["pid"], e["tid"]) for e in events
            if e.get("name") == "thread_name" and e.get("args", {}).get("name") == "CrRendererMain"}
    slices = collections.defaultdict(lambda: [0, 0, 0])  # name -> [wall µs, CPU µs, count]
    for e in events:
        if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in main and e["name"] not in TRACE_WRAPPERS:
            totals = slices[e["name"]]
            totals[0], totals[1], totals[2] = totals[0] + e.get("dur", 0), totals[1] + e.get("tdur", 0), totals[2] + 1
    top = sorted(slices.items(), key=lambda item: -item[1][1])[:TRACE_TOP]
    return path, [(name, wall / 1000 / TRACE_S, cpu / 1000 / TRACE_S, n) for name, (wall, cpu, n) in top]


def measure(url, args, cpu):
    """Open `url` in a fresh headless Chromium and read its counters: visible, then hidden behind another tab.

    cpu() returns the CPU seconds spent so far by the machine and by each part of the bench, by name.
    """
    from playwright.sync_api import sync_playwright
    profile = tempfile.mkdtemp(prefix="bench-page-chromium-")
    chromium, endpoint = start_chromium(profile)
    errors = []
    try:
        with sync_playwright() as playwright:
            # Attached to, not launched, and without Playwright's defaults: its own pages keep focus
            # emulation on, and such a tab reads "visible" even behind another tab, so it never hides.
            browser = playwright.chromium.connect_over_cdp(endpoint, no_defaults=True)
            context = browser.contexts[0]
            page = context.pages[0]
            page.set_viewport_size(VIEWPORT)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)
            page.wait_for_function("document.querySelector('#connection').textContent === 'live'", timeout=30_000)
            viewport = page.evaluate("`${innerWidth}x${innerHeight}`")
            shape = page.evaluate(PAGE_SHAPE)
            cdp = context.new_cdp_session(page)
            cdp.send("Performance.enable")
            time.sleep(args.page_warmup)
            samples, windows, started = [(0.0, after_gc(cdp))], [], time.monotonic()
            spent = {**cpu(), "Chromium": harness.server_cpu_s(chromium.pid)}
            # Each window lies between two collections, so the collections' own time counts in none.
            for _ in range(max(1, round(args.page_minutes * 60 / args.page_window))):
                before = counters(cdp)
                time.sleep(args.page_window)
                windows.append(delta(before, counters(cdp)))
                samples.append((time.monotonic() - started, after_gc(cdp)))
            spent = {part: seconds - spent[part] for part, seconds in
                     {**cpu(), "Chromium": harness.server_cpu_s(chromium.pid)}.items()}
            spent["wall"] = time.monotonic() - started
            trace = record_trace(browser, page) if args.page_trace else None
            other = context.new_page()
            other.bring_to_front()
            hidden_as = wait_for_visibility(page, "hidden")
            time.sleep(2)  # what was queued before it hid
            before = counters(cdp)
            time.sleep(args.page_hidden_s)
            hidden = delta(before, counters(cdp))
            page.bring_to_front()
            wait_for_visibility(page, "visible")
            browser.close()
    finally:
        stop_chromium(chromium)
        shutil.rmtree(profile, ignore_errors=True)
    return {"windows": windows, "samples": samples, "hidden": hidden, "hidden_as": hidden_as,
            "viewport": viewport, "shape": shape, "errors": errors, "spent": spent, "trace": trace}


# ---- history: the page opens on a full live range, as on a server that has run for a while -------

# Run in the server's own tree, with its own history store: an older tree writes its own format.
FILL_HISTORY = """
import json, sys
from gpustats.history.sqlite import SqliteHistory
store = SqliteHistory(sys.argv[1], max_gap_s=15)
for line in sys.stdin:
    store.add(json.loads(line))
store.flush()
store.close()
"""


def fill_history(server_dir, path, fleet, seconds):
    """Write the fleet's pushes of the last `seconds` into the history database at `path`."""
    # Without it the charts' live range (HISTORY_S, 10 minutes) fills while the heap is measured,
    # and the heap grows by design for as long as the run.
    now, events = time.time(), []
    for k in range(round(seconds / PUSH_INTERVAL_S), 0, -1):
        for device, name in enumerate(fleet.names):
            at = now - k * PUSH_INTERVAL_S + device * PUSH_INTERVAL_S / PCS
            events.append(json.dumps({"device": name, "receivedAt": at, "gpus": fleet.body(device, 0, at)["gpus"]}))
    subprocess.run([sys.executable, "-c", FILL_HISTORY, path], cwd=server_dir, input="\n".join(events), text=True,
                   check=True, timeout=600)


# ---- one tree, and the tables ---------------------------------------------------------------------

def older_tree(spec):
    """Return a directory holding the tree `spec` names: a directory as it is, or a git revision exported."""
    if Path(spec).is_dir():
        return Path(spec)
    directory = Path(tempfile.mkdtemp(prefix="bench-page-before-"))
    atexit.register(shutil.rmtree, directory, True)
    archive = subprocess.run(["git", "-C", str(harness.ROOT), "archive", str(spec)], capture_output=True, timeout=60)
    if archive.returncode:
        sys.exit(f"--before {spec}: neither a directory nor a git revision ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True, timeout=60)
    return directory


def run(name, server_dir, args):
    """Start `server_dir`'s server and the fleet, measure the page, stop them; return the figures."""
    fleet = Fleet()
    keys = [f"bench-page-key-{pc}-{os.urandom(8).hex()}" for pc in fleet.names]
    port = harness.free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="bench-page-", suffix=".log", delete=False)
    history = Path(tempfile.mkdtemp(prefix="bench-page-history-"))
    atexit.register(shutil.rmtree, history, True)
    fill_history(server_dir, history / "history.sqlite3", fleet, args.page_history_s)
    server = harness.start_ours(port, keys, log, server_dir, PUSH_RATE_LIMIT="100",
                                HISTORY_DB=str(history / "history.sqlite3"),
                                DEVICE_KEYS=",".join(f"{d}:{k}" for d, k in zip(fleet.names, keys)))
    devices = harness.Devices(port, keys, GPUS, PUSH_INTERVAL_S, body=fleet.body)
    try:
        devices.start()
        time.sleep(PUSH_INTERVAL_S + 1)  # every PC has pushed once
        figures = measure(f"http://127.0.0.1:{port}{args.page_path}", args, lambda: {
            "machine": harness.machine_busy_s(), "the server": harness.server_cpu_s(server.pid),
            "the pushes": sum(os.times()[:2])})
    finally:
        harness.shut_down(server, devices, [])
    refused = sum(status != 200 for _, _, status in devices.pushes)
    print(f"{name}: the server in {server_dir} (log {log.name}); {len(devices.pushes)} pushes, {refused} refused; "
          f"viewport {figures['viewport']}; the document {figures['shape']['height']:,} px tall, "
          f"{figures['shape']['canvases']} canvases, {figures['shape']['seen']} of them on the first screen; "
          f"the page threw {len(figures['errors'])} errors"
          + (f", the first: {figures['errors'][0]}" if figures["errors"] else ""))
    spent = figures["spent"]
    spent["anything else"] = spent["machine"] - spent["Chromium"] - spent["the server"] - spent["the pushes"]
    print(f"{name}: CPU while visible, in cores (of {os.cpu_count()}): "
          + ", ".join(f"{part} {spent[part] / spent['wall']:.2f}"
                      for part in ("machine", "Chromium", "the server", "the pushes", "anything else"))
          + f"; load average at the end {os.getloadavg()[0]:.1f}")
    if figures["trace"]:
        path, top = figures["trace"]
        print(f"{name}: the main thread's biggest slices (nested in one another) in a {TRACE_S:g}-s trace, {path}; "
              "ms/s of CPU (of wall time), how many: "
              + "; ".join(f"{slice} {cpu:.1f} ({wall:.1f}), {n}" for slice, wall, cpu, n in top))
    for label, key, unit in (("JS heap", "JSHeapUsedSize", 2**20), ("DOM nodes", "Nodes", 1),
                             ("event listeners", "JSEventListeners", 1)):
        print(f"{name}: {label} after GC, every {args.page_window:g} s: "
              + ", ".join(f"{sample[key] / unit:.{2 if unit > 1 else 0}f}" for _, sample in figures["samples"]))
    return figures


def ms_s(value):
    """Format milliseconds a second; '-' where this Chromium has no such counter."""
    return "-" if math.isnan(value) else f"{value:.1f}"


def visible_row(name, figures):
    """Return one Markdown row: the page's main thread while visible, over every window together."""
    windows = figures["windows"]
    seconds = sum(w["seconds"] for w in windows)

    def per_s(key):
        return sum(w[key] * w["seconds"] for w in windows) / seconds
    tasks = sorted(w["TaskDuration"] for w in windows)
    return (f"| {name} | {per_s('TaskDuration'):.1f} ({tasks[0]:.1f}-{tasks[-1]:.1f}) "
            f"| {ms_s(per_s('ThreadTime'))} "
            f"| {per_s('ScriptDuration'):.1f} | {per_s('LayoutDuration'):.1f} | {per_s('RecalcStyleDuration'):.1f} "
            f"| {ms_s(per_s('TaskOtherDuration'))} | {sum(w['layouts'] for w in windows) / seconds:.1f} |")


def lasting_row(name, figures, minutes):
    """Return one Markdown row: what the page kept over the minutes, and what it did hidden."""
    samples, hidden = figures["samples"], figures["hidden"]
    (_, first), (_, middle), (_, last) = samples[0], samples[len(samples) // 2], samples[-1]
    heap = f"{first['JSHeapUsedSize'] / 2**20:.2f} → {last['JSHeapUsedSize'] / 2**20:.2f} MiB " \
           f"({(last['JSHeapUsedSize'] - first['JSHeapUsedSize']) / 2**20:+.2f})"
    growth = (last["JSHeapUsedSize"] - middle["JSHeapUsedSize"]) / 2**20
    return (f"| {name} | {heap} in {minutes:g} min | {growth:+.2f} MiB "
            f"| {first['Nodes']:,.0f} → {last['Nodes']:,.0f} "
            f"| {hidden['TaskDuration']:.1f} | {ms_s(hidden['ThreadTime'])} | {hidden['ScriptDuration']:.1f} "
            f"| {hidden['layouts']:.0f} ({hidden['styles']:.0f}) in {hidden['seconds']:.0f} s |")


def page_cost(args):
    """Measure the page for the --before tree, then this one, and print the figures as Markdown tables."""
    chromium_path()
    trees = ([("before", older_tree(args.before))] if args.before else []) + [("now", args.server_dir)]
    results = [(name, run(name, directory, args)) for name, directory in trees]
    print(f"\n`make bench BENCH_ARGS=\"{shlex.join(sys.argv[1:])}\"`: {PCS} PCs x {GPUS} GPUs pushing every "
          f"{PUSH_INTERVAL_S:g} s, Chromium {VIEWPORT['width']}x{VIEWPORT['height']}, headless; {os.cpu_count()} cores "
          f"shared by the server, the pushes, Chromium and whatever else runs; {args.page_warmup:g} s of warm-up, then "
          f"{args.page_minutes:g} min visible in {args.page_window:g}-s windows (their range in brackets), then "
          f"{args.page_hidden_s:g} s hidden behind a second tab "
          f"(document.visibilityState {results[-1][1]['hidden_as']!r}).\n")
    print("| page | main thread busy (TaskDuration), ms/s | its CPU (ThreadTime), ms/s | script, ms/s | layout, ms/s "
          "| style, ms/s | the rest (paint, compositing), ms/s | layouts/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, figures in results:
        print(visible_row(name, figures))
    print("\n| page | JS heap after GC, start → end | its change over the second half | DOM nodes after GC "
          "| hidden: main thread busy, ms/s | hidden: its CPU, ms/s | hidden: script, ms/s "
          "| hidden: layouts (style recalcs) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, figures in results:
        print(lasting_row(name, figures, args.page_minutes))

"""Fixtures: the real server (the Procfile's gunicorn command) on port 0, and SSE clients."""
import http.client
import json
import math
import os
import re
import runpy
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
KEYS = {f"rig-{i}": f"test-key-rig-{i}-0123456789" for i in range(1, 10)}
HEARTBEAT_S = "0.25"  # short, so closed viewers are counted out and heartbeats come quickly
# Servers started outside Server() keep history in memory: none may write history.sqlite3 into the checkout.
os.environ["HISTORY_DB"] = ""
# The suite's servers are the original design's open read-only dashboard, unless a test signs in:
# the access tests set ADMIN_PASSWORD and DASHBOARD_PUBLIC=0 themselves.
os.environ["DASHBOARD_PUBLIC"] = "1"
# No test reads a real GPU: on a contributor's NVIDIA machine every agent the tests start (and this
# process) finds no libnvidia-ml, as here, so `auto` chooses as the tests expect (issue 30).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "fixtures" / "no-nvml"),
                                                         os.environ.get("PYTHONPATH")]))
runpy.run_path(str(ROOT / "tests" / "fixtures" / "no-nvml" / "sitecustomize.py"))  # and for this process
# One session key for every server, as hosts behind one load balancer share one (REDIS_URL needs it).
os.environ["SECRET_KEY"] = "session-key-for-tests-" + "x" * 16
ADMIN_PASSWORD = "admin-password-for-tests"
# A private server: sign-in needed, the user admin made from ADMIN_PASSWORD.
PRIVATE = {"DASHBOARD_PUBLIC": "0", "ADMIN_PASSWORD": ADMIN_PASSWORD, "SECRET_KEY": "session-key-for-tests-" + "x" * 16}


def procfile_command():
    """Return the Procfile's web command line, with $PORT left for the shell to expand."""
    line = next(l for l in (ROOT / "Procfile").read_text().splitlines() if l.startswith("web:"))
    return line.removeprefix("web:").strip()


class Server:
    """A gunicorn process started exactly as the Procfile says, on a port of its choosing."""

    def __init__(self, settings, tmp_path):
        self.settings = {"DEVICE_KEYS": ",".join(f"{d}:{k}" for d, k in KEYS.items()),
                         "HEARTBEAT_S": HEARTBEAT_S, "HISTORY_DB": str(tmp_path / "history.sqlite3"), **settings}
        self.log_path = tmp_path / f"gunicorn-{time.monotonic_ns()}.log"
        self.port = 0
        self.process = None

    def start(self, port=None):
        port = port if port is not None else self.port
        if not port and int(self.settings.get("WEB_CONCURRENCY", "1")) > 1:
            port = free_port()  # several workers bind SO_REUSEPORT sockets of their own: one real port
        env = {**os.environ, "ENV_FILE": os.devnull, **self.settings, "PORT": str(port)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        self.log = open(self.log_path, "a")
        # A session of its own: kill() can end the master and every worker it forked at once.
        self.process = subprocess.Popen(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            found = re.findall(r"Listening at: http://[^:]+:(\d+)", text)
            listening = int(found[-1]) if found else port
            if listening and "Booting worker" in text and self._healthy(listening):
                self.port = listening
                return self
            if self.process.poll() is not None:
                raise RuntimeError("server exited:\n" + self.log_path.read_text())
            time.sleep(0.01)  # it is up about 0.25 s after its start: a coarse poll would add to every test
        raise RuntimeError("server did not start:\n" + self.log_path.read_text())

    @staticmethod
    def _healthy(port):
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self):
        """Stop it at once: SIGINT is gunicorn's quick shutdown (SIGTERM's graceful one polls for 1-3 s)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def kill(self):
        """End it and its workers at once: a finished test has no use for a quick shutdown's 0.35 s."""
        if self.process and self.process.returncode is None:  # not reaped: its group id is still its own
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()
        self.log.close()

    def restart(self):
        """Stop and start again on the same port, as a deploy would."""
        self.stop()
        return self.start(self.port)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_pid(self):
        return int(re.findall(r"Booting worker with pid: (\d+)", self.log_path.read_text())[-1])

    def output(self):
        return self.log_path.read_text()

    def push(self, body, device="rig-1", key=None, **kwargs):
        headers = {"Authorization": f"Bearer {key or KEYS[device]}", **kwargs.pop("headers", {})}
        if isinstance(body, (dict, list)):
            kwargs["json"] = body
        else:
            kwargs["data"] = body
        answer = requests.post(self.url + "/push-sse", headers=headers, timeout=10, **kwargs)
        self.answered_at = time.time()  # the server took the push before this: its receivedAt is earlier
        return answer

    def push_as_new_history_point(self, body, **kwargs):
        """Push once the server's clock is in a later second than the one the last push was taken in.

        History keeps one point a second; a push in the same second replaces the last point instead.
        """
        self.wait_past_last_push(1)
        return self.push(body, **kwargs)

    def wait_past_last_push(self, seconds):
        """Wait until the clock is `seconds` whole seconds past the second the last push was taken in.

        A push sent then is kept as a history point that many seconds (or more) after the last one.
        """
        # receivedAt is the server's clock when it took the push, rounded to the millisecond:
        # at most 0.5 ms past the answer, so never in a later second than this one.
        taken = math.floor(getattr(self, "answered_at", 0) + 0.001)
        wait_for(lambda: time.time() >= taken + seconds, timeout=seconds + 1, interval=0.01)

    def health(self):
        return requests.get(self.url + "/healthz", timeout=5).json()

    def snapshot(self):
        """Return the data of every snapshot event a new viewer gets, then close that viewer."""
        devices = self.health()["devices"]  # a new viewer's snapshot has one event per device
        stream = Stream(self.port)
        try:
            return [stream.next()["data"] for _ in range(devices)]
        finally:
            stream.close(reset=True)  # counted out at the next heartbeat, not the one after: see state()

    def state(self):
        """Return what a user can observe: a new viewer's snapshot and /healthz without its clock."""
        viewers = self.health()["subscribers"]
        snapshot = self.snapshot()
        deadline = time.monotonic() + 5  # the closed viewer is counted out when its next write fails
        while (health := self.health())["subscribers"] != viewers and time.monotonic() < deadline:
            time.sleep(0.02)
        health.pop("uptimeS")
        health.pop("historyBacklog", None)  # drains on its own within a second, as the clock moves
        return snapshot, health


def require(program, package):
    """Return the path of `program`; missing, fail the run in CI and skip elsewhere."""
    path = shutil.which(program) or next((p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}")
                                          if os.path.exists(p)), None)
    if path is None:
        message = f"{program} is not installed: apt-get install {package} (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on a free loopback port; without `persist` a restart starts empty."""

    def __init__(self, tmp_path, persist=False):
        self.binary = require("redis-server", "redis-server")
        self.dir, self.port, self.process = tmp_path, free_port(), None
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persist else ["--appendonly", "no"]

    def start(self):
        self.process = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", *self.persistence, "--dir", str(self.dir)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self.ping, timeout=10)
        return self

    def ping(self):
        try:
            return redis.Redis(port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def kill(self):
        """End it at once: without persistence its shutdown (0.1 s) saves nothing a finished test needs."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


# In-process apps of the running test (make_app), closed before its Redis is killed: an app whose
# Redis is gone fails its background rounds, and a traceback formatted in one of those threads
# while the next test builds its routes meets CPython 3.11.7's AST bug (python/cpython#106905).
APPS = []


def close_apps():
    """Stop the background work of every in-process app the running test made."""
    while APPS:
        for part in APPS.pop().extensions["gpustats"].values():
            getattr(part, "close", lambda: None)()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    close_apps()  # the test's apps first: they may still be using it
    server.kill()


def pytest_configure(config):
    config.addinivalue_line("markers", "both_backends: run against the in-process and the Redis backend")
    config.addinivalue_line("markers", "no_backend: the backend plays no part (HTTP parsing, startup): run once")


def pytest_generate_tests(metafunc):
    """Run the tests of a module marked both_backends once per backend: one contract, two parts."""
    if metafunc.definition.get_closest_marker("both_backends") and "backend" in metafunc.fixturenames:
        once = metafunc.definition.get_closest_marker("no_backend")
        metafunc.parametrize("backend", ["memory"] if once else ["memory", "redis"], indirect=True)


@pytest.fixture
def backend(request):
    return getattr(request, "param", "memory")


@pytest.fixture
def start_server(tmp_path, backend, request):
    """Start servers with given settings (on the Redis backend when `backend` says); all ended after."""
    servers = []
    shared = {"REDIS_URL": request.getfixturevalue("redis_server").url} if backend == "redis" else {}

    def start(**settings):
        server = Server({**shared, **settings}, tmp_path).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def server(start_server):
    return start_server(PUSH_RATE_LIMIT="1000")


class Stream:
    """A real HTTP client on /gpu/stream that parses events as EventSource does."""

    def __init__(self, port, path="/gpu/stream", headers=None, timeout=10):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.conn.request("GET", path, headers=headers or {})
        self.response = self.conn.getresponse()
        self.buffer = b""
        self.retry = None
        self.comments = 0

    @property
    def status(self):
        return self.response.status

    def header(self, name):
        return self.response.getheader(name)

    def next(self, timeout=5, with_comments=False):
        """Return the next event as {id, event, data}, or a comment if asked for."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n\n" in self.buffer:
                block, self.buffer = self.buffer.split(b"\n\n", 1)
                event = self._parse(block.decode())
                if event is not None and (with_comments or event.get("event") != ":comment"):
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError("no event in time")
            self.conn.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.response.read1(65536)
            if not chunk:
                raise EOFError("stream ended")
            self.buffer += chunk

    def _parse(self, block):
        event = {"id": None, "event": None}
        data = []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                self.comments += 1
                event.setdefault("comment", value)
            elif field == "retry":
                self.retry = int(value)
            elif field == "data":
                data.append(value)
            elif field in ("id", "event"):
                event[field] = value
        if data:
            event["data"] = json.loads("\n".join(data))
            return event
        if "comment" in event:
            return {"event": ":comment", "comment": event["comment"]}
        return None

    def until(self, predicate, timeout=5):
        """Return the first event matching `predicate`, skipping others."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(event):
                return event

    def close(self, reset=False):
        """Hang up; with `reset`, abortively (RST), so the server's next write fails rather than its second."""
        if reset and self.conn.sock is not None:
            self.conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.conn.close()


@pytest.fixture
def open_stream():
    """Open streams on a server; all are closed at the end of the test."""
    streams = []

    def open_(server, path="/gpu/stream", headers=None):
        stream = Stream(server.port, path, headers)
        streams.append(stream)
        return stream
    yield open_
    for stream in streams:
        stream.close()


def seq(event_id):
    """Return the sequence number in an event id `<boot>-<seq>`."""
    return int(event_id.rsplit("-", 1)[1])


def wait_for(predicate, timeout=5, interval=0.02, what="condition"):
    """Poll `predicate` until it returns something true and return that; fail at the deadline, saying `what` never came."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail(f"{what} not met in time ({timeout:g} s)")
        time.sleep(interval)


class Admin:
    """An admin (or `user`) signed in on a real server through the form, sending the page's CSRF token with each change."""

    def __init__(self, server, user="admin", password=ADMIN_PASSWORD):
        self.server, self.session = server, requests.Session()
        self.session.post(server.url + "/login", data={"user": user, "password": password},
                          timeout=10).raise_for_status()
        page = self.session.get(server.url + "/", headers={"Accept": "text/html"}, timeout=10).text
        self.csrf = re.search(r'name="csrf-token" content="([^"]+)"', page)[1]
        self.session.headers["X-CSRF-Token"] = self.csrf

    def __getattr__(self, method):  # get, post, delete: on the server's URL
        return lambda path, **kwargs: getattr(self.session, method)(self.server.url + path, timeout=10, **kwargs)


@pytest.fixture
def make_app(monkeypatch, tmp_path):
    """Build isolated apps in this process from settings (over the suite's devices, history in tmp_path); stop their background work after."""
    from app import create_app
    monkeypatch.setenv("ENV_FILE", os.devnull)

    def make(**settings):
        app = create_app({"DEVICE_KEYS": ",".join(f"{d}:{k}" for d, k in KEYS.items()),
                          "HISTORY_DB": str(tmp_path / "history.sqlite3"), **settings})
        APPS.append(app)
        return app
    yield make
    close_apps()


@pytest.fixture
def app(make_app):
    """One app in this process, the suite's devices and history in a scratch file."""
    return make_app()


@pytest.fixture
def client(app):
    """Flask's test client on `app`."""
    return app.test_client()


def raw_exchange(port, request, close_write, timeout=5):
    """Send raw bytes; return the first status code and its JSON body, if any. Never hangs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(request)
        if close_write:
            sock.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            head, sep, rest = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: (\d+)", head) if sep else None
            if length and len(rest) >= int(length.group(1)):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    is_json = re.search(rb"(?i)content-type: application/json", head)
    return status, json.loads(rest[:length]) if is_json else None


def dechunk(body):
    """Return the payloads of the complete chunks in `body`; fail on bad framing."""
    payloads, at = [], 0
    while True:
        end = body.find(b"\r\n", at)
        if end < 0:
            return payloads
        size = int(body[at:end], 16)
        assert size > 0, "an empty chunk would end the response"
        if len(body) < end + 2 + size + 2:
            return payloads
        assert body[end + 2 + size:end + 4 + size] == b"\r\n", "chunk framing broken"
        payloads.append(body[end + 2:end + 2 + size])
        at = end + 4 + size


def gpu(index=0, **fields):
    """Return one GPU object of a plausible RTX 3080 at load, with `fields` replaced."""
    return {"index": index, "uuid": f"GPU-5a1c0000-0000-0000-0000-00000000000{index}",
            "name": "NVIDIA GeForce RTX 3080", "vendor": "NVIDIA", "driverVersion": "560.94",
            "utilizationGpu": 80, "utilizationMemory": 41, "memoryTotal": 10240,
            "memoryUsed": 6144, "memoryFree": 4096, "temperatureGpu": 65,
            "temperatureMemory": None, "powerDraw": 220.5, "powerLimit": 320, "fanSpeed": 55,
            "clockCore": 1905, "clockMemory": 9501, "pstate": "P2",
            "processes": [{"pid": 4242, "name": "python", "memoryUsed": 2048}], **fields}


def host_system(**fields):
    """Return the `system` of a push as SPEC's example has it (a 192-core EPYC server), with `fields` replaced."""
    return {"os": "Ubuntu 24.04.1 LTS", "cpuModel": "AMD EPYC 9654 96-Core Processor", "cpuCount": 192,
            "cpuPercent": 37.5, "load1": 41.2, "memoryTotal": 1547521, "memoryUsed": 402113, "swapUsed": 0,
            "disks": [{"mount": "/", "total": 1831420, "used": 620013}], "netRx": 1250000.0, "netTx": 83000.5,
            "temperatureCpu": 61, "uptimeS": 1209600, **fields}


def multi(*gpus, host="rig-1"):
    """Return a multi-GPU push body like the one agent.py sends."""
    return {"host": host, "sampledAt": time.time(),
            "agent": {"version": "1.0.0", "backend": "nvml", "simulated": False},
            "gpus": list(gpus) or [gpu()]}


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Debian's Chromium, started as the machine's closed network needs (no background traffic).
# Each pointer move waits for the next frame: without the 60 Hz cap a sweep across a chart
# takes 0.8 s, not 1.9 s. Frames still come only when something changed.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-frame-rate-limit"]


@pytest.fixture(scope="session")
def browser():
    """Headless Debian Chromium through Playwright; missing, it fails the run in CI."""
    path = next((p for p in CHROMIUM if os.path.exists(p)), None)
    if path is None:
        message = "Chromium is not installed: apt-get install chromium (.ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def sign_in_page(page, server, path="/"):
    """Open `path` in Chromium, be sent to the sign-in page, and sign in there as admin."""
    page.goto(server.url + path)
    page.fill("input[name=user]", "admin")
    page.fill("input[name=password]", ADMIN_PASSWORD)
    page.click("button[type=submit]")


@pytest.fixture
def page(browser):
    """A fresh page; JavaScript exceptions fail the test, console errors are kept for checks."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.console_errors, page.exceptions = [], []
    page.on("console", lambda m: page.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda error: page.exceptions.append(str(error)))
    yield page
    context.close()
    assert page.exceptions == []

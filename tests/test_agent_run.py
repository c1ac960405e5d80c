"""The real agent process: settings, --once, failures, and pushes to the real server."""
import http.server
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import agent
from agent_fakes import DRIVER_NOT_LOADED, L40S, RTX2080S, FakeSmi
from conftest import KEYS, ROOT, wait_for


@pytest.fixture
def smi(tmp_path, monkeypatch):
    return FakeSmi(tmp_path, monkeypatch)


# The environment of a PC without NVIDIA's driver, on any PC: nvidia-ml-py finds no library.
NO_NVML = ROOT / "tests" / "fixtures" / "no-nvml"
WITHOUT_NVML = {"PYTHONPATH": os.pathsep.join(filter(None, [str(NO_NVML), os.environ.get("PYTHONPATH")]))}


def run_agent(*args, env=None, cwd=ROOT, script=None, timeout=30):
    environ = {k: v for k, v in os.environ.items() if k not in ("PUSH_URL", "DEVICE_KEY", "DROPLET_PUSH_URL")}
    return subprocess.run([sys.executable, str(script or ROOT / "agent.py"), *args], cwd=cwd,
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def poll(predicate, timeout):
    """Call `predicate` until it is true or `timeout` s have passed; return whether it came true."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def stop_agent(process, log, line):
    """Give the agent up to 5 s to log `line`, then stop it; return its whole log.

    Viewers get an event before the agent gets its answer, so its line can come later.
    """
    path = Path(log.name)
    poll(lambda: line in path.read_text(), 5)
    process.terminate()
    process.wait(10)
    log.close()
    return path.read_text()


def start_agent(*args, log):
    return subprocess.Popen([sys.executable, str(ROOT / "agent.py"), *args], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ))


# ---- one shot --------------------------------------------------------------------------------

def test_dry_run_prints_the_payload_read_through_gputil(smi):
    smi.set(gpus=[L40S, RTX2080S])
    result = run_agent("--once", "--dry-run", "--backend", "gputil")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["agent"] == {"version": agent.VERSION, "backend": "gputil", "simulated": False}
    assert [g["name"] for g in payload["gpus"]] == ["NVIDIA L40S", "NVIDIA GeForce RTX 2080 SUPER"]
    assert abs(payload["sampledAt"] - time.time()) < 30


def test_auto_without_an_nvml_library_uses_gputil(smi):
    # nvidia-ml-py cannot load libnvidia-ml (hidden, should this PC have a driver), so auto falls back.
    result = run_agent("--once", "--dry-run", env=WITHOUT_NVML)
    assert result.returncode == 0 and json.loads(result.stdout)["agent"]["backend"] == "gputil"
    hidden = subprocess.run([sys.executable, "-c", "import pynvml; pynvml.nvmlInit()"], capture_output=True,
                            text=True, env={**os.environ, **WITHOUT_NVML}, timeout=30)
    assert "NVMLError_LibraryNotFound" in hidden.stderr


def test_once_with_driver_not_loaded_exits_nonzero_with_one_line(smi):
    smi.set(fail=DRIVER_NOT_LOADED)
    result = run_agent("--once", "--url", "http://127.0.0.1:9/push-sse", "--backend", "gputil",
                       env={"DEVICE_KEY": "k" * 20})  # the key as the README says: no warning about a flag
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "agent: cannot read GPUs: nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't "
        "communicate with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running."]


def test_simulate_needs_no_gpu():
    result = run_agent("--once", "--dry-run", "--simulate", "3")
    payload = json.loads(result.stdout)
    assert len(payload["gpus"]) == 3 and payload["agent"]["simulated"] is True


@pytest.mark.parametrize("args,message", [
    (["--once"], "PUSH_URL is not set"),
    (["--url", "ftp://host/push-sse", "--key", "k" * 20], "PUSH_URL: 'ftp://host/push-sse' is not an http"),
    (["--url", "http:///push-sse", "--key", "k" * 20], "is not an http:// or https:// URL with a host"),
    (["--url", "http://host:3000/push-sse"], "DEVICE_KEY is not set"),
    (["--interval", "0"], "must be from 0.2 to 3600"),
])
def test_settings_that_cannot_be_right_stop_it_with_one_line(args, message):
    result = run_agent(*args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_flags_beat_environment_beat_env_file(tmp_path, server):
    copy = tmp_path / "agent.py"
    shutil.copy(ROOT / "agent.py", copy)  # what a user does: one file, a .env beside it
    (tmp_path / ".env").write_text(f"DROPLET_PUSH_URL={server.url}/push-sse\nDEVICE_KEY={KEYS['rig-3']}\n")
    pushed = run_agent("--once", "--simulate", "1", script=copy, cwd=tmp_path)
    assert pushed.returncode == 0, pushed.stderr
    assert server.health()["devices"] == 1
    env_wins = run_agent("--once", "--simulate", "1", script=copy, cwd=tmp_path, env={"DEVICE_KEY": "x" * 20})
    assert env_wins.returncode == 3 and "refused the device key" in env_wins.stderr
    flag_wins = run_agent("--once", "--simulate", "1", "--key", KEYS["rig-4"], script=copy, cwd=tmp_path,
                          env={"DEVICE_KEY": "x" * 20})
    assert flag_wins.returncode == 0 and server.health()["devices"] == 2


def test_a_refused_key_stops_the_loop_with_one_line(server):
    result = run_agent("--url", server.url + "/push-sse", "--key", "not-a-known-key-at-all", "--simulate", "1")
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1].startswith("agent: the server refused the device key (401")
    assert "Traceback" not in result.stderr


def test_a_wrong_path_stops_it_rather_than_retrying_forever(server):
    result = run_agent("--url", server.url + "/push", "--key", KEYS["rig-1"], "--simulate", "1")
    assert result.returncode == 3 and "should end in /push-sse" in result.stderr


def test_a_lost_gpu_does_not_take_the_pc_off_the_dashboard(server, open_stream, smi):
    # The issue: GPU 1 off the bus gave the error entry index 2, the 2080's, and the server
    # refused every push from that PC ("gpus[2].index: 2 is used twice").
    smi.set(gpus=[L40S, "lost:0000:0B:00.0", RTX2080S])
    stream = open_stream(server)
    result = run_agent("--once", "--url", server.url + "/push-sse", "--key", KEYS["rig-5"], "--backend", "gputil")
    assert result.returncode == 0, result.stderr
    shown = stream.until(lambda e: e["data"].get("device") == "rig-5", timeout=10)["data"]["gpus"]
    assert [g["index"] for g in shown] == [0, 1, 2]
    l40s, lost, rtx = shown
    assert (l40s["name"], l40s["temperatureGpu"], l40s["utilizationGpu"]) == ("NVIDIA L40S", 63, 100)
    assert (rtx["name"], rtx["utilizationGpu"], rtx["fanSpeed"]) == ("NVIDIA GeForce RTX 2080 SUPER", 7, 38)
    assert "0000:0B:00.0: Unknown Error" in lost["error"]
    assert lost.get("name") is None and lost.get("temperatureGpu") is None


REJECTED = "server rejected the sample: gpus[0].temperatureGpu: 300 is out of range -100 to 250"


def test_once_with_a_sample_the_server_refuses_exits_1_naming_the_field(server, smi):
    smi.set(gpus=[L40S], set={"0": {"temperature.gpu": "300"}})  # the server accepts -100 to 250
    result = run_agent("--once", "--url", server.url + "/push-sse", "--backend", "gputil",
                       env={"DEVICE_KEY": KEYS["rig-6"]})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"agent: {REJECTED}"]


# ---- the loop against the real server ----------------------------------------------------------

def test_agent_pushes_resume_after_the_server_restarts_newest_sample_first(server, open_stream, tmp_path):
    log = open(tmp_path / "agent.log", "w")
    process = start_agent("--url", server.url + "/push-sse", "--key", KEYS["rig-1"], "--simulate", "2",
                          "--interval", "0.3", log=log)
    try:
        stream = open_stream(server)
        first = stream.until(lambda e: e["data"].get("gpus"), timeout=10)
        assert first["data"]["device"] == "rig-1" and len(first["data"]["gpus"]) == 2
        server.stop()
        wait_for(lambda: "server unreachable" in Path(log.name).read_text(), what="the agent to find the server down",
                 timeout=10)
        server.start(server.port)
        restarted = time.time()
        stream = open_stream(server)
        event = stream.until(lambda e: e["data"].get("gpus") and "snapshot" not in e["data"], timeout=20)
        assert event["data"]["agent"]["simulated"] is True
        assert event["data"]["sampledAt"] >= restarted - 1  # a fresh sample, not a backlog
        assert process.poll() is None  # never died
    finally:
        text = stop_agent(process, log, "server recovered")
    assert "Traceback" not in text
    assert text.count("server unreachable") == 1 and "server recovered" in text  # logged once, not per try


def test_gpu_failure_is_logged_once_pushed_as_an_error_and_recovers(server, open_stream, smi, tmp_path):
    smi.set(fail=DRIVER_NOT_LOADED)
    log = open(tmp_path / "agent.log", "w")
    process = start_agent("--url", server.url + "/push-sse", "--key", KEYS["rig-2"], "--backend", "gputil",
                          "--interval", "0.3", log=log)
    try:
        stream = open_stream(server)
        failed = stream.until(lambda e: e["data"].get("device") == "rig-2", timeout=10)
        assert failed["data"]["gpus"] == [] and "exit 9" in failed["data"]["error"]
        # Several failed samples, so the log below shows the failure once, not once per sample.
        wait_for(lambda: "cannot read GPUs" in Path(log.name).read_text() and len(smi.calls()) >= 4,
                 what="the agent to log the failure and sample a few more times", timeout=10)
        smi.set(gpus=[L40S])
        recovered = stream.until(lambda e: e["data"].get("gpus"), timeout=10)
        assert recovered["data"]["gpus"][0]["name"] == "NVIDIA L40S" and recovered["data"]["error"] is None
    finally:
        text = stop_agent(process, log, "GPU reading recovered")
    assert text.count("cannot read GPUs") == 1 and "GPU reading recovered" in text


def most_samples_with_backoff(elapsed, interval):
    """Return the most samples backoff_s allows in `elapsed` s: after the nth failure it waits
    at least half of interval * 2**n (its jitter), capped."""
    samples, waited = 1, 0.0
    while True:
        waited += min(agent.BACKOFF_CAP_S, interval * 2 ** samples) / 2
        if waited > elapsed:
            return samples
        samples += 1


def test_a_sample_the_server_refuses_is_logged_once_and_the_agent_keeps_its_pace(server, open_stream, smi,
                                                                                  tmp_path):
    # A 400 is no network failure: backing off kept the PC off the dashboard ever longer.
    smi.set(gpus=[L40S], set={"0": {"temperature.gpu": "300"}})
    # The one query per sample for what GPUtil lacks: it counts samples whatever GPUtil runs.
    query = "--query-gpu=" + ",".join(agent.SMI_FIELDS[n] for n in agent.GPUTIL_LACKS)

    def samples():
        return sum(query in call for call in smi.calls())
    interval = 0.3
    log = open(tmp_path / "agent.log", "w")
    started = time.monotonic()
    process = start_agent("--url", server.url + "/push-sse", "--key", KEYS["rig-6"], "--backend", "gputil",
                          "--interval", str(interval), log=log)
    try:
        stream = open_stream(server)
        wait_for(lambda: samples() > 2 * most_samples_with_backoff(time.monotonic() - started, interval),
                 what="twice as many samples as backoff would allow", timeout=15)
        assert REJECTED in Path(log.name).read_text()
        smi.set(gpus=[L40S])
        shown = stream.until(lambda e: e["data"].get("device") == "rig-6", timeout=10)["data"]
        assert shown["gpus"][0]["name"] == "NVIDIA L40S" and shown["gpus"][0]["temperatureGpu"] == 63
        assert process.poll() is None
    finally:
        text = stop_agent(process, log, "sample rejection recovered")
    assert text.count("server rejected the sample") == 1 and f"WARNING: {REJECTED}\n" in text
    assert "sample rejection recovered" in text
    assert "backoff" not in text and "Traceback" not in text


# ---- backoff, as pure functions ---------------------------------------------------------------

def test_backoff_grows_with_jitter_up_to_the_cap_and_honours_retry_after():
    assert [agent.backoff_s(n, 2, rng=lambda: 1.0) for n in (1, 2, 3, 4, 10)] == [4, 8, 16, 30, 30]
    assert agent.backoff_s(1, 2, rng=lambda: 0.0) == 2  # jitter: half to all of the step
    assert agent.backoff_s(1, 2, retry_after=7, rng=lambda: 0.0) == 7


def test_loop_retries_after_retry_after_and_takes_a_fresh_sample_each_time():
    answers = [agent.Retry("429", after=7), agent.Retry("down"), None, None]
    sleeps, sent = [], []

    class Reader(agent.SimulatedReader):
        def sample(self):
            return [{"index": 0, "utilizationGpu": len(sent)}]

    class Pusher:
        def push(self, payload):
            sent.append(payload["gpus"][0]["utilizationGpu"])
            answer = answers.pop(0)
            if answer:
                raise answer
    agent.run_loop(Reader(1), Pusher(), 2, clock=lambda: 0.0, sleep=sleeps.append, stop=lambda: not answers)
    assert sleeps[0] >= 7 and 2 <= sleeps[1] <= 8 and sleeps[2] == 2
    assert sent == [0, 1, 2, 3]  # every try sends a new sample: no backlog, no resend


def test_a_rejected_sample_is_no_network_failure_the_loop_keeps_its_interval(caplog):
    caplog.set_level(logging.INFO, logger="agent")
    field = "gpus[0].temperatureGpu"

    def rejected(value):
        return agent.Rejected(400, f"{field}: {value} is out of range -100 to 250", field)
    answers = [agent.Retry("down"), rejected(300), rejected(301), rejected(302), agent.Retry("down"), None]
    sleeps = []

    class Pusher:
        def push(self, payload):
            answer = answers.pop(0)
            if answer:
                raise answer
    agent.run_loop(agent.SimulatedReader(1), Pusher(), 2, clock=lambda: 0.0, sleep=sleeps.append,
                   stop=lambda: not answers)
    assert 2 <= sleeps[0] < 4 and sleeps[1:4] == [2, 2, 2]  # the plain interval, no backoff
    assert 2 <= sleeps[4] < 4 and sleeps[5] == 2  # the failure count started over: a first failure again
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "rejected" in line] == [REJECTED]  # once, though the value moved
    assert lines[-1] == "sample rejection recovered"


@pytest.fixture
def answering():
    """A real HTTP server on port 0 that answers every POST with the status, body and headers set on it."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            status, body, headers = server.answer
            data = json.dumps(body).encode() if isinstance(body, dict) else body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json" if isinstance(body, dict) else "text/html")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # shutdown() waits for the loop's next look at its flag: each 0.5 s by default, each 0.05 s here.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status,body,headers,raised,message", [
    (400, {"error": REJECTED.split(": ", 1)[1], "field": "gpus[0].temperatureGpu"}, {}, agent.Rejected, REJECTED),
    (400, {"error": "gpus[1].index: 2 is used twice", "field": "gpus[1].index"}, {}, agent.Rejected,
     "server rejected the sample: gpus[1].index: 2 is used twice"),
    (413, {"error": "body is larger than MAX_BODY_BYTES (65536 bytes)"}, {}, agent.Rejected,
     "server rejected the sample (413): body is larger than MAX_BODY_BYTES (65536 bytes)"),
    (415, {"error": "Content-Type must be application/json"}, {}, agent.Rejected, "(415)"),
    (422, "<html>\n<h1>Unprocessable</h1>\n</html>", {}, agent.Rejected, "(422): <html> <h1>Unprocessable</h1>"),
    (401, {"error": "unknown device key"}, {}, agent.Refused, "refused the device key (401"),
    (403, {"error": "forbidden"}, {}, agent.Refused, "refused the device key (403"),
    (404, "<h1>Not Found</h1>", {}, agent.Refused, "should end in /push-sse"),
    (408, "timeout", {}, agent.Retry, "server answered 408"),
    (429, {"error": "rig-1 pushes faster than 5/s"}, {"Retry-After": "3"}, agent.Retry, "server answered 429"),
    (503, {"error": "busy"}, {}, agent.Retry, "server answered 503: busy"),
], ids=["400-field", "400-index", "413", "415", "422-html", "401", "403", "404", "408", "429", "503"])
def test_each_answer_is_a_rejected_sample_a_refusal_or_a_retry(answering, status, body, headers, raised, message):
    answering.answer = (status, body, headers)
    pusher = agent.Pusher(f"http://127.0.0.1:{answering.server_port}/push-sse", "k" * 20)
    with pytest.raises(raised) as error:
        pusher.push({"gpus": []})
    assert message in str(error.value) and "\n" not in str(error.value)
    if status == 429:
        assert error.value.after == 3


def account(name, uid, shell="/bin/bash"):
    import pwd
    return pwd.struct_passwd((name, "x", uid, uid, "", f"/home/{name}", shell))


def test_a_key_on_the_command_line_is_warned_about_where_other_users_can_read_it():
    # Issue 20: the key sat in `ps` and /proc/<pid>/cmdline for every local user to read.
    accounts = [account("root", 0), account("daemon", 1, "/usr/sbin/nologin"), account("me", 1000),
                account("alice", 1001), account("svc", 1002, "/bin/false"), account("nobody", 65534)]
    assert agent.other_users(accounts, uid=1000, platform="linux") == ["alice"]
    assert agent.other_users(accounts[:3], uid=1000, platform="linux") == []
    assert agent.other_users([account("me", 501), account("bob", 502)], uid=501, platform="darwin") == ["bob"]
    assert agent.key_on_command_line(["--url", "http://x/push-sse", "--key", "k" * 20])
    assert agent.key_on_command_line(["--key=" + "k" * 20])
    assert not agent.key_on_command_line(["--url", "http://x/push-sse", "--once"])


def test_the_agent_warns_once_when_its_key_is_a_flag_on_a_shared_machine(monkeypatch, caplog, capsys):
    monkeypatch.setattr(agent, "other_users", lambda: ["alice", "bob"])
    assert agent.main(["--dry-run", "--simulate", "1", "--key", "k" * 20], environ={}) == 0
    warnings = [r.getMessage() for r in caplog.records if "--key puts the device key" in r.getMessage()]
    assert warnings == ["--key puts the device key where every user of this machine can read it (ps; here: "
                        "alice, bob): put DEVICE_KEY=... in a .env beside agent.py (chmod 600), or in the "
                        "environment, instead"]
    caplog.clear()
    assert agent.main(["--dry-run", "--simulate", "1"], environ={"DEVICE_KEY": "k" * 20}) == 0
    assert "--key puts" not in caplog.text

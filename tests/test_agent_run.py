"""The real agent process: settings, --once, failures, and pushes to the real server."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import agent
from agent_fakes import DRIVER_NOT_LOADED, L40S, RTX2080S, FakeSmi
from conftest import KEYS, ROOT


@pytest.fixture
def smi(tmp_path, monkeypatch):
    return FakeSmi(tmp_path, monkeypatch)


def run_agent(*args, env=None, cwd=ROOT, script=None, timeout=30):
    environ = {k: v for k, v in os.environ.items() if k not in ("PUSH_URL", "DEVICE_KEY", "DROPLET_PUSH_URL")}
    return subprocess.run([sys.executable, str(script or ROOT / "agent.py"), *args], cwd=cwd,
                          env={**environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def stop_agent(process, log, wait_for):
    """Give the agent up to 5 s to log `wait_for`, then stop it; return its whole log.

    Viewers get an event before the agent gets its answer, so its line can come later.
    """
    path = Path(log.name)
    deadline = time.monotonic() + 5
    while wait_for not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
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
    # No GPU driver here: nvidia-ml-py cannot load libnvidia-ml, so auto falls back.
    result = run_agent("--once", "--dry-run")
    assert result.returncode == 0 and json.loads(result.stdout)["agent"]["backend"] == "gputil"


def test_once_with_driver_not_loaded_exits_nonzero_with_one_line(smi):
    smi.set(fail=DRIVER_NOT_LOADED)
    result = run_agent("--once", "--url", "http://127.0.0.1:9/push-sse", "--key", "k" * 20, "--backend", "gputil")
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
        time.sleep(2)  # the agent backs off meanwhile
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
        time.sleep(1.5)
        smi.set(gpus=[L40S])
        recovered = stream.until(lambda e: e["data"].get("gpus"), timeout=10)
        assert recovered["data"]["gpus"][0]["name"] == "NVIDIA L40S" and recovered["data"]["error"] is None
    finally:
        text = stop_agent(process, log, "GPU reading recovered")
    assert text.count("cannot read GPUs") == 1 and "GPU reading recovered" in text


# ---- backoff, as pure functions ---------------------------------------------------------------

def test_backoff_grows_with_jitter_up_to_the_cap_and_honours_retry_after():
    assert [agent.backoff_s(n, 2, rng=lambda: 1.0) for n in (1, 2, 3, 4, 10)] == [4, 8, 16, 30, 30]
    assert agent.backoff_s(1, 2, rng=lambda: 0.0) == 2  # jitter: half to all of the step
    assert agent.backoff_s(1, 2, retry_after=7, rng=lambda: 0.0) == 7


def test_loop_retries_after_retry_after_and_takes_a_fresh_sample_each_time():
    answers = [agent.Retry("429", after=7), agent.Retry("down"), None, None]
    sleeps, sent = [], []

    class Backend(agent.SimulatedBackend):
        def sample(self):
            return [{"index": 0, "utilizationGpu": len(sent)}]

    class Pusher:
        def push(self, payload):
            sent.append(payload["gpus"][0]["utilizationGpu"])
            answer = answers.pop(0)
            if answer:
                raise answer
    agent.run_loop(Backend(1), Pusher(), 2, clock=lambda: 0.0, sleep=sleeps.append, stop=lambda: not answers)
    assert sleeps[0] >= 7 and 2 <= sleeps[1] <= 8 and sleeps[2] == 2
    assert sent == [0, 1, 2, 3]  # every try sends a new sample: no backlog, no resend

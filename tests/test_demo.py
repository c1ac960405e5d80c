"""`make demo` and `make run` as a new user runs them: their own history, and Ctrl-C that stops in a few lines (issue 30)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from conftest import ROOT, free_port, multi, wait_for


def make_env():
    """Return a user's plain environment: no outer make's flags, no setting another test made for its servers."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")}


def ctrl_c(process):
    """Send SIGINT to the process's whole group, as a terminal's Ctrl-C does; return its output once it ends."""
    if process.poll() is not None:
        return ""
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=15)
    return output


def health(port):
    """Return the server's /healthz, or None while it does not answer yet."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).json()
    except (requests.ConnectionError, requests.Timeout):  # a worker still loading the app answers late
        return None


def test_make_demo_keeps_its_own_history_and_ctrl_c_stops_it_without_a_traceback(tmp_path):
    port, history = free_port(), tmp_path / "demo-history.sqlite3"
    venv = ROOT / ".venv" if (ROOT / ".venv").exists() else Path(sys.executable).parent.parent
    env = {**make_env(), "PORT": str(port), "DEMO_HISTORY_DB": str(history), "ENV_FILE": os.devnull}
    demo = subprocess.Popen(["make", "demo", f"VENV={venv}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for(lambda: demo.poll() is not None or (health(port) or {}).get("online") == 3, timeout=30, interval=0.3)
        assert demo.poll() is None, demo.communicate()[0][-3000:]
        assert health(port)["devices"] == 3
        wait_for(lambda: history.exists(), timeout=5)  # the demo's own file, not the HISTORY_DB make run serves
    finally:
        output = ctrl_c(demo)
    assert "Traceback" not in output and "SystemExit" not in output, output[-3000:]
    assert demo.returncode in (0, 2, -signal.SIGINT)
    dry = subprocess.run(["make", "-n", "demo", f"VENV={venv}"], cwd=ROOT, env=make_env(), capture_output=True,
                         text=True, timeout=30).stdout
    assert 'HISTORY_DB="${DEMO_HISTORY_DB:-demo-history.sqlite3}"' in dry  # by default too


def test_ctrl_c_on_the_server_stops_it_without_a_traceback(start_server):
    server = start_server()
    stream = subprocess.Popen([sys.executable, "-c", "import requests, sys; r = requests.get(sys.argv[1], stream=True, "
                               "timeout=30); [None for _ in r.iter_content(64)]", server.url + "/gpu/stream"])
    for _ in range(3):
        server.push(multi())
    time.sleep(0.5)  # a viewer connected: a stream never ends by itself
    started = time.monotonic()
    os.killpg(server.process.pid, signal.SIGINT)
    server.process.wait(10)
    took = time.monotonic() - started
    stream.kill()
    output = server.output()
    assert "Traceback" not in output and "SystemExit" not in output, output[-3000:]
    assert took < 4, f"took {took:.1f} s"

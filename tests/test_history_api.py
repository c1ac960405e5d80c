"""GET /api/history and /api/history.csv on the real server, with history on SQLite or in Redis."""
import csv
import io
import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import PRIVATE, ROOT, gpu, multi, procfile_command, wait_for
from gpustats.history.routes import SharedAnswers, safe_cell

pytestmark = pytest.mark.both_backends
CSV_HEADER = ["device", "gpu", "uuid", "name", "t", "time", "utilizationGpu", "memoryUsed", "temperatureGpu",
              "powerDraw", "energyWh", "cpuPercent", "systemMemoryUsed", "netRx", "netTx"]


def history(server, path="/api/history", **params):
    return requests.get(server.url + path, params={"device": "rig-1", **params}, timeout=10)


def written(server, points, **params):
    """Return the history once its GPU 0 has `points` buckets (writes land once a second)."""
    found = {}

    def ready():
        answer = history(server, **params).json()
        found.update(answer)
        return answer["gpus"] and len(answer["gpus"][0]["t"]) >= points
    wait_for(ready, timeout=10, interval=0.1)
    return found


def test_pushes_come_back_as_history_of_each_gpu(server):
    for util in (10, 20, 30):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util), gpu(1, powerDraw=None)))
    answer = written(server, 3)
    assert answer["device"] == "rig-1" and answer["step"] == 1 and answer["to"] - answer["from"] == 600
    first, second = answer["gpus"]
    assert (first["index"], first["name"], first["uuid"]) == (0, "NVIDIA GeForce RTX 3080", gpu(0)["uuid"])
    assert first["utilizationGpu"] == [10, 20, 30] and first["temperatureGpu"] == [65] * 3
    assert all(b - a >= 1 for a, b in zip(first["t"], first["t"][1:]))
    assert 0 < first["energyWh"] < 220.5 * 5 / 3600  # 220.5 W for the 1-3 s between the pushes
    assert second["powerDraw"] == [None] * 3 and second["energyWh"] == 0


def test_the_csv_opens_in_pythons_csv_module_with_one_row_per_gpu_and_bucket(server):
    for util in (10, 20):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util, name="=cmd|' /C calc'!A0")))
    written(server, 2)
    answer = history(server, "/api/history.csv")
    assert answer.headers["Content-Type"].startswith("text/csv")
    assert 'filename="history-rig-1.csv"' in answer.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert list(rows[0]) == CSV_HEADER and len(rows) == 2
    assert [int(r["utilizationGpu"]) for r in rows] == [10, 20] and rows[0]["temperatureGpu"] == "65"
    assert rows[0]["time"].endswith("Z") and rows[0]["name"].startswith("'=")  # no formula in a spreadsheet


def test_the_host_comes_back_as_the_devices_system_in_json_and_csv(server):
    for cpu in (12.5, 40):
        server.push_as_new_history_point({**multi(gpu(0)), "system": {
            "cpuPercent": cpu, "memoryTotal": 65536, "memoryUsed": 30000, "netRx": 1250000.5, "netTx": None,
            "disks": [{"mount": "/", "total": 1000, "used": 500}]}})
    answer = written(server, 2)
    assert answer["system"] == {"t": answer["gpus"][0]["t"], "cpuPercent": [12.5, 40], "memoryUsed": [30000] * 2,
                                "netRx": [1250000] * 2, "netTx": [None] * 2}
    rows = list(csv.DictReader(io.StringIO(history(server, "/api/history.csv").text)))
    gpus, hosts = rows[:2], rows[2:]
    assert [r["gpu"] for r in rows] == ["0", "0", "system", "system"] and list(rows[0]) == CSV_HEADER
    assert [r["cpuPercent"] for r in hosts] == ["12.5", "40"] and hosts[0]["systemMemoryUsed"] == "30000"
    assert hosts[0]["netTx"] == "" and hosts[0]["utilizationGpu"] == "" and hosts[0]["energyWh"] == ""
    assert gpus[0]["cpuPercent"] == "" and gpus[0]["utilizationGpu"] == "80"


def test_a_device_that_sends_no_host_has_no_system_in_its_history(server):
    server.push_as_new_history_point(multi(gpu(0)))
    assert "system" not in written(server, 1)


@pytest.mark.no_backend
@pytest.mark.parametrize("name", ["=1+1", "+1", "-1", "@SUM(A1)", " =1+1", "\u3000=1+1", "\uff1d1+1", "\uff0b1",
                                  "\u3000\uff20SUM(A1)", "\t=1", "\r=1", " \t-1"])
def test_a_cell_a_spreadsheet_would_run_as_a_formula_is_guarded(name):
    # Issue 20: a space, U+3000 or a full-width ＝ before the formula sign got no guard.
    assert safe_cell(name) == "'" + name


@pytest.mark.no_backend
@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3080", "", "a=b", " GPU", "\u3000GPU", "1-2"])
def test_ordinary_names_are_left_as_they_are(name):
    assert safe_cell(name) == name


def test_history_survives_a_restart_even_what_was_pushed_just_before_it(server):
    for util in (41, 42):
        server.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    server.restart()  # at once: the second push may still be queued, and is written as the worker exits
    assert written(server, 2)["gpus"][0]["utilizationGpu"] == [41, 42]


@pytest.mark.no_backend
def test_a_bad_parameter_is_400_naming_it(server):
    for query, field in [
            ({"device": ""}, "device"), ({"from": "yesterday"}, "from"), ({"to": "1e9"}, "to"), ({"to": "nan"}, "to"),
            ({"from": "1800000000", "to": "1700000000"}, "from"), ({"step": "0"}, "step"), ({"step": "1.5"}, "step"),
            ({"from": "1000000000", "to": "1700000000", "step": "60"}, "step")]:
        for path in ("/api/history", "/api/history.csv"):
            answer = history(server, path, **query)
            assert answer.status_code == 400 and answer.json()["field"] == field, (query, answer.text)


@pytest.mark.no_backend
def test_an_unknown_device_is_404_and_a_known_silent_one_has_no_gpus(server):
    assert history(server, device="nobody").status_code == 404
    answer = history(server, device="rig-9")
    assert answer.status_code == 200 and answer.json()["gpus"] == []


@pytest.mark.no_backend
def test_history_needs_the_dashboard_login(start_server):
    server = start_server(DASHBOARD_PASSWORD="s3cret", **PRIVATE)
    assert history(server).status_code == 401
    assert requests.get(server.url + "/api/history", params={"device": "rig-1"}, auth=("admin", "s3cret"),
                        timeout=5).status_code == 200


@pytest.mark.no_backend  # Redis' own: two servers share it
def test_every_server_answers_the_same_history(redis_server, start_server):
    a, b = start_server(REDIS_URL=redis_server.url), start_server(REDIS_URL=redis_server.url)
    for util in (7, 8, 9):
        a.push_as_new_history_point(multi(gpu(0, utilizationGpu=util)))
    assert written(b, 3)["gpus"][0]["utilizationGpu"] == [7, 8, 9]
    assert history(a).json()["gpus"] == history(b).json()["gpus"]


def _start(history_db):
    env = {**os.environ, "ENV_FILE": os.devnull, "PORT": "0", "HISTORY_DB": str(history_db),
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    return subprocess.run(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.no_backend
def test_a_corrupt_or_unwritable_history_db_stops_the_server_with_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"SQLite format 3\x00" + os.urandom(4096))
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    for path in (corrupt, not_a_folder / "history.sqlite3", tmp_path):
        result = _start(path)
        assert result.returncode != 0
        errors = [line for line in result.stderr.splitlines() if "config error" in line]
        assert len(errors) == 1 and f"HISTORY_DB: cannot use {path} as the history database" in errors[0], result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.no_backend
def test_the_same_query_in_the_same_second_is_answered_once_for_everyone_asking():
    shared, computed, answers = SharedAnswers(), [], []

    def compute():
        computed.append(1)
        time.sleep(0.2)  # a slow query: the others arrive while it runs
        return b"answer"
    threads = [threading.Thread(target=lambda: answers.append(shared.get(("q",), 100, compute))) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [b"answer"] * 20 and len(computed) == 1
    assert shared.get(("q",), 101, lambda: b"next second") == b"next second"  # a second later: asked again

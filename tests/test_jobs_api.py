"""GET /api/jobs, /api/usage and their CSV, in-process with Flask's test client, on SQLite and on Redis."""
import csv
import io
import time

import pytest

from conftest import KEYS, PRIVATE, gpu, multi, wait_for
from gpustats.ingest.payload import PROCESS_FIELDS
from gpustats.jobs.report import JOB_FIELDS
from gpustats.jobs.routes import CSV_HEADER
from test_access import client, sign_in

pytestmark = pytest.mark.both_backends


@pytest.fixture
def make_app(make_app, backend, request):
    """Build apps in this process (on one Redis when `backend` says), history and jobs in a scratch file."""
    shared = {"REDIS_URL": request.getfixturevalue("redis_server").url} if backend == "redis" else {}
    return lambda **settings: make_app(**{"PUSH_RATE_LIMIT": "1000", **shared, **settings})


def push(c, *gpus, device="rig-1", key=None):
    answer = c.post("/push-sse", json=multi(*gpus), headers={"Authorization": f"Bearer {key or KEYS[device]}"})
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer


def on_gpu(index, *processes, **fields):
    return gpu(index, processes=list(processes), **fields)


def get(c, path, **params):
    """GET `path` and read the whole answer, then close it as a server does once it is sent: its slot is given back."""
    answer = c.get(path, query_string=params)
    answer.get_data()
    answer.close()
    return answer


def jobs(c, count, path="/api/jobs", **params):
    """Return the jobs once `count` are there (the tracker writes once a second)."""
    return wait_for(lambda: len(found := get(c, path, **params).json["jobs"]) >= count and found,
                    timeout=10, what=f"{count} jobs")


def test_the_processes_of_pushes_become_jobs_named_by_process_and_first_sighting(make_app):
    c = make_app().test_client()
    train = {"pid": 4242, "name": "python3", "memoryUsed": 20_000, "user": "alice"}
    before = time.time()
    push(c, on_gpu(0, train), on_gpu(1, train))
    seen = time.time()
    time.sleep(0.2)
    push(c, on_gpu(0, train), on_gpu(1, train))
    [job] = wait_for(lambda: (found := jobs(c, 1)) and found[0]["durationS"] is not None and found, timeout=10)
    assert list(job) == list(JOB_FIELDS)
    assert (job["device"], job["gpus"], job["pid"], job["name"], job["command"], job["user"], job["ended"]) == (
        "rig-1", [0, 1], 4242, "python3", "python3", "alice", None)
    assert before - 0.01 <= job["startedAt"] <= seen + 0.01 and job["endedAt"] is None  # kept to 0.01 s
    assert job["peakMemory"] == 40_000 and job["meanUtilization"] == 80
    push(c, on_gpu(0), on_gpu(1))
    ended = wait_for(lambda: (found := jobs(c, 1))[0]["ended"] and found[0], timeout=10)
    assert ended["ended"] == "exited" and ended["endedAt"] >= job["startedAt"] and ended["gpuHours"] > 0
    assert get(c, "/api/jobs", running="1").json == {"jobs": []}


# The agent's command and startedAt reach the server once the push's validation keeps them (issue 33, point 1).
@pytest.mark.skipif(not {"command", "startedAt"} <= set(PROCESS_FIELDS),
                    reason="the push's validation does not keep a process' command and startedAt yet")
def test_a_process_command_and_start_from_the_agent_name_the_job(make_app):
    c = make_app().test_client()
    started = int(time.time()) - 3600
    train = {"pid": 7, "name": "python3", "memoryUsed": 1000, "user": "alice", "command": "python3 train.py",
             "startedAt": started}
    push(c, on_gpu(0, train))
    [job] = jobs(c, 1)
    assert (job["command"], job["startedAt"], job["id"]) == ("python3 train.py", started, f"rig-1:7:{started}")
    assert job["durationS"] >= 3600


def test_the_csv_has_a_header_and_a_row_a_job_with_nothing_a_spreadsheet_runs(make_app):
    c = make_app().test_client()
    push(c, on_gpu(0, {"pid": 1, "name": "=cmd|' /C calc'!A0", "memoryUsed": 10, "user": "+bob"}))
    jobs(c, 1)
    answer = get(c, "/api/jobs.csv")
    assert answer.content_type.startswith("text/csv") and 'filename="jobs.csv"' in answer.headers["Content-Disposition"]
    [row] = list(csv.DictReader(io.StringIO(answer.get_data(as_text=True))))
    assert list(row) == list(CSV_HEADER) and set(CSV_HEADER) - {"startTime", "endTime"} == set(JOB_FIELDS)
    assert (row["device"], row["gpus"], row["pid"], row["user"]) == ("rig-1", "0", "1", "'+bob")
    assert row["name"].startswith("'=") and row["command"].startswith("'=") and row["startTime"].endswith("Z")
    assert row["endedAt"] == row["endTime"] == row["ended"] == ""


def test_usage_adds_up_per_user_and_per_device(make_app):
    app = make_app()
    c = app.test_client()
    alice, bob = {"pid": 1, "name": "python3", "memoryUsed": 1000, "user": "alice"}, \
        {"pid": 2, "name": "python3", "memoryUsed": 3000, "user": "bob"}
    for _ in range(3):
        push(c, on_gpu(0, alice), on_gpu(1, bob))
        push(c, on_gpu(0, bob), device="rig-2")
        time.sleep(0.3)
    # Every push is in the fleet (and the Redis stream) once answered; a flush tracks and writes them all,
    # as a worker does as it stops (with Redis, running jobs' figures are otherwise written every 10 s).
    app.extensions["gpustats"]["jobs"].flush()
    answer = get(c, "/api/usage").json
    assert set(answer) == {"from", "to", "by", "rows"} and answer["by"] == "user"
    assert round(answer["to"] - answer["from"]) == 7 * 86400
    rows = {row["key"]: row for row in answer["rows"]}
    assert set(rows) == {"alice", "bob"} and rows["bob"]["jobs"] == 2 and rows["alice"]["jobs"] == 1
    assert list(rows["bob"]) == ["key", "jobs", "gpuHours", "energyWh", "meanUtilization", "peakMemory"]
    assert rows["bob"]["peakMemory"] == 3000 and rows["alice"]["gpuHours"] > 0
    assert rows["bob"]["energyWh"] > 1.5 * rows["alice"]["energyWh"] > 0  # two jobs as long as alice's one
    by_device = get(c, "/api/usage.csv", by="device")
    table = list(csv.reader(io.StringIO(by_device.get_data(as_text=True))))
    assert table[0] == ["device", "jobs", "gpuHours", "energyWh", "meanUtilization", "peakMemory"]
    assert sorted((row[0], row[1]) for row in table[1:]) == [("rig-1", "2"), ("rig-2", "1")]


@pytest.mark.parametrize("path", ["/api/jobs", "/api/jobs.csv", "/api/usage", "/api/usage.csv"])
@pytest.mark.parametrize("params, field", [
    ({"from": "yesterday"}, "from"), ({"to": "1e9"}, "to"), ({"from": "1800000000", "to": "1700000000"}, "from"),
    ({"device": "rig 1"}, "device"), ({"device": "rig-1,../x"}, "device"), ({"running": "yes"}, "running"),
    ({"user": "x" * 129}, "user")])
def test_a_bad_parameter_is_answered_400_naming_it(make_app, path, params, field):
    answer = get(make_app().test_client(), path, **params)
    assert answer.status_code == 400 and answer.json["field"] == field and answer.json["ok"] is False


@pytest.mark.no_backend
def test_usage_is_by_user_or_device_and_nothing_else(make_app):
    answer = get(make_app().test_client(), "/api/usage", by="gpu")
    assert answer.status_code == 400 and answer.json["field"] == "by"
    assert get(make_app().test_client(), "/api/jobs", by="gpu").status_code == 200  # not its own


def test_jobs_need_a_sign_in_and_a_share_link_sees_its_devices_jobs_alone(make_app):
    app = make_app(**PRIVATE)
    for device in ("rig-1", "rig-2"):
        push(client(app), on_gpu(0, {"pid": 1, "name": "python3", "memoryUsed": 10, "user": device}), device=device)
    for path in ("/api/jobs", "/api/jobs.csv", "/api/usage", "/api/usage.csv"):
        assert client(app).get(path).status_code == 401, path
    admin = client(app)
    token = sign_in(admin)
    jobs(admin, 2)
    link = admin.post("/api/shares", json={"name": "lab-tv", "devices": ["rig-1"]}, headers={"X-CSRF-Token": token})
    tv = client(app)
    assert get(tv, f"/s/{link.json['url'].rsplit('/', 1)[1]}").status_code == 303
    assert [job["device"] for job in get(tv, "/api/jobs").json["jobs"]] == ["rig-1"]
    assert [row["key"] for row in get(tv, "/api/usage").json["rows"]] == ["rig-1"]
    assert get(tv, "/api/jobs", device="rig-2").status_code == 404  # as if it did not exist
    assert len(get(tv, "/api/jobs.csv").get_data(as_text=True).splitlines()) == 2


def test_a_device_removed_with_its_history_takes_its_jobs_along(make_app):
    app = make_app(**PRIVATE)
    admin = client(app)
    token = sign_in(admin)
    key = admin.post("/api/devices", json={"name": "old-pc"}, headers={"X-CSRF-Token": token}).json["key"]
    push(client(app), on_gpu(0, {"pid": 1, "name": "python3", "memoryUsed": 10}), key=key)
    push(client(app), on_gpu(0, {"pid": 2, "name": "python3", "memoryUsed": 10}))
    jobs(admin, 2)
    removed = admin.delete("/api/devices/old-pc?history=delete", headers={"X-CSRF-Token": token})
    assert removed.status_code == 200
    time.sleep(1.5)  # a tracker round or two: nothing of it comes back
    assert [job["device"] for job in get(admin, "/api/jobs").json["jobs"]] == ["rig-1"]


@pytest.mark.no_backend  # Redis' own: two hosts share it
def test_every_host_answers_the_same_jobs(make_app, redis_server):
    hosts = [make_app(REDIS_URL=redis_server.url).test_client() for _ in range(2)]
    push(hosts[0], on_gpu(0, {"pid": 1, "name": "python3", "memoryUsed": 10, "user": "alice"}))
    push(hosts[1], on_gpu(0, {"pid": 5, "name": "python3", "memoryUsed": 10, "user": "bob"}), device="rig-2")
    seen = [sorted(job["user"] for job in jobs(host, 2)) for host in hosts]
    assert seen == [["alice", "bob"], ["alice", "bob"]]  # tracked once, by whichever worker holds the lease

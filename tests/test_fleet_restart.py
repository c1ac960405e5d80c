"""A restart forgets no PC: each device's last state comes back, on both backends (issue 30)."""
import pytest

from conftest import PRIVATE, Admin, gpu, host_system, multi, wait_for

pytestmark = pytest.mark.both_backends
FAST = {"ALERT_FOR_S": "0", "PUSH_RATE_LIMIT": "1000"}


def test_a_pc_down_at_a_deploy_is_shown_as_it_last_was(start_server):
    server = start_server(**PRIVATE, **FAST, STALE_AFTER_S="1", OFFLINE_AFTER_S="2")
    server.push(multi(gpu(0, utilizationGpu=87, temperatureGpu=71), host="rig-1"), device="rig-1")
    server.push(multi(gpu(0, utilizationGpu=3), host="rig-2"), device="rig-2")
    admin = Admin(server)

    def offline():
        return sorted(a["device"] for a in admin.get("/api/alerts").json()["active"] if a["alertname"] == "DeviceOffline")
    wait_for(lambda: offline() == ["rig-1", "rig-2"], timeout=10)
    server.push(multi(gpu(0, utilizationGpu=88, temperatureGpu=72), host="rig-1"), device="rig-1")
    wait_for(lambda: offline() == ["rig-2"], timeout=5)
    server.restart()  # rig-2 has been offline (alerted), rig-1 pushed just now and never comes back
    admin = Admin(server)  # signed in afresh after the restart
    assert admin.get("/healthz").json()["devices"] == 2
    listed = {d["name"]: d for d in admin.get("/api/devices").json()}
    assert listed["rig-1"]["lastPushAt"] is not None and listed["rig-1"]["status"] != "never pushed"
    assert listed["rig-2"]["status"] == "offline"
    assert listed["rig-3"]["status"] == "never pushed"  # a key that never pushed stays so
    wait_for(lambda: offline() == ["rig-1", "rig-2"], timeout=10)  # rig-1's fires again after the restart
    shown = {d["name"]: d for d in admin.get("/api/devices").json()}
    assert shown["rig-1"]["status"] == "offline"


def test_the_snapshot_after_a_restart_holds_the_last_values(start_server):
    server = start_server(**FAST)
    server.push(multi(gpu(0, utilizationGpu=87, temperatureGpu=71), host="rig-1"), device="rig-1")
    wait_for(lambda: server.health()["devices"] == 1)
    server.restart()
    (event,) = server.snapshot()
    assert event["device"] == "rig-1" and event["gpus"][0]["utilizationGpu"] == 87
    assert event["gpus"][0]["temperatureGpu"] == 71 and event["host"] == "rig-1"


def test_a_restarted_server_shows_each_pcs_host_until_its_next_push(start_server):
    server = start_server(**FAST)
    system = host_system(cpuPercent=12.5, disks=[{"mount": "/data", "total": 1000, "used": 960}])
    server.push({**multi(gpu(0), host="rig-1"), "system": system}, device="rig-1")
    wait_for(lambda: server.health()["devices"] == 1)
    server.restart()
    (event,) = server.snapshot()
    assert event["system"] == system


def test_kept_states_the_server_did_not_write_are_left_out_and_start_up_goes_on(make_app, tmp_path, caplog):
    # A review found that a row that is not JSON, or JSON that is not an event, stopped the start.
    import sqlite3
    path = tmp_path / "history.sqlite3"
    make_app(HISTORY_DB=str(path))  # makes the file and its tables
    with sqlite3.connect(path) as db:
        db.executemany("INSERT INTO device VALUES (?, ?)", [
            ("rig-1", "not json"), ("rig-2", "[1, 2]"), ("rig-3", "null"), ("rig-4", '{"device": "rig-4"}'),
            ("rig-5", '{"device": "rig-5", "receivedAt": 1, "gpus": [1]}'),
            ("rig-6", '{"device": "rig-6", "receivedAt": 1, "status": "offline", "gpus": [{"index": 0}]}')])
    client = make_app(HISTORY_DB=str(path)).test_client()
    assert client.get("/healthz").json["devices"] == 1  # rig-6 alone
    assert client.get("/metrics").status_code == 200
    assert sum("is not one the server wrote" in r.getMessage() for r in caplog.records) == 5

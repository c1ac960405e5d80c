"""Alerts end to end on a real server: /api/alerts, `event: alert`, webhooks, restarts; one contract, both backends."""
import os
import re
import signal
import time

import pytest
import requests

from conftest import PRIVATE, Server, Stream, gpu, host_system, multi, wait_for
from receiver import receiver  # noqa: F401 a fixture

pytestmark = pytest.mark.both_backends
FAST = {"ALERT_FOR_S": "0", "ALERT_TEMP_C": "80", "PUSH_RATE_LIMIT": "1000"}


def alerts(server):
    answer = requests.get(server.url + "/api/alerts", timeout=5)
    assert answer.status_code == 200
    return answer.json()


def is_alert(status, name="GpuHot"):
    return lambda e: e["event"] == "alert" and e["data"]["alertname"] == name and e["data"]["status"] == status


def test_a_hot_gpu_fires_resolves_and_is_sent_once_each_way(start_server, open_stream, receiver):
    server = start_server(**FAST, ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    stream = open_stream(server)
    assert server.push(multi(gpu(0), gpu(1, temperatureGpu=91))).status_code == 200
    fired = stream.until(is_alert("firing"))["data"]
    assert (fired["device"], fired["gpu"], fired["value"], fired["endsAt"]) == ("rig-1", 1, 91, None)
    assert alerts(server)["active"] == [fired]

    assert server.push(multi(gpu(0), gpu(1, temperatureGpu=70))).status_code == 200
    resolved = stream.until(is_alert("resolved"))["data"]
    assert resolved["fingerprint"] == fired["fingerprint"] and resolved["endsAt"] >= fired["startsAt"]
    view = alerts(server)
    assert view["active"] == [] and view["recent"] == [resolved]

    sent = wait_for(lambda: len(receiver.bodies("/hook")) == 2 and receiver.bodies("/hook"))
    assert [(b["status"], b["alerts"][0]["labels"]["gpu"], b["alerts"][0]["endsAt"]) for b in sent] == [
        ("firing", "1", "0001-01-01T00:00:00Z"), ("resolved", "1", resolved["endsAt"])]
    assert all(b["version"] == "4" and b["receiver"] == "gpustats" for b in sent)


def test_a_full_pc_fires_one_memory_alert_and_one_per_full_disk_each_sent_with_its_mount(start_server, receiver):
    server = start_server(**FAST, ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    full = host_system(memoryUsed=1_500_000, disks=[{"mount": "/", "total": 1000, "used": 990},
                                                    {"mount": "/data", "total": 1000, "used": 960},
                                                    {"mount": "/home", "total": 1000, "used": 10}])
    assert server.push({**multi(gpu(0)), "system": full}).status_code == 200
    active = wait_for(lambda: len(found := alerts(server)["active"]) == 3 and found)
    by_name = sorted((a["alertname"], a.get("mount"), a["value"]) for a in active)
    assert by_name == [("DiskFull", "/", 99), ("DiskFull", "/data", 96), ("HostMemoryFull", None, 96.9)]
    assert not any("gpu" in a for a in active)
    sent = wait_for(lambda: len(receiver.bodies("/hook")) == 3 and receiver.bodies("/hook"))
    assert sorted(b["alerts"][0]["labels"].get("mount", "") for b in sent) == ["", "/", "/data"]
    assert server.push({**multi(gpu(0)), "system": host_system()}).status_code == 200
    wait_for(lambda: alerts(server)["active"] == [])


def test_a_quiet_device_is_an_offline_alert_until_its_next_push(start_server, open_stream):
    server = start_server(**FAST, STALE_AFTER_S="0.2", OFFLINE_AFTER_S="0.5")
    stream = open_stream(server)
    server.push(multi())
    fired = stream.until(is_alert("firing", "DeviceOffline"), timeout=5)["data"]
    assert "gpu" not in fired and fired["summary"].startswith("rig-1 is offline")
    assert [a["alertname"] for a in alerts(server)["active"]] == ["DeviceOffline"]
    server.push(multi())
    stream.until(is_alert("resolved", "DeviceOffline"))
    view = alerts(server)  # it may be offline again by now (0.5 s): that is a new alert, with a new start
    assert fired["startsAt"] not in [a["startsAt"] for a in view["active"]]
    assert [a["status"] for a in view["recent"] if a["startsAt"] == fired["startsAt"]] == ["resolved"]


def test_a_firing_alert_survives_a_restart_and_is_not_sent_again(start_server, receiver):
    server = start_server(**FAST, ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    server.push(multi(gpu(0, temperatureGpu=95)))
    wait_for(lambda: alerts(server)["active"])
    wait_for(lambda: receiver.bodies("/hook"))
    server.restart()  # right away: the state is saved as the worker exits
    assert [a["alertname"] for a in alerts(server)["active"]] == ["GpuHot"]
    server.push(multi(gpu(0, temperatureGpu=96)))
    server.push(multi(gpu(0, temperatureGpu=60)))
    wait_for(lambda: len(receiver.bodies("/hook")) == 2)
    assert [b["status"] for b in receiver.bodies("/hook")] == ["firing", "resolved"]


def kill_worker(server):
    """SIGKILL the worker, as the OOM killer or a crash would, and wait for gunicorn's next one."""
    old = server.worker_pid
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: server.worker_pid != old and server._healthy(server.port), timeout=20, interval=0.05)


def notifications_sent(server):
    """Return the worker's own count of alert notifications sent (gpustats_alert_notifications_total)."""
    text = requests.get(server.url + "/metrics", timeout=5).text
    found = re.search(r'^gpustats_alert_notifications_total\{result="sent"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0


def sent(receiver, status):
    return [r for r in receiver.at("/hook") if r["status"] == 200 and r["body"]["status"] == status]


@pytest.mark.no_backend  # with REDIS_URL the outbox is in Redis, kept in the alerter's own transaction
def test_an_alert_waiting_for_a_retry_is_sent_after_a_restart(start_server, receiver):
    # Issue 20: the outbox lived in memory: a receiver answering 503, an alert firing, then a
    # deploy, and it was never sent, nothing was logged, and /api/alerts still showed it active.
    receiver.script["/hook"] = [503] * 3
    server = start_server(**FAST, ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    server.push(multi(gpu(0, temperatureGpu=95)))
    wait_for(lambda: receiver.at("/hook"))  # refused once; the retry waits up to 2 s
    server.restart()
    assert "1 alert messages kept from before the restart wait to be sent" in server.output()
    wait_for(lambda: sent(receiver, "firing"), timeout=20, interval=0.1)
    server.push(multi(gpu(0, temperatureGpu=60)))
    wait_for(lambda: sent(receiver, "resolved"), timeout=10)
    assert len(sent(receiver, "firing")) == 1


@pytest.mark.no_backend
def test_a_worker_killed_right_after_a_firing_never_sends_it_twice(start_server, receiver):
    # Issue 20: the state was saved once a second, so a worker killed within that second forgot
    # the firing and fired again after its restart: three trials gave 4 firings for 3 resolutions.
    server = start_server(**FAST, ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    for trial in range(3):
        server.push(multi(gpu(0, temperatureGpu=95)))
        wait_for(lambda: len(sent(receiver, "firing")) > trial, interval=0.005)
        # Killed as soon as the worker counts the firing sent (its outbox has forgotten it by then):
        # well within the second the state waited before. A kill between the receiver's answer and
        # that sends it again: at least once, never lost (docs/API.md, Alerts). A fixed 50 ms was not
        # past it at the suite's load. A worker after the first also counts the last trial's resolution.
        wait_for(lambda: notifications_sent(server) >= (1 if trial == 0 else 2), interval=0.005)
        kill_worker(server)
        server.push(multi(gpu(0, temperatureGpu=96)))  # still hot: already firing, nothing new
        server.push(multi(gpu(0, temperatureGpu=60)))
        wait_for(lambda: len(sent(receiver, "resolved")) > trial, timeout=10)
    time.sleep(0.3)
    assert (len(sent(receiver, "firing")), len(sent(receiver, "resolved"))) == (3, 3)


def test_alerts_need_the_viewer_login(start_server):
    server = start_server(DASHBOARD_PASSWORD="s3cret-enough", **PRIVATE)
    assert requests.get(server.url + "/api/alerts", timeout=5).status_code == 401
    answer = requests.get(server.url + "/api/alerts", auth=("admin", "s3cret-enough"), timeout=5)
    assert answer.json() == {"active": [], "recent": []}


@pytest.mark.no_backend
def test_a_bad_webhook_url_stops_the_server_with_one_line_without_the_secret(tmp_path):
    server = Server({"ALERT_WEBHOOK_URLS": "discord+ftp://discord.com/api/webhooks/123/SECRET-TOKEN"}, tmp_path)
    with pytest.raises(RuntimeError) as failed:
        server.start()
    assert "ALERT_WEBHOOK_URLS" in str(failed.value) and "SECRET-TOKEN" not in str(failed.value)


def test_two_servers_on_one_redis_send_each_alert_once(redis_server, tmp_path, receiver):
    shared = {**FAST, "REDIS_URL": redis_server.url, "ALERT_WEBHOOK_URLS": receiver.url + "/hook"}
    servers = [Server(shared, tmp_path).start() for _ in range(2)]
    streams = [Stream(s.port) for s in servers]
    try:
        servers[0].push(multi(gpu(0, temperatureGpu=90)))
        for stream in streams:  # each viewer, on either host, sees it once
            stream.until(is_alert("firing"))
        servers[1].push(multi(gpu(0, temperatureGpu=60)))
        for stream in streams:
            stream.until(is_alert("resolved"))
        wait_for(lambda: len(receiver.bodies("/hook")) >= 2)
        time.sleep(1.5)  # a second alerter or sender would have sent by now: each runs once a second
        assert [b["status"] for b in receiver.bodies("/hook")] == ["firing", "resolved"]
        assert alerts(servers[0]) == alerts(servers[1])
    finally:
        for stream in streams:
            stream.close()
        for server in servers:
            server.kill()


def test_memory_held_on_an_idle_gpu_fires_naming_its_user_and_resolves_when_let_go(start_server, open_stream, receiver):
    server = start_server(**FAST, ALERT_IDLE_HELD_S="1", ALERT_IDLE_HELD_MIB="1024",
                          ALERT_WEBHOOK_URLS=receiver.url + "/hook")
    stream = open_stream(server)
    notebook = {"pid": 77, "name": "python3", "user": "bob", "memoryUsed": 41_062}
    idle = multi(gpu(0, utilizationGpu=0, processes=[notebook]))
    server.push(idle)
    time.sleep(1.1)
    server.push(idle)
    fired = stream.until(is_alert("firing", "GpuIdleHeld"))["data"]
    assert fired["summary"] == "bob's python3 holds 40.1 GiB on rig-1:0 at 0 % for 1 s"
    server.push(multi(gpu(0, utilizationGpu=0, processes=[])))
    resolved = stream.until(is_alert("resolved", "GpuIdleHeld"))["data"]
    assert resolved["summary"] == "bob's python3 let go of its memory on rig-1:0"
    sent = wait_for(lambda: len(receiver.bodies("/hook")) == 2 and receiver.bodies("/hook"))
    assert [b["alerts"][0]["annotations"]["summary"] for b in sent] == [fired["summary"], resolved["summary"]]

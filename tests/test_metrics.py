"""GET /metrics, read with prometheus_client's own parser: one contract, both backends, in-process."""
import os
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import KEYS, PRIVATE, gpu, host_system, multi, wait_for
from receiver import receiver  # noqa: F401 a fixture

pytestmark = pytest.mark.both_backends
MIB = 1024 * 1024
GPU_METRICS = ("utilization_ratio", "memory_used_bytes", "memory_total_bytes", "temperature_celsius",
               "power_draw_watts", "power_limit_watts", "fan_speed_ratio", "clock_core_hertz", "clock_memory_hertz")


@pytest.fixture
def make_app(make_app, backend, request):
    """Build apps in this process (on one Redis when `backend` says), history in memory (conftest's make_app)."""
    shared = {"REDIS_URL": request.getfixturevalue("redis_server").url} if backend == "redis" else {}
    return lambda **settings: make_app(**{"HISTORY_DB": "", "PUSH_RATE_LIMIT": "1000", **shared, **settings})


class Scrape:
    """One answer of /metrics, parsed: samples by name and labels."""

    def __init__(self, text):
        self.families = list(text_string_to_metric_families(text))
        self.samples = {(s.name, frozenset(s.labels.items())): s.value for f in self.families for s in f.samples}

    def value(self, metric, /, **labels):
        return self.samples.get((metric, frozenset(labels.items())))

    def of(self, device):
        """Return {(name, labels other than device): value} of every sample about `device`."""
        return {(name, frozenset((k, v) for k, v in labels if k != "device")): value
                for (name, labels), value in self.samples.items() if ("device", device) in labels}


def scrape(client, **kwargs):
    answer = client.get("/metrics", **kwargs)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    assert answer.content_type == "text/plain; version=0.0.4; charset=utf-8"
    return Scrape(answer.get_data(as_text=True))


def push(client, body, device="rig-1", key=None):
    return client.post("/push-sse", json=body, headers={"Authorization": f"Bearer {key or KEYS[device]}"})


def seen(client, device="rig-1", **labels):
    """Wait until a scrape shows `device` up (the Redis backend's mirror follows the stream), and return it."""
    return wait_for(lambda: (s := scrape(client)).value("gpustats_device_up", device=device) == 1 and s)


def test_a_push_is_one_sample_per_reported_value_in_base_units(make_app):
    client = make_app().test_client()
    before = time.time()
    assert push(client, multi(gpu(0), gpu(1, temperatureGpu=None, fanSpeed=None, powerDraw=None,
                                             error="Unknown Error"))).status_code == 200
    taken = time.time()
    metrics = seen(client)
    first = {"device": "rig-1", "gpu": "0", "uuid": gpu(0)["uuid"], "name": "NVIDIA GeForce RTX 3080"}
    assert {name: metrics.value(f"gpustats_gpu_{name}", **first) for name in GPU_METRICS} == {
        "utilization_ratio": 0.8, "memory_used_bytes": 6144 * MIB, "memory_total_bytes": 10240 * MIB,
        "temperature_celsius": 65, "power_draw_watts": 220.5, "power_limit_watts": 320, "fan_speed_ratio": 0.55,
        "clock_core_hertz": 1905e6, "clock_memory_hertz": 9501e6}
    assert metrics.value("gpustats_gpu_info", **first, driver="560.94", vendor="NVIDIA") == 1
    second = dict(first, gpu="1", uuid=gpu(1)["uuid"])
    # What the GPU did not report has no sample at all: a 0 would read as a cold, idle, unpowered GPU.
    for name in ("temperature_celsius", "fan_speed_ratio", "power_draw_watts"):
        assert metrics.value(f"gpustats_gpu_{name}", **second) is None
        assert ("gpustats_gpu_" + name) in {f.name for f in metrics.families}
    assert metrics.value("gpustats_gpu_utilization_ratio", **second) == 0.8
    assert metrics.value("gpustats_device_up", device="rig-1") == 1
    # receivedAt is rounded to the millisecond: half of one either way.
    assert before - 0.0005 <= metrics.value("gpustats_device_last_push_timestamp_seconds", device="rig-1") <= taken + 0.0005
    assert metrics.value("gpustats_pushes_total", code="200") == 1


def test_a_pushed_host_is_its_devices_host_samples_in_base_units_one_per_disk(make_app):
    client = make_app().test_client()
    system = host_system(temperatureCpu=None, netTx=None, disks=[{"mount": "/", "total": 1831420, "used": 620013},
                                                                 {"mount": "/data", "total": 1000, "used": None}])
    assert push(client, {**multi(gpu(0)), "system": system}).status_code == 200
    host = {(name, labels): value for (name, labels), value in seen(client).of("rig-1").items()
            if name.startswith("gpustats_host_")}
    assert host == {
        ("gpustats_host_cpu_utilization_ratio", frozenset()): 0.375,
        ("gpustats_host_memory_used_bytes", frozenset()): 402113 * MIB,
        ("gpustats_host_memory_total_bytes", frozenset()): 1547521 * MIB,
        ("gpustats_host_network_receive_bytes_per_second", frozenset()): 1250000.0,
        ("gpustats_host_disk_used_bytes", frozenset({("mount", "/")})): 620013 * MIB,
        ("gpustats_host_disk_total_bytes", frozenset({("mount", "/")})): 1831420 * MIB,
        ("gpustats_host_disk_total_bytes", frozenset({("mount", "/data")})): 1000 * MIB}  # no netTx, no /data used


def test_a_device_that_sends_no_host_has_no_host_samples(make_app):
    client = make_app().test_client()
    push(client, multi(gpu(0)))
    assert not [name for name, _ in seen(client).of("rig-1") if name.startswith("gpustats_host_")]


def test_a_seed_agent_push_has_empty_labels_for_what_it_did_not_send(make_app):
    client = make_app().test_client()
    assert push(client, {"name": "NVIDIA RTX 3080", "vendor": "NVIDIA", "temperatureGpu": 65}).status_code == 200
    metrics = seen(client)
    assert metrics.of("rig-1") == {
        ("gpustats_gpu_temperature_celsius", frozenset({("gpu", "0"), ("uuid", ""), ("name", "NVIDIA RTX 3080")})): 65,
        ("gpustats_gpu_info", frozenset({("gpu", "0"), ("uuid", ""), ("name", "NVIDIA RTX 3080"), ("driver", ""),
                                         ("vendor", "NVIDIA")})): 1,
        ("gpustats_device_up", frozenset()): 1,
        ("gpustats_device_last_push_timestamp_seconds", frozenset()):
            metrics.value("gpustats_device_last_push_timestamp_seconds", device="rig-1")}


def test_a_rejected_push_is_counted_by_its_code_and_changes_no_sample(make_app):
    client = make_app().test_client()
    assert push(client, multi(gpu(0, temperatureGpu=70))).status_code == 200
    before = seen(client)
    answers = [push(client, multi(gpu(0, temperatureGpu="hot"))).status_code,  # 400
               push(client, multi(gpu(0, temperatureGpu=99)), key="not-a-key").status_code,  # 401
               client.post("/push-sse", data="x", headers={"Authorization": f"Bearer {KEYS['rig-1']}"}).status_code]
    assert answers == [400, 401, 415]
    after = scrape(client)
    assert after.of("rig-1") == before.of("rig-1")
    assert {code: after.value("gpustats_pushes_total", code=code) for code in ("200", "400", "401", "415", "429")} == {
        "200": 1, "400": 1, "401": 1, "415": 1, "429": 0}


def test_a_cors_preflight_is_not_a_push(make_app):
    client = make_app().test_client()
    assert client.options("/push-sse", headers={"Origin": "https://example.com"}).status_code == 200
    assert set(scrape(client).samples.get(("gpustats_pushes_total", frozenset({("code", c)})))
               for c in ("200", "400", "401")) == {0}


def test_a_quiet_device_turns_down_then_keeps_only_its_up_sample(make_app):
    # 2 s between stale and offline: a scrape under CI's load once came only after both.
    client = make_app(STALE_AFTER_S="0.6", OFFLINE_AFTER_S="2.6").test_client()
    push(client, multi(gpu(0), gpu(1)))
    online = seen(client)
    stale = wait_for(lambda: (s := scrape(client)).value("gpustats_device_up", device="rig-1") == 0 and s)
    # Stale: the last values stand, marked down; a scrape may come before the next push.
    assert {k: v for k, v in stale.of("rig-1").items() if k[0] != "gpustats_device_up"} == {
        k: v for k, v in online.of("rig-1").items() if k[0] != "gpustats_device_up"}
    offline = wait_for(lambda: len((s := scrape(client)).of("rig-1")) == 1 and s, timeout=7)
    assert offline.of("rig-1") == {("gpustats_device_up", frozenset()): 0}
    push(client, multi(gpu(0)))
    back = seen(client)
    assert back.value("gpustats_gpu_info", device="rig-1", gpu="0", uuid=gpu(0)["uuid"],
                      name="NVIDIA GeForce RTX 3080", driver="560.94", vendor="NVIDIA") == 1
    assert back.value("gpustats_gpu_info", device="rig-1", gpu="1", uuid=gpu(1)["uuid"],
                      name="NVIDIA GeForce RTX 3080", driver="560.94", vendor="NVIDIA") is None


def test_open_streams_are_counted_while_they_are_open(make_app):
    client = make_app().test_client()
    assert scrape(client).value("gpustats_stream_subscribers") == 0
    streams = [client.get("/gpu/stream", buffered=False) for _ in range(2)]
    assert scrape(client).value("gpustats_stream_subscribers") == 2
    for stream in streams:
        stream.close()
    assert scrape(client).value("gpustats_stream_subscribers") == 0


def test_alert_notifications_are_counted_by_result(make_app, receiver):
    receiver.script["/refuses"] = [400]
    client = make_app(ALERT_FOR_S="0", ALERT_TEMP_C="80",
                      ALERT_WEBHOOK_URLS=f"{receiver.url}/hook,{receiver.url}/refuses").test_client()
    assert scrape(client).value("gpustats_alert_notifications_total", result="sent") == 0
    push(client, multi(gpu(0, temperatureGpu=91)))
    metrics = wait_for(lambda: (s := scrape(client)).value("gpustats_alert_notifications_total", result="failed")
                       and s.value("gpustats_alert_notifications_total", result="sent") and s)
    assert {r: metrics.value("gpustats_alert_notifications_total", result=r)
            for r in ("sent", "failed", "retry", "dropped")} == {"sent": 1, "failed": 1, "retry": 0, "dropped": 0}


def test_metrics_need_the_viewer_login(make_app):
    client = make_app(DASHBOARD_PASSWORD="s3cret-enough", **PRIVATE).test_client()
    refused = client.get("/metrics")
    # Issue 20: this was text/html "Login required."; every error is JSON, as docs/API.md says.
    assert refused.status_code == 401 and refused.content_type == "application/json"
    assert refused.json["ok"] is False and refused.json["error"].startswith("sign in first")
    assert refused.headers["WWW-Authenticate"] == 'Basic realm="GPU Stats"'
    auth = {"Authorization": "Basic " + __import__("base64").b64encode(b"admin:s3cret-enough").decode()}
    assert scrape(client, headers=auth).value("gpustats_stream_subscribers") == 0


def test_prometheus_asking_for_openmetrics_gets_it(make_app):
    client = make_app().test_client()
    answer = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert answer.content_type.startswith("application/openmetrics-text")
    assert answer.get_data(as_text=True).endswith("# EOF\n")


@pytest.mark.no_backend
@pytest.mark.parametrize("accept", ["text/plain; version=abc", "application/openmetrics-text; version=1.x",
                                    "application/openmetrics-text; version=", "application/openmetrics-text; escaping=x",
                                    "text/plain;;;q=abc", "\u00e9/\u00e9; version=\u00e9", "*/*; q=0"])
def test_any_accept_header_gets_a_valid_exposition(make_app, accept):
    # Issue 20: `version=abc` made prometheus_client's negotiation raise, and /metrics answered 500.
    client = make_app().test_client()
    answer = client.get("/metrics", headers={"Accept": accept})
    assert answer.status_code == 200
    text = answer.get_data(as_text=True)
    if answer.content_type.startswith("application/openmetrics-text"):
        assert text.endswith("# EOF\n")
    else:
        assert answer.content_type == "text/plain; version=0.0.4; charset=utf-8"
        assert Scrape(text).value("gpustats_stream_subscribers") == 0


def test_the_process_collector_describes_the_answering_worker_by_its_pid(make_app):
    metrics = scrape(make_app().test_client())
    pid = str(os.getpid())
    assert metrics.value("process_resident_memory_bytes", pid=pid) > 10 * MIB
    assert metrics.value("process_start_time_seconds", pid=pid) <= time.time()
    assert metrics.value("process_cpu_seconds_total", pid=pid) > 0


def test_processes_are_memory_per_user_and_jobs_running_per_device(make_app):
    client = make_app().test_client()
    alice = [{"pid": pid, "name": "python3", "user": "alice", "memoryUsed": 1000} for pid in (1, 2)]
    bob, nobody = {"pid": 3, "name": "python3", "user": "bob", "memoryUsed": 500}, {"pid": 4, "name": "Xorg",
                                                                                    "memoryUsed": 40}
    push(client, multi(gpu(0, processes=[*alice, bob, nobody]), gpu(1, processes=[dict(bob, memoryUsed=300)])))
    push(client, {"name": "NVIDIA RTX 3080", "temperatureGpu": 65}, device="rig-2")  # lists no processes
    seen(client)
    metrics = seen(client, device="rig-2")
    used = {labels: value for (name, labels), value in metrics.samples.items()
            if name == "gpustats_gpu_process_memory_used_bytes"}
    # One series per user, never per pid: pids come and go every job, users stay.
    assert used == {frozenset({("device", "rig-1"), ("gpu", "0"), ("user", "alice")}): 2000 * MIB,
                    frozenset({("device", "rig-1"), ("gpu", "0"), ("user", "bob")}): 500 * MIB,
                    frozenset({("device", "rig-1"), ("gpu", "0"), ("user", "")}): 40 * MIB,
                    frozenset({("device", "rig-1"), ("gpu", "1"), ("user", "bob")}): 300 * MIB}
    assert metrics.value("gpustats_jobs_running", device="rig-1") == 4  # bob's pid 3 on two GPUs is one job
    assert metrics.value("gpustats_jobs_running", device="rig-2") is None  # nothing known of its processes

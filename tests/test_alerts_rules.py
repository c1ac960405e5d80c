"""The alert rules, played with an injected clock: each push and status change carries its time."""
import json

import pytest

from gpustats.alerts.rules import AlertBoard, AlertSettings, Rules, duration, fingerprint

T0 = 1_790_000_000.0


def push(t, *gpus, device="rig-1", error=None, system=None):
    return {"device": device, "receivedAt": T0 + t, "error": error, "gpus": list(gpus), "system": system}


def host(memory=100_000, *disks):
    """A push's `system`: 1 TiB of memory with `memory` MiB used, and disks as (mount, used MiB) of 1 TiB each."""
    return {"memoryTotal": 1_048_576, "memoryUsed": memory,
            "disks": [{"mount": mount, "total": 1_048_576, "used": used} for mount, used in disks]}


def gpu(index=0, **fields):
    return {"index": index, "temperatureGpu": 60, "memoryUsed": 1000, "memoryTotal": 24000,
            "utilizationGpu": 0, **fields}


def offline(t, received, device="rig-1"):
    return {"device": device, "status": "offline", "receivedAt": T0 + received, "at": T0 + t}


def play(rules, *events):
    """Feed pushes (and status changes) in order; return [(when, alertname, status)] of every transition."""
    out = []
    for event in events:
        alerts = rules.status(event) if "status" in event else rules.push(event)
        out += [(event.get("at", event.get("receivedAt")) - T0, a["alertname"], a["status"]) for a in alerts]
    return out


def rules(**settings):
    return Rules(AlertSettings(**{"for_s": 120, **settings}))


def test_hot_gpu_fires_after_the_hold_down_not_before_and_resolves_after_it():
    r = rules()
    assert play(r, *(push(t, gpu(temperatureGpu=90)) for t in range(0, 120, 10))) == []
    fired = r.push(push(120, gpu(temperatureGpu=91)))
    assert [(a["alertname"], a["status"], a["device"], a["gpu"], a["value"], a["severity"]) for a in fired] == [
        ("GpuHot", "firing", "rig-1", 0, 91, "critical")]
    assert fired[0]["summary"] == "rig-1:0 is at 91 °C, at or above 85 °C for 2 min"
    assert fired[0]["endsAt"] is None and fired[0]["startsAt"].endswith("Z")
    assert play(r, push(130, gpu(temperatureGpu=80)), push(249, gpu(temperatureGpu=70))) == []
    resolved = r.push(push(250, gpu(temperatureGpu=70)))
    assert [(a["status"], a["startsAt"], a["fingerprint"]) for a in resolved] == [
        ("resolved", fired[0]["startsAt"], fired[0]["fingerprint"])]
    assert resolved[0]["endsAt"] > resolved[0]["startsAt"]
    assert r.active() == []


def test_a_flap_inside_the_hold_down_sends_nothing():
    r = rules()
    flapping = [push(t, gpu(temperatureGpu=90 if t % 100 < 60 else 70)) for t in range(0, 1000, 10)]
    assert play(r, *flapping) == []


def test_a_firing_alert_that_dips_under_the_threshold_briefly_stays_firing():
    r = rules()
    assert play(r, push(0, gpu(temperatureGpu=90)), push(120, gpu(temperatureGpu=90))) == [(120, "GpuHot", "firing")]
    dips = [push(t, gpu(temperatureGpu=70 if t % 100 < 60 else 90)) for t in range(130, 1000, 10)]
    assert play(r, *dips) == []
    assert [a["alertname"] for a in r.active()] == ["GpuHot"]


def test_a_push_without_the_reading_changes_nothing():
    r = rules()
    events = [push(0, gpu(temperatureGpu=90)), push(60, gpu(temperatureGpu=None)), push(120, gpu(temperatureGpu=90))]
    assert play(r, *events) == [(120, "GpuHot", "firing")]


def test_full_memory_fires_per_gpu_with_its_share():
    r = rules(vram_pct=95)
    full = gpu(1, memoryUsed=23500, memoryTotal=24000)
    events = [push(t, gpu(0), full) for t in range(0, 121, 30)]
    assert play(r, *events) == [(120, "GpuMemoryFull", "firing")]
    alert = r.active()[0]
    assert (alert["gpu"], alert["value"], alert["severity"]) == (1, 97.9, "warning")
    assert "97.9 % full (22.9 of 23.4 GiB)" in alert["summary"]


def test_device_offline_fires_on_the_status_change_and_resolves_at_the_next_push():
    r = rules()
    assert play(r, push(0, gpu()), offline(60, 0)) == [(60, "DeviceOffline", "firing")]
    alert = r.active()[0]
    assert "gpu" not in alert and alert["value"] == 60 and alert["summary"].startswith("rig-1 is offline")
    assert play(r, offline(70, 0)) == []  # already firing: not again
    assert play(r, push(500, gpu())) == [(500, "DeviceOffline", "resolved")]


def test_a_gpu_error_fires_at_once_and_resolves_after_the_hold_down():
    r = rules()
    broken = gpu(1, error="Unable to determine the device handle for GPU 0000:02:00.0: GPU is lost")
    assert play(r, push(0, gpu(0), broken)) == [(0, "GpuError", "firing")]
    assert "GPU is lost" in r.active()[0]["summary"] and r.active()[0]["gpu"] == 1
    assert play(r, push(10, gpu(0), gpu(1)), push(129, gpu(0), gpu(1))) == []
    assert play(r, push(130, gpu(0), gpu(1))) == [(130, "GpuError", "resolved")]


def test_fewer_gpus_than_within_six_hours_is_a_device_gpu_error():
    r = rules()
    assert play(r, push(0, gpu(0), gpu(1)), push(10, gpu(0))) == [(10, "GpuError", "firing")]
    alert = r.active()[0]
    assert "gpu" not in alert and alert["value"] == 1
    assert alert["summary"] == "rig-1 reports 1 GPU; it had 2 within 6 h"
    # An agent that lost the driver reports no GPUs and its error.
    r2 = rules()
    events = [push(0, gpu(0)), push(2, device="rig-1", error="NVML: Driver/library version mismatch")]
    assert play(r2, *events) == [(2, "GpuError", "firing")]
    assert r2.active()[0]["summary"].endswith(": NVML: Driver/library version mismatch")
    # Six hours with one GPU: that is the device now, and the alert resolves.
    later = [push(t, gpu(0)) for t in range(20, 6 * 3600 + 200, 60)]
    assert play(r, *later)[-1:] == [(6 * 3600 + 140, "GpuError", "resolved")]


def test_a_pc_that_never_read_a_gpu_and_says_why_is_a_gpu_error():
    # Issue 30: an agent that reads no GPU showed a green "online" and "no alerts".
    r = rules()
    why = "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver…"
    assert play(r, push(0, error=why), push(5, error=why)) == [(0, "GpuError", "firing")]
    alert = r.active()[0]
    assert "gpu" not in alert and alert["summary"] == f"rig-1 reads no GPU: {why}"
    assert play(r, push(10, gpu(0)), push(129, gpu(0))) == []
    assert play(r, push(130, gpu(0))) == [(130, "GpuError", "resolved")]
    assert play(rules(), push(0), push(5)) == []  # a PC without a GPU that says nothing wrong is no problem


def test_a_job_done_fires_when_a_long_busy_gpu_goes_idle_and_resolves_at_once():
    r = rules(job_min_s=900)
    busy = [push(t, gpu(utilizationGpu=30 if t % 600 == 300 else 97)) for t in range(0, 3 * 3600 + 12 * 60, 30)]
    assert play(r, *busy) == []  # dips to 30 % do not end a job
    idle = [push(t, gpu(utilizationGpu=1)) for t in range(3 * 3600 + 12 * 60, 3 * 3600 + 15 * 60, 30)]
    out = r.push(idle[0]) + [a for e in idle[1:] for a in r.push(e)]
    assert [(a["alertname"], a["status"]) for a in out] == [("GpuJobDone", "firing"), ("GpuJobDone", "resolved")]
    assert out[0]["summary"].startswith("rig-1:0 finished a 3 h 12 min job at ")
    assert out[0]["value"] == 3 * 3600 + 12 * 60 and out[0]["severity"] == "info"
    assert r.active() == []


def test_a_short_job_or_a_brief_idle_sends_nothing():
    r = rules(job_min_s=900)
    short = [push(t, gpu(utilizationGpu=90)) for t in range(0, 600, 30)]
    assert play(r, *short, *(push(t, gpu(utilizationGpu=0)) for t in range(600, 1000, 30))) == []
    long = [push(t, gpu(utilizationGpu=90)) for t in range(1000, 3000, 30)]
    pause = [push(t, gpu(utilizationGpu=2)) for t in range(3000, 3100, 20)]  # under the 120 s hold-down
    assert play(r, *long, *pause, *(push(t, gpu(utilizationGpu=90)) for t in range(3100, 3400, 30))) == []


def test_a_device_that_goes_offline_did_not_finish_its_job():
    r = rules(job_min_s=900)
    events = [push(t, gpu(utilizationGpu=90)) for t in range(0, 2000, 30)]
    events += [offline(2100, 1980)] + [push(t, gpu(utilizationGpu=0)) for t in range(5000, 5300, 30)]
    assert [name for _, name, _ in play(r, *events)] == ["DeviceOffline", "DeviceOffline"]


@pytest.mark.parametrize("off, events", [
    ({"temp_c": 0}, [push(t, gpu(temperatureGpu=99)) for t in range(0, 300, 30)]),
    ({"vram_pct": 0}, [push(t, gpu(memoryUsed=24000)) for t in range(0, 300, 30)]),
    ({"offline": False}, [push(0, gpu()), offline(60, 0)]),
    ({"gpu_error": False}, [push(0, gpu(0), gpu(1)), push(10, gpu(0, error="GPU is lost"))]),
    ({"job_min_s": 0}, [push(t, gpu(utilizationGpu=99 if t < 2000 else 0)) for t in range(0, 2400, 30)]),
    ({"host_memory_pct": 0}, [push(t, gpu(), system=host(1_040_000)) for t in range(0, 300, 30)]),
    ({"disk_pct": 0}, [push(t, gpu(), system=host(1000, ("/", 1_040_000))) for t in range(0, 300, 30)]),
])
def test_each_rule_is_switched_off_with_zero(off, events):
    assert play(rules(**off), *events) == []
    assert play(rules(), *events) != []  # and the same events fire it when it is on


def test_state_survives_a_restart_without_firing_again():
    r = rules()
    play(r, push(0, gpu(temperatureGpu=90)), push(120, gpu(temperatureGpu=90)))
    again = Rules(r.settings, r.state())
    assert play(again, push(130, gpu(temperatureGpu=90))) == []
    assert play(again, *(push(t, gpu(temperatureGpu=60)) for t in range(140, 300, 20)))[-1:] == [
        (260, "GpuHot", "resolved")]


def test_the_fingerprint_is_alertmanagers():
    # The test vector of prometheus/common model/signature_test.go.
    assert fingerprint({"name": "garland, briggs", "fear": "love is not enough"}) == f"{5799056148416392346:016x}"
    assert fingerprint({}) == "cbf29ce484222325"
    labels = {"alertname": "GpuHot", "device": "render-box", "gpu": "0", "severity": "warning"}
    assert fingerprint(labels) == "619cd67eb62c8616"
    assert fingerprint(dict(labels, severity="critical")) == "32506a81f5bcceef"


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (50, 120, 3 * 3600 + 12 * 60, 7200, 2 * 86400 + 4 * 3600)] == [
        "50 s", "2 min", "3 h 12 min", "2 h", "2 d 4 h"]


def test_the_board_keeps_the_active_ones_and_the_last_hundred():
    board, r = AlertBoard(keep=100), rules()
    for device in range(120):
        for alert in r.status(offline(10, 0, device=f"d{device}")):
            board.apply(alert)
    for alert in r.push(push(20, gpu(), device="d119")):
        board.apply(alert)
    view = board.view()
    assert len(view["active"]) == 119 and len(view["recent"]) == 100
    assert view["recent"][0]["device"] == "d119" and view["recent"][0]["status"] == "resolved"
    assert view["recent"][-1]["device"] == "d20"


def test_one_busy_sample_and_a_long_light_tail_is_not_a_finished_job():
    r = rules(job_min_s=900)
    events = [push(0, gpu(utilizationGpu=60))] + [push(t, gpu(utilizationGpu=10)) for t in range(30, 16 * 60, 30)]
    events += [push(t, gpu(utilizationGpu=0)) for t in range(16 * 60, 20 * 60, 30)]
    assert play(r, *events) == []


def test_a_hold_down_does_not_run_on_across_an_offline_spell():
    r = rules()
    events = [push(0, gpu(temperatureGpu=90)), offline(60, 0), push(3600, gpu(temperatureGpu=90))]
    assert play(r, *events) == [(60, "DeviceOffline", "firing"), (3600, "DeviceOffline", "resolved")]
    assert play(r, push(3720, gpu(temperatureGpu=90))) == [(3720, "GpuHot", "firing")]  # counted from 3600


def test_an_alert_of_a_gpu_no_longer_reported_resolves_after_the_hold_down():
    r = rules(gpu_error=False)
    assert play(r, push(0, gpu(0), gpu(1, temperatureGpu=90)), push(120, gpu(0), gpu(1, temperatureGpu=90))) == [
        (120, "GpuHot", "firing")]
    assert play(r, *(push(t, gpu(0)) for t in range(130, 260, 10))) == [(250, "GpuHot", "resolved")]
    assert r.state()["firing"] == {} and r.state()["pending"] == {}


def test_a_finished_job_is_named_after_the_process_that_ran_it():
    r = rules(job_min_s=900)
    train = {"pid": 42, "name": "python3", "user": "alice", "command": "python3 train.py", "startedAt": T0 - 30,
             "memoryUsed": 62_669}
    busy = [push(t, gpu(utilizationGpu=87, processes=[train, {"pid": 9, "name": "Xorg", "memoryUsed": 40}]))
            for t in range(0, 3 * 3600 + 11 * 60 + 31, 30)]
    idle = [push(t, gpu(utilizationGpu=0, processes=[{"pid": 9, "name": "Xorg", "memoryUsed": 40}]))
            for t in range(3 * 3600 + 12 * 60, 3 * 3600 + 15 * 60, 30)]
    alerts = [a for e in busy + idle for a in r.push(e)]
    assert [(a["alertname"], a["status"]) for a in alerts] == [("GpuJobDone", "firing"), ("GpuJobDone", "resolved")]
    # Named after the process that held the most memory, from its start to its last sighting.
    assert alerts[0]["summary"] == "alice's python3 train.py on rig-1:0 finished after 3 h 12 min, peak 61.2 GiB, mean 87 %"
    assert alerts[0]["value"] == 3 * 3600 + 12 * 60 and alerts[1]["summary"] == alerts[0]["summary"]


def test_a_finished_job_of_a_process_that_sends_its_own_utilization_has_that_mean_and_no_user_is_no_name():
    r = rules(job_min_s=60)
    run = {"pid": 42, "name": "python3", "memoryUsed": 2048}
    events = [push(t, gpu(utilizationGpu=90, processes=[dict(run, utilization=u)])) for t, u in ((0, 60), (60, 70))]
    events += [push(t, gpu(utilizationGpu=0, processes=[])) for t in range(90, 300, 30)]
    alerts = [a for e in events for a in r.push(e)]
    assert alerts[0]["summary"] == "python3 on rig-1:0 finished after 1 min, peak 2.0 GiB, mean 65 %"


def test_a_gpu_that_lists_no_process_gets_the_summary_of_before():
    r = rules(job_min_s=900)
    events = [push(t, gpu(utilizationGpu=97, processes=[])) for t in range(0, 2000, 30)]
    events += [push(t, gpu(utilizationGpu=1, processes=[])) for t in range(2000, 2200, 30)]
    alerts = [a for e in events for a in r.push(e)]
    assert alerts[0]["summary"].startswith("rig-1:0 finished a 33 min job at ")


NOTEBOOK = {"pid": 77, "name": "python3", "user": "bob", "command": "python3 notebook.py", "memoryUsed": 41_062}


def test_a_process_holding_memory_on_an_idle_gpu_for_half_an_hour_fires_naming_it():
    r = rules()
    held = [push(t, gpu(3, utilizationGpu=0, processes=[NOTEBOOK])) for t in range(0, 1800, 60)]
    assert play(r, *held) == []
    fired = r.push(push(1800, gpu(3, utilizationGpu=0, processes=[NOTEBOOK])))
    assert [(a["alertname"], a["status"], a["gpu"], a["severity"], a["value"]) for a in fired] == [
        ("GpuIdleHeld", "firing", 3, "warning", 41_062)]
    assert fired[0]["summary"] == "bob's python3 notebook.py holds 40.1 GiB on rig-1:3 at 0 % for 30 min"
    assert play(r, push(1860, gpu(3, utilizationGpu=2, processes=[NOTEBOOK]))) == []  # still idle: still firing
    gone = r.push(push(1920, gpu(3, utilizationGpu=0, processes=[])))
    assert [(a["status"], a["summary"]) for a in gone] == [
        ("resolved", "bob's python3 notebook.py let go of its memory on rig-1:3")]  # at once, no hold-down


def test_an_idle_holder_that_gets_busy_resolves_at_once_and_a_busy_spell_starts_the_wait_again():
    r = rules()
    events = [push(t, gpu(0, utilizationGpu=0, processes=[NOTEBOOK])) for t in range(0, 1801, 60)]
    assert play(r, *events) == [(1800, "GpuIdleHeld", "firing")]
    busy = r.push(push(1860, gpu(0, utilizationGpu=80, processes=[NOTEBOOK])))
    assert [(a["status"], a["summary"]) for a in busy] == [
        ("resolved", "bob's python3 notebook.py is busy on rig-1:0 again, at 80 %")]
    assert play(r, *(push(t, gpu(0, utilizationGpu=0, processes=[NOTEBOOK])) for t in range(1920, 3720, 60))) == []
    assert play(r, push(3720, gpu(0, utilizationGpu=0, processes=[NOTEBOOK]))) == [(3720, "GpuIdleHeld", "firing")]


def test_idle_held_goes_by_a_processs_own_utilization_where_sent_and_not_under_the_threshold():
    r = rules(idle_held_s=600)
    other = {"pid": 5, "name": "train", "memoryUsed": 9000, "utilization": 95}
    idle = dict(NOTEBOOK, utilization=0)
    small = dict(NOTEBOOK, pid=78, memoryUsed=1023, user="carol")
    events = [push(t, gpu(0, utilizationGpu=95, processes=[other, idle, small])) for t in range(0, 601, 60)]
    assert play(r, *events) == [(600, "GpuIdleHeld", "firing")]  # the GPU is busy, but not with bob's notebook
    assert "bob's" in r.active()[0]["summary"] and "at 0 % for 10 min" in r.active()[0]["summary"]


def test_idle_held_is_off_with_zero_and_its_state_survives_a_restart():
    events = [push(t, gpu(0, utilizationGpu=0, processes=[NOTEBOOK])) for t in range(0, 1801, 60)]
    assert play(rules(idle_held_mib=0), *events) == []
    r = rules()
    assert play(r, *events[:-1]) == []
    again = Rules(r.settings, json.loads(json.dumps(r.state())))
    assert play(again, events[-1]) == [(1800, "GpuIdleHeld", "firing")]
    assert play(Rules(again.settings, json.loads(json.dumps(again.state()))),
                push(1860, gpu(0, utilizationGpu=0, processes=[]))) == [(1860, "GpuIdleHeld", "resolved")]


def test_host_memory_full_fires_for_the_device_after_the_hold_down_and_resolves_after_it():
    r = rules()
    full = [push(t, gpu(), system=host(1_017_119)) for t in range(0, 120, 10)]
    assert play(r, *full) == []
    [fired] = r.push(push(120, gpu(), system=host(1_017_119)))
    assert (fired["alertname"], fired["device"], fired["value"], fired["severity"]) == ("HostMemoryFull", "rig-1", 97, "warning")
    assert "gpu" not in fired and "mount" not in fired
    assert fired["summary"] == "rig-1's memory is 97 % used (993.3 of 1024.0 GiB), at or above 95 % for 2 min"
    assert play(r, push(130, gpu()), push(200, gpu(), system={"memoryUsed": None})) == []  # nothing said: no change
    assert play(r, *(push(t, gpu(), system=host(500_000)) for t in range(210, 340, 10))) == [(330, "HostMemoryFull", "resolved")]
    assert r.active() == []


def test_each_full_disk_is_its_own_alert_by_mount_and_one_no_longer_listed_resolves():
    r = rules(for_s=0)
    fired = r.push(push(0, gpu(), system=host(1000, ("/", 1000), ("/data", 1_006_633), ("/scratch", 1_040_000))))
    assert [(a["alertname"], a["mount"], a["value"]) for a in fired] == [("DiskFull", "/data", 96), ("DiskFull", "/scratch", 99.2)]
    assert fired[0]["summary"] == "rig-1's disk /data is 96 % full (983.0 of 1024.0 GiB), at or above 95 %"
    assert fired[0]["fingerprint"] != fired[1]["fingerprint"] and "gpu" not in fired[0]
    assert fingerprint({"alertname": "DiskFull", "device": "rig-1", "severity": "warning", "mount": "/data"}) == \
        fired[0]["fingerprint"]
    assert r.push(push(10, gpu(), system={"disks": None})) == []  # the PC could not say: nothing changes
    assert r.push(push(15, gpu())) == []  # nor without its system
    resolved = r.push(push(20, gpu(), system=host(1000, ("/data", 500_000))))
    assert [(a["mount"], a["status"], a["summary"]) for a in resolved] == [
        ("/data", "resolved", "rig-1's disk /data is down to 47.7 %, under 95 %"),
        ("/scratch", "resolved", "rig-1's disk /scratch is no longer reported")]


def test_a_disk_fills_slowly_so_disk_full_waits_the_hold_down_too():
    r = rules()
    assert play(r, *(push(t, gpu(), system=host(1000, ("/", 1_000_000 + t))) for t in range(0, 130, 10))) == [
        (120, "DiskFull", "firing")]
    assert play(r, push(130, gpu(index=1), system=host(1000, ("/", 1_000_000)))) == []  # its GPU gone: not the disk


def test_host_alerts_survive_a_restart_without_firing_again():
    r = rules(for_s=0)
    play(r, push(0, gpu(), system=host(1_040_000, ("/", 1_040_000))))
    again = Rules(r.settings, json.loads(json.dumps(r.state())))
    assert play(again, push(10, gpu(), system=host(1_040_000, ("/", 1_040_000)))) == []
    assert sorted(play(again, push(20, gpu(), system=host(1000, ("/", 1000))))) == [
        (20, "DiskFull", "resolved"), (20, "HostMemoryFull", "resolved")]

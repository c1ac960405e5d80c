"""Jobs made from the processes in pushes (gpustats/jobs/tracker.py), played with pushes that carry their own time.

The agent's `command`, `startedAt` and per-process `utilization` are handed in here as dicts:
the tracker reads them wherever they come from, and falls back to `name` and first sighting.
"""
import json

import pytest

from gpustats.jobs.report import usage, view
from gpustats.jobs.tracker import Tracker

T0 = 1_790_000_000.0
GAP_S, OFFLINE_S = 15, 60


def process(pid, memory=1000, **fields):
    return {"pid": pid, "name": "python3", "memoryUsed": memory, **fields}


def gpu(index=0, *processes, utilization=90, power=200.0):
    return {"index": index, "utilizationGpu": utilization, "powerDraw": power, "processes": list(processes)}


def push(t, *gpus, device="rig-1"):
    return {"device": device, "receivedAt": T0 + t, "gpus": list(gpus)}


def offline(t, device="rig-1"):
    return {"device": device, "status": "offline", "receivedAt": T0 + t - OFFLINE_S, "at": T0 + t}


def play(tracker, *events, kept=None):
    """Feed events in order; return every job written so far, by id, as /api/jobs shows it (`kept`: what a store keeps)."""
    kept = {} if kept is None else kept
    for event in events:
        tracker.status(event) if "status" in event else tracker.push(event)
    jobs, _ = tracker.changed()
    kept.update((job["id"], json.loads(json.dumps(job))) for job in jobs)  # kept as a store keeps it: JSON
    return {job_id: view(job) for job_id, job in kept.items()}


def tracker():
    return Tracker(GAP_S, OFFLINE_S)


def only(jobs):
    [job] = jobs.values()
    return job


def test_a_process_is_a_job_from_its_start_until_a_push_no_longer_lists_it():
    t = tracker()
    started = process(42, 2048, user="alice", command="python3 train.py", startedAt=T0 - 100)
    jobs = play(t, *(push(s, gpu(0, started)) for s in range(0, 60, 2)), push(60, gpu(0)))
    assert only(jobs) == {
        "id": f"rig-1:42:{int(T0 - 100)}", "device": "rig-1", "gpus": [0], "pid": 42, "name": "python3",
        "command": "python3 train.py", "user": "alice", "startedAt": T0 - 100, "endedAt": T0 + 58,
        "ended": "exited", "durationS": 158, "gpuHours": round(58 / 3600, 4), "peakMemory": 2048,
        "meanUtilization": 90, "energyWh": round(200 * 58 / 3600, 3)}


def test_without_command_or_start_a_job_is_named_by_its_process_and_starts_when_first_seen():
    jobs = play(tracker(), push(10, gpu(0, process(7))), push(12, gpu(0, process(7))))
    job = only(jobs)
    assert (job["command"], job["name"], job["user"], job["startedAt"], job["ended"]) == (
        "python3", "python3", None, T0 + 10, None)
    assert job["endedAt"] is None and job["durationS"] == 2


def test_a_pid_reused_after_exit_is_a_new_job():
    t = tracker()
    first, second = process(42, startedAt=T0), process(42, startedAt=T0 + 30)
    jobs = play(t, push(0, gpu(0, first)), push(20, gpu(0, first)), push(30, gpu(0, second)), push(40, gpu(0, second)))
    assert [(j["startedAt"], j["endedAt"], j["ended"]) for j in jobs.values()] == [
        (T0, T0 + 20, "exited"), (T0 + 30, None, None)]


def test_a_start_read_a_second_apart_is_the_same_process():
    jobs = play(tracker(), push(0, gpu(0, process(42, startedAt=T0 - 5))),
                push(2, gpu(0, process(42, startedAt=T0 - 4.2))))
    assert len(jobs) == 1 and only(jobs)["startedAt"] == T0 - 5


def test_a_job_across_two_gpus_counts_time_on_each_and_its_memory_together():
    t = tracker()
    both = [push(s, gpu(0, process(1, 3000)), gpu(1, process(1, 5000), utilization=50, power=100.0))
            for s in range(0, 101, 10)]
    job = only(play(t, *both, push(110, gpu(0), gpu(1))))
    assert job["gpus"] == [0, 1] and job["peakMemory"] == 8000
    assert job["gpuHours"] == round(2 * 100 / 3600, 4)
    assert job["meanUtilization"] == 70  # its GPUs' mean while it ran: 90 and 50
    assert job["energyWh"] == round((200 + 100) * 100 / 3600, 3)


def test_a_gpus_energy_is_shared_equally_among_the_jobs_on_it_at_the_same_time():
    pushes = [push(s, gpu(0, process(1), process(2), power=300.0)) for s in range(0, 61, 10)]
    jobs = play(tracker(), *pushes)
    assert [j["energyWh"] for j in jobs.values()] == [round(300 * 60 / 2 / 3600, 3)] * 2
    assert [j["gpuHours"] for j in jobs.values()] == [round(60 / 3600, 4)] * 2


def test_a_processs_own_utilization_is_its_mean_where_the_agent_sends_it():
    pushes = [push(s, gpu(0, process(1, utilization=own), process(2), utilization=95)) for s, own in
              ((0, 80), (2, 90), (4, 100))]
    jobs = play(tracker(), *pushes)
    assert [j["meanUtilization"] for j in jobs.values()] == [90, 95]


def test_a_gap_longer_than_a_push_apart_counts_no_time_or_energy():
    job = only(play(tracker(), push(0, gpu(0, process(1))), push(40, gpu(0, process(1)))))
    assert job["gpuHours"] == 0 and job["energyWh"] == 0 and job["durationS"] == 40


def test_a_gpu_that_lists_no_processes_ends_none_of_its_jobs():
    t = tracker()
    unread = {"index": 0, "utilizationGpu": None, "powerDraw": None, "error": "Unknown Error"}  # no `processes`
    jobs = play(t, push(0, gpu(0, process(1))), push(2, unread), push(4, gpu(0, process(1))))
    assert only(jobs)["ended"] is None


def test_an_offline_device_loses_its_jobs_at_their_last_sighting():
    t = tracker()
    jobs = play(t, push(0, gpu(0, process(1), process(2, startedAt=T0 - 9))), push(2, gpu(0, process(1), process(2, startedAt=T0 - 9))),
                offline(62))
    assert [(j["ended"], j["endedAt"]) for j in jobs.values()] == [("lost", T0 + 2)] * 2
    assert t.running == {}


def test_a_lost_job_whose_process_comes_back_with_its_start_is_taken_up_again():
    t = tracker()
    kept = {}
    known = process(2, startedAt=T0 - 9)
    play(t, push(0, gpu(0, process(1), known)), push(2, gpu(0, process(1), known)), offline(62), kept=kept)
    jobs = play(t, push(300, gpu(0, process(1), known)), push(302, gpu(0, process(1), known)), kept=kept)
    by_pid = {(j["pid"], j["ended"]) for j in jobs.values()}
    # pid 1 sent no start: after the silence it is a new job; pid 2 is the same process, never gone.
    assert by_pid == {(1, "lost"), (1, None), (2, None)} and len(jobs) == 3
    again = next(j for j in jobs.values() if j["pid"] == 2)
    assert again["startedAt"] == T0 - 9 and again["endedAt"] is None and again["durationS"] == 311


def test_a_device_silent_past_offline_while_the_server_was_down_loses_its_jobs_at_the_next_push():
    t = tracker()
    jobs = play(t, push(0, gpu(0, process(1))), push(2, gpu(0, process(1))), push(200, gpu(0, process(1))))
    assert sorted((j["startedAt"] - T0, j["ended"]) for j in jobs.values()) == [(0, "lost"), (200, None)]


def test_a_restart_goes_on_from_the_running_jobs_and_device_states_kept():
    first, kept = tracker(), {}
    play(first, *(push(s, gpu(0, process(1, startedAt=T0), process(2))) for s in range(0, 21, 10)), kept=kept)
    running = [job for job in kept.values() if job["endedAt"] is None]
    devices = json.loads(json.dumps(first.devices))
    second = Tracker(GAP_S, OFFLINE_S, running, devices)  # a new process, from what the store kept
    jobs = play(second, *(push(s, gpu(0, process(1, startedAt=T0), process(2))) for s in range(30, 51, 10)),
                push(60, gpu(0)), kept=kept)
    assert len(jobs) == 2  # the same two jobs: by start, and by pid within OFFLINE_AFTER_S
    assert [(j["gpuHours"], j["endedAt"], j["ended"]) for j in jobs.values()] == [
        (round(50 / 3600, 4), T0 + 50, "exited")] * 2


def test_a_removed_device_loses_its_running_jobs_and_its_state():
    t = tracker()
    jobs = play(t, push(0, gpu(0, process(1))), {"device": "rig-1", "status": "removed", "at": T0 + 5})
    assert only(jobs)["ended"] == "lost" and t.devices == {}


def test_usage_adds_up_per_user_with_the_part_of_each_job_in_the_range():
    kept = {}
    alice, bob = process(1, 4000, user="alice"), process(2, 8000, user="bob")
    play(tracker(), *(push(s, gpu(0, alice), gpu(1, bob, utilization=50)) for s in range(0, 101, 10)),
         push(110, gpu(0), gpu(1)), kept=kept)
    rows = usage(kept.values(), T0, T0 + 50, "user")  # half of each job
    assert [(r["key"], r["jobs"], r["gpuHours"], r["meanUtilization"], r["peakMemory"]) for r in rows] == [
        ("alice", 1, round(50 / 3600, 4), 90, 4000), ("bob", 1, round(50 / 3600, 4), 50, 8000)]
    assert rows[0]["energyWh"] == round(200 * 50 / 3600, 3)
    [both] = usage(kept.values(), T0 - 100, T0 + 200, "device")
    assert (both["key"], both["jobs"], both["gpuHours"], both["peakMemory"]) == ("rig-1", 2, round(200 / 3600, 4), 8000)
    assert both["meanUtilization"] == 70  # weighted by GPU-hours: as long each


@pytest.mark.parametrize("status", ["stale", "online"])
def test_a_device_that_only_turns_stale_keeps_its_jobs(status):
    t = tracker()
    jobs = play(t, push(0, gpu(0, process(1))), {"device": "rig-1", "status": status, "at": T0 + 20, "receivedAt": T0})
    assert only(jobs)["ended"] is None

"""Jobs kept in SQLite and in Redis: one set of tests, both stores, fed as their servers feed them.

The clock is injected, so 400 days pass in a blink. Pushes here reach the store as the fleet
hands them on, after validation, so they may carry the agent's `command` and `startedAt`.
"""
import itertools

import pytest
import redis

from conftest import wait_for
from gpustats.jobs import KEEP_S, JobStore
from gpustats.jobs.redis import CURSOR, LEASE, RedisJobs
from gpustats.jobs.report import view
from gpustats.jobs.sqlite import SqliteJobs
from gpustats.scaleout import STREAM
from gpustats.stream import sse

T0 = 1_790_000_000.0
GAP_S, OFFLINE_S = 15, 60


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def process(pid, memory=1000, **fields):
    return {"pid": pid, "name": "python3", "memoryUsed": memory, **fields}


def gpu(index=0, *processes, utilization=90, power=200.0):
    return {"index": index, "uuid": f"GPU-{index}", "name": "NVIDIA H200", "utilizationGpu": utilization,
            "memoryUsed": 1000, "powerDraw": power, "processes": list(processes)}


def push(t, *gpus, device="rig-1"):
    return {"device": device, "status": "online", "receivedAt": T0 + t, "sampledAt": T0 + t, "host": device,
            "agent": None, "error": None, "gpus": list(gpus)}


def offline(t, device="rig-1"):
    return {"device": device, "status": "offline", "receivedAt": T0 + t - OFFLINE_S, "at": T0 + t}


class Stores:
    """Make stores of one kind on one file or one Redis, and feed them events the way their server would."""

    def __init__(self, kind, path, redis_url, clock):
        self.kind, self.path, self.clock = kind, path, clock
        self.redis = redis.Redis.from_url(redis_url) if redis_url else None
        self.n = itertools.count(1)
        self.store = None

    def open(self):
        """Start a store as a (re)started server would, going on from what the last one kept."""
        if self.redis is not None:
            self.redis.delete(LEASE)  # the last one's lease lapsed: it is gone
            self.store = RedisJobs(self.redis, GAP_S, OFFLINE_S, clock=self.clock, steady=self.clock)
            self.store.begin_at_end(CURSOR)  # what start() does first
        else:
            self.store = SqliteJobs(self.path, GAP_S, OFFLINE_S, clock=self.clock, steady=self.clock)
        assert isinstance(self.store, JobStore)
        return self.store

    def feed(self, *events):
        """Hand the store pushes and status changes in order, then have it track and write them."""
        if self.redis is None:
            for event in events:
                (self.store.status if "at" in event else self.store.add)(event)
            self.store.flush()
            return
        pipe = self.redis.pipeline(transaction=False)
        for event in events:  # the entries RedisFleet appends to the shared stream
            pipe.xadd(STREAM, {"d": event["device"], "e": "status" if "at" in event else "",
                               "b": sse.data_block(event), "n": next(self.n)})
        pipe.execute()
        while self.redis.xrange(STREAM, "(" + (self.store._cursor or "0-0").partition("|")[0], "+", count=1):
            self.store.flush()

    def jobs(self, start=T0 - 86400, end=T0 + 86400, **query):
        return [view(job) for job in self.store.find(start, end, **query)]


@pytest.fixture(params=["sqlite", "redis"])
def stores(request, tmp_path):
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    made = Stores(request.param, str(tmp_path / "history.sqlite3"), url, Clock(T0))
    made.open()
    return made


def test_a_process_becomes_a_job_with_its_command_user_start_gpus_and_figures(stores):
    train = process(42, 61_000, user="alice", command="python3 train.py", startedAt=T0 - 30)
    stores.feed(*(push(s, gpu(0, train), gpu(1, train, utilization=70, power=100.0)) for s in range(0, 61, 2)))
    [running] = stores.jobs()
    assert running["endedAt"] is None and running["ended"] is None and running["durationS"] == 90
    stores.feed(push(62, gpu(0), gpu(1)))
    assert stores.jobs() == [{
        "id": f"rig-1:42:{int(T0 - 30)}", "device": "rig-1", "gpus": [0, 1], "pid": 42, "name": "python3",
        "command": "python3 train.py", "user": "alice", "startedAt": T0 - 30, "endedAt": T0 + 60, "ended": "exited",
        "durationS": 90, "gpuHours": round(2 * 60 / 3600, 4), "peakMemory": 122_000, "meanUtilization": 80,
        "energyWh": round(300 * 60 / 3600, 3)}]


def test_a_pid_reused_after_exit_is_a_new_job_newest_first(stores):
    first, second = process(42, startedAt=T0 - 5), process(42, startedAt=T0 + 9)
    stores.feed(push(0, gpu(0, first)), push(2, gpu(0, first)), push(10, gpu(0, second)), push(12, gpu(0, second)))
    assert [(j["startedAt"], j["endedAt"], j["ended"]) for j in stores.jobs()] == [
        (T0 + 9, None, None), (T0 - 5, T0 + 2, "exited")]
    assert [j["startedAt"] for j in stores.jobs(running=True)] == [T0 + 9]


def test_a_restart_in_the_middle_of_a_job_goes_on_with_the_same_job(stores):
    known, unknown = process(1, startedAt=T0 - 100), process(2)  # the second sends no start: pid and first sighting
    stores.feed(*(push(s, gpu(0, known, unknown)) for s in range(0, 31, 10)))
    stores.store.close()
    stores.open()  # a deploy: the new server goes on from what the last one kept
    stores.feed(*(push(s, gpu(0, known, unknown)) for s in range(40, 71, 10)), push(80, gpu(0)))
    jobs = stores.jobs()
    assert len(jobs) == 2
    # 30 s before the restart and 30 after; the 10 s across it is a push interval like any other
    assert [(j["ended"], j["gpuHours"]) for j in jobs] == [("exited", round(70 / 3600, 4))] * 2
    assert sorted(j["startedAt"] for j in jobs) == [T0 - 100, T0]


def test_an_offline_device_loses_its_running_jobs_at_their_last_sighting(stores):
    stores.feed(push(0, gpu(0, process(1))), push(2, gpu(0, process(1))), push(2, gpu(0, process(5)), device="rig-2"))
    stores.feed(offline(62))
    assert {(j["device"], j["ended"], j["endedAt"]) for j in stores.jobs()} == {
        ("rig-1", "lost", T0 + 2), ("rig-2", None, None)}


def test_jobs_are_found_by_device_user_and_time(stores):
    alice, bob = process(1, user="alice"), process(2, user="bob")
    stores.feed(push(0, gpu(0, alice)), push(2, gpu(0)), push(1000, gpu(0, bob), device="rig-2"))
    assert [j["user"] for j in stores.jobs()] == ["bob", "alice"]
    assert [j["user"] for j in stores.jobs(devices={"rig-1"})] == ["alice"]
    assert [j["user"] for j in stores.jobs(user="bob")] == ["bob"]
    assert [j["user"] for j in stores.jobs(T0 + 500, T0 + 2000)] == ["bob"]  # alice's ended at T0
    assert [j["user"] for j in stores.jobs(T0 - 500, T0 + 500)] == ["alice"]  # bob's began after
    assert stores.jobs(devices={"rig-3"}) == [] and stores.jobs(user="carol") == []


def test_a_devices_jobs_are_deleted_and_not_written_again(stores):
    stores.feed(push(0, gpu(0, process(1))), push(2, gpu(0, process(1))), push(2, gpu(0, process(5)), device="rig-2"))
    stores.clock.now = T0 + 3
    removed = {"device": "rig-1", "status": "removed", "at": T0 + 3}  # the device goes first, then its jobs
    if stores.redis is None:
        stores.store.status(removed)
    assert stores.store.delete("rig-1") == 1
    stores.feed(*([removed] if stores.redis is not None else []), push(4, gpu(0, process(5)), device="rig-2"))
    assert [j["device"] for j in stores.jobs()] == ["rig-2"]


def test_ended_jobs_are_kept_400_days_and_running_ones_for_as_long_as_they_run(stores):
    stores.feed(push(0, gpu(0, process(1))), push(2, gpu(0, process(2))), push(4, gpu(0, process(2))))
    stores.clock.now = T0 + KEEP_S + 3  # the first job ended at T0 + 0, the second still runs
    stores.feed(push(KEEP_S + 3, gpu(0, process(2), process(3))))
    assert {(j["pid"], j["ended"]) for j in stores.jobs(T0 - 86400, T0 + KEEP_S + 10)} == {
        (2, "lost"), (2, None), (3, None)}  # pid 1's is gone; pid 2 sent no start: a new job after the silence


def test_a_second_redis_tracker_goes_on_from_what_the_first_wrote_and_the_first_then_writes_nothing(redis_server):
    made = Stores("redis", None, redis_server.url, Clock(T0))
    first = made.open()
    made.feed(*(push(s, gpu(0, process(1, startedAt=T0))) for s in range(0, 21, 2)))
    second = made.open()  # the first's lease lapsed (a worker stopped or hung): another worker's tracker takes over
    made.feed(*(push(s, gpu(0, process(1, startedAt=T0))) for s in range(22, 41, 2)), push(42, gpu(0)))
    stale = first._cursor
    first._round()  # it still thinks it leads: the cursor moved under it, so it writes nothing
    assert first._cursor == stale
    [job] = made.jobs()
    assert (job["ended"], job["endedAt"], job["gpuHours"]) == ("exited", T0 + 40, round(40 / 3600, 4))
    assert second is made.store


def test_sqlite_answers_running_jobs_as_of_their_last_push_between_checkpoints(tmp_path):
    store = SqliteJobs(str(tmp_path / "history.sqlite3"), GAP_S, OFFLINE_S)
    store.start()  # writes what began or ended each second, running jobs' figures every minute
    try:
        for s in range(0, 11, 2):
            store.add(push(s, gpu(0, process(1))))
        [job] = wait_for(lambda: [view(j) for j in store.find(T0 - 60, T0 + 60)], timeout=5)
        assert job["durationS"] == 10 and job["gpuHours"] == round(10 / 3600, 4)
        store.add(push(12, gpu(0, process(1))))
        wait_for(lambda: [view(j) for j in store.find(T0 - 60, T0 + 60)][0]["durationS"] == 12, timeout=5)
    finally:
        store.close()

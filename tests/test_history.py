"""History stores, each run on the same tests: SQLite in memory, SQLite on disk, and Redis.

The clock is injected, so 40 days pass in seconds. Redis expires keys by its own clock,
so the simulated days end at the real now.
"""
import itertools
import json
import logging
import time

import pytest
import redis

from gpustats.stream import sse
from gpustats.scaleout import STREAM
from gpustats.history import tiers
from gpustats.history.tiers import HOUR, MINUTE, SECOND, plan
from gpustats.history.routes import to_json
from gpustats.history.redis import RedisHistory
from gpustats.history.sqlite import SqliteHistory

DAY = 86400


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def event(t, util, power=100.0, device="rig-1", index=0, **fields):
    gpu = {"index": index, "uuid": f"GPU-{index}", "name": "NVIDIA L40S", "utilizationGpu": util,
           "memoryUsed": 1000, "temperatureGpu": None, "powerDraw": power, **fields}
    return {"device": device, "status": "online", "receivedAt": t, "sampledAt": t, "host": device,
            "agent": None, "error": None, "gpus": [gpu]}


class Feeder:
    """Hand a store accepted pushes the way its server would, then have it write them."""

    def __init__(self, store, redis_client=None):
        self.store, self.redis, self.n = store, redis_client, itertools.count(1)

    def feed(self, events):
        if self.redis is None:
            for e in events:
                self.store.add(e)
            self.store.flush()
            return
        pipe = self.redis.pipeline(transaction=False)
        for e in events:  # the entries RedisFleet's COMMIT appends to the shared stream
            pipe.xadd(STREAM, {"d": e["device"], "e": "", "b": sse.data_block(e), "n": next(self.n)})
        pipe.execute()
        while self.redis.xrange(STREAM, "(" + (self.store._cursor or "0-0").partition("|")[0], "+", count=1):
            self.store.flush()


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request, tmp_path):
    """Return make(clock, max_gap_s) -> (store, feeder) for each kind of store."""
    def make(clock, max_gap_s=15):
        if request.param == "redis":
            client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
            store = RedisHistory(client, max_gap_s, clock=clock)
            return store, Feeder(store, client)
        path = str(tmp_path / "history.sqlite3") if request.param == "sqlite" else ""
        store = SqliteHistory(path, max_gap_s, clock=clock, steady=clock)  # days pass on both clocks
        return store, Feeder(store)
    return make


def decoded(answer):
    """Render an answer as the API does, and read it back as a client would."""
    return json.loads(to_json(answer))


def read(store, clock, start, end, step=None, device="rig-1"):
    tier, step = plan(start, end, clock(), step)
    answer = store.query(device, tier, start, end, step)
    return None if answer is None else decoded(answer)


def test_forty_days_are_kept_as_seconds_minutes_and_hours_and_pruned_as_they_age(make_store):
    now = int(time.time()) // 3600 * 3600
    clock = Clock(now - 40 * DAY)
    store, feeder = make_store(clock, max_gap_s=600)
    # 40 days at one push every 5 minutes (utilization: the day number), then the last hour every second.
    for day in range(40):
        events = [event(t, util=day) for t in range(now - (40 - day) * DAY, now - (39 - day) * DAY, 300)
                  if t < now - 3600]
        clock.now = events[-1]["receivedAt"]
        feeder.feed(events)
    clock.now = now
    feeder.feed([event(now - 3600 + i, util=50) for i in range(3600)])
    feeder.feed([])  # the prune that runs once a minute

    recent = read(store, clock, now - 600, now)
    [gpu] = recent["gpus"]
    assert recent["step"] == 1 and gpu["t"] == list(range(now - 600, now))  # seconds, as pushed
    assert set(gpu["utilizationGpu"]) == {50} and set(gpu["temperatureGpu"]) == {None}
    assert gpu["uuid"] == "GPU-0" and gpu["name"] == "NVIDIA L40S"

    # 10 days ago: minutes are kept, seconds are pruned after 24 hours.
    ten_days_ago = now - 10 * DAY
    minutes = read(store, clock, ten_days_ago, ten_days_ago + 3599)  # from and to are both included
    assert minutes["step"] == 60 and len(minutes["gpus"][0]["t"]) == 12  # one push every 5 minutes
    assert store.query("rig-1", SECOND, ten_days_ago, ten_days_ago + 3600, 1)["gpus"] == []
    with pytest.raises(ValueError, match="step: .* multiple of 60"):
        read(store, clock, ten_days_ago, ten_days_ago + 3600, step=1)

    # 35 days ago: hours only; minutes are pruned after 30 days.
    days_35_ago = now - 35 * DAY
    hours = read(store, clock, days_35_ago, days_35_ago + DAY - 1)
    assert hours["step"] == 3600 and len(hours["gpus"][0]["t"]) == 24
    assert set(hours["gpus"][0]["utilizationGpu"]) == {5}  # the mean of the hour's 12 samples
    assert store.query("rig-1", MINUTE, days_35_ago, days_35_ago + DAY, 3600)["gpus"] == []

    # 30 days in hours: the energy is 100 W for every hour that had samples at most 600 s apart.
    month = read(store, clock, now - 30 * DAY, now)
    assert month["step"] == 3600
    assert month["gpus"][0]["energyWh"] == pytest.approx(100 * 24 * 30, rel=0.01)


def test_a_gap_without_samples_draws_no_energy_and_leaves_no_bucket(make_store):
    now = int(time.time())
    clock = Clock(now)
    store, feeder = make_store(clock, max_gap_s=15)
    first = [event(now - 600 + i * 2, util=10, power=200.0) for i in range(30)]  # a minute at 200 W
    second = [event(now - 300 + i * 2, util=20, power=200.0) for i in range(30)]  # 4 minutes later, another
    feeder.feed(first + second)
    answer = read(store, clock, now - 600, now)
    [gpu] = answer["gpus"]
    assert len(gpu["t"]) == 60 and now - 540 not in gpu["t"]  # no entry in the gap
    assert gpu["energyWh"] == pytest.approx(2 * 200 * 58 / 3600, rel=0.01)  # 58 s each; the gap counts nothing


def test_buckets_hold_the_mean_of_what_was_reported_and_null_where_nothing_was(make_store):
    now = int(time.time()) // 60 * 60
    clock = Clock(now)
    store, feeder = make_store(clock)
    feeder.feed([event(now - 120 + i, util=u, power=None, index=1) for i, u in enumerate([10, 30, None, 50])])
    answer = read(store, clock, now - 120, now, step=60)
    [gpu] = answer["gpus"]
    assert gpu["index"] == 1 and gpu["t"] == [now - 120]
    assert gpu["utilizationGpu"] == [30] and gpu["powerDraw"] == [None] and gpu["energyWh"] == 0
    # A range inside one hour, in hours: the bucket it falls in, not nothing.
    [hour] = read(store, clock, now - 119, now - 100, step=3600)["gpus"]
    assert hour["t"] == [(now - 120) // 3600 * 3600] and hour["utilizationGpu"] == [30]


def test_two_pushes_in_one_second_keep_the_newest_point_and_all_the_energy(make_store):
    now = int(time.time())
    clock = Clock(now)
    store, feeder = make_store(clock)
    feeder.feed([event(now - 10.9, util=1), event(now - 10.2, util=2), event(now - 9.5, util=3)])
    [gpu] = read(store, clock, now - 60, now)["gpus"]
    assert gpu["t"] == [now - 11, now - 10] and gpu["utilizationGpu"] == [2, 3]
    assert gpu["energyWh"] == pytest.approx(100 * 1.4 / 3600, rel=0.01)


def test_an_unknown_device_has_no_history(make_store):
    clock = Clock(time.time())
    store, feeder = make_store(clock)
    feeder.feed([event(clock.now - 5, util=1)])
    assert read(store, clock, clock.now - 60, clock.now, device="rig-2") is None


@pytest.mark.parametrize("span, step, tier", [
    (600, 1, SECOND), (3600, 5, SECOND), (6 * 3600, 30, SECOND), (DAY, 120, MINUTE),
    (7 * DAY, 900, MINUTE), (30 * DAY, 3600, HOUR), (365 * DAY, 43200, HOUR)])
def test_the_default_step_is_the_finest_kept_that_gives_at_most_1000_points(span, step, tier):
    now = 1_800_000_000
    assert plan(now - span, now, now) == (tier, step)


def test_a_step_is_refused_when_that_resolution_is_not_kept_or_gives_too_many_points():
    now = 1_800_000_000
    assert plan(now - 600, now, now, step=7) == (SECOND, 7)
    assert plan(now - 7 * DAY, now, now, step=120) == (MINUTE, 120)
    with pytest.raises(ValueError, match="step: .* kept in 3600 s buckets"):
        plan(now - 60 * DAY, now, now, step=60)
    with pytest.raises(ValueError, match="step: 1 s gives 86400 buckets"):
        plan(now - DAY, now, now, step=1)


def test_a_redis_writer_that_lost_its_lease_writes_nothing_and_the_next_one_goes_on(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    now = int(time.time())
    clock = Clock(now)
    first, second = RedisHistory(client, 15, clock=clock), RedisHistory(client, 15, clock=clock)
    feeder = Feeder(first, client)
    feeder.feed([event(now - 20 + i, util=i) for i in range(10)])
    client.delete("gpustats:historian")  # first's lease lapses; second takes over from the cursor
    second.flush()
    feeder.store = second
    feeder.feed([event(now - 10 + i, util=10 + i) for i in range(10)])
    stale_cursor = first._cursor
    first.write()  # still thinks it leads: the cursor moved, so it writes nothing
    assert first._cursor == stale_cursor
    [gpu] = read(second, clock, now - 60, now)["gpus"]
    assert gpu["utilizationGpu"] == list(range(20))
    assert gpu["energyWh"] == pytest.approx(100 * 19 / 3600, rel=0.01)  # energy runs on across writers
    assert json.loads(client.hget("gpustats:hist:gpus:rig-1", "0")) == ["GPU-0", "NVIDIA L40S"]


def test_pushes_trimmed_from_the_stream_before_the_redis_writer_wrote_them_are_logged(redis_server, caplog):
    client = redis.Redis.from_url(redis_server.url)
    now = int(time.time())
    clock = Clock(now)
    store = RedisHistory(client, 15, clock=clock)
    feeder = Feeder(store, client)
    feeder.feed([event(now - 30 + i, util=i) for i in range(5)])
    ids = [client.xadd(STREAM, {"d": "rig-1", "e": "", "b": sse.data_block(event(now - 20 + i, util=i)),
                                "n": next(feeder.n)}) for i in range(5)]
    client.xdel(STREAM, *ids[:3])  # trimmed (RING_SIZE) while the writer was away
    store.flush()
    assert "history missed 3 events" in caplog.text
    [gpu] = read(store, clock, now - 60, now)["gpus"]
    assert len(gpu["t"]) == 7  # the rest were written


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "sqlite"])
def test_a_clock_step_either_way_prunes_nothing(tmp_path, caplog, on_disk):
    # Issue 20: the wall clock 31 days ahead for 3 s took the 24 h of minute buckets from 89,920 to 0.
    now = int(time.time()) // 60 * 60
    wall, steady = Clock(now - DAY), Clock(0.0)
    store = SqliteHistory(str(tmp_path / "history.sqlite3") if on_disk else "", 600, clock=wall, prune_s=0,
                          steady=steady)
    feeder = Feeder(store)
    for t in range(now - DAY + 60, now, 60):  # a day at one push a minute; a prune at every write
        wall.now, steady.now = t, t - (now - DAY)
        feeder.feed([event(t, util=50)])

    def kept():
        return len(read(store, wall, now - DAY + 60, now - 1, step=60)["gpus"][0]["t"])
    before = kept()
    assert before == 1439
    for jump in (31 * DAY, -3 * DAY):
        for _ in range(3):  # three writes, three prunes, a second apart on the steady clock
            wall.now, steady.now = wall.now + 1, steady.now + 1
            wall.now += jump if _ == 0 else 0
            store.flush()
        wall.now -= jump  # the clock is put right
        steady.now += 1
        store.flush()
        assert kept() == before
    steps = [r.getMessage() for r in caplog.records if "wall clock stepped" in r.getMessage()]
    assert len(steps) == 2 and "ahead by 31.0 days" in steps[0] and "back by 3.0 days" in steps[1]


def test_a_step_that_holds_is_followed_after_a_minute():
    wall, steady = Clock(1_000_000.0), Clock(0.0)
    trusted = tiers.TrustedClock(wall, steady, hold_s=60)
    wall.now += 86400  # set right by an operator: it stays
    assert trusted.now() == 1_000_000.0
    wall.now, steady.now = wall.now + 59, 59
    assert trusted.now() == 1_000_059.0
    wall.now, steady.now = wall.now + 1, 60
    assert trusted.now() == 1_000_060.0 + 86400


def test_present_pushes_are_kept_after_the_clock_ran_an_hour_ahead(make_store, tmp_path):
    # Issue 20: after +1 h for 5 s, every push was answered 200 but none kept for the next hour,
    # even across a restart (the future sample was loaded again as the newest).
    now = int(time.time()) - 60
    clock = Clock(now)
    store, feeder = make_store(clock)
    feeder.feed([event(now + i, util=10) for i in range(5)])
    clock.now = now + 3605
    feeder.feed([event(now + 3605 + i, util=99) for i in range(5)])  # the clock an hour ahead
    clock.now = now + 10
    feeder.feed([event(now + 10 + i, util=20) for i in range(5)])  # back in step
    [gpu] = read(store, clock, now, now + 30)["gpus"]
    assert gpu["t"] == [now + i for i in range(5)] + [now + 10 + i for i in range(5)]
    assert gpu["utilizationGpu"] == [10] * 5 + [20] * 5
    again, feeder = make_store(clock)  # a restart: the newest kept sample is the future one again
    feeder.feed([event(now + 20 + i, util=30) for i in range(5)])
    [gpu] = read(again, clock, now + 20, now + 30)["gpus"]
    assert gpu["utilizationGpu"] == [30] * 5


def test_a_redis_writer_that_lost_its_cursor_counts_nothing_twice(redis_server, caplog):
    # Issue 20: an evicting maxmemory-policy dropped gpustats:hist:cursor, the writer started over
    # from the stream's oldest entry, and the stored energy doubled.
    client = redis.Redis.from_url(redis_server.url)
    now = int(time.time())
    clock = Clock(now)
    store = RedisHistory(client, 15, clock=clock)
    store.begin()
    feeder = Feeder(store, client)
    feeder.feed([event(now - 40 + i, util=i) for i in range(10)])
    client.delete("gpustats:hist:cursor", "gpustats:hist:last")  # evicted, while it runs
    feeder.feed([event(now - 30 + i, util=10 + i) for i in range(10)])
    assert "history's cursor gpustats:hist:cursor was gone" in caplog.text
    client.delete("gpustats:hist:cursor", "gpustats:hist:last")  # evicted, then a restart
    again = RedisHistory(client, 15, clock=clock)
    again.begin()
    feeder.store = again
    feeder.feed([event(now - 20 + i, util=20 + i) for i in range(10)])
    [gpu] = read(again, clock, now - 60, now)["gpus"]
    assert "history's cursor gpustats:hist:cursor is gone" not in caplog.text  # begin() kept a new one
    assert gpu["utilizationGpu"] == list(range(30))
    assert gpu["energyWh"] <= 100 * 29 / 3600 * 1.01  # never the same samples' energy twice


def test_a_full_disk_is_one_line_a_minute_with_the_samples_dropped(tmp_path, caplog):
    # Issue 20: a disk-full history write logged two tracebacks a second and counted nothing.
    caplog.set_level(logging.INFO, "gpustats")
    now = int(time.time()) - 100
    clock = Clock(now)
    store = SqliteHistory(str(tmp_path / "history.sqlite3"), 15, clock=clock, steady=clock)
    feeder = Feeder(store)
    feeder.feed([event(now, util=1)])
    pages = store._writer.run(lambda: store._db.execute("PRAGMA page_count").fetchone()[0])
    store._writer.run(lambda: store._db.execute(f"PRAGMA max_page_count = {pages}"))  # SQLite's own "disk is full"
    for second in range(1, 91):  # 90 s of writes, 64 GPUs each
        clock.now = now + second
        feeder.feed([event(now + second, util=second, index=i) for i in range(64)])
    lines = [r for r in caplog.records if r.name == "gpustats" and "history cannot be written" in r.getMessage()]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)  # at once, then a minute later
    assert "database or disk is full" in lines[0].getMessage() and ": 64 samples dropped" in lines[0].getMessage()
    assert ": 3840 samples dropped" in lines[1].getMessage()  # the 60 s since the first line
    store._writer.run(lambda: store._db.execute("PRAGMA max_page_count = 1000000"))
    clock.now += 1
    feeder.feed([event(clock.now, util=5)])
    assert "history is written again" in caplog.text



def test_healthz_says_how_many_samples_wait_for_the_history_writer(tmp_path, make_app):
    store = SqliteHistory(str(tmp_path / "history.sqlite3"), 15)
    for t in range(3):
        store.add(event(1_700_000_000 + t, util=50))
    assert store.backlog() == 3
    store.flush()  # the writer takes what gathered, once a second
    assert store.backlog() == 0
    app = make_app(HISTORY_DB=str(tmp_path / "app.sqlite3"), DEVICE_KEYS="rig-1:" + "k" * 24)
    assert app.test_client().get("/healthz").json["historyBacklog"] == 0


def hosted(t, cpu, memory=402113, rx=1250000.0, tx=None, **fields):
    """A push with its host: `system` as the agent sends it."""
    return {**event(t, util=cpu, **fields), "system": {
        "cpuPercent": cpu, "memoryTotal": 1547521, "memoryUsed": memory, "netRx": rx, "netTx": tx,
        "disks": [{"mount": "/", "total": 1831420, "used": 620013}]}}


def test_the_host_is_kept_beside_the_gpus_in_the_same_tiers_without_energy(make_store):
    now = int(time.time()) // 3600 * 3600
    clock = Clock(now - 3 * DAY)
    store, feeder = make_store(clock, max_gap_s=600)
    # Two days ago, one push every 5 minutes at 10 % CPU; then the last 10 minutes every second at 40 %.
    old = [hosted(t, cpu=10) for t in range(now - 2 * DAY, now - 2 * DAY + 3600, 300)]
    clock.now = old[-1]["receivedAt"]
    feeder.feed(old)
    clock.now = now
    feeder.feed([hosted(now - 600 + i, cpu=40, rx=1000.0 * i) for i in range(600)] + [event(now, util=5)])

    recent = read(store, clock, now - 600, now)
    [gpu], system = recent["gpus"], recent["system"]
    assert [g["index"] for g in recent["gpus"]] == [0]  # the host is no GPU
    assert system["t"] == list(range(now - 600, now)) and set(system["cpuPercent"]) == {40}
    assert set(system["memoryUsed"]) == {402113} and system["netRx"][:3] == [0, 1000, 2000]
    assert set(system["netTx"]) == {None} and set(system) == {"t", "cpuPercent", "memoryUsed", "netRx", "netTx"}
    assert gpu["energyWh"] == pytest.approx(100 * 600 / 3600, rel=0.01)  # the GPU's, the host adds none

    minutes = read(store, clock, now - 2 * DAY, now - 2 * DAY + 3599)
    assert minutes["step"] == 60 and len(minutes["system"]["t"]) == 12 and set(minutes["system"]["cpuPercent"]) == {10}
    hours = read(store, clock, now - 2 * DAY, now, step=3600)
    assert hours["system"]["cpuPercent"][0] == 10 and hours["system"]["cpuPercent"][-1] == 40


def test_a_device_without_host_samples_in_range_has_no_system(make_store):
    now = int(time.time())
    clock = Clock(now)
    store, feeder = make_store(clock)
    feeder.feed([hosted(now - 500, cpu=10), event(now - 100, util=5)])
    answer = read(store, clock, now - 300, now)
    assert "system" not in answer and len(answer["gpus"]) == 1
    assert "system" in read(store, clock, now - 600, now)
    assert store.delete("rig-1") > 0 and store.query("rig-1", SECOND, now - 600, now, 1) is None

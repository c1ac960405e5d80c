"""Scale-out on a real redis-server: two servers (or two workers) serve one fleet."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, RedisServer, Stream, gpu, host_system, multi, procfile_command, wait_for


@pytest.fixture
def pair(redis_server, start_server):
    """Two servers, as on two hosts, sharing one Redis."""
    return (start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000"),
            start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000"))


def data_events(stream, count, timeout=5):
    """Read `count` data events (not status), in order."""
    return [stream.until(lambda e: e["event"] is None, timeout=timeout) for _ in range(count)]


def test_a_push_into_one_server_reaches_the_viewers_of_both_once_and_in_order(pair, open_stream):
    a, b = pair
    viewers = [open_stream(a), open_stream(b), open_stream(b)]
    sent = [(a if n % 2 else b).push(multi(gpu(0, utilizationGpu=n))).json()["id"] for n in range(10)]
    for viewer in viewers:
        got = data_events(viewer, 10)
        assert [e["id"] for e in got] == sent
        assert [e["data"]["gpus"][0]["utilizationGpu"] for e in got] == list(range(10))
    with pytest.raises(TimeoutError):
        viewers[0].until(lambda e: e["event"] is None, timeout=1)  # and nothing twice


def test_a_viewer_cut_off_from_one_server_resumes_on_the_other_and_misses_nothing(pair, open_stream):
    a, b = pair
    on_a = open_stream(a)
    seen = a.push(multi(gpu(0, utilizationGpu=1))).json()["id"]
    assert on_a.next()["id"] == seen
    a.stop()  # a deploy takes host A away; its viewers reconnect to B with Last-Event-ID
    missed = [b.push(multi(gpu(0, utilizationGpu=n))).json()["id"] for n in (2, 3, 4)]
    on_b = open_stream(b, headers={"Last-Event-ID": seen})
    got = data_events(on_b, 3)
    assert [e["id"] for e in got] == missed and not any("snapshot" in e["data"] for e in got)


def test_a_server_started_a_moment_ago_shows_the_whole_fleet_from_redis(redis_server, start_server, open_stream):
    first = start_server(REDIS_URL=redis_server.url)
    for device in ("rig-1", "rig-2"):
        first.push(multi(gpu(0, utilizationGpu=33)), device=device)
    fresh = start_server(REDIS_URL=redis_server.url)
    snapshot = fresh.snapshot()
    assert [e["device"] for e in snapshot] == ["rig-1", "rig-2"]
    assert all(e["gpus"][0]["utilizationGpu"] == 33 for e in snapshot)
    assert fresh.health()["devices"] == 2 and fresh.health()["redis"] == "up"


def test_a_pcs_host_pushed_into_one_server_is_on_the_other_live_and_in_its_snapshot(pair, open_stream):
    a, b = pair
    on_b = open_stream(b)
    system = host_system(cpuPercent=77.5)
    a.push({**multi(gpu(0)), "system": system})
    assert data_events(on_b, 1)[0]["data"]["system"] == system
    assert b.snapshot()[0]["system"] == system


def test_statuses_and_rate_limits_happen_once_for_the_fleet(redis_server, start_server, open_stream):
    a = start_server(REDIS_URL=redis_server.url, STALE_AFTER_S="1", OFFLINE_AFTER_S="30", PUSH_RATE_LIMIT="1")
    b = start_server(REDIS_URL=redis_server.url, STALE_AFTER_S="1", OFFLINE_AFTER_S="30", PUSH_RATE_LIMIT="1")
    viewers = [open_stream(a), open_stream(b)]
    # One bucket for the device, wherever its pushes land: a burst of 2, then 429.
    assert [a.push(multi()).status_code, b.push(multi()).status_code, a.push(multi()).status_code] == [200, 200, 429]
    for viewer in viewers:
        stale = viewer.until(lambda e: e["event"] == "status", timeout=5)
        assert stale["data"]["status"] == "stale"
    quiet_until = time.monotonic() + 1.5  # one window for both viewers: each hears nothing more in it
    for viewer in viewers:
        with pytest.raises(TimeoutError):  # one sweep for the fleet, not one per server
            viewer.until(lambda e: e["event"] == "status", timeout=max(0.01, quiet_until - time.monotonic()))


def test_when_the_sweeping_server_dies_another_takes_over(redis_server, start_server, open_stream):
    settings = dict(REDIS_URL=redis_server.url, STALE_AFTER_S="1", OFFLINE_AFTER_S="30")
    a = start_server(**settings)
    wait_for(lambda: redis_server_client(redis_server).get("gpustats:sweeper"))  # A holds the lease
    b = start_server(**settings)
    viewer = open_stream(b)
    worker = a.worker_pid
    a.process.kill()  # host A dies whole: its master and its worker, with no goodbye to Redis
    os.kill(worker, signal.SIGKILL)
    b.push(multi())
    stale = viewer.until(lambda e: e["event"] == "status", timeout=8)  # lease (3 s) + STALE_AFTER_S
    assert stale["data"]["status"] == "stale"


def redis_server_client(server):
    import redis
    return redis.Redis(port=server.port, socket_timeout=1)


def test_two_workers_under_one_gunicorn_give_every_viewer_every_push_once(redis_server, start_server):
    server = start_server(REDIS_URL=redis_server.url, WEB_CONCURRENCY="2", PUSH_RATE_LIMIT="1000")
    wait_for(lambda: server.output().count("Booting worker") == 2)
    viewers = [Stream(server.port) for _ in range(8)]  # the kernel spreads them over both workers
    try:
        sent = [server.push(multi(gpu(0, utilizationGpu=n)), device=f"rig-{n % 3 + 1}").json()["id"]
                for n in range(12)]
        for viewer in viewers:
            assert [e["id"] for e in data_events(viewer, 12)] == sent
    finally:
        for viewer in viewers:
            viewer.close()


def test_redis_down_then_back_pushes_get_503_streams_stay_open_and_flow_again(redis_server, start_server,
                                                                              open_stream):
    server = start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000")
    viewer = open_stream(server)
    first = server.push(multi(gpu(0, utilizationGpu=10))).json()["id"]
    assert viewer.next()["id"] == first
    redis_server.stop()
    refused = server.push(multi(gpu(0, utilizationGpu=99)))
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "Redis" in refused.json()["error"]
    wait_for(lambda: server.health()["redis"] == "down")
    assert viewer.next(with_comments=True, timeout=2)["event"] == ":comment"  # the stream stays open
    redis_server.start()  # on the same port, empty: no persistence in these tests
    back = time.monotonic()
    answer = wait_for(lambda: (r := server.push(multi(gpu(0, utilizationGpu=20)))).status_code == 200 and r,
                      timeout=5, interval=0.1)
    event = viewer.until(lambda e: e.get("data", {}).get("gpus"), timeout=5)
    assert time.monotonic() - back < 5
    # Events this worker had not read may be gone with Redis' data: a fresh snapshot, then live.
    assert event["id"] == answer.json()["id"] or event["data"].get("snapshot")
    assert server.health()["redis"] == "up"
    assert "Traceback" not in server.output()


def test_a_push_refused_while_redis_is_down_changes_nothing_once_it_is_back(tmp_path, start_server):
    durable = RedisServer(tmp_path, persist=True).start()  # its data survives its restart
    try:
        server = start_server(REDIS_URL=durable.url, PUSH_RATE_LIMIT="1000")
        server.push(multi(gpu(0, utilizationGpu=10)))
        before = server.state()
        durable.stop()
        assert server.push(multi(gpu(0, utilizationGpu=99)), device="rig-2").status_code == 503
        durable.start()
        wait_for(lambda: server.health()["redis"] == "up")
        assert server.state() == before
    finally:
        durable.stop()


def test_more_than_one_worker_without_redis_stops_the_server_with_one_line():
    env = {**os.environ, "ENV_FILE": os.devnull, "PORT": "0", "WEB_CONCURRENCY": "2",
           "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("REDIS_URL", None)
    result = subprocess.run(["sh", "-c", "exec " + procfile_command()], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("config error: WEB_CONCURRENCY: 2 workers need REDIS_URL to share one "
                                     "fleet; set REDIS_URL or run 1 worker")


def test_the_bad_key_slow_down_counts_across_servers(pair):
    from test_faults import push_from
    a, b = pair
    codes = [push_from(a if n % 2 else b, "127.0.0.5", f"guess-number-{n:02d}-xxxxxxxx")[0] for n in range(11)]
    assert codes == [401] * 10 + [429]  # ten bad keys in all, wherever they were tried
    assert push_from(a, "127.0.0.6", "guess-from-elsewhere-xxxx")[0] == 401  # per address


def test_a_hung_redis_freezes_no_viewer_and_no_health_check(redis_server, start_server, open_stream):
    server = start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000")
    server.push(multi(gpu(0, utilizationGpu=40)))
    watcher = open_stream(server)
    assert watcher.next()["data"]["snapshot"] is True
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # hung, not gone: no reset, no answer
    try:
        started = time.monotonic()
        assert server.health()["devices"] == 1 and time.monotonic() - started < 1
        newcomer = open_stream(server)  # its snapshot comes from the worker's own mirror
        assert newcomer.next(timeout=1)["data"]["gpus"][0]["utilizationGpu"] == 40
        assert watcher.next(with_comments=True, timeout=1)["event"] == ":comment"  # heartbeats go on
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    answer = wait_for(lambda: (r := server.push(multi(gpu(0, utilizationGpu=41)))).status_code == 200 and r,
                      timeout=10, interval=0.2)
    assert watcher.until(lambda e: e["id"] == answer.json()["id"], timeout=5)


def test_entries_a_worker_missed_or_cannot_read_never_stall_it(redis_server, start_server, open_stream):
    server = start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000")
    first = server.push(multi(gpu(0, utilizationGpu=1))).json()["id"]
    viewer = open_stream(server)
    assert viewer.next()["id"] == first
    client = redis_server_client(redis_server)
    client.xadd("gpustats:events", {"junk": "not one of ours"})  # a malformed entry: skipped, logged
    client.incr("gpustats:seq", 5)  # as if entries were trimmed before this worker read them
    after = server.push(multi(gpu(0, utilizationGpu=2))).json()["id"]
    event = viewer.until(lambda e: e["event"] is None, timeout=5)
    assert event["data"].get("snapshot") is True and event["data"]["gpus"][0]["utilizationGpu"] == 2  # start over
    again = server.push(multi(gpu(0, utilizationGpu=3))).json()["id"]
    assert viewer.until(lambda e: e["event"] is None, timeout=5)["id"] == again != after
    wait_for(lambda: "skipped a malformed entry" in server.output() and "skipped from" in server.output())


def test_redis_out_of_memory_is_said_in_healthz_and_once_in_the_log(redis_server, start_server):
    # Issue 20: at maxmemory (noeviction) every push was a 503 while /healthz said "up", the refused
    # pushes logged nothing, and the alerter and history writer logged 1,600 tracebacks in 25 s.
    import redis
    server = start_server(REDIS_URL=redis_server.url, PUSH_RATE_LIMIT="1000",
                          ALERT_WEBHOOK_URLS="http://127.0.0.1:9/hook")  # the alert sender's lease writes too
    assert server.push(multi()).status_code == 200
    client = redis.Redis(port=redis_server.port)
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 256 * 1024)
    with pytest.raises(redis.OutOfMemoryError):
        for n in range(100_000):
            client.set(f"junk:{n}", "x" * 1024)
    # Well past it, not at its edge, where a write that frees a little (a trimmed stream) may pass.
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) - 128 * 1024)
    for _ in range(20):
        answer = server.push(multi())
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
        assert answer.json()["error"] == "the shared store (Redis) is out of memory; try again shortly"
    assert server.health()["redis"] == "out of memory"
    time.sleep(3)  # the history writer, the alerter, the counters and the sender's lease keep trying
    log = server.output()
    assert "Traceback" not in log
    assert log.count("Redis is out of memory") == 1, log
    assert "writes it refused: pushes 1." in log  # the first refusal is said at once, the rest once a minute
    client.config_set("maxmemory", 0)
    wait_for(lambda: server.push(multi()).status_code == 200, timeout=5)
    wait_for(lambda: server.health()["redis"] == "up", timeout=8)  # 5 s with no refusal: not the edge of maxmemory
    wait_for(lambda: "Redis takes writes again" in server.output(), timeout=5)


def test_an_evicting_redis_is_warned_about_at_start(redis_server, start_server):
    import redis
    redis.Redis(port=redis_server.port).config_set("maxmemory-policy", "allkeys-lru")
    server = start_server(REDIS_URL=redis_server.url)
    assert "Redis' maxmemory-policy is allkeys-lru" in server.output()

"""/metrics with REDIS_URL: a scrape of any worker counts the whole server, and Redis down is a 503."""
import pytest

from conftest import gpu, multi, wait_for
from test_metrics import make_app, push, scrape, seen  # noqa: F401 make_app is a fixture


@pytest.fixture
def backend():
    return "redis"


def test_a_scrape_of_either_worker_counts_the_pushes_and_viewers_of_both(make_app):
    one, other = make_app().test_client(), make_app().test_client()
    assert push(one, multi(gpu(0))).status_code == 200
    assert push(other, multi(gpu(0, temperatureGpu="hot")), device="rig-2").status_code == 400
    stream = one.get("/gpu/stream", buffered=False)
    try:
        # Each worker adds what it counted to Redis once a second.
        for client in (one, other):
            metrics = wait_for(lambda: (s := scrape(client)).value("gpustats_pushes_total", code="400") == 1
                               and s.value("gpustats_stream_subscribers") == 1 and s, timeout=3)
            assert metrics.value("gpustats_pushes_total", code="200") == 1
            assert seen(client).value("gpustats_gpu_temperature_celsius", device="rig-1", gpu="0",
                                      uuid=gpu(0)["uuid"], name="NVIDIA GeForce RTX 3080") == 65
    finally:
        stream.close()
    wait_for(lambda: scrape(other).value("gpustats_stream_subscribers") == 0, timeout=3)


def test_a_count_never_goes_down_from_one_workers_scrape_to_the_others(make_app):
    one, other = make_app().test_client(), make_app().test_client()
    for _ in range(3):
        assert push(one, multi(gpu(0))).status_code == 200
        seen_here = scrape(one).value("gpustats_pushes_total", code="200")
        seen_there = scrape(other).value("gpustats_pushes_total", code="200")
        assert seen_here <= seen_there  # a scrape answers with what Redis holds, never a worker's own share


def test_redis_down_is_a_503_and_what_was_counted_meanwhile_is_kept(make_app, redis_server):
    client = make_app().test_client()
    push(client, multi(gpu(0)))
    seen(client)
    redis_server.kill()
    answer = client.get("/metrics")
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert "Redis" in answer.get_json()["error"]
    assert push(client, multi(gpu(0))).status_code == 503
    redis_server.start()  # empty: what Redis held is gone, what this worker counted since is not
    other = make_app().test_client()  # sees only what reached Redis
    metrics = wait_for(lambda: scrape(other).value("gpustats_pushes_total", code="503") == 1 and scrape(client))
    assert metrics.value("gpustats_pushes_total", code="503") == 1

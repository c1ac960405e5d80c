"""The Redis alerter: one for the fleet at a time, carrying on where the last one stopped."""
import itertools
import json

import redis

from gpustats.stream import sse
from gpustats.alerts.redis import LEASE, RedisAlerter
from gpustats.alerts.rules import AlertSettings
from gpustats.alerts.redis import ALERTS
from gpustats.scaleout import STREAM, read_entry
from gpustats.alerts.formats import parse_destinations
from gpustats.alerts.redis import RedisOutbox

T0 = 1_790_000_000.0


class Stream:
    """Append entries the way RedisFleet's COMMIT and SET_STATUS do."""

    def __init__(self, client):
        self.client, self.n = client, itertools.count(int(client.get("gpustats:seq") or 0) + 1)

    def push(self, t, temperature):
        event = {"device": "rig-1", "receivedAt": T0 + t, "error": None,
                 "gpus": [{"index": 0, "temperatureGpu": temperature}]}
        n = next(self.n)
        self.client.set("gpustats:seq", n)
        self.client.xadd(STREAM, {"d": "rig-1", "e": "", "b": sse.data_block(event), "n": n})

    def alerts(self):
        entries = [read_entry(fields) for _, fields in self.client.xrange(STREAM)]
        return [(data["alertname"], data["status"]) for _, _, name, data in entries if name == "alert"]


def alerter(client):
    outbox = RedisOutbox(client, parse_destinations("https://alerts.example.com/hook"))
    return RedisAlerter(client, AlertSettings(for_s=30), outbox, ring_size=1000), outbox


def test_an_alerter_that_lost_its_lease_writes_nothing_and_the_next_one_carries_on(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    stream = Stream(client)
    (first, outbox), (second, _) = alerter(client), alerter(client)
    first.start(), first.close()  # start() only sets the first cursor; close() stops the loop it began
    for t in range(0, 20, 2):
        stream.push(t, 90)
    first.flush()
    assert stream.alerts() == []  # hot for 18 s of the 30 s hold-down
    client.delete(LEASE)  # first's lease lapses; second takes over from the cursor and the saved timers
    second.flush()
    for t in range(20, 40, 2):
        stream.push(t, 90)
    second.flush()
    assert stream.alerts() == [("GpuHot", "firing")]  # at 30 s, counted from the first's 0 s
    first._round()  # still thinks it leads: the cursor moved, so it writes nothing
    assert stream.alerts() == [("GpuHot", "firing")]
    assert outbox.pending() == 1
    state = json.loads(client.get(ALERTS))
    assert [a["alertname"] for a in state["recent"]] == ["GpuHot"]

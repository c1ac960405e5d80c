"""The contracts of the backend pairs (the Protocols in each capability's __init__.py), each run against both sides.

Every fixture gives one capability's backend in this process (or in SQLite) and in a real
redis-server; the tests call the Protocol's methods only. What other files already run on both
sides is not repeated: history's tiers and energy (test_history.py), jobs (test_jobs.py), the sender's retries and a
stale finish (test_alerts_sender.py), and the whole server over each backend (test_access*.py,
test_devices.py, test_metrics*.py, test_scale_out.py).
"""
import inspect
import json
import time

import pytest
import redis

from conftest import gpu, wait_for
from gpustats.access import AccountStore, SignInThrottling
from gpustats.access.accounts import AccountError
from gpustats.access.redis import RedisAccounts, RedisSignInThrottle
from gpustats.access.sqlite import SqliteAccounts
from gpustats.access.throttle import FIRST_WAIT_S, FREE_FAILS, SignInThrottle
from gpustats.alerts import AlertEvaluator, Outbox
from gpustats.alerts.alerter import Alerter
from gpustats.alerts.formats import parse_destinations
from gpustats.alerts.redis import RedisAlerter, RedisOutbox
from gpustats.alerts.rules import AlertBoard, AlertSettings
from gpustats.alerts.sender import MemoryOutbox
from gpustats.alerts.sqlite import SavedState, SqliteOutbox
from gpustats.devices import DeviceStore
from gpustats.devices.redis import RedisDevices
from gpustats.devices.registry import DeviceError
from gpustats.devices.sqlite import SqliteDevices
from gpustats.fleet import LiveFleet
from gpustats.fleet.memory import Fleet
from gpustats.fleet.redis import RedisFleet
from gpustats.history import HistoryStore
from gpustats.history.redis import RedisHistory
from gpustats.history.routes import to_json
from gpustats.history.sqlite import SqliteHistory
from gpustats.history.tiers import SECOND
from gpustats.ingest import RateLimit
from gpustats.ingest.ratelimit import RateLimiter
from gpustats.ingest.redis import RedisRateLimiter
from gpustats.jobs import JobStore
from gpustats.jobs.redis import RedisJobs
from gpustats.jobs.sqlite import SqliteJobs
from gpustats.metrics import ServerCounts
from gpustats.metrics.counters import Counters
from gpustats.metrics.redis import RedisCounters
from gpustats.scaleout import SharedRedis
from gpustats.stream.broadcaster import Broadcaster
from gpustats.tokens import PREFIX_CHARS

CONTRACTS = {
    LiveFleet: (Fleet, RedisFleet),
    HistoryStore: (SqliteHistory, RedisHistory),
    JobStore: (SqliteJobs, RedisJobs),
    AlertEvaluator: (Alerter, RedisAlerter),
    Outbox: (MemoryOutbox, SqliteOutbox, RedisOutbox),
    AccountStore: (SqliteAccounts, RedisAccounts),
    SignInThrottling: (SignInThrottle, RedisSignInThrottle),
    RateLimit: (RateLimiter, RedisRateLimiter),
    ServerCounts: (Counters, RedisCounters),
    DeviceStore: (SqliteDevices, RedisDevices),
}
T0 = 1_790_000_000.0
STALE_S, OFFLINE_S = 15, 60


class Clock:
    def __init__(self, now):
        self.now = now

    def __call__(self):
        return self.now


def calls(cls):
    """Return {name: function} of a class's public methods, its bases' included."""
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.isfunction) if not name.startswith("_")}


def parameters(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def push(*gpus):
    """Return a checked push, as payload.parse() hands it to the fleet."""
    return {"host": "rig", "sampledAt": T0, "agent": {"version": "1.0.0", "backend": "nvml", "simulated": False},
            "error": None, "gpus": list(gpus) or [gpu()]}


@pytest.mark.parametrize("protocol", CONTRACTS, ids=lambda protocol: protocol.__name__)
def test_each_contract_is_exactly_the_calls_its_backends_share_with_the_same_parameters(protocol):
    backends = CONTRACTS[protocol]
    # Both ways: a call added to every side and left out of the contract fails here too.
    assert set.intersection(*(set(calls(backend)) for backend in backends)) == set(calls(protocol))
    for backend in backends:
        for name, call in calls(protocol).items():
            assert parameters(getattr(backend, name)) == parameters(call), f"{backend.__name__}.{name}"
        for name in protocol.__annotations__:
            assert hasattr(backend, name), f"{backend.__name__}.{name}"


# ---- the fleet ---------------------------------------------------------------------------------

def new_fleet(kind, request, clock, history=None, alerter=None, board=None):
    """Start a fleet of `kind`, publishing through a broadcaster of its own, as create_app() does."""
    if kind == "redis":
        fleet = RedisFleet(SharedRedis(request.getfixturevalue("redis_server").url), STALE_S, OFFLINE_S, 64, clock=clock)
    else:
        fleet = Fleet(STALE_S, OFFLINE_S, history, alerter, board, clock=clock)
    fleet.start(Broadcaster(fleet.snapshot, ring_size=64, shared_ids=fleet.shared_ids), sweep_s=0.05)
    request.addfinalizer(fleet.close)
    assert isinstance(fleet, LiveFleet)
    return fleet


@pytest.fixture(params=["memory", "redis"])
def fleet(request):
    """Return (a started fleet of each kind, the clock it reads)."""
    clock = Clock(T0)
    return new_fleet(request.param, request, clock), clock


def test_an_accepted_push_is_what_the_snapshot_at_its_id_holds_and_a_bad_one_changes_nothing(fleet):
    fleet, _ = fleet
    with pytest.raises(ValueError):
        fleet.accept("rig-2", dict(push(), host="\ud800"))  # a lone surrogate: JSON carries it, UTF-8 cannot
    event_id = fleet.accept("rig-1", push(gpu(0, temperatureGpu=71)))
    (_, at), states = wait_for(lambda: fleet.snapshot()[0][1] == event_id and fleet.snapshot(), what="the push")
    assert at == event_id
    assert [(name, state["status"], state["receivedAt"], state["gpus"][0]["temperatureGpu"])
            for name, state in states] == [("rig-1", "online", T0, 71)]
    assert [device["device"] for device in fleet.devices()] == ["rig-1"]
    assert fleet.counts() == {"online": 1, "stale": 0, "offline": 0}
    assert fleet.alerts() == {"active": [], "recent": []} and isinstance(fleet.health(), dict)


def test_a_quiet_device_turns_stale_then_offline_and_a_removed_one_leaves_the_fleet(fleet):
    fleet, clock = fleet
    fleet.accept("rig-1", push())
    wait_for(fleet.devices, what="the push")
    clock.now = T0 + STALE_S
    wait_for(lambda: fleet.counts() == {"online": 0, "stale": 1, "offline": 0}, what="stale")
    clock.now = T0 + OFFLINE_S
    wait_for(lambda: fleet.devices()[0]["status"] == "offline", what="offline")
    fleet.forget("rig-1")
    wait_for(lambda: fleet.devices() == [] and fleet.snapshot()[1] == [], what="the removal")


# ---- history -------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
def history(request, tmp_path):
    """Return (a history store of each kind, accept(device, push)): pushes reach it as in the server."""
    if request.param == "redis":
        store = RedisHistory(redis.Redis.from_url(request.getfixturevalue("redis_server").url), STALE_S)
        fleet = new_fleet("redis", request, time.time)  # the store reads what the fleet appends to the stream
    else:
        store = SqliteHistory(str(tmp_path / "history.sqlite3"), STALE_S)
        fleet = new_fleet("memory", request, time.time, history=store)  # the fleet hands it each push
    assert isinstance(store, HistoryStore)
    return store, fleet.accept


def test_a_pushs_gpus_are_kept_read_back_counted_and_deleted(history):
    store, accept = history
    now = time.time()
    accept("rig-1", push(gpu(0, utilizationGpu=80), gpu(1, utilizationGpu=20, uuid="GPU-other")))
    wait_for(lambda: store.flush() or store.gpus("rig-1"), what="the write")
    assert [(index, uuid) for index, uuid, _, _ in store.gpus("rig-1")] == [(0, gpu()["uuid"]), (1, "GPU-other")]
    answer = json.loads(to_json(store.query("rig-1", SECOND, now - 60, now + 60, 1)))
    assert [g["utilizationGpu"] for g in answer["gpus"]] == [[80], [20]]
    points = store.points("rig-1")
    assert points > 0 and store.points("rig-2") == 0 and store.gpus("rig-2") is None
    assert store.delete("rig-1") == points
    assert store.points("rig-1") == 0 and store.gpus("rig-1") is None


def test_a_kept_state_has_its_last_status_and_a_forgotten_device_is_not_kept(history):
    store, accept = history
    accept("rig-1", push())
    accept("rig-2", push())
    store.keep_status("rig-1", "offline")
    store.forget_state("rig-2")
    store.flush()
    # [] where the fleet keeps each device's state itself (Redis): nothing to restore at a start.
    assert {event["device"]: event["status"] for event in store.last_states()} in ({"rig-1": "offline"}, {})


# ---- alerts ---------------------------------------------------------------------------------------

DESTINATIONS = "https://alerts.example.com/a, https://alerts.example.com/b"
HOT = {"alertname": "GpuHot", "status": "firing", "device": "rig-1", "gpu": 0, "summary": "rig-1:0 is at 91 °C"}
HOT_RESOLVED = dict(HOT, status="resolved")


@pytest.fixture(params=["memory", "redis"])
def alerting(request):
    """Return (fleet, evaluator, outbox, clock), wired as create_app() wires them."""
    clock, settings, destinations = Clock(T0), AlertSettings(for_s=30), parse_destinations(DESTINATIONS)
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
        outbox = RedisOutbox(client, destinations)
        evaluator = RedisAlerter(client, settings, outbox, ring_size=64)
        fleet = new_fleet("redis", request, clock)
    else:
        board, outbox = AlertBoard(), MemoryOutbox(destinations)
        evaluator = Alerter(settings, board, outbox)
        fleet = new_fleet("memory", request, clock, alerter=evaluator, board=board)
    assert isinstance(evaluator, AlertEvaluator)
    evaluator.flush()  # as at a start: what came before it is not news
    return fleet, evaluator, outbox, clock


def test_a_rule_broken_for_its_hold_down_fires_once_shows_in_the_fleet_and_is_queued_once(alerting):
    fleet, evaluator, outbox, clock = alerting
    for t in (0, 15, 30, 45):
        clock.now = T0 + t
        fleet.accept("rig-1", push(gpu(0, temperatureGpu=90)))
    evaluator.flush()
    active = wait_for(lambda: fleet.alerts()["active"], what="the alert")
    assert [(alert["alertname"], alert["status"], alert["device"]) for alert in active] == [
        ("GpuHot", "firing", "rig-1")]
    evaluator.flush()
    assert outbox.pending() == 2  # one message for each of the two destinations


@pytest.fixture(params=["memory", "sqlite", "redis"])
def outbox(request, tmp_path):
    """Return (an outbox of each kind, its two destinations)."""
    destinations = parse_destinations(DESTINATIONS)
    if request.param == "redis":
        found = RedisOutbox(redis.Redis.from_url(request.getfixturevalue("redis_server").url), destinations)
    elif request.param == "sqlite":
        found = SqliteOutbox(destinations, SavedState(str(tmp_path / "history.sqlite3")))
    else:
        found = MemoryOutbox(destinations)
    assert isinstance(found, Outbox)
    return found, destinations


def test_each_destination_gets_every_alert_in_order_from_its_own_queue(outbox):
    outbox, (a, b) = outbox
    assert outbox.head(a) is None and outbox.pending() == 0
    outbox.put(HOT)
    outbox.put(HOT_RESOLVED)
    assert outbox.pending() == 4 and outbox.head(a).alert == HOT
    outbox.later(a, outbox.head(a), 1, T0 + 5, "HTTP 500")
    tried = outbox.head(a)
    assert (tried.alert, tried.attempts, tried.next_at, tried.error) == (HOT, 1, T0 + 5, "HTTP 500")
    outbox.done(a, tried)
    assert outbox.head(a).alert == HOT_RESOLVED and outbox.head(b).alert == HOT and outbox.head(b).attempts == 0
    outbox.done(a, outbox.head(a))
    assert outbox.head(a) is None and outbox.pending() == 2


# ---- access ---------------------------------------------------------------------------------------

@pytest.fixture(params=["sqlite", "redis"])
def accounts(request, tmp_path):
    if request.param == "redis":
        store = RedisAccounts(redis.Redis.from_url(request.getfixturevalue("redis_server").url))
    else:
        store = SqliteAccounts(str(tmp_path / "history.sqlite3"))
    assert isinstance(store, AccountStore)
    return store


def refused(status, change, *args, **kwargs):
    with pytest.raises((AccountError, DeviceError)) as problem:
        change(*args, **kwargs)
    assert problem.value.status == status


def test_a_user_is_added_once_changed_and_removed(accounts):
    accounts.add_user("ada", "admin", "hash-1")
    refused(409, accounts.add_user, "ada", "viewer", "hash-2")
    accounts.update_user("ada", role="viewer")
    accounts.update_user("ada", password_hash="hash-2")  # a new password moves the epoch on
    assert {k: v for k, v in accounts.user("ada").items() if k != "createdAt"} == {
        "name": "ada", "role": "viewer", "hash": "hash-2", "epoch": 1}
    assert [user["name"] for user in accounts.users()] == ["ada"] and accounts.user("bob") is None
    accounts.remove_user("ada")
    refused(404, accounts.remove_user, "ada")
    refused(404, accounts.update_user, "ada", role="admin")
    assert accounts.users() == []


def test_a_credential_is_found_by_digest_listed_by_kind_marked_used_and_removed(accounts):
    token = accounts.add_credential("token", "ci", "viewer", "digest-1", "gst_0123456789abcdef", maker="ada")
    link = accounts.add_credential("share", "wall", "viewer", "digest-2", "gss_x", devices=["rig-1"], maker="bob")
    found = accounts.credential("digest-1")
    assert {k: found[k] for k in ("id", "kind", "name", "role", "prefix", "devices", "lastUsedAt", "maker")} == {
        "id": token, "kind": "token", "name": "ci", "role": "viewer", "prefix": "gst_0123456789abcdef"[:PREFIX_CHARS],
        "devices": None, "lastUsedAt": None, "maker": "ada"}
    accounts.used(token, T0)
    assert accounts.credential("digest-1")["lastUsedAt"] == T0 and accounts.credential("digest-3") is None
    assert [(c["id"], c["devices"]) for c in accounts.credentials("share")] == [(link, ["rig-1"])]
    refused(404, accounts.remove_credential, "share", token)  # not a share link
    assert accounts.remove_credentials_made_by("ada", ("viewer",)) == 1 and accounts.credential("digest-1") is None
    accounts.remove_credential("share", link)
    assert accounts.credentials("share") == [] and accounts.credentials("token") == []


def test_sessions_are_listed_last_used_first_and_end_one_or_all_but_one(accounts):
    for n in range(3):
        accounts.add_session(f"session-{n}", "user", "ada", "proof", "10.0.0.1", "curl")
    accounts.session_used("session-0", time.time() + 5, "10.0.0.2", "firefox")
    assert accounts.sessions("ada")[0]["id"] == "session-0" and len(accounts.sessions("ada")) == 3
    used = accounts.session("session-0")
    assert (used["kind"], used["name"], used["proof"], used["address"], used["agent"]) == (
        "user", "ada", "proof", "10.0.0.2", "firefox")
    assert accounts.remove_sessions("ada", keep="session-0") == 2
    assert [found["id"] for found in accounts.sessions("ada")] == ["session-0"]
    accounts.remove_session("session-0")
    assert accounts.session("session-0") is None and accounts.sessions("ada") == []


@pytest.fixture(params=["memory", "redis"])
def throttle(request):
    found = (RedisSignInThrottle(redis.Redis.from_url(request.getfixturevalue("redis_server").url))
             if request.param == "redis" else SignInThrottle())
    assert isinstance(found, SignInThrottling)
    return found


def test_an_address_waits_after_its_free_fails_until_the_right_password_and_the_user_only_slows(throttle):
    for _ in range(FREE_FAILS - 1):
        throttle.failed("10.0.0.1", "ada")
    assert throttle.blocked_for("10.0.0.1") == 0 and throttle.delay_for("ada") == 0
    throttle.failed("10.0.0.1", "ada")
    assert throttle.blocked_for("10.0.0.1") == FIRST_WAIT_S and throttle.blocked_for("10.0.0.2") == 0
    assert throttle.delay_for("ada") > 0 and throttle.delay_for("bob") == 0
    throttle.succeeded("10.0.0.1", "ada")  # the try counted before the hash is given back
    assert throttle.blocked_for("10.0.0.1") == 0 and throttle.delay_for("ada") == 0


# ---- rate limits, counters, devices ---------------------------------------------------------------

@pytest.fixture(params=["memory", "redis"])
def make_limit(request):
    if request.param == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_server").url)
        return lambda rate, burst: RedisRateLimiter(client, "contract", rate, burst)
    return RateLimiter


def test_a_key_has_its_burst_then_waits_whole_seconds_and_a_peek_spends_nothing(make_limit):
    limit = make_limit(0.5, 2)
    assert isinstance(limit, RateLimit)
    assert [limit.blocked_for("rig-1") for _ in range(3)] == [0, 0, 0]
    assert [limit.take("rig-1") for _ in range(2)] == [0, 0]
    assert limit.blocked_for("rig-1") == 2 and limit.take("rig-1") == 2  # a token at 0.5/s: 2 s
    assert limit.take("rig-2") == 0


@pytest.fixture(params=["memory", "redis"])
def counters(request):
    found = (RedisCounters(redis.Redis.from_url(request.getfixturevalue("redis_server").url))
             if request.param == "redis" else Counters())
    assert isinstance(found, ServerCounts)
    found.start(lambda: 3)
    request.addfinalizer(found.close)
    return found


def test_counts_read_back_with_every_known_label_and_the_open_streams(counters):
    for label in (200, 200, 429):
        counters.add("pushes", label)
    counters.add("notifications", "sent")
    counts, streams = counters.read()
    assert counts["pushes"] == {"200": 2, "400": 0, "401": 0, "408": 0, "413": 0, "415": 0, "429": 1, "503": 0}
    assert counts["notifications"] == {"sent": 1, "retry": 0, "failed": 0, "dropped": 0} and streams == 3
    counters.flush()
    assert counters.read() == (counts, 3)  # nothing counted twice


@pytest.fixture(params=["sqlite", "redis"])
def devices(request, tmp_path):
    found = (RedisDevices(redis.Redis.from_url(request.getfixturevalue("redis_server").url))
             if request.param == "redis" else SqliteDevices(str(tmp_path / "history.sqlite3")))
    assert isinstance(found, DeviceStore)
    return found


def test_devices_and_keys_are_added_found_and_removed_and_only_a_change_moves_the_version(devices):
    versions = [devices.version()]

    def changed(change, *args):
        found = change(*args)
        versions.append(devices.version())
        assert versions[-1] > versions[-2]
        return found
    first = changed(devices.add, "rig-1", "digest-1", "gsk_0123456789abcdef")
    second = changed(devices.add_key, "rig-1", "digest-2", "gsk_2")
    assert devices.key("digest-1") == ("rig-1", first) and devices.key("digest-3") is None
    assert devices.keys() == {"digest-1": ("rig-1", first), "digest-2": ("rig-1", second)}
    devices.used({first: T0})
    [listed] = devices.devices()
    assert listed["name"] == "rig-1" and [(key["id"], key["prefix"], key["lastUsedAt"]) for key in listed["keys"]] == [
        (first, "gsk_0123456789abcdef"[:PREFIX_CHARS], T0), (second, "gsk_2", None)]
    refused(409, devices.add, "rig-1", "digest-3", "gsk_3")
    refused(404, devices.add_key, "rig-9", "digest-3", "gsk_3")
    refused(404, devices.remove_key, "rig-1", "999")
    refused(404, devices.remove, "rig-9")
    assert devices.version() == versions[-1]  # a refused change changed nothing
    changed(devices.remove_key, "rig-1", first)
    assert devices.key("digest-1") is None
    changed(devices.remove, "rig-1")
    assert devices.devices() == [] and devices.keys() == {}

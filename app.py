"""The GPU Stats Dashboard server's composition root: create_app() chooses each part once and registers its routes.

The parts live in the gpustats package, a folder per capability (docs/ARCHITECTURE.md):
gunicorn loads wsgi_app(); nothing else but the tests imports this module.
"""
import gc
import logging
import resource
import signal
import sys
import time
from types import SimpleNamespace

from flask import Flask

from config import ConfigError, load_config
from gpustats.background import watch
from gpustats.access.accounts import AccountError, Accounts, Hasher
from gpustats.access.admin import register_admin
from gpustats.access.client_limits import ClientLimits
from gpustats.access.connections import Connections
from gpustats.access.login import register_login
from gpustats.access.sqlite import SqliteAccounts
from gpustats.access.throttle import SignInThrottle
from gpustats.alerts.alerter import Alerter
from gpustats.alerts.routes import register_alerts
from gpustats.alerts.rules import AlertBoard
from gpustats.alerts.sender import MemoryOutbox, Sender
from gpustats.alerts.sqlite import SavedState, SqliteOutbox
from gpustats.fleet.memory import Fleet
from gpustats.history.routes import register_history
from gpustats.history.sqlite import SqliteHistory
from gpustats.ingest.ratelimit import RateLimiter
from gpustats.ingest.routes import BAD_KEYS_BURST, BAD_KEYS_PER_S, register_ingest
from gpustats.jobs.routes import register_jobs
from gpustats.jobs.sqlite import SqliteJobs
from gpustats.metrics.counters import Counters
from gpustats.metrics.routes import register_metrics
from gpustats.pages import register_pages
from gpustats.stream.broadcaster import Broadcaster
from gpustats.stream.routes import register_stream
from gpustats.devices.registry import DeviceRegistry
from gpustats.devices.routes import register_devices
from gpustats.devices.sqlite import SqliteDevices
from gpustats.web import public_url, register_errors

log = logging.getLogger("gpustats")
GC_EVERY_S = 600.0


def create_app(overrides=None):
    """Build an isolated app from the environment plus `overrides` (a dict of settings)."""
    config = load_config(overrides)
    app = Flask(__name__)
    parts = _parts(config)
    fleet, history = parts.fleet, parts.history
    broadcaster = Broadcaster(fleet.snapshot, ring_size=config.ring_size, heartbeat_s=config.heartbeat_s,
                              max_subscribers=config.max_subscribers,
                              max_per_client=config.max_subscribers_per_client, shared_ids=fleet.shared_ids)
    registry = DeviceRegistry(parts.devices, config.device_keys)
    app.extensions["gpustats"] = {"config": config, "broadcaster": broadcaster, "registry": registry, **vars(parts)}
    if not registry:
        log.warning("no devices yet, so every push is refused with 401: add a PC on the Devices page (/devices), "
                    "or with python config.py --add-device NAME")

    def known_devices():
        return [device["name"] for device in registry.devices()]
    accounts, hasher = Accounts(parts.accounts), Hasher()
    _first_admin(config, accounts, hasher)
    register_errors(app)
    register_login(app, config, accounts, hasher, parts.sign_ins)  # first: every other route is behind it
    register_admin(app, config, accounts, hasher, known_devices)
    register_devices(app, config, registry, fleet, history, lambda: public_url(config))
    register_stream(app, config, broadcaster)
    register_alerts(app, fleet)
    # POST /push-sse is answered in front of Flask (ingest/routes.py): its request machinery was a third of a push.
    register_ingest(app, config, registry, fleet, parts.push_limits, parts.bad_key_limits, parts.counters)
    register_history(app, config, history, known_devices=known_devices)
    register_jobs(app, config, parts.jobs)
    register_metrics(app, fleet, parts.counters)
    register_pages(app, config, fleet, broadcaster, history)
    # Outside Flask, around everything: a refusal costs no routing, and the deadline covers the write.
    # gunicorn.conf.py hands the connections each connection gunicorn accepts, before any request.
    connections = Connections(config.worker_connections, config.max_connections_per_client, config.trusted_proxies)
    app.extensions["gpustats"]["connections"] = connections
    app.wsgi_app = ClientLimits(app.wsgi_app, config.response_timeout_s, config.max_requests_per_client,
                                config.trusted_proxies, connections)
    fleet.restore_kept(set(known_devices()))  # every PC as it last was, until it pushes again
    fleet.start(broadcaster, config.sweep_s)
    parts.counters.start(lambda: broadcaster.subscribers)
    for part in (history, parts.jobs, parts.alerter, parts.sender, registry):
        part.start()
    return app


def _parts(config):
    """Choose the fleet, history, jobs, alerts, counters and rate limits: in this process, or shared through Redis."""
    destinations = config.alert_webhook_urls
    if config.redis_url:
        from gpustats.access.redis import RedisAccounts, RedisSignInThrottle
        from gpustats.alerts.redis import NotifierLease, RedisAlerter, RedisOutbox
        from gpustats.devices.redis import RedisDevices
        from gpustats.fleet.redis import RedisFleet
        from gpustats.history.redis import RedisHistory
        from gpustats.ingest.redis import RedisRateLimiter
        from gpustats.jobs.redis import RedisJobs
        from gpustats.metrics.redis import RedisCounters
        from gpustats.scaleout import SharedRedis
        shared = SharedRedis(config.redis_url)  # one client for every part; each says what Redis refused it
        client, status = shared.client, shared.status
        outbox, counters = RedisOutbox(client, destinations), RedisCounters(client, status=status)
        return SimpleNamespace(
            fleet=RedisFleet(shared, config.stale_after_s, config.offline_after_s, config.ring_size),
            history=RedisHistory(client, config.stale_after_s, status=status),
            jobs=RedisJobs(client, config.stale_after_s, config.offline_after_s, status=status),
            alerter=RedisAlerter(client, config.alert_settings, outbox, config.ring_size, status=status),
            sender=Sender(destinations, outbox, config.alert_dashboard_url, lease=NotifierLease(client),
                          counters=counters),
            counters=counters,
            push_limits=RedisRateLimiter(client, "push", config.push_rate_limit, status=status, counted_as="pushes"),
            bad_key_limits=RedisRateLimiter(client, "bad-key", BAD_KEYS_PER_S, burst=BAD_KEYS_BURST, status=status,
                                            counted_as="bad-key checks"),
            accounts=RedisAccounts(client), sign_ins=RedisSignInThrottle(client), devices=RedisDevices(client))
    history = SqliteHistory(config.history_db, config.stale_after_s)
    jobs = SqliteJobs(config.history_db, config.stale_after_s, config.offline_after_s)
    state, board, counters = SavedState(config.history_db), AlertBoard(), Counters()
    outbox = SqliteOutbox(destinations, state) if state else MemoryOutbox(destinations)
    alerter = Alerter(config.alert_settings, board, outbox, state)
    return SimpleNamespace(
        fleet=Fleet(config.stale_after_s, config.offline_after_s, history, alerter, board, jobs=jobs), history=history,
        jobs=jobs,
        alerter=alerter, sender=Sender(destinations, outbox, config.alert_dashboard_url, counters=counters),
        counters=counters,
        push_limits=RateLimiter(config.push_rate_limit),
        bad_key_limits=RateLimiter(BAD_KEYS_PER_S, burst=BAD_KEYS_BURST),
        accounts=SqliteAccounts(config.history_db), sign_ins=SignInThrottle(), devices=SqliteDevices(config.history_db))


def _first_admin(config, accounts, hasher):
    """Make the user `admin` from ADMIN_PASSWORD when the store has no admin yet (a first start)."""
    if not config.admin_password or any(user["role"] == "admin" for user in accounts.store.users()):
        return
    try:
        accounts.store.add_user("admin", "admin", hasher.hash(config.admin_password))
        log.info("made the user admin from ADMIN_PASSWORD; change its password in the page (Account)")
    except AccountError:
        pass  # another worker made it meanwhile


def wsgi_app():
    """Build the app for gunicorn; a bad setting exits with one line naming it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    try:
        app = create_app()
    except ConfigError as problem:
        log.error("config error: %s", problem)
        sys.exit(4)  # gunicorn's "App failed to load": it stops instead of respawning.
    _allow_open_files(app.extensions["gpustats"]["config"].worker_connections)
    # History reads run in OS threads (gpustats/offload.py) beside the event loop's thread. When both want
    # the GIL, the loop's thread waits up to a switch interval each time it takes it back, after
    # every socket call: 5 ms by default. 1 ms bounds that wait (CPython issue 7946, the convoy).
    sys.setswitchinterval(0.001)
    _collect_garbage_on_a_schedule(GC_EVERY_S)
    parts = app.extensions["gpustats"]
    _end_streams_on_stop(*(parts[name] for name in ("broadcaster", "fleet", "history", "jobs", "alerter", "sender",
                                                    "counters")),
                            connections=app.wsgi_app)
    return app


def _collect_garbage_on_a_schedule(every_s):
    """Let CPython collect young garbage as it does, and the whole heap only every `every_s` seconds.

    A fleet's state is a few hundred thousand objects, replaced at every push: each push's
    survivors reach the oldest generation, so CPython's full collections came several times
    a second, each walking all of them, and every push and viewer waited (docs/PERFORMANCE.md).
    Young collections stay as they are: they free the small cycles every request leaves
    (werkzeug's request and its environ) while they are young. A full one runs every `every_s`,
    and says when it took long.
    """
    gc.freeze()  # what exists at start is never walked again
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1 << 30)  # no full collection but ours

    def collect():
        started = time.monotonic()
        found = gc.collect()
        took = time.monotonic() - started
        if took > 0.2:
            log.info("a full garbage collection took %.0f ms (%d objects freed)", took * 1000, found)
    watch("garbage", every_s, collect, lambda: False)


def _allow_open_files(connections):
    """Raise the soft open-files limit so the worker can hold WORKER_CONNECTIONS sockets.

    systemd and most shells start services with a soft limit of 1,024: far below the pool,
    so accept() would fail long before MAX_SUBSCRIBERS. The hard limit is usually higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 64  # the listening socket, logs and Python's own files
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        log.warning("the open-files limit (ulimit -n) is %d, below WORKER_CONNECTIONS (%d): raise it "
                    "(LimitNOFILE= in a systemd unit) or lower WORKER_CONNECTIONS", raised, connections)


def _end_streams_on_stop(broadcaster, *background, connections=None):
    """On SIGTERM, SIGINT or SIGQUIT, end every stream and the background work, then let gunicorn's SIGTERM handler run.

    Streams never finish by themselves, so without this a deploy would wait out the
    whole --graceful-timeout. gunicorn installs its handlers before loading the app.
    Ctrl-C (SIGINT to the whole group) and the master's quick stop (SIGQUIT) stop the
    worker the same way: gunicorn's own quit ran sys.exit in a greenlet, and gevent
    printed 15 lines of traceback at every Ctrl-C on make run (issue 30).
    """
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        broadcaster.close()
        for part in background:
            part.close()  # each only sets a flag: safe in a signal handler
        if connections is not None:
            connections.close_idle()  # keep-alive connections waiting for a next request (75 s) end now
        if callable(previous):
            previous(signum, frame)
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(stop, handler)

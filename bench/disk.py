"""What history costs per GPU in steady state: SQLite on disk, and Redis memory with REDIS_URL.

One GPU's 400 days go through the real stores with an injected clock: the last
--busy-days at a point a second (what an agent pushing every second or faster gives),
the days before at a point a minute (they are kept as minute and hour buckets only, whose
number does not depend on how often the agent pushed). Then the size of the SQLite file
(after a checkpoint) and Redis' used_memory, each against an empty store.

    make bench-disk                      # or: .venv/bin/python -m bench.disk --busy-days 31
    .venv/bin/python -m bench.disk --host  # each push with its host (`system`): one GPU and its PC
"""
import argparse
import os
import sqlite3
import tempfile
import time

from tests.test_history import Clock, event

DAY = 86400


def samples(now, busy_days, days=400):
    """Yield (t, utilization, power) for one GPU: a point a minute, then a point a second."""
    busy_from = now - busy_days * DAY
    for t in range(now - days * DAY, busy_from, 60):
        yield t, (t // 3600) % 100, 100.0 + (t % 7) * 10.5
    for t in range(busy_from, now):
        yield t, (t // 60) % 100, 100.0 + (t % 7) * 10.5


def feed(add, write, clock, now, busy_days, batch_s=600, host=False):
    """Hand the samples to a store a batch at a time, its clock moving with them; with `host`, each with a `system`."""
    pending, started, count = [], time.monotonic(), 0
    for t, util, power in samples(now, busy_days):
        pending.append(event(t, util, power, device="render-box", memoryUsed=6144 + util, temperatureGpu=40 + util // 3))
        if host:
            pending[-1]["system"] = {"cpuPercent": util / 2, "memoryUsed": 402113 + util, "netRx": 1250000.0 + t % 977,
                                     "netTx": 83000.5 + t % 13}
        if t - pending[0]["receivedAt"] >= batch_s * (60 if t < now - busy_days * DAY else 1):
            clock.now = t
            for e in pending:
                add(e)
            write()
            count += len(pending)
            pending = []
    clock.now = now
    for e in pending:
        add(e)
    write()
    return count + len(pending), time.monotonic() - started


def sqlite_bytes(busy_days, host=False):
    from gpustats.history.sqlite import SqliteHistory
    now = int(time.time())
    clock = Clock(now - 400 * DAY)
    folder = tempfile.mkdtemp(prefix="history-disk-")
    path = os.path.join(folder, "history.sqlite3")
    store = SqliteHistory(path, 15, clock=clock, prune_s=3600, steady=clock)  # 400 days pass, on both clocks
    count, took = feed(store.add, store.flush, clock, now, busy_days, host=host)
    store._pruned = float("-inf")
    store.flush()  # the once-a-minute prune, at the end
    from gpustats.history.tiers import plan
    from gpustats.history.routes import to_json
    timings = {}
    for name, span in (("10 min", 600), ("24 h", DAY), ("7 d", 7 * DAY), ("30 d", 30 * DAY)):
        tier, step = plan(now - span, now, now)
        started = time.perf_counter()
        for _ in range(5):
            body = to_json(store.query("render-box", tier, now - span, now, step))
        timings[name] = f"{(time.perf_counter() - started) / 5 * 1000:.1f} ms ({len(body) // 1024} KiB, step {step})"
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("second", "minute", "hour")}
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    return count, took, rows, size, timings


def redis_bytes(busy_days, host=False):
    import redis

    from gpustats.stream import sse
    from gpustats.scaleout import STREAM
    from gpustats.history.redis import RedisHistory
    from tests.conftest import RedisServer
    server = RedisServer(tempfile.mkdtemp(prefix="history-redis-")).start()
    try:
        client = redis.Redis.from_url(server.url)
        empty = client.info("memory")["used_memory"]
        now = int(time.time())
        clock = Clock(now - 400 * DAY)
        store = RedisHistory(client, 15, clock=clock)
        pipe, n = client.pipeline(transaction=False), [0]

        def add(e):
            n[0] += 1
            pipe.xadd(STREAM, {"d": e["device"], "e": "", "b": sse.data_block(e), "n": n[0]})

        def write():
            pipe.execute()
            while client.xlen(STREAM) and client.xrange(STREAM, "(" + (store._cursor or "0-0").partition("|")[0], "+",
                                                        count=1):
                store.flush()
            client.xtrim(STREAM, maxlen=0)  # the stream is the fleet's ring, not history: leave it out
        count, took = feed(add, write, clock, now, busy_days, batch_s=3000, host=host)
        client.delete(STREAM)
        keys = client.dbsize()
        return count, took, keys, client.info("memory")["used_memory"] - empty
    finally:
        server.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy-days", type=int, default=31, help="days at a point a second (default 31: past "
                                                                   "the 30 days of minutes)")
    parser.add_argument("--redis", action="store_true", help="also measure Redis (needs redis-server)")
    parser.add_argument("--host", action="store_true", help="each push with its host's `system` (one more series)")
    args = parser.parse_args()
    count, took, rows, size, timings = sqlite_bytes(args.busy_days, args.host)
    print(f"SQLite: {count:,} samples of one GPU over 400 days written in {took:.1f} s ({count / took:,.0f}/s); "
          f"rows kept {rows}; file {size / 2**20:.2f} MiB per {'GPU and host' if args.host else 'GPU'}")
    print("SQLite: one GPU's /api/history answer, read and encoded: " + "; ".join(f"{k} {v}" for k, v in timings.items()))
    if args.redis:
        count, took, keys, used = redis_bytes(args.busy_days, args.host)
        print(f"Redis: {count:,} samples written in {took:.1f} s; {keys} keys; used_memory "
              f"{used / 2**20:.2f} MiB per GPU")


if __name__ == "__main__":
    main()

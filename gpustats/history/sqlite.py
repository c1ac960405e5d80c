"""History kept in SQLite: in the file HISTORY_DB (the default), or in memory when it is empty.

SQLite blocks the thread that calls it, and under gevent that thread runs every push and
stream: so the database is only used from OS threads of its own (offload.Worker). A push
only appends its event to a queue; once a second the writer turns what gathered into
buckets and writes them in one transaction, and once a minute it deletes what is past its
tier's keep. The same write keeps each device's latest event and status, so a restart shows
every PC as it last was (issue 30: a PC down at a deploy vanished). Queries run in a second thread on their own connection (WAL lets them read
while the writer writes), and SQLite builds their answer's JSON arrays itself, without the GIL.
"""
import collections
import json
import logging
import sqlite3
import time

import orjson

from gpustats import offload
from gpustats.background import Tally, watch
from gpustats.database import transaction
from gpustats.errors import ConfigError
from gpustats.history.tiers import FIELDS, HOUR, MINUTE, SECOND, TIERS, RawJSON, Sampler, Seconds, TrustedClock, sample, whole

log = logging.getLogger("gpustats")
# Columns without a type keep whole numbers as small integers: most readings are whole.
SCHEMA = """
CREATE TABLE IF NOT EXISTS gpu (id INTEGER PRIMARY KEY, device TEXT NOT NULL, gpu INTEGER NOT NULL,
                                uuid TEXT, name TEXT, UNIQUE (device, gpu));
CREATE TABLE IF NOT EXISTS second (id INTEGER NOT NULL, t INTEGER NOT NULL, util, mem, temp, power, joules,
                                   PRIMARY KEY (id, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS minute (id INTEGER NOT NULL, t INTEGER NOT NULL, util, util_n, mem, mem_n, temp, temp_n,
                                   power, power_n, joules, PRIMARY KEY (id, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hour (id INTEGER NOT NULL, t INTEGER NOT NULL, util, util_n, mem, mem_n, temp, temp_n,
                                 power, power_n, joules, PRIMARY KEY (id, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS device (name TEXT PRIMARY KEY, event TEXT NOT NULL);
"""
PUT_DEVICE = "INSERT INTO device VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET event = excluded.event"
SET_STATUS = "UPDATE device SET event = json_set(event, '$.status', ?) WHERE name = ?"
SUMS = ("util", "util_n", "mem", "mem_n", "temp", "temp_n", "power", "power_n", "joules")
# A second holds the newest values pushed in it, and all the energy drawn up to them.
PUT_SECOND = ("INSERT INTO second VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id, t) DO UPDATE SET util = excluded.util, "
              "mem = excluded.mem, temp = excluded.temp, power = excluded.power, joules = joules + excluded.joules")
# A write's samples, one row each, from which SQLite sums the minute and hour buckets itself, off the GIL:
# less CPU a write than sums kept in Python dicts (docs/PERFORMANCE.md). Ints stay ints (sum()), as before.
BATCH = "CREATE TEMP TABLE IF NOT EXISTS batch (id INTEGER, t INTEGER, util, mem, temp, power, joules)"
PUT_SAMPLE = "INSERT INTO batch VALUES (?, ?, ?, ?, ?, ?, ?)"
ADD_BUCKETS = ("INSERT INTO {table} SELECT id, t - t % {step}, "
               + ", ".join(f"coalesce(sum({c}), 0), count({c})" for c in ("util", "mem", "temp", "power"))
               + ", total(joules) FROM batch WHERE true GROUP BY id, t - t % {step} ON CONFLICT (id, t) DO UPDATE SET "
               + ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMS))
# A query's whole answer is made by SQLite, JSON arrays included: SQLite runs without the GIL,
# so the event loop's thread keeps it while a 30-day read runs (rows built in Python did not).
MEANS = {SECOND: ("avg(util)", "avg(mem)", "avg(temp)", "avg(power)"),
         "buckets": tuple(f"sum({c}) * 1.0 / nullif(sum({c}_n), 0)" for c in ("util", "mem", "temp", "power"))}
READ = """SELECT count(*), json_group_array(b), {arrays}, json_group_array(round(e / 3600.0, 4)), sum(e) FROM (
  SELECT t - t % :step AS b, {means}, sum(joules) AS e FROM {table}
  WHERE id = :id AND t > :start - {resolution} AND t <= :end GROUP BY b ORDER BY b)"""


def _read_sql(tier):
    """Return the query that answers one GPU's history from `tier`'s table."""
    means = MEANS[SECOND] if tier is SECOND else MEANS["buckets"]
    # Whole numbers as integers (80, not 80.0), like the answers built in Python.
    arrays = ", ".join(f"json_group_array(CASE WHEN v{i} = CAST(v{i} AS INTEGER) THEN CAST(v{i} AS INTEGER) "
                       f"ELSE v{i} END)" for i in range(len(means)))
    # Every bucket that overlaps the range, the one `from` falls in included.
    return READ.format(arrays=arrays, table=tier.name, resolution=tier.step_s,
                       means=", ".join(f"round({mean}, 2) AS v{i}" for i, mean in enumerate(means)))


MAX_PENDING = 100_000  # events waiting for the writer; past it the oldest go, with a log line


class SqliteHistory:
    """Every GPU's history in one SQLite database, written once a second off the event loop."""

    def __init__(self, path, max_gap_s, clock=time.time, flush_s=1.0, prune_s=60.0, steady=time.monotonic):
        self.path = path or None  # None: in memory, gone with the process
        self._clock, self._steady = clock, steady
        self._trusted = TrustedClock(clock, steady)  # what pruning goes by: never one reading of a stepped clock
        self._flush_s, self._prune_s = flush_s, prune_s
        self._pending = collections.deque(maxlen=MAX_PENDING)
        self._latest, self._statuses = {}, {}  # device -> its newest event, and its status since, to keep
        self._dropped = 0
        self._closed = False
        self._writer = offload.Worker("history-writer")
        self._db = self._open()
        if self.path is None:  # one connection to one in-memory database: one thread for all of it
            self._reader, self._read_db = self._writer, self._db
        else:
            self._reader, self._read_db = offload.Worker("history-reader"), self._connect()
        self._ids = {(device, gpu): (gpu_id, uuid, name) for gpu_id, device, gpu, uuid, name
                     in self._db.execute("SELECT id, device, gpu, uuid, name FROM gpu")}
        self._sampler = Sampler(max_gap_s, self._newest_samples())
        self._pruned = float("-inf")
        self._failing = None  # why the last write failed, while they fail
        self._lost = Tally(lambda counts: log.error("history cannot be written to %s (%s): %d samples dropped; "
                                                    "they are counted here once a minute while it lasts",
                                                    self.path or "memory", self._failing, counts["samples"]),
                           clock=steady)

    def _connect(self):
        db = sqlite3.connect(self.path or ":memory:", timeout=10, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 10000")
        return db

    def _open(self):
        """Open and check the database now, so a bad HISTORY_DB stops the server at start with one line."""
        try:
            db = self._connect()
            if self.path is not None:
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")  # WAL stays consistent; a power cut loses a second
                problems = [row[0] for row in db.execute("PRAGMA quick_check")]
                if problems != ["ok"]:
                    raise sqlite3.DatabaseError(f"damaged ({problems[0]})")
            db.executescript(SCHEMA)
            with transaction(db):  # proves it writable: BEGIN IMMEDIATE takes the write lock
                db.execute("DELETE FROM gpu WHERE 0")
            return db
        except sqlite3.Error as problem:
            raise ConfigError(f"HISTORY_DB: cannot use {self.path} as the history database: {problem}") from None

    def _newest_samples(self):
        """Return each GPU's newest kept sample, so energy runs on across a restart."""
        last = {}
        for key, (gpu_id, _, _) in self._ids.items():
            row = self._db.execute("SELECT t, power FROM second WHERE id = ? ORDER BY t DESC LIMIT 1", (gpu_id,)).fetchone()
            if row:
                last[key] = (float(row[0]), row[1])
        return last

    def start(self):
        """Write what pushes bring once a second, until close()."""
        watch("history-writer", self._flush_s, self.flush, lambda: self._closed)

    def close(self):
        self._closed = True

    def backlog(self):
        """Return how many samples wait for the writer: a second's worth when it keeps up."""
        return len(self._pending)

    def add(self, event):
        """Queue what history keeps of an accepted push (a few numbers a GPU) for the next write; never blocks."""
        if len(self._pending) == MAX_PENDING:
            self._dropped += 1
        self._pending.append(sample(event))
        self._latest[event["device"]] = event
        self._statuses.pop(event["device"], None)

    def keep_status(self, device, status):
        """Queue a device's new status (stale, offline) for the next write, so a restart shows it as it was."""
        self._statuses[device] = status

    def forget_state(self, device):
        """Forget a removed device's kept state: a restart does not bring it back."""
        self._latest.pop(device, None)
        self._statuses.pop(device, None)
        self._writer.run(lambda: self._db.execute("DELETE FROM device WHERE name = ?", (device,)))

    def last_states(self):
        """Return every device's newest kept event, with the status it last had; a row that is not one is skipped, and said."""
        kept = []
        for name, text in self._reader.run(lambda: self._read_db.execute(
                "SELECT name, event FROM device ORDER BY name").fetchall()):
            try:
                event = json.loads(text)
            except ValueError:
                event = None
            if _an_event(event):
                kept.append(event)
            else:
                log.warning("the kept state of the device %r is not one the server wrote; it is left out", name)
        return kept

    def flush(self):
        """Write what gathered since the last flush in one transaction; prune once a minute."""
        samples = [self._pending.popleft() for _ in range(len(self._pending))]
        latest, self._latest = self._latest, {}
        statuses, self._statuses = self._statuses, {}
        if self._dropped:
            log.error("history fell behind: %d samples were dropped unwritten", self._dropped)
            self._dropped = 0
        now, trusted, steady = self._clock(), self._trusted.now(), self._steady()
        prune = steady - self._pruned >= self._prune_s
        if not samples and not prune and not latest and not statuses:
            return
        try:
            self._writer.run(self._write, samples, now, trusted if prune else None, latest, statuses)
        except sqlite3.OperationalError as problem:  # a full disk, a file gone read-only: one line a minute, counted
            self._failing = str(problem)
            self._lost.add("samples", len(samples))
            return
        if self._failing:
            log.info("history is written again (%s is over); samples dropped since the last line: %d",
                     self._failing, self._lost.clear().get("samples", 0))
            self._failing = None
        if prune:
            self._pruned = steady

    def _write(self, samples, now, prune_at, latest=None, statuses=None):
        # The batch is built here, in the writer's thread: it holds the GIL as it would on the loop,
        # but the loop gets it back every switch interval (app.py sets it) instead of waiting out all
        # of it, which every push then waited behind (docs/PERFORMANCE.md).
        batch = Seconds()
        for sampled in samples:
            self._sampler.add(batch, sampled, now)
        added = {}  # new GPUs' ids: kept only once the transaction commits
        with transaction(self._db):
            ids = self._gpu_ids(batch.gpus, added)
            self._db.executemany(PUT_SECOND, [(ids[device, gpu], second, util, mem, temp, power, round(joules, 1))
                                              for (device, gpu, second), (util, mem, temp, power, joules)
                                              in batch.seconds.items()])
            self._db.execute(BATCH)
            self._db.executemany(PUT_SAMPLE, [(ids[device, gpu], second, util, mem, temp, power, joules)
                                              for device, gpu, second, util, mem, temp, power, joules in batch.samples])
            for tier in (MINUTE, HOUR):
                self._db.execute(ADD_BUCKETS.format(table=tier.name, step=tier.step_s))
            self._db.execute("DELETE FROM batch")
            self._db.executemany(PUT_DEVICE, [(device, orjson.dumps(event).decode())
                                              for device, event in (latest or {}).items()])
            self._db.executemany(SET_STATUS, [(status, device) for device, status in (statuses or {}).items()])
            if prune_at is not None:
                for gpu_id, _, _ in self._ids.values():
                    for tier in TIERS:
                        self._db.execute(f"DELETE FROM {tier.name} WHERE id = ? AND t < ?",
                                         (gpu_id, prune_at - tier.keep_s))
        self._ids.update(added)

    def _gpu_ids(self, gpus, added):
        """Return {(device, gpu): id} of the batch's GPUs, adding new GPUs and a changed uuid or name to `added`."""
        ids = {}
        for key, (uuid, name) in gpus.items():
            kept = self._ids.get(key)
            if kept is None or kept[1] != uuid or kept[2] != name:
                gpu_id = self._db.execute(
                    "INSERT INTO gpu (device, gpu, uuid, name) VALUES (?, ?, ?, ?) ON CONFLICT (device, gpu) "
                    "DO UPDATE SET uuid = excluded.uuid, name = excluded.name RETURNING id", (*key, uuid, name)).fetchone()[0]
                kept = added[key] = (gpu_id, uuid, name)
            ids[key] = kept[0]
        return ids

    def gpus(self, device):
        """Return [(index, uuid, name, key for series())] of the device's GPUs, by index; None if it has no history."""
        return self._reader.run(lambda: self._read_db.execute(
            "SELECT gpu, uuid, name, id FROM gpu WHERE device = ? ORDER BY gpu", (device,)).fetchall()) or None

    def series(self, key, tier, start, end, step):
        """Return one GPU's series from `start` to `end` in buckets of `step`; None if it has no point there."""
        return self._reader.run(self._series, key, tier, start, end, step)

    def _series(self, gpu_id, tier, start, end, step):
        count, t, *means, steps, joules = self._read_db.execute(
            _read_sql(tier), {"step": step, "id": gpu_id, "start": start, "end": end}).fetchone()
        if not count:
            return None
        return {"t": RawJSON(t), **{field: RawJSON(values) for field, values in zip(FIELDS, means)},
                "energyWh": round(joules / 3600, 3), "energyWhSteps": RawJSON(steps)}

    def query(self, device, tier, start, end, step):
        """Return the whole answer for `device` (tests, benchmarks; the API reads GPU by GPU); None if it has no history."""
        return whole(self, device, tier, start, end, step)

    def points(self, device):
        """Return how many points (seconds and buckets of every tier) are kept of `device`."""
        return self._reader.run(lambda: sum(self._read_db.execute(
            f"SELECT count(*) FROM {tier.name} WHERE id IN (SELECT id FROM gpu WHERE device = ?)", (device,)).fetchone()[0]
            for tier in TIERS))

    def delete(self, device):
        """Delete every point kept of `device`; return how many went."""
        def work():  # in the writer's thread, as _write is: it alone changes _ids, so no write sees them half-done
            with transaction(self._db):
                gone = sum(self._db.execute(f"DELETE FROM {tier.name} WHERE id IN (SELECT id FROM gpu WHERE device = ?)",
                                            (device,)).rowcount for tier in TIERS)
                self._db.execute("DELETE FROM gpu WHERE device = ?", (device,))
                self._db.execute("DELETE FROM device WHERE name = ?", (device,))
            for key in [key for key in self._ids if key[0] == device]:
                del self._ids[key]
            for key in [key for key in self._sampler.last if key[0] == device]:
                del self._sampler.last[key]  # here too, where _write() builds batches with it
            return gone
        return self._writer.run(work)


def _an_event(event):
    """Return whether `event` is what the fleet keeps of a push: a device, a time, a list of GPUs each an object."""
    return (isinstance(event, dict) and isinstance(event.get("device"), str)
            and isinstance(event.get("receivedAt"), (int, float)) and isinstance(event.get("gpus"), list)
            and all(isinstance(gpu, dict) for gpu in event["gpus"]))

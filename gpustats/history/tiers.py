"""History's shared rules: the tiers kept, pushes turned into buckets (with energy), queries planned and answered.

Samples are kept as pushed (one a second per GPU at most) for 24 hours, as 1-minute buckets
for 30 days and as 1-hour buckets for 400 days. A bucket holds sums and counts, never means,
so buckets add up exactly: each write adds its samples to their minute and hour at once (no
roll-up job that can fall behind), and a query merges buckets into any step by adding them.
A store (history/sqlite.py, history/redis.py) only keeps buckets and adds them up.

The host (a push's `system`) is kept as one more series of its device, at index HOST, its
SYSTEM_FIELDS in the four places a GPU's FIELDS take, with no energy: the same tiers, writes,
pruning and reads as a GPU's, for about a GPU's disk (docs/PERFORMANCE.md).
"""
import logging
import math
import time
from dataclasses import dataclass

from gpustats.web import QueryError, rfc3339

log = logging.getLogger("gpustats")

FIELDS = ("utilizationGpu", "memoryUsed", "temperatureGpu", "powerDraw")
SYSTEM_FIELDS = ("cpuPercent", "memoryUsed", "netRx", "netTx")  # the host's, kept where FIELDS are
HOST = -1  # the index the host's series is kept at: no GPU has it
# A bucket's sums: for each field its sum and its count of reported values, then joules drawn.
WIDTH = 2 * len(FIELDS) + 1
POWER = FIELDS.index("powerDraw")
POWER_AT = 3 + POWER  # in a sample's GPU tuple: (index, uuid, name, *FIELDS values)
DEFAULT_POINTS = 1000  # the most buckets a query gets when it names no step (SPEC)
MOST_POINTS = 10_000  # the most buckets a query may ask for with its own step
NICE_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


@dataclass(frozen=True)
class Tier:
    """One resolution history is kept at: buckets of `step_s`, kept for `keep_s`."""
    name: str
    step_s: int
    keep_s: int


SECOND, MINUTE, HOUR = Tier("second", 1, 24 * 3600), Tier("minute", 60, 30 * 86400), Tier("hour", 3600, 400 * 86400)
TIERS = (SECOND, MINUTE, HOUR)


class RawJSON(str):
    """A value already encoded as JSON (a series SQLite built), to be sent as it is."""


class Seconds:
    """Samples gathered between two writes: each second's newest values, and every sample as it came (for SQL's sums)."""

    def __init__(self):
        self.seconds = {}  # (device, gpu, second) -> [*values, joules]: the newest values win, joules add
        self.samples = []  # (device, gpu, second, *values, joules), each sample
        self.gpus = {}  # (device, gpu) -> (uuid, name), the latest seen

    def add(self, device, gpu, t, joules):
        """Add one GPU's sample, (index, uuid, name, *FIELDS values), with the joules drawn since its last."""
        self.samples.append((device, *newest(self, device, gpu, t, joules), joules))


def newest(batch, device, gpu, t, joules):
    """Keep one GPU's sample as its second's newest in `batch` (joules add up); return (index, second, *values)."""
    index, uuid, name, util, mem, temp, power = gpu
    batch.gpus[(device, index)] = (uuid, name)
    second = math.floor(t)
    key = (device, index, second)
    kept = batch.seconds.get(key)
    batch.seconds[key] = [util, mem, temp, power, joules + kept[-1] if kept else joules]
    return index, second, util, mem, temp, power


class Batch:
    """Samples gathered between two writes: each second's newest values, and minute and hour sums."""

    def __init__(self):
        self.seconds = {}  # (device, gpu, second) -> [*values, joules]: the newest values win, joules add
        self.buckets = {MINUTE: {}, HOUR: {}}  # tier -> {(device, gpu, start): sums}
        self._minutes, self._hours = self.buckets[MINUTE], self.buckets[HOUR]
        assert len(FIELDS) == 4 and (MINUTE.step_s, HOUR.step_s) == (60, 3600)  # as add() has them
        self.gpus = {}  # (device, gpu) -> (uuid, name), the latest seen

    def add(self, device, gpu, t, joules):
        """Add one GPU's sample, (index, uuid, name, *FIELDS values), with the joules drawn since its last.

        Written out for the four FIELDS: a fleet of 2,000 PCs adds 8,000 of these a second.
        """
        index, second, util, mem, temp, power = newest(self, device, gpu, t, joules)
        for buckets, start in ((self._minutes, second - second % 60), (self._hours, second - second % 3600)):
            key = (device, index, start)
            sums = buckets.get(key)
            if sums is None:
                sums = buckets[key] = [0, 0, 0, 0, 0, 0, 0, 0, 0.0]
            if util is not None:
                sums[0] += util
                sums[1] += 1
            if mem is not None:
                sums[2] += mem
                sums[3] += 1
            if temp is not None:
                sums[4] += temp
                sums[5] += 1
            if power is not None:
                sums[6] += power
                sums[7] += 1
            sums[8] += joules


def sample(event):
    """Return what history keeps of an accepted push: (device, t, [(gpu, uuid, name, *FIELDS values)]), the host last at HOST."""
    kept = [(gpu["index"], gpu.get("uuid"), gpu.get("name"), gpu.get("utilizationGpu"), gpu.get("memoryUsed"),
             gpu.get("temperatureGpu"), gpu.get("powerDraw")) for gpu in event["gpus"]]
    system = event.get("system")
    if system:
        kept.append((HOST, None, None, system.get("cpuPercent"), system.get("memoryUsed"), _whole(system.get("netRx")),
                     _whole(system.get("netTx"))))
    return event["device"], event["receivedAt"], kept


def _whole(rate):
    """Return a byte rate as whole bytes a second: SQLite keeps 1250000 in 3 bytes, 1250000.0 in 8."""
    return None if rate is None else round(rate)


AHEAD_S = 2.0  # a kept sample this far past the writer's clock came from a clock that stepped back since


class Sampler:
    """Turn samples into a Batch, with the energy each GPU drew since its previous sample.

    Energy is the trapezoid between two samples' power draws. A gap longer than `max_gap_s`
    (a device stale, offline or restarting) counts as no power drawn, not as the last value
    held: we do not know what the GPU did then.
    """

    def __init__(self, max_gap_s, last=None):
        self.max_gap_s = max_gap_s
        self.last = dict(last or {})  # (device, gpu) -> (t, powerDraw) of its newest sample

    def add(self, batch, sampled, now=None):
        """Add one sample; `now` is the writer's clock, which tells a kept sample from the future."""
        device, t, gpus = sampled
        ahead = (time.time() if now is None else now) + AHEAD_S
        last, max_gap_s, add = self.last, self.max_gap_s, batch.add
        for gpu in gpus:
            key, power = (device, gpu[0]), gpu[POWER_AT] if gpu[0] != HOST else None  # the host draws no energy here
            previous = last.get(key)
            joules = 0.0
            if previous is not None:
                then, drawn = previous
                if t <= then:
                    if then <= ahead:
                        continue  # older than what is kept already (two hosts' clocks, a replay): drop it
                    # Issue 20: after the clock ran an hour ahead for 5 s, every present sample was
                    # "older" than those and dropped for an hour, across restarts too. The present wins.
                elif power is not None and drawn is not None and t - then <= max_gap_s:
                    joules = (drawn + power) / 2 * (t - then)
            last[key] = (t, power)
            add(device, gpu, t, joules)


class TrustedClock:
    """The wall clock as pruning may trust it: a step is followed only once it has held for `hold_s`.

    The wall clock can jump (a VM resumed, NTP stepped it, an operator set it): pruning on one
    reading 31 days ahead deleted every minute bucket. The steady clock cannot jump, so the
    wall clock's offset from it tells a step from time passing; a step is logged once.
    """

    def __init__(self, wall=time.time, steady=time.monotonic, hold_s=60.0, slack_s=2.0):
        self._wall, self._steady, self._hold_s, self._slack_s = wall, steady, hold_s, slack_s
        self._offset = wall() - steady()  # trusted wall time = steady + offset
        self._step = None  # (offset, steady time) of a step not yet followed

    def now(self):
        """Return the wall time, or where it would be without a step that has not held for hold_s."""
        wall, steady = self._wall(), self._steady()
        offset = wall - steady
        if abs(offset - self._offset) <= self._slack_s:
            self._offset = offset  # time passing, and NTP's slow slews
            if self._step is not None:
                log.info("the wall clock is back in step after %.0f s; history was not pruned by it meanwhile",
                         steady - self._step[1])
                self._step = None
            return wall
        if self._step is None or abs(offset - self._step[0]) > self._slack_s:
            log.warning("the wall clock stepped %s by %s: history is not pruned by it unless it holds for %g s",
                        "ahead" if offset > self._offset else "back", _span(offset - self._offset), self._hold_s)
            self._step = (offset, steady)
        elif steady - self._step[1] >= self._hold_s:
            log.warning("the wall clock's step of %s has held for %g s: history now follows it",
                        _span(offset - self._offset), self._hold_s)
            self._offset, self._step = offset, None
            return wall
        return steady + self._offset


def _span(seconds):
    seconds = abs(seconds)
    return f"{seconds / 86400:.1f} days" if seconds >= 86400 else f"{seconds:.0f} s"


def plan(start, end, now, step=None):
    """Return (tier, step) for a query from `start` to `end`; raise QueryError naming `step` if it cannot be."""
    span = end - start
    finest = next((tier for tier in TIERS if start >= now - tier.keep_s), HOUR)
    if step is None:
        step = next((s for s in NICE_STEPS if s % finest.step_s == 0 and span / s <= DEFAULT_POINTS), None)
        step = step or math.ceil(span / DEFAULT_POINTS / 86400) * 86400
    elif step % finest.step_s:
        raise QueryError("step", f"history from {rfc3339(start)} is kept in {finest.step_s} s buckets, "
                                 f"so step must be a multiple of {finest.step_s}")
    elif span / step > MOST_POINTS:
        raise QueryError("step", f"{step} s gives {math.ceil(span / step)} buckets over this range; at most "
                                 f"{MOST_POINTS}, so a step of {math.ceil(span / MOST_POINTS)} s or more")
    # The coarsest tier that divides the step reads the fewest rows for the same sums.
    return max((t for t in TIERS if step % t.step_s == 0 and t.step_s >= finest.step_s), key=lambda t: t.step_s), step


def series_of(rows):
    """Return one GPU's series from its [(bucket start, sums)]: each field's means, and the energy per bucket and in all."""
    series = {"t": []}
    series.update((field, []) for field in FIELDS)
    steps, joules = [], 0.0  # each bucket's energy (the CSV has it per row), and the range's
    for bucket, sums in rows:
        series["t"].append(bucket)
        for i, field in enumerate(FIELDS):
            count = sums[2 * i + 1]
            series[field].append(tidy(sums[2 * i] / count) if count else None)
        steps.append(round(sums[-1] / 3600, 4))
        joules += sums[-1]
    series["energyWh"] = round(joules / 3600, 3)
    series["energyWhSteps"] = steps
    return series


def head(device, start, end, step):
    """Return what an answer says besides its GPUs."""
    return {"device": device, "from": tidy(start), "to": tidy(end), "step": step}


def system_of(series):
    """Return the API's `system` from the host's series as a store reads it: its fields by their names, no energy."""
    return {"t": series["t"], **{name: series[field] for name, field in zip(SYSTEM_FIELDS, FIELDS)}}


def split_host(kept):
    """Return (the GPUs, the host's key or None) of a store's gpus() answer, whose host comes first at HOST."""
    if kept and kept[0][0] == HOST:
        return kept[1:], kept[0][3]
    return kept or [], None


def answer(device, start, end, step, rows, gpus):
    """Return the API's answer from {gpu: [(bucket start, sums)]} and {gpu: (uuid, name)}."""
    result = []
    for index in sorted(rows):
        uuid, name = gpus.get(index, (None, None))
        result.append({"index": index, "uuid": uuid, "name": name, **series_of(rows[index])})
    return {**head(device, start, end, step), "gpus": result}


def whole(store, device, tier, start, end, step):
    """Return a store's whole answer for `device` (GPU by GPU, as the API reads it); None if it has no history."""
    kept = store.gpus(device)
    if kept is None:
        return None
    gpus, host = split_host(kept)
    found = ((index, uuid, name, store.series(key, tier, start, end, step)) for index, uuid, name, key in gpus)
    result = {**head(device, start, end, step), "gpus": [
        {"index": index, "uuid": uuid, "name": name, **series} for index, uuid, name, series in found if series]}
    system = None if host is None else store.series(host, tier, start, end, step)
    if system:
        result["system"] = system_of(system)
    return result


def tidy(value):
    """Return a number rounded to 2 places, and whole numbers as integers: 80, not 80.0."""
    value = round(value, 2)
    return int(value) if value == int(value) else value

"""The fleet in this process: each device's latest push, its GPUs' recent history and its status.

A fleet (this one, or RedisFleet in fleet_redis.py) offers the same few calls: event() builds
a push's event, commit() stores it and publishes it as one step, snapshot() and counts() read
the state, start() begins its background work, health() adds to /healthz.
"""
import logging
import threading
import time
from collections import deque

log = logging.getLogger("gpustats")
# The series a page charts; one point a second at most, so memory is bounded by HISTORY_S.
HISTORY_FIELDS = ("utilizationGpu", "memoryUsed", "temperatureGpu", "powerDraw")
HISTORY_STEP_S = 1.0


class Unavailable(Exception):
    """The shared store cannot be reached right now: the caller answers 503 and nothing changed."""


def new_event(device, push, now):
    """Return the event every viewer gets for an accepted push."""
    return {"device": device, "status": "online", "receivedAt": round(now, 3),
            "sampledAt": push["sampledAt"], "host": push["host"],
            "agent": push["agent"], "error": push["error"], "gpus": push["gpus"]}


def status_at(received_at, now, stale_after_s, offline_after_s):
    """Return online, stale or offline for a device last heard from at `received_at`."""
    age = now - received_at
    if age >= offline_after_s:
        return "offline"
    return "stale" if age >= stale_after_s else "online"


def status_change(device, status, received_at, now):
    """Return the data of an `event: status`."""
    return {"device": device, "status": status, "receivedAt": received_at, "at": round(now, 3)}


def watch(name, period_s, work, closed):
    """Run `work` every `period_s` in a named thread until `closed()`; a failure is logged, never fatal."""
    def loop():
        while not closed():
            time.sleep(period_s)
            try:
                work()
            except Exception:  # never silently gone: say so loudly, and keep going
                log.exception("%s failed; it goes on", name)
    threading.Thread(target=loop, name=name, daemon=True).start()


class Fleet:
    """The server's view of every device that has pushed since it started, in this process."""

    shared_ids = False  # event ids are this process's own

    def __init__(self, stale_after_s, offline_after_s, history_s, clock=time.time):
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self.history_s = history_s
        self._clock = clock
        self._lock = threading.Lock()
        self._devices = {}  # name -> latest event data
        self._history = {}  # (name, gpu index) -> deque of (t, *HISTORY_FIELDS)
        self._broadcaster = None
        self._closed = False

    def start(self, broadcaster, sweep_s):
        """Publish through `broadcaster`, and send `event: status` changes as devices go quiet."""
        self._broadcaster = broadcaster
        watch("status-watch", sweep_s, self._publish_status_changes, lambda: self._closed)

    def close(self):
        """Stop the background work (on SIGTERM)."""
        self._closed = True

    def health(self):
        return {}

    def event(self, device, push):
        """Return the event every viewer gets for an accepted push; stores nothing."""
        return new_event(device, push, self._clock())

    def commit(self, event, encoded):
        """Store an accepted push's event and publish it (`encoded` by the broadcaster); return its id."""
        self.record(event)
        return self._broadcaster.publish_encoded(encoded)

    def record(self, event):
        """Store an accepted push's event as its device's latest state, and its GPUs' history."""
        device, now = event["device"], event["receivedAt"]
        with self._lock:
            self._devices[device] = event
            if self.history_s:
                for gpu in event["gpus"]:
                    self._remember(device, gpu, now)
        return event

    def restore(self, event, points):
        """Take a device's state and history as another process kept them: points of (t, {index: values})."""
        with self._lock:
            self._devices[event["device"]] = event
            for t, by_gpu in points:
                for index, values in by_gpu.items():
                    self._remember(event["device"], {"index": int(index), **dict(zip(HISTORY_FIELDS, values))}, t)

    def set_status(self, device, status):
        """Take a status change that another process found."""
        with self._lock:
            if device in self._devices:
                self._devices[device] = dict(self._devices[device], status=status)

    def _remember(self, device, gpu, now):
        points = self._history.get((device, gpu["index"]))
        if points is None:
            points = deque(maxlen=int(self.history_s / HISTORY_STEP_S) + 1)
            self._history[(device, gpu["index"])] = points
        point = (round(now, 3), *(gpu.get(name) for name in HISTORY_FIELDS))
        if points and now - points[-1][0] < HISTORY_STEP_S:
            points[-1] = point  # Coalesce fast pushes: the newest value wins.
        else:
            points.append(point)

    def snapshot(self, devices=None):
        """Return [(device, event data with each GPU's history)] for `devices` (None: all)."""
        cutoff = self._clock() - self.history_s
        with self._lock:
            result = []
            for name in sorted(self._devices):
                if devices is not None and name not in devices:
                    continue
                event = dict(self._devices[name], snapshot=True)
                event["gpus"] = [dict(gpu, history=self._series(name, gpu["index"], cutoff))
                                 for gpu in event["gpus"]]
                result.append((name, event))
            return result

    def _series(self, device, index, cutoff):
        points = [p for p in self._history.get((device, index), ()) if p[0] >= cutoff]
        columns = list(zip(*points)) or [()] * (len(HISTORY_FIELDS) + 1)
        series = {"t": list(columns[0])}
        series.update((name, list(col)) for name, col in zip(HISTORY_FIELDS, columns[1:]))
        return series

    def sweep(self):
        """Update statuses by age; return [(device, status event data)] for each change."""
        now = self._clock()
        changes = []
        with self._lock:
            for name, event in self._devices.items():
                status = status_at(event["receivedAt"], now, self.stale_after_s, self.offline_after_s)
                if status != event["status"]:
                    self._devices[name] = dict(event, status=status)
                    changes.append((name, status_change(name, status, event["receivedAt"], now)))
        return changes

    def _publish_status_changes(self):
        for device, change in self.sweep():
            self._broadcaster.publish(device, change, event="status")

    def counts(self):
        """Return how many devices are online, stale and offline."""
        with self._lock:
            statuses = [event["status"] for event in self._devices.values()]
        return {s: statuses.count(s) for s in ("online", "stale", "offline")}

"""Keep each device's latest push, its GPUs' recent history and its liveness status."""
import threading
import time
from collections import deque

# The series a page charts; one point a second at most, so memory is bounded by HISTORY_S.
HISTORY_FIELDS = ("utilizationGpu", "memoryUsed", "temperatureGpu", "powerDraw")
HISTORY_STEP_S = 1.0


class Fleet:
    """The server's view of every device that has pushed since it started."""

    def __init__(self, stale_after_s, offline_after_s, history_s, clock=time.time):
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self.history_s = history_s
        self._clock = clock
        self._lock = threading.Lock()
        self._devices = {}  # name -> latest event data
        self._history = {}  # (name, gpu index) -> deque of (t, *HISTORY_FIELDS)

    def event(self, device, push):
        """Return the event every viewer gets for an accepted push; stores nothing."""
        return {"device": device, "status": "online", "receivedAt": round(self._clock(), 3),
                "sampledAt": push["sampledAt"], "host": push["host"],
                "agent": push["agent"], "error": push["error"], "gpus": push["gpus"]}

    def record(self, event):
        """Store an accepted push's event as its device's latest state, and its GPUs' history."""
        device, now = event["device"], event["receivedAt"]
        with self._lock:
            self._devices[device] = event
            if self.history_s:
                for gpu in event["gpus"]:
                    self._remember(device, gpu, now)
        return event

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

    def status_of(self, event, now):
        """Return online, stale or offline for a device's latest event at `now`."""
        age = now - event["receivedAt"]
        if age >= self.offline_after_s:
            return "offline"
        return "stale" if age >= self.stale_after_s else "online"

    def sweep(self):
        """Update statuses by age; return [(device, status event data)] for each change."""
        now = self._clock()
        changes = []
        with self._lock:
            for name, event in self._devices.items():
                status = self.status_of(event, now)
                if status != event["status"]:
                    self._devices[name] = dict(event, status=status)
                    changes.append((name, {"device": name, "status": status,
                                           "receivedAt": event["receivedAt"], "at": round(now, 3)}))
        return changes

    def counts(self):
        """Return how many devices are online, stale and offline."""
        with self._lock:
            statuses = [event["status"] for event in self._devices.values()]
        return {s: statuses.count(s) for s in ("online", "stale", "offline")}

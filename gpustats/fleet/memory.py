"""The fleet in this process: each device's latest push and its status, handed on to history, alerts and jobs.

It keeps the contract both fleets share (LiveFleet, in fleet/__init__.py); RedisFleet (fleet/redis.py)
keeps a Fleet of its own as a mirror of Redis' state, which it feeds through record(), set_status() and alert().
"""
import logging
import threading
import time

from gpustats.alerts.rules import AlertBoard
from gpustats.background import watch
from gpustats.stream import sse

log = logging.getLogger("gpustats")


def new_event(device, push, now):
    """Return the event every viewer gets for an accepted push."""
    return {"device": device, "status": "online", "receivedAt": round(now, 3),
            "sampledAt": push["sampledAt"], "host": push["host"],
            "agent": push["agent"], "error": push["error"], "gpus": push["gpus"], "system": push.get("system")}


def status_at(received_at, now, stale_after_s, offline_after_s):
    """Return online, stale or offline for a device last heard from at `received_at`."""
    age = now - received_at
    if age >= offline_after_s:
        return "offline"
    return "stale" if age >= stale_after_s else "online"


REMOVED = "removed"  # the status a device's last event has: it left the registry, and the dashboard


def removal(device, now):
    """Return the data of the `event: status` that says a device was removed."""
    return {"device": device, "status": REMOVED, "at": round(now, 3)}


def status_change(device, status, received_at, now):
    """Return the data of an `event: status`."""
    return {"device": device, "status": status, "receivedAt": received_at, "at": round(now, 3)}


class Fleet:
    """The server's view of every device that has pushed since it started, in this process."""

    shared_ids = False  # event ids are this process's own

    def __init__(self, stale_after_s, offline_after_s, history=None, alerter=None, board=None, clock=time.time,
                 jobs=None):
        self.stale_after_s = stale_after_s
        self.offline_after_s = offline_after_s
        self._history = history  # fed every accepted push
        self._jobs = jobs  # fed every accepted push, status change and removal, in order
        self._alerter = alerter  # fed every accepted push and status change; what it returns is published
        self._board = board or AlertBoard()  # the active and recent alerts viewers are shown
        self._clock = clock
        self._lock = threading.Lock()
        self._devices = {}  # name -> latest event data
        self._broadcaster = None
        self._closed = False

    def attach(self, broadcaster):
        """Publish through `broadcaster`, whose positions snapshots are taken at."""
        self._broadcaster = broadcaster

    def start(self, broadcaster, sweep_s):
        """Publish through `broadcaster`, and send `event: status` changes as devices go quiet."""
        self.attach(broadcaster)
        watch("status-watch", sweep_s, self.sweep, lambda: self._closed)

    def restore_kept(self, known):
        """Take each known device's state as history kept it at the last stop, with the status it had then.

        A device that went quiet while the server was down turns stale or offline at the first sweep,
        so its DeviceOffline fires as if the server had never stopped.
        """
        if self._history is None:
            return 0
        # last_states() returns only what the fleet itself wrote (a device, a time, its GPUs).
        kept = [dict(event, status=event.get("status") or "online") for event in self._history.last_states()
                if event["device"] in known]
        with self._lock:
            for event in kept:
                self._devices.setdefault(event["device"], event)
        return len(kept)

    def close(self):
        """Stop the background work (on SIGTERM)."""
        self._closed = True

    def health(self):
        return {}

    def accept(self, device, push):
        """Store a checked push as its device's latest state, publish it, queue it for history and the alert rules; return its event id.

        What can fail (ValueError: nothing in it can be sent) fails before anything is stored:
        a push changes all or nothing.
        """
        event = new_event(device, push, self._clock())
        block = sse.data_block(event, finite=True)  # checked: every number is finite
        with self._lock:  # state and stream move together, as in record()
            self._devices[device] = event
            event_id = self._broadcaster.publish_encoded((device, b"", block))
        if self._history is not None:
            self._history.add(event)
        if self._jobs is not None:
            self._jobs.add(event)
        if self._alerter is not None:
            self._alert_on(self._alerter.push, event)
        return event_id

    def _alert_on(self, rules, data):
        """Publish the alerts `rules(data)` returns; a failure there is logged, and the push or change stands."""
        try:
            alerts = rules(data)
        except Exception:
            log.exception("the alert rules failed on %s; it stands, unjudged", data.get("device"))
            return
        for alert in alerts:
            self.alert(alert)

    def alert(self, alert, publish=None):
        """Show an alert's firing or resolution to viewers, and publish it (`event: alert`) under the same lock."""
        with self._lock:
            self._board.apply(alert)
            if publish is not None:
                return publish()
            if self._broadcaster is not None:
                return self._broadcaster.publish(alert["device"], alert, event="alert")
        return None

    def restore_alerts(self, active, recent):
        """Take the active and recent alerts as they were kept."""
        self._board.restore(active, recent)

    def alerts(self):
        """Return {"active": [...], "recent": [...]}, newest first."""
        return self._board.view()

    def record(self, event, publish=None):
        """Store an event as its device's latest state, and run `publish` under the same lock.

        State and stream move together, so a snapshot always matches the position it names.
        """
        with self._lock:
            self._devices[event["device"]] = event
            return publish() if publish else None

    def restore(self, event):
        """Take a device's state as another process kept it."""
        with self._lock:
            self._devices[event["device"]] = event

    def set_status(self, device, status, publish=None):
        """Take a status change that another process found, and run `publish` under the same lock."""
        with self._lock:
            if status == REMOVED:
                self._devices.pop(device, None)
            elif device in self._devices:
                self._devices[device] = dict(self._devices[device], status=status)
            return publish() if publish else None

    def forget(self, device):
        """Take a removed device out of the fleet, and tell viewers (`event: status`, status "removed")."""
        with self._lock:
            gone = self._devices.pop(device, None) is not None
            if gone and self._broadcaster is not None:
                self._broadcaster.publish(device, removal(device, self._clock()), event="status")
        if self._history is not None:
            self._history.forget_state(device)
        if gone and self._jobs is not None:
            self._jobs.status(removal(device, self._clock()))  # its running jobs are lost

    def snapshot(self):
        """Return the broadcaster's (sequence, event id) and [(device, latest event data)] that match it."""
        with self._lock:
            position = self._broadcaster.position()
            return position, [(name, dict(self._devices[name], snapshot=True)) for name in sorted(self._devices)]

    def devices(self):
        """Return every device's latest event data (with its status), by name."""
        with self._lock:
            return [self._devices[name] for name in sorted(self._devices)]

    def sweep(self):
        """Update statuses by age and publish each change as `event: status`; return [(device, its data)]."""
        now = self._clock()
        changes = []
        with self._lock:
            for name, event in self._devices.items():
                status = status_at(event["receivedAt"], now, self.stale_after_s, self.offline_after_s)
                if status != event["status"]:
                    self._devices[name] = dict(event, status=status)
                    change = status_change(name, status, event["receivedAt"], now)
                    changes.append((name, change))
                    if self._history is not None:
                        self._history.keep_status(name, status)
                    if self._jobs is not None:
                        self._jobs.status(change)
                    if self._broadcaster is not None:
                        self._broadcaster.publish(name, change, event="status")
        for _, change in changes if self._alerter is not None else ():
            self._alert_on(self._alerter.status, change)
        return changes

    def counts(self):
        """Return how many devices are online, stale and offline."""
        with self._lock:
            statuses = [event["status"] for event in self._devices.values()]
        return {s: statuses.count(s) for s in ("online", "stale", "offline")}

"""Alert rules: pure functions of pushes and status changes, which carry their own time.

Rules(settings) takes each push (`push(event)`) and each status change (`status(change)`)
in order and returns the alerts that fire or resolve at that moment, as the dicts
/api/alerts and `event: alert` carry. It keeps no clock of its own: time is the push's
`receivedAt` or the change's `at`, so the same events give the same alerts on any worker,
and tests play days in a blink. Its whole state is plain JSON (`state()`), kept across
restarts so a deploy never fires an alert twice.
"""
import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import orjson

log = logging.getLogger("gpustats")
GPUS_WINDOW_S = 6 * 3600  # GpuError: fewer GPUs than the device had in this long
BUSY, IDLE = 50, 5  # GpuJobDone: utilization that starts a job, and under which it has ended (GpuIdleHeld: idle)
FOLLOWED = 8  # GpuJobDone: processes a busy GPU's job follows, at most (the first seen), to name the one that ran
SEVERITY = {"GpuHot": "critical", "GpuMemoryFull": "warning", "DeviceOffline": "critical",
            "GpuError": "critical", "GpuJobDone": "info", "GpuIdleHeld": "warning", "HostMemoryFull": "warning",
            "DiskFull": "warning"}
HOST_ALERTS = frozenset({"HostMemoryFull", "DiskFull"})  # of a push's `system`: no GPU's, never "no longer reported" by _gone


@dataclass(frozen=True)
class AlertSettings:
    """The rules' thresholds; 0 switches a rule off."""
    temp_c: float = 85
    vram_pct: float = 95
    offline: bool = True
    gpu_error: bool = True
    job_min_s: float = 900
    for_s: float = 120
    idle_held_mib: float = 1024
    idle_held_s: float = 1800
    host_memory_pct: float = 95
    disk_pct: float = 95


def fingerprint(labels):
    """Return Alertmanager's fingerprint of `labels`: FNV-1a 64 over the sorted names and values."""
    h = 0xcbf29ce484222325
    for name in sorted(labels):
        for byte in name.encode() + b"\xff" + labels[name].encode() + b"\xff":
            h = ((h ^ byte) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def duration(seconds):
    """Return `seconds` as people say it: 50 s, 2 min, 3 h 12 min, 2 d 4 h."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min" if s % 3600 >= 60 else f"{s // 3600} h"
    return f"{s // 86400} d {s % 86400 // 3600} h" if s % 86400 >= 3600 else f"{s // 86400} d"


def clock_time(t):
    """Return the server's local time of day at `t`, with its zone (TZ sets it): 04:10 UTC."""
    return time.strftime("%H:%M %Z", time.localtime(t))


def _time(t):
    """Return unix seconds `t` as RFC 3339 in UTC, to the millisecond."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _number(value):
    return f"{value:g}"


class Rules:
    """The alert rules over the fleet's pushes and status changes, with their hold-downs."""

    def __init__(self, settings, state=None):
        self.settings = settings
        state = state or {}
        self._firing = state.get("firing", {})  # key -> {"alert": the firing alert, "t": when it fired}
        self._pending = state.get("pending", {})  # key -> since when its condition holds
        self._clearing = state.get("clearing", {})  # key -> since when a firing alert's condition is false
        self._jobs = state.get("jobs", {})  # device|gpu -> {"start": t, "busy": t last at 50 %+, "idle": t or None}
        self._gpus = state.get("gpus", {})  # device -> {GPU count: when last reported}
        self._held = state.get("held", {})  # device|gpu -> {pid|start: {"since": idle from, "mib", "at", "who"}}
        self._idle_firing = sum(key.startswith("GpuIdleHeld|") for key in self._firing)  # lets most pushes skip it
        # device -> the keys of its pending and firing alerts: a push looks at its own device's, not the fleet's
        # (scanning every key cost each push time in proportion to the fleet's pending alerts).
        self._watched = {}  # each device's keys, in the order they became pending, and firing ones moved last as they fire
        for key in (*self._pending, *self._firing):
            self._watched.setdefault(key.split("|")[1], {})[key] = None

    def state(self):
        """Return everything the rules remember, as JSON-able data."""
        return {"firing": self._firing, "pending": self._pending, "clearing": self._clearing,
                "jobs": self._jobs, "gpus": self._gpus, "held": self._held}

    def active(self):
        """Return the firing alerts, oldest first."""
        return [entry["alert"] for entry in sorted(self._firing.values(), key=lambda e: e["t"])]

    def push(self, event):
        """Return the alerts that fire or resolve with this accepted push."""
        s, device, now = self.settings, event["device"], event["receivedAt"]
        out = self._resolve(_key("DeviceOffline", device), now, f"{device} is back online")
        gpus = event.get("gpus") or []
        for gpu in gpus:
            index = gpu.get("index")
            if index is None:
                continue
            where = f"{device}:{index}"
            if s.temp_c:
                temp = gpu.get("temperatureGpu")
                out += self._hold("GpuHot", device, index, now, None if temp is None else temp >= s.temp_c, temp,
                                  lambda v: f"{where} is at {_number(v)} °C, at or above {_number(s.temp_c)} °C"
                                            f"{self._for()}",
                                  lambda v: f"{where} is back to {_number(v)} °C, under {_number(s.temp_c)} °C"
                                            f"{self._for()}")
            if s.vram_pct:
                share = _share(gpu.get("memoryUsed"), gpu.get("memoryTotal"))
                out += self._hold("GpuMemoryFull", device, index, now, None if share is None else share >= s.vram_pct,
                                  share, lambda v: f"{where} memory is {_number(v)} % full ({_gib(gpu)}), at or above "
                                                   f"{_number(s.vram_pct)} %{self._for()}",
                                  lambda v: f"{where} memory is down to {_number(v)} %, under "
                                            f"{_number(s.vram_pct)} %{self._for()}")
            if s.gpu_error:
                error = gpu.get("error")
                out += self._hold("GpuError", device, index, now, bool(error), None,
                                  lambda v: f"{where} reports an error: {str(error)[:300]}",
                                  lambda v: f"{where} reports no error{self._for()}", fire_after=0)
            if s.job_min_s:
                out += self._job(device, index, now, gpu.get("utilizationGpu"), gpu.get("processes"))
            if s.idle_held_mib:
                out += self._idle_held(device, index, now, gpu)
        system = event.get("system")
        if system is not None and (s.host_memory_pct or s.disk_pct):
            out += self._host(device, now, system)
        out += self._gone(device, now, {str(gpu.get("index")) for gpu in gpus})
        if s.gpu_error:
            out += self._count(device, now, len(gpus), event.get("error"))
        return out

    def _gone(self, device, now, present):
        """Take a GPU missing from a push as a false condition: its alerts resolve after the hold-down."""
        out = []
        for key in self._keys_of(device):
            name, _, gpu = key.split("|", 2)
            if gpu == "" or gpu in present or name in HOST_ALERTS:
                continue
            out += self._hold(name, device, int(gpu), now, False, None, None,
                              lambda v: f"{device}:{gpu} is no longer reported{self._for()}")
        return out

    def status(self, change):
        """Return the alerts that fire with a status change (`event: status` data)."""
        device, now = change["device"], change["at"]
        if change["status"] != "offline":
            return []
        for found in (self._jobs, self._held):
            for key in [k for k in found if k.rpartition("|")[0] == device]:
                del found[key]  # a PC that went quiet did not finish its jobs, nor idled: it may have crashed
        for timers in (self._pending, self._clearing):  # nor does a hold-down run on across the silence
            for key in [k for k in self._watched.get(device, ()) if k in timers]:
                del timers[key]
                self._unwatch(key, device)
        if not self.settings.offline or _key("DeviceOffline", device) in self._firing:
            return []
        summary = f"{device} is offline: no push since {clock_time(change['receivedAt'])}"
        return [self._fire("DeviceOffline", device, None, now, summary, round(now - change["receivedAt"]))]

    # ---- the kinds of rule ---------------------------------------------------------------------

    def _for(self):
        return f" for {duration(self.settings.for_s)}" if self.settings.for_s else ""

    def _hold(self, name, device, gpu, now, condition, value, fired, resolved, fire_after=None, mount=None):
        """Fire when `condition` has held for the hold-down, resolve when it has been false as long (a disk's: by mount)."""
        key, hold = _key(name, device, gpu if mount is None else mount), self.settings.for_s
        if condition is None:  # not reported in this push: nothing is known, nothing changes
            return []
        if key in self._firing:
            if condition:
                self._clearing.pop(key, None)
                return []
            since = self._clearing.setdefault(key, now)
            return self._resolve(key, now, resolved(value), value) if now - since >= hold else []
        if not condition:
            if self._pending.pop(key, None) is not None:  # a flap inside the hold-down sends nothing
                self._unwatch(key, device)
            return []
        since = self._pending.get(key)
        if since is None:
            since = self._pending[key] = now
            self._watched.setdefault(device, {})[key] = None
        if now - since < (hold if fire_after is None else fire_after):
            return []
        del self._pending[key]
        return [self._fire(name, device, gpu, now, fired(value), value, mount)]

    def _host(self, device, now, system):
        """HostMemoryFull and DiskFull (one per mount) from a push's `system`, each held for ALERT_FOR_S.

        A disk fills over hours, so waiting ALERT_FOR_S costs nothing and spares a page for a
        scratch file written and deleted at once. A disk no longer listed resolves like a GPU gone.
        """
        s, out = self.settings, []
        if s.host_memory_pct:
            share = _share(system.get("memoryUsed"), system.get("memoryTotal"))
            out += self._hold("HostMemoryFull", device, None, now, None if share is None else share >= s.host_memory_pct,
                              share, lambda v: f"{device}'s memory is {_number(v)} % used ({_gib(system)}), at or above "
                                               f"{_number(s.host_memory_pct)} %{self._for()}",
                              lambda v: f"{device}'s memory is down to {_number(v)} %, under "
                                        f"{_number(s.host_memory_pct)} %{self._for()}")
        disks = system.get("disks")
        if not s.disk_pct or disks is None:  # null: the PC could not say, nothing changes
            return out
        for disk in disks:
            mount, share = disk["mount"], _share(disk.get("used"), disk.get("total"))
            out += self._hold("DiskFull", device, None, now, None if share is None else share >= s.disk_pct, share,
                              lambda v, d=disk: f"{device}'s disk {d['mount']} is {_number(v)} % full "
                                                f"({_gib(d, 'used', 'total')}), at or above {_number(s.disk_pct)} %"
                                                f"{self._for()}",
                              lambda v, m=mount: f"{device}'s disk {m} is down to {_number(v)} %, under "
                                                 f"{_number(s.disk_pct)} %{self._for()}", mount=mount)
        listed, mine = {disk["mount"] for disk in disks}, _key("DiskFull", device, "")
        for key in [k for k in self._keys_of(device) if k.startswith(mine)]:
            mount = key[len(mine):]
            if mount not in listed:
                out += self._hold("DiskFull", device, None, now, False, None, None,
                                  lambda v, m=mount: f"{device}'s disk {m} is no longer reported{self._for()}",
                                  mount=mount)
        return out

    def _job(self, device, gpu, now, utilization, processes=None):
        """GpuJobDone: busy (50 % or more) for ALERT_JOB_MIN_S, then under 5 % for ALERT_FOR_S; named after its process."""
        key = f"{device}|{gpu}"
        job = self._jobs.get(key)
        if utilization is None:
            return []
        if job is None:
            if utilization < BUSY:
                return []
            job = self._jobs[key] = {"start": now, "busy": now, "idle": None}
        if processes:
            _follow(job, now, utilization, processes)
        if utilization >= IDLE:
            job["idle"] = None  # a dip that came back up: the job goes on
            if utilization >= BUSY:
                job["busy"] = now
            return []
        idle = job["idle"] = now if job["idle"] is None else job["idle"]
        if now - idle < self.settings.for_s:
            return []
        del self._jobs[key]
        # Busy long enough: from its first sample at 50 % to its last, not one spike and a long tail.
        if job.get("busy", job["start"]) - job["start"] < self.settings.job_min_s:
            return []
        length = idle - job["start"]
        value, summary = round(length), f"{device}:{gpu} finished a {duration(length)} job at {clock_time(idle)}"
        ran = max(job.get("procs", {}).values(), key=lambda p: (p["peak"], p["last"] - p["start"]), default=None)
        if ran is not None:  # where a process ran, the job is named after it: the one that held the most memory
            took, mean = ran["last"] - ran["start"], _mean(ran["own"]) if ran["own"][1] else _mean(ran["util"])
            value = round(took)
            summary = (f"{_who(ran)} on {device}:{gpu} finished after {duration(took)}, peak {ran['peak'] / 1024:.1f} GiB"
                       + (f", mean {mean:.0f} %" if mean is not None else ""))
        fired = self._fire("GpuJobDone", device, gpu, now, summary, value)
        return [fired] + self._resolve(_key("GpuJobDone", device, gpu), now, summary, value)

    def _idle_held(self, device, gpu, now, reading):
        """GpuIdleHeld: a process holds ALERT_IDLE_HELD_MIB or more on a GPU it leaves under 5 % for ALERT_IDLE_HELD_S.

        Its own utilization counts where the agent sends it, else the GPU's. It resolves at once
        when that process lets go of its memory (or is gone) or gets busy. Written for the common
        case, nobody holding memory idle, which costs a push a look at each process' memory.
        """
        processes = reading.get("processes")
        if processes is None:
            return []  # no list of processes: nothing is known, nothing changes
        most, utilization, holders = self.settings.idle_held_mib, reading.get("utilizationGpu"), []
        for process in processes:
            memory = process.get("memoryUsed")
            if memory is not None and memory >= most:
                own = process.get("utilization")
                level = utilization if own is None else own
                if level is None or level < IDLE:
                    holders.append(process)
        if not holders and not self._held and not self._idle_firing:
            return []
        key = f"{device}|{gpu}"
        kept, alert = self._held.get(key, {}), f"GpuIdleHeld|{key}"
        held, where = {}, f"{device}:{gpu}"
        for process in holders:
            name = _process_key(process)
            own = process.get("utilization")
            level = utilization if own is None else own
            if level is None:  # not reported in this push: as it was
                if name in kept:
                    held[name] = kept[name]
                continue
            entry = held[name] = kept.get(name) or {"since": now}
            entry.update(mib=process["memoryUsed"], at=level, who=_who(process))
        if held:
            self._held[key] = held
        else:
            self._held.pop(key, None)
        firing = self._firing.get(alert)
        if firing is not None:
            name = firing.get("process")
            if name in held:
                return []
            who = firing.get("who", "the process")
            listed = next((p for p in processes if _process_key(p) == name), None)
            level = None if listed is None else utilization if listed.get("utilization") is None else listed["utilization"]
            done = (f"{who} is busy on {where} again, at {_number(level)} %" if level is not None and level >= IDLE
                    and (listed.get("memoryUsed") or 0) >= most else f"{who} let go of its memory on {where}")
            return self._resolve(alert, now, done)
        name, entry = min(held.items(), key=lambda item: item[1]["since"], default=(None, None))
        if entry is None or now - entry["since"] < self.settings.idle_held_s:
            return []
        summary = (f"{entry['who']} holds {entry['mib'] / 1024:.1f} GiB on {where} at {_number(entry['at'])} % "
                   f"for {duration(now - entry['since'])}")
        fired = self._fire("GpuIdleHeld", device, gpu, now, summary, entry["mib"])
        self._firing[alert].update(process=name, who=entry["who"])
        return [fired]

    def _count(self, device, now, count, error):
        """GpuError for the device: it reads no GPU and says why, or reports fewer GPUs than within the last 6 hours."""
        seen = self._gpus.setdefault(device, {})
        if now - seen.get(str(count), float("-inf")) >= 60:  # to the minute: the state changes once a minute, not each push
            seen[str(count)] = now
        for kept in [c for c, t in seen.items() if now - t > GPUS_WINDOW_S]:
            del seen[kept]
        most = max(int(c) for c in seen)
        why = f": {str(error)[:300]}" if error else ""
        # A PC that reads no GPU at all and says why is a problem too (issue 30: it showed a green "online").
        unread = count == 0 and bool(error)

        def fired(v):
            if unread and most == 0:
                return f"{device} reads no GPU{why}"
            return f"{device} reports {v} GPU{'' if v == 1 else 's'}; it had {most} within {GPUS_WINDOW_S // 3600} h{why}"
        return self._hold("GpuError", device, None, now, count < most or unread, count, fired,
                          lambda v: f"{device} reports {v} GPU{'' if v == 1 else 's'} again", fire_after=0)

    # ---- transitions ---------------------------------------------------------------------------

    def _fire(self, name, device, gpu, now, summary, value, mount=None):
        labels = {"alertname": name, "device": device, "severity": SEVERITY[name]}
        if gpu is not None:
            labels["gpu"] = str(gpu)
        if mount is not None:  # two full disks of one PC are two alerts
            labels["mount"] = mount
        alert = {"alertname": name, "status": "firing", "device": device}
        if gpu is not None:
            alert["gpu"] = gpu
        if mount is not None:
            alert["mount"] = mount
        alert.update(severity=SEVERITY[name], summary=summary, value=value, startsAt=_time(now), endsAt=None,
                     fingerprint=fingerprint(labels))
        key = _key(name, device, gpu if mount is None else mount)
        if key not in self._firing:  # a new firing key goes last, as it does in _firing
            watched = self._watched.setdefault(device, {})
            watched.pop(key, None)
            watched[key] = None
        self._firing[key] = {"alert": alert, "t": now}
        self._idle_firing += name == "GpuIdleHeld"
        return alert

    def _keys_of(self, device):
        """Return `device`'s pending keys, then its firing ones, each in their dict's order (as a scan of both gave them)."""
        keys = self._watched.get(device)
        if not keys:
            return []
        pending = [key for key in keys if key in self._pending]
        return pending + [key for key in keys if key not in self._pending] if pending else list(keys)

    def _unwatch(self, key, device):
        """Drop `key` from its device's watched keys once it is neither pending nor firing."""
        if key in self._pending or key in self._firing:
            return
        keys = self._watched.get(device)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._watched[device]

    def _resolve(self, key, now, summary, value=None):
        entry = self._firing.pop(key, None)
        self._clearing.pop(key, None)
        if entry is None:
            return []
        self._unwatch(key, entry["alert"]["device"])
        self._idle_firing -= entry["alert"]["alertname"] == "GpuIdleHeld"
        resolved = dict(entry["alert"], status="resolved", summary=summary, endsAt=_time(now))
        if value is not None:
            resolved["value"] = value
        return [resolved]


def load_state(text, settings=None):
    """Return (Rules, recent alerts) from what save_state() wrote; nothing saved, or unreadable: none."""
    try:
        document = json.loads(text) if text else {}
    except ValueError:
        log.error("the saved alert state is not JSON; starting with none")
        document = {}
    return Rules(settings, document.get("rules")), document.get("recent", [])


def save_state(rules, board):
    """Return the rules' state and the board's recent alerts as one JSON document."""
    # orjson: 0.14 ms, not json's 1.36 ms, for 2,000 PCs' state, written once a second (docs/PERFORMANCE.md).
    # The rules keep GPU counts as keys, which JSON writes as text.
    return orjson.dumps({"rules": rules.state(), "recent": board.view()["recent"]},
                        option=orjson.OPT_NON_STR_KEYS).decode()


def _key(name, device, gpu=None):
    return f"{name}|{device}|{'' if gpu is None else gpu}"


def _process_key(process):
    """Return what tells a process apart: its pid and, where sent, its start (a reused pid is another process)."""
    started = process.get("startedAt")
    return f"{process.get('pid')}|{'' if started is None else started}"


def _who(process):
    """Return a process as people name it: "alice's python3 train.py", or its command alone without a user."""
    command = process.get("command") or process.get("name") or f"pid {process.get('pid')}"
    return f"{process['user']}'s {command}" if process.get("user") else command


def _mean(pair):
    return pair[0] / pair[1] if pair[1] else None


def _follow(job, now, utilization, processes):
    """Note each process a busy GPU's job sees: who, since when, its peak memory and utilization (FOLLOWED at most)."""
    followed = job.setdefault("procs", {})
    for process in processes:
        name = _process_key(process)
        entry = followed.get(name)
        if entry is None:
            if len(followed) >= FOLLOWED:
                continue
            started = process.get("startedAt")
            entry = followed[name] = {"user": process.get("user"), "command": process.get("command"),
                                      "name": process.get("name"), "pid": process.get("pid"),
                                      "start": now if started is None else min(started, now), "last": now, "peak": 0,
                                      "own": [0, 0], "util": [0, 0]}
        entry["last"] = now
        memory, own = process.get("memoryUsed"), process.get("utilization")
        if memory is not None and memory > entry["peak"]:
            entry["peak"] = memory
        if own is not None:
            entry["own"][0] += own
            entry["own"][1] += 1
        entry["util"][0] += utilization
        entry["util"][1] += 1
        for field in ("user", "command"):
            if process.get(field):
                entry[field] = process[field]


def _share(used, total):
    if used is None or not total:
        return None
    return round(100.0 * used / total, 1)


def _gib(reading, used="memoryUsed", total="memoryTotal"):
    """Return "61.2 of 80.0 GiB" from a reading's MiB (a GPU's or a host's memory, a disk's space)."""
    return f"{reading[used] / 1024:.1f} of {reading[total] / 1024:.1f} GiB"


class AlertBoard:
    """What viewers are shown: the active alerts and the recent ones (firing or resolved), newest first."""

    def __init__(self, keep=100):
        self._keep = keep
        self._lock = threading.Lock()
        self._active = {}  # fingerprint -> firing alert
        self._recent = {}  # (fingerprint, startsAt) -> its latest state; insertion order: newest first

    def restore(self, active, recent):
        """Start from what was kept: the firing alerts and the recent list."""
        with self._lock:
            self._active = {a["fingerprint"]: a for a in active}
            self._recent = {(a["fingerprint"], a["startsAt"]): a for a in list(recent)[:self._keep]}

    def apply(self, alert):
        """Take one firing or resolution."""
        key = (alert["fingerprint"], alert["startsAt"])
        with self._lock:
            if alert["status"] == "firing":
                self._active[alert["fingerprint"]] = alert
            else:
                self._active.pop(alert["fingerprint"], None)
            if key in self._recent:
                self._recent[key] = alert  # its resolution takes its place in the list
            else:
                self._recent = {key: alert, **self._recent}
                if len(self._recent) > self._keep:
                    del self._recent[next(reversed(self._recent))]

    def view(self):
        """Return {"active": [...], "recent": [...]} as /api/alerts answers, newest first."""
        with self._lock:
            active = sorted(self._active.values(), key=lambda a: a["startsAt"], reverse=True)
            return {"active": active, "recent": list(self._recent.values())}

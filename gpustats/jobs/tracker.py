"""Jobs made from the processes in pushes: pure, fed each push and status change in order, with their own time.

A job is one process (device, pid, start) on one or more of the device's GPUs. Its start is
the process' `startedAt` where the agent sends it, else when the server first saw it: then a
pid still listed after a restart (or a gap under OFFLINE_AFTER_S) is the same job, and a pid
that leaves and comes back within one push interval is taken for the same job too (nothing
tells them apart). It is named (user, command) as the process was when first seen. A job
ends when a push that lists its GPUs' processes no longer lists it
(`exited`), or when its device turns offline or is removed (`lost`); either way its end is
its last sighting. A process whose device comes back with the same `startedAt` is the same
job again: a lost job is taken up where it stopped.

Between two pushes of a device, each job listed on a GPU at both ends gets the interval as
GPU time and an equal share of the energy the GPU drew over it (the trapezoid of the two
power draws); a gap longer than `max_gap_s` counts as neither, as in history.

The tracker's whole state is its running jobs and a small state per device, plain JSON, kept
by the store beside the jobs: a restart or a new Redis leader goes on from it.
"""
import collections
import math

START_SLACK_S = 2.0  # two readings of one process' start may differ by this much (clock ticks, rounding)
MOST_LOST = 64  # lost jobs a device keeps to take up again, at most


def new_job(device, process, t):
    """Return a job for a process first seen at `t`, started at its `startedAt` (never after `t`) or then."""
    started = process.get("startedAt")
    start = min(started, t) if started is not None else t
    return {"id": f"{device}:{process['pid']}:{math.floor(start)}", "device": device, "pid": process["pid"],
            "gpus": [], "name": process.get("name"), "command": process.get("command") or None,
            "user": process.get("user"), "startedAt": start, "startKnown": started is not None,
            "firstSeen": t, "lastSeen": t, "endedAt": None, "ended": None,
            "gpuSeconds": 0.0, "joules": 0.0, "peakMemory": None, "own": [0.0, 0], "gpuUtil": [0.0, 0]}


def same_process(job, started):
    """Return whether a process with `startedAt` `started` (None: not sent) is the one `job` follows."""
    if started is None:
        return True  # nothing tells them apart: the pid alone
    if job["startKnown"]:
        return abs(job["startedAt"] - started) <= START_SLACK_S
    return started <= job["firstSeen"] + START_SLACK_S  # started before the server first saw it: the same


class Tracker:
    """The running jobs of every device, moved on by each push and status change; changed() says what to write."""

    def __init__(self, max_gap_s, offline_after_s, running=(), devices=None):
        self.max_gap_s, self.offline_after_s = max_gap_s, offline_after_s
        self.running = {}  # id -> job
        self._pids = {}  # device -> {pid: id of its running job}
        for job in running:
            self._run(job)
        # device -> {"t": its last push, "on": {gpu: [ids listed]}, "power": {gpu: watts}, "lost": [jobs]}
        self.devices = dict(devices or {})
        self._dirty = {}  # device -> {id: job} changed since the device was last written
        self._urgent = set()  # devices with a job begun, ended or taken up again: written at the next call
        self._due = collections.deque()  # (since when, device) of each device as it turned dirty, oldest first
        self._latest = max((state["t"] for state in self.devices.values()), default=float("-inf"))  # newest push

    def _run(self, job):
        self.running[job["id"]] = job
        self._pids.setdefault(job["device"], {})[job["pid"]] = job["id"]

    def changed(self, every_s=0.0):
        """Return ([jobs to write], {device: its state, or None if it is gone}), and forget them.

        A device is written with all its changed jobs at once, so what is kept of it always
        matches: when a job of it began or ended, else once its state is `every_s` newer than
        what was last written (0: whatever changed). A restart or a new Redis leader goes on
        from that; the pushes after it are one interval, counted if it is under `max_gap_s`.
        """
        due = set(self._urgent)
        if not every_s:
            due.update(self._dirty)
        while self._due and self._due[0][0] <= self._latest - every_s:
            due.add(self._due.popleft()[1])  # written meanwhile, and clean: nothing to write
        jobs, devices = [], {}
        for device in due:
            if device in self._dirty or device in self._urgent:
                jobs += self._dirty.pop(device, {}).values()
                devices[device] = self.devices.get(device)
        self._urgent = set()
        return jobs, devices

    def again(self, jobs, devices):
        """Take back what changed() returned and could not be written: it is returned again next time."""
        for job in jobs:
            self._dirty.setdefault(job["device"], {}).setdefault(job["id"], job)
        self._urgent.update(devices)
        self._urgent.update(job["device"] for job in jobs)

    def push(self, event):
        """Move the device's jobs on by an accepted push (its event, with `receivedAt`).

        Written out for the common case, a process seen at the last push again: a fleet of
        2,000 PCs brings 16,000 of these a second.
        """
        device, t = event["device"], event["receivedAt"]
        state = self.devices.get(device)
        if state is not None and t - state["t"] >= self.offline_after_s:
            self._lose(device, state)  # silent long enough to be offline (the server was down): its jobs were lost
        dt = t - state["t"] if state is not None else 0.0
        counted = 0 < dt <= self.max_gap_s
        running, pids = self.running, self._pids.setdefault(device, {})
        covered, seen, on, power = set(), {}, {}, {}  # seen: id -> its memory in this push, all its GPUs'
        for gpu in event["gpus"]:
            processes, index = gpu.get("processes"), gpu.get("index")
            if processes is None or index is None:
                continue  # no list of processes: nothing is known of this GPU's jobs
            key = str(index)
            covered.add(index)
            watts = power[key] = gpu.get("powerDraw")
            utilization = gpu.get("utilizationGpu")
            ids = on[key] = []
            for process in processes:
                job_id, started = pids.get(process["pid"]), process.get("startedAt")
                job = running[job_id] if job_id is not None else None
                if job is None or (started is not None and not (
                        job["startKnown"] and abs(job["startedAt"] - started) <= START_SLACK_S)):
                    job = self._job_for(device, state, process, t)  # new, reused, taken up, or its start learnt
                    job_id = job["id"]
                if job_id in ids:
                    continue
                ids.append(job_id)
                if index not in job["gpus"]:
                    job["gpus"] = sorted(job["gpus"] + [index])
                used = process.get("memoryUsed")
                if used is not None:
                    seen[job_id] = (seen.get(job_id) or 0) + used
                elif job_id not in seen:
                    seen[job_id] = None
                own = process.get("utilization")
                if own is not None:
                    job["own"][0] += own
                    job["own"][1] += 1
                if utilization is not None:
                    job["gpuUtil"][0] += utilization
                    job["gpuUtil"][1] += 1
            if counted and ids:  # the interval's time, and its energy shared, to the jobs listed at both ends
                before = state["on"].get(key)
                both = ids if before == ids else [job_id for job_id in before or () if job_id in ids]
                watts_before = state["power"].get(key)
                joules = ((watts_before + watts) / 2 * dt / len(both)
                          if both and watts_before is not None and watts is not None else 0.0)
                for job_id in both:
                    job = running[job_id]
                    job["gpuSeconds"] += dt
                    job["joules"] += joules
        dirty = self._dirty.get(device)
        if dirty is None:
            dirty = self._dirty[device] = {}
            self._due.append((t, device))
        for job_id, memory in seen.items():
            job = dirty[job_id] = running[job_id]
            job["lastSeen"] = t
            if memory is not None and (job["peakMemory"] is None or memory > job["peakMemory"]):
                job["peakMemory"] = memory
        for job_id in [job_id for job_id in pids.values() if job_id not in seen]:
            if all(gpu in covered for gpu in running[job_id]["gpus"]):
                self._end(running[job_id], "exited")
        if not pids:
            self._pids.pop(device, None)
        lost = state.get("lost") if state is not None else None
        if lost:
            lost = [job for job in lost if job["id"] not in running and not all(gpu in covered for gpu in job["gpus"])]
        self.devices[device] = {"t": max(t, state["t"]) if state else t, "on": on, "power": power, "lost": lost or []}
        if t > self._latest:
            self._latest = t

    def _job_for(self, device, state, process, t):
        """Return the job `process` belongs to when it is not simply the running one: the pid reused, a lost one taken up, a new one."""
        pid, started = process["pid"], process.get("startedAt")
        job_id = self._pids.get(device, {}).get(pid)
        self._urgent.add(device)
        if job_id is not None:
            job = self.running[job_id]
            if same_process(job, started):
                if started is not None and not job["startKnown"]:
                    job["startedAt"], job["startKnown"] = min(started, job["firstSeen"]), True
                    for field in ("user", "command"):  # an agent that learnt to say more
                        job[field] = job[field] or process.get(field) or None
                return job
            self._end(job, "exited")  # the pid was reused: that process is gone
        if started is not None:
            for job in (state or {}).get("lost", ()):
                if job["pid"] == pid and job["startKnown"] and same_process(job, started):
                    job["ended"] = job["endedAt"] = None  # the same process: it was never gone
                    self._run(job)
                    return job
        job = new_job(device, process, t)
        self._run(job)
        return job

    def status(self, change):
        """Take a device's status change (`event: status` data): offline or removed, its running jobs are lost."""
        device, status = change["device"], change["status"]
        if status not in ("offline", "removed"):
            return
        state = self.devices.get(device)
        if status == "removed":
            for job_id in list(self._pids.get(device, {}).values()):
                self._end(self.running[job_id], "lost")
            if state is not None:
                del self.devices[device]
                self._urgent.add(device)
        elif state is not None:
            self._lose(device, state)
        if not self._pids.get(device, True):
            del self._pids[device]

    def _lose(self, device, state):
        lost = [self._end(self.running[job_id], "lost") for job_id in list(self._pids.get(device, {}).values())]
        if lost:
            state["lost"] = (state.get("lost", []) + [job for job in lost if job["startKnown"]])[-MOST_LOST:]

    def _end(self, job, why):
        job["ended"], job["endedAt"] = why, job["lastSeen"]
        device = job["device"]
        del self.running[job["id"]]
        del self._pids[device][job["pid"]]  # an empty one stays until the push or change is done: it may be in use
        self._dirty.setdefault(device, {})[job["id"]] = job
        self._urgent.add(device)
        return job

    def forget(self, device, before=float("inf")):
        """Drop what is known of `device` up to `before` (its jobs were deleted then): none of it is written again."""
        def old(job):
            return job["lastSeen"] <= before
        pids = self._pids.get(device, {})
        for pid, job_id in list(pids.items()):
            if old(self.running[job_id]):
                del self.running[job_id], pids[pid]
        if not pids:
            self._pids.pop(device, None)
        state = self.devices.get(device)
        if state is not None and state["t"] <= before:
            del self.devices[device]
            self._urgent.discard(device)
        dirty = {job_id: job for job_id, job in self._dirty.pop(device, {}).items() if not old(job)}
        if dirty:
            self._dirty[device] = dirty

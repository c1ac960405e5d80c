"""Jobs made from the processes in pushes: pure, fed each push and status change in order, with their own time.

A job is one process (device, pid, start) on one or more of the device's GPUs. Its start is
the process' `startedAt` where the agent sends it, else when the server first saw it: then a
pid still listed after a restart (or a gap under OFFLINE_AFTER_S) is the same job, and a pid
that leaves and comes back within one push interval is taken for the same job too (nothing
tells them apart). A job ends when a push that lists its GPUs' processes no longer lists it
(`exited`), or when its device turns offline or is removed (`lost`); either way its end is
its last sighting. A process whose device comes back with the same `startedAt` is the same
job again: a lost job is taken up where it stopped.

Between two pushes of a device, each job listed on a GPU at both ends gets the interval as
GPU time and an equal share of the energy the GPU drew over it (the trapezoid of the two
power draws); a gap longer than `max_gap_s` counts as neither, as in history.

The tracker's whole state is its running jobs and a small state per device, plain JSON, kept
by the store beside the jobs: a restart or a new Redis leader goes on from it.
"""
import math

START_SLACK_S = 2.0  # two readings of one process' start may differ by this much (clock ticks, rounding)
MOST_LOST = 64  # lost jobs a device keeps to take up again, at most


def new_job(device, process, t):
    """Return a job for a process first seen at `t`, started at its `startedAt` (never after `t`) or then."""
    started = process.get("startedAt")
    start = min(started, t) if started is not None else t
    return {"id": f"{device}:{process['pid']}:{math.floor(start)}", "device": device, "pid": process["pid"],
            "gpus": [], "name": process.get("name"), "command": process.get("command") or process.get("name"),
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
        self._changed, self._changed_devices = {}, set()

    def _run(self, job):
        self.running[job["id"]] = job
        self._pids.setdefault(job["device"], {})[job["pid"]] = job["id"]

    def changed(self):
        """Return ([jobs changed since the last call], {device: its state, or None if it is gone}), and forget them."""
        jobs, self._changed = list(self._changed.values()), {}
        devices = {device: self.devices.get(device) for device in self._changed_devices}
        self._changed_devices = set()
        return jobs, devices

    def again(self, jobs, devices):
        """Take back what changed() returned and could not be written: it is returned again next time."""
        for job in jobs:
            self._changed.setdefault(job["id"], job)
        self._changed_devices.update(devices)

    def push(self, event):
        """Move the device's jobs on by an accepted push (its event, with `receivedAt`)."""
        device, t = event["device"], event["receivedAt"]
        state = self.devices.get(device)
        if state is not None and t - state["t"] >= self.offline_after_s:
            self._lose(device, state)  # silent long enough to be offline (the server was down): its jobs were lost
        dt = t - state["t"] if state is not None else 0.0
        counted = 0 < dt <= self.max_gap_s
        covered, seen, on, power = set(), {}, {}, {}
        for gpu in event["gpus"]:
            processes, index = gpu.get("processes"), gpu.get("index")
            if processes is None or index is None:
                continue  # no list of processes: nothing is known of this GPU's jobs
            key = str(index)
            covered.add(key)
            power[key] = gpu.get("powerDraw")
            ids = on[key] = []
            for process in processes:
                job = self._job_for(device, state, process, t)
                if job["id"] in ids:
                    continue
                ids.append(job["id"])
                self._sighted(job, seen, index, process, gpu.get("utilizationGpu"))
            if counted and ids:
                self._share(state, key, ids, dt, power[key])
        for job, memory in seen.values():
            job["lastSeen"] = t
            if memory is not None and (job["peakMemory"] is None or memory > job["peakMemory"]):
                job["peakMemory"] = memory
            self._changed[job["id"]] = job
        for job_id in list(self._pids.get(device, {}).values()):
            job = self.running[job_id]
            if job_id not in seen and all(str(gpu) in covered for gpu in job["gpus"]):
                self._end(job, "exited")
        lost = [job for job in (state or {}).get("lost", ())
                if job["id"] not in self.running and not all(str(gpu) in covered for gpu in job["gpus"])]
        self.devices[device] = {"t": max(t, state["t"]) if state else t, "on": on, "power": power,
                                "lost": lost[-MOST_LOST:]}
        self._changed_devices.add(device)

    def _job_for(self, device, state, process, t):
        """Return the running job `process` belongs to, taking up a lost one or starting one as need be."""
        pid, started = process["pid"], process.get("startedAt")
        job_id = self._pids.get(device, {}).get(pid)
        if job_id is not None:
            job = self.running[job_id]
            if same_process(job, started):
                if started is not None and not job["startKnown"]:
                    job["startedAt"], job["startKnown"] = min(started, job["firstSeen"]), True
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

    @staticmethod
    def _sighted(job, seen, index, process, utilization):
        """Note one GPU's listing of the job in this push: its GPU, memory, utilization, names."""
        if index not in job["gpus"]:
            job["gpus"] = sorted(job["gpus"] + [index])
        memory = process.get("memoryUsed")
        _, total = seen.get(job["id"], (job, None))
        seen[job["id"]] = (job, total if memory is None else (total or 0) + memory)
        own = process.get("utilization")
        if own is not None:
            job["own"][0] += own
            job["own"][1] += 1
        if utilization is not None:
            job["gpuUtil"][0] += utilization
            job["gpuUtil"][1] += 1
        for field in ("user", "name"):
            if process.get(field) is not None:
                job[field] = process[field]
        if process.get("command"):
            job["command"] = process["command"]

    def _share(self, state, key, ids, dt, power):
        """Give each job listed on GPU `key` at both ends of the interval its time, and its share of the energy."""
        both = [job_id for job_id in state["on"].get(key, ()) if job_id in ids and job_id in self.running]
        if not both:
            return
        before = state["power"].get(key)
        joules = (before + power) / 2 * dt / len(both) if before is not None and power is not None else 0.0
        for job_id in both:
            job = self.running[job_id]
            job["gpuSeconds"] += dt
            job["joules"] += joules

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
                self._changed_devices.add(device)
        elif state is not None:
            self._lose(device, state)

    def _lose(self, device, state):
        lost = [self._end(self.running[job_id], "lost") for job_id in list(self._pids.get(device, {}).values())]
        if lost:
            state["lost"] = (state.get("lost", []) + [job for job in lost if job["startKnown"]])[-MOST_LOST:]
            self._changed_devices.add(device)

    def _end(self, job, why):
        job["ended"], job["endedAt"] = why, job["lastSeen"]
        del self.running[job["id"]]
        pids = self._pids[job["device"]]
        del pids[job["pid"]]
        if not pids:
            del self._pids[job["device"]]
        self._changed[job["id"]] = job
        return job

    def forget(self, device, before=float("inf")):
        """Drop what is known of `device` up to `before` (its jobs were deleted then): none of it is written again."""
        def old(job):
            return job["device"] == device and job["lastSeen"] <= before
        pids = self._pids.get(device, {})
        for pid, job_id in list(pids.items()):
            if old(self.running[job_id]):
                del self.running[job_id], pids[pid]
        if not pids:
            self._pids.pop(device, None)
        state = self.devices.get(device)
        if state is not None and state["t"] <= before:
            del self.devices[device]
            self._changed_devices.discard(device)
        self._changed = {job_id: job for job_id, job in self._changed.items() if not old(job)}

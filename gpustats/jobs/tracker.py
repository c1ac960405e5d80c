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
power draws); a gap longer than `max_gap_s` counts as neither, as in history. A job's peak
memory is the sum of its peak on each of its GPUs; its mean utilization its own where the
agent sends it, else its GPUs' while it ran.

While a GPU lists the same processes push after push (the common case: a job runs for hours)
a push adds only to that GPU's running sums, a few numbers in its device's state; the sums
are folded into the jobs when the list changes, a job ends, or the jobs are written or read.
A fleet of 2,000 PCs brings 16,000 processes a second, and touching each job every time
cost a push 10 % more (docs/PERFORMANCE.md, Jobs).

The tracker's whole state is its running jobs and a small state per device, plain JSON, kept
by the store beside the jobs: a restart or a new Redis leader goes on from it.
"""
import collections
import math

START_SLACK_S = 2.0  # two readings of one process' start may differ by this much (clock ticks, rounding)
MOST_LOST = 64  # lost jobs a device keeps to take up again, at most
NONE = -1  # a sum's peak memory while none was reported


def new_job(device, process, t):
    """Return a job for a process first seen at `t`, started at its `startedAt` (never after `t`) or then."""
    started = process.get("startedAt")
    start = min(started, t) if started is not None else t
    return {"id": f"{device}:{process['pid']}:{math.floor(start)}", "device": device, "pid": process["pid"],
            "gpus": [], "name": process.get("name"), "command": process.get("command") or None,
            "user": process.get("user"), "startedAt": start, "startKnown": started is not None,
            "firstSeen": t, "lastSeen": t, "endedAt": None, "ended": None, "gpuSeconds": 0.0, "joules": 0.0,
            "peaks": {}, "peakMemory": None, "own": [0.0, 0], "gpuUtil": [0.0, 0]}


def kept(job):
    """Return what a store keeps of a job: all of a running one (a restart goes on from it), the figures of an ended one.

    An ended job needs no more than /api/jobs and /api/usage show: a year of a lab's jobs is a
    third smaller for it (docs/PERFORMANCE.md, Jobs).
    """
    if job["endedAt"] is None:
        return job
    return {"id": job["id"], "device": job["device"], "pid": job["pid"], "gpus": job["gpus"], "name": job["name"],
            "command": job["command"], "user": job["user"], "startedAt": round(job["startedAt"], 3),
            "endedAt": round(job["endedAt"], 3), "ended": job["ended"], "gpuSeconds": round(job["gpuSeconds"], 3),
            "joules": round(job["joules"], 1), "peakMemory": job["peakMemory"],
            "own": [round(job["own"][0], 1), job["own"][1]], "gpuUtil": [round(job["gpuUtil"][0], 1), job["gpuUtil"][1]]}


def same_process(job, started):
    """Return whether a process with `startedAt` `started` (None: not sent) is the one `job` follows."""
    if started is None:
        return True  # nothing tells them apart: the pid alone
    if job["startKnown"]:
        return abs(job["startedAt"] - started) <= START_SLACK_S
    return started <= job["firstSeen"] + START_SLACK_S  # started before the server first saw it: the same


def _sums(slots):
    """Return a GPU's running sums since they were last folded into its jobs: nothing yet."""
    return {"s": 0.0, "j": 0.0, "u": [0.0, 0], "p": [NONE] * slots, "o": [[0.0, 0] for _ in range(slots)], "last": None}


def _same(listed, processes):
    """Return whether a GPU lists the same processes (pid and start, in order) as it did."""
    if len(listed) != len(processes):
        return False
    for (pid, started), process in zip(listed, processes):
        if process["pid"] != pid or process.get("startedAt") != started:
            return False
    return True


class Tracker:
    """The running jobs of every device, moved on by each push and status change; changed() says what to write."""

    def __init__(self, max_gap_s, offline_after_s, running=(), devices=None):
        self.max_gap_s, self.offline_after_s = max_gap_s, offline_after_s
        self.running = {}  # id -> job
        self._pids = {}  # device -> {pid: id of its running job}
        for job in running:
            self._run(job)
        # device -> {"t": its last push, "gpus": {gpu: {"listed": [[pid, start]], "ids": [ids], "w": watts,
        #            "sums": its running sums}}, "lost": [jobs to take up again]}
        self.devices = dict(devices or {})
        self._dirty = {}  # device -> {id: job} changed since the device was last written
        self._urgent = set()  # devices with a job begun, ended or taken up again: written at the next call
        self._due = collections.deque()  # (since when, device) of each device as it turned dirty, oldest first
        self._latest = max((state["t"] for state in self.devices.values()), default=float("-inf"))  # newest push

    def _run(self, job):
        self.running[job["id"]] = job
        self._pids.setdefault(job["device"], {})[job["pid"]] = job["id"]

    def _dirty_of(self, device):
        """Return {id: job} of the device's changed jobs; a device that just turned dirty is due in `every_s`."""
        dirty = self._dirty.get(device)
        if dirty is None:
            dirty = self._dirty[device] = {}
            self._due.append((self._latest, device))
        return dirty

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
                self.settle(device)
                jobs += self._dirty.pop(device, {}).values()
                devices[device] = self.devices.get(device)
        self._urgent = set()
        return jobs, devices

    def again(self, jobs, devices):
        """Take back what changed() returned and could not be written: it is returned again next time."""
        for job in jobs:
            self._dirty_of(job["device"]).setdefault(job["id"], job)
        self._urgent.update(devices)
        self._urgent.update(job["device"] for job in jobs)

    def settle(self, device):
        """Fold every GPU's running sums of `device` into its jobs: they are as of its last push."""
        state = self.devices.get(device)
        for key, listing in (state.get("gpus", {}).items() if state is not None else ()):
            self._fold(device, key, listing)

    def _fold(self, device, key, listing):
        sums = listing["sums"]
        if sums["last"] is None:
            return
        dirty = self._dirty_of(device)
        for i, job_id in enumerate(listing["ids"]):
            job = self.running.get(job_id)
            if job is None:
                continue
            job["gpuSeconds"] += sums["s"]
            job["joules"] += sums["j"]
            for mine, theirs in ((job["gpuUtil"], sums["u"]), (job["own"], sums["o"][i])):
                mine[0] += theirs[0]
                mine[1] += theirs[1]
            if sums["p"][i] != NONE and sums["p"][i] > job["peaks"].get(key, NONE):
                job["peaks"][key] = sums["p"][i]
                job["peakMemory"] = sum(job["peaks"].values())
            job["lastSeen"] = max(job["lastSeen"], sums["last"])
            dirty[job_id] = job
        listing["sums"] = _sums(len(listing["ids"]))

    def push(self, event):
        """Move the device's jobs on by an accepted push (its event, with `receivedAt`)."""
        device, t = event["device"], event["receivedAt"]
        state = self.devices.get(device)
        if state is not None and t - state["t"] >= self.offline_after_s:
            self._lose(device, state)  # silent long enough to be offline (the server was down): its jobs were lost
        dt = t - state["t"] if state is not None else 0.0
        counted = 0 < dt <= self.max_gap_s
        kept = state.get("gpus", {}) if state is not None else {}
        same, changed = [], []  # GPUs that list what they listed at the last push, and those that do not
        for gpu in event["gpus"]:
            processes, index = gpu.get("processes"), gpu.get("index")
            if processes is None or index is None:
                continue  # no list of processes: nothing is known of this GPU's jobs
            key = str(index)
            listing = kept.get(key)
            if listing is None or not _same(listing["listed"], processes):
                changed.append((key, index, gpu, listing))
                continue
            # The same processes as at the last push: only the GPU's running sums move.
            same.append(key)
            sums, watts, utilization = listing["sums"], gpu.get("powerDraw"), gpu.get("utilizationGpu")
            if counted and listing["ids"]:
                sums["s"] += dt
                if watts is not None and listing["w"] is not None:
                    sums["j"] += (listing["w"] + watts) / 2 * dt / len(listing["ids"])
            if utilization is not None:
                sums["u"][0] += utilization
                sums["u"][1] += 1
            peaks, owns = sums["p"], sums["o"]
            for i, process in enumerate(processes):
                used, own = process.get("memoryUsed"), process.get("utilization")
                if used is not None and used > peaks[i]:
                    peaks[i] = used
                if own is not None:
                    owns[i][0] += own
                    owns[i][1] += 1
            sums["last"], listing["w"] = t, watts
        if t > self._latest:
            self._latest = t
        self._dirty_of(device)
        if state is not None and not changed and len(same) == len(kept) and not state.get("lost"):
            state["t"] = max(t, state["t"])  # every GPU as it was: no job began or ended
            return
        listings = {key: kept[key] for key in same}
        for key, index, gpu, listing in changed:
            listings[key] = self._relist(device, state, key, index, gpu, listing, dt if counted else 0.0, t)
        for key, listing in kept.items():
            if key not in listings:
                self._fold(device, key, listing)  # not listed in this push: what it had goes to its jobs
        covered = {int(key) for key in listings}
        seen = {job_id for listing in listings.values() for job_id in listing["ids"]}
        for job_id in [job_id for job_id in self._pids.get(device, {}).values() if job_id not in seen]:
            if all(gpu in covered for gpu in self.running[job_id]["gpus"]):
                self._end(self.running[job_id], "exited")
        if not self._pids.get(device, True):
            del self._pids[device]
        lost = state.get("lost") if state is not None else None
        if lost:
            lost = [job for job in lost if job["id"] not in self.running and not all(gpu in covered for gpu in job["gpus"])]
        self.devices[device] = {"t": max(t, state["t"]) if state else t, "gpus": listings, "lost": lost or []}

    def _relist(self, device, state, key, index, gpu, listing, dt, t):
        """Return a GPU's listing when its processes changed: its sums folded, its jobs found or begun, the interval shared."""
        if listing is not None:
            self._fold(device, key, listing)
        ids, listed, processes = [], [], []
        for process in gpu["processes"]:
            job = self._job_for(device, state, process, t)
            if job["id"] in ids:
                continue  # listed twice: once is enough
            ids.append(job["id"])
            listed.append([process["pid"], process.get("startedAt")])
            processes.append(process)
            if index not in job["gpus"]:
                job["gpus"] = sorted(job["gpus"] + [index])
        watts = gpu.get("powerDraw")
        both = [job_id for job_id in (listing["ids"] if listing is not None and dt else ()) if job_id in ids]
        joules = ((listing["w"] + watts) / 2 * dt / len(both)
                  if both and watts is not None and listing["w"] is not None else 0.0)
        dirty = self._dirty_of(device)
        for job_id in both:  # listed at both ends of the interval: its time, and its share of the energy
            job = dirty[job_id] = self.running[job_id]
            job["gpuSeconds"] += dt
            job["joules"] += joules
        sums = _sums(len(ids))
        utilization = gpu.get("utilizationGpu")
        if utilization is not None:
            sums["u"] = [utilization, 1]
        for i, process in enumerate(processes):
            if process.get("memoryUsed") is not None:
                sums["p"][i] = process["memoryUsed"]
            if process.get("utilization") is not None:
                sums["o"][i] = [process["utilization"], 1]
        sums["last"] = t
        return {"listed": listed, "ids": ids, "w": watts, "sums": sums}

    def _job_for(self, device, state, process, t):
        """Return the job `process` belongs to: the running one, a lost one taken up, or a new one (the pid reused)."""
        pid, started = process["pid"], process.get("startedAt")
        job_id = self._pids.get(device, {}).get(pid)
        if job_id is not None:
            job = self.running[job_id]
            if same_process(job, started):
                if started is not None and not job["startKnown"]:
                    job["startedAt"], job["startKnown"] = min(started, job["firstSeen"]), True
                    for field in ("user", "command"):  # an agent that learnt to say more
                        job[field] = job[field] or process.get(field) or None
                    self._urgent.add(device)
                return job
            self._end(job, "exited")  # the pid was reused: that process is gone
        self._urgent.add(device)
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
        if state is not None:
            self._lose(device, state)
        if status == "removed":
            for job_id in list(self._pids.get(device, {}).values()):  # of a device that never pushed here
                self._end(self.running[job_id], "lost")
            if state is not None:
                del self.devices[device]
                self._urgent.add(device)
        if not self._pids.get(device, True):
            del self._pids[device]

    def _lose(self, device, state):
        self.settle(device)
        lost = [self._end(self.running[job_id], "lost") for job_id in list(self._pids.get(device, {}).values())]
        state["gpus"] = {}  # the next push lists them anew
        if lost:
            state["lost"] = (state.get("lost", []) + [job for job in lost if job["startKnown"]])[-MOST_LOST:]

    def _end(self, job, why):
        job["ended"], job["endedAt"] = why, job["lastSeen"]
        device = job["device"]
        del self.running[job["id"]]
        del self._pids[device][job["pid"]]  # an empty one stays until the push or change is done: it may be in use
        self._dirty_of(device)[job["id"]] = job
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

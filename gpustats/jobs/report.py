"""What users see of jobs: a job as /api/jobs shows it, and usage added up per user or device for /api/usage."""
from gpustats.offload import in_slices

JOB_FIELDS = ("id", "device", "gpus", "pid", "name", "command", "user", "startedAt", "endedAt", "ended", "durationS",
              "gpuHours", "peakMemory", "meanUtilization", "energyWh")
USAGE_FIELDS = ("jobs", "gpuHours", "energyWh", "meanUtilization", "peakMemory")
BY = ("user", "device")


def tidy(value, places=2):
    """Return a number rounded to `places`, and whole numbers as integers: 80, not 80.0."""
    if value is None:
        return None
    value = round(value, places)
    return int(value) if value == int(value) else value


def mean_utilization(job):
    """Return the job's mean utilization: its own where the agent sent it, else its GPUs' while it ran; None if neither."""
    for total, count in (job["own"], job["gpuUtil"]):
        if count:
            return total / count
    return None


def last(job):
    """Return when the job was last known to run: its end, or its last sighting while it runs."""
    return job["endedAt"] if job["endedAt"] is not None else job["lastSeen"]


def view(job):
    """Return a job as /api/jobs shows it."""
    return {"id": job["id"], "device": job["device"], "gpus": job["gpus"], "pid": job["pid"], "name": job["name"],
            "command": job["command"] or job["name"], "user": job["user"], "startedAt": tidy(job["startedAt"], 3),
            "endedAt": tidy(job["endedAt"], 3), "ended": job["ended"],
            "durationS": round(max(0.0, last(job) - job["startedAt"])), "gpuHours": tidy(job["gpuSeconds"] / 3600, 4),
            "peakMemory": tidy(job["peakMemory"]), "meanUtilization": tidy(mean_utilization(job), 1),
            "energyWh": tidy(job["joules"] / 3600, 3)}


def usage(jobs, start, end, by):
    """Return the rows of /api/usage: per `by` (user or device), the jobs that ran from `start` to `end`, most GPU-hours first.

    A job that ran only partly in the range counts with that part of its GPU-hours and energy
    (as if it used them evenly), so the weeks of a long job add up to the whole of it. Mean
    utilization is weighted by GPU-hours; peak memory is the largest of any job.
    """
    rows = {}
    for job in in_slices(jobs):
        span, ran = last(job) - job["startedAt"], min(end, last(job)) - max(start, job["startedAt"])
        share = max(0.0, ran) / span if span > 0 else 1.0
        key = job[by]
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"key": key, "jobs": 0, "gpuHours": 0.0, "energyWh": 0.0, "peakMemory": None,
                               "weighted": [0.0, 0.0], "plain": [0.0, 0]}
        hours = job["gpuSeconds"] / 3600 * share
        row["jobs"] += 1
        row["gpuHours"] += hours
        row["energyWh"] += job["joules"] / 3600 * share
        if job["peakMemory"] is not None and (row["peakMemory"] is None or job["peakMemory"] > row["peakMemory"]):
            row["peakMemory"] = job["peakMemory"]
        mean = mean_utilization(job)
        if mean is not None:
            row["weighted"][0] += mean * hours
            row["weighted"][1] += hours
            row["plain"][0] += mean
            row["plain"][1] += 1
    answer = []
    for row in rows.values():
        weighted, plain = row.pop("weighted"), row.pop("plain")
        mean = weighted[0] / weighted[1] if weighted[1] else plain[0] / plain[1] if plain[1] else None
        answer.append({"key": row["key"], "jobs": row["jobs"], "gpuHours": tidy(row["gpuHours"], 4),
                       "energyWh": tidy(row["energyWh"], 3), "meanUtilization": tidy(mean, 1),
                       "peakMemory": tidy(row["peakMemory"])})
    return sorted(answer, key=lambda row: (-row["gpuHours"], row["key"] is None, row["key"] or ""))

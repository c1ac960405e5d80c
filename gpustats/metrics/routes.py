"""GET /metrics: the fleet and the server in Prometheus' format, read from the fleet at scrape time."""
import os

from flask import Response, request
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from gpustats.offload import cooperate, in_slices

MIB = 1024 * 1024
GPU_LABELS = ("device", "gpu", "uuid", "name")
# Each GPU gauge: name, the push's field, its conversion to base units, help.
GPU_GAUGES = (
    ("utilization_ratio", "utilizationGpu", lambda v: v / 100, "Share of the last sample period the GPU was busy (0-1)."),
    ("memory_used_bytes", "memoryUsed", lambda v: v * MIB, "GPU memory in use."),
    ("memory_total_bytes", "memoryTotal", lambda v: v * MIB, "GPU memory in all."),
    ("temperature_celsius", "temperatureGpu", float, "GPU core temperature."),
    ("power_draw_watts", "powerDraw", float, "Power the GPU draws."),
    ("power_limit_watts", "powerLimit", float, "The GPU's power limit."),
    ("fan_speed_ratio", "fanSpeed", lambda v: v / 100, "Fan speed as a share of its maximum (0-1)."),
    ("clock_core_hertz", "clockCore", lambda v: v * 1_000_000, "GPU core clock."),
    ("clock_memory_hertz", "clockMemory", lambda v: v * 1_000_000, "GPU memory clock."),
)

# Each host gauge, labelled `device`: name, the push's `system` field, its conversion to base units, help.
HOST_GAUGES = (
    ("cpu_utilization_ratio", "cpuPercent", lambda v: v / 100, "Share of the host's CPU time in use (0-1)."),
    ("memory_used_bytes", "memoryUsed", lambda v: v * MIB, "Host memory in use."),
    ("memory_total_bytes", "memoryTotal", lambda v: v * MIB, "Host memory in all."),
    ("network_receive_bytes_per_second", "netRx", float, "Bytes the host received a second, all interfaces."),
    ("network_transmit_bytes_per_second", "netTx", float, "Bytes the host sent a second, all interfaces."),
)
DISK_GAUGES = (("disk_used_bytes", "used", "Space in use on the host's file system."),
               ("disk_total_bytes", "total", "Size of the host's file system."))


def host_families():
    """Return the host's gauges [(family, field, convert)] and its disks' [(family, field)], empty."""
    return ([(GaugeMetricFamily(f"gpustats_host_{name}", text, labels=("device",)), field, convert)
             for name, field, convert, text in HOST_GAUGES],
            [(GaugeMetricFamily(f"gpustats_host_{name}", text, labels=("device", "mount")), field)
             for name, field, text in DISK_GAUGES])


def add_host(gauges, disks, device, system):
    """Add a device's `system` to the host families: a value the PC did not give has no sample."""
    for family, field, convert in gauges:
        if system.get(field) is not None:
            family.add_metric((device,), convert(system[field]))
    for disk in system.get("disks") or ():
        for family, field in disks:
            if disk.get(field) is not None:
                family.add_metric((device, disk["mount"]), disk[field] * MIB)


def fleet_families(devices):
    """Yield the metric families of the devices' latest events: a value a GPU did not report has no sample."""
    gauges = [(GaugeMetricFamily(f"gpustats_gpu_{name}", text, labels=GPU_LABELS), field, convert)
              for name, field, convert, text in GPU_GAUGES]
    info = GaugeMetricFamily("gpustats_gpu_info", "The GPU's name, uuid, driver and vendor; always 1.",
                             labels=(*GPU_LABELS, "driver", "vendor"))
    up = GaugeMetricFamily("gpustats_device_up", "1 while the device pushes (online), 0 once it is stale or offline.",
                           labels=("device",))
    last = GaugeMetricFamily("gpustats_device_last_push_timestamp_seconds",
                             "When the server took the device's last push (Unix time).", labels=("device",))
    held = GaugeMetricFamily("gpustats_gpu_process_memory_used_bytes",
                             "GPU memory the processes of one user hold on the GPU, summed (user empty: not sent).",
                             labels=("device", "gpu", "user"))
    jobs = GaugeMetricFamily("gpustats_jobs_running", "Jobs (processes on its GPUs) the device's last push lists.",
                             labels=("device",))
    host, disks = host_families()
    for event in in_slices(devices, 10):  # about a millisecond of work a slice
        device = event["device"]
        up.add_metric((device,), 1 if event["status"] == "online" else 0)
        if event["status"] == "offline":
            continue  # what it last said is no longer true of it
        last.add_metric((device,), event["receivedAt"])
        if event.get("system"):
            add_host(host, disks, device, event["system"])
        running = None  # no GPU lists its processes: nothing is known of its jobs
        for gpu in event["gpus"]:
            labels = (device, str(gpu["index"]), gpu.get("uuid") or "", gpu.get("name") or "")
            info.add_metric((*labels, gpu.get("driverVersion") or "", gpu.get("vendor") or ""), 1)
            for family, field, convert in gauges:
                if gpu.get(field) is not None:
                    family.add_metric(labels, convert(gpu[field]))
            processes = gpu.get("processes")
            if processes is not None:
                running = running or set()
                running.update((p["pid"], p.get("startedAt")) for p in processes)
                for user, used in _by_user(processes).items():
                    held.add_metric((device, labels[1], user), used * MIB)
        if running is not None:
            jobs.add_metric((device,), len(running))
    yield from (family for family, _, _ in gauges)
    yield from (info, up, last, held, jobs)
    yield from (family for family, _, _ in host)
    yield from (family for family, _ in disks)


def _by_user(processes):
    """Return {user: MiB} of the processes' memory, summed per user: one series per user, not per pid (series churn)."""
    used = {}
    for process in processes:
        if process.get("memoryUsed") is not None:
            user = process.get("user") or ""
            used[user] = used.get(user, 0) + process["memoryUsed"]
    return used


def server_families(counts, subscribers):
    """Yield the server's own metric families from counters.read()'s answer."""
    pushes = CounterMetricFamily("gpustats_pushes", "Pushes answered on /push-sse, by HTTP status code.",
                                 labels=("code",))
    for code, n in sorted(counts["pushes"].items()):
        pushes.add_metric((code,), n)
    sent = CounterMetricFamily("gpustats_alert_notifications", "Attempts to send an alert notification, by result: "
                               "sent, retry (failed, tried again), failed (refused for good), dropped (out of time).",
                               labels=("result",))
    for result, n in sorted(counts["notifications"].items()):
        sent.add_metric((result,), n)
    yield pushes
    yield GaugeMetricFamily("gpustats_stream_subscribers", "Viewers with the stream open.", value=subscribers)
    yield sent


class ServerCollector:
    """Read the fleet and the counters at each scrape: nothing is kept twice."""

    def __init__(self, fleet, counters):
        self._fleet, self._counters = fleet, counters

    def collect(self):
        counts, subscribers = self._counters.read()  # first: without Redis it raises, and the scrape gets 503
        for family in (*fleet_families(self._fleet.devices()), *server_families(counts, subscribers)):
            yield family
            # The encoder writes each family out before it asks for the next: in between, pushes
            # and streams go on, so a big fleet's scrape stalls them a family at a time, not for
            # all of it (docs/PERFORMANCE.md, Metrics).
            cooperate()


class WorkerProcessCollector:
    """The process collector's process_* of the worker that answers, labelled with its `pid`.

    With several workers a scrape lands on any of them: without the label, their CPU
    counters would take turns in one series, and every turn would read as a reset.
    """

    def __init__(self):
        self._process = ProcessCollector(registry=None)

    def collect(self):
        pid = str(os.getpid())
        for family in self._process.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labelled.add_sample(sample.name, {**sample.labels, "pid": pid}, sample.value, sample.timestamp)
            yield labelled


def register_metrics(app, fleet, counters):
    """Add `GET /metrics`, with a registry of its own: two apps in one process never share a metric."""
    registry = CollectorRegistry()
    registry.register(ServerCollector(fleet, counters))
    registry.register(WorkerProcessCollector())

    @app.get("/metrics")
    def metrics():
        encode, content_type = negotiate(request.headers.get("Accept", ""))
        return Response(encode(registry), content_type=content_type)


def negotiate(accept):
    """Return (encoder, content type) for an Accept header; one prometheus_client cannot read gets the text format.

    prometheus_client 0.26 raises TypeError on `version=abc` or an OpenMetrics `version=1.x`:
    every scraper takes the text format, so that is the answer, never a 500.
    """
    try:
        return choose_encoder(accept)
    except Exception:  # noqa: BLE001 its parsing of the header, nothing of ours
        return choose_encoder("")  # what a scraper that names no format gets: the text format, 0.0.4

#!/usr/bin/env python3
"""GPU Stats agent: read this PC's NVIDIA GPUs and push them to the dashboard server.

Copy this one file to each GPU PC. Needs: requests, nvidia-ml-py and/or GPUtil (with
setuptools on Python 3.12+), python-dotenv (optional). See requirements-agent.txt.
"""
import argparse
import itertools
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

VERSION = "1.0.0"
BACKOFF_CAP_S = 30.0
SMI_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = (5.0, 10.0)  # connect, read
MAX_INDEX = 1023  # the highest GPU index the server accepts
log = logging.getLogger("agent")

# Payload field -> nvidia-smi --query-gpu field (gpustat's habit: the tool's own names).
SMI_FIELDS = {
    "index": "index", "uuid": "uuid", "name": "name", "driverVersion": "driver_version",
    "utilizationGpu": "utilization.gpu", "utilizationMemory": "utilization.memory",
    "memoryTotal": "memory.total", "memoryUsed": "memory.used", "memoryFree": "memory.free",
    "temperatureGpu": "temperature.gpu", "temperatureMemory": "temperature.memory",
    "powerDraw": "power.draw", "powerLimit": "power.limit", "fanSpeed": "fan.speed",
    "clockCore": "clocks.current.graphics", "clockMemory": "clocks.current.memory", "pstate": "pstate",
}
TEXT_FIELDS = {"uuid", "name", "driverVersion", "pstate"}
# What GPUtil does not read; the gputil backend asks nvidia-smi for these in one extra call.
GPUTIL_LACKS = ("index", "uuid", "utilizationMemory", "temperatureMemory", "powerDraw",
                "powerLimit", "fanSpeed", "clockCore", "clockMemory", "pstate")
# The query GPUtil 1.4 runs, read directly when GPUtil itself crashes on its output.
GPUTIL_QUERY = ("index", "uuid", "utilizationGpu", "memoryTotal", "memoryUsed", "memoryFree",
                "driverVersion", "name", "temperatureGpu")
# nvidia-smi prints these for a value it cannot give; they all mean null, never 0.
NOT_REPORTED = {"n/a", "[n/a]", "[not supported]", "[unknown error]", "[gpu is lost]",
                "[requested functionality has been deprecated]", "[insufficient permissions]",
                "nan", "", "not supported"}
GPU_ERRORS = {"[unknown error]": "Unknown Error", "[gpu is lost]": "GPU is lost"}


class GpuReadError(Exception):
    """The GPUs could not be read at all; the message is one line for the user."""


class Refused(Exception):
    """The server refused in a way retrying cannot fix (bad key, wrong URL)."""


class Retry(Exception):
    """The push failed for now; `after` is the server's Retry-After, if any."""

    def __init__(self, message, after=None):
        super().__init__(message)
        self.after = after


class Rejected(Exception):
    """The server refused this sample (400, 413, 415, 422...); the next sample may pass, so no backoff."""

    def __init__(self, status, error, field=None):
        if field:  # the server's error usually starts with the field already: "gpus[0].x: ..."
            text = error if error.startswith(f"{field}:") else f"{field}: {error}"
            super().__init__(f"server rejected the sample: {text}")
        else:
            super().__init__(f"server rejected the sample ({status}): {error}")
        self.status, self.error, self.field = status, error, field


# ---- parsing nvidia-smi ---------------------------------------------------------------

def parse_value(text):
    """Turn one nvidia-smi value into a number, a string or None for 'not reported'."""
    text = text.strip()
    if text.lower() in NOT_REPORTED:
        return None
    number = text.split(" ")[0] if text.endswith(("MiB", "%", "W", "MHz")) else text
    try:
        value = float(number)
    except ValueError:
        return text
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def parse_query(output, names):
    """Parse `--query-gpu` CSV (noheader, nounits) into ({index: gpu}, [error lines])."""
    gpus, errors = {}, []
    for line in output.splitlines():
        if not line.strip():
            continue
        values = [v.strip() for v in line.split(", ")]
        if len(values) != len(names) or ("index" in names and not values[names.index("index")].isdigit()):
            errors.append(line.strip())  # e.g. "Unable to determine the device handle for GPU ..."
            continue
        gpu = {}
        for name, raw in zip(names, values):
            if raw.lower() in GPU_ERRORS:
                gpu["error"] = GPU_ERRORS[raw.lower()]
            value = parse_value(raw)
            gpu[name] = str(value) if name in TEXT_FIELDS and value is not None else value
        if "memoryTotal" in gpu and not gpu["memoryTotal"]:
            gpu["memoryTotal"] = None  # a zero total is a GPU that did not report, not 0 MiB
        gpus[gpu.get("index", len(gpus))] = gpu
    return gpus, errors


def run_nvidia_smi(names, timeout=SMI_TIMEOUT_S, run=subprocess.run):
    """Run one --query-gpu for payload fields `names`; return its parsed rows and error lines."""
    args = ["nvidia-smi", "--query-gpu=" + ",".join(SMI_FIELDS[n] for n in names),
            "--format=csv,noheader,nounits"]
    try:
        done = run(args, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise GpuReadError("nvidia-smi is not installed or not on PATH") from None
    except subprocess.TimeoutExpired:
        raise GpuReadError(f"nvidia-smi did not answer within {timeout:g} s") from None
    except OSError as error:
        raise GpuReadError(f"nvidia-smi could not run: {error}") from None
    gpus, errors = parse_query(done.stdout, names)
    if done.returncode != 0 and not gpus:
        message = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
        raise GpuReadError(f"nvidia-smi failed (exit {done.returncode}): {message[0]}")
    return gpus, errors


# ---- backends ---------------------------------------------------------------------------

def _free_indices(taken):
    """Yield the GPU indices no GPU in `taken` uses, lowest first."""
    return (i for i in itertools.count() if i not in taken)


def _broken(errors, taken):
    """Turn nvidia-smi's per-GPU error lines into entries with an error and nulls, at indices not `taken`.

    nvidia-smi prints the error line in the lost GPU's place and gives the GPUs after it their
    true indices, so the gaps are where lost GPUs are (0 and 2 readable: the lost one is 1).
    Numbering them from the count of readable GPUs instead gave a used index, and the server
    refused the whole push ("gpus[2].index: 2 is used twice"): the PC left the dashboard.
    """
    free = _free_indices(taken)
    return [{"index": next(free), "error": line[:128]} for line in errors]


class GputilBackend:
    """GPUtil for the basics, plus one nvidia-smi query (with a timeout) for the rest."""

    name = "gputil"

    def __init__(self, gputil=None, run=subprocess.run, timeout=SMI_TIMEOUT_S):
        if gputil is None:
            import GPUtil as gputil  # noqa: N813 (needs setuptools on Python 3.12+: distutils)
        self.gputil, self.run, self.timeout = gputil, run, timeout

    def sample(self):
        # Asked first, with a timeout: GPUtil has none and would hang on a hung nvidia-smi.
        extra, errors = run_nvidia_smi(GPUTIL_LACKS, self.timeout, self.run)
        try:
            basics = {g.id: {"index": g.id, "uuid": g.uuid, "name": g.name,
                             "driverVersion": g.driver, "utilizationGpu": _finite(g.load * 100),
                             "memoryTotal": _finite(g.memoryTotal) or None,
                             "memoryUsed": _finite(g.memoryUsed), "memoryFree": _finite(g.memoryFree),
                             "temperatureGpu": _finite(g.temperature)} for g in self.gputil.getGPUs()}
        except (ValueError, ZeroDivisionError, IndexError) as error:
            # GPUtil crashes on error lines and divides by a zero memory total (gputil#26).
            log.debug("GPUtil failed (%r); reading its query directly", error)
            basics, _ = run_nvidia_smi(GPUTIL_QUERY, self.timeout, self.run)
        gpus = []
        for index, row in sorted(extra.items()):
            gpu = {"vendor": "NVIDIA", **basics.get(index, {})}
            gpu.update((k, v) for k, v in row.items() if v is not None or k not in gpu)
            gpus.append(gpu)
        return sorted(gpus + _broken(errors, set(extra)), key=lambda g: g["index"])


def _finite(value):
    """Return a GPUtil number rounded to 0.01, whole ones as int; NaN (its 'not reported') as None."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    value = round(value, 2)
    return int(value) if value.is_integer() else value


class NvmlBackend:
    """NVML through nvidia-ml-py: no subprocess, and processes, power, fans and clocks."""

    name = "nvml"

    def __init__(self, nvml=None):
        if nvml is None:
            import pynvml as nvml
        self.nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise GpuReadError(f"NVML could not start: {error}") from None
        self.driver = self._read(nvml.nvmlSystemGetDriverVersion)

    def _read(self, getter, *args):
        """Call an NVML getter; NotSupported and every other NVMLError mean null."""
        try:
            value = getter(*args)
        except self.nvml.NVMLError:
            return None
        return value.decode(errors="replace") if isinstance(value, bytes) else value

    def sample(self):
        nvml = self.nvml
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as error:
            raise GpuReadError(f"NVML could not count GPUs: {error}") from None
        return [self._gpu(index) for index in range(count)]

    def _gpu(self, index):
        nvml, read = self.nvml, self._read
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as error:
            return {"index": index, "error": f"NVML: {error}"}
        rates = read(nvml.nvmlDeviceGetUtilizationRates, handle)  # NotSupported on MIG GPUs
        memory = read(nvml.nvmlDeviceGetMemoryInfo, handle)
        power, limit = read(nvml.nvmlDeviceGetPowerUsage, handle), read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        pstate = read(nvml.nvmlDeviceGetPerformanceState, handle)
        gpu = {"index": index, "uuid": read(nvml.nvmlDeviceGetUUID, handle),
               "name": read(nvml.nvmlDeviceGetName, handle), "vendor": "NVIDIA", "driverVersion": self.driver,
               "utilizationGpu": rates.gpu if rates else None, "utilizationMemory": rates.memory if rates else None,
               "memoryTotal": _mib(memory.total) if memory and memory.total else None,
               "memoryUsed": _mib(memory.used) if memory and memory.total else None,
               "memoryFree": _mib(memory.free) if memory and memory.total else None,
               "temperatureGpu": read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
               "temperatureMemory": self._memory_temperature(handle),
               "powerDraw": round(power / 1000, 1) if power is not None else None,
               "powerLimit": round(limit / 1000, 1) if limit is not None else None,
               "fanSpeed": read(nvml.nvmlDeviceGetFanSpeed, handle),
               "clockCore": read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_GRAPHICS),
               "clockMemory": read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_MEM),
               "pstate": f"P{pstate}" if isinstance(pstate, int) and 0 <= pstate < 32 else None,
               "processes": self._processes(handle)}
        if all(gpu[k] is None for k in ("name", "utilizationGpu", "memoryTotal", "temperatureGpu")):
            gpu["error"] = "NVML could not read this GPU"
        return gpu

    def _memory_temperature(self, handle):
        values = self._read(self.nvml.nvmlDeviceGetFieldValues, handle, [self.nvml.NVML_FI_DEV_MEMORY_TEMP])
        if not values or values[0].nvmlReturn != 0:
            return None
        return values[0].value.uiVal or None

    def _processes(self, handle):
        found = {}
        for getter in (self.nvml.nvmlDeviceGetComputeRunningProcesses,
                       self.nvml.nvmlDeviceGetGraphicsRunningProcesses):
            for proc in self._read(getter, handle) or ():
                name = self._read(self.nvml.nvmlSystemGetProcessName, proc.pid) or ""
                used = proc.usedGpuMemory  # None where the OS hides it (Windows WDDM)
                found[proc.pid] = {"pid": proc.pid, "name": name.replace("\\", "/").rsplit("/", 1)[-1],
                                   "memoryUsed": _mib(used) if isinstance(used, int) else None}
        return sorted(found.values(), key=lambda p: -(p["memoryUsed"] or 0))[:64]


def _mib(n_bytes):
    return round(n_bytes / (1 << 20))


class SimulatedBackend:
    """Made-up GPUs with plausible moving numbers, for demos and machines with no GPU."""

    name = "simulated"

    def __init__(self, count, seed=None, clock=time.time):
        self.rng, self.clock = random.Random(seed), clock
        self.load = [self.rng.uniform(10, 90) for _ in range(count)]

    def sample(self):
        gpus = []
        for index, load in enumerate(self.load):
            load = min(100.0, max(0.0, load + self.rng.gauss(0, 8)))
            self.load[index] = load
            temp = 35 + load * 0.45
            gpus.append({"index": index, "uuid": f"GPU-SIMULATED-{socket.gethostname()}-{index}"[:128],
                         "name": "Simulated GeForce RTX 4090", "vendor": "NVIDIA", "driverVersion": "560.94",
                         "utilizationGpu": round(load), "utilizationMemory": round(load * 0.6),
                         "memoryTotal": 24564, "memoryUsed": round(2000 + load * 180),
                         "memoryFree": 24564 - round(2000 + load * 180),
                         "temperatureGpu": round(temp), "temperatureMemory": None,
                         "powerDraw": round(30 + load * 4.1, 1), "powerLimit": 450.0,
                         "fanSpeed": round(max(0.0, (temp - 40) * 2)), "clockCore": round(210 + load * 23),
                         "clockMemory": 10501, "pstate": "P2" if load > 5 else "P8",
                         "processes": [{"pid": 4242 + index, "name": "python", "memoryUsed": round(load * 170)}]})
        return gpus


def open_backend(choice, simulate=0, nvml=None, gputil=None, run=subprocess.run):
    """Return the backend to read GPUs with; `auto` falls back to GPUtil when NVML cannot load."""
    if simulate:
        return SimulatedBackend(simulate)
    if choice in ("auto", "nvml"):
        try:
            return NvmlBackend(nvml)
        except (ImportError, OSError, GpuReadError) as error:
            if choice == "nvml":
                raise GpuReadError(f"NVML backend unavailable: {error}") from None
            log.info("NVML unavailable (%s); using GPUtil and nvidia-smi", error)
    try:
        return GputilBackend(gputil, run)
    except ImportError as error:
        raise GpuReadError(f"GPUtil backend unavailable: {error} (pip install GPUtil setuptools)") from None


# ---- pushing ----------------------------------------------------------------------------

class Pusher:
    """POST payloads to the server through one keep-alive session."""

    def __init__(self, url, key, session=None):
        if session is None:
            import requests
            session = requests.Session()
        self.url, self.session = url, session
        self.session.headers.update({"Authorization": f"Bearer {key}", "Content-Type": "application/json",
                                     "User-Agent": f"gpu-stats-agent/{VERSION}"})

    def push(self, payload):
        """Send one payload; raise Retry for what may pass later, Rejected for this sample, Refused for all."""
        try:
            answer = self.session.post(self.url, data=json.dumps(_fit(payload), allow_nan=False),
                                       timeout=HTTP_TIMEOUT_S)
        except Exception as error:  # requests' ConnectionError, Timeout and friends
            raise Retry(f"server unreachable: {type(error).__name__}") from None
        status = answer.status_code
        if status == 200:
            return answer
        body = _error_body(answer)
        detail = _one_line(body.get("error") or answer.text or answer.reason or "")[:200]
        if status in (401, 403):
            raise Refused(f"the server refused the device key ({status}: {detail})")
        if status == 404:
            raise Refused(f"nothing at {self.url} (404): the URL should end in /push-sse")
        if 400 <= status < 500 and status not in (408, 429):
            # The server is up and said what is wrong with this sample (400 names the field):
            # not a network failure, so no backoff; the next sample may well pass.
            field = body.get("field")
            raise Rejected(status, detail, _one_line(field)[:128] if isinstance(field, str) else None)
        raise Retry(f"server answered {status}: {detail}", _retry_after(answer))


def _error_body(answer):
    """Return the server's JSON error body ({"error": ..., "field": ...}), or {} if it sent none."""
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _one_line(text):
    return " ".join(str(text).split())


def _retry_after(answer):
    try:
        return max(0.0, float(answer.headers.get("Retry-After", "")))
    except ValueError:
        return None


def backoff_s(failures, interval, retry_after=None, rng=random.random):
    """Exponential backoff with jitter, capped, and never shorter than Retry-After."""
    delay = min(BACKOFF_CAP_S, interval * 2 ** min(failures, 16)) * (0.5 + rng() / 2)
    return min(BACKOFF_CAP_S, max(delay, retry_after or 0.0))


def _fit(value):
    """Make a value fit the server's limits: strings of at most 128 printable characters."""
    if isinstance(value, str):
        return "".join(c if c.isprintable() else " " for c in value)[:128]
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit(v) for v in value[:64]]
    return value


def distinct_indices(gpus):
    """Return the GPUs sorted by index, each index used once, as the server demands of a push.

    Readable GPUs keep theirs; an entry that repeats a used index (or has none) gets the lowest
    index nobody uses, so one GPU that cannot be read never costs the others their place.
    """
    taken, kept, moved = set(), [], []
    for gpu in sorted(gpus, key=lambda g: g.get("error") is not None):  # readable GPUs claim first
        index = gpu.get("index")
        if type(index) is int and 0 <= index <= MAX_INDEX and index not in taken:
            taken.add(index)
            kept.append(gpu)
        else:
            moved.append(gpu)
    free = _free_indices(taken)
    moved = [{**gpu, "index": next(free)} for gpu in moved]
    return sorted(kept + moved, key=lambda g: g["index"])


def build_payload(backend, clock=time.time):
    """Sample the GPUs once; a sample that fails whole carries `error` and no GPUs."""
    sampled_at = clock()
    try:
        gpus, error = distinct_indices(backend.sample()), None
    except GpuReadError as failure:
        gpus, error = [], str(failure)
    payload = {"host": socket.gethostname(), "sampledAt": round(sampled_at, 3),
               "agent": {"version": VERSION, "backend": backend.name,
                         "simulated": backend.name == "simulated"},
               "gpus": gpus}
    if error:
        payload["error"] = error
    return payload


class StateLog:
    """Log a line when a condition changes, not on every interval."""

    def __init__(self):
        self.states = {}

    def set(self, topic, problem, key=None):
        """Log `problem` when the topic's state (`key`, else the text) changes, and a line when it clears."""
        state = (key or problem) if problem else None
        if self.states.get(topic) == state:
            return
        if problem:
            log.warning("%s", problem)
        elif self.states.get(topic):
            log.info("%s recovered", topic)
        self.states[topic] = state


def run_loop(backend, pusher, interval, clock=time.monotonic, sleep=time.sleep, stop=lambda: False):
    """Sample and push forever; back off only while the server is down or busy; send the newest sample."""
    states, failures = StateLog(), 0
    while not stop():
        started = clock()
        payload = build_payload(backend)
        states.set("GPU reading", payload.get("error") and f"cannot read GPUs: {payload['error']}")
        try:
            pusher.push(payload)
            failures, wait = 0, interval
            states.set("server", None)
            states.set("sample rejection", None)
        except Rejected as problem:
            # The server is up and refused this sample only: backing off would keep the PC off
            # the dashboard longer while every new sample is refused the same way.
            failures, wait = 0, interval
            states.set("server", None)
            # Keyed on the field, so a reading that stays out of range is logged once, not per sample.
            states.set("sample rejection", str(problem), key=(problem.status, problem.field or str(problem)))
        except Retry as problem:
            failures += 1
            wait = backoff_s(failures, interval, problem.after)
            states.set("server", f"{problem}; retrying with backoff (up to {BACKOFF_CAP_S:g} s)")
        sleep(max(0.0, started + wait - clock()))


# ---- starting at boot or logon: --install, --uninstall ---------------------------------------

SERVICE = "gpu-stats-agent"
TASK = "GPU Stats Agent"
LAUNCHD = "com.gpustats.agent"
MANIFEST = "gpu-stats-agent.installed"  # beside agent.py: what --install wrote, so --uninstall removes just that
TASK_XML = """<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo><Description>Pushes this PC's GPU stats to the GPU Stats Dashboard.</Description></RegistrationInfo>
  <Triggers><LogonTrigger><Enabled>true</Enabled><Delay>PT30S</Delay></LogonTrigger></Triggers>
  <Principals><Principal id="Author"><LogonType>InteractiveToken</LogonType><RunLevel>LeastPrivilege</RunLevel></Principal></Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <StartWhenAvailable>true</StartWhenAvailable>
    <IdleSettings><StopOnIdleEnd>false</StopOnIdleEnd><RestartOnIdle>false</RestartOnIdle></IdleSettings>
    <AllowStartOnDemand>true</AllowStartOnDemand>
    <Enabled>true</Enabled>
    <Hidden>true</Hidden>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <RestartOnFailure><Interval>PT1M</Interval><Count>999</Count></RestartOnFailure>
  </Settings>
  <Actions Context="Author"><Exec><Command>{command}</Command><Arguments>{arguments}</Arguments><WorkingDirectory>{folder}</WorkingDirectory></Exec></Actions>
</Task>
"""


def _systemd_quote(word):
    """Quote one word of a systemd ExecStart= line (systemd.service(5): "Command lines")."""
    if word and not any(c in word for c in " \t\"'\\$%;"):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%") + '"'


def install_plan(flags, agent, python, platform=sys.platform, home=None, root=None):
    """Return (files {path: text}, commands to run, commands that undo them, where its log is).

    `flags` are the agent's own flags to start with (never the key or the URL: those go in the
    .env beside agent.py). Pure: nothing is written or run here.
    """
    home = Path(home or Path.home())
    folder = agent.parent
    if platform.startswith("win"):
        pythonw = Path(python).with_name("pythonw.exe")
        from xml.sax.saxutils import escape
        xml = TASK_XML.format(command=escape(str(pythonw)), folder=escape(str(folder)),
                              arguments=escape(subprocess.list2cmdline([str(agent), *flags])))
        task = folder / f"{SERVICE}-task.xml"
        return ({task: xml}, [["schtasks", "/Create", "/TN", TASK, "/XML", str(task), "/F"], ["schtasks", "/Run", "/TN", TASK]],
                [["schtasks", "/End", "/TN", TASK], ["schtasks", "/Delete", "/TN", TASK, "/F"]],
                f"{folder / 'agent.log'} (the agent writes it under pythonw)")
    if platform == "darwin":
        import plistlib
        plist = home / "Library" / "LaunchAgents" / f"{LAUNCHD}.plist"
        logs = home / "Library" / "Logs" / f"{SERVICE}.log"
        text = plistlib.dumps({"Label": LAUNCHD, "ProgramArguments": [str(python), str(agent), *flags],
                               "WorkingDirectory": str(folder), "RunAtLoad": True,
                               "KeepAlive": {"SuccessfulExit": False}, "ThrottleInterval": 10,
                               "StandardOutPath": str(logs), "StandardErrorPath": str(logs)}).decode()
        return ({plist: text}, [["launchctl", "load", "-w", str(plist)]], [["launchctl", "unload", "-w", str(plist)]],
                str(logs))
    # System-wide as root, a user unit otherwise; GPU_STATS_SCOPE=user makes a user unit as root too.
    if root is None:
        root = os.environ.get("GPU_STATS_SCOPE") != "user" and hasattr(os, "geteuid") and os.geteuid() == 0
    system = bool(root)
    unit = (Path("/etc/systemd/system") if system else home / ".config" / "systemd" / "user") / f"{SERVICE}.service"
    scope = [] if system else ["--user"]
    text = (f"# Written by agent.py --install; agent.py --uninstall removes it.\n"
            f"[Unit]\nDescription=GPU Stats Dashboard agent\nWants=network-online.target\n"
            f"After=network-online.target\n\n[Service]\nType=simple\n"
            f"WorkingDirectory={_systemd_quote(str(folder))}\n"
            f"ExecStart={' '.join(_systemd_quote(str(w)) for w in (python, agent, *flags))}\n"
            f"Restart=on-failure\nRestartSec=10\n"
            f"# 2: a setting that cannot be right; 3: the server refused the key. Restarting cannot fix those.\n"
            f"RestartPreventExitStatus=2 3\n\n[Install]\nWantedBy={'multi-user.target' if system else 'default.target'}\n")
    return ({unit: text}, [["systemctl", *scope, "daemon-reload"], ["systemctl", *scope, "enable", "--now", SERVICE]],
            [["systemctl", *scope, "disable", "--now", SERVICE], ["systemctl", *scope, "daemon-reload"]],
            f"journalctl {'--user ' if scope else ''}-u {SERVICE} -f")


def _write_secret_env(path, url, key):
    """Keep PUSH_URL and DEVICE_KEY in `path` (mode 600: its owner alone reads it); return whether it was new."""
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if not line.split("=", 1)[0].strip() in ("PUSH_URL", "DROPLET_PUSH_URL", "DEVICE_KEY")]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), 0o600)
        f.write("\n".join([*kept, f"PUSH_URL={url}", f"DEVICE_KEY={key}"]) + "\n")
    return not lines


def install(args, argv, run=subprocess.run, **where):
    """Write what starts the agent at boot or logon, start it, and say in one line what was written and where its log is."""
    agent = Path(__file__).resolve()
    flags = _start_flags(argv)
    files, commands, undo, log_at = install_plan(flags, agent, Path(sys.executable), **where)
    env_file = agent.with_name(".env")
    written = [str(env_file)] if _write_secret_env(env_file, args.url, args.key) else []
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-16" if str(path).endswith(".xml") else "utf-8")
        written.append(str(path))
    agent.with_name(MANIFEST).write_text(json.dumps({"files": written, "undo": undo}, indent=1))
    for command in commands:
        done = run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise Rejected(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[:200]}")
    linger = "" if "--user" not in sum(commands, []) else (
        "; it starts when you log in (to start it at boot: sudo loginctl enable-linger $USER)")
    _say(f"installed: wrote {', '.join(written)}, the key kept in {env_file} (mode 600){linger}; its log: {log_at}")
    return 0


def uninstall(run=subprocess.run):
    """Stop the agent started at boot or logon and remove exactly what --install wrote."""
    manifest = Path(__file__).resolve().with_name(MANIFEST)
    if not manifest.exists():
        _say(f"nothing to uninstall: no {manifest.name} beside agent.py")
        return 0
    record = json.loads(manifest.read_text())
    for command in record["undo"]:
        run(command, capture_output=True, text=True, timeout=60)  # one that fails (already stopped) stops nothing
    for path in record["files"]:
        Path(path).unlink(missing_ok=True)
    manifest.unlink()
    _say(f"uninstalled: stopped it and removed {', '.join(record['files'])}")
    return 0


def _start_flags(argv):
    """Return the flags the agent starts with at boot: those given now, less --install, --key and --url."""
    flags, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--key", "--url"):
            skip = True
        elif arg.startswith(("--key=", "--url=")) or arg in ("--install", "--uninstall", "--once", "--dry-run"):
            continue
        else:
            flags.append(arg)
    return flags


# ---- settings and main --------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """Print one line naming the bad setting, no usage dump; exit 2."""
        self.exit(2, f"agent: {message}\n")


def settings_from(argv, environ):
    """Parse flags over the environment over the .env beside this file."""
    env = {}
    try:
        from dotenv import dotenv_values
        env = {k: v for k, v in dotenv_values(Path(__file__).with_name(".env")).items() if v is not None}
    except ImportError:
        pass
    env.update(environ)
    parser = _Parser(description="Push this PC's NVIDIA GPU stats to a GPU Stats Dashboard.")
    parser.add_argument("--url", default=env.get("PUSH_URL") or env.get("DROPLET_PUSH_URL"),
                        help="server push URL, like http://host:3000/push-sse (PUSH_URL)")
    parser.add_argument("--key", default=env.get("DEVICE_KEY"),
                        help="this device's key (DEVICE_KEY; better in .env: a flag shows in ps to every user)")
    parser.add_argument("--interval", type=float, default=env.get("PUSH_INTERVAL_S", "2"),
                        help="seconds between samples (PUSH_INTERVAL_S, default 2)")
    parser.add_argument("--backend", choices=["auto", "nvml", "gputil"], default="auto")
    parser.add_argument("--once", action="store_true", help="send one sample, then exit")
    parser.add_argument("--dry-run", action="store_true", help="print the JSON payload instead of posting")
    parser.add_argument("--simulate", type=int, default=0, metavar="N", help="send N made-up GPUs")
    parser.add_argument("--debug", action="store_true", help="verbose logs and tracebacks")
    parser.add_argument("--install", action="store_true",
                        help="start the agent at boot or logon with these flags: a systemd unit (system-wide as root, "
                             "a user unit otherwise, or with GPU_STATS_SCOPE=user), a Task Scheduler task, a launchd agent")
    parser.add_argument("--uninstall", action="store_true", help="undo --install")
    args = parser.parse_args(argv)
    if args.uninstall:
        return args
    if not 0.2 <= args.interval <= 3600:
        parser.error(f"--interval/PUSH_INTERVAL_S: {args.interval:g} must be from 0.2 to 3600 seconds")
    if not 0 <= args.simulate <= 64:
        parser.error("--simulate: N must be from 0 to 64")
    if not args.dry_run:
        if not args.url:
            parser.error("PUSH_URL is not set: pass --url http://SERVER:3000/push-sse or set PUSH_URL")
        parts = urlsplit(args.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            parser.error(f"PUSH_URL: {args.url!r} is not an http:// or https:// URL with a host")
        if not args.key:
            parser.error("DEVICE_KEY is not set: pass --key KEY or set DEVICE_KEY (the server's DEVICE_KEYS)")
    return args


def other_users(accounts=None, uid=None, platform=sys.platform):
    """Return the other login accounts of this machine, each of whom can read any process's command line.

    POSIX only: `ps` and /proc/<pid>/cmdline (mode 0444) show every process's arguments to every
    user. Accounts are those with a person's uid (from 1,000 on Linux, 500 on macOS, below the
    65,534 of nobody) and a login shell.
    """
    try:
        import pwd
    except ImportError:  # Windows: a standard user cannot read another user's process arguments
        return []
    accounts = pwd.getpwall() if accounts is None else accounts
    uid = os.getuid() if uid is None else uid
    first = 500 if platform == "darwin" else 1000
    return sorted(a.pw_name for a in accounts if first <= a.pw_uid < 60000 and a.pw_uid != uid
                  and not a.pw_shell.endswith(("nologin", "false")))


def key_on_command_line(argv):
    """Return whether the device key was given as a flag (`--key K` or `--key=K`)."""
    return any(arg == "--key" or arg.startswith("--key=") for arg in argv)


def _say(message):
    """Tell the user one line: on stderr, or in agent.log under pythonw (which has none)."""
    if sys.stderr is not None:
        print(f"agent: {message}", file=sys.stderr)
    else:
        log.error("%s", message)


def _configure_logging(debug):
    handlers = None
    if sys.stderr is None:  # pythonw.exe at logon: keep a small log file beside the agent
        from logging.handlers import RotatingFileHandler
        handlers = [RotatingFileHandler(Path(__file__).with_name("agent.log"), maxBytes=1 << 20, backupCount=1)]
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=handlers,
                        format="%(asctime)s agent %(levelname)s: %(message)s")


def main(argv=None, environ=None):
    """Run the agent; the one place that turns failures into a message and an exit code."""
    argv = sys.argv[1:] if argv is None else argv
    args = settings_from(argv, os.environ if environ is None else environ)
    _configure_logging(args.debug)
    if args.uninstall:
        return uninstall()
    if args.install:
        try:
            return install(args, argv)
        except (OSError, subprocess.SubprocessError, Rejected) as error:
            _say(f"cannot install: {error}")
            return 1
    if key_on_command_line(argv) and (others := other_users()):
        log.warning("--key puts the device key where every user of this machine can read it (ps; here: %s): "
                    "put DEVICE_KEY=... in a .env beside agent.py (chmod 600), or in the environment, instead",
                    ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    try:
        backend = open_backend(args.backend, args.simulate)
        if args.once or args.dry_run:
            payload = build_payload(backend)
            if args.dry_run:
                print(json.dumps(_fit(payload), indent=2, allow_nan=False))
            if payload.get("error"):
                _say(f"cannot read GPUs: {payload['error']}")
                return 1
            if not args.dry_run:
                Pusher(args.url, args.key).push(payload)
            return 0
        log.info("pushing %s GPU stats to %s every %g s", backend.name, args.url, args.interval)
        run_loop(backend, Pusher(args.url, args.key), args.interval)
    except GpuReadError as error:
        _say(f"cannot read GPUs: {error}")
        return 1
    except (Retry, Rejected) as error:
        _say(str(error))
        return 1
    except Refused as error:
        _say(str(error))
        return 3
    except KeyboardInterrupt:
        return 0
    except Exception as error:  # last resort: one line, traceback only under --debug
        if args.debug:
            raise
        _say(f"unexpected error: {type(error).__name__}: {error} (run with --debug)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

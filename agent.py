#!/usr/bin/env python3
"""GPU Stats agent: read this PC's GPUs and push them to the dashboard server.

NVIDIA through NVML (or GPUtil and nvidia-smi); AMD and Intel on Linux through their drivers'
sysfs, hwmon and fdinfo files; Jetson through its sysfs or tegrastats; Apple Silicon through
ioreg; any GPU on Windows through the performance counters Task Manager reads. Nothing but
the standard library for the others: file reads, subprocesses with a timeout, ctypes.

Copy this one file to each GPU PC. Needs: requests; nvidia-ml-py and/or GPUtil (with
setuptools on Python 3.12+) for NVIDIA; psutil for the PC around the GPUs and python-dotenv
(both optional). See requirements-agent.txt.

Its sections, in order (each starts at a "# ---- name" line):
  readers              Reader, the base class of every reader; GpuReadError; the units they convert to
  processes            what each GPU process is: command_line (program and script), process_entry, for every reader
  NVIDIA               nvidia-smi's output parsed; GputilReader and NvmlReader
  simulated GPUs       SimulatedReader: made-up GPUs, for --simulate
  Linux                SysRoot (--sys-root; a process's cmdline and start), sysfs and hwmon reads, DRM cards
  DRM                  who uses which GPU, from /proc/<pid>/fdinfo; DrmReader, AMD's and Intel's base
  AMD                  AmdReader: the amdgpu driver's files, amd-smi or rocm-smi for what they lack
  Intel                IntelReader: i915 and xe sysfs, the energy counter, busy time from fdinfo
  Jetson               JetsonReader: devfreq, the GPU's thermal zone and power rail, else tegrastats
  Apple                AppleReader: ioreg, and powermetrics as root
  Windows              WindowsReader, any vendor: the GPU counters Task Manager reads (PDH), DXGI; WindowsProcesses
  the host             HostReader: the PC's OS, CPU, memory, disks, network, CPU temperature, uptime, through psutil
  choosing readers     open_reader (--backend), MultiReader for several in one push, PendingReader
  pushing              PushError and its kinds, Pusher, build_payload, run_loop
  starting at boot     --install and --uninstall: a systemd unit, a Task Scheduler task, a launchd agent
  settings and main    flags over the environment over .env; main, the one place failures become exit codes
"""
import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from urllib.parse import urlsplit

VERSION = "1.0.0"
log = logging.getLogger("agent")


# ---- readers: the base class, its error, and the units every reader converts to ------------------

class GpuReadError(Exception):
    """The GPUs could not be read at all; the message is one line for the user."""


class Reader:
    """What reads GPUs: one vendor's, made-up ones, or several readers' in one push (MultiReader)."""

    name = None  # the --backend choice that opens it; the payload says it as agent.backend
    vendor = None  # the vendor of every GPU it reads, where it reads only one vendor's
    count = 0  # the GPUs it knew of when it opened: MultiReader keeps their slots through a failed first sample

    def sample(self):
        """Return its GPUs as payload entries, indexed from 0; raise GpuReadError when none can be read."""
        raise NotImplementedError

    def describe(self, index):
        """Say which reader read GPU `index`, and from where: shown by --dry-run."""
        return self.name


def _mib(n_bytes):
    return round(n_bytes / (1 << 20))


def _scaled(value, divisor, digits=None):
    """`value` / `divisor`, rounded (to whole numbers unless `digits`); None stays None."""
    if value is None:
        return None
    result = round(value / divisor, digits) if digits else round(value / divisor)
    return int(result) if isinstance(result, float) and result.is_integer() else result


def _percent(value):
    return None if value is None or not 0 <= value <= 100 else value


# ---- processes: what each process on a GPU is, for every reader that lists them ------------------
# Two jobs of one user both read "python3" (issue 33, on an H200): the command and the start tell
# them apart. The command is the program and its script or first argument, never the rest of the
# line: arguments hold tokens, keys and paths (`--wandb-key 4f2a...`, `--data /home/alice/...`),
# and every viewer of the dashboard would read them. --full-commands sends the whole line.

# An interpreter's first argument is an option or its script: `python3 -u train.py --lr 0.1` is
# `python3 train.py`. Per interpreter: the options that take the next argument as their value (skipped
# with it), those whose value is code (the command ends at the option: `python3 -c`, never the code),
# and those that name what runs (kept with it: `python3 -m torch.distributed.run`, `java -jar app.jar`).
_PYTHON = ({"-W", "-X", "--check-hash-based-pycs"}, {"-c"}, {"-m"})
_NODE = ({"-r", "--require", "--import", "--loader", "-C", "--conditions"}, {"-e", "--eval", "-p", "--print"}, set())
_SHELL = ({"-o", "+o", "-O", "+O"}, {"-c"}, set())
INTERPRETERS = {
    "python": _PYTHON, "pypy": _PYTHON, "node": _NODE, "nodejs": _NODE,
    "bash": _SHELL, "sh": _SHELL, "dash": _SHELL, "zsh": _SHELL, "ksh": _SHELL,
    "perl": ({"-I"}, {"-e", "-E"}, set()), "ruby": ({"-I", "-r"}, {"-e"}, set()), "rscript": (set(), {"-e"}, set()),
    "julia": ({"-t", "--threads", "-p", "--procs", "-J", "--sysimage"}, {"-e", "-E", "--eval", "--print"}, set()),
    "java": ({"-cp", "-classpath", "--class-path", "-p", "--module-path", "--add-modules"}, set(),
             {"-jar", "-m", "--module"}),
}
INTERPRETER = re.compile(r"([a-z]+?)[\d.]*w?(?:\.exe)?")  # python3.12, pythonw.exe, pypy3, perl5.36: the family's name
# An argument shown beside the program: a word or a file's name. A value with a colon, an @, a space
# or an = (a URL, user@host, code, KEY=value) is left out, whatever it is.
PLAIN_ARGUMENT = re.compile(r"[\w.+-]+")
PROCESS_ABOUT = ("user", "command", "startedAt")  # what a process lookup adds to a reader's pid, name and memory


def _basename(path):
    """Return the last part of a POSIX or Windows path: where a script lives can name a person or a project."""
    return path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def _plain(argument):
    """Return an argument as a command shows it, its file name alone; None for one not shown (an option, a URL, code)."""
    name = _basename(argument)
    return name if PLAIN_ARGUMENT.fullmatch(name) and not name.startswith("-") else None


def _option(argument, known):
    """Split an option into its name and the value given with it: --eval=code, -Wignore, -m."""
    if argument.startswith("--"):
        name, _, value = argument.partition("=")
        return name, value or None
    if argument in known or argument[:2] not in known:
        return argument, None
    return argument[:2], argument[2:]


def _script(arguments, takes, code, runs):
    """Return the words that say what an interpreter runs: ["train.py"], ["-m", "module"], ["-c"] (not the code), []."""
    known = takes | code | runs
    rest = iter(arguments)
    for argument in rest:
        if argument == "--":  # the end of the options: the script follows
            argument = next(rest, "")
        elif len(argument) > 1 and argument[0] in "-+":
            name, value = _option(argument, known)
            if name in code:
                return [name]
            if name in takes or name in runs:
                value = next(rest, "") if value is None else value
                if name in runs:
                    return [name] + ([_plain(value)] if _plain(value) else [])
            continue
        return [_plain(argument)] if _plain(argument) else []
    return []


def command_line(argv, full=False):
    """Return what a process runs, from its arguments: `python3 train.py`, `ollama serve`; with `full`, every argument.

    None when there are none (a kernel thread, a zombie): the reader says the process's name instead.
    """
    program = _basename(argv[0]) if argv else ""
    if not program:
        return None
    if full:
        return _fit(shlex.join([program, *argv[1:]]))
    family = INTERPRETER.fullmatch(program.lower())
    options = INTERPRETERS.get(family.group(1)) if family else None
    if options:
        words = _script(argv[1:], *options)
    else:  # a program's first argument is its subcommand or its file (`ollama serve`, `blender scene.blend`)
        words = [_plain(argv[1])] if len(argv) > 1 and _plain(argv[1]) else []
    return _fit(" ".join([program, *words]))


def process_entry(pid, name, memory_mib, lookup):
    """Return one process as a push carries it: pid, name, memory, and the user, command and start `lookup(pid)` gives.

    `lookup` asks the OS (SysRoot.process, WindowsProcesses). A process gone between being
    listed and being read, or one the OS will not describe, is still sent with what the reader
    has: its memory was in use when the driver listed it.
    """
    try:
        about = lookup(pid) if lookup else {}
    except (OSError, ValueError):
        about = {}
    entry = {"pid": pid, "name": name or about.get("name") or "", "memoryUsed": memory_mib}
    entry.update((key, about[key]) for key in PROCESS_ABOUT if about.get(key) is not None)
    return entry


# ---- NVIDIA: nvidia-smi's output, GPUtil and NVML ------------------------------------------------

SMI_TIMEOUT_S = 10.0
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
# What GPUtil does not read; the GPUtil reader asks nvidia-smi for these in one extra call.
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


def _broken(errors, taken):
    """Turn nvidia-smi's per-GPU error lines into entries with an error and nulls, at indices not `taken`.

    nvidia-smi prints the error line in the lost GPU's place and gives the GPUs after it their
    true indices, so the gaps are where lost GPUs are (0 and 2 readable: the lost one is 1).
    Numbering them from the count of readable GPUs instead gave a used index, and the server
    refused the whole push ("gpus[2].index: 2 is used twice"): the PC left the dashboard.
    """
    free = _free_indices(taken)
    return [{"index": next(free), "error": clip(_one_line(line))} for line in errors]


class GputilReader(Reader):
    """GPUtil for the basics, plus one nvidia-smi query (with a timeout) for the rest."""

    name = "gputil"
    vendor = "NVIDIA"

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


# What NVML answers a driver that has no nvmlDeviceGetMemoryInfo_v2: not found, not supported, or
# a version it does not know.
_NO_MEMORY_V2 = (13, 3, 25)  # NVML_ERROR_FUNCTION_NOT_FOUND, _NOT_SUPPORTED, _ARGUMENT_VERSION_MISMATCH


class NvmlReader(Reader):
    """NVML through nvidia-ml-py: no subprocess, and processes, power, fans and clocks."""

    name = "nvml"
    vendor = "NVIDIA"

    def __init__(self, nvml=None, process=None):
        if nvml is None:
            import pynvml as nvml
        self.nvml, self.process = nvml, process  # process(pid) -> what the OS says of it (SysRoot.process)
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise GpuReadError(f"NVML could not start: {error}") from None
        self.driver = self._read(nvml.nvmlSystemGetDriverVersion)
        self.count = self._read(nvml.nvmlDeviceGetCount) or 0  # the slots its GPUs keep beside other readers'
        self._memory_v2 = getattr(nvml, "nvmlMemory_v2", None)  # None: this binding or driver has no v2

    def _memory(self, handle):
        """Return the GPU's memory as nvidia-smi counts it: v2 leaves the driver's reserved memory out of used.

        v1 counts it as used: 615 MiB on an idle H200 where nvidia-smi says 0 (captures in
        shared/nvidia-smi-samples/h200-580). Drivers before R510 have no v2: v1 from then on.
        """
        nvml = self.nvml
        if self._memory_v2 is not None:
            try:
                return nvml.nvmlDeviceGetMemoryInfo(handle, version=self._memory_v2)
            except nvml.NVMLError as error:
                if getattr(error, "value", None) in _NO_MEMORY_V2:
                    self._memory_v2 = None
        return self._read(nvml.nvmlDeviceGetMemoryInfo, handle)

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
        memory = self._memory(handle)
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
                found[proc.pid] = process_entry(proc.pid, _basename(name), _mib(used) if isinstance(used, int) else None,
                                                self.process)
        return sorted(found.values(), key=lambda p: -(p["memoryUsed"] or 0))[:64]


# ---- simulated GPUs: made-up ones, for demos and machines with no GPU ----------------------------

class SimulatedReader(Reader):
    """Made-up GPUs with plausible moving numbers, for demos and machines with no GPU."""

    name = "simulated"
    # (name, MiB, power limit W, memory clock MHz) of real cards: each simulated GPU is one of them.
    MODELS = (("NVIDIA GeForce RTX 4090", 24564, 450.0, 10501), ("NVIDIA RTX A6000", 49140, 300.0, 8001),
              ("NVIDIA A100-SXM4-80GB", 81920, 400.0, 1593), ("NVIDIA GeForce RTX 3090", 24576, 350.0, 9751),
              ("NVIDIA L40S", 46068, 350.0, 9001), ("NVIDIA H100 80GB HBM3", 81559, 700.0, 2619))
    COMMANDS = ("python3 train.py", "blender scene.blend", "ollama serve", "python3 main.py", "llama-server", "ffmpeg")

    def __init__(self, count, seed=None, clock=time.time):
        self.rng, self.clock = random.Random(seed), clock
        self.load = [self.rng.uniform(0, 95) for _ in range(count)]
        # Each GPU its own card, job and trend, so no two read alike (issue 30: two showed the same).
        self.models = [self.rng.choice(self.MODELS) for _ in range(count)]
        self.jobs = [(self.rng.randrange(1000, 60000), self.rng.choice(self.COMMANDS),
                      round(clock() - self.rng.uniform(60, 6 * 3600), 2)) for _ in range(count)]
        self.drift = [self.rng.uniform(-1.5, 1.5) for _ in range(count)]
        self.tag = f"{socket.gethostname()}-{os.getpid()}-{self.rng.randrange(1 << 16):04x}"

    def sample(self):
        gpus = []
        for index, load in enumerate(self.load):
            load = min(100.0, max(0.0, load + self.drift[index] + self.rng.gauss(0, 8)))
            if load in (0.0, 100.0):
                self.drift[index] = -self.drift[index]  # a job ends, another starts
            self.load[index] = load
            name, total, limit, memory_clock = self.models[index]
            pid, command, started = self.jobs[index]
            used = round(min(total, 600 + load / 100 * total * 0.8))
            temp = 33 + load * 0.45 + index % 8
            gpus.append({"index": index, "uuid": f"GPU-SIMULATED-{self.tag}-{index}"[:128],
                         "name": name, "vendor": "NVIDIA", "driverVersion": "560.94",
                         "utilizationGpu": round(load), "utilizationMemory": round(load * 0.6),
                         "memoryTotal": total, "memoryUsed": used, "memoryFree": total - used,
                         "temperatureGpu": round(temp), "temperatureMemory": None,
                         "powerDraw": round(limit * (0.07 + load / 100 * 0.85), 1), "powerLimit": limit,
                         "fanSpeed": round(min(100.0, max(0.0, (temp - 40) * 2))),
                         "clockCore": round(210 + load * 23), "clockMemory": memory_clock, "pstate": "P2" if load > 5 else "P8",
                         "processes": [{"pid": pid, "name": command.split()[0], "command": command, "startedAt": started,
                                        "memoryUsed": used - 600}] if load > 5 else []})
        return gpus


# ---- Linux: sysfs and procfs, for AMD, Intel and Jetson GPUs --------------------------------

RESCAN_S = 10.0  # how often /proc is searched for new GPU clients; known ones are read every sample


class SysRoot:
    """Where /sys, /proc and /usr/share are: this machine's, or a host's mounted in a container (--sys-root).

    `full_commands` (--full-commands): a process's command is its whole command line, not its
    program and script alone; it holds for every reader, the Windows one included (open_reader).
    """

    def __init__(self, root="/", reuse_s=0.5, rescan_s=RESCAN_S, full_commands=False):
        self.root = Path(root)
        self.sys, self.proc = self.root / "sys", self.root / "proc"
        self.reuse_s, self.rescan_s = reuse_s, rescan_s  # one read serves every reader of one sample
        self.full_commands = full_commands
        self._clients = (None, [])
        self._descriptors = (None, [])
        self._users = {}
        self._starts = {}

    def path(self, absolute):
        return self.root / absolute.lstrip("/")

    def user(self, uid):
        """Return the account name of `uid`: from the root's /etc/passwd (a host's, in a container), else the uid."""
        if uid not in self._users:
            self._users[uid] = _passwd_name(uid, self.path("/etc/passwd")) or str(uid)
        return self._users[uid]

    def process(self, pid):
        """Return what /proc/<pid> says of a process: name (comm), user (status's real uid), command and startedAt.

        What cannot be read is left out: all of it for a process gone since it was listed.
        """
        base = self.proc / str(pid)
        name, status = read_text(base / "comm"), read_text(base / "status")
        uid = next((line.split()[1] for line in (status or "").splitlines() if line.startswith("Uid:")), None)
        found = {"name": name, "user": self.user(int(uid)) if uid and uid.isdigit() else None,
                 "startedAt": self.started(pid, read_text(base / "stat"))}
        argv = read_cmdline(base / "cmdline")
        if argv is not None:
            if len(argv) == 1 and " " in argv[0] and not os.path.isfile(self.path(argv[0])):
                # A title set in place of the arguments (setproctitle, Perl's $0, Chrome's renderers): one
                # string, spaces between its words, which may be arguments. Not a program's path with a space.
                argv = argv[0].split()
            found["command"] = command_line(argv, self.full_commands) or name  # none: a kernel thread, a zombie
        return found

    def started(self, pid, stat):
        """Return when a process started, in seconds since the epoch: its stat's starttime after the boot's btime.

        Remembered for the process's life (its pid and starttime): btime is whole seconds, worked
        out again on every read from a clock NTP slews, so it may move by a second, and a start
        that moved would read as a new job on the server.
        """
        ticks = parse_start_ticks(stat)
        if ticks is None:
            return None
        if (pid, ticks) not in self._starts:
            boot = parse_btime(read_text(self.proc / "stat"))
            if boot is None:
                return None
            if len(self._starts) > 4096:
                self._starts.clear()
            self._starts[pid, ticks] = round(boot + ticks / _clock_ticks(), 2)
        return self._starts[pid, ticks]

    def drm_clients(self):
        """Return the open DRM clients of every process this user may see, as parsed fdinfo (see read_drm_clients)."""
        when, clients = self._clients
        now = time.monotonic()
        if when is None or now - when >= self.reuse_s:
            found, descriptors = self._descriptors
            if found is None or now - found >= self.rescan_s:  # new GPU processes appear within RESCAN_S
                descriptors = drm_descriptors(self.proc)
                self._descriptors = (now, descriptors)
            clients = read_drm_clients(self.proc, descriptors)
            self._clients = (now, clients)
        return clients


def read_cmdline(path):
    """Return /proc/<pid>/cmdline's arguments, each ended by a NUL; [] for none (a kernel thread), None if unreadable."""
    try:
        data = Path(path).read_bytes()
    except (OSError, ValueError):
        return None
    data = data[:-1] if data.endswith(b"\0") else data
    return [word.decode("utf-8", "replace") for word in data.split(b"\0")] if data else []


def parse_start_ticks(stat):
    """Return the starttime of a /proc/<pid>/stat line: clock ticks after boot, its 22nd field; None if not one.

    The second field is the name in parentheses, and a name may hold spaces and parentheses
    itself ("job) R 1 2 3 4" is a name one process gave itself): the fields are counted from
    the last ")".
    """
    _, paren, rest = (stat or "").rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20 or not fields[19].isdigit():
        return None
    return int(fields[19])  # field 22; `rest` starts at field 3


def parse_btime(text):
    """Return the boot time of /proc/stat, seconds since the epoch; None if it has no btime line."""
    line = next((line for line in (text or "").splitlines() if line.startswith("btime ")), "")
    value = line[6:].strip()
    return int(value) if value.isdigit() else None


def _clock_ticks():
    """Return the kernel's clock ticks a second (USER_HZ), which /proc/<pid>/stat counts in: 100 where unknown."""
    try:
        return os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        return 100


def _passwd_name(uid, passwd):
    try:
        import pwd
        if passwd == Path("/etc/passwd"):
            return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        pass
    for line in (read_text(passwd) or "").splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[2] == str(uid):
            return fields[0]
    return None


def read_text(path):
    """Return a sysfs or procfs file's text, stripped; None when it is missing, empty or cannot be read.

    A GPU in reset answers reads with EIO or ENODEV: null, never a crash. Some amdgpu files come
    padded to 4 KiB with NUL bytes after the value (an RX 6900 XT's "3\n\0\0..."): the value
    is kept, and a file of nothing but NULs, or with NULs inside it, means null.
    """
    try:
        data = Path(path).read_bytes().rstrip(b"\0")
    except (OSError, ValueError):
        return None
    if b"\0" in data:
        return None
    return data.decode("utf-8", "replace").strip() or None


def read_int(path):
    """Return a file's integer (decimal, or 0x-prefixed hex as PCI ids are), else None."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


PCI_ADDRESS = re.compile(r"^[0-9a-f]{4,}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-9a-f]$")


def drm_cards(root, drivers):
    """Return [(PCI address, card directory, driver)] of the DRM cards bound to one of `drivers`, by PCI address.

    card0 is not always the GPU (simpledrm takes it on many machines), and cardN-DP-1 is a
    connector, not a card: the driver and the PCI address say which cards are GPUs, and the
    address keeps each GPU's index across reboots that renumber the cards.
    """
    found = {}
    try:
        cards = sorted((root.sys / "class" / "drm").iterdir())
    except OSError:
        return []
    for card in cards:
        if not (card.name.startswith("card") and card.name[4:].isdigit()):
            continue
        device = card / "device"
        uevent = dict(line.partition("=")[::2] for line in (read_text(device / "uevent") or "").splitlines())
        driver = _link_name(device / "driver") or uevent.get("DRIVER")
        if driver not in drivers:
            continue
        address = next((a for a in (_link_name(device), uevent.get("PCI_SLOT_NAME", "").lower())
                        if a and PCI_ADDRESS.match(a)), card.name)  # a platform GPU has no PCI address
        found.setdefault(address, (card, driver))
    return [(address, *found[address]) for address in sorted(found)]


def _uevent_device_id(device):
    """The device id of uevent's PCI_ID=1002:7550, for a tree without a device file."""
    for line in (read_text(device / "uevent") or "").splitlines():
        if line.startswith("PCI_ID=") and ":" in line:
            try:
                return int(line.rsplit(":", 1)[1], 16)
            except ValueError:
                return None
    return None


def _link_name(path):
    """The last part of a symlink's target: device -> ../../../0000:03:00.0, driver -> .../amdgpu."""
    try:
        return os.readlink(path).rstrip("/").rsplit("/", 1)[-1].lower()
    except OSError:  # not a link, or missing
        return None


def hwmon_dir(device):
    """Return the card's hwmon directory (device/hwmon/hwmonN), or None."""
    try:
        return next(iter(sorted((device / "hwmon").glob("hwmon*"))), None)
    except OSError:
        return None


def hwmon_temperatures(hwmon):
    """Return {label: degrees C} of temp*_input, labelled by temp*_label (temp1 when unlabelled)."""
    found = {}
    if hwmon is None:
        return found
    for sensor in sorted(hwmon.glob("temp*_input")):
        stem = sensor.name[:-len("_input")]
        label = (read_text(hwmon / f"{stem}_label") or stem).lower()
        value = read_int(sensor)
        if value is not None and -100_000 < value < 250_000:
            found.setdefault(label, _scaled(value, 1000, 1))
    return found


def _kernel_release(root):
    return read_text(root.proc / "sys" / "kernel" / "osrelease")


# ---- DRM: who uses which GPU (/proc/<pid>/fdinfo), and what the AMD and Intel readers share ------

SIZE_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1 << 20, "mib": 1 << 20, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text):
    """Return bytes of an fdinfo size ("7964 KiB", "12 kB", "4096"), or None."""
    number, _, unit = (text or "").strip().partition(" ")
    if not number.isdigit() or unit.strip().lower() not in SIZE_UNITS:
        return None
    return int(number) * SIZE_UNITS[unit.strip().lower()]


def parse_fdinfo(text):
    """Return an fdinfo file's "key: value" lines as a dict (the kernel's drm-usage-stats format)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def drm_descriptors(proc):
    """Return [(pid, fd)] of every open file descriptor into /dev/dri that this user can see.

    A desktop has thousands of descriptors and each costs a readlink: this is most of a
    Linux reader's CPU (make bench-agent), so it runs every RESCAN_S, not every sample.
    """
    found = []
    try:
        pids = [entry.name for entry in os.scandir(proc) if entry.name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            fds = list(os.scandir(f"{proc}/{pid}/fd"))
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            try:
                if os.readlink(fd.path).startswith("/dev/dri/"):
                    found.append((pid, fd.name))
            except OSError:
                continue
    return found


def read_drm_clients(proc, descriptors):
    """Return [{"pid": pid, **fdinfo}] of the DRM clients behind `descriptors`, one per (device, client).

    A process that opened the same client twice (dup, fork) is counted once, by drm-client-id;
    a descriptor closed since it was found reads as nothing and is left out.
    """
    clients, seen = [], set()
    for pid, fd in descriptors:
        text = read_text(proc / pid / "fdinfo" / fd)
        if not text:
            continue
        fields = parse_fdinfo(text)
        device = (fields.get("drm-pdev") or fields.get("pdev") or "").lower()
        client = fields.get("drm-client-id") or fields.get("pasid") or f"{pid}/{fd}"
        if not device or (device, client) in seen:
            continue
        seen.add((device, client))
        clients.append({"pid": int(pid), **fields, "drm-pdev": device})
    return clients


def client_processes(root, clients, memory):
    """Return the processes list of one GPU's clients: pid, name, memory in use, and user, command and start.

    `memory` is one group of fdinfo keys per kind of memory counted, the first present of each
    group read: ("drm-memory-vram", "drm-total-vram", "vram mem") is VRAM as kernels from 5.19,
    from 6.9 and before 5.19 spell it.
    """
    processes = {}
    for client in clients:
        used = [parse_size(next((client[key] for key in group if key in client), None)) for group in memory]
        used = [n for n in used if n is not None]
        entry = processes.get(client["pid"])
        if entry is None:
            entry = processes[client["pid"]] = process_entry(client["pid"], None, None, root.process)
        if used:
            entry["memoryUsed"] = (entry["memoryUsed"] or 0) + sum(used)
    for entry in processes.values():
        if entry["memoryUsed"] is not None:
            entry["memoryUsed"] = _mib(entry["memoryUsed"])
    return sorted(processes.values(), key=lambda p: (-(p["memoryUsed"] or 0), p["pid"]))[:64]


class DrmReader(Reader):
    """What the Linux DRM readers share: their cards, by PCI address, and each card's clients from fdinfo."""

    drivers = set()
    unnamed_driver = None  # the driver of an fdinfo that names none (amdgpu's before 5.19)

    def __init__(self, root, missing):
        self.root = root or SysRoot()
        self.cards = drm_cards(self.root, self.drivers)
        if not self.cards:
            raise GpuReadError(missing)
        self.names = {}

    def describe(self, index):
        try:
            address, card, driver = self.cards[index]
        except IndexError:  # not one of its cards
            return self.name
        return f"{self.name}{'' if len(self.drivers) == 1 else f' ({driver})'}: {card} ({address})"

    def sample(self):
        clients = [c for c in self.root.drm_clients() if c.get("drm-driver", self.unnamed_driver) in self.drivers]
        return [self._card(index, address, card, driver, [c for c in clients if c["drm-pdev"] == address])
                for index, (address, card, driver) in enumerate(self.cards)]

    def _card(self, index, address, card, driver, clients):
        device = card / "device"
        if not device.exists():
            return {"index": index, "vendor": self.vendor, "error": f"{card.name} is gone (GPU reset or removed)"}
        return self._gpu(index, address, card, driver, device, clients)


# ---- AMD: the amdgpu driver's files --------------------------------------------------------

AMDGPU_IDS = "/usr/share/libdrm/amdgpu.ids"


def parse_amdgpu_ids(text):
    """Return {(device id, revision): name} of libdrm's amdgpu.ids ("744C,\tC8,\tAMD Radeon RX 7900 XTX")."""
    names = {}
    for line in text.splitlines():
        parts = [part.strip() for part in line.split(",", 2)]
        if len(parts) == 3 and not line.startswith("#"):
            try:
                names[(int(parts[0], 16), int(parts[1], 16))] = parts[2]
            except ValueError:
                continue
    return names


def parse_dpm_clock(text):
    """Return the MHz of the `*` line of pp_dpm_sclk/pp_dpm_mclk ("1: 1340Mhz *"), else None.

    RDNA3 lists three lines, the middle one the present clock, and says 0Mhz there while the
    graphics block is powered off: that 0 is true (no clock runs), not a missing value.
    """
    for line in (text or "").splitlines():
        if line.rstrip().endswith("*"):
            match = re.search(r"(\d+)\s*mhz", line, re.IGNORECASE)
            return int(match.group(1)) if match else None
    return None


def _number(value):
    """A tool's number ("45.0", 6, "(1269Mhz)", {"value": 6, "unit": "W"}); None for "N/A" and the like."""
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        match = re.fullmatch(r"\(?\s*(-?\d+(?:\.\d+)?)\s*(?:mhz|w|c|%|mb|b)?\s*\)?", value.strip(), re.IGNORECASE)
        value = float(match.group(1)) if match else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if float(value).is_integer() else value


def _json_in(text):
    """The JSON in a tool's output, past any warnings it printed first (amd-smi's Python SyntaxWarnings)."""
    start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        return json.loads(text[start:])
    except ValueError:
        return None


def parse_rocm_smi(text):
    """Return {PCI address: fields} from `rocm-smi --json` (ROCm 4.3 to 6.1: {"card0": {...}, "system": {...}})."""
    data, found = _json_in(text), {}
    for key, card in (data.items() if isinstance(data, dict) else ()):
        if not key.startswith("card") or not isinstance(card, dict) or not card.get("PCI Bus"):
            continue
        total, used = _number(card.get("VRAM Total Memory (B)")), _number(card.get("VRAM Total Used Memory (B)"))
        power = _number(card.get("Average Graphics Package Power (W)"))
        if power is None:
            power = _number(card.get("Current Socket Graphics Package Power (W)"))
        found[card["PCI Bus"].lower()] = {
            "utilizationGpu": _percent(_number(card.get("GPU use (%)"))),
            "memoryTotal": _mib(total) if total else None, "memoryUsed": _mib(used) if total and used is not None else None,
            "temperatureGpu": _number(card.get("Temperature (Sensor edge) (C)")),
            "temperatureMemory": _number(card.get("Temperature (Sensor memory) (C)")),
            "powerDraw": power, "fanSpeed": _percent(_number(card.get("Fan speed (%)"))),
            "clockCore": _number(card.get("sclk clock speed:")), "clockMemory": _number(card.get("mclk clock speed:"))}
    return found


def parse_amd_smi(text):
    """Return {gpu number: fields} from `amd-smi metric --json`: a list of GPUs, or {"gpu_data": [...]} (ROCm 7)."""
    data = _json_in(text)
    if isinstance(data, dict):
        data = data.get("gpu_data")
    found = {}
    for gpu in data if isinstance(data, list) else ():
        if not isinstance(gpu, dict) or not isinstance(gpu.get("gpu"), int):
            continue

        def get(*path):
            value = gpu
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            return _number(value)
        total = get("mem_usage", "total_vram")
        found[gpu["gpu"]] = {
            "utilizationGpu": _percent(get("usage", "gfx_activity")), "memoryTotal": total or None,
            "memoryUsed": get("mem_usage", "used_vram") if total else None,
            "temperatureGpu": get("temperature", "edge") if get("temperature", "edge") is not None else get(
                "temperature", "hotspot"),
            "temperatureMemory": get("temperature", "mem"), "powerDraw": get("power", "socket_power"),
            "fanSpeed": _percent(get("fan", "usage")), "clockCore": get("clock", "gfx_0", "clk"),
            "clockMemory": get("clock", "mem_0", "clk")}
    return found


GAP_FIELDS = ("utilizationGpu", "memoryTotal", "temperatureGpu", "powerDraw", "fanSpeed", "clockCore")
AMD_TOOLS = (  # where installed, they may fill what sysfs left null; nothing depends on them
    ("amd-smi", ("metric", "--json"), parse_amd_smi),
    ("rocm-smi", ("--showuse", "--showmeminfo", "vram", "--showtemp", "--showpower", "--showfan", "--showclocks",
                  "--showbus", "--json"), parse_rocm_smi))
TOOL_TIMEOUT_S = 5.0
TOOL_REST_S = 600.0  # a tool that filled nothing, or failed, is left alone this long
TOOL_EVERY_S = 60.0  # a tool that fills gaps is asked at most this often


AMD_MEMORY = (("drm-memory-vram", "drm-total-vram", "vram mem"), ("drm-memory-gtt", "drm-total-gtt", "gtt mem"))


class AmdReader(DrmReader):
    """AMD GPUs through the amdgpu driver's sysfs and hwmon files and /proc fdinfo: no ROCm needed."""

    name = "amd"
    vendor = "AMD"
    drivers = {"amdgpu"}
    unnamed_driver = "amdgpu"

    def __init__(self, root=None, run=subprocess.run, which=shutil.which, clock=time.monotonic):
        super().__init__(root, "no AMD GPU with the amdgpu driver under /sys/class/drm")
        self.run, self.clock = run, clock
        self.driver = read_text(self.root.sys / "module" / "amdgpu" / "version") or _kernel_release(self.root)
        self.tools = [(path, args, parse) for name, args, parse in AMD_TOOLS if (path := which(name))]
        self.resting, self.given = {}, {}  # tool -> when it may be asked again, and what it gave last

    def sample(self):
        gpus = super().sample()
        self._fill_gaps(gpus)
        return gpus

    def _fill_gaps(self, gpus):
        """Fill what sysfs left null from amd-smi or rocm-smi, where one is installed and gives it.

        A tool that gives something is asked again a minute later at most (amd-smi costs a second
        of CPU), and what it gave stands in the meantime: at most TOOL_EVERY_S old. One that gives
        nothing, or fails, is left alone TOOL_REST_S. None is run while a card sleeps: the tools
        read every card, and would wake it.
        """
        if any(g.get("pstate") == "suspended" for g in gpus):
            return
        gaps = [g for g in gpus if any(g.get(k) is None for k in GAP_FIELDS)]
        now = self.clock()
        for path, args, parse in self.tools if gaps else ():
            if self.resting.get(path, 0) > now:
                found = self.given.get(path, {})
            else:
                try:
                    done = self.run([path, *args], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
                    found = parse(done.stdout)
                except (OSError, ValueError, subprocess.TimeoutExpired):
                    found = {}
                found = {gpu["index"]: found.get(self.cards[gpu["index"]][0] if parse is parse_rocm_smi else gpu["index"])
                         for gpu in gaps}  # rocm-smi names cards by PCI address, amd-smi numbers them in PCI order
                found = {index: values for index, values in found.items() if values}
                self.given[path] = found
                self.resting[path] = now + (TOOL_EVERY_S if found else TOOL_REST_S)
            filled = 0
            for gpu in gaps:
                for key, value in found.get(gpu["index"], {}).items():
                    if gpu.get(key) is None and value is not None:
                        gpu[key], filled = value, filled + 1
                if gpu.get("memoryFree") is None and gpu.get("memoryTotal") and gpu.get("memoryUsed") is not None:
                    gpu["memoryFree"] = gpu["memoryTotal"] - gpu["memoryUsed"]
            if filled or not any(g.get(k) is None for g in gaps for k in GAP_FIELDS):
                return

    def _name(self, device):
        if device not in self.names:
            ids = (read_int(device / "device") or _uevent_device_id(device), read_int(device / "revision"))
            name = read_text(device / "product_name")
            if not name:
                try:
                    known = parse_amdgpu_ids(self.root.path(AMDGPU_IDS).read_text(errors="replace"))
                except OSError:
                    known = {}
                name = known.get(ids)
                if not name and ids[1] is None:  # no revision: a device id with only one name still names it
                    names = {n for (device_id, _), n in known.items() if device_id == ids[0]}
                    name = names.pop() if len(names) == 1 else None
            if not name:
                name = f"AMD GPU 1002:{ids[0]:04x}" if ids[0] is not None else "AMD GPU"
            self.names[device] = name
        return self.names[device]

    def _gpu(self, index, address, card, driver, device, clients):
        gpu = {"index": index, "uuid": read_text(device / "unique_id"), "name": self._name(device),
               "vendor": self.vendor, "driverVersion": self.driver}
        hwmon = hwmon_dir(device)
        apu = hwmon is not None and (hwmon / "in1_input").exists()  # the northbridge voltage: APUs only
        vram = [read_int(device / f"mem_info_vram_{kind}") for kind in ("total", "used")]
        if apu:  # VRAM is a small carve-out; the GPU's memory is the system's, through GTT
            gtt = [read_int(device / f"mem_info_gtt_{kind}") for kind in ("total", "used")]
            vram = [a + b if a is not None and b is not None else None for a, b in zip(vram, gtt)]
        total, used = (_mib(n) if n is not None else None for n in vram)
        gpu.update(memoryTotal=total or None, memoryUsed=used if total else None,
                   memoryFree=total - used if total and used is not None else None)
        if apu:
            gpu["memoryShared"] = True
        gpu["processes"] = client_processes(self.root, clients, AMD_MEMORY[:2] if apu else AMD_MEMORY[:1])
        if read_text(device / "power" / "runtime_status") == "suspended":
            # Asleep (runtime power management): reading hwmon or the busy percent would wake it.
            gpu.update(utilizationGpu=0, pstate="suspended")
            return gpu
        temperatures = hwmon_temperatures(hwmon)
        power = read_int(hwmon / "power1_average") if hwmon else None
        if power is None and hwmon:
            power = read_int(hwmon / "power1_input")  # kernels from 6.6 and many cards have only this one
        gpu.update(
            utilizationGpu=_percent(read_int(device / "gpu_busy_percent")),
            utilizationMemory=_percent(read_int(device / "mem_busy_percent")),
            temperatureGpu=temperatures.get("edge", temperatures.get("junction", temperatures.get("temp1"))),
            temperatureMemory=temperatures.get("mem"),
            powerDraw=_scaled(power, 1e6, 1),
            powerLimit=_scaled(read_int(hwmon / "power1_cap") if hwmon else None, 1e6, 1) or None,
            fanSpeed=self._fan(hwmon),
            clockCore=self._clock(hwmon, "freq1_input", device / "pp_dpm_sclk"),
            clockMemory=self._clock(hwmon, "freq2_input", device / "pp_dpm_mclk"))
        if all(gpu[k] is None for k in ("utilizationGpu", "memoryTotal", "temperatureGpu", "powerDraw")):
            gpu["error"] = f"{card.name}: the amdgpu files could not be read (GPU in reset?)"
        return gpu

    @staticmethod
    def _fan(hwmon):
        if hwmon is None:
            return None
        for value, most in (("pwm1", "pwm1_max"), ("fan1_input", "fan1_max")):
            now, top = read_int(hwmon / value), read_int(hwmon / most)
            if value == "pwm1" and now is not None and top is None:
                top = 255  # pwm1 is 0-255 where pwm1_max is absent
            if now is not None and top:
                return _percent(round(100 * now / top))
        return None

    @staticmethod
    def _clock(hwmon, name, dpm):
        hz = read_int(hwmon / name) if hwmon else None
        return _scaled(hz, 1e6) if hz is not None else parse_dpm_clock(read_text(dpm))


# ---- Intel: the i915 and xe drivers' sysfs, hwmon and fdinfo ---------------------------------

PCI_IDS = ("/usr/share/hwdata/pci.ids", "/usr/share/misc/pci.ids")


def pci_name(root, vendor, device):
    """Return the device's name in the system's pci.ids ("DG2 [Arc A770]"), or None."""
    wanted_vendor, wanted_device = f"{vendor:04x}", f"\t{device:04x}  "
    for where in PCI_IDS:
        try:
            with open(root.path(where), encoding="utf-8", errors="replace") as ids:
                in_vendor = False
                for line in ids:
                    if not line.startswith("\t"):
                        in_vendor = line.startswith(wanted_vendor + "  ")
                    elif in_vendor and line.startswith(wanted_device):
                        return line[len(wanted_device):].strip()
        except OSError:
            continue
    return None


def engine_busy(previous, current, elapsed_ns):
    """Return the busiest engine's percent between two fdinfo readings of one GPU's clients, else None.

    i915 counts each engine's busy time in ns (drm-engine-render: 5234 ns), xe counts GPU
    cycles beside the GPU's total (drm-cycles-rcs / drm-total-cycles-rcs). A client that was
    first seen now is a baseline: /proc is searched for new clients every RESCAN_S, so its time
    so far need not be this interval's. Per engine, the clients' shares add up, divided by how many engines of that class there
    are (drm-engine-capacity-*). Only the clients this user can see count: run as root (the
    system service) to see everyone's.
    """
    busy = {}
    for client_id, fields in current.items():
        before = previous.get(client_id, {})
        for key, value in fields.items():
            if key.startswith("drm-engine-") and not key.startswith("drm-engine-capacity-"):
                engine = key[len("drm-engine-"):]
                if key not in before:
                    continue  # a client first seen now: /proc is searched every RESCAN_S, so its time is not this interval's
                now, then = parse_size(value.replace("ns", "").strip()), parse_size(
                    before[key].replace("ns", "").strip())
                if now is not None and then is not None and elapsed_ns > 0 and now >= then:
                    capacity = parse_size(fields.get(f"drm-engine-capacity-{engine}", "1")) or 1
                    busy[engine] = busy.get(engine, 0.0) + (now - then) / elapsed_ns / capacity
            elif key.startswith("drm-cycles-"):
                engine = key[len("drm-cycles-"):]
                total = fields.get(f"drm-total-cycles-{engine}")
                cycles, total = parse_size(value), parse_size(total)
                then_cycles = parse_size(before.get(key, "0"))
                then_total = parse_size(before.get(f"drm-total-cycles-{engine}", "0"))
                if None in (cycles, total, then_cycles, then_total) or total <= then_total or cycles < then_cycles:
                    continue
                capacity = parse_size(fields.get(f"drm-engine-capacity-{engine}", "1")) or 1
                if client_id not in previous:
                    continue  # xe's cycles have no common start to count a new client from
                busy[engine] = busy.get(engine, 0.0) + (cycles - then_cycles) / (total - then_total) / capacity
    if not busy:
        return None
    return min(100, round(100 * max(busy.values())))


INTEL_MEMORY = (("drm-resident-local0", "drm-resident-vram0", "drm-total-local0", "drm-total-vram0"),)


class IntelReader(DrmReader):
    """Intel GPUs through the i915 or xe driver: clocks from sysfs, power from the hwmon energy counter, busy from fdinfo."""

    name = "intel"
    vendor = "Intel"
    drivers = {"i915", "xe"}

    def __init__(self, root=None, clock=time.monotonic_ns):
        super().__init__(root, "no Intel GPU with the i915 or xe driver under /sys/class/drm")
        self.clock = clock
        self.driver = _kernel_release(self.root)
        self.last = {}  # PCI address -> (ns, energy µJ, {client id: fdinfo})

    def _name(self, device):
        if device not in self.names:
            ids = read_int(device / "device") or _uevent_device_id(device)
            name = pci_name(self.root, 0x8086, ids) if ids is not None else None
            self.names[device] = f"Intel {name}" if name else (f"Intel GPU 8086:{ids:04x}" if ids else "Intel GPU")
        return self.names[device]

    def _gpu(self, index, address, card, driver, device, clients):
        if read_text(device / "power" / "runtime_status") == "suspended":
            # Asleep: the energy counter, the clocks and the engines' counters would wake it.
            self.last.pop(address, None)
            return {"index": index, "uuid": None, "name": self._name(device), "vendor": self.vendor,
                    "driverVersion": self.driver, "utilizationGpu": 0, "pstate": "suspended",
                    "processes": client_processes(self.root, clients, INTEL_MEMORY)}
        now = self.clock()
        hwmon = hwmon_dir(device)
        energy = read_int(hwmon / "energy1_input") if hwmon else None
        by_client = {c.get("drm-client-id", c["pid"]): c for c in clients}
        then = self.last.get(address)
        self.last[address] = (now, energy, by_client)
        power = busy = None
        if then is not None:
            elapsed = now - then[0]
            power = energy_watts(then[1], energy, elapsed)
            busy = engine_busy(then[2], by_client, elapsed)
        if driver == "xe":
            freq = device / "tile0" / "gt0" / "freq0"
            core, top = read_int(freq / "act_freq"), read_int(freq / "max_freq")
        else:
            core, top = read_int(card / "gt_act_freq_mhz"), read_int(card / "gt_max_freq_mhz")
        temperatures = hwmon_temperatures(hwmon)
        gpu = {"index": index, "uuid": None, "name": self._name(device), "vendor": self.vendor,
               "driverVersion": self.driver, "utilizationGpu": busy,
               "memoryTotal": None, "memoryUsed": None, "memoryFree": None,
               "temperatureGpu": next((temperatures[k] for k in ("pkg", "gt", "temp1") if k in temperatures), None),
               "temperatureMemory": temperatures.get("vram"),
               "powerDraw": power, "powerLimit": self._limit(hwmon),
               "fanSpeed": None, "clockCore": core, "clockMemory": None,
               "processes": client_processes(self.root, clients, INTEL_MEMORY)}
        if top and core is not None and core > top:
            gpu["clockCore"] = None  # a reading past the GPU's own ceiling is not a clock
        return gpu

    @staticmethod
    def _limit(hwmon):
        """The sustained power limit: power1_max on i915, power1_cap on xe (µW)."""
        if hwmon is None:
            return None
        limit = read_int(hwmon / "power1_max")
        return _scaled(limit if limit is not None else read_int(hwmon / "power1_cap"), 1e6, 1) or None


def energy_watts(before_uj, after_uj, elapsed_ns):
    """Return watts from two readings of a µJ energy counter `elapsed_ns` apart; None when unknown.

    i915 and xe add the hardware's 32-bit counter up into 64 bits, so a step back is a reset (a
    driver reload, a card reset) far more often than a wrap, and which one cannot be told:
    that interval is null, never a guess, and the next one is measured again. A result no
    GPU draws (over 10 kW) is dropped.
    """
    if before_uj is None or after_uj is None or elapsed_ns <= 0:
        return None
    delta = after_uj - before_uj
    if delta < 0:
        return None  # a reset (the driver reloaded, the card reset) or a wrap: this one interval is unknown
    watts = delta / 1e6 / (elapsed_ns / 1e9)
    return round(watts, 1) if 0 <= watts < 10_000 else None


# ---- Jetson: its sysfs, or tegrastats ---------------------------------------------------------

TEGRASTATS_TIMEOUT_S = 1.0  # it prints a line every --interval until stopped: the first one is all a sample needs


# The rail that feeds a Jetson's GPU, most specific first: on Orin it is shared with the SoC
# (AGX: VDD_GPU_SOC) or the CPUs and CV engines (Nano, NX: VDD_CPU_GPU_CV), as jtop shows it.
GPU_RAILS = ("VDD_GPU", "VDD_SYS_GPU", "POM_5V_GPU", "GPU", "VDD_GPU_SOC", "VDD_CPU_GPU_CV")


def parse_tegrastats(line):
    """Return the GPU fields of one tegrastats line (TX1 to Orin), nulls for what it lacks.

    GR3D_FREQ is the GPU's busy percent and clock ("0%@318", Orin: "12%@[1300,1300]", older
    L4T: "GR3D 0%@998"); GPU@41.5C (Orin: gpu@47.625C) its temperature, -256C where the sensor
    is off; the GPU's rail in mW now (and averages) after its name; RAM is the memory the GPU
    shares with the CPUs.
    """
    def number(pattern, flags=0):
        match = re.search(pattern, line, flags)
        return float(match.group(1)) if match else None

    busy = number(r"\bGR3D(?:_FREQ)? (\d+)%")
    clock = number(r"\bGR3D(?:_FREQ)? \d+%@\[?(\d+)")
    temperature = number(r"\bGPU@(-?[\d.]+)C", re.IGNORECASE)
    power = next((p for p in (number(rf"(?:^|\s){rail} (\d+)(?:mW)?/") for rail in GPU_RAILS) if p is not None), None)
    ram = re.search(r"\bRAM (\d+)/(\d+)MB", line)
    return {"utilizationGpu": _percent(_scaled(busy, 1)), "clockCore": _scaled(clock, 1),
            "temperatureGpu": _scaled(temperature, 1, 1) if temperature is not None and temperature > -100 else None,
            "powerDraw": _scaled(power, 1000, 2),
            "memoryUsed": int(ram.group(1)) if ram else None, "memoryTotal": int(ram.group(2)) if ram else None}


class JetsonReader(Reader):
    """A Jetson's integrated GPU: load, devfreq clock, the gpu-thermal zone and INA3221 rails, else tegrastats."""

    name = "jetson"
    vendor = "NVIDIA"
    GPU_NODES = {"gpu", "gb10b", "ga10b", "gv11b", "gp10b", "gm20b"}  # Thor, Orin, Xavier, TX2, Nano and TX1

    def __init__(self, root=None, run=subprocess.run, which=shutil.which):
        self.root, self.run = root or SysRoot(), run
        self.devfreq = self._devfreq(self.root)
        self.tegrastats = None if self.devfreq else which("tegrastats")
        if not self.devfreq and not self.tegrastats:
            raise GpuReadError("no Jetson GPU: no GPU under /sys/class/devfreq and no tegrastats")
        model = self.root.proc / "device-tree" / "model"
        try:
            self.model = model.read_bytes().rstrip(b"\0").decode(errors="replace").strip() or None
        except OSError:
            self.model = None
        self.release = read_text(self.root.path("/etc/nv_tegra_release"))

    @classmethod
    def present(cls, root):
        return bool(cls._devfreq(root)) or root.path("/etc/nv_tegra_release").exists()

    @classmethod
    def _devfreq(cls, root):
        try:
            entries = sorted((root.sys / "class" / "devfreq").iterdir())
        except OSError:
            return None
        for entry in entries:  # 17000000.ga10b, 57000000.gpu: the device tree names the GPU's node
            node = read_text(entry / "device" / "of_node" / "name") or entry.name.rsplit(".", 1)[-1]
            if node in cls.GPU_NODES and (entry / "device" / "load").exists():
                return entry
        return None

    def describe(self, index):
        return f"{self.name}: {self.devfreq or self.tegrastats}"

    def sample(self):
        gpu = {"index": 0, "uuid": None, "name": f"{self.model} GPU" if self.model else "NVIDIA Jetson GPU",
               "vendor": self.vendor, "driverVersion": _l4t_version(self.release), "memoryShared": True,
               "utilizationMemory": None, "temperatureMemory": None, "powerLimit": None, "fanSpeed": None,
               "clockMemory": None, "pstate": None, "processes": []}
        if self.devfreq is None:
            gpu.update(parse_tegrastats(self._tegrastats_line()))
        else:
            load = read_int(self.devfreq / "device" / "load")
            total, available = _meminfo(self.root)
            gpu.update(utilizationGpu=_percent(_scaled(load, 10)) if load is not None else None,
                       clockCore=_scaled(read_int(self.devfreq / "cur_freq"), 1e6),
                       temperatureGpu=self._temperature(), powerDraw=self._power(),
                       memoryTotal=total, memoryUsed=total - available if total and available is not None else None)
        if gpu.get("memoryTotal") and gpu.get("memoryUsed") is not None:
            gpu["memoryFree"] = gpu["memoryTotal"] - gpu["memoryUsed"]
        return [gpu]

    def _tegrastats_line(self):
        try:
            done = self.run([self.tegrastats, "--interval", "100"], capture_output=True, text=True,
                            timeout=TEGRASTATS_TIMEOUT_S)
            output = done.stdout
        except subprocess.TimeoutExpired as expired:  # it prints a line every interval until stopped
            output = expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes) else expired.stdout or ""
        except OSError as error:
            raise GpuReadError(f"tegrastats could not run: {error}") from None
        lines = [line for line in (output or "").splitlines() if "RAM" in line]
        if not lines:
            raise GpuReadError("tegrastats printed nothing")
        return lines[0]

    def _temperature(self):
        for zone in sorted((self.root.sys / "class" / "thermal").glob("thermal_zone*")):
            if (read_text(zone / "type") or "").lower() in ("gpu-thermal", "gpu-therm"):
                value = read_int(zone / "temp")
                return _scaled(value, 1000, 1) if value is not None and value > -100_000 else None
        return None

    def _power(self):
        """Return the GPU rail's watts from the INA3221 monitor (hwmon from JetPack 5, iio before), else None."""
        found = {}
        for label in self.root.sys.glob("bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in*_label"):
            channel = label.name[2:-len("_label")]
            millivolts, milliamps = (read_int(label.with_name(f"{kind}{channel}_input")) for kind in ("in", "curr"))
            if millivolts is not None and milliamps is not None:
                found.setdefault(read_text(label), millivolts * milliamps / 1000)
        for rail in self.root.sys.glob("bus/i2c/drivers/ina3221x/*/iio:device*/rail_name_*"):
            milliwatts = read_int(rail.with_name(f"in_power{rail.name.rsplit('_', 1)[1]}_input"))
            if milliwatts is not None:
                found.setdefault(read_text(rail), milliwatts)
        milliwatts = next((found[rail] for rail in GPU_RAILS if rail in found), None)
        return _scaled(milliwatts, 1000, 2)


def _l4t_version(release):
    """'# R35 (release), REVISION: 4.1, ...' -> 'L4T 35.4.1'."""
    match = re.search(r"R(\d+) \(release\), REVISION: ([\d.]+)", release or "")
    return f"L4T {match.group(1)}.{match.group(2)}" if match else None


def _meminfo(root):
    """Return (total, available) MiB of /proc/meminfo, each None where missing."""
    fields = parse_fdinfo(read_text(root.proc / "meminfo") or "")
    return tuple(_mib(parse_size(fields[key])) if parse_size(fields.get(key)) is not None else None
                 for key in ("MemTotal", "MemAvailable"))


# ---- Apple: ioreg's IOAccelerator entries ----------------------------------------------------

IOREG_TIMEOUT_S = 5.0
IOREG_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*=\s*(-?\d+|"(?:[^"\\]|\\.)*"|Yes|No)')


def parse_ioreg(text):
    """Return [{"class": ..., property: value}] of `ioreg -r -d 1 -w 0 -c IOAccelerator`'s entries.

    Each entry starts with "+-o Name  <class X, ...>" and its properties are "key" = value
    lines; a dictionary value ({"k"=1,"k2"=2}: PerformanceStatistics) is read into its own
    dict. Only numbers, strings and Yes/No are kept: data and arrays are not needed here.
    """
    entries = []
    for line in text.splitlines():
        head = re.search(r"\+-o (\S+)\s+<class ([^,>]+)", line)
        if head:
            entries.append({"class": head.group(2), "entry": head.group(1)})
            continue
        match = re.match(r'\s*\|?\s*"((?:[^"\\]|\\.)*)" = (.*)$', line)
        if not match or not entries:
            continue
        key, value = match.groups()
        if value.startswith("{"):
            entries[-1][key] = {k: _ioreg_value(v) for k, v in IOREG_VALUE.findall(value)}
        else:
            entries[-1][key] = _ioreg_value(value.strip())
    return entries


def _ioreg_value(text):
    if text.startswith('"'):
        return text[1:-1]
    if text in ("Yes", "No"):
        return text == "Yes"
    try:
        return int(text)
    except ValueError:
        return None


def apple_gpus(text, memory_total_mib, chip=None):
    """Return the GPUs of one ioreg capture: Apple Silicon's (and an Intel Mac's AMD or Intel GPU).

    `chip` ("Apple M1 Pro", sysctl's machdep.cpu.brand_string) names an Apple GPU whose entry
    has no "model" property.
    """
    gpus = []
    for entry in parse_ioreg(text):
        stats = entry.get("PerformanceStatistics")
        if not isinstance(stats, dict):
            continue
        busy = stats.get("Device Utilization %")
        if busy is None and ("Renderer Utilization %" in stats or "Tiler Utilization %" in stats):
            busy = max(stats.get("Renderer Utilization %") or 0, stats.get("Tiler Utilization %") or 0)
        model = entry.get("model") if isinstance(entry.get("model"), str) else None
        cores = entry.get("gpu-core-count")
        apple = entry["class"].startswith("AGX")
        vendor = "Apple" if apple else "AMD" if entry["class"].startswith(("AMD", "ATI")) else (
            "Intel" if entry["class"].startswith("Intel") else None)
        name = model or (chip if apple and chip else entry["entry"])
        if isinstance(cores, int) and cores > 0:
            name = f"{name} ({cores}-core GPU)"
        gpu = {"index": len(gpus), "uuid": None, "name": name, "vendor": vendor, "driverVersion": None,
               "utilizationGpu": _percent(busy), "utilizationMemory": None,
               "temperatureGpu": None, "temperatureMemory": None, "powerDraw": None, "powerLimit": None,
               "fanSpeed": None, "clockCore": None, "clockMemory": None, "pstate": None, "processes": []}
        used = stats.get("In use system memory")
        if apple:  # unified memory: the GPU uses the machine's RAM
            gpu.update(memoryShared=True, memoryTotal=memory_total_mib,
                       memoryUsed=_mib(used) if isinstance(used, int) else None)
        else:
            vram_used, vram_free = stats.get("vramUsedBytes"), stats.get("vramFreeBytes")
            total = _mib(vram_used + vram_free) if isinstance(vram_used, int) and isinstance(vram_free, int) else None
            gpu.update(memoryTotal=total or None, memoryUsed=_mib(vram_used) if total else None,
                       temperatureGpu=stats.get("Temperature(C)"), fanSpeed=_percent(stats.get("Fan Speed(%)")),
                       clockCore=stats.get("Core Clock(MHz)"), clockMemory=stats.get("Memory Clock(MHz)"),
                       powerDraw=stats.get("Total Power(W)"))
        if gpu["memoryTotal"] and gpu["memoryUsed"] is not None:
            gpu["memoryFree"] = max(0, gpu["memoryTotal"] - gpu["memoryUsed"])
        gpus.append(gpu)
    return gpus


def parse_powermetrics(text):
    """Return the GPU's clock (MHz) and power (W) from `powermetrics --samplers gpu_power` text, nulls if absent."""
    clock = re.search(r"GPU (?:HW )?active frequency:\s*([\d.]+)\s*MHz", text)
    power = re.search(r"GPU Power:\s*([\d.]+)\s*mW", text)
    return {"clockCore": _scaled(float(clock.group(1)), 1) if clock else None,
            "powerDraw": _scaled(float(power.group(1)), 1000, 2) if power else None}


class AppleReader(Reader):
    """A Mac's GPUs through ioreg (no sudo); clock and power only where powermetrics can run (as root)."""

    name = "apple"
    vendor = "Apple"

    def __init__(self, run=subprocess.run, memory_total_mib=None, is_root=None):
        self.run = run
        self.memory = memory_total_mib if memory_total_mib is not None else _physical_memory_mib()
        self.root = (os.geteuid() == 0) if is_root is None and hasattr(os, "geteuid") else bool(is_root)
        self._ioreg()  # says now, at start, when ioreg cannot run
        try:
            done = run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                       timeout=IOREG_TIMEOUT_S)
            self.chip = done.stdout.strip() if done.returncode == 0 and done.stdout.startswith("Apple") else None
        except (OSError, subprocess.TimeoutExpired):
            self.chip = None

    def _ioreg(self):
        try:
            done = self.run(["ioreg", "-r", "-d", "1", "-w", "0", "-c", "IOAccelerator"], capture_output=True,
                            text=True, timeout=IOREG_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise GpuReadError(f"ioreg could not run: {error}") from None
        if done.returncode != 0:
            raise GpuReadError(f"ioreg failed (exit {done.returncode})")
        return done.stdout

    def sample(self):
        gpus = apple_gpus(self._ioreg(), self.memory, self.chip)
        if not gpus:
            raise GpuReadError("ioreg lists no GPU with performance statistics")
        if self.root:
            try:
                done = self.run(["powermetrics", "--samplers", "gpu_power", "-i", "200", "-n", "1"],
                                capture_output=True, text=True, timeout=IOREG_TIMEOUT_S)
                extra = parse_powermetrics(done.stdout)
                for gpu in gpus:
                    if gpu["vendor"] == "Apple":
                        gpu.update((k, v) for k, v in extra.items() if v is not None)
            except (OSError, subprocess.TimeoutExpired):
                pass
        return gpus


def _physical_memory_mib():
    try:
        return _mib(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# ---- Windows, any vendor: the GPU performance counters Task Manager shows ------------------------

ENGINE_INSTANCE = re.compile(r"pid_(\d+)_luid_(0x[0-9a-f]+_0x[0-9a-f]+)_phys_(\d+)_eng_(\d+)_engtype_(.*)$", re.I)
ADAPTER_INSTANCE = re.compile(r"luid_(0x[0-9a-f]+_0x[0-9a-f]+)_phys_(\d+)$", re.I)
PROCESS_INSTANCE = re.compile(r"pid_(\d+)_luid_(0x[0-9a-f]+_0x[0-9a-f]+)_phys_(\d+)$", re.I)
PCI_VENDORS = {0x10DE: "NVIDIA", 0x1002: "AMD", 0x1022: "AMD", 0x8086: "Intel", 0x5143: "Qualcomm",
               0x106B: "Apple", 0x1414: "Microsoft"}
MICROSOFT_BASIC_RENDER = (0x1414, 0x8C)


def windows_gpus(engines, dedicated, shared, process_memory, adapters, skip_nvidia=False, process=None):
    """Return the GPUs from one read of the counters, as Task Manager shows them.

    `engines`, `dedicated`, `shared` and `process_memory` are [(instance, value)] of
    \\GPU Engine(*)\\Utilization Percentage, \\GPU Adapter Memory(*)\\Dedicated Usage and
    Shared Usage, and \\GPU Process Memory(*)\\Dedicated Usage. An engine's use is the sum over
    the processes on it, at most 100; an adapter's is its busiest engine's. `adapters` are
    {luid: {"name", "vendorId", "deviceId", "dedicated" (bytes), "shared" (bytes), "software"}},
    keyed "0x00000000_0x0000d1a3" as the instance names spell them.
    """
    engine_use, pids = {}, {}
    for instance, value in engines:
        match = ENGINE_INSTANCE.search(instance)
        if match and value is not None and math.isfinite(value):
            pid, luid, phys, engine, _ = match.groups()
            key = (luid.lower(), phys, engine)
            engine_use[key] = engine_use.get(key, 0.0) + max(0.0, value)
            if value > 0:  # every process with a window has an engine instance; list those using it
                pids.setdefault(luid.lower(), set()).add(int(pid))
    used = _by_adapter(dedicated)
    shared_used = _by_adapter(shared)
    per_process = {}
    for instance, value in process_memory:
        match = PROCESS_INSTANCE.search(instance)
        if match and value and math.isfinite(value) and value > 0:
            per_process.setdefault(match.group(2).lower(), {})[int(match.group(1))] = value
    gpus = []
    order = sorted(adapters, key=lambda luid: (adapters[luid].get("vendorId") or 0, adapters[luid].get("deviceId") or 0,
                                               adapters[luid].get("name") or "", luid))
    for luid in order:  # a stable index: LUIDs are handed out in start order, and change when a driver restarts
        adapter = adapters[luid]
        ids = (adapter.get("vendorId"), adapter.get("deviceId"))
        if adapter.get("software") or ids == MICROSOFT_BASIC_RENDER:
            continue
        vendor = PCI_VENDORS.get(ids[0])
        if skip_nvidia and vendor == "NVIDIA":
            continue  # NVML read it, with power, fans and clocks
        busy = [min(100.0, v) for (l, _, _), v in engine_use.items() if l == luid]
        total, dedicated_used = adapter.get("dedicated"), used.get(luid)
        integrated = not total or total <= 512 << 20  # a carve-out: the GPU lives on shared memory
        gpu = {"index": len(gpus), "uuid": None, "name": adapter.get("name"), "vendor": vendor,
               "driverVersion": adapter.get("driver"), "utilizationGpu": round(max(busy)) if busy else None,
               "utilizationMemory": None, "temperatureGpu": None, "temperatureMemory": None, "powerDraw": None,
               "powerLimit": None, "fanSpeed": None, "clockCore": None, "clockMemory": None, "pstate": None}
        if integrated:
            total = (total or 0) + (adapter.get("shared") or 0)
            dedicated_used = None if dedicated_used is None and shared_used.get(luid) is None else (
                (dedicated_used or 0) + (shared_used.get(luid) or 0))
            gpu["memoryShared"] = True
        gpu["memoryTotal"] = _mib(total) if total else None
        gpu["memoryUsed"] = _mib(dedicated_used) if dedicated_used is not None and total else None
        gpu["memoryFree"] = max(0, gpu["memoryTotal"] - gpu["memoryUsed"]) if gpu["memoryUsed"] is not None else None
        memory = per_process.get(luid, {})
        gpu["processes"] = _windows_processes(pids.get(luid, set()) | set(memory), memory, process)
        gpus.append(gpu)
    return gpus


def _by_adapter(items):
    """Sum [(luid_..._phys_N, bytes)] per adapter LUID."""
    found = {}
    for instance, value in items:
        match = ADAPTER_INSTANCE.search(instance)
        if match and value is not None and math.isfinite(value):
            found[match.group(1).lower()] = found.get(match.group(1).lower(), 0) + value
    return found


def _windows_processes(pids, memory, process):
    processes = []
    for pid in sorted(pids, key=lambda p: -memory.get(p, 0))[:64]:
        if pid == 0:
            continue
        processes.append(process_entry(pid, None, _mib(memory[pid]) if pid in memory else None, process))
    return processes


class PdhCounters:
    """The GPU counters through pdh.dll (ctypes), one query kept open: each read is the rate since the last.

    English counter names (PdhAddEnglishCounterW), so a German or Japanese Windows reads the
    same counters.
    """

    PATHS = {"engines": r"\GPU Engine(*)\Utilization Percentage",
             "dedicated": r"\GPU Adapter Memory(*)\Dedicated Usage",
             "shared": r"\GPU Adapter Memory(*)\Shared Usage",
             "process_memory": r"\GPU Process Memory(*)\Dedicated Usage"}
    PDH_FMT_DOUBLE, PDH_FMT_NOCAP100, PDH_MORE_DATA = 0x00000200, 0x00008000, 0x800007D2

    def __init__(self):
        import ctypes
        from ctypes import wintypes

        class Value(ctypes.Structure):
            _fields_ = [("CStatus", wintypes.DWORD), ("doubleValue", ctypes.c_double)]  # the union's double

        class Item(ctypes.Structure):
            _fields_ = [("szName", wintypes.LPWSTR), ("FmtValue", Value)]

        self.ctypes, self.wintypes, self.Item = ctypes, wintypes, Item
        self.pdh = ctypes.WinDLL("pdh")
        self.query = wintypes.HANDLE()
        status = self.pdh.PdhOpenQueryW(None, None, ctypes.byref(self.query))
        if status:
            raise GpuReadError(f"PDH could not open a query (0x{status & 0xFFFFFFFF:08X})")
        self.counters = {}
        for name, path in self.PATHS.items():
            counter = wintypes.HANDLE()
            if self.pdh.PdhAddEnglishCounterW(self.query, path, None, ctypes.byref(counter)) == 0:
                self.counters[name] = counter
        if "engines" not in self.counters:
            self.close()
            raise GpuReadError("this Windows has no GPU performance counters (Windows 10 1709 or later has them)")
        self.pdh.PdhCollectQueryData(self.query)  # rates need two collections: this is the first

    def close(self):
        self.pdh.PdhCloseQuery(self.query)

    def read(self):
        self.pdh.PdhCollectQueryData(self.query)
        return {name: self._items(counter) for name, counter in self.counters.items()}

    def _items(self, counter):
        ctypes, wintypes = self.ctypes, self.wintypes
        fmt = self.PDH_FMT_DOUBLE | self.PDH_FMT_NOCAP100
        for _ in range(3):  # a process that starts between asking the size and reading grows the array
            size, count = wintypes.DWORD(0), wintypes.DWORD(0)
            status = self.pdh.PdhGetFormattedCounterArrayW(counter, fmt, ctypes.byref(size), ctypes.byref(count), None)
            if status & 0xFFFFFFFF != self.PDH_MORE_DATA:
                return []
            buffer = (ctypes.c_byte * size.value)()
            status = self.pdh.PdhGetFormattedCounterArrayW(counter, fmt, ctypes.byref(size), ctypes.byref(count), buffer)
            if status & 0xFFFFFFFF != self.PDH_MORE_DATA:
                break
        if status:
            return []
        items = ctypes.cast(buffer, ctypes.POINTER(self.Item))
        return [(items[i].szName, items[i].FmtValue.doubleValue) for i in range(count.value)
                if items[i].FmtValue.CStatus in (0, 1)]  # PDH_CSTATUS_VALID_DATA, PDH_CSTATUS_NEW_DATA


def dxgi_adapters():
    """Return {luid: adapter} through DXGI (ctypes COM): names and dedicated memory past 4 GiB.

    Win32_VideoController.AdapterRAM is a 32-bit field and stops at 4 GiB; DXGI_ADAPTER_DESC1's
    sizes are SIZE_T. The LUID is the one the counters' instance names carry.
    """
    import ctypes
    import uuid
    from ctypes import wintypes

    class Luid(ctypes.Structure):
        _fields_ = [("LowPart", wintypes.DWORD), ("HighPart", wintypes.LONG)]

    class Desc1(ctypes.Structure):
        _fields_ = [("Description", wintypes.WCHAR * 128), ("VendorId", wintypes.UINT), ("DeviceId", wintypes.UINT),
                    ("SubSysId", wintypes.UINT), ("Revision", wintypes.UINT),
                    ("DedicatedVideoMemory", ctypes.c_size_t), ("DedicatedSystemMemory", ctypes.c_size_t),
                    ("SharedSystemMemory", ctypes.c_size_t), ("AdapterLuid", Luid), ("Flags", wintypes.UINT)]

    def method(obj, index, *argtypes):  # a COM call: the index'th entry of the object's vtable
        table = ctypes.cast(obj, ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)))[0]
        return ctypes.WINFUNCTYPE(ctypes.c_long, ctypes.c_void_p, *argtypes)(table[index])

    iid = (ctypes.c_byte * 16).from_buffer_copy(uuid.UUID("770aae78-f26f-4dba-a829-253c83d1b387").bytes_le)
    factory = ctypes.c_void_p()
    if ctypes.WinDLL("dxgi").CreateDXGIFactory1(ctypes.byref(iid), ctypes.byref(factory)) < 0:
        raise GpuReadError("DXGI could not start (CreateDXGIFactory1 failed)")
    adapters = {}
    try:
        for index in itertools.count():
            adapter = ctypes.c_void_p()
            # IDXGIFactory1::EnumAdapters1 is vtable entry 12; DXGI_ERROR_NOT_FOUND ends the list.
            if method(factory, 12, wintypes.UINT, ctypes.POINTER(ctypes.c_void_p))(factory, index, ctypes.byref(adapter)) < 0:
                break
            desc = Desc1()
            method(adapter, 10, ctypes.POINTER(Desc1))(adapter, ctypes.byref(desc))  # IDXGIAdapter1::GetDesc1
            method(adapter, 2)(adapter)  # Release
            luid = f"0x{desc.AdapterLuid.HighPart & 0xFFFFFFFF:08x}_0x{desc.AdapterLuid.LowPart:08x}"
            adapters[luid] = {"name": desc.Description, "vendorId": desc.VendorId, "deviceId": desc.DeviceId,
                              "dedicated": desc.DedicatedVideoMemory, "shared": desc.SharedSystemMemory,
                              "software": bool(desc.Flags & 2)}  # DXGI_ADAPTER_FLAG_SOFTWARE
    finally:
        method(factory, 2)(factory)
    return adapters


class WindowsProcesses:
    """What Windows says of a process through a handle any user may open: image name, account, command line, start.

    Each process is looked up once, known by its pid and creation time: Windows hands a pid out
    again soon after its process ends, and the process that gets it is a new job. Accounts are
    remembered by SID: LookupAccountSidW may ask a domain controller.
    """

    COMMAND_LINE = 60  # ProcessCommandLineInformation (Windows 8.1 and later): no PROCESS_VM_READ needed
    EPOCH = 11_644_473_600  # seconds from 1601, where FILETIME starts, to 1970

    def __init__(self, full_commands=False):
        self.full_commands = full_commands
        self.known, self.accounts = {}, {}
        self.api = None

    def _load(self):
        import ctypes
        from ctypes import wintypes
        kernel32, advapi32 = ctypes.WinDLL("kernel32", use_last_error=True), ctypes.WinDLL("advapi32")
        ntdll, shell32 = ctypes.WinDLL("ntdll"), ctypes.WinDLL("shell32")
        kernel32.OpenProcess.restype = wintypes.HANDLE
        kernel32.OpenProcess.argtypes = [wintypes.DWORD, wintypes.BOOL, wintypes.DWORD]
        kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
        kernel32.QueryFullProcessImageNameW.argtypes = [wintypes.HANDLE, wintypes.DWORD, wintypes.LPWSTR,
                                                        ctypes.POINTER(wintypes.DWORD)]
        kernel32.GetProcessTimes.argtypes = [wintypes.HANDLE] + [ctypes.POINTER(wintypes.FILETIME)] * 4
        kernel32.LocalFree.argtypes = [ctypes.c_void_p]
        ntdll.NtQueryInformationProcess.restype = ctypes.c_long  # an NTSTATUS: 0 is success
        ntdll.NtQueryInformationProcess.argtypes = [wintypes.HANDLE, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong,
                                                    ctypes.POINTER(ctypes.c_ulong)]
        shell32.CommandLineToArgvW.restype = ctypes.POINTER(wintypes.LPWSTR)
        shell32.CommandLineToArgvW.argtypes = [wintypes.LPCWSTR, ctypes.POINTER(ctypes.c_int)]
        advapi32.OpenProcessToken.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
        advapi32.GetLengthSid.argtypes = [ctypes.c_void_p]
        return ctypes, wintypes, kernel32, advapi32, ntdll, shell32

    def __call__(self, pid):
        """Return {"name", "user", "command", "startedAt"} of a process, each where Windows tells it; {} if it refuses."""
        self.api = self.api or self._load()
        kernel32 = self.api[2]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return {}
        try:
            started = self._started(handle)
            if (pid, started) in self.known:
                return self.known[pid, started]
            name, argv = self._image_name(handle), self._argv(handle)
            found = {"name": name, "user": self._user(handle), "startedAt": started,
                     "command": (command_line(argv, self.full_commands) or name) if argv is not None else None}
            if started is not None:  # without its start a pid cannot be told from the next process to get it
                if len(self.known) > 4096:
                    self.known.clear()
                self.known[pid, started] = found
            return found
        finally:
            kernel32.CloseHandle(handle)

    def _image_name(self, handle):
        ctypes, wintypes, kernel32 = self.api[:3]
        path, size = ctypes.create_unicode_buffer(1024), wintypes.DWORD(1024)
        found = kernel32.QueryFullProcessImageNameW(handle, 0, path, ctypes.byref(size))
        return _basename(path.value) if found else None

    def _started(self, handle):
        ctypes, wintypes, kernel32 = self.api[:3]
        times = [wintypes.FILETIME() for _ in range(4)]  # creation, exit, kernel, user
        if not kernel32.GetProcessTimes(handle, *map(ctypes.byref, times)):
            return None
        ticks = times[0].dwHighDateTime << 32 | times[0].dwLowDateTime  # 100 ns since 1601
        return round(ticks / 10_000_000 - self.EPOCH, 2) if ticks else None

    def _argv(self, handle):
        """Return the process's arguments as Windows splits them (CommandLineToArgvW); None where it will not say."""
        ctypes, wintypes, kernel32, _, ntdll, shell32 = self.api

        class UnicodeString(ctypes.Structure):
            _fields_ = [("Length", wintypes.USHORT), ("MaximumLength", wintypes.USHORT), ("Buffer", ctypes.c_void_p)]
        size = ctypes.c_ulong(0)
        ntdll.NtQueryInformationProcess(handle, self.COMMAND_LINE, None, 0, ctypes.byref(size))  # asks the size
        if size.value < ctypes.sizeof(UnicodeString):
            return None
        buffer = ctypes.create_string_buffer(size.value)
        if ntdll.NtQueryInformationProcess(handle, self.COMMAND_LINE, buffer, size.value, ctypes.byref(size)) != 0:
            return None
        text = UnicodeString.from_buffer(buffer)
        line = ctypes.wstring_at(text.Buffer, text.Length // 2) if text.Buffer else ""
        if not line.strip():
            return []  # CommandLineToArgvW("") would answer with this agent's own path
        count = ctypes.c_int(0)
        words = shell32.CommandLineToArgvW(line, ctypes.byref(count))
        if not words:
            return None
        try:
            return [words[i] for i in range(count.value)]
        finally:
            kernel32.LocalFree(ctypes.cast(words, ctypes.c_void_p))

    def _user(self, handle):
        """Return DOMAIN\\user of the process's token; None where Windows refuses."""
        ctypes, wintypes, kernel32, advapi32 = self.api[:4]
        token = wintypes.HANDLE()
        if not advapi32.OpenProcessToken(handle, 0x0008, ctypes.byref(token)):  # TOKEN_QUERY
            return None
        try:
            needed = wintypes.DWORD(0)
            advapi32.GetTokenInformation(token, 1, None, 0, ctypes.byref(needed))  # TokenUser
            info = (ctypes.c_byte * needed.value)()
            if not advapi32.GetTokenInformation(token, 1, info, needed, ctypes.byref(needed)):
                return None
            sid = ctypes.cast(info, ctypes.POINTER(ctypes.c_void_p))[0]  # TOKEN_USER.User.Sid
            key = ctypes.string_at(sid, advapi32.GetLengthSid(sid))
            if key not in self.accounts:
                account, domain = ctypes.create_unicode_buffer(256), ctypes.create_unicode_buffer(256)
                sizes, use = (wintypes.DWORD(256), wintypes.DWORD(256)), wintypes.DWORD()
                self.accounts[key] = None
                if advapi32.LookupAccountSidW(None, ctypes.c_void_p(sid), account, ctypes.byref(sizes[0]),
                                              domain, ctypes.byref(sizes[1]), ctypes.byref(use)):
                    self.accounts[key] = f"{domain.value}\\{account.value}" if domain.value else account.value
            return self.accounts[key]
        finally:
            kernel32.CloseHandle(token)


class WindowsReader(Reader):
    """Any vendor's GPUs on Windows through the counters Task Manager reads; NVIDIA's left to NVML when it runs."""

    name = "windows"
    vendor = None

    def __init__(self, edge=None, skip_nvidia=False):
        """`edge` is (counters with .read(), adapters(), process(pid)); by default PDH, DXGI and WindowsProcesses."""
        counters, self.adapters_of, self.process = edge or (None, dxgi_adapters, WindowsProcesses())
        self.skip_nvidia = skip_nvidia
        try:
            self.adapters = self.adapters_of()  # first: a PC with no GPU to read opens no query at all
            if not any(not a.get("software") and (a.get("vendorId"), a.get("deviceId")) != MICROSOFT_BASIC_RENDER
                       and not (skip_nvidia and a.get("vendorId") == 0x10DE) for a in self.adapters.values()):
                raise GpuReadError("no GPU besides " + ("NVIDIA's and " if skip_nvidia else "")
                                   + "the Microsoft Basic Render Driver")
            self.counters = counters or PdhCounters()
        except (OSError, AttributeError) as error:  # no pdh.dll or dxgi.dll: not Windows, or a Server Core without them
            raise GpuReadError(f"the Windows GPU counters cannot be read: {error}") from None

    def describe(self, index):
        return f"{self.name}: GPU performance counters (PDH) and DXGI"

    def sample(self):
        read = self.counters.read()
        seen = {m.group(2).lower() for i, _ in read.get("engines", []) if (m := ENGINE_INSTANCE.search(i))}
        if seen - set(self.adapters):  # an adapter restarted (a driver update) and came back with a new LUID
            self.adapters = self.adapters_of()
        return windows_gpus(read.get("engines", []), read.get("dedicated", []), read.get("shared", []),
                            read.get("process_memory", []), self.adapters, self.skip_nvidia, self.process)


# ---- the host: the PC around the GPUs, through psutil (issue 34) ------------------------------
# psutil reads Linux, Windows and macOS alike, so the agent keeps no parser per OS for them. On
# Linux psutil reads its PROCFS_PATH, DIR/proc under --sys-root; what it would read from the agent's
# own namespaces is read here from the host's instead: in a container the mounts and the network
# are the container's own, and the host's are those its PID 1 sees (DIR/proc/1). psutil reads
# /sys at its fixed place, so hwmon is read here too, under DIR/sys.

SYSTEM_FIELDS = ("os", "cpuModel", "cpuCount", "cpuPercent", "load1", "memoryTotal", "memoryUsed", "swapUsed",
                 "disks", "netRx", "netTx", "temperatureCpu", "uptimeS")
MAX_DISKS = 16  # the most the server keeps
READ_ONLY_IMAGES = frozenset({"squashfs", "iso9660", "udf", "erofs", "cramfs"})  # a snap, a CD: always 100 % full
OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")  # /proc/<pid>/mounts writes a space in a path as \040
# Interfaces whose bytes a real one carries too (loopback, bridges, veths, tunnels, VPNs), known by
# name where there is no /sys/class/net to ask: macOS (lo0, utun3, awdl0, bridge0), Windows
# ("Loopback Pseudo-Interface 1", "vEthernet (WSL)"), or a name sysfs does not list.
VIRTUAL_NIC = re.compile(r"lo\d*$|loopback|veth|docker|br|virbr|cni|flannel|cali|cilium|lxc|vxlan|genev|tun|tap|"
                         r"ifb|wg|tailscale|zt|utun|awdl|llw|gif|stf|anpi|ap\d|vethernet|isatap|teredo", re.I)
CPU_THERMAL = re.compile(r"cpu\d*_thermal|soc_thermal")  # an ARM board's CPU thermal zone, as its hwmon chip is named
SYSCTL_TIMEOUT_S = 5.0


def parse_os_release(text):
    """Return os-release's PRETTY_NAME, else its NAME and VERSION, unquoted; None without them."""
    fields = {}
    for line in (text or "").splitlines():
        name, equals, value = line.partition("=")
        try:
            fields[name.strip()] = " ".join(shlex.split(value)) if equals else None
        except ValueError:  # an unclosed quote: that line says nothing
            continue
    return fields.get("PRETTY_NAME") or " ".join(filter(None, (fields.get("NAME"), fields.get("VERSION")))) or None


def parse_cpu_model(cpuinfo):
    """Return the CPU's name in /proc/cpuinfo: its model name (x86), else an ARM board's Hardware or Model line."""
    fields = {}
    for line in (cpuinfo or "").splitlines():
        name, colon, value = line.partition(":")
        if colon:
            fields.setdefault(name.strip(), " ".join(value.split()))  # "Intel(R) Xeon(R) CPU    E5-2670": one space
    return next((fields[name] for name in ("model name", "Hardware", "Model") if fields.get(name)), None)


def windows_name(release, version):
    """Return 'Windows 11 (10.0.22631)' from platform.win32_ver(): Windows 11 calls itself 10, from build 22000 on."""
    build = version.rsplit(".", 1)[-1]
    if release == "10" and build.isdigit() and int(build) >= 22000:
        release = "11"
    return f"Windows {release} ({version})" if version else f"Windows {release}"


def parse_mounts(text):
    """Return (device, mount point, type, options) for each line of a /proc/<pid>/mounts, its \\040 escapes undone."""
    lines = map(str.split, (text or "").splitlines())
    return [tuple(map(_unescape, fields[:4])) for fields in lines if len(fields) >= 4]


def _unescape(field):
    return OCTAL_ESCAPE.sub(lambda octal: chr(int(octal.group(1), 8)), field)


def block_filesystems(text):
    """Return the types of /proc/filesystems that live on a device (no "nodev"), as df -l counts disks; zfs too."""
    return {"zfs"} | {fields[0] for fields in map(str.split, (text or "").splitlines()) if len(fields) == 1}


def real_disks(partitions, kinds=None):
    """Return the mount points of real disks in the table's order, one per device (a bind mount, a btrfs subvolume).

    Left out: a type not in `kinds` (tmpfs, proc, overlay, NFS: no disk of this PC), a read-only
    image (a snap's squashfs, a CD), a loop device (snaps, an image file on another disk), a CD
    drive (Windows), macOS's system volumes beside / and its Data volume, and a path longer
    than the server keeps (128 characters: a container's volume, not a disk a person names).
    """
    mounts, devices = [], set()
    for device, mount, kind, options in partitions:
        if (not kind or kind in READ_ONLY_IMAGES or (kinds is not None and kind not in kinds)
                or device.startswith("/dev/loop") or "cdrom" in options.split(",")
                or (mount.startswith("/System/Volumes/") and mount != "/System/Volumes/Data")
                or device in devices or len(mount) > 128):
            continue
        devices.add(device)
        mounts.append(mount)
    return mounts


def cpu_busy(times):
    """Return (busy, all) seconds of a psutil.cpu_times(); guest time is inside user time on Linux, so not counted twice."""
    fields = times._asdict()
    total = sum(fields.values()) - fields.get("guest", 0.0) - fields.get("guest_nice", 0.0)
    return total - fields["idle"] - fields.get("iowait", 0.0), total


def cpu_sensors(hwmon_class):
    """Return the hwmon temp*_input files that say how hot the CPU is, one or more per package.

    coretemp (Intel): each "Package id N", else its cores; k10temp and zenpower (AMD): Tdie,
    else Tctl (Tctl runs 20-27 °C above the die on some Ryzen and Threadripper parts, which
    then give Tdie too); an ARM board: its CPU thermal zone. Other chips (a GPU's, a disk's,
    ACPI's) are not the CPU.
    """
    found = []
    for chip in sorted(hwmon_class.glob("hwmon*")):
        name = read_text(chip / "name")
        inputs = {(read_text(chip / f"{path.name[:-6]}_label") or path.name[:-6]).lower(): path
                  for path in sorted(chip.glob("temp*_input"))}
        if name == "coretemp":
            found += [path for label, path in inputs.items() if label.startswith("package id")] or list(inputs.values())
        elif name in ("k10temp", "zenpower"):
            found += [inputs[label] for label in ("tdie", "tctl") if label in inputs][:1]
        elif name and CPU_THERMAL.fullmatch(name):
            found += list(inputs.values())[:1]
    return found


class HostReader:
    """The PC around the GPUs, as a push's `system` (SPEC, "The host"), read through psutil.

    The OS, the CPU's model and count are read once; each sample reads the rest. A reading that
    fails is null, logged once, and the others still go out. CPU busy and network bytes are the
    difference from the last sample, so no sample waits to measure them: the first has none.
    Edges: the psutil module, the root (--sys-root), the platform, the clocks, `usage` (a file
    system's total and used bytes), `run` (sysctl, on macOS).
    """

    def __init__(self, psutil, root="/", platform=sys.platform, clock=time.monotonic, wall=time.time, usage=None,
                 run=subprocess.run):
        self.psutil, self.root, self.platform = psutil, Path(root), platform
        self.linux = platform.startswith("linux")
        self.clock, self.wall, self.run = clock, wall, run
        self.usage = usage or self.disk_usage
        self.states = StateLog()
        self.cpu_last = self.net_last = None
        self.virtual = {}  # interface name -> whether its bytes are counted on another too
        self.readings = (("CPU use", self.cpu_percent), ("load", self.load), ("memory", self.memory),
                         ("disks", self.disks), ("network", self.network), ("CPU temperature", self.temperature),
                         ("uptime", self.uptime))
        with self.procfs(self.root / "proc"):
            self.facts = {**self.read("OS name", self.os_name), **self.read("CPU model", self.cpu_model),
                          **self.read("CPU count", self.cpu_count)}
        self.sensors = cpu_sensors(self.root / "sys" / "class" / "hwmon") if self.linux else []

    def sample(self):
        """Return the `system` object of this moment: every field, null where it could not be read."""
        found = dict(self.facts)
        with self.procfs(self.root / "proc"):
            for what, read in self.readings:
                found.update(self.read(what, read))
        return {name: found.get(name) for name in SYSTEM_FIELDS}

    def read(self, what, read):
        """Return read()'s fields, or {} when it fails: logged when it starts failing and when it recovers."""
        topic = f"reading the host's {what}"
        try:
            fields = read()
        except Exception as error:  # psutil's own errors, OSError, a parse of something unexpected
            log.debug("%s failed", topic, exc_info=True)
            self.states.set(topic, f"cannot read the host's {what} (sent as null): {type(error).__name__}: {error}",
                            key=type(error).__name__)
            return {}
        self.states.set(topic, None)
        return fields

    @contextlib.contextmanager
    def procfs(self, path):
        """Point psutil's /proc at `path` for one read, then back: PROCFS_PATH is psutil's module-global (Linux)."""
        if not self.linux:
            yield
            return
        kept, self.psutil.PROCFS_PATH = self.psutil.PROCFS_PATH, str(path)
        try:
            yield
        finally:
            self.psutil.PROCFS_PATH = kept

    def text(self, *paths):
        """Return the first of `paths` (under the root) that can be read; OSError when none can."""
        for path in paths:
            text = read_text(self.root / path)
            if text is not None:
                return text
        raise OSError(f"cannot read {' or '.join(str(self.root / path) for path in paths)}")

    def os_name(self):
        import platform as python
        if self.linux:
            return {"os": parse_os_release(self.text("etc/os-release", "usr/lib/os-release"))}
        if self.platform == "darwin":
            return {"os": f"macOS {python.mac_ver()[0]}".strip()}
        if self.platform == "win32":
            return {"os": windows_name(*python.win32_ver()[:2])}
        return {"os": f"{python.system()} {python.release()}".strip() or None}

    def cpu_model(self):
        if self.linux:
            return {"cpuModel": parse_cpu_model(self.text("proc/cpuinfo"))}
        if self.platform == "darwin":
            found = self.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                             timeout=SYSCTL_TIMEOUT_S)
            return {"cpuModel": found.stdout.strip() or None}
        if self.platform == "win32":
            import winreg
            with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"HARDWARE\DESCRIPTION\System\CentralProcessor\0") as key:
                return {"cpuModel": " ".join(str(winreg.QueryValueEx(key, "ProcessorNameString")[0]).split()) or None}
        import platform as python
        return {"cpuModel": python.processor() or None}

    def cpu_count(self):
        # On Linux the cpuN lines of the tree's /proc/stat: psutil.cpu_count() asks the running kernel (sysconf).
        return {"cpuCount": len(self.psutil.cpu_times(percpu=True)) if self.linux else self.psutil.cpu_count()}

    def cpu_percent(self):
        now = cpu_busy(self.psutil.cpu_times())
        last, self.cpu_last = self.cpu_last, now
        if last is None or now[1] <= last[1]:
            return {}
        return {"cpuPercent": round(min(100.0, max(0.0, 100 * (now[0] - last[0]) / (now[1] - last[1]))), 1)}

    def load(self):
        if self.linux:
            return {"load1": float(self.text("proc/loadavg").split()[0])}
        return {"load1": round(os.getloadavg()[0], 2)} if hasattr(os, "getloadavg") else {}  # Windows has none

    def memory(self):
        with warnings.catch_warnings():  # psutil warns when /proc/vmstat lacks swap-in counts, which are not sent
            warnings.simplefilter("ignore", RuntimeWarning)
            memory, swap = self.psutil.virtual_memory(), self.psutil.swap_memory()
        return {"memoryTotal": _mib(memory.total), "memoryUsed": _mib(memory.total - memory.available),
                "swapUsed": _mib(swap.used)}

    def disks(self):
        if self.linux:
            partitions = parse_mounts(self.text("proc/1/mounts", "proc/self/mounts"))
            kinds = block_filesystems(self.text("proc/filesystems"))
        else:
            partitions = [(p.device, p.mountpoint, p.fstype, p.opts) for p in self.psutil.disk_partitions(all=False)]
            kinds = None
        disks = []
        for mount in real_disks(partitions, kinds):
            try:
                found = self.usage(self.root / mount.lstrip("/") if self.linux else mount)
            except OSError:  # a mount point this user may not enter: the other disks still go out
                found = None
            if found is not None:
                disks.append({"mount": mount, "total": _mib(found[0]), "used": _mib(found[1])})
            if len(disks) == MAX_DISKS:
                break
        return {"disks": disks}

    def disk_usage(self, path):
        """Return (total, used) bytes of the file system mounted at `path`, as df says them; None if none is."""
        if self.root != Path("/") and not os.path.ismount(path):
            return None  # a host mount made after the container started, not seen in it: statvfs would say its parent's
        found = self.psutil.disk_usage(str(path))
        return found.total, found.used

    def network(self):
        now = self.clock()
        counters = self.nic_counters()
        totals = {name: (nic.bytes_recv, nic.bytes_sent) for name, nic in counters.items() if not self.is_virtual(name)}
        last, self.net_last = self.net_last, (now, totals)
        if last is None or now <= last[0]:
            return {}
        moved = [(rx - last[1][name][0], tx - last[1][name][1]) for name, (rx, tx) in totals.items() if name in last[1]]
        moved = [(rx, tx) for rx, tx in moved if rx >= 0 and tx >= 0]  # a counter reset (a driver reloaded) says nothing
        if not moved:
            return {}
        span = now - last[0]
        return {"netRx": round(sum(rx for rx, _ in moved) / span, 1), "netTx": round(sum(tx for _, tx in moved) / span, 1)}

    def nic_counters(self):
        """Return psutil's per-interface byte counts: on Linux the host's (PID 1's network), else this process's."""
        if not self.linux:
            return self.psutil.net_io_counters(pernic=True, nowrap=False)
        for proc in (self.root / "proc" / "1", self.root / "proc"):  # PID 1 hidden (hidepid=2): our own
            try:
                with self.procfs(proc):
                    return self.psutil.net_io_counters(pernic=True, nowrap=False)
            except OSError:
                continue
        raise OSError(f"cannot read {self.root / 'proc' / '1' / 'net' / 'dev'} or {self.root / 'proc' / 'net' / 'dev'}")

    def is_virtual(self, name):
        """Say whether an interface's bytes cross another too: on Linux, whether sysfs has it under devices/virtual."""
        if name not in self.virtual:
            if len(self.virtual) > 4096:  # container veths come and go, each with a new name
                self.virtual.clear()
            # eth0 -> ../../devices/pci0000:00/.../net/eth0; docker0, veth*, bond0, eth0.100 -> ../../devices/virtual/net/..
            try:
                link = os.readlink(self.root / "sys" / "class" / "net" / name) if self.linux else None
            except (OSError, ValueError):
                link = None
            self.virtual[name] = "/devices/virtual/" in link if link else bool(VIRTUAL_NIC.match(name))
        return self.virtual[name]

    def temperature(self):
        readings = [value for value in map(read_int, self.sensors) if value is not None and -100_000 < value < 250_000]
        return {"temperatureCpu": _scaled(max(readings), 1000, 1)} if readings else {}

    def uptime(self):
        return {"uptimeS": max(0, round(self.wall() - self.psutil.boot_time()))}


def open_host(root="/", platform=sys.platform):
    """Return the HostReader of this PC (or of the host at `root`); None, said once, where it cannot read one."""
    try:
        import psutil
    except ImportError:
        log.warning("psutil is not installed, so pushes carry no system (the PC's CPU, memory, disks and network): "
                    "pip install psutil")
        return None
    if platform.startswith("linux") and not Path(root, "proc", "stat").is_file():
        log.warning("%s has no proc/stat, so pushes carry no system: mount the host's / there whole (-v /:/host:ro)",
                    Path(root))
        return None
    return HostReader(psutil, root, platform)


# ---- choosing readers: every vendor present, in one push -------------------------------------

BACKENDS = ("auto", "nvml", "gputil", "amd", "intel", "apple", "windows", "jetson")


class MultiReader(Reader):
    """Several readers in one push: NVIDIA's keep their own indices, each other reader's GPUs follow.

    Each reader's first index is fixed at its first sample, so a GPU keeps its index (and its
    history) while another reader's GPUs come and go; a reader that fails costs only its own
    GPUs, which go out as one entry with the error.
    """

    def __init__(self, readers):
        self.readers = readers
        self.name = "+".join(reader.name for reader in readers)
        self.bases = None
        self.read_by = {}

    def sample(self):
        results = []
        for reader in self.readers:
            try:
                results.append(reader.sample())
            except Exception as error:  # GpuReadError, or a reader's own bug: its GPUs go out with the error
                text = str(error) if isinstance(error, GpuReadError) else f"{reader.name}: {type(error).__name__}: {error}"
                if not isinstance(error, GpuReadError):
                    log.debug("the %s reader failed", reader.name, exc_info=True)
                results.append([{"index": 0, "vendor": reader.vendor, "error": clip(_one_line(text))}])
        if self.bases is None:  # a reader that failed its first sample still keeps the slots it knows of
            self.bases, base = [], 0
            for reader, gpus in zip(self.readers, results):
                self.bases.append(base)
                base += max(max((g.get("index", 0) for g in gpus), default=-1) + 1, reader.count)
        gpus, self.read_by = [], {}
        for reader, base, found in zip(self.readers, self.bases, results):
            for gpu in found:
                local = gpu.get("index", 0)
                gpu = {**gpu, "index": base + local if isinstance(local, int) else None}
                self.read_by[gpu["index"]] = reader.describe(local)
                gpus.append(gpu)
        return gpus

    def describe(self, index):
        return self.read_by.get(index, self.name)


class PendingReader(Reader):
    """A reader not opened yet (no GPU driver loaded at boot, say): each sample tries again, and says why not."""

    def __init__(self, opener):
        self.opener, self.reader = opener, None
        self.name = "none"

    def sample(self):
        if self.reader is None:
            self.reader = self.opener()  # GpuReadError: this sample goes out with the error
            self.name = self.reader.name
        return self.reader.sample()

    def describe(self, index):
        return self.reader.describe(index) if self.reader else self.name


def _nvidia(choice, nvml, gputil, run, process):
    """Return the NVIDIA reader `choice` names: NVML, or GPUtil (which runs nvidia-smi)."""
    if choice == "nvml":
        try:
            return NvmlReader(nvml, process=process)
        except (ImportError, OSError, GpuReadError) as error:
            raise GpuReadError(f"NVML backend unavailable: {error}") from None
    try:
        return GputilReader(gputil, run)
    except ImportError as error:
        raise GpuReadError(f"GPUtil backend unavailable: {error} (pip install GPUtil setuptools)") from None


def open_reader(choice, simulate=0, nvml=None, gputil=None, run=subprocess.run, root=None, platform=sys.platform,
                 windows=None, which=shutil.which):
    """Return what reads this machine's GPUs: the one `choice` names, or for `auto` every vendor's present.

    Every reader that lists processes asks one lookup what each is: `root.process` on Linux, the
    process handle on Windows (`windows`: its edges, for tests), with `root.full_commands` on both.
    """
    if simulate:
        return SimulatedReader(simulate)
    root = root or SysRoot()
    if platform == "win32":
        windows = windows or (None, dxgi_adapters, WindowsProcesses(root.full_commands))
    process = root.process if platform.startswith("linux") else windows[2] if platform == "win32" else None
    one = {"amd": lambda: AmdReader(root), "intel": lambda: IntelReader(root),
           "jetson": lambda: JetsonReader(root, run=run), "apple": lambda: AppleReader(run=run),
           "windows": lambda: WindowsReader(windows)}
    if choice in one:
        return one[choice]()
    if choice != "auto":
        return _nvidia(choice, nvml, gputil, run, process)
    readers, missing = [], []
    if platform == "darwin":
        return AppleReader(run=run)
    jetson = platform.startswith("linux") and JetsonReader.present(root)
    if not jetson:  # NVML on a Jetson knows only the GPU's name: its sysfs says the rest
        try:
            readers.append(NvmlReader(nvml, process=process))
        except (ImportError, OSError, GpuReadError) as error:
            if gputil is not None or which("nvidia-smi"):
                log.info("NVML unavailable (%s); using GPUtil and nvidia-smi", error)
                try:
                    readers.append(GputilReader(gputil, run))
                except ImportError as error:
                    missing.append(f"GPUtil backend unavailable: {error} (pip install GPUtil setuptools)")
            else:
                missing.append(f"no NVIDIA driver (NVML: {error})")
    others = [lambda: WindowsReader(windows, skip_nvidia=bool(readers))] if platform == "win32" else [
        one["amd"], one["intel"]] + ([one["jetson"]] if jetson else [])
    for make in others:
        try:
            readers.append(make())
        except GpuReadError as error:
            missing.append(str(error))
    if not readers:
        raise GpuReadError("no GPU found: " + "; ".join(missing))
    return readers[0] if len(readers) == 1 else MultiReader(readers)


# ---- pushing ----------------------------------------------------------------------------

BACKOFF_CAP_S = 30.0
HTTP_TIMEOUT_S = (5.0, 10.0)  # connect, read
MAX_INDEX = 1023  # the highest GPU index the server accepts


class PushError(Exception):
    """A push that did not go through; the message is one line for the user."""


class Refused(PushError):
    """The server refused in a way retrying cannot fix (bad key, wrong URL)."""


class Retry(PushError):
    """The push failed for now; `after` is the server's Retry-After, if any."""

    def __init__(self, message, after=None):
        super().__init__(message)
        self.after = after


class Rejected(PushError):
    """The server refused this sample (400, 413, 415, 422...); the next sample may pass, so no backoff."""

    def __init__(self, status, error, field=None):
        if field:  # the server's error usually starts with the field already: "gpus[0].x: ..."
            text = error if error.startswith(f"{field}:") else f"{field}: {error}"
            super().__init__(f"server rejected the sample: {text}")
        else:
            super().__init__(f"server rejected the sample ({status}): {error}")
        self.status, self.error, self.field = status, error, field


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


def clip(text, most=128):
    """Return `text` as the server keeps it whole (128 characters): if longer, cut at a word, with an ellipsis.

    The driver's own message runs past 128 ("... Make sure that the latest NVIDIA driver is installed
    and running."), and was cut mid-word with nothing to say so (issue 30).
    """
    if len(text) <= most:
        return text
    cut = text[:most - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > most // 2 else cut).rstrip(" ,;:.") + "…"


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
        return clip("".join(c if c.isprintable() else " " for c in value))
    if isinstance(value, dict):
        return {k: _fit(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fit(v) for v in value[:64]]
    return value


def _free_indices(taken):
    """Yield the GPU indices no GPU in `taken` uses, lowest first."""
    return (i for i in itertools.count() if i not in taken)


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


START_SLACK_S = 60.0  # the server refuses a process's startedAt later than this after the push's sampledAt


def _drop_later_starts(gpus, sampled_at):
    """Leave out a startedAt later than the sample, which the server refuses: a clock set back since it was read."""
    for gpu in gpus:
        for process in gpu.get("processes") or ():
            if (process.get("startedAt") or 0) > sampled_at + START_SLACK_S:
                del process["startedAt"]


def build_payload(reader, clock=time.time, host=None):
    """Sample the GPUs once, and the PC around them where `host` reads it; a sample that fails whole carries `error`."""
    sampled_at = clock()
    try:
        gpus, error = distinct_indices(reader.sample()), None
        _drop_later_starts(gpus, sampled_at)
    except GpuReadError as failure:
        gpus, error = [], str(failure)
    except Exception as failure:  # a reader's own bug: this sample says so, and the agent goes on (SPEC)
        log.debug("reading the GPUs failed", exc_info=True)
        gpus, error = [], f"{reader.name}: {type(failure).__name__}: {failure}"
    payload = {"host": socket.gethostname(), "sampledAt": round(sampled_at, 3),
               "agent": {"version": VERSION, "backend": reader.name,
                         "simulated": reader.name == "simulated"},
               "gpus": gpus}
    if host is not None:
        try:
            payload["system"] = host.sample()
        except Exception:  # each reading fails alone inside; this is a bug of the reader's own: the GPUs still go out
            log.debug("reading the host failed", exc_info=True)
    if error:
        payload["error"] = error  # whole here, for the agent's own log; the push clips it (_fit)
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


def run_loop(reader, pusher, interval, clock=time.monotonic, sleep=time.sleep, stop=lambda: False, host=None):
    """Sample and push forever; back off only while the server is down or busy; send the newest sample."""
    states, failures = StateLog(), 0
    while not stop():
        started = clock()
        payload = build_payload(reader, host=host)
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
# Beside agent.py: which of the plans below --install used (system-wide or not) and whether it made
# the .env. Never commands or paths: --uninstall works those out again (issue: it ran what the file listed).
MANIFEST = "gpu-stats-agent.installed"
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # Windows has none: _refuse_link's os.path.islink is the check there
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


class InstallError(Exception):
    """--install or --uninstall will not go on (a link where it writes, a folder others can write to); the message says what to do."""


def _as_root():
    """Return whether --install makes a system-wide unit: as root, unless GPU_STATS_SCOPE=user."""
    return os.environ.get("GPU_STATS_SCOPE") != "user" and hasattr(os, "geteuid") and os.geteuid() == 0


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
    system = _as_root() if root is None else bool(root)
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


def _own_group(gid, uid):
    """Return whether group `gid` is `uid`'s private group (its name, no other member): the umask 002 of Debian and Ubuntu."""
    import grp
    import pwd
    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    return group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}


def _check_folder(folder):
    """Refuse a folder another user owns or can write to: they could plant a link or a manifest in it."""
    if not hasattr(os, "geteuid"):  # Windows: ACLs, not mode bits, say who may write there; the link checks still hold
        return
    found, uid = folder.stat(), os.geteuid()
    if found.st_uid != uid:
        raise InstallError(f"{folder} is owned by uid {found.st_uid}, not you: install from a folder of your own "
                           f"(or chown it to yourself, then chmod go-w {folder})")
    if found.st_mode & 0o002 or found.st_mode & 0o020 and not _own_group(found.st_gid, uid):
        raise InstallError(f"{folder} is writable by others, who could plant links in it: chmod go-w {folder}")


def _refuse_link(path):
    """Refuse a symbolic link at `path`: O_NOFOLLOW refuses one too (ELOOP), this says so in words, and Windows has only this."""
    if os.path.islink(path):
        raise InstallError(f"{path} is a symbolic link: remove it and run again (--install writes through no link)")


def _read_own(path):
    """Return the text of `path`, or None where there is none; a link or anything but a plain file is refused."""
    _refuse_link(path)
    try:
        fd = os.open(path, os.O_RDONLY | NOFOLLOW | getattr(os, "O_NONBLOCK", 0))  # a planted FIFO cannot hang it
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InstallError(f"{path} is not a plain file: remove it and run again")
        return f.read()


def _write_own(path, text, mode=0o644, encoding="utf-8"):
    """Write `path` whole: a new file beside it, renamed over it, so a link planted at `path` is replaced, never followed."""
    _refuse_link(path)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # O_EXCL | O_NOFOLLOW, mode 600
    try:
        with os.fdopen(fd, "w", encoding=encoding) as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(temp, path)  # a rename replaces a link at `path` itself, on Windows too
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _put_back(path, kept):
    """Make `path` hold again what it held (its bytes and mode, as read), or be gone if it was not there; through no link."""
    if kept is None:
        path.unlink(missing_ok=True)
        return
    _refuse_link(path)
    data, mode = kept
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _write_secret_env(path, url, key):
    """Keep PUSH_URL and DEVICE_KEY in `path` (mode 600: its owner alone reads it); return whether it was new."""
    lines = (_read_own(path) or "").splitlines()
    kept = [line for line in lines if not line.split("=", 1)[0].strip() in ("PUSH_URL", "DROPLET_PUSH_URL", "DEVICE_KEY")]
    _write_own(path, "\n".join([*kept, f"PUSH_URL={url}", f"DEVICE_KEY={key}"]) + "\n", mode=0o600)
    return not lines


def _installed(text, env_file):
    """Return (root, made the .env) from a manifest's text: which plan --install used, and nothing else."""
    try:
        record = json.loads(text)
        if "undo" in record:  # an earlier agent's lists commands and paths: they only tell which plan it was
            return not any("--user" in command for command in record["undo"]), str(env_file) in record["files"]
        root, env = record["root"], record["env"]
    except (ValueError, TypeError, KeyError):
        root = env = None
    if not isinstance(root, bool) or not isinstance(env, bool):
        raise InstallError(f"{env_file.with_name(MANIFEST)} is not what --install writes: remove it and run again")
    return root, env


def _systemd_runs(scope, run):
    """Return whether systemd runs this machine's services (sd_booted()'s question), as its own systemctl answers it."""
    try:
        done = run(["systemctl", *scope, "is-system-running"], capture_output=True, text=True, timeout=15)
    except (FileNotFoundError, PermissionError):
        return False  # no systemctl at all: a chroot, a minimal container
    # "offline" (and exit 1) where systemd is not PID 1: a container, WSL1, a chroot.
    return done.stdout.strip() in ("running", "degraded", "starting", "initializing", "maintenance")


def install(args, argv, run=subprocess.run, agent=None, platform=sys.platform, home=None, root=None):
    """Write what starts the agent at boot or logon, start it, and say in one line what was written and where its log is."""
    agent = Path(agent or __file__).resolve()
    _check_folder(agent.parent)
    root = _as_root() if root is None else root
    files, commands, undo, log_at = install_plan(_start_flags(argv), agent, Path(sys.executable), platform, home, root)
    if commands[0][0] == "systemctl" and not _systemd_runs(commands[0][1:2] if "--user" in commands[0] else [], run):
        # Checked before anything is written (issue 30: it wrote the unit, then crashed).
        raise InstallError("systemd is not running here (a container, WSL1 or a chroot), so nothing can start the agent "
                           "at boot; nothing was written. Run it in the foreground instead: python3 agent.py, with "
                           "PUSH_URL and DEVICE_KEY in a .env beside it (chmod 600), from this machine's own init")
    env_file, manifest = agent.with_name(".env"), agent.with_name(MANIFEST)
    for path in (env_file, manifest, *files):  # all refused before any is written
        _refuse_link(path)
    before = _read_own(manifest)
    earlier = _installed(before, env_file)[1] if before else False  # a .env an earlier --install made is still its own
    # What is there now, byte for byte, so a failed re-install (a rotated key, say) puts a working install back.
    kept = {path: (path.read_bytes(), stat.S_IMODE(path.stat().st_mode)) if path.is_file() else None
            for path in (env_file, manifest, *files)}
    made_env = _write_secret_env(env_file, args.url, args.key) or earlier
    written = [str(env_file)] if made_env else []
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_own(path, text, encoding="utf-16" if str(path).endswith(".xml") else "utf-8")
        written.append(str(path))
    _write_own(manifest, json.dumps({"root": bool(root), "env": made_env}))
    for command in commands:
        done = run(command, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            why = f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()[:200]}"
            if before:  # an install that worked was there: it is put back as it was, not taken down
                for path, data in kept.items():
                    _put_back(path, data)
                for step in [c for c in commands if c[-1] == "daemon-reload"]:
                    run(step, capture_output=True, text=True, timeout=60)
                raise InstallError(f"{why}; the install from before is kept as it was")
            for step in undo:  # nothing is left half installed: what was written goes, and what started stops
                run(step, capture_output=True, text=True, timeout=60)
            for path in [*files, manifest, *([env_file] if made_env and not earlier else [])]:
                path.unlink(missing_ok=True)
            raise InstallError(f"{why}; nothing was left installed")
    linger = "" if "--user" not in sum(commands, []) else (
        "; it starts when you log in (to start it at boot: sudo loginctl enable-linger $USER)")
    _say(f"installed: wrote {', '.join(written)}, the key kept in {env_file} (mode 600){linger}; its log: {log_at}")
    return 0


def uninstall(run=subprocess.run, agent=None, platform=sys.platform, home=None):
    """Stop the agent started at boot or logon and remove what --install wrote: worked out again, never read from a file."""
    agent = Path(agent or __file__).resolve()
    _check_folder(agent.parent)
    manifest, env_file = agent.with_name(MANIFEST), agent.with_name(".env")
    text = _read_own(manifest)
    if text is None:
        _say(f"nothing to uninstall: no {manifest.name} beside agent.py")
        return 0
    root, made_env = _installed(text, env_file)
    files, _, undo, _ = install_plan([], agent, Path(sys.executable), platform, home, root)
    for command in undo:
        run(command, capture_output=True, text=True, timeout=60)  # one that fails (already stopped) stops nothing
    removed = [*files, *([env_file] if made_env else [])]
    for path in removed:
        path.unlink(missing_ok=True)  # a link is removed itself, never what it points to
    manifest.unlink()
    _say(f"uninstalled: stopped it and removed {', '.join(map(str, removed))}")
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
    parser = _Parser(description="Push this PC's GPU stats (NVIDIA, AMD, Intel, Apple) to a GPU Stats Dashboard.")
    parser.add_argument("--url", default=env.get("PUSH_URL") or env.get("DROPLET_PUSH_URL"),
                        help="server push URL, like http://host:3000/push-sse (PUSH_URL)")
    parser.add_argument("--key", default=env.get("DEVICE_KEY"),
                        help="this device's key (DEVICE_KEY; better in .env: a flag shows in ps to every user)")
    parser.add_argument("--interval", type=float, default=env.get("PUSH_INTERVAL_S", "2"),
                        help="seconds between samples (PUSH_INTERVAL_S, default 2)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="what reads the GPUs (default auto: every vendor's this machine has)")
    parser.add_argument("--sys-root", default="/", metavar="DIR",
                        help="read DIR/sys and DIR/proc: an agent in a container with the host's / mounted at DIR")
    parser.add_argument("--full-commands", action="store_true",
                        help="send each GPU process's whole command line, not its program and script alone "
                             "(arguments can hold tokens and paths, and every viewer of the dashboard reads them)")
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
    if not Path(args.sys_root, "sys").is_dir() and args.sys_root != "/":
        parser.error(f"--sys-root: {args.sys_root} has no sys directory (mount the host's / there: -v /:/host:ro)")
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
    if args.install or args.uninstall:
        try:
            return uninstall() if args.uninstall else install(args, argv)
        except (OSError, subprocess.SubprocessError, InstallError) as error:
            _say(f"cannot {'uninstall' if args.uninstall else 'install'}: {error}")
            return 1
    if key_on_command_line(argv) and (others := other_users()):
        log.warning("--key puts the device key where every user of this machine can read it (ps; here: %s): "
                    "put DEVICE_KEY=... in a .env beside agent.py (chmod 600), or in the environment, instead",
                    ", ".join(others[:5]) + (", ..." if len(others) > 5 else ""))
    try:
        def opener():
            root = SysRoot(args.sys_root, full_commands=args.full_commands)
            return open_reader(args.backend, args.simulate, root=root)
        try:
            reader = opener()
        except GpuReadError:
            if args.once or args.dry_run:
                raise
            reader = PendingReader(opener)  # a service at boot may start before the GPU driver
        host = open_host(args.sys_root)
        if args.once or args.dry_run:
            payload = build_payload(reader, host=host)
            if args.dry_run:
                print(json.dumps(_fit(payload), indent=2, allow_nan=False))
                for gpu in payload["gpus"]:  # which reader found each GPU, where: on stderr, beside the JSON
                    _say(f"GPU {gpu['index']} {gpu.get('name') or '(no name)'}: read by {reader.describe(gpu['index'])}")
            if payload.get("error"):
                _say(f"cannot read GPUs: {payload['error']}")
                return 1
            if not args.dry_run:
                Pusher(args.url, args.key).push(payload)
            return 0
        if isinstance(reader, PendingReader):
            log.info("pushing GPU stats to %s every %g s, once a GPU can be read", args.url, args.interval)
        else:
            log.info("pushing %s GPU stats to %s every %g s", reader.name, args.url, args.interval)
        run_loop(reader, Pusher(args.url, args.key), args.interval, host=host)
    except GpuReadError as error:
        _say(f"cannot read GPUs: {error}")
        return 1
    except Refused as error:  # before PushError: retrying cannot fix it, and 3 says so to systemd
        _say(str(error))
        return 3
    except PushError as error:
        _say(str(error))
        return 1
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

"""Fakes for the agent's GPU edges: a fake nvidia-smi on PATH, and a fake NVML module."""
import json
import os
import shutil
import types
from pathlib import Path

import pynvml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FAKE_BIN = FIXTURES / "bin"
L40S = "03-l40s-query-gpu-csv-595.txt"
RTX2080S = "05-windows-rtx2080super-query-gpu-csv-591.txt"
H100_MIG = "h100-mig-query-from-01-table.txt"
DRIVER_NOT_LOADED = "10-driver-not-loaded-gputil26.txt"
NO_GPUS = "12-no-supported-gpus-exit255.txt"


class FakeSmi:
    """Puts the fake nvidia-smi first on PATH and writes its scenario file."""

    def __init__(self, tmp_path, monkeypatch):
        self.path = tmp_path / "nvidia-smi-scenario.json"
        self.log = tmp_path / "nvidia-smi-calls.log"
        monkeypatch.setenv("PATH", f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}")
        monkeypatch.setenv("FAKE_NVIDIA_SMI", str(self.path))
        self.set(gpus=[L40S])

    def set(self, **scenario):
        self.path.write_text(json.dumps({"log": str(self.log), **scenario}))

    def calls(self):
        return self.log.read_text().splitlines() if self.log.exists() else []


def nvml_module(gpus, driver=b"560.94", fail_init=None):
    """Return a module with nvidia-ml-py's names whose GPUs are `gpus` (dicts of readings).

    A reading that is an NVMLError class is raised, as the real binding does.
    """
    def get(handle, key):
        value = gpus[handle][key]
        if isinstance(value, type) and issubclass(value, pynvml.NVMLError):
            raise value()
        return value

    def init():
        if fail_init:
            raise fail_init()

    def handle_by_index(index):
        if gpus[index] is pynvml.NVMLError_GpuIsLost:
            raise pynvml.NVMLError_GpuIsLost()
        return index

    def field_values(handle, ids):
        value = types.SimpleNamespace(uiVal=gpus[handle].get("memTemp", 0))
        return [types.SimpleNamespace(nvmlReturn=0 if "memTemp" in gpus[handle] else pynvml.NVML_ERROR_NOT_SUPPORTED,
                                      value=value)]
    def memory_info(handle, version=None):
        if version is None:
            return get(handle, "memory")
        if "memory_v2" not in gpus[handle]:  # a driver before R510: no nvmlDeviceGetMemoryInfo_v2
            raise pynvml.NVMLError_FunctionNotFound()
        assert version == pynvml.nvmlMemory_v2
        return get(handle, "memory_v2")
    module = types.SimpleNamespace(
        NVMLError=pynvml.NVMLError, NVML_TEMPERATURE_GPU=pynvml.NVML_TEMPERATURE_GPU,
        NVML_CLOCK_GRAPHICS=pynvml.NVML_CLOCK_GRAPHICS, NVML_CLOCK_MEM=pynvml.NVML_CLOCK_MEM,
        NVML_FI_DEV_MEMORY_TEMP=pynvml.NVML_FI_DEV_MEMORY_TEMP,
        nvmlInit=init, nvmlSystemGetDriverVersion=lambda: driver,
        nvmlDeviceGetCount=lambda: len(gpus), nvmlDeviceGetHandleByIndex=handle_by_index,
        nvmlDeviceGetName=lambda h: get(h, "name"), nvmlDeviceGetUUID=lambda h: get(h, "uuid"),
        nvmlDeviceGetUtilizationRates=lambda h: get(h, "rates"),
        nvmlDeviceGetMemoryInfo=memory_info, nvmlMemory_v2=pynvml.nvmlMemory_v2,
        nvmlDeviceGetTemperature=lambda h, sensor: get(h, "temp"),
        nvmlDeviceGetFieldValues=field_values,
        nvmlDeviceGetPowerUsage=lambda h: get(h, "power_mw"),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: get(h, "limit_mw"),
        nvmlDeviceGetFanSpeed=lambda h: get(h, "fan"),
        nvmlDeviceGetClockInfo=lambda h, kind: get(h, "clocks")[kind],
        nvmlDeviceGetPerformanceState=lambda h: get(h, "pstate"),
        nvmlDeviceGetComputeRunningProcesses=lambda h: get(h, "compute"),
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: get(h, "graphics"),
        nvmlSystemGetProcessName=lambda pid: {4242: b"/usr/bin/python3", 77: b"C:\\Games\\game.exe"}[pid],
    )
    return module


def nvml_gpu(**overrides):
    """Readings of an RTX 3080 under load, as nvidia-ml-py returns them (bytes, mW, B)."""
    gib = 1 << 30
    return {"name": "NVIDIA GeForce RTX 3080", "uuid": "GPU-5a1c0000-0000-0000-0000-000000000000",
            "rates": types.SimpleNamespace(gpu=80, memory=41),
            "memory": types.SimpleNamespace(total=10 * gib, used=6 * gib, free=4 * gib),
            "temp": 65, "power_mw": 220500, "limit_mw": 320000, "fan": 55,
            "clocks": {pynvml.NVML_CLOCK_GRAPHICS: 1905, pynvml.NVML_CLOCK_MEM: 9501}, "pstate": 2,
            "compute": [types.SimpleNamespace(pid=4242, usedGpuMemory=2 * gib)],
            "graphics": [types.SimpleNamespace(pid=77, usedGpuMemory=None)], **overrides}


# ---- a machine's /sys and /proc, built from captured sysfs trees (tests/fixtures/gpus) ----------

GPUS = FIXTURES / "gpus"
PROC = FIXTURES / "proc"  # captured /proc/<pid> entries and /proc/stat (tests/fixtures/proc/SOURCE.md)


class FakeRoot:
    """A directory laid out like / for --sys-root: DRM cards whose device/ is a captured tree, and processes.

    Cards link to the captures as the kernel links /sys/class/drm/cardN/device to the PCI
    device, so nothing from tests/fixtures is copied or changed.
    """

    def __init__(self, path):
        self.path = Path(path)
        (self.path / "sys" / "class" / "drm").mkdir(parents=True, exist_ok=True)
        (self.path / "proc").mkdir(exist_ok=True)
        (self.path / "etc").mkdir(exist_ok=True)
        (self.path / "proc" / "sys" / "kernel").mkdir(parents=True, exist_ok=True)
        (self.path / "proc" / "sys" / "kernel" / "osrelease").write_text("6.8.0-49-generic\n")

    def card(self, name, capture, address=None):
        """Add /sys/class/drm/<name> whose device/ is the capture's (a path under tests/fixtures/gpus).

        With `address`, the card sits at that PCI address, as the kernel's relative link says
        (device -> ../../../0000:04:00.0), whatever the capture's uevent says.
        """
        card = self.path / "sys" / "class" / "drm" / name
        card.mkdir()
        target = Path(capture) if Path(capture).is_absolute() else GPUS / capture / "device"
        if address:
            pci = self.path / "sys" / "devices" / "pci0000:00" / address
            pci.parent.mkdir(parents=True, exist_ok=True)
            pci.symlink_to(target)
            target = pci
        (card / "device").symlink_to(target)
        return card

    def simpledrm(self, name="card0"):
        """Add the firmware framebuffer's card, as simpledrm registers it: no GPU."""
        device = self.path / "sys" / "devices" / "platform" / "simple-framebuffer.0"
        device.mkdir(parents=True)
        (device / "uevent").write_text("DRIVER=simple-framebuffer\nMODALIAS=platform:simple-framebuffer\n")
        card = self.path / "sys" / "class" / "drm" / name
        card.mkdir()
        (card / "device").symlink_to(device)
        (self.path / "sys" / "class" / "drm" / f"{name}-Virtual-1").mkdir()

    def process(self, pid, comm, uid, fdinfo=(), user=None):
        """Add /proc/<pid> with comm, status, and one DRM file descriptor per fdinfo text."""
        base = self.path / "proc" / str(pid)
        base.mkdir(parents=True)
        (base / "comm").write_text(comm + "\n")
        (base / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n")
        self._descriptors(base, fdinfo)
        if user:
            self.account(user, uid)

    def captured(self, pid, fdinfo=(), user=None):
        """Add /proc/<pid> as it was captured (tests/fixtures/proc/<pid>), /proc/stat with its btime, and DRM descriptors.

        `user` names the captured uid in /etc/passwd. Returns /proc/<pid>, whose files are copies a test may change.
        """
        base = self.path / "proc" / str(pid)
        shutil.copytree(PROC / str(pid), base)
        if not (self.path / "proc" / "stat").exists():
            shutil.copy(PROC / "stat", self.path / "proc" / "stat")
        self._descriptors(base, fdinfo)
        if user:
            uid = next(line.split()[1] for line in (base / "status").read_text().splitlines() if line.startswith("Uid:"))
            self.account(user, uid)
        return base

    def account(self, user, uid):
        with open(self.path / "etc" / "passwd", "a") as passwd:
            passwd.write(f"{user}:x:{uid}:{uid}::/home/{user}:/bin/bash\n")

    @staticmethod
    def _descriptors(base, fdinfo):
        """Give a process stdin on /dev/null and one DRM file descriptor per fdinfo text, from fd 3 on."""
        (base / "fd").mkdir()
        (base / "fdinfo").mkdir()
        (base / "fd" / "0").symlink_to("/dev/null")
        (base / "fdinfo" / "0").write_text("pos:\t0\nflags:\t02\n")
        for fd, text in enumerate(fdinfo, start=3):
            (base / "fd" / str(fd)).symlink_to("/dev/dri/renderD128")
            (base / "fdinfo" / str(fd)).write_text(text)

    def amdgpu_ids(self):
        """Install libdrm's amdgpu.ids (the captured excerpt) where the agent looks for it."""
        where = self.path / "usr" / "share" / "libdrm"
        where.mkdir(parents=True, exist_ok=True)
        (where / "amdgpu.ids").symlink_to(GPUS / "amd" / "amdgpu.ids")

    def intel_card(self, name, driver, address, card_files=None, hwmon=None):
        """A card as the kernel lays one out: captured card files, a device/ bound to `driver` at `address`, its hwmon."""
        card = self.path / "sys" / "class" / "drm" / name
        card.mkdir()
        for captured in (card_files.iterdir() if card_files else ()):
            (card / captured.name).symlink_to(captured)
        device = self.path / "sys" / "devices" / "pci0000:00" / address
        device.mkdir(parents=True)
        (device / "uevent").write_text(f"DRIVER={driver}\nPCI_SLOT_NAME={address}\n")
        if hwmon:
            (device / "hwmon").mkdir()
            (device / "hwmon" / "hwmon3").symlink_to(hwmon)
        (card / "device").symlink_to(device)
        return device

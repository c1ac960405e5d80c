"""The Windows reader: its parsing on real captures, its edges (PDH, DXGI, the process token) as parameters.

Windows does not run here, so what it returns is fed in from tests/fixtures/gpus/windows
(SOURCE.md beside each file names where it came from).
"""
import pytest

import agent
from agent_fakes import GPUS
from gpustats.ingest import payload as server_payload

WINDOWS = GPUS / "windows"


def instances(capture):
    """The instance names of a capture: each whitespace-separated word that is one."""
    text = (WINDOWS / capture).read_text()
    return [w.strip("`\"()") for w in text.split() if w.strip("`\"()").startswith(("pid_", "luid_"))]


GTX_1050, HD_630 = instances("instances-rainmeter-forum-t29135.txt")  # one laptop's two GPUs
[OSHI_3D] = {i for i in instances("get-counter-oshi-pr2114.txt") if "engtype" in i}
GIB = 1 << 30
# What DXGI_ADAPTER_DESC1 gives for that laptop (names and LUIDs from the capture), and the software adapter.
LAPTOP = {
    "0x00000000_0x000095ca": {"name": "NVIDIA GeForce GTX 1050", "vendorId": 0x10DE, "deviceId": 0x1C8D,
                              "dedicated": 4 * GIB, "shared": 8 * GIB, "software": False},
    "0x00000000_0x0000a18d": {"name": "Intel(R) HD Graphics 630", "vendorId": 0x8086, "deviceId": 0x591B,
                              "dedicated": 128 << 20, "shared": 8 * GIB, "software": False},
    "0x00000000_0x0000c4cf": {"name": "Microsoft Basic Render Driver", "vendorId": 0x1414, "deviceId": 0x8C,
                              "dedicated": 0, "shared": 8 * GIB, "software": True},
}


def laptop_counters():
    """One read: two processes on the GTX 1050's 3D engine (sum over 100), video decode on the HD 630."""
    game = GTX_1050.replace("pid_9524", "pid_1200")
    engines = [(GTX_1050, 61.5), (game, 52.0), (HD_630, 12.25), (HD_630.replace("eng_4_engtype_VideoDecode",
                                                                                 "eng_0_engtype_3D"), 3.05119782746321)]
    dedicated = [("luid_0x00000000_0x000095CA_phys_0", 1.5 * GIB), ("luid_0x00000000_0x0000A18D_phys_0", 64 << 20)]
    shared = [("luid_0x00000000_0x0000A18D_phys_0", 512 << 20)]
    process_memory = [("pid_1200_luid_0x00000000_0x000095CA_phys_0", 1 * GIB),
                      ("pid_9524_luid_0x00000000_0x000095CA_phys_0", 256 << 20)]
    return engines, dedicated, shared, process_memory


# What WindowsProcesses gives for the laptop's processes: the account from the token, the arguments as
# CommandLineToArgvW splits them, the creation time from GetProcessTimes; OBS's token is not ours to open.
ARGV = {1200: [r"C:\Program Files (x86)\Steam\steamapps\common\Game\game.exe", "-dx12", "+connect", "10.0.0.5"],
        9524: [r"C:\Program Files\obs-studio\bin\64bit\obs64.exe", "--startreplaybuffer"]}


def names(pid):
    found = {1200: {"name": "game.exe", "user": "LAPTOP\\ana", "startedAt": 1796400612.25},
             9524: {"name": "obs64.exe", "startedAt": 1796396000.5}}.get(pid, {})
    return {**found, "command": agent.command_line(ARGV[pid])} if found else {}


def test_each_adapter_is_as_busy_as_its_busiest_engine_summed_over_processes():
    nvidia, intel = agent.windows_gpus(*laptop_counters(), LAPTOP, process=names)
    assert (nvidia["name"], nvidia["vendor"], nvidia["utilizationGpu"]) == ("NVIDIA GeForce GTX 1050", "NVIDIA", 100)
    assert (nvidia["memoryTotal"], nvidia["memoryUsed"], nvidia["memoryFree"]) == (4096, 1536, 2560)
    assert nvidia["processes"] == [{"pid": 1200, "name": "game.exe", "memoryUsed": 1024, "user": "LAPTOP\\ana",
                                    "command": "game.exe", "startedAt": 1796400612.25},
                                   {"pid": 9524, "name": "obs64.exe", "memoryUsed": 256, "command": "obs64.exe",
                                    "startedAt": 1796396000.5}]
    # The iGPU's 128 MiB is a carve-out: it works in shared memory, as Task Manager shows it.
    assert (intel["utilizationGpu"], intel["memoryShared"], intel["memoryTotal"], intel["memoryUsed"]) == (
        12, True, 8192 + 128, 576)
    assert all(intel[k] is None for k in ("temperatureGpu", "powerDraw", "fanSpeed", "clockCore"))
    for gpu in (nvidia, intel):
        assert server_payload.validate({"gpus": [gpu]})["gpus"][0] == gpu


def test_nvidia_is_left_to_nvml_and_the_basic_render_driver_is_never_a_gpu():
    [intel] = agent.windows_gpus(*laptop_counters(), LAPTOP, skip_nvidia=True)
    assert intel["name"] == "Intel(R) HD Graphics 630" and intel["index"] == 0


def test_instance_names_match_whatever_their_case_and_memory_past_4_gib_is_whole():
    # Get-Counter prints lower-case paths (oshi PR 2114); PDH gives mixed case.
    luid = "0x00000000_0x0000f814"
    card = {luid: {"name": "AMD Radeon RX 7900 XTX", "vendorId": 0x1002, "deviceId": 0x744C, "dedicated": 24 * GIB}}
    [gpu] = agent.windows_gpus([(OSHI_3D, 3.05119782746321)], [], [], [], card)
    assert (gpu["vendor"], gpu["utilizationGpu"], gpu["memoryTotal"]) == ("AMD", 3, 24576)
    assert "memoryShared" not in gpu and gpu["memoryUsed"] is None  # no memory counter read: unknown


class Counters:
    def __init__(self, reads):
        self.reads = reads

    def read(self):
        engines, dedicated, shared, process_memory = self.reads.pop(0)
        return {"engines": engines, "dedicated": dedicated, "shared": shared, "process_memory": process_memory}


def test_the_windows_backend_reads_the_counters_each_sample():
    idle = ([(GTX_1050, 0.0), (HD_630, 0.0)], [], [], [])
    reader = agent.WindowsReader((Counters([laptop_counters(), idle]), lambda: LAPTOP, names), skip_nvidia=False)
    assert [g["utilizationGpu"] for g in reader.sample()] == [100, 12]
    assert [g["utilizationGpu"] for g in reader.sample()] == [0, 0]


def test_a_windows_with_only_nvidia_and_the_basic_render_driver_leaves_it_to_nvml():
    only = {k: v for k, v in LAPTOP.items() if v["vendorId"] != 0x8086}
    with pytest.raises(agent.GpuReadError, match="no GPU besides NVIDIA's and the Microsoft Basic Render Driver"):
        agent.WindowsReader((Counters([]), lambda: only, names), skip_nvidia=True)


class Handles(agent.WindowsProcesses):
    """WindowsProcesses with its Windows calls answered from `table`: {pid: (created, image name, argv, account)}."""

    def __init__(self, table, **kwargs):
        super().__init__(**kwargs)
        self.table, self.asked = table, []

    def _load(self):
        kernel32 = type("Kernel32", (), {"OpenProcess": lambda _, access, inherit, pid: pid if pid in self.table else 0,
                                         "CloseHandle": lambda _, handle: True})()
        return None, None, kernel32, None, None, None

    def _started(self, handle):
        return self.table[handle][0]

    def _image_name(self, handle):
        self.asked.append(handle)
        return self.table[handle][1]

    def _argv(self, handle):
        return self.table[handle][2]

    def _user(self, handle):
        return self.table[handle][3]


def test_a_windows_process_is_asked_once_and_a_pid_handed_out_again_is_a_new_process():
    table = {1200: (1796400612.25, "python.exe", [r"C:\Python312\python.exe", "-u", r"C:\Users\ana\train.py", "--lr", "1"],
                    "LAPTOP\\ana"),
             4: (1796392351.5, "System", None, None)}  # its command line is not ours to read
    lookup = Handles(table)
    assert lookup(1200) == {"name": "python.exe", "user": "LAPTOP\\ana", "command": "python.exe train.py",
                            "startedAt": 1796400612.25}
    assert lookup(1200)["command"] == "python.exe train.py" and lookup.asked == [1200]
    table[1200] = (1796400900.0, "blender.exe", [r"C:\Program Files\Blender Foundation\Blender 4.2\blender.exe"], None)
    assert lookup(1200)["command"] == "blender.exe" and lookup.asked == [1200, 1200]  # the pid, handed on
    assert lookup(4) == {"name": "System", "user": None, "command": None, "startedAt": 1796392351.5}
    assert lookup(9999) == {}  # gone, or a process Windows will not open
    full = Handles({1200: (1796400612.25, "python.exe", ["python.exe", "train.py", "--lr", "1"], None)}, full_commands=True)
    assert full(1200)["command"] == "python.exe train.py --lr 1"

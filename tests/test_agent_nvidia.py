"""The NVIDIA readers: the nvidia-smi parser on real captures, GPUtil through a fake nvidia-smi, NVML."""
import json
import types

import pynvml
import pytest

import agent
from gpustats.ingest import payload as server_payload
from agent_fakes import (DRIVER_NOT_LOADED, FIXTURES, H100_MIG, L40S, NO_GPUS, RTX2080S, FakeSmi,
                         nvml_gpu, nvml_module)


@pytest.fixture
def smi(tmp_path, monkeypatch):
    return FakeSmi(tmp_path, monkeypatch)


def gputil(**kwargs):
    return agent.GputilReader(**kwargs)


# ---- the parser, on captured output --------------------------------------------------------

@pytest.mark.parametrize("raw,value", [
    ("65", 65), ("220.50", 220.5), ("[N/A]", None), ("N/A", None), ("[Not Supported]", None),
    ("[Unknown Error]", None), ("[Requested functionality has been deprecated]", None),
    ("nan", None), ("46068 MiB", 46068), ("100 %", 100), ("P2", "P2"),
])
def test_every_sentinel_means_null(raw, value):
    assert agent.parse_value(raw) == value


def test_parse_query_reads_a_real_noheader_nounits_line():
    # Ricks-Lab/gpu-utils#83: GeForce RTX 2080, driver 440.64; temperature.memory is bare N/A.
    capture = FIXTURES / "nvidia-smi" / "08-rtx2080-csv-noheader-nounits-440.txt"
    line = [l for l in capture.read_text().splitlines() if l and not l.startswith("#")][0]
    names = ["powerLimit", "powerMin", "powerMax", "memoryTotal", "vbios", "driverVersion", "name", "uuid",
             "powerDraw", "temperatureGpu", "temperatureMemory", "clockCore", "clockSm", "clockMemory",
             "utilizationGpu", "utilizationMemory", "fanSpeed", "pcieWidth", "pstate"]
    gpus, errors = agent.parse_query(line, names)
    gpu = gpus[0]
    assert errors == []
    assert (gpu["powerDraw"], gpu["temperatureMemory"], gpu["utilizationGpu"], gpu["pstate"]) == (176.98, None, 86, "P2")
    assert gpu["driverVersion"] == "440.64" and gpu["name"] == "GeForce RTX 2080"


def test_error_lines_become_errors_not_rows():
    output = ("0, 65, 100\nUnable to determine the device handle for GPU 0000:0B:00.0: Unknown Error\n"
              "2, 40, 7\n")
    gpus, errors = agent.parse_query(output, ["index", "temperatureGpu", "utilizationGpu"])
    assert sorted(gpus) == [0, 2] and errors[0].startswith("Unable to determine")


# ---- the gputil reader: real GPUtil, real subprocess, fake nvidia-smi ------------------------

def test_gputil_backend_gives_the_full_payload_from_a_real_capture(smi):
    smi.set(gpus=[L40S])
    [gpu] = gputil().sample()
    assert gpu == {"index": 0, "uuid": "GPU-00000000-0000-0000-0000-000000000000", "name": "NVIDIA L40S",
                   "vendor": "NVIDIA", "driverVersion": "595.80", "utilizationGpu": 100,
                   "utilizationMemory": 9, "memoryTotal": 46068, "memoryUsed": 0, "memoryFree": 45460,
                   "temperatureGpu": 63, "temperatureMemory": None, "powerDraw": 144.97,
                   "powerLimit": 350, "fanSpeed": None, "clockCore": 2520, "clockMemory": 9001,
                   "pstate": "P0"}
    # One extra query for what GPUtil lacks, one by GPUtil itself: two calls, no more.
    assert len(smi.calls()) == 2


def test_mig_gpu_reports_null_utilization_not_zero(smi):
    smi.set(gpus=[H100_MIG])
    [gpu] = gputil().sample()
    assert gpu["name"] == "NVIDIA H100 80GB HBM3"
    assert gpu["utilizationGpu"] is None and gpu["utilizationMemory"] is None and gpu["fanSpeed"] is None
    assert gpu["memoryTotal"] == 81559 and gpu["powerDraw"] == 98


def test_a_lost_gpu_keeps_its_own_index_and_the_others_keep_theirs(smi):
    # GPU 1 fell off the bus: nvidia-smi prints an error line in its place and numbers the others
    # truly (0, 2). The lost one was numbered from the count of readable GPUs, 2, and the server
    # refused every push ("gpus[2].index: 2 is used twice"): the whole PC left the dashboard.
    smi.set(gpus=[L40S, "lost:0000:0B:00.0", RTX2080S])
    l40s, lost, rtx = gputil().sample()
    assert (l40s["index"], l40s["name"]) == (0, "NVIDIA L40S")
    assert (rtx["index"], rtx["name"]) == (2, "NVIDIA GeForce RTX 2080 SUPER")
    assert rtx["utilizationGpu"] == 7 and rtx["fanSpeed"] == 38
    assert lost["index"] == 1 and lost["error"] == ("Unable to determine the device handle for GPU "
                                                    "0000:0B:00.0: Unknown Error")
    assert all(lost.get(field) is None for field in agent.SMI_FIELDS if field != "index")  # nulls, no readings
    body = agent.build_payload(gputil())
    checked = server_payload.validate(json.loads(json.dumps(agent._fit(body))))  # the server's own checks
    assert [(g["index"], g.get("name")) for g in checked["gpus"]] == [
        (0, "NVIDIA L40S"), (1, None), (2, "NVIDIA GeForce RTX 2080 SUPER")]


@pytest.mark.parametrize("gpus,readable,lost", [
    ([L40S, "lost:0000:0B:00.0", RTX2080S], [0, 2], [1]),  # the gap is where it is
    (["lost:0000:01:00.0", "lost:0000:0B:00.0", L40S], [2], [0, 1]),
    ([L40S, RTX2080S, "lost:0000:0C:00.0"], [0, 1], [2]),  # no gap: past the highest
])
def test_lost_gpus_take_the_lowest_indices_no_readable_gpu_uses(smi, gpus, readable, lost):
    smi.set(gpus=gpus)
    payload = agent.build_payload(gputil())
    assert [g["index"] for g in payload["gpus"]] == sorted(readable + lost)  # sorted by index
    assert [g["index"] for g in payload["gpus"] if g.get("error")] == lost
    server_payload.validate(payload)


@pytest.mark.parametrize("total", ["0 MiB", "[N/A]"])
def test_zero_or_unknown_memory_total_is_null_and_the_other_gpu_survives(smi, total):
    # GPUtil divides by memory.total: 0 crashed it (ZeroDivisionError), [N/A] gave NaN.
    smi.set(gpus=[L40S, RTX2080S], set={"0": {"memory.total": total}})
    gpus = gputil().sample()
    assert gpus[0]["memoryTotal"] is None and gpus[0]["name"] == "NVIDIA L40S"
    assert gpus[1]["memoryTotal"] == 8192 and gpus[1]["utilizationGpu"] == 7


@pytest.mark.parametrize("capture,message", [
    (DRIVER_NOT_LOADED, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed because it couldn't communicate"),
    (NO_GPUS, "nvidia-smi failed (exit 255): Failed to initialize NVML: No supported GPUs were found"),
])
def test_nvidia_smi_failures_are_one_clear_error(smi, capture, message):
    # GPUtil itself raises ValueError on this output (anderskm/gputil#26).
    smi.set(fail=capture)
    with pytest.raises(agent.GpuReadError) as error:
        gputil().sample()
    assert str(error.value).startswith(message)


def test_a_hung_nvidia_smi_times_out_and_gputil_is_never_called(smi):
    smi.set(hang=True)
    # 2 s: the fake is a Python program, and under the suite's load it took over 0.5 s to start and log its call.
    with pytest.raises(agent.GpuReadError, match="did not answer within 2 s"):
        gputil(timeout=2).sample()
    assert len(smi.calls()) == 1


def test_missing_nvidia_smi_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(agent.GpuReadError, match="nvidia-smi is not installed or not on PATH"):
        gputil().sample()


def test_auto_falls_back_to_gputil_when_nvml_cannot_load(smi):
    nvml = nvml_module([], fail_init=pynvml.NVMLError_LibraryNotFound)
    reader = agent.open_reader("auto", nvml=nvml)
    assert reader.name == "gputil" and reader.sample()[0]["name"] == "NVIDIA L40S"
    with pytest.raises(agent.GpuReadError, match="NVML backend unavailable"):
        agent.open_reader("nvml", nvml=nvml)


# ---- the NVML reader against a module with nvidia-ml-py's names and errors ------------------

MIB = 1 << 20


def test_nvml_memory_leaves_the_drivers_reserved_memory_out_of_used_as_nvidia_smi_does():
    # An idle H200, driver 580.159.04 (shared/nvidia-smi-samples/h200-580): nvidia-smi says 0 MiB used
    # of 143,771; v1 says 615 used (the reserved memory), v2 total 143,771, reserved 615, used 0, free 143,155.
    v1 = types.SimpleNamespace(total=143_771 * MIB, used=615 * MIB, free=143_155 * MIB)
    v2 = types.SimpleNamespace(version=pynvml.nvmlMemory_v2, total=143_771 * MIB, reserved=615 * MIB, used=0,
                               free=143_155 * MIB)
    h200 = nvml_gpu(name="NVIDIA H200", memory=v1, memory_v2=v2)
    [gpu] = agent.NvmlReader(nvml_module([h200])).sample()
    assert (gpu["memoryTotal"], gpu["memoryUsed"], gpu["memoryFree"]) == (143_771, 0, 143_155)
    # Busy: nvidia-smi 30,335 MiB used; v1 said 30,950.
    busy = dict(h200, memory=types.SimpleNamespace(total=143_771 * MIB, used=30_950 * MIB, free=112_821 * MIB),
                memory_v2=types.SimpleNamespace(total=143_771 * MIB, reserved=615 * MIB, used=30_335 * MIB,
                                                free=112_821 * MIB))
    assert agent.NvmlReader(nvml_module([busy])).sample()[0]["memoryUsed"] == 30_335


def test_nvml_memory_on_a_driver_without_v2_is_v1():
    nvml = nvml_module([nvml_gpu()])  # no memory_v2: nvmlDeviceGetMemoryInfo_v2 is not found
    reader = agent.NvmlReader(nvml)
    assert [g["memoryUsed"] for g in reader.sample() + reader.sample()] == [6144, 6144]
    assert reader._memory_v2 is None  # asked once, not every sample

def test_nvml_backend_reads_everything_in_the_payload_units():
    [gpu] = agent.NvmlReader(nvml_module([nvml_gpu(memTemp=72)])).sample()
    assert gpu == {"index": 0, "uuid": "GPU-5a1c0000-0000-0000-0000-000000000000",
                   "name": "NVIDIA GeForce RTX 3080", "vendor": "NVIDIA", "driverVersion": "560.94",
                   "utilizationGpu": 80, "utilizationMemory": 41, "memoryTotal": 10240, "memoryUsed": 6144,
                   "memoryFree": 4096, "temperatureGpu": 65, "temperatureMemory": 72, "powerDraw": 220.5,
                   "powerLimit": 320.0, "fanSpeed": 55, "clockCore": 1905, "clockMemory": 9501,
                   "pstate": "P2", "processes": [{"pid": 4242, "name": "python3", "memoryUsed": 2048},
                                                 {"pid": 77, "name": "game.exe", "memoryUsed": None}]}


def test_nvml_not_supported_means_null_as_on_mig_and_passive_cards():
    gpu = nvml_gpu(rates=pynvml.NVMLError_NotSupported, fan=pynvml.NVMLError_NotSupported,
                   power_mw=pynvml.NVMLError_NotSupported, compute=pynvml.NVMLError_NoPermission)
    [read] = agent.NvmlReader(nvml_module([gpu])).sample()
    assert (read["utilizationGpu"], read["fanSpeed"], read["powerDraw"], read["temperatureMemory"]) == (None,) * 4
    assert read["temperatureGpu"] == 65 and read["processes"] == [{"pid": 77, "name": "game.exe", "memoryUsed": None}]


def test_nvml_lost_gpu_is_an_error_entry_at_its_own_index_and_the_others_report():
    reader = agent.NvmlReader(nvml_module([nvml_gpu(), pynvml.NVMLError_GpuIsLost, nvml_gpu()]))
    gpus = reader.sample()
    assert [g.get("error") for g in gpus] == [None, "NVML: GPU is lost", None]
    assert [g["index"] for g in gpus] == [0, 1, 2] and gpus[2]["utilizationGpu"] == 80
    server_payload.validate(agent.build_payload(reader))

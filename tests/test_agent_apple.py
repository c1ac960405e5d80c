"""The Apple reader: its parsing on real captures, its edges (ioreg, sysctl, powermetrics) as parameters.

macOS does not run here, so what it prints is fed in from tests/fixtures/gpus/apple (SOURCE.md
beside each file names where it came from).
"""
import subprocess

import pytest

import agent
from agent_fakes import GPUS
from gpustats.ingest import payload as server_payload

APPLE = GPUS / "apple"
M1_PRO = (APPLE / "ioreg-m1pro-exelban-stats-1094.txt").read_text()
M4 = (APPLE / "ioreg-m4-unattributed-go-test.txt").read_text()


def test_an_m1_pro_reports_its_busy_percent_and_the_unified_memory_in_use():
    [gpu] = agent.apple_gpus(M1_PRO, 16384, chip="Apple M1 Pro")  # the capture has no "model" line
    assert gpu == {"index": 0, "uuid": None, "name": "Apple M1 Pro", "vendor": "Apple", "driverVersion": None,
                   "utilizationGpu": 2, "utilizationMemory": None, "temperatureGpu": None,
                   "temperatureMemory": None, "powerDraw": None, "powerLimit": None, "fanSpeed": None,
                   "clockCore": None, "clockMemory": None, "pstate": None, "processes": [],
                   "memoryShared": True, "memoryTotal": 16384, "memoryUsed": 325, "memoryFree": 16059}
    assert server_payload.validate({"gpus": [gpu]})["gpus"][0] == gpu


def test_an_m4_names_its_cores_and_reads_device_utilization_not_the_renderer_or_the_drivers_memory():
    [gpu] = agent.apple_gpus(M4, 24576)
    assert gpu["name"] == "Apple M4 (10-core GPU)"
    assert gpu["utilizationGpu"] == 17  # Device Utilization %; Renderer and Tiler say 15
    assert gpu["memoryUsed"] == 411  # "In use system memory", not "In use system memory (driver)" = 0


def test_without_device_utilization_the_busier_of_renderer_and_tiler_is_used():
    text = M1_PRO.replace('"Device Utilization %"=2,', "").replace('"Tiler Utilization %"=2', '"Tiler Utilization %"=9')
    assert agent.apple_gpus(text, 16384)[0]["utilizationGpu"] == 9


@pytest.mark.parametrize("capture,clock,power", [
    ("powermetrics-m1pro-applegpuinfo-7.txt", 389, 0.01),
    ("powermetrics-m2-applegpuinfo-6.txt", 444, 0.0),
    ("powermetrics-m3-applegpuinfo-15-partial.txt", 338, None),  # cut before its GPU Power line
])
def test_powermetrics_gives_the_clock_and_power(capture, clock, power):
    assert agent.parse_powermetrics((APPLE / capture).read_text()) == {"clockCore": clock, "powerDraw": power}


def fake_mac(outputs):
    """A `run` that answers ioreg, sysctl and powermetrics as a Mac does, and records each call."""
    calls = []

    def run(args, **kwargs):
        calls.append(args[0])
        assert kwargs.get("timeout"), "every subprocess has a timeout"
        answer = outputs[args[0]]
        if isinstance(answer, Exception):
            raise answer
        return subprocess.CompletedProcess(args, 0, answer, "")
    return run, calls


def test_the_apple_backend_adds_powermetrics_only_as_root():
    power = (APPLE / "powermetrics-m1pro-applegpuinfo-7.txt").read_text()
    run, calls = fake_mac({"ioreg": M1_PRO, "sysctl": "Apple M1 Pro\n", "powermetrics": power})
    [gpu] = agent.AppleReader(run=run, memory_total_mib=16384, is_root=False).sample()
    assert (gpu["name"], gpu["clockCore"], gpu["powerDraw"]) == ("Apple M1 Pro", None, None)
    assert "powermetrics" not in calls
    [gpu] = agent.AppleReader(run=run, memory_total_mib=16384, is_root=True).sample()
    assert (gpu["clockCore"], gpu["powerDraw"]) == (389, 0.01)


def test_an_ioreg_that_hangs_is_one_clear_error():
    run, _ = fake_mac({"ioreg": subprocess.TimeoutExpired("ioreg", 5)})
    with pytest.raises(agent.GpuReadError, match="ioreg could not run"):
        agent.AppleReader(run=run, memory_total_mib=16384)

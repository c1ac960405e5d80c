"""The Jetson reader on captured tegrastats lines and sysfs trees (tests/fixtures/gpus/jetson)."""
import subprocess

import pytest

import agent
from agent_fakes import GPUS, FakeRoot
from gpustats.ingest import payload as server_payload

JETSON = GPUS / "jetson"


def lines(name):
    return [line for line in (JETSON / name).read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("capture,line,expected", [
    # AGX Xavier, JetPack 4.2 (gtop PR 7): no clock after GR3D_FREQ, the rail is "GPU now/avg" in mW.
    ("tegrastats-agx-xavier.txt", 0, {"utilizationGpu": 0, "clockCore": None, "temperatureGpu": 30.5,
                                      "powerDraw": 0.46, "memoryUsed": 14700, "memoryTotal": 15692}),
    # AGX Orin, JetPack 7.2 (jetson_stats' tests): gpu@ in lower case, GR3D_FREQ 12%@[1300,1300].
    ("tegrastats-agx-orin-jp7.txt", 0, {"utilizationGpu": 12, "clockCore": 1300, "temperatureGpu": 47.6,
                                        "powerDraw": 5.14, "memoryUsed": 20642, "memoryTotal": 62817}),
    # Orin Nano/NX (beszel's tests): the GPU shares VDD_CPU_GPU_CV with the CPUs.
    ("tegrastats-orin-nano-nx-8gb-beszel.txt", 0, {"utilizationGpu": 63, "clockCore": 621, "temperatureGpu": 53.3,
                                                   "powerDraw": 4.67, "memoryUsed": 6185, "memoryTotal": 7620}),
    ("tegrastats-orin-nano-nx-8gb-beszel.txt", 1, {"utilizationGpu": 0, "clockCore": None, "temperatureGpu": 49.0,
                                                   "powerDraw": 0.52, "memoryUsed": 3452, "memoryTotal": 7620}),
    # TX2 (beszel's tests): VDD_SYS_GPU, not VDD_SYS_SOC or VDD_IN.
    ("tegrastats-tx2-beszel.txt", 0, {"utilizationGpu": 0, "clockCore": 114, "temperatureGpu": 39.5,
                                      "powerDraw": 0.18, "memoryUsed": 3276, "memoryTotal": 7859}),
    # TX1, old L4T (gtop): "GR3D 0%@998", no temperature, no rails.
    ("tegrastats-tx1-legacy-gtop.txt", 0, {"utilizationGpu": 0, "clockCore": 998, "temperatureGpu": None,
                                           "powerDraw": None, "memoryUsed": 1104, "memoryTotal": 3995}),
])
def test_tegrastats_lines_from_tx1_to_orin(capture, line, expected):
    assert agent.parse_tegrastats(lines(capture)[line]) == expected


def test_the_jetson_backend_runs_tegrastats_with_a_timeout_where_sysfs_is_not_readable(tmp_path):
    orin = lines("tegrastats-agx-orin-jp7.txt")[0]
    root = FakeRoot(tmp_path / "host")

    def run(args, **kwargs):
        assert args[0] == "/usr/bin/tegrastats" and kwargs["timeout"]
        raise subprocess.TimeoutExpired(args, kwargs["timeout"], output=(orin + "\n").encode())  # it never ends
    reader = agent.JetsonReader(agent.SysRoot(root.path), run=run, which=lambda name: "/usr/bin/tegrastats")
    [gpu] = reader.sample()
    assert (gpu["vendor"], gpu["memoryShared"], gpu["utilizationGpu"], gpu["memoryFree"]) == ("NVIDIA", True, 12, 42175)
    assert server_payload.validate({"gpus": [gpu]})["gpus"][0] == gpu


def test_the_jetson_backend_reads_load_and_devfreq_from_sysfs(tmp_path):
    # jetson_stats' own fake iGPU tree: 10101010.gpu, of_node name "gpu", load 900 (per mille), 1 MHz.
    host = tmp_path / "host"
    host.mkdir()
    (host / "sys").symlink_to(JETSON / "jtop-fake-igpu" / "fake_sys")
    (host / "proc").mkdir()
    # The AGX Orin capture's RAM (20,642 of 62,817 MB), as /proc/meminfo would say it.
    (host / "proc" / "meminfo").write_text(f"MemTotal: {62817 * 1024} kB\nMemAvailable: {(62817 - 20642) * 1024} kB\n")
    root = agent.SysRoot(host)
    assert agent.JetsonReader.present(root)
    [gpu] = agent.JetsonReader(root, which=lambda name: None).sample()
    assert (gpu["utilizationGpu"], gpu["clockCore"], gpu["memoryTotal"], gpu["memoryUsed"]) == (90, 1, 62817, 20642)
    assert (gpu["temperatureGpu"], gpu["powerDraw"], gpu["name"]) == (None, None, "NVIDIA Jetson GPU")


def test_no_jetson_is_one_clear_error(tmp_path):
    root = FakeRoot(tmp_path / "host")
    assert not agent.JetsonReader.present(agent.SysRoot(root.path))
    with pytest.raises(agent.GpuReadError, match="no Jetson GPU"):
        agent.JetsonReader(agent.SysRoot(root.path), which=lambda name: None)

"""Every vendor in one push: what `auto` opens on each system, the indices it gives, and --sys-root end to end."""
import json
import os
import subprocess
import sys
import time

import pynvml
import pytest
from playwright.sync_api import expect

import agent
from agent_fakes import GPUS, FakeRoot, nvml_gpu, nvml_module
from conftest import KEYS, ROOT

INTEL = GPUS / "intel"


@pytest.fixture
def host(tmp_path):
    """A PC with an RX 580 at 0000:09:00.0, an i915 iGPU at 0000:00:02.0 and simpledrm's card0."""
    root = FakeRoot(tmp_path / "host")
    root.simpledrm("card0")
    root.amdgpu_ids()
    root.card("card1", "amd/rx580")
    root.intel_card("card2", "i915", "0000:00:02.0", card_files=INTEL / "i915-smc45-card0" / "card")
    return root


def auto(root, **edges):
    return agent.open_reader("auto", root=agent.SysRoot(root.path), platform="linux", which=lambda name: None, **edges)


def test_auto_reads_every_vendor_in_one_push_with_nvidias_indices_first(host):
    reader = auto(host, nvml=nvml_module([nvml_gpu(), nvml_gpu(name="NVIDIA GeForce RTX 4090")]))
    assert reader.name == "nvml+amd+intel"
    payload = agent.build_payload(reader)
    assert [(g["index"], g["vendor"], g["name"]) for g in payload["gpus"]] == [
        (0, "NVIDIA", "NVIDIA GeForce RTX 3080"), (1, "NVIDIA", "NVIDIA GeForce RTX 4090"),
        (2, "AMD", "AMD Radeon RX 580 Series"), (3, "Intel", "Intel GPU")]
    assert payload["agent"]["backend"] == "nvml+amd+intel"
    assert reader.describe(0) == "nvml"
    assert reader.describe(2).startswith("amd: ") and "card1 (0000:09:00.0)" in reader.describe(2)
    assert reader.describe(3).startswith("intel (i915): ")


def test_a_reader_that_fails_costs_only_its_own_gpus_and_the_others_keep_their_indices(host):
    gpus = [nvml_gpu(), nvml_gpu()]
    nvml = nvml_module(gpus)
    reader = auto(host, nvml=nvml)
    assert [g["index"] for g in reader.sample()] == [0, 1, 2, 3]

    def count():
        raise pynvml.NVMLError_Unknown()
    nvml.nvmlDeviceGetCount = count  # the NVIDIA driver falls over
    after = reader.sample()
    assert [(g["index"], g.get("vendor")) for g in after] == [(0, "NVIDIA"), (2, "AMD"), (3, "Intel")]
    assert after[0]["error"].startswith("NVML could not count GPUs")
    assert after[1]["utilizationGpu"] == 11  # the RX 580 is still GPU 2: its history goes on


def test_a_reader_whose_first_sample_fails_keeps_the_slots_of_the_gpus_it_knows(host):
    nvml = nvml_module([nvml_gpu(), nvml_gpu()])
    count = nvml.nvmlDeviceGetCount
    nvml.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(pynvml.NVMLError_Unknown())
    reader = auto(host, nvml=nvml)
    reader.readers[0].count = 2  # what NVML counted when it opened, before it fell over
    assert [g["index"] for g in reader.sample()] == [0, 2, 3]
    nvml.nvmlDeviceGetCount = count  # it recovers: its GPUs take their slots, the others keep theirs
    assert [(g["index"], g["vendor"]) for g in reader.sample()] == [
        (0, "NVIDIA"), (1, "NVIDIA"), (2, "AMD"), (3, "Intel")]


def test_a_readers_own_bug_costs_its_gpus_not_the_agent(host):
    reader = auto(host, nvml=nvml_module([nvml_gpu()]))

    def broken():
        raise KeyError("hwmon")
    reader.readers[1].sample = broken  # the AMD reader
    gpus = agent.build_payload(reader)["gpus"]
    assert [(g["index"], g["vendor"]) for g in gpus] == [(0, "NVIDIA"), (1, "AMD"), (2, "Intel")]
    assert gpus[1]["error"] == "amd: KeyError: 'hwmon'"


def test_without_nvml_auto_reads_the_other_vendors_and_nvidia_smi_only_where_installed(host):
    nvml = nvml_module([], fail_init=pynvml.NVMLError_LibraryNotFound)
    assert auto(host, nvml=nvml).name == "amd+intel"


def test_no_gpu_at_all_is_one_line_naming_what_was_looked_for(tmp_path):
    root = FakeRoot(tmp_path / "empty")
    nvml = nvml_module([], fail_init=pynvml.NVMLError_LibraryNotFound)
    with pytest.raises(agent.GpuReadError) as error:
        auto(root, nvml=nvml)
    assert str(error.value) == (
        "no GPU found: no NVIDIA driver (NVML: NVML could not start: NVML Shared Library Not Found); "
        "no AMD GPU with the amdgpu driver under /sys/class/drm; no Intel GPU with the i915 or xe driver under "
        "/sys/class/drm")


def test_on_a_jetson_nvml_which_knows_only_a_name_is_left_out(tmp_path):
    host = tmp_path / "jetson"
    host.mkdir()
    (host / "sys").symlink_to(GPUS / "jetson" / "jtop-fake-igpu" / "fake_sys")
    (host / "proc").mkdir()
    nvml = nvml_module([nvml_gpu(name="Orin (nvgpu)", rates=pynvml.NVMLError_NotSupported)])
    reader = agent.open_reader("auto", root=agent.SysRoot(host), platform="linux", nvml=nvml, which=lambda n: None)
    assert reader.name == "jetson" and reader.sample()[0]["utilizationGpu"] == 90


def test_nvml_processes_carry_their_user_from_proc(host):
    host.process(4242, "python3", 1000, user="ana")
    root = agent.SysRoot(host.path)
    [gpu] = agent.NvmlReader(nvml_module([nvml_gpu()]), process=root.process).sample()
    assert gpu["processes"][0] == {"pid": 4242, "name": "python3", "memoryUsed": 2048, "user": "ana"}
    assert "user" not in gpu["processes"][1]  # pid 77 is not in this /proc: no user, not a guess


def test_on_windows_auto_leaves_nvidia_to_nvml_and_the_counters_read_the_rest():
    from test_agent_windows import LAPTOP, Counters, laptop_counters, names
    edge = (Counters([laptop_counters()]), lambda: LAPTOP, names)
    reader = agent.open_reader("auto", platform="win32", nvml=nvml_module([nvml_gpu(name="NVIDIA GeForce GTX 1050")]),
                                 windows=edge, which=lambda n: None)
    assert reader.name == "nvml+windows"
    assert [(g["index"], g["name"]) for g in reader.sample()] == [
        (0, "NVIDIA GeForce GTX 1050"), (1, "Intel(R) HD Graphics 630")]


def test_a_service_that_starts_before_the_gpu_driver_keeps_trying():
    attempts = []

    def opener():
        attempts.append(1)
        if len(attempts) < 3:
            raise agent.GpuReadError("no GPU found: no AMD GPU with the amdgpu driver under /sys/class/drm")
        return agent.SimulatedReader(1, seed=1)
    pending = agent.PendingReader(opener)
    assert agent.build_payload(pending)["error"].startswith("no GPU found")
    assert agent.build_payload(pending)["agent"]["backend"] == "none"
    third = agent.build_payload(pending)
    assert "error" not in third and third["agent"]["backend"] == "simulated" and len(third["gpus"]) == 1


# ---- the real agent process, --sys-root ------------------------------------------------------------

def run_agent(*args, env=None, no_nvidia=None):
    """Run agent.py with no NVIDIA driver to find, even on a PC that has one: only the fake tree's GPUs."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PUSH_URL", "DEVICE_KEY", "DROPLET_PUSH_URL")}
    if no_nvidia:
        no_nvidia.mkdir(exist_ok=True)
        (no_nvidia / "pynvml.py").write_text("raise ImportError('no NVML in this test')\n")
        environ.update(PYTHONPATH=f"{no_nvidia}{os.pathsep}{environ.get('PYTHONPATH', '')}", PATH="/nonexistent")
    return subprocess.run([sys.executable, str(ROOT / "agent.py"), *args], env={**environ, **(env or {})},
                          capture_output=True, text=True, timeout=30)


def test_dry_run_with_sys_root_says_which_reader_read_each_gpu(host, tmp_path):
    result = run_agent("--dry-run", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [g["name"] for g in payload["gpus"]] == ["AMD Radeon RX 580 Series", "Intel GPU"]
    lines = result.stderr.splitlines()
    assert lines[1:] == [
        f"agent: GPU 0 AMD Radeon RX 580 Series: read by amd: {host.path}/sys/class/drm/card1 (0000:09:00.0)",
        f"agent: GPU 1 Intel GPU: read by intel (i915): {host.path}/sys/class/drm/card2 (0000:00:02.0)"]
    assert lines[0].endswith(f"{host.path} has no proc/stat, so pushes carry no system: "
                             "mount the host's / there whole (-v /:/host:ro)")  # a tree of GPU files alone
    one = run_agent("--dry-run", "--backend", "intel", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim")
    assert [g["vendor"] for g in json.loads(one.stdout)["gpus"]] == ["Intel"]


def test_a_sys_root_without_sys_is_one_line_naming_the_flag(tmp_path):
    result = run_agent("--dry-run", "--sys-root", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr == f"agent: --sys-root: {tmp_path} has no sys directory (mount the host's / there: -v /:/host:ro)\n"


def test_the_real_agent_reads_an_amd_and_an_intel_tree_and_the_page_shows_both(server, page, host, tmp_path):
    host.process(2201, "blender", 1000, [(GPUS / "amd" / "fdinfo" / "amdgpu_top-issue87-dgpu-0000-08-00.0.txt")
                                         .read_text().replace("0000:08:00.0", "0000:09:00.0")], user="ana")
    page.goto(server.url + "/?pc=rig-5")  # rig-5's detail: its GPUs' tiles
    expect(page.locator("#connection")).to_have_text("live")
    started = time.monotonic()
    result = run_agent("--once", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim",
                       env={"PUSH_URL": server.url + "/push-sse", "DEVICE_KEY": KEYS["rig-5"]})
    assert result.returncode == 0, result.stderr
    card = page.locator('section.device[data-device="rig-5"]')
    expect(card.locator("article.gpu .gpu-name")).to_have_text(["AMD Radeon RX 580 Series", "Intel GPU"])
    expect(card.locator('article.gpu[data-index="0"] .processes .puser')).to_have_text("ana")
    expect(card.locator('article.gpu[data-index="0"] .stat', has=page.locator("dt", has_text="Temp"))
           .locator("dd")).to_have_text("44 °C")
    expect(card.locator('article.gpu[data-index="1"] .stat', has=page.locator("dt", has_text="Clocks"))
           .locator("dd")).to_have_text("core 350 · memory – MHz")
    assert time.monotonic() - started < 15
    assert page.console_errors == []

"""The AMD reader on captured amdgpu sysfs trees (tests/fixtures/gpus/amd, each with its SOURCE.md)."""
import shutil

import pytest

import agent
from agent_fakes import GPUS, FakeRoot
from gpustats.ingest import payload as server_payload


@pytest.fixture
def root(tmp_path):
    return FakeRoot(tmp_path / "host")


def amd(root, **edges):
    """The AMD reader on the fake root; no amd-smi or rocm-smi unless a test gives one."""
    return agent.AmdReader(agent.SysRoot(root.path, reuse_s=0, rescan_s=0), **{"which": lambda name: None, **edges})


def test_an_rx_580_gives_every_field_its_driver_exposes(root):
    root.amdgpu_ids()
    root.card("card1", "amd/rx580")
    [gpu] = amd(root).sample()
    assert gpu == {"index": 0, "uuid": None, "name": "AMD Radeon RX 580 Series", "vendor": "AMD",
                   "driverVersion": "6.8.0-49-generic", "memoryTotal": 4096, "memoryUsed": 512, "memoryFree": 3584,
                   "processes": [], "utilizationGpu": 11, "utilizationMemory": 2, "temperatureGpu": 44,
                   "temperatureMemory": None, "powerDraw": 41.0, "powerLimit": 155, "fanSpeed": 14,
                   "clockCore": 798, "clockMemory": 1750}
    # What the reader sends is what the server keeps.
    assert server_payload.validate({"gpus": [gpu]})["gpus"][0] == gpu


def test_an_rx_7800_xt_reads_edge_junction_and_memory_temperatures_and_a_stopped_fan(root):
    root.amdgpu_ids()
    root.card("card1", "amd/rx7800xt")
    [gpu] = amd(root).sample()
    assert gpu["name"] == "AMD GPU 1002:747e"  # no revision file: 747E is a 7800 XT, 7800M or 7700 XT
    assert (gpu["temperatureGpu"], gpu["temperatureMemory"]) == (37, 56)
    assert (gpu["fanSpeed"], gpu["powerDraw"], gpu["powerLimit"]) == (0, 10.0, 222)  # zero-RPM mode: a true 0
    # The capture has no mem_info files: memory is unknown, not 0 MiB.
    assert (gpu["memoryTotal"], gpu["memoryUsed"], gpu["utilizationGpu"]) == (None, None, 0)
    assert (gpu["clockCore"], gpu["clockMemory"]) == (0, 96)  # graphics clock gated while idle


def test_an_rx_9070_xt_without_fan_files_has_no_fan_and_its_pci_id_names_it(root):
    root.amdgpu_ids()
    root.card("card1", "amd/rx9070xt")
    [gpu] = amd(root).sample()
    assert gpu["fanSpeed"] is None and gpu["utilizationGpu"] == 9
    assert (gpu["temperatureGpu"], gpu["temperatureMemory"], gpu["powerDraw"], gpu["powerLimit"]) == (39, 62, 19.0, 330)
    assert (gpu["clockCore"], gpu["clockMemory"]) == (59, 96)
    # No revision file in the capture: amdgpu.ids names 7550 three ways (9070 XT, GRE, 9070), so no guess.
    assert gpu["name"] == "AMD GPU 1002:7550"


def test_nul_padded_files_of_an_rx_6900_xt_keep_their_values(root):
    root.amdgpu_ids()
    root.card("card0", "amd/rx6900xt")
    [gpu] = amd(root).sample()
    assert gpu["uuid"] == "946d7e1ef9b172dd" and gpu["name"] == "AMD Radeon RX 6900 XT"
    assert (gpu["utilizationGpu"], gpu["memoryUsed"], gpu["temperatureGpu"], gpu["powerDraw"]) == (3, 637, 56, 36.0)


def test_a_vega_64_without_hwmon_reports_nulls_there_not_zeros(root):
    root.amdgpu_ids()
    root.card("card0", "amd/vega64-procfs")
    [gpu] = amd(root).sample()
    assert gpu["name"] == "AMD Radeon RX Vega" and gpu["utilizationGpu"] == 4
    assert (gpu["memoryTotal"], gpu["memoryUsed"]) == (8176, 1421)
    assert all(gpu[k] is None for k in ("temperatureGpu", "powerDraw", "powerLimit", "fanSpeed"))
    assert (gpu["clockCore"], gpu["clockMemory"]) == (852, 167)  # the * lines of pp_dpm_sclk and pp_dpm_mclk
    assert "error" not in gpu


def test_cards_are_found_by_driver_and_ordered_by_pci_address_not_card_number(root):
    root.simpledrm("card0")  # the firmware framebuffer takes card0 on many machines
    root.card("card1", "amd/rx580")  # 0000:09:00.0
    root.card("card2", "amd/rx6900xt")  # 0000:0c:00.0
    root.card("card3", "amd/rx7800xt")  # 0000:2f:00.0
    reader = amd(root)
    assert [address for address, _, _ in reader.cards] == ["0000:09:00.0", "0000:0c:00.0", "0000:2f:00.0"]
    assert [g["index"] for g in reader.sample()] == [0, 1, 2]
    assert reader.describe(2).startswith("amd: ") and reader.describe(2).endswith("card3 (0000:2f:00.0)")


def test_no_amd_card_is_one_clear_error(root):
    root.simpledrm()
    with pytest.raises(agent.GpuReadError, match="no AMD GPU with the amdgpu driver"):
        amd(root)


def test_a_card_that_vanishes_in_a_reset_costs_only_itself(root, tmp_path):
    shutil.copytree(GPUS / "amd" / "rx580", tmp_path / "rx580")
    root.card("card0", "amd/rx6900xt")
    card = root.path / "sys" / "class" / "drm" / "card1"
    card.mkdir()
    (card / "device").symlink_to(tmp_path / "rx580" / "device")
    reader = amd(root)
    shutil.rmtree(tmp_path / "rx580")  # the device dropped off the bus
    second, first = reader.sample()  # 0000:09:00.0 sorts first
    assert "gone" in second["error"] and first["utilizationGpu"] == 3


def test_a_card_in_runtime_suspend_is_idle_and_its_hwmon_is_not_read(root, tmp_path, monkeypatch):
    tree = tmp_path / "rx6900xt"
    shutil.copytree(GPUS / "amd" / "rx6900xt", tree)
    (tree / "device" / "power" / "runtime_status").write_text("suspended\n")
    card = root.path / "sys" / "class" / "drm" / "card1"
    card.mkdir()
    (card / "device").symlink_to(tree / "device")
    read = agent.read_int

    def no_waking(path):  # hwmon, the busy percent and the dpm tables wake a sleeping card: none is read
        assert "hwmon" not in str(path) and "busy" not in str(path), f"read {path}, which wakes the card"
        return read(path)
    monkeypatch.setattr(agent, "read_int", no_waking)
    [gpu] = amd(root).sample()
    assert (gpu["utilizationGpu"], gpu["pstate"], gpu["memoryUsed"]) == (0, "suspended", 637)
    assert all(k not in gpu for k in ("temperatureGpu", "powerDraw", "clockCore"))


@pytest.mark.parametrize("text,mhz", [
    ("0: 300Mhz \n1: 600Mhz \n2: 900Mhz *\n3: 1145Mhz \n", 900),  # Polaris
    ("0: 500Mhz\n1: 0Mhz *\n2: 2124Mhz\n", 0),  # RDNA3 idle: the middle line is now, gated
    ("0: 500Mhz\n1: 2100Mhz\n2: 2124Mhz\n", None),  # no * line
    (None, None),
])
def test_the_star_line_of_pp_dpm_is_the_present_clock(text, mhz):
    assert agent.parse_dpm_clock(text) == mhz


def test_an_apu_counts_gtt_with_its_vram_carve_out_and_says_its_memory_is_shared(root):
    root.amdgpu_ids()
    root.card("card1", "amd/lact-phoenix/card1")
    [gpu] = amd(root).sample()
    assert gpu["name"] == "AMD Radeon 780M Graphics" and gpu["memoryShared"] is True
    # 4 GiB carve-out + 29,977 MiB GTT: what the iGPU can use; 1,214 + 202 MiB in use.
    assert (gpu["memoryTotal"], gpu["memoryUsed"]) == (4096 + 29978, 1214 + 202)
    assert (gpu["powerDraw"], gpu["temperatureGpu"], gpu["clockCore"], gpu["fanSpeed"]) == (3.1, 25, 800, None)


FDINFO = GPUS / "amd" / "fdinfo"


def test_processes_come_from_fdinfo_with_their_user_once_per_client(root):
    # Two kernel-patch captures: clients 30 and 4 on 0000:04:00.0 (5.19+ keys and the 6.9+ drm-total-*).
    gfx = (FDINFO / "kernel-patch-2024-05-06-v1-drm-engine-gfx.txt").read_text()
    compute = (FDINFO / "kernel-patch-2024-05-20-v2-drm-engine-compute.txt").read_text()
    root.card("card1", "amd/rx6900xt", address="0000:04:00.0")
    root.process(2201, "blender", 1000, [gfx, gfx], user="ana")  # the same client twice (a dup'ed fd)
    root.process(3300, "python3", 1001, [compute], user="ben")
    root.process(4400, "Xorg", 0, [])  # no DRM descriptor: not a GPU process
    [gpu] = amd(root).sample()
    assert gpu["processes"] == [{"pid": 2201, "name": "blender", "user": "ana", "memoryUsed": 532},
                                {"pid": 3300, "name": "python3", "user": "ben", "memoryUsed": 44}]


def test_a_client_on_another_gpu_is_not_this_ones(root):
    other = (FDINFO / "amdgpu_top-issue87-dgpu-0000-08-00.0.txt").read_text()  # drm-pdev: 0000:08:00.0
    mine = (FDINFO / "kernel-patch-2024-05-06-v1-drm-engine-gfx.txt").read_text()  # 0000:04:00.0
    root.card("card1", "amd/rx6900xt", address="0000:04:00.0")
    root.card("card2", "amd/rx580", address="0000:08:00.0")
    root.process(10, "game", 1000, [other, mine])
    first, second = amd(root).sample()
    assert [p["memoryUsed"] for p in first["processes"]] == [532]
    assert [p["memoryUsed"] for p in second["processes"]] == [2]  # 2,068 KiB of VRAM
    assert first["processes"][0]["user"] == "1000"  # no passwd entry: the uid, not a guess


def test_an_apus_process_memory_is_vram_and_gtt(root):
    # nvtop PR 492: a Radeon 890M on kernel 6.18, grep of drm-memory: the carve-out is tiny, GTT is the rest.
    lines = (FDINFO / "nvtop-pr492-radeon890m-k6.18-grep-drm-memory.txt").read_text()
    root.card("card1", "amd/lact-phoenix/card1", address="0000:c4:00.0")
    root.process(77, "llama-server", 1000, ["drm-driver:\tamdgpu\ndrm-pdev:\t0000:c4:00.0\ndrm-client-id:\t9\n" + lines])
    [gpu] = amd(root).sample()
    assert gpu["processes"][0]["memoryUsed"] == round((5348 + 25258000) / 1024)


def test_power1_input_is_read_where_power1_average_is_missing(root, tmp_path):
    # nokyan/resources#270: an RX 580 on kernel 6.9 with power1_input and no power1_average
    # (the listing is in fixtures/gpus/amd/rx580-power1-input); its values come from the rx580 capture.
    tree = tmp_path / "rx580"
    shutil.copytree(GPUS / "amd" / "rx580", tree)
    hwmon = tree / "device" / "hwmon" / "hwmon4"
    (hwmon / "power1_average").rename(hwmon / "power1_input")
    root.card("card1", str(tree / "device"))
    [gpu] = amd(root).sample()
    assert gpu["powerDraw"] == 41.0


ROCM = GPUS / "rocm"


@pytest.mark.parametrize("capture,address,expected", [
    ("rocm-smi-4.3.0-rx6700xt.json", "0000:07:00.0", {"utilizationGpu": 0, "memoryTotal": 12272, "memoryUsed": 1548,
                                                      "temperatureGpu": 45, "powerDraw": 6, "clockCore": 500}),
    ("rocm-smi-6.0.2-rx6700xt.json", "0000:07:00.0", {"powerDraw": None, "clockMemory": 96}),  # "N/A (Secondary die)"
    ("rocm-smi-6.1.2-rx6700xt.json", "0000:07:00.0", {"clockCore": 0, "memoryUsed": 1500}),
    ("rocm-smi-legacy-vega10xt.json", "0000:04:00.0", {"fanSpeed": 13, "temperatureMemory": 92, "clockCore": 1269}),
])
def test_rocm_smi_json_across_rocm_versions(capture, address, expected):
    found = agent.parse_rocm_smi((ROCM / capture).read_text())
    assert {k: found[address][k] for k in expected} == expected


def test_rocm_smi_json_of_six_mi100s_keys_each_by_its_pci_bus():
    found = agent.parse_rocm_smi((ROCM / "rocm-smi-5.7.1-mi100.json").read_text())
    assert len(found) == 6 and sorted(g["powerDraw"] for g in found.values()) == [35, 37, 39, 39, 39, 40]


def test_amd_smi_metric_json_in_both_shapes():
    listed = (ROCM / "amd-smi-list-rx6600-luckylinux.json").read_text()
    expected = {0: {"utilizationGpu": 1, "memoryTotal": 8176, "memoryUsed": 202, "temperatureGpu": 36,
                    "temperatureMemory": 32, "powerDraw": 6, "fanSpeed": 0, "clockCore": 800, "clockMemory": 541}}
    assert agent.parse_amd_smi(listed) == expected
    # ROCm 7's amd-smi wraps the list in {"gpu_data": [...]} and may print Python warnings before it.
    wrapped = "SyntaxWarning: invalid escape sequence '\\d'\n" + '{"gpu_data": ' + listed + "}"
    assert agent.parse_amd_smi(wrapped) == expected
    assert agent.parse_amd_smi("amd-smi: command failed") == {}


def test_an_installed_amd_smi_fills_only_what_sysfs_left_null_at_most_once_a_minute(root):
    root.card("card1", "amd/rx9070xt")  # no fan files
    calls, now = [], [1000.0]
    listed = [(ROCM / "amd-smi-list-rx6600-luckylinux.json").read_text()]

    def run(args, **kwargs):
        calls.append(args)
        assert kwargs["timeout"]
        return agent.subprocess.CompletedProcess(args, 0, listed[0], "")
    reader = amd(root, run=run, which=lambda name: f"/opt/rocm/bin/{name}" if name == "amd-smi" else None,
                 clock=lambda: now[0])
    [gpu] = reader.sample()
    assert gpu["fanSpeed"] == 0 and gpu["utilizationGpu"] == 9  # sysfs's busy percent stands
    assert calls == [["/opt/rocm/bin/amd-smi", "metric", "--json"]]
    now[0] += 30  # amd-smi costs a second of CPU: within the minute, what it gave stands
    assert reader.sample()[0]["fanSpeed"] == 0 and len(calls) == 1
    now[0] += 31
    listed[0] = "[]"  # asked again; it gives nothing now: no fan, and left alone ten minutes
    assert reader.sample()[0]["fanSpeed"] is None and len(calls) == 2
    now[0] += 300
    reader.sample()
    assert len(calls) == 2


def test_no_tool_runs_while_a_card_sleeps(root, tmp_path):
    tree = tmp_path / "rx6900xt"
    shutil.copytree(GPUS / "amd" / "rx6900xt", tree)
    (tree / "device" / "power" / "runtime_status").write_text("suspended\n")
    root.card("card1", str(tree / "device"))
    root.card("card2", "amd/rx9070xt", address="0000:0d:00.0")
    calls = []
    reader = amd(root, run=lambda args, **kwargs: calls.append(args), which=lambda name: f"/opt/rocm/bin/{name}")
    reader.sample()
    assert calls == []  # amd-smi reads every card: it would wake the sleeping one

def captured_cards():
    """Every captured amdgpu tree: <name>/device (amdgpu-sysfs-rs, procfs) or lact-<name>/cardN/device (LACT)."""
    for source in sorted((GPUS / "amd").iterdir()):
        for device in [source / "device", *sorted(source.glob("card*/device"))]:
            if (device / "uevent").exists() or (device / "gpu_busy_percent").exists():
                yield pytest.param(device, id=str(device.parent.relative_to(GPUS / "amd")))


@pytest.mark.parametrize("device", list(captured_cards()))
def test_every_captured_card_reads_into_a_push_the_server_takes(root, device):
    uevent = (device / "uevent").read_text() if (device / "uevent").exists() else ""
    root.amdgpu_ids()
    root.card("card1", str(device), address="0000:03:00.0")
    if "DRIVER=radeon" in uevent:  # the old radeon driver: not amdgpu's files, not this reader's card
        with pytest.raises(agent.GpuReadError):
            amd(root)
        return
    [gpu] = amd(root).sample()
    assert server_payload.validate({"gpus": [gpu]})["gpus"][0] == gpu
    assert gpu["vendor"] == "AMD" and gpu["name"]
    # Whatever the card lacks is null, never a made-up 0: a value is there only where its file is.
    hwmon = next(iter(sorted(device.glob("hwmon/hwmon*"))), None)
    has = {"utilizationGpu": (device / "gpu_busy_percent").exists(),
           "powerDraw": hwmon is not None and any((hwmon / f).exists() for f in ("power1_average", "power1_input")),
           "fanSpeed": hwmon is not None and any((hwmon / f).exists() for f in ("pwm1", "fan1_input")),
           "temperatureGpu": hwmon is not None and any(hwmon.glob("temp*_input"))}
    for key, present in has.items():
        assert present or gpu[key] is None, key


def test_known_clients_are_read_every_sample_and_proc_is_searched_for_new_ones_every_rescan(root):
    gfx = (FDINFO / "kernel-patch-2024-05-06-v1-drm-engine-gfx.txt").read_text()
    compute = (FDINFO / "kernel-patch-2024-05-20-v2-drm-engine-compute.txt").read_text()
    root.card("card1", "amd/rx6900xt", address="0000:04:00.0")
    root.process(2201, "blender", 1000, [gfx])
    reader = agent.AmdReader(agent.SysRoot(root.path, reuse_s=0, rescan_s=3600), which=lambda name: None)
    assert [p["memoryUsed"] for p in reader.sample()[0]["processes"]] == [532]
    (root.path / "proc" / "2201" / "fdinfo" / "3").write_text(gfx.replace("544428 KiB", "1048576 KiB"))
    root.process(3300, "python3", 1001, [compute])  # started after the last search of /proc
    assert [(p["pid"], p["memoryUsed"]) for p in reader.sample()[0]["processes"]] == [(2201, 1024)]
    searched = agent.AmdReader(agent.SysRoot(root.path, rescan_s=0), which=lambda name: None)
    assert [p["pid"] for p in searched.sample()[0]["processes"]] == [2201, 3300]

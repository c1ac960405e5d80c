"""The Intel reader (i915 and xe) on captured sysfs trees, hwmon files and fdinfo (tests/fixtures/gpus/intel)."""
import pytest

import agent
from agent_fakes import GPUS, FakeRoot
from gpustats.ingest import payload as server_payload

INTEL = GPUS / "intel"


def advanced(text, **deltas):
    """The fdinfo text with some counters moved on: a later read of the same client."""
    out = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        delta = deltas.get(key.strip().replace("drm-", "").replace("-", "_"))
        if delta:
            number, _, unit = value.strip().partition(" ")
            line = f"{key}:\t{int(number) + delta}{' ' + unit if unit else ''}"
        out.append(line)
    return "\n".join(out) + "\n"


class Clock:
    def __init__(self):
        self.ns = 1_000_000_000_000

    def __call__(self):
        return self.ns


def test_an_i915_igpu_reads_its_clock_and_busy_share_from_engine_time(tmp_path):
    root = FakeRoot(tmp_path / "host")
    root.intel_card("card0", "i915", "0000:00:02.0", card_files=INTEL / "i915-smc45-card0" / "card")
    i915 = (INTEL / "fdinfo" / "i915-kernel-i915rst-doc.txt").read_text()  # client 7 on 0000:00:02.0
    root.process(501, "gnome-shell", 1000, [i915], user="ana")
    clock = Clock()
    reader = agent.IntelReader(agent.SysRoot(root.path, reuse_s=0, rescan_s=0), clock=clock)
    [first] = reader.sample()
    assert (first["vendor"], first["clockCore"], first["utilizationGpu"]) == ("Intel", 350, None)  # one read: no rate yet
    assert first["processes"] == [{"pid": 501, "name": "gnome-shell", "user": "ana", "memoryUsed": None}]
    # One second on: render busy 0.4 s; video busy 1.2 s over its two engines (capacity 2) is 60 %.
    clock.ns += 1_000_000_000
    fdinfo = root.path / "proc" / "501" / "fdinfo" / "3"
    fdinfo.write_text(advanced(i915, engine_render=400_000_000, engine_video=1_200_000_000))
    [second] = reader.sample()
    assert second["utilizationGpu"] == 60
    assert all(second[k] is None for k in ("memoryTotal", "memoryUsed", "temperatureGpu", "fanSpeed"))
    assert server_payload.validate({"gpus": [second]})["gpus"][0] == second


def test_an_xe_card_reads_busy_from_gpu_cycles_and_its_power_cap(tmp_path):
    root = FakeRoot(tmp_path / "host")
    root.intel_card("card1", "xe", "0000:03:00.0", hwmon=INTEL / "xe-arc-pro-b60-nvtop493" / "hwmon")
    xe = (INTEL / "fdinfo" / "xe-kernel-xe_drm_client-doc.txt").read_text()  # client 3 on 0000:03:00.0
    root.process(900, "python3", 1001, [xe], user="ben")
    reader = agent.IntelReader(agent.SysRoot(root.path, reuse_s=0, rescan_s=0), clock=Clock())
    [first] = reader.sample()
    assert (first["powerLimit"], first["utilizationGpu"], first["clockCore"]) == (200, None, None)
    assert first["processes"] == [{"pid": 900, "name": "python3", "user": "ben", "memoryUsed": 23}]  # resident VRAM
    # The render engine ran 25 M of the GPU's 100 M cycles; the four compute engines 200 M (capacity 4: 50 %).
    (root.path / "proc" / "900" / "fdinfo" / "3").write_text(advanced(
        xe, cycles_rcs=25_000_000, total_cycles_rcs=100_000_000, cycles_ccs=200_000_000, total_cycles_ccs=100_000_000,
        total_cycles_bcs=100_000_000))
    [second] = reader.sample()
    assert second["utilizationGpu"] == 50  # the busiest engine class


@pytest.mark.parametrize("before,after,seconds,watts", [
    (1_000_000, 31_000_000, 2, 15.0),
    ((1 << 32) - 5_000_000, 25_000_000, 2, None),  # a wrap, or a reset: that interval is unknown, not a guess
    (3_000_000_000, 5, 1, None),  # a driver reload: not 1,295 W
    (None, 31_000_000, 2, None),
    (1_000_000, 1_000_000 + 40_000_000_000, 2, None),  # 20 kW: not a GPU's draw
])
def test_power_is_the_energy_counters_rate(before, after, seconds, watts):
    assert agent.energy_watts(before, after, seconds * 1_000_000_000) == watts


def test_no_intel_card_is_one_clear_error(tmp_path):
    root = FakeRoot(tmp_path / "host")
    root.simpledrm()
    with pytest.raises(agent.GpuReadError, match="no Intel GPU with the i915 or xe driver"):
        agent.IntelReader(agent.SysRoot(root.path))


def test_a_client_first_seen_now_is_a_baseline_not_a_burst():
    # /proc is searched for new clients every 10 s: a client found now may have run all that time.
    assert agent.engine_busy({}, {"7": {"drm-engine-render": "9000000000 ns"}}, 1_000_000_000) is None
    before = {"7": {"drm-engine-render": "9000000000 ns"}}
    assert agent.engine_busy(before, {"7": {"drm-engine-render": "9500000000 ns"}}, 1_000_000_000) == 50


def test_an_intel_card_in_runtime_suspend_is_idle_and_not_woken(tmp_path, monkeypatch):
    root = FakeRoot(tmp_path / "host")
    device = root.intel_card("card1", "xe", "0000:03:00.0", hwmon=INTEL / "xe-arc-pro-b60-nvtop493" / "hwmon")
    (device / "power").mkdir()
    (device / "power" / "runtime_status").write_text("suspended\n")
    read = agent.read_int

    def no_waking(path):
        assert "hwmon" not in str(path) and "freq0" not in str(path), f"read {path}, which wakes the card"
        return read(path)
    monkeypatch.setattr(agent, "read_int", no_waking)
    [gpu] = agent.IntelReader(agent.SysRoot(root.path, reuse_s=0, rescan_s=0)).sample()
    assert (gpu["utilizationGpu"], gpu["pstate"], gpu["vendor"]) == (0, "suspended", "Intel")

"""The PC around the GPUs: the real HostReader and psutil on captured /proc and /sys trees, and on this machine."""
import json
import logging
import time
from pathlib import Path

import psutil
import pytest

import agent
from agent_fakes import FIXTURES
from conftest import KEYS
from gpustats.ingest import payload as server_payload
from test_agent_run import run_agent

HOST = FIXTURES / "host"
NO_PSUTIL = FIXTURES / "no-psutil"


class Tree:
    """A captured tree as the root a HostReader reads; later() moves /proc/stat and the network to the second capture.

    The root links to the capture's files, so nothing is copied; `usage` answers from its df.txt
    (the capture's statvfs), with `prefix` where the df ran in a container (/host).
    """

    def __init__(self, name, tmp_path, prefix=""):
        self.capture, self.root, self.prefix = HOST / name, tmp_path / name, prefix
        (self.root / "proc" / "1" / "net").mkdir(parents=True)
        for entry in self.capture.iterdir():
            if entry.name != "proc":
                (self.root / entry.name).symlink_to(entry)
        for entry in (self.capture / "proc").iterdir():
            if entry.name != "1":
                (self.root / "proc" / entry.name).symlink_to(entry)
        for name in ("1/mounts", "1/net/dev"):
            (self.root / "proc" / name).symlink_to(self.capture / "proc" / name)
        self.times = [float(t) for t in (self.capture / "times.txt").read_text().split()]
        self.now = self.times[0]
        self.df = {}
        for line in (self.capture / "df.txt").read_text().splitlines()[1:]:
            target, total, used = line.rsplit(None, 2)  # a mount point may hold spaces
            self.df[target] = (int(total), int(used))

    def usage(self, path):
        mount = "/" + str(Path(path).relative_to(self.root)).lstrip(".")
        return self.df.get((self.prefix + mount).rstrip("/") or "/")  # None: not mounted where df ran

    def reader(self, **edges):
        return agent.HostReader(psutil, self.root, platform="linux", clock=lambda: self.now, wall=lambda: self.now,
                                usage=self.usage, **edges)

    def later(self):
        for name in ("stat", "1/net/dev"):
            (self.root / "proc" / name).unlink()
            (self.root / "proc" / name).symlink_to(self.capture / "later" / "proc" / name)
        self.now = self.times[1]


def two_samples(tree, **edges):
    reader = tree.reader(**edges)
    first = reader.sample()
    tree.later()
    return first, reader.sample()


def test_a_server_with_many_disks_and_bridges(tmp_path):
    first, system = two_samples(Tree("server", tmp_path))
    assert {k: first[k] for k in ("cpuPercent", "netRx", "netTx")} == dict.fromkeys(("cpuPercent", "netRx", "netTx"))
    assert {k: v for k, v in system.items() if k != "disks"} == {
        "os": "Debian GNU/Linux 12 (bookworm)", "cpuModel": "Intel(R) Xeon(R) Processor", "cpuCount": 2,
        "cpuPercent": 100.0, "load1": 7.5, "memoryTotal": 24105, "memoryUsed": 2076, "swapUsed": 0,
        # eth0 alone: 1,066 and 1,084 bytes in 2.047 s. lo moved 80 MB, and the container's 2.4 MB went
        # through its veth and docker0 (devices/virtual, like the other bridges, tun0, the vxlan and ifb).
        "netRx": 520.8, "netTx": 529.6, "temperatureCpu": None, "uptimeS": 9738}
    # From btime, which is whole seconds: within a second or two of the kernel's own uptime then.
    assert abs(first["uptimeS"] - float((HOST / "server/proc/uptime").read_text().split()[0])) < 2
    # Of 19 disks, the first 16 in the table, one per device: tmpfs, the overlay, the loop image, the bind mount of
    # /srv/data01 at /srv/export/data01 are no disks; "/srv/shared space", /var/lib/docker and the rest are past the cap.
    assert [d["mount"] for d in system["disks"]] == ["/"] + [f"/srv/data{n:02}" for n in range(1, 16)]
    assert system["disks"][:3] == [{"mount": "/", "total": 258020, "used": 23950},
                                   {"mount": "/srv/data01", "total": 56, "used": 2},
                                   {"mount": "/srv/data02", "total": 56, "used": 4}]


def test_in_a_container_the_agent_reports_the_host_not_the_container(tmp_path, monkeypatch):
    monkeypatch.setattr(agent, "MAX_DISKS", 64)  # past the cap: every disk the container can see
    tree = Tree("container", tmp_path, prefix="/host")
    first, system = two_samples(tree)
    # The host's eth0 (proc/1/net/dev: 910 bytes each way in 2.528 s), never the container's own eth0
    # (proc/net/dev, the veth's other end, which sent 2.4 MB).
    assert (system["netRx"], system["netTx"]) == (360.0, 360.0)
    mounts = [d["mount"] for d in system["disks"]]
    # The host's paths, not /host/srv/...; /srv/data-late, mounted on the host after the container
    # started, is in the host's table but not in the container: statvfs there would say /srv's.
    assert mounts == ["/", *(f"/srv/data{n:02}" for n in range(1, 17)), "/srv/shared space", "/var/lib/docker"]
    assert "/srv/data-late" in [m for _, m, _, _ in agent.parse_mounts((HOST / "container/proc/1/mounts").read_text())]
    assert system["memoryTotal"] == 24105 and system["cpuCount"] == 2 and system["os"].startswith("Debian")


def test_a_desktop_with_snaps_a_dvd_an_ntfs_disk_and_an_amd_cpu(tmp_path):
    first, system = two_samples(Tree("desktop", tmp_path))
    assert first["temperatureCpu"] == 61 and first["netRx"] is None
    assert system == {
        "os": "Ubuntu 24.04.1 LTS", "cpuModel": "AMD Ryzen 9 7950X 16-Core Processor", "cpuCount": 32,
        "cpuPercent": 25.0, "load1": 1.27, "memoryTotal": 63400, "memoryUsed": 17313, "swapUsed": 256,
        # No snap (squashfs on loops), no DVD (iso9660), no second line for the root file system's bind at
        # /var/snap/firefox/common/host-hunspell; the NTFS disk (fuseblk) is a disk.
        "disks": [{"mount": "/", "total": 1876180, "used": 584015}, {"mount": "/boot/efi", "total": 1073, "used": 6},
                  {"mount": "/home", "total": 3754443, "used": 2299533},
                  {"mount": "/media/ana/Data", "total": 953867, "used": 832763}],
        # enp5s0 alone: not the veth and docker0 the same bytes crossed, nor tailscale0's tunnel.
        "netRx": 1250000.0, "netTx": 83000.5,
        "temperatureCpu": 61,  # k10temp's Tctl; not the RX 6900 XT's junction (59), the NVMe's or ACPI's
        "uptimeS": 259082}


def test_mount_tables_escape_spaces_and_each_device_counts_once():
    table = agent.parse_mounts((HOST / "server/proc/1/mounts").read_text())
    assert ("/dev/zram17", "/srv/shared space", "ext4", "rw,relatime") in table
    kinds = agent.block_filesystems((HOST / "server/proc/filesystems").read_text())
    assert {"ext4", "squashfs", "zfs"} <= kinds and not {"tmpfs", "overlay", "proc"} & kinds
    assert agent.real_disks([("/dev/sda1", "/", "ext4", "rw"), ("/dev/sda1", "/home", "btrfs", "rw,subvol=@home"),
                             ("rpool/home", "/home", "zfs", "rw"), ("/dev/loop3", "/mnt/image", "ext4", "ro")], kinds) == [
        "/", "/home"]


@pytest.mark.parametrize("partitions,kept", [
    # Windows (psutil.disk_partitions): fixed drives; a DVD drive, with or without a disc, is no disk.
    ([("C:\\", "C:\\", "NTFS", "rw,fixed"), ("D:\\", "D:\\", "", "cdrom"), ("E:\\", "E:\\", "UDF", "ro,cdrom"),
      ("F:\\", "F:\\", "exFAT", "rw,removable")], ["C:\\", "F:\\"]),
    # macOS: / and its Data volume share one APFS container; its other system volumes are the OS's own.
    ([("/dev/disk3s1s1", "/", "apfs", "ro,local,rootfs"), ("/dev/disk3s6", "/System/Volumes/VM", "apfs", "rw"),
      ("/dev/disk3s2", "/System/Volumes/Preboot", "apfs", "rw"), ("/dev/disk3s5", "/System/Volumes/Data", "apfs", "rw"),
      ("/dev/disk5s1", "/Volumes/Backup", "apfs", "rw")], ["/", "/System/Volumes/Data", "/Volumes/Backup"]),
])
def test_disks_on_windows_and_macos(partitions, kept):
    assert agent.real_disks(partitions) == kept


@pytest.mark.parametrize("name,virtual", [
    ("en0", False), ("Ethernet", False), ("Wi-Fi", False), ("lo0", True), ("utun3", True), ("awdl0", True),
    ("bridge0", True), ("Loopback Pseudo-Interface 1", True), ("vEthernet (WSL)", True), ("tailscale0", True),
])
def test_interfaces_are_told_apart_by_name_where_there_is_no_sysfs(name, virtual):
    reader = agent.HostReader.__new__(agent.HostReader)
    reader.linux, reader.virtual = False, {}
    assert reader.is_virtual(name) is virtual


def test_the_cpu_temperature_is_the_hottest_package_and_tdie_before_tctl(tmp_path):
    def chip(n, name, temps):
        path = tmp_path / f"hwmon{n}"
        path.mkdir()
        (path / "name").write_text(name + "\n")
        for stem, (label, value) in temps.items():
            (path / f"{stem}_input").write_text(f"{value}\n")
            (path / f"{stem}_label").write_text(label + "\n")
    # Two Xeon sockets (coretemp, Documentation/hwmon/coretemp.rst), a Threadripper 2990WX whose Tctl runs 27 °C high.
    chip(0, "coretemp", {"temp1": ("Package id 0", 71000), "temp2": ("Core 0", 88000)})
    chip(1, "coretemp", {"temp1": ("Package id 1", 74000), "temp2": ("Core 0", 69000)})
    chip(2, "k10temp", {"temp1": ("Tctl", 95000), "temp2": ("Tdie", 68000)})
    chip(3, "cpu_thermal", {"temp1": ("temp1", 52000)})
    chip(4, "amdgpu", {"temp1": ("edge", 90000)})
    names = [f"{p.parent.name}/{p.name}" for p in agent.cpu_sensors(tmp_path)]
    assert names == ["hwmon0/temp1_input", "hwmon1/temp1_input", "hwmon2/temp2_input", "hwmon3/temp1_input"]


@pytest.mark.parametrize("text,name", [
    ('NAME="Debian GNU/Linux"\nVERSION="12 (bookworm)"\n', "Debian GNU/Linux 12 (bookworm)"),
    ("PRETTY_NAME='Arch Linux'\nNAME=Arch\n", "Arch Linux"), ('PRETTY_NAME="broken\n', None), ("", None),
])
def test_the_os_name_is_os_releases(text, name):
    assert agent.parse_os_release(text) == name


def test_cpu_and_windows_names():
    assert agent.parse_cpu_model((HOST / "server/proc/cpuinfo").read_text()) == "Intel(R) Xeon(R) Processor"
    assert agent.parse_cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) CPU           E5-2670 0 @ 2.60GHz\n") == (
        "Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz")
    assert agent.parse_cpu_model("processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n") == (
        "Raspberry Pi 5 Model B Rev 1.0")
    assert agent.windows_name("10", "10.0.22631") == "Windows 11 (10.0.22631)"
    assert agent.windows_name("10", "10.0.19045") == "Windows 10 (10.0.19045)"


def test_a_reading_that_fails_is_null_logged_once_and_the_others_go_out(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="agent")
    working = psutil.virtual_memory

    def denied():
        raise PermissionError(13, "Permission denied", "/proc/meminfo")
    monkeypatch.setattr(psutil, "virtual_memory", denied)
    tree = Tree("desktop", tmp_path)
    reader = tree.reader()
    samples = [reader.sample() for _ in range(3)]
    assert all(s["memoryTotal"] is None and s["swapUsed"] is None and s["cpuCount"] == 32 for s in samples)
    assert samples[0]["disks"] and samples[0]["temperatureCpu"] == 61
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["cannot read the host's memory (sent as null): PermissionError: "
                     "[Errno 13] Permission denied: '/proc/meminfo'"]
    monkeypatch.setattr(psutil, "virtual_memory", working)
    assert reader.sample()["memoryTotal"] == 63400
    assert caplog.records[-1].getMessage() == "reading the host's memory recovered"
    assert psutil.PROCFS_PATH == "/proc"  # put back after every read


def test_a_counter_that_went_back_says_nothing_and_the_first_sample_measures_nothing(tmp_path):
    tree = Tree("desktop", tmp_path)
    reader = tree.reader()
    tree.later()
    assert reader.sample()["netRx"] is None  # no earlier sample to measure from
    tree.now += 2
    for name in ("stat", "1/net/dev"):  # back to the first capture: every counter went back (a reload)
        (tree.root / "proc" / name).unlink()
        (tree.root / "proc" / name).symlink_to(tree.capture / "proc" / name)
    system = reader.sample()
    assert system["cpuPercent"] is None
    assert system["netRx"] == 0.0  # enp5s0's counters went back: left out; the Wi-Fi's stayed, and moved nothing


def test_a_host_reader_whose_sample_breaks_costs_only_the_system(caplog):
    class Broken:
        def sample(self):
            raise RuntimeError("a bug")
    payload = agent.build_payload(agent.SimulatedReader(1), host=Broken())
    assert "system" not in payload and len(payload["gpus"]) == 1


def test_this_machine_through_psutil_passes_the_servers_checks():
    reader = agent.HostReader(psutil)  # the real /proc, /sys and statvfs
    agent.build_payload(agent.SimulatedReader(1), host=reader)
    time.sleep(0.1)  # ten clock ticks: CPU busy time is counted in hundredths of a second
    body = agent._fit(agent.build_payload(agent.SimulatedReader(1), host=reader))
    system = body["system"]
    assert system["cpuCount"] == psutil.cpu_count()
    assert 0 <= system["cpuPercent"] <= 100 and system["memoryUsed"] <= system["memoryTotal"]
    assert system["uptimeS"] > 0 and any(d["mount"] == "/" for d in system["disks"])
    assert server_payload.validate(json.loads(json.dumps(body)))["system"] == system


class Fixed:
    """A host reader whose every sample is `system`."""

    def __init__(self, system):
        self.system = system

    def sample(self):
        return self.system


@pytest.mark.parametrize("name,prefix", [("server", ""), ("container", "/host"), ("desktop", "")])
def test_every_capture_passes_the_servers_checks(tmp_path, name, prefix):
    system = two_samples(Tree(name, tmp_path, prefix))[1]
    body = agent._fit(agent.build_payload(agent.SimulatedReader(1), host=Fixed(system)))
    assert server_payload.validate(body)["system"] == system


def test_without_psutil_the_agent_runs_sends_no_system_and_says_why_once():
    result = run_agent("--once", "--dry-run", "--simulate", "1", env={"PYTHONPATH": str(NO_PSUTIL)})
    assert result.returncode == 0 and "system" not in json.loads(result.stdout)
    [line] = [line for line in result.stderr.splitlines() if "psutil" in line]
    assert "psutil is not installed, so pushes carry no system" in line


def test_the_real_agent_pushes_its_host_and_the_server_accepts_it(server):
    result = run_agent("--once", "--simulate", "1", "--url", server.url + "/push-sse", env={"DEVICE_KEY": KEYS["rig-1"]})
    assert result.returncode == 0, result.stderr
    assert json.loads(run_agent("--once", "--dry-run", "--simulate", "1").stdout)["system"]["cpuCount"] >= 1

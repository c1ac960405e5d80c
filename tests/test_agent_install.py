"""agent.py --install and --uninstall: the files it writes for systemd, Task Scheduler and launchd, and the one-minute path."""
import configparser
import grp
import json
import os
import plistlib
import pwd
import shlex
import stat
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import agent
from agent_fakes import L40S, FakeSmi
from conftest import PRIVATE, ROOT, Admin, require, wait_for

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
AGENT = Path("/opt/gpu-stats-agent/agent.py")
PYTHON = Path("/opt/gpu-stats-agent/.venv/bin/python")


def unit_of(text):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string(text)
    return unit


def test_linux_as_a_user_is_a_user_unit_that_restarts_on_failure_but_not_on_a_refused_key(tmp_path, monkeypatch):
    monkeypatch.delenv("GPU_STATS_SCOPE", raising=False)
    files, start, undo, log = agent.install_plan(["--interval", "5"], AGENT, PYTHON, platform="linux",
                                                 home=tmp_path, root=False)
    [(path, text)] = files.items()
    assert path == tmp_path / ".config/systemd/user/gpu-stats-agent.service"
    unit = unit_of(text)
    assert unit["Service"]["ExecStart"] == f"{PYTHON} {AGENT} --interval 5"
    assert unit["Service"]["Restart"] == "on-failure" and set(unit["Service"]["RestartPreventExitStatus"].split()) == {"2", "3"}
    assert unit["Install"]["WantedBy"] == "default.target"
    assert start == [["systemctl", "--user", "daemon-reload"], ["systemctl", "--user", "enable", "--now", "gpu-stats-agent"]]
    assert undo[0] == ["systemctl", "--user", "disable", "--now", "gpu-stats-agent"]
    assert log == "journalctl --user -u gpu-stats-agent -f"


def test_the_installed_agent_keeps_full_commands_but_never_the_key(tmp_path):
    flags = agent._start_flags(["--install", "--full-commands", "--key", "k", "--url", "http://rig:3000/push-sse"])
    files, *_ = agent.install_plan(flags, AGENT, PYTHON, platform="linux", home=tmp_path, root=False)
    assert unit_of(next(iter(files.values())))["Service"]["ExecStart"] == f"{PYTHON} {AGENT} --full-commands"


def test_linux_as_root_is_a_system_unit(tmp_path):
    files, start, _, log = agent.install_plan([], AGENT, PYTHON, platform="linux", home=tmp_path, root=True)
    [(path, text)] = files.items()
    assert path == Path("/etc/systemd/system/gpu-stats-agent.service")
    assert unit_of(text)["Install"]["WantedBy"] == "multi-user.target"
    assert start[1] == ["systemctl", "enable", "--now", "gpu-stats-agent"] and log == "journalctl -u gpu-stats-agent -f"


def test_a_path_with_spaces_is_quoted_as_systemd_reads_it(tmp_path):
    spaced = Path("/home/me/GPU agent/agent.py")
    files, *_ = agent.install_plan(["--backend", "gputil"], spaced, PYTHON, platform="linux", home=tmp_path, root=False)
    exec_start = unit_of(next(iter(files.values())))["Service"]["ExecStart"]
    assert shlex.split(exec_start) == [str(PYTHON), str(spaced), "--backend", "gputil"]


def test_windows_is_a_hidden_task_at_logon_that_restarts_and_runs_pythonw():
    python = Path(r"C:\Users\me\AppData\Local\Programs\Python\Python312\python.exe")
    folder = Path(r"C:\Users\me\gpu-stats-agent")
    files, start, undo, log = agent.install_plan(["--interval", "5"], folder / "agent.py", python, platform="win32")
    [(path, text)] = files.items()
    task = ET.fromstring(text.encode("utf-16"))
    assert task.find("t:Triggers/t:LogonTrigger/t:Enabled", TASK_NS).text == "true"
    assert task.find("t:Settings/t:Hidden", TASK_NS).text == "true"
    assert task.find("t:Settings/t:ExecutionTimeLimit", TASK_NS).text == "PT0S"
    assert task.find("t:Settings/t:RestartOnFailure/t:Count", TASK_NS).text == "999"
    assert task.find("t:Actions/t:Exec/t:Command", TASK_NS).text == str(python.with_name("pythonw.exe"))
    assert task.find("t:Actions/t:Exec/t:Arguments", TASK_NS).text == f"{folder / 'agent.py'} --interval 5"
    assert start[0][:3] == ["schtasks", "/Create", "/TN"] and undo[-1][:2] == ["schtasks", "/Delete"]
    assert log.startswith(str(folder / "agent.log"))


def test_macos_is_a_launchd_agent_kept_alive_after_a_crash(tmp_path):
    files, start, undo, log = agent.install_plan([], AGENT, PYTHON, platform="darwin", home=tmp_path)
    [(path, text)] = files.items()
    assert path == tmp_path / "Library/LaunchAgents/com.gpustats.agent.plist"
    plist = plistlib.loads(text.encode())
    assert plist["ProgramArguments"] == [str(PYTHON), str(AGENT)] and plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["StandardErrorPath"] == log
    assert start == [["launchctl", "load", "-w", str(path)]] and undo == [["launchctl", "unload", "-w", str(path)]]


def fake_systemctl(folder, state="running", failing=None):
    """Put a systemctl on PATH that records its arguments, as the sandbox has no systemd running.

    It answers `is-system-running` with `state` ("offline" where systemd is not PID 1, as the real
    one here says), unrecorded, and exits 1 for the command `failing`.
    """
    folder.mkdir(exist_ok=True)
    calls = shlex.quote(str(folder / "calls"))
    fail = f'[ "$*" = {shlex.quote(failing)} ] && {{ echo "Failed to {failing}: Access denied" >&2; exit 1; }}\n' \
        if failing else ""
    (folder / "systemctl").write_text(
        f'#!/bin/sh\ncase "$*" in *is-system-running) echo {state}; [ {state} = running ]; exit $?;; esac\n'
        f'echo "$@" >> {calls}\n{fail}exit 0\n')
    (folder / "systemctl").chmod(0o755)
    return folder / "calls"


def test_the_linux_command_the_page_shows_installs_the_agent_and_it_goes_live(start_server, tmp_path, monkeypatch):
    # The one-minute path, as a new user takes it: add a PC on the server, run the command it shows
    # on the PC (here: a fresh HOME, a fake GPU, a systemctl that records), and see the PC live.
    server = start_server(**PRIVATE)
    admin = Admin(server)
    started = time.monotonic()
    added = admin.post("/api/devices", json={"name": "new-pc"})
    assert added.status_code == 201
    command = added.json()["install"]["linux"]
    assert added.json()["key"] in command and f"{server.url}/agent.py" in command
    home, tools = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    calls = fake_systemctl(tools)
    smi = FakeSmi(tmp_path, monkeypatch)  # a fake nvidia-smi first on PATH, as on a PC with an L40S
    smi.set(gpus=[L40S])
    env = {"HOME": str(home), "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
           "GPU_STATS_SCOPE": "user"}  # the suite runs as root: a user unit, as a user's PC would get, not /etc's
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    folder = home / "gpu-stats-agent"
    unit = home / ".config/systemd/user/gpu-stats-agent.service"
    assert "installed: wrote" in done.stderr and str(unit) in done.stderr and "journalctl --user" in done.stderr
    assert calls.read_text().splitlines() == ["--user daemon-reload", "--user enable --now gpu-stats-agent"]
    assert stat.S_IMODE((folder / ".env").stat().st_mode) == 0o600
    assert added.json()["key"] in (folder / ".env").read_text() and added.json()["key"] not in unit.read_text()
    analyze = require("systemd-analyze", "systemd")
    verified = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0, verified.stderr
    # What systemd would start: the unit's own command line.
    service = subprocess.Popen(shlex.split(unit_of(unit.read_text())["Service"]["ExecStart"]) + ["--interval", "0.5"],
                               cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        live = wait_for(lambda: next((d for d in admin.get("/api/devices").json()
                                      if d["name"] == "new-pc" and d["status"] == "online"), None), timeout=20)
        print(f"new-pc live {time.monotonic() - started:.1f} s after it was added (the venv and its install included)")
        assert live["gpus"] == [{"index": 0, "name": "NVIDIA L40S"}] and live["agent"]["backend"] == "gputil"
    finally:
        service.terminate()
        service.wait(10)
    undone = subprocess.run([str(folder / ".venv/bin/python"), "agent.py", "--uninstall"], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=30)
    assert undone.returncode == 0 and "uninstalled" in undone.stderr
    assert not unit.exists() and not (folder / ".env").exists() and not (folder / agent.MANIFEST).exists()
    assert calls.read_text().splitlines()[2:] == ["--user disable --now gpu-stats-agent", "--user daemon-reload"]
    assert sorted(p.name for p in folder.iterdir()) == [".venv", "agent.py", "requirements-agent.txt"]  # all else it wrote


# ---- what --install writes, in a folder others could have planted things in (issue 8) ---------

KEY = "test-key-install-0123456789"


class Installed:
    """A copy of agent.py in a folder of its own, a HOME, and a systemctl that records: --install run as a user runs it."""

    def __init__(self, tmp_path):
        self.folder, self.home, self.outside = tmp_path / "gpu-stats-agent", tmp_path / "home", tmp_path / "outside"
        for folder in (self.folder, self.home, self.outside):
            folder.mkdir()
            folder.chmod(0o755)
        (self.folder / "agent.py").write_bytes((ROOT / "agent.py").read_bytes())
        self.calls = fake_systemctl(tmp_path / "bin")
        self.unit = self.home / ".config/systemd/user/gpu-stats-agent.service"
        self.env = {"HOME": str(self.home), "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
                    "GPU_STATS_SCOPE": "user", "DEVICE_KEY": KEY}

    def run(self, *args):
        return subprocess.run([sys.executable, "agent.py", *args], cwd=self.folder, env=self.env, capture_output=True,
                              text=True, timeout=60)

    def install(self):
        return self.run("--url", "http://gpus.example.com:3000/push-sse", "--install")

    def systemctl(self):
        return self.calls.read_text().splitlines() if self.calls.exists() else []


def refused_in_one_line(done, *words):
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert all(word in line for word in words), line
    return line


def test_install_then_uninstall_writes_and_removes_just_its_files(tmp_path):
    at = Installed(tmp_path)
    done = at.install()
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((at.folder / ".env").stat().st_mode) == 0o600 and KEY in (at.folder / ".env").read_text()
    assert at.unit.is_file() and at.systemctl() == ["--user daemon-reload", "--user enable --now gpu-stats-agent"]
    assert sorted(p.name for p in at.folder.iterdir()) == [".env", "agent.py", agent.MANIFEST]
    assert at.install().returncode == 0  # again, as a rotated key's install command does: the .env is still its own
    undone = at.run("--uninstall")
    assert undone.returncode == 0 and "uninstalled" in undone.stderr, undone.stderr
    assert at.systemctl()[4:] == ["--user disable --now gpu-stats-agent", "--user daemon-reload"]
    assert not at.unit.exists() and sorted(p.name for p in at.folder.iterdir()) == ["agent.py"]


def test_a_planted_env_link_is_refused_and_its_target_kept(tmp_path):
    at = Installed(tmp_path)
    target = at.outside / "precious"
    target.write_text("PRECIOUS=1\n")
    (at.folder / ".env").symlink_to(target)
    refused_in_one_line(at.install(), "cannot install", str(at.folder / ".env"), "link")
    assert target.read_text() == "PRECIOUS=1\n" and not at.unit.exists() and at.systemctl() == []


def test_a_planted_manifest_link_is_refused_and_its_target_not_made(tmp_path):
    at = Installed(tmp_path)
    target = at.outside / "made-by-install"
    (at.folder / agent.MANIFEST).symlink_to(target)
    refused_in_one_line(at.install(), "cannot install", agent.MANIFEST, "link")
    assert not target.exists() and not (at.folder / ".env").exists() and at.systemctl() == []


def test_a_planted_unit_link_is_refused_and_its_target_not_made(tmp_path):
    at = Installed(tmp_path)
    target = at.outside / "made-by-install"
    at.unit.parent.mkdir(parents=True)
    at.unit.symlink_to(target)
    refused_in_one_line(at.install(), "cannot install", str(at.unit), "link")
    assert not target.exists() and not (at.folder / ".env").exists() and at.systemctl() == []


def test_uninstall_runs_and_removes_only_what_install_would_have_never_what_the_manifest_lists(tmp_path):
    at = Installed(tmp_path)
    assert at.install().returncode == 0
    victim = at.outside / "victim"
    victim.write_text("keep me\n")
    pwned = at.outside / "pwned"
    (at.folder / agent.MANIFEST).write_text(json.dumps({  # as an agent before this wrote it, with more added
        "files": [str(victim)], "undo": [["systemctl", "--user", "disable", "--now", "gpu-stats-agent"],
                                         ["sh", "-c", f"touch {shlex.quote(str(pwned))}"]]}))
    undone = at.run("--uninstall")
    assert undone.returncode == 0, undone.stderr
    assert not pwned.exists() and victim.read_text() == "keep me\n"
    assert not at.unit.exists() and at.systemctl()[2:] == ["--user disable --now gpu-stats-agent", "--user daemon-reload"]


def test_a_folder_others_can_write_to_is_refused_and_nothing_written(tmp_path):
    at = Installed(tmp_path)
    at.folder.chmod(0o757)
    refused_in_one_line(at.install(), "cannot install", str(at.folder), "chmod go-w")
    assert sorted(p.name for p in at.folder.iterdir()) == ["agent.py"] and not at.unit.exists()
    at.folder.chmod(0o755)
    assert at.install().returncode == 0
    at.folder.chmod(0o757)  # its manifest, which --uninstall reads, could be anyone's now
    refused_in_one_line(at.run("--uninstall"), "cannot uninstall", str(at.folder), "chmod go-w")
    assert at.unit.exists() and len(at.systemctl()) == 2


def test_a_folder_of_another_user_or_writable_by_a_shared_group_is_refused(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user or group")
    at = Installed(tmp_path)
    os.chown(at.folder, 4321, -1)
    refused_in_one_line(at.install(), "cannot install", str(at.folder), "owned by")
    os.chown(at.folder, 0, 4321)
    at.folder.chmod(0o775)
    refused_in_one_line(at.install(), "cannot install", str(at.folder), "chmod go-w")
    assert sorted(p.name for p in at.folder.iterdir()) == ["agent.py"] and not at.unit.exists()


def test_a_folder_writable_by_the_users_own_group_is_fine(tmp_path):
    # Debian and Ubuntu give each user a group of their own and umask 002: mkdir makes the folder
    # group-writable, and no one else is in that group.
    at = Installed(tmp_path)
    own = grp.getgrgid(os.getegid())
    if own.gr_name != pwd.getpwuid(os.geteuid()).pw_name or set(own.gr_mem) - {own.gr_name}:
        pytest.skip("this user has no group of its own")
    at.folder.chmod(0o775)
    assert at.install().returncode == 0


# ---- where --install cannot work: it says so in one line, and leaves nothing behind (issue 30) ----

def test_without_systemd_install_writes_nothing_and_says_how_to_run_the_agent(tmp_path):
    at = Installed(tmp_path)
    fake_systemctl(tmp_path / "bin", state="offline")  # a container, WSL1: systemctl is there, systemd is not PID 1
    line = refused_in_one_line(at.install(), "systemd is not running here", "nothing was written", "python3 agent.py")
    assert "Rejected" not in line and "TypeError" not in line
    assert sorted(p.name for p in at.folder.iterdir()) == ["agent.py"] and not at.unit.exists()
    assert at.systemctl() == []
    (tmp_path / "bin" / "systemctl").unlink()  # a chroot: no systemctl at all
    at.env["PATH"] = str(tmp_path / "bin")
    refused_in_one_line(at.install(), "systemd is not running here")
    assert sorted(p.name for p in at.folder.iterdir()) == ["agent.py"] and not at.unit.exists()


def test_a_systemctl_that_fails_leaves_nothing_installed(tmp_path):
    at = Installed(tmp_path)
    fake_systemctl(tmp_path / "bin", failing="--user enable --now gpu-stats-agent")
    refused_in_one_line(at.install(), "--user enable --now gpu-stats-agent failed", "Access denied",
                        "nothing was left installed")
    assert sorted(p.name for p in at.folder.iterdir()) == ["agent.py"] and not at.unit.exists()
    assert at.systemctl()[-2:] == ["--user disable --now gpu-stats-agent", "--user daemon-reload"]


def test_uninstall_with_nothing_installed_or_a_manifest_it_did_not_write(tmp_path):
    at = Installed(tmp_path)
    nothing = at.run("--uninstall")
    assert nothing.returncode == 0 and nothing.stderr.strip().splitlines() == [
        f"agent: nothing to uninstall: no {agent.MANIFEST} beside agent.py"]
    (at.folder / agent.MANIFEST).write_text('{"root": "yes"}')
    refused_in_one_line(at.run("--uninstall"), "is not what --install writes")
    assert at.systemctl() == [] and (at.folder / agent.MANIFEST).exists()


def test_a_failed_reinstall_keeps_the_install_that_worked(tmp_path):
    # A review found that a re-install (a rotated key) whose systemctl failed took the working one down.
    at = Installed(tmp_path)
    assert at.install().returncode == 0
    unit, env, manifest = at.unit.read_bytes(), (at.folder / ".env").read_bytes(), (at.folder / agent.MANIFEST).read_bytes()
    calls = len(at.systemctl())
    fake_systemctl(tmp_path / "bin", failing="--user enable --now gpu-stats-agent")
    at.env["DEVICE_KEY"] = "a-rotated-key-0123456789"
    refused_in_one_line(at.install(), "--user enable --now gpu-stats-agent failed", "the install from before is kept")
    assert at.unit.read_bytes() == unit and (at.folder / ".env").read_bytes() == env
    assert (at.folder / agent.MANIFEST).read_bytes() == manifest and KEY in env.decode()
    assert "--user disable --now gpu-stats-agent" not in at.systemctl()[calls:]  # the running agent was not stopped
    assert stat.S_IMODE((at.folder / ".env").stat().st_mode) == 0o600 and stat.S_IMODE(at.unit.stat().st_mode) == 0o644

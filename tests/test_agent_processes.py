"""What the agent says each GPU process is: its command, never its arguments, and its start, read from captured /proc trees.

On an H200 (issue 33) both jobs were plain `python3`: the command and the start tell them apart.
The /proc entries are real captures (tests/fixtures/proc/SOURCE.md).
"""
import json
import types

import pytest

import agent
from agent_fakes import GPUS, PROC, FakeRoot, nvml_gpu, nvml_module
from conftest import KEYS
from gpustats.ingest import payload as server_payload
from test_agent_readers import run_agent

BTIME = 1796392351  # tests/fixtures/proc/stat
GIB = 1 << 30


@pytest.fixture
def host(tmp_path):
    return FakeRoot(tmp_path / "host")


# ---- the command: the program and its script or first argument ---------------------------------

@pytest.mark.parametrize("argv,command", [
    (["/usr/bin/python3", "-u", "train.py", "--lr", "0.1"], "python3 train.py"),
    (["python3", "-W", "ignore", "-X", "dev", "-O", "/home/alice/secret-project/train.py", "--data", "/home/alice/d"],
     "python3 train.py"),  # where the script lives names a person and a project: its file name alone
    (["python3", "-m", "torch.distributed.run", "--nproc-per-node=8", "train.py"], "python3 -m torch.distributed.run"),
    (["python3", "-mvllm.entrypoints.openai.api_server", "--api-key", "x"], "python3 -m vllm.entrypoints.openai.api_server"),
    (["python3", "-c", "import os; print(os.environ['HF_TOKEN'])"], "python3 -c"),  # never the code
    (["python3"], "python3"),
    (["python3", "-"], "python3"),  # a script on stdin
    (["python3", "--", "train.py"], "python3 train.py"),
    (["python3.12", "-u", "serve.py"], "python3.12 serve.py"),
    (["/usr/bin/blender"], "blender"),
    (["/usr/bin/blender", "/home/alice/films/scene.blend", "--render-output", "/tmp/x"], "blender scene.blend"),
    (["blender", "-b", "scene.blend"], "blender"),  # a first argument that is an option: the program alone
    (["ollama", "serve"], "ollama serve"),
    (["/usr/local/bin/ollama", "runner", "--model", "/root/.ollama/models/blobs/sha256-6a0746a1"], "ollama runner"),
    (["curl", "https://user:hunter2@example.com/"], "curl"),  # a URL, a user@host, code: left out
    (["app", "TOKEN=abc123"], "app"),
    (["node", "--require", "dotenv/config", "server.js", "--port", "3000"], "node server.js"),
    (["node", "-e", "console.log(1)"], "node -e"),
    (["bash", "-c", "python3 train.py --key abc"], "bash -c"),
    (["/bin/bash", "/home/alice/run.sh", "--key", "abc"], "bash run.sh"),
    (["java", "-Xmx64g", "-cp", "/opt/lib/*", "-jar", "/opt/app/trainer.jar", "--secret", "x"], "java -jar trainer.jar"),
    (["Rscript", "--vanilla", "fit.R"], "Rscript fit.R"),
    ([r"C:\Python312\python.exe", "-u", r"C:\Users\ana\project\train.py", "--lr", "0.1"], "python.exe train.py"),
    ([r"C:\Program Files\Blender Foundation\Blender 4.2\blender.exe"], "blender.exe"),
    (["pythonw.exe", "app.pyw"], "pythonw.exe app.pyw"),
])
def test_a_command_is_its_program_and_its_script_or_first_argument_never_the_rest(argv, command):
    assert agent.command_line(argv) == command


def test_no_arguments_is_no_command_and_full_commands_keep_every_argument_within_the_servers_limit():
    assert agent.command_line([]) is None and agent.command_line([""]) is None
    argv = ["/usr/bin/python3", "-u", "train.py", "--lr", "0.1", "--note", "two words"]
    assert agent.command_line(argv, full=True) == "python3 -u train.py --lr 0.1 --note 'two words'"
    long = agent.command_line(["python3", "train.py", *["--flag"] * 100], full=True)
    assert len(long) <= 128 and long.endswith("--flag…")  # cut at a word, to what the server keeps whole


# ---- the captured /proc entries ---------------------------------------------------------------

def test_the_captured_stat_lines_give_the_starts_ps_read():
    assert agent.parse_btime((PROC / "stat").read_text()) == BTIME
    ticks = {pid: agent.parse_start_ticks((PROC / str(pid) / "stat").read_text()) for pid in (6472, 6474, 6475, 6520, 2)}
    # 6475 named itself "job) R 1 2 3 4": counted from its first ")", its starttime reads 0.
    assert ticks == {6472: 826100, 6474: 826201, 6475: 826201, 6520: 826687, 2: 24}
    assert agent.parse_start_ticks("") is None and agent.parse_start_ticks("6472 (python3) S 1 2") is None
    assert agent.read_cmdline(PROC / "2" / "cmdline") == [] and agent.read_cmdline(PROC / "404" / "cmdline") is None


@pytest.mark.parametrize("pid,name,user,command,started", [
    (6472, "python3", "alice", "python3 train.py", 1796400612.0),  # ps: 16:10:12
    (6474, "python3", "alice", "python3 -m torch.distributed.run", 1796400613.01),  # ps: 16:10:13
    (6475, "job) R 1 2 3 4", "alice", "python3 render.py", 1796400613.01),
    (6477, "ray::TrainWorke", "alice", "ray::TrainWorker.train", 1796400613.01),  # a title in place of its arguments
    (6520, "ollama", "ollama", "ollama serve", 1796400617.87),  # ps: 16:10:17
    (2, "kthreadd", "0", "kthreadd", BTIME + 0.24),  # a kernel thread has no arguments: its name
])
def test_each_captured_process_reads_as_what_it_runs_and_when_it_started(host, pid, name, user, command, started):
    host.captured(pid, user=None if user.isdigit() else user)  # no account for uid 0 in this tree: the uid
    assert agent.SysRoot(host.path).process(pid) == {"name": name, "user": user, "command": command, "startedAt": started}


def test_full_commands_send_the_whole_line_as_far_as_the_server_keeps_it(host):
    host.captured(6472)
    assert agent.SysRoot(host.path, full_commands=True).process(6472)["command"] == (
        "python3 -u /tmp/cap-agent/secret-project/train.py --lr 0.1 --epochs 90 --wandb-key 4f2a9c0e1b7d --data…")


def test_a_title_written_over_the_arguments_is_read_word_by_word_and_a_path_with_a_space_is_not(host):
    base = host.captured(6477)
    # Chrome's renderers and setproctitle leave one string where the arguments were, spaces between its words.
    (base / "cmdline").write_bytes(b"/usr/bin/python3 /home/alice/train.py --token abc\0")
    assert agent.SysRoot(host.path).process(6477)["command"] == "python3 train.py"
    game = host.path / "opt" / "My Game" / "game.x86_64"  # a Steam game's folder has spaces, and it has no arguments
    game.parent.mkdir(parents=True)
    game.touch()
    (base / "cmdline").write_bytes(b"/opt/My Game/game.x86_64\0")
    assert agent.SysRoot(host.path).process(6477)["command"] == "game.x86_64"


def test_a_start_stays_put_while_the_process_runs_and_a_reused_pid_starts_anew(host):
    base = host.captured(6472)
    root = agent.SysRoot(host.path)
    assert root.process(6472)["startedAt"] == 1796400612.0
    stat = host.path / "proc" / "stat"
    stat.write_text(stat.read_text().replace(f"btime {BTIME}", f"btime {BTIME + 1}"))  # NTP slewed the clock
    assert root.process(6472)["startedAt"] == 1796400612.0  # the same job, not a new one a second later
    (base / "stat").write_text((base / "stat").read_text().replace(" 826100 ", " 990000 "))  # the pid, handed on
    assert root.process(6472)["startedAt"] == BTIME + 1 + 9900.0


def test_a_process_gone_between_listing_and_reading_is_still_sent_with_what_was_read(host):
    # NVML listed it, with its memory, and it exited before /proc was read: the memory was in use, so it goes out.
    nvml = nvml_module([nvml_gpu(graphics=[])])
    [gpu] = agent.NvmlReader(nvml, process=agent.SysRoot(host.path).process).sample()
    assert gpu["processes"] == [{"pid": 4242, "name": "python3", "memoryUsed": 2048}]
    base = host.captured(6472)  # gone halfway: its comm was read, then its stat and cmdline were not there
    (base / "stat").unlink()
    (base / "cmdline").unlink()
    assert agent.SysRoot(host.path).process(6472) == {"name": "python3", "user": "1000", "startedAt": None}


# ---- every reader that lists processes --------------------------------------------------------

def test_nvml_tells_two_python3_jobs_apart_by_command_and_start(host):
    host.captured(6472, user="alice")
    host.captured(6474, user="alice")
    jobs = [types.SimpleNamespace(pid=6472, usedGpuMemory=61 * GIB), types.SimpleNamespace(pid=6474, usedGpuMemory=40 * GIB)]
    nvml = nvml_module([nvml_gpu(name="NVIDIA H200", compute=jobs, graphics=[])])
    nvml.nvmlSystemGetProcessName = lambda pid: b"/usr/bin/python3"
    [gpu] = agent.NvmlReader(nvml, process=agent.SysRoot(host.path).process).sample()
    assert gpu["processes"] == [
        {"pid": 6472, "name": "python3", "user": "alice", "memoryUsed": 62464, "command": "python3 train.py",
         "startedAt": 1796400612.0},
        {"pid": 6474, "name": "python3", "user": "alice", "memoryUsed": 40960,
         "command": "python3 -m torch.distributed.run", "startedAt": 1796400613.01}]
    assert server_payload.validate({"sampledAt": 1796400700.0, "gpus": [gpu]})["gpus"][0] == gpu


def test_a_start_later_than_the_sample_is_left_out_as_the_server_would_refuse_it():
    class Reader:  # a clock set back 5 minutes after the second process was first seen
        name = "test"

        def sample(self):
            return [{"index": 0, "processes": [{"pid": 1, "name": "a", "startedAt": 1796400612.0},
                                               {"pid": 2, "name": "b", "startedAt": 1796401000.0}]}]
    payload = agent.build_payload(Reader(), clock=lambda: 1796400700.0)
    assert payload["gpus"][0]["processes"] == [{"pid": 1, "name": "a", "startedAt": 1796400612.0}, {"pid": 2, "name": "b"}]
    server_payload.validate(payload)


def test_the_real_agent_on_captured_proc_trees_sends_commands_without_arguments_and_starts(tmp_path, host, server,
                                                                                          open_stream):
    host.amdgpu_ids()
    host.card("card1", "amd/rx580")  # 0000:09:00.0
    host.intel_card("card2", "i915", "0000:00:02.0", card_files=GPUS / "intel" / "i915-smc45-card0" / "card")
    amd = (GPUS / "amd" / "fdinfo" / "amdgpu_top-issue87-dgpu-0000-08-00.0.txt").read_text().replace(
        "0000:08:00.0", "0000:09:00.0")
    host.captured(6472, [amd], user="alice")
    host.captured(6475, [amd.replace("drm-client-id:  217", "drm-client-id:  218")], user="alice")
    host.captured(6520, [(GPUS / "intel" / "fdinfo" / "i915-kernel-i915rst-doc.txt").read_text()], user="ollama")
    result = run_agent("--dry-run", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    amd_gpu, intel_gpu = payload["gpus"]
    assert [(p["pid"], p["name"], p["user"], p["command"], p["startedAt"]) for p in amd_gpu["processes"]] == [
        (6472, "python3", "alice", "python3 train.py", 1796400612.0),
        (6475, "job) R 1 2 3 4", "alice", "python3 render.py", 1796400613.01)]
    assert [(p["command"], p["startedAt"]) for p in intel_gpu["processes"]] == [("ollama serve", 1796400617.87)]
    for secret in ("wandb", "4f2a9c0e1b7d", "secret-project", "/tmp/cap-agent", "--lr"):
        assert secret not in result.stdout
    stream = open_stream(server)  # what the server keeps reaches every viewer
    pushed = run_agent("--once", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim",
                       env={"PUSH_URL": server.url + "/push-sse", "DEVICE_KEY": KEYS["rig-5"]})
    assert pushed.returncode == 0, pushed.stderr
    shown = stream.until(lambda e: e["data"].get("device") == "rig-5", timeout=10)["data"]["gpus"]
    assert [p["command"] for p in shown[0]["processes"]] == ["python3 train.py", "python3 render.py"]
    assert [p["startedAt"] for p in shown[1]["processes"]] == [1796400617.87]

    full = run_agent("--dry-run", "--full-commands", "--sys-root", str(host.path), no_nvidia=tmp_path / "shim")
    assert json.loads(full.stdout)["gpus"][0]["processes"][0]["command"].startswith(
        "python3 -u /tmp/cap-agent/secret-project/train.py --lr 0.1 --epochs 90 --wandb-key 4f2a9c0e1b7d")

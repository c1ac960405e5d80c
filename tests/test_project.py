"""The project's own files: what each install pulls in, how the suite starts, and that the
README's configuration table and docs/DEPLOY.md's systemd unit say what the code does."""
import ast
import os
import pickle
import re
import selectors
import shlex
import signal
import subprocess
import sys
import time
from contextlib import suppress
from importlib import metadata
from pathlib import Path

import requests
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import config
from conftest import ROOT, procfile_command

TEST_TOOLS = {"pytest", "pytest-xdist", "hypothesis", "playwright"}


def requirements(path):
    """Return {name: extras} for each requirement in `path` and the files it includes with -r."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if line.startswith(("-r ", "--requirement ")):
            for name, extras in requirements(path.parent / line.split(None, 1)[1]).items():
                found[name] = found.get(name, set()) | extras
        elif line and not line.startswith(("#", "-")):
            requirement = Requirement(line)
            name = canonicalize_name(requirement.name)
            found[name] = found.get(name, set()) | requirement.extras
    return found


def with_dependencies(wanted):
    """Return the distributions pip installs for `wanted` ({name: extras}), as installed here."""
    todo = [(name, extra) for name, extras in wanted.items() for extra in {"", *extras}]
    seen = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                todo += [(canonicalize_name(requirement.name), e) for e in {"", *requirement.extras}]
    return {name for name, _ in seen}


def local_files(module):
    """Return the project's own files for a top-level module name; none for anything else."""
    if (ROOT / f"{module}.py").is_file():
        return [ROOT / f"{module}.py"]
    return sorted((ROOT / module).rglob("*.py")) if (ROOT / module / "__init__.py").is_file() else []


def parse(path):
    """Return `path`'s syntax tree.

    CPython before 3.11.8 can raise "SystemError: AST constructor recursion depth mismatch" in a
    process with other threads (python/cpython#106905; seen once in this suite): then it is parsed
    in a process of its own.
    """
    try:
        return ast.parse(path.read_text(), str(path))
    except SystemError:
        code = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps(ast.parse(open(sys.argv[1]).read(), sys.argv[1])))"
        return pickle.loads(subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True).stdout)


def imported_modules(path):
    """Return the top-level module names `path` imports, lazy imports in functions included."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module.split(".")[0]


def server_imports():
    """Return {file, relative to the project: third-party modules} for app.py and every local module it imports."""
    todo, found = ["app"], {}
    while todo:
        for path in local_files(todo.pop()):
            name = str(path.relative_to(ROOT))  # the package holds several redis.py and routes.py
            if name not in found:
                modules = set(imported_modules(path))
                found[name] = {m for m in modules if m not in sys.stdlib_module_names and not local_files(m)}
                todo += [m for m in modules if local_files(m)]
    return found


# The package's layers, lowest first: a module may import its own capability's modules and those
# of lower layers, never one of its own layer or above (issue 21). A capability is a folder of
# gpustats/, or a module at its top.
LAYERS = (
    # OS threads and slices; background loops and tallies; secrets; the SQLite file; ConfigError (config.py's too)
    ("offload", "background", "tokens", "database", "errors"),
    ("scaleout",),  # the Redis client, key prefix, leases and status every Redis backend shares
    ("web", "command_line"),  # JSON errors, client addresses, the app's error handlers; what store commands share
    ("stream",),  # framing and fan-out: it knows nothing of devices
    ("access", "alerts", "devices", "history", "metrics"),
    ("jobs",),  # jobs are made from pushes and kept beside the history, with its clock
    ("fleet",),  # the fleet feeds history, alerts and jobs and publishes to the stream
    ("ingest", "pages"),  # routes over the fleet
)
LAYER = {capability: n for n, capabilities in enumerate(LAYERS) for capability in capabilities}
# Above the whole package: config.py (settings, which hands its store commands to the package) and
# app.py (the composition root). The package raises ConfigError; they turn it into a message.
ABOVE = ("config", "app")


def package_imports(path):
    """Yield every gpustats module, or module ABOVE it, that `path` imports, as a dotted name, lazy imports included."""
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.split(".")[0] in ("gpustats", *ABOVE))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] in ABOVE:
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "gpustats":
            if node.module == "gpustats" or (ROOT / node.module.replace(".", "/")).is_dir():
                yield from (f"{node.module}.{alias.name}" for alias in node.names)  # from gpustats.alerts import formats
            else:
                yield node.module
        elif isinstance(node, ast.ImportFrom) and node.level:
            yield "a relative import"  # absolute imports only: a module's place shows in each import


def capability_of(module):
    """Return the capability a dotted gpustats module belongs to: gpustats.history.sqlite -> history."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def layering_problems(root=ROOT):
    """Return one line for each import in the package that goes sideways or up, or names no known place."""
    problems = []
    for path in sorted((root / "gpustats").rglob("*.py")):
        relative = path.relative_to(root).with_suffix("")
        mine = capability_of(".".join(relative.parts))
        for module in package_imports(path):
            theirs = capability_of(module) if module != "a relative import" else None
            if module.split(".")[0] in ABOVE:
                problems.append(f"{relative} imports {module}, which stands above the package: imports go down")
            elif mine not in LAYER or theirs not in LAYER:
                problems.append(f"{relative}: imports {module}, which has no layer in tests/test_project.py")
            elif theirs != mine and LAYER[theirs] >= LAYER[mine]:
                problems.append(f"{relative} ({mine}, layer {LAYER[mine]}) imports {module} ({theirs}, layer "
                                f"{LAYER[theirs]}): imports go down")
    return problems


def test_the_package_imports_only_downwards():
    assert layering_problems() == []


def test_a_sideways_or_upward_import_is_caught(tmp_path):
    # The test above must be able to fail: history importing the fleet (above it) and alerts
    # importing history (beside it) are both refused.
    (tmp_path / "gpustats" / "history").mkdir(parents=True)
    (tmp_path / "gpustats" / "alerts").mkdir()
    (tmp_path / "gpustats" / "history" / "tiers.py").write_text("from gpustats.fleet.memory import Fleet\n")
    (tmp_path / "gpustats" / "alerts" / "rules.py").write_text("def f():\n    from gpustats.history import tiers\n")
    assert layering_problems(tmp_path) == [
        "gpustats/alerts/rules (alerts, layer 4) imports gpustats.history.tiers (history, layer 4): imports go down",
        "gpustats/history/tiers (history, layer 4) imports gpustats.fleet.memory (fleet, layer 6): imports go down"]


def test_an_import_of_config_or_app_from_the_package_is_caught(tmp_path):
    # config.py and app.py import the package; the package importing them back ran in a circle.
    (tmp_path / "gpustats" / "history").mkdir(parents=True)
    (tmp_path / "gpustats" / "history" / "sqlite.py").write_text("from config import ConfigError\n")
    (tmp_path / "gpustats" / "pages.py").write_text("def f():\n    import app\n")
    assert layering_problems(tmp_path) == [
        "gpustats/history/sqlite imports config, which stands above the package: imports go down",
        "gpustats/pages imports app, which stands above the package: imports go down"]


def test_nothing_but_gunicorn_and_the_tests_imports_the_composition_root():
    importers = [path.relative_to(ROOT) for path in [*ROOT.glob("*.py"), *(ROOT / "gpustats").rglob("*.py"),
                                                      *(ROOT / "bench").rglob("*.py")]
                 if "app" in set(imported_modules(path))]
    assert importers == []


def test_server_requirements_cover_the_server_and_hold_no_test_tools_or_agent_packages():
    """requirements.txt is what a droplet installs: the server's imports, nothing more (issue: test tools in prod)."""
    runtime = requirements(ROOT / "requirements.txt")
    assert TEST_TOOLS.isdisjoint(runtime), "test tools belong in requirements-test.txt"
    # The Procfile's command needs gunicorn and its worker class (-k) besides what the code imports.
    command = shlex.split(procfile_command())
    needed = {"Procfile": {command[0], command[command.index("-k") + 1]}, **server_imports()}
    assert "app.py" in needed and "agent.py" not in needed
    distributions = metadata.packages_distributions()
    installed = with_dependencies(runtime)
    missing = {f"{module} (imported by {where})" for where, modules in needed.items() for module in modules
               if not {canonicalize_name(d) for d in distributions.get(module, [])} & installed}
    assert not missing, "requirements.txt does not install these"
    needed_dists = {canonicalize_name(d) for modules in needed.values() for m in modules
                    for d in distributions.get(m, [])}
    agent_only = set(requirements(ROOT / "requirements-agent.txt")) - needed_dists
    assert agent_only and agent_only.isdisjoint(runtime), "the agent's packages belong in requirements-agent.txt"


def test_test_requirements_hold_the_server_the_agent_and_the_test_tools():
    tests = requirements(ROOT / "requirements-test.txt")
    assert {*requirements(ROOT / "requirements.txt"), *requirements(ROOT / "requirements-agent.txt"),
            *TEST_TOOLS} <= set(tests)


def make_env():
    """Return this environment without an outer make's flags (the suite may run under `make test`)."""
    return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}


def make_dry_run(target, venv):
    """Return the command lines `make -n <target>` prints for a venv at `venv`, continuations joined."""
    result = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, env=make_env(), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.replace("\\\n", " ").splitlines()


def pip_installs(lines):
    """Return the requirements files named by the pip install commands among `lines`, in order."""
    files = []
    for line in lines:
        if "pip" in line and " install " in line:
            words = shlex.split(line)
            files += [file for flag, file in zip(words, words[1:]) if flag in ("-r", "--requirement")]
    return files


def installed_by(files):
    """Return the requirement names that installing `files` pulls in, -r includes resolved."""
    return {name for file in files for name in requirements(ROOT / file)}


def test_make_test_installs_the_test_tools_and_the_agent_before_running_pytest(tmp_path):
    lines = make_dry_run("test", tmp_path / "venv")
    files = pip_installs(lines)
    assert "requirements-test.txt" in files
    assert TEST_TOOLS | set(requirements(ROOT / "requirements-agent.txt")) <= installed_by(files), files
    last_install = max(i for i, line in enumerate(lines) if " install " in line)
    assert any("-m pytest" in line for line in lines[last_install:]), "pytest runs after the installs"


def test_make_run_installs_only_the_server(tmp_path):
    installed = installed_by(pip_installs(make_dry_run("run", tmp_path / "venv")))
    assert installed == set(requirements(ROOT / "requirements.txt"))


def test_make_demo_installs_the_agent_it_runs_but_no_test_tools(tmp_path):
    installed = installed_by(pip_installs(make_dry_run("demo", tmp_path / "venv")))
    assert set(requirements(ROOT / "requirements-agent.txt")) <= installed and TEST_TOOLS.isdisjoint(installed)


def test_make_test_installs_once_and_again_when_the_requirements_change(tmp_path):
    venv, calls = tmp_path / "venv", tmp_path / "calls"
    (venv / "bin").mkdir(parents=True)
    for tool in ("pip", "python"):  # a venv that records what make asks of it
        (venv / "bin" / tool).write_text(f'#!/bin/sh\necho {tool} "$@" >> {shlex.quote(str(calls))}\n')
        (venv / "bin" / tool).chmod(0o755)

    def make_test():
        calls.write_text("")
        subprocess.run(["make", "test", f"VENV={venv}", "PYTEST_ARGS="], cwd=ROOT, env=make_env(), capture_output=True,
                       timeout=30, check=True)
        return calls.read_text().splitlines()
    first = make_test()
    assert "requirements-test.txt" in pip_installs(first) and first[-1] == "python -m pytest"
    assert make_test() == ["python -m pytest"]
    for stamp in venv.iterdir():
        if stamp.is_file():
            os.utime(stamp, (0, 0))  # older than every requirements file: as if one had just changed
    assert "requirements-test.txt" in pip_installs(make_test())


def test_bare_pytest_imports_the_top_level_modules():
    """`pytest` alone works, not only `python -m pytest` (issue: ModuleNotFoundError: payload)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    # -n 0: one process, not pytest.ini's four, for one small file (6 s of four imports each, under load 13 s).
    result = subprocess.run([str(Path(sys.executable).parent / "pytest"), "-p", "no:cacheprovider", "-q", "-n", "0",
                             "tests/test_stream_sse.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def readme_section(title, page="README.md"):
    """Return the `## title` section of the README (or of another page), up to the next `## ` heading."""
    text = (ROOT / page).read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_quickstart_names_every_program_the_tests_need_with_the_line_that_installs_it():
    # Issue 30: a new user met these at README line 1,210, after make test had failed.
    ci = (ROOT / ".ci" / "run").read_text()
    needed = re.findall(r"missing\+=\((\S+)\)", ci)
    assert len(needed) >= 5
    quickstart = readme_section("Quickstart")
    install = next(line for line in quickstart.splitlines() if "apt-get install" in line)
    assert all(package in install.split() for package in needed), (needed, install)
    assert "bash .ci/run" in quickstart


def test_readme_configuration_table_is_the_configs_own():
    section = readme_section("Configuration")
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table == config.settings_table().splitlines(), "update it with: python config.py --settings-table"


def test_gunicorn_takes_worker_connections_from_the_config_even_from_env_file(tmp_path):
    # The Procfile's shell sees only the real environment: a value in .env must still reach gunicorn.
    env_file = tmp_path / ".env"
    env_file.write_text("WORKER_CONNECTIONS=321\nMAX_SUBSCRIBERS=250\n")
    environ = {k: v for k, v in os.environ.items() if k not in ("WORKER_CONNECTIONS", "MAX_SUBSCRIBERS")}
    environ.update(ENV_FILE=str(env_file), PORT="0", PATH=f"{Path(sys.executable).parent}{os.pathsep}{environ['PATH']}")

    def resolved():
        done = subprocess.run(["sh", "-c", f"exec {procfile_command()} --print-config"], cwd=ROOT, env=environ,
                              capture_output=True, text=True, timeout=30)
        return dict(re.findall(r"^(\w+)\s+= (.*)$", done.stdout, re.M))
    assert resolved()["worker_connections"] == "321"
    env_file.write_text("")
    default = next(s.default for s in config.SETTINGS if s.name == "WORKER_CONNECTIONS")
    assert resolved()["worker_connections"] == default


SYSTEMD_VARIABLE = re.compile(r"\$\$|\$\{(\w+)\}")


def systemd_argv(command, environment):
    """Return the argv systemd runs for an ExecStart= value (systemd.service(5), "Command lines")."""
    argv = []
    for word in shlex.split(command):  # systemd's quoting, close enough for one unit line
        assert "%" not in word.replace("%%", ""), f"systemd expands % specifiers in {word!r}; write %%"
        word = word.replace("%%", "%")
        if re.fullmatch(r"\$(\w+)", word):  # $FOO as a word of its own: its value split at whitespace
            argv += environment.get(word[1:], "").split()
        else:  # ${FOO} anywhere: its value as is; $$: a literal $
            argv.append(SYSTEMD_VARIABLE.sub(lambda m: environment.get(m[1], "") if m[1] else "$", word))
    return argv


def read_until(process, text, timeout):
    """Return the process's output up to `text`; fail if it exits first or the deadline passes."""
    deadline = time.monotonic() + timeout
    output = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while text.encode() not in output:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout} s:\n{output.decode(errors='replace')}"
            if selector.select(left):
                chunk = os.read(process.stdout.fileno(), 65536)
                assert chunk, f"exited before {text!r}:\n{output.decode(errors='replace')}"
                output += chunk
    return output.decode(errors="replace")


def stop_group(process):
    """Stop a process started in its own session, and whatever it started."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    process.stdout.close()


def test_deploy_docs_systemd_unit_starts_the_server():
    """The unit's ExecStart, as systemd runs it, boots gunicorn and serves (it once passed quotes literally)."""
    deploy = readme_section("Deploy on a droplet behind nginx", "docs/DEPLOY.md")
    unit = re.search(r"```ini\n(\[Unit\].*?)```", deploy, re.S)[1]
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    env = {"PORT": "0", "ENV_FILE": os.devnull, "ADMIN_PASSWORD": "admin-password-of-the-unit",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    argv = systemd_argv(exec_start.removeprefix("ExecStart="), env)
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output = read_until(process, "Booting worker", timeout=20)
        port = re.search(r"Listening at: http://[^:]+:(\d+)", output)[1]
        # The socket is listening already: this waits in its backlog until the worker serves it.
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=15).json()["ok"] is True
    finally:
        stop_group(process)

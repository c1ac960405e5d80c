"""The commands that install and start the agent on a new PC, for this server's address and one key.

Each is a download of this server's own agent and its requirements, then one run of
`agent.py --install`, which keeps the key in a file only its owner reads and starts the
agent at boot or logon. The key reaches it in the environment, never as an argument that
`ps` would show to every user of the PC.

Every value put in a command is quoted for its shell here, wherever it came from: the address
may be ALERT_DASHBOARD_URL or the request's own Host header (issue: a ' in the address let the
Windows command run `iex(...)`).
"""
import ipaddress
import shlex
from urllib.parse import urlsplit

# PowerShell's tokenizer reads each of these as a single quote (IsSingleQuote): ' and U+2018-U+201B.
POWERSHELL_QUOTES = "'\u2018\u2019\u201a\u201b"


def powershell_quote(text):
    """Return `text` as one PowerShell single-quoted string: each quote in it doubled, which PowerShell reads as one."""
    return "'" + "".join(c * 2 if c in POWERSHELL_QUOTES else c for c in text) + "'"


def commands(base, key):
    """Return {"linux", "windows", "macos"}: a command each that installs and starts the agent."""
    push_url = f"{base}/push-sse"
    posix = ("mkdir -p ~/gpu-stats-agent && cd ~/gpu-stats-agent && "
             f"curl -fsSLO {shlex.quote(base + '/agent.py')} && "
             f"curl -fsSL {shlex.quote(base + '/agent-requirements.txt')} -o requirements-agent.txt && "
             "python3 -m venv .venv && .venv/bin/pip install -q -r requirements-agent.txt && "
             f"DEVICE_KEY={shlex.quote(key)} .venv/bin/python agent.py --url {shlex.quote(push_url)} --install")
    windows = ("New-Item -ItemType Directory -Force $HOME\\gpu-stats-agent | Set-Location; "
               f"Invoke-WebRequest {powershell_quote(base + '/agent.py')} -OutFile agent.py; "
               f"Invoke-WebRequest {powershell_quote(base + '/agent-requirements.txt')} -OutFile requirements-agent.txt; "
               "py -m pip install -q -r requirements-agent.txt; "
               f"$env:DEVICE_KEY = {powershell_quote(key)}; py agent.py --url {powershell_quote(push_url)} --install")
    return {"linux": posix, "windows": windows, "macos": posix}


def reaches_only_itself(base):
    """Return whether `base` names this machine alone (localhost, 127.0.0.0/8, ::1): no other PC reaches it there."""
    host = (urlsplit(base).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

"""Config: defaults, .env versus the environment, and one clear error per bad value."""
import os
import re
import socket
import shutil
import stat
import subprocess
import sys

import pytest

import config
from config import ConfigError, load_config
from conftest import ROOT


OPEN = {"DASHBOARD_PUBLIC": "1"}  # these tests are of other settings: the open dashboard needs no password


def load(**env):
    return load_config(environ={"ENV_FILE": os.devnull, **OPEN, **env})


def test_defaults_match_the_spec():
    c = load()
    assert (c.port, c.stale_after_s, c.offline_after_s, c.heartbeat_s, c.history_s,
            c.max_body_bytes, c.push_rate_limit, c.dashboard_user, c.device_keys) == (
        3000, 15, 60, 15, 600, 65536, 5, "admin", {})


@pytest.mark.parametrize("name,value", [
    ("PORT", "http"), ("PORT", "70000"), ("STALE_AFTER_S", "-1"), ("HEARTBEAT_S", "nan"),
    ("HISTORY_S", "1.5"), ("MAX_BODY_BYTES", "12"), ("PUSH_RATE_LIMIT", "0"),
    ("DEVICE_KEYS", "rig-1"), ("DEVICE_KEYS", "rig 1:abcdefghijklmnopq"), ("DEVICE_KEYS", "rig-1:short"),
    ("DEVICE_KEYS", "a:abcdefghijklmnopq,b:abcdefghijklmnopq"), ("OFFLINE_AFTER_S", "10"),
    ("RING_SIZE", "lots"), ("VIEWER_TIMEOUT_S", "0"), ("TRUSTED_PROXIES", "my-proxy"), ("MAX_SUBSCRIBERS", "0"),
    ("PUSH_RATE_LIMIT", "inf"), ("HEARTBEAT_S", "-inf"), ("REDIS_URL", "http://cache:6379"),
    ("REDIS_URL", "redis://:secret@cache:63x9/0"), ("REDIS_URL", "redis://cache:99999/0"), ("WEB_CONCURRENCY", "2"),
    ("ADMIN_PASSWORD", "short"), ("SECRET_KEY", "too-short"), ("DASHBOARD_PUBLIC", "yes"),
])
def test_a_bad_value_is_one_error_naming_the_variable(name, value):
    with pytest.raises(ConfigError) as error:
        load(**{name: value})
    assert str(error.value).startswith(name + ":")
    assert "\n" not in str(error.value) and "secret" not in str(error.value)  # a URL's password stays out


def test_with_neither_an_admin_password_nor_a_public_dashboard_the_server_refuses_to_start():
    with pytest.raises(ConfigError) as error:
        load_config(environ={"ENV_FILE": os.devnull})
    assert str(error.value) == ("ADMIN_PASSWORD is not set and DASHBOARD_PUBLIC is not 1: set ADMIN_PASSWORD (make run "
                                "writes one to .env) to sign in, or DASHBOARD_PUBLIC=1 for an open read-only dashboard")
    assert load_config(environ={"ENV_FILE": os.devnull, "ADMIN_PASSWORD": "a" * 12}).dashboard_public is False


def test_scaled_out_servers_need_one_secret_key():
    with pytest.raises(ConfigError, match="^SECRET_KEY: needed with REDIS_URL"):
        load(REDIS_URL="redis://cache:6379/0", SECRET_KEY="")
    assert load(REDIS_URL="redis://cache:6379/0", SECRET_KEY="k" * 32).secret_key == "k" * 32


def test_device_keys_map_keys_to_devices_and_allow_several_keys_per_device():
    c = load(DEVICE_KEYS=" rig-1:aaaaaaaaaaaaaaaa1, rig-2:bbbbbbbbbbbbbbbb2 ,rig-1:cccccccccccccccc3")
    assert c.device_keys == {"aaaaaaaaaaaaaaaa1": "rig-1", "bbbbbbbbbbbbbbbb2": "rig-2",
                             "cccccccccccccccc3": "rig-1"}
    assert c.devices == ["rig-1", "rig-2"]


def test_env_file_is_read_and_real_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=4000\nHEARTBEAT_S=5\n")
    c = load_config(environ={"ENV_FILE": str(env_file), "PORT": "5000", **OPEN})
    assert (c.port, c.heartbeat_s) == (5000, 5)


def test_overrides_win_over_everything():
    assert load_config({"PORT": 1234}, environ={"ENV_FILE": os.devnull, "PORT": "1", **OPEN}).port == 1234


def test_cors_origins_are_a_list():
    assert load(CORS_ORIGINS="https://a.example/, https://b.example").cors_origins == (
        "https://a.example", "https://b.example")


def test_first_env_file_has_a_fresh_key_mode_600_and_is_never_overwritten(tmp_path):
    path = tmp_path / ".env"
    device, key = config.init_env_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    c = load_config(environ={"ENV_FILE": str(path), **OPEN})
    assert c.device_keys == {key: device}
    assert config.init_env_file(path) is None
    assert load_config(environ={"ENV_FILE": str(path), **OPEN}).device_keys == {key: device}
    other = tmp_path / "other.env"
    assert config.init_env_file(other)[1] != key


def test_first_run_prints_the_agents_env_lines_not_a_command_line_with_the_key(tmp_path):
    # Issue 20: make run printed `python agent.py --url ... --key KEY`: a key every local user reads in ps.
    shutil.copy(ROOT / "config.py", tmp_path / "config.py")  # its .env goes beside it, not into the checkout
    env = {k: v for k, v in os.environ.items() if k not in ("ENV_FILE", "DEVICE_KEYS")}
    done = subprocess.run([sys.executable, "config.py", "--init-env"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert done.returncode == 0, done.stderr
    key = re.search(r"DEVICE_KEYS=gpu-pc-1:(\S+)", (tmp_path / ".env").read_text())[1]
    assert "--key" not in done.stdout
    assert "copy agent.py beside a .env holding the two lines below (chmod 600 .env)" in done.stdout
    assert re.search(r"^    PUSH_URL=http://\S+:3000/push-sse\n    DEVICE_KEY=" + re.escape(key) + "$", done.stdout, re.M)


def test_a_key_is_printed_once_when_made_and_the_sign_in_address_at_every_start(tmp_path):
    # Issue 30: every start printed every device key again: 120 lines for a 40-PC DEVICE_KEYS.
    first = init_env(tmp_path)
    key = re.search(r"DEVICE_KEYS=gpu-pc-1:(\S+)", (tmp_path / ".env").read_text())[1]
    assert key in first
    with open(tmp_path / ".env", "a") as env:
        env.write("DEVICE_KEYS=" + ",".join(f"pc-{n}:{'k' * 20}{n:02d}" for n in range(40)) + "\n")
    again = init_env(tmp_path)
    assert key not in again and "k" * 20 not in again
    assert again.strip().splitlines() == [f"Sign in at http://{socket.gethostname()}:3000/ (add PCs on its Devices "
                                          "page, /devices)"]


def init_env(folder):
    """Run `python config.py --init-env` as make run does, with a copy of config.py in `folder`; return its output."""
    shutil.copy(ROOT / "config.py", folder / "config.py")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ENV_FILE", "DEVICE_KEYS", "ADMIN_PASSWORD", "SECRET_KEY", "DASHBOARD_PUBLIC")}
    done = subprocess.run([sys.executable, "config.py", "--init-env"], cwd=folder, capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(ROOT)}, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_first_run_writes_an_admin_password_and_a_session_key_and_shows_the_password_once(tmp_path):
    first = init_env(tmp_path)
    env = (tmp_path / ".env").read_text()
    password = re.search(r"^ADMIN_PASSWORD=(\S+)$", env, re.M)[1]
    assert len(password) >= 16 and len(re.search(r"^SECRET_KEY=(\S+)$", env, re.M)[1]) >= 32
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600
    assert f"as admin, password {password}" in first
    again = init_env(tmp_path)
    assert password not in again and (tmp_path / ".env").read_text() == env  # shown once, never overwritten


def test_an_existing_env_file_gets_the_missing_lines_appended(tmp_path):
    (tmp_path / ".env").write_text("DEVICE_KEYS=rig-1:aaaaaaaaaaaaaaaa1\nSECRET_KEY=" + "s" * 40)  # no newline at its end
    (tmp_path / ".env").chmod(0o644)
    output = init_env(tmp_path)
    env = (tmp_path / ".env").read_text()
    assert env.startswith("DEVICE_KEYS=rig-1:aaaaaaaaaaaaaaaa1\nSECRET_KEY=" + "s" * 40 + "\n")
    assert env.count("SECRET_KEY=") == 1 and env.count("ADMIN_PASSWORD=") == 1
    assert stat.S_IMODE((tmp_path / ".env").stat().st_mode) == 0o600  # it holds a password now
    assert "as admin, password" in output


@pytest.mark.parametrize("command", [["--add-device", "pc-1"], ["--list-devices"], ["--list-users"]])
def test_a_store_command_on_a_history_db_it_cannot_open_says_so_in_one_line(tmp_path, command):
    (tmp_path / "a-file").write_text("")
    env = {**os.environ, "ENV_FILE": os.devnull, "HISTORY_DB": str(tmp_path / "a-file" / "history.sqlite3"),
           "ADMIN_PASSWORD": "x" * 16}
    env.pop("REDIS_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "config.py"), *command], capture_output=True, text=True, env=env,
                          timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        f"config error: HISTORY_DB: cannot use {tmp_path / 'a-file' / 'history.sqlite3'} as the history database: "
        "unable to open database file"]

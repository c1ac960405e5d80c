"""Device names: one rule wherever a name comes in, and a name made under an older rule can still go (issue: "." and "..")."""
import io
import os

import pytest

from config import ConfigError, load_config
from gpustats.devices.commands import devices_command
from gpustats.devices.sqlite import SqliteDevices
from gpustats.tokens import digest, new_secret

OPEN = {"ENV_FILE": os.devnull, "DASHBOARD_PUBLIC": "1"}
NO_LETTER_OR_DIGIT = [".", "..", "...", "-", "_._", "-rig", ".hidden"]


@pytest.mark.parametrize("name", NO_LETTER_OR_DIGIT)
def test_device_keys_refuse_a_name_that_does_not_start_with_a_letter_or_digit(name):
    with pytest.raises(ConfigError) as error:
        load_config(environ={**OPEN, "DEVICE_KEYS": f"{name}:abcdefghijklmnopq"})
    assert str(error.value).startswith("DEVICE_KEYS: ") and "\n" not in str(error.value)


@pytest.mark.parametrize("name", NO_LETTER_OR_DIGIT)
def test_config_add_device_refuses_it_with_one_line_and_adds_nothing(name, tmp_path):
    config = load_config(environ={**OPEN, "HISTORY_DB": str(tmp_path / "history.sqlite3")})
    with pytest.raises(ConfigError) as error:
        devices_command(["--add-device", name], config, out=io.StringIO())
    assert str(error.value).startswith("name: ") and "\n" not in str(error.value)
    assert SqliteDevices(config.history_db).devices() == []


def test_config_remove_device_still_removes_one_made_before(tmp_path):
    config = load_config(environ={**OPEN, "HISTORY_DB": str(tmp_path / "history.sqlite3")})
    store = SqliteDevices(config.history_db)
    for name in ("..", "_._", "render-box"):
        store.add(name, digest(new_secret()), new_secret())
    for name in ("..", "_._"):
        assert devices_command(["--remove-device", name], config, out=io.StringIO()) == 0
    assert [d["name"] for d in store.devices()] == ["render-box"]

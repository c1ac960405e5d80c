"""The files that start the agent at logon or boot say what docs/DEPLOY.md says they do."""
import configparser
import xml.etree.ElementTree as ET

from conftest import ROOT

TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def test_windows_task_runs_pythonw_agent_hidden_at_logon_and_restarts():
    task = ET.parse(ROOT / "deploy" / "gpu-stats-agent-task.xml").getroot()
    assert task.find("t:Triggers/t:LogonTrigger/t:Enabled", TASK_NS).text == "true"
    assert task.find("t:Settings/t:Hidden", TASK_NS).text == "true"
    assert task.find("t:Settings/t:ExecutionTimeLimit", TASK_NS).text == "PT0S"  # never killed after 72 h
    assert task.find("t:Settings/t:RestartOnFailure/t:Count", TASK_NS) is not None
    assert task.find("t:Actions/t:Exec/t:Command", TASK_NS).text == "pythonw.exe"
    assert task.find("t:Actions/t:Exec/t:Arguments", TASK_NS).text == "agent.py"


def test_systemd_unit_restarts_on_failure_but_not_on_a_refused_key():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "gpu-stats-agent.service")
    service = unit["Service"]
    assert service["ExecStart"].endswith("/agent.py") and service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "3"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"

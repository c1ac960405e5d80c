"""The simulated reader: made-up GPUs for demos and machines with none, each one different and within range."""
import agent
from gpustats.ingest import payload as server_payload


def test_simulated_gpus_move_and_stay_in_range():
    reader = agent.SimulatedReader(3, seed=1)
    first, second = reader.sample(), reader.sample()
    assert len(first) == 3 and first != second
    for gpu in first + second:
        assert 0 <= gpu["utilizationGpu"] <= 100 and 0 <= gpu["fanSpeed"] <= 100
        assert gpu["memoryUsed"] + gpu["memoryFree"] == gpu["memoryTotal"]


def test_simulated_gpus_differ_from_each_other_and_from_another_agents():
    # Issue 30: in make demo two simulated GPUs showed the same values and processes.
    one, other = agent.SimulatedReader(8).sample(), agent.SimulatedReader(8).sample()
    readings = [tuple((k, str(v)) for k, v in sorted(g.items()) if k not in ("index", "uuid")) for g in one + other]
    assert len(set(readings)) == 16
    assert len({g["uuid"] for g in one + other}) == 16
    for gpu in one + other:
        server_payload.validate({"gpus": [gpu]})

"""What one push carries: each GPU at an index of its own, every value within the server's limits."""
import agent
from gpustats.ingest import payload as server_payload


def test_no_backend_can_send_an_index_twice_or_out_of_order():
    # The server refuses a whole push that repeats an index; whatever a reader returns, the
    # readable GPUs keep their indices and the rest take the lowest free ones.
    class Reader:
        name = "test"

        def sample(self):
            return [{"index": 2, "error": "NVML: GPU is lost"}, {"index": 2, "name": "B"},
                    {"index": 0, "name": "A"}, {"error": "no index"}, {"index": 5000, "error": "too high"}]
    payload = agent.build_payload(Reader())
    assert [(g["index"], g.get("name") or g["error"]) for g in payload["gpus"]] == [
        (0, "A"), (1, "NVML: GPU is lost"), (2, "B"), (3, "no index"), (4, "too high")]
    server_payload.validate(payload)


def test_what_the_agent_sends_always_fits_the_servers_limits():
    procs = [{"pid": i, "name": "C:\\Program Files\\Game\tLauncher\x00" + "x" * 300, "memoryUsed": 1}
             for i in range(100)]
    body = agent._fit({"host": "h" * 300, "gpus": [{"index": 0, "name": "n\x1b" * 100, "processes": procs}],
                       "error": "e" * 500})
    checked = server_payload.validate(body)  # the server's own checks accept it
    assert len(checked["gpus"][0]["processes"]) == 64 and len(checked["error"]) == 128

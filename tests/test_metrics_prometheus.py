"""A real Prometheus (Debian's) scrapes the real server with the viewer login; the Grafana dashboard asks only for what we export."""
import json
import os
import re
import subprocess
import sys

import pytest
import requests

from conftest import KEYS, PRIVATE, ROOT, free_port, gpu, multi, require, wait_for

DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
PASSWORD = "s3cret-enough"
# PromQL's own words: none of them is a metric.
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or", "unless"}
# Grafana's variables, as the dashboard's user picks them: every job, every device.
VARIABLES = {"$job": "gpustats", "$device": ".*", "$__rate_interval": "1m"}


class Prometheus:
    """Debian's prometheus on a free loopback port, with a config written for the test; its data in tmp_path."""

    def __init__(self, tmp_path, scrape_configs):
        self.binary = require("prometheus", "prometheus")
        self.dir, self.port, self.process = tmp_path / "prometheus", free_port(), None
        self.dir.mkdir()
        config = {"global": {"scrape_interval": "500ms", "scrape_timeout": "500ms"}, "scrape_configs": scrape_configs}
        (self.dir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML

    def start(self):
        self.log = open(self.dir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=15)
        return self

    def _ready(self):
        assert self.process.poll() is None, (self.dir / "prometheus.log").read_text()
        try:
            return requests.get(f"{self.url}/-/ready", timeout=1).ok
        except requests.RequestException:
            return False

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def query(self, expr):
        """Return the instant vector `expr` evaluates to now, as [(labels, value)]."""
        answer = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert answer["status"] == "success", (expr, answer)
        result = answer["data"]["result"]
        return [(r.get("metric", {}), float(r["value"][1])) for r in result] if isinstance(result, list) else result

    def targets(self):
        return requests.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]


@pytest.fixture
def prometheus(tmp_path):
    started = []

    def start(scrape_configs):
        started.append(Prometheus(tmp_path, scrape_configs).start())
        return started[-1]
    yield start
    for server in started:
        server.stop()


def dashboard_queries():
    """Return every PromQL expression of the Grafana dashboard, and the metrics its variables list labels of."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in board["panels"] for t in panel.get("targets", ())]
    variables = [re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", v["query"]["query"])
                 for v in board["templating"]["list"]]
    return exprs, variables


def metric_names(expr):
    """Return the metric names an expression selects: what is left once strings, matchers, ranges, grouping and calls are out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {name for name in re.findall(r"(?<![\w$])[A-Za-z_:][\w:]*\b(?!\s*\()", expr) if name not in PROMQL_WORDS}


def exported_names(make_app):
    """Return the name of every sample a server with one fully reporting GPU exports."""
    client = make_app(DEVICE_KEYS=f"rig-1:{KEYS['rig-1']}", HISTORY_DB="").test_client()
    client.post("/push-sse", json=multi(gpu(0)), headers={"Authorization": f"Bearer {KEYS['rig-1']}"})
    text = client.get("/metrics").get_data(as_text=True)
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_the_grafana_dashboard_is_import_ready_and_asks_only_for_metrics_we_export(make_app):
    board = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]  # Grafana asks for the data source at import
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert {p["datasource"]["uid"] for p in panels} == {"${DS_PROMETHEUS}"}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    exprs, variables = dashboard_queries()
    assert all(variables), "every variable is a label_values() query"
    used = set().union(*map(metric_names, exprs)) | {v.group(1) for v in variables}
    exported = exported_names(make_app)
    assert used - exported == set()
    assert {"gpustats_gpu_utilization_ratio", "gpustats_gpu_memory_used_bytes", "gpustats_gpu_temperature_celsius",
            "gpustats_gpu_power_draw_watts", "gpustats_device_up", "gpustats_gpu_info"} <= used


def test_metric_names_finds_every_metric_and_nothing_else():
    assert metric_names('sum by (code) (rate(gpustats_pushes_total{job=~"$job", x="a b"}[$__rate_interval]))') == {
        "gpustats_pushes_total"}
    assert metric_names("count(up == 0) or vector(0) / on(device) gpustats_gpu_typo") == {"up", "gpustats_gpu_typo"}


def test_prometheus_scrapes_every_worker_of_the_fleet_with_the_viewer_login(start_server, redis_server, prometheus):
    server = start_server(REDIS_URL=redis_server.url, WEB_CONCURRENCY="2", DASHBOARD_PASSWORD=PASSWORD, **PRIVATE,
                          PUSH_RATE_LIMIT="1000")
    assert server.push(multi(gpu(0), gpu(1, temperatureGpu=None))).status_code == 200
    assert server.push(multi(gpu(0, memoryUsed=1024)), device="rig-2").status_code == 200
    assert server.push(multi(gpu(0, powerDraw=-5)), device="rig-2").status_code == 400
    target = f"127.0.0.1:{server.port}"
    made = subprocess.run([sys.executable, str(ROOT / "config.py"), "--add-token", "prometheus", "--role", "viewer"],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **server.settings})
    token = made.stdout.rsplit(" ", 1)[1].strip()  # a viewer's API token, as docs/API.md says to scrape with
    prom = prometheus([
        {"job_name": "gpustats", "static_configs": [{"targets": [target]}],
         "basic_auth": {"username": "admin", "password": PASSWORD}},
        {"job_name": "token", "static_configs": [{"targets": [target]}], "authorization": {"credentials": token},
         "metric_relabel_configs": [{"source_labels": ["__name__"], "regex": ".+", "action": "drop"}]},  # up alone
        {"job_name": "no-login", "static_configs": [{"targets": [target]}]}])

    wait_for(lambda: len(prom.query("gpustats_gpu_info")) == 3, timeout=10)
    assert sorted((labels["device"], labels["gpu"], labels["uuid"], labels["name"], labels["driver"], labels["job"])
                  for labels, _ in prom.query("gpustats_gpu_info")) == [
        ("rig-1", "0", gpu(0)["uuid"], "NVIDIA GeForce RTX 3080", "560.94", "gpustats"),
        ("rig-1", "1", gpu(1)["uuid"], "NVIDIA GeForce RTX 3080", "560.94", "gpustats"),
        ("rig-2", "0", gpu(0)["uuid"], "NVIDIA GeForce RTX 3080", "560.94", "gpustats")]
    assert sorted((l["device"], l["gpu"], v) for l, v in prom.query("gpustats_gpu_temperature_celsius")) == [
        ("rig-1", "0", 65.0), ("rig-2", "0", 65.0)]  # rig-1's GPU 1 reported none: no series, not 0
    assert sorted((l["device"], v) for l, v in prom.query("gpustats_gpu_memory_used_bytes")) == [
        ("rig-1", 6144 * 2**20), ("rig-1", 6144 * 2**20), ("rig-2", 1024 * 2**20)]
    assert sorted((l["device"], v) for l, v in prom.query("gpustats_device_up")) == [("rig-1", 1.0), ("rig-2", 1.0)]
    # Two workers took these pushes; whichever one Prometheus scrapes counts all of them.
    wait_for(lambda: {l["code"]: v for l, v in prom.query('gpustats_pushes_total{code=~"200|400"}')} == {
        "200": 2.0, "400": 1.0}, timeout=5)
    scraped = wait_for(lambda: (ts := prom.targets()) and all(t["health"] != "unknown" for t in ts) and ts)
    jobs = {t["labels"]["job"]: t for t in scraped}
    assert jobs["gpustats"]["health"] == "up" and jobs["token"]["health"] == "up"
    assert jobs["no-login"]["health"] == "down" and "401" in jobs["no-login"]["lastError"]

    exprs, _ = dashboard_queries()
    for expr in exprs:
        query = expr
        for name, value in VARIABLES.items():
            query = query.replace(name, value)
        assert wait_for(lambda: prom.query(query), timeout=10), f"no data for the dashboard's {expr}"

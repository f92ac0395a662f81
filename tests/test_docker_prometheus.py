"""The Prometheus rules and the Grafana dashboard of docker/ against a real Prometheus.

``promtool`` checks the rule files and runs their unit tests (docker/prometheus/tests/). Then
Debian's ``prometheus`` binary, started here on 127.0.0.1, scrapes a real ``mldcn serve`` (two
exported models) every second while the test sends it a short load, including requests whose
budget is too small (rejections); every recording rule and every dashboard query must then
return data, and every rule must evaluate without error. Skipped, with the reason, where the
binaries are not installed (``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from service_support import (
    exported_models,
    free_port,
    request_for,
    run_server,
)

from loadtest.runner import kill_group

DOCKER = Path(__file__).resolve().parents[1] / "docker"
RULES = sorted((DOCKER / "prometheus" / "rules").glob("*.yml"))
DASHBOARDS = sorted((DOCKER / "grafana" / "dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
# Grafana's variables, as the dashboard's "All" selection and a 1-minute range expand them
GRAFANA_VARIABLES = {"$model": ".+", "$__rate_interval": "1m", "$__interval": "5s"}
LOAD_S = 6.0
WAIT_FOR_DATA_S = 30.0


def recording_rules() -> list[str]:
    return [r["record"] for path in RULES for g in yaml.safe_load(path.read_text())["groups"]
            for r in g["rules"] if "record" in r]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every dashboard, variables expanded."""
    out = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for name, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(name, value)
                out.append((panel["title"], expr))
    return out


def test_rule_and_dashboard_files_are_there() -> None:
    assert {p.name for p in RULES} == {"mldcn-recording.yml", "mldcn-alerts.yml"}
    assert len(recording_rules()) >= 10
    assert len(dashboard_queries()) >= 10
    assert all("$" not in expr for _, expr in dashboard_queries()), "unexpanded variable"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests() -> None:
    check = subprocess.run([PROMTOOL, "check", "rules", *map(str, RULES)],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"],
                          cwd=DOCKER / "prometheus" / "tests", capture_output=True, text=True)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    config = subprocess.run([PROMTOOL, "check", "config", "--syntax-only",
                             str(DOCKER / "prometheus" / "prometheus.yml")],
                            capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5.0) as r:
            return json.loads(r.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]


@pytest.fixture(scope="module")
def prometheus_with_load() -> Iterator[Prometheus]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed (apt-get install prometheus)")
    models = exported_models()
    with run_server(models.repo) as server, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in RULES],
            "scrape_configs": [{"job_name": "mldcn-scorer", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}],
        }
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = open(Path(tmp) / "prometheus.log", "wb")
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp}/prometheus.yml",
             f"--storage.tsdb.path={tmp}/data", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        prom = Prometheus(port)
        try:
            _wait(lambda: prom.query('up{job="mldcn-scorer"} == 1'), "the first scrape",
                  proc, Path(tmp) / "prometheus.log")
            _load(server, models)
            yield prom
        finally:
            kill_group(proc)
            log.close()


def _wait(check: Any, what: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_FOR_DATA_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prometheus exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"no {what} within {WAIT_FOR_DATA_S} s:\n{log.read_text()[-2000:]}")


def _load(server: Any, models: Any) -> None:
    """LOAD_S seconds: both models, 1..256 candidates, 4 concurrent clients, and every tenth
    request with a 0.01 ms budget (rejected by admission control)."""
    names = sorted(models.runs)
    bodies = []
    for i, n in enumerate((1, 8, 64, 256)):
        for name in names:
            body = request_for(models.runs[name], i, [j % 200 for j in range(n)])
            bodies.append({**body, "model": name})
    deadline = time.monotonic() + LOAD_S

    def client(k: int) -> dict[int, int]:
        codes: dict[int, int] = {}
        i = k
        while time.monotonic() < deadline:
            headers = {"X-Request-Timeout-Ms": "0.01"} if i % 10 == 0 else None
            status, _ = server.score(bodies[i % len(bodies)], headers)
            codes[status] = codes.get(status, 0) + 1
            i += 1
        return codes

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(client, range(4)))
    assert sum(r.get(200, 0) for r in results) > 50, results
    assert sum(r.get(503, 0) for r in results) > 0, results


@pytest.mark.slow
@pytest.mark.parametrize("record", recording_rules())
def test_recording_rule_returns_data(prometheus_with_load: Prometheus, record: str) -> None:
    prom = prometheus_with_load
    result: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_FOR_DATA_S
    while time.monotonic() < deadline and not result:
        result = prom.query(record)
        if not result:
            time.sleep(0.5)
    assert result, f"{record}: no data"
    if ":p" in record or "mean" in record:  # a percentile or mean of the load: a real value
        values = [float(r["value"][1]) for r in result]
        assert any(v > 0 and v == v for v in values), (record, values)


@pytest.mark.slow
@pytest.mark.parametrize("title,expr", dashboard_queries())
def test_dashboard_query_returns_data(prometheus_with_load: Prometheus, title: str,
                                      expr: str) -> None:
    prom = prometheus_with_load
    result: list[dict[str, Any]] = []
    deadline = time.monotonic() + WAIT_FOR_DATA_S
    while time.monotonic() < deadline and not result:
        result = prom.query(expr)
        if not result:
            time.sleep(0.5)
    assert result, f"panel {title!r}: {expr} returns no data"


@pytest.mark.slow
def test_every_rule_evaluates_without_error(prometheus_with_load: Prometheus) -> None:
    groups = prometheus_with_load.get("/api/v1/rules")["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(recording_rules()) + 5
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    scraped = prometheus_with_load.query("model:mldcn_requests:rate1m")
    assert {r["metric"]["model"] for r in scraped} == set(exported_models().runs)

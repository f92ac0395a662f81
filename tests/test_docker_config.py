"""docker/: the Dockerfiles, the compose stack and its Prometheus/Grafana wiring are consistent.

Fast and Docker-free (CI runs it everywhere); the image itself is built and run by
``make docker-test`` (docker/smoke_test.sh), the rules and dashboard are run against a real
Prometheus by tests/test_docker_prometheus.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from service_support import exported_models, free_port, run_server

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.gpu"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_invariants(path: Path) -> None:
    text = path.read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "BASE_IMAGE build argument"
    froms = re.findall(r"^FROM (\S+) AS (\w+)", text, re.M)
    assert froms == [("${BASE_IMAGE}", "builder"), ("${BASE_IMAGE}", "runtime")]
    runtime = text.split(" AS runtime", 1)[1]
    assert re.search(r"^USER 10001", runtime, re.M), "non-root user in the final stage"
    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    assert re.search(r'^ENTRYPOINT \["mldcn", "serve"\]$', runtime, re.M), "exec form"
    assert not re.search(r"^CMD ", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*healthcheck\.py", runtime, re.M)
    assert re.search(r"^EXPOSE 8000$", runtime, re.M)
    assert "MLDCN_REPO=/models" in runtime and 'VOLUME ["/models"]' in runtime
    for banned in ("torch", "gcc", "build-essential", "g++"):
        assert banned not in runtime, f"{banned} in the final stage"


def test_serve_extra_has_no_torch() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serve = extras["optional-dependencies"]["serve"] + extras["dependencies"]
    assert not [r for r in serve if r.lower().startswith(("torch", "onnx>", "onnx="))]


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*", "an allow-list"
    for needed in ("model/", "export/", "service/", "loadtest/", "docker/wheelhouse/",
                   "docker/healthcheck.py", "docker/models/", "pyproject.toml"):
        assert f"!{needed}" in lines, needed
        assert (ROOT / needed).exists(), needed


def test_compose_wiring() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"scorer", "prometheus", "grafana", "load"} <= set(services)
    for name, svc in services.items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name}: {source} does not exist"
    scorer = services["scorer"]
    assert scorer["build"]["dockerfile"] == "docker/Dockerfile"
    assert (DOCKER / scorer["build"]["context"] / "pyproject.toml").exists()
    assert any(v.endswith(":/models:ro") for v in scorer["volumes"])
    drain_s = float(scorer["environment"]["MLDCN_DRAIN_GRACE_S"])
    assert float(scorer["stop_grace_period"].rstrip("s")) > drain_s

    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "mldcn-scorer"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["scorer:8000"]
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert prom["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    assert "/etc/prometheus/rules" in mounted

    load = services["load"]
    assert load["depends_on"]["scorer"]["condition"] == "service_healthy"
    assert "--url=http://scorer:8000" in load["command"]


def test_grafana_provisioning_matches_the_dashboards() -> None:
    grafana = DOCKER / "grafana"
    (ds,) = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"]
    assert ds["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (grafana / "provisioning/dashboards/mldcn.yml").read_text())["providers"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in (
        compose["services"]["grafana"]["volumes"])
    dashboards = list((grafana / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        titles = [p["title"].lower() for p in dash["panels"]]
        for topic in ("latency", "throughput", "rejections", "batch size", "queue depth"):
            assert any(topic in t for t in titles), f"{path.name}: no {topic} panel"
        for panel in dash["panels"]:
            assert panel["datasource"]["uid"] == ds["uid"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"])


def test_healthcheck_script_follows_readiness() -> None:
    script = [sys.executable, str(DOCKER / "healthcheck.py")]
    idle = subprocess.run(script, env={"MLDCN_PORT": str(free_port())}, timeout=30)
    assert idle.returncode == 1
    with run_server(exported_models().repo) as server:
        ready = subprocess.run(script, env={"MLDCN_PORT": str(server.port)}, timeout=30)
        assert ready.returncode == 0

"""``--workers 2``: a real supervisor with two real worker processes on one socket.

Checked against the real server: metrics add up over both workers whichever answers
``/metrics``; an admin reload reaches both workers (every one answers with the new version,
and the reload's answer lists both); A/B assignment is the same on both; SIGTERM drains both
(in-flight requests finish, new ones get 503 ``draining``) and the supervisor exits 0; a
worker killed while serving is replaced and serves what the others serve.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from service_support import Models, Server, exported_models, metric, request_for, run_server

TOKEN = "workers-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out |= {int(c) for c in children}
    return out


def _workers(server: Server) -> set[int]:
    """The worker pids: children of the supervisor that run the service (not the resource
    tracker)."""
    out = set()
    for c in _children(server.proc.pid):
        try:
            cmd = Path(f"/proc/{c}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            out.add(c)
    return out


def _publish(repo: Path, name: str, version: int) -> None:
    """A copy of version 1 published as ``version`` (the exporter's layout: a plain copy)."""
    shutil.copytree(repo / name / "1", repo / name / str(version))


@pytest.fixture(scope="module")
def models() -> Models:
    return exported_models()


@pytest.fixture
def two(models: Models, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    repo = tmp_path / "models"
    shutil.copytree(models.repo, repo)
    env = {"MLDCN_WORKERS": "2", "MLDCN_ADMIN_TOKEN": TOKEN, "MLDCN_AB": "mldcn:0.5,mlp:0.5",
           "MLDCN_WARMUP_RUNS": "2", "MLDCN_DEFAULT_TIMEOUT_MS": "5000",
           "MLDCN_MAX_QUEUE_DELAY_MS": "300", "MLDCN_DRAIN_GRACE_S": "10"}
    with run_server(repo, env) as server:
        deadline = time.monotonic() + 60
        while len(_answering_workers(server, 20)) < 2:  # a worker answers once it is ready
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        yield server, repo


def _answering_workers(server: Server, n: int = 60) -> set[int]:
    """The worker pids that answered ``GET /admin/models`` on ``n`` fresh connections."""
    seen = set()
    for _ in range(n):
        status, _, data = server.request("GET", "/admin/models", headers=AUTH)
        assert status == 200
        seen.add(json.loads(data)["worker"])
    return seen


def test_metrics_reload_and_ab_across_two_workers(two: tuple[Server, Path],
                                                  models: Models) -> None:
    server, repo = two
    workers = _workers(server)
    assert len(workers) == 2
    # metrics: every worker's requests, whichever worker answers /metrics
    before = server.metrics()
    body = request_for(models.runs["mlp"], 0, list(range(4)))
    for i in range(30):
        status, out = server.score({**body, "model": "mlp", "user_id": f"u{i % 3}"})
        assert status == 200, out
    for _ in range(5):
        after = server.metrics()
        assert (metric(after, "mldcn_requests_total", model="mlp", code="200")
                - metric(before, "mldcn_requests_total", model="mlp", code="200")) == 30
        assert (metric(after, "mldcn_batch_size_rows_sum", model="mlp", version="1")
                - metric(before, "mldcn_batch_size_rows_sum", model="mlp", version="1")) == 120
        assert metric(after, "process_cpu_seconds_total") > 0
    # A/B: a user lands in the same arm whichever worker answers
    arms = {}
    for i in range(40):
        user = f"user-{i % 4}"
        status, out = server.score({**request_for(models.runs["mlp"], 0, [0]),
                                    "user_id": user})
        assert status == 200
        assert arms.setdefault(user, out["arm"]) == out["arm"]
    # an admin reload on one worker reaches the other
    _publish(repo, "mlp", 2)
    status, _, data = server.request("POST", "/admin/models/mlp/reload", b'{"version": 2}',
                                     headers=AUTH, timeout_s=120)
    out = json.loads(data)
    assert status == 200, out
    assert out["version"] == 2 and {int(p) for p in out["workers"]} == workers
    assert all(r["ok"] and r.get("version") == 2 for r in out["workers"].values()), out
    for _ in range(30):  # fresh connections, so both workers answer some
        status, _, data = server.request("GET", "/v2/models/mlp")
        assert status == 200 and json.loads(data)["versions"] == ["2"]
        assert server.score({**body, "model": "mlp"})[1]["version"] == 2
    after = server.metrics()
    assert metric(after, "mldcn_model_info", model="mlp", version="2", arch="mlp",
                  provider="CPUExecutionProvider", precision="fp32") == 1
    assert metric(after, "mldcn_model_info", model="mlp", version="1", arch="mlp",
                  provider="CPUExecutionProvider", precision="fp32") == 0
    # a version that fails is refused on the worker that took the call and published nowhere
    (repo / "mlp" / "3").mkdir()
    (repo / "mlp" / "3" / "model.json").write_text("{}")
    status, _, data = server.request("POST", "/admin/models/mlp/reload", b'{"version": 3}',
                                     headers=AUTH, timeout_s=60)
    assert status in (404, 422), data
    for _ in range(10):
        assert json.loads(server.request("GET", "/v2/models/mlp")[2])["versions"] == ["2"]


def test_a_killed_worker_is_replaced_and_serves_what_the_others_serve(
        two: tuple[Server, Path], models: Models) -> None:
    server, repo = two
    _publish(repo, "mlp", 2)
    status, _, data = server.request("POST", "/admin/models/mlp/reload", b'{"version": 2}',
                                     headers=AUTH, timeout_s=120)
    assert status == 200, data
    victim = min(_workers(server))
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        workers = _workers(server) - {victim}
        if len(workers) == 2 and len(_answering_workers(server, 20)) == 2:
            break
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.2)
    for _ in range(30):
        assert json.loads(server.request("GET", "/v2/models/mlp")[2])["versions"] == ["2"]
    assert server.proc.poll() is None


def test_sigterm_drains_both_workers_and_the_supervisor_exits_0(
        two: tuple[Server, Path], models: Models) -> None:
    server, _ = two
    body = {**request_for(models.runs["mlp"], 0, list(range(8))), "model": "mlp"}
    results: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = server.score(body)[0]
        with lock:
            results.append(status)

    # requests held in the batchers' 300 ms windows, on both workers (fresh connections)
    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    workers = _workers(server)
    server.proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    ready_503 = 0
    while ready_503 < 10:  # ten fresh connections in a row: both workers are draining
        assert time.monotonic() - t0 < 0.5, "readiness did not go false"
        ready_503 = ready_503 + 1 if server.request("GET", "/v2/health/ready")[0] == 503 else 0
    answers: list[tuple[int, Any]] = [server.score(body) for _ in range(10)]
    assert time.monotonic() - t0 < 0.3  # still inside the batching windows
    for t in threads:
        t.join(30)
    assert results == [200] * 10
    assert answers and all(s == 503 and out["error"] == "draining" for s, out in answers)
    assert server.proc.wait(timeout=30) == 0
    assert server.log().count("drained in") == 2
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)

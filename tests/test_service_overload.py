"""Overload: a real server (``mldcn`` large preset, budget 30 ms, timeout_action reject) driven
by 32 concurrent connections for 3 seconds, far above what one core of ONNX Runtime can score.

The load comes from tests/async_load.py in its own process (one asyncio loop, raw keep-alive
HTTP/1.1), pinned to another core than the server where the machine has two or more, so the
client's clock measures the server rather than the client's own scheduling.

Claims checked, with the client's clock: every 200 met its deadline (p99 of served latency
<= budget + TOLERANCE_MS, the tolerance covering the time before the app sees the request and
after it answers: sockets, the HTTP parser, an event loop busy with other requests),
rejections (503) come back fast (p99 <= 10 ms, the issue's target), admitted requests that
still miss (504) stay rare, nothing else than 200/503/504 is returned, and the server is
healthy afterwards. Clients pause BACKOFF_S after a rejection.

What makes a 503 cheap (service/edge.py, service/admission.py): admission is asked on arrival,
before the body is read, for the fewest rows its Content-Length can hold, then on the decoded
body (msgspec) before anything is encoded; and ONNX Runtime's threads run at a lower priority
(``inference_nice``), so the event loop takes the core whenever it has a decision to make.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from service_support import Models, Server, exported_models, metric, request_for, run_server

BUDGET_MS = 30.0
# Client-side p99 of served requests measured 31-35 ms on the idle 2-core machine: the server
# itself answers inside the budget (checked exactly below: every 200 has non-negative deadline
# slack), the rest is the kernel, the HTTP parser and the client sharing two cores.
TOLERANCE_MS = 10.0
REJECT_P99_MS = 10.0  # measured 7-8 ms
CLIENTS = 32
ATTEMPTS = 2
DURATION_S = 3.0
BACKOFF_S = 0.02
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
SERVER_CPUS = {CORES[0]} if len(CORES) >= 2 else None
CLIENT_CPU = CORES[1] if len(CORES) >= 2 else None


@pytest.fixture(scope="module")
def s3() -> Iterator[tuple[Server, Models]]:
    models = exported_models()
    env = {"MLDCN_MODELS": "mldcn", "MLDCN_DEFAULT_TIMEOUT_MS": str(BUDGET_MS),
           "MLDCN_TIMEOUT_ACTION": "reject"}
    with run_server(models.repo, env, cpus=SERVER_CPUS) as server:
        yield server, models


def test_predicted_deadline_miss_is_503_with_retry_after(s3: tuple[Server, Models]) -> None:
    server, models = s3
    body = json.dumps(request_for(models.runs["mldcn"], 0, list(range(512)) * 8)).encode()
    before = server.metrics()
    t0 = time.monotonic()
    status, headers, data = server.request("POST", "/v1/score", body)
    assert status == 503, data  # ~40 ms of compute never fits 30 ms
    assert json.loads(data)["error"] == "predicted_deadline_miss"
    assert int(headers["retry-after"]) >= 1
    assert time.monotonic() - t0 < 0.05
    after = server.metrics()
    # rejected by the edge middleware before validation, counted against the model it named
    for name, labels in (("mldcn_requests_total", {"model": "mldcn", "code": "503"}),
                         ("mldcn_rejected_requests_total",
                          {"model": "mldcn", "reason": "predicted_deadline_miss"}),
                         ("mldcn_candidates_per_request_count", {"model": "mldcn"})):
        assert metric(after, name, **labels) - metric(before, name, **labels) == 1, name
    # the same request with a field no model reads is still a 503: admission comes first
    bad = json.loads(body)
    bad["user"]["no_such_field"] = 1
    status, _, data = server.request("POST", "/v1/score", json.dumps(bad).encode())
    assert status == 503, data


def _overload_run(server: Server, body_file: Path) -> tuple[list[str], list[str]]:
    """One 3-second overload run: (failed claims about status codes and the server's own
    view, failed latency claims measured by the client's clock), and prints its summary."""
    cmd = [sys.executable, str(Path(__file__).with_name("async_load.py")), server.host,
           str(server.port), str(body_file), str(CLIENTS), str(DURATION_S), str(BACKOFF_S)]
    if CLIENT_CPU is not None:
        cmd.append(str(CLIENT_CPU))
    before = server.metrics()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=DURATION_S + 60)
    assert out.returncode == 0, out.stderr
    results = [(int(c), float(ms)) for c, ms in json.loads(out.stdout)]
    after = server.metrics()

    codes = {c for c, _ in results}
    served = np.array([ms for c, ms in results if c == 200])
    rejected = np.array([ms for c, ms in results if c == 503])
    dropped = np.array([ms for c, ms in results if c == 504])

    def p(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if len(a) else 0.0

    summary = (f"{len(results)} requests: {len(served)} served (p50 {p(served, 50):.1f} ms, "
               f"p99 {p(served, 99):.1f} ms); {len(rejected)} rejected 503 (p99 "
               f"{p(rejected, 99):.1f} ms); {len(dropped)} dropped 504 (p99 "
               f"{p(dropped, 99):.1f} ms); codes {sorted(codes)}")
    print(summary)
    # the server's own view: every served request had non-negative slack
    slack = (metric(after, "mldcn_deadline_slack_seconds_count", model="mldcn")
             - metric(before, "mldcn_deadline_slack_seconds_count", model="mldcn"))
    claims = {
        "only 200/503/504": codes <= {200, 503, 504},
        "really overloaded": len(served) >= 20 and len(rejected) >= len(served),
        # admitted requests that then missed their deadline (a latency-model miss) stay rare
        "504s rare": len(dropped) <= 0.5 * len(served),
        "every 200 had slack >= 0": slack == len(served),
    }
    timing = {
        f"served p99 <= {BUDGET_MS + TOLERANCE_MS} ms": p(served, 99) <= BUDGET_MS + TOLERANCE_MS,
        f"503 p99 <= {REJECT_P99_MS} ms": p(rejected, 99) <= REJECT_P99_MS,
    }
    failed = [f"{k}: {summary}" for k, ok in claims.items() if not ok]
    return failed, [f"{k}: {summary}" for k, ok in timing.items() if not ok]


def test_overload_serves_on_time_and_fails_fast(s3: tuple[Server, Models], tmp_path: Path) -> None:
    """The status-code claims must hold in every run; the latency claims, measured by a client
    on a shared 2-core machine, in one of ATTEMPTS runs (a neighbour's burst of CPU can cost
    one run its p99)."""
    server, models = s3
    body = json.dumps(request_for(models.runs["mldcn"], 0, list(range(512)))).encode()
    body_file = tmp_path / "body.json"
    body_file.write_bytes(body)
    timing_failures: list[str] = []
    for _ in range(ATTEMPTS):
        failed, timing = _overload_run(server, body_file)
        assert not failed, failed
        if not timing:
            break
        timing_failures += timing
    else:
        pytest.fail(f"latency claims missed in all {ATTEMPTS} runs: {timing_failures}")
    # healthy afterwards: ready, and an ordinary request is served within budget
    assert server.request("GET", "/v2/health/ready")[0] == 200
    status, _, data = server.request("POST", "/v1/score", body)
    assert status == 200 and json.loads(data)["timing"]["total_ms"] <= BUDGET_MS

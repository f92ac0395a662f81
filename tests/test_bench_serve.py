"""``mldcn bench serve`` end to end, shrunk: real servers (``mldcn serve`` on its two routes and
the plain FastAPI peer) on a real exported model, real open-loop and closed-loop load, the JSON
and the table. The numbers are not judged here (CI machines differ); the structure and the
accounting are: every request of every step has an outcome, own times are positive, the
SLO-bounded throughput is one of the offered rates (or 0).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from service_support import REPO_ROOT, exported_models

from loadtest.bench_serve import oracle_refusals, slo_bounded


def test_oracle_refuses_only_what_cannot_make_it() -> None:
    t = np.arange(10) * 0.001  # ten arrivals 1 ms apart, 10 ms each, 35 ms budget
    assert oracle_refusals(t, 10.0, 35.0) == 0.6  # the 4 that fit, in order, are taken
    assert oracle_refusals(t, 0.5, 35.0) == 0.0
    assert slo_bounded([{"offered_rps": 10, "meets_slo": True},
                        {"offered_rps": 20, "meets_slo": False}]) == 10


def test_bench_serve_writes_its_json_and_table(tmp_path: Path) -> None:
    models = exported_models()
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "model", "bench", "serve", "--repo", str(models.repo),
           "--models", "tiny=mlp", "--servers", "v1,v2,fastapi", "--candidates", "64",
           "--rates", "0.02,0.04", "--step-s", "1", "--min-requests", "10",
           "--max-step-s", "1", "--sequential", "30", "--saturation-s", "1",
           "--connections", "2", "--pool", "4", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "SLO-bounded" in run.stdout and "plain FastAPI" in run.stdout
    result = json.loads(out.read_text())
    entry = result["models"]["tiny"]
    assert entry["ort_ms"] > 0 and set(entry["servers"]) == {"v1", "v2", "fastapi"}
    for name, server in entry["servers"].items():
        own = server["own_time"]
        assert own["requests"] == 30 and own["server_cpu_ms"] > 0, name
        assert server["saturated_rps"] > 0, name
        assert server["slo_bounded_rps"] in {0.0, *(s["offered_rps"] for s in server["steps"])}
        for step in server["steps"]:
            assert step["requests"] == sum(step["outcomes"].values()) > 0, (name, step)
            assert step["served"] == step["outcomes"].get("ok", 0)
    v1 = entry["servers"]["v1"]
    assert v1["own_time"]["app_total_minus_compute_p50_ms"] > 0
    assert all("admission_ratio" in s and "oracle_refused_share" in s for s in v1["steps"])
    assert "v1_over_v2_saturated" in entry["ratios"]

"""Helpers for the service tests: real exported models, a real uvicorn process, HTTP, metrics.

Nothing here is faked: models are trained (tiny runs on the built-in synthetic data) and
exported by ``export.exporter`` into a real repository; servers are ``python -m model serve``
subprocesses on 127.0.0.1, always killed on exit.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from loadtest.runner import free_port, launch

REPO_ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Models:
    """A repository with ``mldcn`` (large preset: costly) and ``mlp`` (cheap fallback)."""

    repo: Path
    runs: dict[str, Path]


@cache
def exported_models() -> Models:
    """Train and export the two test models once per test process."""
    from export.exporter import export_run
    from model.cli import main as mldcn

    root = Path(tempfile.mkdtemp(prefix="mldcn-service-test-"))
    atexit.register(shutil.rmtree, root, True)
    runs = {}
    for name, extra in (("mldcn", ["--arch", "mldcn", "--preset", "large"]),
                        ("mlp", ["--arch", "mlp"])):
        run = root / "runs" / name
        rc = mldcn(["train", *extra, "--synthetic-rows", "3000", "--epochs", "1",
                    "--threads", "1", "--out", str(run), "--no-progress"])
        assert rc == 0, f"training {name} failed"
        export_run(run, root / "models", name, log=lambda msg: None)
        runs[name] = run
    return Models(root / "models", runs)


@dataclass
class Server:
    """A running ``mldcn serve`` process."""

    host: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None,
                timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, headers, body)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s)
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def score(self, payload: dict[str, Any] | bytes,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, _, data = self.request("POST", "/v1/score", body, headers)
        return status, json.loads(data) if data else {}

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, parsed by prometheus_client: {(name, labels): value}."""
        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        out = {}
        for family in text_string_to_metric_families(data.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    """The value of one sample (0 when absent)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def run_server(repo: Path, env: dict[str, str] | None = None,
               cpus: set[int] | None = None) -> Iterator[Server]:
    """Start ``mldcn serve`` with the given MLDCN_* settings; wait until ready; always kill it
    (the project's one server launcher, ``loadtest.runner.launch``).

    ``cpus`` pins the server process (and the threads it starts) to those cores.
    """
    port = free_port()
    full_env = {**os.environ, "MLDCN_INTRA_OP_THREADS": "1", **(env or {})}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [sys.executable, "-m", "model", "serve", "--repo", str(repo), "--port", str(port)]
    with launch(cmd, "mldcn serve", sorted(cpus or ()), full_env, port=port,
                start_timeout_s=START_TIMEOUT_S, log_in_error=True) as s:
        yield Server("127.0.0.1", port, s.proc, s.log_path)


def raw_rows(run: Path) -> dict[str, list[Any]]:
    """The real raw rows kept with a run (``samples/raw_rows.json``)."""
    return json.loads((run / "samples" / "raw_rows.json").read_text())


def feature_sides(run: Path) -> dict[str, list[str]]:
    """Field names per side from the run's encoders."""
    from model.encoders import FeatureEncoders

    schema = FeatureEncoders.load(run / "encoders.json").schema
    return {side: [f.name for f in schema.fields_on([side])]
            for side in ("user", "context", "candidate")}


def request_for(run: Path, user_row: int, candidate_rows: list[int],
                columnar: bool = True) -> dict[str, Any]:
    """A /v1/score body: user and context from one raw row, candidates from others."""
    raw, sides = raw_rows(run), feature_sides(run)
    user = {k: raw[k][user_row] for k in sides["user"]}
    context = {k: raw[k][user_row] for k in sides["context"]}
    if columnar:
        cands: Any = {k: [raw[k][i] for i in candidate_rows] for k in sides["candidate"]}
    else:
        cands = [{k: raw[k][i] for k in sides["candidate"]} for i in candidate_rows]
    return {"user": user, "context": context, "candidates": cands}


def torch_scores(run: Path, body: dict[str, Any]) -> list[float]:
    """The PyTorch model's probabilities for a /v1/score body (the reference)."""
    import numpy as np
    import torch

    from model.train import load_run

    model, _, encoders, _ = load_run(run)
    cands = body["candidates"]
    if isinstance(cands, list):
        cands = {k: [c.get(k) for c in cands] for k in feature_sides(run)["candidate"]}
    n = len(next(iter(cands.values())))
    columns = {**{k: [v] * n for k, v in {**body["user"], **body["context"]}.items()}, **cands}
    cat, dense = encoders.transform(columns)
    with torch.no_grad():
        logits = model(torch.from_numpy(cat), torch.from_numpy(dense))
    return np.asarray(torch.sigmoid(logits), dtype=np.float64).tolist()

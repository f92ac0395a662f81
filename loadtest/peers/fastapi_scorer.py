"""A plain FastAPI scorer: the baseline a typical engineer would write for the same ONNX model.

One model version, one ``onnxruntime.InferenceSession`` (CPU, ``--threads`` intra-op threads), a
pydantic request model taking the same ``POST /v1/score`` body as our service, and a **sync**
endpoint (FastAPI runs it in its thread pool): no batching across requests, no admission
control, no deadline. Per request it builds the raw columns (user and context values repeated for
every candidate), encodes them with the model's own numpy-only encoders
(:class:`model.encoders.FeatureEncoders`, from ``model.json``), runs the session and returns
``{"request_id", "model", "version", "scores"}``. ``GET /v2/health/ready`` (and ``/live``) answer
200: the model is loaded and warmed up before the port opens.

Run (uvicorn, one worker; SIGTERM or Ctrl-C stops it)::

    python -m loadtest.peers.fastapi_scorer --repo models --model mldcn --port 8100 [--threads 1]

Example:
    >>> req = ScoreRequest.model_validate(
    ...     {"user": {"u": 7}, "candidates": [{"ad": "a"}, {"ad": "b", "price": 2.5}]})
    >>> columns = build_columns(req, [("u", "user"), ("ad", "candidate"),
    ...                               ("price", "candidate")])
    >>> columns
    {'u': [7, 7], 'ad': ['a', 'b'], 'price': [None, 2.5]}
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from export.repository import ModelRepository, ModelVersion, RepositoryError

Value = str | bool | int | float | None


class ScoreRequest(BaseModel):
    """The ``/v1/score`` body: one user and context, N candidates (columnar or rows)."""

    request_id: str | None = None
    model: str | None = None
    user_id: str | None = None
    timeout_ms: float | None = None  # accepted for compatibility; this server has no budget
    user: dict[str, Value] = Field(default_factory=dict)
    context: dict[str, Value] = Field(default_factory=dict)
    candidates: dict[str, list[Value]] | list[dict[str, Value]]


class ScoreResponse(BaseModel):
    """Scores in candidate order."""

    request_id: str | None = None
    model: str
    version: int
    scores: list[float]


def build_columns(req: ScoreRequest, fields: Sequence[tuple[str, str]]) -> dict[str, list[Any]]:
    """Raw values per field ``(name, side)``: user/context repeated N times, missing → None."""
    cands = req.candidates
    n = len(next(iter(cands.values()), [])) if isinstance(cands, dict) else len(cands)
    columns: dict[str, list[Any]] = {}
    for name, side in fields:
        if side == "user":
            columns[name] = [req.user.get(name)] * n
        elif side == "context":
            columns[name] = [req.context.get(name)] * n
        elif isinstance(cands, dict):
            columns[name] = cands.get(name, [None] * n)
        else:
            columns[name] = [row.get(name) for row in cands]
    return columns


class Scorer:
    """One model version: encoders + ONNX Runtime session.

    Args:
        version: the repository version to serve.
        threads: ONNX Runtime intra-op threads.
    """

    def __init__(self, version: ModelVersion, threads: int = 1) -> None:
        import onnxruntime as ort

        self.name, self.version = version.name, version.version
        self.encoders = version.encoders
        self.fields = [(f.name, f.side) for f in self.encoders.schema.fields]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(version.onnx_path), sess_options=opts,
                                            providers=["CPUExecutionProvider"])

    def run(self, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Probabilities for encoded rows."""
        return self.session.run(["probability"], {"cat_ids": cat, "dense": dense})[0]

    def warmup(self, sizes: Sequence[int] = (1, 64, 512), runs: int = 3) -> None:
        """A few runs at a few batch sizes, so the first requests are not slow."""
        num_cat, num_dense = len(self.encoders.cardinalities), self.encoders.num_dense
        for n in sizes:
            for _ in range(runs):
                self.run(np.zeros((n, num_cat), np.int64), np.zeros((n, num_dense), np.float32))


def create_app(scorer: Scorer) -> FastAPI:
    """The FastAPI app serving ``scorer``."""
    app = FastAPI(title="plain FastAPI scorer (benchmark peer)")

    @app.get("/v2/health/ready")
    @app.get("/v2/health/live")
    def health() -> dict[str, bool]:
        return {"ready": True}

    @app.post("/v1/score", response_model=ScoreResponse)
    def score(req: ScoreRequest) -> ScoreResponse:
        if req.model is not None and req.model != scorer.name:
            raise HTTPException(404, f"unknown model {req.model!r} (serving {scorer.name!r})")
        columns = build_columns(req, scorer.fields)
        try:
            cat, dense = scorer.encoders.transform(columns)
        except (TypeError, ValueError) as e:
            raise HTTPException(422, f"cannot encode the request: {e}") from None
        probs = scorer.run(cat, dense)
        return ScoreResponse(request_id=req.request_id, model=scorer.name,
                             version=scorer.version, scores=probs.tolist())

    return app


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.peers.fastapi_scorer",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--model", required=True, help="model name in the repository")
    p.add_argument("--version", type=int, default=None, help="version (default: latest)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--log-level", default="warning")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, warm it up, serve it with uvicorn (1 worker) until SIGTERM/SIGINT."""
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        version = ModelRepository(args.repo).load_version(args.model, args.version)
        scorer = Scorer(version, threads=args.threads)
    except RepositoryError as e:
        print(f"fastapi_scorer: error: {e}", file=sys.stderr)
        return 2
    scorer.warmup()
    print(f"fastapi_scorer: serving {scorer.name} version {scorer.version} on "
          f"http://{args.host}:{args.port} ({args.threads} intra-op threads)", file=sys.stderr,
          flush=True)
    uvicorn.run(create_app(scorer), host=args.host, port=args.port, workers=1,
                log_level=args.log_level, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

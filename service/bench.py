"""``mldcn bench serve``: what HTTP serving costs on top of ONNX Runtime.

For each candidate count (1, 64, 512, 2048 by default): the in-process ONNX Runtime median for
that batch, and the end-to-end HTTP latency (sequential requests, one connection) of
``POST /v1/score`` with columnar and with row candidates. Then throughput at saturation
(``--concurrency`` client threads, 512-candidate columnar requests, ``--duration-s``) with and
without the dynamic batcher, against the in-process rows/s of 512-row batches. Servers are real
``mldcn serve`` processes on 127.0.0.1 (budget 1 s so that nothing is shed). Writes JSON
(``--out``) and prints a table. Without ``--repo``, a small ML-DCN model is trained on
synthetic data and exported into a temporary repository first (needs the ``train`` extra).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_P50_RATIO = 1.25
TARGET_THROUGHPUT_RATIO = 0.8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, repo: Path, model: str, env: dict[str, str]) -> None:
        self.port = _free_port()
        full = {**os.environ, "MLDCN_MODELS": model, "MLDCN_DEFAULT_TIMEOUT_MS": "1000",
                "MLDCN_MAX_QUEUE_SIZE": "1024", **env}
        full.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "model", "serve", "--repo", str(repo), "--port",
             str(self.port), "--log-level", "warning"], env=full)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mldcn serve exited with {self.proc.returncode}")
            try:
                if self.get("/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("mldcn serve did not become ready in 60 s")
            time.sleep(0.1)

    def get(self, path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", path)
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _bodies(meta: dict[str, Any], n: int) -> tuple[bytes, bytes]:
    """(columnar, rows) request bodies of ``n`` candidates with values from the vocabularies."""
    rng = np.random.default_rng(n)
    enc = {e["name"]: e for e in meta["encoders"]["categorical"]}
    fields = meta["schema"]["fields"]

    def value(f: dict[str, Any]) -> Any:
        if f["type"] == "numeric":
            return float(rng.lognormal(1.0, 1.0))
        vocab = enc[f["name"]]["vocab"] or ["x"]
        return vocab[int(rng.integers(len(vocab)))]

    user = {f["name"]: value(f) for f in fields if f["side"] == "user"}
    context = {f["name"]: value(f) for f in fields if f["side"] == "context"}
    cand = [f for f in fields if f["side"] == "candidate"]
    cols = {f["name"]: [value(f) for _ in range(n)] for f in cand}
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    base = {"user": user, "context": context}
    return (json.dumps({**base, "candidates": cols}).encode(),
            json.dumps({**base, "candidates": rows}).encode())


def _post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/v1/score", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    r.read()
    return r.status


def _sequential_ms(port: int, body: bytes, requests: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(min(20, requests)):
            _post(conn, body)
        out = []
        for _ in range(requests):
            t0 = time.perf_counter()
            status = _post(conn, body)
            out.append((time.perf_counter() - t0) * 1e3)
            if status != 200:
                raise RuntimeError(f"benchmark request answered {status}")
        return out
    finally:
        conn.close()


def _saturate(port: int, body: bytes, rows: int, clients: int, duration_s: float) -> dict:
    counts = [0] * clients
    errors = [0] * clients
    stop_at = time.monotonic() + duration_s

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while time.monotonic() < stop_at:
                if _post(conn, body) == 200:
                    counts[i] += 1
                else:
                    errors[i] += 1
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(duration_s + 60)
    elapsed = time.perf_counter() - t0
    return {"requests_per_s": sum(counts) / elapsed, "rows_per_s": sum(counts) * rows / elapsed,
            "errors": sum(errors)}


def _in_process(onnx_path: Path, num_cat: int, num_dense: int, sizes: list[int],
                threads: int) -> dict[int, dict[str, float]]:
    import onnxruntime as ort

    from service.models import session_options

    sess = ort.InferenceSession(str(onnx_path), session_options(threads),
                                providers=["CPUExecutionProvider"])
    out = {}
    for n in sizes:
        cat = np.zeros((n, num_cat), np.int64)
        dense = np.zeros((n, num_dense), np.float32)
        for _ in range(20):
            sess.run(None, {"cat_ids": cat, "dense": dense})
        times = []
        for _ in range(200):
            t0 = time.perf_counter()
            sess.run(None, {"cat_ids": cat, "dense": dense})
            times.append((time.perf_counter() - t0) * 1e3)
        med = float(np.median(times))
        out[n] = {"median_ms": med, "rows_per_s": n / med * 1e3}
    return out


def _make_repo(tmp: Path) -> Path:
    from model.cli import main as mldcn

    run = tmp / "run"
    rc = mldcn(["train", "--synthetic-rows", "20000", "--epochs", "1", "--out", str(run),
                "--no-progress"])
    if rc:
        raise RuntimeError("training the benchmark model failed")
    from export.exporter import export_run

    export_run(run, tmp / "models", "mldcn", log=lambda m: None)
    return tmp / "models"


def main(args: argparse.Namespace) -> dict[str, Any]:
    from export.repository import ModelRepository

    sizes = [int(s) for s in args.sizes.split(",")]
    tmp = None
    try:
        if args.repo:
            repo = Path(args.repo)
        else:
            tmp = Path(tempfile.mkdtemp(prefix="mldcn-bench-serve-"))
            repo = _make_repo(tmp)
        mr = ModelRepository(repo)
        name = args.model or mr.names()[0]
        mv = mr.load_version(name)
        meta = mv.meta
        num_cat, num_dense = len(meta["model"]["cardinalities"]), meta["model"]["num_dense"]
        from service.settings import default_intra_op_threads

        threads = default_intra_op_threads()
        ort_ms = _in_process(mv.onnx_path, num_cat, num_dense, sorted({*sizes, 512}), threads)
        result: dict[str, Any] = {
            "model": name, "version": mv.version, "arch": meta["model"]["arch"],
            "flops_per_example": meta["cost"]["flops_per_example"],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "python": platform.python_version()},
            "ort_threads": threads, "latency": [], "saturation": {},
        }
        server = _Server(repo, name, {})
        try:
            for n in sizes:
                col, rows = _bodies(meta, n)
                row = {"candidates": n, "ort_median_ms": ort_ms[n]["median_ms"]}
                for fmt, body in (("columnar", col), ("rows", rows)):
                    ms = _sequential_ms(server.port, body, args.requests)
                    row[f"http_{fmt}_p50_ms"] = float(np.percentile(ms, 50))
                    row[f"http_{fmt}_p99_ms"] = float(np.percentile(ms, 99))
                row["columnar_p50_ratio"] = row["http_columnar_p50_ms"] / row["ort_median_ms"]
                result["latency"].append(row)
                print(f"  {n} candidates done", file=sys.stderr)
            col512, _ = _bodies(meta, 512)
            result["saturation"]["dynamic_batching"] = _saturate(
                server.port, col512, 512, args.concurrency, args.duration_s)
        finally:
            server.close()
        server = _Server(repo, name, {"MLDCN_DYNAMIC_BATCHING": "false"})
        try:
            result["saturation"]["no_dynamic_batching"] = _saturate(
                server.port, col512, 512, args.concurrency, args.duration_s)
        finally:
            server.close()
        in_proc = ort_ms[512]["rows_per_s"]
        result["saturation"]["in_process_rows_per_s"] = in_proc
        for key in ("dynamic_batching", "no_dynamic_batching"):
            sat = result["saturation"][key]
            sat["ratio_to_in_process"] = sat["rows_per_s"] / in_proc
        r512 = next((r for r in result["latency"] if r["candidates"] == 512), None)
        result["targets"] = {
            "http_p50_512_columnar_over_ort": {
                "target": TARGET_P50_RATIO,
                "measured": r512["columnar_p50_ratio"] if r512 else None,
                "met": bool(r512 and r512["columnar_p50_ratio"] <= TARGET_P50_RATIO)},
            "saturated_rows_per_s_over_in_process": {
                "target": TARGET_THROUGHPUT_RATIO,
                "measured": result["saturation"]["dynamic_batching"]["ratio_to_in_process"],
                "met": result["saturation"]["dynamic_batching"]["ratio_to_in_process"]
                >= TARGET_THROUGHPUT_RATIO},
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return write_result(args.out, result, format_table(result))


def write_result(path: str | Path, result: dict[str, Any], table: str) -> dict[str, Any]:
    """Write a benchmark's JSON to ``path``, print its table; returns ``result``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"wrote {out}")
    return result


def format_table(result: dict[str, Any]) -> str:
    """The printed summary of a benchmark result."""
    lines = [f"model {result['model']} v{result['version']} ({result['arch']}, "
             f"{result['flops_per_example'] / 1e6:.3f} MFLOPs/example), "
             f"{result['ort_threads']} ORT threads",
             f"{'candidates':>10} {'ORT ms':>8} {'HTTP col p50':>13} {'col p99':>8} "
             f"{'HTTP rows p50':>14} {'rows p99':>9} {'col/ORT':>8}"]
    for r in result["latency"]:
        lines.append(f"{r['candidates']:>10} {r['ort_median_ms']:8.3f} "
                     f"{r['http_columnar_p50_ms']:13.3f} {r['http_columnar_p99_ms']:8.3f} "
                     f"{r['http_rows_p50_ms']:14.3f} {r['http_rows_p99_ms']:9.3f} "
                     f"{r['columnar_p50_ratio']:8.2f}")
    sat = result["saturation"]
    lines.append(f"saturation (512 candidates): in-process {sat['in_process_rows_per_s']:,.0f} "
                 "rows/s")
    for key in ("dynamic_batching", "no_dynamic_batching"):
        s = sat[key]
        lines.append(f"  {key:<20} {s['rows_per_s']:12,.0f} rows/s "
                     f"({s['ratio_to_in_process']:.2f}x in-process, {s['errors']} errors)")
    for key, t in result["targets"].items():
        if t["measured"] is None:
            lines.append(f"target {key}: not measured (needs 512 candidates in --sizes)")
            continue
        lines.append(f"target {key}: {t['measured']:.2f} vs {t['target']} -> "
                     f"{'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)

"""``mldcn bench gpu``: the GPU serving path, in process and over HTTP.

For DCNv2 and ML-DCN at matched FLOPs (one preset level), fp32 and fp16, with and without CUDA
graphs, at 64 … 4096 candidates:

- in process: the served path (:class:`service.models.ServedModel` ``run``: padded to the
  buckets, IOBinding, a CUDA graph per bucket when on) and, for reference, a plain
  ``session.run`` on numpy feeds; medians and p99 over ``--requests`` runs;
- end to end: ``POST /v1/score`` with columnar candidates to a real ``mldcn serve`` process
  (sequential requests on one connection; p50, p99), unless ``--no-http``;
- parity: the CUDA scores against the CPU provider's on the same rows (the acceptance bound is
  1e-5 for fp32; fp16 is held to the tolerance its export recorded).

Prints a table and writes JSON (``--out``). Needs the CUDA execution provider (``pip install
'.[gpu]'``); without it the command says so and exits 2, unless ``--allow-cpu`` (the same
measurements on the CPU provider, CUDA graphs skipped: a smoke test of the script). Without
``--repo`` both architectures are trained briefly on synthetic data (weights do not change
latency) and exported fp32 and fp16 into a temporary repository (needs the ``train`` extra).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from export.meta import ModelMeta
from model.bench.results import machine, write_result
from model.errors import CLIError

ARCHS = ("dcnv2", "mldcn")
FP32_PARITY = 1e-5
EXIT_NO_CUDA = 2


class NoCudaError(RuntimeError):
    """The CUDA execution provider is not available here."""


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _make_repo(tmp: Path, level: str) -> tuple[Path, list[str]]:
    """Train both architectures at ``level`` briefly and export each fp32 and fp16."""
    from export.exporter import export_run
    from model.presets import preset
    from model.split import SplitSpec
    from model.synthetic import synthetic_source
    from model.train import TrainConfig, train_run

    names = []
    source, _ = synthetic_source(5000, seed=0, cache=tmp / "data")
    schema = source.schema
    for arch in ARCHS:
        run = tmp / "runs" / arch
        # the preset's widths need only the layout (cardinalities cost no FLOPs)
        cfg = preset(arch, level, [2] * len(schema.categorical), len(schema.numeric))
        train_run(source, cfg, TrainConfig(epochs=1, progress=False), SplitSpec(), run,
                  log=lambda m: None)
        for fp16 in (False, True):
            name = f"{arch}-fp16" if fp16 else arch
            export_run(run, tmp / "models", name, fp16=fp16, log=lambda m: None)
            names.append(name)
    return tmp / "models", names


def _rows(meta: ModelMeta, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` encoded rows with ids drawn from each field's cardinality."""
    rng = np.random.default_rng(seed + n)
    cards = meta.model.cardinalities
    cat = np.stack([rng.integers(0, c, n) for c in cards], axis=1).astype(np.int64) if cards \
        else np.zeros((n, 0), np.int64)
    dense = rng.lognormal(0.0, 1.0, (n, meta.model.num_dense)).astype(np.float32)
    return cat, dense


def _timed_ms(fn: Any, runs: int) -> dict[str, float]:
    for _ in range(min(20, runs)):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def _settings(repo: Path, name: str, provider: str, graphs: bool, max_rows: int) -> Any:
    from service.settings import Settings

    return Settings(repo=repo, models=[name], execution_provider=provider, cuda_graphs=graphs,
                    pad_to_buckets="on", max_batch_size=max_rows, max_candidates=max_rows,
                    on_provider_fallback="fail")


def _in_process(mv: Any, settings: Any, sizes: list[int], runs: int) -> tuple[dict, Any]:
    """{size: served path and plain session.run timings}, and the served model."""
    from service.models import open_version

    m = open_version(mv, settings)
    for bucket in m.buckets:  # warm every bucket (and capture its graph) as the service does
        cat, dense = m.example_inputs(bucket)
        for _ in range(settings.warmup_runs):
            m.run(cat, dense)
    out = {}
    for n in sizes:
        cat, dense = _rows(mv.meta, n)
        feeds = {"cat_ids": cat, "dense": dense}
        plain_sess = m.session
        plain = None
        if not m.cuda_graphs:  # a graph-enabled session only runs through its bindings
            plain = _timed_ms(lambda f=feeds, s=plain_sess: s.run(None, f), runs)
        out[n] = {"served": _timed_ms(lambda c=cat, d=dense: m.run(c, d), runs),
                  "plain_session_run": plain}
    return out, m


def _parity(mv: Any, m: Any, sizes: list[int]) -> float:
    """Max |served − CPU provider| over the benchmark rows."""
    import onnxruntime as ort

    from service.models import session_options

    cpu = ort.InferenceSession(str(mv.onnx_path), session_options(1),
                               providers=["CPUExecutionProvider"])
    worst = 0.0
    for n in sizes:
        cat, dense = _rows(mv.meta, n)
        ref = cpu.run(None, {"cat_ids": cat, "dense": dense})[0]
        worst = max(worst, float(np.max(np.abs(m.run(cat, dense) - ref))))
    return worst


def _http(repo: Path, name: str, env: dict[str, str], sizes: list[int], runs: int
          ) -> dict[int, dict[str, float]]:
    """Sequential ``/v1/score`` latency through a real ``mldcn serve`` per candidate count."""
    from export.repository import ModelRepository
    from loadtest.bench_serve import request_pool, sequential_latencies
    from loadtest.runner import clean_env, free_port, launch, serve_command

    meta = ModelRepository(repo).load_version(name).meta
    port = free_port()
    cmd = serve_command(repo, name, 1000.0, port)
    out = {}
    with launch(cmd, f"mldcn serve for {name!r}", (), {**clean_env(), **env},
                port=port) as server:
        for n in sizes:
            ms = sequential_latencies(server.url, request_pool(meta, name, "v1", n, 8, n),
                                      runs)
            out[n] = {"p50_ms": float(np.percentile(ms, 50)),
                      "p99_ms": float(np.percentile(ms, 99))}
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (see the module docstring); NoCudaError without CUDA."""
    from export.repository import ModelRepository

    on_cuda = cuda_available()
    if not on_cuda and not args.allow_cpu:
        raise NoCudaError(
            "mldcn bench gpu: ONNX Runtime has no CUDAExecutionProvider on this machine "
            "(install onnxruntime-gpu: pip uninstall -y onnxruntime && pip install '.[gpu]', "
            "on a machine with an NVIDIA GPU); nothing was measured. --allow-cpu runs the "
            "same script on the CPU provider")
    provider = "cuda" if on_cuda else "cpu"
    from model.cliargs import comma_list

    sizes = sorted(set(comma_list(args.sizes, int, "sizes")))
    if not sizes or min(sizes) < 1:
        raise CLIError(f"--sizes must be comma-separated integers >= 1, got {args.sizes!r}")
    max_rows = max(sizes)
    graph_modes = [False, True] if on_cuda and not args.no_graphs else [False]
    tmp = None
    try:
        if args.repo:
            repo = Path(args.repo)
            names = comma_list(args.models) if args.models \
                else ModelRepository(repo).names()
        else:
            tmp = Path(tempfile.mkdtemp(prefix="mldcn-bench-gpu-"))
            repo, names = _make_repo(tmp, args.preset)
        mr = ModelRepository(repo)
        result: dict[str, Any] = {
            "provider": provider, "cuda": on_cuda, "sizes": sizes,
            "device": _device_name(), "onnxruntime": _ort_version(),
            "machine": machine(),
            "preset": None if args.repo else args.preset, "runs": []}
        for name in names:
            mv = mr.load_version(name)
            for graphs in graph_modes:
                settings = _settings(repo, name, provider, graphs, max_rows)
                timings, m = _in_process(mv, settings, sizes, args.requests)
                parity = _parity(mv, m, sizes)
                tolerance = FP32_PARITY if mv.meta.precision == "fp32" else float(
                    mv.meta.parity["tolerance"])
                row: dict[str, Any] = {
                    "model": name, "version": mv.version, "arch": mv.meta.model.arch,
                    "precision": mv.meta.precision,
                    "flops_per_example": mv.meta.cost.flops_per_example,
                    "provider": m.provider, "cuda_graphs": m.cuda_graphs,
                    "cuda_graphs_requested": graphs, "buckets": list(m.buckets),
                    "parity_vs_cpu_max_abs_diff": parity, "parity_tolerance": tolerance,
                    "parity_met": parity <= tolerance, "sizes": {}}
                http = {} if args.no_http else _http(
                    repo, name, {"MLDCN_EXECUTION_PROVIDER": provider,
                                 "MLDCN_CUDA_GRAPHS": "true" if graphs else "false",
                                 "MLDCN_PAD_TO_BUCKETS": "on",
                                 "MLDCN_MAX_BATCH_SIZE": str(max_rows),
                                 "MLDCN_MAX_CANDIDATES": str(max_rows)},
                    sizes, args.requests)
                for n in sizes:
                    row["sizes"][str(n)] = {**{f"ort_{k}": v for k, v in
                                               timings[n]["served"].items()},
                                            "plain_run_p50_ms": (timings[n]["plain_session_run"]
                                                                 or {}).get("p50_ms"),
                                            **{f"http_{k}": v for k, v in
                                               http.get(n, {}).items()}}
                result["runs"].append(row)
                print(f"  {name} graphs={graphs} done", file=sys.stderr)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return write_result(args.out, result, format_table(result))


def _device_name() -> str | None:
    """The GPU's name from nvidia-smi, when there is one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    import subprocess

    try:
        return subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _ort_version() -> str:
    import onnxruntime as ort

    return ort.__version__


def format_table(result: dict[str, Any]) -> str:
    """The printed summary: one line per (model, graphs, size)."""
    lines = [f"provider {result['provider']} ({result.get('device') or 'no GPU'}), "
             f"onnxruntime {result['onnxruntime']}",
             f"{'model':<14} {'prec':<5} {'graphs':<6} {'cands':>6} {'ORT p50':>8} "
             f"{'ORT p99':>8} {'plain p50':>9} {'HTTP p50':>9} {'HTTP p99':>9}"]

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for r in result["runs"]:
        for n, t in r["sizes"].items():
            lines.append(f"{r['model']:<14} {r['precision']:<5} "
                         f"{'on' if r['cuda_graphs'] else 'off':<6} {n:>6} "
                         f"{ms(t.get('ort_p50_ms')):>8} {ms(t.get('ort_p99_ms')):>8} "
                         f"{ms(t.get('plain_run_p50_ms')):>9} {ms(t.get('http_p50_ms')):>9} "
                         f"{ms(t.get('http_p99_ms')):>9}")
        lines.append(f"  parity vs CPU: max |Δp| {r['parity_vs_cpu_max_abs_diff']:.2e} "
                     f"(<= {r['parity_tolerance']:g}: "
                     f"{'met' if r['parity_met'] else 'NOT met'})")
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> None:
    """``mldcn bench gpu``: exit status 2 with one line when there is no CUDA."""
    try:
        main(args)
    except NoCudaError as e:
        print(str(e), file=sys.stderr)
        raise SystemExit(EXIT_NO_CUDA) from None

"""``mldcn serve``, ``mldcn bench serve`` and ``mldcn bench gpu``.

Registered by ``model.cli.build_parser``.

Importing this module is cheap (argparse only). ``mldcn serve`` turns its flags into the
``MLDCN_*`` environment variables of :class:`service.settings.Settings` (flags win over the
environment), validates them, checks the repository, and runs uvicorn; with ``--workers N > 1``
it also points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder so that ``/metrics`` adds up
every worker.

    mldcn serve --repo MODELS_DIR [--host H] [--port P] [--workers N] [--models a,b] ...
    mldcn bench serve --repo MODELS_DIR --models small=a,large=b [--servers v1,v2,fastapi,pytriton]
    mldcn bench gpu [--repo MODELS_DIR --models a,b] [--out docs/bench/gpu.json] [--allow-cpu]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any

# flag -> (settings field, type, help); every flag defaults to "not given"
SERVE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--repo": ("repo", str, "model repository folder (MLDCN_REPO)"),
    "--host": ("host", str, "address to listen on (default 127.0.0.1)"),
    "--port": ("port", int, "port (default 8000)"),
    "--workers": ("workers", int, "worker processes on one socket (default 1)"),
    "--models": ("models", str, "comma-separated model names to load (default: all)"),
    "--default-model": ("default_model", str, "model for requests that name none"),
    "--fallback-model": ("fallback_model", str, "cheaper model for --timeout-action degrade"),
    "--timeout-action": ("timeout_action", str, "reject (503) or degrade (fallback model)"),
    "--default-timeout-ms": ("default_timeout_ms", float, "the SLO budget per request (50)"),
    "--max-batch-size": ("max_batch_size", int, "rows per ONNX Runtime batch (2048)"),
    "--max-queue-delay-ms": ("max_queue_delay_ms", float, "wait for more rows (0)"),
    "--max-queue-size": ("max_queue_size", int, "requests waiting per model (256)"),
    "--instance-count": ("instance_count", int, "concurrent batches per model (1)"),
    "--max-candidates": ("max_candidates", int, "candidates per request (4096)"),
    "--execution-provider": ("execution_provider", str, "auto, cuda or cpu (auto)"),
    "--intra-op-threads": ("intra_op_threads", int, "ONNX Runtime threads (0: cores/workers)"),
    "--inference-nice": ("inference_nice", int,
                         "nice increment of the ONNX Runtime threads (5; 0: same as the loop)"),
    "--on-provider-fallback": ("on_provider_fallback", str,
                               "cuda asked for, session on CPU: fail or warn (fail)"),
    "--device-id": ("device_id", int, "CUDA device (0)"),
    "--device-ids": ("device_ids", str, "CUDA devices the workers are spread over, e.g. 0,1"),
    "--cuda-arena-extend-strategy": ("cuda_arena_extend_strategy", str,
                                     "kSameAsRequested or kNextPowerOfTwo (kSameAsRequested)"),
    "--cuda-gpu-mem-limit-bytes": ("cuda_gpu_mem_limit_bytes", int,
                                   "CUDA arena limit per session (0: none)"),
    "--batch-buckets": ("batch_buckets", str,
                        "batch sizes batches are padded to (64,128,...,4096)"),
    "--pad-to-buckets": ("pad_to_buckets", str, "auto (CUDA only), on or off (auto)"),
    "--log-level": ("log_level", str, "uvicorn log level (info)"),
    "--ab": ("ab", str, "A/B split of requests naming no model, e.g. mldcn:0.5,dcnv2:0.5"),
    "--ab-user-field": ("ab_user_field", str, "user feature hashed when no user_id (user_id)"),
    "--shadow-model": ("shadow_model", str, "model scoring a copy of the traffic"),
    "--shadow-fraction": ("shadow_fraction", float, "fraction of requests copied (1.0)"),
    "--poll-interval-s": ("poll_interval_s", float,
                          "load newer repository versions every N s (0: off)"),
    "--drain-grace-s": ("drain_grace_s", float, "SIGTERM: wait for in-flight work (20)"),
    "--admin-token-file": ("admin_token_file", str,
                           "file with the admin bearer token (or MLDCN_ADMIN_TOKEN)"),
}


def add_serve_commands(sub: Any, bench_sub: Any | None = None) -> None:
    """Add ``serve`` to ``mldcn``'s sub-parsers and ``serve`` to ``mldcn bench``'s."""
    p = sub.add_parser("serve", help="run the scoring service (FastAPI + ONNX Runtime)",
                       description="Run the scoring service. Every flag can also be given as "
                                   "an MLDCN_<NAME> environment variable.")
    for flag, (_, kind, help_text) in SERVE_FLAGS.items():
        p.add_argument(flag, type=kind, default=None, help=help_text)
    p.add_argument("--no-dynamic-batching", action="store_true",
                   help="one request per batch (MLDCN_DYNAMIC_BATCHING=false)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="one CUDA graph per batch bucket (MLDCN_CUDA_GRAPHS=true)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)
    if bench_sub is not None:
        b = bench_sub.add_parser(
            "serve", help="this service vs a plain FastAPI scorer and PyTriton: own time "
                          "outside ONNX Runtime, saturation, open-loop SLO-bounded throughput",
            description="See loadtest/bench_serve.py.")
        b.add_argument("--repo", required=True, help="model repository of the models")
        b.add_argument("--models", required=True,
                       help="SIZE=NAME,...: e.g. small=mldcn-small,large=mldcn-large")
        b.add_argument("--servers", default="v1,v2,v2raw,fastapi,pytriton",
                       help="of v1, v2, v2raw, fastapi, pytriton (default: all)")
        b.add_argument("--candidates", type=int, default=300, help="candidates per request")
        b.add_argument("--slo-ms", type=float, default=50.0, help="p99 SLO (and the budget)")
        b.add_argument("--rates", default="0.1,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.7,0.8",
                       help="open-loop rates, as fractions of the ONNX-Runtime-only capacity")
        b.add_argument("--stop-after", type=int, default=2,
                       help="end a server's sweep after this many rates miss the SLO")
        b.add_argument("--step-s", type=float, default=8.0, help="seconds per open-loop rate")
        b.add_argument("--min-requests", type=int, default=1500,
                       help="make a rate's step long enough for this many arrivals")
        b.add_argument("--max-step-s", type=float, default=30.0, help="... but at most this")
        b.add_argument("--sequential", type=int, default=400,
                       help="requests one at a time for the own time")
        b.add_argument("--connections", type=int, default=8, help="saturation connections")
        b.add_argument("--saturation-s", type=float, default=5.0, help="saturation seconds")
        b.add_argument("--pool", type=int, default=64, help="distinct request bodies")
        b.add_argument("--seed", type=int, default=0)
        b.add_argument("--out", default="docs/bench/serve.json", help="JSON output path")
        b.set_defaults(func=cmd_bench_serve)
        g = bench_sub.add_parser(
            "gpu", help="GPU serving path: in-process and HTTP latency at 64..4096 candidates, "
                        "DCNv2 vs ML-DCN, fp32/fp16, with and without CUDA graphs",
            description="Needs the CUDA execution provider (pip install '.[gpu]'); exits 2 "
                        "without it unless --allow-cpu. See docs/gpu.md.")
        g.add_argument("--repo", help="model repository (default: train both architectures "
                                      "at --preset and export fp32 and fp16 into a temporary "
                                      "one)")
        g.add_argument("--models", help="comma-separated names in --repo (default: all)")
        g.add_argument("--preset", default="large", help="matched-FLOPs level without --repo")
        g.add_argument("--sizes", default="64,128,256,512,1024,2048,4096",
                       help="candidates per request")
        g.add_argument("--requests", type=int, default=200, help="runs per size and mode")
        g.add_argument("--no-http", action="store_true", help="in-process timings only")
        g.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph runs")
        g.add_argument("--allow-cpu", action="store_true",
                       help="without CUDA, measure the CPU provider instead of exiting 2")
        g.add_argument("--out", default="docs/bench/gpu.json", help="JSON output path")
        g.set_defaults(func=cmd_bench_gpu)


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    """The MLDCN_* variables the given flags stand for."""
    env = {}
    for flag, (name, _, _) in SERVE_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            env[f"MLDCN_{name.upper()}"] = str(value)
    if args.no_dynamic_batching:
        env["MLDCN_DYNAMIC_BATCHING"] = "false"
    if getattr(args, "cuda_graphs", False):
        env["MLDCN_CUDA_GRAPHS"] = "true"
    return env


def cmd_serve(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from model.cli import CLIError

    os.environ.update(serve_env(args))
    from service.settings import get_settings

    get_settings.cache_clear()
    try:
        settings = get_settings()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'settings'}: {err['msg']}"
                             for err in e.errors())
        raise CLIError(f"invalid settings: {problems}") from None
    from export.repository import ModelRepository

    names = ModelRepository(settings.repo).names()  # RepositoryError if it is not a folder
    if not names:
        raise CLIError(f"no models in {settings.repo} (export one with mldcn export)")
    missing = [n for n in settings.models if n not in names]
    if missing:
        raise CLIError(f"models {missing} are not in {settings.repo} (it has {names})")
    if settings.execution_provider == "cuda" and settings.on_provider_fallback == "fail":
        import onnxruntime as ort

        from service.gpu import CUDA

        if CUDA not in ort.get_available_providers():
            raise CLIError(f"execution_provider=cuda but ONNX Runtime offers "
                           f"{ort.get_available_providers()}: install onnxruntime-gpu (pip "
                           "install '.[gpu]') with a matching CUDA/cuDNN, or set "
                           "MLDCN_ON_PROVIDER_FALLBACK=warn to serve on CPU")
    multiproc_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc_dir = tempfile.mkdtemp(prefix="mldcn-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    try:
        settings.admin_secret()
    except ValueError as e:
        raise CLIError(str(e)) from None
    from service.server import run

    print(f"mldcn serve: {', '.join(settings.models or names)} from {settings.repo} on "
          f"http://{settings.host}:{settings.port} ({settings.workers} worker(s), budget "
          f"{settings.default_timeout_ms:g} ms, timeout_action {settings.timeout_action})",
          file=sys.stderr, flush=True)
    try:
        code = run(settings, access_log=args.access_log)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)
    if code:
        raise SystemExit(code)


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from service import bench_gpu

    bench_gpu.run_cli(args)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from loadtest import bench_serve

    bench_serve.main(args)

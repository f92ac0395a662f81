"""``mldcn serve``.

Registered by ``model.cli.build_parser``.

Importing this module is cheap (argparse only). ``mldcn serve`` turns its flags into the
``MLDCN_*`` environment variables of :class:`service.settings.Settings` (flags win over the
environment), validates them, checks the repository, and runs uvicorn; with ``--workers N > 1``
its supervisor (:mod:`service.workers`) points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh folder
so that ``/metrics`` adds up every worker.

    mldcn serve --repo MODELS_DIR [--host H] [--port P] [--workers N] [--models a,b] ...
"""

from __future__ import annotations

import argparse
import os
import sys
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


def add_serve_commands(sub: Any) -> None:
    """Add ``serve`` to ``mldcn``'s sub-parsers."""
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

    from model.errors import CLIError

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
    try:
        settings.admin_secret()
    except ValueError as e:
        raise CLIError(str(e)) from None
    from service.workers import run

    print(f"mldcn serve: {', '.join(settings.models or names)} from {settings.repo} on "
          f"http://{settings.host}:{settings.port} ({settings.workers} worker(s), budget "
          f"{settings.default_timeout_ms:g} ms, timeout_action {settings.timeout_action})",
          file=sys.stderr, flush=True)
    code = run(settings, access_log=args.access_log)
    if code:
        raise SystemExit(code)

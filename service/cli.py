"""``mldcn serve``.

Registered by ``model.cli.build_parser``.

Importing this module is cheap (argparse only): the flags, one per Settings field, are generated
when ``mldcn serve`` runs (:func:`serve_parser`). ``mldcn serve`` turns its flags into the
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
import typing
from collections.abc import Mapping
from typing import Any

# Settings fields that are no flags: set by the supervisor of --workers, or a secret (a token on
# the command line shows in `ps`; use --admin-token-file or MLDCN_ADMIN_TOKEN)
NOT_FLAGS: tuple[str, ...] = ("control_dir", "worker_index", "admin_token")


def add_serve_commands(sub: Any) -> None:
    """Add ``serve`` to ``mldcn``'s sub-parsers. Its flags are generated from
    :class:`service.settings.Settings` when ``mldcn serve`` runs (:func:`serve_parser`), so
    other commands do not import pydantic; here the sub-parser only collects them."""
    p = sub.add_parser("serve", help="run the scoring service (FastAPI + ONNX Runtime)",
                       add_help=False, prefix_chars="+")  # every argument goes to serve_parser
    p.add_argument("flags", nargs=argparse.REMAINDER, help="see mldcn serve --help")
    p.set_defaults(func=cmd_serve)


def serve_parser() -> argparse.ArgumentParser:
    """``mldcn serve``'s parser: one flag per :class:`~service.settings.Settings` field
    (``--max-batch-size`` for ``max_batch_size``; ``--x/--no-x`` for a boolean) with the
    field's description and default, plus ``--access-log``. A flag's value is handed to
    Settings as the ``MLDCN_*`` variable would be, so the validation (and its messages) is
    Settings' own."""
    from model.cliargs import OneLineParser
    from service.settings import Settings

    p = OneLineParser(
        prog="mldcn serve", description="Run the scoring service. Every flag can also be given "
        "as an MLDCN_<NAME> environment variable (flags win).")
    for name, info in Settings.model_fields.items():
        if name in NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        default = info.get_default(call_default_factory=True)
        if isinstance(default, list | tuple):
            default = ",".join(map(str, default))
        default = "none" if default is None or default == "" else default
        text = f"{info.description or name} (default {default})" if name != "repo" else (
            f"{info.description} (required; MLDCN_REPO)")
        text = text.replace("%", "%%")
        if info.annotation is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                           help=text)
        elif typing.get_origin(info.annotation) is typing.Literal:
            p.add_argument(flag, dest=name, default=None, help=text,
                           choices=[str(c) for c in typing.get_args(info.annotation)])
        else:
            p.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=text)
    p.add_argument("--access-log", action="store_true", help="log every request")
    return p


def serve_env(args: argparse.Namespace) -> dict[str, str]:
    """The MLDCN_* variables the given flags stand for."""
    env = {}
    for name, value in vars(args).items():
        if name == "access_log" or value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        env[f"MLDCN_{name.upper()}"] = str(value)
    return env


def cmd_serve(args: argparse.Namespace) -> None:
    """``mldcn serve FLAGS``: the flags as MLDCN_* settings, then :func:`serve`."""
    from model.errors import CLIError

    try:
        flags = serve_parser().parse_args(args.flags)
    except ImportError as e:
        raise CLIError(f"mldcn serve needs the serve extra (pip install '.[serve]'): {e}"
                       ) from None
    serve(serve_env(flags), access_log=flags.access_log)


def serve(env: Mapping[str, str], access_log: bool = False) -> None:
    """Check the settings (the MLDCN_* variables ``env`` over the process environment's) and
    the repository, then run the service until it stops; CLIError for bad settings."""
    from model.errors import CLIError

    try:
        from pydantic import ValidationError
    except ImportError as e:
        raise CLIError(f"mldcn serve needs the serve extra (pip install '.[serve]'): {e}"
                       ) from None
    os.environ.update(env)
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
    code = run(settings, access_log=access_log)
    if code:
        raise SystemExit(code)

"""``mldcn export`` and ``mldcn models list``: registered by ``model.cli.build_parser``.

Importing this module is cheap (argparse only): the exporter (torch, onnx) is imported when
``mldcn export`` runs, and ``mldcn models list`` needs neither torch nor onnx.

    mldcn export RUN_DIR --repo MODELS_DIR --name NAME [--version N] [--fp16]
                 [--external-data auto|always|never]
    mldcn models list MODELS_DIR [--verify]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.repository import ModelRepository


def add_export_commands(sub: Any) -> None:
    """Add the ``export`` and ``models`` sub-commands to ``mldcn``'s sub-parsers action."""
    p = sub.add_parser("export", help="export a run folder to the model repository (ONNX)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by mldcn train")
    p.add_argument("--repo", required=True, metavar="MODELS_DIR", help="model repository folder")
    p.add_argument("--name", required=True, help="model name, e.g. mldcn")
    p.add_argument("--version", type=int, default=None,
                   help="version number (default: the latest + 1); must not exist")
    p.add_argument("--fp16", action="store_true",
                   help="float16 graph with float32 inputs/output (checked: AUC drop <= 0.001)")
    # choices: export.exporter.EXTERNAL_DATA_MODES (not imported here: it imports torch)
    p.add_argument("--external-data", choices=("auto", "always", "never"), default="auto",
                   help="store the tensors in model.onnx.data beside model.onnx (ONNX external "
                        "data, for graphs over the 2 GiB protobuf limit): auto (default) when "
                        "they pass 1 GiB, always, or never (refused when they do not fit)")
    p.set_defaults(func=cmd_export)

    models = sub.add_parser("models", help="inspect a model repository")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=type(models))
    p = msub.add_parser("list", help="list the models and versions of a repository")
    p.add_argument("models_dir", metavar="MODELS_DIR", help="model repository folder")
    p.add_argument("--verify", action="store_true",
                   help="also check each version's content hash and graph against model.json")
    p.set_defaults(func=cmd_models_list)


def cmd_export(args: argparse.Namespace) -> Any:
    """Validate the arguments (before importing torch), then run ``export_run``."""
    from export.repository import check_name, check_version

    check_name(args.name)
    check_version(args.version)
    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"run folder not found: {args.run_dir}")
    from export.exporter import export_run

    result = export_run(args.run_dir, args.repo, args.name, args.version, fp16=args.fp16,
                        external_data=args.external_data)
    print(f"{result.name} version {result.version}: {result.path}")
    return result


def format_listing(repo: ModelRepository, verify: bool = False) -> str:
    """The ``mldcn models list`` table: one row per version (a broken one says why)."""
    from export.repository import RepositoryError

    head = (f"{'name':<16} {'version':>7} {'arch':<8} {'precision':<9} {'MFLOPs/ex':>9} "
            f"{'params':>10} {'valid AUC':>9} {'test AUC':>8} {'parity':>8}  created")
    lines = [head]
    for mv in repo.list():
        try:
            if verify:
                mv.verify()
            s = mv.summary()
        except RepositoryError as e:
            lines.append(f"{mv.name:<16} {mv.version:>7} INVALID: {e}")
            continue
        lines.append(
            f"{s['name']:<16} {s['version']:>7} {s['arch']:<8} {s['precision']:<9} "
            f"{_num(s['flops_per_example'], 1e-6, '.3f'):>9} {_num(s['params'], 1, ',.0f'):>10} "
            f"{_num(s['valid_auc'], 1, '.4f'):>9} {_num(s['test_auc'], 1, '.4f'):>8} "
            f"{_num(s['parity_max_abs_diff'], 1, '.1e'):>8}  {s['created_at']}"
        )
    if len(lines) == 1:
        lines.append(f"(no models in {repo.path})")
    return "\n".join(lines)


def _num(value: Any, scale: float, fmt: str) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "-"
    return format(value * scale, fmt)


def cmd_models_list(args: argparse.Namespace) -> None:
    """Print the repository listing."""
    try:
        from export.repository import ModelRepository
    except ImportError as e:  # model.json is read with pydantic
        from model.errors import CLIError

        raise CLIError(f"mldcn models list needs the export extra (pip install '.[export]'): "
                       f"{e}") from None

    print(format_listing(ModelRepository(args.models_dir), verify=args.verify))


def demo_export(out: Path, names: Sequence[str]) -> None:
    """``mldcn demo``'s last step: export ``out/runs/<name>`` as ``<name>`` into ``out/models``."""
    from export.exporter import export_run
    from export.repository import ModelRepository

    repo = out / "models"
    for name in names:
        export_run(out / "runs" / name, repo, name)
    print(f"\nmodel repository {repo} (mldcn models list {repo}):", file=sys.stdout)
    print(format_listing(ModelRepository(repo)))

"""The ``mldcn`` command: one entry point, one sub-command per job.

    mldcn train   train one architecture on a click log (or the built-in synthetic data)
    mldcn synth   write a synthetic click log with planted interactions and its Bayes AUC
    mldcn demo    the README's main command: train ML-DCN and DCNv2 on synthetic data, export
                  both to ONNX and serve them
    mldcn presets print the matched-FLOPs presets for a data layout
    mldcn export  export a run folder to the model repository as parity-checked ONNX
    mldcn models  list the model repository (``mldcn models list MODELS_DIR``)
    mldcn serve   run the scoring service on a model repository (FastAPI + ONNX Runtime)
    mldcn bench   benchmarks: training (pipeline overhead, peak memory, data-parallel scale),
                  serving latency, quality (test AUC at matched FLOPs over archs, levels and seeds)
    mldcn loadtest load tests with Locust: ``compare`` two models, ``run`` against a server
    mldcn data    build real datasets (``mldcn data movielens OUT_DIR``: MovieLens-100K as CTR)

Expected errors (bad paths, unknown architectures, malformed rows, schema mismatches) end with
one line ``mldcn: error: ...`` on stderr and exit status 2, never a traceback (set
``MLDCN_DEBUG=1`` to see the traceback anyway). Sub-commands
import their heavy dependencies (torch, pyarrow) only when they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from model.cliargs import OneLineParser
from model.errors import CLIError, InputError

SYNTHETIC = "synthetic"


_Parser = OneLineParser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input rather than a bug: ``CLIError``, the typed
    ``InputError`` (``model.errors``) and files that are not where or what the command was told.
    Any other exception (a plain ValueError or KeyError included) is a bug and ends with a
    traceback."""
    return (CLIError, InputError, FileNotFoundError, FileExistsError, NotADirectoryError,
            PermissionError, IsADirectoryError)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set key=value`` overrides; values are parsed as JSON when they parse, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--set expects key=value, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", nargs="+", default=[SYNTHETIC], metavar="PATH",
                   help="click-log files read as one stream, or 'synthetic' (default)")
    d.add_argument("--format", default="auto",
                   help="auto, criteo-tsv, criteo-csv, avazu, csv or parquet (default: auto)")
    d.add_argument("--schema", help="feature schema (JSON/YAML); required for generic CSV/Parquet")
    d.add_argument("--synthetic-rows", type=int, default=200_000,
                   help="rows of synthetic data when --data synthetic (default 200000)")
    d.add_argument("--split", default="random", help="random (by seed) or time")
    d.add_argument("--time-column", help="time column for --split time (default: the schema's)")
    d.add_argument("--valid-frac", type=float, default=0.1)
    d.add_argument("--test-frac", type=float, default=0.1)
    d.add_argument("--valid-data", nargs="+", metavar="PATH",
                   help="pre-split validation file(s): --data then gives no validation rows")
    d.add_argument("--test-data", nargs="+", metavar="PATH",
                   help="pre-split test file(s): --data then gives no test rows")
    m = p.add_argument_group("model")
    m.add_argument("--arch", default="mldcn",
                   help="mldcn, dcnv2, masknet, mlp, wukong or rankmixer")
    m.add_argument("--preset", default="small", help="matched-FLOPs level: small, medium, large")
    m.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="model and training overrides from a JSON file, e.g. the best config "
                   "`mldcn tune` wrote (repeatable; --set and explicit flags win)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model hyper-parameter, e.g. --set rank=32 (repeatable)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None,
                   help="epoch cap (default 100: early stopping ends a run)")
    o.add_argument("--batch-size", type=int, default=None, help="default 1024")
    o.add_argument("--lr", type=float, default=None, help="default 0.001")
    o.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience in epochs (default 2)")
    o.add_argument("--calibrate", choices=["none", "temperature"], default=None,
                   help="post-hoc calibration fitted on validation (default none)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch threads on the CPU "
                   "(default: all; 1 per process under --nproc / torchrun)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    o.add_argument("--embedding-optimizer", choices=["adam", "rowwise_adagrad"], default=None,
                   help="adam (default: dense Adam on the table) or rowwise_adagrad (sparse "
                   "gradients, one float of state per table row: for hashed tables of millions "
                   "of rows)")
    o.add_argument("--embedding-lr", type=float, default=None,
                   help="row-wise Adagrad's learning rate (default 0.01)")
    x = p.add_argument_group("hardware")
    x.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: "
                   "CUDA when present; cuda without a GPU is an error)")
    x.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision on CUDA (auto: bf16 where supported, else fp16 with "
                   "a gradient scaler; ignored on the CPU)")
    x.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this "
                   "machine, launched with torchrun (gloo on the CPU, NCCL on GPUs; default 1)")
    p.add_argument("--out", help="run folder (default runs/ARCH-PRESET)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")


def _existing(paths: Sequence[str] | None) -> list[str]:
    """``paths`` (None: none), each checked to exist (CLIError naming the first missing)."""
    for path in paths or []:
        if not Path(path).exists():
            raise CLIError(f"data file not found: {path}")
    return list(paths or [])


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``mldcn train`` arguments without ``--nproc N`` (what each torchrun process runs)."""
    rest = list(argv)[list(argv).index("train") + 1:]
    out, skip = [], False
    for a in rest:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _check_parallel_device(spec: str, nproc: int) -> None:
    """CLIError unless ``nproc`` processes can each have the device ``spec`` asks for."""
    import torch

    from model.device import resolve_device

    device = resolve_device(spec)  # cuda without a GPU: refused before any process starts
    if nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {nproc}")
    if device.type == "cuda":
        if ":" in spec:
            raise CLIError(f"--device {spec} with --nproc {nproc}: every process needs its own "
                           "GPU; use --device cuda (process i takes GPU i)")
        if nproc > torch.cuda.device_count():
            raise CLIError(f"--nproc {nproc} needs {nproc} GPUs, "
                           f"{torch.cuda.device_count()} visible")


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from model.config import ARCHS
    from model.overrides import Overrides, for_arch
    from model.presets import LEVELS, preset
    from model.readers import open_source
    from model.split import SplitSpec
    from model.train import TrainConfig, train_run

    if args.arch not in ARCHS:
        raise CLIError(f"unknown architecture {args.arch!r} (choose from {', '.join(ARCHS)})")
    if args.preset not in LEVELS:
        raise CLIError(f"unknown preset {args.preset!r} (choose from {', '.join(LEVELS)})")
    bayes_auc = None
    if args.data == [SYNTHETIC]:
        if args.synthetic_rows < 100:
            raise CLIError("--synthetic-rows must be at least 100")
        from model.synthetic import synthetic_source

        source, bayes_auc = synthetic_source(args.synthetic_rows, seed=0)
    else:
        source = open_source(_existing(args.data), fmt=args.format, schema=args.schema)
    valid_source, test_source = (
        open_source(paths, fmt=args.format, schema=source.schema) if paths else None
        for paths in (_existing(args.valid_data), _existing(args.test_data)))
    time_column = args.time_column or source.schema.time_column
    split = SplitSpec(kind=args.split, valid_frac=args.valid_frac, test_frac=args.test_frac,
                      seed=args.seed, time_column=time_column if args.split == "time" else None)
    known = {*source.schema.names, source.schema.time_column}
    if args.split == "time" and time_column not in known:
        raise CLIError(f"time column {time_column!r} is not in the data's schema")
    # The preset needs the encoded layout, known only after fitting: use the schema's layout
    # (cardinalities only change embedding sizes, which cost no FLOPs).
    schema = source.schema
    placeholder_cards = [2] * len(schema.categorical)
    config = for_arch([Overrides.load(f) for f in args.config], args.arch)
    if args.config and not config.source:
        raise CLIError(f"no --config file applies to --arch {args.arch}")
    cfg = preset(args.arch, args.preset, placeholder_cards, len(schema.numeric),
                 **{**config.model, **_parse_set(args.set)})
    flags = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
             "early_stop_patience": args.patience, "calibrate": args.calibrate,
             "embedding_optimizer": args.embedding_optimizer, "embedding_lr": args.embedding_lr}
    train_kw = {**config.train, **{k: v for k, v in flags.items() if v is not None}}
    train_cfg = TrainConfig(**train_kw, seed=args.seed, threads=args.threads,
                            progress=False if args.no_progress else None,
                            device=args.device, amp=args.amp)
    out = Path(args.out or f"runs/{args.arch}-{args.preset}")
    if args.nproc != 1 and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # every input was checked above, once, before any process starts
        from model.distributed import launch
        from model.train import check_out

        check_out(out, args.overwrite)
        _check_parallel_device(args.device, args.nproc)
        rc = launch(args.nproc, _without_nproc(args.argv))
        if rc:
            raise SystemExit(rc)
        return {}
    metrics = train_run(source, cfg, train_cfg, split, out, overwrite=args.overwrite,
                        valid_source=valid_source, test_source=test_source)
    from model.distributed import from_env

    if bayes_auc is not None and from_env().main:
        record_bayes_auc(out, metrics, bayes_auc)
    return metrics


def record_bayes_auc(out: Path, metrics: dict[str, Any], bayes_auc: float) -> None:
    """Add the synthetic data's Bayes-optimal AUC to a run's metrics.json (export carries it
    into model.json) and say how far the test AUC is from it."""
    metrics["bayes_auc"] = bayes_auc
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"synthetic data: Bayes-optimal AUC {bayes_auc:.4f}, "
          f"test AUC {metrics['test']['auc']:.4f} "
          f"(gap {bayes_auc - metrics['test']['auc']:.4f})", file=sys.stderr)


def cmd_synth(args: argparse.Namespace) -> None:
    from model.synthetic import write_synthetic

    path = write_synthetic(Path(args.out), rows=args.rows, seed=args.seed, fmt=args.format)
    meta = json.loads((Path(args.out) / "meta.json").read_text())
    print(f"wrote {path} ({args.rows:,} rows, Bayes-optimal AUC {meta['bayes_auc']:.4f})")


def cmd_presets(args: argparse.Namespace) -> None:
    from model.presets import preset_table

    rows = preset_table([2] * args.categorical, args.numeric)
    print(f"{'level':<7} {'arch':<10} {'MFLOPs':>8} {'vs dcnv2':>9} {'dense params':>13}  "
          "shared | arch-specific")
    for r in rows:
        shared = " ".join(f"{k}={v}" for k, v in r["shared"].items())
        key = " ".join(f"{k}={v}" for k, v in r["key"].items())
        print(f"{r['level']:<7} {r['arch']:<10} {r['total_flops'] / 1e6:8.3f} "
              f"{100 * r['mismatch']:+8.2f}% {r['dense_params']:13,}  {shared} | {key}")


def cmd_demo(args: argparse.Namespace) -> None:
    """Train ML-DCN and DCNv2 at matched FLOPs on the built-in synthetic data, then export both
    into the model repository ``OUT/models`` (names ``mldcn`` and ``dcnv2``), list it, print a
    working curl example and run the scoring service on both (unless ``--no-serve``).

    lr 3e-3 rather than the BARS 1e-3: on 200k rows, 1e-3 needs more epochs than the demo's
    time budget to approach the Bayes bound.
    """
    from model.presets import LEVELS, preset
    from model.split import SplitSpec
    from model.synthetic import synthetic_source
    from model.train import TrainConfig, train_run

    if args.preset not in LEVELS:
        raise CLIError(f"unknown preset {args.preset!r} (choose from {', '.join(LEVELS)})")
    if args.rows < 100:
        raise CLIError("--rows must be at least 100")
    out = Path(args.out)
    source, bayes_auc = synthetic_source(args.rows, seed=0)
    # the preset's widths need only the layout (cardinalities cost no FLOPs)
    layout = [2] * len(source.schema.categorical), len(source.schema.numeric)
    train_cfg = TrainConfig(epochs=args.epochs, lr=3e-3, device="auto")
    rows = []
    for arch in ("mldcn", "dcnv2"):
        run = out / "runs" / arch
        m = train_run(source, preset(arch, args.preset, *layout), train_cfg, SplitSpec(), run,
                      overwrite=True)
        record_bayes_auc(run, m, bayes_auc)
        rows.append((arch, m))
    print(f"\n{'arch':<8} {'MFLOPs/ex':>10} {'params':>9} {'valid AUC':>10} {'test AUC':>9} "
          f"{'Bayes AUC':>10} {'train ex/s':>11}")
    for arch, m in rows:
        print(f"{arch:<8} {m['flops_per_example'] / 1e6:10.3f} {m['params']:9,} "
              f"{m['valid']['auc']:10.4f} {m['test']['auc']:9.4f} {m['bayes_auc']:10.4f} "
              f"{m['train_examples_per_s']:11,.0f}")
    print(f"\nrun folders: {out / 'runs'}")
    from export.cli import demo_export

    demo_export(out, [arch for arch, _ in rows])
    if args.no_serve:
        return
    body = demo_request(out / "runs" / "mldcn")
    print("\nscoring service: both models, budget 50 ms; try it from another shell:\n"
          f"  curl -s http://127.0.0.1:{args.port}/v1/score -H 'Content-Type: application/json' "
          f"-d '{json.dumps(body)}'\n"
          f"  curl -s http://127.0.0.1:{args.port}/metrics | grep mldcn_requests_total\n"
          "(set \"model\" to \"dcnv2\" for the other model; Ctrl-C stops)\n",
          flush=True)
    from service.cli import serve

    serve({"MLDCN_REPO": str(out / "models"), "MLDCN_PORT": str(args.port)})


def demo_request(run: Path, candidates: int = 3) -> dict[str, Any]:
    """A /v1/score body from a run's real sample rows: row 0's user and context features, and
    the first ``candidates`` rows' candidate features in the columnar format."""
    from model.schema import FeatureSchema

    schema = FeatureSchema.from_dict(
        json.loads((run / "encoders.json").read_text())["schema"])
    rows = json.loads((run / "samples" / "raw_rows.json").read_text())
    return {
        "request_id": "demo-1",
        "model": "mldcn",
        "user": {f.name: rows[f.name][0] for f in schema.fields_on(["user"])},
        "context": {f.name: rows[f.name][0] for f in schema.fields_on(["context"])},
        "candidates": {f.name: rows[f.name][:candidates]
                       for f in schema.fields_on(["candidate"])},
    }


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mldcn", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model and write a run folder")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synth", help="write synthetic click-log data")
    p.add_argument("out", help="output folder")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", default="csv", help="csv or parquet")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("presets", help="print the matched-FLOPs presets")
    p.add_argument("--categorical", type=int, default=26, help="categorical fields (default 26)")
    p.add_argument("--numeric", type=int, default=13, help="numeric fields (default 13)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="train ML-DCN and DCNv2 on synthetic data (README)")
    p.add_argument("--out", default="demo", help="output folder (default demo/)")
    p.add_argument("--rows", type=int, default=200_000, help="synthetic rows (default 200000)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--preset", default="small")
    p.add_argument("--port", type=int, default=8000, help="service port (default 8000)")
    p.add_argument("--no-serve", action="store_true",
                   help="stop after training and export instead of starting the service")
    p.set_defaults(func=cmd_demo)

    from export.cli import add_export_commands  # argparse only; the exporter loads on use

    add_export_commands(sub)

    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    p = bsub.add_parser("train-throughput", help="training pipeline vs a bare loop")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--archs", default="mldcn,dcnv2,masknet,mlp")
    p.add_argument("--levels", default="small,medium,large")
    p.add_argument("--out", help="JSON output path")
    p.set_defaults(func=lambda a: _bench("main_throughput", a))
    p = bsub.add_parser("train-memory", help="peak RSS for 1x and 10x input files")
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--arch", default="mldcn")
    p.add_argument("--level", default="small")
    p.add_argument("--out", help="JSON output path")
    p.set_defaults(func=lambda a: _bench("main_memory", a))
    p = bsub.add_parser("train-scale", help="examples/s of 1 vs N processes (torchrun) and "
                        "peak memory of a large hashed table, dense Adam vs row-wise Adagrad")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH")
    p.add_argument("--schema", help="feature schema of --data (CSV/Parquet)")
    p.add_argument("--test-data", nargs="+", metavar="PATH")
    p.add_argument("--arch", default="mldcn")
    p.add_argument("--preset", default="small", help="matched-FLOPs level (default small)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    p.add_argument("--cores", type=int, default=2, help="processes / threads compared (2)")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--buckets", type=int, default=10_000_000,
                   help="hashed-table rows of the memory test (0: skip it)")
    p.add_argument("--memory-data", nargs="+", metavar="PATH",
                   default=["../shared/data/criteo_sample/criteo_kaggle_raw_1k.tsv"])
    p.add_argument("--memory-format", default="criteo-tsv")
    p.add_argument("--memory-schema", default="model/schemas/criteo.json")
    p.add_argument("--out", default="docs/bench/train_scale.json", help="JSON output path")
    p.set_defaults(func=_bench_scale)
    p = bsub.add_parser("fusion", help="ONNX Runtime latency of ML-DCN (unfused, fused) vs DCNv2")
    p.add_argument("--configs", default="issue,small,medium,large",
                   help="comma-separated: issue (d = 624), small, medium, large (Criteo presets)")
    p.add_argument("--batches", default="1,64,512,2048")
    p.add_argument("--threads", default="1", help="intra-op thread counts, e.g. 1,2")
    p.add_argument("--repeats", type=int, default=9, help="interleaved rounds (default 9)")
    p.add_argument("--target-s", type=float, default=0.2,
                   help="seconds per measurement (default 0.2)")
    p.add_argument("--profile-batches", default="64,512,2048",
                   help="batch sizes of the per-operator profiles of the issue config ('': none)")
    p.add_argument("--out", default="docs/bench/fusion.json", help="JSON output path")
    p.add_argument("--doc", default="docs/bench/fusion.md",
                   help="markdown tables to write (the whole file)")
    p.set_defaults(func=_bench_fusion)

    _add_quality_commands(sub, bsub)

    from service.cli import add_serve_commands  # argparse only; the service loads on use

    add_serve_commands(sub)

    from loadtest.cli import add_bench_commands, add_loadtest_commands  # argparse only

    add_bench_commands(bsub)
    add_loadtest_commands(sub)
    return parser


def _add_split_data_flags(p: Any, test_help: str | None) -> None:
    """The input and fixed-split flags shared by ``bench quality`` and ``tune``."""
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="click-log files read as one stream")
    p.add_argument("--valid-data", nargs="+", metavar="PATH",
                   help="separate validation file(s); --data then gives no validation rows")
    p.add_argument("--format", default="auto")
    p.add_argument("--schema", help="feature schema (required for CSV/Parquet)")
    p.add_argument("--split", default="random", choices=["random", "time"])
    p.add_argument("--time-column", help="time column (default: the schema's)")
    p.add_argument("--valid-frac", type=float, default=0.1)
    p.add_argument("--test-frac", type=float, default=0.1, help=test_help)
    p.add_argument("--split-seed", type=int, default=0, help="seed of a random split (fixed)")


def _add_quality_commands(sub: Any, bsub: Any) -> None:
    """``mldcn bench quality`` and ``mldcn data movielens`` (modules imported when they run)."""
    p = bsub.add_parser("quality", help="test AUC at matched FLOPs: archs x levels x seeds")
    _add_split_data_flags(p, test_help=None)
    p.add_argument("--test-data", nargs="+", metavar="PATH",
                   help="separate test file(s); --data then gives no test rows")
    p.add_argument("--archs", default="mldcn,dcnv2,masknet,wukong,rankmixer")
    p.add_argument("--levels", default="small,medium,large")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0..N-1)")
    p.add_argument("--epochs", type=int, default=100,
                   help="epoch cap (default 100: early stopping ends a cell)")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience (epochs)")
    p.add_argument("--lr-patience", type=int, default=1,
                   help="epochs without gain tolerated before lr x0.1 (default 1)")
    p.add_argument("--calibrate", choices=["none", "temperature"], default="none",
                   help="post-hoc calibration fitted on validation (default none)")
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="model/training overrides (a `mldcn tune` result: its arch only; a "
                   "file without arch: every arch); repeatable, later files win; a file's "
                   "settings win over the study-wide flags (--lr, --batch-size, ...), which "
                   "are the recipe of every arch a file does not set")
    p.add_argument("--max-rows", type=int, help="read only the first N rows of each input")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--out", required=True, help="study folder (resumed if it exists)")
    p.set_defaults(func=_bench_quality)

    p = bsub.add_parser("quality-diff", help="two quality studies paired by seed: new - base")
    p.add_argument("base", help="the base study folder (e.g. the old recipe)")
    p.add_argument("new", help="the study compared with it")
    p.add_argument("--title", default="", help="report title")
    p.add_argument("--out", required=True, help="report path (.md and .json are written)")
    p.set_defaults(func=_bench_quality_diff)

    p = sub.add_parser("tune", help="hyper-parameter search (Optuna) on validation AUC")
    _add_split_data_flags(p, test_help="rows held out as test (never read; use the study's "
                                       "split)")
    p.add_argument("--archs", default="mldcn,dcnv2", help="architectures, each its own study")
    p.add_argument("--level", default="medium", help="matched-FLOPs level (default medium)")
    p.add_argument("--trials", type=int, default=30, help="finished trials per arch (30)")
    p.add_argument("--timeout-s", type=float, help="search time per arch (default: none)")
    p.add_argument("--epochs", type=int, default=100, help="epoch cap per trial (100)")
    p.add_argument("--patience", type=int, default=2, help="early-stopping patience (epochs)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed and first training seed")
    p.add_argument("--confirm-seeds", type=int, default=0,
                   help="no-regret check: retrain the best and the default on K fresh seeds and "
                   "keep the best only if its gain's 95%% interval is above 0 (0: off)")
    p.add_argument("--space", choices=("recipe", "wide"), default="recipe",
                   help="recipe: lr, batch size, dropout, batch norm, embedding L2; wide: also "
                   "the embedding init scale and the architecture's own settings, its width "
                   "re-solved so FLOPs stay matched (default recipe)")
    p.add_argument("--seeds-per-trial", type=int, default=2,
                   help="seeds a trial that is not pruned trains; its value is their mean "
                        "best validation AUC (default 2)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the first trial, the default recipe (1e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch size of the first trial, the default recipe (1024)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", required=True,
                   help="folder: optuna.db (resumed), ARCH-LEVEL.json configs, summary.json")
    p.set_defaults(func=_tune)

    data = sub.add_parser("data", help="build real datasets")
    dsub = data.add_subparsers(dest="dataset", required=True, parser_class=_Parser)
    p = dsub.add_parser("movielens", help="MovieLens-100K as CTR (from the recbole wheel)")
    p.add_argument("out", help="output folder (ml-100k.parquet, schema.json)")
    p.add_argument("--cache", help="download cache (default .cache/mldcn or $MLDCN_CACHE)")
    p.set_defaults(func=_data_movielens)


def _bench_quality(args: argparse.Namespace) -> None:
    from model.bench import quality as bench_quality

    bench_quality.main(args)


def _bench_quality_diff(args: argparse.Namespace) -> None:
    from model.bench import quality as bench_quality

    bench_quality.compare_main(args)


def _tune(args: argparse.Namespace) -> None:
    from model import tune

    summary = tune.main(args)
    for arch, best in summary["archs"].items():
        print(f"{arch}: valid AUC {best['valid_auc']:.5f} -> {best['config']}")


def _data_movielens(args: argparse.Namespace) -> None:
    from model.movielens import MovieLensError, build_movielens

    try:
        summary = build_movielens(args.out, cache_dir=args.cache)
    except MovieLensError as e:
        raise CLIError(str(e)) from None
    print(json.dumps(summary, indent=2))


def _bench_fusion(args: argparse.Namespace) -> None:
    from export.bench import (
        fusion as bench_fusion,  # onnxruntime, torch: imported only when it runs
    )

    bench_fusion.main(args)


def _bench_scale(args: argparse.Namespace) -> None:
    from model.bench import scale as bench_scale

    bench_scale.main(args)


def _bench(name: str, args: argparse.Namespace) -> None:
    from model.bench import train as bench_train

    getattr(bench_train, name)(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except _expected_errors() as e:
        if os.environ.get("MLDCN_DEBUG"):
            raise
        print(f"mldcn: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mldcn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

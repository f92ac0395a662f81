"""Training at scale: data-parallel examples/s and the memory of a large hashed table.

``mldcn bench train-scale`` runs, each as a fresh ``mldcn train`` subprocess and in alternating
rounds (so slow periods of a shared machine hit every setting alike):

- throughput: the same data, architecture, seed and batch size trained by 1 process with 1
  thread, 1 process with ``--cores`` threads and ``--cores`` torchrun processes of 1 thread
  (``--nproc``); examples/s is the run's median over epochs (all ranks together), and the
  valid AUC is reported beside it (data-parallel training must match one process);
- table memory: a schema whose first categorical field is hashed into ``--buckets`` buckets,
  trained for 2 epochs with dense Adam and with row-wise Adagrad on sparse gradients
  (``--embedding-optimizer``); peak RSS of the process (``ru_maxrss``) against the same run
  with 1,000 buckets, per table row, beside the model of model/optim.py's docstring.

It prints a table and writes JSON with the machine description (``model.bench.results``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import median
from typing import Any


def train_measured(args: list[str], out: Path,
                   env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``mldcn train ARGS --out OUT`` in a fresh process; its metrics and peak RSS."""
    code = ("import resource, subprocess, sys; "
            "rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, sys.executable, "-m", "model", "train", *args,
           "--out", str(out), "--overwrite", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                          check=False)
    if proc.returncode:
        raise RuntimeError(f"mldcn train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["peak_rss_bytes"] = int(proc.stdout.split()[-1]) * 1024
    return metrics


def hashed_schema(schema: dict[str, Any], buckets: int) -> dict[str, Any]:
    """``schema`` with its first categorical field hashed into ``buckets`` ids."""
    out = json.loads(json.dumps(schema))
    field = next(f for f in out["fields"] if f["type"] == "categorical")
    for key in ("min_count", "max_vocab"):
        field.pop(key, None)
    field.update({"encoding": "hash", "buckets": buckets})
    return out


def throughput(data: list[str], data_args: list[str], arch: str, batch_size: int,
               epochs: int, cores: int, repeats: int, tmp: Path,
               level: str = "small") -> list[dict[str, Any]]:
    """examples/s and valid AUC of 1 process × 1 thread, 1 × ``cores``, ``cores`` × 1."""
    settings = [("1 process, 1 thread", ["--threads", "1"], {}),
                (f"1 process, {cores} threads", ["--threads", str(cores)], {}),
                (f"{cores} processes (torchrun, gloo), 1 thread each",
                 ["--nproc", str(cores), "--threads", "1"], {})]
    common = ["--data", *data, *data_args, "--arch", arch, "--preset", level,
              "--batch-size", str(batch_size),
              "--epochs", str(epochs), "--patience", str(epochs), "--device", "cpu"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in settings}
    for r in range(repeats):
        for name, extra, env in settings:
            m = train_measured([*common, *extra], tmp / f"tp-{r}", env)
            runs[name].append({"examples_per_s": m["train_examples_per_s"],
                               "valid_auc": m["valid"]["auc"], "world_size": m["world_size"]})
            print(f"  round {r}: {name}: {m['train_examples_per_s']:,.0f} ex/s, valid AUC "
                  f"{m['valid']['auc']:.4f}", file=sys.stderr)
    base = median(x["examples_per_s"] for x in runs[settings[0][0]])
    return [{"setting": name, "runs": runs[name],
             "median_examples_per_s": median(x["examples_per_s"] for x in runs[name]),
             "speedup_vs_1x1": median(x["examples_per_s"] for x in runs[name]) / base,
             "valid_auc": median(x["valid_auc"] for x in runs[name])}
            for name, _, _ in settings]


def table_memory(data: list[str], fmt: str, schema: dict[str, Any], buckets: int, arch: str,
                 tmp: Path) -> list[dict[str, Any]]:
    """Peak RSS with a ``buckets``-row hashed field, dense Adam vs row-wise Adagrad."""
    rows = []
    for opt in ("rowwise_adagrad", "adam"):
        peaks = {}
        for n in (1000, buckets):
            path = tmp / f"schema-{n}.json"
            path.write_text(json.dumps(hashed_schema(schema, n)))
            m = train_measured(
                ["--data", *data, "--format", fmt, "--schema", str(path), "--arch", arch,
                 "--epochs", "2", "--batch-size", "256", "--threads", "1", "--device", "cpu",
                 "--embedding-optimizer", opt], tmp / f"mem-{opt}-{n}")
            peaks[n] = m
        big, small = peaks[buckets], peaks[1000]
        embed_dim = json.loads((tmp / f"mem-{opt}-{buckets}" / "model_config.json")
                               .read_text())["model"]["embed_dim"]
        extra = big["peak_rss_bytes"] - small["peak_rss_bytes"]
        rows.append({"embedding_optimizer": opt, "buckets": buckets, "embed_dim": embed_dim,
                     "params": big["params"], "peak_rss_bytes": big["peak_rss_bytes"],
                     "baseline_peak_rss_bytes": small["peak_rss_bytes"],
                     "bytes_per_table_row": extra / (buckets - 1000),
                     "train_examples_per_s": big["train_examples_per_s"]})
        print(f"  {opt}: peak {big['peak_rss_bytes'] / 2**20:,.0f} MiB "
              f"({extra / (buckets - 1000):.1f} B per table row)", file=sys.stderr)
    return rows


def main(args: Any) -> None:
    from model.bench.results import write_result
    from model.bench.train import machine
    from model.errors import InputError
    from model.files import read_json

    data = list(args.data)
    data_args = ["--schema", args.schema] if args.schema else []
    if args.test_data:
        data_args += ["--test-data", *args.test_data]
    with tempfile.TemporaryDirectory(prefix="mldcn-scale-") as d:
        tmp = Path(d)
        tp = throughput(data, data_args, args.arch, args.batch_size, args.epochs, args.cores,
                        args.repeats, tmp, args.preset)
        mem = []
        if args.buckets:
            schema = read_json(Path(args.memory_schema), InputError)
            mem = table_memory(list(args.memory_data), args.memory_format, schema, args.buckets,
                               args.arch, tmp)
    lines = [f"\n{'setting':<48} {'ex/s':>10} {'speed-up':>9} {'valid AUC':>10}"]
    for row in tp:
        lines.append(f"{row['setting']:<48} {row['median_examples_per_s']:>10,.0f} "
                     f"{row['speedup_vs_1x1']:>8.2f}x {row['valid_auc']:>10.4f}")
    if mem:
        lines.append(f"\n{'table optimiser':<18} {'buckets':>11} {'e':>3} {'peak MiB':>9} "
                     f"{'B/row':>7}")
        for row in mem:
            lines.append(f"{row['embedding_optimizer']:<18} {row['buckets']:>11,} "
                         f"{row['embed_dim']:>3} {row['peak_rss_bytes'] / 2**20:>9,.0f} "
                         f"{row['bytes_per_table_row']:>7.1f}")
    write_result(args.out, {"benchmark": "train-scale", "machine": machine(), "arch": args.arch,
                            "preset": args.preset,
                            "batch_size": args.batch_size, "epochs": args.epochs, "data": data,
                            "throughput": tp, "table_memory": mem,
                            "peak_rss_note": "ru_maxrss of the whole mldcn train process"},
                 "\n".join(lines))

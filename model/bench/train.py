"""Training benchmarks: data-pipeline overhead and peak memory vs input size.

``mldcn bench train-throughput``: for each architecture at each preset level, training
examples/s of the real pipeline (shards on disk → shuffled numpy batches → tensors → step)
against a bare forward/backward loop over the same number of pre-built tensor batches. The two
are run alternately (pipeline, bare, pipeline, bare, ...) in one process; the overhead is the
median over repeats of (bare rate / pipeline rate of the adjacent pair) - 1, so slow periods of
a shared machine hit both sides of a pair alike.

``mldcn bench train-memory``: trains one epoch on a synthetic file of N rows and on one of
10·N rows, each in a fresh subprocess, and reports peak RSS (``ru_maxrss``) of each. Streaming
readers and on-disk shards should keep the two within 20%.

Both print a table and write JSON with the machine description.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.bench import results


def machine() -> dict[str, Any]:
    """The machine, torch's version and its intra-op threads."""
    import torch

    return results.machine("torch", torch_threads=torch.get_num_threads())


def _epoch_pipeline(model, opt, shards, batch_size, rng) -> tuple[int, float]:
    from model.dataset import iter_batches
    from model.train import to_tensors, train_step

    t0 = time.perf_counter()
    n = 0
    for cat, dense, y in iter_batches(shards, batch_size, True, rng):
        train_step(model, opt, *to_tensors(cat, dense, y), 10.0)
        n += len(y)
    return n, time.perf_counter() - t0


def _epoch_bare(model, opt, batches) -> tuple[int, float]:
    from model.train import train_step

    t0 = time.perf_counter()
    n = 0
    for c, d, t in batches:
        train_step(model, opt, c, d, t, 10.0)
        n += len(t)
    return n, time.perf_counter() - t0


def throughput(
    rows: int, repeats: int, batch_size: int, archs: list[str], levels: list[str]
) -> dict[str, Any]:
    import torch

    from model.ctr import build_model
    from model.dataset import prepare
    from model.flops import model_flops
    from model.presets import preset
    from model.split import SplitSpec
    from model.synthetic import synthetic_source

    source, _ = synthetic_source(rows, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare(source, SplitSpec(valid_frac=0.0, test_frac=0.0), Path(tmp) / "c")
        cards, nd = data.encoders.cardinalities, data.encoders.num_dense
        train_rows = data.rows("train")
        g = torch.Generator().manual_seed(0)
        bare = []
        for s in range(0, train_rows, batch_size):
            b = min(batch_size, train_rows - s)
            bare.append((
                torch.stack([torch.randint(0, c, (b,), generator=g) for c in cards], 1),
                torch.randn(b, nd, generator=g),
                (torch.rand(b, generator=g) < 0.3).float(),
            ))
        results = []
        for level in levels:
            for arch in archs:
                cfg = preset(arch, level, cards, nd)
                torch.manual_seed(0)
                model = build_model(cfg, cards, nd)
                model.train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                rng = np.random.default_rng(0)
                _epoch_bare(model, opt, bare[:20])  # warm-up
                pipe_rates, bare_rates = [], []
                for _ in range(repeats):
                    n, s = _epoch_pipeline(model, opt, data.shards["train"], batch_size, rng)
                    pipe_rates.append(n / s)
                    n, s = _epoch_bare(model, opt, bare)
                    bare_rates.append(n / s)
                p, b = float(np.median(pipe_rates)), float(np.median(bare_rates))
                # Each pipeline epoch is paired with the bare epoch right after it; the median of
                # the pair ratios cancels slow periods of a shared machine that hit both.
                pair = [bb / pp - 1.0 for pp, bb in zip(pipe_rates, bare_rates, strict=True)]
                results.append({
                    "level": level,
                    "arch": arch,
                    "mflops_per_example": model_flops(cfg, cards, nd).total / 1e6,
                    "pipeline_examples_per_s": p,
                    "bare_examples_per_s": b,
                    "pipeline_overhead": float(np.median(pair)),
                    "pipeline_overhead_range": [min(pair), max(pair)],
                    "pipeline_runs": pipe_rates,
                    "bare_runs": bare_rates,
                })
                r = results[-1]
                lo, hi = r["pipeline_overhead_range"]
                print(f"{level:<7} {arch:<8} {r['mflops_per_example']:8.3f} "
                      f"{p:12,.0f} {b:12,.0f} {100 * r['pipeline_overhead']:9.1f}% "
                      f"[{100 * lo:5.1f}, {100 * hi:5.1f}]", flush=True)
    return {
        "benchmark": "train-throughput",
        "rows": train_rows,
        "batch_size": batch_size,
        "repeats": repeats,
        "machine": machine(),
        "results": results,
        "max_overhead": max(r["pipeline_overhead"] for r in results),
    }


def _one_epoch_child(data_dir: str, arch: str, level: str) -> None:
    """Run in a subprocess: prepare + one training epoch; print peak RSS in KiB as JSON."""
    import torch

    from model.ctr import build_model
    from model.dataset import prepare
    from model.presets import preset
    from model.readers import open_source
    from model.split import SplitSpec
    from model.train import TrainConfig, fit

    d = Path(data_dir)
    files = sorted(p for p in d.iterdir() if p.suffix in (".csv", ".parquet"))
    source = open_source(files, schema=d / "schema.json")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = prepare(source, SplitSpec(), Path(tmp) / "c")
        prep_s = time.perf_counter() - t0
        cards, nd = data.encoders.cardinalities, data.encoders.num_dense
        torch.manual_seed(0)
        model = build_model(preset(arch, level, cards, nd), cards, nd)
        t0 = time.perf_counter()
        fit(model, data, TrainConfig(epochs=1, progress=False), log=lambda s: None)
        train_s = time.perf_counter() - t0
        rows = data.rows("train") + data.rows("valid") + data.rows("test")
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": rows, "peak_rss_mib": peak_kib / 1024,
                      "prepare_s": prep_s, "train_epoch_s": train_s}))


def memory(rows: int, factor: int, arch: str, level: str, cache: Path) -> dict[str, Any]:
    from model.synthetic import write_synthetic

    runs = []
    for n in (rows, rows * factor):
        folder = cache / f"bench-synthetic-{n}"
        if not (folder / "meta.json").is_file():
            write_synthetic(folder, rows=n, seed=1)
        size = sum(p.stat().st_size for p in folder.iterdir())
        code = ("from model.bench.train import _one_epoch_child; "
                f"_one_epoch_child({str(folder)!r}, {arch!r}, {level!r})")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"memory child failed:\n{out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["file_mib"] = size / 2**20
        runs.append(r)
        print(f"{r['rows']:>10,} rows  {r['file_mib']:8.1f} MiB on disk  "
              f"peak RSS {r['peak_rss_mib']:7.1f} MiB  prepare {r['prepare_s']:6.1f}s  "
              f"epoch {r['train_epoch_s']:6.1f}s", flush=True)
    ratio = runs[1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    return {"benchmark": "train-memory", "arch": arch, "level": level, "factor": factor,
            "machine": machine(), "runs": runs, "peak_rss_ratio": ratio}


def main_throughput(args: Any) -> None:
    print(f"{'level':<7} {'arch':<8} {'MFLOPs':>8} {'pipeline/s':>12} {'bare/s':>12} "
          f"{'overhead':>10} {'pair range':>14}")
    from model.cliargs import comma_list

    res = throughput(args.rows, args.repeats, args.batch_size, comma_list(args.archs),
                     comma_list(args.levels))
    results.write_result(args.out, res,
                         f"max pipeline overhead: {100 * res['max_overhead']:.1f}% (limit 30%)")


def main_memory(args: Any) -> None:
    from model.synthetic import DEFAULT_CACHE

    res = memory(args.rows, args.factor, args.arch, args.level, DEFAULT_CACHE)
    results.write_result(args.out, res,
                         f"peak RSS ratio {args.factor}x / 1x: {res['peak_rss_ratio']:.3f}")

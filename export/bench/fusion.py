"""``mldcn bench fusion``: ONNX Runtime latency of ML-DCN before and after fusion vs DCNv2.

For each configuration (the issue's d = 624: 39 categorical fields × e = 16, L = 3, medium tower;
and the small / medium / large presets on the Criteo layout, 26 categorical + 13 dense), build
full-rank DCNv2 and ML-DCN at matched FLOPs (``model.presets``) with random weights, export them
with ``export.exporter.export_graph`` and time in-process ONNX Runtime sessions (CPU, sequential,
all graph optimisations, as the scoring service opens them) at each batch size and thread count.

Graphs per configuration:

``dcnv2``       full-rank DCNv2 as the exporter writes it (the reference).
``dcnv2_nocat`` control: DCNv2 with the two generic graph changes the fused ML-DCN also gets
                (no Concat with an empty dense tensor when F_num = 0; the head as two (B, 1)
                Gemms instead of Concat + Gemm). It separates what is ML-DCN-specific.
``mldcn``       ML-DCN unfused ("before").
``mldcn_fused`` ML-DCN through ``model.fuse.fuse_for_inference`` ("after", what export ships).

Timing: per batch size, ``repeats`` rounds; a round measures every graph once, in turn, the
order reversed every other round (A B C D, D C B A, ...): one warm-up run, then n back-to-back
runs (n such that a measurement lasts about ``target_s``), their median. A ratio is taken within
a round (ML-DCN over the DCNv2 median of the same round), so slow periods of a shared machine
hit both sides; the report gives the median ratio over rounds and its spread (min-max and IQR),
for wall-clock time and, with 1 thread, for the CPU time of the calling thread (ONNX Runtime
then computes there), which other processes do not inflate. Operator counts:
nodes of the ONNX file by op_type (Constant nodes not counted) and of the graph ONNX Runtime
actually runs after its optimisations. At each of ``profile_batches``,
``SessionOptions.enable_profiling`` gives the per-operator time of each graph of the issue
configuration (1 thread, interleaved rounds, median per node).

Writes JSON (``--out``) and its tables as a markdown file of their own (``--doc``,
docs/bench/fusion.md, written whole; the analysis in docs/fusion.md is written by hand).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.bench.results import machine as results_machine
from model.bench.results import write_result
from model.errors import InputError

GRAPHS: tuple[str, ...] = ("dcnv2", "dcnv2_nocat", "mldcn", "mldcn_fused")
CONFIGS: dict[str, dict[str, Any]] = {
    "issue": {"level": "medium", "num_cat": 39, "num_dense": 0,
              "about": "d = 624 (39 categorical × e = 16), L = 3, medium tower"},
    "small": {"level": "small", "num_cat": 26, "num_dense": 13,
              "about": "Criteo layout, small preset (d = 221, L = 2)"},
    "medium": {"level": "medium", "num_cat": 26, "num_dense": 13,
               "about": "Criteo layout, medium preset (d = 429, L = 3)"},
    "large": {"level": "large", "num_cat": 26, "num_dense": 13,
              "about": "Criteo layout, large preset (d = 429, L = 4)"},
}
IDS_PER_FIELD = 10_000
def _nocat_dcnv2(model: Any) -> Any:
    """The DCNv2 control graph: ``model`` without the empty Concat and with a split head."""
    import torch
    from torch import nn

    class NoConcatDCNv2(nn.Module):
        """CTRModel (parallel or cross_only) with x0 = embeddings when F_num = 0, no head Concat."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            d = model.input_dim
            weight = model.head.weight.detach()[0]
            self.register_buffer("w_cross", weight[:d].reshape(-1, 1).clone())  # (d, 1)
            self.register_buffer("w_tower", weight[d:].reshape(-1, 1).clone())  # (width, 1)
            self.register_buffer("bias", model.head.bias.detach().clone())  # (1,)

        def forward(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            """cat_ids (B, F_cat), dense (B, F_num) to logits (B,)."""
            m = self.model
            x0 = m.embedding(cat_ids).flatten(start_dim=1)  # (B, F_cat·e)
            if m.num_dense:
                x0 = torch.cat([x0, dense], dim=1)  # (B, d)
            logit = torch.addmm(self.bias, m.interaction(x0), self.w_cross)  # (B, 1)
            if m.structure == "parallel":
                logit = logit + m.mlp(x0) @ self.w_tower  # (B, 1)
            return logit.squeeze(-1)  # (B,)

    return NoConcatDCNv2().eval()


def build_graphs(config: str, folder: Path, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Export the four graphs of ``config`` into ``folder``; path, op counts and FLOPs of each."""
    import torch

    from export.exporter import export_graph, op_counts
    from model.ctr import build_model
    from model.flops import model_flops
    from model.fuse import fuse_for_inference
    from model.presets import preset

    spec = CONFIGS[config]
    cards, num_dense = [IDS_PER_FIELD] * spec["num_cat"], spec["num_dense"]
    models: dict[str, Any] = {}
    cfgs = {}
    for arch in ("dcnv2", "mldcn"):
        cfg = preset(arch, spec["level"], cards, num_dense)
        torch.manual_seed(seed)
        cfgs[arch] = cfg
        models[arch] = build_model(cfg, cards, num_dense).eval()
    models["dcnv2_nocat"] = _nocat_dcnv2(models["dcnv2"])
    models["mldcn_fused"] = fuse_for_inference(models["mldcn"])
    out = {}
    for name in GRAPHS:
        path = folder / f"{config}-{name}.onnx"
        graph = export_graph(models[name], path, len(cards), num_dense)
        arch = "dcnv2" if name.startswith("dcnv2") else "mldcn"
        cfg = cfgs[arch]
        counts = op_counts(graph)
        out[name] = {
            "path": str(path),
            "op_counts": counts,
            "node_count": sum(counts.values()),
            "flops_per_example": model_flops(cfg, cards, num_dense).total,
            "config": {k: v for k, v in cfg.to_dict().items()
                       if k in ("embed_dim", "num_layers", "rank", "mask_hidden", "mlp_dims",
                                "dcn_type", "structure")},
        }
    return out


def _session(path: str, threads: int, optimized: str | None = None, profile: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if optimized:
        opts.optimized_model_filepath = optimized
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def optimized_op_counts(path: str, folder: Path) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs after its optimisations (1 thread)."""
    import onnx

    from export.exporter import op_counts

    target = folder / (Path(path).stem + ".ort.onnx")
    _session(path, 1, optimized=str(target))
    return op_counts(onnx.load(str(target)))


def _feed(num_cat: int, num_dense: int, batch: int, rng: np.random.Generator) -> dict[str, Any]:
    return {
        "cat_ids": rng.integers(0, IDS_PER_FIELD, size=(batch, num_cat), dtype=np.int64),
        "dense": rng.standard_normal((batch, num_dense)).astype(np.float32),
    }


def _run_timed(session: Any, feed: dict[str, Any]) -> tuple[float, float]:
    """One run: (wall seconds, CPU seconds of the calling thread)."""
    c0, t0 = time.thread_time(), time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - t0, time.thread_time() - c0


def _spread(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(q50), "min": float(v.min()), "max": float(v.max()),
            "q25": float(q25), "q75": float(q75)}


def time_config(
    graphs: dict[str, dict[str, Any]],
    num_cat: int,
    num_dense: int,
    batches: Sequence[int],
    threads: int,
    repeats: int,
    target_s: float,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Interleaved latency of every graph at each batch size; one row per batch size.

    A round measures each graph once, in turn (A B C D, then D C B A, ...): one warm-up run,
    then ``runs`` back-to-back runs, their median. Ratios are taken within a round. Wall-clock
    time and, with 1 thread (ONNX Runtime then computes on the calling thread), that thread's CPU
    time, which other processes on a shared machine do not inflate.
    """
    sessions = {name: _session(g["path"], threads) for name, g in graphs.items()}
    names = list(sessions)
    rng = np.random.default_rng(seed)
    rows = []
    for batch in batches:
        feed = _feed(num_cat, num_dense, batch, rng)
        for session in sessions.values():  # warm-up
            session.run(None, feed)
        probe = min(_run_timed(sessions["dcnv2"], feed)[0] for _ in range(3))
        runs = int(min(500, max(5, target_s / max(probe, 1e-6))))
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                sessions[name].run(None, feed)  # warm: weights back in cache
                samples = [_run_timed(sessions[name], feed) for _ in range(runs)]
                wall[name].append(float(np.median([w for w, _ in samples])))
                cpu[name].append(float(np.median([c for _, c in samples])))
        row: dict[str, Any] = {"batch": batch, "threads": threads, "runs_per_round": runs}
        clocks = {"wall": wall, "cpu": cpu} if threads == 1 else {"wall": wall}
        for clock, per_graph in clocks.items():
            row[clock] = {
                "latency_ms": {n: _spread([1e3 * v for v in per_graph[n]]) for n in names},
                "ratio_vs_dcnv2": {n: _ratios(per_graph[n], per_graph["dcnv2"]) for n in names},
                "ratio_vs_dcnv2_nocat": {n: _ratios(per_graph[n], per_graph["dcnv2_nocat"])
                                         for n in names},
                "rounds_ms": {n: [1e3 * v for v in per_graph[n]] for n in names},
            }
        rows.append(row)
        _print_row(row)
    return rows


def _ratios(values: Sequence[float], reference: Sequence[float]) -> dict[str, float]:
    return _spread([a / b for a, b in zip(values, reference, strict=True)])


def _fmt_ratio(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['min']:.3f}–{s['max']:.3f}]"


def _print_row(row: dict[str, Any]) -> None:
    for clock in ("cpu", "wall"):
        if clock not in row:
            continue
        r = row[clock]
        ratio = r["ratio_vs_dcnv2"]
        print(f"  batch {row['batch']:>5} threads {row['threads']} {clock:<4}: dcnv2 "
              f"{r['latency_ms']['dcnv2']['median']:8.3f} ms | mldcn/dcnv2 before "
              f"{_fmt_ratio(ratio['mldcn'])} after {_fmt_ratio(ratio['mldcn_fused'])} | "
              f"after/dcnv2_nocat {_fmt_ratio(r['ratio_vs_dcnv2_nocat']['mldcn_fused'])}",
              flush=True)


CATEGORIES: dict[str, tuple[str, ...]] = {
    "matmul": ("Gemm", "FusedGemm", "MatMul", "FusedMatMul"),
    "element-wise": ("Mul", "Add", "Sub", "ReduceSum", "Relu", "Sigmoid", "Softmax"),
    "LayerNorm": ("LayerNormalization",),
    "gather/copy": ("Gather", "Concat", "Split", "Slice", "Flatten", "Squeeze", "Reshape"),
}


def profile_graphs(
    graphs: dict[str, dict[str, Any]], num_cat: int, num_dense: int, batch: int, runs: int,
    folder: Path, rounds: int = 5,
) -> dict[str, Any]:
    """Per-operator kernel time (µs per run) of each graph at ``batch``, 1 thread.

    ``rounds`` interleaved rounds of ``runs`` runs per graph; a node's time is its median over
    all runs (robust to other processes), a total the sum of its nodes' medians.
    """
    rng = np.random.default_rng(1)
    feed = _feed(num_cat, num_dense, batch, rng)
    sessions = {name: _session(g["path"], 1, profile=str(folder / f"profile-{name}-{batch}"))
                for name, g in graphs.items()}
    for session in sessions.values():
        session.run(None, feed)
    for r in range(rounds):
        for name in sessions if r % 2 == 0 else reversed(list(sessions)):
            for _ in range(runs):
                sessions[name].run(None, feed)
    out: dict[str, Any] = {}
    for name, session in sessions.items():
        events = json.loads(Path(session.end_profiling()).read_text())
        by_node: dict[str, dict[str, Any]] = {}
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                continue
            node = e["name"][: -len("_kernel_time")]
            item = by_node.setdefault(node, {"op_type": e["args"]["op_name"], "durations": [],
                                             "output_shape": _shape(e["args"]),
                                             "flops": _matmul_flops(e["args"])})
            item["durations"].append(e["dur"])
        nodes = []
        for node, item in by_node.items():
            durations = item.pop("durations")[1:]  # the first run is the warm-up
            nodes.append({"node": node, **item, "us": float(np.median(durations))})
        nodes.sort(key=lambda v: -v["us"])
        by_type: dict[str, float] = {}
        for v in nodes:
            by_type[v["op_type"]] = by_type.get(v["op_type"], 0.0) + v["us"]
        by_category = {c: sum(t for op, t in by_type.items() if op in ops)
                       for c, ops in CATEGORIES.items()}
        by_category["other"] = sum(by_type.values()) - sum(by_category.values())
        matmul_flops = sum(v["flops"] or 0 for v in nodes)
        out[name] = {"batch": batch, "runs": runs * rounds, "total_us": sum(by_type.values()),
                     "by_op_type_us": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
                     "by_category_us": by_category, "matmul_flops": matmul_flops,
                     "matmul_gflops_per_s": matmul_flops / max(by_category["matmul"], 1e-9) / 1e3,
                     "nodes": nodes}
    return out


def _matmul_flops(args: dict[str, Any]) -> int | None:
    """2·M·N·K of a Gemm / MatMul kernel event (None for other ops)."""
    if args.get("op_name") not in CATEGORIES["matmul"]:
        return None
    out, inputs = _shape(args), args.get("input_type_shape") or []
    first = next(iter(inputs[0].values()), None) if inputs else None
    if not out or not first:
        return None
    m_n = int(np.prod(out))
    return 2 * m_n * int(first[-1])


def _shape(args: dict[str, Any]) -> list[int] | None:
    shapes = args.get("output_type_shape") or []
    for entry in shapes:
        for dims in entry.values():
            return list(dims)
    return None


def run(
    configs: Sequence[str],
    batches: Sequence[int],
    threads: Sequence[int],
    repeats: int,
    target_s: float,
    profile_batches: Sequence[int] = (),
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON report."""
    results = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        profile = None
        for config in configs:
            spec = CONFIGS[config]
            print(f"{config}: {spec['about']}", flush=True)
            graphs = build_graphs(config, folder)
            for g in graphs.values():
                g["ort_op_counts"] = optimized_op_counts(g["path"], folder)
                g["ort_node_count"] = sum(g["ort_op_counts"].values())
            rows = []
            for t in threads:
                rows += time_config(graphs, spec["num_cat"], spec["num_dense"], batches, t,
                                    repeats, target_s)
            if config == "issue":
                profile = [profile_graphs(graphs, spec["num_cat"], spec["num_dense"], b,
                                          max(4, 2048 // b), folder) for b in profile_batches]
            results.append({
                "config": config, **spec,
                "graphs": {name: {k: v for k, v in g.items() if k != "path"}
                           for name, g in graphs.items()},
                "rows": rows,
            })
    return {
        "benchmark": "fusion",
        "command": "mldcn " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if Path(sys.argv[0]).name in ("mldcn", "__main__.py") else " ".join(sys.argv),
        "machine": results_machine("torch", "onnxruntime"),
        "settings": {"batches": list(batches), "threads": list(threads), "repeats": repeats,
                     "target_s": target_s, "ids_per_field": IDS_PER_FIELD,
                     "session": "CPUExecutionProvider, ORT_SEQUENTIAL, ORT_ENABLE_ALL, "
                                "inter_op_num_threads 1"},
        "results": results,
        "profile": profile,
        "elapsed_s": time.perf_counter() - t_start,
    }


def _ops(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def markdown(report: dict[str, Any]) -> str:
    """The tables of docs/bench/fusion.md."""
    m = report["machine"]
    lines = [
        f"Command: `{report['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (load average at the end "
        f"{', '.join(f'{x:.2f}' for x in m['load_average'] or [])}); Python {m['python']}, "
        f"torch {m['torch']}, ONNX Runtime {m['onnxruntime']}. Sessions: "
        f"{report['settings']['session']}. {report['settings']['repeats']} rounds per batch "
        f"size; in each, every graph in turn: a warm-up run, then back-to-back runs for "
        f"~{report['settings']['target_s']} s, their median.",
        "",
        "Ratio = ML-DCN / DCNv2 (full rank, as exported) within a round: median [min–max] "
        "(IQR q25–q75) over rounds. *cpu*: CPU time of the calling thread (1 thread: ONNX "
        "Runtime computes there; not inflated by other processes), *wall*: wall clock. "
        "*Before*: ML-DCN unfused; *after*: the fused graph that export writes; *vs control*: "
        "after / the DCNv2 control with the same generic graph changes (no empty Concat, split "
        "head).",
        "",
    ]
    for res in report["results"]:
        g = res["graphs"]
        lines += [
            f"### {res['config']}: {res['about']}",
            "",
            f"MFLOPs/example: DCNv2 {g['dcnv2']['flops_per_example'] / 1e6:.3f}, ML-DCN "
            f"{g['mldcn']['flops_per_example'] / 1e6:.3f} (r = {g['mldcn']['config']['rank']}, "
            f"h = {g['mldcn']['config']['mask_hidden']}).",
            "",
            "| threads | clock | batch | DCNv2 ms | before: ML-DCN/DCNv2 "
            "| after: ML-DCN/DCNv2 | after vs control |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["rows"]:
            for clock in ("cpu", "wall"):
                if clock not in row:
                    continue
                r = row[clock]
                before = r["ratio_vs_dcnv2"]["mldcn"]
                after = r["ratio_vs_dcnv2"]["mldcn_fused"]
                ctrl = r["ratio_vs_dcnv2_nocat"]["mldcn_fused"]
                lines.append(
                    f"| {row['threads']} | {clock} | {row['batch']} | "
                    f"{r['latency_ms']['dcnv2']['median']:.3f} | {_fmt_ratio(before)} "
                    f"({before['q25']:.3f}–{before['q75']:.3f}) | {_fmt_ratio(after)} "
                    f"({after['q25']:.3f}–{after['q75']:.3f}) | {_fmt_ratio(ctrl)} |"
                )
        lines += ["", "| graph | ONNX nodes | after ORT optimisation | ORT operators |",
                  "|---|---|---|---|"]
        for name, info in g.items():
            lines.append(f"| {name} | {info['node_count']} | {info['ort_node_count']} | "
                         f"{_ops(info['ort_op_counts'])} |")
        lines.append("")
    for prof in report.get("profile") or []:
        lines += _profile_markdown(prof)
    return "\n".join(lines)


def _profile_markdown(prof: dict[str, Any]) -> list[str]:
    """Per-op-type, per-category and (fused graph) per-node tables of one profiled batch."""
    graphs = list(prof)
    batch = prof[graphs[0]]["batch"]
    ref = prof["dcnv2"]["total_us"]
    lines = [f"### Per-operator time, issue configuration, batch {batch}, 1 thread",
             "",
             "ONNX Runtime profiler, µs per run: each node's median over "
             f"{prof[graphs[0]]['runs']} interleaved runs; totals are sums of medians.",
             "",
             "| op type | " + " | ".join(graphs) + " |", "|---|" + "---|" * len(graphs)]
    types = sorted({t for p in prof.values() for t in p["by_op_type_us"]},
                   key=lambda t: -max(p["by_op_type_us"].get(t, 0.0) for p in prof.values()))
    for t in types:
        lines.append(f"| {t} | " + " | ".join(
            f"{prof[g]['by_op_type_us'].get(t, 0.0):.0f}" for g in graphs) + " |")
    for category in [*CATEGORIES, "other"]:
        lines.append(f"| *{category}* | " + " | ".join(
            f"*{prof[g]['by_category_us'][category]:.0f}*" for g in graphs) + " |")
    lines.append("| **total** | " + " | ".join(
        f"**{prof[g]['total_us']:.0f}** ({prof[g]['total_us'] / ref:.3f})" for g in graphs)
        + " |")
    lines.append("| matmul MFLOP, GFLOP/s | " + " | ".join(
        f"{prof[g]['matmul_flops'] / 1e6:.1f}, {prof[g]['matmul_gflops_per_s']:.0f}"
        for g in graphs) + " |")
    for name in ("dcnv2", "mldcn_fused"):
        lines += ["", f"Nodes of {name} at batch {batch}, slowest first:", "",
                  "| node | op type | output | µs | GFLOP/s |", "|---|---|---|---|---|"]
        for node in prof[name]["nodes"]:
            rate = f"{node['flops'] / node['us'] / 1e3:.0f}" if node["flops"] else ""
            lines.append(f"| `{node['node']}` | {node['op_type']} | {node['output_shape']} | "
                         f"{node['us']:.0f} | {rate} |")
    lines.append("")
    return lines


DOC_TITLE = "# `mldcn bench fusion`: ML-DCN (plain, fused) vs DCNv2 ONNX Runtime latency"


def document(generated: str) -> str:
    """The whole report file (``--doc``, docs/bench/fusion.md): a title, a pointer to the
    hand-written analysis (docs/fusion.md) and the generated tables."""
    return (f"{DOC_TITLE}\n\nWritten whole by `mldcn bench fusion` (with "
            "`docs/bench/fusion.json`); the analysis is in\n[`docs/fusion.md`](../fusion.md).\n\n"
            + generated.strip("\n") + "\n")


def _ints(text: str) -> list[int]:
    from model.cliargs import comma_list

    values = comma_list(text, int, "integers")
    if not values or min(values) < 1:
        raise InputError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Entry point of ``mldcn bench fusion``."""
    from model.cliargs import comma_list

    configs = comma_list(args.configs)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise InputError(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.repeats < 3:
        raise InputError(f"--repeats must be >= 3, got {args.repeats}")
    doc = Path(args.doc)
    if doc.is_file() and not doc.read_text().startswith(DOC_TITLE):  # before minutes of work
        raise InputError(f"--doc {doc} exists and is not a report this benchmark wrote (it "
                         f"would be overwritten whole): name another file")
    report = run(configs, _ints(args.batches), _ints(args.threads), args.repeats,
                 args.target_s, _ints(args.profile_batches) if args.profile_batches else [])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(document(markdown(report)))
    return write_result(args.out, report, f"wrote {doc} in {report['elapsed_s']:.0f}s")

"""The quality study: test AUC and logloss at matched FLOPs, over architectures, levels and seeds.

``mldcn bench quality`` (``main``) prepares the data once (one split, one set of fitted
encoders, shared by every cell), then trains every (arch, level, seed) cell: the seed changes
the initialisation and the shuffling, never the split. Each finished cell is written to
``OUT/cells/ARCH-LEVEL-sSEED.json`` at once and is not re-run, so an interrupted study resumes
where it stopped (the study's settings are kept in ``OUT/study.json``; resuming with different
data or training settings is refused). After every cell the report is rewritten from all finished
cells:

``OUT/report.json``  per cell: test AUC and logloss mean, standard deviation and 95% confidence
                     interval (t-distribution, n − 1 degrees of freedom), FLOPs and parameters
                     per example, training time; per (arch, level) the paired difference against
                     DCNv2 at the same seed, with its interval and a verdict (a difference whose
                     interval covers 0 is a tie).
``OUT/report.md``    the same as tables, the presets and the command that produced it.
``OUT/auc_vs_flops.png``  test AUC (mean ± CI) against FLOPs per example, one line per arch.

Model selection uses the validation split only (early stopping and the learning-rate plateau
schedule monitor validation AUC; the best-on-validation epoch is kept); test rows are scored once
per cell, after training.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from model.cliargs import comma_list
from model.config import ARCHS
from model.costs import resolved_token_dim
from model.errors import InputError
from model.files import read_json
from model.overrides import Overrides, for_arch
from model.presets import LEVELS, preset, preset_table
from model.stats import mean_ci, paired_difference

REFERENCE_ARCH = "dcnv2"
Log = Callable[[str], None]


# --- cells ----------------------------------------------------------------------------------------


def cell_name(arch: str, level: str, seed: int) -> str:
    return f"{arch}-{level}-s{seed}"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")
    tmp.replace(path)


def load_cells(out_dir: Path) -> list[dict[str, Any]]:
    """Every finished cell under ``OUT/cells``."""
    folder = Path(out_dir) / "cells"
    if not folder.is_dir():
        return []
    return [read_json(p, InputError) for p in sorted(folder.glob("*.json"))]


def train_cell(
    data: Any, cards: list[int], num_dense: int, arch: str, level: str, seed: int,
    train_kw: dict[str, Any], log: Log, overrides: Overrides | None = None,
) -> dict[str, Any]:
    """Train one (arch, level, seed) on prepared data; return its metrics (no test-based choice).

    ``overrides`` (a config file's, for this arch) change the preset's model settings and
    ``train_kw``."""
    import torch

    from model.ctr import build_model
    from model.flops import model_flops
    from model.train import TrainConfig, calibrate, evaluate, fit

    o = overrides or Overrides()
    cfg = preset(arch, level, cards, num_dense, **o.model)
    train_cfg = TrainConfig(seed=seed, progress=False, **{**train_kw, **o.train})
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(cfg, cards, num_dense)
    flops = model_flops(cfg, cards, num_dense)
    t0 = time.perf_counter()
    history = fit(model, data, train_cfg, log=lambda m: None, embedding_l2=cfg.embedding_l2)
    train_s = time.perf_counter() - t0
    calibrated = calibrate(model, data, train_cfg, log=lambda m: None)
    valid = evaluate(model, data.shards["valid"], train_cfg.eval_batch_size)
    test = evaluate(model, data.shards["test"], train_cfg.eval_batch_size)
    best_epoch = 1 + int(np.argmax([h["valid_auc"] for h in history]))
    log(f"{cell_name(arch, level, seed)}: test_auc {test['auc']:.4f} test_logloss "
        f"{test['logloss']:.4f} valid_auc {valid['auc']:.4f} ({len(history)} epochs, "
        f"best {best_epoch}, {train_s:.1f}s)")
    return {
        "arch": arch,
        "level": level,
        "seed": seed,
        "model": cfg.to_dict(),
        "flops_per_example": flops.total,
        "matmul_flops_per_example": flops.matmul,
        "params": flops.params,
        "dense_params": flops.dense_params,
        "valid": valid,
        "test": test,
        "calibration": calibrated,
        "epochs_run": len(history),
        "best_epoch": best_epoch,
        "train_s": train_s,
        "history": history,
    }


# --- report ---------------------------------------------------------------------------------------


def summarise(cells: list[dict[str, Any]], archs: Sequence[str], levels: Sequence[str]
              ) -> list[dict[str, Any]]:
    """One row per (level, arch) with finished cells: statistics and paired differences."""
    rows = []
    for level in levels:
        ref = {c["seed"]: c for c in cells if c["level"] == level and c["arch"] == REFERENCE_ARCH}
        for arch in archs:
            mine = {c["seed"]: c for c in cells if c["level"] == level and c["arch"] == arch}
            if not mine:
                continue
            seeds = sorted(mine)
            first = mine[seeds[0]]
            row: dict[str, Any] = {
                "level": level,
                "arch": arch,
                "seeds": seeds,
                "flops_per_example": first["flops_per_example"],
                "params": first["params"],
                "dense_params": first["dense_params"],
                "test_auc": mean_ci([mine[s]["test"]["auc"] for s in seeds]),
                "test_logloss": mean_ci([mine[s]["test"]["logloss"] for s in seeds]),
                **{f"test_{k}": mean_ci([mine[s]["test"][k] for s in seeds])
                   for k in ("pred_obs_ratio", "ece")
                   if all(k in mine[s]["test"] for s in seeds)},
                "valid_auc": mean_ci([mine[s]["valid"]["auc"] for s in seeds]),
                "train_s": mean_ci([mine[s]["train_s"] for s in seeds]),
                "epochs_run": mean_ci([mine[s]["epochs_run"] for s in seeds]),
                "vs_dcnv2": None,
            }
            if arch != REFERENCE_ARCH and ref:
                row["vs_dcnv2"] = {
                    "test_auc": paired_difference(
                        {s: mine[s]["test"]["auc"] for s in seeds},
                        {s: c["test"]["auc"] for s, c in ref.items()},
                    ),
                    "test_logloss": paired_difference(
                        {s: mine[s]["test"]["logloss"] for s in seeds},
                        {s: c["test"]["logloss"] for s, c in ref.items()},
                        higher_is_better=False,
                    ),
                }
            rows.append(row)
    return rows


def _pm(s: dict[str, Any], digits: int = 4) -> str:
    if not math.isfinite(s["half_width"]):
        return f"{s['mean']:.{digits}f}"
    return f"{s['mean']:.{digits}f} ± {s['half_width']:.{digits}f}"


def _diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return "–"
    if not math.isfinite(d["half_width"]):
        return f"{d['mean']:+.4f} (n={d['n']})"
    return f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def mldcn_summary(cells: list[dict[str, Any]], archs: Sequence[str], levels: Sequence[str]
                  ) -> list[dict[str, Any]]:
    """ML-DCN against every other architecture, paired by seed: ΔAUC, its CI and the verdict."""
    out = []
    for level in levels:
        mine = {c["seed"]: c["test"]["auc"] for c in cells
                if c["level"] == level and c["arch"] == "mldcn"}
        if not mine:
            continue
        for arch in archs:
            if arch == "mldcn":
                continue
            other = {c["seed"]: c["test"]["auc"] for c in cells
                     if c["level"] == level and c["arch"] == arch}
            d = paired_difference(mine, other)
            if d is not None:
                out.append({"level": level, "vs": arch, "test_auc": d})
    return out


def write_report(out_dir: Path, study: dict[str, Any], cells: list[dict[str, Any]]) -> dict:
    """Write report.json, report.md and auc_vs_flops.png from the finished cells."""
    archs, levels, seeds = study["archs"], study["levels"], study["seeds"]
    rows = summarise(cells, archs, levels)
    expected = [cell_name(a, lv, s) for lv in levels for s in seeds for a in archs]
    done = {cell_name(c["arch"], c["level"], c["seed"]) for c in cells}
    report = {
        "study": study,
        "mldcn_vs": mldcn_summary(cells, archs, levels),
        "cells_done": len([n for n in expected if n in done]),
        "cells_expected": len(expected),
        "cells_missing": [n for n in expected if n not in done],
        "rows": rows,
        "cells": [{k: v for k, v in c.items() if k != "history"} for c in cells],
    }
    _write_json(out_dir / "report.json", report)
    plot_auc_vs_flops(rows, out_dir / "auc_vs_flops.png", study.get("title", ""))
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def plot_auc_vs_flops(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Test AUC (mean, 95% CI bars) against FLOPs per example, one line per architecture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arch in dict.fromkeys(r["arch"] for r in rows):
        mine = sorted((r for r in rows if r["arch"] == arch), key=lambda r: r["flops_per_example"])
        x = [r["flops_per_example"] for r in mine]
        y = [r["test_auc"]["mean"] for r in mine]
        err = [r["test_auc"]["half_width"] if math.isfinite(r["test_auc"]["half_width"]) else 0
               for r in mine]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=arch)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per example (analytic, total)")
    ax.set_ylabel("test AUC (mean ± 95% CI)")
    ax.set_title(title or "AUC vs FLOPs at matched levels")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _split_stats(stats: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(k, v) for k, v in stats.items() if isinstance(v, dict) and "rows" in v]


def render_markdown(report: dict[str, Any]) -> str:
    study, rows = report["study"], report["rows"]
    data = study["data"]
    lines = [
        f"# {study.get('title') or 'Quality at matched FLOPs'}",
        "",
        "Produced by:",
        "",
        "```bash",
        study["command"],
        "```",
        "",
        f"Cells finished: {report['cells_done']} / {report['cells_expected']}"
        + ("" if not report["cells_missing"] else
           f" (missing: {', '.join(report['cells_missing'])}; re-run the command to resume)"),
        "",
        "## Data and protocol",
        "",
        f"- Data: {', '.join(f['path'] for f in data['files'])}"
        + (f"; test set: {', '.join(f['path'] for f in data['test_files'])}"
           if data.get("test_files") else ""),
        f"- Split: {study['split_description']}",
        "- Rows: " + ", ".join(f"{k} {v['rows']:,} ({v['positive_rate']:.1%} positive)"
                               for k, v in _split_stats(data["splits"])),
        f"- Layout: {len(data['cardinalities'])} categorical fields (cardinalities "
        f"{data['cardinalities']}), {data['num_dense']} dense",
        f"- Training (every cell): {study['train_description']}",
        f"- Seeds {study['seeds']}: the seed sets the initialisation and the shuffling; every "
        "cell of every architecture uses the same split and the same fitted encoders.",
        "- Hyper-parameters: the matched-FLOPs presets of `model/presets.py` (below), not tuned "
        "further. The number of epochs is chosen per cell by early stopping on **validation** "
        "AUC, and the best-on-validation weights are kept; test rows are scored once per cell, "
        "after training, and never used for any choice.",
        "- Statistics: mean ± half-width of the 95% confidence interval of the mean (t with n−1 "
        "degrees of freedom). Paired differences are arch − DCNv2 at the same seed; a "
        "difference whose interval covers 0 is a **tie**.",
        f"- Machine: {study.get('machine', '')}",
        "",
        "## Results",
        "",
        "| level | arch | MFLOPs/ex | params | n | test AUC | test logloss | pred/obs CTR | "
        "ECE | ΔAUC vs DCNv2 [95% CI] | AUC verdict | Δlogloss vs DCNv2 [95% CI] | train s | "
        "epochs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = r["vs_dcnv2"] or {}
        d_auc, d_ll = vs.get("test_auc"), vs.get("test_logloss")
        ratio, ece = r.get("test_pred_obs_ratio"), r.get("test_ece")
        lines.append(
            f"| {r['level']} | {r['arch']} | {r['flops_per_example'] / 1e6:.4f} | "
            f"{r['params']:,} | {len(r['seeds'])} | {_pm(r['test_auc'])} | "
            f"{_pm(r['test_logloss'])} | {_pm(ratio, 3) if ratio else '–'} | "
            f"{_pm(ece) if ece else '–'} | {_diff(d_auc)} | "
            f"{d_auc['verdict'] if d_auc else '–'} | {_diff(d_ll)} | "
            f"{r['train_s']['mean']:.1f} | {r['epochs_run']['mean']:.1f} |"
        )
    lines += [
        "", "![test AUC vs FLOPs](auc_vs_flops.png)", "", "## Where ML-DCN stands", "",
        "Test AUC of ML-DCN minus each other architecture at the same level and seed (95% CI); "
        "win / tie / loss by whether the interval lies above, covers or lies below 0.", "",
        "| level | vs | n | ΔAUC [95% CI] | verdict |", "|---|---|---|---|---|",
    ]
    for v in report["mldcn_vs"]:
        d = v["test_auc"]
        lines.append(f"| {v['level']} | {v['vs']} | {d['n']} | {_diff(d)} | {d['verdict']} |")
    by_verdict: dict[str, list[str]] = {}
    for v in report["mldcn_vs"]:
        by_verdict.setdefault(v["test_auc"]["verdict"], []).append(f"{v['vs']} ({v['level']})")
    if by_verdict:
        lines.append("")
        for name, label in (("win", "ML-DCN wins"), ("tie", "ties"), ("loss", "loses"),
                            ("n/a", "no interval yet (one seed)")):
            found = by_verdict.get(name, [])
            if name == "n/a" and not found:
                continue
            lines.append(f"- {label} ({len(found)}): {', '.join(found) or 'none'}")
    lines += [
        "",
        "## Presets (matched FLOPs per example)",
        "",
        "| level | arch | shared (e, L, structure, MLP, dropout) | key hyper-parameters | "
        "MFLOPs/ex | vs reference |",
        "|---|---|---|---|---|---|",
    ]
    for p in study["presets"]:
        lines.append(
            f"| {p['level']} | {p['arch']} | {p['shared']} | {p['key']} | "
            f"{p['total_flops'] / 1e6:.4f} | {p['mismatch']:+.2%} |"
        )
    lines.append("")
    return "\n".join(lines)


# --- two studies ----------------------------------------------------------------------------------


def _data_of(identity: dict[str, Any]) -> tuple[Any, ...]:
    """What pairing needs equal: the data files by content (SHA-256 and size, not the path they
    were read from) and the split."""
    def contents(files: Any) -> list[tuple[Any, Any]]:
        return [(f.get("sha256"), f.get("bytes")) for f in files or []]

    return (*(contents(identity.get(k)) for k in ("files", "test_files", "valid_files")),
            identity.get("split"))


def compare_studies(base_dir: str | Path, new_dir: str | Path) -> dict[str, Any]:
    """Study ``new`` against study ``base`` cell by cell: per (arch, level), the paired
    difference new − base of test AUC and logloss over the seeds both finished.

    Pairing by seed is sound because both studies must hold the same data files and split
    (checked: a ValueError otherwise); they differ in their recipe (model and training
    settings), which is what the difference measures.
    """
    studies = []
    for d in (base_dir, new_dir):
        path = Path(d) / "study.json"
        if not path.is_file():
            raise InputError(f"{d} holds no study (no study.json)")
        study = read_json(path, InputError)
        if not isinstance(study, dict) or not isinstance(study.get("identity"), dict):
            raise InputError(f"{path}: not a study (no identity)")
        studies.append(study)
    a, b = (s["identity"] for s in studies)
    if _data_of(a) != _data_of(b):
        raise InputError("the two studies do not share data and split; a paired comparison "
                         "needs both")
    base, new = (
        {(c["arch"], c["level"], c["seed"]): c for c in load_cells(Path(d))}
        for d in (base_dir, new_dir))
    rows = []
    pairs = sorted({k[:2] for k in base} & {k[:2] for k in new},
                   key=lambda k: (LEVELS.index(k[1]) if k[1] in LEVELS else 99, k[0]))
    for arch, level in pairs:
        row: dict[str, Any] = {"arch": arch, "level": level}
        for metric, higher in (("auc", True), ("logloss", False)):
            mine = {k[2]: c["test"][metric] for k, c in new.items() if k[:2] == (arch, level)}
            ref = {k[2]: c["test"][metric] for k, c in base.items() if k[:2] == (arch, level)}
            row[f"base_{metric}"] = mean_ci([ref[s] for s in sorted(ref)])
            row[f"new_{metric}"] = mean_ci([mine[s] for s in sorted(mine)])
            row[f"delta_{metric}"] = paired_difference(mine, ref, higher_is_better=higher)
        rows.append(row)
    return {"base": {"dir": str(base_dir), "command": studies[0]["command"],
                     "train": studies[0]["train_description"]},
            "new": {"dir": str(new_dir), "command": studies[1]["command"],
                    "train": studies[1]["train_description"]},
            "rows": rows}


def render_comparison(cmp: dict[str, Any], title: str = "") -> str:
    """:func:`compare_studies` as markdown."""
    lines = [f"# {title or 'Recipe comparison'}", "",
             f"- base: `{cmp['base']['dir']}`: {cmp['base']['train']}",
             f"- new: `{cmp['new']['dir']}`: {cmp['new']['train']}", "",
             "Paired by seed (same data, split and seeds); Δ = new − base, 95% CI (t, n−1); a "
             "win for AUC is an interval above 0, for logloss below 0.", "",
             "| level | arch | n | base AUC | new AUC | ΔAUC [95% CI] | verdict | base logloss "
             "| new logloss | Δlogloss [95% CI] | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in cmp["rows"]:
        da, dl = r["delta_auc"], r["delta_logloss"]
        lines.append(
            f"| {r['level']} | {r['arch']} | {da['n'] if da else 0} | {_pm(r['base_auc'])} | "
            f"{_pm(r['new_auc'])} | {_diff(da)} | {da['verdict'] if da else '–'} | "
            f"{_pm(r['base_logloss'])} | {_pm(r['new_logloss'])} | {_diff(dl)} | "
            f"{dl['verdict'] if dl else '–'} |")
    lines += ["", "Commands:", "", "```bash", cmp["base"]["command"], cmp["new"]["command"],
              "```", ""]
    return "\n".join(lines)


def compare_main(args: argparse.Namespace) -> dict[str, Any]:
    """``mldcn bench quality-diff``: write the comparison's JSON and markdown."""
    cmp = compare_studies(args.base, args.new)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out.with_suffix(".json"), cmp)
    out.with_suffix(".md").write_text(render_comparison(cmp, args.title))
    for r in cmp["rows"]:
        d = r["delta_auc"]
        if d:
            print(f"{r['level']:<7} {r['arch']:<10} ΔAUC {_diff(d)} {d['verdict']}")
    print(f"wrote {out.with_suffix('.md')}")
    return cmp


# --- study ----------------------------------------------------------------------------------------


def preset_rows(cards: list[int], num_dense: int, archs: Sequence[str], levels: Sequence[str],
                overrides: Sequence[Overrides] = ()) -> list[dict[str, Any]]:
    """:func:`~model.presets.preset_table`'s rows as the report shows them (with each arch's
    ``overrides`` applied): shared and key hyper-parameters as text (RankMixer's token width
    resolved), FLOPs, params, mismatch."""
    from model.flops import model_flops

    rows = []
    reference = {lv: model_flops(preset(REFERENCE_ARCH, lv, cards, num_dense,
                                        **for_arch(overrides, REFERENCE_ARCH).model),
                                 cards, num_dense).total for lv in levels}
    for r in preset_table(cards, num_dense, levels=levels, archs=archs):
        o = for_arch(overrides, r["arch"])
        cfg = preset(r["arch"], r["level"], cards, num_dense, **o.model)
        key = dict(r["key"]) if not o.model else {k: getattr(cfg, k) for k in r["key"]}
        if r["arch"] == "rankmixer":
            key["token_dim"] = resolved_token_dim(cfg, len(cards), num_dense)
        cost = model_flops(cfg, cards, num_dense)
        rows.append({
            "level": r["level"],
            "arch": r["arch"],
            "shared": f"e={cfg.embed_dim}, L={cfg.num_layers}, {cfg.structure}, "
                      f"MLP {'-'.join(map(str, cfg.mlp_dims)) or 'none'}, "
                      f"dropout {cfg.dropout}, BN {'on' if cfg.batch_norm else 'off'}, "
                      f"emb L2 {cfg.embedding_l2:g}",
            "key": ", ".join(f"{k}={v}" for k, v in key.items()),
            "total_flops": cost.total, "params": cost.params,
            "mismatch": cost.total / reference[r["level"]] - 1,
        })
    return rows


def run_study(
    source: Any,
    split: Any,
    out_dir: str | Path,
    archs: Sequence[str],
    levels: Sequence[str],
    seeds: Sequence[int],
    train_kw: dict[str, Any],
    command: str,
    test_source: Any = None,
    title: str = "",
    threads: int | None = None,
    log: Log = lambda m: print(m, file=sys.stderr, flush=True),
    valid_source: Any = None,
    overrides: Sequence[Overrides] = (),
) -> dict[str, Any]:
    """Run (or resume) the study and write the report; returns the report dict.

    Args:
        source: a ``DataSource``; split into train/valid/test by ``split`` (with
            ``valid_source`` / ``test_source``, pre-split files, those rows come from there
            instead: :func:`model.dataset.prepare_sources`).
        split: a ``SplitSpec``, the same for every cell.
        out_dir: the study folder (cells, report, plot).
        archs, levels, seeds: the grid.
        train_kw: ``TrainConfig`` fields other than seed (epochs, batch_size, lr, patience…).
        command: the command line recorded in the report.
        overrides: config files (``--config``): each arch's model and training overrides.
    """
    import shutil

    import torch

    from model.dataset import prepare_sources

    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise InputError(f"unknown architectures {bad}; choose from {ARCHS}")
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise InputError(f"unknown levels {bad}; choose from {LEVELS}")
    if REFERENCE_ARCH not in archs:
        raise InputError("the study needs dcnv2 in --archs (the paired reference)")
    if not seeds:
        raise InputError("the study needs at least one seed")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "the report's plot needs matplotlib: pip install 'mldcn[bench]'"
        ) from None
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)

    from model.files import file_info

    files = file_info(source.paths)
    test_files = file_info(test_source.paths) if test_source is not None else []
    valid_files = file_info(valid_source.paths) if valid_source is not None else []
    recipes = {a: for_arch(overrides, a) for a in archs}
    identity: dict[str, Any] = {"files": files, "test_files": test_files, "split": asdict(split),
                                "train": train_kw}
    if valid_files:
        identity["valid_files"] = valid_files
    if any(o.model or o.train for o in recipes.values()):  # absent in a study without any
        identity["overrides"] = {a: {"model": o.model, "train": o.train}
                                 for a, o in recipes.items()}
    study_path = out / "study.json"
    if study_path.exists():
        old = read_json(study_path, InputError)
        if not isinstance(old, dict) or old.get("identity") != json.loads(json.dumps(identity)):
            raise InputError(
                f"{out} holds a study with other data or training settings ({study_path}); "
                "use another --out or delete it"
            )

    cache = out / ".prepared"
    t0 = time.perf_counter()
    data = prepare_sources(source, split, cache, valid_source, test_source)
    sizes = ", ".join(f"{k} {v['rows']:,}" for k, v in _split_stats(data.stats))
    log(f"data: {sizes} rows ({time.perf_counter() - t0:.1f}s)")
    cards, num_dense = data.encoders.cardinalities, data.encoders.num_dense
    split_desc = (f"random by hash of (seed {split.seed}, row), valid {split.valid_frac:.0%}, "
                  f"test {split.test_frac:.0%}" if split.kind == "random" else
                  f"by time column `{split.time_column}`: earliest "
                  f"{1 - split.valid_frac - split.test_frac:.0%} train, next "
                  f"{split.valid_frac:.0%} valid, latest {split.test_frac:.0%} test")
    for name, extra in (("validation", valid_source), ("test", test_source)):
        if extra is not None:
            split_desc += (f"; {name} rows: the separate {name} file(s), encoded with the "
                           "train encoders")
    study = {
        "title": title,
        "command": command,
        "identity": identity,
        "archs": list(archs),
        "levels": list(levels),
        "seeds": list(seeds),
        "data": {"files": files, "test_files": test_files, "splits": data.stats,
                 "cardinalities": cards, "num_dense": num_dense},
        "split_description": split_desc,
        "train_description": train_description(train_kw, recipes),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} torch thread(s)",
        "presets": preset_rows(cards, num_dense, archs, levels, overrides),
    }
    _write_json(study_path, study)
    try:
        for level in levels:
            for seed in seeds:
                for arch in archs:
                    path = out / "cells" / f"{cell_name(arch, level, seed)}.json"
                    if path.exists():
                        continue
                    cell = train_cell(data, cards, num_dense, arch, level, seed, train_kw, log,
                                      recipes[arch])
                    _write_json(path, cell)
                    write_report(out, study, load_cells(out))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return write_report(out, study, load_cells(out))


def train_description(train_kw: dict[str, Any], recipes: dict[str, Overrides]) -> str:
    """The training recipe as the report states it (each arch's training overrides named)."""
    from model.train import TrainConfig

    t = TrainConfig(**train_kw)
    text = (f"Adam lr {t.lr}, batch {t.batch_size}, early stop after {t.early_stop_patience} "
            f"epochs without validation-AUC gain (at most {t.epochs} epochs), lr ×{t.lr_factor} "
            f"after {t.lr_patience + 1} epoch(s) without gain, gradient clip "
            f"{t.grad_clip_norm:g}, BCE loss (+ the embedding regulariser where the model "
            f"settings set one), calibration {t.calibrate}")
    tuned = {a: o.train for a, o in recipes.items() if o.train}
    if tuned:
        text += "; overridden per arch (--config): " + "; ".join(
            f"{a}: " + ", ".join(f"{k} {v}" for k, v in kw.items()) for a, kw in tuned.items())
    return text


class _Head:
    """A DataSource limited to its first ``rows`` rows."""

    def __init__(self, source: Any, rows: int) -> None:
        self.source, self.rows = source, rows
        self.schema, self.paths, self.fmt = source.schema, source.paths, source.fmt

    def iter_chunks(self, chunk_rows: int = 65536):
        left = self.rows
        for chunk in self.source.iter_chunks(chunk_rows):
            n = len(next(iter(chunk.values())))
            if n >= left:
                yield {k: v[:left] for k, v in chunk.items()}
                return
            left -= n
            yield chunk


def command_line(args: argparse.Namespace) -> str:
    """The ``mldcn bench quality`` command that reproduces ``args`` (every option spelled out)."""
    words = ["mldcn", "bench", "quality", "--data", *args.data]
    if args.valid_data:
        words += ["--valid-data", *args.valid_data]
    if args.test_data:
        words += ["--test-data", *args.test_data]
    if args.format != "auto":
        words += ["--format", args.format]
    if args.schema:
        words += ["--schema", args.schema]
    words += ["--split", args.split]
    if args.time_column:
        words += ["--time-column", args.time_column]
    if not args.valid_data:
        words += ["--valid-frac", str(args.valid_frac)]
    if not args.test_data:
        words += ["--test-frac", str(args.test_frac)]
    if args.split == "random":
        words += ["--split-seed", str(args.split_seed)]
    words += ["--archs", args.archs, "--levels", args.levels, "--seeds", str(args.seeds),
              "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
              "--lr", str(args.lr), "--patience", str(args.patience),
              "--lr-patience", str(args.lr_patience)]
    if args.calibrate != "none":
        words += ["--calibrate", args.calibrate]
    for path in args.config:
        words += ["--config", path]
    if args.max_rows:
        words += ["--max-rows", str(args.max_rows)]
    words += ["--threads", str(args.threads)]
    if args.title:
        words += ["--title", args.title]
    words += ["--out", args.out]
    return shlex.join(words)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """``mldcn bench quality``: run or resume the study, print where the report is."""
    from model.readers import open_source
    from model.split import SplitSpec

    for path in [*args.data, *(args.valid_data or []), *(args.test_data or [])]:
        if not Path(path).exists():
            raise InputError(f"data file not found: {path}")
    source = open_source(args.data, fmt=args.format, schema=args.schema)
    valid_source, test_source = (
        open_source(paths, fmt=args.format, schema=source.schema) if paths else None
        for paths in (args.valid_data, args.test_data))
    if args.max_rows:
        source = _Head(source, args.max_rows)
        valid_source, test_source = (None if s is None else _Head(s, args.max_rows)
                                     for s in (valid_source, test_source))
    valid_frac = 0.0 if valid_source is not None else args.valid_frac
    test_frac = 0.0 if test_source is not None else args.test_frac
    time_column = args.time_column or source.schema.time_column
    split = SplitSpec(kind=args.split, valid_frac=valid_frac, test_frac=test_frac,
                      seed=args.split_seed,
                      time_column=time_column if args.split == "time" else None)
    train_kw = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                "early_stop_patience": args.patience, "lr_patience": args.lr_patience,
                "calibrate": args.calibrate}
    overrides = [Overrides.load(path) for path in args.config]
    report = run_study(
        source, split, args.out, comma_list(args.archs), comma_list(args.levels),
        list(range(args.seeds)),
        train_kw, command=command_line(args), test_source=test_source, title=args.title,
        threads=args.threads, valid_source=valid_source, overrides=overrides,
    )
    print(f"{report['cells_done']}/{report['cells_expected']} cells; report: "
          f"{Path(args.out) / 'report.md'}")
    return report

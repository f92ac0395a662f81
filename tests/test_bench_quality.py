"""`mldcn bench quality`: the report's statistics on fixed numbers, and a tiny end-to-end study
that must resume without re-training anything."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model.bench.quality import mldcn_summary, summarise
from model.cli import main
from model.stats import mean_ci, paired_difference, t_quantile, verdict

# --- statistics on a fixed example -------------------------------------------------------------


@pytest.mark.parametrize(
    ("df", "expected"),
    [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)],  # t tables, 0.975
)
def test_t_quantile_matches_tables(df: int, expected: float) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_mean_ci_by_hand() -> None:
    # x = 0.70, 0.72, 0.71, 0.74, 0.73: mean 0.72, deviations -2,0,-1,2,1 (×0.01), sum of
    # squares 10e-4, s² = 10e-4 / 4 = 2.5e-4, s = 0.0158114, s/√5 = 0.00707107,
    # half-width = t(0.975, 4) · 0.00707107 = 2.776445 · 0.00707107 = 0.0196324
    s = mean_ci([0.70, 0.72, 0.71, 0.74, 0.73])
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(0.72, abs=1e-12)
    assert s["std"] == pytest.approx(0.0158114, abs=1e-7)
    assert s["half_width"] == pytest.approx(0.0196324, abs=1e-6)
    assert (s["low"], s["high"]) == pytest.approx((0.72 - 0.0196324, 0.72 + 0.0196324), abs=1e-6)


def test_mean_ci_of_one_value_has_no_interval() -> None:
    s = mean_ci([0.5])
    assert s["mean"] == 0.5 and math.isnan(s["half_width"])
    assert verdict(s) == "n/a"
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_by_hand() -> None:
    # differences (seed 0..2) = +0.002, +0.004, +0.003 → mean 0.003, s = 0.001,
    # half-width = t(0.975, 2) · 0.001/√3 = 4.302653 · 0.000577350 = 0.00248414: a win.
    # Seed 3 has no reference run and is left out.
    arch = {0: 0.802, 1: 0.814, 2: 0.823, 3: 0.9}
    ref = {0: 0.800, 1: 0.810, 2: 0.820}
    d = paired_difference(arch, ref)
    assert d is not None and d["seeds"] == [0, 1, 2]
    assert d["mean"] == pytest.approx(0.003, abs=1e-12)
    assert d["half_width"] == pytest.approx(0.00248414, abs=1e-7)
    assert d["verdict"] == "win"
    assert paired_difference(ref, arch)["verdict"] == "loss"
    # logloss: lower is better, so a positive difference is a loss
    assert paired_difference(arch, ref, higher_is_better=False)["verdict"] == "loss"
    # an interval that covers 0 is a tie
    assert paired_difference({0: 0.81, 1: 0.80}, {0: 0.80, 1: 0.81})["verdict"] == "tie"
    assert paired_difference({5: 0.8}, ref) is None


def _cell(arch: str, seed: int, auc: float, logloss: float) -> dict:
    return {"arch": arch, "level": "small", "seed": seed, "flops_per_example": 1000,
            "params": 10, "dense_params": 5, "test": {"auc": auc, "logloss": logloss},
            "valid": {"auc": auc, "logloss": logloss}, "train_s": 1.0, "epochs_run": 3}


def test_summary_rows_and_mldcn_verdicts() -> None:
    cells = [_cell("dcnv2", s, a, 0.5) for s, a in enumerate([0.800, 0.810, 0.820])]
    cells += [_cell("mldcn", s, a, 0.49) for s, a in enumerate([0.802, 0.814, 0.823])]
    cells += [_cell("masknet", s, a, 0.5) for s, a in enumerate([0.803, 0.815, 0.824])]
    rows = summarise(cells, ["mldcn", "dcnv2", "masknet"], ["small"])
    assert [r["arch"] for r in rows] == ["mldcn", "dcnv2", "masknet"]
    mldcn = rows[0]
    assert mldcn["test_auc"]["mean"] == pytest.approx(np.mean([0.802, 0.814, 0.823]))
    assert mldcn["vs_dcnv2"]["test_auc"]["mean"] == pytest.approx(0.003)
    assert mldcn["vs_dcnv2"]["test_logloss"]["verdict"] == "win"  # lower logloss every seed
    assert rows[1]["vs_dcnv2"] is None
    vs = {v["vs"]: v["test_auc"] for v in mldcn_summary(cells, ["mldcn", "dcnv2", "masknet"],
                                                         ["small"])}
    assert vs["dcnv2"]["verdict"] == "win"
    assert vs["masknet"]["mean"] == pytest.approx(-0.001) and vs["masknet"]["verdict"] == "loss"


# --- a tiny real study ---------------------------------------------------------------------------


@pytest.fixture()
def tiny_data(tmp_path: Path) -> tuple[Path, Path]:
    """2,000 rows, 3 categorical fields and 1 dense feature with a planted cross, and a schema."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    n = 2000
    a, b, c = rng.integers(0, 8, n), rng.integers(0, 6, n), rng.integers(0, 5, n)
    x = rng.normal(size=n)
    logit = 1.5 * ((a % 2) == (b % 2)) - 0.75 + 0.5 * x
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    data = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"a": a, "b": b, "c": c, "x": x, "y": y}), data)
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({
        "label": "y",
        "fields": [{"name": k, "type": "categorical", "side": "candidate", "encoding": "vocab"}
                   for k in "abc"] + [{"name": "x", "type": "numeric", "side": "candidate"}],
    }))
    return data, schema


def test_tiny_study_writes_the_report_and_resumes(tiny_data, tmp_path, capsys) -> None:
    data, schema = tiny_data
    out = tmp_path / "study"
    args = ["bench", "quality", "--data", str(data), "--schema", str(schema), "--archs",
            "mldcn,dcnv2", "--levels", "small", "--seeds", "2", "--epochs", "1",
            "--batch-size", "256", "--out", str(out)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("test_auc") == 4  # one line per trained cell

    report = json.loads((out / "report.json").read_text())
    assert report["cells_done"] == report["cells_expected"] == 4
    assert report["cells_missing"] == []
    assert report["study"]["command"].startswith("mldcn bench quality --data ")
    rows = {r["arch"]: r for r in report["rows"]}
    assert set(rows) == {"mldcn", "dcnv2"}
    for r in rows.values():
        assert r["level"] == "small" and r["seeds"] == [0, 1]
        assert 0.5 < r["test_auc"]["mean"] <= 1.0 and r["test_auc"]["n"] == 2
        assert r["test_logloss"]["mean"] > 0 and math.isfinite(r["test_auc"]["half_width"])
        assert r["flops_per_example"] > 0 and r["params"] > 0 and r["train_s"]["mean"] > 0
    vs = rows["mldcn"]["vs_dcnv2"]["test_auc"]
    cells = {(c["arch"], c["seed"]): c for c in report["cells"]}
    diffs = [cells["mldcn", s]["test"]["auc"] - cells["dcnv2", s]["test"]["auc"] for s in (0, 1)]
    assert vs["mean"] == pytest.approx(np.mean(diffs))
    assert vs["verdict"] in ("win", "tie", "loss")
    assert (out / "auc_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "Where ML-DCN stands" in md and "validation" in md and report["study"]["command"] in md

    # Resume: nothing is re-trained, the cells are untouched, the report is rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(args) == 0
    assert "test_auc" not in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == stamps

    # A third seed trains only the two new cells.
    more = list(args)
    more[more.index("--seeds") + 1] = "3"
    assert main(more) == 0
    assert capsys.readouterr().err.count("test_auc") == 2
    assert json.loads((out / "report.json").read_text())["cells_done"] == 6


def test_resuming_with_other_settings_is_refused(tiny_data, tmp_path, capsys) -> None:
    data, schema = tiny_data
    out = tmp_path / "study"
    base = ["bench", "quality", "--data", str(data), "--schema", str(schema), "--archs",
            "dcnv2", "--levels", "small", "--seeds", "1", "--epochs", "1", "--out", str(out)]
    assert main(base) == 0
    assert main([*base, "--lr", "0.01"]) == 2
    assert "other data or training settings" in capsys.readouterr().err


def test_study_needs_the_dcnv2_reference(tiny_data, tmp_path, capsys) -> None:
    data, schema = tiny_data
    assert main(["bench", "quality", "--data", str(data), "--schema", str(schema), "--archs",
                 "mldcn", "--out", str(tmp_path / "s")]) == 2
    assert "dcnv2" in capsys.readouterr().err


def test_studies_pair_on_the_same_data_read_from_another_path() -> None:
    """Pairing compares the data by content and the split, not the path it was read from."""
    from model.bench.quality import _data_of

    def identity(path: str, sha: str) -> dict:
        return {"files": [{"path": path, "sha256": sha, "bytes": 10}],
                "test_files": [], "split": {"kind": "random", "seed": 0}}

    assert _data_of(identity("../shared/a.parquet", "ab")) == _data_of(
        identity("/work/shared/a.parquet", "ab"))
    assert _data_of(identity("a.parquet", "ab")) != _data_of(identity("a.parquet", "cd"))
    other_split = {**identity("a.parquet", "ab"), "split": {"kind": "time", "seed": 0}}
    assert _data_of(other_split) != _data_of(identity("a.parquet", "ab"))

"""`mldcn train` end to end on every supported real format, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.cli import main

QUICK = ["--epochs", "1", "--batch-size", "256", "--no-progress", "--threads", "1"]


def _train(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "run"
    assert main(["train", *args, *QUICK, "--out", str(out)]) == 0
    for name in ("checkpoint.pt", "model_config.json", "encoders.json", "train_config.json",
                 "metrics.json"):
        assert (out / name).is_file(), name
    return json.loads((out / "metrics.json").read_text())


FORMATS = [
    ("criteo_sample/criteo_kaggle_raw_1k.tsv", "criteo-tsv", None),
    ("criteo_sample/criteo_sample.csv", "criteo-csv", None),
    ("avazu_sample/avazu_sample.csv", "avazu", None),
]
ATTRIBUTION = ("criteo_attribution/small_train.parquet", "parquet", "criteo_attribution")
# Every architecture on every small sample; the 115k-row set with two, to keep CI short.
CASES = [(*f, arch) for f in FORMATS for arch in ("mldcn", "dcnv2", "masknet", "mlp")]
CASES += [(*ATTRIBUTION, arch) for arch in ("mldcn", "dcnv2")]


@pytest.mark.parametrize(("rel", "fmt", "schema", "arch"), CASES)
def test_train_on_real_formats(tmp_path, shared_data, rel, fmt, schema, arch) -> None:
    args = ["--data", str(shared_data / rel), "--arch", arch]
    if schema:
        import model

        args += ["--schema", str(Path(model.__file__).parent / "schemas" / f"{schema}.json")]
    m = _train(tmp_path, *args)
    assert m["data"]["format"] == fmt
    assert m["data"]["files"][0]["sha256"]
    assert m["flops_per_example"] > 0 and m["params"] > 0
    assert m["test"]["rows"] > 0
    if schema == "criteo_attribution":
        assert m["test"]["auc"] > 0.6  # a real signal on 115k real rows


def test_train_synthetic_writes_metrics(tmp_path) -> None:
    m = _train(tmp_path, "--data", "synthetic", "--synthetic-rows", "3000", "--arch", "mldcn")
    assert 0.5 < m["bayes_auc"] < 1.0
    assert m["valid"]["auc"] == m["valid"]["auc"]  # not NaN


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLDCN_DEBUG"}
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_error_wrong_path(tmp_path) -> None:
    _one_line_error(_run_cli("train", "--data", "nope/missing.tsv", cwd=tmp_path),
                    "missing.tsv")


def test_error_unknown_arch(tmp_path) -> None:
    _one_line_error(_run_cli("train", "--arch", "transformer", cwd=tmp_path), "transformer",
                    "mldcn")


def test_error_malformed_row(tmp_path, shared_data) -> None:
    lines = (shared_data / "criteo_sample/criteo_kaggle_raw_1k.tsv").read_text().splitlines()
    lines[10] = "\t".join(lines[10].split("\t")[:20])  # a truncated row
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join(lines) + "\n")
    _one_line_error(_run_cli("train", "--data", str(bad), "--format", "criteo-tsv",
                             *QUICK, cwd=tmp_path), "bad.tsv")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_error_schema_mismatch(tmp_path, shared_data) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"label": "click", "fields": [
        {"name": "cat1", "type": "categorical"}, {"name": "no_such_col", "type": "numeric"}]}))
    data = shared_data / "criteo_attribution/small_valid.parquet"
    _one_line_error(_run_cli("train", "--data", str(data), "--schema", str(schema), *QUICK,
                             cwd=tmp_path), "no_such_col")


def test_error_bad_schema_file(tmp_path, shared_data) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"fields": [{"name": "x", "type": "wordy"}]}))
    data = shared_data / "criteo_attribution/small_valid.parquet"
    _one_line_error(_run_cli("train", "--data", str(data), "--schema", str(schema),
                             cwd=tmp_path), "wordy")


def test_error_generic_csv_without_schema(tmp_path) -> None:
    f = tmp_path / "x.csv"
    f.write_text("a,b,label\n1,2,0\n")
    _one_line_error(_run_cli("train", "--data", str(f), cwd=tmp_path), "schema")


@pytest.mark.parametrize(("args", "words"), [
    (["--lr", "1000"], ("training diverged", "--lr")),
    (["--arch", "rankmixer", "--set", "token_dim=30"], ("token_dim", "multiple")),
])
def test_error_settings_found_only_in_training(tmp_path, args, words) -> None:
    """Bad settings that show only once the model is built or trained are input errors too:
    one line, exit 2 (a plain ValueError would be a bug with a traceback)."""
    proc = _run_cli("train", "--synthetic-rows", "500", *args, *QUICK, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the run's progress log
    assert last.startswith("mldcn: error: ") and all(w in last for w in words), last

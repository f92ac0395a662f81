"""MovieLens-100K from the recbole wheel: the joined file, its schema, and `mldcn train` on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.cli import main
from model.movielens import MovieLensError, age_bucket, build_movielens, fetch_wheel, schema_dict


def test_age_buckets() -> None:
    assert [age_bucket(a) for a in (1, 17, 18, 34, 35, 44, 45, 55, 56, 90)] == [
        "<18", "<18", "18-24", "25-34", "35-44", "35-44", "45-49", "50-55", "56+", "56+"]


@pytest.fixture(scope="module")
def movielens(tmp_path_factory) -> dict:
    """Build once per module; the wheel is cached under .cache/mldcn (or $MLDCN_CACHE)."""
    try:
        wheel = fetch_wheel()
    except MovieLensError as e:
        pytest.skip(f"cannot fetch the recbole==1.2.1 wheel with pip (no PyPI access?): {e}")
    return build_movielens(tmp_path_factory.mktemp("ml100k"), wheel=wheel)


def test_built_file_is_movielens_100k_as_ctr(movielens: dict) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    table = pq.read_table(movielens["data"])
    assert movielens["rows"] == table.num_rows == 100_000
    assert (movielens["users"], movielens["items"]) == (943, 1682)
    assert movielens["positive_rate"] == pytest.approx(0.55375)  # ratings 4 and 5
    names = [f["name"] for f in schema_dict()["fields"]]
    assert table.column_names == ["label", "timestamp", *names]
    times = table.column("timestamp").to_numpy()
    assert (np.diff(times) >= 0).all()  # ordered by time
    first = table.slice(0, 1).to_pylist()[0]
    assert first["user_id"] == "259" and first["age"] == "18-24" and first["gender"] == "M"
    assert set(table.column("age").to_pylist()) <= {"<18", "18-24", "25-34", "35-44", "45-49",
                                                    "50-55", "56+"}
    schema = json.loads(Path(movielens["schema"]).read_text())
    assert schema["label"] == "label" and schema["time_column"] == "timestamp"


def test_train_with_a_time_split(movielens: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["train", "--data", movielens["data"], "--schema", movielens["schema"],
                 "--split", "time", "--arch", "wukong", "--epochs", "1", "--batch-size", "4096",
                 "--no-progress", "--threads", "1", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    splits = metrics["data"]["splits"]
    assert splits["train"]["rows"] + splits["valid"]["rows"] + splits["test"]["rows"] == 100_000
    assert splits["time_cutoffs"]["valid"] <= splits["time_cutoffs"]["test"]
    assert metrics["test"]["auc"] > 0.6  # users and movies carry signal after one epoch


def test_cli_reports_a_failed_download(tmp_path: Path, monkeypatch, capsys) -> None:
    """No wheel in the cache and pip pointed at a dead index: one-line error, exit status 2."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "1")
    code = main(["data", "movielens", str(tmp_path / "out"), "--cache", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mldcn: error: pip download recbole==1.2.1 failed")

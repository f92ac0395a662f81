"""Encoding into shards and batching: every row exactly once, shards bounded."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from model.dataset import iter_batches, prepare
from model.schema import FeatureSchema, FieldSpec
from model.split import SplitSpec


class ArraySource:
    """A tiny in-memory stand-in for model.readers.DataSource (same two members)."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.schema = FeatureSchema(
            fields=(
                FieldSpec("a", "categorical"),
                FieldSpec("x", "numeric", transform="none", clip=(-1e9, 1e9)),
            ),
            label="y", time_column="t",
        )
        self.cols = {
            "a": np.array([f"v{k}" for k in rng.integers(0, 5, n)], dtype=object),
            "x": np.arange(n, dtype=np.float64),  # row id, to trace rows through the pipeline
            "y": (rng.random(n) < 0.4).astype(np.float32),
            "t": rng.integers(0, 50, n),
        }
        self.n = n

    def iter_chunks(self, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, self.n, chunk_rows):
            yield {k: v[s : s + chunk_rows] for k, v in self.cols.items()}


def _row_ids(data, split: str) -> np.ndarray:
    enc = data.encoders.numeric[0]
    ids = [d[:, 0] * enc.std + enc.mean for _, d, _ in iter_batches(data.shards[split], 64)]
    return np.rint(np.concatenate(ids)).astype(int) if ids else np.empty(0, int)


def test_prepare_random_split_covers_every_row_once(tmp_path) -> None:
    src = ArraySource(5000)
    data = prepare(src, SplitSpec(seed=1), tmp_path / "c", chunk_rows=333, shard_rows=700)
    assert sum(data.rows(s) for s in ("train", "valid", "test")) == 5000
    assert all(s.rows <= 700 for shards in data.shards.values() for s in shards)
    ids = np.concatenate([_row_ids(data, s) for s in ("train", "valid", "test")])
    assert sorted(ids.tolist()) == list(range(5000))
    # the chunk size does not change the split
    again = prepare(src, SplitSpec(seed=1), tmp_path / "d", chunk_rows=4096, shard_rows=700)
    np.testing.assert_array_equal(np.sort(_row_ids(data, "test")),
                                  np.sort(_row_ids(again, "test")))


def test_encoders_fit_on_train_rows_only(tmp_path) -> None:
    src = ArraySource(2000)
    data = prepare(src, SplitSpec(seed=2, valid_frac=0.3, test_frac=0.3), tmp_path / "c")
    train_ids = _row_ids(data, "train")
    assert data.encoders.numeric[0].mean == np.float64(train_ids.mean()).item() or abs(
        data.encoders.numeric[0].mean - train_ids.mean()) < 1e-6


def test_prepare_time_split(tmp_path) -> None:
    src = ArraySource(3000)
    spec = SplitSpec(kind="time", valid_frac=0.2, test_frac=0.2, time_column="t")
    data = prepare(src, spec, tmp_path / "c", chunk_rows=500)
    t = src.cols["t"]
    train_t = t[_row_ids(data, "train")]
    test_t = t[_row_ids(data, "test")]
    assert train_t.max() < test_t.min()
    assert "time_cutoffs" in data.stats


def test_shuffled_batches_are_a_permutation(tmp_path) -> None:
    data = prepare(ArraySource(3000), SplitSpec(seed=0), tmp_path / "c", shard_rows=500)
    rng = np.random.default_rng(0)
    enc = data.encoders.numeric[0]
    seen = np.concatenate([np.rint(d[:, 0] * enc.std + enc.mean) for _, d, _ in
                           iter_batches(data.shards["train"], 128, True, rng)])
    plain = _row_ids(data, "train")
    assert sorted(seen.astype(int).tolist()) == sorted(plain.tolist())
    assert not np.array_equal(seen.astype(int), plain)

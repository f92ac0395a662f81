"""Synthetic click logs: determinism, file round trips, and the Bayes-optimal AUC."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.metrics import roc_auc
from model.readers import detect_format, open_source
from model.synthetic import SyntheticSpec, SyntheticWorld, write_synthetic

SMALL = SyntheticSpec(num_cat=5, num_numeric=2, max_cardinality=50, cat_missing_rate=0.05)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld.from_spec(SyntheticSpec())


def assert_same_columns(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        if a[k].dtype == object:
            assert a[k].tolist() == b[k].tolist(), k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sample_layout_matches_schema(world: SyntheticWorld) -> None:
    schema = world.schema()
    cols, p = world.sample(500, seed=1)
    assert set(cols) == {*schema.names, schema.label}
    assert {f.side for f in schema.fields} == {"user", "context", "candidate"}
    assert len(schema.categorical) == 10 and len(schema.numeric) == 3
    for f in schema.categorical:
        assert cols[f.name].dtype == object
        assert all(type(v) is str for v in cols[f.name])
    for f in schema.numeric:
        assert cols[f.name].dtype == np.float64
    assert np.isnan(cols[schema.numeric[0].name]).any()  # some numerics are missing
    assert cols["label"].dtype == np.float32 and set(cols["label"].tolist()) <= {0.0, 1.0}
    assert p.shape == (500,) and ((p > 0) & (p < 1)).all()
    assert len(world.pairs) == 4 and len(world.triples) == 1


def test_same_seeds_same_data_different_seeds_different_data() -> None:
    a_cols, a_p = SyntheticWorld.from_spec(SMALL).sample(2000, seed=3)
    b_cols, b_p = SyntheticWorld.from_spec(SMALL).sample(2000, seed=3)
    assert_same_columns(a_cols, b_cols)
    np.testing.assert_array_equal(a_p, b_p)

    c_cols, c_p = SyntheticWorld.from_spec(SMALL).sample(2000, seed=4)
    assert not np.array_equal(a_p, c_p)
    assert a_cols["user_cat0"].tolist() != c_cols["user_cat0"].tolist()

    other_world = SyntheticSpec(**{**SMALL.__dict__, "world_seed": 1})
    d_cols, d_p = SyntheticWorld.from_spec(other_world).sample(2000, seed=3)
    assert not np.array_equal(a_p, d_p)


def test_sample_prefix_is_stable(world: SyntheticWorld) -> None:
    """Rows come in fixed blocks: a longer sample starts with the shorter one."""
    short, p_short = world.sample(100, seed=7)
    long, p_long = world.sample(20_000, seed=7)
    assert_same_columns(short, {k: v[:100] for k, v in long.items()})
    np.testing.assert_array_equal(p_short, p_long[:100])
    chunked = list(world.iter_sample(20_000, seed=7, chunk_rows=3000))
    assert [len(p) for _, p in chunked] == [3000] * 6 + [2000]
    np.testing.assert_array_equal(np.concatenate([p for _, p in chunked]), p_long)


def test_missing_categoricals_are_none() -> None:
    cols, _ = SyntheticWorld.from_spec(SMALL).sample(4000, seed=0)
    share = np.mean([v is None for v in cols["user_cat0"]])
    assert 0.02 < share < 0.09


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_written_file_round_trips_through_open_source(tmp_path: Path, fmt: str) -> None:
    rows, seed = 2500, 11
    path = write_synthetic(
        tmp_path, rows, spec=SMALL, seed=seed, fmt=fmt, chunk_rows=700, bayes_rows=20_000
    )
    assert path == tmp_path / f"data.{fmt}"
    assert detect_format(path) == fmt
    source = open_source([path], schema=tmp_path / "schema.json")
    chunks = list(source.iter_chunks(1000))
    got = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    expected, _ = SyntheticWorld.from_spec(SMALL).sample(rows, seed=seed)
    assert_same_columns(got, expected)

    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["rows"] == rows and meta["seed"] == seed and meta["format"] == fmt
    assert meta["spec"]["num_cat"] == 5 and meta["spec"]["world_seed"] == 0
    assert meta["base_rate"] == pytest.approx(float(expected["label"].mean()))
    assert 0.5 < meta["bayes_auc"] < 1.0
    assert len(meta["planted"]["pairs"]) == SMALL.num_pairs


def test_default_world_bayes_auc_and_base_rate(world: SyntheticWorld) -> None:
    a = world.bayes_auc(n=1_000_000, seed=0)
    b = world.bayes_auc(n=1_000_000, seed=1)
    assert abs(a - b) < 0.005
    assert 0.75 < a < 0.85
    cols, p = world.sample(200_000, seed=2)
    assert 0.2 < p.mean() < 0.3
    assert cols["label"].mean() == pytest.approx(p.mean(), abs=0.01)
    # The true probability scored against drawn labels reaches the Bayes AUC.
    assert roc_auc(cols["label"], p) == pytest.approx(a, abs=0.01)


def test_planted_interactions_carry_signal(world: SyntheticWorld) -> None:
    """Without the 2nd/3rd-order terms the best score falls well short of the Bayes AUC."""
    rng = np.random.default_rng(0)
    ids, num = world._draw_features(rng, 100_000)
    components = world._scale[:, None] * world._components(ids, num)  # (4, n)
    p = world.probability(ids, num)
    additive = components[0] + components[3]
    assert roc_auc(p, p) - roc_auc(p, additive) > 0.08


def test_spec_validation() -> None:
    with pytest.raises(ValueError, match="num_pairs"):
        SyntheticSpec(num_cat=3, num_pairs=4)
    with pytest.raises(ValueError, match="cardinalities"):
        SyntheticSpec(num_cat=2, cardinalities=(5,))
    with pytest.raises(ValueError, match="base_rate"):
        SyntheticSpec(base_rate=1.5)
    with pytest.raises(ValueError, match="fmt"):
        write_synthetic(".", 10, fmt="json")

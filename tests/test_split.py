"""Deterministic splits: by seed and by time."""

from __future__ import annotations

import numpy as np
import pytest

from model.split import TEST, TRAIN, VALID, SplitSpec, assign_random, fit_time_cutoffs


def test_random_split_fractions_and_determinism() -> None:
    spec = SplitSpec(valid_frac=0.1, test_frac=0.2, seed=3)
    a = assign_random(spec, 0, 200_000)
    assert np.mean(a == VALID) == pytest.approx(0.1, abs=0.005)
    assert np.mean(a == TEST) == pytest.approx(0.2, abs=0.005)
    assert np.mean(a == TRAIN) == pytest.approx(0.7, abs=0.005)
    chunks = np.concatenate([assign_random(spec, o, 1000) for o in range(0, 200_000, 1000)])
    np.testing.assert_array_equal(a, chunks)
    b = assign_random(SplitSpec(valid_frac=0.1, test_frac=0.2, seed=4), 0, 200_000)
    assert (a != b).mean() > 0.3


def test_time_split_orders_by_time_and_keeps_timestamps_whole() -> None:
    rng = np.random.default_rng(0)
    times = rng.integers(0, 100, 50_000)
    spec = SplitSpec(kind="time", valid_frac=0.2, test_frac=0.2, time_column="t")
    cut = fit_time_cutoffs(spec, np.array_split(times, 7))
    which = cut.assign(times)
    assert times[which == TRAIN].max() < times[which == VALID].min()
    assert times[which == VALID].max() < times[which == TEST].min()
    assert np.mean(which == TEST) == pytest.approx(0.2, abs=0.03)


def test_time_split_reservoir_is_bounded() -> None:
    spec = SplitSpec(kind="time", valid_frac=0.1, test_frac=0.1, time_column="t")
    from model.split import TimeCutoffs

    cut = TimeCutoffs(spec, reservoir_size=1000)
    for k in range(50):
        cut.update(np.arange(k * 1000, (k + 1) * 1000))
    cut.finish()
    assert cut.sample.size == 1000
    assert cut.test_start == pytest.approx(45_000, rel=0.05)


@pytest.mark.parametrize(
    "kw",
    [{"kind": "odd"}, {"valid_frac": 1.2}, {"valid_frac": 0.6, "test_frac": 0.5},
     {"kind": "time"}],
)
def test_bad_split_specs(kw) -> None:
    with pytest.raises(ValueError):
        SplitSpec(**kw)


def test_time_split_with_one_timestamp_is_refused() -> None:
    spec = SplitSpec(kind="time", valid_frac=0.1, test_frac=0.1, time_column="hour")
    with pytest.raises(ValueError, match="too few distinct times"):
        fit_time_cutoffs(spec, [np.full(100, 14102100)])

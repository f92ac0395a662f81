"""roc_auc and log_loss against brute-force definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.metrics import log_loss, roc_auc


def brute_force_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    """Sum over all ordered pairs (i, j) of pos_i * neg_j * ([s_i > s_j] + [s_i == s_j] / 2)."""
    pos = weights * labels
    neg = weights * (1.0 - labels)
    wins = 0.0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] > scores[j]:
                wins += pos[i] * neg[j]
            elif scores[i] == scores[j]:
                wins += 0.5 * pos[i] * neg[j]
    return wins / (pos.sum() * neg.sum())


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_matches_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 60
    labels = (rng.random(n) < 0.4).astype(np.float64)
    labels[:2] = [0.0, 1.0]  # both classes present
    scores = rng.integers(0, 8, n).astype(np.float64)  # many ties
    expected = brute_force_auc(labels, scores, np.ones(n))
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(labels.astype(np.float32), scores.astype(np.float32)) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(6))
def test_weighted_and_soft_label_auc_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 50
    soft = rng.random(n)
    scores = np.round(rng.normal(size=n), 1)
    weights = rng.random(n) * 3
    assert roc_auc(soft, scores, weights) == pytest.approx(
        brute_force_auc(soft, scores, weights), abs=1e-12
    )
    hard = (soft > 0.5).astype(np.float64)
    assert roc_auc(hard, scores, weights) == pytest.approx(
        brute_force_auc(hard, scores, weights), abs=1e-12
    )


def test_roc_auc_known_values() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # Integer weights equal repeating rows.
    assert roc_auc([0, 1, 1], [0.3, 0.1, 0.7], weights=[2, 1, 1]) == pytest.approx(
        roc_auc([0, 0, 1, 1], [0.3, 0.3, 0.1, 0.7])
    )


def test_roc_auc_single_class_is_nan() -> None:
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(roc_auc([0, 1], [0.1, 0.2], weights=[1, 0]))


@pytest.mark.parametrize(
    ("labels", "scores", "weights", "message"),
    [
        ([0, 1], [0.1], None, "same length"),
        ([0, 1], [0.1, float("nan")], None, "finite"),
        ([0, 2], [0.1, 0.2], None, r"\[0, 1\]"),
        ([0, 1], [0.1, 0.2], [1, -1], "non-negative"),
        ([[0, 1]], [[0.1, 0.2]], None, "one-dimensional"),
    ],
)
def test_roc_auc_rejects_bad_input(
    labels: list, scores: list, weights: list | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        roc_auc(labels, scores, weights)


def test_roc_auc_large_input_is_fast_and_correct() -> None:
    rng = np.random.default_rng(0)
    n = 200_000
    scores = rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-2 * scores))).astype(float)
    auc = roc_auc(labels, scores)
    # Monotone transforms do not change the AUC; reversing the order flips it.
    assert roc_auc(labels, np.exp(scores)) == pytest.approx(auc, abs=1e-12)
    assert roc_auc(labels, -scores) == pytest.approx(1 - auc, abs=1e-12)
    assert 0.8 < auc < 0.9


def test_log_loss_known_value() -> None:
    expected = -(math.log(0.8) + math.log(0.7)) / 2
    assert log_loss([1, 0], [0.8, 0.3]) == pytest.approx(expected, rel=1e-12)
    assert log_loss([1, 0, 1], [0.5, 0.5, 0.5]) == pytest.approx(math.log(2))
    # Weighted: weight 2 on the first row equals repeating it.
    assert log_loss([1, 0], [0.8, 0.3], weights=[2, 1]) == pytest.approx(
        log_loss([1, 1, 0], [0.8, 0.8, 0.3])
    )


def test_log_loss_clips_extreme_probabilities() -> None:
    assert log_loss([0, 1], [0.0, 1.0]) == pytest.approx(0.0, abs=1e-12)
    assert log_loss([1], [0.0]) == pytest.approx(-math.log(1e-15))
    assert math.isfinite(log_loss([1], np.array([0.0], dtype=np.float32)))


def test_log_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        log_loss([0, 1], [0.5])
    with pytest.raises(ValueError, match="empty"):
        log_loss([], [])

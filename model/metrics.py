"""Ranking and calibration metrics for click models (numpy only).

Ranking: ROC AUC. Calibration (ads bidding multiplies pCTR by a value, so the probabilities
themselves matter): log loss, the ratio of mean predicted to observed CTR (:func:`calibration`)
and the expected calibration error over equal-mass bins (:func:`expected_calibration_error`).

``roc_auc`` accepts soft labels and row weights, so the same O(n log n) routine gives the usual
AUC of 0/1 labels and the Bayes-optimal AUC of a synthetic world, where each row counts as a
positive with weight ``p`` and a negative with weight ``1 - p`` (``roc_auc(p, p)``).

Example:
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 1], [0.5, 0.5])  # a tie counts one half
    0.5
    >>> round(log_loss([1, 0], [0.8, 0.3]), 6)
    0.289909
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from model.checks import check_sizes

__all__ = ["calibration", "expected_calibration_error", "log_loss", "roc_auc"]

ArrayLike = npt.ArrayLike


def _as_1d(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


def _labels_and_probs(labels: ArrayLike, probs: ArrayLike,
                      what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64 1-d arrays of one non-zero length, labels in [0, 1]."""
    y = _as_1d("labels", labels)
    p = _as_1d("probs", probs)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs must have the same length, got {y.size} and {p.size}")
    if y.size == 0:
        raise ValueError(f"{what} of an empty array is undefined")
    if y.min() < 0.0 or y.max() > 1.0:
        raise ValueError("labels must lie in [0, 1]")
    return y, p


def roc_auc(labels: ArrayLike, scores: ArrayLike, weights: ArrayLike | None = None) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counted 1/2.

    Args:
        labels: shape (n,), values in [0, 1]. A row with label ``y`` and weight ``w`` counts as a
            positive of weight ``w * y`` and a negative of weight ``w * (1 - y)``; 0/1 labels give
            the ordinary AUC, probabilities give the expected AUC over label noise.
        scores: shape (n,), any finite real scores; only their order matters.
        weights: shape (n,), non-negative row weights; default all ones.

    Returns:
        The AUC in [0, 1], or NaN when the positive or the negative weight is zero (the AUC is
        undefined with a single class).

    Cost: one sort, O(n log n) time and O(n) memory.
    """
    y = _as_1d("labels", labels)
    s = _as_1d("scores", scores)
    if y.shape != s.shape:
        raise ValueError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size and (y.min() < 0.0 or y.max() > 1.0):
        raise ValueError("labels must lie in [0, 1]")
    if weights is None:
        pos, neg = y, 1.0 - y
    else:
        w = _as_1d("weights", weights)
        if w.shape != y.shape:
            raise ValueError(f"weights must have length {y.size}, got {w.size}")
        if w.size and w.min() < 0.0:
            raise ValueError("weights must be non-negative")
        pos, neg = w * y, w * (1.0 - y)
    total_pos, total_neg = float(pos.sum()), float(neg.sum())
    if total_pos <= 0.0 or total_neg <= 0.0:
        return float("nan")

    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    # Start index of each group of tied scores, in ascending score order.
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    pos_g = np.add.reduceat(pos[order], starts)
    neg_g = np.add.reduceat(neg[order], starts)
    neg_below = np.cumsum(neg_g) - neg_g  # negative weight strictly below each group
    wins = float(np.dot(pos_g, neg_below + 0.5 * neg_g))
    return min(max(wins / (total_pos * total_neg), 0.0), 1.0)


def log_loss(
    labels: ArrayLike, probs: ArrayLike, weights: ArrayLike | None = None, eps: float = 1e-15
) -> float:
    """Mean binary cross-entropy ``-[y log p + (1 - y) log(1 - p)]`` in nats.

    Args:
        labels: shape (n,), values in [0, 1] (soft labels allowed).
        probs: shape (n,), predicted click probabilities; clipped to [eps, 1 - eps].
        weights: shape (n,), non-negative row weights; default all ones.
        eps: clipping bound that keeps the loss finite for p = 0 or 1.
    """
    y, p = _labels_and_probs(labels, probs, "log_loss")
    p = np.clip(p, eps, 1.0 - eps)
    losses = -(y * np.log(p) + (1.0 - y) * np.log1p(-p))
    if weights is None:
        return float(losses.mean())
    w = _as_1d("weights", weights)
    if w.shape != y.shape:
        raise ValueError(f"weights must have length {y.size}, got {w.size}")
    if w.min() < 0.0 or w.sum() <= 0.0:
        raise ValueError("weights must be non-negative with a positive sum")
    return float(np.dot(w, losses) / w.sum())


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, bins: int = 15) -> float:
    """Σ_b (n_b / n) · |mean p − mean y| over ``bins`` equal-mass bins of the predictions.

    The rows are sorted by predicted probability and cut into ``bins`` groups of (nearly) equal
    size, ties kept together. Equal-width bins (Guo et al.'s ECE) put almost every row of a
    click log (CTR of a few percent) into the first bin, where the ECE degenerates into
    |mean p − mean y|; equal-mass bins keep it a measure of calibration across the whole range
    of scores. 0 is perfect calibration.

    Example (two bins of two rows: |0.2 − 0| and |0.7 − 1|, each with weight 1/2):
        >>> round(expected_calibration_error([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8], bins=2), 6)
        0.25
    """
    y, p = _labels_and_probs(labels, probs, "the calibration error")
    check_sizes(bins=bins)
    order = np.argsort(p, kind="stable")
    p, y = p[order], y[order]
    # cut points at equal ranks, moved back to the start of a run of equal scores (ties share
    # a bin)
    cuts = np.unique(np.searchsorted(p, p[(np.arange(1, bins) * p.size) // bins], "left"))
    edges = np.r_[0, cuts[(cuts > 0) & (cuts < p.size)], p.size]
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        if hi > lo:
            total += (hi - lo) * abs(float(p[lo:hi].mean()) - float(y[lo:hi].mean()))
    return float(total / p.size)


def calibration(labels: ArrayLike, probs: ArrayLike, bins: int = 15) -> dict[str, float]:
    """Log loss, mean predicted and observed CTR, their ratio and the ECE of the predictions.

    ``pred_obs_ratio`` = mean p / mean y (1 is calibrated on average, > 1 over-predicts; NaN when
    no row is positive); ``ece``: :func:`expected_calibration_error` with ``bins`` bins.

    Example:
        >>> c = calibration([0, 0, 1, 1], [0.1, 0.3, 0.6, 0.8], bins=2)
        >>> c["mean_pred"], c["mean_obs"], c["pred_obs_ratio"], round(c["ece"], 6)
        (0.45, 0.5, 0.9, 0.25)
    """
    y = _as_1d("labels", labels)
    p = _as_1d("probs", probs)
    mean_p, mean_y = float(p.mean()), float(y.mean())
    return {
        "logloss": log_loss(y, p),
        "mean_pred": mean_p,
        "mean_obs": mean_y,
        "pred_obs_ratio": mean_p / mean_y if mean_y > 0 else float("nan"),
        "ece": expected_calibration_error(y, p, bins),
    }

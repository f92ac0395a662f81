"""Ranking and calibration metrics for click models: ROC AUC and log loss (numpy only).

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

__all__ = ["log_loss", "roc_auc"]

ArrayLike = npt.ArrayLike


def _as_1d(name: str, values: ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    return arr


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
    y = _as_1d("labels", labels)
    p = _as_1d("probs", probs)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs must have the same length, got {y.size} and {p.size}")
    if y.size == 0:
        raise ValueError("log_loss of an empty array is undefined")
    if y.min() < 0.0 or y.max() > 1.0:
        raise ValueError("labels must lie in [0, 1]")
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

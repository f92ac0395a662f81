"""Post-hoc temperature scaling: one number T fitted on validation logits (numpy only).

p = σ(z / T) with T > 0 chosen to minimise the validation log loss. Dividing the logits by T
keeps their order (AUC unchanged) and moves the probabilities: T > 1 softens an overconfident
model, T < 1 sharpens an underconfident one. The loss is convex in a = 1/T (a logistic
regression with one coefficient and no intercept), so Newton's method from a = 1 with a
halving line search finds the minimum in a few steps.

Example:
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(0, 2, 20000)                      # the true logits
    >>> y = (rng.random(20000) < 1 / (1 + np.exp(-z))).astype(np.float64)
    >>> round(fit_temperature(3 * z, y), 1)              # a model 3x too confident
    3.0
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MIN_TEMPERATURE, MAX_TEMPERATURE = 0.01, 100.0


def _loss(a: float, z: np.ndarray, y: np.ndarray) -> float:
    """Mean BCE of σ(a·z) against y (stable: log(1 + e^t) − y·t)."""
    t = a * z
    return float(np.mean(np.logaddexp(0.0, t) - y * t))


def fit_temperature(logits: npt.ArrayLike, labels: npt.ArrayLike, max_steps: int = 50) -> float:
    """The temperature T that minimises the log loss of σ(logits / T) against ``labels``.

    Args:
        logits: shape (n,), the model's logits on held-out (validation) rows.
        labels: shape (n,), 0/1 (or soft) labels.
        max_steps: Newton steps at most.

    Returns:
        T in [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1.0 when the rows cannot determine it (no
        rows, a single class, or all logits 0).
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.float64).ravel()
    if z.shape != y.shape:
        raise ValueError(f"logits and labels must have the same length, got {z.size} and {y.size}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite")
    if z.size == 0 or not 0 < y.sum() < y.size or not np.any(z):
        return 1.0
    lo, hi = 1.0 / MAX_TEMPERATURE, 1.0 / MIN_TEMPERATURE
    a, f = 1.0, _loss(1.0, z, y)
    for _ in range(max_steps):
        p = 1.0 / (1.0 + np.exp(-a * z))
        grad = float(np.mean((p - y) * z))
        hess = float(np.mean(p * (1.0 - p) * z * z))
        if hess <= 0 or abs(grad) < 1e-12:
            break
        step = grad / hess
        while True:  # halve the step until the loss does not increase
            nxt = min(max(a - step, lo), hi)
            f_nxt = _loss(nxt, z, y)
            if f_nxt <= f + 1e-15 or abs(step) < 1e-12:
                break
            step /= 2
        if abs(nxt - a) < 1e-10:
            a = nxt
            break
        a, f = nxt, f_nxt
    return float(1.0 / a)

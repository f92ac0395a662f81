"""Statistics of results over seeds: t-intervals of a mean and paired differences with a verdict
(``mldcn bench quality``, ``mldcn tune --confirm-seeds``). scipy provides the t quantile."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from model.checks import check_sizes


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom (p in (0.5, 1)), by scipy.

    Example:
        >>> round(t_quantile(0.975, 4), 4), round(t_quantile(0.975, 1), 3)
        (2.7764, 12.706)
    """
    from scipy.stats import t

    if not 0.5 < p < 1.0:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    check_sizes(df=df)
    return float(t.ppf(p, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and the t confidence interval of the mean.

    With one value the interval is undefined (``half_width`` NaN).

    Example:
        >>> s = mean_ci([0.80, 0.81, 0.82])
        >>> round(s["mean"], 6), round(s["std"], 6), round(s["half_width"], 5)
        (0.81, 0.01, 0.02484)
    """
    x = np.asarray(list(values), dtype=np.float64)
    n = int(x.size)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if n == 1:
        std, half = float("nan"), float("nan")
    else:
        std = float(x.std(ddof=1))
        half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half_width": half, "low": mean - half,
            "high": mean + half}


def verdict(stats: dict[str, Any], higher_is_better: bool = True) -> str:
    """"win", "loss" or "tie" from a difference's interval ("n/a" without an interval)."""
    low, high = stats["low"], stats["high"]
    if not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    if low > 0:
        return "win" if higher_is_better else "loss"
    if high < 0:
        return "loss" if higher_is_better else "win"
    return "tie"


def paired_difference(
    values: dict[int, float], reference: dict[int, float], higher_is_better: bool = True
) -> dict[str, Any] | None:
    """values[seed] − reference[seed] over the seeds both have: mean, CI and verdict.

    Example:
        >>> ref = {0: 0.80, 1: 0.81, 2: 0.81, 3: 0.9}
        >>> d = paired_difference({0: 0.81, 1: 0.822, 2: 0.821}, ref)
        >>> d["seeds"], round(d["mean"], 6), d["verdict"]
        ([0, 1, 2], 0.011, 'win')
        >>> paired_difference({0: 0.81, 1: 0.83, 2: 0.82}, ref)["verdict"]  # CI covers 0
        'tie'
    """
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    stats = mean_ci([values[s] - reference[s] for s in seeds])
    return {"seeds": seeds, **stats, "verdict": verdict(stats, higher_is_better)}

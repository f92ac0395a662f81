"""The latency budget: deadlines, and the online latency model that admission control asks.

A request's deadline is its arrival (the first moment the app sees it) plus its budget: the
server's SLO (``default_timeout_ms``), or less when the request asks for less through the
``timeout_ms`` field or the ``X-Request-Timeout-Ms`` header; never more.

:class:`LatencyModel` predicts the time of one ONNX Runtime batch from its rows as
``fixed_s + per_row_s · rows``, fitted by least squares on the most recent batches (seeded by the
warmup runs, which cover several batch sizes so that the slope is known from the start).
Admission control (:meth:`service.batcher.Batcher.predict_s`) uses it for the work queued ahead
of a request, the batch still running, and the request itself.

Example:
    >>> lm = LatencyModel(window=16)
    >>> for rows, s in [(1, 0.0011), (64, 0.0017), (512, 0.0062), (2048, 0.0215)]:
    ...     lm.seed(rows, s)
    >>> round(lm.predict(1024) * 1e3, 1)
    11.3
    >>> budget_s(50.0, requested_ms=(20.0, None))
    0.02
    >>> budget_s(50.0, requested_ms=(500.0, 80.0))
    0.05
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable


def budget_s(server_ms: float, requested_ms: Iterable[float | None] = ()) -> float:
    """The budget in seconds: the smallest of the server's SLO and what the request asks."""
    asked = [float(v) for v in requested_ms if v is not None]
    return min([server_ms, *asked]) / 1e3


def retry_after_s(predicted_wait_s: float) -> int:
    """The Retry-After header value: whole seconds, at least 1."""
    return max(1, math.ceil(predicted_wait_s))


class LatencyModel:
    """seconds ≈ fixed_s + per_row_s · rows, least squares over the recent observations.

    Args:
        window: how many recent observations the fit uses.

    The seed points (warmup) always take part in the fit, so the slope stays defined while
    traffic has one batch size only; online points outnumber them as traffic flows.
    """

    def __init__(self, window: int = 256) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2, got {window}")
        self._seed: list[tuple[int, float]] = []
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # n, Σrows, Σs, Σrows², Σrows·s of all points
        self._updates = 0
        self.fixed_s = 0.0
        self.per_row_s = 0.0
        self._stale = True
        self._since_fit = 0

    @property
    def observations(self) -> int:
        """Seed plus recent points."""
        return len(self._seed) + len(self._recent)

    def _add(self, rows: float, seconds: float, sign: float = 1.0) -> None:
        s = self._sums
        s[0] += sign
        s[1] += sign * rows
        s[2] += sign * seconds
        s[3] += sign * rows * rows
        s[4] += sign * rows * seconds

    def seed(self, rows: int, seconds: float) -> None:
        """A warmup measurement (kept for good)."""
        self._seed.append((int(rows), float(seconds)))
        self._add(rows, seconds)
        self._stale = True

    def observe(self, rows: int, seconds: float) -> None:
        """A measured batch; the fit (running sums: O(1)) is refreshed every few."""
        if len(self._recent) == self._recent.maxlen:
            self._add(*self._recent[0], sign=-1.0)
        self._recent.append((int(rows), float(seconds)))
        self._add(rows, seconds)
        self._updates += 1
        if self._updates % 4096 == 0:  # recompute the sums now and then: no rounding drift
            self._sums = [0.0] * 5
            for r, sec in (*self._seed, *self._recent):
                self._add(r, sec)
        self._since_fit += 1
        if self._since_fit >= 8:
            self._stale = True

    def copy(self) -> LatencyModel:
        """An independent model with the same points (the copy learns on its own)."""
        twin = LatencyModel(self._recent.maxlen or 2)
        twin._seed, twin._recent = list(self._seed), deque(self._recent, self._recent.maxlen)
        twin._sums, twin._updates = list(self._sums), self._updates
        return twin

    def _fit(self) -> None:
        self._stale, self._since_fit = False, 0
        n, sx, sy, sxx, sxy = self._sums
        if n < 0.5:
            return
        mx, my = sx / n, sy / n
        vxx = sxx - n * mx * mx
        vxy = sxy - n * mx * my
        slope = vxy / vxx if vxx > 1e-9 * max(sxx, 1.0) else (my / mx if mx > 0 else 0.0)
        slope = max(slope, 0.0)
        fixed = my - slope * mx
        if fixed < 0:  # keep the line through the mean, with a non-negative intercept
            fixed, slope = 0.0, my / mx if mx > 0 else 0.0
        self.fixed_s, self.per_row_s = fixed, slope

    def predict(self, rows: int) -> float:
        """Predicted seconds for one batch of ``rows`` rows."""
        if self._stale:
            self._fit()
        return self.fixed_s + self.per_row_s * rows

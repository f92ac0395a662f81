"""Admission control: one decision function, asked at every stage of a request.

:meth:`Admission.decide` answers "can ``rows`` rows of this model be scored before the
deadline?" with a :class:`Decision` (the model that will score them, maybe the fallback) or a
503 :class:`~service.errors.ServiceError` (``queue_full``, ``predicted_deadline_miss``). The
scoring path asks it twice, with what it knows at the time:

1. on arrival, before the body is read (:meth:`decide_at_arrival`): on the model that would
   score it soonest, for as many rows as its Content-Length must hold at least (the body's
   bytes over the most bytes per candidate seen in the last :data:`BODY_WINDOW` requests; 1
   before any), so that under overload a request that nothing could serve costs no parsing;
   one in :data:`PROBE_EVERY` of the bodies refused only for that estimate (one row would
   have been admitted) is read anyway, so that a client whose bodies hold more bytes per
   candidate than any seen so far is learnt instead of being refused for good;
2. once the body is parsed (model, rows, the body's own timeout): the real decision, whose
   prediction the request carries to the end (:meth:`observe`).

The prediction (:meth:`predict_s`) starts from the *work ahead*: the request's encoding (a
per-row model fitted on the requests encoded so far) plus the batcher's prediction (the batch
still running, the rows queued ahead, its own rows: :meth:`service.batcher.Batcher.predict_s`).
What a request really waits is a little more: the event loop's hops to the batcher and back
and the answer (a fixed cost), and the cores it shares with the front end (a share of the
time). So admission fits ``actual ≈ overhead + slope × work ahead`` by least squares over the
last ``latency_window`` requests scored in time within :data:`MEMORY_S` (:func:`fit_line`),
and adds a *margin* for how wrong a prediction can be: the ``admission_quantile`` (default
0.99) of the fitted line's errors (actual − fitted) among the requests of the last
:data:`MARGIN_MEMORY_S` (at most :data:`MARGIN_WINDOW`) that were decided under the same load,
i.e. with about as many scoring requests in flight as now (octaves 1, 2–3, 4–7, …:
:func:`load_band`; when this band has fewer than :data:`MIN_OBSERVATIONS` errors, the nearest
quieter band's, else none, as before anything was learnt). What makes a prediction wrong on
one core is mostly the front end's work for the other requests in flight (their parsing,
encoding and answers share the core with ONNX Runtime), so errors learnt under heavy load apply
to heavy load, and an idle server does not refuse the next small request for them. The margin's
memory is longer than the line's because the rare large errors come together: one stall of the
machine (tens of milliseconds) delays every request in flight at once. In a window of a few
hundred requests that one event would be the 99th percentile as long as it stayed in the
window, and the margin would refuse requests that would have made it (the benchmark's oracle
counts them); over 10 s it weighs about as much as such stalls really happen.

A request that misses its deadline anyway (its true time is unknown: it was dropped at the
deadline) raises a *penalty* on the fitted time by :data:`MISS_PENALTY` (at most
:data:`MAX_PENALTY`; the misses of one stall, within :data:`MISS_BURST_S` of each other, count
once), which decays back to 1 with a half-life of :data:`PENALTY_HALF_LIFE_S`: after a sudden
jump in load (or a lasting slowdown) the next requests are admitted with care, and without new
misses the caution fades within a second, whether or not anything was admitted meanwhile.
``admission_safety_factor`` multiplies the whole. Everything starts neutral (overhead 0, slope
1, no margin, penalty 1); line and margins are refitted every :data:`REFIT_EVERY` requests and
at least every :data:`REFIT_S`. A request admitted this way misses its deadline only when
reality is slower than nearly all recent predictions, and a request is refused only when it
would very likely miss.

Example:
    >>> quantile([0.001, 0.002, 0.003, 0.010], 0.5)
    0.0025
    >>> fit_line([1.0, 2.0, 3.0], [1.5, 2.6, 3.7])
    (0.4, 1.1)
    >>> [load_band(n) for n in (1, 2, 3, 4, 7, 8, 1000)]
    [0, 1, 1, 2, 2, 3, 7]
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from service.budget import retry_after_s
from service.errors import ServiceError

if TYPE_CHECKING:
    from service.models import ServedModel
    from service.registry import ModelRegistry
    from service.settings import Settings

log = logging.getLogger("uvicorn.error")

MIN_OBSERVATIONS = 16
MIN_SLOPE, MAX_SLOPE = 0.5, 5.0
REFIT_EVERY = 64  # observations between two refits (the first once MIN_OBSERVATIONS came)
REFIT_S = 0.25  # ... and at most this long between two, so that old observations age out
MEMORY_S = 2.0  # the fitted line's memory (at most latency_window observations)
MARGIN_MEMORY_S = 10.0  # the margins' memory (at most MARGIN_WINDOW observations)
MARGIN_WINDOW = 4096
BANDS = 8  # load bands: 1, 2-3, 4-7, ..., 128+ requests in flight
MISS_PENALTY, MAX_PENALTY = 1.25, 5.0
PENALTY_HALF_LIFE_S = 0.25
MISS_BURST_S = 0.05  # misses this close together (one stall of the machine) raise it once
BODY_WINDOW = 64  # recent requests whose bytes per candidate bound the rows of a new one
PROBE_EVERY = 16  # of the bodies refused on arrival for their size, one is read anyway


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation); 0 when there are none."""
    xs = sorted(values)
    if not xs:
        return 0.0
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def load_band(in_flight: int) -> int:
    """The load band of a decision made with ``in_flight`` scoring requests in flight
    (octaves: 1, 2-3, 4-7, ..., the last one open)."""
    return min(max(int(in_flight), 1).bit_length() - 1, BANDS - 1)


def fit_line(work: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray
             ) -> tuple[float, float]:
    """(overhead, slope) of ``actual ≈ overhead + slope × work`` by least squares, with a
    non-negative overhead and a slope within [MIN_SLOPE, MAX_SLOPE] (through the origin when
    the line would cross below it; the median difference when ``work`` does not vary)."""
    w, a = np.asarray(work, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    mw, ma = float(w.mean()), float(a.mean())
    sww = float(((w - mw) ** 2).sum())
    if sww <= 1e-12 * max(mw * mw, 1e-12):
        return max(0.0, float(np.median(a - w))), 1.0
    slope = float(((w - mw) * (a - ma)).sum()) / sww
    slope = min(max(slope, MIN_SLOPE), MAX_SLOPE)
    overhead = ma - slope * mw
    if overhead < 0:
        overhead, slope = 0.0, min(max(ma / mw, MIN_SLOPE), MAX_SLOPE) if mw > 0 else 1.0
    return round(overhead, 12), round(slope, 12)


@dataclass(frozen=True, slots=True)
class Decision:
    """An admitted request: who scores it, and what admission expected."""

    model: ServedModel  # the model that will score it (the fallback when degraded)
    degraded: bool
    predicted_s: float  # seconds from ``decided_s`` until scored, margin included
    work_s: float  # the work ahead it was predicted from (Admission.work_s)
    decided_s: float
    budget_s: float  # seconds left at the decision
    band: int = 0  # the load band it was decided in (load_band)


@dataclass(frozen=True, slots=True)
class Learnt:
    """What admission learnt of one model: its fitted line and a margin per load band."""

    overhead_s: float = 0.0
    slope: float = 1.0
    margins_s: tuple[float, ...] = (0.0,) * BANDS

    def predict(self, work_s: float, band: int = 0, penalty: float = 1.0) -> float:
        """Fitted seconds for ``work_s`` seconds of work ahead decided in load band
        ``band``, penalty and margin included."""
        return (self.overhead_s + self.slope * work_s) * penalty + self.margins_s[band]


NEUTRAL = Learnt()


class Admission:
    """Predicts when a request would be scored and decides whether it can make its deadline.

    Args:
        settings: the service settings (``fallback_model``, the margin's quantile, window
            and safety factor).
        registry: the models serving, with their batchers, encoding-cost models and serving
            configs (queue size, timeout action).
        in_flight: the number of scoring requests in flight now (the load of a decision).
        clock: ``time.monotonic`` (tests pass their own).
    """

    def __init__(self, settings: Settings, registry: ModelRegistry,
                 in_flight: Callable[[], int] = lambda: 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.registry = registry
        self.in_flight = in_flight
        self.clock = clock
        self._window = settings.latency_window
        # (finished at, work ahead, actual, load band) of admitted requests per model, for
        # MARGIN_MEMORY_S (the line uses those of the last MEMORY_S)
        self._seen: dict[str, deque[tuple[float, float, float, int]]] = {}
        self._learnt: dict[str, Learnt] = {}
        self._since_fit: dict[str, int] = {}
        self._fitted_at: dict[str, float] = {}
        self._penalty: dict[str, tuple[float, float]] = {}  # (penalty, when it was last set)
        self._bytes_per_row: dict[str, deque[float]] = {}  # by route
        self._most_bytes_per_row: dict[str, float] = {}
        self._size_refusals: dict[str, int] = {}

    # -- prediction ----------------------------------------------------------------------------
    def work_s(self, model: ServedModel, rows: int, now_s: float) -> float:
        """Seconds of work ahead of ``rows`` new rows of ``model``: their encoding and what
        the batcher predicts (the running batch, the queue, their own batches)."""
        served = self.registry.get(model.name)
        return served.encode_cost.predict(rows) + served.batcher.predict_s(rows, now_s)

    def learnt(self, name: str) -> Learnt:
        """The fitted line and margin of ``name`` (see the module docstring)."""
        return self._learnt.get(name, NEUTRAL)

    def predict_s(self, model: ServedModel, rows: int, now_s: float | None = None) -> float:
        """Predicted seconds from now until ``rows`` rows of ``model`` are scored, margin and
        safety factor included."""
        now_s = self.clock() if now_s is None else now_s
        band = load_band(self.in_flight())
        return self._predicted(model.name, self.work_s(model, rows, now_s), band, now_s)

    def penalty(self, name: str, now_s: float | None = None) -> float:
        """The miss penalty of ``name`` now (see the module docstring)."""
        value, since = self._penalty.get(name, (1.0, 0.0))
        if value == 1.0:
            return 1.0
        now_s = self.clock() if now_s is None else now_s
        return 1.0 + (value - 1.0) * 0.5 ** (max(0.0, now_s - since) / PENALTY_HALF_LIFE_S)

    def _predicted(self, name: str, work_s: float, band: int, now_s: float | None = None
                   ) -> float:
        return (self.learnt(name).predict(work_s, band, self.penalty(name, now_s))
                * self.settings.admission_safety_factor)

    def _age(self, name: str, now_s: float) -> None:
        """Refit ``name`` if that has not happened for REFIT_S (old observations age out)."""
        if now_s - self._fitted_at.get(name, now_s) >= REFIT_S:
            self._refit(name, now_s)

    # -- the decision --------------------------------------------------------------------------
    def decide(self, model: ServedModel, rows: int, now_s: float, deadline_s: float,
               can_degrade: bool = True, what: str | None = None) -> Decision:
        """Admit ``rows`` rows of ``model`` (or of the fallback, under ``degrade``) so that
        they are scored by ``deadline_s``; ServiceError 503 otherwise (its message names the
        request as ``what``, by default its candidates)."""
        served = self.registry.get(model.name)
        if served.batcher.queue_depth >= served.config.max_queue_size:
            raise ServiceError(503, "queue_full", f"model {model.name!r} has "
                               f"{served.batcher.queue_depth} requests queued (max_queue_size)",
                               headers={"Retry-After": "1"})
        budget = deadline_s - now_s
        band = load_band(self.in_flight())
        self._age(model.name, now_s)
        work = self.work_s(model, rows, now_s)
        predicted = self._predicted(model.name, work, band, now_s)
        if predicted <= budget:
            return Decision(model, False, predicted, work, now_s, budget, band)
        fallback = self.registry.models.get(self.settings.fallback_model or "")
        if (served.config.timeout_action == "degrade" and can_degrade and fallback is not None
                and fallback is not model):
            fb = self.registry.get(fallback.name)
            self._age(fallback.name, now_s)
            fb_work = self.work_s(fallback, rows, now_s)
            fb_pred = self._predicted(fallback.name, fb_work, band, now_s)
            if fb.batcher.queue_depth < fb.config.max_queue_size and fb_pred <= budget:
                return Decision(fallback, True, fb_pred, fb_work, now_s, budget, band)
        left_ms = max(0.0, budget * 1e3)
        if log.isEnabledFor(logging.DEBUG):
            learnt = self.learnt(model.name)
            log.debug("refused %d rows of %s: work %.2f ms, line %.2f ms + %.3f x, margin "
                      "%.2f ms (band %d), penalty %.2f, predicted %.2f ms, %.2f ms left", rows,
                      model.name, work * 1e3, learnt.overhead_s * 1e3, learnt.slope,
                      learnt.margins_s[band] * 1e3, band, self.penalty(model.name, now_s),
                      predicted * 1e3, left_ms)
        raise ServiceError(
            503, "predicted_deadline_miss",
            f"{what or f'{rows} candidates are'} predicted to take {predicted * 1e3:.1f} ms, "
            f"{left_ms:.1f} ms of the budget are left",
            headers={"Retry-After": str(retry_after_s(predicted))})

    def decide_at_arrival(self, now_s: float, deadline_s: float, route: str = "",
                          body_bytes: int | None = None) -> Decision | None:
        """Stage 1, before the body is read: :meth:`decide` for :meth:`rows_at_least` rows on
        the model that would score them soonest (among those with room in their queue); None
        while no model is serving."""
        models = self.registry.models
        if not models:
            return None
        rows = self.rows_at_least(route, body_bytes)
        if len(models) == 1:
            best = next(iter(models.values()))
        else:
            entries = self.registry.entries
            room = [m for m in models.values() if entries[m.name].batcher.queue_depth
                    < entries[m.name].config.max_queue_size] or list(models.values())
            best = min(room, key=lambda m: self.predict_s(m, rows, now_s))
        what = f"a {body_bytes}-byte body (at least {rows} candidates) is" if rows > 1 else None
        try:
            return self.decide(best, rows, now_s, deadline_s, can_degrade=False, what=what)
        except ServiceError as e:
            if rows > 1 and e.error == "predicted_deadline_miss":
                # refused for its estimated size only: now and then, read such a body, so
                # that bodies with more bytes per candidate than seen so far are learnt
                self._size_refusals[route] = n = self._size_refusals.get(route, 0) + 1
                if n % PROBE_EVERY == 0:
                    try:
                        self.decide(best, 1, now_s, deadline_s, can_degrade=False)
                    except ServiceError:
                        raise e from None
                    return None
            raise

    def rows_at_least(self, route: str, body_bytes: int | None) -> int:
        """The fewest candidates a body of ``body_bytes`` bytes on ``route`` can hold, judged
        by the most bytes per candidate of recent bodies there (1 when unknown)."""
        most = self._most_bytes_per_row.get(route)
        if not most or not body_bytes:
            return 1
        return max(1, int(body_bytes // most))

    def body_seen(self, route: str, body_bytes: int, rows: int) -> None:
        """A decoded body on ``route``: ``body_bytes`` bytes for ``rows`` candidates."""
        if rows > 0:
            seen = self._bytes_per_row.setdefault(route, deque(maxlen=BODY_WINDOW))
            per_row = body_bytes / rows
            evicted = seen[0] if len(seen) == seen.maxlen else None
            seen.append(per_row)
            most = self._most_bytes_per_row.get(route, 0.0)
            if per_row >= most:
                self._most_bytes_per_row[route] = per_row
            elif evicted is not None and evicted >= most:  # the largest left the window
                self._most_bytes_per_row[route] = max(seen)

    # -- learning ------------------------------------------------------------------------------
    def observe(self, decision: Decision, done_s: float, missed: bool = False) -> None:
        """An admitted request was scored at ``done_s``, or (``missed``) dropped at its
        deadline then: learn how far its prediction was from reality."""
        name = decision.model.name
        if missed:
            _, since = self._penalty.get(name, (1.0, -math.inf))
            if done_s - since >= MISS_BURST_S:
                penalty = min(self.penalty(name, done_s) * MISS_PENALTY, MAX_PENALTY)
                self._penalty[name] = (penalty, done_s)
            return
        self._seen.setdefault(name, deque(maxlen=MARGIN_WINDOW)).append(
            (done_s, decision.work_s, done_s - decision.decided_s, decision.band))
        self._fitted_at.setdefault(name, done_s)
        count = self._since_fit.get(name, 0) + 1
        if count >= REFIT_EVERY or (count >= MIN_OBSERVATIONS and name not in self._learnt):
            self._refit(name, done_s)
        else:
            self._since_fit[name] = count

    def _refit(self, name: str, now_s: float) -> None:
        self._since_fit[name], self._fitted_at[name] = 0, now_s
        seen = self._seen.get(name)
        while seen and seen[0][0] < now_s - MARGIN_MEMORY_S:
            seen.popleft()
        if not seen:
            self._learnt.pop(name, None)
            return
        points = np.array(seen)  # (n, 4): finished at, work ahead, actual, band
        done, work, actual = points[:, 0], points[:, 1], points[:, 2]
        recent = np.flatnonzero(done >= now_s - MEMORY_S)[-self._window:]
        if len(recent) < MIN_OBSERVATIONS:
            self._learnt.pop(name, None)
            return
        bands = points[:, 3].astype(int)
        overhead, slope = fit_line(work[recent], actual[recent])
        errors = actual - (overhead + slope * work)
        q = self.settings.admission_quantile
        own = [errors[bands == b] for b in range(BANDS)]
        quantiles = [float(np.quantile(e, q)) if len(e) >= MIN_OBSERVATIONS else None
                     for e in own]
        margins = []
        for b in range(BANDS):  # this band's, else the nearest quieter one's, else none
            found = next((quantiles[k] for k in range(b, -1, -1) if quantiles[k] is not None),
                         None)
            margins.append(max(0.0, found) if found is not None else 0.0)
        self._learnt[name] = Learnt(overhead, slope, tuple(margins))

    def forget(self, name: str) -> None:
        """``name`` left service: what was learnt of it goes too."""
        for table in (self._seen, self._learnt, self._since_fit, self._fitted_at,
                      self._penalty):
            table.pop(name, None)

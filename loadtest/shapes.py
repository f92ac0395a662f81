"""Open-loop load shapes: the offered arrival rate (requests/s) as a function of time.

A schedule is a list of stages ``(duration_s, rate_rps)``. The locustfile's pacer sends
requests at Poisson arrival times drawn from the current stage's rate, whether or not earlier
requests have been answered, so that overload shows up as queueing and tail latency (or as the
server's 503/504) instead of slowing the load down. Three builders: :func:`constant`,
:func:`steps` and :func:`bursts`. Schedules travel to the Locust subprocess as JSON
(:meth:`ArrivalSchedule.to_json`, environment variable ``MLDCN_LT_SCHEDULE``).

Example:
    >>> s = bursts(base_rps=10, peak_rps=40, period_s=5, burst_s=1, duration_s=10)
    >>> [s.rate_at(t) for t in (0.5, 1.5, 4.9, 5.2, 10.0)]
    [40.0, 10.0, 10.0, 40.0, None]
    >>> steps([5, 10], stage_s=3).stages
    ((3.0, 5.0), (3.0, 10.0))
    >>> ArrivalSchedule.from_json(constant(8, 2).to_json()).total_s
    2.0
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ArrivalSchedule:
    """Stages of (duration_s, rate_rps), run one after the other."""

    stages: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        for duration_s, rate_rps in self.stages:
            if not duration_s > 0:
                raise ValueError(f"stage duration must be > 0 s, got {duration_s}")
            if not rate_rps >= 0:
                raise ValueError(f"stage rate must be >= 0 requests/s, got {rate_rps}")

    @property
    def total_s(self) -> float:
        return float(sum(d for d, _ in self.stages))

    def rate_at(self, t_s: float) -> float | None:
        """Offered rate at ``t_s`` seconds after the start; None once the schedule is over."""
        end = 0.0
        for duration_s, rate_rps in self.stages:
            end += duration_s
            if t_s < end:
                return float(rate_rps)
        return None

    def to_json(self) -> str:
        return json.dumps([[d, r] for d, r in self.stages])

    @classmethod
    def from_json(cls, text: str) -> ArrivalSchedule:
        try:
            stages = tuple((float(d), float(r)) for d, r in json.loads(text))
        except (ValueError, TypeError) as e:
            raise ValueError(f"a schedule is a JSON list of [duration_s, rate_rps]: {e}"
                             ) from None
        return cls(stages)


def constant(rate_rps: float, duration_s: float) -> ArrivalSchedule:
    """One stage at a constant arrival rate."""
    return ArrivalSchedule(((float(duration_s), float(rate_rps)),))


def steps(rates_rps: Sequence[float], stage_s: float) -> ArrivalSchedule:
    """One stage per rate, each ``stage_s`` long."""
    return ArrivalSchedule(tuple((float(stage_s), float(r)) for r in rates_rps))


def bursts(base_rps: float, peak_rps: float, period_s: float, burst_s: float,
           duration_s: float) -> ArrivalSchedule:
    """``peak_rps`` for the first ``burst_s`` of every ``period_s``, ``base_rps`` otherwise."""
    if not 0 < burst_s < period_s:
        raise ValueError(f"need 0 < burst_s < period_s, got {burst_s} and {period_s}")
    stages: list[tuple[float, float]] = []
    t = 0.0
    while t < duration_s - 1e-9:
        for length, rate in ((burst_s, peak_rps), (period_s - burst_s, base_rps)):
            length = min(length, duration_s - t)
            if length > 1e-9:
                stages.append((length, float(rate)))
                t += length
    return ArrivalSchedule(tuple(stages))

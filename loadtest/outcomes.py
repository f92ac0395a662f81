"""Request outcomes of a load run and their client-side statistics (no Locust, no numpy).

Outcome kinds:
  ok                            200, scored
  503_queue_full                budget enforcement: the model's queue was full
  503_predicted_deadline_miss   budget enforcement: admission control predicted a miss
  504_deadline_exceeded         budget enforcement: the deadline passed before scoring
  http_<code>                   any other HTTP status (an error of the test)
  connection_error              no HTTP answer (refused, reset, client timeout)
  client_overflow               not sent: the load generator's open-request cap was reached

A request is *served* when it is ``ok``; every other kind counts against the SLO's error
budget (:data:`MAX_UNSERVED_SHARE`).

Example:
    >>> outcome_kind(200, None), outcome_kind(503, "queue_full"), outcome_kind(503, "not_ready")
    ('ok', '503_queue_full', 'http_503')
    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BUDGET_REASONS = frozenset({"queue_full", "predicted_deadline_miss", "deadline_exceeded"})
MAX_UNSERVED_SHARE = 0.001  # the SLO allows under 0.1% of requests not served
OK = "ok"
OVERFLOW = "client_overflow"


def outcome_kind(status: int, reason: str | None) -> str:
    """The outcome kind of one response (status 0: no HTTP answer)."""
    if status == 200:
        return OK
    if status in (503, 504) and reason in BUDGET_REASONS:
        return f"{status}_{reason}"
    if status == 0:
        return "connection_error"
    return f"http_{status}"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation (numpy's default); None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


class Recorder:
    """Collects (stage, kind, latency, candidates) per request inside the Locust process."""

    def __init__(self, stages: int) -> None:
        self.stages: list[dict[str, dict[str, Any]]] = [{} for _ in range(stages)]
        self.max_lag_s = 0.0
        self.t_start: float | None = None
        self.t_stop: float | None = None

    def start(self, t: float) -> None:
        self.t_start = t

    def stop(self, t: float) -> None:
        self.t_stop = t

    def add(self, stage: int, kind: str, latency_ms: float | None, candidates: int,
            lag_s: float) -> None:
        entry = self.stages[stage].setdefault(kind, {"count": 0, "rows": 0, "latency_ms": []})
        entry["count"] += 1
        entry["rows"] += candidates
        if latency_ms is not None:
            entry["latency_ms"].append(round(latency_ms, 3))
        self.max_lag_s = max(self.max_lag_s, lag_s)

    def meets_slo(self, slo_ms: float) -> bool:
        """Served p99 within ``slo_ms`` and under 0.1% not served, over all stages."""
        ok: list[float] = []
        total = unserved = 0
        for stage in self.stages:
            for kind, e in stage.items():
                total += e["count"]
                if kind == OK:
                    ok.extend(e["latency_ms"])
                else:
                    unserved += e["count"]
        p99 = percentile(ok, 99)
        return total > 0 and p99 is not None and p99 <= slo_ms and (
            unserved / total < MAX_UNSERVED_SHARE)

    def to_dict(self, schedule: Any) -> dict[str, Any]:
        elapsed = (self.t_stop - self.t_start) if self.t_start and self.t_stop else None
        return {"schedule": [list(s) for s in schedule.stages], "stages": self.stages,
                "max_lag_s": round(self.max_lag_s, 6), "elapsed_s": elapsed}


def summarize(outcomes: dict[str, dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Client-side statistics of one step from its outcome entries (a Recorder stage).

    Example:
        >>> s = summarize({"ok": {"count": 3, "rows": 30, "latency_ms": [1.0, 2.0, 9.0]},
        ...                "503_queue_full": {"count": 1, "rows": 5, "latency_ms": [0.5]}}, 2.0)
        >>> s["requests"], s["served"], s["unserved_share"], s["served_rows_per_s"], s["p50_ms"]
        (4, 3, 0.25, 15.0, 2.0)
    """
    total = sum(e["count"] for e in outcomes.values())
    ok = outcomes.get(OK, {"count": 0, "rows": 0, "latency_ms": []})
    lat = ok["latency_ms"]
    return {
        "requests": total,
        "served": ok["count"],
        "unserved_share": (total - ok["count"]) / total if total else None,
        "outcomes": {k: e["count"] for k, e in sorted(outcomes.items())},
        "served_rows_per_s": ok["rows"] / duration_s if duration_s > 0 else None,
        "achieved_rps": ok["count"] / duration_s if duration_s > 0 else None,
        "p50_ms": percentile(lat, 50),
        "p95_ms": percentile(lat, 95),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
    }

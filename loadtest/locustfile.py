"""Locust load for ``POST /v1/score``: open-loop Poisson arrivals, realistic bodies, outcomes.

Run by ``mldcn loadtest`` as a headless subprocess, one per load step::

    MLDCN_LT_POOL=pool.jsonl MLDCN_LT_SCHEDULE='[[20, 8]]' MLDCN_LT_RESULTS=out.json \\
        locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 --csv step

Environment (set by :mod:`loadtest.runner`):
  MLDCN_LT_POOL            JSON lines of request bodies (:func:`loadtest.sampling.write_pool`)
  MLDCN_LT_SCHEDULE        stages [[duration_s, rate_rps], ...] (:mod:`loadtest.shapes`)
  MLDCN_LT_RESULTS         where the per-outcome latencies are written at exit (JSON)
  MLDCN_LT_TIMEOUT_MS      per-request budget sent as ``X-Request-Timeout-Ms`` (optional)
  MLDCN_LT_MAX_INFLIGHT    open requests at most; arrivals beyond it count as client_overflow
  MLDCN_LT_SEED            seed of the arrival times and the body order (same for every model)
  MLDCN_LT_CHECK_SLO_MS    if set, exit 1 when served p99 exceeds it or >= 0.1% are not served

One user (:class:`ScoringUser`) is a pacer: it sends each request at its scheduled arrival time
in its own greenlet, whatever the earlier ones are doing (open loop), so overload shows in the
tail and in the server's 503/504 instead of slowing the load down. 503 ``queue_full`` /
``predicted_deadline_miss`` and 504 ``deadline_exceeded`` are the service's budget enforcement:
they are their own outcome kinds and count as successes for Locust, not as failures.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import gevent
from gevent.pool import Pool
from locust import FastHttpUser, LoadTestShape, events, task
from locust.exception import StopUser

from loadtest.outcomes import BUDGET_REASONS, Recorder, outcome_kind
from loadtest.sampling import read_pool
from loadtest.shapes import ArrivalSchedule

SCORE_PATH = "/v1/score"
DRAIN_S = 15.0  # longest wait for the last open requests after the schedule ends


def _env_float(name: str, default: float | None) -> float | None:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


SCHEDULE = ArrivalSchedule.from_json(os.environ.get("MLDCN_LT_SCHEDULE", "[[10, 1]]"))
POOL = read_pool(os.environ["MLDCN_LT_POOL"]) if os.environ.get("MLDCN_LT_POOL") else []
TIMEOUT_MS = _env_float("MLDCN_LT_TIMEOUT_MS", None)
MAX_INFLIGHT = int(_env_float("MLDCN_LT_MAX_INFLIGHT", 256) or 256)
SEED = int(_env_float("MLDCN_LT_SEED", 0) or 0)
RECORDER = Recorder(stages=len(SCHEDULE.stages))
_state = {"done": False}


class ScoringUser(FastHttpUser):
    """The pacer: Poisson arrivals at the schedule's rate, each request in its own greenlet."""

    concurrency = MAX_INFLIGHT
    network_timeout = 10.0
    connection_timeout = 5.0

    @task
    def pace(self) -> None:
        if not POOL:
            raise RuntimeError("MLDCN_LT_POOL is not set: no request bodies to send")
        rng = random.Random(SEED)
        headers = {"Content-Type": "application/json"}
        if TIMEOUT_MS is not None:
            headers["X-Request-Timeout-Ms"] = f"{TIMEOUT_MS:g}"
        pool = Pool(MAX_INFLIGHT)
        t0 = time.perf_counter()
        planned = 0.0
        RECORDER.start(t0)
        while True:
            rate = SCHEDULE.rate_at(planned)
            if rate is None:
                break
            stage_end = self._stage_end(planned)
            if rate <= 0:
                planned = stage_end
                continue
            nxt = planned + rng.expovariate(rate)
            if nxt >= stage_end:  # memoryless: redraw from the boundary at the next rate
                planned = stage_end
                continue
            planned = nxt
            body, n = POOL[rng.randrange(len(POOL))]
            delay = t0 + planned - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            stage = self._stage(planned)
            if pool.full():
                RECORDER.add(stage, "client_overflow", None, n, 0.0)
                continue
            lag_s = time.perf_counter() - (t0 + planned)
            pool.spawn(self._send, body, n, headers, stage, lag_s)
        pool.join(timeout=DRAIN_S)
        RECORDER.stop(time.perf_counter())
        _state["done"] = True
        raise StopUser()

    @staticmethod
    def _stage_end(t_s: float) -> float:
        end = 0.0
        for duration_s, _ in SCHEDULE.stages:
            end += duration_s
            if t_s < end:
                return end
        return end

    @staticmethod
    def _stage(t_s: float) -> int:
        end = 0.0
        for i, (duration_s, _) in enumerate(SCHEDULE.stages):
            end += duration_s
            if t_s < end:
                return i
        return len(SCHEDULE.stages) - 1

    def _send(self, body: bytes, n: int, headers: dict[str, str], stage: int,
              lag_s: float) -> None:
        start = time.perf_counter()
        with self.client.post(SCORE_PATH, data=body, headers=headers, name=SCORE_PATH,
                              catch_response=True) as resp:
            latency_ms = (time.perf_counter() - start) * 1e3
            reason = None
            if resp.status_code in (503, 504):
                try:
                    reason = json.loads(resp.content or b"{}").get("error")
                except (ValueError, AttributeError):
                    reason = None
            kind = outcome_kind(resp.status_code, reason)
            RECORDER.add(stage, kind, latency_ms, n, lag_s)
            if resp.status_code == 200 or reason in BUDGET_REASONS:
                resp.success()
            else:
                resp.failure(f"HTTP {resp.status_code} {reason or ''}".strip())


class ScheduleShape(LoadTestShape):
    """One pacer user until its schedule has run and its last requests are answered."""

    def tick(self) -> tuple[int, float] | None:
        if _state["done"] or self.get_run_time() > SCHEDULE.total_s + DRAIN_S + 5.0:
            return None
        return (1, 1.0)


@events.quitting.add_listener
def _write_results(environment: Any, **_: Any) -> None:
    """Write every outcome and latency; optionally set the exit code from the SLO."""
    path = os.environ.get("MLDCN_LT_RESULTS")
    summary = RECORDER.to_dict(SCHEDULE)
    if path:
        with open(path, "w") as f:
            json.dump(summary, f)
    slo_ms = _env_float("MLDCN_LT_CHECK_SLO_MS", None)
    if slo_ms is None:
        environment.process_exit_code = 0
        return
    environment.process_exit_code = 0 if RECORDER.meets_slo(slo_ms) else 1

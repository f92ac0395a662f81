"""Prometheus metrics of the scoring service (``GET /metrics``).

Names carry the ``mldcn_`` prefix and their unit; durations are in seconds with buckets from
0.5 ms to 1 s, row counts use powers of two. Labels are only ``model``, ``version``, ``code`` and
``reason`` (plus ``provider``/``precision``/``arch`` on the constant info metric), never request
or user ids; a request naming an unknown model is counted under ``model="unknown"``.

=====================================  =========  =============================================
mldcn_requests_total                   counter    scoring responses by model and HTTP code
mldcn_request_duration_seconds         histogram  arrival to response, by model and code
mldcn_queue_duration_seconds           histogram  enqueue to first batch, by model and version
mldcn_compute_duration_seconds         histogram  ONNX Runtime time per batch
mldcn_batch_size_rows                  histogram  rows per ONNX Runtime batch
mldcn_candidates_per_request           histogram  candidates per request
mldcn_queue_depth_requests             gauge      requests waiting, per model
mldcn_inflight_requests                gauge      scoring requests being handled
mldcn_rejected_requests_total          counter    requests not scored, by model and reason
mldcn_degraded_requests_total          counter    requests scored by the fallback model instead
mldcn_deadline_slack_seconds           histogram  deadline minus finish, of served requests
mldcn_model_info                       gauge      1 per loaded version; provider, precision, arch
mldcn_model_flops_per_example          gauge      analytic FLOPs per scored row
mldcn_latency_model_fixed_seconds      gauge      admission latency model: cost per batch
mldcn_latency_model_per_row_seconds    gauge      admission latency model: cost per row
mldcn_arm_requests_total               counter    A/B-split requests by arm and HTTP code
mldcn_arm_request_duration_seconds     histogram  arrival to response, by arm and code
mldcn_arm_mean_score                   histogram  mean probability per served request, by arm
mldcn_shadow_requests_total            counter    shadow copies by model, shadow and result
mldcn_shadow_abs_diff_mean             histogram  per request mean |primary - shadow| score
mldcn_shadow_abs_diff_max              histogram  per request max |primary - shadow| score
mldcn_shadow_duration_seconds          histogram  shadow copy: submit to scores
mldcn_model_loads_total                counter    admin/polling loads by model and result
mldcn_draining                         gauge      1 after SIGTERM while in-flight work finishes
mldcn_provider_fallback                gauge      1: CUDA was asked for, the model runs on CPU
mldcn_admission_ratio                  histogram  served requests: actual ÷ predicted time from
                                                  the admission decision to scored
process_cpu_seconds_total              counter    CPU seconds of the server (all its threads;
                                                  with several workers, the sum over them)
=====================================  =========  =============================================

``mldcn_requests_total`` and ``mldcn_request_duration_seconds`` count ``/v1/score`` and
``/v2/models/.../infer`` alike. The ``arm`` label is an A/B arm's model name (a handful of
values; requests that were not split are not in the arm metrics); ``model`` in the request
metrics is the model asked for, so an arm degraded to the fallback stays under its arm.
``mldcn_model_info`` is 0 for a version that was replaced or unloaded.

Rejection reasons: ``queue_full``, ``predicted_deadline_miss`` (admission control, 503),
``deadline_exceeded`` (expired while queued, or finished after its deadline, 504),
``client_disconnected``, ``not_ready``, ``draining``; a request refused on arrival, before its
body names a model (``draining``, or admission on the Content-Length), is counted against the
default model and in no A/B arm. Load results: ``loaded``, ``rejected``
(validation failed, the old version kept serving), ``unloaded``.

Several worker processes: set ``PROMETHEUS_MULTIPROC_DIR`` (``mldcn serve --workers N`` does) to
an empty folder before the service is imported; ``/metrics`` then aggregates every worker's
files (``MultiProcessCollector``); gauges sum live processes (or take their max, for model info),
and ``process_cpu_seconds_total`` adds up the live workers' CPU time (read from ``/proc``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily

# 0.5 ms … 1 s, finer around the usual SLOs (20-50 ms), where p99 and "within budget" are read
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
                     0.075, 0.1, 0.2, 0.5, 1.0)
ROW_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 … 8192
PROBABILITY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
DIFF_BUCKETS = (1e-5, 1e-4, 1e-3, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
RATIO_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
UNKNOWN_MODEL = "unknown"


def multiprocess_mode() -> bool:
    """True when prometheus_client writes per-process files (set before it was imported)."""
    return bool(os.environ.get(MULTIPROC_ENV))


class Metrics:
    """The service's metric objects, on their own registry (one per app instance)."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("mldcn_requests",
                                "scoring responses (/v1/score, /v2 infer) by model and code",
                                ["model", "code"], registry=r)
        self.request_duration = Histogram(
            "mldcn_request_duration_seconds", "arrival to response of a scoring request",
            ["model", "code"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_duration = Histogram(
            "mldcn_queue_duration_seconds", "enqueue to first batch", ["model", "version"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.compute_duration = Histogram(
            "mldcn_compute_duration_seconds", "ONNX Runtime time per batch",
            ["model", "version"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("mldcn_batch_size_rows", "rows per ONNX Runtime batch",
                                    ["model", "version"], buckets=ROW_BUCKETS, registry=r)
        self.candidates = Histogram("mldcn_candidates_per_request", "candidates per request",
                                    ["model"], buckets=ROW_BUCKETS, registry=r)
        self.queue_depth = Gauge("mldcn_queue_depth_requests", "requests waiting", ["model"],
                                 multiprocess_mode="livesum", registry=r)
        self.in_flight = Gauge("mldcn_inflight_requests", "scoring requests being handled",
                               multiprocess_mode="livesum", registry=r)
        self.rejected = Counter("mldcn_rejected_requests", "requests not scored, by reason",
                                ["model", "reason"], registry=r)
        self.degraded = Counter("mldcn_degraded_requests",
                                "requests scored by the fallback model", ["model", "reason"],
                                registry=r)
        self.slack = Histogram("mldcn_deadline_slack_seconds",
                               "deadline minus finish time of served requests", ["model"],
                               buckets=LATENCY_BUCKETS_S, registry=r)
        self.model_info = Gauge("mldcn_model_info", "loaded model versions",
                                ["model", "version", "provider", "precision", "arch"],
                                multiprocess_mode="livemax", registry=r)
        self.flops = Gauge("mldcn_model_flops_per_example", "analytic FLOPs per scored row",
                           ["model", "version"], multiprocess_mode="livemax", registry=r)
        self.latency_fixed = Gauge("mldcn_latency_model_fixed_seconds",
                                   "admission latency model: fixed cost per batch", ["model"],
                                   multiprocess_mode="livemax", registry=r)
        self.latency_per_row = Gauge("mldcn_latency_model_per_row_seconds",
                                     "admission latency model: cost per row", ["model"],
                                     multiprocess_mode="livemax", registry=r)

        self.arm_requests = Counter("mldcn_arm_requests", "A/B-split requests by arm and code",
                                    ["arm", "code"], registry=r)
        self.arm_duration = Histogram(
            "mldcn_arm_request_duration_seconds", "arrival to response of A/B-split requests",
            ["arm", "code"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.arm_score = Histogram("mldcn_arm_mean_score",
                                   "mean probability of a served A/B-split request", ["arm"],
                                   buckets=PROBABILITY_BUCKETS, registry=r)
        self.shadow_requests = Counter("mldcn_shadow_requests", "shadow copies by result",
                                       ["model", "shadow", "result"], registry=r)
        self.shadow_diff_mean = Histogram(
            "mldcn_shadow_abs_diff_mean", "mean |primary - shadow| probability per request",
            ["model", "shadow"], buckets=DIFF_BUCKETS, registry=r)
        self.shadow_diff_max = Histogram(
            "mldcn_shadow_abs_diff_max", "max |primary - shadow| probability per request",
            ["model", "shadow"], buckets=DIFF_BUCKETS, registry=r)
        self.shadow_duration = Histogram(
            "mldcn_shadow_duration_seconds", "shadow copy: submit to scores",
            ["model", "shadow"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.model_loads = Counter("mldcn_model_loads", "model loads by result",
                                   ["model", "result"], registry=r)
        self.draining = Gauge("mldcn_draining", "1 while draining after SIGTERM",
                              multiprocess_mode="livemax", registry=r)
        self.admission_ratio = Histogram(
            "mldcn_admission_ratio", "served requests: actual / predicted seconds from the "
            "admission decision to scored", ["model"], buckets=RATIO_BUCKETS, registry=r)
        if not multiprocess_mode():
            ProcessCollector(registry=r)
        self.provider_fallback = Gauge(
            "mldcn_provider_fallback", "1 when execution_provider=cuda but the model's session "
            "runs on CPU (on_provider_fallback=warn)", ["model"], multiprocess_mode="livemax",
            registry=r)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)`` (label values in the metric's order), cached: the
        request path binds each series once instead of validating labels every time."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of ``GET /metrics``, aggregated over workers if multiprocess."""
        if multiprocess_mode():
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            registry.register(WorkersCpuCollector(os.environ[MULTIPROC_ENV]))
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    @staticmethod
    def process_exit() -> None:
        """Drop this process's live gauges from the multiprocess files (worker shutdown)."""
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())


class WorkersCpuCollector:
    """``process_cpu_seconds_total`` summed over the live processes that write metrics files
    into a multiprocess folder (``*_<pid>.db``), read from ``/proc/<pid>/stat``."""

    _PID = re.compile(r"_(\d+)\.db$")

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def collect(self) -> Iterator[CounterMetricFamily]:
        pids = set()
        for name in os.listdir(self.folder):
            m = self._PID.search(name)
            if m:
                pids.add(int(m.group(1)))
        total, found = 0.0, False
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue  # gone, or not Linux
            total += (int(fields[11]) + int(fields[12])) / self._tick
            found = True
        if found:
            yield CounterMetricFamily("process_cpu_seconds", "CPU seconds of the worker "
                                      "processes (user + system)", value=total)

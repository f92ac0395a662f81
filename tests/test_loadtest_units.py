"""Load-test building blocks without a server: histogram-delta percentiles, SLO-bounded
throughput, the ONNX Runtime share of server CPU and the front-end-bound verdict, the report of
an old report.json, the request sampler, shapes, outcomes, and the CLI's one-line errors."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest

from loadtest.compare import (
    FRONT_END_BOUND,
    LoadOptions,
    comparison,
    front_end_bound,
    model_summary,
    rebuild,
    slo_bounded,
    spread,
    step_meets_slo,
    verdict,
)
from loadtest.outcomes import OK, Recorder, outcome_kind, percentile, summarize
from loadtest.promscrape import (
    counter_delta,
    histogram_count_sum,
    histogram_delta,
    histogram_quantile,
    parse_metrics,
)
from loadtest.report import markdown, write_report
from loadtest.runner import LoadTestError, cpu_seconds_delta, server_step_stats
from loadtest.sampling import OOV_PREFIX, CandidateCounts, RequestSampler, invert_transform
from loadtest.shapes import ArrivalSchedule, bursts, constant, steps
from model.cli import main

# --- /metrics deltas and percentiles -------------------------------------------------------

BEFORE = """\
# TYPE mldcn_request_duration_seconds histogram
mldcn_request_duration_seconds_bucket{code="200",le="0.005",model="m"} 100
mldcn_request_duration_seconds_bucket{code="200",le="0.01",model="m"} 150
mldcn_request_duration_seconds_bucket{code="200",le="0.05",model="m"} 200
mldcn_request_duration_seconds_bucket{code="200",le="+Inf",model="m"} 200
mldcn_request_duration_seconds_count{code="200",model="m"} 200
mldcn_request_duration_seconds_sum{code="200",model="m"} 1.0
mldcn_request_duration_seconds_bucket{code="503",le="0.005",model="m"} 7
mldcn_request_duration_seconds_bucket{code="503",le="0.01",model="m"} 7
mldcn_request_duration_seconds_bucket{code="503",le="0.05",model="m"} 7
mldcn_request_duration_seconds_bucket{code="503",le="+Inf",model="m"} 7
mldcn_request_duration_seconds_count{code="503",model="m"} 7
mldcn_request_duration_seconds_sum{code="503",model="m"} 0.007
# TYPE mldcn_requests_total counter
mldcn_requests_total{code="200",model="m"} 200
mldcn_requests_total{code="503",model="m"} 7
"""
# The step adds 1000 served requests: 400 under 5 ms, 400 in (5, 10], 190 in (10, 50],
# 10 above 50 ms; and 50 rejections (which must not enter the code-200 percentiles).
AFTER = (BEFORE
         .replace('le="0.005",model="m"} 100', 'le="0.005",model="m"} 500')
         .replace('le="0.01",model="m"} 150', 'le="0.01",model="m"} 950')
         .replace('le="0.05",model="m"} 200', 'le="0.05",model="m"} 1190')
         .replace('le="+Inf",model="m"} 200', 'le="+Inf",model="m"} 1200')
         .replace('_count{code="200",model="m"} 200', '_count{code="200",model="m"} 1200')
         .replace('_sum{code="200",model="m"} 1.0', '_sum{code="200",model="m"} 13.0')
         .replace('le="+Inf",model="m"} 7', 'le="+Inf",model="m"} 57')
         .replace('mldcn_requests_total{code="200",model="m"} 200',
                  'mldcn_requests_total{code="200",model="m"} 1200')
         .replace('mldcn_requests_total{code="503",model="m"} 7',
                  'mldcn_requests_total{code="503",model="m"} 57'))


def test_histogram_delta_percentiles_on_a_fixed_example() -> None:
    before, after = parse_metrics(BEFORE), parse_metrics(AFTER)
    buckets = histogram_delta(before, after, "mldcn_request_duration_seconds", model="m",
                              code="200")
    assert buckets == [(0.005, 400.0), (0.01, 800.0), (0.05, 990.0), (math.inf, 1000.0)]
    # p50: rank 500 lies in (5, 10] ms, 100 of its 400 counts in -> 5 + 5 * 100/400 ms
    assert histogram_quantile(0.50, buckets) == pytest.approx(0.00625)
    # p95: rank 950 in (10, 50] ms, 150 of 190 -> 10 + 40 * 150/190 ms
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.010 + 0.040 * 150 / 190)
    # p40: rank 400 is exactly the first bucket's upper bound
    assert histogram_quantile(0.40, buckets) == pytest.approx(0.005)
    # p99.5 falls in +Inf: the highest finite bound, as Prometheus reports it
    assert histogram_quantile(0.995, buckets) == pytest.approx(0.05)
    assert histogram_count_sum(before, after, "mldcn_request_duration_seconds", model="m",
                               code="200") == (1000.0, pytest.approx(12.0))
    assert counter_delta(before, after, "mldcn_requests_total", model="m", code="503") == 50
    # all codes summed: the 50 fast rejections join the first bucket
    all_codes = histogram_delta(before, after, "mldcn_request_duration_seconds", model="m")
    assert all_codes[0] == (0.005, 400.0)  # 503s added at +Inf only in this example
    assert all_codes[-1] == (math.inf, 1050.0)


def test_histogram_quantile_edge_cases() -> None:
    assert histogram_quantile(0.99, []) is None
    assert histogram_quantile(0.99, [(0.01, 0.0), (math.inf, 0.0)]) is None
    with pytest.raises(ValueError, match="quantile"):
        histogram_quantile(1.5, [(0.01, 1.0), (math.inf, 1.0)])
    # an empty lower bucket does not pull the estimate down
    assert histogram_quantile(0.5, [(0.001, 0.0), (0.002, 10.0), (math.inf, 10.0)]) == \
        pytest.approx(0.0015)


def test_percentile_matches_numpy() -> None:
    xs = list(np.random.default_rng(1).exponential(10, 997))
    for q in (50, 95, 99):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 99) is None


# --- where the server's time goes: ONNX Runtime share of server CPU ------------------------


def _scrape(cpu: float | list[float] | None, compute: dict[tuple[str, str], float],
            codes: dict[str, int], model: str = "m") -> str:
    """A /metrics text: process CPU (one series, or one per worker pid), the compute
    histogram's ``_sum`` / ``_count`` per (model, version), and request counts per code."""
    lines = []
    if cpu is not None:
        lines += ["# TYPE process_cpu_seconds_total counter"]
        if isinstance(cpu, list):
            lines += [f'process_cpu_seconds_total{{pid="{i}"}} {v}' for i, v in enumerate(cpu)]
        else:
            lines += [f"process_cpu_seconds_total {cpu}"]
    lines += ["# TYPE mldcn_compute_duration_seconds histogram"]
    for (m, ver), v in compute.items():
        lab = f'model="{m}",version="{ver}"'
        lines += [f'mldcn_compute_duration_seconds_bucket{{le="+Inf",{lab}}} 10',
                  f"mldcn_compute_duration_seconds_count{{{lab}}} 10",
                  f"mldcn_compute_duration_seconds_sum{{{lab}}} {v}"]
    lines += ["# TYPE mldcn_requests_total counter"]
    lines += [f'mldcn_requests_total{{code="{c}",model="{model}"}} {n}'
              for c, n in codes.items()]
    return "\n".join(lines) + "\n"


def test_server_step_stats_share_and_time_outside_ort() -> None:
    # CPU 10.0 -> 14.0 s; ORT: 1.0 s (version 1) + 0.2 s (version 2) of model m, and 3 s of
    # another model that must not count; 1350 served + 50 rejected = 1400 answered.
    before = parse_metrics(_scrape(10.0, {("m", "1"): 5.0, ("m", "2"): 0.0, ("x", "1"): 1.0},
                                   {"200": 100, "503": 10}))
    after = parse_metrics(_scrape(14.0, {("m", "1"): 6.0, ("m", "2"): 0.2, ("x", "1"): 4.0},
                                  {"200": 1450, "503": 60}))
    sv = server_step_stats(before, after, "m", duration_s=10.0)
    assert sv["server_cpu_s"] == pytest.approx(4.0)
    assert sv["ort_s"] == pytest.approx(1.2)
    assert sv["answered_requests"] == 1400
    assert sv["compute_share"] == pytest.approx(0.3)  # 1.2 / 4.0
    assert sv["outside_ort_ms_per_request"] == pytest.approx(2.0)  # (4.0 - 1.2) / 1400 s
    assert sv["requests_by_code"] == {"200": 1350, "503": 50}
    # two intra-op threads: each ORT wall second may cost two CPU seconds
    sv = server_step_stats(before, after, "m", duration_s=10.0, ort_threads=2)
    assert sv["compute_share"] == pytest.approx(0.6)  # 2 * 1.2 / 4.0
    assert sv["outside_ort_ms_per_request"] == pytest.approx(1.143, rel=1e-3)  # 1.6 / 1400 s


def test_server_cpu_is_summed_over_worker_processes() -> None:
    before = parse_metrics(_scrape([3.0, 5.0], {("m", "1"): 0.0}, {"200": 0}))
    after = parse_metrics(_scrape([4.5, 7.5], {("m", "1"): 3.2}, {"200": 800}))
    sv = server_step_stats(before, after, "m", duration_s=10.0)
    assert sv["server_cpu_s"] == pytest.approx(4.0)
    assert sv["compute_share"] == pytest.approx(0.8)
    assert sv["outside_ort_ms_per_request"] == pytest.approx(1.0)  # 0.8 s / 800


def test_share_without_process_cpu_is_none_and_is_clipped() -> None:
    before = parse_metrics(_scrape(None, {("m", "1"): 0.0}, {"200": 0}))
    after = parse_metrics(_scrape(None, {("m", "1"): 1.0}, {"200": 100}))
    sv = server_step_stats(before, after, "m", duration_s=10.0)
    assert sv["server_cpu_s"] is None and sv["compute_share"] is None
    assert sv["outside_ort_ms_per_request"] is None
    assert sv["ort_s"] == pytest.approx(1.0) and sv["answered_requests"] == 100
    # exported only after the step started: no delta to take
    late = parse_metrics(_scrape(9.0, {("m", "1"): 1.0}, {"200": 100}))
    assert cpu_seconds_delta(before, late) is None
    # ORT wall time above the CPU time (a batch pre-empted): share 1, nothing outside
    before = parse_metrics(_scrape(1.0, {("m", "1"): 0.0}, {"200": 0}))
    after = parse_metrics(_scrape(2.0, {("m", "1"): 1.5}, {"200": 10}))
    sv = server_step_stats(before, after, "m", duration_s=10.0)
    assert sv["compute_share"] == 1.0 and sv["outside_ort_ms_per_request"] == 0.0
    # a counter that went down (a restarted process): unknown, not negative
    assert cpu_seconds_delta(after, before) is None
    # no request answered: the share is defined, the time per request is not
    idle = parse_metrics(_scrape(2.5, {("m", "1"): 1.5}, {"200": 10}))
    sv = server_step_stats(after, idle, "m", duration_s=10.0)
    assert sv["compute_share"] == 0.0 and sv["outside_ort_ms_per_request"] is None


# --- outcomes, SLO, verdict ---------------------------------------------------------------


def test_outcome_kinds() -> None:
    assert outcome_kind(200, None) == OK
    assert outcome_kind(503, "predicted_deadline_miss") == "503_predicted_deadline_miss"
    assert outcome_kind(504, "deadline_exceeded") == "504_deadline_exceeded"
    assert outcome_kind(503, "not_ready") == "http_503"
    assert outcome_kind(422, "invalid_request") == "http_422"
    assert outcome_kind(0, None) == "connection_error"


def test_recorder_and_summary() -> None:
    rec = Recorder(stages=1)
    for i in range(999):
        rec.add(0, OK, 10.0 + i / 100, 300, 0.0)
    rec.add(0, "503_queue_full", 0.5, 300, 0.0)
    assert not rec.meets_slo(50.0)  # 0.1% not served is not under 0.1%
    rec.add(0, OK, 12.0, 300, 0.0)
    assert rec.meets_slo(50.0)
    assert not rec.meets_slo(15.0)
    s = summarize(rec.stages[0], duration_s=10.0)
    assert s["requests"] == 1001 and s["served"] == 1000
    assert s["outcomes"] == {"503_queue_full": 1, "ok": 1000}
    assert s["served_rows_per_s"] == pytest.approx(30_000.0)


def _step(rps: float, p99: float | None, unserved: float = 0.0,
          share: float | None = None) -> dict:
    return {"offered_rps": rps, "client": {"requests": 100, "p99_ms": p99,
                                           "unserved_share": unserved,
                                           "served_rows_per_s": rps * 300},
            "server": {"compute_share": share}}


def test_slo_bounded_throughput() -> None:
    steps_ = [_step(10, 20), _step(20, 45), _step(40, 49.9, 0.0005), _step(80, 30, 0.2)]
    assert slo_bounded(steps_, 50) == {"rps": 40, "rows_per_s": 12_000}
    assert slo_bounded(steps_, 40)["rps"] == 10
    assert slo_bounded(steps_, 5) == {"rps": 0.0, "rows_per_s": 0.0}
    assert not step_meets_slo(_step(10, 20, 0.001), 50)  # exactly 0.1% fails
    assert not step_meets_slo(_step(10, None), 50)  # nothing served


@pytest.mark.parametrize(("thr", "p99", "expected"), [
    ([1.0, 1.0], [1.04, 0.97], "neutral"),             # both within ±5%
    ([1.0, 1.0], [1.04, 1.049], "neutral"),
    ([0.5, 1.5], [0.8, 1.2], "neutral"),                # spreads cover 1
    ([1.0], [1.2], "more expensive"),                   # p99 decides when throughput is equal
    ([1.0], [0.8], "cheaper"),
    ([0.5, 0.6], [1.0, 1.0], "more expensive"),         # throughput decides
    ([1.5, 2.0], [1.3, 1.4], "cheaper"),                # ... also against the p99 ratio
    ([None, None], [1.0, 1.01], "neutral"),             # throughput undefined (no SLO step)
    ([0.5, None, None], [1.0, 1.01, 0.99], "neutral"),  # ... or defined in too few repeats
    ([0.5, 0.5, None], [1.0, 1.01, 0.99], "more expensive"),
    ([None], [None], "inconclusive"),
])
def test_verdict(thr, p99, expected) -> None:
    assert verdict(thr, p99) == expected


@pytest.mark.parametrize(("shares", "expected"), [
    ([0.3, 0.8], FRONT_END_BOUND),     # either model below 50%
    ([0.8, 0.49], FRONT_END_BOUND),
    ([0.3, None], FRONT_END_BOUND),    # one known below 50% is enough
    ([0.8, 0.5], "cheaper"),           # both at least 50%: the ratios decide
    ([0.8, None], "cheaper"),          # unknown does not change the verdict
    ([None, None], "cheaper"),
    ([], "cheaper"),
])
def test_verdict_is_front_end_bound_below_half(shares, expected) -> None:
    assert verdict([1.5, 2.0], [0.8, 0.9], compute_shares=shares) == expected


def test_front_end_bound_does_not_hide_missing_evidence() -> None:
    assert verdict([None], [None], compute_shares=[0.1, 0.1]) == "inconclusive"
    assert front_end_bound([0.3, None]) is True
    assert front_end_bound([0.6, None]) is None
    assert front_end_bound([0.6, 0.5]) is False


def test_spread() -> None:
    assert spread([1.0, None, 3.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0,
                                            "values": [1.0, None, 3.0, 2.0]}
    assert spread([None])["median"] is None


def test_comparison_pairs_repeats_and_picks_the_reference_load() -> None:
    def run(p99s: list[float], bad: list[float]) -> dict:
        return {"steps": [_step(r, p, b) for r, p, b in zip((10, 20, 40), p99s, bad,
                                                             strict=True)]}

    base = [run([10, 20, 60], [0, 0, 0.3]), run([11, 22, 70], [0, 0, 0.4])]
    cand = [run([10, 21, 40], [0, 0, 0]), run([11, 23, 45], [0, 0, 0])]
    c = comparison(base, cand, slo_ms=50)
    assert c["reference_rps"] == 20  # highest step the baseline met in every repeat
    assert c["p99_ratio_at_reference"]["values"] == pytest.approx([21 / 20, 23 / 22])
    assert c["slo_bounded_throughput_ratio"]["values"] == [2.0, 2.0]
    assert c["verdict"] == c["ratio_verdict"] == "cheaper"
    assert c["front_end_bound"] is None  # no share recorded


def _runs(shares_at_ref: list[float]) -> tuple[list[dict], list[dict]]:
    """Baseline and candidate runs (2 repeats, steps 10/20/40 req/s; the reference load is
    20 req/s) whose compute share at the reference load is the given one per model; the
    other steps have a share of 0.9 (they must not count)."""
    def run(p99s: list[float], bad: list[float], share: float) -> dict:
        return {"steps": [_step(r, p, b, share if r == 20 else 0.9)
                          for r, p, b in zip((10, 20, 40), p99s, bad, strict=True)]}

    sa, sb = shares_at_ref
    base = [run([10, 20, 60], [0, 0, 0.3], sa), run([11, 22, 70], [0, 0, 0.4], sa)]
    cand = [run([10, 21, 40], [0, 0, 0], sb), run([11, 23, 45], [0, 0, 0], sb)]
    return base, cand


def test_comparison_is_front_end_bound_when_the_reference_share_is_low() -> None:
    c = comparison(*_runs([0.3, 0.8]), slo_ms=50)
    assert c["reference_rps"] == 20
    assert c["compute_share_at_reference"]["baseline"]["values"] == [0.3, 0.3]
    assert c["compute_share_at_reference"]["candidate"]["median"] == 0.8
    assert c["front_end_bound"] is True and c["front_end_share_threshold"] == 0.5
    assert c["verdict"] == FRONT_END_BOUND
    assert c["ratio_verdict"] == "cheaper"  # still reported, with the ratios
    assert c["slo_bounded_throughput_ratio"]["values"] == [2.0, 2.0]
    c = comparison(*_runs([0.8, 0.8]), slo_ms=50)
    assert c["front_end_bound"] is False and c["verdict"] == "cheaper"


# --- the report, old and new ---------------------------------------------------------------


def _full_step(rps: float, p99: float, share: float | None) -> dict:
    client = {"requests": int(rps * 2), "served": int(rps * 2), "p50_ms": p99 / 3,
              "p95_ms": p99 / 1.5, "p99_ms": p99, "achieved_rps": rps,
              "served_rows_per_s": rps * 300, "unserved_share": 0.0, "max_lag_ms": 1.0,
              "outcomes": {"ok": int(rps * 2)}}
    server = {"p50_ms": p99 / 3, "p95_ms": p99 / 1.5, "p99_ms": p99,
              "scored_rows_per_s": rps * 300, "mean_batch_rows": 300.0,
              "mean_compute_ms": 1.0, "mean_queue_ms": 0.1, "compute_busy_share": 0.1,
              "compute_ms_per_1k_rows": 3.3}
    if share is not None:  # the fields a current runner records
        server.update({"server_cpu_s": 1.0, "ort_s": share, "answered_requests": 400,
                       "compute_share": share,
                       "outside_ort_ms_per_request": (1.0 - share) / 400 * 1e3})
    return {"offered_rps": rps, "duration_s": 2.0, "wall_s": 2.5, "client": client,
            "server": server}


def _report(shares: dict[str, float | None]) -> dict:
    """A two-repeat compare report (steps 4 and 12 req/s, both within the SLO) of models whose
    compute share is the given one in repeat 1 and 0.02 more in repeat 2 (None: not recorded);
    the candidate's p99 is 0.8x the baseline's."""
    runs = {m: [{"model": m, "repeat": r + 1,
                 "steps": [_full_step(rps, (10.0 + rps / 10 + r) * (0.8 if i else 1.0),
                                      None if share is None else share + 0.02 * r)
                           for rps in (4, 12)]}
                for r in range(2)] for i, (m, share) in enumerate(shares.items())}
    pool = {"requests": 24, "sha256": "ab", "mean_candidates": 60.0,
            "median_candidates": 50.0, "max_candidates": 400, "mean_body_bytes": 4096.0}
    env = {"python": "3.11", "platform": "Linux", "cpu_count": 2, "server_cores": [0],
           "client_cores": [1], "loadavg_at_start": [0.1, 0.1, 0.1]}
    return {"kind": "compare", "command": None, "created_utc": "2026-01-01T00:00:00Z",
            "baseline": "dcnv2", "candidate": "mldcn", "repeats": 2,
            "options": {"steps_rps": [4.0, 12.0], "step_s": 2.0, "slo_ms": 100.0,
                        "shape": "constant"},
            "environment": env,
            "models": {m: {"arch": m, "flops_per_example": 1000, "params": 10,
                           "valid_auc": 0.7, "pool": dict(pool)} for m in shares},
            "runs": runs}


def test_model_summary_carries_the_share_at_the_reference_load() -> None:
    runs = _report({"dcnv2": 0.3})["runs"]["dcnv2"]
    runs[0]["steps"][0]["server"]["compute_share"] = 0.9  # 4 req/s: not the reference load
    s = model_summary(runs, slo_ms=100)  # its own reference load: 12 req/s
    assert s["reference_rps"] == 12
    assert s["compute_share_at_reference"] == {"median": pytest.approx(0.31), "min": 0.3,
                                               "max": pytest.approx(0.32),
                                               "values": [0.3, pytest.approx(0.32)]}
    assert s["outside_ort_ms_per_request_at_reference"]["values"] == pytest.approx(
        [0.7 / 400 * 1e3, 0.68 / 400 * 1e3])
    assert s["steps"][1]["server"]["compute_share"] == pytest.approx(0.31)
    assert s["steps"][1]["server"]["outside_ort_ms_per_request"] == pytest.approx(1.725)
    assert s["steps"][0]["server"]["compute_share"] == pytest.approx((0.9 + 0.32) / 2)
    # in a comparison: the baseline's reference step, for both models
    s = model_summary(runs, slo_ms=100, ref=0)
    assert s["reference_rps"] == 4 and s["compute_share_at_reference"]["values"][0] == 0.9


OLD_COMPARISON_KEYS = ("compute_share_at_reference", "front_end_share_threshold",
                       "front_end_bound", "ratio_verdict")
OLD_MODEL_KEYS = ("reference_rps", "compute_share_at_reference",
                  "outside_ort_ms_per_request_at_reference")


def test_an_old_report_json_renders_with_n_a(tmp_path) -> None:
    report = rebuild(_report({"dcnv2": None, "mldcn": None}))  # runs without the new fields
    for k in OLD_COMPARISON_KEYS:  # ... and summaries written before they existed
        report["comparison"].pop(k)
    for m in report["models"].values():
        for k in OLD_MODEL_KEYS:
            m.pop(k)
        for s in m["steps"]:
            s["server"].pop("compute_share")
            s["server"].pop("outside_ort_ms_per_request")
    write_report(report, tmp_path)  # as saved, not rebuilt
    md = (tmp_path / "report.md").read_text()
    assert f"**Verdict: {report['comparison']['verdict']}.**" in md
    assert "ORT share | outside ORT ms / request" in md
    row = next(ln for ln in md.splitlines() if ln.startswith("| 12 |"))
    assert "| 3.30 | n/a | n/a | 0.00% |" in row
    assert "not measured for dcnv2 and mldcn" in md
    # rebuilt from its runs: the same, with the new fields present and unknown
    again = rebuild(report)
    assert again["comparison"]["front_end_bound"] is None
    assert again["models"]["mldcn"]["compute_share_at_reference"]["median"] is None
    assert "not measured for dcnv2 and mldcn" in markdown(again)


def test_report_says_the_ratios_compare_front_ends(tmp_path) -> None:
    report = rebuild(_report({"dcnv2": 0.3, "mldcn": 0.8}))
    assert report["comparison"]["verdict"] == FRONT_END_BOUND
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("**Verdict:"))
    assert line.startswith("**Verdict: front-end-bound.**")
    assert "at 12 req/s: dcnv2 31% (range 30–32%), mldcn 81% (range 80–82%)" in line
    assert "compare the servers' front ends" in line
    assert "SLO-bounded throughput ratio 1.00" in line  # the ratios are still reported
    assert "every repeat) 0.80 (range 0.80–0.80)" in line  # p99 ratio at 12 req/s
    assert report["comparison"]["ratio_verdict"] == "cheaper"
    assert 'read alone they would say "cheaper"' in line
    row = next(ln for ln in md.splitlines() if ln.startswith("| 12 |"))
    assert "| 31% | 1.72 |" in row  # median of (1.0 - 0.30) and (1.0 - 0.32) s / 400 requests
    assert "| 31% (range 30–32%) at 12 req/s |" in md  # the models table
    assert "ORT share* = ONNX Runtime seconds / CPU seconds" in md
    assert "one intra-op thread per server core" in md
    report = rebuild(_report({"dcnv2": 0.5, "mldcn": 0.8}))
    assert report["comparison"]["verdict"] == "cheaper"
    line = markdown(report).splitlines()[2]
    assert line.startswith("**Verdict: cheaper.**") and "the ratios measure the models" in line


# --- sampler -------------------------------------------------------------------------------


def _encoders() -> dict:
    """A model's fitted encoders (``ModelMeta.encoders``), the schema inside."""
    fields = [
        {"name": "u_cat", "type": "categorical", "side": "user", "encoding": "vocab"},
        {"name": "ctx_num", "type": "numeric", "side": "context", "transform": "log1p"},
        {"name": "ad_id", "type": "categorical", "side": "candidate", "encoding": "hash",
         "buckets": 1000},
        {"name": "ad_cat", "type": "categorical", "side": "candidate", "encoding": "vocab"},
        {"name": "price", "type": "numeric", "side": "candidate", "transform": "none"},
    ]
    return {
        "format_version": 1,
        "schema": {"label": "label", "fields": fields},
        "categorical": [
            {"name": "u_cat", "cardinality": 4, "vocab": ["a", "b", "c"]},
            {"name": "ad_id", "cardinality": 1000, "vocab": []},
            {"name": "ad_cat", "cardinality": 6, "vocab": ["x1", "x2", "x3", "x4", "x5"]},
        ],
        "numeric": [
            {"name": "ctx_num", "lo": 0.0, "hi": 5.0, "mean": 2.0, "std": 1.0, "fill": 2.0},
            {"name": "price", "lo": -1.0, "hi": 3.0, "mean": 1.0, "std": 0.5, "fill": 1.0},
        ],
    }


def test_sampler_values_come_from_the_encoders() -> None:
    sampler = RequestSampler(_encoders(), CandidateCounts(50, 0.5, 200), oov_share=0.05)
    rng = np.random.default_rng(0)
    body = sampler.body(rng, 4000)
    assert set(body) == {"user", "context", "candidates"}
    assert list(body["user"]) == ["u_cat"] and list(body["context"]) == ["ctx_num"]
    cands = body["candidates"]
    assert sorted(cands) == ["ad_cat", "ad_id", "price"]
    assert all(len(v) == 4000 for v in cands.values())
    ad_cat = cands["ad_cat"]
    oov = [v for v in ad_cat if v.startswith(OOV_PREFIX)]
    assert set(ad_cat) - set(oov) <= {"x1", "x2", "x3", "x4", "x5"}
    assert 0.03 < len(oov) / len(ad_cat) < 0.07
    # frequency order: the first vocabulary entry is the most common
    counts = {v: ad_cat.count(v) for v in ("x1", "x2", "x5")}
    assert counts["x1"] > counts["x2"] > counts["x5"] > 0
    assert all(v.startswith("ad_id-") or v.startswith(OOV_PREFIX) for v in cands["ad_id"])
    prices = [v for v in cands["price"] if v is not None]
    assert min(prices) >= -1.0 and max(prices) <= 3.0  # the fitted range ("none" transform)
    assert abs(float(np.mean(prices)) - 1.0) < 0.05
    assert 0.03 < cands["price"].count(None) / 4000 < 0.07


def test_sampler_inverts_log1p_into_the_fitted_range() -> None:
    sampler = RequestSampler(_encoders(), oov_share=0.0)
    values = np.array(sampler.column(np.random.default_rng(2), "ctx_num", 2000))
    t = np.sign(values) * np.log1p(np.abs(values))
    assert t.min() >= 0.0 - 1e-3 and t.max() <= 5.0 + 1e-3
    assert abs(float(t.mean()) - 2.0) < 0.1
    assert invert_transform("log1p", np.array([math.log1p(99.0)]))[0] == pytest.approx(99.0)


def test_sampler_bodies_encode_with_the_models_own_encoders() -> None:
    from model.encoders import FeatureEncoders

    fitted = _encoders()
    encoders = FeatureEncoders.from_dict(fitted)
    body = RequestSampler(fitted).body(np.random.default_rng(3), 64)
    columns = {**{k: [v] * 64 for k, v in {**body["user"], **body["context"]}.items()},
               **body["candidates"]}
    cat, dense = encoders.transform(columns)
    assert cat.shape == (64, 3) and dense.shape == (64, 2)
    assert (cat[:, 2] > 0).mean() > 0.9  # mostly in-vocabulary


def test_candidate_count_distribution() -> None:
    n = CandidateCounts().sample(np.random.default_rng(0), 20_000)
    assert 280 <= np.median(n) <= 320
    assert n.min() >= 1 and n.max() == 2000  # the clip is reached: a heavy tail
    assert np.mean(n) > np.median(n) * 1.2  # right-skewed
    assert 0.005 < np.mean(n == 2000) < 0.03
    small = CandidateCounts(median=20, sigma=1.0, max_candidates=50).sample(
        np.random.default_rng(0), 5000)
    assert small.max() <= 50 and 17 <= np.median(small) <= 23


def test_pool_is_reproducible_and_valid_json() -> None:
    import json

    from service.schemas import ScoreRequest

    sampler = RequestSampler(_encoders(), CandidateCounts(30, 0.8, 100))
    a, b = sampler.pool(20, seed=5), sampler.pool(20, seed=5)
    assert a == b and sampler.pool(20, seed=6) != a
    for body, n in a:
        req = ScoreRequest.model_validate_json(body)
        assert req.columnar and req.num_candidates == n
        assert json.loads(body)["candidates"]


@pytest.mark.parametrize(("bad", "match"), [
    ({"median": 0}, "median"), ({"sigma": -1}, "sigma"), ({"max_candidates": 0}, "max"),
])
def test_candidate_counts_reject_bad_settings(bad, match) -> None:
    with pytest.raises(ValueError, match=match):
        CandidateCounts(**bad)


def test_sampler_rejects_unusable_encoders() -> None:
    with pytest.raises(ValueError, match="the encoders are not usable"):
        RequestSampler({"schema": {}})


# --- shapes and options --------------------------------------------------------------------


def test_shapes() -> None:
    s = steps([5, 10, 20], stage_s=2)
    assert [s.rate_at(t) for t in (0, 1.99, 2, 5.9, 6)] == [5, 5, 10, 20, None]
    b = bursts(10, 50, period_s=4, burst_s=1, duration_s=10)
    assert b.total_s == pytest.approx(10)
    mean = sum(d * r for d, r in b.stages) / b.total_s
    assert mean == pytest.approx((2 * (50 + 3 * 10) + 1 * 50 + 1 * 10) / 10)
    assert ArrivalSchedule.from_json(b.to_json()) == b
    with pytest.raises(ValueError):
        constant(5, 0)
    with pytest.raises(ValueError):
        ArrivalSchedule.from_json('{"a": 1}')


def test_burst_option_keeps_the_mean_offered_load() -> None:
    for step_s in (10, 3):  # whole burst periods, and a step shorter than one
        opts = LoadOptions(steps_rps=[20], step_s=step_s, shape="bursts", burst_factor=4)
        sched = opts.schedule(20)
        assert sched.total_s == pytest.approx(step_s)
        assert sum(d * r for d, r in sched.stages) / sched.total_s == pytest.approx(20)
        rates = [r for _, r in sched.stages]
        assert max(rates) == pytest.approx(4 * min(rates))


@pytest.mark.parametrize(("kw", "match"), [
    ({"slo_ms": 0}, "slo-ms"), ({"steps_rps": []}, "steps"), ({"steps_rps": [5, -1]}, "steps"),
    ({"step_s": 0}, "duration"), ({"shape": "ramp"}, "shape"),
])
def test_load_options_validation(kw, match) -> None:
    opts = LoadOptions(**{"steps_rps": [5], **kw})
    with pytest.raises(LoadTestError, match=match):
        opts.validate()


# --- CLI errors: one line, exit 2 ----------------------------------------------------------


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mldcn: error:") and "\n" not in err, err
    assert "Traceback" not in err and match in err, err


def test_slo_of_zero_is_one_line(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["loadtest", "compare", "--repo", str(tmp_path), "--slo-ms", "0",
                             "--out", str(tmp_path / "r")], "--slo-ms must be > 0")
    _one_line_error(capsys, ["loadtest", "run", "--url", "http://127.0.0.1:9", "--model", "m",
                             "--slo-ms", "0", "--out", str(tmp_path / "r")], "--slo-ms")


def test_server_down_is_one_line(capsys, tmp_path) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _one_line_error(capsys, ["loadtest", "run", "--url", f"http://127.0.0.1:{port}",
                             "--model", "mldcn", "--duration", "1",
                             "--out", str(tmp_path / "r")], "cannot reach a server")


def test_compare_with_a_missing_repository_is_one_line(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["loadtest", "compare", "--repo", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "r")], "nope")


def test_bad_steps_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["loadtest", "compare", "--repo", "x", "--steps", "5,fast"])
    assert e.value.code == 2
    assert "comma-separated rates" in capsys.readouterr().err

"""``mldcn loadtest compare`` and ``run``: load steps per model, SLO-bounded throughput, verdict.

The comparison: for repeat r = 1..R and for each model in order (A B A B …), start a fresh
``mldcn serve`` with that model alone (same flags, same cores), warm it up, then run every load
step as its own Locust process with the same arrival times and the same request bodies,
scraping ``/metrics`` before and after each step (:func:`loadtest.runner.measure_step`).

Per (model, repeat):

- a step *meets the SLO* when the client-side p99 of served requests is within the SLO and
  under 0.1% of its requests were not served (503/504, errors, client overflow);
- the *SLO-bounded throughput* is the highest offered load (requests/s) of a step that meets
  it (0 when none does).

Between the baseline A (first model) and the candidate B (second): per repeat, the ratio B/A of
SLO-bounded throughput, and the ratio B/A of client p99 at the reference load (the highest step
where A met the SLO in every repeat; the lowest step if none). Each ratio is summarised by its
median and its spread (min, max) over the repeats, and :func:`verdict` reads them.

Those ratios measure the models only when the models dominate the server's time. Each step
records the *compute share*: ONNX Runtime seconds (Δ ``mldcn_compute_duration_seconds_sum``,
wall time per batch around the ONNX Runtime call, times the server's intra-op threads) / server
CPU seconds (Δ ``process_cpu_seconds_total``, summed over worker processes), clipped to [0, 1],
None where the server does not export the CPU metric; and the server's CPU milliseconds outside
ONNX Runtime per answered request (:mod:`loadtest.runner`: the share is an upper bound of ONNX
Runtime's share of the CPU, so a share below 0.5 is conclusive). Each model's summary carries
its share at the reference load (median and range over the repeats; in a comparison the
baseline's reference load for both). When either model's median share there is below 0.5
(:data:`FRONT_END_SHARE`), the verdict is ``front-end-bound``: the ratios then compare the
servers' front ends (HTTP, JSON, encoding), not the models; they are still reported, with the
verdict they alone would give (``ratio_verdict``).

Example:
    >>> verdict([1.0, 1.0], [1.02, 0.97])
    'neutral'
    >>> verdict([0.5, 0.5], [1.6, 1.8])
    'more expensive'
    >>> verdict([1.5, 1.5], [0.7, 0.8])
    'cheaper'
    >>> verdict([1.5, 1.5], [0.7, 0.8], compute_shares=[0.3, 0.8])
    'front-end-bound'
    >>> verdict([1.5, 1.5], [0.7, 0.8], compute_shares=[0.8, None])
    'cheaper'
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.outcomes import MAX_UNSERVED_SHARE
from loadtest.runner import LoadTestError, measure_step, serve, split_cores
from loadtest.sampling import CandidateCounts, RequestSampler, write_pool

if TYPE_CHECKING:
    from export.meta import ModelMeta
    from export.repository import ModelVersion
from loadtest.shapes import ArrivalSchedule, bursts, constant

NEUTRAL_TOLERANCE = 0.05  # ratios within ±5% read as "the same cost"
FRONT_END_SHARE = 0.5  # below this ONNX Runtime share of server CPU, the ratios compare front ends
FRONT_END_BOUND = "front-end-bound"
SHAPES = ("constant", "bursts")


@dataclass
class LoadOptions:
    """Everything that defines the offered load; identical for every model compared."""

    steps_rps: list[float]
    step_s: float = 20.0
    slo_ms: float = 50.0
    shape: str = "constant"
    burst_factor: float = 4.0
    burst_period_s: float = 5.0
    burst_s: float = 1.0
    warmup_s: float = 5.0
    pool_size: int = 256
    median_candidates: float = 300.0
    sigma: float = 0.8
    max_candidates: int = 2000
    oov_share: float = 0.02
    seed: int = 0
    max_inflight: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not self.slo_ms > 0:
            raise LoadTestError(f"--slo-ms must be > 0, got {self.slo_ms:g}")
        if not self.steps_rps or any(not r > 0 for r in self.steps_rps):
            raise LoadTestError("--steps must be a comma-separated list of rates > 0 "
                                f"(requests/s), got {self.steps_rps}")
        if not self.step_s > 0:
            raise LoadTestError(f"--duration must be > 0 s, got {self.step_s:g}")
        if self.shape not in SHAPES:
            raise LoadTestError(f"--shape must be one of {SHAPES}, got {self.shape!r}")
        if self.warmup_s < 0:
            raise LoadTestError(f"--warmup must be >= 0 s, got {self.warmup_s:g}")
        if self.shape == "bursts" and not 0 < self.burst_s < self.burst_period_s:
            raise LoadTestError("bursts need 0 < burst_s < burst_period_s")
        try:
            CandidateCounts(self.median_candidates, self.sigma, self.max_candidates)
        except ValueError as e:
            raise LoadTestError(str(e)) from None

    def schedule(self, rate_rps: float) -> ArrivalSchedule:
        """The arrival schedule of one step whose mean offered load is ``rate_rps``."""
        if self.shape == "constant":
            return constant(rate_rps, self.step_s)
        # bursts at burst_factor x the base, scaled so that the step's mean is rate_rps
        unit = bursts(1.0, self.burst_factor, self.burst_period_s, self.burst_s, self.step_s)
        mean = sum(d * r for d, r in unit.stages) / unit.total_s
        return ArrivalSchedule(tuple((d, r * rate_rps / mean) for d, r in unit.stages))


def make_pool(meta: ModelMeta, opts: LoadOptions, path: Path,
              model: str | None = None) -> dict[str, Any]:
    """Write the request pool for a model; return its description for the report."""
    try:
        sampler = RequestSampler(
            meta.encoders, CandidateCounts(opts.median_candidates, opts.sigma, opts.max_candidates),
            oov_share=opts.oov_share, model=model)
    except ValueError as e:
        raise LoadTestError(str(e)) from None
    pool = sampler.pool(opts.pool_size, seed=opts.seed)
    write_pool(path, pool)
    sizes = sorted(n for _, n in pool)
    digest = hashlib.sha256(b"".join(b for b, _ in pool)).hexdigest()
    return {"requests": len(pool), "sha256": digest,
            "mean_candidates": statistics.fmean(sizes),
            "median_candidates": statistics.median(sizes), "max_candidates": sizes[-1],
            "mean_body_bytes": statistics.fmean(len(b) for b, _ in pool)}


def step_meets_slo(step: dict[str, Any], slo_ms: float) -> bool:
    """Client p99 of served requests within the SLO and under 0.1% not served."""
    c = step["client"]
    return (c["requests"] > 0 and c["p99_ms"] is not None and c["p99_ms"] <= slo_ms
            and c["unserved_share"] < MAX_UNSERVED_SHARE)


def slo_bounded(steps: Sequence[dict[str, Any]], slo_ms: float) -> dict[str, Any]:
    """The highest offered load of a step that meets the SLO (0 and None if none does).

    Example:
        >>> mk = lambda rps, p99, bad: {"offered_rps": rps, "client": {
        ...     "requests": 100, "p99_ms": p99, "unserved_share": bad,
        ...     "served_rows_per_s": rps * 300}}
        >>> slo_bounded([mk(10, 20, 0), mk(20, 40, 0), mk(40, 45, 0.2)], 50)["rps"]
        20
    """
    ok = [s for s in steps if step_meets_slo(s, slo_ms)]
    if not ok:
        return {"rps": 0.0, "rows_per_s": 0.0}
    best = max(ok, key=lambda s: s["offered_rps"])
    return {"rps": best["offered_rps"], "rows_per_s": best["client"]["served_rows_per_s"]}


def spread(values: Sequence[float | None]) -> dict[str, Any]:
    """Median, min and max of the defined values (None entries are skipped)."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {"median": None, "min": None, "max": None, "values": list(values)}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "values": list(values)}


def _ratio(b: float | None, a: float | None) -> float | None:
    if a is None or b is None or a == 0:
        return None
    return b / a


def _neutral(ratios: Sequence[float | None], tol: float) -> bool | None:
    """Neutral when the median is within ±tol of 1 or the spread covers 1.

    None (no evidence either way) when the ratio is defined in fewer than half of the repeats,
    for example when the baseline met the SLO at no step in most of them.
    """
    defined = [r for r in ratios if r is not None]
    if not defined or 2 * len(defined) < len(ratios):
        return None
    s = spread(defined)
    return abs(s["median"] - 1) <= tol or s["min"] <= 1 <= s["max"]


def front_end_bound(compute_shares: Sequence[float | None],
                    threshold: float = FRONT_END_SHARE) -> bool | None:
    """True when a model's compute share is below ``threshold``; None when that is unknown.

    ``compute_shares`` holds one share per model (its median over the repeats at the
    reference load). False only when every share is known and at least ``threshold``.
    """
    if any(x is not None and x < threshold for x in compute_shares):
        return True
    if any(x is None for x in compute_shares):
        return None
    return False


def verdict(throughput_ratios: Sequence[float | None], p99_ratios: Sequence[float | None],
            tol: float = NEUTRAL_TOLERANCE,
            compute_shares: Sequence[float | None] = ()) -> str:
    """``neutral``, ``cheaper``, ``more expensive``, ``front-end-bound`` or ``inconclusive``.

    Neutral when both ratios are neutral (median within ±tol, or the spread over the repeats
    covers 1); a ratio defined in fewer than half of the repeats does not count. Otherwise
    the SLO-bounded throughput ratio decides (higher is cheaper), or the p99 ratio when the
    throughput ratio is neutral or undefined (lower is cheaper). Any of these but
    ``inconclusive`` becomes ``front-end-bound`` when a model's compute share at the
    reference load (``compute_shares``, one per model) is below :data:`FRONT_END_SHARE`; an
    unknown share (None) does not change the verdict.
    """
    thr, lat = _neutral(throughput_ratios, tol), _neutral(p99_ratios, tol)
    if thr is None and lat is None:
        return "inconclusive"
    if front_end_bound(compute_shares):
        return FRONT_END_BOUND
    if thr in (True, None) and lat in (True, None):
        return "neutral"
    if thr is False:
        return "cheaper" if spread(throughput_ratios)["median"] > 1 else "more expensive"
    return "cheaper" if spread(p99_ratios)["median"] < 1 else "more expensive"


def compute_per_krow(step: dict[str, Any]) -> float | None:
    """ONNX Runtime milliseconds per 1,000 scored rows in a step (the model's own cost)."""
    sv = step.get("server") or {}
    if sv.get("compute_ms_per_1k_rows") is not None:
        return sv["compute_ms_per_1k_rows"]
    if sv.get("mean_compute_ms") is None or not sv.get("mean_batch_rows"):
        return None
    return sv["mean_compute_ms"] / sv["mean_batch_rows"] * 1e3


def reference_step(runs: list[dict[str, Any]], slo_ms: float) -> tuple[int, bool]:
    """(index, met): the highest step that met the SLO in every repeat, else (0, False)."""
    n_steps = len(runs[0]["steps"])
    met_all = [i for i in range(n_steps)
               if all(step_meets_slo(r["steps"][i], slo_ms) for r in runs)]
    return (max(met_all), True) if met_all else (0, False)


def step_share(step: dict[str, Any]) -> float | None:
    """A step's compute share (None in a report from before it was recorded)."""
    return (step.get("server") or {}).get("compute_share")


def share_at(runs: list[dict[str, Any]], ref: int) -> dict[str, Any]:
    """The compute share at step ``ref`` over the repeats (:func:`spread`)."""
    return spread([step_share(r["steps"][ref]) for r in runs])


def model_summary(runs: list[dict[str, Any]], slo_ms: float,
                  ref: int | None = None) -> dict[str, Any]:
    """Per-step medians over the repeats of one model, its SLO-bounded throughput, and its
    compute share at the reference load: step ``ref`` (in a comparison, the baseline's), by
    default the model's own (:func:`reference_step`)."""
    n_steps = len(runs[0]["steps"])
    if ref is None:
        ref = reference_step(runs, slo_ms)[0]
    steps = []
    for i in range(n_steps):
        per = [r["steps"][i] for r in runs]

        def med(side: str, key: str, per: list[dict[str, Any]] = per) -> float | None:
            return spread([s[side].get(key) for s in per])["median"]

        outcomes: dict[str, int] = {}
        for s in per:
            for k, v in s["client"]["outcomes"].items():
                outcomes[k] = outcomes.get(k, 0) + v
        steps.append({
            "offered_rps": per[0]["offered_rps"],
            "client": {k: med("client", k) for k in (
                "p50_ms", "p95_ms", "p99_ms", "achieved_rps", "served_rows_per_s",
                "unserved_share", "max_lag_ms")},
            "server": {**{k: med("server", k) for k in (
                "p50_ms", "p95_ms", "p99_ms", "scored_rows_per_s", "mean_batch_rows",
                "mean_compute_ms", "mean_queue_ms", "compute_busy_share", "compute_share",
                "outside_ort_ms_per_request")},
                "compute_ms_per_1k_rows": spread([compute_per_krow(s) for s in per])["median"]},
            "outcomes": outcomes,
            "meets_slo": [step_meets_slo(s, slo_ms) for s in per],
            "client_p99_ms_by_repeat": [s["client"]["p99_ms"] for s in per],
        })
    bounded = [slo_bounded(r["steps"], slo_ms) for r in runs]
    return {"steps": steps, "slo_bounded_rps": spread([b["rps"] for b in bounded]),
            "slo_bounded_rows_per_s": spread([b["rows_per_s"] for b in bounded]),
            "reference_rps": runs[0]["steps"][ref]["offered_rps"],
            "compute_share_at_reference": share_at(runs, ref),
            "outside_ort_ms_per_request_at_reference": spread([
                (r["steps"][ref].get("server") or {}).get("outside_ort_ms_per_request")
                for r in runs])}


def comparison(base: list[dict[str, Any]], cand: list[dict[str, Any]],
               slo_ms: float) -> dict[str, Any]:
    """Ratios candidate/baseline per repeat, their spreads, both models' compute shares at
    the reference load, and the verdict (``ratio_verdict``: the ratios' alone)."""
    thr = [_ratio(slo_bounded(b["steps"], slo_ms)["rps"], slo_bounded(a["steps"], slo_ms)["rps"])
           for a, b in zip(base, cand, strict=True)]
    n_steps = len(base[0]["steps"])
    ref, met = reference_step(base, slo_ms)
    p99 = [_ratio(b["steps"][ref]["client"]["p99_ms"], a["steps"][ref]["client"]["p99_ms"])
           for a, b in zip(base, cand, strict=True)]
    per_step = [spread([_ratio(b["steps"][i]["client"]["p99_ms"],
                               a["steps"][i]["client"]["p99_ms"])
                        for a, b in zip(base, cand, strict=True)])
                for i in range(n_steps)]
    compute = [spread([_ratio(compute_per_krow(sb), compute_per_krow(sa))
                       for sa, sb in zip(a["steps"], b["steps"], strict=True)])["median"]
               for a, b in zip(base, cand, strict=True)]
    shares = {"baseline": share_at(base, ref), "candidate": share_at(cand, ref)}
    medians = [shares["baseline"]["median"], shares["candidate"]["median"]]
    return {
        "slo_bounded_throughput_ratio": spread(thr),
        "reference_rps": base[0]["steps"][ref]["offered_rps"],
        "reference_met_slo": met,
        "p99_ratio_at_reference": spread(p99),
        "p99_ratio_by_step": per_step,
        "compute_per_row_ratio": spread(compute),
        "tolerance": NEUTRAL_TOLERANCE,
        "compute_share_at_reference": shares,
        "front_end_share_threshold": FRONT_END_SHARE,
        "front_end_bound": front_end_bound(medians),
        "ratio_verdict": verdict(thr, p99),
        "verdict": verdict(thr, p99, compute_shares=medians),
    }


def _model_version(repo: Path, name: str) -> ModelVersion:
    from export.repository import ModelRepository, RepositoryError

    try:
        version = ModelRepository(repo).load_version(name)
        version.meta  # noqa: B018 (parsed and checked now: LoadTestError, not later)
        return version
    except (RepositoryError, OSError, ValueError) as e:
        raise LoadTestError(str(e)) from None


def _cost(meta: ModelMeta) -> dict[str, Any]:
    return {"arch": meta.model.arch, "flops_per_example": meta.cost.flops_per_example,
            "params": meta.cost.params, "precision": meta.precision,
            "valid_auc": (meta.metrics.get("valid") or {}).get("auc")}


def environment(server_cores: list[int], client_cores: list[int]) -> dict[str, Any]:
    """The machine the numbers were taken on (load averages show a shared machine)."""
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "server_cores": server_cores,
            "client_cores": client_cores, "loadavg_at_start": [round(x, 2) for x in load]}


def run_compare(repo: Path, models: list[str], opts: LoadOptions, repeats: int, out: Path,
                log: Callable[[str], None] = print, command: str | None = None
                ) -> dict[str, Any]:
    """Run the A B A B comparison; write the report into ``out``; return its JSON."""
    opts.validate()
    if len(models) != 2 or models[0] == models[1]:
        raise LoadTestError(f"--models needs two different names (baseline,candidate), "
                            f"got {models}")
    if repeats < 1:
        raise LoadTestError(f"--repeats must be >= 1, got {repeats}")
    versions = {m: _model_version(repo, m) for m in models}
    metas = {m: v.meta for m, v in versions.items()}
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    pools = {m: make_pool(metas[m], opts, raw / f"pool_{m}.jsonl") for m in models}
    server_cores, client_cores = split_cores()
    env = environment(server_cores, client_cores)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in models}
    t_start = time.monotonic()
    for rep in range(repeats):
        for m in models:
            log(f"repeat {rep + 1}/{repeats}, model {m}: starting mldcn serve")
            runs[m].append(_run_model(repo, m, opts, raw, f"{m}_r{rep + 1}", server_cores,
                                      client_cores, log, repeat=rep + 1))
    env["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    env["wall_s"] = round(time.monotonic() - t_start, 1)
    report = rebuild({
        "kind": "compare", "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "baseline": models[0], "candidate": models[1], "repeats": repeats,
        "options": asdict(opts), "environment": env,
        "models": {m: {**_cost(metas[m]), "version": versions[m].version,
                       "pool": pools[m]} for m in models},
        "runs": runs,
    })
    from loadtest.report import write_report

    write_report(report, out)
    return report


def rebuild(report: dict[str, Any]) -> dict[str, Any]:
    """(Re)compute the per-model summaries and the comparison from the report's raw runs."""
    slo_ms = report["options"]["slo_ms"]
    ref = (reference_step(report["runs"][report["baseline"]], slo_ms)[0]
           if report["kind"] == "compare" else None)
    for m, runs in report["runs"].items():
        report["models"][m].update(model_summary(runs, slo_ms, ref))
    if report["kind"] == "compare":
        report["comparison"] = comparison(report["runs"][report["baseline"]],
                                          report["runs"][report["candidate"]], slo_ms)
    return report


def _run_model(repo: Path, model: str, opts: LoadOptions, raw: Path, tag: str,
               server_cores: list[int], client_cores: list[int],
               log: Callable[[str], None], repeat: int) -> dict[str, Any]:
    pool_path = raw / f"pool_{model}.jsonl"
    with serve(repo, model, opts.slo_ms, server_cores) as server:
        return _run_steps(server.url, model, opts, pool_path, raw, tag, client_cores, log,
                          repeat, ort_threads=max(1, len(server_cores)))


def _run_steps(url: str, model: str, opts: LoadOptions, pool_path: Path, raw: Path, tag: str,
               client_cores: list[int], log: Callable[[str], None],
               repeat: int = 1, ort_threads: int = 1) -> dict[str, Any]:
    if opts.warmup_s > 0:
        measure_step(url, model, pool_path, constant(min(opts.steps_rps), opts.warmup_s),
                     raw / f"{tag}_warmup", opts.slo_ms, opts.seed + 999, client_cores,
                     opts.max_inflight, ort_threads)
    steps = []
    for i, rate in enumerate(opts.steps_rps):
        step = measure_step(url, model, pool_path, opts.schedule(rate),
                            raw / f"{tag}_step{i + 1}", opts.slo_ms, opts.seed + i,
                            client_cores, opts.max_inflight, ort_threads)
        c = step["client"]
        log(f"  {model} step {i + 1}/{len(opts.steps_rps)}: offered {rate:g} req/s, "
            f"served {c['achieved_rps']:.1f} req/s ({c['served_rows_per_s']:.0f} rows/s), "
            f"p99 {_fmt(c['p99_ms'])} ms, not served {100 * (c['unserved_share'] or 0):.2f}%")
        steps.append(step)
    return {"model": model, "repeat": repeat, "steps": steps}


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def run_single(url: str, model: str, meta: ModelMeta, opts: LoadOptions, out: Path,
               log: Callable[[str], None] = print, server_info: dict[str, Any] | None = None,
               include_model_field: bool = True, command: str | None = None
               ) -> dict[str, Any]:
    """Load steps against one model on an already running server; report into ``out``."""
    opts.validate()
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "raw"
    raw.mkdir(exist_ok=True)
    pool = make_pool(meta, opts, raw / f"pool_{model}.jsonl",
                     model=model if include_model_field else None)
    local = url.startswith(("http://127.", "http://localhost", "http://[::1]"))
    server_cores, client_cores = split_cores() if local else ([], [])
    env = environment(server_cores, client_cores)
    t_start = time.monotonic()
    run = _run_steps(url, model, opts, raw / f"pool_{model}.jsonl", raw, model,
                     client_cores, log)
    env["wall_s"] = round(time.monotonic() - t_start, 1)
    report = rebuild({
        "kind": "run", "url": url, "command": command,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "options": asdict(opts), "environment": env, "server": server_info or {},
        "models": {model: {**_cost(meta), "pool": pool}},
        "runs": {model: [run]},
    })
    from loadtest.report import write_report

    write_report(report, out)
    return report


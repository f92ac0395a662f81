"""``mldcn bench serve``: this service against the servers users would pick instead.

The same model file, the same requests, the same core, the same open-loop load, side by side:

- ``v1``: ``mldcn serve``, ``POST /v1/score`` with columnar JSON (the domain API);
- ``v2``: ``mldcn serve``, ``POST /v2/models/{name}/infer`` with the rows already encoded
  (binary ``cat_ids``/``dense`` tensors: :func:`loadtest.peers.bodies.service_infer_encoded`),
  the service's fastest path: the floor of what its HTTP front end costs;
- ``v2raw``: the same route with binary raw-feature tensors (user/context once, candidates per
  row: :func:`loadtest.peers.bodies.service_infer`);
- ``fastapi``: a plain FastAPI scorer (pydantic, sync endpoint, no batching;
  :mod:`loadtest.peers.fastapi_scorer`) with the same JSON body;
- ``pytriton``: NVIDIA PyTriton (Triton's C++ HTTP front end and dynamic batcher, a Python model
  that encodes and runs ONNX Runtime; :mod:`loadtest.peers.pytriton_scorer`) with binary v2
  tensors, every field repeated to N rows as Triton batches them.

Every server runs alone on the server core(s) with one ONNX Runtime thread; this process (the
client) is pinned to another core. For each model and server, in turn (the servers alternate
within each model):

1. *Own time*: ``--sequential`` requests one at a time; the server's CPU time per request (its
   whole process tree, from /proc) minus the ONNX Runtime time of the same batch measured
   in-process on the same core (:func:`ort_ms`) is the server's own time outside ONNX Runtime.
   For ``mldcn serve`` the app's own clock is also read: ``timing.total_ms - compute_ms``.
2. *Saturation*: ``--connections`` closed-loop connections for ``--saturation-s``: the answered
   requests per second (budget 1 s: nothing is refused for time).
3. *Open loop*: Poisson arrivals (:mod:`loadtest.openloop`, seeded: every server gets the same
   arrival times and bodies) at each rate of ``--rates`` (fractions of the model's
   ONNX-Runtime-only capacity, 1 / ORT time), each for ``--step-s`` seconds or as long as
   ``--min-requests`` arrivals take (at most ``--max-step-s``), so that the 0.1% criterion
   rests on enough requests; ``mldcn serve`` gets a budget
   of ``--slo-ms`` (header), the reference servers have none. Per rate: client p50/p99 of
   answered requests (from the scheduled arrival), the unserved share (errors, timeouts,
   503/504, client overflow), and whether the step meets the SLO (p99 ≤ SLO and < 0.1%
   unserved); a server's sweep stops after ``--stop-after`` steps that miss it (past its
   capacity). The *SLO-bounded throughput* is the highest rate that meets it; for
   ``mldcn serve``, each step also reports the admission predictor's error (actual ÷ predicted
   time from the decision to scored, from ``mldcn_admission_ratio``), its refusals and misses,
   and what an oracle (a FIFO server that knows every service time) would have had to refuse
   at the same arrivals (:func:`oracle_refusals`).

Writes JSON (``--out``) and prints a table. Needs ``nvidia-pytriton`` for the ``pytriton``
server (``pip install --no-deps -r loadtest/peers/requirements-pytriton.txt``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from export.meta import ModelMeta
from loadtest import promscrape
from loadtest.openloop import (
    RequestSpec,
    ResponseParser,
    address,
    arrival_times,
    request_bytes,
    run_open_loop,
)
from loadtest.outcomes import MAX_UNSERVED_SHARE
from loadtest.runner import (
    LoadTestError,
    Server,
    clean_env,
    free_port,
    launch,
    serve_command,
    split_cores,
)
from loadtest.sampling import CandidateCounts, RequestSampler
from loadtest.shapes import ArrivalSchedule
from model.bench.results import machine, write_result

SERVERS = ("v1", "v2", "v2raw", "fastapi", "pytriton")
MLDCN_SERVERS = ("v1", "v2", "v2raw")
SERVER_LABELS = {"v1": "mldcn /v1/score (JSON)", "v2": "mldcn /v2 encoded (binary)",
                 "v2raw": "mldcn /v2 features (binary)", "fastapi": "plain FastAPI",
                 "pytriton": "PyTriton"}
SATURATION_BUDGET_MS = 1000.0


# -- requests -----------------------------------------------------------------------------------
def request_pool(meta: ModelMeta, model: str, server: str, candidates: int, size: int,
                 seed: int) -> list[RequestSpec]:
    """``size`` requests of ``candidates`` candidates for ``server`` (the same bodies, in the
    form that server takes)."""
    from loadtest.peers import bodies

    sampler = RequestSampler(meta.encoders, CandidateCounts(candidates, 0.0, candidates))
    rng = np.random.default_rng(seed)
    encoders = meta.feature_encoders
    out = []
    for _ in range(size):
        body = sampler.body(rng, candidates)
        if server in ("v1", "fastapi"):
            built = bodies.score_json({**body, "model": model} if server == "v1" else body)
        elif server == "v2":
            built = bodies.service_infer_encoded(body, model, encoders)
        elif server == "v2raw":
            built = bodies.service_infer(body, model, encoders.schema)
        else:
            built = bodies.triton_infer(body, model, encoders.schema)
        out.append(RequestSpec(built.path, dict(built.headers), built.body, built.candidates))
    return out


def with_budget(requests: Sequence[RequestSpec], slo_ms: float) -> list[RequestSpec]:
    """The requests with ``X-Request-Timeout-Ms`` (the budget ``mldcn serve`` enforces)."""
    return [r._replace(headers={**r.headers, "X-Request-Timeout-Ms": f"{slo_ms:g}"})
            for r in requests]


# -- servers ------------------------------------------------------------------------------------
@contextmanager
def start(server: str, repo: Path, model: str, cores: Sequence[int]) -> Iterator[Server]:
    """One server of the benchmark on a free port, pinned to ``cores``, one ORT thread."""
    port = free_port()
    env = clean_env()
    if server in MLDCN_SERVERS:
        cmd = serve_command(repo, model, SATURATION_BUDGET_MS, port, (),
                            ["--intra-op-threads", "1", "--max-queue-size", "1024"])
        ready = "/v2/health/ready"
    elif server == "fastapi":
        cmd = [sys.executable, "-m", "loadtest.peers.fastapi_scorer", "--repo", str(repo),
               "--model", model, "--port", str(port), "--threads", "1"]
        ready = "/v2/health/ready"
    elif server == "pytriton":
        cmd = [sys.executable, "-m", "loadtest.peers.pytriton_scorer", "--repo", str(repo),
               "--model", model, "--port", str(port), "--threads", "1"]
        ready = "/v2/health/ready"
    else:
        raise LoadTestError(f"unknown server {server!r} (servers: {', '.join(SERVERS)})")
    with launch(cmd, f"{server} server", cores, env, ready, port=port,
                start_timeout_s=180.0) as s:
        yield s


def ort_ms(onnx_path: Path, cardinalities: Sequence[int], num_dense: int, rows: int,
           cores: Sequence[int], runs: int = 200) -> float:
    """Median milliseconds of one ONNX Runtime call on ``rows`` rows (1 thread), measured in
    a child pinned to ``cores`` (the servers' core) on real-shaped inputs: each field's ids
    drawn over its whole vocabulary (``cardinalities``), so the embedding gathers touch as
    much of the tables as served traffic does."""
    import subprocess

    code = (
        "import sys, time, numpy as np, onnxruntime as ort\n"
        "o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1\n"
        "o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL\n"
        "s = ort.InferenceSession(sys.argv[1], o, providers=['CPUExecutionProvider'])\n"
        "n, d, runs = map(int, sys.argv[2:5])\n"
        "card = np.array([int(x) for x in sys.argv[5].split(',')])\n"
        "u = np.random.default_rng(0).random((n, len(card)))\n"
        "cat = np.minimum((u * card).astype(np.int64), card - 1)\n"
        "dense = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)\n"
        "f = {'cat_ids': cat, 'dense': dense}\n"
        "[s.run(None, f) for _ in range(20)]\n"
        "t = []\n"
        "for _ in range(runs):\n"
        "    a = time.perf_counter(); s.run(None, f); t.append(time.perf_counter() - a)\n"
        "print(float(np.median(t)) * 1e3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(onnx_path), str(rows),
                          str(num_dense), str(runs), ",".join(map(str, cardinalities))],
                         capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: os.sched_setaffinity(0, set(cores)))
    if out.returncode != 0:
        raise LoadTestError(f"measuring ONNX Runtime failed: {out.stderr.strip()[-300:]}")
    return float(out.stdout.strip())


# -- closed loop ----------------------------------------------------------------------------------
async def _closed_loop(url: str, requests: Sequence[RequestSpec], connections: int,
                       duration_s: float, count: int | None, read_timing: bool
                       ) -> dict[str, Any]:
    """``connections`` keep-alive connections sending back to back for ``duration_s`` (or
    until ``count`` answers)."""
    addr, netloc, prefix = address(url)
    raw = [request_bytes(netloc, prefix, r) for r in requests]
    stop_at = time.monotonic() + duration_s
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    app_own: list[float] = []

    async def one(k: int) -> None:
        reader, writer = await asyncio.open_connection(*addr)
        parser = ResponseParser()
        i = k
        try:
            while time.monotonic() < stop_at and (count is None or len(latencies) < count):
                t0 = time.perf_counter()
                writer.write(raw[i % len(raw)])
                i += connections
                answers: list[Any] = []
                while not answers:
                    data = await reader.read(1 << 16)
                    if not data:
                        raise ConnectionError("the server closed the connection")
                    answers = parser.feed(data)
                latencies.append((time.perf_counter() - t0) * 1e3)
                resp = answers[0]
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if read_timing and resp.status == 200:
                    t = json.loads(resp.body)["timing"]
                    app_own.append(t["total_ms"] - t["compute_ms"])
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(connections)))
    return {"elapsed_s": time.perf_counter() - t0, "statuses": statuses,
            "latency_ms": latencies, "app_own_ms": app_own}


def closed_loop(url: str, requests: Sequence[RequestSpec], connections: int, duration_s: float,
                count: int | None = None, read_timing: bool = False) -> dict[str, Any]:
    """Closed-loop load (see :func:`_closed_loop`): elapsed seconds, answers by status,
    latencies, and for ``mldcn serve`` (``read_timing``) the app's own time per answer."""
    return asyncio.run(_closed_loop(url, requests, connections, duration_s, count,
                                    read_timing))


def sequential_latencies(url: str, requests: Sequence[RequestSpec], count: int) -> list[float]:
    """Milliseconds of ``count`` requests sent one at a time (after 20 unmeasured ones);
    LoadTestError if any is not a 200."""
    closed_loop(url, requests, 1, 60.0, count=20)
    r = closed_loop(url, requests, 1, 600.0, count=count)
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    if bad:
        raise LoadTestError(f"sequential requests answered {bad}")
    return r["latency_ms"]


def own_time(server: Server, requests: Sequence[RequestSpec], count: int, ort_ms_: float,
             is_mldcn: bool) -> dict[str, Any]:
    """``count`` requests one at a time: the server's CPU per request, and its part outside
    ONNX Runtime (CPU per request minus the in-process ORT time of the same batch)."""
    closed_loop(server.url, requests, 1, 60.0, count=50)  # warm connections and caches
    cpu0 = server.cpu_s()
    r = closed_loop(server.url, requests, 1, 600.0, count=count, read_timing=is_mldcn)
    cpu = server.cpu_s() - cpu0
    bad = {k: v for k, v in r["statuses"].items() if k != 200}
    if bad:
        raise LoadTestError(f"sequential requests answered {bad}")
    n = len(r["latency_ms"])
    per_req = cpu / n * 1e3
    own = r["app_own_ms"]
    return {"requests": n, "server_cpu_ms": per_req, "ort_ms": ort_ms_,
            "outside_ort_ms": per_req - ort_ms_,
            "client_p50_ms": float(np.median(r["latency_ms"])),
            "app_total_minus_compute_p50_ms": float(np.median(own)) if own else None,
            "sequential_rps": n / r["elapsed_s"]}


# -- open loop ----------------------------------------------------------------------------------
def oracle_refusals(times_s: np.ndarray, service_ms: float, budget_ms: float) -> float:
    """The share of arrivals a FIFO single server with a known, fixed service time must refuse
    so that every request it takes finishes within ``budget_ms`` of its arrival.

    Example:
        >>> oracle_refusals(np.array([0.0, 0.001, 0.002]), service_ms=10, budget_ms=25)
        0.3333333333333333
    """
    free, refused = 0.0, 0
    s, b = service_ms / 1e3, budget_ms / 1e3
    for t in times_s:
        start = max(free, t)
        if start + s - t > b:
            refused += 1
            continue
        free = start + s
    return refused / len(times_s) if len(times_s) else 0.0


def _ratio_quantiles(before: promscrape.Samples, after: promscrape.Samples, model: str
                     ) -> dict[str, float | None]:
    buckets = promscrape.histogram_delta(before, after, "mldcn_admission_ratio", model=model)
    return {f"p{int(q * 100)}": promscrape.histogram_quantile(q, buckets)
            for q in (0.5, 0.9, 0.99)}


def step(server: Server, requests: Sequence[RequestSpec], rate_rps: float, step_s: float,
         slo_ms: float, seed: int, model: str, is_mldcn: bool) -> dict[str, Any]:
    """One open-loop step: client and (for mldcn serve) server statistics."""
    schedule = ArrivalSchedule(((step_s, rate_rps),))
    before = promscrape.scrape(server.url) if is_mldcn else {}
    cpu0 = server.cpu_s()
    result = run_open_loop(server.url, requests, schedule, seed=seed, max_connections=512,
                           timeout_s=10.0)
    cpu = server.cpu_s() - cpu0
    after = promscrape.scrape(server.url) if is_mldcn else {}
    kinds = result["stages"][0]
    total = sum(k["count"] for k in kinds.values())
    served = kinds.get("ok", {"count": 0, "latency_ms": []})
    lat = served["latency_ms"]
    unserved = total - served["count"]
    out: dict[str, Any] = {
        "offered_rps": rate_rps, "duration_s": step_s, "requests": total,
        "served": served["count"],
        "unserved_share": unserved / total if total else None,
        "outcomes": {k: v["count"] for k, v in kinds.items()},
        "p50_ms": float(np.percentile(lat, 50)) if lat else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat else None,
        "client_p99_lag_ms": result.get("p99_lag_s", 0.0) * 1e3,
        "server_cpu_share": cpu / step_s,
    }
    out["meets_slo"] = bool(lat and out["p99_ms"] <= slo_ms
                            and out["unserved_share"] < MAX_UNSERVED_SHARE)
    if is_mldcn:
        out["admission_ratio"] = _ratio_quantiles(before, after, model)
        rejected = {dict(k[1]).get("reason"): promscrape.counter_delta(
            before, after, "mldcn_rejected_requests_total", **dict(k[1]))
            for k in after if k[0] == "mldcn_rejected_requests_total"}
        out["refused_by_reason"] = {k: int(v) for k, v in rejected.items() if v}
    return out


def slo_bounded(steps: Sequence[dict[str, Any]]) -> float:
    """The highest offered rate whose step meets the SLO (0 when none does)."""
    return max((s["offered_rps"] for s in steps if s["meets_slo"]), default=0.0)


# -- the benchmark --------------------------------------------------------------------------------
def run(repo: Path, models: dict[str, str], servers: Sequence[str], opts: argparse.Namespace
        ) -> dict[str, Any]:
    from export.repository import ModelRepository

    server_cores, client_cores = split_cores()
    if hasattr(os, "sched_setaffinity") and client_cores:
        os.sched_setaffinity(0, set(client_cores))
    result: dict[str, Any] = {
        "machine": machine("onnxruntime", server_cores=server_cores, client_cores=client_cores),
        "candidates": opts.candidates, "slo_ms": opts.slo_ms, "step_s": opts.step_s,
        "rates": list(opts.rates), "models": {},
    }
    for size, name in models.items():
        mv = ModelRepository(repo).load_version(name)
        meta = mv.meta
        cards, num_dense = meta.model.cardinalities, meta.model.num_dense
        ort = ort_ms(mv.onnx_path, cards, num_dense, opts.candidates, server_cores)
        capacity = 1e3 / ort
        entry: dict[str, Any] = {
            "model": name, "arch": meta.model.arch,
            "flops_per_example": meta.cost.flops_per_example, "ort_ms": ort,
            "ort_capacity_rps": capacity, "servers": {}}
        result["models"][size] = entry
        rates = [round(f * capacity, 1) for f in opts.rates]
        for server in servers:
            print(f"[{size}] {SERVER_LABELS[server]} ...", file=sys.stderr, flush=True)
            pool = request_pool(meta, name, server, opts.candidates, opts.pool, opts.seed)
            is_mldcn = server in MLDCN_SERVERS
            with start(server, repo, name, server_cores) as srv:
                own = own_time(srv, pool, opts.sequential, ort, server == "v1")
                sat = closed_loop(srv.url, pool, opts.connections, opts.saturation_s)
                ok = sat["statuses"].get(200, 0)
                budgeted = with_budget(pool, opts.slo_ms) if is_mldcn else pool
                steps: list[dict[str, Any]] = []
                for rate in rates:
                    if sum(not x["meets_slo"] for x in steps) >= opts.stop_after:
                        break  # well past this server's capacity
                    step_s = min(max(opts.step_s, opts.min_requests / rate), opts.max_step_s)
                    st = step(srv, budgeted, rate, step_s, opts.slo_ms, opts.seed, name,
                              is_mldcn)
                    if server == "v1":
                        t, _ = arrival_times(ArrivalSchedule(((step_s, rate),)), opts.seed)
                        st["oracle_refused_share"] = oracle_refusals(
                            t, own["server_cpu_ms"], opts.slo_ms)
                    steps.append(st)
                    print(f"    {rate:8.1f} req/s: p99 {_f(st['p99_ms'])} ms, unserved "
                          f"{st['unserved_share']:.2%}", file=sys.stderr, flush=True)
            entry["servers"][server] = {
                "label": SERVER_LABELS[server], "own_time": own,
                "saturated_rps": ok / sat["elapsed_s"],
                "saturation_statuses": sat["statuses"], "steps": steps,
                "slo_bounded_rps": slo_bounded(steps)}
        _ratios(entry)
    return result


def _ratios(entry: dict[str, Any]) -> None:
    """The ratios the acceptance reads: v1 against v2 and against the reference servers."""
    s = entry["servers"]
    out: dict[str, Any] = {}
    if "v1" in s and "v2" in s and s["v2"]["saturated_rps"]:
        out["v1_over_v2_saturated"] = s["v1"]["saturated_rps"] / s["v2"]["saturated_rps"]
    for peer in ("fastapi", "pytriton"):
        if "v1" in s and peer in s:
            ref = s[peer]["slo_bounded_rps"]
            out[f"v1_over_{peer}_slo_bounded"] = (s["v1"]["slo_bounded_rps"] / ref if ref
                                                 else None)
    entry["ratios"] = out


def _f(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The printed summary (also the README table's source)."""
    hw = result["machine"]  # "processor" in results written before the shared writer
    lines = [f"{hw.get('cpu', hw.get('processor'))}; server on cores "
             f"{result['machine']['server_cores']}, client on {result['machine']['client_cores']};"
             f" {result['candidates']} candidates per request, SLO p99 <= {result['slo_ms']:g} ms"
             f" and < 0.1% unserved"]
    for size, m in result["models"].items():
        lines.append(f"\n{size}: {m['model']} ({m['arch']}, {m['flops_per_example'] / 1e6:.2f} "
                     f"MFLOPs/example), ONNX Runtime {m['ort_ms']:.2f} ms per request "
                     f"(capacity {m['ort_capacity_rps']:.0f} req/s)")
        lines.append(f"  {'server':<26} {'own ms':>7} {'app ms':>7} {'sat. req/s':>11} "
                     f"{'SLO-bounded':>12}  p99 ms per rate")
        for s in m["servers"].values():
            own = s["own_time"]
            p99 = " ".join(_f(st["p99_ms"], 0) if st["meets_slo"] else
                           f"({_f(st['p99_ms'], 0)})" for st in s["steps"])
            lines.append(f"  {s['label']:<26} {own['outside_ort_ms']:7.3f} "
                         f"{_f(own['app_total_minus_compute_p50_ms'], 3):>7} "
                         f"{s['saturated_rps']:11.0f} {s['slo_bounded_rps']:12.0f}  {p99}")
        for k, v in m.get("ratios", {}).items():
            lines.append(f"  {k}: {_f(v, 2)}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """``mldcn bench serve`` (the options: service/cli.py)."""
    from model.cliargs import comma_list

    parts = comma_list(args.models)
    bad = [p for p in parts if "=" not in p or not all(p.split("=", 1))]
    if bad or not parts:
        raise LoadTestError(f"--models takes SIZE=NAME pairs, e.g. small=mldcn-small, got "
                            f"{args.models!r}")
    models = dict(part.split("=", 1) for part in parts)
    servers = comma_list(args.servers)
    unknown = [s for s in servers if s not in SERVERS]
    if unknown:
        raise LoadTestError(f"unknown servers {unknown} (servers: {', '.join(SERVERS)})")
    if isinstance(args.rates, str):
        text, args.rates = args.rates, comma_list(args.rates, float, "rates")
        if not args.rates:
            raise LoadTestError(f"--rates must list at least one rate, got {text!r}")
    result = run(Path(args.repo).resolve(), models, servers, args)
    return write_result(args.out, result, format_table(result))

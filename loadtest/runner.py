"""Processes of a load test: the ``mldcn serve`` under test, Locust steps, and /metrics deltas.

Every child runs in its own process group (``start_new_session``) and is killed with its group
in a ``finally``; every wait is bounded. Where the machine has two or more cores, the server and
the load generator are pinned to disjoint cores (:func:`split_cores`) so that Locust's own CPU
does not steal from the model being measured.

Where the server's time goes (:func:`server_step_stats`): per step, the *server CPU seconds*
are the increase of ``process_cpu_seconds_total`` (the standard Prometheus process metric,
summed over its series: with several worker processes, the sum over the workers; None when the
server does not export it) and the *ONNX Runtime seconds* are the increase of
``mldcn_compute_duration_seconds_sum`` over the model's series (wall time per batch, measured
around the ONNX Runtime call). A batch run with ``ort_threads`` intra-op threads can cost up
to that many CPU seconds per wall second, so the *compute share* is ``ort_threads`` · ORT
seconds / CPU seconds, clipped to [0, 1] (:func:`compute_share`), and the server's own time
outside ONNX Runtime per request is (CPU seconds - ``ort_threads`` · ORT seconds) / requests
answered (all codes), clipped at 0 (:func:`outside_ort_ms_per_request`). Both are bounds: the
share an upper bound of ONNX Runtime's part of the server's CPU (a batch's wall time can only
exceed the CPU its threads spend, e.g. when the event loop pre-empts them), the outside time a
lower bound, so a share below 0.5 is conclusive. :func:`serve` pins the server to its cores and
passes ``--intra-op-threads`` = their count, and the runner passes that count as
``ort_threads`` (one, on the two-core split); a server the runner did not start is counted
with one thread. The CPU seconds are the whole server's: the share is the model's when the
server serves that model alone (as ``compare`` runs it).

Example:
    >>> split_cores({0, 1})
    ([0], [1])
    >>> split_cores({0, 1, 2, 3})
    ([0, 1, 2], [3])
    >>> split_cores({5})
    ([5], [5])
    >>> compute_share(ort_s=1.5, cpu_s=5.0), compute_share(2.0, 1.8), compute_share(1.0, None)
    (0.3, 1.0, None)
    >>> compute_share(ort_s=1.5, cpu_s=5.0, ort_threads=2)
    0.6
    >>> outside_ort_ms_per_request(cpu_s=5.0, ort_s=1.5, requests=1000)
    3.5
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest import promscrape
from loadtest.outcomes import summarize
from loadtest.shapes import ArrivalSchedule

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 90.0
LOCUST_EXTRA_S = 60.0  # start-up and drain allowance on top of a step's schedule
PROCESS_CPU = "process_cpu_seconds_total"


class LoadTestError(RuntimeError):
    """An expected problem (server down, unknown model, bad option): one line for the user."""


def split_cores(cores: set[int] | None = None) -> tuple[list[int], list[int]]:
    """(server cores, load-generator cores): all but the last core for the server."""
    if cores is None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    ordered = sorted(cores)
    if len(ordered) < 2:
        return ordered, ordered
    return ordered[:-1], ordered[-1:]


def _pin(cores: Sequence[int]) -> Any:
    """A preexec_fn that pins the child to ``cores`` (None where that is not possible)."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    wanted = set(cores)

    def pin() -> None:
        os.sched_setaffinity(0, wanted)

    return pin


def last_line(text: str) -> str:
    """The last non-empty line of a log (error messages stay on one line)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kill_group(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group, then SIGKILL it if it is still there."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


def http_json(url: str, timeout_s: float = 5.0) -> tuple[int, Any]:
    """(status, parsed JSON body or None) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"null")
        except ValueError:
            return e.code, None
    except (OSError, ValueError):
        return 0, None


@dataclass
class Server:
    """A running server child (``mldcn serve`` or a reference server)."""

    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cores: list[int]

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def cpu_s(self) -> float:
        """CPU seconds (user + system) of the server and all its descendants so far (Linux
        /proc; 0 elsewhere): a reference server may run several processes (Triton)."""
        tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total, todo, seen = 0.0, [self.proc.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                        todo += [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
        return total


@contextlib.contextmanager
def launch(cmd: Sequence[str], name: str, cores: Sequence[int] = (),
           env: dict[str, str] | None = None, ready_path: str = "/v2/health/ready",
           port: int | None = None, start_timeout_s: float = SERVER_START_TIMEOUT_S,
           log_in_error: bool = False) -> Iterator[Server]:
    """Run ``cmd`` (a server listening on 127.0.0.1:``port``) in its own process group,
    pinned to ``cores``, until ``GET ready_path`` answers 200; kill its group when the block
    ends. LoadTestError (one line, naming the log; with ``log_in_error`` followed by the log's
    tail, for tests) if it exits or is not ready in time."""
    port = free_port() if port is None else port
    fd, log_name = tempfile.mkstemp(prefix=f"mldcn-{name.replace(' ', '-')}-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT,
                                env=os.environ.copy() if env is None else env, cwd=REPO_ROOT,
                                start_new_session=True, preexec_fn=_pin(cores))
    server = Server(f"http://127.0.0.1:{port}", proc, log_path, list(cores))

    def failed(why: str) -> LoadTestError:
        tail = f"\n{server.log_tail(8000)}" if log_in_error else ""
        return LoadTestError(f"{name} {why} (log: {log_path}){tail}")

    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise failed(f"exited with status {proc.returncode}: "
                             f"{last_line(server.log_tail())}")
            if http_json(server.url + ready_path, timeout_s=1.0)[0] == 200:
                break
            if time.monotonic() > deadline:
                raise failed(f"not ready after {start_timeout_s:.0f} s")
            time.sleep(0.2)
        yield server
    finally:
        kill_group(proc)
        if sys.exc_info()[0] is None:
            log_path.unlink(missing_ok=True)  # kept when something went wrong


def serve_command(repo: Path, model: str, slo_ms: float, port: int, cores: Sequence[int] = (),
                  extra_args: Sequence[str] = ()) -> list[str]:
    """The ``mldcn serve`` command line of a load test: one model, ``reject``, quiet."""
    cmd = [sys.executable, "-m", "model", "serve", "--repo", str(Path(repo).resolve()),
           "--models", model,
           "--host", "127.0.0.1", "--port", str(port), "--default-timeout-ms", f"{slo_ms:g}",
           "--timeout-action", "reject", "--log-level", "warning", *extra_args]
    if cores:
        cmd += ["--intra-op-threads", str(len(cores))]
    return cmd


def clean_env() -> dict[str, str]:
    """This process's environment without MLDCN_* settings or a Prometheus folder."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MLDCN_") and k != "PROMETHEUS_MULTIPROC_DIR"}


@contextlib.contextmanager
def serve(repo: Path, model: str, slo_ms: float, cores: Sequence[int] = (),
          extra_args: Sequence[str] = ()) -> Iterator[Server]:
    """Run ``mldcn serve`` with one model on a free loopback port until the block ends."""
    port = free_port()
    with launch(serve_command(repo, model, slo_ms, port, cores, extra_args),
                f"mldcn serve for {model!r}", cores, clean_env(), port=port) as server:
        yield server


def run_locust(url: str, pool_path: Path, schedule: ArrivalSchedule, out_prefix: Path,
               timeout_ms: float | None, seed: int, cores: Sequence[int] = (),
               max_inflight: int = 256) -> dict[str, Any]:
    """One headless Locust run of ``schedule`` against ``url``; returns the recorded results.

    Locust writes its own CSV statistics next to ``out_prefix`` (``*_stats.csv`` …); the
    per-outcome latencies come from the locustfile's results file.
    """
    pool_path, out_prefix = Path(pool_path).resolve(), Path(out_prefix).resolve()
    results_path = out_prefix.with_name(out_prefix.name + "_results.json")
    log_path = out_prefix.with_name(out_prefix.name + "_locust.log")
    env = {**os.environ, "MLDCN_LT_POOL": str(pool_path), "MLDCN_LT_SCHEDULE": schedule.to_json(),
           "MLDCN_LT_RESULTS": str(results_path), "MLDCN_LT_SEED": str(seed),
           "MLDCN_LT_MAX_INFLIGHT": str(max_inflight)}
    env.pop("MLDCN_LT_CHECK_SLO_MS", None)
    if timeout_ms is not None:
        env["MLDCN_LT_TIMEOUT_MS"] = f"{timeout_ms:g}"
    else:
        env.pop("MLDCN_LT_TIMEOUT_MS", None)
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", url,
           "--csv", str(out_prefix), "--only-summary", "--loglevel", "WARNING",
           "--skip-log-setup"]
    results_path.unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO_ROOT, start_new_session=True, preexec_fn=_pin(cores))
    try:
        proc.wait(timeout=schedule.total_s + LOCUST_EXTRA_S)
    except subprocess.TimeoutExpired:
        raise LoadTestError(f"locust did not finish within {schedule.total_s + LOCUST_EXTRA_S:.0f}"
                            f" s (log: {log_path})") from None
    finally:
        kill_group(proc)
    if proc.returncode != 0 or not results_path.exists():
        raise LoadTestError(f"locust exited with status {proc.returncode}: "
                            f"{last_line(log_path.read_text(errors='replace'))} "
                            f"(log: {log_path})")
    return json.loads(results_path.read_text())


def cpu_seconds_delta(before: promscrape.Samples, after: promscrape.Samples,
                      name: str = PROCESS_CPU) -> float | None:
    """Increase of the server's CPU seconds between two scrapes, summed over ``name``'s series.

    None when either scrape lacks the metric or the sum went down (a restarted process).
    """
    def has(samples: promscrape.Samples) -> bool:
        return any(n == name for n, _ in samples)

    if not (has(before) and has(after)):
        return None
    d = promscrape.counter_delta(before, after, name)
    return d if d >= 0 else None


def compute_share(ort_s: float, cpu_s: float | None, ort_threads: int = 1) -> float | None:
    """``ort_threads`` · ONNX Runtime seconds / server CPU seconds, clipped to [0, 1]; None
    without CPU time."""
    if cpu_s is None or cpu_s <= 0:
        return None
    return min(1.0, max(0.0, ort_threads * ort_s / cpu_s))


def outside_ort_ms_per_request(cpu_s: float | None, ort_s: float,
                               requests: float) -> float | None:
    """Server CPU milliseconds outside ONNX Runtime per answered request (clipped at 0)."""
    if cpu_s is None or requests <= 0:
        return None
    return max(0.0, cpu_s - ort_s) / requests * 1e3


def server_step_stats(before: promscrape.Samples, after: promscrape.Samples, model: str,
                      duration_s: float, ort_threads: int = 1) -> dict[str, Any]:
    """Server-side statistics of one step from the /metrics scrapes around it.

    Besides latency percentiles and counts: ``server_cpu_s`` (Δ ``process_cpu_seconds_total``,
    None when not exported), ``ort_s`` (Δ ``mldcn_compute_duration_seconds_sum``),
    ``answered_requests`` (all codes), ``compute_share`` and ``outside_ort_ms_per_request``
    (see the module docstring).
    """
    ok = promscrape.histogram_delta(before, after, "mldcn_request_duration_seconds",
                                    model=model, code="200")

    def q_ms(q: float) -> float | None:
        v = promscrape.histogram_quantile(q, ok)
        return None if v is None else v * 1e3

    def deltas(name: str, by: str) -> dict[str, float]:
        """{value of label ``by``: counter delta} of ``name``'s series for this model."""
        out: dict[str, float] = {}
        for (n, labels), _ in after.items():
            d = dict(labels)
            if n == name and d.get("model") == model:
                out[d[by]] = promscrape.counter_delta(before, after, name, model=model,
                                                      **{by: d[by]})
        return out

    codes = deltas("mldcn_requests_total", "code")
    rejected = deltas("mldcn_rejected_requests_total", "reason")
    batches, rows = promscrape.histogram_count_sum(before, after, "mldcn_batch_size_rows",
                                                   model=model)
    n_compute, compute_s = promscrape.histogram_count_sum(
        before, after, "mldcn_compute_duration_seconds", model=model)
    n_queue, queue_s = promscrape.histogram_count_sum(
        before, after, "mldcn_queue_duration_seconds", model=model)
    served = codes.get("200", 0.0)
    answered = sum(codes.values())
    cpu_s = cpu_seconds_delta(before, after)
    return {
        "p50_ms": q_ms(0.50), "p95_ms": q_ms(0.95), "p99_ms": q_ms(0.99),
        "requests_by_code": {k: int(v) for k, v in sorted(codes.items()) if v},
        "rejected_by_reason": {k: int(v) for k, v in sorted(rejected.items()) if v},
        "served_rps": served / duration_s if duration_s > 0 else None,
        "scored_rows_per_s": rows / duration_s if duration_s > 0 else None,
        "mean_batch_rows": rows / batches if batches else None,
        "mean_compute_ms": compute_s / n_compute * 1e3 if n_compute else None,
        "mean_queue_ms": queue_s / n_queue * 1e3 if n_queue else None,
        "compute_busy_share": compute_s / duration_s if duration_s > 0 else None,
        "compute_ms_per_1k_rows": compute_s / rows * 1e6 if rows else None,
        "answered_requests": int(answered),
        "server_cpu_s": cpu_s,
        "ort_s": compute_s,
        "ort_threads": ort_threads,
        "compute_share": compute_share(compute_s, cpu_s, ort_threads),
        "outside_ort_ms_per_request": outside_ort_ms_per_request(cpu_s, compute_s * ort_threads,
                                                                 answered),
    }


def measure_step(url: str, model: str, pool_path: Path, schedule: ArrivalSchedule,
                 out_prefix: Path, timeout_ms: float | None, seed: int,
                 cores: Sequence[int] = (), max_inflight: int = 256,
                 ort_threads: int = 1) -> dict[str, Any]:
    """Scrape, run one Locust step, scrape again: client and server statistics of the step
    (``ort_threads``: the server's intra-op threads, see the module docstring)."""
    before = promscrape.scrape(url)
    t0 = time.monotonic()
    results = run_locust(url, pool_path, schedule, out_prefix, timeout_ms, seed, cores,
                         max_inflight)
    after = promscrape.scrape(url)
    wall_s = time.monotonic() - t0
    duration_s = schedule.total_s  # the same denominator for every model
    merged: dict[str, dict[str, Any]] = {}
    for stage in results["stages"]:
        for kind, e in stage.items():
            m = merged.setdefault(kind, {"count": 0, "rows": 0, "latency_ms": []})
            m["count"] += e["count"]
            m["rows"] += e["rows"]
            m["latency_ms"].extend(e["latency_ms"])
    offered_rps = sum(d * r for d, r in schedule.stages) / schedule.total_s
    return {
        "offered_rps": offered_rps,
        "duration_s": duration_s,
        "wall_s": wall_s,
        "client": {**summarize(merged, duration_s), "max_lag_ms": results["max_lag_s"] * 1e3},
        "server": server_step_stats(before, after, model, duration_s, ort_threads),
    }

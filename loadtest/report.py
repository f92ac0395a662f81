"""Write a load-test report folder: ``report.json``, ``report.md``, ``latency.png``,
``throughput.png`` (matplotlib, Agg backend; every model on the same axes).

The step tables show, per step, the *ORT share* (ONNX Runtime seconds / server CPU seconds,
clipped to [0, 1]) and the server's CPU milliseconds *outside ORT* per answered request
(definitions in :mod:`loadtest.runner`); the verdict line says when the ratios compare front
ends (``front-end-bound``, :mod:`loadtest.compare`). A ``report.json`` written before these
fields existed still renders, with "n/a" in their place.

Example:
    >>> _share({"median": 0.3, "min": 0.25, "max": 0.34, "values": [0.3, 0.25, 0.34]})
    '30% (range 25–34%)'
    >>> _share(None), _pct(None), _pct(0.456)
    ('n/a', 'n/a', '46%')
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from service.metrics import LATENCY_BUCKETS_S

BUCKETS_MS = ", ".join(f"{b * 1e3:g}" for b in LATENCY_BUCKETS_S if b <= 0.1)

LATENCY_PNG = "latency.png"
THROUGHPUT_PNG = "throughput.png"
BUSY_LOAD_PER_CORE = 0.3  # load average per core above which the report calls the machine shared


def _f(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:,.{digits}f}"


def _spread(s: dict[str, Any], digits: int = 2) -> str:
    if s.get("median") is None:
        return "undefined"
    if len([v for v in s["values"] if v is not None]) == 1:
        return _f(s["median"], digits)
    return f"{_f(s['median'], digits)} (range {_f(s['min'], digits)}–{_f(s['max'], digits)})"


def _pct(v: float | None) -> str:
    """A share as a whole percentage, "n/a" when unknown."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.0f}%"


def _na(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else _f(v, digits)


def _share(s: dict[str, Any] | None) -> str:
    """A compute-share spread as "30% (range 25–34%)", "n/a" when unknown."""
    if not s or s.get("median") is None:
        return "n/a"
    if len([v for v in s["values"] if v is not None]) == 1:
        return _pct(s["median"])
    return f"{_pct(s['median'])} (range {_pct(s['min'])[:-1]}–{_pct(s['max'])})"


def machine_note(env: dict[str, Any]) -> str | None:
    """A sentence saying the machine was shared, when its load average says so."""
    cores = env.get("cpu_count") or 1
    loads = [x for x in env.get("loadavg_at_start", []) + env.get("loadavg_at_end", [])
             if isinstance(x, (int, float)) and not math.isnan(x)]
    if not loads:
        return None
    own = 1.5  # the server and the load generator themselves
    if max(loads) - own > BUSY_LOAD_PER_CORE * cores:
        return (f"The machine was shared with other jobs while this ran (load average "
                f"{min(loads):.2f}–{max(loads):.2f} on {cores} cores, of which this test "
                "accounts for at most about 1.5): absolute numbers are noisy; the A B A B "
                "alternation spreads that noise over both models.")
    return None


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write the JSON, the Markdown and the plots of a ``compare`` or ``run`` report."""
    out.mkdir(parents=True, exist_ok=True)
    plot_latency(report, out / LATENCY_PNG)
    plot_throughput(report, out / THROUGHPUT_PNG)
    report["files"] = {"markdown": "report.md", "latency_plot": LATENCY_PNG,
                       "throughput_plot": THROUGHPUT_PNG}
    (out / "report.json").write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    (out / "report.md").write_text(markdown(report))


def _share_sentence(report: dict[str, Any]) -> str:
    """What the compute shares at the reference load say about the ratios."""
    c = report["comparison"]
    a, b = report["baseline"], report["candidate"]
    shares = c.get("compute_share_at_reference") or {}
    limit = _pct(c.get("front_end_share_threshold", 0.5))
    at = (f"at {c['reference_rps']:g} req/s: {a} {_share(shares.get('baseline'))}, "
          f"{b} {_share(shares.get('candidate'))}")
    bound = c.get("front_end_bound")
    if bound:
        return (f"ONNX Runtime took under {limit} of the server's CPU for at least one model "
                f"({at}), so these ratios compare the servers' front ends (HTTP, JSON, "
                "encoding), not the models; read alone they would say "
                f"\"{c.get('ratio_verdict', '?')}\".")
    if bound is False:
        return (f"ONNX Runtime's share of the server's CPU {at} (at least {limit} for both: "
                "the ratios measure the models).")
    missing = [m for m, k in ((a, "baseline"), (b, "candidate"))
               if (shares.get(k) or {}).get("median") is None]
    return (f"ONNX Runtime's share of the server's CPU {at} (not measured for "
            f"{' and '.join(missing) or 'a model'}: the server exported no "
            "`process_cpu_seconds_total`, or the report predates the share), so this verdict "
            "cannot tell the models' cost from the front end's.")


def _verdict_line(report: dict[str, Any]) -> str:
    c = report["comparison"]
    a, b = report["baseline"], report["candidate"]
    thr, p99 = c["slo_bounded_throughput_ratio"], c["p99_ratio_at_reference"]
    where = ("the highest load the baseline served within the SLO in every repeat"
             if c.get("reference_met_slo") else
             "the lowest step: the baseline met the SLO at no step in every repeat")
    return (f"**Verdict: {c['verdict']}.** {b}/{a}: SLO-bounded throughput ratio "
            f"{_spread(thr)}; p99 ratio at {c['reference_rps']:g} req/s ({where}) "
            f"{_spread(p99)} (over {report['repeats']} repeat"
            f"{'s' if report['repeats'] > 1 else ''}; neutral when both are within "
            f"±{100 * c['tolerance']:.0f}% or their range covers 1; a ratio defined in fewer "
            f"than half of the repeats does not count). {_share_sentence(report)} Model "
            "compute alone (ONNX Runtime time per scored row, from the compute histogram; not "
            f"part of the verdict): ratio {_spread(c['compute_per_row_ratio'])}.")


def markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    o, env = report["options"], report["environment"]
    names = list(report["models"])
    lines = []
    if report["kind"] == "compare":
        lines += [f"# Load test: {report['candidate']} vs {report['baseline']} "
                  f"(SLO p99 ≤ {o['slo_ms']:g} ms)", "", _verdict_line(report), ""]
    else:
        lines += [f"# Load test: {names[0]} at {report['url']} (SLO p99 ≤ {o['slo_ms']:g} ms)",
                  ""]
    if report.get("command"):
        lines += ["Command:", "", "```bash", report["command"], "```", ""]
    note = machine_note(env)
    lines += [f"Finished {report['created_utc']} on {env['platform']}, Python {env['python']}, "
              f"{env['cpu_count']} cores; server on cores {env['server_cores'] or 'any'}, "
              f"Locust on cores {env['client_cores'] or 'any'}; load average "
              f"{env.get('loadavg_at_start')} at start, {env.get('loadavg_at_end', '–')} at end;"
              f" {env.get('wall_s', '–')} s in all.", ""]
    if note:
        lines += [f"> **Note:** {note}", ""]
    lines += ["## Models", "",
              "| model | arch | FLOPs/example | params | valid AUC | SLO-bounded throughput "
              "(req/s) | rows/s at that load | ORT share at the reference load |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for m in names:
        d = report["models"][m]
        ref = d.get("reference_rps")
        lines.append(f"| {m} | {d.get('arch')} | {_f(d.get('flops_per_example'), 0)} | "
                     f"{_f(d.get('params'), 0)} | {_f(d.get('valid_auc'), 4)} | "
                     f"{_spread(d['slo_bounded_rps'], 1)} | "
                     f"{_spread(d['slo_bounded_rows_per_s'], 0)} | "
                     f"{_share(d.get('compute_share_at_reference'))}"
                     f"{f' at {ref:g} req/s' if ref is not None else ''} |")
    pool = report["models"][names[0]]["pool"]
    same = len({report["models"][m]["pool"]["sha256"] for m in names}) == 1
    lines += ["", f"Requests: {pool['requests']} distinct bodies drawn from each model's "
              f"encoders (columnar candidates; candidates per request median "
              f"{pool['median_candidates']:g}, mean {pool['mean_candidates']:.0f}, max "
              f"{pool['max_candidates']}; {pool['mean_body_bytes'] / 1024:.1f} KiB on "
              f"average){'; identical for every model' if same and len(names) > 1 else ''}. "
              f"Load: {o['shape']} open-loop Poisson arrivals, {o['step_s']:g} s per step, "
              f"budget header X-Request-Timeout-Ms {o['slo_ms']:g}.", ""]
    for m in names:
        lines += [f"## {m}: per load step (median over repeats)", "",
                  "| offered req/s | served req/s | served rows/s | client p50 / p95 / p99 ms "
                  "| server p50 / p95 / p99 ms | compute ms / 1k rows | ORT share "
                  "| outside ORT ms / request | not served | outcomes (all repeats) | meets SLO |",
                  "|---:|---:|---:|---|---|---:|---:|---:|---:|---|---|"]
        for s in report["models"][m]["steps"]:
            c, sv = s["client"], s["server"]
            outcomes = ", ".join(f"{k} {v}" for k, v in s["outcomes"].items())
            meets = " ".join("✓" if x else "✗" for x in s["meets_slo"])
            lines.append(
                f"| {s['offered_rps']:g} | {_f(c['achieved_rps'])} | "
                f"{_f(c['served_rows_per_s'], 0)} | {_f(c['p50_ms'])} / {_f(c['p95_ms'])} / "
                f"{_f(c['p99_ms'])} | {_f(sv['p50_ms'])} / {_f(sv['p95_ms'])} / "
                f"{_f(sv['p99_ms'])} | {_f(sv.get('compute_ms_per_1k_rows'), 2)} | "
                f"{_pct(sv.get('compute_share'))} | "
                f"{_na(sv.get('outside_ort_ms_per_request'))} | "
                f"{_f(100 * (c['unserved_share'] or 0), 2)}% | "
                f"{outcomes} | {meets} |")
        lines.append("")
    lags = [s["client"].get("max_lag_ms") for runs in report["runs"].values() for r in runs
            for s in r["steps"]]
    lags = [x for x in lags if x is not None]
    if lags:
        lines += [f"Load generator: sends ran at most {max(lags):.1f} ms behind their scheduled "
                  f"arrival times (median over steps {sorted(lags)[len(lags) // 2]:.1f} ms).",
                  ""]
    if report["kind"] == "compare":
        c = report["comparison"]
        a, b = report["baseline"], report["candidate"]
        lines += [f"## p99 ratio {b}/{a} by load step (client side)", "",
                  "| offered req/s | p99 ratio |", "|---:|---|"]
        for s, r in zip(report["models"][a]["steps"], c["p99_ratio_by_step"], strict=True):
            lines.append(f"| {s['offered_rps']:g} | {_spread(r)} |")
        lines.append("")
    lines += ["## Plots", "", f"![latency percentiles vs offered load]({LATENCY_PNG})", "",
              f"![throughput vs offered load]({THROUGHPUT_PNG})", "", "## Method", "",
              "- Every step is its own headless Locust run: one pacer user sends each request "
              "at a Poisson arrival time in its own greenlet (open loop), so overload shows as "
              "tail latency and as the server's 503/504 budget answers rather than as a slower "
              "load. Every model gets the same arrival times and the same bodies.",
              "- Client-side percentiles are over served (HTTP 200) requests, timed by Locust's "
              "process from send to full response. Server-side percentiles come from the "
              "difference of the `mldcn_request_duration_seconds` histogram (code 200) between "
              "scrapes of `/metrics` before and after the step, interpolated inside buckets "
              f"({BUCKETS_MS} ms …): read them to bucket precision.",
              "- A step meets the SLO when the client p99 is within the SLO and under "
              "0.1% of its requests were not served (503/504 budget answers, other errors, or "
              "client overflow). The SLO-bounded throughput is the highest offered load of a "
              "step that meets it. At the lowest step a run sends about "
              f"{_lowest_step_requests(report):,} requests, of which under 0.1% allows "
              f"{max(0, math.ceil(_lowest_step_requests(report) / 1000) - 1)} not served: the "
              "error criterion is strict, and a few budget answers from a passing hiccup "
              "fail a step.",
              _share_method(report),
              ]
    if report["kind"] == "compare":
        lines += ["- Each model runs alone in a fresh `mldcn serve` (same flags, "
                  "`--default-timeout-ms` = the SLO, `--timeout-action reject`), pinned to the "
                  "same cores, in the order A B A B … over the repeats, after a warm-up run. "
                  "Ratios are taken per repeat and summarised by their median and range; the "
                  "p99 ratio is read at the highest load where the baseline met the SLO in "
                  "every repeat."]
    return "\n".join(lines) + "\n"


def _share_method(report: dict[str, Any]) -> str:
    """The method bullet for the ORT share and the time outside ONNX Runtime."""
    n = len(report["environment"].get("server_cores") or [])
    if report["kind"] != "compare":
        cores = ("This tool did not start the server: the share is ONNX Runtime's part of its "
                 "CPU only if it ran one intra-op thread on one core and served this model "
                 "alone.")
    elif n == 1:
        cores = ("Here the server had one core and one intra-op thread, whose wall time can "
                 "only exceed its CPU time (the event loop pre-empts it): the share is an upper "
                 "bound, and a share under 50% is conclusive.")
    elif n > 1:
        cores = (f"Here the server had {n} cores: a batch can take up to {n} CPU seconds per "
                 f"wall second, so the share can understate ONNX Runtime's part up to "
                 f"{n}-fold.")
    else:
        cores = "The server was not pinned to cores here: read the share with care."
    text = ("- Where the server's time goes: per step, the server's CPU seconds are the "
            "increase of `process_cpu_seconds_total` between the scrapes (summed over worker "
            "processes) and ONNX Runtime's seconds the increase of "
            "`mldcn_compute_duration_seconds_sum` for the model (wall time per batch, measured "
            "around the ONNX Runtime call). *ORT share* = ONNX Runtime seconds / CPU seconds, "
            "clipped to [0, 1]; *outside ORT ms / request* = (CPU seconds − ONNX Runtime "
            "seconds) / requests answered (all codes), clipped at 0; n/a where the server "
            "exported no process CPU time (or the report predates these columns). As ONNX "
            "Runtime's time is wall time, the share is its part of the server's CPU only when "
            "a batch's wall time is the CPU time it costs; the load test pins the server to "
            "its cores and passes `--intra-op-threads` = their count (one intra-op thread per "
            f"server core). {cores}")
    if report["kind"] == "compare":
        text += (" The verdict is *front-end-bound* when either model's median ORT share at "
                 "the reference load is below 50%: the ratios then compare the front ends "
                 "(HTTP, JSON, encoding), not the models, and are reported for what they are.")
    return text


def _lowest_step_requests(report: dict[str, Any]) -> int:
    o = report["options"]
    return int(min(o["steps_rps"]) * o["step_s"])


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """Client p50/p95/p99 (and server p99) vs offered load, one colour per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for color, (m, d) in zip(COLORS, report["models"].items(), strict=False):
        x = [s["offered_rps"] for s in d["steps"]]
        for key, style, label in (("p50_ms", ":", "p50"), ("p95_ms", "--", "p95"),
                                  ("p99_ms", "-", "p99")):
            y = [s["client"][key] if s["client"][key] is not None else float("nan")
                 for s in d["steps"]]
            ax.plot(x, y, style, color=color, marker="o", ms=3, label=f"{m} client {label}")
        lo = [min((v for v in s["client_p99_ms_by_repeat"] if v is not None), default=math.nan)
              for s in d["steps"]]
        hi = [max((v for v in s["client_p99_ms_by_repeat"] if v is not None), default=math.nan)
              for s in d["steps"]]
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)
        ys = [s["server"]["p99_ms"] if s["server"]["p99_ms"] is not None else float("nan")
              for s in d["steps"]]
        ax.plot(x, ys, "x", color=color, label=f"{m} server p99 (histogram)")
    ax.axhline(report["options"]["slo_ms"], color="black", lw=1, label="SLO")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("latency of served requests (ms)")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title("Latency percentiles vs offered load (band: p99 range over repeats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    """Served rows/s and the share not served vs offered load, one colour per model."""
    plt = _plt()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    top = 0.0
    for color, (m, d) in zip(COLORS, report["models"].items(), strict=False):
        mean_n = d["pool"]["mean_candidates"]
        x = [s["offered_rps"] * mean_n for s in d["steps"]]
        y = [s["client"]["served_rows_per_s"] or 0.0 for s in d["steps"]]
        top = max(top, *x)
        ax.plot(x, y, "-o", color=color, ms=4, label=f"{m} served rows/s")
        bad = [100 * (s["client"]["unserved_share"] or 0.0) for s in d["steps"]]
        ax2.plot([s["offered_rps"] for s in d["steps"]], bad, "-o", color=color, ms=4,
                 label=m)
    ax.plot([0, top], [0, top], color="grey", lw=1, ls="--", label="offered")
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    thousands = FuncFormatter(lambda v, _: f"{v / 1000:g}k")
    ax.xaxis.set_major_formatter(thousands)
    ax.yaxis.set_major_formatter(thousands)
    ax.set_xlabel("offered load (candidate rows/s)")
    ax.set_ylabel("served rows/s")
    ax.set_title("Throughput vs offered load")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax2.axhline(100 * 0.001, color="black", lw=1, label="0.1% (SLO)")
    ax2.set_xlabel("offered load (requests/s)")
    ax2.set_ylabel("requests not served (%)")
    ax2.set_yscale("symlog", linthresh=0.1)
    ax2.set_ylim(bottom=0)
    ax2.yaxis.set_major_formatter(ScalarFormatter())
    ax2.set_title("503/504 and errors vs offered load")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

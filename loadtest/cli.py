"""``mldcn loadtest compare``, ``mldcn loadtest run``, ``mldcn bench serve`` and ``mldcn bench
gpu``: registered by ``model.cli``.

Importing this module is cheap (argparse only); Locust, matplotlib and the service load when a
command runs.

    mldcn loadtest compare --repo MODELS_DIR --models dcnv2,mldcn [--slo-ms 50]
        [--steps 10,20,40] [--duration 20] [--repeats 2] [--out DIR]
    mldcn loadtest run --url http://127.0.0.1:8000 --model mldcn
        [--model-json PATH | --repo MODELS_DIR] [--steps ...] [--out DIR]
    mldcn bench serve --repo MODELS_DIR --models small=a,large=b [--servers v1,v2,fastapi,pytriton]
    mldcn bench gpu [--repo MODELS_DIR --models a,b] [--out docs/bench/gpu.json] [--allow-cpu]

Expected problems (server down, unknown model, an SLO of 0, a bad option) end with one line
``mldcn: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from export.meta import ModelMeta

DEFAULT_STEPS = "10,20,40,80,120,160"


def _steps(text: str) -> list[float]:
    from model.cliargs import comma_list

    try:
        return comma_list(text, float, "rates in requests/s")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo-ms", type=float, default=50.0,
                   help="latency SLO: p99 of served requests (also the per-request budget "
                        "header and the server's --default-timeout-ms); default 50")
    p.add_argument("--steps", type=_steps, default=_steps(DEFAULT_STEPS),
                   help=f"offered loads in requests/s, one step each (default {DEFAULT_STEPS})")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per step (20)")
    p.add_argument("--shape", default="constant", choices=("constant", "bursts"),
                   help="arrivals within a step: constant rate, or bursts at --burst-factor x "
                        "for 1 s of every 5 s (same mean)")
    p.add_argument("--burst-factor", type=float, default=4.0, help="peak/base rate of bursts")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds of unrecorded load at the lowest step first (5)")
    p.add_argument("--median-candidates", type=float, default=300.0,
                   help="median candidates per request (log-normal; 300)")
    p.add_argument("--sigma", type=float, default=0.8,
                   help="log-normal sigma of candidates per request (0.8)")
    p.add_argument("--max-candidates", type=int, default=2000,
                   help="most candidates per request (2000)")
    p.add_argument("--oov-share", type=float, default=0.02,
                   help="share of unseen categorical values / missing numerics (0.02)")
    p.add_argument("--pool-size", type=int, default=256, help="distinct request bodies (256)")
    p.add_argument("--seed", type=int, default=0, help="seed of bodies and arrival times")


def add_bench_commands(bsub: Any) -> None:
    """Add ``serve`` and ``gpu`` to ``mldcn bench``'s sub-parsers (serving benchmarks)."""
    b = bsub.add_parser(
        "serve", help="this service vs a plain FastAPI scorer and PyTriton: own time "
                      "outside ONNX Runtime, saturation, open-loop SLO-bounded throughput",
        description="See loadtest/bench_serve.py.")
    b.add_argument("--repo", required=True, help="model repository of the models")
    b.add_argument("--models", required=True,
                   help="SIZE=NAME,...: e.g. small=mldcn-small,large=mldcn-large")
    b.add_argument("--servers", default="v1,v2,v2raw,fastapi,pytriton",
                   help="of v1, v2, v2raw, fastapi, pytriton (default: all)")
    b.add_argument("--candidates", type=int, default=300, help="candidates per request")
    b.add_argument("--slo-ms", type=float, default=50.0, help="p99 SLO (and the budget)")
    b.add_argument("--rates", default="0.1,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.7,0.8",
                   help="open-loop rates, as fractions of the ONNX-Runtime-only capacity")
    b.add_argument("--stop-after", type=int, default=2,
                   help="end a server's sweep after this many rates miss the SLO")
    b.add_argument("--step-s", type=float, default=8.0, help="seconds per open-loop rate")
    b.add_argument("--min-requests", type=int, default=1500,
                   help="make a rate's step long enough for this many arrivals")
    b.add_argument("--max-step-s", type=float, default=30.0, help="... but at most this")
    b.add_argument("--sequential", type=int, default=400,
                   help="requests one at a time for the own time")
    b.add_argument("--connections", type=int, default=8, help="saturation connections")
    b.add_argument("--saturation-s", type=float, default=5.0, help="saturation seconds")
    b.add_argument("--pool", type=int, default=64, help="distinct request bodies")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", default="docs/bench/serve.json", help="JSON output path")
    b.set_defaults(func=cmd_bench_serve)
    g = bsub.add_parser(
        "gpu", help="GPU serving path: in-process and HTTP latency at 64..4096 candidates, "
                    "DCNv2 vs ML-DCN, fp32/fp16, with and without CUDA graphs",
        description="Needs the CUDA execution provider (pip install '.[gpu]'); exits 2 "
                    "without it unless --allow-cpu. See docs/gpu.md.")
    g.add_argument("--repo", help="model repository (default: train both architectures "
                                  "at --preset and export fp32 and fp16 into a temporary "
                                  "one)")
    g.add_argument("--models", help="comma-separated names in --repo (default: all)")
    g.add_argument("--preset", default="large", help="matched-FLOPs level without --repo")
    g.add_argument("--sizes", default="64,128,256,512,1024,2048,4096",
                   help="candidates per request")
    g.add_argument("--requests", type=int, default=200, help="runs per size and mode")
    g.add_argument("--no-http", action="store_true", help="in-process timings only")
    g.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph runs")
    g.add_argument("--allow-cpu", action="store_true",
                   help="without CUDA, measure the CPU provider instead of exiting 2")
    g.add_argument("--out", default="docs/bench/gpu.json", help="JSON output path")
    g.set_defaults(func=cmd_bench_gpu)


def cmd_bench_gpu(args: argparse.Namespace) -> None:
    from loadtest import bench_gpu

    bench_gpu.run_cli(args)


def cmd_bench_serve(args: argparse.Namespace) -> None:
    from loadtest import bench_serve
    from loadtest.runner import LoadTestError
    from model.errors import CLIError

    try:
        bench_serve.main(args)
    except LoadTestError as e:
        raise CLIError(str(e)) from None


def add_loadtest_commands(sub: Any) -> None:
    """Add ``loadtest compare`` and ``loadtest run`` to ``mldcn``'s sub-parsers action."""
    lt = sub.add_parser("loadtest", help="Locust load tests against the scoring service")
    lsub = lt.add_subparsers(dest="loadtest_command", required=True, parser_class=type(lt))
    p = lsub.add_parser(
        "compare", help="the same load against two models: SLO-bounded throughput, verdict",
        description="Start mldcn serve for each model in turn (A B A B over the repeats), run "
                    "the same open-loop load steps, scrape /metrics around each step, and write "
                    "report.md, report.json and PNG plots.")
    p.add_argument("--repo", required=True, metavar="MODELS_DIR", help="model repository")
    p.add_argument("--models", default="dcnv2,mldcn",
                   help="baseline,candidate model names (default dcnv2,mldcn)")
    p.add_argument("--repeats", type=int, default=2, help="A B rounds (2)")
    p.add_argument("--out", default="loadtest-report", help="report folder")
    _load_args(p)
    p.set_defaults(func=cmd_compare)

    p = lsub.add_parser(
        "run", help="load steps against one model on a running server",
        description="Run the load steps against a server that is already running (loopback or "
                    "your own deployment) and write the same report for one model.")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name served there")
    p.add_argument("--model-json", metavar="PATH",
                   help="the served version's model.json (encoders for realistic values)")
    p.add_argument("--repo", metavar="MODELS_DIR",
                   help="or: the model repository the server serves from")
    p.add_argument("--out", default="loadtest-run", help="report folder")
    _load_args(p)
    p.set_defaults(func=cmd_run)


def _options(args: argparse.Namespace) -> Any:
    from loadtest.compare import LoadOptions

    return LoadOptions(
        steps_rps=list(args.steps), step_s=args.duration, slo_ms=args.slo_ms, shape=args.shape,
        burst_factor=args.burst_factor, warmup_s=args.warmup,
        median_candidates=args.median_candidates, sigma=args.sigma,
        max_candidates=args.max_candidates, oov_share=args.oov_share,
        pool_size=args.pool_size, seed=args.seed)


def command_line(args: argparse.Namespace, head: list[str]) -> str:
    """The command with every load option spelled out (goes into the report)."""
    parts = ["mldcn", "loadtest", *head,
             "--slo-ms", f"{args.slo_ms:g}", "--steps", ",".join(f"{r:g}" for r in args.steps),
             "--duration", f"{args.duration:g}", "--shape", args.shape,
             *(["--burst-factor", f"{args.burst_factor:g}"] if args.shape == "bursts" else []),
             "--warmup", f"{args.warmup:g}", "--median-candidates", f"{args.median_candidates:g}",
             "--sigma", f"{args.sigma:g}", "--max-candidates", str(args.max_candidates),
             "--oov-share", f"{args.oov_share:g}", "--pool-size", str(args.pool_size),
             "--seed", str(args.seed)]
    return shlex.join(parts)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_compare(args: argparse.Namespace) -> None:
    from loadtest.compare import run_compare
    from loadtest.promscrape import ScrapeError
    from loadtest.runner import LoadTestError
    from model.cliargs import comma_list
    from model.errors import CLIError

    models = comma_list(args.models)
    opts = _options(args)
    out = Path(args.out)
    command = command_line(args, ["compare", "--repo", args.repo, "--models", ",".join(models),
                                  "--repeats", str(args.repeats), "--out", args.out])
    try:
        opts.validate()
        report = run_compare(Path(args.repo), models, opts, args.repeats, out, log=_log,
                             command=command)
    except (LoadTestError, ScrapeError) as e:
        raise CLIError(str(e)) from None
    c = report["comparison"]
    print(f"{report['candidate']}/{report['baseline']}: SLO-bounded throughput ratio "
          f"{_num(c['slo_bounded_throughput_ratio']['median'])}, p99 ratio at "
          f"{c['reference_rps']:g} req/s {_num(c['p99_ratio_at_reference']['median'])} -> "
          f"{c['verdict']}; report in {out}/report.md")


def _num(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def server_model(url: str, model: str) -> dict[str, Any]:
    """The server's metadata for ``model``; LoadTestError if the server or model is missing."""
    from loadtest.runner import LoadTestError, http_json

    base = url.rstrip("/")
    status, _ = http_json(base + "/v2/health/live", timeout_s=5.0)
    if status == 0:
        raise LoadTestError(f"cannot reach a server at {url} (is mldcn serve running?)")
    status, body = http_json(f"{base}/v2/models/{model}", timeout_s=5.0)
    if status == 404:
        msg = body.get("message") if isinstance(body, dict) else None
        raise LoadTestError(f"model {model!r} not found at {url}: {msg or 'HTTP 404'}")
    if status != 200 or not isinstance(body, dict):
        raise LoadTestError(f"GET {base}/v2/models/{model} answered HTTP {status}")
    status, _ = http_json(f"{base}/v2/models/{model}/ready", timeout_s=5.0)
    if status != 200:
        raise LoadTestError(f"model {model!r} at {url} is not ready (HTTP {status})")
    return body


def model_meta_for(args: argparse.Namespace, served: dict[str, Any]) -> ModelMeta:
    """model.json of the served model, from --model-json or --repo; checked against the server.
    """
    import json

    from export.meta import MetaError, ModelMeta
    from loadtest.runner import LoadTestError

    if args.model_json:
        try:
            meta = ModelMeta.parse(json.loads(Path(args.model_json).read_text()))
        except (OSError, ValueError) as e:  # MetaError is a ValueError
            raise LoadTestError(f"cannot use --model-json {args.model_json}: {e}") from None
    elif args.repo:
        from export.repository import ModelRepository, RepositoryError

        versions = served.get("versions") or []
        version = int(versions[0]) if versions and str(versions[0]).isdigit() else None
        try:
            meta = ModelRepository(args.repo).load_version(args.model, version).meta
        except (RepositoryError, MetaError, OSError, ValueError) as e:
            raise LoadTestError(str(e)) from None
    else:
        raise LoadTestError(
            f"the server's /v2/models/{args.model} names the features but not the fitted "
            "encoders that realistic requests are drawn from: pass --model-json PATH (the "
            "served version's model.json) or --repo MODELS_DIR")
    want = (served.get("parameters") or {}).get("features")
    if isinstance(want, dict):
        fields = meta.schema["fields"]
        have = {side: [f["name"] for f in fields if f.get("side", "candidate") == side]
                for side in ("user", "context", "candidate")}
        if {k: sorted(v) for k, v in have.items()} != {k: sorted(want.get(k, []))
                                                       for k in have}:
            raise LoadTestError(f"the model.json given does not match the features the server "
                                f"reads for {args.model!r}: {want}")
    return meta


def cmd_run(args: argparse.Namespace) -> None:
    from loadtest.compare import run_single
    from loadtest.promscrape import ScrapeError
    from loadtest.runner import LoadTestError
    from model.errors import CLIError

    opts = _options(args)
    out = Path(args.out)
    head = ["run", "--url", args.url, "--model", args.model, "--out", args.out]
    if args.model_json:
        head += ["--model-json", args.model_json]
    elif args.repo:
        head += ["--repo", args.repo]
    try:
        opts.validate()
        served = server_model(args.url, args.model)
        meta = model_meta_for(args, served)
        report = run_single(args.url.rstrip("/"), args.model, meta, opts, out, log=_log,
                            server_info=served.get("parameters", {}),
                            command=command_line(args, head))
    except (LoadTestError, ScrapeError) as e:
        raise CLIError(str(e)) from None
    d = report["models"][args.model]
    print(f"{args.model} at {args.url}: SLO-bounded throughput "
          f"{_num(d['slo_bounded_rps']['median'])} req/s; report in {out}/report.md")

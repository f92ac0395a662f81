"""``mldcn loadtest`` end to end on real exported models, real servers and real Locust.

Two small models are trained and exported with the CLI (``mldcn train`` / ``mldcn export``);
``loadtest compare`` then starts ``mldcn serve`` for each (A B A B), drives it with Locust
subprocesses at tiny steps and writes the report. Bounded: about a minute on two shared
cores; every server and Locust process is killed by the code under test or by the fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.runner import serve, split_cores
from model.cli import main

pytestmark = pytest.mark.slow
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
QUICK_LOAD = ["--steps", "4,12", "--duration", "2", "--warmup", "1", "--pool-size", "24",
              "--median-candidates", "50", "--max-candidates", "400"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loadtest")
    for arch in ("dcnv2", "mldcn"):
        run = root / "runs" / arch
        assert main(["train", "--synthetic-rows", "3000", "--epochs", "1", "--arch", arch,
                     "--threads", "1", "--out", str(run), "--no-progress"]) == 0
        assert main(["export", str(run), "--repo", str(root / "models"), "--name", arch]) == 0
    return root / "models"


@pytest.fixture(scope="module")
def running(repo: Path) -> Iterator[str]:
    """A real ``mldcn serve`` with the mldcn model, for ``loadtest run``."""
    server_cores, _ = split_cores()
    with serve(repo, "mldcn", slo_ms=100, cores=server_cores) as server:
        yield server.url


def test_compare_writes_the_report(repo: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["loadtest", "compare", "--repo", str(repo), "--models", "dcnv2,mldcn",
                 "--repeats", "2", "--slo-ms", "100", "--out", str(out), *QUICK_LOAD]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "compare"
    assert (report["baseline"], report["candidate"], report["repeats"]) == ("dcnv2", "mldcn", 2)
    assert report["command"].startswith("mldcn loadtest compare --repo ")
    for name in ("dcnv2", "mldcn"):
        m = report["models"][name]
        assert m["arch"] == name and m["flops_per_example"] > 0
        assert [s["offered_rps"] for s in m["steps"]] == [4, 12]
        for s in m["steps"]:
            for side in ("client", "server"):
                for q in ("p50_ms", "p95_ms", "p99_ms"):
                    assert s[side][q] is not None and s[side][q] > 0, (name, side, q)
            assert s["client"]["served_rows_per_s"] > 0
            assert s["outcomes"].get("ok", 0) > 0
            assert len(s["meets_slo"]) == 2
        assert {"median", "min", "max", "values"} <= set(m["slo_bounded_rps"])
        # the A B A B order: each model ran twice, repeat 1 then 2
        assert [r["repeat"] for r in report["runs"][name]] == [1, 2]
        # server-side counts agree with the client's served requests
        for r in report["runs"][name]:
            for s in r["steps"]:
                assert s["server"]["requests_by_code"].get("200", 0) == s["client"]["served"]
                # where the server's time goes (the share is None without process CPU time)
                sv = s["server"]
                assert sv["ort_s"] > 0
                assert sv["answered_requests"] == sum(sv["requests_by_code"].values())
                assert sv["compute_share"] is None or 0 <= sv["compute_share"] <= 1
                assert (sv["outside_ort_ms_per_request"] is None) == (sv["compute_share"] is None)
        assert "compute_share_at_reference" in m
    # the same bodies for both models (same encoders, same seed)
    assert report["models"]["dcnv2"]["pool"]["sha256"] == report["models"]["mldcn"]["pool"][
        "sha256"]
    c = report["comparison"]
    assert c["ratio_verdict"] in ("neutral", "cheaper", "more expensive", "inconclusive")
    assert c["verdict"] in (c["ratio_verdict"], "front-end-bound")
    assert (c["verdict"] == "front-end-bound") == (c["front_end_bound"] is True
                                                   and c["ratio_verdict"] != "inconclusive")
    assert len(c["p99_ratio_at_reference"]["values"]) == 2
    assert len(c["slo_bounded_throughput_ratio"]["values"]) == 2
    for png in ("latency.png", "throughput.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    md = (out / "report.md").read_text()
    assert "**Verdict:" in md and "latency.png" in md and "FLOPs/example" in md
    assert "| ORT share | outside ORT ms / request |" in md
    # Locust's own CSV statistics are kept with the raw results
    assert list((out / "raw").glob("*_stats.csv"))


def test_run_bursts_against_a_running_server(repo: Path, running: str,
                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["loadtest", "run", "--url", running, "--model", "mldcn", "--repo", str(repo),
                 "--slo-ms", "100", "--out", str(out), "--steps", "4,8", "--duration", "3",
                 "--shape", "bursts", "--burst-factor", "3", "--warmup", "0",
                 "--pool-size", "16", "--median-candidates", "50"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "run" and report["url"] == running
    assert report["options"]["shape"] == "bursts"
    assert "--shape bursts --burst-factor 3" in report["command"]
    steps = report["models"]["mldcn"]["steps"]
    assert [s["offered_rps"] for s in steps] == [pytest.approx(4), pytest.approx(8)]
    assert steps[0]["client"]["p99_ms"] > 0 and steps[1]["client"]["served_rows_per_s"] > 0
    # the body names the model, so a server with several models routes it
    pool = (out / "raw" / "pool_mldcn.jsonl").read_text().splitlines()[0]
    assert json.loads(json.loads(pool)["body"])["model"] == "mldcn"
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC


def _one_line(capsys: pytest.CaptureFixture[str], match: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mldcn: error:") and "\n" not in err, err
    assert "Traceback" not in err and match in err, err


def test_unknown_model_is_one_line(repo: Path, running: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "run", "--url", running, "--model", "nope", "--repo", str(repo),
                 "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, "model 'nope' not found")
    assert main(["loadtest", "compare", "--repo", str(repo), "--models", "dcnv2,nope",
                 "--out", str(tmp_path / "c")]) == 2
    _one_line(capsys, "nope")


def test_run_without_encoders_says_what_to_pass(running: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "run", "--url", running, "--model", "mldcn",
                 "--out", str(tmp_path / "r")]) == 2
    _one_line(capsys, "--model-json")

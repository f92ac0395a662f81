"""The GPU serving path on CPU (CI has no GPU): buckets and padding, IOBinding, provider
fall-back, CUDA provider options, fp16 models, and ``mldcn bench gpu`` without CUDA.

Models are real: a small DCNv2 trained on synthetic data and exported fp32 and fp16 by
``export.exporter``. What needs a GPU (the CUDA provider active, CUDA graphs, timings) is listed
in docs/gpu.md.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from export.repository import ModelRepository
from service.buckets import BucketedRunner, active_buckets, parse_buckets, plan_chunks
from service.gpu import CPU, CUDA, BoundRunner, cuda_provider_options, resolve_providers
from service.models import ModelLoadError, open_version, session_options
from service.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKETS = (4, 8, 16)
# 0 < n, bucket edges, bucket + 1, beyond the largest bucket (split), several chunks
ROW_COUNTS = (1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 50)
# the fall-back tests simulate a CPU-only machine: on a CUDA machine there is nothing to fall from
cpu_only = pytest.mark.skipif(CUDA in ort.get_available_providers(),
                              reason="needs a machine without the CUDA provider")


@cache
def _repo() -> Path:
    """dcnv2 (fp32) and dcnv2-fp16 exported from one tiny training run."""
    import atexit
    import shutil
    import tempfile

    from export.exporter import export_run
    from model.cli import main as mldcn

    root = Path(tempfile.mkdtemp(prefix="mldcn-gpu-test-"))
    atexit.register(shutil.rmtree, root, True)
    rc = mldcn(["train", "--arch", "dcnv2", "--synthetic-rows", "3000", "--epochs", "1",
                "--threads", "1", "--out", str(root / "run"), "--no-progress"])
    assert rc == 0
    export_run(root / "run", root / "models", "dcnv2", log=lambda m: None)
    export_run(root / "run", root / "models", "dcnv2-fp16", fp16=True, log=lambda m: None)
    return root / "models"


@pytest.fixture(scope="module")
def repo() -> Path:
    return _repo()


def _rows(meta, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cards = meta.model.cardinalities
    cat = np.stack([rng.integers(0, c, n) for c in cards], axis=1).astype(np.int64)
    dense = rng.lognormal(0.0, 1.0, (n, meta.model.num_dense)).astype(np.float32)
    return cat, dense


def _settings(repo: Path, **kw: object) -> Settings:
    base = {"repo": repo, "intra_op_threads": 1, "warmup_runs": 1}
    return Settings(**{**base, **kw})  # type: ignore[arg-type]


# -- the pure bucketing layer ------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, *ROW_COUNTS])
def test_plan_chunks_cover_the_rows_with_the_smallest_buckets(n: int) -> None:
    chunks = plan_chunks(n, BUCKETS)
    if n == 0:
        assert chunks == []
        return
    assert [a for a, _, _ in chunks] == [0, *[b for _, b, _ in chunks[:-1]]]
    assert (chunks[-1][1] if chunks else 0) == n
    for a, b, bucket in chunks:
        assert b - a <= bucket
        smaller = [x for x in BUCKETS if x < bucket]
        assert not smaller or b - a > smaller[-1]  # no smaller bucket would hold it


def test_bucket_settings_are_parsed_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_buckets("128, 64,64") == (64, 128)
    for bad in ("", "64,x", "0,64"):
        with pytest.raises(ValueError, match="bucket"):
            parse_buckets(bad)
    assert active_buckets((64, 128, 256, 512), 200) == (64, 128, 256)
    monkeypatch.setenv("MLDCN_BATCH_BUCKETS", "512,64")
    s = Settings(repo="m")  # type: ignore[call-arg]
    assert s.batch_buckets == [64, 512] and s.pad_to_buckets == "auto"
    assert Settings(repo="m").on_provider_fallback == "fail"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="cuda_graphs needs fixed batch shapes"):
        Settings(repo="m", cuda_graphs=True, pad_to_buckets="off")  # type: ignore[call-arg]


@pytest.mark.parametrize("n", ROW_COUNTS)
def test_padding_never_leaks_into_scores(n: int) -> None:
    seen: list[tuple[int, int]] = []

    def run_fixed(bucket: int, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        assert len(cat) == len(dense) == bucket
        seen.append((bucket, int(np.count_nonzero(cat[:, 0] == 0))))
        return dense[:, 0] * 10 + cat[:, 0]  # row-wise: padding rows score 0

    cat = np.arange(1, n + 1, dtype=np.int64)[:, None]
    dense = np.full((n, 1), 0.5, np.float32)
    out = BucketedRunner(run_fixed, BUCKETS)(cat, dense)
    np.testing.assert_array_equal(out, dense[:, 0] * 10 + cat[:, 0])
    assert all(b in BUCKETS for b, _ in seen)
    assert sum(zeros for _, zeros in seen) == sum(b for b, _ in seen) - n  # only padding is 0


# -- a real model: padded + IOBinding scores are the unpadded ones ---------------------------------
def test_padded_iobinding_scores_equal_plain_session_scores(repo: Path) -> None:
    mv = ModelRepository(repo).load_version("dcnv2")
    plain = ort.InferenceSession(str(mv.onnx_path), session_options(1), providers=[CPU])
    m = open_version(mv, _settings(repo, pad_to_buckets="on", batch_buckets="4,8,16",
                                   max_batch_size=16))
    assert m.provider == CPU and m.buckets == BUCKETS and not m.cuda_graphs
    assert isinstance(m.runner, BucketedRunner)
    for n in ROW_COUNTS:
        cat, dense = _rows(mv.meta, n, seed=n)
        want = plain.run(None, {"cat_ids": cat, "dense": dense})[0]
        got = m.run(cat, dense)
        assert got.shape == (n,) and got.dtype == np.float32
        np.testing.assert_array_equal(got, want, err_msg=f"{n} rows")  # bit for bit
    assert set(m.runner.calls) == set(BUCKETS) and all(m.runner.calls.values())


def test_bound_runner_rejects_a_shape_it_has_no_binding_for(repo: Path) -> None:
    mv = ModelRepository(repo).load_version("dcnv2")
    sess = ort.InferenceSession(str(mv.onnx_path), session_options(1), providers=[CPU])
    cat, dense = _rows(mv.meta, 8)
    r = BoundRunner(sess, (8,), cat.shape[1], dense.shape[1], device="cpu")
    first = r(8, cat, dense)
    r(8, *_rows(mv.meta, 8, seed=1))  # the buffers are reused; earlier results are copies
    np.testing.assert_array_equal(first, sess.run(None, {"cat_ids": cat, "dense": dense})[0])
    with pytest.raises(ValueError, match="no binding for a 4-row batch"):
        r(4, cat[:4], dense[:4])
    with pytest.raises(ValueError, match="cuda_graphs needs device='cuda'"):
        BoundRunner(sess, (8,), 1, 1, device="cpu", cuda_graphs=True)


def test_pad_to_buckets_auto_is_off_on_cpu(repo: Path) -> None:
    m = open_version(ModelRepository(repo).load_version("dcnv2"), _settings(repo))
    assert m.provider == CPU and m.buckets == () and m.runner is None


# -- CUDA provider options and the provider choice -------------------------------------------------
def test_cuda_provider_options_are_explicit() -> None:
    assert cuda_provider_options() == {
        "device_id": "0", "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1", "cudnn_conv_algo_search": "HEURISTIC",
        "enable_cuda_graph": "0"}
    opts = cuda_provider_options(device_id=2, arena_extend_strategy="kNextPowerOfTwo",
                                 gpu_mem_limit_bytes=4 << 30, copy_in_default_stream=False,
                                 cuda_graphs=True)
    assert opts["device_id"] == "2" and opts["gpu_mem_limit"] == str(4 << 30)
    assert opts["do_copy_in_default_stream"] == "0" and opts["enable_cuda_graph"] == "1"
    assert opts["arena_extend_strategy"] == "kNextPowerOfTwo"
    with pytest.raises(ValueError, match="arena_extend_strategy"):
        cuda_provider_options(arena_extend_strategy="greedy")
    from service.models import cuda_options

    s = Settings(repo="m", device_id=1, cuda_gpu_mem_limit_bytes=1024,  # type: ignore[call-arg]
                 cuda_graphs=True)
    assert cuda_options(s) == {**cuda_provider_options(device_id=1, gpu_mem_limit_bytes=1024,
                                                       cuda_graphs=True)}


def test_provider_choice() -> None:
    both, cpu_only = [CUDA, CPU], [CPU]
    opts = {"device_id": "0"}
    assert resolve_providers("auto", opts, both) == ([(CUDA, opts), CPU], True)
    assert resolve_providers("auto", opts, cpu_only) == ([CPU], False)
    assert resolve_providers("cpu", opts, both) == ([CPU], False)
    assert resolve_providers("cuda", opts, cpu_only) == ([CPU], False)
    with pytest.raises(ValueError, match="auto, cuda or cpu"):
        resolve_providers("rocm", opts, both)


# -- fall-back: execution_provider=cuda on this CPU-only machine --------------------------------
@cpu_only
def test_cuda_fallback_fail_refuses_to_load(repo: Path) -> None:
    mv = ModelRepository(repo).load_version("dcnv2")
    with pytest.raises(ModelLoadError, match="execution_provider=cuda but the session runs "
                                              "on CPUExecutionProvider"):
        open_version(mv, _settings(repo, execution_provider="cuda"))


@cpu_only
def test_cuda_fallback_fail_when_cuda_is_listed_but_the_session_lands_on_cpu(
        repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # ONNX Runtime itself falls back to CPU when it cannot use the CUDA provider it was given
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    mv = ModelRepository(repo).load_version("dcnv2")
    with pytest.raises(ModelLoadError, match="MLDCN_ON_PROVIDER_FALLBACK=warn"):
        open_version(mv, _settings(repo, execution_provider="cuda"))
    m = open_version(mv, _settings(repo, execution_provider="cuda",
                                   on_provider_fallback="warn"))
    assert m.provider == CPU and m.provider_fallback


@cpu_only
def test_cuda_fallback_fail_stops_the_app_start(repo: Path) -> None:
    from service.app import create_app

    app = create_app(_settings(repo, models=["dcnv2"], execution_provider="cuda"))
    with pytest.raises(ModelLoadError, match="execution_provider=cuda"):
        with TestClient(app):
            pass


@cpu_only
def test_cuda_fallback_fail_cli_exits_2_with_one_line(repo: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "model", "serve", "--repo", str(repo),
                        "--execution-provider", "cuda", "--port", "0"],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "execution_provider=cuda" in lines[0]
    assert "MLDCN_ON_PROVIDER_FALLBACK=warn" in lines[0]


@cpu_only
def test_cuda_fallback_warn_serves_on_cpu_with_metric_and_log(
        repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.app import create_app

    app = create_app(_settings(repo, models=["dcnv2"], execution_provider="cuda",
                               on_provider_fallback="warn"))
    with caplog.at_level(logging.ERROR, logger="mldcn.service"), TestClient(app) as client:
        r = client.post("/v1/score", json={"user": {}, "context": {},
                                           "candidates": [{}, {}, {}]})
        assert r.status_code == 200 and len(r.json()["scores"]) == 3
        metrics = client.get("/metrics").text
    assert 'mldcn_provider_fallback{model="dcnv2"} 1.0' in metrics
    assert 'provider="CPUExecutionProvider"' in metrics
    assert any("PROVIDER FALLBACK" in rec.getMessage() for rec in caplog.records)


# -- fp16 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad", ["off", "on"])
def test_fp16_model_is_served_with_float32_io_within_its_tolerance(repo: Path, pad: str) -> None:
    mr = ModelRepository(repo)
    fp32 = open_version(mr.load_version("dcnv2"), _settings(repo))
    mv16 = mr.load_version("dcnv2-fp16")
    fp16 = open_version(mv16, _settings(repo, pad_to_buckets=pad, batch_buckets="4,8,16",
                                        max_batch_size=16))
    assert fp16.precision == "fp16"
    assert [i.type for i in fp16.session.get_inputs()] == ["tensor(int64)", "tensor(float)"]
    assert [o.type for o in fp16.session.get_outputs()] == ["tensor(float)"]
    tolerance = float(mv16.meta.parity["tolerance"])
    for n in (1, 8, 33):
        cat, dense = _rows(mv16.meta, n, seed=n)
        got = fp16.run(cat, dense)
        assert got.dtype == np.float32 and got.shape == (n,)
        assert float(np.max(np.abs(got - fp32.run(cat, dense)))) <= tolerance


def test_fp16_model_serves_over_http(repo: Path) -> None:
    from service.app import create_app

    app = create_app(_settings(repo, models=["dcnv2-fp16"], pad_to_buckets="on",
                               batch_buckets="4,8,16", max_batch_size=16))
    with TestClient(app) as client:
        r = client.post("/v1/score", json={"user": {}, "context": {},
                                           "candidates": [{}] * 20})
        assert r.status_code == 200, r.text
        scores = r.json()["scores"]
        assert len(scores) == 20 and len(set(scores)) == 1  # identical rows, identical scores
        assert 'precision="fp16"' in client.get("/metrics").text


# -- the GPU benchmark without a GPU ------------------------------------------------------------
@cpu_only
def test_bench_gpu_without_cuda_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, "-m", "model", "bench", "gpu", "--out", str(out)],
                       capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert r.returncode == 2
    assert "no CUDAExecutionProvider" in r.stderr and "pip install '.[gpu]'" in r.stderr
    assert not out.exists()


@cpu_only
def test_bench_gpu_allow_cpu_runs_in_process(repo: Path, tmp_path: Path) -> None:
    import argparse

    from loadtest import bench_gpu

    out = tmp_path / "gpu.json"
    args = argparse.Namespace(repo=str(repo), models="dcnv2,dcnv2-fp16", preset="small",
                              sizes="64,65", requests=3, no_http=True, no_graphs=False,
                              allow_cpu=True, out=str(out))
    result = bench_gpu.main(args)
    assert result["provider"] == "cpu" and [r["model"] for r in result["runs"]] == [
        "dcnv2", "dcnv2-fp16"]
    for r in result["runs"]:
        assert r["parity_met"] and r["buckets"] == [64, 128] and not r["cuda_graphs"]
        assert set(r["sizes"]) == {"64", "65"} and r["sizes"]["65"]["ort_p50_ms"] > 0
    assert out.exists() and "parity vs CPU" in bench_gpu.format_table(result)

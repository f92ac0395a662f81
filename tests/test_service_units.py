"""Unit tests of the service's parts that need no server: batcher, budget, settings, encoding,
and the rule that the serving path never imports torch."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import deque

import numpy as np
import pytest

from service.batcher import Batcher, DeadlineExceeded, QueueFull, WorkItem, take_batch
from service.budget import LatencyModel, budget_s, retry_after_s
from service.settings import Settings


def test_service_never_imports_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from service.app import create_app\n"
        "from service.settings import Settings\n"
        "import service.cli, service.models, service.workers, service.edge\n"
        "app = create_app(Settings(repo='.'))\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def _item(loop: asyncio.AbstractEventLoop, rows: int, deadline_s: float = 1e9) -> WorkItem:
    return WorkItem(np.zeros((rows, 2), np.int64), np.zeros((rows, 1), np.float32), deadline_s,
                    loop.create_future(), 0.0)


@pytest.mark.parametrize("max_rows", [1, 3, 8, 100])
@pytest.mark.parametrize("merge", [True, False])
def test_take_batch_respects_max_rows_and_order(max_rows: int, merge: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = deque(_item(loop, n) for n in (5, 2, 7))
        seen = []
        while queue:
            parts, expired = take_batch(queue, max_rows, now_s=0.0, merge=merge)
            assert not expired and parts
            assert sum(b - a for _, a, b in parts) <= max_rows
            assert merge or len(parts) == 1
            seen += [(p[0].rows, p[1], p[2]) for p in parts]
        # every row of every request exactly once, in request order
        per_item: dict[int, list[tuple[int, int]]] = {}
        for rows, a, b in seen:
            per_item.setdefault(rows, []).append((a, b))
        for rows, spans in per_item.items():
            assert spans[0][0] == 0 and spans[-1][1] == rows
            assert all(x[1] == y[0] for x, y in zip(spans, spans[1:], strict=False))
    finally:
        loop.close()


@pytest.mark.parametrize("deadline_s,estimate_s,expired", [
    (10.0, 0.0, False),  # plenty of time
    (1.0, 0.0, True),  # deadline already passed (now = 1.0)
    (1.5, 0.4, False),  # finishes at 1.4 < 1.5
    (1.5, 0.6, True),  # would finish at 1.6: dropped before compute
])
def test_take_batch_drops_requests_that_cannot_make_their_deadline(
        deadline_s: float, estimate_s: float, expired: bool) -> None:
    loop = asyncio.new_event_loop()
    try:
        item = _item(loop, 4, deadline_s)
        cancelled = _item(loop, 3)
        cancelled.future.cancel()
        parts, gone = take_batch(deque([cancelled, item]), 16, now_s=1.0,
                                 estimate_s=lambda rows: estimate_s)
        assert (gone == [item]) is expired
        assert [p[0] for p in parts] == ([] if expired else [item])
    finally:
        loop.close()


def test_batcher_merges_splits_expires_and_skips_cancelled() -> None:
    calls: list[int] = []

    def run(cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        calls.append(len(cat))
        time.sleep(0.01)
        return cat[:, 0].astype(np.float32)

    async def scenario() -> None:
        b = Batcher(run, max_batch_size=8, max_queue_size=4, max_queue_delay_s=0.02)
        b.start()
        now = time.monotonic()

        def rows(start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
            cat = np.arange(start, start + n, dtype=np.int64)[:, None]
            return cat, np.zeros((n, 0), np.float32)

        first = b.submit(*rows(0, 3), now + 5)
        second = b.submit(*rows(100, 10), now + 5)  # split over two batches
        gone = b.submit(*rows(200, 2), now + 5)
        gone.future.cancel()  # client went away before compute
        late = b.submit(*rows(300, 1), now - 1)  # deadline already passed
        with pytest.raises(QueueFull):
            b.submit(*rows(400, 1), now + 5)
        assert (await first.future).tolist() == [0, 1, 2]
        assert (await second.future).tolist() == list(range(100, 110))
        with pytest.raises(DeadlineExceeded):
            await late.future
        assert b.predict_s(100) > 0
        await b.stop()

    asyncio.run(scenario())
    assert calls == [8, 5]  # 3 + 5 rows merged, then the other 5; the cancelled 2 never ran


def test_batcher_delivers_model_errors_to_every_caller() -> None:
    def broken(cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    async def scenario() -> list[BaseException]:
        b = Batcher(broken, max_batch_size=8)
        b.start()
        now = time.monotonic()
        items = [b.submit(np.zeros((2, 1), np.int64), np.zeros((2, 0), np.float32), now + 5)
                 for _ in range(3)]
        out = await asyncio.gather(*(i.future for i in items), return_exceptions=True)
        await b.stop()
        return list(out)

    assert all(isinstance(e, RuntimeError) for e in asyncio.run(scenario()))


def test_a_queued_request_gets_its_504_at_its_deadline_not_after_the_batch_ahead() -> None:
    from service.scoring import ScoringService

    def slow(cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return np.zeros(len(cat), np.float32)

    async def scenario() -> tuple[float, bool, list[int]]:
        b = Batcher(slow, max_batch_size=4, dynamic_batching=False)
        b.start()
        now = time.monotonic()
        ahead = b.submit(np.zeros((4, 1), np.int64), np.zeros((4, 0), np.float32), now + 5)
        await asyncio.sleep(0.01)  # the 200 ms batch is running
        late = b.submit(np.zeros((2, 1), np.int64), np.zeros((2, 0), np.float32), now + 0.05)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await ScoringService._wait(late, late.deadline_s, None)
        waited = time.monotonic() - t0
        await ahead.future
        await b.stop()
        return waited, late.future.cancelled(), [late.done]

    waited, cancelled, done = asyncio.run(scenario())
    assert waited < 0.15  # answered at its deadline (~40 ms), not after the batch (~190 ms)
    assert cancelled and done == [0]  # withdrawn: never computed


def test_batch_threads_run_at_the_configured_lower_priority() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are Linux's")

    async def scenario() -> list[int]:
        b = Batcher(lambda cat, dense: np.full(len(cat), os.getpriority(os.PRIO_PROCESS, 0),
                                               np.float32), nice=3)
        b.start()
        item = b.submit(np.zeros((1, 1), np.int64), np.zeros((1, 0), np.float32),
                        time.monotonic() + 5)
        out = await item.future
        await b.stop()
        return [int(out[0]), os.getpriority(os.PRIO_PROCESS, 0)]

    in_batch, in_loop = asyncio.run(scenario())
    assert in_batch == min(19, in_loop + 3)  # the event loop's thread keeps its priority


def test_latency_model_learns_online() -> None:
    lm = LatencyModel(window=32)
    lm.seed(1, 0.001)
    lm.seed(1000, 0.002)
    assert lm.predict(500) == pytest.approx(0.0015, rel=0.01)
    for _ in range(64):  # the machine got 10x slower
        lm.observe(1, 0.01)
        lm.observe(1000, 0.02)
    assert lm.predict(500) == pytest.approx(0.015, rel=0.1)


def test_latency_model_copy_learns_apart() -> None:
    lm = LatencyModel(window=8)
    lm.seed(1, 0.001)
    lm.seed(1000, 0.002)
    twin = lm.copy()
    assert twin.predict(500) == pytest.approx(lm.predict(500))
    for _ in range(16):  # the shadow runs beside the primary: slower, and only there
        twin.observe(1, 0.01)
        twin.observe(1000, 0.02)
    assert lm.predict(500) == pytest.approx(0.0015, rel=0.01)
    assert twin.predict(500) == pytest.approx(0.015, rel=0.2)


def test_budget_never_exceeds_the_server_maximum() -> None:
    assert budget_s(50, (None, None)) == 0.05
    assert budget_s(50, (10, 30)) == 0.01
    assert budget_s(50, (500,)) == 0.05
    assert retry_after_s(0.01) == 1 and retry_after_s(2.5) == 3


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.settings import get_settings

    monkeypatch.setenv("MLDCN_REPO", "/models")
    monkeypatch.setenv("MLDCN_MODELS", "mldcn, dcnv2")
    monkeypatch.setenv("MLDCN_MAX_QUEUE_DELAY_MS", "2.5")
    get_settings.cache_clear()
    try:
        s = get_settings()
        assert s.models == ["mldcn", "dcnv2"] and s.max_queue_delay_ms == 2.5
    finally:
        get_settings.cache_clear()
    with pytest.raises(ValueError, match="fallback_model"):
        Settings(repo="/models", timeout_action="degrade")
    with pytest.raises(ValueError):
        Settings(repo="/models", max_batch_size=0)


def test_serve_flags_are_generated_from_settings(monkeypatch) -> None:
    """One `mldcn serve` flag per Settings field (but the internal and secret ones), and a
    flag sets what its MLDCN_* variable sets."""
    from service.cli import NOT_FLAGS, serve_env, serve_parser
    from service.settings import Settings

    parser = serve_parser()
    dests = {a.dest for a in parser._actions} - {"help", "access_log"}
    assert dests == set(Settings.model_fields) - set(NOT_FLAGS)
    flags = parser.parse_args(["--repo", "/models", "--max-batch-size", "64",
                               "--no-dynamic-batching", "--cuda-graphs", "--models", "a,b",
                               "--timeout-action", "degrade", "--fallback-model", "b",
                               "--batch-buckets", "8,16"])
    env = serve_env(flags)
    for key in [k for k in os.environ if k.startswith("MLDCN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert (s.max_batch_size, s.dynamic_batching, s.cuda_graphs, s.models, s.timeout_action,
            s.batch_buckets) == (64, False, True, ["a", "b"], "degrade", [8, 16])
    assert env.keys() == {"MLDCN_REPO", "MLDCN_MAX_BATCH_SIZE", "MLDCN_DYNAMIC_BATCHING",
                          "MLDCN_CUDA_GRAPHS", "MLDCN_MODELS", "MLDCN_TIMEOUT_ACTION",
                          "MLDCN_FALLBACK_MODEL",
                          "MLDCN_BATCH_BUCKETS"}


def test_serve_usage_errors_are_one_line() -> None:
    from service.cli import serve_parser

    assert "Undefined" not in serve_parser().format_help()
    for args in (["--bogus", "1"], ["--timeout-action", "drop"]):
        proc = subprocess.run([sys.executable, "-m", "model", "serve", *args],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mldcn serve: error:"), proc.stderr

"""Admission control: one decision function (``Admission.decide``), asked at every stage.

Unit tests with a real :class:`~service.batcher.Batcher` whose model is a stub (the cost of a
batch is what the test says it is), a real registry and real settings.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from service.admission import MIN_OBSERVATIONS, REFIT_EVERY, Admission, quantile
from service.batcher import Batcher
from service.budget import LatencyModel
from service.errors import ServiceError
from service.registry import ModelEntry, ModelRegistry, ServingConfig
from service.scoring import RequestContext, ScoringService
from service.settings import Settings


@dataclass
class FakeModel:
    """What admission reads of a served model: its name."""

    name: str


def _latency(per_row_s: float, fixed_s: float = 0.0) -> LatencyModel:
    lm = LatencyModel(16)
    for rows in (1, 100, 1000):
        lm.seed(rows, fixed_s + per_row_s * rows)
    return lm


def _entry(name: str, per_row_s: float, config: ServingConfig) -> ModelEntry:
    batcher = Batcher(lambda cat, dense: np.zeros(len(cat), np.float32),
                      max_batch_size=config.max_batch_size,
                      max_queue_size=config.max_queue_size, latency=_latency(per_row_s))
    return ModelEntry(FakeModel(name), batcher, _latency(0.0), config)  # type: ignore[arg-type]


@pytest.fixture
def setup() -> Iterator[tuple[Admission, ModelRegistry, Settings]]:
    settings = Settings(repo="/nonexistent", timeout_action="degrade", fallback_model="cheap",
                        max_queue_size=4)
    registry = ModelRegistry(settings)
    config = ServingConfig.defaults(settings)
    for name, per_row_s in (("big", 1e-4), ("cheap", 1e-6)):  # 0.1 ms vs 1 us per row
        e = _entry(name, per_row_s, config)
        registry.entries[name] = e
        registry.models[name] = e.model  # type: ignore[assignment]
    yield Admission(settings, registry), registry, settings


def _queue(registry: ModelRegistry, name: str, rows: int, requests: int = 1) -> None:
    """Put ``requests`` requests of ``rows`` rows in ``name``'s queue (never run)."""
    loop = asyncio.new_event_loop()
    try:
        b = registry.get(name).batcher
        for _ in range(requests):
            item = loop.run_until_complete(_submit(b, rows))
            assert item is not None
    finally:
        loop.close()


async def _submit(b: Batcher, rows: int) -> Any:
    return b.submit(np.zeros((rows, 1), np.int64), np.zeros((rows, 1), np.float32), 1e12)


def test_quantile_interpolates() -> None:
    assert quantile([], 0.99) == 0.0
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.99) == pytest.approx(1.99)


# -- stage 2: the parsed request -------------------------------------------------------------
def test_decide_admits_degrades_and_rejects(setup: tuple[Admission, ModelRegistry, Settings]
                                            ) -> None:
    adm, registry, _ = setup
    big, cheap = registry.models["big"], registry.models["cheap"]
    now = time.monotonic()
    d = adm.decide(big, 100, now, now + 0.050)  # 10 ms of 50
    assert d.model is big and not d.degraded and d.predicted_s == pytest.approx(0.010, rel=0.01)
    d = adm.decide(big, 1000, now, now + 0.050)  # 100 ms: the fallback (1 ms) takes it
    assert d.model is cheap and d.degraded
    with pytest.raises(ServiceError) as e:
        adm.decide(big, 1000, now, now + 0.050, can_degrade=False)  # encoded rows: no fallback
    assert e.value.status == 503 and e.value.error == "predicted_deadline_miss"
    assert int(e.value.headers["Retry-After"]) >= 1
    with pytest.raises(ServiceError) as e:
        adm.decide(cheap, 10**6, now, now + 0.050)  # 1 s even for the fallback
    assert e.value.error == "predicted_deadline_miss"


def test_decide_counts_the_queue_ahead_and_refuses_a_full_one(
        setup: tuple[Admission, ModelRegistry, Settings]) -> None:
    adm, registry, _ = setup
    big = registry.models["big"]
    now = time.monotonic()
    assert not adm.decide(big, 200, now, now + 0.050, can_degrade=False).degraded  # 20 ms
    _queue(registry, "big", 310)  # 31 ms ahead
    with pytest.raises(ServiceError):
        adm.decide(big, 200, now, now + 0.050, can_degrade=False)  # 51 ms > 50 ms left
    _queue(registry, "big", 1, requests=3)  # 4 requests queued = max_queue_size
    with pytest.raises(ServiceError) as e:
        adm.decide(big, 1, now, now + 10.0)
    assert e.value.error == "queue_full" and e.value.headers == {"Retry-After": "1"}


# -- stage 1: on arrival, one row on the soonest model ------------------------------------------
def test_decide_at_arrival_is_decide_for_one_row_on_the_soonest_model(
        setup: tuple[Admission, ModelRegistry, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    adm, registry, _ = setup
    calls: list[tuple[str, int, bool]] = []
    decide = adm.decide

    def spy(model: Any, rows: int, now_s: float, deadline_s: float,
            can_degrade: bool = True, what: str | None = None) -> Any:
        calls.append((model.name, rows, can_degrade))
        return decide(model, rows, now_s, deadline_s, can_degrade, what)

    monkeypatch.setattr(adm, "decide", spy)
    now = time.monotonic()
    d = adm.decide_at_arrival(now, now + 0.050)
    assert d is not None and d.model.name == "cheap" and calls == [("cheap", 1, False)]
    _queue(registry, "big", 1000)
    _queue(registry, "cheap", 10**5)  # 100 ms ahead on the fallback too
    with pytest.raises(ServiceError) as e:
        adm.decide_at_arrival(now, now + 0.050)
    assert e.value.error == "predicted_deadline_miss" and calls[-1] == ("cheap", 1, False)


# -- learning --------------------------------------------------------------------------------
def test_overhead_slope_and_margin_are_learnt_from_what_happened(
        setup: tuple[Admission, ModelRegistry, Settings]) -> None:
    adm, registry, _ = setup
    big = registry.models["big"]
    for i in range(max(MIN_OBSERVATIONS, REFIT_EVERY) * 4):
        now = time.monotonic()
        rows = 400 if i % 2 else 10  # 40 ms or 1 ms of work
        d = adm.decide(big, rows, now, now + 0.100, can_degrade=False)
        # reality: 10% slower than the work ahead, 2 ms more for every request, +-2% noise
        taken = 0.002 + 1.1 * d.work_s * (1.0 + 0.02 * ((i * 7919) % 11 - 5) / 5)
        adm.observe(d, d.decided_s + taken)
    learnt = adm.learnt("big")
    assert learnt.overhead_s == pytest.approx(0.002, abs=5e-4)
    assert learnt.slope == pytest.approx(1.1, rel=0.02)
    # the margin: about the worst recent error, 2% of 44 ms (the noise's size)
    assert 0.0 < learnt.margins_s[0] < 0.0015
    now = time.monotonic()
    d = adm.decide(big, 400, now, now + 0.100, can_degrade=False)
    fitted = 0.002 + 1.1 * 0.040
    assert d.predicted_s == pytest.approx(fitted + learnt.margins_s[0], rel=0.02)
    assert d.predicted_s < fitted * 1.05


def test_the_margin_is_read_from_decisions_made_under_the_same_load(
        setup: tuple[Admission, ModelRegistry, Settings]) -> None:
    adm, registry, _ = setup
    big = registry.models["big"]
    load = [1]
    adm.in_flight = lambda: load[0]
    for i in range(4 * REFIT_EVERY):
        load[0] = 24 if i % 4 == 3 else 1  # a quarter busy (band 4), the rest alone (band 0)
        now = time.monotonic()
        d = adm.decide(big, (10, 100, 400)[i % 3], now, now + 1.0, can_degrade=False)
        late = 0.020 if load[0] > 1 else 0.0005 * (i % 2)  # busy: 20 ms late; alone: <= 0.5
        adm.observe(d, d.decided_s + d.work_s + late)
    margins = adm.learnt("big").margins_s
    assert margins[0] < 0.005 and margins[4] > 0.012
    assert margins[1] == margins[0]  # no errors at 2-3 in flight: the quieter band's, 1
    assert margins[7] == margins[4]  # none at 128+: the nearest quieter band's, 16-31
    now = time.monotonic()
    load[0] = 1
    alone = adm.decide(big, 10, now, now + 1.0, can_degrade=False).predicted_s
    load[0] = 20
    busy = adm.decide(big, 10, now, now + 1.0, can_degrade=False).predicted_s
    assert busy - alone == pytest.approx(margins[4] - margins[0])


def test_misses_raise_a_penalty_that_fades(setup: tuple[Admission, ModelRegistry, Settings]
                                           ) -> None:
    adm, registry, _ = setup
    big = registry.models["big"]
    now = time.monotonic()
    d = adm.decide(big, 100, now, now + 0.050, can_degrade=False)  # 10 ms: admitted
    for k in range(5):  # the misses of one stall count once
        adm.observe(d, now + 0.001 * k, missed=True)
    assert adm.penalty("big", now) == pytest.approx(1.25)
    for k in range(1, 9):  # 8 stalls, 60 ms apart, at the same instant for the test's clock
        adm.observe(d, now + 0.06 * k, missed=True)
    at = now + 0.48
    high = adm.penalty("big", at)
    assert 3.0 < high <= 5.0  # raised by each, decaying in between, capped at 5
    with pytest.raises(ServiceError):
        adm.decide(big, 100, at, at + 0.025, can_degrade=False)  # 10 ms x 3+ > 25 ms
    assert adm.penalty("big", at + 0.25) - 1 == pytest.approx((high - 1) / 2)  # half-life
    later = at + 1.5  # nothing admitted meanwhile: the caution has faded
    d = adm.decide(big, 100, later, later + 0.040, can_degrade=False)
    assert d.predicted_s == pytest.approx(0.010 * adm.penalty("big", later))
    assert adm.penalty("big", later) < 1.3
    assert adm.learnt("big").margins_s[0] == 0.0  # misses never enter the fit


# -- the service asks the same function at both stages -----------------------------------------
def test_the_service_asks_admission_decide_at_arrival_and_after_parsing(
        setup: tuple[Admission, ModelRegistry, Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    adm, registry, settings = setup
    svc = ScoringService(settings)
    svc.registry, svc.admission, svc.ready = registry, adm, True
    seen: list[tuple[str, int]] = []
    decide = adm.decide

    def spy(model: Any, rows: int, now_s: float, deadline_s: float,
            can_degrade: bool = True, what: str | None = None) -> Any:
        seen.append((model.name, rows))
        return decide(model, rows, now_s, deadline_s, can_degrade, what)

    monkeypatch.setattr(adm, "decide", spy)
    ctx = RequestContext(arrival_s=time.monotonic(), header_timeout_ms=20.0)
    svc.at_arrival(ctx)  # stage 1
    assert seen == [("cheap", 1)] and ctx.deadline_s == pytest.approx(ctx.arrival_s + 0.020)
    _queue(registry, "big", 1000)
    _queue(registry, "cheap", 10**5)
    with pytest.raises(ServiceError) as e:
        svc.at_arrival(RequestContext(arrival_s=time.monotonic()))
    assert e.value.error == "predicted_deadline_miss"

    async def stage_2() -> None:  # the body asked for 10 rows of "big"
        ctx = RequestContext(arrival_s=time.monotonic(), deadline_s=time.monotonic() + 0.050)

        def encode(model: Any, strict: bool) -> tuple[np.ndarray, np.ndarray]:
            raise AssertionError("a refused request is never encoded")

        with pytest.raises(ServiceError) as e:
            await svc.infer(ctx, registry.models["big"], 10, None, encode)
        assert e.value.error == "predicted_deadline_miss" and ctx.model == "big"

    asyncio.run(stage_2())
    assert seen[-1] == ("big", 10)


def test_on_arrival_the_content_length_bounds_the_rows_from_below(
        setup: tuple[Admission, ModelRegistry, Settings]) -> None:
    adm, registry, _ = setup
    assert adm.rows_at_least("score", 20_000) == 1  # nothing seen yet
    adm.body_seen("score", 30_000, 300)  # 100 bytes per candidate
    adm.body_seen("score", 9_000, 100)  # 90
    assert adm.rows_at_least("score", 20_000) == 200  # at most 100 bytes each: >= 200 rows
    assert adm.rows_at_least("infer", 20_000) == 1 and adm.rows_at_least("score", None) == 1
    now = time.monotonic()
    _queue(registry, "cheap", 45_000)  # 45 ms ahead on the fallback; "big" is idle
    d = adm.decide_at_arrival(now, now + 0.050, "score", 3_000)  # >= 30 rows: 3 ms on big
    assert d is not None and d.model.name == "big"
    with pytest.raises(ServiceError):  # >= 1000 rows: 100 ms on big, 46 ms on cheap
        adm.decide_at_arrival(now, now + 0.040, "score", 100_000)


def test_bodies_refused_on_arrival_for_their_size_are_read_now_and_then(
        setup: tuple[Admission, ModelRegistry, Settings]) -> None:
    """A client whose bodies hold more bytes per candidate than any seen so far looks like a
    huge request on arrival; one in PROBE_EVERY of those refusals is read anyway, and once it
    is (body_seen), its size is known and it is admitted."""
    from service.admission import PROBE_EVERY

    adm, _, _ = setup
    adm.body_seen("score", 3_000, 300)  # 10 bytes per candidate so far
    now = time.monotonic()
    outcomes = []
    for _ in range(PROBE_EVERY):  # 300 rows of 10 KB each: "at least 300,000 candidates"
        try:
            outcomes.append(adm.decide_at_arrival(now, now + 0.050, "score", 3_000_000))
        except ServiceError as e:
            assert "3000000-byte body (at least 300000 candidates)" in e.message
            outcomes.append(e)
    assert outcomes[-1] is None and all(isinstance(o, ServiceError) for o in outcomes[:-1])
    adm.body_seen("score", 3_000_000, 300)  # the probe was decoded: 10 KB per candidate
    d = adm.decide_at_arrival(now, now + 0.050, "score", 3_000_000)
    assert d is not None and d.model.name == "cheap"

"""The scoring path of one request: route → admit → encode → batch → wait.

:mod:`service.edge` reads and decodes a request into a :class:`RequestContext` and a body, and
writes the answer; :class:`ScoringService` does everything in between, in one place for
``/v1/score`` (:meth:`ScoringService.score`) and ``/v2/.../infer``
(:meth:`ScoringService.infer`):

1. the deadline: arrival + the budget (``default_timeout_ms``, lowered by the
   ``X-Request-Timeout-Ms`` header or the body's own timeout; :func:`service.budget.budget_s`);
2. admission (:class:`~service.admission.Admission`), on arrival for the fewest rows the
   body's size can hold and then for the request's rows on the model it is routed to (one
   decision function at both stages): a request that cannot make its deadline
   is answered 503 (or scored by the fallback under ``timeout_action=degrade``) before
   anything is encoded;
3. encoding (:mod:`service.encode`), then the model's batcher (:mod:`service.batcher`);
4. the wait: the scores, or a 504 at the deadline, or nothing when the client went away.

Between routing and the batcher's ``submit`` nothing awaits, so a model swapped in meanwhile
(:mod:`service.control`) cannot mix one version's encoding with another's batcher.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.admission import Admission
from service.batcher import DeadlineExceeded, QueueFull
from service.budget import budget_s
from service.control import ModelControl
from service.encode import RequestError
from service.errors import ClientDisconnected, ServiceError
from service.metrics import UNKNOWN_MODEL, Metrics
from service.models import Encode, ServedModel
from service.registry import ModelRegistry
from service.routing import assign
from service.schemas import ScoreBody, ScoreRequest, num_candidates
from service.settings import Settings
from service.shadow import ShadowScorer

log = logging.getLogger("uvicorn.error")

Receive = Callable[[], Awaitable[dict[str, Any]]]


@dataclass(slots=True)
class RequestContext:
    """One scoring request, from the edge to its answer: what is known so far about it."""

    arrival_s: float  # time.monotonic() when the app saw it: the deadline's origin
    route: str = "score"  # "score" (/v1/score) or "infer" (/v2/.../infer)
    body_bytes: int | None = None  # Content-Length, then the body's real size
    header_timeout_ms: float | None = None
    deadline_s: float = math.inf
    model: str = UNKNOWN_MODEL  # the model asked for (or routed to): the metrics label
    arm: str | None = None  # the A/B arm, when the split chose the model
    rows: int = 0
    request_id: str | None = None
    status: int = 500
    warmup: bool = False  # the start-up request through the whole stack: not counted
    after_response: Callable[[], None] | None = None  # the shadow copy, once answered


@dataclass
class Scored:
    """A scored request: the model version that scored it, whether that was the fallback,
    the probabilities (N,), queue/compute seconds, the monotonic finish time, admission's
    prediction (seconds from the decision to scored, margin included) and the request's
    ``encode(model, strict)`` (which the shadow reuses)."""

    model: ServedModel
    degraded: bool
    probs: np.ndarray
    queue_s: float
    compute_s: float
    done_s: float
    predicted_s: float
    encode: Encode


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports that the client disconnected."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ScoringService:
    """Models, admission control, batchers and metrics of one server process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.registry = ModelRegistry(settings)
        self.admission = Admission(settings, self.registry, lambda: self.in_flight)
        self.registry.on_removed.append(self.admission.forget)
        self.control = ModelControl(settings, self.registry, self.metrics, self.roles)
        self.shadow = ShadowScorer(settings, self.registry, self.metrics,
                                   lambda: self.draining)
        self.arms = settings.ab_arms
        self.ready = False
        self.draining = False
        self.in_flight = 0  # scoring requests being handled (the edge counts them)

    @property
    def models(self) -> dict[str, ServedModel]:
        """The versions serving, by name."""
        return self.registry.models

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models, warm them up (seeding the latency models), start the batchers."""
        await self.control.start()
        self.ready = True

    async def stop(self) -> None:
        """Stop taking requests, finish running batches, release the threads."""
        self.ready = False
        self.draining = True
        await self.shadow.stop()
        await self.control.stop()

    def begin_drain(self) -> None:
        """SIGTERM: readiness goes false and new scoring requests get 503 ``draining``;
        what was admitted is still scored."""
        if not self.draining:
            log.info("draining: %d requests in flight", self.in_flight)
        self.ready = False
        self.draining = True
        self.metrics.draining.set(1)

    @property
    def idle(self) -> bool:
        """No scoring request in flight and nothing queued or running in any batcher."""
        return self.in_flight == 0 and self.registry.idle

    def roles(self) -> list[tuple[str, str]]:
        """(role, model name) of every model the configuration needs."""
        s = self.settings
        out = [("default_model", self.registry.resolve(None).name)] if self.models else []
        out += [(role, name) for role, name in (("fallback_model", s.fallback_model),
                                                ("shadow_model", s.shadow_model)) if name]
        return out + [("ab arm", name) for name, _ in self.arms]

    # -- routing and refusals ------------------------------------------------------------------
    def route(self, name: str | None, user_id: str | None = None,
              user: Mapping[str, Any] | None = None) -> tuple[ServedModel, str | None]:
        """(model, A/B arm) of a request. A request naming a model gets it (arm None); else,
        with an A/B split configured and a user key (``user_id``, else the ``ab_user_field``
        feature of ``user``), the arm's model; else the default model (arm None)."""
        resolve = self.registry.resolve
        if name is not None or not self.arms:
            return resolve(name), None
        key = user_id
        if key is None and user is not None:
            value = user.get(self.settings.ab_user_field)
            key = None if value is None else str(value)
        if key is None:
            return resolve(None), None
        arm = assign(key, self.arms, self.settings.ab_salt)
        return resolve(arm), arm

    def not_serving(self) -> ServiceError | None:
        """503 ``draining`` / ``not_ready`` while the server cannot take a request."""
        if self.draining:
            return ServiceError(503, "draining", "the server is shutting down; retry on "
                                "another replica", headers={"Connection": "close"})
        if not self.ready:
            return ServiceError(503, "not_ready", "the server is not ready",
                                headers={"Retry-After": "1"})
        return None

    def refuse(self, ctx: RequestContext, e: ServiceError) -> ServiceError:
        """Count a budget refusal (503/504, draining) against the request's model."""
        if e.status in (503, 504) and not ctx.warmup:
            name = ctx.model if ctx.model != UNKNOWN_MODEL else self._default_name()
            self.metrics.child(self.metrics.rejected, name, e.error).inc()
        return e

    def _default_name(self) -> str:
        try:
            return self.registry.resolve(None).name
        except ServiceError:
            return UNKNOWN_MODEL

    # -- stage 1: on arrival -------------------------------------------------------------------
    def at_arrival(self, ctx: RequestContext) -> None:
        """Before the body is read: 503 when the server is not serving, or when not even the
        fewest rows its Content-Length can hold, on the soonest model, can make the deadline
        (counted against the default model)."""
        error = self.not_serving()
        if error is not None:
            if self.draining:
                ctx.model = self._default_name()
            raise self.refuse(ctx, error)
        ctx.deadline_s = ctx.arrival_s + budget_s(self.settings.default_timeout_ms,
                                                  (ctx.header_timeout_ms,))
        now_s = time.monotonic()
        if now_s >= ctx.deadline_s:
            return  # the body's own check answers 504
        try:
            self.admission.decide_at_arrival(now_s, ctx.deadline_s, ctx.route, ctx.body_bytes)
        except ServiceError as e:
            ctx.model = self._default_name()
            raise self.refuse(ctx, e) from None

    # -- stage 2: the request ------------------------------------------------------------------
    async def score(self, ctx: RequestContext, req: ScoreBody | ScoreRequest,
                    receive: Receive | None = None) -> Scored:
        """Score one ``/v1/score`` request (see the module docstring); ServiceError for any
        non-200."""
        model, ctx.arm = self.route(req.model, req.user_id, req.user)
        ctx.model = model.name
        rows = num_candidates(req)  # >= 1: validation refuses empty candidates
        plain = True  # a validated body holds JSON scalars only
        user, context, candidates = req.user, req.context, req.candidates

        def encode(target: ServedModel, strict: bool) -> tuple[np.ndarray, np.ndarray]:
            try:
                if not strict:  # validated for the model asked for, encoded for another
                    model.encoder.check_names(user, context, candidates)
                return target.encoder.encode(user, context, candidates, strict=strict,
                                             plain=plain)
            except RequestError as e:
                raise ServiceError(422, "invalid_request", e.reason, field=e.field) from None

        return await self.infer(ctx, model, rows, req.timeout_ms, encode, receive)

    async def infer(self, ctx: RequestContext, model: ServedModel, rows: int,
                    timeout_ms: float | None, encode: Encode, receive: Receive | None = None,
                    can_degrade: bool = True) -> Scored:
        """The path shared by ``/v1/score`` and ``/v2/.../infer``: deadline, admission,
        ``encode(model, strict)``, batcher, the wait. ServiceError for any non-200."""
        s, metrics = self.settings, self.metrics
        ctx.model, ctx.rows = model.name, rows
        if rows > s.max_candidates:
            raise ServiceError(422, "invalid_request", f"{rows} candidates, at most "
                               f"{s.max_candidates} (max_candidates) are accepted",
                               field="candidates")
        if not ctx.warmup:  # what was asked, refused or not (a traffic metric)
            metrics.child(metrics.candidates, model.name).observe(rows)
        if timeout_ms is not None:
            ctx.deadline_s = min(ctx.deadline_s, ctx.arrival_s + timeout_ms / 1e3)
        now_s = time.monotonic()
        if now_s >= ctx.deadline_s:
            raise self.refuse(ctx, ServiceError(
                504, "deadline_exceeded", "the deadline passed before the request was read"))
        try:
            decision = self.admission.decide(model, rows, now_s, ctx.deadline_s, can_degrade)
        except ServiceError as e:
            raise self.refuse(ctx, e) from None
        served = decision.model
        if decision.degraded and not ctx.warmup:
            metrics.child(metrics.degraded, model.name, "predicted_deadline_miss").inc()
        encode_start_s = time.monotonic()
        cat, dense = encode(served, not decision.degraded)
        entry = self.registry.get(served.name)
        if not ctx.warmup:  # the start-up request's cold timings would skew the models
            entry.encode_cost.observe(rows, time.monotonic() - encode_start_s)
            # only a body that encoded is evidence of the route's bytes per candidate
            if ctx.body_bytes:
                self.admission.body_seen(ctx.route, ctx.body_bytes, rows)
        try:
            item = entry.batcher.submit(cat, dense, ctx.deadline_s)
        except QueueFull as e:
            raise self.refuse(ctx, ServiceError(503, "queue_full", str(e),
                                                headers={"Retry-After": "1"})) from None
        depth = metrics.child(metrics.queue_depth, served.name)
        depth.set(entry.batcher.queue_depth)
        try:
            probs = await self._wait(item, ctx.deadline_s, receive)
        except DeadlineExceeded:
            if not ctx.warmup:
                self.admission.observe(decision, time.monotonic(), missed=True)
            raise self.refuse(ctx, ServiceError(
                504, "deadline_exceeded", "the deadline passed before the request was scored")
            ) from None
        except ClientDisconnected:
            if not ctx.warmup:
                metrics.child(metrics.rejected, model.name, "client_disconnected").inc()
            raise
        finally:
            depth.set(entry.batcher.queue_depth)
        done_s = time.monotonic()
        if not ctx.warmup:
            self.admission.observe(decision, done_s, missed=done_s > ctx.deadline_s)
        if done_s > ctx.deadline_s:
            raise self.refuse(ctx, ServiceError(
                504, "deadline_exceeded",
                f"scored {(done_s - ctx.deadline_s) * 1e3:.1f} ms after the deadline"))
        if not ctx.warmup:
            metrics.child(metrics.queue_duration, served.name, str(served.version)).observe(
                item.queue_s)
            metrics.child(metrics.slack, model.name).observe(ctx.deadline_s - done_s)
            metrics.child(metrics.admission_ratio, served.name).observe(
                (done_s - decision.decided_s) / decision.predicted_s
                if decision.predicted_s > 0 else 1.0)
        return Scored(served, decision.degraded, probs, item.queue_s, item.compute_s, done_s,
                      (decision.decided_s - ctx.arrival_s) + decision.predicted_s, encode)

    @staticmethod
    async def _wait(item: Any, deadline_s: float, receive: Receive | None) -> np.ndarray:
        """The item's result. At the deadline, or if the client disconnects first, the item
        is withdrawn (cancelled: the batcher skips it, or drops the result of a batch that
        already holds it) and DeadlineExceeded / ClientDisconnected is raised at once,
        rather than when the batcher next looks at the queue."""
        result = item.future
        loop = result.get_loop()
        woken = loop.create_future()

        def wake(_: Any = None) -> None:
            if not woken.done():
                woken.set_result(None)

        result.add_done_callback(wake)
        watcher = None if receive is None else loop.create_task(_wait_disconnect(receive))
        if watcher is not None:
            watcher.add_done_callback(wake)
        timer = loop.call_later(max(0.0, deadline_s - time.monotonic()), wake)
        try:
            await woken
            gone = watcher is not None and watcher.done() and not watcher.cancelled()
        finally:
            timer.cancel()
            result.remove_done_callback(wake)
            if watcher is not None:
                watcher.remove_done_callback(wake)
                watcher.cancel()
        if result.done():
            return result.result()  # DeadlineExceeded if the batcher dropped it
        result.cancel()
        if gone:
            raise ClientDisconnected
        raise DeadlineExceeded("the deadline passed before the request was scored")

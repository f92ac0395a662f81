"""The scoring path of one request: budget → admission → encode → batch → respond.

:class:`ScoringService` owns the loaded models, one :class:`~service.batcher.Batcher` per model
and the metrics; the HTTP layer (:mod:`service.app`) only parses, calls :meth:`score` and writes
the answer. Admission happens before encoding, so that a request that cannot make its deadline
costs almost nothing: the predicted time is the request's encoding (a per-row model fitted on
the requests served) plus the batcher's prediction (queue ahead, running batch, own compute),
times ``admission_safety_factor``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from service.batcher import Batcher, DeadlineExceeded, QueueFull
from service.budget import LatencyModel, budget_s, retry_after_s
from service.encode import RequestError
from service.metrics import Metrics
from service.models import ServedModel, load_models
from service.schemas import ScoreRequest, ScoreResponse, Timing
from service.settings import Settings

log = logging.getLogger("uvicorn.error")

Receive = Callable[[], Awaitable[dict[str, Any]]]
WARMUP_ROWS = (1, 16, 128, 512, 2048)
CORRECTION_HALF_LIFE_S = 0.5
MAX_CORRECTION = 5.0


class ServiceError(Exception):
    """An answer other than 200: HTTP status, reason code, message, optional field/headers."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.field, self.headers = field, headers


class ClientDisconnected(Exception):
    """The client went away before its scores were ready; nothing is sent."""


async def _wait_disconnect(receive: Receive) -> None:
    """Return when the ASGI server reports that the client disconnected."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ScoringService:
    """Models, batchers, admission control and metrics of one server process."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.models: dict[str, ServedModel] = {}
        self.batchers: dict[str, Batcher] = {}
        self.encode_cost: dict[str, LatencyModel] = {}
        # observed / predicted time of admitted requests (EWMA, >= 1): the contention that
        # the batch model does not see (the event loop, other processes on the same cores)
        self.correction: dict[str, float] = {}
        self._corrected_at: dict[str, float] = {}
        self.ready = False

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models, warm them up (seeding the latency models), start the batchers."""
        s = self.settings
        self.models = await asyncio.to_thread(load_models, s)
        for m in self.models.values():
            latency = LatencyModel(s.latency_window)
            self.encode_cost[m.name] = LatencyModel(s.latency_window)
            self.correction[m.name] = 1.0
            await asyncio.to_thread(self._warmup, m, latency)
            self.batchers[m.name] = Batcher(
                m.run, max_batch_size=s.max_batch_size,
                max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
                dynamic_batching=s.dynamic_batching,
                instance_count=s.instance_count, latency=latency,
                on_batch=self._batch_observer(m), name=m.name)
            self.batchers[m.name].start()
            labels = {"model": m.name, "version": str(m.version)}
            self.metrics.model_info.labels(**labels, provider=m.provider, precision=m.precision,
                                           arch=m.arch).set(1)
            self.metrics.flops.labels(**labels).set(m.flops_per_example)
            self.metrics.queue_depth.labels(model=m.name).set(0)
            log.info("serving %s version %d (%s, %s) on %s, %d ONNX Runtime threads; latency "
                     "model %.3f ms + %.2f us/row", m.name, m.version, m.arch, m.precision,
                     m.provider, s.session_threads, latency.fixed_s * 1e3,
                     latency.per_row_s * 1e6)
        self.ready = True

    async def stop(self) -> None:
        """Stop taking requests, finish running batches, release the threads."""
        self.ready = False
        await asyncio.gather(*(b.stop() for b in self.batchers.values()))

    def _warmup(self, m: ServedModel, latency: LatencyModel) -> None:
        """Run every warmup batch size ``warmup_runs`` times; seed the latency models."""
        sizes = sorted({min(r, self.settings.max_batch_size) for r in WARMUP_ROWS})
        for rows in sizes:
            cat, dense = m.example_inputs(rows)
            times = []
            for _ in range(self.settings.warmup_runs):
                t0 = time.perf_counter()
                m.run(cat, dense)
                times.append(time.perf_counter() - t0)
            latency.seed(rows, float(np.median(times)))
            schema = m.encoder.encoders.schema
            cols = {f.name: ["warmup" if f.type == "categorical" else 1.0] * rows
                    for f in schema.fields_on(["candidate"])}
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                m.encoder.encode({}, {}, cols)
                times.append(time.perf_counter() - t0)
            self.encode_cost[m.name].seed(rows, float(np.median(times)))
        self._publish_latency_model(m.name, latency)

    def _publish_latency_model(self, name: str, latency: LatencyModel) -> None:
        latency.predict(0)
        self.metrics.latency_fixed.labels(model=name).set(latency.fixed_s)
        self.metrics.latency_per_row.labels(model=name).set(latency.per_row_s)

    def _batch_observer(self, m: ServedModel) -> Callable[[int, float], None]:
        labels = {"model": m.name, "version": str(m.version)}
        batch_size = self.metrics.batch_size.labels(**labels)
        compute = self.metrics.compute_duration.labels(**labels)
        count = [0]

        def observe(rows: int, seconds: float) -> None:
            batch_size.observe(rows)
            compute.observe(seconds)
            count[0] += 1
            if count[0] % 64 == 0:
                self._publish_latency_model(m.name, self.batchers[m.name].latency)

        return observe

    # -- requests -----------------------------------------------------------------------------
    def resolve(self, name: str | None) -> ServedModel:
        """The model a request names (or the default); ServiceError 404 if there is none."""
        if name is None:
            name = self.settings.default_model or next(iter(self.models), None)
        model = self.models.get(name) if name is not None else None
        if model is None:
            raise ServiceError(404, "model_not_found",
                               f"no model named {name!r} (models: {sorted(self.models)})",
                               field="model")
        return model

    def predict_s(self, model: ServedModel, rows: int) -> float:
        """Predicted seconds from now until ``rows`` rows of ``model`` are scored."""
        encode = self.encode_cost[model.name].predict(rows)
        raw = encode + self.batchers[model.name].predict_s(rows)
        return raw * self._correction(model.name)

    def _correction(self, name: str) -> float:
        """The correction, decayed towards 1 (half-life CORRECTION_HALF_LIFE_S) since it was
        last raised, so that a burst of misses cannot shut the model out for good."""
        c, since = self.correction[name], self._corrected_at.get(name, 0.0)
        now = time.monotonic()
        c = 1.0 + (c - 1.0) * 0.5 ** ((now - since) / CORRECTION_HALF_LIFE_S)
        self.correction[name], self._corrected_at[name] = c, now
        return c

    def _feedback(self, model: ServedModel, predicted_s: float, taken_s: float,
                  missed: bool) -> None:
        """Learn how far reality is from the prediction: served requests move the correction
        towards taken/predicted; a deadline missed after admission raises it at once."""
        if predicted_s <= 0:
            return
        c = self._correction(model.name)
        ratio = taken_s / predicted_s
        c = c * 1.2 if missed else 0.9 * c + 0.1 * ratio
        self.correction[model.name] = min(max(c, 1.0), MAX_CORRECTION)

    def shed_early(self, arrival_s: float, header_timeout_ms: float | None) -> ServiceError | None:
        """Overload shedding before the body is read: when even a one-candidate request could
        not make the largest deadline it may have on any loaded model, the 503 costs almost
        nothing (no JSON parsing). Counted against the default model."""
        if not self.ready:
            return None
        s = self.settings
        deadline_s = arrival_s + budget_s(s.default_timeout_ms, (header_timeout_ms,))
        now_s = time.monotonic()
        best = min(self.predict_s(m, 1) for m in self.models.values())
        if now_s + best * s.admission_safety_factor <= deadline_s:
            return None
        return self._reject(self.resolve(None), 503, "predicted_deadline_miss",
                            f"the queue alone is predicted to take {best * 1e3:.1f} ms, more "
                            "than the budget", retry_after=retry_after_s(best))

    def _reject(self, model: ServedModel, status: int, reason: str, message: str,
                retry_after: int | None = None) -> ServiceError:
        self.metrics.rejected.labels(model=model.name, reason=reason).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return ServiceError(status, reason, message, headers=headers)

    def _admit(self, model: ServedModel, rows: int, now_s: float,
               deadline_s: float) -> tuple[ServedModel, bool, float]:
        """The model that will score the request and whether that is a degradation."""
        s = self.settings
        batcher = self.batchers[model.name]
        if batcher.queue_depth >= s.max_queue_size:
            raise self._reject(model, 503, "queue_full",
                               f"model {model.name!r} has {batcher.queue_depth} requests queued "
                               "(max_queue_size)", retry_after=1)
        predicted = self.predict_s(model, rows) * s.admission_safety_factor
        if now_s + predicted <= deadline_s:
            return model, False, predicted / s.admission_safety_factor
        fallback = self.models.get(s.fallback_model or "")
        if s.timeout_action == "degrade" and fallback is not None and fallback is not model:
            fb_batcher = self.batchers[fallback.name]
            fb_pred = self.predict_s(fallback, rows) * s.admission_safety_factor
            if fb_batcher.queue_depth < s.max_queue_size and now_s + fb_pred <= deadline_s:
                self.metrics.degraded.labels(model=model.name,
                                             reason="predicted_deadline_miss").inc()
                return fallback, True, fb_pred / s.admission_safety_factor
        left_ms = max(0.0, (deadline_s - now_s) * 1e3)
        raise self._reject(
            model, 503, "predicted_deadline_miss",
            f"{rows} candidates are predicted to take {predicted * 1e3:.1f} ms, "
            f"{left_ms:.1f} ms of the budget are left", retry_after=retry_after_s(predicted))

    async def score(
        self,
        model: ServedModel,
        req: ScoreRequest,
        arrival_s: float,
        header_timeout_ms: float | None = None,
        receive: Receive | None = None,
    ) -> ScoreResponse:
        """Score one request (see the module docstring); ServiceError for any non-200."""
        s = self.settings
        if not self.ready:
            raise self._reject(model, 503, "not_ready", "the server is not ready", retry_after=1)
        rows = req.num_candidates
        if rows == 0:
            raise ServiceError(422, "invalid_request", "at least one candidate is needed",
                               field="candidates")
        if rows > s.max_candidates:
            raise ServiceError(422, "invalid_request", f"{rows} candidates, at most "
                               f"{s.max_candidates} (max_candidates) are accepted",
                               field="candidates")
        self.metrics.candidates.labels(model=model.name).observe(rows)
        deadline_s = arrival_s + budget_s(s.default_timeout_ms, (req.timeout_ms,
                                                                 header_timeout_ms))
        now_s = time.monotonic()
        if now_s >= deadline_s:
            raise self._reject(model, 504, "deadline_exceeded",
                               "the deadline passed before the request was read")
        served, degraded, predicted_s = self._admit(model, rows, now_s, deadline_s)
        try:
            if degraded:  # validate for the model asked for, encode for the fallback
                model.encoder.check_names(req.user, req.context, req.candidates)
            cat, dense = served.encoder.encode(req.user, req.context, req.candidates,
                                               strict=not degraded)
        except RequestError as e:
            raise ServiceError(422, "invalid_request", e.reason, field=e.field) from None
        encoded_s = time.monotonic()
        self.encode_cost[served.name].observe(rows, encoded_s - now_s)
        batcher = self.batchers[served.name]
        try:
            item = batcher.submit(cat, dense, deadline_s)
        except QueueFull as e:
            raise self._reject(model, 503, "queue_full", str(e), retry_after=1) from None
        depth = self.metrics.queue_depth.labels(model=served.name)
        depth.set(batcher.queue_depth)
        try:
            probs = await self._wait(item, receive)
        except DeadlineExceeded:
            self._feedback(served, predicted_s, time.monotonic() - now_s, missed=True)
            raise self._reject(model, 504, "deadline_exceeded",
                               "the deadline passed before the request was scored") from None
        except ClientDisconnected:
            self.metrics.rejected.labels(model=model.name, reason="client_disconnected").inc()
            raise
        finally:
            depth.set(batcher.queue_depth)
        done_s = time.monotonic()
        self._feedback(served, predicted_s, done_s - now_s, missed=done_s > deadline_s)
        if done_s > deadline_s:
            raise self._reject(model, 504, "deadline_exceeded",
                               f"scored {(done_s - deadline_s) * 1e3:.1f} ms after the deadline")
        labels = {"model": served.name, "version": str(served.version)}
        self.metrics.queue_duration.labels(**labels).observe(item.queue_s)
        self.metrics.slack.labels(model=model.name).observe(deadline_s - done_s)
        return ScoreResponse.model_construct(
            request_id=req.request_id, model=served.name, version=served.version,
            degraded=degraded, scores=probs.tolist(),
            timing=Timing.model_construct(queue_ms=item.queue_s * 1e3,
                                          compute_ms=item.compute_s * 1e3,
                                          total_ms=(done_s - arrival_s) * 1e3))

    @staticmethod
    async def _wait(item: Any, receive: Receive | None) -> np.ndarray:
        """The item's result; if the client disconnects first, withdraw the item."""
        if receive is None:
            return await item.future
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((item.future, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not item.future.done():
            item.future.cancel()  # the batcher skips it: never computed
            raise ClientDisconnected
        return item.future.result()


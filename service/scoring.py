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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.repository import ModelRepository
from service.batcher import Batcher, DeadlineExceeded, QueueFull
from service.budget import LatencyModel, budget_s, retry_after_s
from service.encode import RequestError
from service.metrics import Metrics
from service.models import (
    ModelLoadError,
    ServedModel,
    load_models,
    open_version,
    validate_served,
)
from service.routing import assign
from service.schemas import ScoreRequest, ScoreResponse, Timing
from service.settings import Settings
from service.shadow import ShadowScorer

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


Encode = Callable[[ServedModel, bool], tuple[np.ndarray, np.ndarray]]


@dataclass
class Scored:
    """A scored request: the model version that scored it, whether that was the fallback,
    the probabilities (N,), queue/compute seconds, the monotonic finish time, and the
    request's ``encode(model, strict)`` (which the shadow reuses)."""

    model: ServedModel
    degraded: bool
    probs: np.ndarray
    queue_s: float
    compute_s: float
    done_s: float
    encode: Encode


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
        self.draining = False
        self.in_flight = 0  # scoring requests being handled (the edge middleware counts)
        self.arms = settings.ab_arms
        self.shadow = ShadowScorer(self)
        self._admin_lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[Any]] = set()
        self._poll_task: asyncio.Task[None] | None = None
        self._refused: dict[str, set[int]] = {}  # versions polling will not try again

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the models, warm them up (seeding the latency models), start the batchers."""
        self.models = {}
        for m in (await asyncio.to_thread(load_models, self.settings)).values():
            latency, encode_cost = await asyncio.to_thread(self._warmup, m)
            self._install(m, latency, encode_cost)
        self.ready = True
        if self.settings.poll_interval_s > 0:
            self._poll_task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        """Stop taking requests, finish running batches, release the threads."""
        self.ready = False
        self.draining = True
        if self._poll_task is not None:
            self._poll_task.cancel()
        await self.shadow.stop()
        await asyncio.gather(*(b.stop() for b in self.batchers.values()), *self._retiring,
                             return_exceptions=True)

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
        return self.in_flight == 0 and all(b.idle for b in self.batchers.values())

    def _install(self, m: ServedModel, latency: LatencyModel, encode_cost: LatencyModel
                 ) -> ServedModel | None:
        """Put ``m`` into service in one step (no await): from the next request on, its name
        resolves to ``m`` and its batcher. The version it replaces (returned) retires in the
        background: its batcher scores what it holds, then stops."""
        s = self.settings
        batcher = Batcher(
            m.run, max_batch_size=s.max_batch_size,
            max_queue_delay_s=s.max_queue_delay_ms / 1e3, max_queue_size=s.max_queue_size,
            dynamic_batching=s.dynamic_batching, instance_count=s.instance_count,
            latency=latency, on_batch=self._batch_observer(m), name=m.name,
            nice=s.inference_nice)
        batcher.start()
        old, old_batcher = self.models.get(m.name), self.batchers.get(m.name)
        self.models[m.name], self.batchers[m.name] = m, batcher
        self.encode_cost[m.name] = encode_cost
        self.correction.setdefault(m.name, 1.0)
        if old is not None and old_batcher is not None:
            self._retire(old, old_batcher)
        labels = {"model": m.name, "version": str(m.version)}
        self.metrics.model_info.labels(**labels, provider=m.provider, precision=m.precision,
                                       arch=m.arch).set(1)
        self.metrics.flops.labels(**labels).set(m.flops_per_example)
        self.metrics.provider_fallback.labels(model=m.name).set(int(m.provider_fallback))
        self.metrics.queue_depth.labels(model=m.name).set(0)
        log.info("serving %s version %d (%s, %s) on %s, %d ONNX Runtime threads, buckets %s, "
                 "CUDA graphs %s; latency model %.3f ms + %.2f us/row", m.name, m.version,
                 m.arch, m.precision, m.provider, s.session_threads,
                 ",".join(map(str, m.buckets)) or "off", "on" if m.cuda_graphs else "off",
                 latency.fixed_s * 1e3, latency.per_row_s * 1e6)
        return old

    def _retire(self, m: ServedModel, batcher: Batcher) -> None:
        """Drain ``m``'s batcher in the background; mark its version unloaded in metrics."""
        if m.version != getattr(self.models.get(m.name), "version", None):
            self.metrics.model_info.labels(model=m.name, version=str(m.version),
                                           provider=m.provider, precision=m.precision,
                                           arch=m.arch).set(0)
        grace_s = max(1.0, self.settings.default_timeout_ms / 1e3 * 4)
        task = asyncio.get_running_loop().create_task(batcher.drain(grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- model control (admin endpoints, repository polling) -------------------------------------
    async def load(self, name: str, version: int | None = None,
                   require_loaded: bool = False) -> dict[str, Any]:
        """Load version ``version`` (default: the latest) of ``name`` and put it into service.

        The new version is opened, validated (:func:`~service.models.validate_served`) and
        warmed up off the event loop while the current one keeps serving; then it is swapped
        in at once and the old one retires after scoring what it holds. A version that fails
        validation is refused (ServiceError 422 ``version_rejected``; counted in
        ``mldcn_model_loads_total{result="rejected"}``) and nothing changes.
        """
        if self._admin_lock.locked():
            raise ServiceError(409, "busy", "another load, reload or unload is in progress")
        async with self._admin_lock:
            old = self.models.get(name)
            if require_loaded and old is None:
                raise ServiceError(404, "model_not_found", f"model {name!r} is not loaded "
                                   f"(models: {sorted(self.models)})", field="name")
            try:
                mv = ModelRepository(self.settings.repo).load_version(name, version)
            except ValueError as e:  # RepositoryError: no such model or version
                raise ServiceError(404, "version_not_found", str(e), field="version") from None
            t0 = time.perf_counter()
            try:
                m = await asyncio.to_thread(self._open_validated, mv)
                latency, encode_cost = await asyncio.to_thread(self._warmup, m)
            except ModelLoadError as e:
                self.metrics.model_loads.labels(model=name, result="rejected").inc()
                self._refused.setdefault(name, set()).add(mv.version)
                log.error("refused %s version %d: %s", name, mv.version, e)
                previous = f"; version {old.version} keeps serving" if old else ""
                raise ServiceError(422, "version_rejected", f"{e}{previous}") from None
            self._install(m, latency, encode_cost)
            self.metrics.model_loads.labels(model=name, result="loaded").inc()
            took = time.perf_counter() - t0
            log.info("%s version %d in service (was %s) after %.2fs", name, m.version,
                     old.version if old else "not loaded", took)
            return {"name": name, "version": m.version,
                    "previous_version": old.version if old else None,
                    "load_s": round(took, 3)}

    def _open_validated(self, mv: Any) -> ServedModel:
        m = open_version(mv, self.settings)
        validate_served(m, mv)
        return m

    async def unload(self, name: str) -> dict[str, Any]:
        """Take ``name`` out of service; its in-flight requests finish first (in the
        background). 409 for a model the configuration needs (default, fallback, shadow,
        A/B arm) or the last one."""
        if self._admin_lock.locked():
            raise ServiceError(409, "busy", "another load, reload or unload is in progress")
        async with self._admin_lock:
            m = self.models.get(name)
            if m is None:
                raise ServiceError(404, "model_not_found", f"model {name!r} is not loaded "
                                   f"(models: {sorted(self.models)})", field="name")
            s = self.settings
            roles = [role for role, n in (("default_model", self.resolve(None).name),
                                          ("fallback_model", s.fallback_model),
                                          ("shadow_model", s.shadow_model))
                     if n == name] + (["ab arm"] if name in dict(self.arms) else [])
            if roles or len(self.models) == 1:
                why = f"it is the {', '.join(roles)}" if roles else "it is the last model"
                raise ServiceError(409, "model_in_use", f"cannot unload {name!r}: {why}")
            batcher = self.batchers.pop(name)
            del self.models[name]
            self._retire(m, batcher)
            self.metrics.model_info.labels(model=m.name, version=str(m.version),
                                           provider=m.provider, precision=m.precision,
                                           arch=m.arch).set(0)
            self.metrics.model_loads.labels(model=name, result="unloaded").inc()
            log.info("unloaded %s version %d", name, m.version)
            return {"name": name, "version": None, "previous_version": m.version}

    async def _poll(self) -> None:
        """Every ``poll_interval_s``: load the newest version of each loaded model if it is
        newer than the one serving (a refused version is not tried again)."""
        repo = ModelRepository(self.settings.repo)
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            for name in list(self.models):
                try:
                    versions = await asyncio.to_thread(repo.versions, name)
                except (OSError, ValueError) as e:
                    log.warning("polling %s: %s", name, e)
                    continue
                current = self.models.get(name)
                if (not versions or current is None or versions[-1] <= current.version
                        or versions[-1] in self._refused.get(name, ())):
                    continue
                try:
                    await self.load(name, versions[-1], require_loaded=True)
                except ServiceError as e:
                    log.warning("polling %s: version %d not loaded: %s", name, versions[-1],
                                e.message)

    def _warmup(self, m: ServedModel) -> tuple[LatencyModel, LatencyModel]:
        """Run every warmup batch size ``warmup_runs`` times; return the seeded latency models
        (batch, encoding). A model padded to buckets also runs each bucket's own size, so
        that every bucket's kernels are cached (and its CUDA graph captured) before ready."""
        latency = LatencyModel(self.settings.latency_window)
        encode_cost = LatencyModel(self.settings.latency_window)
        sizes = sorted({min(r, self.settings.max_batch_size) for r in WARMUP_ROWS}
                       | set(m.buckets))
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
            encode_cost.seed(rows, float(np.median(times)))
        self._publish_latency_model(m.name, latency)
        return latency, encode_cost

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
            if count[0] % 64 == 0 and m.name in self.batchers:
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

    def route(self, name: str | None, user_id: str | None = None,
              user: Mapping[str, Any] | None = None) -> tuple[ServedModel, str | None]:
        """(model, A/B arm) of a request. A request naming a model gets it (arm None); else,
        with an A/B split configured and a user key (``user_id``, else the ``ab_user_field``
        feature of ``user``), the arm's model; else the default model (arm None)."""
        if name is not None or not self.arms:
            return self.resolve(name), None
        key = user_id
        if key is None and user is not None:
            value = user.get(self.settings.ab_user_field)
            key = None if value is None else str(value)
        if key is None:
            return self.resolve(None), None
        arm = assign(key, self.arms, self.settings.ab_salt)
        return self.resolve(arm), arm

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
        if not self.ready or not self.models:
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

    def admit_early(self, model: ServedModel, rows: int, arrival_s: float,
                    timeouts_ms: tuple[float | None, ...]) -> None:
        """Raise now the 503 that :meth:`infer` would answer for ``rows`` rows of ``model``
        (queue full, or a predicted deadline miss with nothing to degrade to), before the
        request is validated and encoded; do nothing in every other case (:meth:`infer`
        decides those). Counted like :meth:`infer`'s own rejections."""
        s = self.settings
        if self.draining or not self.ready or not 0 < rows <= s.max_candidates:
            return
        deadline_s = arrival_s + budget_s(s.default_timeout_ms, timeouts_ms)
        now_s = time.monotonic()
        if now_s >= deadline_s:
            return  # infer answers 504
        try:
            self._admit(model, rows, now_s, deadline_s)
        except ServiceError:
            self.metrics.candidates.labels(model=model.name).observe(rows)
            raise

    def _reject(self, model: ServedModel, status: int, reason: str, message: str,
                retry_after: int | None = None) -> ServiceError:
        self.metrics.rejected.labels(model=model.name, reason=reason).inc()
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return ServiceError(status, reason, message, headers=headers)

    def _admit(self, model: ServedModel, rows: int, now_s: float, deadline_s: float,
               can_degrade: bool = True) -> tuple[ServedModel, bool, float]:
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
        if (s.timeout_action == "degrade" and can_degrade and fallback is not None
                and fallback is not model):
            fb_batcher = self.batchers[fallback.name]
            fb_pred = self.predict_s(fallback, rows) * s.admission_safety_factor
            if fb_batcher.queue_depth < s.max_queue_size and now_s + fb_pred <= deadline_s:
                return fallback, True, fb_pred / s.admission_safety_factor
        left_ms = max(0.0, (deadline_s - now_s) * 1e3)
        raise self._reject(
            model, 503, "predicted_deadline_miss",
            f"{rows} candidates are predicted to take {predicted * 1e3:.1f} ms, "
            f"{left_ms:.1f} ms of the budget are left", retry_after=retry_after_s(predicted))

    def not_serving(self, model: ServedModel | None) -> ServiceError | None:
        """503 ``draining`` / ``not_ready`` while the server cannot take a request."""
        if self.draining:
            if model is not None:
                self.metrics.rejected.labels(model=model.name, reason="draining").inc()
            return ServiceError(503, "draining", "the server is shutting down; retry on "
                                "another replica", headers={"Connection": "close"})
        if not self.ready:
            if model is not None:
                self.metrics.rejected.labels(model=model.name, reason="not_ready").inc()
            return ServiceError(503, "not_ready", "the server is not ready",
                                headers={"Retry-After": "1"})
        return None

    async def score(
        self,
        model: ServedModel,
        req: ScoreRequest,
        arrival_s: float,
        header_timeout_ms: float | None = None,
        receive: Receive | None = None,
        arm: str | None = None,
    ) -> tuple[ScoreResponse, Scored]:
        """Score one ``/v1/score`` request (see the module docstring); ServiceError for any
        non-200. Returns the response and what :meth:`infer` returned (for the shadow)."""
        rows = req.num_candidates
        if rows == 0:
            raise ServiceError(422, "invalid_request", "at least one candidate is needed",
                               field="candidates")

        def encode(target: ServedModel, strict: bool) -> tuple[np.ndarray, np.ndarray]:
            try:
                if not strict:  # validate for the model asked for, encode for another
                    model.encoder.check_names(req.user, req.context, req.candidates)
                return target.encoder.encode(req.user, req.context, req.candidates,
                                             strict=strict)
            except RequestError as e:
                raise ServiceError(422, "invalid_request", e.reason, field=e.field) from None

        done = await self.infer(model, rows, arrival_s, (req.timeout_ms, header_timeout_ms),
                                encode, receive)
        response = ScoreResponse.model_construct(
            request_id=req.request_id, model=done.model.name, version=done.model.version,
            degraded=done.degraded, arm=arm, scores=done.probs.tolist(),
            timing=Timing.model_construct(queue_ms=done.queue_s * 1e3,
                                          compute_ms=done.compute_s * 1e3,
                                          total_ms=(done.done_s - arrival_s) * 1e3))
        return response, done

    async def infer(
        self,
        model: ServedModel,
        rows: int,
        arrival_s: float,
        timeouts_ms: tuple[float | None, ...],
        encode: Encode,
        receive: Receive | None = None,
        can_degrade: bool = True,
    ) -> Scored:
        """The scoring path shared by ``/v1/score`` and ``/v2/.../infer``: budget, admission,
        ``encode(model, strict)``, batcher, deadline check. ServiceError for any non-200.

        Between :meth:`route`/:meth:`resolve` and the batcher's ``submit`` nothing awaits, so
        a model swapped in meanwhile (:meth:`load`) cannot mix one version's encoding with
        another's batcher.
        """
        s = self.settings
        error = self.not_serving(model)
        if error is not None:
            raise error
        if rows > s.max_candidates:
            raise ServiceError(422, "invalid_request", f"{rows} candidates, at most "
                               f"{s.max_candidates} (max_candidates) are accepted",
                               field="candidates")
        self.metrics.candidates.labels(model=model.name).observe(rows)
        deadline_s = arrival_s + budget_s(s.default_timeout_ms, timeouts_ms)
        now_s = time.monotonic()
        if now_s >= deadline_s:
            raise self._reject(model, 504, "deadline_exceeded",
                               "the deadline passed before the request was read")
        served, degraded, predicted_s = self._admit(model, rows, now_s, deadline_s,
                                                    can_degrade)
        if degraded:
            self.metrics.degraded.labels(model=model.name, reason="predicted_deadline_miss").inc()
        cat, dense = encode(served, not degraded)
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
            probs = await self._wait(item, deadline_s, receive)
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
        return Scored(served, degraded, probs, item.queue_s, item.compute_s, done_s, encode)

    @staticmethod
    async def _wait(item: Any, deadline_s: float, receive: Receive | None) -> np.ndarray:
        """The item's result. At the deadline, or if the client disconnects first, the item
        is withdrawn (cancelled: the batcher skips it, or drops the result of a batch that
        already holds it) and DeadlineExceeded / ClientDisconnected is raised at once,
        rather than when the batcher next looks at the queue."""
        watcher = None if receive is None else asyncio.ensure_future(_wait_disconnect(receive))
        waits = {item.future} if watcher is None else {item.future, watcher}
        try:
            await asyncio.wait(waits, timeout=max(0.0, deadline_s - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            gone = watcher is not None and watcher.done()
        finally:
            if watcher is not None:
                watcher.cancel()
        if item.future.done():
            return item.future.result()  # DeadlineExceeded if the batcher dropped it
        item.future.cancel()
        if gone:
            raise ClientDisconnected
        raise DeadlineExceeded("the deadline passed before the request was scored")

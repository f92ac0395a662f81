"""Model control: load, warm up, swap, unload and poll model versions while serving.

:class:`ModelControl` is the only writer of the :class:`~service.registry.ModelRegistry`. At
start-up it loads every configured model, warms each up (every warmup batch size
``warmup_runs`` times, which also seeds its latency models) and installs it. While serving,
:meth:`ModelControl.load` opens a new version off the event loop, validates it
(:func:`~service.models.validate_served`), warms it up and swaps it in at once; the old version
retires after scoring what it holds. A version that fails validation is refused (422
``version_rejected``; ``mldcn_model_loads_total{result="rejected"}``) and nothing changes.
With ``poll_interval_s`` > 0 the repository is polled for newer versions of loaded models.

With several worker processes (``control_dir`` set by ``mldcn serve --workers N``) an admin
load or unload is applied by the worker that took the call, then published to the others
(:mod:`service.broadcast`), which apply the same version; the answer lists every worker's
result (``workers``), and a call while another one runs anywhere is 409 ``busy``. Repository
polling stays per worker (each finds the new version on its own).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from export.repository import ModelRepository, ModelVersion
from service.broadcast import FOLLOW_INTERVAL_S, Action, Broadcast, Busy
from service.budget import LatencyModel
from service.errors import ServiceError
from service.metrics import Metrics
from service.models import (
    ModelLoadError,
    ServedModel,
    load_models,
    open_version,
    validate_served,
)
from service.registry import ModelRegistry, ServingConfig
from service.settings import Settings

log = logging.getLogger("uvicorn.error")
WARMUP_ROWS = (1, 16, 128, 512, 2048)
LATENCY_PUBLISH_EVERY = 64  # batches between two updates of the latency-model gauges
ACK_TIMEOUT_S = 120.0  # longest wait for the other workers to apply an admin action


class ModelControl:
    """Loads and swaps the versions in ``registry`` (see the module docstring).

    Args:
        settings: the service settings.
        registry: the models serving.
        metrics: where loads, model info and batch observations are recorded.
        roles: the names the configuration needs (default, fallback, shadow, A/B arms),
            which cannot be unloaded; called at unload time.
    """

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics,
                 roles: Callable[[], list[tuple[str, str]]]) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.roles = roles
        self._lock = asyncio.Lock()
        self._catching = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self.refused: dict[str, set[int]] = {}  # versions polling will not try again
        self.broadcast = (Broadcast(settings.control_dir) if settings.control_dir is not None
                          else None)

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the configured models, warm them up, put them into service; start polling."""
        configs: dict[str, ServingConfig] = {}

        def options(name: str) -> dict[str, Any]:
            configs[name] = ServingConfig.for_model(self.settings, name)  # read once per load
            return configs[name].open_options()

        for m in (await asyncio.to_thread(load_models, self.settings, options)).values():
            config = configs[m.name]
            latency, encode_cost = await asyncio.to_thread(self._warmup, m, config)
            self._install(m, latency, encode_cost, config)
        loop = asyncio.get_running_loop()
        if self.broadcast is not None:  # a restarted worker serves what the others serve
            seq = self.broadcast.last_seq()
            for name, version in self.broadcast.desired(upto=seq).items():
                await self._apply(name, version)
            self.broadcast.register(applied=seq)  # later actions: followed and acknowledged
            self._tasks.append(loop.create_task(self._follow()))
        if self.settings.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll()))

    async def stop(self) -> None:
        """Stop polling and the batchers (running batches finish)."""
        for task in self._tasks:
            task.cancel()
        if self.broadcast is not None:
            self.broadcast.unregister()
        await self.registry.stop()

    def _install(self, m: ServedModel, latency: LatencyModel, encode_cost: LatencyModel,
                 config: ServingConfig) -> ServedModel | None:
        old = self.registry.install(m, latency, encode_cost, self._batch_observer(m), config)
        if old is not None and old.version != m.version:
            self._info(old, 0)
        self._info(m, 1)
        labels = {"model": m.name, "version": str(m.version)}
        self.metrics.flops.labels(**labels).set(m.flops_per_example)
        self.metrics.provider_fallback.labels(model=m.name).set(int(m.provider_fallback))
        self.metrics.queue_depth.labels(model=m.name).set(0)
        self._publish_latency_model(m.name, latency)
        log.info("serving %s version %d (%s, %s) on %s, %d ONNX Runtime threads, buckets %s, "
                 "CUDA graphs %s; latency model %.3f ms + %.2f us/row", m.name, m.version,
                 m.arch, m.precision, m.provider, self.settings.session_threads,
                 ",".join(map(str, m.buckets)) or "off", "on" if m.cuda_graphs else "off",
                 latency.fixed_s * 1e3, latency.per_row_s * 1e6)
        return old

    def _info(self, m: ServedModel, value: int) -> None:
        self.metrics.model_info.labels(model=m.name, version=str(m.version), provider=m.provider,
                                       precision=m.precision, arch=m.arch).set(value)

    # -- admin endpoints, repository polling -----------------------------------------------------
    async def load(self, name: str, version: int | None = None,
                   require_loaded: bool = False) -> dict[str, Any]:
        """Load version ``version`` (default: the latest) of ``name`` and put it into service
        (see the module docstring), in every worker; ServiceError 404/409/422 when it cannot
        be."""
        return await self._admin(lambda: self._load(name, version, require_loaded), "load")

    async def unload(self, name: str) -> dict[str, Any]:
        """Take ``name`` out of service (every worker); its in-flight requests finish first
        (in the background). 409 for a model the configuration needs or the last one."""
        return await self._admin(lambda: self._unload(name), "unload")

    async def _admin(self, apply: Callable[[], Any], op: str) -> dict[str, Any]:
        """One admin call: applied here, then (with workers) published and waited for."""
        if self._lock.locked():
            raise ServiceError(409, "busy", "another load, reload or unload is in progress")
        if self.broadcast is None:
            async with self._lock:
                return await apply()
        try:
            with self.broadcast.exclusive():
                await self._catch_up()  # what others published before: applied first
                async with self._lock:
                    out = await apply()
                seq = self.broadcast.publish(op, out["name"], out["version"])
                acks = await self.broadcast.wait_acks(seq, ACK_TIMEOUT_S)
        except Busy:
            raise ServiceError(409, "busy", "another load, reload or unload is in progress "
                               "(on another worker)") from None
        mine = {"ok": True, "version": out["version"]}
        out["workers"] = {str(pid): r for pid, r in sorted({self.broadcast.pid: mine,
                                                             **acks}.items())}
        return out

    async def _load(self, name: str, version: int | None = None,
                    require_loaded: bool = False) -> dict[str, Any]:
        old = self.registry.models.get(name)
        if require_loaded and old is None:
            raise ServiceError(404, "model_not_found", f"model {name!r} is not loaded "
                               f"(models: {sorted(self.registry.models)})", field="name")
        repo = ModelRepository(self.settings.repo)
        try:
            known = name in repo.names()
            mv = repo.load_version(name, version) if known else None
        except ValueError as e:  # RepositoryError: no such version, or a broken one
            raise ServiceError(404, "version_not_found", f"{name}: {e}".replace(
                str(self.settings.repo), "MODELS_DIR"), field="version") from None
        if mv is None:
            raise ServiceError(404, "model_not_found", f"no model named {name!r} in the "
                               "repository", field="name")
        t0 = time.perf_counter()
        try:
            m, config = await asyncio.to_thread(self._open_validated, mv)
            latency, encode_cost = await asyncio.to_thread(self._warmup, m, config)
        except ModelLoadError as e:
            self.metrics.model_loads.labels(model=name, result="rejected").inc()
            self.refused.setdefault(name, set()).add(mv.version)
            log.error("refused %s version %d: %s", name, mv.version, e)
            previous = f"; version {old.version} keeps serving" if old else ""
            raise ServiceError(422, "version_rejected", f"{e}{previous}") from None
        self._install(m, latency, encode_cost, config)
        self.metrics.model_loads.labels(model=name, result="loaded").inc()
        took = time.perf_counter() - t0
        log.info("%s version %d in service (was %s) after %.2fs", name, m.version,
                 old.version if old else "not loaded", took)
        return {"name": name, "version": m.version,
                "previous_version": old.version if old else None, "load_s": round(took, 3)}

    async def _unload(self, name: str) -> dict[str, Any]:
        if name not in self.registry.models:
            raise ServiceError(404, "model_not_found", f"model {name!r} is not loaded "
                               f"(models: {sorted(self.registry.models)})", field="name")
        roles = [role for role, n in self.roles() if n == name]
        if roles or len(self.registry.models) == 1:
            why = f"it is the {', '.join(roles)}" if roles else "it is the last model"
            raise ServiceError(409, "model_in_use", f"cannot unload {name!r}: {why}")
        m = self.registry.remove(name)
        self._info(m, 0)
        self.metrics.model_loads.labels(model=name, result="unloaded").inc()
        log.info("unloaded %s version %d", name, m.version)
        return {"name": name, "version": None, "previous_version": m.version}

    async def _apply(self, name: str, version: int | None, force: bool = False
                     ) -> dict[str, Any]:
        """Make ``name`` serve ``version`` here (None: unloaded), as another worker did;
        ``force`` loads it even when that version serves already (a reload)."""
        current = self.registry.models.get(name)
        if not force and ((current is None and version is None) or (
                current is not None and current.version == version)):
            return {"ok": True, "version": version}
        try:
            async with self._lock:
                if version is None:
                    await self._unload(name)
                else:
                    await self._load(name, version)
        except Exception as e:  # refused here (ServiceError) or broken (e.g. out of memory)
            why = e.message if isinstance(e, ServiceError) else f"{type(e).__name__}: {e}"
            log.error("could not follow %s of %s: %s", "unload" if version is None else
                      f"load of version {version}", name, why)
            return {"ok": False, "error": why}
        return {"ok": True, "version": version}

    async def _follow(self) -> None:
        """Apply the actions other workers publish, in order, and acknowledge each."""
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            if self._lock.locked():
                continue  # an admin call of this worker runs (it catches up itself)
            try:
                await self._catch_up()
            except Exception:  # the folder went away, say: keep following
                log.exception("following the other workers' admin actions")

    async def _catch_up(self) -> None:
        """Apply (once) and acknowledge the actions published since the last one applied."""
        assert self.broadcast is not None
        async with self._catching:
            for action in self.broadcast.pending():
                result = await self._apply_action(action)
                self.broadcast.ack(action.seq, result)

    async def _apply_action(self, action: Action) -> dict[str, Any]:
        return await self._apply(action.name, action.version if action.op == "load" else None,
                                 force=True)

    def _open_validated(self, mv: ModelVersion) -> tuple[ServedModel, ServingConfig]:
        """The version opened and checked, with its serving config (a bad config.json
        refuses the load: ModelLoadError)."""
        config = ServingConfig.for_model(self.settings, mv.name)
        m = open_version(mv, self.settings, **config.open_options())
        validate_served(m, mv)
        return m, config

    async def _poll(self) -> None:
        """Every ``poll_interval_s``: load the newest version of each loaded model if it is
        newer than the one serving (a refused version is not tried again)."""
        repo = ModelRepository(self.settings.repo)
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            for name in list(self.registry.models):
                try:
                    versions = await asyncio.to_thread(repo.versions, name)
                except (OSError, ValueError) as e:
                    log.warning("polling %s: %s", name, e)
                    continue
                current = self.registry.models.get(name)
                if (not versions or current is None or versions[-1] <= current.version
                        or versions[-1] in self.refused.get(name, ())):
                    continue
                try:
                    async with self._lock:
                        await self._load(name, versions[-1], require_loaded=True)
                except ServiceError as e:
                    log.warning("polling %s: version %d not loaded: %s", name, versions[-1],
                                e.message)

    # -- warmup --------------------------------------------------------------------------------
    def _warmup(self, m: ServedModel, config: ServingConfig
                ) -> tuple[LatencyModel, LatencyModel]:
        """Run every warmup batch size ``warmup_runs`` times; return the seeded latency models
        (batch, encoding). A model padded to buckets also runs each bucket's own size, so
        that every bucket's kernels are cached (and its CUDA graph captured) before ready."""
        s = self.settings
        latency = LatencyModel(s.latency_window)
        encode_cost = LatencyModel(s.latency_window)
        sizes = sorted({min(r, config.max_batch_size) for r in WARMUP_ROWS} | set(m.buckets))
        schema = m.encoder.encoders.schema
        for rows in sizes:
            cat, dense = m.example_inputs(rows)
            times = []
            for _ in range(s.warmup_runs):
                t0 = time.perf_counter()
                m.run(cat, dense)
                times.append(time.perf_counter() - t0)
            latency.seed(rows, float(np.median(times)))
            cols = {f.name: ["warmup" if f.type == "categorical" else 1.0] * rows
                    for f in schema.fields_on(["candidate"])}
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                m.encoder.encode({}, {}, cols, plain=True)
                times.append(time.perf_counter() - t0)
            encode_cost.seed(rows, float(np.median(times)))
        return latency, encode_cost

    def _publish_latency_model(self, name: str, latency: LatencyModel) -> None:
        latency.predict(0)  # refresh the fit
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
            entry = self.registry.entries.get(m.name)
            if count[0] % LATENCY_PUBLISH_EVERY == 0 and entry is not None:
                self._publish_latency_model(m.name, entry.batcher.latency)

        return observe

"""Shadow scoring: a second model scores a copy of the traffic, off the critical path.

With ``shadow_model`` set, every scored request (``/v1/score`` and raw-feature ``/v2`` infer; a
``shadow_fraction`` of them) is copied to the shadow model **after its response has been
sent**: the ASGI edge (:mod:`service.edge`) starts the copy once the last byte is handed to the
server, so the copy can neither delay nor change the response, and it never enters the
request's budget or admission control. The copy is encoded for the shadow model (fields it does
not know are ignored) and queued on the shadow's own :class:`~service.batcher.Batcher` (one
ONNX Runtime thread, at most ``shadow_max_queue_size`` copies waiting; a busy queue drops the
copy at once), with its own deadline ``shadow_timeout_ms``. Requests the shadow model itself
scored, and ``/v2`` requests sent as encoded tensors (another model's layout), are not copied.

The shadow's scores are never returned. They are summarised per (primary ``model``,
``shadow``) pair in Prometheus: ``mldcn_shadow_requests_total{result}`` (``scored``,
``dropped`` when its queue was busy, ``expired`` past its own deadline, ``failed``,
``unavailable`` when the shadow model is not loaded), the per-request mean and max of
``|primary - shadow|`` (``mldcn_shadow_abs_diff_mean`` / ``_max``) and the copy's latency
(``mldcn_shadow_duration_seconds``). With ``shadow_log`` each comparison is also logged as one
JSON line on the ``mldcn.shadow`` logger.

On CPU the shadow shares the cores with the primary models, so it costs the primary some
throughput under load; the small queue bounds how much.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.batcher import Batcher, DeadlineExceeded, QueueFull
from service.metrics import Metrics
from service.models import Encode, ServedModel
from service.registry import ModelRegistry
from service.settings import Settings

log = logging.getLogger("mldcn.shadow")



@dataclass(frozen=True)
class Copy:
    """A scored request to copy: the model that scored it, its scores and its encoding."""

    model: ServedModel
    probs: np.ndarray
    encode: Encode
    request_id: str | None


class ShadowScorer:
    """Copies scored requests to ``settings.shadow_model`` (see the module docstring)."""

    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics,
                 draining: Callable[[], bool]) -> None:
        self.settings = settings
        self.registry = registry
        self.metrics = metrics
        self.draining = draining
        self._tasks: set[asyncio.Task[None]] = set()
        self._batcher: Batcher | None = None
        self._batcher_model: ServedModel | None = None
        self._rng = random.Random()

    def plan(self, model: ServedModel, probs: np.ndarray, encode: Encode,
             request_id: str | None = None) -> Callable[[], None] | None:
        """What to call once the response is sent (it starts the copy), or None: no copy."""
        s = self.settings
        if not s.shadow_model or model.name == s.shadow_model:
            return None
        if s.shadow_fraction < 1.0 and self._rng.random() >= s.shadow_fraction:
            return None
        copy = Copy(model, probs, encode, request_id)
        return lambda: self._start(copy)

    def _start(self, done: Copy) -> None:
        if self.draining():
            return
        task = asyncio.get_running_loop().create_task(self._run(done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _shadow_batcher(self, shadow: ServedModel) -> Batcher:
        """The shadow's own batcher, rebuilt when the shadow model version changes."""
        if self._batcher is None or self._batcher_model is not shadow:
            old = self._batcher
            s = self.settings
            # a copy of the model's own latency model (seeded at warmup): the same session,
            # the same cost, but the shadow's timings (run beside the primary's) stay apart;
            # a fresh one fitted on a few small batches can predict nonsense
            latency = self.registry.get(shadow.name).batcher.latency.copy()
            self._batcher = Batcher(shadow.run, max_batch_size=s.max_batch_size,
                                    max_queue_size=s.shadow_max_queue_size, instance_count=1,
                                    latency=latency, name=f"shadow-{shadow.name}",
                                    nice=s.inference_nice)
            self._batcher.start()
            self._batcher_model = shadow
            if old is not None:
                task = asyncio.get_running_loop().create_task(old.drain(1.0))
                self._tasks.add(task)  # type: ignore[arg-type]
                task.add_done_callback(self._tasks.discard)  # type: ignore[arg-type]
        return self._batcher

    async def _run(self, done: Copy) -> None:
        primary, name, request_id = done.model, self.settings.shadow_model, done.request_id
        assert name is not None
        labels = {"model": primary.name, "shadow": name}
        count = self.metrics.shadow_requests

        shadow = self.registry.models.get(name)
        if shadow is None:
            count.labels(**labels, result="unavailable").inc()
            return
        batcher = self._shadow_batcher(shadow)
        start_s = time.monotonic()
        try:
            cat, dense = done.encode(shadow, False)
            item = batcher.submit(cat, dense, start_s + self.settings.shadow_timeout_ms / 1e3)
        except QueueFull:
            count.labels(**labels, result="dropped").inc()
            return
        except Exception as e:  # the shadow cannot encode this request
            count.labels(**labels, result="failed").inc()
            log.debug("shadow %s cannot encode a request: %s", name, e)
            return
        try:
            probs = await item.future
        except DeadlineExceeded:
            count.labels(**labels, result="expired").inc()
            return
        except asyncio.CancelledError:
            item.future.cancel()
            raise
        except Exception as e:  # ONNX Runtime failed on the shadow
            count.labels(**labels, result="failed").inc()
            log.warning("shadow %s failed: %s", name, e)
            return
        took_s = time.monotonic() - start_s
        diff = np.abs(probs.astype(np.float64) - done.probs.astype(np.float64))
        mean, worst = float(diff.mean()), float(diff.max())
        count.labels(**labels, result="scored").inc()
        self.metrics.shadow_diff_mean.labels(**labels).observe(mean)
        self.metrics.shadow_diff_max.labels(**labels).observe(worst)
        self.metrics.shadow_duration.labels(**labels).observe(took_s)
        if self.settings.shadow_log:
            log.info(json.dumps(_record(request_id, primary, shadow, done.probs, probs,
                                        mean, worst, took_s)))

    async def stop(self) -> None:
        """Cancel the copies in flight and stop the shadow batcher."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._batcher is not None:
            await self._batcher.stop()
            self._batcher = None


def _record(request_id: str | None, primary: ServedModel, shadow: ServedModel,
            p: np.ndarray, q: np.ndarray, mean: float, worst: float,
            took_s: float) -> dict[str, Any]:
    return {"request_id": request_id, "model": primary.name, "version": primary.version,
            "shadow": shadow.name, "shadow_version": shadow.version, "rows": int(len(p)),
            "primary_mean": round(float(p.mean()), 6), "shadow_mean": round(float(q.mean()), 6),
            "abs_diff_mean": round(mean, 6), "abs_diff_max": round(worst, 6),
            "shadow_ms": round(took_s * 1e3, 3)}

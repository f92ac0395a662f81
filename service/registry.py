"""The models serving, by name: each version with its batcher and cost models.

A :class:`ModelEntry` is everything the request path needs about one model version: the
:class:`~service.models.ServedModel` (session + encoder), its :class:`~service.batcher.Batcher`,
the latency model of its encoding (per row, fitted online) and its :class:`ServingConfig`.
:meth:`ModelRegistry.install` puts a new entry into service in one step (no await), so a
request resolves either the old version or the new one, never a mix; the entry it replaces
retires in the background (its batcher scores what it holds, then stops).

The registry is what the scoring path, admission control and the shadow scorer share; model
control (:mod:`service.control`) is the only writer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.batcher import Batcher
from service.buckets import parse_buckets
from service.budget import LatencyModel
from service.errors import ServiceError
from service.models import ModelLoadError, ServedModel
from service.settings import Settings

log = logging.getLogger("uvicorn.error")


MODEL_CONFIG_FILE = "config.json"  # MODELS_DIR/<name>/config.json: the model's own settings


class ServingOverrides(BaseModel):
    """The keys of ``MODELS_DIR/<name>/config.json``, each optional, with the bounds of the
    server-wide setting of the same name (:class:`service.settings.Settings`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_batch_size: int | None = Field(default=None, ge=1)
    max_queue_delay_ms: float | None = Field(default=None, ge=0, le=1000)
    max_queue_size: int | None = Field(default=None, ge=1)
    instance_count: int | None = Field(default=None, ge=1)
    dynamic_batching: bool | None = None
    timeout_action: Literal["reject", "degrade"] | None = None
    batch_buckets: list[int] | None = None
    pad_to_buckets: Literal["auto", "on", "off"] | None = None

    @field_validator("batch_buckets")
    @classmethod
    def _buckets(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else list(parse_buckets(v))  # sorted, unique, each >= 1


@dataclass(frozen=True)
class ServingConfig:
    """How one model is batched and queued (Triton's per-model settings)."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    instance_count: int
    dynamic_batching: bool
    timeout_action: Literal["reject", "degrade"]
    batch_buckets: tuple[int, ...]
    pad_to_buckets: Literal["auto", "on", "off"]

    @classmethod
    def defaults(cls, settings: Settings) -> ServingConfig:
        """The server-wide settings, which every model uses unless it says otherwise."""
        return cls(settings.max_batch_size, settings.max_queue_delay_ms,
                   settings.max_queue_size, settings.instance_count, settings.dynamic_batching,
                   settings.timeout_action, tuple(settings.batch_buckets),
                   settings.pad_to_buckets)

    def open_options(self) -> dict[str, Any]:
        """What :func:`service.models.open_version` needs of this config (the padding)."""
        return {"batch_buckets": self.batch_buckets, "pad_to_buckets": self.pad_to_buckets,
                "max_batch_size": self.max_batch_size}

    @classmethod
    def for_model(cls, settings: Settings, name: str) -> ServingConfig:
        """The server-wide settings overridden by ``MODELS_DIR/<name>/config.json`` when there
        is one (read at every load and reload); ModelLoadError naming the key if it is bad.

        Example:
            >>> import json, tempfile, pathlib
            >>> repo = pathlib.Path(tempfile.mkdtemp()); (repo / "a").mkdir()
            >>> _ = (repo / "a" / "config.json").write_text(json.dumps({"max_batch_size": 64}))
            >>> s = Settings(repo=str(repo))
            >>> ServingConfig.for_model(s, "a").max_batch_size, ServingConfig.for_model(s, "b")
            (64, ServingConfig(max_batch_size=2048, max_queue_delay_ms=0.0, max_queue_size=256, \
instance_count=1, dynamic_batching=True, timeout_action='reject', batch_buckets=(64, 128, 256, \
512, 1024, 2048, 4096), pad_to_buckets='auto'))
        """
        base = cls.defaults(settings)
        path = Path(settings.repo) / name / MODEL_CONFIG_FILE
        if not path.is_file():
            return base
        try:
            raw = json.loads(path.read_text())
            overrides = ServingOverrides.model_validate(raw)
        except (OSError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            if isinstance(e, ValidationError):
                why = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']}"
                                for err in e.errors())
            else:
                why = str(e)
            raise ModelLoadError(f"{name}/{MODEL_CONFIG_FILE}: {why}") from None
        changes = overrides.model_dump(exclude_none=True)
        if "batch_buckets" in changes:
            changes["batch_buckets"] = tuple(changes["batch_buckets"])
        return dataclasses.replace(base, **changes)


@dataclass(frozen=True)
class ModelEntry:
    """One model version in service."""

    model: ServedModel
    batcher: Batcher
    encode_cost: LatencyModel
    config: ServingConfig


class ModelRegistry:
    """The versions serving (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.on_change: list[Callable[[], None]] = []  # called after a version comes or goes
        self.on_removed: list[Callable[[str], None]] = []  # called with a model unloaded
        self.entries: dict[str, ModelEntry] = {}
        self.models: dict[str, ServedModel] = {}  # name -> model, the same versions
        self._retiring: set[asyncio.Task[Any]] = set()

    def get(self, name: str) -> ModelEntry:
        """The entry of a serving model (KeyError if none)."""
        return self.entries[name]

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

    def lookup(self, name: str, version: str | None = None) -> ServedModel:
        """The model a ``/v2/models/{name}[/versions/{version}]`` URL names; ServiceError 404
        if it is not loaded or ``version`` is not the one serving."""
        m = self.models.get(name)
        if m is None:
            raise ServiceError(404, "model_not_found",
                               f"no model named {name!r} (models: {sorted(self.models)})",
                               field="name")
        if version is not None and version != str(m.version):
            raise ServiceError(404, "version_not_found", f"model {name!r} serves version "
                               f"{m.version}, not {version!r}", field="version")
        return m

    @property
    def idle(self) -> bool:
        """Nothing queued or running in any batcher."""
        return all(e.batcher.idle for e in self.entries.values())

    def install(self, m: ServedModel, latency: LatencyModel, encode_cost: LatencyModel,
                on_batch: Callable[[int, float], None],
                config: ServingConfig | None = None) -> ServedModel | None:
        """Put ``m`` into service now, batched as ``config`` says (default: the server-wide
        settings); returns the version it replaced (retiring)."""
        s = self.settings
        config = config or ServingConfig.defaults(s)
        batcher = Batcher(
            m.run, max_batch_size=config.max_batch_size,
            max_queue_delay_s=config.max_queue_delay_ms / 1e3,
            max_queue_size=config.max_queue_size, dynamic_batching=config.dynamic_batching,
            instance_count=config.instance_count, latency=latency, on_batch=on_batch,
            name=m.name, nice=s.inference_nice)
        batcher.start()
        old = self.entries.get(m.name)
        self.entries[m.name] = ModelEntry(m, batcher, encode_cost, config)
        self.models[m.name] = m
        if old is not None:
            self._retire(old)
        self._changed()
        return old.model if old is not None else None

    def remove(self, name: str) -> ServedModel:
        """Take ``name`` out of service; its batcher finishes what it holds (background)."""
        entry = self.entries.pop(name)
        del self.models[name]
        self._retire(entry)
        for listener in self.on_removed:
            listener(name)
        self._changed()
        return entry.model

    def _changed(self) -> None:
        for listener in self.on_change:
            listener()

    def _retire(self, entry: ModelEntry) -> None:
        grace_s = max(1.0, self.settings.default_timeout_ms / 1e3 * 4)
        task = asyncio.get_running_loop().create_task(entry.batcher.drain(grace_s))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def stop(self) -> None:
        """Finish running batches, fail what is queued, release the threads."""
        await asyncio.gather(*(e.batcher.stop() for e in self.entries.values()),
                             *self._retiring, return_exceptions=True)

"""The service's one settings object: every option, its environment variable and its default.

Options are read from ``MLDCN_<NAME>`` environment variables (and ``mldcn serve`` flags, which
the CLI turns into the same variables so that every uvicorn worker sees them). Only this module
reads the environment; everything else asks :func:`get_settings`. Option names follow Triton's
model configuration where one applies (``max_batch_size``, ``max_queue_delay_ms``,
``max_queue_size``, ``default_timeout_ms``, ``timeout_action``, ``instance_count``) and carry
their unit.

Example:
    >>> s = Settings(repo="models", default_timeout_ms=25)
    >>> s.default_timeout_ms, s.timeout_action, s.max_batch_size
    (25.0, 'reject', 2048)
    >>> Settings(repo="models", timeout_action="degrade")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Settings
    ...
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from model.cliargs import comma_list
from service.buckets import DEFAULT_BUCKETS, parse_buckets
from service.routing import DEFAULT_SALT, Arms, parse_split

ENV_PREFIX = "MLDCN_"


def default_intra_op_threads(workers: int = 1) -> int:
    """ONNX Runtime threads per session: the cores divided among the worker processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, workers))


class Settings(BaseSettings):
    """Scoring-service settings (env prefix ``MLDCN_``; see the README's settings table)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- models ------------------------------------------------------------------------------
    repo: Path = Field(description="model repository folder MODELS_DIR/<name>/<version>/")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="model names to load (latest version of each); empty = every model",
    )
    default_model: str | None = Field(
        default=None, description="model used when a request names none; default: the first"
    )
    fallback_model: str | None = Field(
        default=None, description="cheaper model scored instead under timeout_action=degrade"
    )
    execution_provider: Literal["auto", "cuda", "cpu"] = Field(
        default="auto", description="ONNX Runtime provider: auto = CUDA if available, else CPU"
    )
    intra_op_threads: int = Field(
        default=0, ge=0, description="ONNX Runtime intra-op threads; 0 = cores / workers"
    )
    inter_op_threads: int = Field(default=1, ge=1, description="ONNX Runtime inter-op threads")
    inference_nice: int = Field(
        default=5, ge=0, le=19,
        description="nice increment of the threads that run ONNX Runtime (Linux), so that "
                    "the event loop (admission, 503s, responses) is never starved by compute "
                    "on the same cores; 0 = same priority",
    )
    warmup_runs: int = Field(
        default=20, ge=1, description="warmup runs per batch size before ready (seeds latency)"
    )

    # -- GPU path (service.gpu, service.buckets; docs/gpu.md) ------------------------------------
    on_provider_fallback: Literal["fail", "warn"] = Field(
        default="fail",
        description="execution_provider=cuda but a session runs on CPU: fail (refuse to start "
                    "or load) or warn (serve on CPU, log an error, set "
                    "mldcn_provider_fallback{model} 1)",
    )
    device_id: int = Field(default=0, ge=0, description="CUDA device of the sessions")
    device_ids: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="CUDA devices the workers are spread over: worker i uses "
                    "device_ids[i % len]; empty = device_id for every worker",
    )
    cuda_arena_extend_strategy: Literal["kNextPowerOfTwo", "kSameAsRequested"] = Field(
        default="kSameAsRequested",
        description="CUDA memory arena growth: kSameAsRequested suits fixed buckets",
    )
    cuda_gpu_mem_limit_bytes: int = Field(
        default=0, ge=0, description="CUDA memory arena limit per session (0 = no limit)"
    )
    cuda_copy_in_default_stream: bool = Field(
        default=True, description="CUDA provider: copies on the default stream (ORT default)"
    )
    cuda_graphs: bool = Field(
        default=False,
        description="capture one CUDA graph per batch bucket (CUDA provider only; needs "
                    "every node on CUDA, else the session runs without graphs and says so)",
    )
    batch_buckets: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_BUCKETS),
        description="row counts batches are padded to (and split above the largest)",
    )
    pad_to_buckets: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="pad batches to batch_buckets: auto = on the CUDA provider only",
    )

    # -- batching (Triton names) ---------------------------------------------------------------
    max_batch_size: int = Field(
        default=2048, ge=1, description="most rows in one ONNX Runtime call (requests are split)"
    )
    dynamic_batching: bool = Field(
        default=True, description="merge concurrent requests into one batch"
    )
    max_queue_delay_ms: float = Field(
        default=0.0, ge=0, le=1000,
        description="longest wait for more rows before a batch runs (0: take what is queued)",
    )
    max_queue_size: int = Field(
        default=256, ge=1, description="most requests waiting per model; full -> 503 at once"
    )
    instance_count: int = Field(
        default=1, ge=1, description="batches run concurrently per model (ONNX Runtime calls)"
    )

    # -- latency budget --------------------------------------------------------------------------
    default_timeout_ms: float = Field(
        default=50.0, gt=0, le=60_000,
        description="the SLO: budget of a request that asks for none; also the most it may ask",
    )
    timeout_action: Literal["reject", "degrade"] = Field(
        default="reject",
        description="when admission predicts a miss: reject (503) or degrade (fallback_model)",
    )
    admission_quantile: float = Field(
        default=0.99, gt=0.0, le=1.0,
        description="admission's margin: this quantile of the prediction errors of recent "
                    "admitted requests is added to each prediction (service.admission)",
    )
    admission_safety_factor: float = Field(
        default=1.0, ge=1.0, le=10.0,
        description="a multiplier on admission's prediction, its learnt margin included",
    )
    latency_window: int = Field(
        default=256, ge=8, description="recent batches (and admitted requests) the online "
                                       "latency model (and admission's margin) is fitted on"
    )

    # -- limits ----------------------------------------------------------------------------------
    max_candidates: int = Field(default=4096, ge=1, description="most candidates per request")
    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="largest request body; larger -> 413"
    )

    # -- traffic: A/B split and shadow scoring (service.routing, service.shadow) ----------------
    ab: str = Field(
        default="",
        description="A/B split of requests that name no model: 'model:weight,...' (weights "
                    "normalised); empty = no split, the default model scores them",
    )
    ab_user_field: str = Field(
        default="user_id",
        description="user feature hashed for the A/B arm when the request has no user_id",
    )
    ab_salt: str = Field(default=DEFAULT_SALT, description="salt of the A/B hash (new salt = "
                                                           "new random assignment)")
    shadow_model: str | None = Field(
        default=None, description="model that scores a copy of the traffic off the critical "
                                  "path (scores summarised in metrics, never returned)",
    )
    shadow_fraction: float = Field(
        default=1.0, ge=0.0, le=1.0, description="fraction of requests copied to the shadow"
    )
    shadow_max_queue_size: int = Field(
        default=4, ge=1, description="shadow requests waiting; more -> the copy is dropped"
    )
    shadow_timeout_ms: float = Field(
        default=1000.0, gt=0, description="a shadow copy not scored within this is dropped"
    )
    shadow_log: bool = Field(
        default=False, description="log one line per shadow comparison (logger mldcn.shadow)"
    )

    # -- operations: admin API, repository polling, drain ----------------------------------------
    admin_token: SecretStr | None = Field(
        default=None, description="bearer token of the /admin endpoints; none -> they are 404"
    )
    admin_token_file: Path | None = Field(
        default=None, description="file holding the admin token (instead of admin_token)"
    )
    poll_interval_s: float = Field(
        default=0.0, ge=0.0,
        description="check the repository for newer versions of loaded models every N s "
                    "(0 = off); a newer version is validated and swapped in",
    )
    drain_grace_s: float = Field(
        default=20.0, ge=0.0, le=3600.0,
        description="on SIGTERM: longest wait for in-flight requests before exiting",
    )

    # -- server ----------------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on")
    workers: int = Field(default=1, ge=1, description="worker processes (service.workers)")
    control_dir: Path | None = Field(
        default=None, description="folder the workers share for admin calls (set by the "
                                  "supervisor of --workers N; not for users)")
    worker_index: int = Field(
        default=0, ge=0, description="this worker's number, 0 … workers-1 (set by the "
                                     "supervisor; picks its CUDA device from device_ids)")
    log_level: str = Field(default="info", description="uvicorn log level")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v: object) -> object:
        if isinstance(v, str):
            return comma_list(v)
        return v

    @field_validator("device_ids", mode="before")
    @classmethod
    def _split_devices(cls, v: object) -> object:
        if isinstance(v, str):
            return comma_list(v, int, "integers")  # ValueError names the text
        return v

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, v: object) -> object:
        if isinstance(v, str | list | tuple):
            return list(parse_buckets(v))  # ValueError names the problem
        return v

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.timeout_action == "degrade" and not self.fallback_model:
            raise ValueError("timeout_action=degrade needs fallback_model (MLDCN_FALLBACK_MODEL)")
        if self.fallback_model and self.models and self.fallback_model not in self.models:
            raise ValueError(
                f"fallback_model {self.fallback_model!r} must be one of models {self.models}"
            )
        if self.default_model and self.models and self.default_model not in self.models:
            raise ValueError(
                f"default_model {self.default_model!r} must be one of models {self.models}"
            )
        arms = parse_split(self.ab)  # ValueError names the problem
        for role, names in (("ab arm", [n for n, _ in arms]),
                            ("shadow_model", [self.shadow_model] if self.shadow_model else [])):
            for name in names:
                if self.models and name not in self.models:
                    raise ValueError(f"{role} {name!r} must be one of models {self.models}")
        if self.cuda_graphs and self.pad_to_buckets == "off":
            raise ValueError("cuda_graphs needs fixed batch shapes: set pad_to_buckets to auto "
                             "or on (not off)")
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("set admin_token or admin_token_file, not both")
        if self.admin_token is not None and not self.admin_token.get_secret_value().strip():
            raise ValueError("admin_token is empty (unset it to disable the admin endpoints)")
        return self

    @property
    def ab_arms(self) -> Arms:
        """The A/B split as [(model, weight)], weights summing to 1 (empty: no split)."""
        return parse_split(self.ab)

    def admin_secret(self) -> bytes | None:
        """The admin token (read from ``admin_token_file`` if that is set), None if disabled.

        Raises ValueError when the file cannot be read or is empty.
        """
        if self.admin_token is not None:
            return self.admin_token.get_secret_value().strip().encode()
        if self.admin_token_file is None:
            return None
        try:
            token = self.admin_token_file.read_text().strip()
        except OSError as e:
            raise ValueError(f"admin_token_file {self.admin_token_file}: cannot read it "
                             f"({e.strerror or e})") from None
        if not token:
            raise ValueError(f"admin_token_file {self.admin_token_file} is empty")
        return token.encode()

    @property
    def cuda_device(self) -> int:
        """The CUDA device of this worker's sessions (``device_ids`` round robin)."""
        if self.device_ids:
            return self.device_ids[self.worker_index % len(self.device_ids)]
        return self.device_id

    @property
    def session_threads(self) -> int:
        """intra_op_threads, or the core count divided by the workers when it is 0."""
        return self.intra_op_threads or default_intra_op_threads(self.workers)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment once (tests call ``cache_clear``)."""
    return Settings()  # type: ignore[call-arg]  # repo comes from MLDCN_REPO

"""Serving-side model loading: repository versions → ONNX Runtime sessions + request encoders.

The one place the service reads the model repository (through ``export.repository``, which is
torch-free) and creates ONNX Runtime sessions. Provider choice (``execution_provider``): ``auto``
takes the CUDA execution provider when ONNX Runtime offers it, else CPU; ``cuda`` insists on it,
and a session that ends up on CPU anyway is refused or served with a loud warning and the
``mldcn_provider_fallback`` metric (``on_provider_fallback``); ``cpu`` is CPU. The provider a
session really uses is reported (``ServedModel.provider``), in the start-up log and in metrics.

On CUDA, batches are padded to ``batch_buckets`` (:mod:`service.buckets`) and run through
IOBinding with preallocated per-bucket buffers, optionally replayed as one CUDA graph per
bucket (:mod:`service.gpu`); ``pad_to_buckets=on`` runs the same path on CPU. fp16 versions
(``mldcn export --fp16``) keep float32 inputs and output, so they are served the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from export.meta import BATCH_AXIS, INPUT_NAMES, OUTPUT_NAME, ModelMeta
from export.repository import ModelRepository, ModelVersion
from service.batcher import lower_thread_priority
from service.buckets import BucketedRunner, active_buckets
from service.encode import RequestEncoder
from service.gpu import CPU, CUDA, BoundRunner, cuda_provider_options, resolve_providers
from service.settings import Settings

T = TypeVar("T")

log = logging.getLogger("mldcn.service")

class ModelLoadError(RuntimeError):
    """A model version that cannot be served; names the version and the problem."""


def cuda_options(settings: Settings, cuda_graphs: bool | None = None) -> dict[str, str]:
    """The CUDA execution provider options of ``settings`` (see :mod:`service.gpu`)."""
    return cuda_provider_options(
        device_id=settings.cuda_device,
        arena_extend_strategy=settings.cuda_arena_extend_strategy,
        gpu_mem_limit_bytes=settings.cuda_gpu_mem_limit_bytes,
        copy_in_default_stream=settings.cuda_copy_in_default_stream,
        cuda_graphs=settings.cuda_graphs if cuda_graphs is None else cuda_graphs)


def fallback_message(name: str, version: int, active: str) -> str:
    """The one-line error of a CUDA request that ended up elsewhere."""
    return (f"{name} version {version}: execution_provider=cuda but the session runs on "
            f"{active} (ONNX Runtime offers {ort.get_available_providers()}; install "
            "onnxruntime-gpu with a matching CUDA/cuDNN, or set MLDCN_ON_PROVIDER_FALLBACK=warn "
            "to serve on CPU)")


def session_options(intra_op_threads: int, inter_op_threads: int = 1) -> ort.SessionOptions:
    """Sequential execution, all graph optimisations, the given thread counts."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = inter_op_threads
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


@dataclass
class ServedModel:
    """One loaded model version: its session, encoder and metadata."""

    name: str
    version: int
    meta: ModelMeta
    session: ort.InferenceSession
    encoder: RequestEncoder
    provider: str
    load_s: float
    buckets: tuple[int, ...] = ()  # padded batch sizes; () = unpadded
    cuda_graphs: bool = False  # one CUDA graph per bucket is captured and replayed
    provider_fallback: bool = False  # CUDA was asked for, the session runs on CPU (warn)
    runner: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = field(default=None,
                                                                          repr=False)

    @property
    def precision(self) -> str:
        return self.meta.precision

    @property
    def arch(self) -> str:
        return self.meta.model.arch

    @property
    def flops_per_example(self) -> float:
        return float(self.meta.cost.flops_per_example or 0.0)

    def run(self, cat_ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Probabilities (B,) float32 for encoded rows (thread-safe; releases the GIL)."""
        if self.runner is not None:  # padded to buckets, IOBinding
            return self.runner(cat_ids, dense)
        feeds = {INPUT_NAMES[0]: cat_ids, INPUT_NAMES[1]: dense}
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def example_inputs(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of all-missing features (ids 0, dense 0), for warmup and benchmarks."""
        return (np.zeros((rows, self.encoder.num_cat), np.int64),
                np.zeros((rows, self.encoder.num_dense), np.float32))


# A request's encoding for a model: encode(model, strict) -> (cat_ids, dense); strict=False
# when the request was validated for another model (the fallback or the shadow encodes it).
Encode = Callable[[ServedModel, bool], tuple[np.ndarray, np.ndarray]]


def _create_session(mv: ModelVersion, settings: Settings) -> tuple[ort.InferenceSession, bool]:
    """(session, CUDA graphs on): the providers of ``settings``; a session that cannot take
    CUDA graphs (a node outside the CUDA provider) is opened again without them."""
    opts = session_options(settings.session_threads, settings.inter_op_threads)
    providers, cuda = resolve_providers(settings.execution_provider, cuda_options(settings))
    graphs = cuda and settings.cuda_graphs
    try:
        return in_niced_thread(settings.inference_nice, ort.InferenceSession, str(mv.onnx_path),
                               sess_options=opts, providers=providers), graphs
    except Exception as e:
        if not graphs:
            raise
        log.error("%s version %d: CUDA graphs refused (%s); serving without them", mv.name,
                  mv.version, str(e).splitlines()[0] if str(e) else type(e).__name__)
    providers, _ = resolve_providers(settings.execution_provider,
                                     cuda_options(settings, cuda_graphs=False))
    return in_niced_thread(settings.inference_nice, ort.InferenceSession, str(mv.onnx_path),
                           sess_options=opts, providers=providers), False


def in_niced_thread(nice: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in a new thread whose nice value is raised by ``nice``.

    ONNX Runtime starts a session's intra-op thread pool when the session is created, and
    new threads inherit their creator's nice value: created here, the pool runs at the same
    lowered priority as the batcher threads that call it (:func:`lower_thread_priority`).

    Example:
        >>> in_niced_thread(0, max, 2, 3), in_niced_thread(1, max, 2, 3)
        (3, 3)
    """
    if nice <= 0:
        return fn(*args, **kwargs)
    out: list[Any] = []

    def target() -> None:
        lower_thread_priority(nice)
        try:
            out.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # re-raised in the caller
            out.append((False, e))

    thread = threading.Thread(target=target, name="ort-session")
    thread.start()
    thread.join()
    ok, value = out[0]
    if not ok:
        raise value
    return value


def open_version(mv: ModelVersion, settings: Settings,
                 batch_buckets: Sequence[int] | None = None, pad_to_buckets: str | None = None,
                 max_batch_size: int | None = None) -> ServedModel:
    """Check a repository version (content hash, model.json) and open its session.

    ``batch_buckets``, ``pad_to_buckets`` and ``max_batch_size``: the model's own padding
    (its ``config.json``, ``ServingConfig.open_options``); default the server-wide settings.
    With ``execution_provider=cuda``, a session not on the CUDA provider is a ModelLoadError
    (``on_provider_fallback=fail``) or is served on CPU with ``provider_fallback`` set
    (``warn``, logged as an error).
    """
    t0 = time.perf_counter()
    wants_cuda = settings.execution_provider == "cuda"
    if (wants_cuda and settings.on_provider_fallback == "fail"
            and CUDA not in ort.get_available_providers()):
        raise ModelLoadError(fallback_message(mv.name, mv.version, CPU))  # before any work
    try:
        mv.verify(check_graph=False)
        encoder = RequestEncoder(mv.encoders)
        session, graphs = _create_session(mv, settings)
    except ModelLoadError:
        raise
    except Exception as e:  # RepositoryError, SchemaError, ONNX Runtime's own errors
        raise ModelLoadError(f"cannot serve {mv.name} version {mv.version}: {e}") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (list(INPUT_NAMES), [OUTPUT_NAME]):
        raise ModelLoadError(f"{mv.onnx_path}: inputs/outputs {names}, expected "
                             f"{list(INPUT_NAMES)} -> {OUTPUT_NAME}")
    provider = session.get_providers()[0]
    fell_back = wants_cuda and provider != CUDA
    if fell_back:
        if settings.on_provider_fallback == "fail":
            raise ModelLoadError(fallback_message(mv.name, mv.version, provider))
        log.error("PROVIDER FALLBACK: %s; serving on %s (mldcn_provider_fallback=1)",
                  fallback_message(mv.name, mv.version, provider), provider)
    on_cuda = provider == CUDA
    pad_mode = pad_to_buckets or settings.pad_to_buckets
    pad = pad_mode == "on" or (pad_mode == "auto" and on_cuda)
    m = ServedModel(name=mv.name, version=mv.version, meta=mv.meta, session=session,
                    encoder=encoder, provider=provider, load_s=0.0,
                    provider_fallback=fell_back)
    if pad:
        buckets = active_buckets(batch_buckets or settings.batch_buckets,
                                 max_batch_size or settings.max_batch_size)
        bound = BoundRunner(session, buckets, encoder.num_cat, encoder.num_dense,
                            device="cuda" if on_cuda else "cpu", device_id=settings.cuda_device,
                            cuda_graphs=graphs and on_cuda)
        m.runner = BucketedRunner(bound, buckets)
        m.buckets, m.cuda_graphs = buckets, bound.cuda_graphs
    m.load_s = time.perf_counter() - t0
    return m


def validate_served(m: ServedModel, mv: ModelVersion) -> None:
    """ModelLoadError unless ``m`` is fit to take traffic.

    Beyond :func:`open_version` (content hash, model.json, session, tensor names): the graph's
    inputs and outputs (types and shapes) are model.json's (``ModelVersion.verify``), the
    encoders' layout is the graph's (one ``cat_ids`` column per categorical field of the
    schema, one ``dense`` column per numeric field), and a test inference on an encoded
    request (every feature missing, and one of every field set) returns one probability in
    [0, 1] per row.
    """
    where = f"{m.name} version {m.version}"
    try:
        mv.verify(check_graph=True, session=m.session, check_files=False)  # hashed at open
    except ValueError as e:
        raise ModelLoadError(f"cannot serve {where}: {e}") from None
    schema = m.encoder.encoders.schema
    shapes = [list(i.shape) for i in m.session.get_inputs()]
    want = [[BATCH_AXIS, len(schema.categorical)], [BATCH_AXIS, len(schema.numeric)]]
    if shapes != want:
        raise ModelLoadError(f"cannot serve {where}: the graph's inputs have shapes {shapes}, "
                             f"its encoders' schema needs {want}")
    user = {f.name: "1" if f.type == "categorical" else 1.0 for f in schema.fields_on(["user"])}
    context = {f.name: "1" if f.type == "categorical" else 1.0
               for f in schema.fields_on(["context"])}
    candidates = {f.name: ["1", None] if f.type == "categorical" else [1.0, None]
                  for f in schema.fields_on(["candidate"])}
    try:
        cat, dense = m.encoder.encode(user, context, candidates or {"": [None, None]},
                                      strict=False)
        if len(cat) != 2:  # no candidate fields: two all-missing rows
            cat, dense = m.example_inputs(2)
        probs = np.asarray(m.run(cat, dense))
    except Exception as e:  # the encoders or ONNX Runtime
        raise ModelLoadError(f"cannot serve {where}: test inference failed: {e}") from None
    if probs.shape != (2,) or not np.all(np.isfinite(probs)) or not np.all(
            (probs >= 0) & (probs <= 1)):
        raise ModelLoadError(f"cannot serve {where}: test inference returned {probs!r}, "
                             "expected 2 probabilities in [0, 1]")


def load_models(settings: Settings,
                options: Callable[[str], dict[str, Any]] | None = None) -> dict[str, ServedModel]:
    """The latest version of each configured model (every model when none is configured);
    ``options(name)``: that model's keyword arguments of :func:`open_version`."""
    repo = ModelRepository(settings.repo)
    try:
        names = settings.models or repo.names()
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    if not names:
        raise ModelLoadError(f"no models in {settings.repo}")
    out: dict[str, ServedModel] = {}
    for name in names:
        try:
            mv = repo.load_version(name)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None
        m = open_version(mv, settings, **(options(name) if options else {}))
        validate_served(m, mv)
        log.info("loaded %s version %d (%s, %s, %.0f FLOPs/example) on %s in %.2fs; "
                 "buckets %s, CUDA graphs %s", m.name, m.version, m.arch, m.precision,
                 m.flops_per_example, m.provider, m.load_s, list(m.buckets) or "off",
                 "on" if m.cuda_graphs else "off")
        out[name] = m
    roles = [("default_model", settings.default_model),
             ("fallback_model", settings.fallback_model),
             ("shadow_model", settings.shadow_model),
             *(("ab arm", name) for name, _ in settings.ab_arms)]
    for role, name in roles:
        if name is not None and name not in out:
            raise ModelLoadError(f"{role} {name!r} is not loaded (models: {sorted(out)})")
    return out

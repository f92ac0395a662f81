"""Serving-side model loading: repository versions → ONNX Runtime sessions + request encoders.

The one place the service reads the model repository (through ``export.repository``, which is
torch-free) and creates ONNX Runtime sessions. Provider choice: the CUDA execution provider when
ONNX Runtime has it and a GPU answers (``execution_provider=auto``), else CPU; the provider a
session really uses is reported (``ServedModel.provider``), in the start-up log and in metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from export.repository import (
    BATCH_AXIS,
    INPUT_NAMES,
    OUTPUT_NAME,
    ModelRepository,
    ModelVersion,
)
from service.encode import RequestEncoder
from service.settings import Settings

log = logging.getLogger("mldcn.service")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


class ModelLoadError(RuntimeError):
    """A model version that cannot be served; names the version and the problem."""


def choose_providers(choice: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``choice`` (auto, cuda, cpu), most preferred first."""
    available = ort.get_available_providers()
    if choice == "cpu":
        return [CPU]
    if choice == "cuda":
        if CUDA not in available:
            raise ModelLoadError(f"execution_provider=cuda but ONNX Runtime offers {available} "
                                 "(install onnxruntime-gpu)")
        return [CUDA, CPU]
    return [CUDA, CPU] if CUDA in available else [CPU]


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
    meta: dict[str, Any]
    session: ort.InferenceSession
    encoder: RequestEncoder
    provider: str
    load_s: float

    @property
    def precision(self) -> str:
        return str(self.meta["precision"])

    @property
    def arch(self) -> str:
        return str(self.meta["model"]["arch"])

    @property
    def flops_per_example(self) -> float:
        return float(self.meta["cost"].get("flops_per_example") or 0.0)

    def run(self, cat_ids: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """Probabilities (B,) float32 for encoded rows (thread-safe; releases the GIL)."""
        feeds = {INPUT_NAMES[0]: cat_ids, INPUT_NAMES[1]: dense}
        return self.session.run([OUTPUT_NAME], feeds)[0]

    def example_inputs(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of all-missing features (ids 0, dense 0), for warmup and benchmarks."""
        return (np.zeros((rows, self.encoder.num_cat), np.int64),
                np.zeros((rows, self.encoder.num_dense), np.float32))


def open_version(mv: ModelVersion, settings: Settings) -> ServedModel:
    """Check a repository version (content hash, model.json) and open its session."""
    t0 = time.perf_counter()
    try:
        mv.verify(check_graph=False)
        encoder = RequestEncoder(mv.encoders)
        opts = session_options(settings.session_threads, settings.inter_op_threads)
        session = ort.InferenceSession(str(mv.onnx_path), sess_options=opts,
                                       providers=choose_providers(settings.execution_provider))
    except ModelLoadError:
        raise
    except Exception as e:  # RepositoryError, SchemaError, ONNX Runtime's own errors
        raise ModelLoadError(f"cannot serve {mv.name} version {mv.version}: {e}") from None
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    if names != (list(INPUT_NAMES), [OUTPUT_NAME]):
        raise ModelLoadError(f"{mv.onnx_path}: inputs/outputs {names}, expected "
                             f"{list(INPUT_NAMES)} -> {OUTPUT_NAME}")
    return ServedModel(name=mv.name, version=mv.version, meta=mv.meta, session=session,
                       encoder=encoder, provider=session.get_providers()[0],
                       load_s=time.perf_counter() - t0)


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
        mv.verify(check_graph=True, session=m.session)
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


def load_models(settings: Settings) -> dict[str, ServedModel]:
    """The latest version of each configured model (every model when none is configured)."""
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
        m = open_version(mv, settings)
        validate_served(m, mv)
        log.info("loaded %s version %d (%s, %s, %.0f FLOPs/example) on %s in %.2fs", m.name,
                 m.version, m.arch, m.precision, m.flops_per_example, m.provider, m.load_s)
        out[name] = m
    roles = [("default_model", settings.default_model),
             ("fallback_model", settings.fallback_model),
             ("shadow_model", settings.shadow_model),
             *(("ab arm", name) for name, _ in settings.ab_arms)]
    for role, name in roles:
        if name is not None and name not in out:
            raise ModelLoadError(f"{role} {name!r} is not loaded (models: {sorted(out)})")
    return out

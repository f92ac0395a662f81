"""Export a trained run folder to the model repository as a parity-checked ONNX model.

``export_run`` (what ``mldcn export`` calls) does, in order:

1. load the run folder (``model.train.load_run``), with one clear error per broken file;
2. trace ``ProbabilityModel`` (inputs ``cat_ids`` int64 (B, F_cat), ``dense`` float32 (B, F_num),
   output ``probability`` float32 (B,) = sigmoid(logit), batch axis dynamic) with the TorchScript
   exporter (``torch.onnx.export(..., dynamo=False)``, opset ``OPSET``) into a dot-prefixed
   staging folder inside ``MODELS_DIR/NAME``; both inputs are declared even when one is unused
   (F_cat = 0), and ``onnx.checker.check_model(full_check=True)`` must pass. What is traced is
   ``serving_form(model)``: for ML-DCN the fused inference graph of ``model.fuse`` (graph form
   "fused"), for the other architectures the model itself ("plain");
3. run the staged graph in ONNX Runtime (CPUExecutionProvider) against the run's own (unfused)
   PyTorch fp32 model, so the parity checks also prove the fused graph equivalent, on random
   inputs and on real rows (``samples/valid.npz``, encoded validation rows, and
   ``samples/raw_rows.json``, raw rows encoded with the run's encoders) at batch sizes
   ``PARITY_BATCH_SIZES`` (real rows topped up with random ones where there are too few), and on
   all validation rows for the AUC. fp32 must agree within ``FP32_TOLERANCE`` (max absolute
   difference of probabilities), else ``ParityError`` and nothing is written;
4. write model.json (a checked ``export.meta.ModelMeta``; ``onnx.graph_form`` and the graph's
   operator counts record which form was written) and publish the folder with one ``os.rename``.

External data (``external_data``, ``mldcn export --external-data``): one protobuf file cannot
exceed 2 GiB, so a graph with larger tensors (a wide hashed embedding table) is stored as
``model.onnx`` (the graph, small) plus ONE data file ``model.onnx.data`` beside it holding every
initializer of at least ``EXTERNAL_TENSOR_MIN_BYTES``; both are in the staging folder, so the
one ``os.rename`` publishes them together, and model.json's ``external_data`` records the data
file's SHA-256 and size. "auto" (the default) stores externally when the graph's initializers
total more than ``EXTERNAL_DATA_THRESHOLD`` (1 GiB, well below the limit), "always" does so for
any graph, "never" keeps one file and refuses (ExportError) a graph whose initializers exceed
``MAX_PROTOBUF_BYTES``. The TorchScript exporter writes tensors of a > 2 GiB model as one file
each beside its output, so it traces into a private sub-folder; the graph is loaded back with
its tensors, its inputs and outputs declared, and saved in the final layout; the sub-folder is
deleted. ``onnx.checker`` checks the saved file by path (a > 2 GiB proto cannot be serialised
for an in-memory check), and the parity checks open the staged files as the server will.

fp16 (``fp16=True``): the model's weights are cast to float16 and traced with float32 ↔ float16
casts at the boundary (``dense`` is cast to float16 on entry, the logit to float32 before the
sigmoid), so the graph computes in float16 while its inputs and output keep their fp32 types.
No converter dependency (onnxconverter-common) is needed and every op is one the fp32 export
already uses; ONNX Runtime's CPU provider runs ops it lacks a float16 kernel for in float32.
fp16 must stay within ``FP16_TOLERANCE`` of PyTorch fp32 and lose at most ``FP16_MAX_AUC_DROP``
AUC on the validation rows, else ``ParityError``. No graph-optimised copy is written: ONNX
Runtime optimises the graph for its execution provider when the server opens a session.
"""

from __future__ import annotations

import copy
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from export.meta import (
    BATCH_AXIS,
    EXTERNAL_DATA_FILE,
    INPUT_NAMES,
    META_FORMAT_VERSION,
    MODEL_FILE,
    OUTPUT_NAME,
    ModelMeta,
    io_spec,
)
from export.repository import (
    META_FILE,
    RepositoryError,
    check_name,
    check_version,
    external_data_entry,
    publish,
    sha256_file,
    staging_dir,
    utc_now,
    write_meta,
)
from model.config import ModelConfig
from model.ctr import CTRModel
from model.encoders import FeatureEncoders
from model.errors import InputError, one_line
from model.files import read_json
from model.flops import model_flops
from model.fuse import fuse_for_inference
from model.metrics import roc_auc
from model.modules import MLP, MaskedLowRankCrossNet

OPSET = 17
PROVIDER = "CPUExecutionProvider"
PARITY_BATCH_SIZES: tuple[int, ...] = (1, 7, 256, 4096)
FP32_TOLERANCE = 1e-5
FP16_TOLERANCE = 1e-2
FP16_MAX_AUC_DROP = 1e-3
EXPORTER = "torch.onnx.export (TorchScript tracer, dynamo=False)"
EXTERNAL_DATA_MODES: tuple[str, ...] = ("auto", "always", "never")
EXTERNAL_DATA_THRESHOLD = 1 << 30  # "auto": initializers above 1 GiB go to model.onnx.data
PROTOBUF_LIMIT_BYTES = 1 << 31  # 2 GiB: the most one protobuf message can serialise to
MAX_PROTOBUF_BYTES = PROTOBUF_LIMIT_BYTES - (1 << 27)  # "never": 128 MiB left for the graph
EXTERNAL_TENSOR_MIN_BYTES = 1024  # smaller tensors (shapes, scalars) stay inside model.onnx
_CHUNK_ROWS = 4096

Log = Callable[[str], None]


class ExportError(InputError):
    """An export that cannot be done: broken run folder, failed ONNX check, bad arguments."""


class ParityError(ExportError):
    """ONNX Runtime's probabilities disagree with PyTorch's beyond the tolerance."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class ProbabilityModel(nn.Module):
    """The served function: (cat_ids, dense) → probability = sigmoid(logit), float32.

    With ``half=True`` the wrapped model must hold float16 weights: ``dense`` is cast to float16
    on entry and the logit back to float32 before the sigmoid.

    Args:
        model (nn.Module): a CTR model mapping cat_ids (B, F_cat), dense (B, F_num) to logits (B,).
        half (bool): the model computes in float16.

    Example:
        >>> from model.ctr import build_model
        >>> net = build_model(ModelConfig(arch="mlp", embed_dim=2, mlp_dims=(4,)), [3], 1)
        >>> p = ProbabilityModel(net.eval())(torch.tensor([[2]]), torch.zeros(1, 1))
        >>> p.shape, p.dtype, bool(0 < p[0] < 1)
        (torch.Size([1]), torch.float32, True)
    """

    def __init__(self, model: nn.Module, half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.fp16 = half  # not ``self.half``: that would hide nn.Module.half()

    def forward(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Map cat_ids (B, F_cat) int64 and dense (B, F_num) float32 to probabilities (B,)."""
        if self.fp16:
            dense = dense.to(torch.float16)  # (B, F_num)
        logit = self.model(cat_ids, dense)  # (B,)
        return torch.sigmoid(logit.to(torch.float32))  # (B,)


@dataclass
class RunFolder:
    """A loaded run folder: the model (eval mode, best weights) and what describes it."""

    path: Path
    model: nn.Module
    config: ModelConfig
    encoders: FeatureEncoders
    metrics: dict[str, Any]

    @property
    def cardinalities(self) -> list[int]:
        """Ids per categorical field."""
        return self.encoders.cardinalities

    @property
    def num_dense(self) -> int:
        """F_num."""
        return self.encoders.num_dense


def load_run_folder(run_dir: str | Path) -> RunFolder:
    """Load a run folder for export (``model.train.load_run`` checks every file); every problem
    is one error naming the file at fault: FileNotFoundError or ExportError."""
    from model.train import RunFolderError, load_run

    try:
        model, cfg, encoders, metrics = load_run(run_dir)
    except RunFolderError as e:
        raise ExportError(str(e)) from None
    return RunFolder(Path(run_dir), model, cfg, encoders, metrics)


@dataclass
class Samples:
    """Real rows kept with the run: encoded validation rows and (optionally) raw rows."""

    cat_ids: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    raw_cat_ids: np.ndarray | None = None
    raw_dense: np.ndarray | None = None


def load_samples(run: RunFolder) -> Samples:
    """Read ``samples/valid.npz`` (required) and ``samples/raw_rows.json`` (encoded, if present).

    Raises ExportError naming the file when it is missing, malformed, or does not fit the model
    (shapes, id ranges).
    """
    folder = run.path / "samples"
    valid_path = folder / "valid.npz"
    if not valid_path.is_file():
        raise ExportError(f"{valid_path} is missing: the run has no validation rows to check "
                          "parity and AUC on (re-train it with this version of mldcn)")
    num_cat, num_dense = len(run.cardinalities), run.num_dense
    try:
        with np.load(valid_path) as z:
            cat = np.ascontiguousarray(z["cat_ids"], dtype=np.int64)
            dense = np.ascontiguousarray(z["dense"], dtype=np.float32)
            labels = np.asarray(z["labels"], dtype=np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(f"{valid_path}: cannot read: {one_line(e)}") from None
    n = len(labels)
    if n == 0 or cat.shape != (n, num_cat) or dense.shape != (n, num_dense):
        raise ExportError(
            f"{valid_path}: expected cat_ids (n, {num_cat}), dense (n, {num_dense}) and labels "
            f"(n,) with n >= 1, got {cat.shape}, {dense.shape} and {labels.shape}"
        )
    _check_rows(run, cat, dense, valid_path)
    samples = Samples(cat, dense, labels)
    raw_path = folder / "raw_rows.json"
    if raw_path.is_file():
        raw = read_json(raw_path, ExportError)
        try:
            columns = {name: raw[name] for name in run.encoders.schema.names}
            samples.raw_cat_ids, samples.raw_dense = run.encoders.transform(columns)
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"{raw_path}: cannot encode the raw rows: {one_line(e)}") from None
        _check_rows(run, samples.raw_cat_ids, samples.raw_dense, raw_path)
    return samples


def _check_rows(run: RunFolder, cat: np.ndarray, dense: np.ndarray, where: Path) -> None:
    try:
        run.model.check_inputs(torch.from_numpy(cat), torch.from_numpy(dense))
    except ValueError as e:
        raise ExportError(f"{where}: rows do not fit the model: {one_line(e)}") from None
    if not np.all(np.isfinite(dense)):
        raise ExportError(f"{where}: dense features contain NaN or inf")


def serving_form(model: nn.Module) -> tuple[nn.Module, str]:
    """The module to trace for ``model`` and its graph form: ("fused", ML-DCN) or ("plain").

    ML-DCN models (``CTRModel`` with a ``MaskedLowRankCrossNet``) become
    ``model.fuse.fuse_for_inference(model)``: the same function with fewer, larger operators.
    Other models are traced as they are, except that a deep tower with BatchNorm is replaced
    (in a copy) by its eval-mode form with each BatchNorm folded into its Linear.

    Example:
        >>> from model.ctr import build_model
        >>> cfg = ModelConfig(arch="mldcn", embed_dim=2, num_layers=1, rank=2, mlp_dims=(4,))
        >>> type(serving_form(build_model(cfg, [3], 1).eval())[0]).__name__
        'FusedMLDCN'
        >>> serving_form(build_model(ModelConfig(arch="mlp", mlp_dims=(4,)), [3], 1))[1]
        'plain'
    """
    if isinstance(model, CTRModel) and isinstance(model.interaction, MaskedLowRankCrossNet):
        return fuse_for_inference(model), "fused"
    if isinstance(model, CTRModel) and isinstance(model.mlp, MLP) and any(
            isinstance(m, nn.BatchNorm1d) for m in model.mlp.modules()):
        model = copy.deepcopy(model).eval()
        model.mlp = model.mlp.for_inference()
    return model, "plain"


def op_counts(graph_model: onnx.ModelProto) -> dict[str, int]:
    """Nodes of the graph by op_type, sorted by name; ``Constant`` nodes (data) are not counted."""
    counts: dict[str, int] = {}
    for node in graph_model.graph.node:
        if node.op_type != "Constant":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))


def initializer_bytes(graph_model: onnx.ModelProto) -> int:
    """Bytes of the graph's initializers (their raw data; else their serialised size)."""
    return sum(len(t.raw_data) if t.HasField("raw_data") else t.ByteSize()
               for t in graph_model.graph.initializer)


def check_external_data_mode(mode: str) -> str:
    """Return ``mode`` if it is one of ``EXTERNAL_DATA_MODES``, else raise ExportError."""
    if mode not in EXTERNAL_DATA_MODES:
        raise ExportError(f"external_data must be one of {EXTERNAL_DATA_MODES}, got {mode!r}")
    return mode


def wants_external_data(mode: str, tensor_bytes: int) -> bool:
    """Whether a graph whose initializers hold ``tensor_bytes`` is saved with external data.

    "auto": above ``EXTERNAL_DATA_THRESHOLD``; "always": yes; "never": no, and ExportError when
    the tensors would not fit one protobuf file (above ``MAX_PROTOBUF_BYTES``).

    Example:
        >>> wants_external_data("auto", 1 << 20), wants_external_data("auto", 3 << 30)
        (False, True)
        >>> wants_external_data("always", 0), wants_external_data("never", 1 << 30)
        (True, False)
        >>> wants_external_data("never", 3 << 30)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        export.exporter.ExportError: the graph's initializers hold 3221225472 bytes, ...
    """
    check_external_data_mode(mode)
    if mode == "never":
        if tensor_bytes > MAX_PROTOBUF_BYTES:
            raise ExportError(
                f"the graph's initializers hold {tensor_bytes} bytes, more than one ONNX "
                f"protobuf file can hold ({MAX_PROTOBUF_BYTES} bytes: the 2 GiB protobuf limit "
                "less a margin for the graph); export with external data ('auto' or 'always')"
            )
        return False
    return mode == "always" or tensor_bytes > EXTERNAL_DATA_THRESHOLD


def export_graph(
    model: nn.Module, path: Path, num_cat: int, num_dense: int, half: bool = False,
    external_data: str = "auto",
) -> onnx.ModelProto:
    """Trace ``ProbabilityModel(model)`` to ``path`` (opset ``OPSET``, dynamic batch) and check it.

    Inputs the tracer drops (cat_ids when F_cat = 0) are declared anyway, so every graph has
    exactly the inputs (cat_ids, dense) and the output probability; names, shapes and doc
    strings are set. With external data (``external_data``, see ``wants_external_data`` and
    the module docstring) the tensors go to one file beside ``path``, named ``path``'s name +
    ``.data`` (``model.onnx.data``); else no such file is left there. Then
    ``onnx.checker.check_model(path, full_check=True)`` runs on the saved file. Returns the
    model; with external data its tensors refer to the data file (their bytes are not in memory).
    """
    check_external_data_mode(external_data)
    path = Path(path)
    module = ProbabilityModel(copy.deepcopy(model).half() if half else model, half=half).eval()
    example = (torch.zeros(2, num_cat, dtype=torch.int64), torch.zeros(2, num_dense))
    axes = {INPUT_NAMES[0]: {0: BATCH_AXIS}, INPUT_NAMES[1]: {0: BATCH_AXIS},
            OUTPUT_NAME: {0: BATCH_AXIS}}
    # A model over 2 GiB makes the tracer write one file per tensor beside its output: trace
    # into a private folder, load the graph with its tensors, save it in the final layout.
    trace_dir = Path(tempfile.mkdtemp(prefix=".trace-", dir=path.parent))
    try:
        traced = trace_dir / path.name
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the legacy exporter's deprecation notices
                torch.onnx.export(
                    module, example, str(traced), input_names=list(INPUT_NAMES),
                    output_names=[OUTPUT_NAME], dynamic_axes=axes, opset_version=OPSET,
                    do_constant_folding=True, dynamo=False,
                )
        except Exception as e:  # the exporter raises many types; all mean "cannot export"
            raise ExportError(f"ONNX export failed: {one_line(e)}") from None
        graph_model = onnx.load(str(traced))  # external tensors the tracer wrote load too
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    _declare_io(graph_model, num_cat, num_dense)
    external = wants_external_data(external_data, initializer_bytes(graph_model))
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    try:
        if external:
            onnx.save_model(graph_model, str(path), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_path.name,
                            size_threshold=EXTERNAL_TENSOR_MIN_BYTES)
        else:
            onnx.save_model(graph_model, str(path))
    except (ValueError, OSError) as e:  # protobuf's size limit, a full disk
        raise ExportError(f"cannot save the exported graph to {path}: {one_line(e)}") from None
    if data_path.is_file():
        # onnx creates the data file readable by its owner only; give it model.onnx's mode, so
        # that a server running as another user (the image's uid 10001) can read both.
        data_path.chmod(path.stat().st_mode & 0o777)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # by path: external data too
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {one_line(e)}") from None
    return graph_model


_ELEM_TYPES = {"int64": onnx.TensorProto.INT64, "float32": onnx.TensorProto.FLOAT}


def _declare_io(graph_model: onnx.ModelProto, num_cat: int, num_dense: int) -> None:
    graph = graph_model.graph
    inputs, outputs = io_spec(num_cat, num_dense)
    present = {i.name: i for i in graph.input}
    extra = set(present) - set(INPUT_NAMES)
    if extra:
        raise ExportError(f"the exported graph has unexpected inputs {sorted(extra)}")
    declared = []
    for spec in inputs:
        info = present.get(spec["name"])
        if info is None:  # unused by the model (F_cat = 0): declare it anyway
            info = onnx.helper.make_tensor_value_info(
                spec["name"], _ELEM_TYPES[spec["dtype"]], spec["shape"])
        copy_info = onnx.ValueInfoProto()
        copy_info.CopyFrom(info)
        copy_info.doc_string = spec["description"]
        declared.append(copy_info)
    del graph.input[:]
    graph.input.extend(declared)
    if [o.name for o in graph.output] != [OUTPUT_NAME]:
        raise ExportError(f"the exported graph has outputs {[o.name for o in graph.output]}")
    graph.output[0].doc_string = outputs[0]["description"]
    graph.doc_string = ("CTR model: cat_ids int64 (batch, F_cat), dense float32 (batch, F_num) "
                        "-> probability float32 (batch,)")
    graph_model.producer_name = "mldcn"
    for spec in [*inputs, *outputs]:
        tensor = next(t for t in [*graph.input, *graph.output] if t.name == spec["name"])
        t = tensor.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        if t.elem_type != _ELEM_TYPES[spec["dtype"]] or dims != spec["shape"]:
            raise ExportError(f"the exported graph's {spec['name']} is elem_type {t.elem_type}, "
                              f"shape {dims}; expected {spec['dtype']} {spec['shape']}")


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about CPU fallbacks of float16 ops
    # No busy-waiting between runs: PyTorch runs in between on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=[PROVIDER])
    except Exception as e:  # ORT raises its own exception types
        raise ExportError(f"ONNX Runtime cannot load the exported graph: {one_line(e)}") from None


@torch.no_grad()
def _reference_probabilities(model: nn.Module, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """PyTorch fp32 probabilities, in chunks of ``_CHUNK_ROWS`` rows."""
    out = []
    for i in range(0, len(cat), _CHUNK_ROWS):
        c = torch.from_numpy(np.ascontiguousarray(cat[i : i + _CHUNK_ROWS]))
        d = torch.from_numpy(np.ascontiguousarray(dense[i : i + _CHUNK_ROWS]))
        out.append(torch.sigmoid(model(c, d)).numpy())
    return np.concatenate(out).astype(np.float32)


def _onnx_probabilities(
    session: ort.InferenceSession, cat: np.ndarray, dense: np.ndarray
) -> np.ndarray:
    """ONNX Runtime probabilities, in chunks of ``_CHUNK_ROWS`` rows (shape and dtype checked)."""
    out = []
    for i in range(0, len(cat), _CHUNK_ROWS):
        c, d = cat[i : i + _CHUNK_ROWS], dense[i : i + _CHUNK_ROWS]
        (p,) = session.run([OUTPUT_NAME], {INPUT_NAMES[0]: c, INPUT_NAMES[1]: d})
        if p.shape != (len(c),) or p.dtype != np.float32:
            raise ParityError(f"ONNX Runtime returned {p.dtype} {p.shape} for a batch of "
                              f"{len(c)}; expected float32 ({len(c)},)")
        out.append(p)
    return np.concatenate(out)


def _random_rows(
    rng: np.random.Generator, n: int, cardinalities: list[int], num_dense: int
) -> tuple[np.ndarray, np.ndarray]:
    cat = np.empty((n, len(cardinalities)), dtype=np.int64)
    for j, card in enumerate(cardinalities):
        cat[:, j] = rng.integers(0, card, size=n)
    dense = (2.0 * rng.standard_normal((n, num_dense))).astype(np.float32)
    return cat, dense


def check_parity(
    run: RunFolder,
    samples: Samples,
    onnx_path: Path,
    precision: str = "fp32",
    batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare ONNX Runtime on ``onnx_path`` with the PyTorch fp32 model; the parity record.

    Checks: random rows and validation rows (topped up with random rows when there are fewer
    than the batch size) at each of ``batch_sizes``, the raw rows (one batch), and all validation
    rows (chunks of 4096) with the AUC of both. Raises ParityError when an output is not finite,
    the max absolute difference exceeds the precision's tolerance, or (fp16) the validation AUC
    drops by more than ``FP16_MAX_AUC_DROP`` (or cannot be measured).
    """
    tolerance = FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE
    session = _session(onnx_path)
    rng = np.random.default_rng(seed)
    cards, num_dense = run.cardinalities, run.num_dense
    checks: list[dict[str, Any]] = []

    def compare(
        kind: str, cat: np.ndarray, dense: np.ndarray, real_rows: int
    ) -> tuple[np.ndarray, np.ndarray]:
        ref = _reference_probabilities(run.model, cat, dense)
        got = _onnx_probabilities(session, cat, dense)
        if not np.all(np.isfinite(got)):
            raise ParityError(f"ONNX Runtime ({precision}) gave non-finite probabilities on "
                              f"{kind} rows (batch {len(cat)})")
        diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
        checks.append({"inputs": kind, "batch_size": int(len(cat)), "real_rows": real_rows,
                       "max_abs_diff": diff})
        return ref, got

    n_valid = len(samples.labels)
    for size in batch_sizes:
        compare("random", *_random_rows(rng, size, cards, num_dense), 0)
        k = min(size, n_valid)
        fill_cat, fill_dense = _random_rows(rng, size - k, cards, num_dense)
        compare("valid", np.concatenate([samples.cat_ids[:k], fill_cat]),
                np.concatenate([samples.dense[:k], fill_dense]), k)
    if samples.raw_cat_ids is not None and samples.raw_dense is not None:
        compare("raw_rows", samples.raw_cat_ids, samples.raw_dense, len(samples.raw_cat_ids))
    p_torch, p_onnx = compare("valid_all", samples.cat_ids, samples.dense, n_valid)
    labels = samples.labels
    two_classes = 0 < labels.sum() < len(labels)
    auc_torch = roc_auc(labels, p_torch) if two_classes else float("nan")
    auc_onnx = roc_auc(labels, p_onnx) if two_classes else float("nan")
    max_diff = max(c["max_abs_diff"] for c in checks)
    record = {
        "provider": PROVIDER,
        "reference": "PyTorch fp32",
        "precision": precision,
        "tolerance": tolerance,
        "max_abs_diff": max_diff,
        "checks": checks,
        "valid_rows": n_valid,
        "auc_torch": auc_torch,
        "auc_onnx": auc_onnx,
        "auc_change": auc_onnx - auc_torch,
        "max_auc_drop": FP16_MAX_AUC_DROP if precision == "fp16" else None,
        "seed": seed,
    }
    if max_diff > tolerance:
        worst = max(checks, key=lambda c: c["max_abs_diff"])
        raise ParityError(
            f"ONNX Runtime ({precision}) disagrees with PyTorch: max |Δp| {max_diff:.3g} > "
            f"tolerance {tolerance:g} (on {worst['inputs']} rows, batch {worst['batch_size']})"
        )
    if precision == "fp16":
        if not two_classes:
            raise ParityError("cannot measure the fp16 AUC change: the validation rows have one "
                              "class only")
        if auc_onnx - auc_torch < -FP16_MAX_AUC_DROP:
            raise ParityError(
                f"fp16 loses {auc_torch - auc_onnx:.4f} validation AUC ({auc_torch:.4f} → "
                f"{auc_onnx:.4f}), more than the allowed {FP16_MAX_AUC_DROP}"
            )
    return record


def _training_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        "valid": metrics.get("valid"),
        "test": metrics.get("test"),
        "bayes_auc": metrics.get("bayes_auc"),
        "epochs_run": metrics.get("epochs_run"),
        "best_epoch": metrics.get("best_epoch"),
        "train_examples_per_s": metrics.get("train_examples_per_s"),
    }


def build_meta(
    run: RunFolder,
    graph_model: onnx.ModelProto,
    onnx_path: Path,
    precision: str,
    parity: dict[str, Any],
    graph_form: str = "plain",
) -> dict[str, Any]:
    """model.json for a staged model.onnx, as the mapping :func:`write_meta` checks into a
    ``ModelMeta`` (see ``export.meta`` for the fields).

    ``external_data`` describes the ``model.onnx.data`` beside ``onnx_path``, null if none."""
    cards, num_dense = run.cardinalities, run.num_dense
    flops = model_flops(run.config, cards, num_dense)
    inputs, outputs = io_spec(len(cards), num_dense)
    opset = next(o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx"))
    counts = op_counts(graph_model)
    return {
        "format_version": META_FORMAT_VERSION,
        "created_at": utc_now(),
        "model_file": MODEL_FILE,
        "sha256": sha256_file(onnx_path),
        "bytes": onnx_path.stat().st_size,
        "external_data": external_data_entry(onnx_path.parent),
        "precision": precision,
        "inputs": inputs,
        "outputs": outputs,
        "model": {"arch": run.config.arch, "config": run.config.to_dict(),
                  "cardinalities": cards, "num_dense": num_dense},
        "encoders": run.encoders.to_dict(),
        "cost": {"flops_per_example": flops.total, "matmul_flops_per_example": flops.matmul,
                 "params": flops.params},
        "metrics": _training_metrics(run.metrics),
        "parity": parity,
        "onnx": {"opset": int(opset), "ir_version": int(graph_model.ir_version),
                 "exporter": EXPORTER, "torch_version": torch.__version__,
                 "onnx_version": onnx.__version__, "onnxruntime_version": ort.__version__,
                 "graph_form": graph_form, "op_counts": counts,
                 "node_count": sum(counts.values())},
        "source": {"run_dir": str(run.path.resolve()),
                   "checkpoint_sha256": sha256_file(run.path / "checkpoint.pt")},
    }


@dataclass
class ExportResult:
    """A published version: where it is and its model.json."""

    name: str
    version: int
    path: Path
    meta: ModelMeta


def export_run(
    run_dir: str | Path,
    repo: str | Path,
    name: str,
    version: int | None = None,
    fp16: bool = False,
    log: Log = _stderr,
    external_data: str = "auto",
) -> ExportResult:
    """Export a run folder as version ``version`` (default: latest + 1) of ``repo/name``.

    Everything is written into a dot-prefixed staging folder inside ``repo/name`` and published
    by one ``os.rename`` after every check passed, so a failed or interrupted export leaves no
    visible version. Raises ExportError / ParityError / RepositoryError (ValueErrors) or
    FileNotFoundError with a one-line message.

    Args:
        run_dir: a run folder written by ``mldcn train``.
        repo: the model repository folder, MODELS_DIR (created if missing).
        name: the model name (``export.repository.NAME_PATTERN``).
        version: the version number; it must not exist yet.
        fp16: export a float16 graph (float32 inputs and output); see the module docstring.
        log: progress messages.
        external_data: "auto", "always" or "never": store the tensors in ``model.onnx.data``
            beside model.onnx when they pass ``EXTERNAL_DATA_THRESHOLD``, always, or never
            (refusing a graph too large for one protobuf file); see the module docstring.
    """
    check_name(name)
    check_external_data_mode(external_data)
    check_version(version)
    repo_path = Path(repo)
    if repo_path.exists() and not repo_path.is_dir():
        raise RepositoryError(f"model repository {repo_path} is not a folder")
    if version is not None and (repo_path / name / str(version)).exists():
        raise RepositoryError(f"{repo_path / name / str(version)} already exists "
                              "(versions are immutable; omit --version to take the next one)")
    t0 = time.perf_counter()
    run = load_run_folder(run_dir)
    samples = load_samples(run)
    precision = "fp16" if fp16 else "fp32"
    with staging_dir(repo_path, name) as staging:
        onnx_path = staging / MODEL_FILE
        serving, graph_form = serving_form(run.model)
        graph_model = export_graph(serving, onnx_path, len(run.cardinalities), run.num_dense,
                                   half=fp16, external_data=external_data)
        data_path = staging / EXTERNAL_DATA_FILE
        storage = (f"tensors in {EXTERNAL_DATA_FILE} ({data_path.stat().st_size:,} bytes)"
                   if data_path.is_file() else f"tensors inside {MODEL_FILE}")
        log(f"graph: {graph_form} form, {sum(op_counts(graph_model).values())} operators; "
            f"{storage}")
        parity = check_parity(run, samples, onnx_path, precision)
        log(f"parity ({precision}, ONNX Runtime {PROVIDER} vs PyTorch fp32): max |Δp| "
            f"{parity['max_abs_diff']:.2e} over {len(parity['checks'])} checks; validation AUC "
            f"{parity['auc_torch']:.4f} → {parity['auc_onnx']:.4f} "
            f"(change {parity['auc_change']:+.5f})")
        meta = write_meta(staging / META_FILE,
                          build_meta(run, graph_model, onnx_path, precision, parity, graph_form))
        final = publish(staging, repo_path / name, version)
    number = int(final.name)
    log(f"exported {run.path} as {name} version {number} ({precision}) → {final} "
        f"in {time.perf_counter() - t0:.1f}s")
    return ExportResult(name, number, final, meta)

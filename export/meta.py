"""``model.json``, typed: the one description of an exported model version that export writes
and the repository reader, the service and the load tests read (:class:`ModelMeta`, pydantic).

``format_version`` 2 (``META_FORMAT_VERSION``); version-1 files (written before it) still load:
:meth:`ModelMeta.parse` checks their top-level ``schema`` against the encoders' schema and drops
it, since version 2 stores the feature schema once, inside ``encoders``. Fields, all present
in a file this version writes:

format_version
    2.
created_at
    UTC time of the export, ISO 8601 (``2025-01-31T12:00:00Z``).
model_file, sha256, bytes
    ``model.onnx``, its content hash (hex SHA-256) and size.
external_data
    null when the graph holds its own tensors (one protobuf file, which cannot exceed 2 GiB);
    else ``{"file": "model.onnx.data", "sha256": <hex>, "bytes": <int>}``: the one external data
    file beside model.onnx that holds its tensors (``mldcn export --external-data``). Absent in
    older files: null.
precision
    ``fp32``, or ``fp16`` (float16 inside the graph; inputs and output keep their types).
inputs, outputs
    One entry per tensor: ``name``, ``dtype`` (numpy name), ``datatype`` (KServe v2 name),
    ``shape`` (``"batch"`` marks the dynamic axis), ``description``. The inputs are always
    exactly ``cat_ids`` int64 (batch, F_cat) and ``dense`` float32 (batch, F_num), in that
    order, even when F_cat or F_num is 0 (feed a (B, 0) array); the output is ``probability``
    float32 (batch,) = sigmoid(logit) (:func:`io_spec`).
model
    ``arch``, ``config`` (``ModelConfig.to_dict()``), ``cardinalities``, ``num_dense``.
encoders
    ``FeatureEncoders.to_dict()``, the feature schema included: :attr:`ModelMeta.feature_encoders`
    turns raw request columns into the two inputs, with no torch.
cost
    ``flops_per_example``, ``matmul_flops_per_example``, ``params`` (``model.flops``).
metrics
    The run's training metrics: ``valid`` and ``test`` (auc, logloss, rows), ``bayes_auc``
    (synthetic data, else null), ``epochs_run``, ``best_epoch``, ``train_examples_per_s``.
parity
    ONNX Runtime against PyTorch fp32 at export: ``provider``, ``precision``, ``tolerance``,
    ``max_abs_diff``, ``checks`` (input kind, batch size, real rows, max abs diff each), and
    the AUC on the validation rows (``auc_torch``, ``auc_onnx``, ``auc_change``).
onnx
    ``opset``, ``ir_version``, ``exporter`` and the torch/onnx/onnxruntime versions;
    ``graph_form`` (``GRAPH_FORMS``: "plain", the model as trained, or "fused", ML-DCN's
    inference form from ``model.fuse``), ``op_counts`` (nodes of model.onnx by op_type, Constant
    nodes not counted) and ``node_count`` (their sum; both absent in older files).
source
    The run folder and the SHA-256 of its checkpoint.

Consistency is part of the type: the encoders parse, their layout is ``model.cardinalities`` /
``model.num_dense``, ``inputs`` and ``outputs`` are :func:`io_spec` of that layout, and
``onnx.node_count`` is the sum of ``onnx.op_counts``. Non-finite numbers are written as
``null`` (the file is strict JSON). numpy, pydantic and the numpy-only encoders only.

Example:
    >>> inputs, outputs = io_spec(2, 1)
    >>> [(t["name"], t["shape"]) for t in inputs], outputs[0]["name"]
    ([('cat_ids', ['batch', 2]), ('dense', ['batch', 1])], 'probability')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from model.encoders import FeatureEncoders
from model.errors import InputError
from model.files import json_safe
from model.schema import SchemaError

META_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = MODEL_FILE + ".data"  # the tensors of a graph stored with external data
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
GRAPH_FORMS: tuple[str, ...] = ("plain", "fused")
BATCH_AXIS = "batch"
INPUT_NAMES: tuple[str, str] = ("cat_ids", "dense")
OUTPUT_NAME = "probability"
# numpy dtype name -> (ONNX Runtime type string, KServe v2 datatype)
DTYPES: dict[str, tuple[str, str]] = {
    "int64": ("tensor(int64)", "INT64"),
    "float32": ("tensor(float)", "FP32"),
}


class MetaError(InputError):
    """A model.json that cannot be used: the field and the reason."""


def io_spec(num_cat: int, num_dense: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The (inputs, outputs) entries of model.json for a layout of F_cat and F_num fields.

    Example:
        >>> inputs, outputs = io_spec(26, 13)
        >>> [(i["name"], i["dtype"], i["shape"]) for i in inputs]
        [('cat_ids', 'int64', ['batch', 26]), ('dense', 'float32', ['batch', 13])]
        >>> outputs[0]["name"], outputs[0]["datatype"], outputs[0]["shape"]
        ('probability', 'FP32', ['batch'])
    """

    def entry(name: str, dtype: str, shape: list[Any], description: str) -> dict[str, Any]:
        return {"name": name, "dtype": dtype, "datatype": DTYPES[dtype][1], "shape": shape,
                "description": description}

    inputs = [
        entry(INPUT_NAMES[0], "int64", [BATCH_AXIS, num_cat],
              "one id per categorical field in schema order, column j in "
              "[0, cardinalities[j]); 0 is the missing/out-of-vocabulary id"),
        entry(INPUT_NAMES[1], "float32", [BATCH_AXIS, num_dense],
              "numeric fields in schema order, transformed, clipped and standardised by the "
              "encoders"),
    ]
    outputs = [entry(OUTPUT_NAME, "float32", [BATCH_AXIS],
                     "click probability per row, sigmoid(logit)")]
    return inputs, outputs


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[StrictInt, Field(ge=0)]


class _Record(BaseModel):
    # keys this version does not know are dropped, not refused: files from other writers (or a
    # later minor version) still load; format_version guards the changes that break readers
    model_config = ConfigDict(frozen=True, extra="ignore")


class TensorSpec(_Record):
    """One input or output tensor of the graph."""

    name: str
    dtype: Literal["int64", "float32"]
    datatype: str = ""  # the KServe name; from ``dtype`` when absent
    shape: list[Literal["batch"] | StrictInt]
    description: str = ""

    @model_validator(mode="after")
    def _datatype(self) -> TensorSpec:
        if not self.datatype:
            object.__setattr__(self, "datatype", DTYPES[self.dtype][1])
        return self


class ExternalData(_Record):
    """The external data file of a graph stored with ONNX external data (no other keys: a
    storage detail this version does not know must not be ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    file: Literal["model.onnx.data"]
    sha256: Sha256
    bytes: Count


class ModelInfo(_Record):
    """What was trained: the architecture, its config and the feature layout."""

    arch: str
    config: dict[str, Any]
    cardinalities: list[StrictInt]
    num_dense: Count


class Cost(_Record):
    """FLOPs and parameters per example (``model.flops``)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    flops_per_example: int | float | None = None  # an int stays an int
    matmul_flops_per_example: int | float | None = None
    params: int | float | None = None


class OnnxInfo(_Record):
    """How the graph was made: opset, IR version, exporter and library versions, graph form and
    operator counts (the last three absent in older files)."""

    model_config = ConfigDict(frozen=True, extra="allow")
    opset: int | None = None
    ir_version: int | None = None
    exporter: str | None = None
    torch_version: str | None = None
    onnx_version: str | None = None
    onnxruntime_version: str | None = None
    graph_form: Literal["plain", "fused"] | None = None
    op_counts: dict[str, Count] | None = None
    node_count: Count | None = None

    @model_validator(mode="after")
    def _counts_add_up(self) -> OnnxInfo:
        if self.op_counts is not None and self.node_count != sum(self.op_counts.values()):
            raise ValueError(f"node_count {self.node_count!r} is not the sum of op_counts "
                             f"({sum(self.op_counts.values())})")
        return self


class Source(_Record):
    """The run folder the version was exported from."""

    model_config = ConfigDict(frozen=True, extra="allow")
    run_dir: str | None = None
    checkpoint_sha256: str | None = None


class ModelMeta(_Record):
    """A parsed, consistent model.json (see the module docstring for the fields)."""

    format_version: Literal[2] = META_FORMAT_VERSION
    created_at: str | None = None  # None only in files from other writers
    model_file: Literal["model.onnx"] = MODEL_FILE
    sha256: Sha256
    bytes: Count
    external_data: ExternalData | None = None
    precision: Literal["fp32", "fp16"]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    model: ModelInfo
    encoders: dict[str, Any]
    cost: Cost
    metrics: dict[str, Any]
    parity: dict[str, Any]
    onnx: OnnxInfo
    source: Source

    @cached_property
    def feature_encoders(self) -> FeatureEncoders:
        """The fitted feature encoders: raw request columns → (cat_ids, dense)."""
        return FeatureEncoders.from_dict(self.encoders)

    @property
    def schema(self) -> dict[str, Any]:
        """The feature schema (``FeatureSchema.to_dict()``), as the encoders hold it."""
        return self.feature_encoders.schema.to_dict()

    @model_validator(mode="after")
    def _consistent(self) -> ModelMeta:
        try:
            encoders = FeatureEncoders.from_dict(self.encoders)
        except (SchemaError, AttributeError, TypeError, KeyError, ValueError) as e:
            raise ValueError(f"encoders are not valid: {e}") from None
        self.__dict__["feature_encoders"] = encoders  # parsed once: feature_encoders' cache
        if (self.model.cardinalities != encoders.cardinalities
                or self.model.num_dense != encoders.num_dense):
            raise ValueError(
                f"encoders give cardinalities {encoders.cardinalities} and {encoders.num_dense} "
                f"dense features, model says {self.model.cardinalities} and "
                f"{self.model.num_dense}")
        inputs, outputs = io_spec(len(encoders.cardinalities), encoders.num_dense)
        for key, want in (("inputs", inputs), ("outputs", outputs)):
            got = [(t.name, t.dtype, t.shape) for t in getattr(self, key)]
            expected = [(t["name"], t["dtype"], t["shape"]) for t in want]
            if got != expected:
                raise ValueError(f"{key} {got} disagree with the feature layout: expected "
                                 f"{expected}")
        return self

    @classmethod
    def parse(cls, data: Any) -> ModelMeta:
        """A parsed model.json (version 1 or 2) as the current version; MetaError naming the
        field and the reason."""
        if not isinstance(data, dict):
            raise MetaError("is not a JSON object")
        version = data.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS or isinstance(version, bool):
            raise MetaError(f"format_version {version!r} is not supported (this version reads "
                            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        if version == 1:
            data = _from_version_1(data)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise MetaError(_problems(e)) from None

    def to_json(self) -> str:
        """The file's text: strict JSON, indented, non-finite numbers as null."""
        return json.dumps(json_safe(self.model_dump(mode="json")), indent=2,
                          allow_nan=False) + "\n"


def unknown_keys(data: Mapping[str, Any]) -> list[str]:
    """Keys of a model.json mapping that :class:`ModelMeta` does not know (at the top level, in
    ``model`` and in the tensor entries): reading ignores them, the writer refuses them.

    Example:
        >>> unknown_keys({"format_version": 2, "sha256": "", "notes": 1, "model": {"arch": "x",
        ...               "owner": 1}, "inputs": [{"name": "a", "typo": 1}]})
        ['notes', 'model.owner', 'inputs[0].typo']
    """
    out = [k for k in data if k not in ModelMeta.model_fields and k != "schema"]
    model = data.get("model")
    if isinstance(model, Mapping):
        out += [f"model.{k}" for k in model if k not in ModelInfo.model_fields]
    for key in ("inputs", "outputs"):
        for i, t in enumerate(data.get(key) or []):
            if isinstance(t, Mapping):
                out += [f"{key}[{i}].{k}" for k in t if k not in TensorSpec.model_fields]
    return out


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 model.json as version 2: its ``schema`` (a copy of the encoders' schema) is
    checked and dropped."""
    if "schema" not in data:
        raise MetaError("schema: field required (format_version 1)")
    schema = data["schema"]
    try:
        own = FeatureEncoders.from_dict(data.get("encoders")).schema.to_dict()
    except (SchemaError, AttributeError, TypeError, KeyError, ValueError):
        own = None  # the encoders' own check below names the problem
    if own is not None and own != schema:
        raise MetaError("schema disagrees with the encoders' schema")
    return {**{k: v for k, v in data.items() if k != "schema"},
            "format_version": META_FORMAT_VERSION}


def _problems(e: ValidationError) -> str:
    """The validation errors as 'field: reason; ...' (the consistency checks' own words)."""
    out = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] != "value_error" and isinstance(value, (str, int, float)):
            msg += f", got {value!r:.80}"
        out.append(f"{where}: {msg}" if where else msg)
    return "; ".join(out)

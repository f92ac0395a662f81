"""Request and response bodies of the scoring API, twice: pydantic and msgspec.

The pydantic models make the OpenAPI schema and the error details; the msgspec Structs
(:class:`ScoreBody`, :class:`ScoreReply`) are the same bodies on the hot path, decoded,
validated and encoded at C speed. :func:`decode_score` reads a body with msgspec and, only when
msgspec refuses it, lets pydantic decide: pydantic's answer (a 422 naming the field, or a
request msgspec is stricter about, such as ``NaN`` or a UTF-16 body) is the contract, so both
paths accept and refuse the same bodies (tests/test_schemas.py checks them side by side).

A feature value is a string, an integer, a finite number, a boolean or null (missing). Which
fields a model reads, and on which side (``user``, ``context`` or per ``candidate``), comes from
its feature schema; :mod:`service.encode` checks the values against it.

Example:
    >>> req = ScoreRequest.model_validate_json(
    ...     '{"user": {"age": 31}, "candidates": {"ad_id": ["a", "b"], "price": [1.5, null]}}')
    >>> req.num_candidates, req.columnar
    (2, True)
    >>> ScoreRequest.model_validate_json('{"user": {}, "candidates": [{"price": NaN}]}')
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: ...
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any, Literal

import msgspec
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
    ValidationError,
)

from service.errors import invalid_request

MAX_STRING_LENGTH = 256  # longest string feature value, request id or model name
MAX_FIELD_NAME_LENGTH = 128

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


def _json_number(v: Any) -> Any:
    """A JSON number: never ``true`` or ``"25"`` (which pydantic's lax float would take)."""
    if isinstance(v, bool | str):
        raise ValueError("must be a number")
    return v


Milliseconds = Annotated[float, Field(gt=0, allow_inf_nan=False), BeforeValidator(_json_number)]
FeatureString = Annotated[str, StringConstraints(strict=True, max_length=MAX_STRING_LENGTH)]
FieldName = Annotated[str, StringConstraints(max_length=MAX_FIELD_NAME_LENGTH)]
# pydantic's smart union picks the member of the exact type (bool is not taken as an int).
FeatureValue = FeatureString | StrictBool | StrictInt | FiniteFloat | None
FeatureMap = dict[FieldName, FeatureValue]
# at least one candidate: a non-empty list of objects, or non-empty columns
RowCandidates = Annotated[list[FeatureMap], Field(min_length=1)]
ColumnarCandidates = Annotated[
    dict[FieldName, Annotated[list[FeatureValue], Field(min_length=1)]], Field(min_length=1)]
# Named union members (service.errors.UNION_TAGS), so that an error's location reads
# candidates.columnar.price[3] and is shown as candidates.price[3].
Candidates = Annotated[
    Annotated[ColumnarCandidates, Tag("columnar")] | Annotated[RowCandidates, Tag("rows")],
    Discriminator(lambda v: "columnar" if isinstance(v, dict) else "rows"),
]


class ScoreRequest(BaseModel):
    """``POST /v1/score``: one user and context, N candidate ads to score."""

    model_config = ConfigDict(extra="forbid")

    request_id: str | None = Field(
        default=None, max_length=MAX_STRING_LENGTH, description="echoed back in the response"
    )
    model: str | None = Field(
        default=None, max_length=128,
        description="model name; default: the A/B arm of user_id, else the server's default",
    )
    user_id: str | None = Field(
        default=None, max_length=MAX_STRING_LENGTH,
        description="who the request is for: hashed to pick the A/B arm (never a feature)",
    )
    timeout_ms: Milliseconds | None = Field(
        default=None,
        description="latency budget asked for; capped by the server's default_timeout_ms",
    )
    user: FeatureMap = Field(description="user-side features, sent once and broadcast")
    context: FeatureMap = Field(
        default_factory=dict, description="context-side features, sent once and broadcast",
        json_schema_extra={"default": {}},
    )
    candidates: Candidates = Field(
        description="candidate-side features: columnar {field: [values...]} (the fast path) "
        "or a list of objects, one per candidate; at least one candidate"
    )

    @property
    def columnar(self) -> bool:
        """True when candidates came as ``{field: [values...]}``."""
        return isinstance(self.candidates, dict)

    @property
    def num_candidates(self) -> int:
        """Number of candidates (columnar: the length of the first column)."""
        return num_candidates(self)


class Timing(BaseModel):
    """Where the request's time went, in milliseconds since the app saw its first byte."""

    queue_ms: float = Field(description="waiting for a batch slot")
    compute_ms: float = Field(description="ONNX Runtime time of the batch(es) that scored it")
    total_ms: float = Field(description="arrival to response")
    predicted_ms: float = Field(
        description="what admission control predicted for arrival to scored (its margin "
                    "included) when it admitted the request")


class ScoreResponse(BaseModel):
    """Scores in candidate order and which model version produced them."""

    request_id: str | None = None
    model: str
    version: int
    degraded: bool = Field(
        default=False, description="true when the fallback model scored it (timeout_action)"
    )
    arm: str | None = Field(
        default=None, description="the A/B arm the request was assigned to (null: not split)"
    )
    scores: list[float] = Field(description="click probability per candidate, in order")
    timing: Timing


class ErrorDetail(BaseModel):
    """One problem with a request."""

    field: str | None = Field(default=None, description="dotted path, e.g. candidates[3].price")
    message: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body: a machine-readable reason and human-readable details."""

    error: str = Field(description="reason code, e.g. invalid_request, queue_full")
    message: str
    errors: list[ErrorDetail] = Field(default_factory=list)
    request_id: str | None = None


class V2ErrorResponse(BaseModel):
    """Error body of the ``/v2`` routes: the Open Inference Protocol's ``{"error": message}``
    with our reason code and details beside it."""

    error: str = Field(description="what went wrong (the protocol's field)")
    reason: str = Field(description="reason code, e.g. invalid_request, model_not_found")
    errors: list[ErrorDetail] = Field(default_factory=list)


class InferTensorParameters(BaseModel):
    """Parameters of an input tensor in a JSON request. ``binary_data_size`` belongs to the
    binary tensor data extension (an ``application/octet-stream`` body), not here."""

    model_config = ConfigDict(json_schema_extra={"properties": {"binary_data_size": False}})


class InferTensor(BaseModel):
    """One input tensor of ``/v2/.../infer`` (see service/kserve.py)."""

    name: str = Field(min_length=1, description="a schema field, or cat_ids / dense")
    datatype: Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                      "INT64", "FP16", "FP32", "FP64", "BYTES"]
    shape: list[Annotated[int, Field(ge=0)]] = Field(
        description="[N] per row, [1] broadcast; [N, F_cat] / [N, F_num] encoded")
    data: list[Any] = Field(description="row-major values (nested lists allowed), as many as "
                                        "the shape holds")
    parameters: InferTensorParameters | None = None


class InferRequestParameters(BaseModel):
    """Parameters of an inference request (others are ignored)."""

    timeout: Annotated[float, Field(gt=0)] | None = Field(
        default=None, description="latency budget in microseconds (Triton's unit)")
    binary_data_output: bool | None = Field(
        default=None, description="answer with the binary tensor data extension")


class InferOutputParameters(BaseModel):
    """Parameters of an output asked for."""

    binary_data: bool | None = Field(default=None, description="this output as binary data")


class InferOutputRequest(BaseModel):
    """An output asked for; the only one is ``probability``."""

    name: Literal["probability"]
    parameters: InferOutputParameters | None = None


class InferRequestBody(BaseModel):
    """``POST /v2/models/{name}/infer`` as JSON (the binary tensor data extension sends this
    JSON, then the tensors' bytes, as ``application/octet-stream`` with the
    ``Inference-Header-Content-Length`` header)."""

    id: str | None = None
    parameters: InferRequestParameters | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[InferOutputRequest] | None = None


class InferOutput(BaseModel):
    """The ``probability`` output: FP32 [N], in ``data`` or as binary data."""

    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = None
    parameters: dict[str, Any] | None = None


class InferResponseBody(BaseModel):
    """The answer of ``/v2/.../infer``; ``parameters`` hold degraded and the timing."""

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    outputs: list[InferOutput]


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``: KServe v2 model metadata plus serving details."""

    name: str
    versions: list[str]
    platform: str = "onnxruntime_onnx"
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any] = Field(default_factory=dict)


# -- the hot path: the same bodies as msgspec Structs --------------------------------------------
_MAX_FLOAT = sys.float_info.max
_Str = Annotated[str, msgspec.Meta(max_length=MAX_STRING_LENGTH)]
_Name = Annotated[str, msgspec.Meta(max_length=MAX_FIELD_NAME_LENGTH)]
_Value = _Str | bool | int | Annotated[float, msgspec.Meta(ge=-_MAX_FLOAT, le=_MAX_FLOAT)] | None
_Features = dict[_Name, _Value]


class ScoreBody(msgspec.Struct, forbid_unknown_fields=True):
    """:class:`ScoreRequest` as msgspec decodes it (same fields, same limits)."""

    user: _Features
    candidates: (Annotated[dict[_Name, Annotated[list[_Value], msgspec.Meta(min_length=1)]],
                           msgspec.Meta(min_length=1)]
                 | Annotated[list[_Features], msgspec.Meta(min_length=1)])
    context: _Features = {}
    request_id: _Str | None = None
    model: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    user_id: _Str | None = None
    timeout_ms: Annotated[float, msgspec.Meta(gt=0, le=_MAX_FLOAT)] | None = None


class TimingReply(msgspec.Struct):
    """:class:`Timing` as msgspec encodes it."""

    queue_ms: float
    compute_ms: float
    total_ms: float
    predicted_ms: float


class ScoreReply(msgspec.Struct):
    """:class:`ScoreResponse` as msgspec encodes it (same fields, same order)."""

    request_id: str | None
    model: str
    version: int
    degraded: bool
    arm: str | None
    scores: list[float]
    timing: TimingReply


_decode_body = msgspec.json.Decoder(ScoreBody).decode
encode_reply = msgspec.json.Encoder().encode


def decode_score(body: bytes) -> ScoreBody | ScoreRequest:
    """The ``/v1/score`` body, validated; ServiceError 422 naming the field otherwise.

    Example:
        >>> decode_score(b'{"user": {"age": 3}, "candidates": {"ad": ["a", "b"]}}').user
        {'age': 3}
        >>> decode_score(b'{"user": {}, "candidates": [{"price": NaN}]}')
        Traceback (most recent call last):
        ...
        service.errors.ServiceError: candidates[0].price: Input should be a finite number
    """
    try:
        return _decode_body(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        pass
    return validate_request(parse_json(body))


def parse_json(body: bytes) -> Any:
    """``body`` as JSON, whatever its Content-Type (UTF-8/16/32, ``NaN`` allowed: validation
    refuses it by name); ServiceError 422 at the character where it stops being JSON."""
    if not body:
        raise invalid_request([{"type": "missing", "loc": ("body",),
                                "msg": "a JSON body is required"}])
    try:
        return json.loads(body)
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8/16/32
        raise invalid_request([{"type": "json_invalid", "loc": ("body", getattr(e, "pos", 0)),
                                "msg": "JSON decode error",
                                "ctx": {"error": getattr(e, "msg", str(e))}}]) from None
    except RecursionError:
        raise invalid_request([{"type": "json_too_deep", "loc": ("body",),
                                "msg": "JSON nested too deeply"}]) from None


def validate_request(raw: Any) -> ScoreRequest:
    """``raw`` (parsed JSON) validated as a ScoreRequest; ServiceError 422 naming the field."""
    try:
        return ScoreRequest.model_validate(raw)
    except ValidationError as e:
        raise invalid_request([dict(err) for err in e.errors()]) from None
    except RecursionError:
        raise invalid_request([{"type": "json_too_deep", "loc": ("body",),
                                "msg": "JSON nested too deeply"}]) from None


def num_candidates(req: ScoreBody | ScoreRequest) -> int:
    """Number of candidates (columnar: the length of the first column; 0 if none)."""
    cands = req.candidates
    if isinstance(cands, dict):
        return len(next(iter(cands.values()), ()))
    return len(cands)

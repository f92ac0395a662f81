"""Request and response bodies of the scoring API (pydantic; they make the OpenAPI schema).

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

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StringConstraints,
    Tag,
)

MAX_STRING_LENGTH = 256  # longest string feature value, request id or model name
MAX_FIELD_NAME_LENGTH = 128

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
FeatureString = Annotated[str, StringConstraints(strict=True, max_length=MAX_STRING_LENGTH)]
FieldName = Annotated[str, StringConstraints(max_length=MAX_FIELD_NAME_LENGTH)]
# pydantic's smart union picks the member of the exact type (bool is not taken as an int).
FeatureValue = FeatureString | StrictBool | StrictInt | FiniteFloat | None
FeatureMap = dict[FieldName, FeatureValue]
RowCandidates = list[FeatureMap]
ColumnarCandidates = dict[FieldName, list[FeatureValue]]
# Named union members, so that an error's location reads candidates.columnar.price[3].
UNION_TAGS = ("columnar", "rows")
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
    timeout_ms: FiniteFloat | None = Field(
        default=None, gt=0,
        description="latency budget asked for; capped by the server's default_timeout_ms",
    )
    user: FeatureMap = Field(description="user-side features, sent once and broadcast")
    context: FeatureMap = Field(
        default_factory=dict, description="context-side features, sent once and broadcast"
    )
    candidates: Candidates = Field(
        description="candidate-side features: columnar {field: [values...]} (the fast path) "
        "or a list of objects, one per candidate"
    )

    @property
    def columnar(self) -> bool:
        """True when candidates came as ``{field: [values...]}``."""
        return isinstance(self.candidates, dict)

    @property
    def num_candidates(self) -> int:
        """Number of candidates (columnar: the length of the first column; 0 if none)."""
        if isinstance(self.candidates, dict):
            return len(next(iter(self.candidates.values()), []))
        return len(self.candidates)


class Timing(BaseModel):
    """Where the request's time went, in milliseconds since the app saw its first byte."""

    queue_ms: float = Field(description="waiting for a batch slot")
    compute_ms: float = Field(description="ONNX Runtime time of the batch(es) that scored it")
    total_ms: float = Field(description="arrival to response")


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


class ModelMetadata(BaseModel):
    """``GET /v2/models/{name}``: KServe v2 model metadata plus serving details."""

    name: str
    versions: list[str]
    platform: str = "onnxruntime_onnx"
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    parameters: dict[str, Any] = Field(default_factory=dict)

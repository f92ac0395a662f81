"""Schemathesis hooks for ``tests/test_contract_fuzz.py``, loaded by the ``schemathesis run``
subprocess through ``SCHEMATHESIS_HOOKS`` (pytest runs its doctests).

* ``not_a_server_error_outside_budget`` replaces the built-in ``not_a_server_error`` (the test
  passes ``--exclude-checks not_a_server_error``): it runs the built-in check unchanged on every
  response except a *budget answer* of a scoring operation (:func:`is_budget_answer`).
* ``positive_data_acceptance_outside_consistency`` replaces the built-in
  ``positive_data_acceptance`` (also excluded by the test): it runs it unchanged except on the
  answers to bodies whose validity JSON Schema cannot express (:func:`is_consistency_answer`):
  ``/v1/score`` columns of different lengths (422), and a ``/v2`` infer body's tensors, whose
  validity depends on each other and on the model (element counts against shapes, equal row
  counts, which datatypes a feature takes, both or neither encoded tensor): a 400
  ``invalid_request`` naming the tensor is the protocol's answer.
* ``map_path_parameters`` points most ``{name}``/``{version}`` path parameters at what the
  server really serves (``MLDCN_FUZZ_MODELS``, ``MLDCN_FUZZ_VERSION``), so that fuzzing reaches
  the metadata, readiness, inference and admin logic, not only their 404. The choice is a CRC-32
  of the generated value (a seeded run stays deterministic); schemathesis revalidates a case a
  hook changed, so a negative case this makes valid is no longer treated as negative.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import schemathesis
from schemathesis.checks import not_a_server_error, positive_data_acceptance

SCORING_OPERATIONS = frozenset({
    ("POST", "/v1/score"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
})
BUDGET_REASONS: dict[int, frozenset[str]] = {
    503: frozenset({"predicted_deadline_miss", "queue_full"}),
    504: frozenset({"deadline_exceeded"}),
}
INFER_OPERATIONS = SCORING_OPERATIONS - {("POST", "/v1/score")}
RAGGED = re.compile(r"has \d+ values, other columns have \d+")
# /v2 infer 400s for constraints between fields or against the served model, which a JSON
# Schema cannot state (the request's own shape errors are not here: those the schema states)
INFER_CONSISTENCY = re.compile("|".join([
    r"\d+ values for shape ", r"rows, other inputs have ", r"cat_ids has \d+ rows, dense ",
    r"not a mix", r": datatype \w+, expected ", r": shape \[.*\], expected ",
    r"not a feature of model ", r"categorical, send BYTES", r"numeric, send FP32",
    r"holds an id outside ", r"values must be finite", r" data must be (numbers|integers|"
    r"strings|true/false)", r"BOOL data must be", r"a value does not fit ", r"is given twice",
    r"no rows to score", r"binary data", r"BYTES element", r"bytes left after",
    r"data is nested too deeply", r"the only output is ", r"\(model '",
    r"not valid JSON",  # the JSON header of a binary (octet-stream) body
    r"Inference-Header-Content-Length ",
]))
MODELS = [m for m in os.environ.get("MLDCN_FUZZ_MODELS", "").split(",") if m]
VERSION = os.environ.get("MLDCN_FUZZ_VERSION", "1")


def error_reasons(content: bytes) -> set[str]:
    """The reason codes an error body names: ``error`` (ErrorResponse) or ``reason`` (the
    ``/v2`` protocol form ``{"error": message, "reason": code}``).

    >>> sorted(error_reasons(b'{"error": "queue_full", "message": "..."}'))
    ['queue_full']
    >>> error_reasons(b'not json'), error_reasons(b'[1]')
    (set(), set())
    """
    try:
        body = json.loads(content)
    except ValueError:
        return set()
    if not isinstance(body, dict):
        return set()
    return {v for v in (body.get("error"), body.get("reason")) if isinstance(v, str)}


def is_budget_answer(method: str, path: str, status: int,
                     headers: Mapping[str, Sequence[str]], content: bytes) -> bool:
    """True for the one kind of 5xx that is the service doing its job: on ``POST /v1/score`` or
    ``POST /v2/models/{name}[/versions/{version}]/infer`` (``path`` is the schema's template),
    a 503 ``predicted_deadline_miss``/``queue_full`` with a whole-seconds ``Retry-After``
    (admission control refusing work it cannot finish in time), or a 504 ``deadline_exceeded``
    (the deadline passed while queued). ``headers`` has lower-case names and list values.

    >>> ok = {"retry-after": ["1"]}
    >>> is_budget_answer("POST", "/v1/score", 503, ok, b'{"error": "queue_full"}')
    True
    >>> is_budget_answer("POST", "/v1/score", 503, {}, b'{"error": "queue_full"}')
    False
    >>> is_budget_answer("TRACE", "/v1/score", 503, ok, b'{"error": "queue_full"}')
    False
    >>> is_budget_answer("POST", "/v1/score", 503, ok, b'{"error": "not_ready"}')
    False
    >>> is_budget_answer("POST", "/v1/score", 500, ok, b'{"error": "queue_full"}')
    False
    """
    reasons = BUDGET_REASONS.get(status)
    if reasons is None or (method.upper(), path) not in SCORING_OPERATIONS:
        return False
    if status == 503 and not (headers.get("retry-after") or [""])[0].isdigit():
        return False
    return bool(error_reasons(content) & reasons)


@schemathesis.check
def not_a_server_error_outside_budget(ctx: schemathesis.CheckContext,
                                      response: schemathesis.Response,
                                      case: schemathesis.Case) -> bool | None:
    """The built-in ``not_a_server_error``, on every response but a budget answer."""
    if is_budget_answer(case.method, case.operation.path, response.status_code,
                        response.headers, response.content):
        return None
    return not_a_server_error(ctx, response, case)


def is_consistency_answer(method: str, path: str, status: int, content: bytes) -> bool:
    """True for a refusal of what the schema cannot express: ragged ``/v1/score`` columns
    (422 naming the column), or a ``/v2`` infer body the model cannot take (400
    ``invalid_request``).

    >>> ragged = b'{"error": "invalid_request", "message": "candidates.b: has 2 values, ' \\
    ...          b'other columns have 1"}'
    >>> is_consistency_answer("POST", "/v1/score", 422, ragged)
    True
    >>> is_consistency_answer("POST", "/v1/score", 422, b'{"error": "invalid_request"}')
    False
    >>> v2 = b'{"error": "ad: 2 values for shape [3]", "reason": "invalid_request"}'
    >>> is_consistency_answer("POST", "/v2/models/{name}/infer", 400, v2)
    True
    >>> is_consistency_answer("POST", "/v2/models/{name}/infer", 422, v2)
    False
    >>> shape = b'{"error": "id must be a string, got int", "reason": "invalid_request"}'
    >>> is_consistency_answer("POST", "/v2/models/{name}/infer", 400, shape)
    False
    """
    key = (method.upper(), path)
    if key == ("POST", "/v1/score") and status == 422:
        try:
            return bool(RAGGED.search(json.loads(content).get("message", "")))
        except (ValueError, AttributeError):
            return False
    if key not in INFER_OPERATIONS or status != 400:
        return False
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return (isinstance(body, dict) and body.get("reason") == "invalid_request"
            and bool(INFER_CONSISTENCY.search(str(body.get("error", "")))))


@schemathesis.check
def positive_data_acceptance_outside_consistency(ctx: schemathesis.CheckContext,
                                                 response: schemathesis.Response,
                                                 case: schemathesis.Case) -> bool | None:
    """The built-in ``positive_data_acceptance``, on every answer but a consistency one."""
    if is_consistency_answer(case.method, case.operation.path, response.status_code,
                             response.content):
        return None
    return positive_data_acceptance(ctx, response, case)


def pick(value: Any, choices: Sequence[str]) -> Any:
    """``value`` or one of ``choices``, picked by a CRC-32 of ``repr(value)`` (stable across
    processes, unlike ``hash``).

    >>> pick("zz", ["mldcn", "mlp"]) == pick("zz", ["mldcn", "mlp"])
    True
    """
    options = [value, *choices]
    return options[zlib.crc32(repr(value).encode()) % len(options)]


@schemathesis.hook
def map_path_parameters(ctx: schemathesis.HookContext,
                        path_parameters: dict[str, Any] | None) -> dict[str, Any] | None:
    """Most ``{name}`` values become a served model, half the ``{version}`` values its version."""
    if not path_parameters or not MODELS:
        return path_parameters
    out = dict(path_parameters)
    if "name" in out:
        out["name"] = pick(out["name"], MODELS)
    if "version" in out:
        out["version"] = pick(out["version"], [VERSION])
    return out

"""Answers other than 200: the exceptions that carry them and their JSON bodies.

Every error body is an :class:`~service.schemas.ErrorResponse` (``{"error", "message",
"errors": [{"field", "message"}], "request_id"}``) naming the field and the reason; bad input
is a 4xx, never a 500 or a stack trace. ``/v2`` answers carry the protocol's ``{"error":
message}`` with the reason code beside it (:func:`v2_body`).

Example:
    >>> e = ServiceError(422, "invalid_request", "must be a number", field="user.age")
    >>> error_body(e)[:64]
    b'{"error":"invalid_request","message":"must be a number","errors"'
    >>> e.details
    [('user.age', 'must be a number')]
    >>> field_path(("body", "candidates", "columnar", "price", 3, "float"))
    'candidates.price[3]'
"""

from __future__ import annotations

from typing import Any

import msgspec

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"; never reaches the client
UNION_TAGS = ("columnar", "rows")  # the tags of ScoreRequest.candidates' union members
_UNION_MEMBERS = {"constrained-str", "str", "bool", "int", "float", "none"}
_encode = msgspec.json.Encoder().encode


class ServiceError(Exception):
    """An answer other than 200: HTTP status, reason code, message, optional field/headers."""

    def __init__(self, status: int, error: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None,
                 details: list[tuple[str | None, str]] | None = None) -> None:
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.field, self.headers = field, headers
        self.details = details if details is not None else (
            [(field, message)] if field else [])


class ClientDisconnected(Exception):
    """The client went away before its answer was ready; nothing is sent."""


def error_body(e: ServiceError, request_id: str | None = None) -> bytes:
    """The ErrorResponse JSON of ``e``."""
    return _encode({"error": e.error, "message": e.message,
                    "errors": [{"field": f, "message": m} for f, m in e.details],
                    "request_id": request_id})


def v2_body(e: ServiceError) -> bytes:
    """The Open Inference Protocol's error body (``error`` is the message), with our reason."""
    return _encode({"error": e.message, "reason": e.error,
                    "errors": [{"field": f, "message": m} for f, m in e.details]})


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """pydantic's error location as a dotted path: ``candidates[3].price``, ``user.age``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "header", "query", "path") and len(parts) > 1:
        parts.pop(0)
    if len(parts) >= 2 and parts[0] == "candidates" and parts[1] in UNION_TAGS:
        del parts[1]
    if len(parts) > 1 and parts[-1] in _UNION_MEMBERS:
        parts.pop()
    path = ""
    for p in parts:
        path += f"[{p}]" if isinstance(p, int) else ("." if path else "") + str(p)
    return path


def invalid_request(errors: list[dict[str, Any]]) -> ServiceError:
    """One 422 for pydantic-style errors: one detail per field, the first one as message.

    A value that matches no allowed type gets one clear message instead of one per member.
    """
    grouped: dict[str, list[dict[str, Any]]] = {}
    for e in errors:
        if e.get("type") == "json_invalid":  # loc is ("body", character position)
            where = e.get("loc", ())[-1]
            why = (e.get("ctx") or {}).get("error", "")
            e = {**e, "msg": f"invalid JSON at character {where}: {why}".rstrip(": ")}
            grouped.setdefault("body", []).append(e)
            continue
        if (e.get("type") in ("model_attributes_type", "model_type", "dict_type")
                and tuple(e.get("loc", ())) in (("body",), ())):
            e = {**e, "msg": "the body must be a JSON object (Content-Type: application/json)"}
            grouped.setdefault("body", []).append(e)
            continue
        grouped.setdefault(field_path(e.get("loc", ())), []).append(e)
    details: list[tuple[str | None, str]] = []
    for path, errs in grouped.items():
        specific = [e for e in errs if e.get("type") in ("string_too_long", "finite_number")]
        if specific:
            msg = specific[0]["msg"]
        elif len(errs) > 1:
            msg = "must be a string, integer, boolean, finite number or null"
        else:
            msg = errs[0]["msg"]
        details.append((path or None, msg))
    if not details:
        details = [(None, "invalid request")]
    field, msg = details[0]
    return ServiceError(422, "invalid_request", f"{field}: {msg}" if field else msg,
                        details=details)

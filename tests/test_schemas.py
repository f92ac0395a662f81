"""The /v1/score body, twice: msgspec (the hot path) must never accept what pydantic refuses.

``decode_score`` reads with msgspec and falls back to pydantic when msgspec refuses, so the
contract is pydantic's as long as msgspec is the stricter of the two and agrees on the data it
accepts. Checked on hand-picked edge cases and on seeded random bodies.
"""

from __future__ import annotations

import json
import random
from typing import Any

import msgspec
import pytest

from service.errors import ServiceError
from service.schemas import ScoreBody, ScoreRequest, decode_score, validate_request

EDGE_CASES: list[bytes] = [
    b'{"user": {}, "candidates": [{}]}',
    b'{"user": {"a": 1, "b": 1.5, "c": "x", "d": true, "e": null}, "candidates": {"f": [1]}}',
    b'{"user": {}, "candidates": []}',
    b'{"user": {}, "candidates": {}}',
    b'{"user": {}, "candidates": {"f": []}}',
    b'{"user": {}, "candidates": {"f": [1], "g": [1, 2]}}',  # ragged: the encoder's 422
    b'{"user": {}, "candidates": [{}], "timeout_ms": 0}',
    b'{"user": {}, "candidates": [{}], "timeout_ms": 5e-324}',
    b'{"user": {}, "candidates": [{}], "timeout_ms": true}',
    b'{"user": {}, "candidates": [{}], "timeout_ms": "25"}',
    b'{"user": {}, "candidates": [{}], "timeout_ms": 1e400}',
    b'{"user": {"a": 1e400}, "candidates": [{}]}',
    b'{"user": {"a": -1e400}, "candidates": [{}]}',
    b'{"user": {"a": NaN}, "candidates": [{}]}',
    b'{"user": {"a": 123456789012345678901234567890}, "candidates": [{}]}',
    b'{"user": {"a": [1]}, "candidates": [{}]}',
    b'{"user": {"a": {"b": 1}}, "candidates": [{}]}',
    b'{"user": {}, "candidates": [{}], "extra": 1}',
    b'{"user": {}, "candidates": [1]}',
    b'{"user": {}, "candidates": [{}], "model": 3}',
    b'{"user": {}, "candidates": [{}], "user_id": "' + b"u" * 256 + b'"}',
    b'{"user": {}, "candidates": [{}], "user_id": "' + b"u" * 257 + b'"}',
    b'{"user": {"a": "' + "é".encode() * 256 + b'"}, "candidates": [{}]}',
    b'{"user": {"a": "' + "é".encode() * 257 + b'"}, "candidates": [{}]}',
    b'{"user": {"' + b"k" * 128 + b'": 1}, "candidates": [{}]}',
    b'{"user": {"' + b"k" * 129 + b'": 1}, "candidates": [{}]}',
    b'{"user": {}, "user": {"a": 1}, "candidates": [{}]}',
    b'{"user": {"a": "\\ud800"}, "candidates": [{}]}',
    '{"user": {"a": "x"}, "candidates": [{}]}'.encode("utf-16"),
    b'\xef\xbb\xbf{"user": {}, "candidates": [{}]}',
    b'{"user": {}, "candidates": [{}]} x',
    b"[1]",
    b"null",
    b"",
    b"{",
]


def _pydantic(body: bytes) -> ScoreRequest | None:
    try:
        return validate_request(json.loads(body))
    except (ValueError, ServiceError):
        return None


def _msgspec(body: bytes) -> ScoreBody | None:
    try:
        return msgspec.json.decode(body, type=ScoreBody)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None


def _same(a: ScoreBody, b: ScoreRequest) -> bool:
    fields = ("user", "context", "candidates", "request_id", "model", "user_id", "timeout_ms")
    return all(getattr(a, f) == getattr(b, f) for f in fields)


@pytest.mark.parametrize("body", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_msgspec_never_accepts_what_pydantic_refuses(body: bytes) -> None:
    fast, slow = _msgspec(body), _pydantic(body)
    if fast is not None:
        assert slow is not None and _same(fast, slow), body
    try:
        decoded = decode_score(body)
    except ServiceError as e:
        assert slow is None and e.status == 422 and e.details
    else:
        assert slow is not None and _same(decoded, slow)  # type: ignore[arg-type]


def _value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, -1, 2**70, 1.5, -0.0, 1e300, "", "x", "3", "é" * rng.randint(0, 300),
        [1], {"a": 1},
    ])


def _random_body(rng: random.Random) -> bytes:
    names = ["a", "b", "k" * rng.choice([1, 128, 129])]
    doc: dict[str, Any] = {}
    if rng.random() < 0.95:
        doc["user"] = {rng.choice(names): _value(rng) for _ in range(rng.randint(0, 3))}
    if rng.random() < 0.5:
        doc["context"] = {rng.choice(names): _value(rng) for _ in range(rng.randint(0, 2))}
    n = rng.randint(0, 3)
    if rng.random() < 0.5:
        doc["candidates"] = {rng.choice(names): [_value(rng) for _ in range(n)]
                             for _ in range(rng.randint(0, 2))}
    else:
        doc["candidates"] = [{rng.choice(names): _value(rng)} for _ in range(n)]
    for key, choices in (("timeout_ms", [None, 0, 1, 2.5, -3, True, "9"]),
                         ("model", [None, "m", 3, "x" * 129]),
                         ("request_id", [None, "r", "r" * 257]),
                         ("user_id", [None, "u", 7])):
        if rng.random() < 0.3:
            doc[key] = rng.choice(choices)
    if rng.random() < 0.05:
        doc["surprise"] = 1
    return json.dumps(doc).encode()


def test_msgspec_and_pydantic_agree_on_random_bodies() -> None:
    rng = random.Random(0)
    accepted = refused = 0
    for _ in range(3000):
        body = _random_body(rng)
        fast, slow = _msgspec(body), _pydantic(body)
        if fast is not None:
            assert slow is not None and _same(fast, slow), body
            accepted += 1
        elif slow is None:
            refused += 1
    assert accepted > 100 and refused > 100  # both sides of the contract were exercised

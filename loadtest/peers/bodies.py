"""Request builders: one ``/v1/score`` JSON body → the request each server of the benchmark takes.

Every builder returns a :class:`BuiltRequest` ``(path, headers, body, candidates)``: POST
``body`` to ``path`` with ``headers``; ``candidates`` is N, the rows it scores.

- :func:`score_json`: the body unchanged, for our ``/v1/score`` and the FastAPI peer.
- :func:`triton_infer`: a KServe v2 binary-tensor request for PyTriton / Triton
  (``/v2/models/{name}/infer``): one input per schema field, shape ``[N, 1]`` (Triton batches
  along the first axis, so user and context values are repeated to N rows), categorical fields
  ``BYTES``, numeric ``FP32``; fields the body leaves out are sent as missing values (``""``,
  NaN), so every declared input is present.
- :func:`service_infer`: the same for OUR ``/v2/models/{name}/infer``, which broadcasts ``[1]``
  tensors: user and context fields are sent once, candidate fields as ``[N]``; fields the body
  leaves out are left out (missing), as in ``/v1/score``.
- :func:`service_infer_encoded`: OUR ``/v2`` endpoint with the encoded ``cat_ids`` INT64
  ``[N, F_cat]`` and ``dense`` FP32 ``[N, F_num]``, encoded here with the model's encoders.

The binary tensor data extension: the body is the JSON header
(``Inference-Header-Content-Length`` bytes long) followed by each input's raw data, little-endian
and row-major, in the order of ``inputs``; a ``BYTES`` element is a 4-byte little-endian length
and its bytes. All builders ask for the ``probability`` output in binary too
(:func:`decode_infer_response` reads either form back).

Categorical values are sent as the string the encoders look them up by
(:func:`model.encoders.canonical_category`: ``3``, ``3.0`` and ``"3"`` are ``"3"``; ``None`` is
``""``, i.e. missing), so they encode exactly as ``/v1/score`` encodes them. Numeric values in
``FP32`` tensors are rounded to float32 before encoding, where ``/v1/score`` encodes the JSON
double: the dense inputs can differ in the last float32 bit.

Example:
    >>> from model.schema import FeatureSchema, FieldSpec
    >>> schema = FeatureSchema(fields=(
    ...     FieldSpec("u", "categorical", side="user"),
    ...     FieldSpec("ad", "categorical", side="candidate"),
    ...     FieldSpec("price", "numeric", side="candidate"),
    ... ))
    >>> body = {"user": {"u": 7}, "candidates": {"ad": ["a", None], "price": [1.5, None]}}
    >>> req = triton_infer(body, "ctr", schema)
    >>> req.path, req.candidates
    ('/v2/models/ctr/infer', 2)
    >>> head, tensors = decode_infer_request(req.headers, req.body)
    >>> [(i["name"], i["datatype"], i["shape"]) for i in head["inputs"]]
    [('u', 'BYTES', [2, 1]), ('ad', 'BYTES', [2, 1]), ('price', 'FP32', [2, 1])]
    >>> tensors["u"].ravel().tolist(), tensors["ad"].ravel().tolist()
    ([b'7', b'7'], [b'a', b''])
    >>> [i["shape"] for i in decode_infer_request(*service_infer(body, "ctr", schema)[1:3])[0][
    ...     "inputs"]]
    [[1], [2], [2]]
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from model.encoders import FeatureEncoders, canonical_category
from model.schema import FeatureSchema

SCORE_PATH = "/v1/score"
OUTPUT_NAME = "probability"
HEADER_LENGTH = "Inference-Header-Content-Length"
# KServe v2 datatype -> little-endian numpy dtype
DTYPES: dict[str, str] = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "FP64": "<f8",
                          "BOOL": "|b1"}
BROADCAST_SIDES = ("user", "context")


class BuiltRequest(NamedTuple):
    """One HTTP request to send: ``POST path`` with ``headers`` and ``body``; N ``candidates``."""

    path: str
    headers: dict[str, str]
    body: bytes
    candidates: int


def infer_path(model: str) -> str:
    """``/v2/models/{model}/infer``."""
    return f"/v2/models/{model}/infer"


def num_candidates(body: Mapping[str, Any]) -> int:
    """N of a ``/v1/score`` body (columnar: the common column length; rows: the list length)."""
    cands = body["candidates"]
    if isinstance(cands, Mapping):
        lengths = {len(col) for col in cands.values()}
        if len(lengths) > 1:
            raise ValueError(f"candidates: ragged columns (lengths {sorted(lengths)})")
        return lengths.pop() if lengths else 0
    return len(cands)


def _check_sides(body: Mapping[str, Any], schema: FeatureSchema) -> None:
    """ValueError for a field the schema does not have on the side it is sent on."""
    side = {f.name: f.side for f in schema.fields}
    cands = body["candidates"]
    names = cands if isinstance(cands, Mapping) else {k for row in cands for k in row}
    for where, want, fields in (("user", "user", body.get("user") or {}),
                                ("context", "context", body.get("context") or {}),
                                ("candidates", "candidate", names)):
        for name in fields:
            if side.get(name) != want:
                got = f"a {side[name]} feature" if name in side else "unknown field"
                raise ValueError(f"{where}.{name}: not a {want} feature of this model ({got})")


def candidate_column(body: Mapping[str, Any], name: str, n: int) -> list[Any]:
    """The raw values of candidate field ``name`` (None where a candidate lacks it)."""
    cands = body["candidates"]
    if isinstance(cands, Mapping):
        col = cands.get(name)
        return [None] * n if col is None else list(col)
    return [row.get(name) for row in cands]


def raw_columns(body: Mapping[str, Any], schema: FeatureSchema) -> dict[str, list[Any]]:
    """Every schema field as N raw values: user/context values repeated, missing → None.

    ``FeatureEncoders.transform`` of this is what ``/v1/score`` computes for the body.
    """
    _check_sides(body, schema)
    n = num_candidates(body)
    out: dict[str, list[Any]] = {}
    for f in schema.fields:
        if f.side in BROADCAST_SIDES:
            out[f.name] = [(body.get(f.side) or {}).get(f.name)] * n
        else:
            out[f.name] = candidate_column(body, f.name, n)
    return out


def bytes_elements(values: Sequence[Any]) -> bytes:
    """Categorical values as BYTES elements (4-byte LE length + canonical UTF-8 string)."""
    out = bytearray()
    for v in values:
        s = canonical_category(v)
        b = b"" if s is None else s.encode()
        out += struct.pack("<I", len(b))
        out += b
    return bytes(out)


def float_values(values: Sequence[Any], name: str) -> np.ndarray:
    """Numeric values as float64 (None → NaN); ValueError for strings, booleans and ±inf."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v is None:
            out[i] = math.nan
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isinf(v):
            out[i] = v
        else:
            raise ValueError(f"{name}[{i}]: must be a finite number or null, got {v!r}")
    return out


def _tensor(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[dict[str, Any], bytes]:
    spec = {"name": name, "datatype": datatype, "shape": shape,
            "parameters": {"binary_data_size": len(raw)}}
    return spec, raw


def binary_request(model: str, tensors: list[tuple[dict[str, Any], bytes]], candidates: int,
                   request_id: str | None = None, binary_output: bool = True) -> BuiltRequest:
    """Assemble a binary-extension ``/infer`` request from (input spec, raw bytes) pairs."""
    head: dict[str, Any] = {"inputs": [spec for spec, _ in tensors],
                            "outputs": [{"name": OUTPUT_NAME,
                                         "parameters": {"binary_data": binary_output}}]}
    if request_id is not None:
        head["id"] = request_id
    head_bytes = json.dumps(head, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head_bytes))}
    body = head_bytes + b"".join(raw for _, raw in tensors)
    return BuiltRequest(infer_path(model), headers, body, candidates)


def score_json(body: Mapping[str, Any]) -> BuiltRequest:
    """``POST /v1/score`` with the body unchanged (our service and the FastAPI peer)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return BuiltRequest(SCORE_PATH, {"Content-Type": "application/json"}, data,
                        num_candidates(body))


def triton_infer(body: Mapping[str, Any], model: str, schema: FeatureSchema,
                 binary_output: bool = True) -> BuiltRequest:
    """KServe v2 binary request for PyTriton/Triton: every schema field as an ``[N, 1]`` tensor."""
    columns = raw_columns(body, schema)
    n = num_candidates(body)
    tensors = []
    for f in schema.fields:
        if f.type == "categorical":
            tensors.append(_tensor(f.name, "BYTES", [n, 1], bytes_elements(columns[f.name])))
        else:
            raw = float_values(columns[f.name], f.name).astype("<f4").tobytes()
            tensors.append(_tensor(f.name, "FP32", [n, 1], raw))
    return binary_request(model, tensors, n, body.get("request_id"), binary_output)


def service_infer(body: Mapping[str, Any], model: str, schema: FeatureSchema,
                  binary_output: bool = True) -> BuiltRequest:
    """Binary request for OUR ``/v2/models/{name}/infer``: user/context ``[1]``, candidates ``[N]``.

    Only the fields the body has are sent (a field left out is missing, as in ``/v1/score``).
    """
    _check_sides(body, schema)
    n = num_candidates(body)
    cands = body["candidates"]
    present = set(cands) if isinstance(cands, Mapping) else {k for row in cands for k in row}
    tensors = []
    for f in schema.fields:
        if f.side in BROADCAST_SIDES:
            side = body.get(f.side) or {}
            if f.name not in side:
                continue
            values, shape = [side[f.name]], [1]
        else:
            if f.name not in present:
                continue
            values, shape = candidate_column(body, f.name, n), [n]
        if f.type == "categorical":
            tensors.append(_tensor(f.name, "BYTES", shape, bytes_elements(values)))
        else:
            raw = float_values(values, f.name).astype("<f4").tobytes()
            tensors.append(_tensor(f.name, "FP32", shape, raw))
    if not tensors:
        raise ValueError("the body has no feature the model reads: nothing to send")
    return binary_request(model, tensors, n, body.get("request_id"), binary_output)


def encode_body(body: Mapping[str, Any], encoders: FeatureEncoders,
                float32_numeric: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cat_ids, dense) of a ``/v1/score`` body, encoded as ``/v1/score`` encodes it.

    ``float32_numeric`` rounds numeric values to float32 first: the rows a server that received
    the ``FP32`` tensors of :func:`triton_infer` or :func:`service_infer` encodes.
    """
    columns: dict[str, Any] = raw_columns(body, encoders.schema)
    for f in encoders.schema.numeric:
        values = float_values(columns[f.name], f.name)
        columns[f.name] = values.astype(np.float32) if float32_numeric else values
    return encoders.transform(columns)


def service_infer_encoded(body: Mapping[str, Any], model: str, encoders: FeatureEncoders,
                          binary_output: bool = True) -> BuiltRequest:
    """Binary request for OUR ``/v2`` endpoint with ``cat_ids``/``dense`` encoded client-side."""
    cat, dense = encode_body(body, encoders)
    n = cat.shape[0]
    tensors = [
        _tensor("cat_ids", "INT64", list(cat.shape), np.ascontiguousarray(cat, "<i8").tobytes()),
        _tensor("dense", "FP32", list(dense.shape), np.ascontiguousarray(dense, "<f4").tobytes()),
    ]
    return binary_request(model, tensors, n, body.get("request_id"), binary_output)


def _split(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    length = next((v for k, v in headers.items() if k.lower() == HEADER_LENGTH.lower()), None)
    if length is None:
        return json.loads(body), b""
    return json.loads(body[:int(length)]), body[int(length):]


def _decode(spec: Mapping[str, Any], raw: bytes) -> np.ndarray:
    shape = tuple(spec["shape"])
    if spec["datatype"] == "BYTES":
        items, pos = [], 0
        for _ in range(math.prod(shape)):
            (size,) = struct.unpack_from("<I", raw, pos)
            items.append(raw[pos + 4:pos + 4 + size])
            pos += 4 + size
        if pos != len(raw):
            raise ValueError(f"{spec['name']}: {len(raw) - pos} bytes after the BYTES elements")
        return np.array(items, dtype=object).reshape(shape)
    return np.frombuffer(raw, dtype=DTYPES[spec["datatype"]]).reshape(shape)


def _tensors(items: list[dict[str, Any]], data: bytes) -> dict[str, np.ndarray]:
    out, pos = {}, 0
    for spec in items:
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is None:
            dtype = object if spec["datatype"] == "BYTES" else DTYPES[spec["datatype"]]
            out[spec["name"]] = np.array(spec["data"], dtype=dtype).reshape(spec["shape"])
        else:
            out[spec["name"]] = _decode(spec, data[pos:pos + size])
            pos += size
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes of binary data are not claimed")
    return out


def decode_infer_request(headers: Mapping[str, str],
                         body: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON header, {input name: array}) of a v2 request; BYTES inputs are arrays of bytes."""
    head, data = _split(headers, body)
    return head, _tensors(head["inputs"], data)


def decode_infer_response(headers: Mapping[str, str], body: bytes,
                          name: str = OUTPUT_NAME) -> np.ndarray:
    """Output ``name`` of a v2 response (JSON ``data`` or binary), flattened."""
    head, data = _split(headers, body)
    return _tensors(head["outputs"], data)[name].ravel()

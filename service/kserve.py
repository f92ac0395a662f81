"""KServe v2 / Open Inference Protocol inference: tensors in, ``probability`` out.

``POST /v2/models/{name}[/versions/{v}]/infer`` scores through the same path as
``/v1/score`` (budget, admission control, dynamic batcher, deadline; the request metrics count
both). A version in the URL must be the one serving (else 404).

Inputs, one of two forms:

- **Raw features** (what a client has): one tensor per schema field, named as the field,
  ``BYTES`` (UTF-8 strings) or an integer type for categorical fields, ``FP32``/``FP64`` (or an
  integer type) for numeric fields, shape ``[N]`` (``[N, 1]`` is accepted). A tensor of one
  element (shape ``[1]``) is broadcast to all N rows: send user and context fields once, like
  ``/v1/score`` does; they may also be ``[N]`` (one value per row, e.g. a batch of users).
  Missing values: a field left out, an empty string, ``null`` in JSON data, ``NaN`` for numeric
  fields in binary data. The N rows are scored as N candidates.
- **Encoded tensors** (what ``model.json`` lists): ``cat_ids`` INT64 ``[N, F_cat]`` (ids within
  each field's cardinality) and ``dense`` FP32 ``[N, F_num]`` (already standardised), both
  present. These bypass the encoders; they cannot be degraded to a fallback model (a model with
  another layout), so a predicted deadline miss is a 503 for them.

Output: ``probability`` FP32 ``[N]``. ``parameters`` of the response carry ``degraded`` and the
timing, as ``/v1/score`` has them.

The budget: ``parameters.timeout`` in **microseconds** (the unit of Triton's schedule-policy
extension, which standard clients send) and the ``X-Request-Timeout-Ms`` header; as for
``/v1/score`` they can only lower the server's ``default_timeout_ms``.

Binary tensor data extension: with the ``Inference-Header-Content-Length: L`` header the body's
first L bytes are the JSON request and the rest are the inputs whose parameters have
``binary_data_size`` (in the order of ``inputs``), each little-endian and row-major; a ``BYTES``
element is a 4-byte little-endian length followed by its bytes. Outputs come back binary when
the request asks (``outputs[i].parameters.binary_data`` or the request parameter
``binary_data_output``): the response then has ``Content-Type: application/octet-stream``, its
own ``Inference-Header-Content-Length`` and ``binary_data_size`` in the output's parameters.

Errors use HTTP 400 for a request that does not fit (as the protocol says), with the body
``{"error": "<message>", "reason": "<code>", "errors": [...]}``; 404 for an unknown model or
version; 503/504 as for ``/v1/score``.

Example:
    >>> t = decode_tensor({"name": "ad_cat0", "datatype": "BYTES", "shape": [2],
    ...                    "data": ["a", "b"]}, None)
    >>> t.name, t.shape, t.values.tolist()
    ('ad_cat0', (2,), ['a', 'b'])
    >>> raw = encode_bytes_elements(["ab", ""])
    >>> raw
    b'\\x02\\x00\\x00\\x00ab\\x00\\x00\\x00\\x00'
    >>> decode_tensor({"name": "x", "datatype": "BYTES", "shape": [2],
    ...                "parameters": {"binary_data_size": len(raw)}}, raw).values.tolist()
    ['ab', '']
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from export.meta import INPUT_NAMES, OUTPUT_NAME
from service.encode import RequestError
from service.errors import ServiceError
from service.models import Encode, ServedModel

HEADER_LENGTH = "inference-header-content-length"
# KServe v2 datatype -> little-endian numpy dtype (BYTES is handled apart)
DTYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}
INTEGER_TYPES = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
FLOAT_TYPES = {"FP16", "FP32", "FP64"}


def bad(message: str, field: str | None = None) -> ServiceError:
    """A 400 ``invalid_request`` naming the tensor."""
    return ServiceError(400, "invalid_request", message, field=field)


@dataclass
class Tensor:
    """One decoded input: name, datatype, shape and the flat values (row-major)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray  # BYTES: object array of str; else the datatype's numpy type


@dataclass
class InferRequest:
    """A parsed ``/infer`` request."""

    id: str | None
    parameters: dict[str, Any]
    inputs: list[Tensor]
    binary_output: bool
    timeout_ms: float | None


def encode_bytes_elements(items: list[str] | list[bytes]) -> bytes:
    """BYTES elements in the binary extension's layout: 4-byte LE length, then the bytes."""
    out = bytearray()
    for item in items:
        b = item.encode() if isinstance(item, str) else item
        out += struct.pack("<I", len(b)) + b
    return bytes(out)


def _decode_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """``count`` length-prefixed UTF-8 elements. Elements of one width (fixed-size ids) are
    cut from one decoded string; other ASCII data is sliced from one decoded string too;
    anything else is decoded element by element."""
    if count and len(raw) % count == 0 and len(raw) // count >= 4:
        width = len(raw) // count - 4
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(count, width + 4)
        if (rows[:, :4].copy().view("<u4") == width).all():
            text = rows[:, 4:].tobytes()
            if text.isascii():
                s = text.decode("ascii")
                return np.array([s[i:i + width] for i in range(0, len(s), width)] if width
                                else [""] * count, dtype=object)
    out: list[str] = []
    append, unpack = out.append, struct.unpack_from
    text = raw.decode("latin-1") if raw.isascii() else None  # a byte is a character
    pos, size = 0, len(raw)
    for _ in range(count):
        if pos + 4 > size:
            raise bad(f"{name}: binary BYTES data ends inside element {len(out)}", name)
        (n,) = unpack("<I", raw, pos)
        pos += 4
        if pos + n > size:
            raise bad(f"{name}: binary BYTES element {len(out)} runs past the data", name)
        if text is not None:
            append(text[pos:pos + n])
        else:
            try:
                append(raw[pos:pos + n].decode())
            except UnicodeDecodeError:
                raise bad(f"{name}: element {len(out)} is not UTF-8", name) from None
        pos += n
    if pos != size:
        raise bad(f"{name}: {size - pos} bytes left after {count} BYTES elements", name)
    return np.array(out, dtype=object)


def _flatten(data: Any) -> list[Any]:
    """Row-major flat list of (possibly nested) JSON data."""
    if not isinstance(data, list):
        return [data]
    if not any(isinstance(d, list) for d in data):
        return data
    out: list[Any] = []
    for d in data:
        out.extend(_flatten(d))
    return out


def _is_dim(d: Any) -> bool:
    """A non-negative integer, also when JSON wrote it as ``3.0``."""
    if isinstance(d, bool):
        return False
    return (isinstance(d, int) and d >= 0) or (isinstance(d, float) and d.is_integer()
                                                and d >= 0)


def decode_tensor(spec: Any, raw: bytes | None) -> Tensor:
    """A ``$request_input`` with its JSON ``data`` or its binary bytes ``raw``."""
    if not isinstance(spec, Mapping):
        raise bad("each input must be an object with name, datatype, shape and data")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise bad("an input has no name", "inputs")
    datatype, shape = spec.get("datatype"), spec.get("shape")
    if not isinstance(datatype, str) or (datatype != "BYTES" and datatype not in DTYPES):
        raise bad(f"{name}: unknown datatype {datatype!r}", name)
    if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
        raise bad(f"{name}: shape must be a list of non-negative integers, got {shape!r}",
                  name)
    shape = [int(d) for d in shape]  # 3.0 is an integer in JSON (and in its Schema)
    count = math.prod(shape)
    if raw is not None:
        if datatype == "BYTES":
            values = _decode_bytes(raw, count, name)
        else:
            dtype = np.dtype(DTYPES[datatype])
            if len(raw) != count * dtype.itemsize:
                raise bad(f"{name}: {len(raw)} bytes of binary data, shape {shape} of "
                          f"{datatype} needs {count * dtype.itemsize}", name)
            values = np.frombuffer(raw, dtype=dtype)
    else:
        if not isinstance(spec.get("data"), list):
            raise bad(f"{name}: data must be a list (or give parameters.binary_data_size)",
                      name)
        try:
            flat = _flatten(spec["data"])
        except RecursionError:
            raise bad(f"{name}: data is nested too deeply", name) from None
        if len(flat) != count:
            raise bad(f"{name}: {len(flat)} values for shape {shape}", name)
        values = _json_values(name, datatype, flat)
    return Tensor(name, datatype, tuple(shape), values)


def _json_values(name: str, datatype: str, flat: list[Any]) -> np.ndarray:
    if datatype == "BYTES":
        if not all(v is None or isinstance(v, str) for v in flat):
            raise bad(f"{name}: BYTES data must be strings (or null)", name)
        return np.array(["" if v is None else v for v in flat], dtype=object)
    if datatype in FLOAT_TYPES:
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                   for v in flat):
            raise bad(f"{name}: {datatype} data must be numbers (or null)", name)
        try:
            return np.array([math.nan if v is None else v for v in flat],
                            dtype=np.dtype(DTYPES[datatype]))
        except OverflowError:
            raise bad(f"{name}: a value does not fit {datatype}", name) from None
    if datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise bad(f"{name}: BOOL data must be true/false", name)
        return np.array(flat, dtype=bool)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise bad(f"{name}: {datatype} data must be integers", name)
    try:
        return np.array(flat, dtype=np.dtype(DTYPES[datatype]))
    except OverflowError:
        raise bad(f"{name}: a value does not fit {datatype}", name) from None


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    """The JSON part (the first ``header_length`` bytes, or all) and the binary inputs."""
    if header_length is not None:
        if (not (header_length.isascii() and header_length.isdigit())
                or len(header_length) > 12 or int(header_length) > len(body)):
            raise bad(f"Inference-Header-Content-Length {header_length!r} is not a length "
                      f"within the {len(body)}-byte body")
        split = int(header_length)
        head, binary = body[:split], body[split:]
    else:
        head, binary = body, b""
    try:
        obj = json.loads(head)
    except ValueError as e:
        raise bad(f"the request is not valid JSON: {e}", "body") from None
    except RecursionError:
        raise bad("the request's JSON is nested too deeply", "body") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("inputs"), list) or not obj["inputs"]:
        raise bad("the request must be an object with a non-empty inputs list", "inputs")
    params = _object(obj.get("parameters"), "parameters")
    rid = obj.get("id")
    if rid is not None and not isinstance(rid, str):
        raise bad(f"id must be a string, got {type(rid).__name__}", "id")
    tensors, pos, names = [], 0, set()
    for spec in obj["inputs"]:
        p = _object(spec.get("parameters"), "inputs.parameters") if isinstance(spec, dict) else {}
        size = p.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise bad(f"binary_data_size must be a non-negative integer, got {size!r}")
            if pos + size > len(binary):
                raise bad(f"binary data of {len(binary)} bytes is shorter than the inputs' "
                          "binary_data_size say")
            raw = binary[pos:pos + size]
            pos += size
        t = decode_tensor(spec, raw)
        if t.name in names:
            raise bad(f"input {t.name!r} is given twice", t.name)
        names.add(t.name)
        tensors.append(t)
    if pos != len(binary):
        raise bad(f"{len(binary) - pos} bytes of binary data are not claimed by any input")
    binary_output = _flag(params, "binary_data_output", False, "parameters")
    outputs = obj.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list):
            raise bad("outputs must be a list", "outputs")
        for out in outputs:
            if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
                raise bad(f"the only output is {OUTPUT_NAME!r}", "outputs")
            binary_output = _flag(_object(out.get("parameters"), "outputs.parameters"),
                                  "binary_data", binary_output, "outputs.parameters")
    timeout = params.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(
            timeout, (int, float)) or not timeout > 0 or not math.isfinite(timeout)):
        raise bad(f"parameters.timeout must be a positive number of microseconds, got "
                  f"{timeout!r}", "parameters.timeout")
    return InferRequest(id=rid, parameters=params,
                        inputs=tensors, binary_output=binary_output,
                        timeout_ms=None if timeout is None else float(timeout) / 1e3)


def _object(value: Any, where: str) -> dict[str, Any]:
    """A ``parameters`` object (absent or null: empty); 400 for anything else."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{where} must be an object, got {type(value).__name__}", where)
    return value


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A boolean parameter (absent: ``default``); 400 for anything but true/false/null."""
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{where}.{key} must be true or false, got {value!r}", f"{where}.{key}")
    return value


def rows_of(tensors: list[Tensor]) -> int:
    """N: the common length of the inputs that are not broadcast (length 1 broadcasts)."""
    n = 1
    for t in tensors:
        length = t.shape[0] if t.shape else 1
        if length != 1:
            if n not in (1, length):
                raise bad(f"{t.name}: {length} rows, other inputs have {n}", t.name)
            n = length
    return n


def encoded_inputs(model: ServedModel, tensors: list[Tensor]) -> tuple[int, Encode]:
    """(N, encode) for the encoded form (``cat_ids`` and ``dense``)."""
    by_name = {t.name: t for t in tensors}
    if set(by_name) != set(INPUT_NAMES):
        raise bad(f"give both {list(INPUT_NAMES)} or raw feature tensors, not a mix")
    cat_t, dense_t = by_name[INPUT_NAMES[0]], by_name[INPUT_NAMES[1]]
    f_cat, f_num = model.encoder.num_cat, model.encoder.num_dense
    for t, cols, kinds in ((cat_t, f_cat, INTEGER_TYPES), (dense_t, f_num, FLOAT_TYPES)):
        if t.datatype not in kinds:
            raise bad(f"{t.name}: datatype {t.datatype}, expected "
                      f"{'INT64' if t is cat_t else 'FP32'}", t.name)
        if len(t.shape) != 2 or t.shape[1] != cols:
            raise bad(f"{t.name}: shape {list(t.shape)}, expected [N, {cols}]", t.name)
    if cat_t.shape[0] != dense_t.shape[0]:
        raise bad(f"cat_ids has {cat_t.shape[0]} rows, dense {dense_t.shape[0]}", "dense")
    n = cat_t.shape[0]
    cat = cat_t.values.astype(np.int64).reshape(n, f_cat)
    dense = dense_t.values.astype(np.float32).reshape(n, f_num)
    cards = np.asarray(model.encoder.encoders.cardinalities, dtype=np.int64)
    if cat.size and ((cat < 0).any() or (cat >= cards).any()):
        j = int(np.argwhere((cat < 0) | (cat >= cards))[0][1])
        raise bad(f"cat_ids: column {j} holds an id outside [0, {cards[j]})", "cat_ids")
    if not np.isfinite(dense).all():
        raise bad("dense: values must be finite", "dense")

    def encode(target: ServedModel, strict: bool) -> tuple[np.ndarray, np.ndarray]:
        if target is not model:  # never: admission is told not to degrade encoded tensors
            raise RuntimeError("encoded tensors fit only their model")
        return cat, dense

    return n, encode


def raw_inputs(model: ServedModel, tensors: list[Tensor]) -> tuple[int, Encode]:
    """(N, encode) for raw feature tensors, checked against ``model``'s schema."""
    schema = model.encoder.encoders.schema
    fields = {f.name: f for f in schema.fields}
    for t in tensors:
        f = fields.get(t.name)
        if f is None:
            raise bad(f"{t.name}: not a feature of model {model.name!r} (features: "
                      f"{sorted(fields)})", t.name)
        if len(t.shape) > 2 or (len(t.shape) == 2 and t.shape[1] != 1):
            raise bad(f"{t.name}: shape {list(t.shape)}, expected [N] or [1]", t.name)
        if f.type == "categorical" and t.datatype not in INTEGER_TYPES | {"BYTES"}:
            raise bad(f"{t.name}: categorical, send BYTES or an integer type, not "
                      f"{t.datatype}", t.name)
        if f.type == "numeric":
            if t.datatype not in FLOAT_TYPES | INTEGER_TYPES:
                raise bad(f"{t.name}: numeric, send FP32/FP64 or an integer type, not "
                          f"{t.datatype}", t.name)
            if np.isinf(t.values.astype(np.float64)).any():
                raise bad(f"{t.name}: values must be finite (NaN is a missing value)", t.name)
    n = rows_of(tensors)
    scalars = {t.name: t.values.tolist()[0] for t in tensors if n > 1 and len(t.values) == 1}
    columns = {t.name: t.values for t in tensors if t.name not in scalars}

    def encode(target: ServedModel, strict: bool) -> tuple[np.ndarray, np.ndarray]:
        try:
            return target.encoder.encode_columns(scalars, columns, n, _tensor_name)
        except RequestError as e:  # e.g. a fallback that reads the field as a number
            raise bad(f"{e.field}: {e.reason} (model {target.name!r})", e.field) from None

    return n, encode


def _tensor_name(name: str, row: int | None) -> str:
    return name if row is None else f"{name}[{row}]"


def response_body(req: InferRequest, model: ServedModel, probs: np.ndarray,
                  parameters: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of the answer: JSON, or JSON + binary ``probability``."""
    out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [len(probs)]}
    raw = b""
    if req.binary_output:
        raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = probs.tolist()
    doc: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version),
                           "parameters": parameters, "outputs": [out]}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc).encode()
    if not req.binary_output:
        return head, {"Content-Type": "application/json"}
    return head + raw, {"Content-Type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(head))}

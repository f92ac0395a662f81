"""Feature encoders: raw field values → model inputs. numpy-only, shared by training and serving.

Encoders are fitted once on the training split, streamed chunk by chunk
(:class:`EncoderFitter`), and saved as JSON next to the checkpoint. The scoring service loads
the same JSON and calls the same :meth:`FeatureEncoders.transform`, so training and serving
cannot drift apart.

Encoded inputs:
  cat_ids  int64   (B, F_cat)  one id per categorical field, in [0, cardinality)
  dense    float32 (B, F_num)  standardised numeric fields

Categorical values are canonicalised before lookup: strings stay as they are; integers (and
floats holding an integer) become their decimal string, so ``3``, ``3.0`` and ``"3"`` are the
same category; ``None``, ``""`` and NaN are missing. Missing and out-of-vocabulary values map to
id 0. Hash encoding uses CRC-32 of ``"<field>\\x00<value>"`` (stable across processes and
machines, unlike Python's ``hash``).

Example:
    >>> from model.schema import FeatureSchema, FieldSpec
    >>> schema = FeatureSchema(fields=(
    ...     FieldSpec("ad", "categorical", min_count=1),
    ...     FieldSpec("price", "numeric", transform="none"),
    ... ))
    >>> fitter = EncoderFitter(schema)
    >>> fitter.update({"ad": np.array(["a", "b", "a", None], dtype=object),
    ...                "price": np.array([1.0, 2.0, 3.0, np.nan])})
    >>> enc = fitter.finish()
    >>> enc.cardinalities
    [3]
    >>> cat, dense = enc.transform({"ad": ["a", "zzz", None], "price": [2.0, None, 4.0]})
    >>> cat[:, 0].tolist()
    [1, 0, 0]
    >>> [round(float(v), 3) for v in dense[:, 0]]
    [0.0, 0.0, 1.225]
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from model.schema import FeatureSchema, FieldSpec, SchemaError

ENCODERS_FORMAT_VERSION = 1


def canonical_category(v: Any) -> str | None:
    """The string a raw categorical value is looked up by, or None when it is missing."""
    if v is None:
        return None
    if isinstance(v, str):
        return v if v else None
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return None
        if f.is_integer():
            return str(int(f))
        return repr(f)
    return str(v)


def _canonical_array(values: Sequence[Any] | np.ndarray) -> list[str | None]:
    """Canonical strings for a column; fast path for the readers' object arrays of str/None."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
        return [str(v) for v in values.tolist()]
    if not isinstance(values, np.ndarray) and set(map(type, values)) <= {str}:
        # all strings (the common case, checked at C speed): only "" needs mapping
        return [v or None for v in values] if "" in values else list(values)
    out = []
    for v in values.tolist() if isinstance(values, np.ndarray) else values:
        if v.__class__ is str:
            out.append(v if v else None)
        else:
            out.append(canonical_category(v))
    return out


def stable_hash(field: str, value: str) -> int:
    """CRC-32 of the field name and the value: the same on every machine and process."""
    return zlib.crc32(f"{field}\x00{value}".encode())


class CategoricalEncoder:
    """Maps one categorical field's values to ids in ``[0, cardinality)``; id 0 is OOV/missing.

    Lookups do not canonicalise value by value: a vocabulary's table also holds the ``int``
    and ``float`` forms of the entries that are their canonical strings (``"3"`` is found by
    ``3``, ``3.0`` and ``True``-for-``"1"`` alike, since Python's equal numbers hash alike),
    and hash ids are memoised per raw value (:data:`HASH_MEMO_SIZE` entries), so that a
    column of JSON scalars costs one dict lookup per value.
    """

    def __init__(self, spec: FieldSpec, vocab: Sequence[str] | None = None) -> None:
        if spec.type != "categorical":
            raise SchemaError(f"field {spec.name!r} is not categorical")
        self.spec = spec
        self._memo: dict[Any, int] = {}
        if spec.encoding == "vocab":
            self.vocab: list[str] = list(vocab or [])
            # one table: the vocabulary's strings, plus the int/float forms of the numeric ones
            self._lookup: dict[Any, int] = {v: i + 1 for i, v in enumerate(self.vocab)}
            self._lookup.update(_numeric_aliases(self._lookup))
            self.cardinality = len(self.vocab) + 1
        else:
            self.vocab = []
            self._lookup = self._memo
            assert spec.buckets is not None  # checked by FieldSpec
            self.cardinality = spec.buckets

    def id_of(self, value: Any) -> int:
        """The id of one raw value (str, int, float, bool or None)."""
        found = self._lookup.get(value)
        if found is not None:
            return found
        if self.spec.encoding == "vocab":
            return 0 if _is_plain(value) else self._lookup.get(canonical_category(value), 0)
        return self._hash_id(value)

    def _hash_id(self, value: Any) -> int:
        key = canonical_category(value)
        out = 0 if key is None else 1 + stable_hash(self.spec.name, key) % (self.cardinality - 1)
        if len(self._memo) >= HASH_MEMO_SIZE:
            self._memo.clear()
        if value.__class__ in _PLAIN_TYPES:
            self._memo[value] = out
        return out

    def transform(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Ids for a column of raw values, int64 of shape (len(values),)."""
        seq = values.tolist() if isinstance(values, np.ndarray) else values
        if set(map(type, seq)) <= _PLAIN_TYPES:
            return self.lookup(seq)
        return np.fromiter(map(self.id_of, seq), dtype=np.int64, count=len(seq))

    def lookup(self, values: Sequence[Any]) -> np.ndarray:
        """Ids for a column of JSON scalars (str, int, float, bool, None; the caller vouches
        for the types): one dict lookup per value."""
        n = len(values)
        if self.spec.encoding == "vocab":  # missing and unseen values -> 0
            return np.fromiter(map(self._lookup.get, values, repeat(0)), dtype=np.int64,
                               count=n)
        ids = list(map(self._memo.get, values))
        if None in ids:
            ids = [self._hash_id(v) if i is None else i for v, i in zip(values, ids, strict=True)]
        return np.array(ids, dtype=np.int64)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.spec.name, "cardinality": self.cardinality, "vocab": self.vocab}


HASH_MEMO_SIZE = 1 << 14  # memoised hash ids per field (cleared when full: a fraction of a ms)
_PLAIN_TYPES = {str, int, float, bool, type(None)}


def _is_plain(value: Any) -> bool:
    """True for the JSON scalar types, whose canonical forms the lookup table holds."""
    return value.__class__ in _PLAIN_TYPES


def _numeric_aliases(index: Mapping[Any, int]) -> dict[Any, int]:
    """``{3: id, 2.5: id}`` for the vocabulary strings that are the canonical form of a
    number (``str(int)`` for integers, ``repr(float)`` for other floats but NaN)."""
    out: dict[Any, int] = {}
    for v, i in index.items():
        if not isinstance(v, str) or not v or not (v[0].isdigit() or v[0] in "-i"):
            continue
        try:
            as_int = int(v)
        except ValueError:
            pass
        else:
            if str(as_int) == v:
                out[as_int] = i
            continue
        try:
            as_float = float(v)
        except ValueError:
            continue
        if as_float == as_float and not as_float.is_integer() and repr(as_float) == v:
            out[as_float] = i
    return out


class NumericEncoder:
    """Transforms, clips and standardises one numeric field; missing → the fitted default."""

    def __init__(
        self, spec: FieldSpec, lo: float, hi: float, mean: float, std: float, fill: float
    ) -> None:
        if spec.type != "numeric":
            raise SchemaError(f"field {spec.name!r} is not numeric")
        self.spec = spec
        self.lo, self.hi, self.mean, self.std, self.fill = lo, hi, mean, std, fill

    @staticmethod
    def apply_transform(kind: str, x: np.ndarray) -> np.ndarray:
        if kind == "log1p":
            return np.sign(x) * np.log1p(np.abs(x))
        return x

    def transform(self, values: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Standardised values, float32 of shape (len(values),). NaN/None are missing."""
        x = _as_float(values)[:, None]
        return standardise(x, np.array([self.spec.transform == "log1p"]), self.lo, self.hi,
                           self.mean, self.std, self.fill)[:, 0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "lo": self.lo,
            "hi": self.hi,
            "mean": self.mean,
            "std": self.std,
            "fill": self.fill,
        }


def _as_float(values: Sequence[Any] | np.ndarray) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return values.astype(np.float64, copy=False)
    if isinstance(values, np.ndarray) and values.dtype.kind in "iub":
        return values.astype(np.float64)
    seq = values.tolist() if isinstance(values, np.ndarray) else values
    return np.array([np.nan if v is None or v == "" else v for v in seq], dtype=np.float64)


def standardise(x: np.ndarray, log1p: np.ndarray, lo: Any, hi: Any, mean: Any, std: Any,
                fill: Any) -> np.ndarray:
    """Numeric fields' model inputs, float32: columns of ``x`` (float64, NaN = missing) get
    ``sign(x)·log1p(|x|)`` where ``log1p`` is True, are clipped to [lo, hi], take ``fill``
    where missing, and are standardised with ``mean`` and ``std`` (scalars or one value per
    column). The one formula of every numeric encoding, one field or many at a time."""
    missing = np.isnan(x)
    x0 = np.where(missing, 0.0, x)
    t = np.where(log1p, np.sign(x0) * np.log1p(np.abs(x0)), x0) if log1p.any() else x0
    t = np.where(missing, fill, np.clip(t, lo, hi))
    return ((t - mean) / std).astype(np.float32)


class FeatureEncoders:
    """All fitted encoders of a schema; :meth:`transform` builds the model's two input tensors."""

    def __init__(
        self,
        schema: FeatureSchema,
        categorical: Sequence[CategoricalEncoder],
        numeric: Sequence[NumericEncoder],
    ) -> None:
        self.schema = schema
        self.categorical = list(categorical)
        self.numeric = list(numeric)
        if [e.spec.name for e in self.categorical] != [f.name for f in schema.categorical]:
            raise SchemaError("categorical encoders do not match the schema's categorical fields")
        if [e.spec.name for e in self.numeric] != [f.name for f in schema.numeric]:
            raise SchemaError("numeric encoders do not match the schema's numeric fields")
        self._by_name: dict[str, CategoricalEncoder | NumericEncoder] = {
            e.spec.name: e for e in [*self.categorical, *self.numeric]
        }

    @property
    def cardinalities(self) -> list[int]:
        """Embedding table size per categorical field, in schema order."""
        return [e.cardinality for e in self.categorical]

    @property
    def num_dense(self) -> int:
        return len(self.numeric)

    def encoder(self, name: str) -> CategoricalEncoder | NumericEncoder:
        return self._by_name[name]

    def transform(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Encode a batch given column-wise raw values. Returns (cat_ids, dense).

        Every schema field must be present (a KeyError names the first one missing) and every
        column must have the same length.
        """
        n = None
        for f in self.schema.fields:
            if f.name not in columns:
                raise KeyError(f.name)
            m = len(columns[f.name])
            if n is None:
                n = m
            elif m != n:
                raise ValueError(f"column {f.name!r} has {m} values, expected {n}")
        n = n or 0
        cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, e in enumerate(self.categorical):
            cat[:, j] = e.transform(columns[e.spec.name])
        dense = np.empty((n, len(self.numeric)), dtype=np.float32)
        for j, e in enumerate(self.numeric):
            dense[:, j] = e.transform(columns[e.spec.name])
        return cat, dense

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": ENCODERS_FORMAT_VERSION,
            "schema": self.schema.to_dict(),
            "categorical": [e.to_dict() for e in self.categorical],
            "numeric": [e.to_dict() for e in self.numeric],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FeatureEncoders:
        try:
            if d.get("format_version") != ENCODERS_FORMAT_VERSION:
                raise SchemaError(
                    f"encoders format_version {d.get('format_version')!r} is not supported "
                    f"(expected {ENCODERS_FORMAT_VERSION})"
                )
            schema = FeatureSchema.from_dict(d["schema"])
            cats = []
            for spec, e in zip(schema.categorical, d["categorical"], strict=True):
                if e["name"] != spec.name:
                    raise SchemaError(f"encoder {e['name']!r} found where {spec.name!r} expected")
                enc = CategoricalEncoder(spec, e.get("vocab") or [])
                if enc.cardinality != e["cardinality"]:
                    raise SchemaError(
                        f"field {spec.name!r}: cardinality {e['cardinality']} disagrees with "
                        f"its vocabulary ({enc.cardinality})"
                    )
                cats.append(enc)
            nums = []
            for spec, e in zip(schema.numeric, d["numeric"], strict=True):
                if e["name"] != spec.name:
                    raise SchemaError(f"encoder {e['name']!r} found where {spec.name!r} expected")
                vals = [float(e[k]) for k in ("lo", "hi", "mean", "std", "fill")]
                if not all(math.isfinite(v) for v in vals) or vals[3] <= 0:
                    raise SchemaError(f"field {spec.name!r}: encoder statistics are not finite")
                nums.append(NumericEncoder(spec, *vals))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, SchemaError):
                raise
            raise SchemaError(f"malformed encoders: {type(e).__name__}: {e}") from None
        return cls(schema, cats, nums)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoders:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise SchemaError(f"cannot read encoders file {p}: {e}") from None
        return cls.from_dict(data)


class _NumericStats:
    """Streaming min/max/mean/variance of a transformed numeric column (Chan et al. merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def update(self, t: np.ndarray) -> None:
        if t.size == 0:
            return
        n_b = t.size
        mean_b = float(t.mean())
        m2_b = float(((t - mean_b) ** 2).sum())
        delta = mean_b - self.mean
        total = self.n + n_b
        self.mean += delta * n_b / total
        self.m2 += m2_b + delta * delta * self.n * n_b / total
        self.n = total
        self.lo = min(self.lo, float(t.min()))
        self.hi = max(self.hi, float(t.max()))


class EncoderFitter:
    """Fits :class:`FeatureEncoders` on a stream of column chunks, one pass, bounded memory.

    Memory is the vocabulary counts (one entry per distinct value of each vocab field) and a
    few numbers per numeric field, whatever the number of rows.
    """

    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.rows = 0
        self._counts: dict[str, Counter[str]] = {
            f.name: Counter() for f in schema.categorical if f.encoding == "vocab"
        }
        self._stats: dict[str, _NumericStats] = {f.name: _NumericStats() for f in schema.numeric}

    def update(
        self, columns: Mapping[str, Sequence[Any] | np.ndarray], mask: np.ndarray | None = None
    ) -> None:
        """Add a chunk; ``mask`` (bool, per row) selects the rows that count (the train split)."""
        for name, counter in self._counts.items():
            vals = np.asarray(columns[name], dtype=object)
            if mask is not None:
                vals = vals[mask]
            counter.update(k for k in _canonical_array(vals) if k is not None)
        for f in self.schema.numeric:
            x = _as_float(columns[f.name])
            if mask is not None:
                x = x[mask]
            x = x[np.isfinite(x)]
            self._stats[f.name].update(NumericEncoder.apply_transform(f.transform, x))
        if mask is None:
            first = self.schema.fields[0].name
            self.rows += len(columns[first])
        else:
            self.rows += int(mask.sum())

    def finish(self) -> FeatureEncoders:
        """The fitted encoders. Fields never seen get an empty vocabulary / neutral statistics."""
        cats = []
        for f in self.schema.categorical:
            if f.encoding == "hash":
                cats.append(CategoricalEncoder(f))
                continue
            items = [(v, c) for v, c in self._counts[f.name].items() if c >= f.min_count]
            items.sort(key=lambda vc: (-vc[1], vc[0]))
            if f.max_vocab is not None:
                items = items[: f.max_vocab]
            cats.append(CategoricalEncoder(f, [v for v, _ in items]))
        nums = []
        for f in self.schema.numeric:
            s = self._stats[f.name]
            if s.n == 0:
                lo, hi, mean, var = -1.0, 1.0, 0.0, 1.0
            else:
                lo, hi = s.lo, s.hi
                mean, var = s.mean, s.m2 / s.n
            if f.clip is not None:
                lo, hi = f.clip
            if hi <= lo:
                hi = lo + 1.0
            std = math.sqrt(var) if var > 1e-12 else 1.0
            if f.default is not None:
                fill = float(
                    np.clip(NumericEncoder.apply_transform(f.transform, np.float64(f.default)),
                            lo, hi)
                )
            else:
                fill = float(np.clip(mean, lo, hi))
            nums.append(NumericEncoder(f, lo, hi, mean, std, fill))
        return FeatureEncoders(self.schema, cats, nums)

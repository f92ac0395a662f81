"""Request → model inputs, with the exported encoders (the training code's own, numpy-only).

User and context features are encoded once per request and broadcast to every candidate row;
candidate features are encoded column by column: a categorical column is one dict lookup per
value (:meth:`model.encoders.CategoricalEncoder.transform`), all numeric columns of a side are
one vectorised :func:`model.encoders.standardise`. Columnar candidates (``{field: [values...]}``)
are used as they are; row candidates (a list of objects) are first turned into columns. A field
the request leaves out is missing (id 0 for categorical fields, the fitted default for numeric
ones), exactly as in training.

Problems are :class:`RequestError` (→ 422) naming the field: a name the model does not know on
that side, a string or boolean where a number is expected, columns of different lengths.

Example:
    >>> from model.encoders import EncoderFitter
    >>> from model.schema import FeatureSchema, FieldSpec
    >>> schema = FeatureSchema(fields=(
    ...     FieldSpec("user_id", "categorical", side="user"),
    ...     FieldSpec("ad_id", "categorical", side="candidate"),
    ...     FieldSpec("price", "numeric", side="candidate", transform="none"),
    ... ))
    >>> fitter = EncoderFitter(schema)
    >>> fitter.update({"user_id": ["u1", "u2"], "ad_id": ["a", "b"], "price": [1.0, 3.0]})
    >>> enc = RequestEncoder(fitter.finish())
    >>> cat, dense = enc.encode({"user_id": "u2"}, {}, {"ad_id": ["b", "zz"], "price": [3.0, None]})
    >>> cat.tolist(), dense.ravel().tolist()
    ([[2, 2], [2, 0]], [1.0, 0.0])
    >>> enc.encode({"ad_id": "a"}, {}, [{"price": 1.0}])
    Traceback (most recent call last):
    ...
    service.encode.RequestError: user.ad_id: not a user feature of this model (a candidate feature)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.encoders import CategoricalEncoder, FeatureEncoders, standardise

_NUMERIC_TYPES = {int, float, type(None)}
Where = Callable[[str, int | None], str]  # (field, row or None) -> dotted path for errors


class RequestError(ValueError):
    """A request that does not fit the model's features; ``field`` is a dotted path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True)
class _Numeric:
    """The numeric fields of one group (a side), encoded together."""

    names: tuple[str, ...]
    columns: np.ndarray  # their columns in ``dense``
    log1p: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    fill: np.ndarray

    def encode(self, x: np.ndarray) -> np.ndarray:
        return standardise(x, self.log1p, self.lo, self.hi, self.mean, self.std, self.fill)

    def encode_row(self, row: list[float]) -> list[float]:
        """:meth:`encode` of one row (NaN: missing), as Python floats: the same float64
        arithmetic (numpy's own ``log1p``, then exact IEEE operations), without a dozen
        numpy calls on a one-row array."""
        logs = np.log1p(np.abs(np.array(row))).tolist() if self.any_log else row
        out = []
        for k, v in enumerate(row):
            if v != v:  # missing
                t = self.fill_list[k]
            else:
                if self.log_list[k]:
                    t = (1.0 if v > 0 else -1.0 if v < 0 else 0.0) * logs[k]
                else:
                    t = v
                lo, hi = self.lo_list[k], self.hi_list[k]
                t = lo if t < lo else hi if t > hi else t
            out.append((t - self.mean_list[k]) / self.std_list[k])
        return out

    def __post_init__(self) -> None:
        for name in ("log1p", "lo", "hi", "mean", "std", "fill"):
            key = "log_list" if name == "log1p" else f"{name}_list"
            object.__setattr__(self, key, getattr(self, name).tolist())
        object.__setattr__(self, "any_log", bool(self.log1p.any()))


@dataclass(frozen=True)
class _Group:
    """The fields of one side: (name, ``cat_ids`` column, encoder) and the numeric block."""

    categorical: tuple[tuple[str, int, CategoricalEncoder], ...]
    cat_columns: np.ndarray
    numeric: _Numeric
    names: frozenset[str]


class RequestEncoder:
    """Encodes score requests for one model's :class:`FeatureEncoders`.

    Args:
        encoders: the model's fitted encoders (``model.json``'s ``encoders``).
    """

    def __init__(self, encoders: FeatureEncoders) -> None:
        self.encoders = encoders
        schema = encoders.schema
        self.num_cat = len(schema.categorical)
        self.num_dense = len(schema.numeric)
        self.side: dict[str, str] = {f.name: f.side for f in schema.fields}
        self._groups = {side: self._group({side}) for side in ("user", "context", "candidate")}
        self._broadcast = self._group({"user", "context"})
        self._all = self._group({"user", "context", "candidate"})
        self.candidate_fields = self._groups["candidate"].names

    def _group(self, sides: set[str]) -> _Group:
        enc, schema = self.encoders, self.encoders.schema
        cats = tuple((f.name, j, enc.categorical[j]) for j, f in enumerate(schema.categorical)
                     if f.side in sides)
        nums = [(j, enc.numeric[j]) for j, f in enumerate(schema.numeric) if f.side in sides]

        def vec(attr: str) -> np.ndarray:
            return np.array([getattr(e, attr) for _, e in nums], dtype=np.float64)

        numeric = _Numeric(
            names=tuple(e.spec.name for _, e in nums),
            columns=np.array([j for j, _ in nums], dtype=np.intp),
            log1p=np.array([e.spec.transform == "log1p" for _, e in nums], dtype=bool),
            lo=vec("lo"), hi=vec("hi"), mean=vec("mean"), std=vec("std"), fill=vec("fill"))
        return _Group(cats, np.array([j for _, j, _ in cats], dtype=np.intp), numeric,
                      frozenset(n for n, _, _ in cats) | frozenset(numeric.names))

    # -- names ---------------------------------------------------------------------------------
    def _check_side(self, side: str, names: Any, where: str) -> None:
        if self._groups[side].names.issuperset(names):
            return
        for name in names:
            if self.side.get(name) != side:
                other = self.side.get(name)
                why = f"a {other} feature" if other else "unknown field"
                raise RequestError(f"{where}.{name}", f"not a {side} feature of this model ({why})")

    def check_names(
        self,
        user: Mapping[str, Any],
        context: Mapping[str, Any],
        candidates: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
    ) -> None:
        """RequestError if a field is not one of the model's on the side it was sent on."""
        self._check_side("user", user, "user")
        self._check_side("context", context, "context")
        if isinstance(candidates, Mapping):
            self._check_side("candidate", candidates, "candidates")
        else:
            names = self.candidate_fields
            for i, row in enumerate(candidates):
                if not names.issuperset(row):
                    self._check_side("candidate", row, f"candidates[{i}]")

    # -- encoding ------------------------------------------------------------------------------
    def encode(
        self,
        user: Mapping[str, Any],
        context: Mapping[str, Any],
        candidates: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
        strict: bool = True,
        plain: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cat_ids int64 (N, F_cat), dense float32 (N, F_num)) for N candidates.

        ``strict`` rejects fields the model does not read on that side; a fallback model
        encoding a request validated for another model passes False and ignores them.
        ``plain`` vouches that every value is a JSON scalar (str, int, float, bool or None),
        as a validated request body's are: categorical columns then skip the type check.
        """
        if strict:
            self.check_names(user, context, candidates)
        if isinstance(candidates, Mapping):
            n = _column_length(candidates)
            columns: Mapping[str, Sequence[Any]] = candidates
            where: Where = _columnar_path
        else:
            n = len(candidates)
            columns = {name: [row.get(name) for row in candidates]
                       for name in self.candidate_fields}
            where = _row_path
        cat = np.empty((n, self.num_cat), dtype=np.int64)
        dense = np.empty((n, self.num_dense), dtype=np.float32)
        scalars = {**context, **user} if context else user
        self._fill_broadcast(cat, dense, scalars, self._broadcast,
                             lambda name, _: f"{self.side[name]}.{name}")
        self._fill_columns(cat, dense, columns, self._groups["candidate"], n, where, plain=plain)
        return cat, dense

    def encode_columns(self, scalars: Mapping[str, Any],
                       columns: Mapping[str, Sequence[Any] | np.ndarray], n: int,
                       where: Where) -> tuple[np.ndarray, np.ndarray]:
        """The model inputs of ``n`` rows from fields given once (``scalars``, broadcast)
        or per row (``columns``), whatever their side (the tensors of ``/v2`` infer).
        Fields in neither are missing; names the model does not read are ignored."""
        cat = np.empty((n, self.num_cat), dtype=np.int64)
        dense = np.empty((n, self.num_dense), dtype=np.float32)
        self._fill_broadcast(cat, dense, scalars, self._all, where)
        self._fill_columns(cat, dense, columns, self._all, n, where, skip=scalars)
        return cat, dense

    def _fill_broadcast(self, cat: np.ndarray, dense: np.ndarray, values: Mapping[str, Any],
                        group: _Group, where: Where) -> None:
        """Fields given once: each encoded once, then written to every row."""
        if group.categorical:
            ids = [enc.id_of(values.get(name)) for name, _, enc in group.categorical]
            cat[:, group.cat_columns] = ids
        num = group.numeric
        if num.names:
            row = [values.get(name) for name in num.names]
            if not set(map(type, row)) <= _NUMERIC_TYPES:
                i = next(i for i, v in enumerate(row) if type(v) not in _NUMERIC_TYPES)
                raise _not_a_number(where(num.names[i], None), row[i])
            try:
                x = [math.nan if v is None else float(v) for v in row]
            except OverflowError:
                i = next(i for i, v in enumerate(row) if _too_large(v))
                raise _out_of_range(where(num.names[i], None)) from None
            dense[:, num.columns] = num.encode_row(x)

    def _fill_columns(self, cat: np.ndarray, dense: np.ndarray,
                      columns: Mapping[str, Sequence[Any] | np.ndarray], group: _Group, n: int,
                      where: Where, skip: Mapping[str, Any] | None = None,
                      plain: bool = False) -> None:
        """Fields given per row; a field left out is missing in every row."""
        for name, j, enc in group.categorical:
            if skip is not None and name in skip:
                continue
            col = columns.get(name)
            if col is None:
                cat[:, j] = 0
            else:
                cat[:, j] = enc.lookup(col) if plain else enc.transform(col)
        num = group.numeric
        picked = [k for k, name in enumerate(num.names) if skip is None or name not in skip]
        if not picked:
            return
        x = np.full((n, len(picked)), np.nan)
        for out, k in enumerate(picked):
            col = columns.get(num.names[k])
            if col is None:
                continue
            if isinstance(col, np.ndarray) and col.dtype.kind in "fiu":
                x[:, out] = col
                continue
            if not set(map(type, col)) <= _NUMERIC_TYPES:
                i = next(i for i, v in enumerate(col) if type(v) not in _NUMERIC_TYPES)
                raise _not_a_number(where(num.names[k], i), col[i])
            try:
                x[:, out] = col
            except OverflowError:
                i = next(i for i, v in enumerate(col) if _too_large(v))
                raise _out_of_range(where(num.names[k], i)) from None
        if len(picked) == len(num.names):
            dense[:, num.columns] = num.encode(x)
        else:
            sub = np.array(picked, dtype=np.intp)
            block = _Numeric(tuple(num.names[k] for k in picked), num.columns[sub],
                             num.log1p[sub], num.lo[sub], num.hi[sub], num.mean[sub],
                             num.std[sub], num.fill[sub])
            dense[:, block.columns] = block.encode(x)


def _column_length(columns: Mapping[str, Sequence[Any]]) -> int:
    """The common length of columnar candidates; RequestError naming a ragged column."""
    lengths = set(map(len, columns.values()))
    if len(lengths) <= 1:
        return lengths.pop() if lengths else 0
    n = -1
    for name, col in columns.items():
        if n < 0:
            n = len(col)
        elif len(col) != n:
            raise RequestError(f"candidates.{name}",
                               f"has {len(col)} values, other columns have {n}")
    raise AssertionError("unreachable")


def _columnar_path(name: str, i: int | None) -> str:
    return f"candidates.{name}" if i is None else f"candidates.{name}[{i}]"


def _row_path(name: str, i: int | None) -> str:
    return f"candidates.{name}" if i is None else f"candidates[{i}].{name}"


def _too_large(v: Any) -> bool:
    try:
        float(v)
    except OverflowError:
        return True
    except (TypeError, ValueError):
        pass
    return False


def _out_of_range(field: str) -> RequestError:
    return RequestError(field, "is too large for a number (at most about 1.8e308)")


def _not_a_number(field: str, v: Any) -> RequestError:
    return RequestError(field, f"must be a number or null, got {type(v).__name__} {_short(v)}")


def _short(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."

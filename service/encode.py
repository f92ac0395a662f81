"""Request → model inputs, with the exported encoders (the training code's own, numpy-only).

User and context features are encoded once per request and broadcast to every candidate row;
candidate features are encoded column by column, vectorised over the candidates. Columnar
candidates (``{field: [values...]}``) are used as they are; row candidates (a list of objects)
are first turned into columns. A field the request leaves out is missing (id 0 for categorical
fields, the fitted default for numeric ones), exactly as in training.

Problems are :class:`RequestError` (→ 422) naming the field: a name the model does not know on
that side, a string where a number is expected, columns of different lengths.

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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from model.encoders import FeatureEncoders

_NUMERIC_TYPES = (int, float, type(None))


class RequestError(ValueError):
    """A request that does not fit the model's features; ``field`` is a dotted path."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


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
        # (name, is_categorical, column index, encoder) per side, in schema order
        self._fields: dict[str, list[tuple[str, bool, int, Any]]] = {
            "user": [], "context": [], "candidate": []
        }
        for j, f in enumerate(schema.categorical):
            self._fields[f.side].append((f.name, True, j, encoders.encoder(f.name)))
        for j, f in enumerate(schema.numeric):
            self._fields[f.side].append((f.name, False, j, encoders.encoder(f.name)))
        self.candidate_fields = frozenset(n for n, *_ in self._fields["candidate"])

    def _check_names(self, side: str, names: Any, where: str, strict: bool) -> None:
        if not strict:
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
        self._check_names("user", user, "user", True)
        self._check_names("context", context, "context", True)
        if isinstance(candidates, Mapping):
            self._check_names("candidate", candidates, "candidates", True)
        else:
            for i, row in enumerate(candidates):
                if not self.candidate_fields.issuperset(row):
                    self._check_names("candidate", row, f"candidates[{i}]", True)

    @staticmethod
    def _numeric(values: Sequence[Any], where: Callable[[int], str]) -> np.ndarray:
        """Raw numeric values as float64 (None → NaN, i.e. missing); strings and booleans fail.

        ``where(i)`` names the field of position ``i`` in error messages.
        """
        if not set(map(type, values)).issubset(_NUMERIC_TYPES):
            i, v = next((i, v) for i, v in enumerate(values) if type(v) not in _NUMERIC_TYPES)
            raise RequestError(where(i),
                               f"must be a number or null, got {type(v).__name__} {_short(v)}")
        return np.array(values, dtype=np.float64)

    def encode(
        self,
        user: Mapping[str, Any],
        context: Mapping[str, Any],
        candidates: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
        strict: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(cat_ids int64 (N, F_cat), dense float32 (N, F_num)) for N candidates.

        ``strict`` rejects fields the model does not read on that side; a fallback model
        encoding a request validated for another model passes False and ignores them.
        """
        self._check_names("user", user, "user", strict)
        self._check_names("context", context, "context", strict)
        columnar = isinstance(candidates, Mapping)
        if columnar:
            self._check_names("candidate", candidates, "candidates", strict)
            n = -1
            for name, col in candidates.items():
                if n < 0:
                    n = len(col)
                elif len(col) != n:
                    raise RequestError(f"candidates.{name}",
                                       f"has {len(col)} values, other columns have {n}")
            n = max(n, 0)
        else:
            n = len(candidates)
            if strict:
                fields = self.candidate_fields
                for i, row in enumerate(candidates):
                    if not fields.issuperset(row):
                        self._check_names("candidate", row, f"candidates[{i}]", strict)
        cat = np.empty((n, self.num_cat), dtype=np.int64)
        dense = np.empty((n, self.num_dense), dtype=np.float32)
        for side, values in (("user", user), ("context", context)):
            for name, is_cat, j, enc in self._fields[side]:
                v = values.get(name)
                if is_cat:
                    cat[:, j] = enc.transform([v])[0]
                else:
                    x = self._numeric([v], lambda _, p=f"{side}.{name}": p)
                    dense[:, j] = enc.transform(x)[0]
        for name, is_cat, j, enc in self._fields["candidate"]:
            if columnar:
                col = candidates.get(name)  # type: ignore[union-attr]
                where = lambda i, name=name: f"candidates.{name}[{i}]"  # noqa: E731
                if col is None:
                    col = [None] * n
            else:
                col = [row.get(name) for row in candidates]  # type: ignore[union-attr]
                where = lambda i, name=name: f"candidates[{i}].{name}"  # noqa: E731
            if is_cat:
                cat[:, j] = enc.transform(col)
            else:
                dense[:, j] = enc.transform(self._numeric(col, where))
        return cat, dense


def _short(v: Any, limit: int = 40) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."

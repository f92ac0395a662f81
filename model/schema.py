"""Feature schema: which fields a model reads, where they come from and how they are encoded.

The schema is plain data (JSON, or YAML when PyYAML is installed) and numpy-free, so the
training code, the exporter and the scoring service all read the same file. Example::

    {
      "label": "click",
      "time_column": null,
      "fields": [
        {"name": "user_age", "type": "numeric", "side": "user", "transform": "log1p"},
        {"name": "site_id", "type": "categorical", "side": "context", "encoding": "vocab",
         "min_count": 2},
        {"name": "ad_id", "type": "categorical", "side": "candidate", "encoding": "hash",
         "buckets": 100000}
      ]
    }

Field keys:
  name       column name in the data and key in requests.
  type       "categorical" or "numeric".
  side       "user", "context" (both sent once per request) or "candidate" (one per ad).
  categorical:
    encoding   "vocab" (ids fitted on the training split; values seen fewer than ``min_count``
               times, unseen values and missing values share id 0, the OOV bucket) or "hash"
               (id = 1 + hash(value) mod (buckets - 1); id 0 is missing).
    min_count  vocab only, default 1.
    max_vocab  vocab only, optional cap: keep the most frequent values.
    buckets    hash only, the number of ids including the missing id 0.
  numeric:
    transform  "log1p" (sign(x)·log(1 + |x|)), "none"; default "log1p".
    clip       [lo, hi] after the transform; default: the range seen in training.
    default    raw value used when missing; default: the training mean (after transform).

Numeric values are finally standardised with the training mean and standard deviation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.errors import InputError

FieldType = Literal["categorical", "numeric"]
Side = Literal["user", "context", "candidate"]

FIELD_TYPES: tuple[str, ...] = ("categorical", "numeric")
SIDES: tuple[str, ...] = ("user", "context", "candidate")
ENCODINGS: tuple[str, ...] = ("vocab", "hash")
TRANSFORMS: tuple[str, ...] = ("log1p", "none")


class SchemaError(InputError):
    """A schema file or dictionary that does not describe a valid feature set."""


@dataclass(frozen=True)
class FieldSpec:
    """One input field. See the module docstring for the meaning of each key."""

    name: str
    type: FieldType
    side: Side = "candidate"
    encoding: str = "vocab"
    min_count: int = 1
    max_vocab: int | None = None
    buckets: int | None = None
    transform: str = "log1p"
    clip: tuple[float, float] | None = None
    default: float | None = None

    def __post_init__(self) -> None:
        where = f"field {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"{where}: 'name' must be a non-empty string")
        if self.type not in FIELD_TYPES:
            raise SchemaError(f"{where}: 'type' must be one of {FIELD_TYPES}, got {self.type!r}")
        if self.side not in SIDES:
            raise SchemaError(f"{where}: 'side' must be one of {SIDES}, got {self.side!r}")
        if self.type == "categorical":
            if self.encoding not in ENCODINGS:
                raise SchemaError(
                    f"{where}: 'encoding' must be one of {ENCODINGS}, got {self.encoding!r}"
                )
            if self.encoding == "hash" and (not isinstance(self.buckets, int) or self.buckets < 2):
                raise SchemaError(f"{where}: hash encoding needs 'buckets' >= 2")
            if not isinstance(self.min_count, int) or self.min_count < 1:
                raise SchemaError(f"{where}: 'min_count' must be an integer >= 1")
            if self.max_vocab is not None and (
                not isinstance(self.max_vocab, int) or self.max_vocab < 1
            ):
                raise SchemaError(f"{where}: 'max_vocab' must be an integer >= 1")
        else:
            if self.transform not in TRANSFORMS:
                raise SchemaError(
                    f"{where}: 'transform' must be one of {TRANSFORMS}, got {self.transform!r}"
                )
            if self.clip is not None:
                lo, hi = self.clip
                if not lo < hi:
                    raise SchemaError(f"{where}: 'clip' must be [lo, hi] with lo < hi")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FieldSpec:
        if not isinstance(d, dict):
            raise SchemaError(f"each field must be an object, got {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise SchemaError(f"field {d.get('name')!r}: unknown keys {sorted(unknown)}")
        missing = {"name", "type"} - set(d)
        if missing:
            raise SchemaError(f"field {d.get('name')!r}: missing keys {sorted(missing)}")
        kw = dict(d)
        if kw.get("clip") is not None:
            clip = kw["clip"]
            if not isinstance(clip, (list, tuple)) or len(clip) != 2:
                raise SchemaError(f"field {d['name']!r}: 'clip' must be a list [lo, hi]")
            kw["clip"] = (float(clip[0]), float(clip[1]))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.type == "categorical":
            for k in ("transform", "clip", "default"):
                d.pop(k)
            if self.encoding == "vocab":
                d.pop("buckets")
            else:
                d.pop("min_count")
                d.pop("max_vocab")
        else:
            for k in ("encoding", "min_count", "max_vocab", "buckets"):
                d.pop(k)
            if d["clip"] is not None:
                d["clip"] = list(d["clip"])
        return d


@dataclass(frozen=True)
class FeatureSchema:
    """The ordered list of input fields plus the label (and optional time) column."""

    fields: tuple[FieldSpec, ...]
    label: str = "label"
    time_column: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fields:
            raise SchemaError("schema has no fields")
        names = [f.name for f in self.fields]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SchemaError(f"duplicate field names: {dup}")
        if self.label in names:
            raise SchemaError(f"label column {self.label!r} is also listed as a field")

    @property
    def categorical(self) -> tuple[FieldSpec, ...]:
        """Categorical fields in schema order: column j of the encoded id matrix."""
        return tuple(f for f in self.fields if f.type == "categorical")

    @property
    def numeric(self) -> tuple[FieldSpec, ...]:
        """Numeric fields in schema order: column j of the encoded dense matrix."""
        return tuple(f for f in self.fields if f.type == "numeric")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> FieldSpec:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def fields_on(self, sides: Iterable[str]) -> tuple[FieldSpec, ...]:
        wanted = set(sides)
        return tuple(f for f in self.fields if f.side in wanted)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSchema:
        if not isinstance(d, dict):
            raise SchemaError("a schema must be an object with a 'fields' list")
        unknown = set(d) - {"fields", "label", "time_column", "extra"}
        if unknown:
            raise SchemaError(f"schema: unknown keys {sorted(unknown)}")
        fields = d.get("fields")
        if not isinstance(fields, list):
            raise SchemaError("schema: 'fields' must be a list")
        return cls(
            fields=tuple(FieldSpec.from_dict(f) for f in fields),
            label=d.get("label", "label"),
            time_column=d.get("time_column"),
            extra=dict(d.get("extra") or {}),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "time_column": self.time_column,
            "fields": [f.to_dict() for f in self.fields],
            "extra": dict(self.extra),
        }

    @classmethod
    def load(cls, path: str | Path) -> FeatureSchema:
        """Read a schema from a .json, .yaml or .yml file."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise SchemaError(f"cannot read schema file {p}: {e.strerror or e}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # optional dependency, only for YAML schemas

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as e:
            raise SchemaError(f"schema file {p} is not valid: {e}") from None
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise SchemaError(f"schema file {p}: {e}") from None
        except SchemaError as e:
            raise SchemaError(f"schema file {p}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

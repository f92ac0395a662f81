"""Config files: overrides of a preset's model settings and of the training settings.

``mldcn tune`` writes one per architecture, and ``mldcn train --config`` and
``mldcn bench quality --config`` read them. A file is a JSON object::

    {"arch": "dcnv2",                       # optional: the architecture it is for
     "model": {"dropout": 0.2, "embedding_l2": 0.01, "batch_norm": true},
     "train": {"lr": 0.002, "batch_size": 2048}}

``model`` holds ``ModelConfig`` fields, passed to the preset as overrides (so the FLOPs
matching still applies: keys that change FLOPs change what is solved, see
``model.presets``); ``train`` holds the ``TrainConfig`` fields of :data:`TRAIN_KEYS`. Any
other key of the object (``level``, ``valid_auc``, ``trials``, ...) is a record and ignored.
A file without ``arch`` applies to every architecture; with one, to that architecture only.

Example:
    >>> o = Overrides.from_dict({"arch": "mldcn", "model": {"dropout": 0.2},
    ...                          "train": {"lr": 0.002}})
    >>> o.applies_to("mldcn"), o.applies_to("dcnv2"), o.model, o.train
    (True, False, {'dropout': 0.2}, {'lr': 0.002})
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.config import ARCHS, ModelConfig
from model.errors import InputError

# the TrainConfig fields a config file may set (the rest describe the run, not the recipe)
TRAIN_KEYS: tuple[str, ...] = ("batch_size", "lr", "weight_decay", "lr_patience",
                               "early_stop_patience", "epochs", "calibrate")


class OverridesError(InputError):
    """A config file that does not parse or names unknown settings."""


@dataclass(frozen=True)
class Overrides:
    """One config file's overrides (see the module docstring)."""

    arch: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def applies_to(self, arch: str) -> bool:
        """True when this file is for ``arch`` (or for every architecture)."""
        return self.arch is None or self.arch == arch

    @classmethod
    def from_dict(cls, d: Any, source: str = "") -> Overrides:
        """Check and build; OverridesError names the file and the key at fault."""
        where = f"{source}: " if source else ""
        if not isinstance(d, dict):
            raise OverridesError(f"{where}a config file holds a JSON object")
        arch = d.get("arch")
        if arch is not None and arch not in ARCHS:
            raise OverridesError(f"{where}arch must be one of {ARCHS}, got {arch!r}")
        model, train = d.get("model", {}), d.get("train", {})
        if not isinstance(model, dict) or not isinstance(train, dict):
            raise OverridesError(f"{where}'model' and 'train' must be JSON objects")
        known = {f.name for f in fields(ModelConfig)} - {"arch"}
        bad = sorted(set(model) - known)
        if bad:
            raise OverridesError(f"{where}unknown model settings {bad}")
        bad = sorted(set(train) - set(TRAIN_KEYS))
        if bad:
            raise OverridesError(f"{where}unknown training settings {bad}; a config file may "
                                 f"set {list(TRAIN_KEYS)}")
        return cls(arch, dict(model), dict(train), source)

    @classmethod
    def load(cls, path: str | Path) -> Overrides:
        """Read a config file."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise OverridesError(f"{p}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise OverridesError(f"{p}: not valid JSON: {e}") from None
        return cls.from_dict(d, str(p))


def for_arch(files: Sequence[Overrides], arch: str) -> Overrides:
    """The overrides that apply to ``arch``: the files in order, later keys win.

    Example:
        >>> a = Overrides.from_dict({"model": {"dropout": 0.1}, "train": {"lr": 0.01}})
        >>> b = Overrides.from_dict({"arch": "dcnv2", "model": {"dropout": 0.3}})
        >>> for_arch([a, b], "dcnv2").model, for_arch([a, b], "mldcn").model
        ({'dropout': 0.3}, {'dropout': 0.1})
    """
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    for o in files:
        if o.applies_to(arch):
            model.update(o.model)
            train.update(o.train)
    return Overrides(arch, model, train, ", ".join(o.source for o in files if o.applies_to(arch)))

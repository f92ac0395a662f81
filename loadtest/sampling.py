"""Realistic ``POST /v1/score`` bodies drawn from an exported model's ``model.json``.

Any exported model works: the feature schema says which fields exist and on which side they
are sent (``user`` and ``context`` once per request, ``candidate`` per ad), and the fitted
encoders say what values the training data held:

- categorical vocab fields: a value of the vocabulary (ordered by training frequency, so ranks
  are drawn from a Zipf law with exponent ``zipf_s``), or with probability ``oov_share`` a value
  the model never saw (the out-of-vocabulary bucket);
- categorical hash fields: ``<field>-<k>`` with a Zipf-distributed ``k``;
- numeric fields: a normal draw with the fitted mean and standard deviation of the transformed
  value, clipped to the fitted range and mapped back to raw space (``log1p`` inverted); with
  probability ``oov_share`` the value is missing (``null``).

Candidate counts per request are log-normal (heavy-tailed) with the given median, clipped to
``[1, max_candidates]``; the default (median 300, sigma 0.8) puts p99 near 1,900.

Example:
    >>> sizes = CandidateCounts(median=300, sigma=0.8, max_candidates=2000)
    >>> n = sizes.sample(np.random.default_rng(0), 10_000)
    >>> 250 < float(np.median(n)) < 350, int(n.min()) >= 1, int(n.max()) <= 2000
    (True, True, True)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

OOV_PREFIX = "__loadtest_oov_"


@dataclass(frozen=True)
class CandidateCounts:
    """Log-normal candidate counts: ``round(median * exp(sigma * Z))`` clipped to [1, max]."""

    median: float = 300.0
    sigma: float = 0.8
    max_candidates: int = 2000

    def __post_init__(self) -> None:
        if not self.median >= 1:
            raise ValueError(f"median candidates must be >= 1, got {self.median}")
        if not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {self.max_candidates}")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` candidate counts, int64."""
        z = rng.standard_normal(size)
        n = np.rint(self.median * np.exp(self.sigma * z))
        return np.clip(n, 1, self.max_candidates).astype(np.int64)


def _zipf_ranks(rng: np.random.Generator, n_values: int, size: int, s: float) -> np.ndarray:
    """Ranks in ``[0, n_values)`` with P(rank k) proportional to 1 / (k + 1) ** s."""
    w = 1.0 / np.arange(1, n_values + 1, dtype=np.float64) ** s
    return rng.choice(n_values, size=size, p=w / w.sum())


def invert_transform(kind: str, t: np.ndarray) -> np.ndarray:
    """Raw values whose transform (``log1p``: sign(x)·log1p(|x|), or ``none``) is ``t``.

    Example:
        >>> invert_transform("log1p", np.array([0.0, np.log(2.0), -np.log(11.0)])).round(6)
        array([  0.,   1., -10.])
    """
    if kind == "log1p":
        return np.sign(t) * np.expm1(np.abs(t))
    if kind == "none":
        return t
    raise ValueError(f"unknown numeric transform {kind!r}")


class RequestSampler:
    """Draws /v1/score bodies for one model from its fitted encoders (``ModelMeta.encoders``,
    the feature schema included)."""

    def __init__(self, encoders: Mapping[str, Any], counts: CandidateCounts | None = None,
                 oov_share: float = 0.02, zipf_s: float = 1.1, hash_values: int = 10_000,
                 model: str | None = None) -> None:
        if not 0.0 <= oov_share < 1.0:
            raise ValueError(f"oov_share must be in [0, 1), got {oov_share}")
        try:
            fields = encoders["schema"]["fields"]
            cat = {e["name"]: e for e in encoders["categorical"]}
            num = {e["name"]: e for e in encoders["numeric"]}
        except (KeyError, TypeError) as e:
            raise ValueError(f"the encoders are not usable ({type(e).__name__}: {e})"
                             ) from None
        self.fields: list[dict[str, Any]] = list(fields)
        self.cat, self.num = cat, num
        self.counts = counts or CandidateCounts()
        self.oov_share, self.zipf_s, self.hash_values = oov_share, zipf_s, hash_values
        self.model = model
        self.sides = {side: [f["name"] for f in fields if f.get("side", "candidate") == side]
                      for side in ("user", "context", "candidate")}

    def column(self, rng: np.random.Generator, name: str, size: int) -> list[Any]:
        """``size`` raw values of one field, as JSON-ready Python objects."""
        spec = next(f for f in self.fields if f["name"] == name)
        oov = rng.random(size) < self.oov_share
        if spec["type"] == "categorical":
            vocab = self.cat[name].get("vocab") or []
            if vocab:
                ranks = _zipf_ranks(rng, len(vocab), size, self.zipf_s)
                values: list[Any] = [vocab[k] for k in ranks.tolist()]
            else:  # hash encoding: any string is a value
                ranks = _zipf_ranks(rng, self.hash_values, size, self.zipf_s)
                values = [f"{name}-{k}" for k in ranks.tolist()]
            for i in np.flatnonzero(oov).tolist():
                values[i] = f"{OOV_PREFIX}{int(rng.integers(1 << 30))}"
            return values
        e = self.num[name]
        t = np.clip(rng.normal(e["mean"], e["std"], size), e["lo"], e["hi"])
        raw = invert_transform(spec.get("transform", "log1p"), t)
        out: list[Any] = [round(float(v), 4) for v in raw]
        for i in np.flatnonzero(oov).tolist():
            out[i] = None
        return out

    def body(self, rng: np.random.Generator, n_candidates: int) -> dict[str, Any]:
        """One request body with columnar candidates (the service's fast path)."""
        body: dict[str, Any] = {}
        if self.model:
            body["model"] = self.model
        for side in ("user", "context"):
            body[side] = {name: self.column(rng, name, 1)[0] for name in self.sides[side]}
        body["candidates"] = {name: self.column(rng, name, n_candidates)
                              for name in self.sides["candidate"]}
        return body

    def pool(self, size: int, seed: int = 0) -> list[tuple[bytes, int]]:
        """``size`` encoded bodies with their candidate counts, reproducible from ``seed``."""
        if size < 1:
            raise ValueError(f"pool size must be >= 1, got {size}")
        rng = np.random.default_rng(seed)
        counts = self.counts.sample(rng, size).tolist()
        return [(json.dumps(self.body(rng, n), separators=(",", ":")).encode(), n)
                for n in counts]


def write_pool(path: str | Path, pool: list[tuple[bytes, int]]) -> None:
    """Save a pool as JSON lines ``{"n": candidates, "body": "<json text>"}``."""
    with open(path, "w") as f:
        for body, n in pool:
            f.write(json.dumps({"n": n, "body": body.decode()}) + "\n")


def read_pool(path: str | Path) -> list[tuple[bytes, int]]:
    """The pool written by :func:`write_pool`."""
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out.append((d["body"].encode(), int(d["n"])))
    return out

"""Deterministic train/valid/test splits over a stream of rows, by seed or by a time column.

Random split: row i (its position in the whole input stream) goes to a split chosen by a
64-bit hash of (seed, i), so the assignment does not depend on chunk size, is the same on
every run with the same seed, and needs no memory.

Time split: the rows with the earliest times go to train, the next to valid, the latest to
test. The cut-off times are quantiles of the time column, estimated from a fixed-size
reservoir sample in one pass (bounded memory); rows that share a cut-off time all go to the
later split, so no timestamp is split across two sets.

Example:
    >>> spec = SplitSpec(valid_frac=0.25, test_frac=0.25, seed=7)
    >>> a = assign_random(spec, row_offset=0, n=8)
    >>> b = np.concatenate([assign_random(spec, 0, 3), assign_random(spec, 3, 5)])
    >>> bool((a == b).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from model.errors import InputError

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class SplitSpec:
    """How rows are divided. ``kind`` is "random" or "time" (then ``time_column`` is needed)."""

    kind: str = "random"
    valid_frac: float = 0.1
    test_frac: float = 0.1
    seed: int = 0
    time_column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("random", "time"):
            raise InputError(f"split kind must be 'random' or 'time', got {self.kind!r}")
        for name in ("valid_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {v}")
        if self.valid_frac + self.test_frac >= 1.0:
            raise InputError("valid_frac + test_frac must leave rows for training")
        if self.kind == "time" and not self.time_column:
            raise InputError("a time split needs a time column")


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def assign_random(spec: SplitSpec, row_offset: int, n: int) -> np.ndarray:
    """Split ids (0 train, 1 valid, 2 test) for rows ``row_offset .. row_offset + n - 1``."""
    idx = np.arange(row_offset, row_offset + n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = idx ^ (np.uint64(spec.seed) * np.uint64(0xD1B54A32D192ED03) & _MASK64)
    u = (_splitmix64(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    out = np.full(n, TRAIN, dtype=np.int8)
    out[u < spec.valid_frac + spec.test_frac] = VALID
    out[u < spec.test_frac] = TEST
    return out


class TimeCutoffs:
    """Cut-off times for a time split, estimated from a reservoir sample of the time column."""

    def __init__(self, spec: SplitSpec, reservoir_size: int = 1_000_000) -> None:
        self.spec = spec
        self.size = reservoir_size
        self.sample = np.empty(0, dtype=np.float64)
        self.seen = 0
        self._rng = np.random.default_rng(spec.seed)
        self.valid_start: float | None = None
        self.test_start: float | None = None

    def update(self, times: np.ndarray) -> None:
        """Add one chunk of times (Algorithm R, vectorised per chunk)."""
        t = np.asarray(times, dtype=np.float64)
        room = self.size - self.sample.size
        if room > 0:
            self.sample = np.concatenate([self.sample, t[:room]])
            self.seen += min(room, t.size)
            t = t[room:]
        if t.size:
            pos = self.seen + np.arange(1, t.size + 1)
            j = (self._rng.random(t.size) * pos).astype(np.int64)
            keep = j < self.size
            self.sample[j[keep]] = t[keep]
            self.seen += t.size

    def finish(self) -> TimeCutoffs:
        if self.sample.size == 0:
            raise InputError("time split: the input has no rows")
        s = self.spec
        self.valid_start = float(np.quantile(self.sample, 1.0 - s.valid_frac - s.test_frac))
        self.test_start = float(np.quantile(self.sample, 1.0 - s.test_frac))
        first_cut = self.valid_start if s.valid_frac > 0 else self.test_start
        if first_cut <= float(self.sample.min()):
            distinct = np.unique(self.sample).size
            raise InputError(
                f"time split: column {s.time_column!r} has too few distinct times ({distinct}) "
                "to leave any training rows before the validation cut-off; use --split random"
            )
        return self

    def assign(self, times: np.ndarray) -> np.ndarray:
        if self.valid_start is None or self.test_start is None:
            raise RuntimeError("call finish() before assign()")
        t = np.asarray(times, dtype=np.float64)
        out = np.full(t.size, TRAIN, dtype=np.int8)
        if self.spec.valid_frac > 0:
            out[t >= self.valid_start] = VALID
        if self.spec.test_frac > 0:
            out[t >= self.test_start] = TEST
        return out


def fit_time_cutoffs(spec: SplitSpec, time_chunks: Iterable[np.ndarray]) -> TimeCutoffs:
    """One pass over the time column; returns fitted cut-offs."""
    cut = TimeCutoffs(spec)
    for t in time_chunks:
        cut.update(t)
    return cut.finish()

"""Synthetic click logs with planted feature interactions and a known Bayes-optimal AUC.

The built-in data for the demo and the tests. A *world* (drawn from ``spec.world_seed``) fixes
the fields, their value frequencies and the true click model; *rows* are drawn from a separate
``seed``, so train and test files sampled from one world share one ground truth.

The true click model, for one row with categorical values ``x_f`` and numeric values ``v_j``::

    logit = bias + s1 * A / sd(A) + s2 * B / sd(B) + s3 * C / sd(C) + s4 * D / sd(D)
    A = sum_f w_f[x_f]                                            first order
    B = sum_{(f,g) in pairs} <z_f[x_f], z_g[x_g]>                 planted 2nd order
    C = sum_{(f,g,h) in triples} sum_d z_f[x_f,d] z_g[x_g,d] z_h[x_h,d]   planted 3rd order
    D = sum_j sin(omega_j * t_j + phi_j), t_j = (log1p(v_j) - mu_j) / sigma_j;
        a missing v_j contributes its own constant instead        nonlinear numeric
    click ~ Bernoulli(sigmoid(logit))

``w`` and the latent vectors ``z`` (dimension ``latent_dim``) are standard normal per value; the
planted pairs and triples are drawn at random among the fields. Each component is divided by
its standard deviation on a calibration sample, so ``s1..s4`` (``first_order_strength``,
``pair_strength``, ``triple_strength``, ``numeric_strength``) are the standard deviations of the
components in the logit; ``bias`` is then solved so that the mean click probability is
``base_rate``. A model without feature crosses cannot use B and C beyond their marginal effects,
so the gap between a first-order model and the Bayes AUC measures how much crossing is learned.

The defaults (10 categorical fields of 4..12 values, 4 planted pairs and 1 triple over
2-dimensional latent vectors) were chosen so that the small-preset models can get within 0.01 of
the Bayes AUC from 200k rows: with larger vocabularies (20..200 values, Zipf 1.1) every model
stayed 0.05+ below the bound at that size, which made the data useless as a correctness check.

Categorical values follow a Zipf law (value ``i`` has frequency proportional to
``(i + 1) ** -zipf_exponent``) and are written as decimal strings ``"0"``, ``"1"``, ...;
numeric values are non-negative log-normal counts with ``numeric_missing_rate`` missing.

Bayes-optimal AUC: the AUC of the true probability ``p`` used as the score, in expectation over
the label noise: each row counts as a positive of weight ``p`` and a negative of weight ``1 - p``
(``roc_auc(p, p)``), computed on a large sample (1e6 rows by default).

Example:
    >>> world = SyntheticWorld.from_spec(SyntheticSpec(num_cat=4, num_numeric=1))
    >>> cols, p = world.sample(5, seed=1)
    >>> sorted(cols)
    ['ad_cat0', 'ad_cat1', 'context_cat0', 'label', 'user_cat0', 'user_num0']
    >>> cols["label"].dtype, p.shape
    (dtype('float32'), (5,))
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import InputError
from model.metrics import roc_auc
from model.readers import rechunk
from model.schema import FeatureSchema, FieldSpec, Side

DEFAULT_CACHE = Path(os.environ.get("MLDCN_CACHE", ".cache/mldcn"))  # built-in data, downloads

__all__ = ["SyntheticSpec", "SyntheticWorld", "write_synthetic"]

LABEL = "label"
_P = "_p"  # key of the true probability in raw blocks (not a field name)
_BLOCK_ROWS = 8192  # rows are drawn in whole fixed blocks: output does not depend on chunk sizes
_CALIBRATION_ROWS = 65536


@dataclass(frozen=True)
class SyntheticSpec:
    """Everything that defines a synthetic world (see the module docstring for the model).

    Args:
        num_cat: number of categorical fields.
        num_numeric: number of numeric fields.
        min_cardinality, max_cardinality: field cardinalities, geometrically spaced between the
            two (ignored when ``cardinalities`` is given).
        cardinalities: explicit cardinality per categorical field.
        zipf_exponent: value frequencies fall as ``rank ** -zipf_exponent``.
        latent_dim: dimension of the latent vectors behind the 2nd- and 3rd-order terms.
        num_pairs, num_triples: planted field pairs and triples.
        first_order_strength, pair_strength, triple_strength, numeric_strength: standard
            deviation of each logit component.
        numeric_missing_rate: share of missing values in every numeric field.
        cat_missing_rate: share of missing values in every categorical field (missing values
            have their own weights, i.e. missingness is informative).
        base_rate: target mean click probability.
        world_seed: seed of the world (fields, weights, planted interactions).
    """

    num_cat: int = 10
    num_numeric: int = 3
    min_cardinality: int = 4
    max_cardinality: int = 12
    cardinalities: tuple[int, ...] | None = None
    zipf_exponent: float = 0.5
    latent_dim: int = 2
    num_pairs: int = 4
    num_triples: int = 1
    first_order_strength: float = 0.9
    pair_strength: float = 1.0
    triple_strength: float = 0.8
    numeric_strength: float = 0.5
    numeric_missing_rate: float = 0.1
    cat_missing_rate: float = 0.0
    base_rate: float = 0.25
    world_seed: int = 0

    def __post_init__(self) -> None:
        if self.num_cat < 1:
            raise InputError(f"num_cat must be >= 1, got {self.num_cat}")
        if self.num_numeric < 0:
            raise InputError(f"num_numeric must be >= 0, got {self.num_numeric}")
        if self.cardinalities is not None:
            if len(self.cardinalities) != self.num_cat:
                raise InputError(
                    f"cardinalities must have num_cat={self.num_cat} entries, "
                    f"got {len(self.cardinalities)}"
                )
            if min(self.cardinalities) < 2:
                raise InputError("every cardinality must be >= 2")
        elif not 2 <= self.min_cardinality <= self.max_cardinality:
            raise InputError(
                "need 2 <= min_cardinality <= max_cardinality, got "
                f"{self.min_cardinality} and {self.max_cardinality}"
            )
        if self.latent_dim < 1:
            raise InputError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not 0 <= self.num_pairs <= math.comb(self.num_cat, 2):
            raise InputError(
                f"num_pairs must be in [0, {math.comb(self.num_cat, 2)}] for {self.num_cat} "
                f"fields, got {self.num_pairs}"
            )
        if not 0 <= self.num_triples <= math.comb(self.num_cat, 3):
            raise InputError(
                f"num_triples must be in [0, {math.comb(self.num_cat, 3)}] for {self.num_cat} "
                f"fields, got {self.num_triples}"
            )
        strengths = (
            self.first_order_strength,
            self.pair_strength,
            self.triple_strength,
            self.numeric_strength,
        )
        if min(strengths) < 0:
            raise InputError("interaction strengths must be >= 0")
        for name in ("numeric_missing_rate", "cat_missing_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise InputError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.base_rate < 1.0:
            raise InputError(f"base_rate must be in (0, 1), got {self.base_rate}")

    def resolved_cardinalities(self) -> tuple[int, ...]:
        if self.cardinalities is not None:
            return tuple(int(c) for c in self.cardinalities)
        grid = np.geomspace(self.min_cardinality, self.max_cardinality, self.num_cat)
        return tuple(int(round(c)) for c in grid)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cardinalities"] = list(self.resolved_cardinalities())
        return d


def _sides(n: int) -> list[Side]:
    """Split n fields into user (~30%), context (~30%) and candidate (the rest, at least 1)."""
    n_user = round(0.3 * n) if n >= 3 else 0
    n_ctx = round(0.3 * n) if n >= 3 else 0
    sides: list[Side] = ["user"] * n_user + ["context"] * n_ctx
    return sides + ["candidate"] * (n - n_user - n_ctx)


def _names(sides: list[Side], kind: str) -> list[str]:
    prefix = {"user": "user", "context": "context", "candidate": "ad"}
    seen: dict[str, int] = {}
    out = []
    for side in sides:
        k = seen.get(side, 0)
        seen[side] = k + 1
        out.append(f"{prefix[side]}_{kind}{k}")
    return out


class SyntheticWorld:
    """The fixed ground truth of one :class:`SyntheticSpec`; build with :meth:`from_spec`."""

    def __init__(self, spec: SyntheticSpec) -> None:
        self.spec = spec
        rng = np.random.default_rng(np.random.SeedSequence(spec.world_seed, spawn_key=(0,)))
        self.cardinalities = spec.resolved_cardinalities()
        cat_sides = _sides(spec.num_cat)
        cycle: tuple[Side, ...] = ("user", "context", "candidate")
        num_sides = [cycle[j % 3] for j in range(spec.num_numeric)]
        self.cat_names = _names(cat_sides, "cat")
        self.num_names = _names(num_sides, "num")
        self._cat_sides, self._num_sides = cat_sides, num_sides

        self._cdfs = []
        for card in self.cardinalities:
            freq = np.arange(1, card + 1, dtype=np.float64) ** -spec.zipf_exponent
            cdf = np.cumsum(freq / freq.sum())
            cdf[-1] = 1.0
            self._cdfs.append(cdf)
        # Row `card` of each table is the missing value.
        self._w1 = [rng.standard_normal(card + 1) for card in self.cardinalities]
        self._z = [rng.standard_normal((card + 1, spec.latent_dim)) for card in self.cardinalities]
        all_pairs = list(itertools.combinations(range(spec.num_cat), 2))
        all_triples = list(itertools.combinations(range(spec.num_cat), 3))
        pick = rng.choice(len(all_pairs), size=spec.num_pairs, replace=False)
        self.pairs: tuple[tuple[int, int], ...] = tuple(all_pairs[i] for i in sorted(pick))
        pick = rng.choice(len(all_triples), size=spec.num_triples, replace=False)
        self.triples: tuple[tuple[int, int, int], ...] = tuple(all_triples[i] for i in sorted(pick))
        j = spec.num_numeric
        self._mu = rng.uniform(1.0, 4.0, j)
        self._sigma = rng.uniform(0.6, 1.4, j)
        self._omega = rng.uniform(1.5, 2.5, j)
        self._phi = rng.uniform(0.0, 2.0 * np.pi, j)
        self._missing_effect = rng.uniform(-1.0, 1.0, j)

        # Standardise the components and solve the bias on a calibration sample.
        cal = np.random.default_rng(np.random.SeedSequence(spec.world_seed, spawn_key=(1,)))
        ids, num = self._draw_features(cal, _CALIBRATION_ROWS)
        comps = self._components(ids, num)
        strengths = (
            spec.first_order_strength,
            spec.pair_strength,
            spec.triple_strength,
            spec.numeric_strength,
        )
        self._scale = np.array(
            [s / c.std() if c.std() > 0 else 0.0 for s, c in zip(strengths, comps, strict=True)]
        )
        self.bias = self._solve_bias(self._scale @ comps, spec.base_rate)

    @classmethod
    def from_spec(cls, spec: SyntheticSpec | None = None) -> SyntheticWorld:
        return cls(spec if spec is not None else SyntheticSpec())

    # ------------------------------------------------------------------ structure

    def schema(self) -> FeatureSchema:
        """Categorical vocab fields and log1p numeric fields, with their sides; label ``label``."""
        fields = [
            FieldSpec(name, "categorical", side=side, encoding="vocab", min_count=1)
            for name, side in zip(self.cat_names, self._cat_sides, strict=True)
        ]
        fields += [
            FieldSpec(name, "numeric", side=side, transform="log1p")
            for name, side in zip(self.num_names, self._num_sides, strict=True)
        ]
        return FeatureSchema(
            tuple(fields),
            label=LABEL,
            extra={"source": "model.synthetic", "world_seed": self.spec.world_seed},
        )

    def planted(self) -> dict[str, list[list[str]]]:
        """The planted interactions by field name."""
        return {
            "pairs": [[self.cat_names[f] for f in pair] for pair in self.pairs],
            "triples": [[self.cat_names[f] for f in triple] for triple in self.triples],
        }

    # ------------------------------------------------------------------ the click model

    def _draw_features(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        spec = self.spec
        ids = np.empty((n, spec.num_cat), dtype=np.int64)
        for f, cdf in enumerate(self._cdfs):
            ids[:, f] = np.searchsorted(cdf, rng.random(n), side="right")
            if spec.cat_missing_rate > 0:
                ids[rng.random(n) < spec.cat_missing_rate, f] = len(cdf)
        num = np.floor(np.exp(rng.normal(self._mu, self._sigma, (n, spec.num_numeric))))
        num[rng.random((n, spec.num_numeric)) < spec.numeric_missing_rate] = np.nan
        return ids, num

    def _components(self, ids: np.ndarray, num: np.ndarray) -> np.ndarray:
        """The four raw logit components, shape (4, n)."""
        n = ids.shape[0]
        out = np.zeros((4, n))
        for f, w in enumerate(self._w1):
            out[0] += w[ids[:, f]]
        for f, g in self.pairs:
            out[1] += np.einsum("nd,nd->n", self._z[f][ids[:, f]], self._z[g][ids[:, g]])
        for f, g, h in self.triples:
            prod = self._z[f][ids[:, f]] * self._z[g][ids[:, g]] * self._z[h][ids[:, h]]
            out[2] += prod.sum(axis=1)
        if num.shape[1]:
            t = (np.log1p(np.nan_to_num(num)) - self._mu) / self._sigma  # (n, J)
            effect = np.where(
                np.isnan(num), self._missing_effect, np.sin(self._omega * t + self._phi)
            )
            out[3] = effect.sum(axis=1)
        return out

    @staticmethod
    def _solve_bias(logit_wo_bias: np.ndarray, base_rate: float) -> float:
        lo, hi = -30.0, 30.0
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            if _sigmoid(logit_wo_bias + mid).mean() < base_rate:
                lo = mid
            else:
                hi = mid
        return 0.5 * (lo + hi)

    def probability(self, ids: np.ndarray, num: np.ndarray) -> np.ndarray:
        """True click probability for integer value ids (n, num_cat) and raw numerics (n, J)."""
        return _sigmoid(self.bias + self._scale @ self._components(ids, num))

    # ------------------------------------------------------------------ sampling

    def _iter_raw(self, n: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        """Rows in fixed blocks: value ids, raw numerics, labels and the true probability."""
        if n < 0:
            raise InputError(f"n must be >= 0, got {n}")
        for block, start in enumerate(range(0, n, _BLOCK_ROWS)):
            # Always draw a whole block, so row i is the same whatever n is.
            ss = np.random.SeedSequence([seed, self.spec.world_seed], spawn_key=(2, block))
            rng = np.random.default_rng(ss)
            ids, num = self._draw_features(rng, _BLOCK_ROWS)
            labels = rng.random(_BLOCK_ROWS)
            size = min(_BLOCK_ROWS, n - start)
            ids, num, labels = ids[:size], num[:size], labels[:size]
            p = self.probability(ids, num)
            raw = {name: ids[:, f] for f, name in enumerate(self.cat_names)}
            raw.update({name: num[:, j] for j, name in enumerate(self.num_names)})
            raw[LABEL] = (labels < p).astype(np.float32)
            raw[_P] = p
            yield raw

    def iter_sample(
        self, n: int, seed: int, chunk_rows: int = 65536
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """``sample(n, seed)`` in chunks of ``chunk_rows`` rows: (columns, true probabilities)."""
        vocab = self._string_vocab()
        for raw in rechunk(self._iter_raw(n, seed), chunk_rows):
            cols: dict[str, np.ndarray] = {
                name: vocab[f][raw[name]] for f, name in enumerate(self.cat_names)
            }
            cols.update({name: raw[name] for name in self.num_names})
            cols[LABEL] = raw[LABEL]
            yield cols, raw[_P]

    def sample(self, n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """``n`` rows as a chunk like the readers yield, and their true click probabilities.

        Deterministic in (spec, seed); the first rows of a larger sample equal a smaller one.
        """
        chunks = list(self.iter_sample(n, seed, chunk_rows=max(n, 1)))
        if chunks:
            return chunks[0]
        vocab_empty = np.empty(0, dtype=object)
        cols = {name: vocab_empty.copy() for name in self.cat_names}
        cols.update({name: np.empty(0) for name in self.num_names})
        cols[LABEL] = np.empty(0, dtype=np.float32)
        return cols, np.empty(0)

    def bayes_auc(self, n: int = 1_000_000, seed: int = 0) -> float:
        """Expected AUC of the true probability over label noise, on ``n`` sampled rows."""
        p = np.concatenate([raw[_P] for raw in self._iter_raw(n, seed)])
        return roc_auc(p, p)

    def _string_vocab(self) -> list[np.ndarray]:
        """Per field: value strings "0".."card-1", then None for the missing value."""
        return [
            np.array([str(i) for i in range(card)] + [None], dtype=object)
            for card in self.cardinalities
        ]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def write_synthetic(
    out_dir: str | Path,
    rows: int,
    spec: SyntheticSpec | None = None,
    seed: int = 0,
    fmt: str = "csv",
    chunk_rows: int = 65536,
    bayes_rows: int = 1_000_000,
) -> Path:
    """Write ``rows`` synthetic rows to ``out_dir/data.{csv,parquet}`` with schema and metadata.

    Streams ``chunk_rows`` rows at a time, so memory stays bounded for any ``rows``. Also writes
    ``schema.json`` (readable with ``open_source([data], schema=out_dir / "schema.json")``) and
    ``meta.json``: the spec, seed, row count, Bayes AUC (on ``bayes_rows`` rows of the world),
    expected and observed base rate, and the planted interactions.

    Returns:
        The path of the data file.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if fmt not in ("csv", "parquet"):
        raise InputError(f"fmt must be 'csv' or 'parquet', got {fmt!r}")
    if rows < 1:
        raise InputError(f"rows must be >= 1, got {rows}")
    if chunk_rows < 1:
        raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
    spec = spec if spec is not None else SyntheticSpec()
    world = SyntheticWorld.from_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / f"data.{fmt}"
    tmp_path = out / f".data.{fmt}.tmp"

    arrow_schema = pa.schema(
        [(name, pa.string()) for name in world.cat_names]
        + [(name, pa.float64()) for name in world.num_names]
        + [(LABEL, pa.int8())]
    )
    vocab = [
        pa.array([str(i) for i in range(card)] + [None], type=pa.string())
        for card in world.cardinalities
    ]
    if fmt == "csv":
        import pyarrow.csv as pacsv

        writer: Any = pacsv.CSVWriter(str(tmp_path), arrow_schema)
    else:
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(str(tmp_path), arrow_schema)
    positives = 0.0
    try:
        with writer:
            for raw in rechunk(world._iter_raw(rows, seed), chunk_rows):
                arrays = [pc.take(vocab[f], raw[name]) for f, name in enumerate(world.cat_names)]
                arrays += [
                    pa.array(raw[name], mask=np.isnan(raw[name])) for name in world.num_names
                ]
                arrays.append(pa.array(raw[LABEL].astype(np.int8)))
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=arrow_schema))
                positives += float(raw[LABEL].sum())
        os.replace(tmp_path, data_path)
    finally:
        tmp_path.unlink(missing_ok=True)

    world.schema().save(out / "schema.json")
    p_bayes = np.concatenate([raw[_P] for raw in world._iter_raw(bayes_rows, seed=0)])
    meta = {
        "spec": spec.to_dict(),
        "seed": seed,
        "rows": rows,
        "format": fmt,
        "file": data_path.name,
        "bayes_auc": roc_auc(p_bayes, p_bayes),
        "bayes_rows": bayes_rows,
        "expected_base_rate": float(p_bayes.mean()),
        "base_rate": positives / rows,
        "bias": world.bias,
        "planted": world.planted(),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return data_path


def synthetic_source(rows: int, seed: int, cache: Path = DEFAULT_CACHE) -> tuple[Any, float]:
    """The built-in synthetic data set (written once into the cache), and its Bayes AUC."""
    from model.readers import open_source

    folder = cache / f"synthetic-{rows}-seed{seed}"
    meta = folder / "meta.json"
    if not meta.is_file():
        tmp = cache / f".synthetic-{rows}-seed{seed}.tmp-{os.getpid()}"
        write_synthetic(tmp, rows=rows, seed=seed)
        if folder.exists() and not meta.is_file():
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process (a torchrun rank) published it first
            shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads(meta.read_text())
    data_files = sorted(p for p in folder.iterdir() if p.suffix in (".csv", ".parquet"))
    return open_source(data_files, schema=folder / "schema.json"), float(info["bayes_auc"])

"""From a raw data source to encoded, shuffled mini-batches, with memory bounded by shard size.

:func:`prepare` streams the source (chunk by chunk, never whole), assigns each row to
train/valid/test, fits the encoders on the training rows, then encodes every row once into
on-disk shards (``.npy`` files of at most ``shard_rows`` rows per split). Training epochs read
the shards back one at a time, so peak memory depends on the shard size, not the file size.

Passes over the input: 2 for a random split (fit, then encode), 3 for a time split (the
cut-off times are estimated first).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.encoders import EncoderFitter, FeatureEncoders
from model.errors import InputError
from model.split import SPLIT_NAMES, TRAIN, SplitSpec, assign_random, fit_time_cutoffs


@dataclass
class Shard:
    """One encoded block of rows: three aligned ``.npy`` files."""

    prefix: Path
    rows: int

    def load(self, mmap: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cat_ids int64 (n, F_cat), dense float32 (n, F_num), labels float32 (n,))."""
        mode = "r" if mmap else None
        return (
            np.load(f"{self.prefix}.cat.npy", mmap_mode=mode),
            np.load(f"{self.prefix}.dense.npy", mmap_mode=mode),
            np.load(f"{self.prefix}.label.npy", mmap_mode=mode),
        )


@dataclass
class PreparedData:
    """Fitted encoders plus the encoded shards of each split."""

    encoders: FeatureEncoders
    shards: dict[str, list[Shard]]
    cache_dir: Path
    stats: dict[str, Any] = field(default_factory=dict)

    def rows(self, split: str) -> int:
        return sum(s.rows for s in self.shards[split])

    def cleanup(self) -> None:
        shutil.rmtree(self.cache_dir, ignore_errors=True)


class _ShardWriter:
    """Buffers encoded rows of one split and flushes them as shards of ``shard_rows`` rows."""

    def __init__(self, directory: Path, split: str, shard_rows: int) -> None:
        self.dir, self.split, self.shard_rows = directory, split, shard_rows
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.shards: list[Shard] = []

    def add(self, cat: np.ndarray, dense: np.ndarray, label: np.ndarray) -> None:
        self.parts.append((cat, dense, label))
        self.buffered += len(label)
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> list[Shard]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards

    def _flush(self, n: int) -> None:
        cat = np.concatenate([p[0] for p in self.parts])
        dense = np.concatenate([p[1] for p in self.parts])
        label = np.concatenate([p[2] for p in self.parts])
        prefix = self.dir / f"{self.split}-{len(self.shards):05d}"
        np.save(f"{prefix}.cat.npy", cat[:n])
        np.save(f"{prefix}.dense.npy", dense[:n])
        np.save(f"{prefix}.label.npy", label[:n])
        self.shards.append(Shard(prefix, n))
        rest = len(label) - n
        self.parts = [(cat[n:], dense[n:], label[n:])] if rest else []
        self.buffered = rest


def prepare(
    source: Any,
    split: SplitSpec,
    cache_dir: Path,
    chunk_rows: int = 65536,
    shard_rows: int = 262144,
    encoders: FeatureEncoders | None = None,
) -> PreparedData:
    """Split, fit encoders on the train rows (unless given) and encode everything into shards.

    ``source`` is a :class:`model.readers.DataSource` (anything with ``.schema`` and
    ``.iter_chunks(chunk_rows)``).
    """
    schema = source.schema
    cache_dir = Path(cache_dir)
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True)

    cutoffs = None
    if split.kind == "time":
        col = split.time_column
        cutoffs = fit_time_cutoffs(split, (c[col] for c in source.iter_chunks(chunk_rows)))

    def assignments() -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        offset = 0
        for chunk in source.iter_chunks(chunk_rows):
            n = len(chunk[schema.label])
            if cutoffs is not None:
                which = cutoffs.assign(chunk[split.time_column])
            else:
                which = assign_random(split, offset, n)
            offset += n
            yield chunk, which

    if encoders is None:
        fitter = EncoderFitter(schema)
        for chunk, which in assignments():
            fitter.update(chunk, which == TRAIN)
        if fitter.rows == 0:
            raise InputError("the training split is empty: the input has too few rows")
        encoders = fitter.finish()

    writers = {name: _ShardWriter(cache_dir, name, shard_rows) for name in SPLIT_NAMES}
    positives = dict.fromkeys(SPLIT_NAMES, 0.0)
    for chunk, which in assignments():
        cat, dense = encoders.transform(chunk)
        label = np.asarray(chunk[schema.label], dtype=np.float32)
        for k, name in enumerate(SPLIT_NAMES):
            sel = which == k
            if sel.any():
                writers[name].add(cat[sel], dense[sel], label[sel])
                positives[name] += float(label[sel].sum())
    shards = {name: w.close() for name, w in writers.items()}
    data = PreparedData(encoders, shards, cache_dir)
    data.stats = {
        name: {
            "rows": data.rows(name),
            "positive_rate": positives[name] / max(data.rows(name), 1),
        }
        for name in SPLIT_NAMES
    }
    if cutoffs is not None:
        data.stats["time_cutoffs"] = {"valid": cutoffs.valid_start, "test": cutoffs.test_start}
    (cache_dir / "stats.json").write_text(json.dumps(data.stats, indent=2))
    return data


def effective_split(split: SplitSpec, valid_given: bool, test_given: bool) -> SplitSpec:
    """The split :func:`prepare_sources` applies to ``source``: no rows for a split whose
    rows come from their own files (and no time order when every row is a training row)."""
    import dataclasses

    valid_frac = 0.0 if valid_given else split.valid_frac
    test_frac = 0.0 if test_given else split.test_frac
    if split.kind == "time" and valid_frac == 0.0 and test_frac == 0.0:
        return SplitSpec(valid_frac=0.0, test_frac=0.0)  # every row is a training row
    return dataclasses.replace(split, valid_frac=valid_frac, test_frac=test_frac)


def prepare_sources(
    source: Any,
    split: SplitSpec,
    cache_dir: Path,
    valid_source: Any = None,
    test_source: Any = None,
    chunk_rows: int = 65536,
    shard_rows: int = 262144,
) -> PreparedData:
    """:func:`prepare` for data that may come pre-split (a benchmark's own files).

    ``valid_source`` / ``test_source`` (DataSources with ``source``'s schema), when given, are
    the validation / test rows: ``source`` then gives no rows to that split (its fraction in
    ``split`` is ignored) and the extra files are encoded with the encoders fitted on the
    training rows of ``source``, never fitted on themselves.
    """
    split = effective_split(split, valid_source is not None, test_source is not None)
    data = prepare(source, split, cache_dir, chunk_rows=chunk_rows, shard_rows=shard_rows)
    for name, extra in (("valid", valid_source), ("test", test_source)):
        if extra is None:
            continue
        part = prepare(extra, SplitSpec(valid_frac=0.0, test_frac=0.0), Path(cache_dir) / name,
                       chunk_rows=chunk_rows, shard_rows=shard_rows, encoders=data.encoders)
        data.shards[name] = part.shards["train"]
        data.stats[name] = {**part.stats["train"], "files": [str(p) for p in extra.paths]}
    return data


def iter_batches(
    shards: list[Shard],
    batch_size: int,
    shuffle: bool = False,
    rng: np.random.Generator | None = None,
    share: tuple[int, int] = (0, 1),
    min_rows: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Mini-batches (cat_ids, dense, labels) over the shards.

    With ``shuffle``, the shard order and the rows inside each shard are permuted (a shard is
    the shuffle window); one shard is in memory at a time. Batches do not cross shards, so the
    last batch of each shard may be short.

    ``share = (rank, world)`` with world > 1 (data-parallel training): every rank walks the same
    batches (pass equally seeded ``rng``s) and gets its contiguous 1/world of each, gathered from
    the memory-mapped shard, so a rank reads and holds only its rows; without ``shuffle`` a rank
    gets its 1/world of each shard's rows. A batch (of all ranks together) with fewer than
    ``world · min_rows`` rows is skipped on every rank alike.
    """
    if shuffle and rng is None:
        raise ValueError("shuffle=True needs an rng")
    rank, world = share
    order = rng.permutation(len(shards)) if shuffle and rng is not None else range(len(shards))
    for i in order:
        shard = shards[int(i)]
        if world == 1:
            cat, dense, label = shard.load()
            if shuffle and rng is not None:
                perm = rng.permutation(len(label))
                cat, dense, label = cat[perm], dense[perm], label[perm]
            for s in range(0, len(label), batch_size):
                e = s + batch_size
                if min(e, len(label)) - s >= min_rows:
                    yield cat[s:e], dense[s:e], label[s:e]
            continue
        cat, dense, label = shard.load(mmap=True)
        n, r, w = shard.rows, rank, world
        if shuffle and rng is not None:
            perm = rng.permutation(n)
        else:  # evaluation: this rank's block of the shard, in order
            lo, hi = rank * n // world, (rank + 1) * n // world
            perm, n, r, w = np.arange(lo, hi), hi - lo, 0, 1
        for s in range(0, n, batch_size):
            rows = perm[s : s + batch_size]
            if len(rows) < w * min_rows:
                continue
            mine = np.sort(rows[r * len(rows) // w : (r + 1) * len(rows) // w])
            yield cat[mine], dense[mine], label[mine]

"""Batch-size buckets: pad each ONNX Runtime call to one of a few fixed row counts.

A GPU runs a fixed shape fastest: the kernels chosen for it are cached, and a CUDA graph
captured for it can be replayed (graphs need fixed shapes and fixed buffers). So on the CUDA
path every batch is padded up to the smallest configured bucket that holds it (batches larger
than the largest bucket are split into largest-bucket chunks plus a padded remainder), and the
scores of the padding rows are cut off before anyone sees them. Padding rows are all-missing
features (ids 0, dense 0), so they are valid inputs; their scores are never returned.

This layer is pure and provider-independent: it only needs a ``run_fixed(bucket, cat, dense)``
that scores exactly ``bucket`` rows, so it is tested on CPU. On CPU it is off by default (a
1-row request would cost a 64-row batch), see ``Settings.pad_to_buckets``.

Example:
    >>> plan_chunks(5, (4, 8))
    [(0, 5, 8)]
    >>> plan_chunks(19, (4, 8))
    [(0, 8, 8), (8, 16, 8), (16, 19, 4)]
    >>> runner = BucketedRunner(lambda b, cat, dense: dense[:, 0] + 1, (4, 8))
    >>> runner(np.zeros((3, 0), np.int64), np.ones((3, 1), np.float32)).tolist()
    [2.0, 2.0, 2.0]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence

import numpy as np

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)

FixedRunFn = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def parse_buckets(spec: str | Iterable[int]) -> tuple[int, ...]:
    """Bucket sizes from ``"64,128,..."`` (or integers): sorted, unique, each >= 1.

    Example:
        >>> parse_buckets("256, 64,128,64")
        (64, 128, 256)
    """
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = set()
    for s in items:
        if s == "":
            continue
        try:
            size = int(s)
        except (TypeError, ValueError):
            raise ValueError(f"batch bucket sizes must be integers, got {s!r}") from None
        if size < 1:
            raise ValueError(f"batch bucket sizes must be >= 1, got {size}")
        out.add(size)
    if not out:
        raise ValueError("batch_buckets is empty: give at least one size, e.g. '64,128,256'")
    return tuple(sorted(out))


def active_buckets(buckets: Sequence[int], max_batch_size: int) -> tuple[int, ...]:
    """The buckets a batcher of ``max_batch_size`` rows can use: every bucket up to the
    smallest one that holds ``max_batch_size`` (larger ones would never be reached).

    Example:
        >>> active_buckets((64, 128, 256, 512), 100)
        (64, 128)
        >>> active_buckets((64, 128), 1000)
        (64, 128)
    """
    out = []
    for b in sorted(buckets):
        out.append(b)
        if b >= max_batch_size:
            break
    return tuple(out)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows`` rows (``rows`` <= the largest bucket)."""
    for b in buckets:
        if rows <= b:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def plan_chunks(rows: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """How ``rows`` rows run: ``[(first row, end row, bucket), ...]``, in order.

    Full largest-bucket chunks first, then the remainder in the smallest bucket that holds it.
    """
    if rows < 0:
        raise ValueError(f"rows must be >= 0, got {rows}")
    biggest = buckets[-1]
    out = []
    start = 0
    while rows - start > biggest:
        out.append((start, start + biggest, biggest))
        start += biggest
    if rows > start:
        out.append((start, rows, bucket_for(rows - start, buckets)))
    return out


def pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows`` rows (``a`` itself when it has them)."""
    if len(a) == rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    out[: len(a)] = a
    return out


class BucketedRunner:
    """``run(cat, dense) -> probabilities (N,)`` on top of a fixed-shape ``run_fixed``.

    Each chunk of :func:`plan_chunks` is zero-padded to its bucket, scored by
    ``run_fixed(bucket, cat, dense)`` (which must return ``bucket`` scores) and sliced back to
    its real rows, so padding never reaches a caller. ``calls`` counts runs per bucket.

    Args:
        run_fixed: scores exactly ``bucket`` rows; called from the batcher's threads.
        buckets: the bucket sizes (sorted, see :func:`parse_buckets`).
    """

    def __init__(self, run_fixed: FixedRunFn, buckets: Sequence[int]) -> None:
        self.buckets = parse_buckets(buckets)
        self.run_fixed = run_fixed
        self.calls: dict[int, int] = dict.fromkeys(self.buckets, 0)
        self._lock = threading.Lock()  # guards ``calls`` only

    def __call__(self, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
        n = len(cat)
        if len(dense) != n:
            raise ValueError(f"cat_ids has {n} rows, dense has {len(dense)}")
        out = np.empty(n, dtype=np.float32)
        for a, b, bucket in plan_chunks(n, self.buckets):
            probs = np.asarray(self.run_fixed(bucket, pad_rows(cat[a:b], bucket),
                                              pad_rows(dense[a:b], bucket)))
            if probs.shape != (bucket,):
                raise RuntimeError(f"model returned shape {probs.shape} for a {bucket}-row "
                                   "bucket")
            out[a:b] = probs[: b - a]
            with self._lock:
                self.calls[bucket] += 1
        return out

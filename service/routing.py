"""A/B traffic split: which model scores a request that names none.

The split is a list of arms ``[(model, weight), ...]`` (``MLDCN_AB="mldcn:0.5,dcnv2:0.5"``;
weights are normalised, so ``mldcn:9,dcnv2:1`` is 90/10). A request is assigned by hashing its
user key: ``u = SHA-256(salt + "\\0" + key)`` read as a number in [0, 1), and the arm is the one
whose cumulative weight interval holds ``u``. The assignment is therefore

- deterministic: the same user lands in the same arm on every request, worker, restart and
  machine (no state is kept);
- independent between experiments: a new ``ab_salt`` reshuffles users;
- stable when weights move a little: only users near a boundary change arm.

The user key is the request's ``user_id`` field (``/v1/score``; never a model feature), else the
value of the ``user`` feature named by ``ab_user_field`` (default ``user_id``). A request with
neither is not split: the default model scores it and its arm is reported as ``null``. A request
that names a model (``model`` in ``/v1/score``, and every ``/v2`` infer call, whose URL names
one) bypasses the split.

Example:
    >>> arms = parse_split("mldcn:0.5,dcnv2:0.5")
    >>> arms
    [('mldcn', 0.5), ('dcnv2', 0.5)]
    >>> assign("user-42", arms) == assign("user-42", arms)
    True
    >>> parse_split("mldcn:1,mldcn:2")
    Traceback (most recent call last):
    ...
    ValueError: ab: model 'mldcn' appears twice
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

from model.cliargs import comma_list

DEFAULT_SALT = "mldcn-ab"
Arms = list[tuple[str, float]]


def parse_split(text: str) -> Arms:
    """``"a:0.5,b:0.5"`` → ``[("a", 0.5), ("b", 0.5)]`` with weights normalised to sum 1.

    An empty string is no split (``[]``). ValueError names the problem.
    """
    arms: Arms = []
    for part in comma_list(text):
        name, sep, weight = part.rpartition(":")
        if not sep or not name.strip():
            raise ValueError(f"ab: expected model:weight, got {part!r}")
        try:
            w = float(weight)
        except ValueError:
            raise ValueError(f"ab: weight of {name.strip()!r} is not a number: {weight!r}") \
                from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"ab: weight of {name.strip()!r} must be a positive number, got {w}")
        if any(n == name.strip() for n, _ in arms):
            raise ValueError(f"ab: model {name.strip()!r} appears twice")
        arms.append((name.strip(), w))
    total = sum(w for _, w in arms)
    return [(n, w / total) for n, w in arms]


def bucket(key: str, salt: str = DEFAULT_SALT) -> float:
    """The user's position in [0, 1): the first 8 bytes of SHA-256(salt, key), scaled."""
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign(key: str, arms: Sequence[tuple[str, float]], salt: str = DEFAULT_SALT) -> str:
    """The arm (model name) of the user ``key``; ``arms`` as returned by :func:`parse_split`."""
    if not arms:
        raise ValueError("assign needs at least one arm")
    edges = list(accumulate(w for _, w in arms))
    i = bisect_right(edges, bucket(key, salt) * edges[-1])
    return arms[min(i, len(arms) - 1)][0]

"""The argument check the layers, the configs and the repository share: sizes and counts are
integers >= 1 (bools refused)."""

from __future__ import annotations


def check_sizes(error: type[Exception] = ValueError, **sizes: object) -> None:
    """``error`` (ValueError) naming the first of ``sizes`` that is not an integer >= 1.

    Example:
        >>> check_sizes(rank=4, num_layers=2)
        >>> check_sizes(rank=0)
        Traceback (most recent call last):
        ...
        ValueError: rank must be an integer >= 1, got 0
    """
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise error(f"{name} must be an integer >= 1, got {value!r}")

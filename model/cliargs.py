"""What every command line shares: the parser's one-line errors and comma-separated lists."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from model.errors import InputError

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``prog: error: ... (see prog
    --help)``), exit status 2, not the usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def comma_list(text: str, kind: Callable[[str], T] = str,  # type: ignore[assignment]
               what: str = "values") -> list[T]:
    """The items of ``text`` ("a, b,,c"), stripped, empty ones dropped, each converted by
    ``kind``; InputError (a ValueError) naming ``what`` and the text when an item does not
    convert.

    Example:
        >>> comma_list(" mldcn, dcnv2,")
        ['mldcn', 'dcnv2']
        >>> comma_list("64,512", int)
        [64, 512]
        >>> comma_list("1,x", float, "rates")
        Traceback (most recent call last):
        ...
        model.errors.InputError: expected comma-separated rates, got '1,x'
    """
    try:
        return [kind(item) for item in (t.strip() for t in text.split(",")) if item]
    except ValueError:
        raise InputError(f"expected comma-separated {what}, got {text!r}") from None

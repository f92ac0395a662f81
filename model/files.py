"""Small torch-free helpers for the files that runs and exports read and write."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_info(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Path, SHA-256 and size of each file: how runs and studies name the data they read."""
    return [{"path": str(p), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size}
            for p in paths]


def read_json(path: Path, error: type[Exception]) -> Any:
    """The parsed JSON of ``path``; ``error`` naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise error(f"{path}: not valid JSON: {e}") from None


def json_safe(value: Any) -> Any:
    """``value`` with NaN and ±inf replaced by None, so that it serialises as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value

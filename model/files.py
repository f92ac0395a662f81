"""Small torch-free helpers shared by training, export and the benchmarks."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else the platform's answer)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def write_result(path: str | Path, result: dict[str, Any], table: str) -> dict[str, Any]:
    """Write a benchmark's JSON to ``path`` and print its table; returns ``result``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table)
    print(f"wrote {out}")
    return result


def file_info(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Path, SHA-256 and size of each file: how runs and studies name the data they read."""
    return [{"path": str(p), "sha256": sha256_file(p), "bytes": Path(p).stat().st_size}
            for p in paths]

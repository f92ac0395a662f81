"""What every benchmark writes: its JSON result (with the machine it ran on) and its table.

One writer for ``mldcn bench train``, ``train-scale``, ``fusion``, ``serve`` and ``gpu``:
:func:`machine` names the hardware and library versions, :func:`write_result` prints the table
and writes the JSON. torch-free (versions are read only of the libraries named)."""

from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from typing import Any


def cpu_name() -> str:
    """The CPU model name (from /proc/cpuinfo on Linux, else the platform's answer)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine(*libraries: str, **extra: Any) -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, cores, platform, Python, the 1/5/15-minute load
    average and the version of each library in ``libraries`` (import names); ``extra`` added.

    Example:
        >>> m = machine("numpy", server_cores=[0])
        >>> sorted(m)
        ['cores', 'cpu', 'load_average', 'numpy', 'platform', 'python', 'server_cores']
    """
    try:
        load: list[float] | None = list(os.getloadavg())
    except OSError:
        load = None
    versions = {name: importlib.import_module(name).__version__ for name in libraries}
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": load, **versions, **extra}


def write_result(path: str | Path | None, result: dict[str, Any], table: str) -> dict[str, Any]:
    """Print a benchmark's table and write its JSON to ``path`` (not written when None);
    returns ``result``."""
    print(table)
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return result

"""Streaming readers for click logs: Criteo, Avazu, and generic CSV / Parquet with a schema.

A reader never holds a whole file in memory: CSV files go through pyarrow's streaming CSV reader
(one block of ``block_size_bytes`` at a time), Parquet files through
``ParquetFile.iter_batches``, and only the columns the schema needs are decoded. Every chunk is a
``dict`` of numpy arrays keyed by column name:

* categorical fields: ``object`` arrays of Python ``str``, ``None`` where the value is missing
  (null or the empty string); integer ids become decimal strings (``123`` -> ``"123"``);
* numeric fields: ``float64``, NaN where missing;
* the label (``schema.label``): ``float32`` 0.0 / 1.0, anything else is a :class:`DataError`;
* the time column (``schema.time_column``), when set: ``int64`` (``float64`` if it has missing or
  fractional values; timestamps become seconds since the epoch).

Formats (``fmt``) and their schemas:

``criteo-tsv``
    Raw Kaggle ``train.txt``: tab-separated ``label, I1..I13, C1..C26``, no header (a header
    line ``label<TAB>I1...`` is skipped if present). Built-in schema ``schemas/criteo.json``.
``criteo-csv``
    The same columns as CSV with the header ``label,I1..I13,C1..C26``. Same built-in schema.
``avazu``
    Kaggle ``train.csv`` (header ``id,click,hour,...``). Built-in schema ``schemas/avazu.json``:
    ``id`` is dropped, ``hour`` (YYMMDDHH) is the int64 time column, and two fields are derived
    from it: ``hour_of_day`` (``"0"``..``"23"``) and ``weekday`` (``"0"``..``"6"``, Monday = 0).
``csv`` / ``parquet``
    Any file holding the schema's columns; a schema is required.

``auto`` picks one by content: Parquet magic bytes or a ``.parquet`` suffix; 40 tab-separated
fields starting with a 0/1 label; the Criteo or Avazu CSV header; otherwise generic CSV
(tab-delimited when the suffix is ``.tsv``). ``.gz``, ``.bz2``, ``.zst`` and ``.lz4`` text
files are decompressed on the fly.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> row = "\\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 25 + [""])
    >>> _ = (d / "day_0.tsv").write_text(row + "\\n")
    >>> src = open_source([d / "day_0.tsv"])
    >>> src.fmt, len(src.schema.fields)
    ('criteo-tsv', 39)
    >>> chunk = next(src.iter_chunks())
    >>> chunk["label"], chunk["I1"], chunk["C1"], chunk["C26"]
    (array([1.], dtype=float32), array([3.]), array(['68fd1e64'], dtype=object), \
array([None], dtype=object))
"""

from __future__ import annotations

import csv
import importlib.resources
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from model.errors import InputError, one_line
from model.schema import FeatureSchema

if TYPE_CHECKING:  # pyarrow is imported lazily so that `import model.readers` works without it
    import pyarrow as pa

__all__ = [
    "AVAZU_DERIVED",
    "CRITEO_COLUMNS",
    "FORMATS",
    "DataError",
    "DataSource",
    "detect_format",
    "load_builtin_schema",
    "open_source",
    "rechunk",
]

FORMATS: tuple[str, ...] = ("auto", "criteo-tsv", "criteo-csv", "avazu", "csv", "parquet")
CRITEO_COLUMNS: tuple[str, ...] = (
    "label",
    *(f"I{i}" for i in range(1, 14)),
    *(f"C{i}" for i in range(1, 27)),
)
AVAZU_DERIVED: tuple[str, ...] = ("hour_of_day", "weekday")
_AVAZU_TIME = "hour"
_BUILTIN = {"criteo-tsv": "criteo", "criteo-csv": "criteo", "avazu": "avazu"}
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")
_HEAD_BYTES = 1 << 16
_HOUR_STRINGS = np.array([str(i) for i in range(24)], dtype=object)
_WEEKDAY_STRINGS = np.array([str(i) for i in range(7)], dtype=object)


class DataError(InputError):
    """A data file that cannot be read as asked: the message names the file and the problem."""


def load_builtin_schema(name: str) -> FeatureSchema:
    """Load ``model/schemas/<name>.json``: ``criteo``, ``avazu`` or ``criteo_attribution``."""
    resource = importlib.resources.files("model").joinpath("schemas", f"{name}.json")
    if not resource.is_file():
        raise InputError(f"no built-in schema named {name!r}")
    with importlib.resources.as_file(resource) as path:
        return FeatureSchema.load(path)


@dataclass(frozen=True)
class _FilePlan:
    """What one file is: its format, its column names and how to parse it."""

    path: Path
    fmt: str
    columns: tuple[str, ...]
    delimiter: str = ","
    skip_header: bool = False  # criteo-tsv only: the file starts with a header line


def _logical_suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _read_head(path: Path) -> bytes:
    """The first bytes of a file (decompressed), after checking that it exists and is readable."""
    import pyarrow as pa

    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"PAR1":
            return magic
        with pa.input_stream(str(path), compression="detect") as stream:
            head = stream.read(_HEAD_BYTES)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read: {one_line(e, None)}") from None
    if not head.strip():
        raise DataError(f"{path}: file is empty")
    return head


def _first_line(path: Path, head: bytes, delimiter: str) -> list[str]:
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff")
    line = text.split("\n", 1)[0].rstrip("\r")
    try:
        return next(csv.reader([line], delimiter=delimiter))
    except (csv.Error, StopIteration) as e:
        raise DataError(f"{path}: line 1: cannot parse: {one_line(e, None)}") from None


def _is_criteo_tsv(fields: list[str]) -> bool:
    return len(fields) == len(CRITEO_COLUMNS) and (
        fields[0] in ("0", "1") or tuple(fields) == CRITEO_COLUMNS
    )


def detect_format(path: str | Path) -> str:
    """The format ``auto`` resolves to for one file (see the module docstring)."""
    p = Path(path)
    head = _read_head(p)
    if head[:4] == b"PAR1" or _logical_suffix(p) in (".parquet", ".pq"):
        return "parquet"
    if _is_criteo_tsv(_first_line(p, head, "\t")):
        return "criteo-tsv"
    header = _first_line(p, head, ",")
    if tuple(header) == CRITEO_COLUMNS:
        return "criteo-csv"
    if header[:3] == ["id", "click", "hour"]:
        return "avazu"
    return "csv"


def _plan(path: Path, fmt: str) -> _FilePlan:
    if fmt == "auto":
        fmt = detect_format(path)
    head = _read_head(path)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(str(path)).schema_arrow.names
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not a readable parquet file: {one_line(e, None)}") from None
        return _FilePlan(path, fmt, tuple(names))
    if fmt == "criteo-tsv":
        first = _first_line(path, head, "\t")
        return _FilePlan(path, fmt, CRITEO_COLUMNS, "\t", tuple(first) == CRITEO_COLUMNS)
    delimiter = ","
    if fmt == "csv":
        tabbed = _first_line(path, head, "\t")
        if _logical_suffix(path) in (".tsv", ".tab") or (len(tabbed) > 1 and "," not in tabbed[0]):
            delimiter = "\t"
    header = tuple(_first_line(path, head, delimiter))
    if fmt == "criteo-csv" and header != CRITEO_COLUMNS:
        raise DataError(f"{path}: not a criteo-csv file: the header is not label,I1..I13,C1..C26")
    if fmt == "avazu" and header[:3] != ("id", "click", "hour"):
        raise DataError(f"{path}: not an avazu file: the header does not start with id,click,hour")
    return _FilePlan(path, fmt, header, delimiter)


def _required_columns(schema: FeatureSchema, plan: _FilePlan) -> list[str]:
    """File columns the schema needs (derived Avazu fields need ``hour`` instead)."""
    wanted = [*schema.names, schema.label]
    if schema.time_column is not None:
        wanted.append(schema.time_column)
    if plan.fmt == "avazu":
        derived = [n for n in wanted if n in AVAZU_DERIVED and n not in plan.columns]
        wanted = [n for n in wanted if n not in derived]
        if derived:
            wanted.append(_AVAZU_TIME)
    return list(dict.fromkeys(wanted))


def _check_columns(schema: FeatureSchema, plan: _FilePlan) -> None:
    have = set(plan.columns)
    missing = [c for c in _required_columns(schema, plan) if c not in have]
    if missing:
        shown = ", ".join(plan.columns[:12]) + (", ..." if len(plan.columns) > 12 else "")
        raise DataError(
            f"{plan.path}: schema mismatch: missing columns {missing} "
            f"(the file has {len(plan.columns)} columns: {shown})"
        )


def open_source(
    paths: Sequence[str | Path] | str | Path,
    fmt: str = "auto",
    schema: FeatureSchema | str | Path | None = None,
    *,
    block_size_bytes: int = 1 << 22,
) -> DataSource:
    """Open one or more files of one format as a single stream of chunks.

    Checks eagerly that every file exists, is of the same format and holds the schema's columns,
    so errors surface before training starts; the data itself is read by ``iter_chunks``.

    Args:
        paths: files to read one after another (a single path is accepted too).
        fmt: one of :data:`FORMATS`; ``"auto"`` detects the format of each file.
        schema: a :class:`FeatureSchema` or the path of a schema file. Required for ``csv`` and
            ``parquet``; for Criteo and Avazu it replaces the built-in schema.
        block_size_bytes: CSV bytes parsed per block (must exceed the longest line).

    Raises:
        DataError: a missing, unreadable or empty file, mixed formats, a missing schema or
            columns the schema needs that the file lacks.
        SchemaError: an invalid schema file.
    """
    if fmt not in FORMATS:
        raise InputError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    path_list = [Path(p) for p in paths]
    if not path_list:
        raise InputError("paths must name at least one file")
    if not isinstance(block_size_bytes, int) or block_size_bytes < 1024:
        raise InputError(f"block_size_bytes must be an integer >= 1024, got {block_size_bytes!r}")
    plans = [_plan(p, fmt) for p in path_list]
    formats = sorted({pl.fmt for pl in plans})
    if len(formats) > 1:
        detail = ", ".join(f"{pl.path.name}: {pl.fmt}" for pl in plans)
        raise DataError(f"files of different formats cannot form one stream ({detail})")
    resolved = plans[0].fmt
    if schema is None:
        if resolved not in _BUILTIN:
            raise DataError(
                f"--schema is required for {resolved} files ({plans[0].path}): only Criteo and "
                "Avazu files have a built-in schema"
            )
        schema_obj = load_builtin_schema(_BUILTIN[resolved])
    elif isinstance(schema, FeatureSchema):
        schema_obj = schema
    else:
        schema_obj = FeatureSchema.load(schema)
    for pl in plans:
        _check_columns(schema_obj, pl)
    return DataSource(
        schema=schema_obj,
        paths=tuple(path_list),
        fmt=resolved,
        block_size_bytes=block_size_bytes,
        _plans=tuple(plans),
    )


@dataclass(frozen=True)
class DataSource:
    """Files of one format read as one stream of column chunks; build with :func:`open_source`."""

    schema: FeatureSchema
    paths: tuple[Path, ...]
    fmt: str
    block_size_bytes: int = 1 << 22
    _plans: tuple[_FilePlan, ...] = field(default=(), repr=False)

    @property
    def columns(self) -> tuple[str, ...]:
        """Keys of every chunk: the schema fields, then the label, then the time column."""
        cols = [*self.schema.names, self.schema.label]
        if self.schema.time_column is not None:
            cols.append(self.schema.time_column)
        return tuple(dict.fromkeys(cols))

    def iter_chunks(self, chunk_rows: int = 65536) -> Iterator[dict[str, np.ndarray]]:
        """Yield chunks of exactly ``chunk_rows`` rows (the last one may be shorter).

        Chunks run across file boundaries; the result does not depend on ``chunk_rows`` or
        ``block_size_bytes`` other than through where the chunks are cut.

        Raises:
            DataError: a malformed row (with its line number), an unparsable value, a label
                other than 0/1, or a missing label.
        """
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise InputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        plans = self._plans or tuple(_plan(p, self.fmt) for p in self.paths)
        yield from rechunk(
            (chunk for plan in plans for chunk in self._iter_file(plan, chunk_rows)), chunk_rows
        )

    def _iter_file(self, plan: _FilePlan, chunk_rows: int) -> Iterator[dict[str, np.ndarray]]:
        rows_before = 0
        batches = (
            _parquet_batches(plan, self.schema, chunk_rows)
            if plan.fmt == "parquet"
            else _csv_batches(plan, self.schema, self.block_size_bytes)
        )
        for batch in batches:
            if batch.num_rows == 0:
                continue
            yield _convert(batch, plan, self.schema, rows_before)
            rows_before += batch.num_rows


def rechunk(
    chunks: Iterable[dict[str, np.ndarray]], chunk_rows: int
) -> Iterator[dict[str, np.ndarray]]:
    """Re-cut a stream of column chunks into chunks of ``chunk_rows`` rows (the last may be short).

    Example:
        >>> parts = [{"x": np.arange(3)}, {"x": np.arange(3, 8)}]
        >>> [c["x"].tolist() for c in rechunk(parts, 3)]
        [[0, 1, 2], [3, 4, 5], [6, 7]]
    """
    buffer: list[dict[str, np.ndarray]] = []
    buffered = 0
    for chunk in chunks:
        n = _num_rows(chunk)
        if n == 0:
            continue
        buffer.append(chunk)
        buffered += n
        if buffered < chunk_rows:
            continue
        merged = _concat(buffer)
        start = 0
        while buffered - start >= chunk_rows:
            yield {k: v[start : start + chunk_rows] for k, v in merged.items()}
            start += chunk_rows
        buffer = [{k: v[start:] for k, v in merged.items()}] if start < buffered else []
        buffered -= start
    if buffered:
        yield _concat(buffer)


def _num_rows(chunk: dict[str, np.ndarray]) -> int:
    return len(next(iter(chunk.values()))) if chunk else 0


def _concat(chunks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(chunks) == 1:
        return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


# --------------------------------------------------------------------------- pyarrow batches


def _csv_batches(
    plan: _FilePlan, schema: FeatureSchema, block_size_bytes: int
) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    needed = _required_columns(schema, plan)
    types: dict[str, pa.DataType] = {schema.label: pa.float64()}
    if plan.fmt == "avazu":
        types[_AVAZU_TIME] = pa.int64()
    for f in schema.fields:
        if f.name in plan.columns:
            types[f.name] = pa.string() if f.type == "categorical" else pa.float64()
    invalid: list[Any] = []

    def on_invalid_row(row: Any) -> str:
        invalid.append(row)
        return "error"

    read_options = pacsv.ReadOptions(
        block_size=block_size_bytes,
        use_threads=False,  # single-threaded parsing keeps line numbers in error messages
        column_names=list(plan.columns) if plan.fmt == "criteo-tsv" else None,
        skip_rows=1 if plan.skip_header else 0,
    )
    parse_options = pacsv.ParseOptions(
        delimiter=plan.delimiter,
        quote_char=False if plan.fmt == "criteo-tsv" else '"',
        invalid_row_handler=on_invalid_row,
    )
    convert_options = pacsv.ConvertOptions(
        column_types={k: v for k, v in types.items() if k in needed},
        include_columns=needed,
        null_values=[""],
        strings_can_be_null=True,
        quoted_strings_can_be_null=True,
    )
    try:
        with pa.input_stream(str(plan.path), compression="detect") as stream:
            reader = pacsv.open_csv(
                stream,
                read_options=read_options,
                parse_options=parse_options,
                convert_options=convert_options,
            )
            yield from reader
    except (pa.ArrowException, OSError) as e:
        raise _csv_error(plan, e, invalid) from None


def _csv_error(plan: _FilePlan, e: BaseException, invalid: list[Any]) -> DataError:
    if invalid:
        row = invalid[0]
        where = f"line {row.number}" if row.number is not None else "a row"
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        return DataError(
            f"{plan.path}: {where}: malformed row: expected {row.expected_columns} columns, "
            f"got {row.actual_columns}: {text!r}"
        )
    msg = one_line(e, None)

    def name_column(m: re.Match[str]) -> str:
        i = int(m.group(1))
        return f"column {plan.columns[i]!r}" if i < len(plan.columns) else m.group(0)

    msg = re.sub(r"In CSV column #(\d+)", name_column, msg)
    msg = re.sub(r"Row #(\d+)", r"line \1", msg)
    return DataError(f"{plan.path}: cannot parse: {msg}")


def _parquet_batches(
    plan: _FilePlan, schema: FeatureSchema, chunk_rows: int
) -> Iterator[pa.RecordBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(plan.path))
        yield from pf.iter_batches(
            # Small chunks are cut from larger batches: per-batch overhead dominates below ~10k.
            batch_size=max(chunk_rows, 1 << 16),
            columns=_required_columns(schema, plan),
            use_threads=False,
        )
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{plan.path}: cannot read parquet: {one_line(e, None)}") from None


# --------------------------------------------------------------------------- arrow -> numpy


def _convert(
    batch: pa.RecordBatch, plan: _FilePlan, schema: FeatureSchema, rows_before: int
) -> dict[str, np.ndarray]:
    """Turn one record batch into the chunk layout described in the module docstring."""
    where = _Where(plan.path, rows_before)
    out: dict[str, np.ndarray] = {}
    hour: np.ndarray | None = None
    for f in schema.fields:
        if f.name not in batch.schema.names:  # a derived Avazu field
            if hour is None:
                hour = _time_array(batch.column(_AVAZU_TIME), _AVAZU_TIME, where)
            out[f.name] = _avazu_derived(f.name, hour, where)
        elif f.type == "categorical":
            out[f.name] = _categorical(batch.column(f.name), f.name, where)
        else:
            out[f.name] = _numeric(batch.column(f.name), f.name, where)
    out[schema.label] = _label(batch.column(schema.label), schema.label, where)
    if schema.time_column is not None and schema.time_column not in out:
        out[schema.time_column] = _time_array(
            batch.column(schema.time_column), schema.time_column, where
        )
    return out


@dataclass(frozen=True)
class _Where:
    path: Path
    rows_before: int

    def row(self, i: int) -> str:
        """1-based data row number (a header line is not counted)."""
        return f"row {self.rows_before + i + 1}"


def _writable(arr: np.ndarray) -> np.ndarray:
    return arr if arr.flags.writeable else arr.copy()


def _is_text(t: pa.DataType) -> bool:
    import pyarrow as pa

    is_view = getattr(pa.types, "is_string_view", None)  # pyarrow >= 16
    return (
        pa.types.is_string(t) or pa.types.is_large_string(t) or (is_view is not None and is_view(t))
    )


def _blank_to_null(arr: pa.Array) -> pa.Array:
    import pyarrow as pa
    import pyarrow.compute as pc

    if arr.null_count == len(arr):
        return arr
    return pc.if_else(pc.equal(arr, ""), pa.scalar(None, arr.type), arr)


def _categorical(arr: pa.Array, name: str, where: _Where) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_string(arr.type):
        try:
            arr = pc.cast(arr, pa.string())
        except pa.ArrowException as e:
            raise DataError(
                f"{where.path}: column {name!r} of type {arr.type} cannot be read as "
                f"categorical: {one_line(e, None)}"
            ) from None
    return _blank_to_null(arr).to_numpy(zero_copy_only=False)


def _numeric(arr: pa.Array, name: str, where: _Where) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if _is_text(arr.type):
        arr = _blank_to_null(arr)
    try:
        arr = pc.cast(arr, pa.float64())
    except pa.ArrowException as e:
        raise DataError(
            f"{where.path}: column {name!r} of type {arr.type} is not numeric: {one_line(e, None)}"
        ) from None
    return _writable(arr.to_numpy(zero_copy_only=False))


def _label(arr: pa.Array, name: str, where: _Where) -> np.ndarray:
    values = _numeric(arr, name, where)
    bad = np.flatnonzero(~((values == 0.0) | (values == 1.0)))
    if bad.size:
        i = int(bad[0])
        v = values[i]
        shown = "missing" if np.isnan(v) else (str(int(v)) if float(v).is_integer() else str(v))
        raise DataError(f"{where.path}: {where.row(i)}: label {name!r} must be 0 or 1, got {shown}")
    return values.astype(np.float32)


def _time_array(arr: pa.Array, name: str, where: _Where) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    t = arr.type
    try:
        if pa.types.is_timestamp(t) or pa.types.is_date(t):
            arr = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.int64())
        elif _is_text(t):
            arr = _blank_to_null(arr)
            try:
                arr = pc.cast(arr, pa.int64())
            except pa.ArrowInvalid:
                arr = pc.cast(arr, pa.float64())
        elif not pa.types.is_integer(t):
            arr = pc.cast(arr, pa.float64())
        else:
            arr = pc.cast(arr, pa.int64())
    except pa.ArrowException as e:
        raise DataError(
            f"{where.path}: time column {name!r} of type {t} is not a number or a timestamp: "
            f"{one_line(e, None)}"
        ) from None
    if arr.null_count and pa.types.is_integer(arr.type):
        arr = pc.cast(arr, pa.float64())
    return _writable(arr.to_numpy(zero_copy_only=False))


def _avazu_derived(name: str, hour: np.ndarray, where: _Where) -> np.ndarray:
    """``hour_of_day`` or ``weekday`` (Monday = 0) as strings, from YYMMDDHH integers."""
    if hour.dtype.kind != "i":
        bad = int(np.flatnonzero(np.isnan(hour) | (hour != np.round(hour)))[0])
        raise DataError(
            f"{where.path}: {where.row(bad)}: {_AVAZU_TIME!r} must be an integer YYMMDDHH, "
            f"got {hour[bad]}"
        )
    hh = hour % 100
    dd = hour // 100 % 100
    mm = hour // 10_000 % 100
    yy = hour // 1_000_000
    ok = (hh < 24) & (dd >= 1) & (dd <= 31) & (mm >= 1) & (mm <= 12) & (yy >= 0) & (yy < 100)
    if not ok.all():
        bad = int(np.flatnonzero(~ok)[0])
        raise DataError(
            f"{where.path}: {where.row(bad)}: {_AVAZU_TIME!r} must be YYMMDDHH, got {hour[bad]}"
        )
    if name == "hour_of_day":
        return _HOUR_STRINGS[hh]
    months = (yy + 30) * 12 + (mm - 1)  # months since 1970-01 (years 2000-2099)
    days = months.astype("datetime64[M]").astype("datetime64[D]").astype(np.int64) + (dd - 1)
    return _WEEKDAY_STRINGS[(days + 3) % 7]  # 1970-01-01 was a Thursday (3)

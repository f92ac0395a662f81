"""Streaming readers against the real Criteo / Avazu / Criteo-attribution samples and bad files."""

from __future__ import annotations

import csv
import datetime
import gzip
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from model.readers import (
    CRITEO_COLUMNS,
    DataError,
    DataSource,
    detect_format,
    load_builtin_schema,
    open_source,
)
from model.schema import FeatureSchema, FieldSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRITEO_TSV = DATA / "criteo_sample" / "criteo_kaggle_raw_1k.tsv"
CRITEO_CSV = DATA / "criteo_sample" / "criteo_sample.csv"
AVAZU_CSV = DATA / "avazu_sample" / "avazu_sample.csv"
ATTRIBUTION = DATA / "criteo_attribution" / "small_train.parquet"
ATTRIBUTION_SCHEMA = (
    Path(__file__).resolve().parents[1] / "model" / "schemas" / ("criteo_attribution.json")
)

needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"real data samples not found at {DATA} (../shared/data)"
)

INTS = [f"I{i}" for i in range(1, 14)]
CATS = [f"C{i}" for i in range(1, 27)]


def read_all(source: DataSource, chunk_rows: int = 65536) -> dict[str, np.ndarray]:
    chunks = list(source.iter_chunks(chunk_rows))
    assert chunks, "no chunks"
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def assert_same_chunks(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        if a[k].dtype == object:
            assert a[k].tolist() == b[k].tolist(), k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def criteo_rows(path: Path, delimiter: str, header: bool) -> list[list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if header:
        assert tuple(rows[0]) == CRITEO_COLUMNS
        rows = rows[1:]
    return rows


def check_criteo(chunk: dict[str, np.ndarray], rows: list[list[str]]) -> None:
    """Every cell of the chunk agrees with the raw text parsed by Python's csv module."""
    assert len(chunk["label"]) == len(rows)
    assert chunk["label"].dtype == np.float32
    for name in INTS:
        assert chunk[name].dtype == np.float64
    for name in CATS:
        assert chunk[name].dtype == object
    for r, raw in enumerate(rows):
        assert len(raw) == 40
        assert chunk["label"][r] == float(raw[0])
        for j, name in enumerate(INTS, start=1):
            got = chunk[name][r]
            if raw[j] == "":
                assert math.isnan(got), (r, name)
            else:
                assert got == float(raw[j]), (r, name)
        for j, name in enumerate(CATS, start=14):
            got = chunk[name][r]
            assert got == (raw[j] or None), (r, name)
            assert got is None or type(got) is str


# --------------------------------------------------------------------------- real samples


@needs_data
def test_criteo_raw_tsv_matches_csv_module() -> None:
    source = open_source([CRITEO_TSV])
    assert source.fmt == "criteo-tsv"
    chunk = read_all(source)
    assert list(chunk) == [*INTS, *CATS, "label"]
    check_criteo(chunk, criteo_rows(CRITEO_TSV, "\t", header=False))
    # Known cells of line 1: I12 and C22 are empty; hex categoricals stay strings.
    assert chunk["I5"][0] == 1382.0
    assert math.isnan(chunk["I12"][0])
    assert chunk["C1"][0] == "68fd1e64"
    assert chunk["C22"][0] is None
    assert chunk["C26"][0] == "9727dd16"


@needs_data
def test_criteo_csv_matches_csv_module() -> None:
    source = open_source([CRITEO_CSV])
    assert source.fmt == "criteo-csv"
    chunk = read_all(source)
    check_criteo(chunk, criteo_rows(CRITEO_CSV, ",", header=True))
    assert math.isnan(chunk["I1"][0]) and chunk["I3"][0] == 260.0
    assert chunk["I2"][1] == -1.0
    assert chunk["C1"][0] == "05db9164" and chunk["C19"][0] is None


@needs_data
def test_avazu_matches_csv_module() -> None:
    source = open_source([AVAZU_CSV])
    assert source.fmt == "avazu"
    assert source.schema.label == "click" and source.schema.time_column == "hour"
    assert "id" not in source.schema.names
    chunk = read_all(source)
    assert set(chunk) == {*source.schema.names, "click", "hour"}
    with open(AVAZU_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(chunk["click"]) == 100
    assert chunk["hour"].dtype == np.int64 and chunk["click"].dtype == np.float32
    for r, raw in enumerate(rows):
        assert chunk["click"][r] == float(raw["click"])
        hour = int(raw["hour"])
        assert chunk["hour"][r] == hour
        day = datetime.date(2000 + hour // 1_000_000, hour // 10_000 % 100, hour // 100 % 100)
        assert chunk["weekday"][r] == str(day.weekday())
        assert chunk["hour_of_day"][r] == str(hour % 100)
        for name in source.schema.names:
            if name not in ("hour_of_day", "weekday"):
                assert chunk[name][r] == (raw[name] or None), (r, name)
    assert chunk["C1"][0] == "1005" and chunk["site_id"][0] == "1fbe01fe"
    assert chunk["weekday"][0] == "1"  # 2014-10-21 was a Tuesday


@needs_data
def test_attribution_parquet_with_shipped_schema() -> None:
    import pyarrow.parquet as pq

    source = open_source([ATTRIBUTION], schema=ATTRIBUTION_SCHEMA)
    assert source.fmt == "parquet"
    chunks = list(source.iter_chunks(50_000))
    assert [len(c["click"]) for c in chunks] == [50_000, 50_000, 15_382]
    chunk = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    assert set(chunk) == {"cat1", "cat4", "cat6", "cat8", "cat9", "click"}
    table = pq.read_table(ATTRIBUTION, columns=["cat1", "cat9", "click"]).slice(0, 3000)
    assert chunk["cat1"][:3000].tolist() == [str(v) for v in table["cat1"].to_pylist()]
    assert chunk["cat9"][:3000].tolist() == [str(v) for v in table["cat9"].to_pylist()]
    assert chunk["cat1"][0] == "28928366"
    np.testing.assert_array_equal(chunk["click"][:3000], table["click"].to_numpy())
    assert 0.3 < chunk["click"].mean() < 0.4


@needs_data
@pytest.mark.parametrize(
    ("path", "schema"),
    [(CRITEO_TSV, None), (CRITEO_CSV, None), (AVAZU_CSV, None), (ATTRIBUTION, ATTRIBUTION_SCHEMA)],
)
def test_chunking_does_not_change_the_data(path: Path, schema: Path | None) -> None:
    source = open_source([path], schema=schema, block_size_bytes=4096)
    small = list(source.iter_chunks(7))
    assert all(len(next(iter(c.values()))) == 7 for c in small[:-1])
    assert 1 <= len(next(iter(small[-1].values()))) <= 7
    joined = {k: np.concatenate([c[k] for c in small]) for k in small[0]}
    assert_same_chunks(joined, read_all(open_source([path], schema=schema), 65536))


@needs_data
def test_auto_detection() -> None:
    assert detect_format(CRITEO_TSV) == "criteo-tsv"
    assert detect_format(CRITEO_CSV) == "criteo-csv"
    assert detect_format(AVAZU_CSV) == "avazu"
    assert detect_format(ATTRIBUTION) == "parquet"


@needs_data
def test_several_files_form_one_stream(tmp_path: Path) -> None:
    once = read_all(open_source([CRITEO_TSV]))
    twice = list(open_source([CRITEO_TSV, CRITEO_TSV]).iter_chunks(300))
    assert [len(c["label"]) for c in twice] == [300] * 6 + [200]
    joined = {k: np.concatenate([c[k] for c in twice]) for k in twice[0]}
    assert_same_chunks(joined, {k: np.concatenate([v, v]) for k, v in once.items()})
    with pytest.raises(DataError, match="different formats"):
        open_source([CRITEO_TSV, CRITEO_CSV])


@needs_data
def test_gzip_tsv_reads_like_plain(tmp_path: Path) -> None:
    gz = tmp_path / "day_0.tsv.gz"
    gz.write_bytes(gzip.compress(CRITEO_TSV.read_bytes()))
    source = open_source([gz])
    assert source.fmt == "criteo-tsv"
    assert_same_chunks(read_all(source), read_all(open_source([CRITEO_TSV])))


@needs_data
def test_builtin_schema_can_be_replaced(tmp_path: Path) -> None:
    schema = FeatureSchema(
        (FieldSpec("I1", "numeric"), FieldSpec("C3", "categorical", encoding="hash", buckets=64))
    )
    chunk = read_all(open_source([CRITEO_TSV], schema=schema))
    assert list(chunk) == ["I1", "C3", "label"]
    with pytest.raises(DataError, match="criteo-csv"):
        open_source([CRITEO_TSV], fmt="criteo-csv")


def test_builtin_schemas() -> None:
    criteo = load_builtin_schema("criteo")
    assert criteo.names == (*INTS, *CATS) and criteo.label == "label"
    assert {f.side for f in criteo.numeric} == {"context"}
    assert {f.transform for f in criteo.numeric} == {"log1p"}
    assert {f.side for f in criteo.categorical} == {"user", "context", "candidate"}
    assert all(f.encoding == "vocab" and f.min_count == 2 for f in criteo.categorical)
    avazu = load_builtin_schema("avazu")
    assert avazu.label == "click" and avazu.time_column == "hour"
    assert "id" not in avazu.names and "hour" not in avazu.names
    assert avazu.field("device_ip").side == "user"
    assert avazu.field("site_id").side == "context" and avazu.field("app_domain").side == "context"
    assert avazu.field("C14").side == "candidate" and avazu.field("banner_pos").side == "candidate"
    attribution = load_builtin_schema("criteo_attribution")
    assert attribution.label == "click" and "c" not in attribution.names


def test_import_does_not_need_pyarrow() -> None:
    code = "import sys; sys.modules['pyarrow'] = None; import model.readers, model.synthetic"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- generic files


def test_generic_csv_with_schema(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("ts,user,price,clicked,extra\n5,17,1.5,1,x\n7,,,0,y\n9,3,2,1,\n")
    schema = FeatureSchema(
        (FieldSpec("user", "categorical", side="user"), FieldSpec("price", "numeric")),
        label="clicked",
        time_column="ts",
    )
    source = open_source([path], schema=schema)
    assert source.fmt == "csv"
    chunk = read_all(source)
    assert list(chunk) == ["user", "price", "clicked", "ts"]
    assert chunk["user"].tolist() == ["17", None, "3"]
    np.testing.assert_array_equal(chunk["price"], [1.5, np.nan, 2.0])
    assert chunk["clicked"].tolist() == [1.0, 0.0, 1.0]
    assert chunk["ts"].dtype == np.int64 and chunk["ts"].tolist() == [5, 7, 9]


def test_generic_parquet_types(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "ad": pa.array([123, None, 7], type=pa.int64()),
            "site": pa.array(["a", "", None]).dictionary_encode(),
            "bid": pa.array([1, None, 3], type=pa.int32()),
            "click": pa.array([True, False, True]),
        }
    )
    pq.write_table(table, path)
    schema = FeatureSchema(
        (
            FieldSpec("ad", "categorical"),
            FieldSpec("site", "categorical"),
            FieldSpec("bid", "numeric"),
        ),
        label="click",
    )
    chunk = read_all(open_source([path], schema=schema))
    assert chunk["ad"].tolist() == ["123", None, "7"]
    assert chunk["site"].tolist() == ["a", None, None]
    np.testing.assert_array_equal(chunk["bid"], [1.0, np.nan, 3.0])
    assert chunk["click"].dtype == np.float32 and chunk["click"].tolist() == [1.0, 0.0, 1.0]


# --------------------------------------------------------------------------- errors


def criteo_line(label: str = "0", n_cats: int = 26) -> str:
    return "\t".join([label] + ["1"] * 13 + ["a1b2c3d4"] * n_cats)


def write_lines(path: Path, lines: Iterator[str] | list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataError, match="no such file") as err:
        open_source([missing])
    assert str(missing) in str(err.value)


def test_empty_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        open_source([write_lines(tmp_path / "e.tsv", [])])


@pytest.mark.parametrize("block_size_bytes", [1024, 1 << 22])
def test_malformed_row_names_file_and_line(tmp_path: Path, block_size_bytes: int) -> None:
    lines = [criteo_line() for _ in range(50)]
    lines.append(criteo_line(n_cats=25))  # line 51 has 39 columns
    lines += [criteo_line() for _ in range(10)]
    path = write_lines(tmp_path / "bad.tsv", lines)
    source = open_source([path], block_size_bytes=block_size_bytes)
    with pytest.raises(DataError, match="line 51: malformed row: expected 40 columns, got 39"):
        list(source.iter_chunks())
    with pytest.raises(DataError, match=str(path)):
        list(source.iter_chunks(7))


def test_label_two_is_rejected(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "two.tsv", [criteo_line("0"), criteo_line("1"), criteo_line("2")])
    with pytest.raises(DataError, match=r"row 3: label 'label' must be 0 or 1, got 2") as err:
        list(open_source([path], fmt="criteo-tsv").iter_chunks())
    assert str(path) in str(err.value)


def test_missing_label_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "l.csv"
    path.write_text("a,y\nx,1\nz,\n")
    schema = FeatureSchema((FieldSpec("a", "categorical"),), label="y")
    with pytest.raises(DataError, match="row 2: label 'y' must be 0 or 1, got missing"):
        list(open_source([path], schema=schema).iter_chunks())


def test_unparsable_number_names_column_and_line(tmp_path: Path) -> None:
    path = tmp_path / "n.csv"
    path.write_text("a,num,y\nx,1,0\nz,oops,1\n")
    schema = FeatureSchema((FieldSpec("a", "categorical"), FieldSpec("num", "numeric")), label="y")
    with pytest.raises(DataError, match=r"column 'num': line 3: .*'oops'"):
        list(open_source([path], schema=schema).iter_chunks())


def test_csv_missing_schema_field_lists_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("user,click\nu1,1\n")
    schema = FeatureSchema(
        (
            FieldSpec("user", "categorical"),
            FieldSpec("ad", "categorical"),
            FieldSpec("price", "numeric"),
        ),
        label="click",
    )
    with pytest.raises(DataError, match=r"missing columns \['ad', 'price'\]") as err:
        open_source([path], schema=schema)
    assert str(path) in str(err.value)


def test_generic_csv_needs_a_schema(tmp_path: Path) -> None:
    path = tmp_path / "g.csv"
    path.write_text("user,click\nu1,1\n")
    with pytest.raises(DataError, match="--schema is required for csv"):
        open_source([path])


@needs_data
def test_parquet_needs_a_schema() -> None:
    with pytest.raises(DataError, match="--schema is required for parquet"):
        open_source([ATTRIBUTION])


def test_bad_arguments(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "ok.tsv", [criteo_line()])
    with pytest.raises(ValueError, match="fmt must be one of"):
        open_source([path], fmt="json")
    with pytest.raises(ValueError, match="chunk_rows"):
        list(open_source([path]).iter_chunks(0))

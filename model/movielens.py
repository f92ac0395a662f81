"""MovieLens-100K as a click-through-rate dataset, built from the ``recbole==1.2.1`` wheel.

The wheel (2 MB, fetched with ``pip download --no-deps``) ships ``recbole/dataset_example/
ml-100k/ml-100k.{inter,user,item}``. :func:`build_movielens` joins them into one Parquet file
plus a feature schema, so that::

    mldcn data movielens data/ml-100k
    mldcn train --data data/ml-100k/ml-100k.parquet --schema data/ml-100k/schema.json \\
        --split time

works. The data is cached under ``.cache/mldcn/`` (``MLDCN_CACHE`` overrides it) and never
committed. One row per rating (100,000 rows), ordered by time:

=============  ===============================================================================
column         meaning
=============  ===============================================================================
label          1 if rating >= 4 else 0 (55.4% positive)
timestamp      seconds since the epoch; the schema's time column (``--split time``)
user_id        user id (943 users)
item_id        movie id (1,682 movies)
age            age bucket of the user, MovieLens-1M style: <18, 18-24, 25-34, 35-44, 45-49,
               50-55, 56+
gender         M / F
occupation     21 values
zip_prefix     first two characters of the zip code (postal region)
release_year   the movie's release year ("" when unknown: the OOV id)
genre          the movie's first listed genre (18 genres)
genre2         its second listed genre, "none" for single-genre movies
=============  ===============================================================================

Every field is categorical with a vocabulary fitted on the training rows (``min_count`` 1 for
the ids, so every training user and movie has an embedding; 2 for ``release_year``). The
rating itself is not a feature. Multi-genre movies keep two genres rather than a multi-hot
vector: the model zoo's fields are single-valued, and 83% of movies have at most two genres.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

RECBOLE_VERSION = "1.2.1"
_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
AGE_EDGES = (18, 25, 35, 45, 50, 56)
AGE_NAMES = ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
FIELDS = (
    ("user_id", "user", 1),
    ("item_id", "candidate", 1),
    ("age", "user", 1),
    ("gender", "user", 1),
    ("occupation", "user", 1),
    ("zip_prefix", "user", 1),
    ("release_year", "candidate", 2),
    ("genre", "candidate", 1),
    ("genre2", "candidate", 1),
)


class MovieLensError(RuntimeError):
    """The recbole wheel could not be fetched or does not hold MovieLens-100K."""


def default_cache() -> Path:
    """``$MLDCN_CACHE`` or ``.cache/mldcn`` under the current directory."""
    return Path(os.environ.get("MLDCN_CACHE", ".cache/mldcn"))


def fetch_wheel(cache_dir: str | Path | None = None, timeout_s: float = 120.0) -> Path:
    """The recbole wheel in ``cache_dir`` (downloaded with pip on first use)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache()
    folder = cache / f"recbole-{RECBOLE_VERSION}"
    found = sorted(folder.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"recbole=={RECBOLE_VERSION}", "-d", str(folder)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MovieLensError(f"pip download recbole=={RECBOLE_VERSION} failed: {e}") from None
    found = sorted(folder.glob(f"recbole-{RECBOLE_VERSION}-*.whl"))
    if done.returncode != 0 or not found:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise MovieLensError(f"pip download recbole=={RECBOLE_VERSION} failed: {tail[0]}")
    return found[0]


def _read_table(zf: zipfile.ZipFile, kind: str) -> tuple[list[str], list[list[str]]]:
    try:
        text = zf.read(_MEMBER.format(kind)).decode("latin-1")
    except KeyError:
        raise MovieLensError(f"{zf.filename} has no {_MEMBER.format(kind)}") from None
    lines = text.rstrip("\n").split("\n")
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return header, [line.split("\t") for line in lines[1:]]


def age_bucket(age: int) -> str:
    """MovieLens-1M age group of an age in years.

    Example:
        >>> [age_bucket(a) for a in (7, 18, 24, 25, 49, 50, 56, 73)]
        ['<18', '18-24', '18-24', '25-34', '45-49', '50-55', '56+', '56+']
    """
    return AGE_NAMES[int(np.searchsorted(AGE_EDGES, age, side="right"))]


def load_tables(wheel: str | Path) -> dict[str, np.ndarray]:
    """The joined columns (see the module docstring), rows ordered by (timestamp, user, item)."""
    with zipfile.ZipFile(wheel) as zf:
        ih, inter = _read_table(zf, "inter")
        uh, users = _read_table(zf, "user")
        mh, items = _read_table(zf, "item")
    ucol = {name: i for i, name in enumerate(uh)}
    user = {
        row[ucol["user_id"]]: (
            age_bucket(int(row[ucol["age"]])),
            row[ucol["gender"]],
            row[ucol["occupation"]],
            row[ucol["zip_code"]][:2],
        )
        for row in users
    }
    mcol = {name: i for i, name in enumerate(mh)}
    item = {}
    for row in items:
        row = row + [""] * (len(mh) - len(row))
        genres = row[mcol["class"]].split()
        item[row[mcol["item_id"]]] = (
            row[mcol["release_year"]].strip(),
            genres[0] if genres else "unknown",
            genres[1] if len(genres) > 1 else "none",
        )
    icol = {name: i for i, name in enumerate(ih)}
    rows = sorted(
        (int(float(r[icol["timestamp"]])), r[icol["user_id"]], r[icol["item_id"]],
         float(r[icol["rating"]]))
        for r in inter
    )
    missing_users = {u for _, u, _, _ in rows if u not in user}
    missing_items = {i for _, _, i, _ in rows if i not in item}
    if missing_users or missing_items:
        raise MovieLensError(
            f"ratings refer to {len(missing_users)} unknown users, {len(missing_items)} movies"
        )
    cols: dict[str, list[Any]] = {name: [] for name, _, _ in FIELDS}
    labels, times = [], []
    for t, u, i, rating in rows:
        labels.append(1 if rating >= 4 else 0)
        times.append(t)
        age, gender, occupation, zip_prefix = user[u]
        year, genre, genre2 = item[i]
        for name, value in zip(
            ("user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year",
             "genre", "genre2"),
            (u, i, age, gender, occupation, zip_prefix, year, genre, genre2), strict=True,
        ):
            cols[name].append(value)
    out = {"label": np.array(labels, dtype=np.int8), "timestamp": np.array(times, np.int64)}
    out.update({name: np.array(values, dtype=object) for name, values in cols.items()})
    return out


def schema_dict() -> dict[str, Any]:
    """The feature schema of the built file (``model.schema.FeatureSchema`` JSON)."""
    return {
        "label": "label",
        "time_column": "timestamp",
        "fields": [
            {"name": name, "type": "categorical", "side": side, "encoding": "vocab",
             "min_count": min_count, "max_vocab": None}
            for name, side, min_count in FIELDS
        ],
        "extra": {
            "dataset": f"MovieLens-100K from the recbole=={RECBOLE_VERSION} wheel; label = "
                       "rating >= 4; one row per rating, ordered by timestamp",
            "built_by": "model/movielens.py (mldcn data movielens)",
        },
    }


def build_movielens(
    out_dir: str | Path, cache_dir: str | Path | None = None, wheel: str | Path | None = None
) -> dict[str, Any]:
    """Write ``OUT_DIR/ml-100k.parquet`` and ``OUT_DIR/schema.json``; return a summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    wheel_path = Path(wheel) if wheel is not None else fetch_wheel(cache_dir)
    cols = load_tables(wheel_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({
        name: pa.array(values.tolist(), type=pa.string()) if values.dtype == object
        else pa.array(values)
        for name, values in cols.items()
    })
    data_path, schema_path = out / "ml-100k.parquet", out / "schema.json"
    pq.write_table(table, data_path)
    schema_path.write_text(json.dumps(schema_dict(), indent=2) + "\n")
    return {
        "data": str(data_path),
        "schema": str(schema_path),
        "rows": int(len(cols["label"])),
        "positive_rate": float(cols["label"].mean()),
        "users": int(len(set(cols["user_id"]))),
        "items": int(len(set(cols["item_id"]))),
        "wheel": str(wheel_path),
    }

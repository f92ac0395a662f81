"""Feature encoders: fitting, transforming, JSON round trip, no torch needed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from model.encoders import (
    CategoricalEncoder,
    EncoderFitter,
    FeatureEncoders,
    canonical_category,
    stable_hash,
)
from model.schema import FeatureSchema, FieldSpec, SchemaError


def _schema() -> FeatureSchema:
    return FeatureSchema(
        fields=(
            FieldSpec("user", "categorical", side="user", min_count=2),
            FieldSpec("site", "categorical", side="context", encoding="hash", buckets=17),
            FieldSpec("ad", "categorical", side="candidate", max_vocab=2),
            FieldSpec("age", "numeric", side="user", transform="log1p"),
            FieldSpec("bid", "numeric", side="candidate", transform="none", clip=(0.0, 5.0),
                      default=1.0),
        ),
        label="click",
    )


def _chunk(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    users = np.array([f"u{k}" for k in rng.integers(0, 6, n)], dtype=object)
    users[::7] = None
    return {
        "user": users,
        "site": np.array([f"s{k}" for k in rng.integers(0, 40, n)], dtype=object),
        "ad": np.array([["a", "b", "c"][k] for k in rng.choice(3, n, p=[0.5, 0.3, 0.2])],
                       dtype=object),
        "age": np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 90, n).astype(float)),
        "bid": rng.random(n) * 10,
        "click": (rng.random(n) < 0.3).astype(np.float32),
    }


def _fit(chunks: list[dict[str, np.ndarray]]) -> FeatureEncoders:
    fitter = EncoderFitter(_schema())
    for c in chunks:
        fitter.update(c)
    return fitter.finish()


def test_streaming_fit_equals_one_shot_fit() -> None:
    rng = np.random.default_rng(0)
    chunks = [_chunk(rng, n) for n in (50, 3, 200, 1)]
    whole = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    a, b = _fit(chunks), _fit([whole])
    assert a.categorical[0].vocab == b.categorical[0].vocab
    for ea, eb in zip(a.numeric, b.numeric, strict=True):
        np.testing.assert_allclose(
            [ea.mean, ea.std, ea.lo, ea.hi], [eb.mean, eb.std, eb.lo, eb.hi], rtol=1e-12
        )
        x = whole[ea.spec.name]
        t = ea.apply_transform(ea.spec.transform, x[np.isfinite(x)])
        assert ea.mean == pytest.approx(t.mean())
        assert ea.std == pytest.approx(t.std())


def test_vocab_min_count_max_vocab_and_oov() -> None:
    fitter = EncoderFitter(_schema())
    fitter.update({
        "user": np.array(["x", "x", "y", None, ""], dtype=object),
        "site": np.array(["s"] * 5, dtype=object),
        "ad": np.array(["a", "a", "a", "b", "c"], dtype=object),
        "age": np.ones(5), "bid": np.ones(5), "click": np.zeros(5, np.float32),
    })
    enc = fitter.finish()
    user, ad = enc.encoder("user"), enc.encoder("ad")
    assert isinstance(user, CategoricalEncoder)
    assert user.vocab == ["x"]  # "y" seen once < min_count 2; None and "" are missing
    assert ad.vocab == ["a", "b"]  # max_vocab 2 keeps the most frequent (ties by value)
    assert user.transform(np.array(["x", "y", None, "zz"], dtype=object)).tolist() == [1, 0, 0, 0]
    assert enc.cardinalities == [2, 17, 3]


def test_hash_encoding_is_stable_and_in_range() -> None:
    enc = _fit([_chunk(np.random.default_rng(1), 100)])
    site = enc.encoder("site")
    ids = site.transform(["s1", "s2", None, "never-seen"])
    assert ids[2] == 0
    assert ids[0] == 1 + stable_hash("site", "s1") % 16
    assert ((ids >= 0) & (ids < 17)).all()
    # Stable across processes (unlike Python's salted hash()).
    code = "from model.encoders import stable_hash; print(stable_hash('site', 's1'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == stable_hash("site", "s1")


def test_canonical_category() -> None:
    assert canonical_category(3) == canonical_category("3") == canonical_category(3.0) == "3"
    assert canonical_category(np.int64(7)) == "7"
    assert canonical_category(float("nan")) is None
    assert canonical_category("") is None
    assert canonical_category(None) is None
    assert canonical_category(2.5) == "2.5"


def test_numeric_transform_clip_default() -> None:
    enc = _fit([_chunk(np.random.default_rng(2), 500)])
    bid = enc.encoder("bid")
    out = bid.transform([0.0, 5.0, 100.0, None, float("nan")])
    # clip (0, 5) from the schema, then standardise; missing uses the schema default 1.0
    expected = (np.array([0.0, 5.0, 5.0, 1.0, 1.0]) - bid.mean) / bid.std
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-6)
    age = enc.encoder("age")
    a = age.transform([None])
    assert a[0] == pytest.approx((age.fill - age.mean) / age.std)


def test_json_round_trip_gives_identical_outputs(tmp_path) -> None:
    rng = np.random.default_rng(3)
    enc = _fit([_chunk(rng, 300)])
    path = tmp_path / "enc.json"
    enc.save(path)
    again = FeatureEncoders.load(path)
    assert again.to_dict() == enc.to_dict()
    batch = _chunk(rng, 64)
    for x, y in zip(enc.transform(batch), again.transform(batch), strict=True):
        np.testing.assert_array_equal(x, y)


def test_transform_shapes_and_errors() -> None:
    enc = _fit([_chunk(np.random.default_rng(4), 50)])
    cat, dense = enc.transform(_chunk(np.random.default_rng(5), 1))
    assert cat.shape == (1, 3) and cat.dtype == np.int64
    assert dense.shape == (1, 2) and dense.dtype == np.float32
    bad = _chunk(np.random.default_rng(5), 4)
    del bad["ad"]
    with pytest.raises(KeyError, match="ad"):
        enc.transform(bad)
    bad = _chunk(np.random.default_rng(5), 4)
    bad["bid"] = bad["bid"][:3]
    with pytest.raises(ValueError, match="bid"):
        enc.transform(bad)


def test_load_rejects_corrupt_encoders(tmp_path) -> None:
    enc = _fit([_chunk(np.random.default_rng(6), 50)])
    d = enc.to_dict()
    d["categorical"][0]["cardinality"] += 5
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(SchemaError, match="cardinality"):
        FeatureEncoders.load(p)
    p.write_text("{not json")
    with pytest.raises(SchemaError, match="cannot read"):
        FeatureEncoders.load(p)


def test_encoders_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import model, model.schema, model.encoders, model.split\n"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _plain_values(rng: np.random.Generator, n: int) -> list[object]:
    pool: list[object] = [None, "", "3", "-0", "007", "3.0", "1.5", "inf", "nan", "a", "b",
                          "True", 3, -0, 0, 7, 10**20, 3.0, -0.0, 1.5, 2.5, 1e20, float("inf"),
                          float("nan"), True, False, "1", "0", "2.5", "1e+20",
                          "100000000000000000000"]
    return [pool[i] for i in rng.integers(0, len(pool), n)]


@pytest.mark.parametrize("encoding", ["vocab", "hash"])
def test_one_lookup_per_value_equals_canonicalising_each(encoding: str) -> None:
    """The lookup table's int/float aliases (vocab) and the memo (hash) give exactly the ids
    that canonicalising every value first gives, for every kind of JSON scalar."""
    vocab = ["3", "-0", "007", "1.5", "inf", "nan", "a", "1", "0", "2.5", "1e+20",
             "100000000000000000000", "True"]
    spec = (FieldSpec("f", "categorical", encoding="hash", buckets=97) if encoding == "hash"
            else FieldSpec("f", "categorical"))
    enc = CategoricalEncoder(spec, vocab if encoding == "vocab" else None)
    index = {v: i + 1 for i, v in enumerate(vocab)}

    def reference(v: object) -> int:
        key = canonical_category(v)
        if key is None:
            return 0
        if encoding == "vocab":
            return index.get(key, 0)
        return 1 + stable_hash("f", key) % 96

    rng = np.random.default_rng(0)
    for _ in range(20):  # the hash memo fills up as it goes
        values = _plain_values(rng, 200)
        want = [reference(v) for v in values]
        assert enc.lookup(values).tolist() == want
        assert enc.transform(values).tolist() == want
        assert enc.transform(np.array(values, dtype=object)).tolist() == want
        assert [enc.id_of(v) for v in values] == want
    assert enc.transform(np.array([3, 7], dtype=np.int64)).tolist() == [reference(3), reference(7)]
    assert enc.transform([np.str_("a"), np.int64(3)]).tolist() == [reference("a"), reference(3)]

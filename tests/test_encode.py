"""Request encoding (service/encode.py) equals the training pipeline's own transform.

The request encoder writes user/context fields once per request and encodes all numeric
columns of a side in one vectorised call; the training code transforms full columns field by
field (model/encoders.py). Both must give the same model inputs, bit for bit, in every layout
a request can take: columnar or row candidates, /v2 tensors given per row or broadcast.
"""

from __future__ import annotations

import numpy as np
import pytest

from model.encoders import EncoderFitter, FeatureEncoders
from model.schema import FeatureSchema, FieldSpec
from service.encode import RequestEncoder, RequestError


def _encoders() -> FeatureEncoders:
    schema = FeatureSchema(fields=(
        FieldSpec("u_cat", "categorical", side="user"),
        FieldSpec("u_num", "numeric", side="user", transform="log1p"),
        FieldSpec("c_hash", "categorical", side="context", encoding="hash", buckets=31),
        FieldSpec("c_num", "numeric", side="context", transform="none", clip=(-1.0, 5.0)),
        FieldSpec("ad", "categorical", side="candidate", min_count=1),
        FieldSpec("ad_hash", "categorical", side="candidate", encoding="hash", buckets=101),
        FieldSpec("price", "numeric", side="candidate", transform="log1p", default=2.0),
        FieldSpec("age", "numeric", side="candidate", transform="none"),
    ))
    rng = np.random.default_rng(1)
    n = 500
    fitter = EncoderFitter(schema)
    fitter.update({
        "u_cat": np.array([f"u{k}" for k in rng.integers(0, 9, n)], dtype=object),
        "u_num": rng.exponential(10.0, n), "c_hash": np.array(["x"] * n, dtype=object),
        "c_num": rng.normal(1.0, 2.0, n),
        "ad": np.array([str(k) for k in rng.integers(0, 40, n)], dtype=object),
        "ad_hash": np.array([f"h{k}" for k in rng.integers(0, 99, n)], dtype=object),
        "price": rng.exponential(3.0, n), "age": rng.normal(30, 9, n),
    })
    return fitter.finish()


def _request(rng: np.random.Generator, n: int) -> tuple[dict, dict, dict]:
    def cat(prefix: str) -> list[object]:
        pool = [None, "", 3, 3.0, True, "17", f"{prefix}1", f"{prefix}99", "never-seen", 2.5]
        return [pool[i] for i in rng.integers(0, len(pool), n)]

    def num() -> list[object]:
        pool = [None, 0, -3, 2.5, 1e6, -0.0, 7]
        return [pool[i] for i in rng.integers(0, len(pool), n)]

    user = {"u_cat": "u3", "u_num": 12.5}
    context = {"c_hash": "x", "c_num": 9.0}
    cands = {"ad": cat(""), "ad_hash": cat("h"), "price": num(), "age": num()}
    return user, context, cands


def _reference(enc: FeatureEncoders, user: dict, context: dict, cands: dict, n: int
               ) -> tuple[np.ndarray, np.ndarray]:
    cols = {f.name: [{**user, **context}.get(f.name)] * n for f in enc.schema.fields}
    cols.update({k: v for k, v in cands.items()})
    return enc.transform(cols)


@pytest.mark.parametrize("n", [1, 7, 300])
def test_columnar_and_row_requests_encode_like_training(n: int) -> None:
    enc = _encoders()
    rq = RequestEncoder(enc)
    rng = np.random.default_rng(n)
    for _ in range(5):
        user, context, cands = _request(rng, n)
        want_cat, want_dense = _reference(enc, user, context, cands, n)
        for plain in (False, True):
            cat, dense = rq.encode(user, context, cands, plain=plain)
            np.testing.assert_array_equal(cat, want_cat)
            np.testing.assert_array_equal(dense, want_dense)
        rows = [{k: v[i] for k, v in cands.items()} for i in range(n)]
        cat, dense = rq.encode(user, context, rows)
        np.testing.assert_array_equal(cat, want_cat)
        np.testing.assert_array_equal(dense, want_dense)
        # a field left out is missing, in every row
        partial = {k: v for k, v in cands.items() if k not in ("price", "ad")}
        want_cat, want_dense = _reference(enc, user, {}, {**partial, "price": [None] * n,
                                                          "ad": [None] * n}, n)
        cat, dense = rq.encode(user, {}, partial)
        np.testing.assert_array_equal(cat, want_cat)
        np.testing.assert_array_equal(dense, want_dense)


def test_tensor_columns_broadcast_or_per_row_encode_like_training() -> None:
    enc = _encoders()
    rq = RequestEncoder(enc)
    n = 50
    user, context, cands = _request(np.random.default_rng(5), n)
    want_cat, want_dense = _reference(enc, user, context, cands, n)
    # user/context once (broadcast), candidates per row; numeric columns as arrays
    columns = {k: (np.array([np.nan if v is None else v for v in col], dtype=np.float32)
                   if k in ("price", "age") else col) for k, col in cands.items()}
    cat, dense = rq.encode_columns({**user, **context}, columns, n, lambda f, i: f)
    np.testing.assert_array_equal(cat, want_cat)
    np.testing.assert_allclose(dense, want_dense, atol=1e-6)  # float32 inputs
    # the same fields, all given per row
    everything = {**{k: [v] * n for k, v in {**user, **context}.items()}, **cands}
    cat, dense = rq.encode_columns({}, everything, n, lambda f, i: f)
    np.testing.assert_array_equal(cat, want_cat)
    np.testing.assert_array_equal(dense, want_dense)


def test_type_and_name_errors_name_the_field() -> None:
    rq = RequestEncoder(_encoders())
    cases = [
        (({"u_num": "3"}, {}, {"ad": ["1"]}), "user.u_num"),
        (({"u_num": True}, {}, {"ad": ["1"]}), "user.u_num"),
        (({}, {"c_num": "x"}, {"ad": ["1"]}), "context.c_num"),
        (({}, {}, {"price": [1.0, "2"]}), "candidates.price[1]"),
        (({}, {}, [{"price": 1.0}, {"age": False}]), "candidates[1].age"),
        (({"ad": "1"}, {}, {"ad": ["1"]}), "user.ad"),
        (({}, {"u_cat": "1"}, {"ad": ["1"]}), "context.u_cat"),
        (({}, {}, {"nope": ["1"]}), "candidates.nope"),
        (({}, {}, [{}, {"u_cat": 1}]), "candidates[1].u_cat"),
        (({}, {}, {"ad": ["1"], "price": [1, 2]}), "candidates.price"),
    ]
    for (user, context, cands), field in cases:
        with pytest.raises(RequestError) as e:
            rq.encode(user, context, cands)
        assert e.value.field == field, (field, e.value)
    # not strict: names the model does not read are ignored (a fallback's encoding)
    cat, _ = rq.encode({"nope": 1}, {}, {"ad": ["1"], "other": [2]}, strict=False)
    assert cat.shape == (1, 4)

"""The torch-free model repository: layout and visibility rules, model.json validation,
content-hash and graph checks, and the atomic publish helpers.

Versions here are hand-made (a tiny ONNX graph built with onnx.helper, encoders fitted with
numpy), so these tests need neither torch nor a trained model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.meta import io_spec
from export.repository import (
    ModelRepository,
    ModelVersion,
    RepositoryError,
    publish,
    sha256_file,
    staging_dir,
    validate_meta,
    write_meta,
)
from model.cli import main
from model.encoders import EncoderFitter, FeatureEncoders
from model.schema import FeatureSchema, FieldSpec


@pytest.fixture(scope="module")
def encoders() -> FeatureEncoders:
    schema = FeatureSchema(fields=(
        FieldSpec("user", "categorical", side="user"),
        FieldSpec("ad", "categorical", encoding="hash", buckets=8),
        FieldSpec("price", "numeric", transform="log1p"),
    ))
    fitter = EncoderFitter(schema)
    fitter.update({"user": np.array(["a", "b", "a", "c"], dtype=object),
                   "ad": np.array(["x", "y", "z", None], dtype=object),
                   "price": np.array([1.0, 10.0, 100.0, np.nan])})
    return fitter.finish()


def _graph(num_cat: int, num_dense: int, dense_name: str = "dense") -> onnx.ModelProto:
    """probability = sigmoid(0.1·Σ cat_ids + Σ dense): a stand-in with the served signature."""
    nodes = [
        helper.make_node("Cast", ["cat_ids"], ["cat_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["cat_f", "axes"], ["cat_s"], keepdims=0),
        helper.make_node("Mul", ["cat_s", "scale"], ["cat_w"]),
        helper.make_node("ReduceSum", [dense_name, "axes"], ["dense_s"], keepdims=0),
        helper.make_node("Add", ["cat_w", "dense_s"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "stand-in",
        [helper.make_tensor_value_info("cat_ids", TensorProto.INT64, ["batch", num_cat]),
         helper.make_tensor_value_info(dense_name, TensorProto.FLOAT, ["batch", num_dense])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1]),
                     helper.make_tensor("scale", TensorProto.FLOAT, [], [0.1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _meta(encoders: FeatureEncoders, onnx_path: Path) -> dict:
    """A model.json as format version 1 wrote it (the feature schema also at the top level);
    ``write_meta`` stores it as version 2."""
    inputs, outputs = io_spec(len(encoders.cardinalities), encoders.num_dense)
    return {
        "format_version": 1, "created_at": "2025-01-31T12:00:00Z", "model_file": "model.onnx",
        "sha256": sha256_file(onnx_path), "bytes": onnx_path.stat().st_size,
        "precision": "fp32", "inputs": inputs, "outputs": outputs,
        "model": {"arch": "mldcn", "config": {"arch": "mldcn"},
                  "cardinalities": encoders.cardinalities, "num_dense": encoders.num_dense},
        "schema": encoders.schema.to_dict(), "encoders": encoders.to_dict(),
        "cost": {"flops_per_example": 1000, "matmul_flops_per_example": 800, "params": 50},
        "metrics": {"valid": {"auc": 0.75, "logloss": 0.5, "rows": 10}, "test": None,
                    "bayes_auc": float("nan")},
        "parity": {"max_abs_diff": 3e-8, "tolerance": 1e-5, "checks": []},
        "onnx": {"opset": 17}, "source": {},
    }


def _add_version(repo: Path, name: str, version: int, encoders: FeatureEncoders) -> ModelVersion:
    with staging_dir(repo, name) as tmp:
        onnx.save(_graph(len(encoders.cardinalities), encoders.num_dense), str(tmp / "model.onnx"))
        write_meta(tmp / "model.json", _meta(encoders, tmp / "model.onnx"))
        final = publish(tmp, repo / name, version)
    return ModelVersion(name, version, final)


@pytest.fixture
def repo(tmp_path, encoders) -> Path:
    root = tmp_path / "models"
    for name, version in (("ctr", 1), ("ctr", 2), ("ctr", 10), ("other", 3)):
        _add_version(root, name, version, encoders)
    # never versions: dot folders (staging leftovers), files, non-canonical numbers, other names
    for junk in ("ctr/.export-99-abcd", "ctr/007", "ctr/latest", ".hidden/1", "empty"):
        (root / junk).mkdir(parents=True)
    (root / "ctr" / "4").write_text("a file, not a folder")
    return root


def test_listing_follows_the_visibility_rules(repo) -> None:
    r = ModelRepository(repo)
    assert [(v.name, v.version) for v in r.list()] == [
        ("ctr", 1), ("ctr", 2), ("ctr", 10), ("other", 3)]
    assert r.names() == ["ctr", "other"]
    assert r.versions("ctr") == [1, 2, 10]
    assert r.load_version("ctr").version == 10  # latest = largest number
    assert r.load_version("ctr", 2).path == repo / "ctr" / "2"
    assert r.next_version("ctr") == 11 and r.next_version("new") == 1


def test_missing_models_and_versions(repo, tmp_path) -> None:
    r = ModelRepository(repo)
    with pytest.raises(RepositoryError, match="no model named 'nope'"):
        r.load_version("nope")
    with pytest.raises(RepositoryError, match=r"no version 5 \(versions: \[1, 2, 10\]\)"):
        r.load_version("ctr", 5)
    with pytest.raises(RepositoryError, match="does not exist"):
        ModelRepository(tmp_path / "absent").list()


def test_a_version_verifies_and_carries_its_encoders(repo, encoders) -> None:
    mv = ModelRepository(repo).load_version("ctr").verify()
    session = mv.open_session()
    assert mv.verify(session=session) is mv
    assert mv.encoders.to_dict() == encoders.to_dict()
    assert mv.onnx_path == repo / "ctr" / "10" / "model.onnx"
    cat, dense = mv.encoders.transform({"user": ["a", "zzz"], "ad": ["x", None],
                                        "price": [3.0, None]})
    (p,) = session.run(None, {"cat_ids": cat, "dense": dense})
    assert p.shape == (2,) and p.dtype == np.float32
    assert mv.meta.metrics["bayes_auc"] is None  # NaN is written as null: strict JSON
    assert mv.summary()["valid_auc"] == 0.75


def test_hash_mismatch_is_detected(repo) -> None:
    mv = ModelRepository(repo).load_version("ctr")
    data = bytearray(mv.onnx_path.read_bytes())
    data[-1] ^= 0xFF
    mv.onnx_path.write_bytes(bytes(data))
    with pytest.raises(RepositoryError, match=r"10/model.onnx: sha256 .* does not match"):
        mv.verify()
    mv.onnx_path.write_bytes(bytes(data) + b"\0")
    with pytest.raises(RepositoryError, match="model.onnx: has .* bytes, model.json says"):
        mv.verify()
    mv.onnx_path.unlink()
    with pytest.raises(RepositoryError, match="model.onnx: is missing"):
        mv.verify()


def test_graph_inputs_must_match_model_json(repo, encoders) -> None:
    mv = ModelRepository(repo).load_version("ctr")
    other = _graph(len(encoders.cardinalities), encoders.num_dense, dense_name="features")
    onnx.save(other, str(mv.onnx_path))
    meta = json.loads(mv.meta_path.read_text())
    meta["sha256"], meta["bytes"] = sha256_file(mv.onnx_path), mv.onnx_path.stat().st_size
    mv.meta_path.write_text(json.dumps(meta))
    with pytest.raises(RepositoryError, match="model.onnx: graph inputs .*features"):
        ModelRepository(repo).load_version("ctr").verify()
    ModelRepository(repo).load_version("ctr").verify(check_graph=False)  # the hash is right


def _edit(meta: dict, change) -> dict:
    meta = json.loads(json.dumps(meta))
    change(meta)
    return meta


def _set_dense_width(meta: dict) -> None:
    meta["inputs"][1]["shape"] = ["batch", 7]


def _rename_input(meta: dict) -> None:
    meta["inputs"][0]["name"] = "ids"


def _drop_key(meta: dict) -> None:
    del meta["parity"]


def _other_cardinalities(meta: dict) -> None:
    meta["model"]["cardinalities"][0] += 1


def _broken_encoders(meta: dict) -> None:
    meta["encoders"]["categorical"][0]["cardinality"] = 99


def _future_format(meta: dict) -> None:
    meta["format_version"] = 3


def _bad_hash(meta: dict) -> None:
    meta["sha256"] = "ABC"


def _bad_count(meta: dict) -> None:
    meta["bytes"] = -1


def _bad_precision(meta: dict) -> None:
    meta["precision"] = "int8"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set_dense_width, r"inputs .* disagree with the feature layout"),
        (_rename_input, r"inputs .*'ids'.* disagree"),
        (_drop_key, r"parity: Field required"),
        (_other_cardinalities, "encoders give cardinalities"),
        (_broken_encoders, "encoders are not valid"),
        (_future_format, r"format_version 3 is not supported \(this version reads 1 and 2\)"),
        (_bad_precision, "precision: Input should be 'fp32' or 'fp16'"),
        (_bad_hash, "sha256: String should match pattern"),
        (_bad_count, "bytes: Input should be greater than or equal to 0"),
    ],
)
def test_inconsistent_model_json_is_refused(repo, change, message) -> None:
    mv = ModelRepository(repo).load_version("other")
    meta = _edit(json.loads(mv.meta_path.read_text()), change)
    mv.meta_path.write_text(json.dumps(meta))
    with pytest.raises(RepositoryError, match=message) as info:
        ModelRepository(repo).load_version("other").verify()
    assert str(info.value).startswith(str(mv.meta_path))
    with pytest.raises(RepositoryError):
        validate_meta(meta, mv.meta_path)


def test_version_1_files_still_load(repo, encoders) -> None:
    """A model.json written as format version 1 (the schema stored twice) loads as version 2,
    verifies and serves the same encoders; a version-1 file whose two schemas differ is
    refused."""
    mv = ModelRepository(repo).load_version("other")
    v1 = _meta(encoders, mv.onnx_path)
    mv.meta_path.write_text(json.dumps({**v1, "metrics": {}}))
    loaded = ModelRepository(repo).load_version("other").verify()
    assert loaded.meta.format_version == 2 and loaded.meta.schema == encoders.schema.to_dict()
    assert loaded.encoders.to_dict() == encoders.to_dict()
    assert "schema" not in json.loads(loaded.meta.to_json())  # rewritten: stored once
    # what the old reader never checked still loads: unknown keys, a tensor without its
    # KServe datatype, a float parameter count
    lax = json.loads(json.dumps(v1))
    lax["notes"] = "hand-written"
    lax["model"]["owner"] = "ads"
    del lax["inputs"][0]["datatype"]
    lax["cost"]["params"] = 50.0
    mv.meta_path.write_text(json.dumps(lax))
    meta = ModelRepository(repo).load_version("other").verify().meta
    assert meta.inputs[0].datatype == "INT64" and meta.cost.params == 50.0
    assert meta.cost.flops_per_example == 1000 and isinstance(meta.cost.flops_per_example, int)
    v1["schema"]["fields"][0]["side"] = "candidate"
    mv.meta_path.write_text(json.dumps(v1))
    with pytest.raises(RepositoryError, match="schema disagrees with the encoders' schema"):
        ModelRepository(repo).load_version("other").verify()
    del v1["schema"]
    with pytest.raises(RepositoryError, match=r"schema: field required \(format_version 1\)"):
        validate_meta(v1, mv.meta_path)


def test_the_writer_refuses_keys_the_format_does_not_have(tmp_path, encoders) -> None:
    """Reading ignores unknown keys; writing refuses them (a typo would be dropped silently)."""
    onnx_path = tmp_path / "model.onnx"
    onnx.save(_graph(len(encoders.cardinalities), encoders.num_dense), str(onnx_path))
    meta = _meta(encoders, onnx_path)
    meta["model"]["cardinality"] = 3
    with pytest.raises(RepositoryError, match=r"does not have: \['model.cardinality'\]"):
        write_meta(tmp_path / "model.json", meta)
    assert not (tmp_path / "model.json").exists()


def test_unreadable_model_json(repo) -> None:
    mv = ModelRepository(repo).load_version("other")
    mv.meta_path.write_text("{")
    with pytest.raises(RepositoryError, match="model.json: is not valid JSON"):
        ModelRepository(repo).load_version("other").meta  # noqa: B018
    mv.meta_path.unlink()
    with pytest.raises(RepositoryError, match="model.json: cannot read"):
        ModelRepository(repo).load_version("other").encoders  # noqa: B018


def test_staging_is_removed_on_failure(tmp_path, encoders) -> None:
    repo = tmp_path / "models"
    with pytest.raises(RuntimeError), staging_dir(repo, "ctr") as tmp:
        assert tmp.parent == repo / "ctr" and tmp.name.startswith(".export-")
        (tmp / "model.onnx").write_bytes(b"half a model")
        raise RuntimeError("export failed")
    assert not repo.exists()  # the folders this export created are gone too
    _add_version(repo, "ctr", 1, encoders)
    with pytest.raises(KeyboardInterrupt), staging_dir(repo, "ctr"):
        raise KeyboardInterrupt
    assert sorted(p.name for p in (repo / "ctr").iterdir()) == ["1"]


def test_publish_is_one_rename_and_never_overwrites(repo, encoders, monkeypatch) -> None:
    before = sorted(str(p) for p in repo.rglob("*"))
    with pytest.raises(RepositoryError, match="already exists"), staging_dir(repo, "ctr") as tmp:
        onnx.save(_graph(2, 1), str(tmp / "model.onnx"))
        publish(tmp, repo / "ctr", version=2)
    calls = []

    def failing_rename(src, dst):
        calls.append((src, dst))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(RepositoryError, match="cannot publish"), staging_dir(repo, "ctr") as tmp:
        onnx.save(_graph(2, 1), str(tmp / "model.onnx"))
        publish(tmp, repo / "ctr")
    monkeypatch.undo()
    assert calls and calls[0][1] == repo / "ctr" / "11"
    assert sorted(str(p) for p in repo.rglob("*")) == before
    assert _add_version(repo, "ctr", 11, encoders).path.is_dir()


def test_publish_takes_the_next_free_number(tmp_path, encoders, monkeypatch) -> None:
    repo = tmp_path / "models"
    _add_version(repo, "ctr", 1, encoders)
    real_rename = os.rename

    def racing_rename(src, dst):  # another export claims version 2 first
        if Path(dst).name == "2" and not (repo / "ctr" / "2").exists():
            shutil.copytree(repo / "ctr" / "1", repo / "ctr" / "2")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    with staging_dir(repo, "ctr") as tmp:
        onnx.save(_graph(2, 1), str(tmp / "model.onnx"))
        write_meta(tmp / "model.json", _meta(encoders, tmp / "model.onnx"))
        final = publish(tmp, repo / "ctr")
    assert final == repo / "ctr" / "3"
    assert ModelRepository(repo).versions("ctr") == [1, 2, 3]


def test_models_list_command(repo, capsys) -> None:
    (repo / "other" / "3" / "model.json").write_text("{")
    assert main(["models", "list", str(repo)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[:2] for line in lines[1:]]
    assert rows == [["ctr", "1"], ["ctr", "2"], ["ctr", "10"], ["other", "3"]]
    assert "0.7500" in lines[1] and "0.001" in lines[1] and "2025-01-31T12:00:00Z" in lines[1]
    assert "INVALID" in lines[4] and "not valid JSON" in lines[4]
    assert main(["models", "list", str(repo / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]

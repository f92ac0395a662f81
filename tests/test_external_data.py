"""ONNX external data: graphs stored as model.onnx + model.onnx.data (for models over the 2 GiB
protobuf limit) export with parity, are described and checked by model.json, and are served.

The small models are ``service_support.exported_models()`` (trained once per test process, also
exported the plain way), exported again with ``external_data="always"``; a real > 2 GiB model
(a hashed field of 36M buckets at embedding dimension 16) is exported with "auto" only when
``MLDCN_SLOW_TESTS=1`` (about 1.5 minutes on 2 cores, 7 GB of memory and 5 GB of disk).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from service_support import Models, exported_models, request_for, run_server, torch_scores

from export import exporter
from export.exporter import ExportError, export_run
from export.repository import (
    EXTERNAL_DATA_FILE,
    ModelRepository,
    RepositoryError,
    sha256_file,
    validate_meta,
    write_meta,
)
from model.cli import main

SLOW = os.environ.get("MLDCN_SLOW_TESTS") == "1"


def _quiet(_: str) -> None:
    pass


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture(scope="module")
def models() -> Models:
    """``mldcn`` (large preset) and ``mlp``, exported with the default ("auto": one file)."""
    return exported_models()


@pytest.fixture(scope="module")
def external_repo(models: Models, tmp_path_factory) -> Path:
    """The ``mldcn`` run exported again as ``mldcn-ext`` version 1 with external data forced."""
    repo = tmp_path_factory.mktemp("external") / "models"
    result = export_run(models.runs["mldcn"], repo, "mldcn-ext", external_data="always",
                        log=_quiet)
    assert result.version == 1
    return repo


# -- (a) a forced external export -----------------------------------------------------------------
def test_forced_external_export(models: Models, external_repo: Path) -> None:
    mv = ModelRepository(external_repo).load_version("mldcn-ext")
    plain = ModelRepository(models.repo).load_version("mldcn")
    data = mv.path / EXTERNAL_DATA_FILE
    assert EXTERNAL_DATA_FILE == "model.onnx.data"
    # the version folder is the three files: no trace folder or per-tensor file left behind
    assert sorted(os.listdir(mv.path)) == ["model.json", "model.onnx", "model.onnx.data"]
    assert mv.external_data_path == data
    assert mv.meta.external_data.model_dump() == {
        "file": "model.onnx.data", "sha256": sha256_file(data), "bytes": data.stat().st_size}
    assert data.stat().st_mode == mv.onnx_path.stat().st_mode  # readable by the same users
    # model.onnx is the graph only: every tensor of 1 KiB or more is in the data file
    graph = onnx.load(str(mv.onnx_path), load_external_data=False)
    external = [t for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(t.name and {e.key: e.value for e in t.external_data}["location"]
                            == "model.onnx.data" for t in external)
    assert all(len(t.raw_data) < exporter.EXTERNAL_TENSOR_MIN_BYTES
               for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL)
    assert mv.onnx_path.stat().st_size < data.stat().st_size
    assert mv.onnx_path.stat().st_size < plain.onnx_path.stat().st_size / 4
    # the same graph as the plain export, with the same parity
    parity = mv.meta.parity
    assert parity["precision"] == "fp32" and parity["max_abs_diff"] <= 1e-5
    assert mv.meta.onnx.op_counts == plain.meta.onnx.op_counts
    assert mv.verify(check_graph=True) is mv
    # the plain export ("auto", a small model) has no data file and says so
    assert plain.meta.external_data is None and plain.external_data_path is None
    assert not (plain.path / EXTERNAL_DATA_FILE).exists()
    plain.verify(check_graph=True)


# -- (b) a changed or missing data file -----------------------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _append_byte(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\0")


def _remove(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_flip_last_byte, r"model\.onnx\.data: sha256 [0-9a-f]{64} does not match model\.json's "
                          r"external_data [0-9a-f]{64} \(the file was changed or replaced\)"),
        (_append_byte, r"model\.onnx\.data: has \d+ bytes, model\.json's external_data says \d+"),
        (_remove, r"model\.onnx\.data: is missing \(model\.json's external_data"),
    ],
    ids=["one-byte-changed", "one-byte-added", "removed"],
)
def test_tampered_data_file_fails_verify(external_repo: Path, tmp_path: Path, tamper,
                                         message: str) -> None:
    repo = tmp_path / "models"
    shutil.copytree(external_repo, repo)  # a version is its folder: the copy carries the data
    mv = ModelRepository(repo).load_version("mldcn-ext").verify(check_graph=False)
    tamper(mv.path / EXTERNAL_DATA_FILE)
    for check_graph in (False, True):
        with pytest.raises(RepositoryError, match=message) as info:
            ModelRepository(repo).load_version("mldcn-ext").verify(check_graph=check_graph)
        assert str(info.value).startswith(str(mv.path / EXTERNAL_DATA_FILE))


def test_data_file_model_json_does_not_describe_is_refused(models: Models, external_repo: Path,
                                                           tmp_path: Path) -> None:
    """A data file ONNX Runtime would read unchecked: model.json without external_data."""
    repo = tmp_path / "models"
    shutil.copytree(external_repo, repo)
    mv = ModelRepository(repo).load_version("mldcn-ext")
    meta = json.loads(mv.meta_path.read_text())
    del meta["external_data"]
    mv.meta_path.write_text(json.dumps(meta))
    with pytest.raises(RepositoryError, match=r"model\.onnx\.data: is there but model\.json has "
                                              "no external_data"):
        ModelRepository(repo).load_version("mldcn-ext").verify(check_graph=False)
    # nor beside a graph that holds its own tensors
    shutil.copytree(models.repo / "mldcn", repo / "mldcn")
    shutil.copy(mv.path / EXTERNAL_DATA_FILE, repo / "mldcn" / "1" / EXTERNAL_DATA_FILE)
    with pytest.raises(RepositoryError, match=r"1/model\.onnx\.data: is there"):
        ModelRepository(repo).load_version("mldcn").verify(check_graph=False)


# -- (c) a real server ----------------------------------------------------------------------------
def test_server_scores_the_external_model_like_the_plain_one(models: Models, external_repo: Path,
                                                             tmp_path: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(models.repo, repo)  # mldcn (one file) and mlp
    shutil.copytree(external_repo / "mldcn-ext", repo / "mldcn-ext")
    run = models.runs["mldcn"]
    env = {"MLDCN_DEFAULT_MODEL": "mldcn", "MLDCN_MAX_CANDIDATES": "4096"}
    with run_server(repo, env) as server:
        for user_row, candidates in ((0, [0]), (3, list(range(256)))):
            body = request_for(run, user_row, candidates)
            scores = {}
            for name in ("mldcn", "mldcn-ext"):
                status, out = server.score({**body, "model": name})
                assert status == 200, out
                assert (out["model"], out["version"], out["degraded"]) == (name, 1, False)
                scores[name] = np.asarray(out["scores"], dtype=np.float64)
            np.testing.assert_allclose(scores["mldcn-ext"], scores["mldcn"], atol=1e-6, rtol=0)
            np.testing.assert_allclose(scores["mldcn-ext"], torch_scores(run, body), atol=1e-5,
                                       rtol=0)
        status, _, data = server.request("GET", "/v2/models/mldcn-ext")
        assert status == 200, data


# -- (d) model.json's external_data ---------------------------------------------------------------
def test_model_json_without_external_data_stays_valid(models: Models, tmp_path: Path) -> None:
    """A model.json written before the key existed: valid, and means no data file."""
    repo = tmp_path / "models"
    shutil.copytree(models.repo, repo)
    mv = ModelRepository(repo).load_version("mldcn")
    meta = json.loads(mv.meta_path.read_text())
    del meta["external_data"]
    assert validate_meta(meta, mv.meta_path).external_data is None
    mv.meta_path.write_text(json.dumps(meta))
    old = ModelRepository(repo).load_version("mldcn").verify(check_graph=True)
    assert old.external_data_path is None and old.meta.external_data is None


SHA = "0" * 64


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("model.onnx.data", "external_data: Input should be a valid dictionary or instance of "
                            "ExternalData, got 'model.onnx.data'"),
        ({"file": "model.onnx.data", "sha256": SHA}, "external_data.bytes: Field required"),
        ({"file": "model.onnx.data", "sha256": SHA, "bytes": 1, "offset": 0},
         "external_data.offset: Extra inputs are not permitted"),
        ({"file": "weights.bin", "sha256": SHA, "bytes": 1},
         "external_data.file: Input should be 'model.onnx.data', got 'weights.bin'"),
        ({"file": "../1/model.onnx.data", "sha256": SHA, "bytes": 1},
         "external_data.file: Input should be 'model.onnx.data'"),
        ({"file": "model.onnx.data", "sha256": SHA.upper().replace("0", "A"), "bytes": 1},
         r"external_data.sha256: String should match pattern '\^\[0-9a-f\]\{64\}\$'"),
        ({"file": "model.onnx.data", "sha256": SHA[:-1], "bytes": 1},
         "external_data.sha256: String should match pattern"),
        ({"file": "model.onnx.data", "sha256": SHA, "bytes": -1},
         "external_data.bytes: Input should be greater than or equal to 0, got -1"),
        ({"file": "model.onnx.data", "sha256": SHA, "bytes": "12"},
         "external_data.bytes: Input should be a valid integer, got '12'"),
        ({"file": "model.onnx.data", "sha256": SHA, "bytes": True},
         "external_data.bytes: Input should be a valid integer, got True"),
        ({"file": "model.onnx.data", "sha256": SHA, "bytes": 1.5},
         "external_data.bytes: Input should be a valid integer, got 1.5"),
    ],
    ids=["a-string", "no-bytes", "extra-key", "other-file", "other-folder", "upper-hex",
         "short-hash", "negative-bytes", "string-bytes", "bool-bytes", "float-bytes"],
)
def test_bad_external_data_entry_is_refused(external_repo: Path, tmp_path: Path, entry,
                                            message: str) -> None:
    mv = ModelRepository(external_repo).load_version("mldcn-ext")
    meta = {**json.loads(mv.meta_path.read_text()), "external_data": entry}
    where = tmp_path / "model.json"
    with pytest.raises(RepositoryError, match=message) as info:
        validate_meta(meta, where)
    assert str(info.value).startswith(str(where))
    with pytest.raises(RepositoryError, match=message):
        write_meta(where, meta)
    assert not where.exists()


# -- the modes ------------------------------------------------------------------------------------
def test_auto_goes_external_above_the_threshold(models: Models, tmp_path: Path,
                                                monkeypatch) -> None:
    repo = tmp_path / "models"
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 1000)  # the mlp's tensors pass it
    export_run(models.runs["mlp"], repo, "mlp", log=_quiet)  # external_data="auto"
    mv = ModelRepository(repo).load_version("mlp").verify()
    assert mv.meta.external_data.bytes == (mv.path / EXTERNAL_DATA_FILE).stat().st_size


def test_never_refuses_a_graph_too_large_for_one_file(models: Models, tmp_path: Path,
                                                      monkeypatch) -> None:
    repo = tmp_path / "models"
    monkeypatch.setattr(exporter, "MAX_PROTOBUF_BYTES", 1000)  # the mlp's tensors pass it
    with pytest.raises(ExportError, match=r"initializers hold \d+ bytes, more than one ONNX "
                                          r"protobuf file can hold .*'auto' or 'always'"):
        export_run(models.runs["mlp"], repo, "mlp", external_data="never", log=_quiet)
    assert _tree(repo) == []  # nothing staged is left
    with pytest.raises(ExportError, match="external_data must be one of"):
        export_run(models.runs["mlp"], repo, "mlp", external_data="sometimes", log=_quiet)


def test_cli_external_data_flag(models: Models, tmp_path: Path, capsys) -> None:
    repo = tmp_path / "models"
    run = str(models.runs["mlp"])
    assert main(["export", run, "--repo", str(repo), "--name", "a", "--external-data",
                 "always"]) == 0
    assert main(["export", run, "--repo", str(repo), "--name", "n", "--external-data",
                 "never"]) == 0
    r = ModelRepository(repo)
    assert r.load_version("a").verify().external_data_path == repo / "a" / "1" / EXTERNAL_DATA_FILE
    assert r.load_version("n").verify().meta.external_data is None
    assert sorted(os.listdir(repo / "n" / "1")) == ["model.json", "model.onnx"]
    capsys.readouterr()
    assert main(["models", "list", str(repo), "--verify"]) == 0
    assert "INVALID" not in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["export", run, "--repo", str(repo), "--name", "b", "--external-data", "maybe"])
    assert info.value.code == 2
    assert "--external-data: invalid choice: 'maybe'" in capsys.readouterr().err


# -- (e) a real model over 2 GiB ------------------------------------------------------------------
BIG_BUCKETS = 36_000_000  # x 16 dims x 4 bytes = 2.3 GB of embedding table


def _wide_source(folder: Path):
    """A CSV click log whose ``item`` field is hashed into ``BIG_BUCKETS`` ids."""
    from model.readers import open_source

    rng = np.random.default_rng(0)
    n = 2000
    item = rng.integers(0, 500, n)
    user = rng.integers(0, 5, n)
    price = rng.normal(size=n).round(3)
    logit = (item % 3 == 0) + 0.5 * price - 0.5
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    lines = ["item,user,price,label"] + [
        f"i{a},u{b},{c},{d}" for a, b, c, d in zip(item, user, price, label, strict=True)]
    (folder / "data.csv").write_text("\n".join(lines) + "\n")
    (folder / "schema.json").write_text(json.dumps({"label": "label", "fields": [
        {"name": "item", "type": "categorical", "side": "candidate", "encoding": "hash",
         "buckets": BIG_BUCKETS},
        {"name": "user", "type": "categorical", "side": "user"},
        {"name": "price", "type": "numeric", "side": "candidate", "transform": "none"},
    ]}))
    return open_source(folder / "data.csv", schema=folder / "schema.json")


@pytest.mark.skipif(not SLOW, reason="exports a 2.3 GB model: set MLDCN_SLOW_TESTS=1")
def test_model_over_2gib_goes_external_with_auto(tmp_path: Path) -> None:
    from model.config import ModelConfig
    from model.split import SplitSpec
    from model.train import TrainConfig, train_run

    run, repo = tmp_path / "run", tmp_path / "models"
    cfg = ModelConfig(arch="mlp", embed_dim=16, mlp_dims=(8,))
    train = TrainConfig(epochs=1, batch_size=1000, progress=False, seed=0,
                        embedding_optimizer="rowwise_adagrad")  # no dense Adam state: 2 x 2.3 GB
    train_run(_wide_source(tmp_path), cfg, train, SplitSpec(seed=0), run, log=_quiet)
    try:
        _check_wide_export(run, repo)
    finally:  # 4.6 GB of checkpoint and data file: do not leave them to pytest's tmp retention
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(repo, ignore_errors=True)


def _check_wide_export(run: Path, repo: Path) -> None:
    result = export_run(run, repo, "wide", log=_quiet)  # external_data="auto"
    mv = ModelRepository(repo).load_version("wide").verify(check_graph=True)
    entry = mv.meta.external_data
    assert mv.path == result.path and entry.file == EXTERNAL_DATA_FILE
    assert entry.bytes >= BIG_BUCKETS * 16 * 4 > exporter.PROTOBUF_LIMIT_BYTES
    assert mv.onnx_path.stat().st_size < 1 << 20
    assert mv.meta.parity["max_abs_diff"] <= 1e-5
    assert sorted(os.listdir(mv.path)) == ["model.json", "model.onnx", "model.onnx.data"]
    # scored from the repository alone, ids at both ends of the table
    session = mv.open_session()
    cat = np.array([[0, 0], [BIG_BUCKETS - 1, 1]], np.int64)
    (p,) = session.run(None, {"cat_ids": cat, "dense": np.zeros((2, 1), np.float32)})
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    del session
    # one protobuf file cannot hold it: "never" refuses, and leaves nothing behind
    before = _tree(repo)
    with pytest.raises(ExportError, match="more than one ONNX protobuf file can hold"):
        export_run(run, repo, "wide", external_data="never", log=_quiet)
    assert _tree(repo) == before

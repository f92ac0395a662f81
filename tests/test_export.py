"""`mldcn export`: every architecture and preset exports with ONNX Runtime/PyTorch parity, the
repository alone scores raw rows without torch, and broken inputs or interrupted exports never
leave a visible version behind.

Runs are tiny: the model zoo trains one epoch on 1,000 synthetic rows (parity does not need a
good model); the ML-DCN run most tests share trains two epochs on 3,000 rows, once per module.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import exporter
from export.exporter import ExportError, ParityError, export_run
from export.meta import ModelMeta
from export.repository import ModelRepository, RepositoryError, sha256_file
from model.cli import main
from model.config import ModelConfig
from model.encoders import FeatureEncoders
from model.presets import preset
from model.readers import open_source
from model.split import SplitSpec
from model.synthetic import synthetic_source
from model.train import TrainConfig, load_run, train_run

ROWS = 3000
ZOO_ROWS = 1000
ONE_EPOCH = TrainConfig(epochs=1, batch_size=512, progress=False, seed=0)
SPLIT = SplitSpec(seed=0)
SIZES = (1, 7, 256, 4096)


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source(cache):
    return synthetic_source(ROWS, seed=0, cache=cache)[0]


@pytest.fixture(scope="module")
def zoo_source(cache):
    return synthetic_source(ZOO_ROWS, seed=0, cache=cache)[0]


def _train(source, out: Path, arch: str, level: str = "small",
           train_cfg: TrainConfig = ONE_EPOCH, **overrides) -> Path:
    schema = source.schema
    if arch == "lr":
        cfg = ModelConfig(arch="lr")
    else:
        cfg = preset(arch, level, [2] * len(schema.categorical), len(schema.numeric),
                     **overrides)
    train_run(source, cfg, train_cfg, SPLIT, out, log=_quiet)
    return out


@pytest.fixture(scope="module")
def mldcn_run(source, tmp_path_factory) -> Path:
    """An ML-DCN run that has learnt something (valid AUC > 0.5), reused by most tests."""
    cfg = TrainConfig(epochs=2, batch_size=256, lr=3e-3, progress=False, seed=0)
    return _train(source, tmp_path_factory.mktemp("runs") / "mldcn", "mldcn", train_cfg=cfg)


@pytest.fixture(scope="module")
def published(mldcn_run, tmp_path_factory) -> Path:
    """A repository holding mldcn_run as ``mldcn`` version 1."""
    repo = tmp_path_factory.mktemp("published") / "models"
    result = export_run(mldcn_run, repo, "mldcn", log=_quiet)
    assert result.version == 1
    return repo


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _visible(repo: Path) -> list[tuple[str, int]]:
    return [(v.name, v.version) for v in ModelRepository(repo).list()] if repo.exists() else []


def _check_export(run: Path, repo: Path, name: str) -> ModelMeta:
    """Export ``run`` and check what every export must satisfy; return model.json."""
    result = export_run(run, repo, name, log=_quiet)
    mv = ModelRepository(repo).load_version(name)
    assert (mv.version, mv.path) == (result.version, result.path)
    mv.verify()
    meta = mv.meta
    parity = meta.parity
    assert parity["precision"] == "fp32" and parity["tolerance"] == 1e-5
    assert parity["max_abs_diff"] <= 1e-5
    kinds = {(c["inputs"], c["batch_size"]) for c in parity["checks"]}
    assert {("random", b) for b in SIZES} | {("valid", b) for b in SIZES} <= kinds
    assert {"raw_rows", "valid_all"} <= {c["inputs"] for c in parity["checks"]}
    _, cfg, encoders, metrics = load_run(run)
    assert meta.model.config == cfg.to_dict()
    assert meta.cost.flops_per_example == metrics["flops_per_example"]
    assert meta.cost.params == metrics["params"]
    assert meta.onnx.opset == 17
    assert FeatureEncoders.from_dict(meta.encoders).to_dict() == encoders.to_dict()
    # the graph itself: named inputs/outputs, dynamic batch, probabilities in (0, 1)
    session = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        ("cat_ids", "tensor(int64)", ["batch", len(encoders.cardinalities)]),
        ("dense", "tensor(float)", ["batch", encoders.num_dense]),
    ]
    assert [(o.name, o.type, o.shape) for o in session.get_outputs()] == [
        ("probability", "tensor(float)", ["batch"])]
    cat = np.zeros((3, len(encoders.cardinalities)), np.int64)
    (p,) = session.run(None, {"cat_ids": cat, "dense": np.zeros((3, encoders.num_dense),
                                                                np.float32)})
    assert p.shape == (3,) and p.dtype == np.float32 and np.all((p > 0) & (p < 1))
    return meta


@pytest.mark.parametrize("level", ["small", "medium", "large"])
@pytest.mark.parametrize("arch", ["mldcn", "dcnv2", "masknet", "mlp"])
def test_model_zoo_exports_with_parity(zoo_source, tmp_path, arch, level) -> None:
    run = _train(zoo_source, tmp_path / "run", arch, level)
    meta = _check_export(run, tmp_path / "models", arch)
    assert meta.model.arch == arch


ABLATIONS = [
    ("mldcn", {"mask_position": "input"}),
    ("mldcn", {"mask_source": "xl"}),
    ("mldcn", {"mask_activation": "sigmoid"}),
    ("mldcn", {"mask_activation": "2sigmoid"}),
    ("mldcn", {"residual_layernorm": True}),
    ("mldcn", {"num_experts": 3}),
    ("mldcn", {"structure": "stacked"}),
    ("dcnv2", {"dcn_type": "lowrank", "low_rank_c": True, "low_rank_nonlinearity": "tanh"}),
    ("dcnv2", {"dcn_type": "mix", "num_experts": 4, "rank": 4}),
    ("dcnv2", {"structure": "cross_only"}),
    ("masknet", {"masknet_mode": "parallel"}),
    ("lr", {}),
]


@pytest.mark.parametrize(("arch", "overrides"), ABLATIONS,
                         ids=[f"{a}-{'-'.join(map(str, o.values())) or 'base'}"
                              for a, o in ABLATIONS])
def test_ablations_export_with_parity(zoo_source, tmp_path, arch, overrides) -> None:
    run = _train(zoo_source, tmp_path / "run", arch, **overrides)
    meta = _check_export(run, tmp_path / "models", arch)
    for key, value in overrides.items():
        assert meta.model.config[key] == value


def _layout_source(tmp_path: Path, categorical: int, numeric: int):
    """A CSV click log with only the given numbers of categorical and numeric fields."""
    rng = np.random.default_rng(0)
    n = 1500
    fields, cols = [], {}
    for j in range(categorical):
        fields.append({"name": f"c{j}", "type": "categorical"})
        cols[f"c{j}"] = rng.integers(0, 6, n).astype(str)
    for j in range(numeric):
        fields.append({"name": f"x{j}", "type": "numeric", "transform": "none"})
        cols[f"x{j}"] = rng.normal(size=n).round(3).astype(str)
    logit = sum((cols[f"c{j}"] == "1").astype(float) for j in range(categorical)) + sum(
        cols[f"x{j}"].astype(float) for j in range(numeric))
    cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit + 0.5))).astype(int).astype(str)
    data = tmp_path / "data.csv"
    data.write_text(",".join(cols) + "\n" + "\n".join(
        ",".join(row) for row in zip(*cols.values(), strict=True)) + "\n")
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"label": "label", "fields": fields}))
    return open_source(data, schema=schema)


@pytest.mark.parametrize(("categorical", "numeric"), [(3, 0), (0, 3)],
                         ids=["no-dense-fields", "no-categorical-fields"])
def test_graph_keeps_both_inputs_when_a_layout_is_empty(tmp_path, categorical, numeric) -> None:
    src = _layout_source(tmp_path, categorical, numeric)
    run = _train(src, tmp_path / "run", "mldcn", rank=4, mask_hidden=2)
    meta = _check_export(run, tmp_path / "models", "edge")  # both inputs, (B, 0) fed
    assert [i.shape for i in meta.inputs] == [["batch", categorical], ["batch", numeric]]


def test_model_json_fields(published, mldcn_run) -> None:
    mv = ModelRepository(published).load_version("mldcn", 1)
    meta = mv.meta
    run_metrics = json.loads((mldcn_run / "metrics.json").read_text())
    assert meta.sha256 == sha256_file(mv.onnx_path)
    assert meta.bytes == mv.onnx_path.stat().st_size
    assert meta.precision == "fp32" and meta.format_version == 2
    assert meta.metrics["valid"] == run_metrics["valid"]
    assert meta.metrics["test"] == run_metrics["test"]
    assert meta.metrics["bayes_auc"] is None  # train_run alone does not know it
    assert meta.schema == meta.encoders["schema"]  # stored once, in the encoders
    assert "schema" not in json.loads(mv.meta_path.read_text())
    assert meta.created_at.endswith("Z")
    assert meta.source.checkpoint_sha256 == sha256_file(mldcn_run / "checkpoint.pt")
    assert [(i.name, i.dtype, i.datatype) for i in meta.inputs] == [
        ("cat_ids", "int64", "INT64"), ("dense", "float32", "FP32")]
    assert meta.parity["auc_torch"] == pytest.approx(run_metrics["valid"]["auc"], abs=1e-6)
    assert abs(meta.parity["auc_change"]) < 1e-6
    graph = onnx.load(str(mv.onnx_path))
    assert all(i.doc_string for i in graph.graph.input)  # inputs are documented in the graph


TORCH_FREE_SCORER = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # any import of torch now fails
    sys.modules["onnx"] = None
    import json
    import numpy as np
    import onnxruntime as ort
    from export.repository import ModelRepository

    repo, raw_path, out = sys.argv[1:4]
    mv = ModelRepository(repo).load_version("mldcn").verify()
    raw = json.load(open(raw_path))
    cat, dense = mv.encoders.transform({name: raw[name] for name in mv.encoders.schema.names})
    session = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    (p,) = session.run(["probability"], {"cat_ids": cat, "dense": dense})
    np.save(out, p)
    assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules
                   if sys.modules[m] is not None)
""")


def test_repository_alone_scores_raw_rows_without_torch(published, mldcn_run, tmp_path) -> None:
    raw_path = mldcn_run / "samples" / "raw_rows.json"
    out = tmp_path / "p.npy"
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE_SCORER, str(published),
                           str(raw_path), str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    served = np.load(out)
    # the PyTorch side: the run's own model and encoders on the same raw rows
    model, _, encoders, _ = load_run(mldcn_run)
    raw = json.loads(raw_path.read_text())
    cat, dense = encoders.transform({name: raw[name] for name in encoders.schema.names})
    with torch.no_grad():
        reference = torch.sigmoid(model(torch.from_numpy(cat), torch.from_numpy(dense))).numpy()
    assert served.shape == reference.shape == (len(raw["label"]),)
    assert np.max(np.abs(served - reference)) <= 1e-5


def test_fp16_export(mldcn_run, tmp_path) -> None:
    repo = tmp_path / "models"
    result = export_run(mldcn_run, repo, "mldcn", fp16=True, log=_quiet)
    mv = ModelRepository(repo).load_version("mldcn").verify()
    parity = mv.meta.parity
    assert mv.meta.precision == "fp16" and parity["precision"] == "fp16"
    assert 0 < parity["max_abs_diff"] <= parity["tolerance"] == exporter.FP16_TOLERANCE
    assert parity["auc_change"] >= -exporter.FP16_MAX_AUC_DROP
    assert parity["max_auc_drop"] == exporter.FP16_MAX_AUC_DROP
    graph = onnx.load(str(result.path / "model.onnx"))
    types = {t.data_type for t in graph.graph.initializer if t.data_type != onnx.TensorProto.INT64}
    assert types == {onnx.TensorProto.FLOAT16}  # float16 weights inside ...
    session = mv.open_session()  # ... float32/int64 at the boundary
    assert [i.type for i in session.get_inputs()] == ["tensor(int64)", "tensor(float)"]
    assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    print(f"fp16: max |Δp| {parity['max_abs_diff']:.2e}, AUC change {parity['auc_change']:+.5f}")


def test_fp16_refuses_an_auc_drop(mldcn_run, tmp_path, monkeypatch) -> None:
    metrics = json.loads((mldcn_run / "metrics.json").read_text())
    assert metrics["valid"]["auc"] > 0.51  # precondition: a constant score loses AUC
    monkeypatch.setattr(exporter, "FP16_TOLERANCE", 1.0)
    monkeypatch.setattr(exporter, "_onnx_probabilities",
                        lambda session, cat, dense: np.full(len(cat), 0.5, np.float32))
    repo = tmp_path / "models"
    with pytest.raises(ParityError, match="fp16 loses .* validation AUC"):
        export_run(mldcn_run, repo, "mldcn", fp16=True, log=_quiet)
    assert _tree(repo) == []


def test_fp32_refuses_a_parity_mismatch(published, mldcn_run, tmp_path, monkeypatch) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    before = _tree(repo)
    original = exporter._reference_probabilities
    monkeypatch.setattr(exporter, "_reference_probabilities",
                        lambda *a: original(*a) + np.float32(1e-4))
    with pytest.raises(ParityError, match=r"max \|Δp\| .* > tolerance 1e-05"):
        export_run(mldcn_run, repo, "mldcn", log=_quiet)
    assert _tree(repo) == before


def _corrupt_missing_checkpoint(run: Path) -> None:
    (run / "checkpoint.pt").unlink()


def _corrupt_checkpoint_other_model(run: Path) -> None:
    mc = json.loads((run / "model_config.json").read_text())
    mc["model"]["rank"] += 1  # the checkpoint's tensors no longer fit
    (run / "model_config.json").write_text(json.dumps(mc))


def _corrupt_checkpoint_bytes(run: Path) -> None:
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")


def _corrupt_encoders(run: Path) -> None:
    enc = json.loads((run / "encoders.json").read_text())
    first = enc["categorical"][0]
    first["vocab"] = first["vocab"][:-1]
    first["cardinality"] -= 1
    (run / "encoders.json").write_text(json.dumps(enc))


def _corrupt_model_config_json(run: Path) -> None:
    (run / "model_config.json").write_text("{not json")


def _corrupt_missing_samples(run: Path) -> None:
    (run / "samples" / "valid.npz").unlink()


def _corrupt_samples_out_of_range(run: Path) -> None:
    with np.load(run / "samples" / "valid.npz") as z:
        arrays = dict(z)
    arrays["cat_ids"][0, 0] = 10**6
    np.savez(run / "samples" / "valid.npz", **arrays)


CORRUPTIONS = [
    (_corrupt_missing_checkpoint, FileNotFoundError, "checkpoint.pt is missing"),
    (_corrupt_checkpoint_other_model, ExportError, "checkpoint.pt: cannot load"),
    (_corrupt_checkpoint_bytes, ExportError, "checkpoint.pt: cannot load"),
    (_corrupt_encoders, ExportError, "encoders.json does not match .*model_config.json"),
    (_corrupt_model_config_json, ExportError, "model_config.json: not valid JSON"),
    (_corrupt_missing_samples, ExportError, "valid.npz is missing"),
    (_corrupt_samples_out_of_range, ExportError, "valid.npz: rows do not fit the model"),
]


@pytest.mark.parametrize(("corrupt", "error", "message"), CORRUPTIONS,
                         ids=[c[0].__name__.removeprefix("_corrupt_") for c in CORRUPTIONS])
def test_broken_run_folder_is_refused(published, mldcn_run, tmp_path, corrupt, error,
                                      message) -> None:
    run = tmp_path / "run"
    shutil.copytree(mldcn_run, run)
    corrupt(run)
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    before = _tree(repo)
    with pytest.raises(error, match=message) as info:
        export_run(run, repo, "mldcn", log=_quiet)
    assert "\n" not in str(info.value)
    assert _tree(repo) == before
    # nothing is created in a repository that did not exist either
    with pytest.raises(error):
        export_run(run, tmp_path / "new-models", "mldcn", log=_quiet)
    assert not (tmp_path / "new-models").exists()


def test_failed_publish_leaves_nothing(published, mldcn_run, tmp_path, monkeypatch) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    before, visible = _tree(repo), _visible(repo)

    def broken_rename(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(RepositoryError, match="cannot publish"):
        export_run(mldcn_run, repo, "mldcn", log=_quiet)
    monkeypatch.undo()
    assert _tree(repo) == before and _visible(repo) == visible


def test_interrupt_during_checks_leaves_nothing(published, mldcn_run, tmp_path,
                                                monkeypatch) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    before = _tree(repo)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "check_parity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(mldcn_run, repo, "other", log=_quiet)
    assert _tree(repo) == before  # not even the new model's folder


KILLED_EXPORT = textwrap.dedent("""
    import os, signal, sys
    import export.exporter as ex

    def killed(*args, **kwargs):  # the process dies mid-export, model.onnx already staged
        os.kill(os.getpid(), signal.SIGKILL)

    ex.check_parity = killed
    ex.export_run(sys.argv[1], sys.argv[2], "mldcn", log=lambda s: None)
""")


def test_killed_export_is_invisible(published, mldcn_run, tmp_path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    visible = _visible(repo)
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, str(mldcn_run), str(repo)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    new = set(_tree(repo)) - set(_tree(published))
    assert new and all(Path(p).parts[1].startswith(".") for p in new)  # only the staging folder
    assert any(p.endswith("model.onnx") for p in new)
    assert _visible(repo) == visible == [("mldcn", 1)]
    # the leftover is ignored: the next export is version 2
    assert export_run(mldcn_run, repo, "mldcn", log=_quiet).version == 2


def test_version_numbers(published, mldcn_run, tmp_path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    assert export_run(mldcn_run, repo, "mldcn", version=5, log=_quiet).version == 5
    before = _tree(repo)
    with pytest.raises(RepositoryError, match="already exists"):
        export_run(mldcn_run, repo, "mldcn", version=5, log=_quiet)
    assert _tree(repo) == before
    assert export_run(mldcn_run, repo, "mldcn", log=_quiet).version == 6
    assert ModelRepository(repo).load_version("mldcn").version == 6


def test_repository_detects_a_replaced_graph(published, tmp_path) -> None:
    """model.json that disagrees with its model.onnx: different bytes, different inputs."""
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    mv = ModelRepository(repo).load_version("mldcn")
    original = mv.onnx_path.read_bytes()
    mv.onnx_path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(RepositoryError, match="model.onnx: sha256 .* does not match"):
        mv.verify()
    # a valid graph with other inputs, its hash put into model.json: the inputs give it away
    graph = onnx.load_from_string(original)
    graph.graph.input[1].name = "features"
    for node in graph.graph.node:
        node.input[:] = ["features" if i == "dense" else i for i in node.input]
    mv.onnx_path.write_bytes(graph.SerializeToString())
    meta = json.loads(mv.meta_path.read_text())
    meta["sha256"], meta["bytes"] = sha256_file(mv.onnx_path), mv.onnx_path.stat().st_size
    mv.meta_path.write_text(json.dumps(meta))
    fresh = ModelRepository(repo).load_version("mldcn")
    with pytest.raises(RepositoryError, match="model.onnx: graph inputs .* do not match"):
        fresh.verify()


# ---- the command line ----

def test_cli_export_and_list(mldcn_run, tmp_path, capsys) -> None:
    repo = tmp_path / "models"
    assert main(["export", str(mldcn_run), "--repo", str(repo), "--name", "mldcn"]) == 0
    assert main(["export", str(mldcn_run), "--repo", str(repo), "--name", "ctr-b",
                 "--version", "3"]) == 0
    capsys.readouterr()
    assert main(["models", "list", str(repo), "--verify"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["name", "version", "arch", "precision"]
    rows = [line.split() for line in out[1:]]
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("ctr-b", "3", "mldcn", "fp32"), ("mldcn", "1", "mldcn", "fp32")]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "no/such/run", "--repo", "m", "--name", "x"], "run folder not found"),
        (["export", "RUN", "--repo", "m", "--name", "../x"], "model name '../x' is not valid"),
        (["export", "RUN", "--repo", "m", "--name", ".x"], "model name '.x' is not valid"),
        (["export", "RUN", "--repo", "m", "--name", "x", "--version", "0"], "version must be"),
        (["export", "RUN", "--repo", "m", "--name", "x", "--version", "two"], "--version"),
        (["export", "RUN", "--name", "x"], "--repo"),
        (["export", "RUN", "--repo", "FILE", "--name", "x"], "is not a folder"),
        (["models", "list", "no/such/repo"], "does not exist"),
        (["models"], "models_command"),
    ],
)
def test_cli_errors_are_one_line(mldcn_run, tmp_path, capsys, monkeypatch, args,
                                 needle) -> None:
    (tmp_path / "FILE").write_text("x")
    args = [str(mldcn_run) if a == "RUN" else str(tmp_path / a) if a == "FILE" else a
            for a in args]
    monkeypatch.chdir(tmp_path)
    try:
        code = main(args)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("mldcn"), err
    assert needle in err[0]
    assert not (tmp_path / "m").exists()


def test_cli_existing_version_is_one_line_error(published, mldcn_run, tmp_path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(published, repo)
    env = {k: v for k, v in os.environ.items() if k != "MLDCN_DEBUG"}
    proc = subprocess.run([sys.executable, "-m", "model", "export", str(mldcn_run), "--repo",
                           str(repo), "--name", "mldcn", "--version", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "already exists" in proc.stderr and "mldcn/1" in proc.stderr

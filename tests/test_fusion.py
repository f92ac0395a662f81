"""The fused ML-DCN inference graph (``model.fuse``) computes the unfused model's function.

Every ML-DCN option (mask position, source and activation, residual LayerNorm, experts) with
every structure and data layout: fused vs unfused PyTorch to 1e-5 on random rows and on real
(encoded validation) rows, with weights perturbed away from their initial values so that masks,
LayerNorm affines and biases all matter; the exported ONNX graph of each option in ONNX Runtime
against the unfused model; and one trained run end to end through ``export_run`` (fused form,
parity, fewer operators). test_export.py exports a trained run of every ablation as well.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.bench.fusion import DOC_TITLE, document
from export.exporter import export_graph, export_run, op_counts, serving_form
from export.repository import ModelRepository, RepositoryError, validate_meta
from model.config import ModelConfig
from model.ctr import CTRModel, build_model
from model.fuse import FusedMLDCN, fuse_for_inference
from model.presets import preset
from model.split import SplitSpec
from model.synthetic import synthetic_source
from model.train import TrainConfig, load_run, train_run

TOLERANCE = 1e-5
CARDS = [7, 5, 11, 3]
MASK_OPTIONS = list(itertools.product(("rank", "input"), ("x0", "xl"),
                                      ("linear", "sigmoid", "2sigmoid")))
VARIANTS = list(itertools.product((False, True), (1, 3), ("parallel", "stacked", "cross_only")))


def _quiet(_: str) -> None:
    pass


def _model(num_dense: int, seed: int = 0, cards: list[int] = CARDS, **options) -> CTRModel:
    """A small ML-DCN CTR model whose every weight is off its initial value."""
    cfg = ModelConfig(arch="mldcn", embed_dim=4, num_layers=3, rank=6, mask_hidden=3,
                      mlp_dims=(8, 4), **options)
    torch.manual_seed(seed)
    model = build_model(cfg, cards, num_dense)
    assert isinstance(model, CTRModel)
    with torch.no_grad():
        for p in model.parameters():  # LN affines, biases, c2 and embeddings all non-trivial
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _random_rows(n: int, num_dense: int, cards: list[int] = CARDS, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    cat = torch.zeros(n, len(cards), dtype=torch.int64)
    for j, c in enumerate(cards):
        cat[:, j] = torch.randint(0, c, (n,), generator=g)
    return cat, 2.0 * torch.randn(n, num_dense, generator=g)


@torch.no_grad()
def _max_diff(model: CTRModel, fused: FusedMLDCN, cat: torch.Tensor, dense: torch.Tensor) -> float:
    ref = torch.sigmoid(model(cat, dense))
    got = torch.sigmoid(fused(cat, dense))
    assert got.shape == ref.shape == (len(cat),)
    return float((got - ref).abs().max())


@pytest.mark.parametrize(("position", "source", "activation"), MASK_OPTIONS,
                         ids=["-".join(o) for o in MASK_OPTIONS])
def test_fused_equals_unfused_on_random_rows(position, source, activation) -> None:
    """Each mask option × residual LayerNorm × experts × structure × (with, without dense)."""
    for (residual, experts, structure), num_dense in itertools.product(VARIANTS, (0, 2)):
        model = _model(num_dense, mask_position=position, mask_source=source,
                       mask_activation=activation, residual_layernorm=residual,
                       num_experts=experts, structure=structure)
        fused = fuse_for_inference(model)
        for batch in (1, 64):
            diff = _max_diff(model, fused, *_random_rows(batch, num_dense))
            assert diff <= TOLERANCE, (residual, experts, structure, num_dense, batch, diff)


def test_fused_equals_unfused_without_categorical_fields() -> None:
    model = _model(5, cards=[])
    diff = _max_diff(model, fuse_for_inference(model), *_random_rows(32, 5, cards=[]))
    assert diff <= TOLERANCE


def test_fused_form_is_inference_only_and_needs_mldcn() -> None:
    fused = fuse_for_inference(_model(2))
    assert not fused.training and not any(p.requires_grad for p in fused.parameters())
    fused.eval()  # allowed
    with pytest.raises(RuntimeError, match="inference-only"):
        fused.train()
    dcn = build_model(ModelConfig(arch="dcnv2", embed_dim=4, num_layers=2), CARDS, 2)
    with pytest.raises(TypeError, match="MaskedLowRankCrossNet"):
        fuse_for_inference(dcn)
    with pytest.raises(TypeError, match="CTRModel"):
        fuse_for_inference(torch.nn.Linear(2, 2))
    assert serving_form(dcn) == (dcn, "plain")


def test_fused_form_holds_copies() -> None:
    model = _model(2)
    fused = fuse_for_inference(model)
    cat, dense = _random_rows(8, 2)
    with torch.no_grad():
        before = fused(cat, dense)
        for p in model.parameters():
            p.zero_()
        assert torch.equal(fused(cat, dense), before)


# One trained run: real rows, trained weights, the export path.

ROWS = 1500


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    source = synthetic_source(ROWS, seed=0, cache=cache)[0]
    schema = source.schema
    cfg = preset("mldcn", "small", [2] * len(schema.categorical), len(schema.numeric))
    out = tmp_path_factory.mktemp("runs") / "mldcn"
    train_run(source, cfg, TrainConfig(epochs=1, batch_size=256, progress=False, seed=0),
              SplitSpec(seed=0), out, log=_quiet)
    return out


@pytest.fixture(scope="module")
def real_rows(run_dir) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    with np.load(run_dir / "samples" / "valid.npz") as z:
        cat, dense = torch.from_numpy(z["cat_ids"]), torch.from_numpy(z["dense"])
    cards = json.loads((run_dir / "model_config.json").read_text())["cardinalities"]
    return cat, dense, cards


def test_trained_model_fused_equals_unfused_on_real_rows(run_dir, real_rows) -> None:
    cat, dense, _ = real_rows
    model, _, _, _ = load_run(run_dir)
    assert _max_diff(model.eval(), fuse_for_inference(model), cat, dense) <= TOLERANCE


@pytest.mark.parametrize(("position", "source", "activation"), MASK_OPTIONS,
                         ids=["-".join(o) for o in MASK_OPTIONS])
def test_every_option_on_real_rows(real_rows, position, source, activation) -> None:
    cat, dense, cards = real_rows
    for residual, experts in itertools.product((False, True), (1, 2)):
        model = _model(dense.shape[1], cards=cards, mask_position=position, mask_source=source,
                       mask_activation=activation, residual_layernorm=residual,
                       num_experts=experts)
        diff = _max_diff(model, fuse_for_inference(model), cat[:2048], dense[:2048])
        assert diff <= TOLERANCE, (residual, experts, diff)


def _onnx_probabilities(path: Path, cat: torch.Tensor, dense: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (p,) = session.run(["probability"], {"cat_ids": cat.numpy(), "dense": dense.numpy()})
    return p


ONNX_OPTIONS = [
    {},
    {"mask_position": "input"},
    {"mask_source": "xl"},
    {"mask_activation": "sigmoid"},
    {"mask_activation": "2sigmoid", "structure": "cross_only"},
    {"residual_layernorm": True},
    {"num_experts": 3, "mask_position": "input", "mask_source": "xl"},
    {"num_experts": 2, "structure": "stacked"},
]


@pytest.mark.parametrize("options", ONNX_OPTIONS,
                         ids=["-".join(map(str, o.values())) or "default" for o in ONNX_OPTIONS])
def test_exported_fused_graph_matches_unfused_model(real_rows, tmp_path, options) -> None:
    """ONNX Runtime on the fused graph vs the unfused PyTorch model, real and random rows."""
    cat, dense, cards = real_rows
    model = _model(dense.shape[1], cards=cards, **options)
    path = tmp_path / "model.onnx"
    fused_graph = export_graph(fuse_for_inference(model), path, len(cards), dense.shape[1])
    plain_graph = export_graph(model, tmp_path / "plain.onnx", len(cards), dense.shape[1])
    assert sum(op_counts(fused_graph).values()) < sum(op_counts(plain_graph).values())
    rand_cat, rand_dense = _random_rows(257, dense.shape[1], cards=cards)
    for c, d in ((cat[:4096], dense[:4096]), (rand_cat, rand_dense), (cat[:1], dense[:1])):
        with torch.no_grad():
            ref = torch.sigmoid(model(c, d)).numpy()
        assert np.max(np.abs(_onnx_probabilities(path, c, d) - ref)) <= TOLERANCE


def _ort_node_count(path: Path, tmp_path: Path) -> int:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / f"{path.stem}.ort.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    import onnx

    return sum(op_counts(onnx.load(opts.optimized_model_filepath)).values())


def test_export_writes_the_fused_form(run_dir, tmp_path) -> None:
    """export_run ships the fused graph: parity against the unfused model, fewer operators."""
    repo = tmp_path / "models"
    result = export_run(run_dir, repo, "mldcn", log=_quiet)
    mv = ModelRepository(repo).load_version("mldcn").verify()
    info, parity = mv.meta.onnx, mv.meta.parity
    assert info.graph_form == "fused"
    assert info.node_count == sum(info.op_counts.values())
    assert parity["reference"] == "PyTorch fp32" and parity["max_abs_diff"] <= TOLERANCE
    assert {c["inputs"] for c in parity["checks"]} >= {"random", "valid", "valid_all"}
    # the same model exported unfused has more operators, in the file and after ORT's fusions
    model, _, encoders, _ = load_run(run_dir)
    plain = tmp_path / "plain.onnx"
    plain_graph = export_graph(model.eval(), plain, len(encoders.cardinalities),
                               encoders.num_dense)
    assert info.node_count < sum(op_counts(plain_graph).values())
    assert _ort_node_count(mv.onnx_path, tmp_path) < _ort_node_count(plain, tmp_path)
    assert result.meta.onnx == info


def test_model_json_graph_keys_are_checked(run_dir, tmp_path) -> None:
    repo = tmp_path / "models"
    meta = json.loads(export_run(run_dir, repo, "m", log=_quiet).meta.to_json())
    where = Path("model.json")
    validate_meta(meta, where)
    legacy = json.loads(json.dumps(meta))
    for key in ("graph_form", "op_counts", "node_count"):
        del legacy["onnx"][key]
    validate_meta(legacy, where)  # files written before these keys stay valid
    bad_form = json.loads(json.dumps(meta))
    bad_form["onnx"]["graph_form"] = "folded"
    with pytest.raises(RepositoryError,
                       match="onnx.graph_form: Input should be 'plain' or 'fused', got 'folded'"):
        validate_meta(bad_form, where)
    bad_count = json.loads(json.dumps(meta))
    bad_count["onnx"]["node_count"] += 1
    with pytest.raises(RepositoryError, match="node_count .* is not the sum"):
        validate_meta(bad_count, where)


def test_bench_report_is_a_file_of_its_own() -> None:
    """The benchmark writes its tables as a whole file (docs/bench/fusion.md) that points at the
    hand-written analysis; nothing rewrites part of a hand-written document."""
    text = document("| batch | x |\n|---|---|\n")
    assert text.startswith(DOC_TITLE + "\n") and "(../fusion.md)" in text
    assert text.endswith("| batch | x |\n|---|---|\n")
    committed = (Path(__file__).resolve().parents[1] / "docs" / "bench" / "fusion.md").read_text()
    assert committed.startswith(DOC_TITLE + "\n")

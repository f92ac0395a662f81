"""The training recipe: batch norm (folded for inference), the embedding regulariser,
calibration metrics and temperature scaling, pre-split validation/test files, config files.

Calibration metrics are checked on a hand-computed example; batch norm and temperature scaling
through the exported ONNX graph in ONNX Runtime, plain and fused; pre-split files and config
files through ``mldcn train`` and ``mldcn bench quality`` on real data (../shared/data).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import model as model_pkg
from export.exporter import export_graph, export_run, serving_form
from model.calibration import fit_temperature
from model.cli import main
from model.config import ConfigError, ModelConfig
from model.ctr import build_model
from model.metrics import calibration, expected_calibration_error
from model.overrides import Overrides, OverridesError
from model.train import embedding_penalty, train_step

CARDS = [7, 5, 11]
ATTRIBUTION_SCHEMA = str(Path(model_pkg.__file__).parent / "schemas" / "criteo_attribution.json")
QUICK = ["--batch-size", "512", "--no-progress", "--threads", "1"]


def _rows(n: int, num_dense: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cat = torch.stack([torch.randint(0, c, (n,), generator=g) for c in CARDS], dim=1)
    return cat, torch.randn(n, num_dense, generator=g)


def _with_running_stats(arch: str, **options) -> torch.nn.Module:
    """A model with batch norm whose running statistics are far from (0, 1)."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, embed_dim=4, num_layers=2, rank=4, mlp_dims=(8, 4),
                      batch_norm=True, **options)
    net = build_model(cfg, CARDS, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features))
                m.running_var.copy_(0.2 + torch.rand(m.num_features) * 3)
    return net.eval()


def _ort(path: Path, cat: torch.Tensor, dense: torch.Tensor) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {"cat_ids": cat.numpy(), "dense": dense.numpy()})[0]


# --- calibration ----------------------------------------------------------------------------


def test_calibration_metrics_on_a_hand_computed_example() -> None:
    # 6 rows, 3 equal-mass bins of 2 rows each (sorted by p):
    #   p 0.1, 0.2 | y 0, 0 -> |0.15 - 0.0| = 0.15
    #   p 0.4, 0.5 | y 1, 0 -> |0.45 - 0.5| = 0.05
    #   p 0.7, 0.9 | y 1, 1 -> |0.80 - 1.0| = 0.20
    # ECE = (0.15 + 0.05 + 0.20) / 3 = 0.4 / 3; mean p = 2.8 / 6, mean y = 3 / 6
    y = [1, 0, 0, 1, 1, 0]
    p = [0.7, 0.1, 0.2, 0.9, 0.4, 0.5]
    assert expected_calibration_error(y, p, bins=3) == pytest.approx(0.4 / 3)
    c = calibration(y, p, bins=3)
    assert c["mean_pred"] == pytest.approx(2.8 / 6) and c["mean_obs"] == pytest.approx(0.5)
    assert c["pred_obs_ratio"] == pytest.approx(2.8 / 3)
    expected_ll = -np.mean(np.log([0.7, 0.9, 0.8, 0.9, 0.4, 0.5]))
    assert c["logloss"] == pytest.approx(expected_ll)
    # one bin: |mean p - mean y|; ties stay in one bin; perfect calibration is 0
    assert expected_calibration_error(y, p, bins=1) == pytest.approx(abs(2.8 / 6 - 0.5))
    assert expected_calibration_error([0, 1, 0, 1], [0.5] * 4, bins=4) == 0.0
    assert math.isnan(calibration([0, 0], [0.1, 0.2])["pred_obs_ratio"])
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error(y, p, bins=0)


def test_fit_temperature_recovers_an_overconfident_model_and_keeps_degenerate_cases() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0.0, 1.5, 50_000)
    y = (rng.random(z.size) < 1 / (1 + np.exp(-z))).astype(np.float64)
    assert fit_temperature(2.5 * z, y) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(0.5 * z, y) == pytest.approx(0.5, rel=0.05)
    assert fit_temperature(z, np.zeros_like(z)) == 1.0  # a single class: nothing to fit
    assert fit_temperature(np.zeros(10), np.r_[np.zeros(5), np.ones(5)]) == 1.0


@pytest.mark.parametrize("arch", ["mldcn", "dcnv2", "lr"])
def test_scale_logits_divides_every_logit_and_the_export_carries_it(arch, tmp_path) -> None:
    cfg = ModelConfig(arch=arch, embed_dim=4, num_layers=2, rank=4, mlp_dims=(8,))
    torch.manual_seed(0)
    net = build_model(cfg, CARDS, 2).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    cat, dense = _rows(64)
    with torch.no_grad():
        before = net(cat, dense)
        net.scale_logits(1 / 2.5)
        assert torch.allclose(net(cat, dense), before / 2.5, atol=1e-5)
    graph, _ = serving_form(net)
    export_graph(graph, tmp_path / "m.onnx", len(CARDS), 2)
    want = torch.sigmoid(before / 2.5).numpy()
    assert np.max(np.abs(_ort(tmp_path / "m.onnx", cat, dense) - want)) < 1e-5


# --- batch norm -----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["mldcn", "dcnv2", "masknet", "mlp"])
@pytest.mark.parametrize("structure", ["parallel", "stacked"])
def test_batch_norm_is_folded_for_inference(arch, structure, tmp_path) -> None:
    net = _with_running_stats(arch, structure=structure)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())
    graph, form = serving_form(net)
    assert form == ("fused" if arch == "mldcn" else "plain")
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in graph.modules())
    cat, dense = _rows(300, seed=3)
    with torch.no_grad():
        want = torch.sigmoid(net(cat, dense)).numpy()
        assert np.max(np.abs(torch.sigmoid(graph(cat, dense)).numpy() - want)) < 1e-5
    onnx_model = export_graph(graph, tmp_path / "m.onnx", len(CARDS), 2)
    assert "BatchNormalization" not in {n.op_type for n in onnx_model.graph.node}
    assert np.max(np.abs(_ort(tmp_path / "m.onnx", cat, dense) - want)) < 1e-5
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.modules())  # untouched


def test_new_model_settings_are_validated() -> None:
    for bad in ({"embedding_l2": -1e-3}, {"embedding_l2": float("nan")}, {"embed_init_std": 0},
                {"batch_norm": "yes"}, {"embedding_l2": True}):
        with pytest.raises(ConfigError):
            ModelConfig(**bad)
    old = ModelConfig.from_dict({"arch": "dcnv2"})  # a model_config.json from before them
    assert (old.batch_norm, old.embedding_l2, old.embed_init_std) == (False, 0.0, 1e-4)


def test_embedding_init_scale_and_penalty() -> None:
    net = build_model(ModelConfig(arch="mlp", embed_dim=8, embed_init_std=0.05), [1000], 0)
    assert float(net.embedding.table.weight.detach().std()) == pytest.approx(0.05, rel=0.1)
    penalty = embedding_penalty(net)
    assert penalty is not None
    assert float(penalty.detach()) == pytest.approx(
        float(net.embedding.table.weight.detach().pow(2).sum()))
    assert embedding_penalty(build_model(ModelConfig(arch="mlp"), [], 3)) is None


def test_train_step_adds_half_lambda_times_the_squared_norm() -> None:
    # one SGD step with lr 1: E' = E - (dBCE/dE + lambda * E), the gradient of lambda/2*|E|^2
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="mlp", embed_dim=4, mlp_dims=(8,),
                                  embed_init_std=0.1), CARDS, 2)
    cat, dense = _rows(32)
    y = (torch.rand(32) < 0.3).float()
    lam = 0.3
    weight = net.embedding.table.weight
    before = weight.detach().clone()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(net(cat, dense), y)
    (grad,) = torch.autograd.grad(bce, weight)
    train_step(net, torch.optim.SGD(net.parameters(), lr=1.0), cat, dense, y, 0.0, lam)
    assert torch.allclose(weight.detach(), before - grad - lam * before, atol=1e-6)


# --- pre-split files and config files through the CLI ----------------------------------------


def _run(tmp_path: Path, name: str, *args: str) -> tuple[Path, dict]:
    out = tmp_path / name
    assert main(["train", *args, *QUICK, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def attribution(shared_data, tmp_path_factory) -> dict[str, Path]:
    """The Criteo attribution set cut into three real files: train, valid, test."""
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("attribution")
    table = pq.read_table(shared_data / "criteo_attribution" / "small_train.parquet")
    parts = {"train": table.slice(0, 12_000), "valid": table.slice(12_000, 3_000),
             "test": table.slice(15_000, 3_000)}
    for name, part in parts.items():
        pq.write_table(part, folder / f"{name}.parquet")
    return {name: folder / f"{name}.parquet" for name in parts}


def test_train_with_pre_split_valid_and_test_files(attribution, tmp_path) -> None:
    base = ["--data", str(attribution["train"]), "--schema", ATTRIBUTION_SCHEMA, "--arch",
            "dcnv2", "--epochs", "2"]
    _, m = _run(tmp_path, "presplit", *base, "--valid-data", str(attribution["valid"]),
                "--test-data", str(attribution["test"]))
    splits = m["data"]["splits"]
    # every row of --data trains: nothing is drawn from it for valid or test
    assert (splits["train"]["rows"], splits["valid"]["rows"], splits["test"]["rows"]) == \
        (12_000, 3_000, 3_000)
    assert m["valid"]["rows"] == 3_000 and m["test"]["rows"] == 3_000
    assert [f["path"] for f in m["data"]["valid_files"]] == [str(attribution["valid"])]
    assert [f["path"] for f in m["data"]["test_files"]] == [str(attribution["test"])]
    split = json.loads((tmp_path / "presplit" / "train_config.json").read_text())["split"]
    assert split["valid_frac"] == 0.0 and split["test_frac"] == 0.0  # what was applied
    for key in ("pred_obs_ratio", "ece", "mean_pred", "mean_obs", "logloss"):
        assert math.isfinite(m["test"][key]), key
    # only a test file: valid is drawn from --data (10%), test is the file
    _, m = _run(tmp_path, "testonly", *base, "--test-data", str(attribution["test"]))
    splits = m["data"]["splits"]
    assert splits["test"]["rows"] == 3_000
    assert splits["train"]["rows"] + splits["valid"]["rows"] == 12_000
    assert 900 < splits["valid"]["rows"] < 1500
    assert main(["train", *base, "--valid-data", str(tmp_path / "missing.parquet"),
                 *QUICK, "--out", str(tmp_path / "x")]) == 2


def test_config_file_and_temperature_scaling_through_train_and_export(attribution,
                                                                      tmp_path) -> None:
    config = tmp_path / "tuned.json"
    config.write_text(json.dumps({
        "arch": "mldcn", "level": "small", "valid_auc": 0.7,  # records, ignored
        "model": {"batch_norm": True, "dropout": 0.2, "embedding_l2": 1e-3},
        "train": {"lr": 0.004, "epochs": 2, "batch_size": 256}}))
    run, m = _run(tmp_path, "tuned", "--data", str(attribution["train"]), "--schema",
                  ATTRIBUTION_SCHEMA, "--arch", "mldcn", "--config", str(config),
                  "--calibrate", "temperature", "--set", "dropout=0.1")
    cfg = json.loads((run / "model_config.json").read_text())["model"]
    train = json.loads((run / "train_config.json").read_text())["train"]
    assert cfg["batch_norm"] is True and cfg["embedding_l2"] == 1e-3
    assert cfg["dropout"] == 0.1  # --set wins over the file
    assert train["lr"] == 0.004 and train["epochs"] == 2 and train["calibrate"] == "temperature"
    assert train["batch_size"] == 512  # the explicit --batch-size (QUICK) wins over the file
    cal = m["calibration"]
    assert cal["method"] == "temperature" and cal["temperature"] > 0
    assert cal["valid_after"]["logloss"] <= cal["valid_before"]["logloss"] + 1e-9
    assert m["valid"]["logloss"] == pytest.approx(cal["valid_after"]["logloss"])
    # the export serves the calibrated model: its parity check ran against it
    result = export_run(run, tmp_path / "models", "tuned", log=lambda _: None)
    assert result.meta.parity["max_abs_diff"] < 1e-4
    # a config for another arch is refused, and a bad one names the key
    assert main(["train", "--data", str(attribution["train"]), "--schema", ATTRIBUTION_SCHEMA,
                 "--arch", "dcnv2", "--config", str(config), *QUICK, "--out",
                 str(tmp_path / "y")]) == 2
    with pytest.raises(OverridesError, match="rank_size"):
        Overrides.from_dict({"model": {"rank_size": 3}})
    with pytest.raises(OverridesError, match="momentum"):
        Overrides.from_dict({"train": {"momentum": 0.9}})


def test_bench_quality_with_pre_split_files_and_a_config(attribution, tmp_path) -> None:
    config = tmp_path / "recipe.json"
    config.write_text(json.dumps({"model": {"batch_norm": True}, "train": {"lr": 0.003}}))
    out = tmp_path / "study"
    args = ["bench", "quality", "--data", str(attribution["train"]), "--valid-data",
            str(attribution["valid"]), "--test-data", str(attribution["test"]), "--schema",
            ATTRIBUTION_SCHEMA, "--archs", "mldcn,dcnv2", "--levels", "small", "--seeds", "2",
            "--epochs", "2", "--config", str(config), "--calibrate", "temperature",
            "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    study = report["study"]
    assert study["data"]["splits"]["train"]["rows"] == 12_000
    assert study["data"]["splits"]["valid"]["rows"] == 3_000
    assert study["identity"]["overrides"]["mldcn"]["model"] == {"batch_norm": True}
    assert "--valid-data" in study["command"] and "--config" in study["command"]
    assert report["cells_done"] == 4
    for cell in report["cells"]:
        assert cell["model"]["batch_norm"] is True
        assert cell["calibration"]["method"] == "temperature"
    row = report["rows"][0]
    assert {"test_pred_obs_ratio", "test_ece"} <= set(row)
    md = (out / "report.md").read_text()
    assert "pred/obs CTR" in md and "BN on" in md
    # the same command resumes with nothing to do; another config is another study
    assert main(args) == 0
    config.write_text(json.dumps({"model": {"batch_norm": False}}))
    from model.bench import quality as bench_quality
    from model.cli import build_parser

    with pytest.raises(ValueError, match="other data or training settings"):
        bench_quality.main(build_parser().parse_args(args))
    # ... which runs in its own folder, and the two compare paired by seed
    other = tmp_path / "study-bn-off"
    assert main([*args[:-1], str(other)]) == 0
    assert main(["bench", "quality-diff", str(other), str(out), "--out",
                 str(tmp_path / "diff.md")]) == 0
    diff = json.loads((tmp_path / "diff.json").read_text())
    assert {(r["arch"], r["level"]) for r in diff["rows"]} == {("mldcn", "small"),
                                                               ("dcnv2", "small")}
    for r in diff["rows"]:
        cells = {c["seed"]: c["test"]["auc"] for c in report["cells"] if c["arch"] == r["arch"]}
        base = {c["seed"]: c["test"]["auc"] for c in bench_quality.load_cells(other)
                if c["arch"] == r["arch"]}
        assert r["delta_auc"]["n"] == 2
        assert r["delta_auc"]["mean"] == pytest.approx(
            np.mean([cells[s] - base[s] for s in (0, 1)]))
    assert "ΔAUC" in (tmp_path / "diff.md").read_text()
    # studies on other data do not pair
    alone = tmp_path / "alone"
    assert main(["bench", "quality", "--data", str(attribution["valid"]), "--schema",
                 ATTRIBUTION_SCHEMA, "--archs", "dcnv2", "--levels", "small", "--seeds", "1",
                 "--epochs", "1", "--threads", "1", "--out", str(alone)]) == 0
    assert main(["bench", "quality-diff", str(alone), str(out), "--out",
                 str(tmp_path / "bad.md")]) == 2

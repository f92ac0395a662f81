"""On synthetic data with planted 2nd/3rd-order interactions, every architecture must beat
logistic regression, and ML-DCN must come within 0.01 of the Bayes-optimal AUC."""

from __future__ import annotations

import pytest
import torch

from model.cli import synthetic_source
from model.config import ModelConfig
from model.ctr import build_model
from model.dataset import prepare
from model.presets import preset
from model.split import SplitSpec
from model.train import TrainConfig, evaluate, fit

ROWS = 150_000


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    source, bayes = synthetic_source(ROWS, seed=0, cache=tmp_path_factory.mktemp("cache"))
    data = prepare(source, SplitSpec(seed=0), tmp_path_factory.mktemp("shards"))
    return data, bayes


def _test_auc(cfg: ModelConfig, data, epochs: int = 6) -> float:
    torch.manual_seed(0)
    cards, nd = data.encoders.cardinalities, data.encoders.num_dense
    model = build_model(cfg, cards, nd)
    fit(model, data, TrainConfig(epochs=epochs, batch_size=512, progress=False, seed=0),
        log=lambda s: None)
    return evaluate(model, data.shards["test"], 16384)["auc"]


@pytest.fixture(scope="module")
def lr_auc(synthetic) -> float:
    data, _ = synthetic
    return _test_auc(ModelConfig(arch="lr"), data)


@pytest.mark.parametrize("arch", ["mldcn", "dcnv2", "masknet", "mlp"])
def test_beats_logistic_regression(synthetic, lr_auc, arch) -> None:
    data, bayes = synthetic
    cards, nd = data.encoders.cardinalities, data.encoders.num_dense
    auc = _test_auc(preset(arch, "small", cards, nd), data)
    print(f"{arch}: test AUC {auc:.4f}, LR {lr_auc:.4f}, Bayes {bayes:.4f}")
    assert auc > lr_auc + 0.005
    if arch == "mldcn":
        assert auc > bayes - 0.01

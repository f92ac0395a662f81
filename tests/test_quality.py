"""On synthetic data with planted 2nd/3rd-order interactions, every architecture must beat
logistic regression, and ML-DCN must come within 0.01 of the Bayes-optimal AUC.

The Bayes bound is measured on the very test rows the models are scored on (the AUC of the
true click probability against the sampled labels), so sampling noise of the test split does
not enter the comparison.
"""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.ctr import build_model
from model.dataset import prepare
from model.metrics import roc_auc
from model.presets import preset
from model.split import TEST, SplitSpec, assign_random
from model.synthetic import SyntheticSpec, SyntheticWorld, synthetic_source
from model.train import TrainConfig, evaluate, fit

ROWS = 200_000
SPLIT = SplitSpec(seed=0)
TRAIN = TrainConfig(epochs=10, batch_size=1024, lr=3e-3, progress=False, seed=0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    source, bayes = synthetic_source(ROWS, seed=0, cache=tmp_path_factory.mktemp("cache"))
    data = prepare(source, SPLIT, tmp_path_factory.mktemp("shards"))
    cols, p = SyntheticWorld.from_spec(SyntheticSpec()).sample(ROWS, seed=0)
    test = assign_random(SPLIT, 0, ROWS) == TEST
    assert int(test.sum()) == data.rows("test")
    oracle = roc_auc(cols["label"][test], p[test])
    assert abs(oracle - bayes) < 0.01  # the test split's bound agrees with the expected one
    return data, oracle


def _test_auc(cfg: ModelConfig, data) -> float:
    torch.manual_seed(0)
    cards, nd = data.encoders.cardinalities, data.encoders.num_dense
    model = build_model(cfg, cards, nd)
    fit(model, data, TRAIN, log=lambda s: None)
    return evaluate(model, data.shards["test"], 16384)["auc"]


@pytest.fixture(scope="module")
def lr_auc(synthetic) -> float:
    data, _ = synthetic
    return _test_auc(ModelConfig(arch="lr"), data)


@pytest.mark.parametrize("arch", ["mldcn", "dcnv2", "masknet", "mlp"])
def test_beats_logistic_regression(synthetic, lr_auc, arch) -> None:
    data, oracle = synthetic
    cards, nd = data.encoders.cardinalities, data.encoders.num_dense
    auc = _test_auc(preset(arch, "small", cards, nd), data)
    print(f"{arch}: test AUC {auc:.4f}, logistic regression {lr_auc:.4f}, Bayes {oracle:.4f}")
    assert auc > lr_auc + 0.02
    if arch == "mldcn":
        assert auc > oracle - 0.01

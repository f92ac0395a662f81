"""The architecture registry (model/archs.py): one consistent entry per architecture."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.archs import ARCHITECTURES, architecture
from model.config import ARCHS, ModelConfig
from model.presets import preset

CARDS, NUM_DENSE = [5, 7, 3, 9], 3
FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def test_every_architecture_has_one_entry() -> None:
    assert list(ARCHITECTURES) == list(ARCHS)
    with pytest.raises(ValueError, match="has no interaction module"):
        architecture("lr")


@pytest.mark.parametrize("arch", ARCHS)
def test_entry_build_cost_and_width_agree(arch: str) -> None:
    """What ``build`` makes has the width ``output_dim`` says and the parameters ``cost``
    counts; the preset keys the entry names are ModelConfig fields."""
    entry = architecture(arch)
    cfg = preset(arch, "small", CARDS, NUM_DENSE)
    d = len(CARDS) * cfg.embed_dim + NUM_DENSE
    module = entry.build(cfg, d, len(CARDS), NUM_DENSE)
    width = entry.output_dim(cfg, d, len(CARDS), NUM_DENSE)
    cost = entry.cost(cfg, d, len(CARDS), NUM_DENSE)
    if module is None:  # the plain MLP: no interaction module
        assert arch == "mlp" and width == d and cost.total == 0
    else:
        assert module.output_dim == width
        assert sum(p.numel() for p in module.parameters()) == cost.params
        out = module(torch.randn(2, d))
        assert out.shape == (2, width)
    assert entry.solved in FIELDS
    assert set(entry.key_hyperparameters(cfg)) <= FIELDS
    assert set(entry.preset_settings) <= FIELDS
    if arch != "mlp":  # (the MLP's widths are the level's tower: fixing them moves the level)
        value = getattr(cfg, entry.solved) + 1  # a fixed width is used as it is, unsolved
        fixed = preset(arch, "small", CARDS, NUM_DENSE, **{entry.solved: value})
        assert getattr(fixed, entry.solved) == value

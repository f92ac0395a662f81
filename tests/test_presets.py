"""Presets at matched FLOPs, and the ModelConfig they produce."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import ARCHS, ConfigError, ModelConfig
from model.ctr import build_model
from model.flops import model_flops
from model.presets import (
    LEVELS,
    MATCH_TOLERANCE,
    flops_mismatch,
    preset,
    preset_table,
    reference_config,
)

LAYOUTS = {
    "criteo_26cat_13num": ([3] * 26, 13),
    "criteo_39cat": ([3] * 39, 0),
    "avazu_22cat": ([3] * 22, 0),
    "five_cat": ([3] * 5, 0),
    "synthetic_10cat_3num": ([3] * 10, 3),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("level", LEVELS)
def test_presets_match_the_reference_within_tolerance(layout: str, level: str) -> None:
    cards, num_dense = LAYOUTS[layout]
    reference = reference_config(level)
    for arch in ARCHS:
        cfg = preset(arch, level, cards, num_dense)
        assert cfg.arch == arch
        assert abs(flops_mismatch(cfg, reference, cards, num_dense)) <= MATCH_TOLERANCE, arch
    assert preset("dcnv2", level, cards, num_dense) == reference


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_preset_matmul_flops_equal_flop_counter(arch: str, level: str) -> None:
    cards, num_dense = LAYOUTS["criteo_26cat_13num"]
    cfg = preset(arch, level, cards, num_dense)
    torch.manual_seed(0)
    model = build_model(cfg, cards, num_dense).eval()
    batch = 2
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(batch, len(cards), dtype=torch.long), torch.zeros(batch, num_dense))
    assert counter.get_total_flops() / batch == model_flops(cfg, cards, num_dense).matmul


def test_levels_share_settings_and_grow() -> None:
    cards, num_dense = LAYOUTS["criteo_26cat_13num"]
    totals = []
    for level in LEVELS:
        configs = [preset(arch, level, cards, num_dense) for arch in ARCHS]
        shared = {(c.embed_dim, c.num_layers) for c in configs}
        assert len(shared) == 1
        assert {c.mlp_dims for c in configs if c.arch != "mlp"} == {
            reference_config(level).mlp_dims
        }
        totals.append(model_flops(reference_config(level), cards, num_dense).total)
    assert totals == sorted(totals) and len(set(totals)) == 3


def test_small_preset_is_small() -> None:
    cards, num_dense = LAYOUTS["criteo_26cat_13num"]
    for arch in ARCHS:
        cfg = preset(arch, "small", cards, num_dense)
        assert cfg.embed_dim <= 8 and cfg.num_layers <= 2 and cfg.dropout == 0.0
        assert model_flops(cfg, cards, num_dense).total < 300_000


def test_mldcn_preset_keeps_mask_ratio() -> None:
    cfg = preset("mldcn", "medium", *LAYOUTS["criteo_26cat_13num"])
    assert cfg.mask_hidden == (cfg.rank + 1) // 2
    assert cfg.mask_position == "rank" and cfg.mask_source == "x0"


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("mldcn", {"mask_position": "input"}),
        ("mldcn", {"num_experts": 2, "residual_layernorm": True}),
        ("mldcn", {"mask_hidden": 8}),
        ("dcnv2", {"dcn_type": "lowrank"}),
        ("dcnv2", {"dcn_type": "mix", "num_experts": 2}),
        ("masknet", {"masknet_mode": "parallel"}),
        ("mldcn", {"embed_dim": 4, "mlp_dims": [32]}),
        ("mlp", {"num_layers": 3}),
    ],
)
def test_overrides_are_still_matched(arch: str, overrides: dict) -> None:
    cards, num_dense = LAYOUTS["synthetic_10cat_3num"]
    cfg = preset(arch, "small", cards, num_dense, **overrides)
    for key, value in overrides.items():
        expected = tuple(value) if isinstance(value, list) else value
        assert getattr(cfg, key) == expected
    reference = reference_config("small", **overrides)
    assert abs(flops_mismatch(cfg, reference, cards, num_dense)) <= MATCH_TOLERANCE


def test_overriding_the_solved_width_skips_matching() -> None:
    cards, num_dense = LAYOUTS["five_cat"]
    assert preset("mldcn", "small", cards, num_dense, rank=3).rank == 3
    assert preset("masknet", "small", cards, num_dense, block_dim=7).block_dim == 7
    assert preset("mldcn", "small", cards, num_dense, dropout=0.3).dropout == 0.3


@pytest.mark.parametrize(
    "args, match",
    [
        (("dcn", "small"), r"unknown arch 'dcn'.*mldcn.*dcnv2.*masknet.*mlp"),
        (("lr", "small"), "unknown arch 'lr'"),
        (("mldcn", "tiny"), r"unknown level 'tiny'.*small.*medium.*large"),
    ],
)
def test_unknown_names_raise(args: tuple[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset(*args, [3] * 5, 0)


def test_bad_overrides_raise() -> None:
    with pytest.raises(ValueError, match="unknown model config keys.*'rnak'"):
        preset("mldcn", "small", [3] * 5, 0, rnak=4)
    with pytest.raises(ValueError, match="mask_source"):
        preset("mldcn", "small", [3] * 5, 0, mask_source="x1")
    # DCN-Mix with 4 experts at d = 83: one more rank costs ~6% of the reference
    with pytest.raises(ValueError, match=r"within 2%.*pass rank to skip matching"):
        preset("dcnv2", "small", [3] * 10, 3, dcn_type="mix", num_experts=4)
    cfg = preset("dcnv2", "small", [3] * 10, 3, dcn_type="mix", num_experts=4, rank=5)
    assert cfg.rank == 5


def test_preset_table_rows() -> None:
    rows = preset_table([3] * 5, 1, levels=["small"])
    assert [(r["level"], r["arch"]) for r in rows] == [("small", a) for a in ARCHS]
    assert all(abs(r["mismatch"]) <= MATCH_TOLERANCE for r in rows)
    assert rows[1]["arch"] == "dcnv2" and rows[1]["mismatch"] == 0.0


# --- ModelConfig --------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    cfg = preset("masknet", "medium", *LAYOUTS["avazu_22cat"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(d) == cfg
    assert ModelConfig.from_dict({}) == ModelConfig()


@pytest.mark.parametrize(
    "d, match",
    [
        ({"arch": "transformer"}, "arch must be one of"),
        ({"structure": "serial"}, "structure must be one of"),
        ({"embed_dim": 0}, "embed_dim must be an integer >= 1"),
        ({"num_layers": 2.0}, "num_layers must be an integer"),
        ({"rank": True}, "rank must be an integer"),
        ({"mlp_dims": [64, 0]}, "mlp_dims"),
        ({"mlp_dims": 64}, "mlp_dims"),
        ({"dropout": 1.0}, "dropout"),
        ({"reduction_ratio": 0}, "reduction_ratio"),
        ({"mask_hidden": 0}, "mask_hidden"),
        ({"mask_activation": "tanh"}, "mask_activation must be one of"),
        ({"dcn_type": "mixture"}, "dcn_type must be one of"),
        ({"residual_layernorm": "yes"}, "residual_layernorm"),
        ({"rank": 4, "ranks": 5, "foo": 1}, r"unknown model config keys \['foo', 'ranks'\]"),
    ],
)
def test_config_rejects_bad_values(d: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(d)
    assert issubclass(ConfigError, ValueError)


def test_config_mask_hidden_default_is_half_the_rank() -> None:
    assert ModelConfig(rank=64).resolved_mask_hidden == 32
    assert ModelConfig(rank=7).resolved_mask_hidden == 4
    assert ModelConfig(rank=1).resolved_mask_hidden == 1
    assert ModelConfig(rank=64, mask_hidden=5).resolved_mask_hidden == 5

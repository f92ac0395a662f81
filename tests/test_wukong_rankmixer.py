"""WuKong and RankMixer: analytic FLOPs and parameters against the built models, matched presets,
and the equations on hand-checkable inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import STRUCTURES, ModelConfig
from model.ctr import build_interaction, build_model
from model.flops import interaction_cost, model_flops
from model.modules import RankMixer, WuKong
from model.modules.rankmixer import RankMixerLayer
from model.modules.wukong import WuKongLayer
from model.presets import LEVELS, MATCH_TOLERANCE, flops_mismatch, preset, reference_config

NEW_ARCHS = ("wukong", "rankmixer")
LAYOUTS = [([5, 7, 3, 9], 3), ([5, 7], 0), ([], 4), ([3] * 9, 0), ([4], 1)]


def _cfg(arch: str, **kw) -> ModelConfig:
    base = {"embed_dim": 4, "num_layers": 2, "mlp_dims": (8, 4), "fm_rank": 3, "fmb_hidden": 5,
            "ffn_hidden": 6}
    return ModelConfig(arch=arch, **{**base, **kw})


def _counted(cfg: ModelConfig, cards: list[int], num_dense: int, batch: int = 3) -> float:
    torch.manual_seed(0)
    model = build_model(cfg, cards, num_dense).eval()
    ids = torch.zeros(batch, len(cards), dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, torch.randn(batch, num_dense))
    return counter.get_total_flops() / batch


CONFIGS = [
    *[(a, {"structure": s}) for a in NEW_ARCHS for s in STRUCTURES],
    ("wukong", {"fm_rank": 1, "fmb_hidden": 1, "num_layers": 1}),
    ("wukong", {"num_layers": 3, "mlp_dims": ()}),
    ("rankmixer", {"token_dim": 90}),  # a multiple of every layout's T (1, 2, 5, 9)
    ("rankmixer", {"num_layers": 1, "ffn_hidden": 1, "structure": "stacked"}),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"{len(x[0])}cat{x[1]}num")
@pytest.mark.parametrize(("arch", "kw"), CONFIGS, ids=lambda x: str(x))
def test_flops_and_params_equal_the_built_model(arch: str, kw: dict, layout) -> None:
    cards, num_dense = layout
    cfg = _cfg(arch, **kw)
    report = model_flops(cfg, cards, num_dense)
    assert report.matmul == _counted(cfg, cards, num_dense)
    model = build_model(cfg, cards, num_dense)
    assert report.params == sum(p.numel() for p in model.parameters())
    assert report.total > report.matmul


@pytest.mark.parametrize("arch", NEW_ARCHS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("layout", [([3] * 26, 13), ([3] * 39, 0), ([3] * 5, 0), ([3] * 9, 0),
                                    ([3] * 10, 3), ([3] * 22, 0)])
def test_presets_match_the_dcnv2_reference(arch: str, level: str, layout) -> None:
    cards, num_dense = layout
    cfg = preset(arch, level, cards, num_dense)
    reference = reference_config(level)
    assert abs(flops_mismatch(cfg, reference, cards, num_dense)) <= MATCH_TOLERANCE
    assert (cfg.embed_dim, cfg.num_layers, cfg.mlp_dims) == (
        reference.embed_dim, reference.num_layers, reference.mlp_dims)
    assert _counted(cfg, cards, num_dense, batch=2) == model_flops(cfg, cards, num_dense).matmul


def test_preset_overrides_skip_matching() -> None:
    assert preset("wukong", "small", [3] * 5, 0, fmb_hidden=7).fmb_hidden == 7
    assert preset("rankmixer", "small", [3] * 5, 0, ffn_hidden=9).ffn_hidden == 9
    cfg = preset("rankmixer", "medium", [3] * 5, 0, token_dim=40)
    assert cfg.token_dim == 40
    assert abs(flops_mismatch(cfg, reference_config("medium"), [3] * 5, 0)) <= MATCH_TOLERANCE


def test_wukong_layer_follows_the_equation() -> None:
    """LN(concat(MLP(LN(flatten(X Xᵀ Y))), W X) + X), recomputed by hand."""
    torch.manual_seed(0)
    layer = WuKongLayer(5, 4, fm_rank=3, fmb_hidden=6).eval()
    x = torch.randn(2, 5, 4)
    fm_in = torch.nn.functional.layer_norm((x @ x.transpose(1, 2) @ layer.y).flatten(1), (15,),
                                           layer.fm_norm.weight, layer.fm_norm.bias)
    fm = layer.fm_out(torch.relu(layer.fm_in(fm_in))).reshape(2, 3, 4)
    lcb = torch.einsum("ln,bne->ble", layer.lcb.weight, x)
    expected = layer.norm(torch.cat([fm, lcb], dim=1) + x)
    torch.testing.assert_close(layer(x), expected)
    assert (layer.num_fm, layer.num_lcb) == (3, 2)


def test_rankmixer_token_mixing_regroups_heads() -> None:
    """T = 2 tokens of D = 4: new token h = concat(head h of token 0, head h of token 1)."""
    layer = RankMixerLayer(2, 4, ffn_hidden=3)
    x = torch.arange(8.0).reshape(1, 2, 4)  # token 0: 0 1 2 3, token 1: 4 5 6 7
    captured = {}
    layer.norm_mix.register_forward_hook(lambda m, inp, out: captured.update(inp=inp[0]))
    layer(x)
    mixed = captured["inp"] - x
    assert mixed.tolist() == [[[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]]


def test_rankmixer_ffns_are_per_token() -> None:
    """Changing token 1's FFN weights leaves the FFN output of token 0 unchanged."""
    torch.manual_seed(0)
    layer = RankMixerLayer(2, 4, ffn_hidden=3).eval()
    x = torch.randn(3, 2, 4)
    before = layer(x)
    with torch.no_grad():
        layer.w1[1].mul_(-2.0)  # a constant shift would cancel (LN output sums to 0)
    after = layer(x)
    torch.testing.assert_close(after[:, 0], before[:, 0])
    assert not torch.allclose(after[:, 1], before[:, 1])


def test_dense_features_become_one_token() -> None:
    net = WuKong(3, 4, num_dense=2, num_layers=1, fm_rank=2, fmb_hidden=3)
    assert net.num_tokens == 4 and net.output_dim == 16
    mixer = RankMixer(3, 4, num_dense=2, num_layers=1, token_dim=None, ffn_hidden=3)
    assert mixer.num_tokens == 4 and mixer.token_dim == 4 and mixer.output_dim == 4
    assert RankMixer(9, 8, 0, 1, None, 3).token_dim == 9


def test_interaction_cost_needs_the_layout() -> None:
    cfg = _cfg("wukong")
    with pytest.raises(ValueError, match="needs num_fields and num_dense"):
        interaction_cost(cfg, 12)
    with pytest.raises(ValueError, match="must equal"):
        interaction_cost(cfg, 12, num_fields=2, num_dense=0)
    with pytest.raises(ValueError, match="needs num_fields"):
        build_interaction(_cfg("rankmixer"), 12)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RankMixerLayer(3, 4, ffn_hidden=2),  # D not a multiple of T
        lambda: RankMixerLayer(2, 4, ffn_hidden=0),
        lambda: RankMixer(0, 4, 0, 1, None, 2),
        lambda: WuKongLayer(3, 4, fm_rank=0, fmb_hidden=2),
        lambda: WuKong(2, 4, -1, 1, 2, 2),
    ],
)
def test_bad_arguments_raise_value_error(make) -> None:
    with pytest.raises(ValueError):
        make()


def test_config_checks_new_fields() -> None:
    with pytest.raises(ValueError, match="token_dim"):
        ModelConfig(arch="rankmixer", token_dim=0)
    with pytest.raises(ValueError, match="fmb_hidden"):
        ModelConfig(arch="wukong", fmb_hidden=0)
    cfg = ModelConfig(arch="rankmixer", token_dim=12, ffn_hidden=7)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg

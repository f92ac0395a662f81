"""Analytic FLOPs against torch's FlopCounterMode, parameter counts against the built models,
and MODELS.md's formulas and worked example."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.config import ARCHS, STRUCTURES, ModelConfig
from model.costs import (
    crossnet_cost,
    lowrank_crossnet_cost,
    masked_lowrank_crossnet_cost,
    mixture_crossnet_cost,
    serial_masknet_cost,
)
from model.ctr import build_model
from model.flops import model_flops

CARDS, NUM_DENSE, BATCH = [5, 7, 3, 9], 3, 3


def counted_matmul_flops(cfg: ModelConfig, cards: list[int], num_dense: int) -> float:
    """FlopCounterMode's count for one forward pass, per example."""
    torch.manual_seed(0)
    model = build_model(cfg, cards, num_dense).eval()
    ids = torch.zeros(BATCH, len(cards), dtype=torch.long)
    dense = torch.randn(BATCH, num_dense)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(ids, dense)
    return counter.get_total_flops() / BATCH


def _cfg(**kw) -> ModelConfig:
    base = {"embed_dim": 4, "num_layers": 2, "rank": 5, "block_dim": 6, "mlp_dims": (8, 4)}
    return ModelConfig(**{**base, **kw})


CONFIGS = [
    *[_cfg(arch=a, structure=s) for a in ARCHS for s in STRUCTURES],
    _cfg(arch="lr"),
    _cfg(arch="dcnv2", dcn_type="lowrank"),
    _cfg(arch="dcnv2", dcn_type="lowrank", low_rank_c=True, low_rank_nonlinearity="tanh"),
    _cfg(arch="dcnv2", dcn_type="lowrank", low_rank_c=True, low_rank_nonlinearity="identity"),
    _cfg(arch="dcnv2", dcn_type="mix", num_experts=3),
    _cfg(arch="dcnv2", dcn_type="mix", num_experts=1, structure="stacked"),
    _cfg(arch="masknet", masknet_mode="parallel"),
    _cfg(arch="masknet", masknet_mode="parallel", structure="stacked", reduction_ratio=1.5),
    _cfg(arch="mldcn", mask_hidden=3),
    _cfg(arch="mldcn", mask_position="input"),
    _cfg(arch="mldcn", mask_source="xl"),
    _cfg(arch="mldcn", mask_activation="sigmoid"),
    _cfg(arch="mldcn", mask_activation="2sigmoid"),
    _cfg(arch="mldcn", residual_layernorm=True),
    _cfg(arch="mldcn", num_experts=3),
    _cfg(arch="mldcn", num_experts=2, mask_position="input", mask_source="xl"),
    _cfg(arch="mldcn", structure="cross_only", mlp_dims=()),
    _cfg(arch="mlp", mlp_dims=()),
]


def _name(cfg: ModelConfig) -> str:
    default = ModelConfig()
    return ",".join(
        f"{k}={v}" for k, v in cfg.to_dict().items() if v != default.to_dict()[k] or k == "arch"
    )


@pytest.mark.parametrize("cfg", CONFIGS, ids=_name)
def test_matmul_flops_equal_flop_counter(cfg: ModelConfig) -> None:
    report = model_flops(cfg, CARDS, NUM_DENSE)
    assert report.matmul == counted_matmul_flops(cfg, CARDS, NUM_DENSE)
    assert report.total == report.matmul + report.elementwise
    assert report.elementwise > 0


@pytest.mark.parametrize("layout", [([5, 7], 0), ([], 4)])
@pytest.mark.parametrize("arch", [*ARCHS, "lr"])
def test_matmul_flops_equal_flop_counter_for_one_sided_layouts(arch: str, layout) -> None:
    cards, num_dense = layout
    cfg = _cfg(arch=arch)
    assert model_flops(cfg, cards, num_dense).matmul == counted_matmul_flops(cfg, cards, num_dense)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_name)
def test_parameter_counts_equal_the_model(cfg: ModelConfig) -> None:
    model = build_model(cfg, CARDS, NUM_DENSE)
    report = model_flops(cfg, CARDS, NUM_DENSE)
    assert report.params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    embed_dim = 1 if cfg.arch == "lr" else cfg.embed_dim
    assert report.embedding_params == sum(CARDS) * embed_dim
    assert report.dense_params == report.params - report.embedding_params
    assert sum(part.params for part in report.parts.values()) == report.dense_params


def test_report_parts_add_up_and_serialise() -> None:
    report = model_flops(_cfg(arch="mldcn"), CARDS, NUM_DENSE)
    assert set(report.parts) == {"interaction", "mlp", "head"}
    assert sum(p.total for p in report.parts.values()) == report.total
    d = report.to_dict()
    assert d["total"] == report.total and d["parts"]["head"]["matmul"] == 2 * (19 + 4)


def test_flops_do_not_depend_on_cardinalities() -> None:
    cfg = _cfg(arch="mldcn")
    assert model_flops(cfg, [2] * 4, 3).total == model_flops(cfg, [10**6] * 4, 3).total


# --- MODELS.md ---------------------------------------------------------------------------------

d, L = 390, 3


def test_models_md_formulas() -> None:
    """The exact formulas; where we count more than MODELS.md the difference is documented."""
    assert crossnet_cost(d, L).total == L * (2 * d * d + 3 * d)
    assert lowrank_crossnet_cost(d, L, 64).total == L * (4 * d * 64 + 3 * d)
    r = 16
    assert lowrank_crossnet_cost(d, L, r, use_c=True).total == L * (
        4 * d * r + 3 * d + 2 * r * r + 2 * r
    )
    r, h = 64, 32
    models_md = L * (4 * d * r + 2 * h * (d + r) + h + r + 3 * d)
    ours = masked_lowrank_crossnet_cost(d, L, r, h).total
    assert ours == models_md + L * (h + r) + 5 * d  # + ReLU and m ⊙ z, + the shared LN(x0)
    r, k = 32, 4
    models_md = L * k * (4 * d * r + 2 * r * r) + L * (4 * k * d + d) + 2 * L * k * d
    ours = mixture_crossnet_cost(d, L, r, k).total
    # + nonlinearities (2Kr) and softmax (3K); the gated sum of K terms needs K·d products and
    # (K − 1)·d adds where MODELS.md counts 2Kd
    assert ours == models_md + L * (2 * k * r + 3 * k - d)


@pytest.mark.parametrize(
    "cost, models_md_millions, rel_tol",
    [
        (crossnet_cost(d, L), 0.916, 0.0006),
        (lowrank_crossnet_cost(d, L, 64), 0.303, 0.0006),
        (mixture_crossnet_cost(d, L, 32, 4), 0.654, 0.003),
        (masked_lowrank_crossnet_cost(d, L, 64, 32), 0.390, 0.008),
        (serial_masknet_cost(d, L, 400, 0.2), 1.34, 0.004),
    ],
    ids=["full", "lowrank", "mix", "mldcn", "serial_masknet"],
)
def test_models_md_worked_example(cost, models_md_millions: float, rel_tol: float) -> None:
    """Full and low rank agree to MODELS.md's rounding; the others within our documented extras."""
    assert cost.total / 1e6 == pytest.approx(models_md_millions, rel=rel_tol)


def test_mldcn_costs_about_lowrank_dcnv2_of_rank_r_plus_half_h() -> None:
    """MODELS.md: ML-DCN(r, h) costs about low-rank DCNv2 with rank r + h/2 (r ≪ d).

    The matmul difference is exactly the mask's second layer, 2hr per layer.
    """
    mldcn = masked_lowrank_crossnet_cost(d, L, 64, 32)
    dcn = lowrank_crossnet_cost(d, L, 64 + 16)
    assert mldcn.matmul - dcn.matmul == L * 2 * 32 * 64
    assert mldcn.total == pytest.approx(dcn.total, rel=0.05)

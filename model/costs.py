"""Analytic FLOPs and parameter counts per example of every module (``model.flops`` adds them
up for the whole CTR model through the architecture registry, ``model.archs``).

No torch import: presets, the CLI and the service can use it. One multiply-add is 2 FLOPs.

Two numbers are reported:

``matmul``
    Matrix-multiply FLOPs only (2·m·n·k for every mm/addmm/bmm): exactly what
    ``torch.utils.flop_counter.FlopCounterMode`` counts for our modules (tests check it for every
    architecture, structure, ablation and preset). The bias of an addmm is not included there.
``total``
    ``matmul`` plus element-wise work (``elementwise``), counted per output element as:

    ===========================================  ===================
    bias add, ⊙, residual add, sum of two terms  1
    ReLU, tanh, sigmoid                          1 (2·sigmoid: 2)
    LayerNorm (mean, centre, variance, scale,    5
    affine)
    softmax over K experts                       3 per expert
    gated sum of K expert outputs                K products + (K−1) adds per element
    ===========================================  ===================

    Not counted: embedding lookups, id offsets, concatenation and reshapes, dropout (training
    only), the deep tower's batch normalisation (folded into its Linear for inference), and the
    final sigmoid (the model returns logits). Identity nonlinearities cost 0.

With these conventions ../shared/MODELS.md's formulas are reproduced exactly for DCNv2 full rank,
L(2d² + 3d), and low rank, L(4dr + 3d) (+ L(2r² + 2r) with C and a nonlinearity). Where MODELS.md
is looser we count what the code runs:

- DCN-Mix: L·K(4dr + 2r² + 2r) + L(2Kd) + L(4Kd + 3K) here (nonlinearities, softmax, and a gated
  sum of K(2d) − d), against MODELS.md's L·K(4dr + 2r²) + L(4Kd + d) + 2LKd: 652,500 vs 652,866
  for d=390, L=3, r=32, K=4 (MODELS.md's worked number, 0.654 M, is 0.2% above its own formula).
- ML-DCN: MODELS.md's L(4dr + 2h(d + r) + h + r + 3d) counts one element-wise op per mask vector;
  we count c1 and ReLU (2h) and c2 and the mask product (2r), and the shared LN(x0) (5d, once):
  total = MODELS.md + L(h + r) + 5d, e.g. 392,724 vs 390,486 (0.6%) for d=390, L=3, r=64, h=32.
- Serial MaskNet 3×400, ρ=0.2, d=390: 1,338,486 (MODELS.md: 1.34 M).
- WuKong and RankMixer (not costed in MODELS.md): see ``wukong_cost`` and ``rankmixer_cost``;
  RankMixer's GELU counts 1 per element like the other nonlinearities, its token mixing 0
  (a reshape), its final mean over T tokens T·D.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.config import ModelConfig, reduction_width


@dataclass(frozen=True)
class Cost:
    """FLOPs per example and trainable parameters of one module (``total`` = matmul + rest)."""

    matmul: int = 0
    elementwise: int = 0
    params: int = 0

    @property
    def total(self) -> int:
        return self.matmul + self.elementwise

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.matmul + other.matmul,
            self.elementwise + other.elementwise,
            self.params + other.params,
        )

    def times(self, n: int) -> Cost:
        """The cost of ``n`` copies (n layers, n experts)."""
        return Cost(self.matmul * n, self.elementwise * n, self.params * n)


def sum_costs(costs: Sequence[Cost]) -> Cost:
    """The cost of all ``costs`` together."""
    out = Cost()
    for c in costs:
        out = out + c
    return out


def linear_cost(in_features: int, out_features: int, bias: bool = True) -> Cost:
    """``nn.Linear``: 2·in·out matmul FLOPs, one add per output for the bias."""
    b = out_features if bias else 0
    return Cost(2 * in_features * out_features, b, in_features * out_features + b)


def elementwise_cost(n: int) -> Cost:
    """``n`` element-wise operations (no parameters)."""
    return Cost(0, n, 0)


def layernorm_cost(n: int) -> Cost:
    """``nn.LayerNorm(n)``: 5 FLOPs per element, 2n parameters."""
    return Cost(0, 5 * n, 2 * n)


def _nonlinearity(name: str, n: int) -> Cost:
    return elementwise_cost(0 if name == "identity" else n)


def _gated_sum(d: int, num_experts: int) -> Cost:
    """Softmax over K gate logits, K·d products, (K−1)·d adds to combine the expert outputs."""
    k = num_experts
    return elementwise_cost(3 * k + k * d + (k - 1) * d)


def mlp_cost(in_features: int, dims: Sequence[int]) -> Cost:
    """``MLP``: Linear + bias + ReLU per hidden layer."""
    costs, width = [], in_features
    for out in dims:
        costs += [linear_cost(width, out), elementwise_cost(out)]
        width = out
    return sum_costs(costs)


def crossnet_cost(d: int, num_layers: int) -> Cost:
    """DCNv2 full rank, ``CrossNet``: L(2d² + 3d)."""
    layer = linear_cost(d, d) + elementwise_cost(2 * d)  # W x + b, x0 ⊙, + x_l
    return layer.times(num_layers)


def lowrank_crossnet_cost(
    d: int, num_layers: int, rank: int, use_c: bool = False, nonlinearity: str = "relu"
) -> Cost:
    """DCNv2 low rank, ``LowRankCrossNet``: L(4dr + 3d), + L(2r² + 2r) with C (g not identity)."""
    layer = linear_cost(d, rank, bias=False) + linear_cost(rank, d) + elementwise_cost(2 * d)
    if use_c:
        layer = layer + linear_cost(rank, rank, bias=False) + _nonlinearity(nonlinearity, 2 * rank)
    return layer.times(num_layers)


def mixture_crossnet_cost(
    d: int, num_layers: int, rank: int, num_experts: int, nonlinearity: str = "relu"
) -> Cost:
    """DCN-Mix, ``LowRankMixtureCrossNet``: L·K(4dr + 2r² + 2r) + L(2Kd + 4Kd + 3K)."""
    k, r = num_experts, rank
    expert = (
        linear_cost(d, r, bias=False)  # V_iᵀ x
        + linear_cost(r, r, bias=False)  # C_i
        + linear_cost(r, d, bias=False)  # U_i
        + _nonlinearity(nonlinearity, 2 * r)
        + elementwise_cost(2 * d)  # + b, x0 ⊙
    )
    layer = (
        expert.times(k)
        + Cost(params=d)  # shared bias
        + linear_cost(d, k, bias=False)  # gate logits
        + _gated_sum(d, k)
        + elementwise_cost(d)  # + x_l
    )
    return layer.times(num_layers)


def masked_lowrank_crossnet_cost(
    d: int,
    num_layers: int,
    rank: int,
    mask_hidden: int,
    mask_position: str = "rank",
    mask_source: str = "x0",
    mask_activation: str = "linear",
    residual_layernorm: bool = False,
    num_experts: int = 1,
) -> Cost:
    """ML-DCN, ``MaskedLowRankCrossNet``; by default L(4dr + 2h(d + r) + 2h + 2r + 3d) + 5d."""
    k, r, h = num_experts, rank, mask_hidden
    mask_dim = k * r if mask_position == "rank" else d
    activation = {"linear": 0, "sigmoid": 1, "2sigmoid": 2}[mask_activation]
    layer = (
        linear_cost(d, h)  # W1 LN(·) + c1
        + elementwise_cost(h)  # ReLU
        + linear_cost(h, mask_dim)  # W2 a + c2
        + elementwise_cost(activation * mask_dim + mask_dim)  # σ, m ⊙
        + linear_cost(d, k * r, bias=False)  # V_iᵀ of all experts
    )
    if k == 1:
        layer = layer + linear_cost(r, d) + elementwise_cost(2 * d)  # U z + b, x0 ⊙, + x_l
    else:
        layer = (
            layer
            + linear_cost(r, d, bias=False).times(k)  # U_i z_i
            + Cost(params=d)  # shared bias
            + elementwise_cost(2 * k * d)  # + b, x0 ⊙ per expert
            + linear_cost(d, k, bias=False)  # gate logits
            + _gated_sum(d, k)
            + elementwise_cost(d)  # + x_l
        )
    if residual_layernorm:
        layer = layer + layernorm_cost(d)
    norms = layernorm_cost(d).times(1 if mask_source == "x0" else num_layers)
    return layer.times(num_layers) + norms


def mask_block_cost(
    mask_input_dim: int, in_features: int, out_features: int, reduction_ratio: float
) -> Cost:
    """``MaskBlock``: mask MLP, m ⊙ h, bias-free projection, LayerNorm, ReLU."""
    t = reduction_width(in_features, reduction_ratio)
    return (
        linear_cost(mask_input_dim, t)
        + elementwise_cost(t)  # ReLU
        + linear_cost(t, in_features)
        + elementwise_cost(in_features)  # m ⊙ h
        + linear_cost(in_features, out_features, bias=False)
        + layernorm_cost(out_features)
        + elementwise_cost(out_features)  # ReLU
    )


def serial_masknet_cost(d: int, num_blocks: int, block_dim: int, reduction_ratio: float) -> Cost:
    """``SerialMaskNet``: LN(x0), then blocks d → block_dim → … → block_dim."""
    widths = [d] + [block_dim] * num_blocks
    blocks = [
        mask_block_cost(d, widths[i], widths[i + 1], reduction_ratio) for i in range(num_blocks)
    ]
    return layernorm_cost(d) + sum_costs(blocks)


def parallel_masknet_cost(d: int, num_blocks: int, block_dim: int, reduction_ratio: float) -> Cost:
    """``ParallelMaskNet``: LN(x0), then ``num_blocks`` blocks d → block_dim side by side."""
    block = mask_block_cost(d, d, block_dim, reduction_ratio)
    return layernorm_cost(d) + block.times(num_blocks)


def num_tokens(num_fields: int, num_dense: int) -> int:
    """T, the tokens WuKong and RankMixer see: one per categorical field, one for all dense."""
    return num_fields + (1 if num_dense else 0)


def resolved_token_dim(cfg: ModelConfig, num_fields: int, num_dense: int) -> int:
    """RankMixer D: ``cfg.token_dim`` or the smallest multiple of T >= e."""
    if cfg.token_dim is not None:
        return cfg.token_dim
    t = num_tokens(num_fields, num_dense)
    return t * -(-cfg.embed_dim // t)


def wukong_cost(
    num_fields: int, embed_dim: int, num_dense: int, num_layers: int, fm_rank: int,
    fmb_hidden: int,
) -> Cost:
    """``WuKong``: dense projection, then L × (FM block, LCB, residual, LayerNorm).

    Per layer, n tokens, n_F = n − ⌊n/2⌋ rows from the FM block, n_L = ⌊n/2⌋ from the LCB:
    Xᵀ Y and X (XᵀY) 4nek, LN(nk) 5nk, MLP 2nk·h + 2h + 2h·n_F·e + n_F·e, LCB 2·n_L·n·e,
    residual ne, LN(e) per token 5ne.

    Example (n = 5 fields, e = 8, no dense, L = 2, k = 8, h = 11):
        >>> wukong_cost(5, 8, 0, 2, 8, 11).total == 2 * (1280 + 200 + 130 * 11 + 24 + 160 + 240)
        True
    """
    e, k, h, n = embed_dim, fm_rank, fmb_hidden, num_tokens(num_fields, num_dense)
    n_lcb = n // 2
    n_fm = n - n_lcb
    layer = (
        Cost(4 * n * e * k, 0, n * k)  # Xᵀ Y, X (Xᵀ Y); Y
        + layernorm_cost(n * k)
        + linear_cost(n * k, h)
        + elementwise_cost(h)  # ReLU
        + linear_cost(h, n_fm * e)
        + Cost(2 * n_lcb * n * e, 0, n_lcb * n)  # W X
        + elementwise_cost(n * e)  # + X
        + Cost(0, 5 * n * e, 2 * e)  # LayerNorm(e) on each token
    )
    dense = linear_cost(num_dense, e) if num_dense else Cost()
    return dense + layer.times(num_layers)


def rankmixer_cost(
    num_fields: int, embed_dim: int, num_dense: int, num_layers: int, token_dim: int,
    ffn_hidden: int,
) -> Cost:
    """``RankMixer``: tokeniser, L × (mixing + residual + LN, per-token FFN + residual + LN), mean.

    Tokeniser F(2eD + D) (+ 2·F_num·D + D for the dense token); per layer (T tokens) token mixing
    is free, residuals 2TD, LN(D) per token 2·5TD, PFFN T(4DH + 2H + D) (GELU counted as 1 per
    element); the final mean over tokens TD.

    Example (T = 5 fields, e = 8, D = 10, L = 2, H = 11):
        >>> rankmixer_cost(5, 8, 0, 2, 10, 11).total == 5 * 170 + 2 * (600 + 5 * 472) + 50
        True
    """
    t, d, h = num_tokens(num_fields, num_dense), token_dim, ffn_hidden
    tokens = linear_cost(embed_dim, d).times(num_fields)
    if num_dense:
        tokens = tokens + linear_cost(num_dense, d)
    layer = (
        elementwise_cost(t * d)  # mixed + X
        + Cost(0, 5 * t * d, 2 * d)  # LayerNorm(D) on each token
        + (linear_cost(d, h) + elementwise_cost(h) + linear_cost(h, d)).times(t)  # PFFN_t, GELU
        + elementwise_cost(t * d)  # + S
        + Cost(0, 5 * t * d, 2 * d)
    )
    return tokens + layer.times(num_layers) + elementwise_cost(t * d)  # mean over T tokens

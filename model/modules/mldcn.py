"""ML-DCN: a low-rank DCNv2 cross network whose rank space is gated by an instance-guided mask.

Pinterest, "ML-DCN" (arXiv 2602.09194). Only the abstract is public ("integrates an
instance-conditioned mask into a low-rank crossing layer, enabling per-example selection and
amplification of salient interaction directions"); this is our reconstruction, documented in
../shared/MODELS.md. The effective weight of layer l is U_l diag(m_l(x)) V_lᵀ.

Every ablation listed in MODELS.md is one constructor argument away:

==========================  ========================================================
argument                    options (default first)
==========================  ========================================================
``mask_position``           "rank": m ⊙ (Vᵀ x_l), m ∈ R^r; "input": Vᵀ (m ⊙ x_l), m ∈ R^d
``mask_source``             "x0": masks read LN(x0) (first mask layers of all L layers
                            fused into one matmul); "xl": layer l's mask reads LN(x_l)
``mask_activation``         "linear": W2 a + c2; "sigmoid": σ(·); "2sigmoid": 2·σ(·)
``residual_layernorm``      False; True: x_{l+1} = LN(x0 ⊙ (…) + x_l)
``num_experts``             1; K > 1: mixture of K masked low-rank experts with a softmax
                            gate per layer, as DCN-Mix (without C); the mask spans all
                            K·r rank directions (or the d inputs, shared by the experts)
==========================  ========================================================

Stacked vs parallel with the deep tower is the CTR model's ``structure``, not this module's.

Initialisation: V, U, W1 and the gates xavier-normal, b and c1 zero; W2 ~ N(0, (0.01/√h)²) so
the mask barely depends on the input at first, and c2 puts the mask at its neutral value:
c2 = 1 for "linear" (m ≈ 1) and c2 = 0 for "2sigmoid" (m ≈ 2·σ(0) = 1), so training starts as
low-rank DCNv2. For "sigmoid" c2 = 0 too, so m ≈ σ(0) = 0.5: it starts as low-rank DCNv2 with U
halved and the mask can only suppress (up to 2× amplification is what "2sigmoid" adds).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.checks import check_sizes
from model.config import MASK_ACTIVATIONS, MASK_POSITIONS, MASK_SOURCES
from model.modules.mlp import init_linear


class _MaskedCrossLayer(nn.Module):
    """One masked low-rank cross layer; the mask's hidden activation a is computed by the net."""

    def __init__(
        self,
        in_features: int,
        rank: int,
        mask_hidden: int,
        mask_position: str,
        mask_activation: str,
        residual_layernorm: bool,
        num_experts: int,
    ) -> None:
        super().__init__()
        d, r, k, h = in_features, rank, num_experts, mask_hidden
        self.down = nn.Linear(d, k * r, bias=False)  # V_iᵀ of all experts, fused
        mask_dim = k * r if mask_position == "rank" else d
        self.mask_out = nn.Linear(h, mask_dim)  # W2, c2
        with torch.no_grad():
            for i in range(k):  # xavier per expert, not over the fused K·r axis
                nn.init.xavier_normal_(self.down.weight[i * r : (i + 1) * r])
            nn.init.normal_(self.mask_out.weight, std=0.01 / math.sqrt(h))
            nn.init.constant_(self.mask_out.bias, 1.0 if mask_activation == "linear" else 0.0)
        if k == 1:
            self.up = nn.Linear(r, d)  # U, b
            init_linear(self.up)
        else:
            self.u = nn.Parameter(torch.empty(k, r, d))  # U_i as z @ u[i]
            self.bias = nn.Parameter(torch.zeros(d))  # b, shared by the experts
            self.gate = nn.Linear(d, k, bias=False)
            with torch.no_grad():
                for i in range(k):
                    nn.init.xavier_normal_(self.u[i])
            init_linear(self.gate)
        self.norm: nn.Module = nn.LayerNorm(d) if residual_layernorm else nn.Identity()
        self.rank = r
        self.num_experts = k
        self.mask_position = mask_position
        self.mask_activation = mask_activation

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """The mask m (B, K·r or d) from the mask's hidden activation a (B, h)."""
        m = self.mask_out(a)  # (B, K·r) or (B, d)
        if self.mask_activation == "sigmoid":
            return torch.sigmoid(m)
        if self.mask_activation == "2sigmoid":
            return 2.0 * torch.sigmoid(m)
        return m

    def forward(self, x0: torch.Tensor, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d), x_l (B, d) and the mask m to x_{l+1} (B, d)."""
        if self.mask_position == "rank":
            z = m * self.down(x)  # (B, K·r)
        else:
            z = self.down(m * x)  # (B, K·r)
        if self.num_experts == 1:
            out = x0 * self.up(z) + x  # (B, d)
        else:
            z = z.reshape(-1, self.num_experts, self.rank)  # (B, K, r)
            experts = x0.unsqueeze(1) * (torch.einsum("bkr,krd->bkd", z, self.u) + self.bias)
            weights = torch.softmax(self.gate(x), dim=-1)  # (B, K)
            out = (weights.unsqueeze(-1) * experts).sum(dim=1) + x  # (B, d)
        return self.norm(out)  # (B, d)


class MaskedLowRankCrossNet(nn.Module):
    """ML-DCN cross network: low-rank DCNv2 with an instance-guided mask in the rank space.

    x_{l+1} = x0 ⊙ (U_l (m_l ⊙ V_lᵀ x_l) + b_l) + x_l,  m_l = W2_l ReLU(W1_l LN(x0) + c1_l) + c2_l

    With m ≡ 1 a layer is exactly a low-rank DCNv2 layer (``LowRankCrossNet`` without C). See the
    module docstring for the ablation options and the initialisation.

    Args:
        in_features (int): d, the width of x0.
        num_layers (int): L, the number of cross layers.
        rank (int): r, the rank of U_l, V_l (of every expert with ``num_experts`` > 1).
        mask_hidden (int | None): h, the mask MLP's hidden width; None gives ⌈r/2⌉.
        mask_position (str): "rank" or "input".
        mask_source (str): "x0" or "xl".
        mask_activation (str): "linear", "sigmoid" or "2sigmoid".
        residual_layernorm (bool): LayerNorm after each layer's residual sum.
        num_experts (int): K; 1 is the plain layer, K > 1 a mixture of masked experts.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = MaskedLowRankCrossNet(in_features=6, num_layers=2, rank=4, mask_hidden=2)
        >>> x0 = torch.randn(1, 6)
        >>> net(x0).shape, net.output_dim
        (torch.Size([1, 6]), 6)
        >>> [m.shape for m in net.forward_with_masks(x0)[1]]  # one mask per layer
        [torch.Size([1, 4]), torch.Size([1, 4])]
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        rank: int,
        mask_hidden: int | None = None,
        mask_position: str = "rank",
        mask_source: str = "x0",
        mask_activation: str = "linear",
        residual_layernorm: bool = False,
        num_experts: int = 1,
    ) -> None:
        super().__init__()
        h = (rank + 1) // 2 if mask_hidden is None else mask_hidden
        check_sizes(in_features=in_features, num_layers=num_layers, rank=rank, mask_hidden=h,
                    num_experts=num_experts)
        for name, value, valid in (
            ("mask_position", mask_position, MASK_POSITIONS),
            ("mask_source", mask_source, MASK_SOURCES),
            ("mask_activation", mask_activation, MASK_ACTIVATIONS),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {value!r}")
        d, n_norms = in_features, (1 if mask_source == "x0" else num_layers)
        # W1_l, c1_l of all layers; with mask_source "x0" they run as one (L·h × d) matmul.
        self.mask_w1 = nn.Parameter(torch.empty(num_layers, h, d))
        self.mask_b1 = nn.Parameter(torch.zeros(num_layers, h))
        self.mask_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_norms))
        with torch.no_grad():
            for layer in range(num_layers):
                nn.init.xavier_normal_(self.mask_w1[layer])
        self.layers = nn.ModuleList(
            _MaskedCrossLayer(
                d, rank, h, mask_position, mask_activation, residual_layernorm, num_experts
            )
            for _ in range(num_layers)
        )
        self.in_features = in_features
        self.num_layers = num_layers
        self.rank = rank
        self.mask_hidden = h
        self.mask_source = mask_source
        self.output_dim = in_features

    def forward_with_masks(self, x0: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Map x0 (B, d) to x_L (B, d) and the L masks, each (B, K·r), or (B, d) on the input."""
        num_layers, h = self.num_layers, self.mask_hidden
        hidden_all = None
        if self.mask_source == "x0":
            w1 = self.mask_w1.reshape(num_layers * h, -1)  # (L·h, d)
            b1 = self.mask_b1.reshape(num_layers * h)  # (L·h,)
            x0_norm = self.mask_norms[0](x0)  # (B, d)
            hidden_all = torch.relu(nn.functional.linear(x0_norm, w1, b1))  # (B, L·h)
        x = x0
        masks: list[torch.Tensor] = []
        for index, layer in enumerate(self.layers):
            if hidden_all is not None:
                a = hidden_all[:, index * h : (index + 1) * h]  # (B, h)
            else:
                x_norm = self.mask_norms[index](x)  # (B, d)
                a = torch.relu(
                    nn.functional.linear(x_norm, self.mask_w1[index], self.mask_b1[index])
                )  # (B, h)
            m = layer.mask(a)  # (B, K·r) or (B, d)
            masks.append(m)
            x = layer(x0, x, m)  # (B, d)
        return x, masks

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to x_L (B, d)."""
        return self.forward_with_masks(x0)[0]

"""MaskNet: instance-guided masks on feature-embedding and hidden layers.

Wang, She, Zhang, "MaskNet: Introducing Feature-Wise Multiplication to CTR Ranking Models by
Instance-Guided Mask", DLP-KDD 2021 (arXiv 2102.07619). The mask is generated from the flattened
input embedding x0 (``v_emb``); its output layer is linear, so it can amplify and suppress.

Initialisation: kernels xavier-normal, biases zero, except the mask's output bias, which starts at
1 so that every mask starts near the identity (the paper gives no init; this matches ML-DCN's mask
and keeps the block's input at its LayerNorm scale while the N(0, 1e-4) embeddings are tiny).
"""

from __future__ import annotations

import torch
from torch import nn

from model.checks import check_sizes
from model.config import reduction_width
from model.modules.mlp import init_linear


class MaskBlock(nn.Module):
    """One MaskBlock: an instance-guided mask, a bias-free projection, LayerNorm and ReLU.

    out = ReLU(LN(W (m ⊙ h))),  m = W2 ReLU(W1 v_emb + b1) + b2,  W1 ∈ R^{t×d}, t = round(ρ·n)

    Args:
        mask_input_dim (int): d, the width of v_emb (the mask's input).
        in_features (int): n, the width of h, the tensor being masked.
        out_features (int): width of the block's output.
        reduction_ratio (float): ρ, the mask's hidden width is max(1, round(ρ·n)).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = MaskBlock(mask_input_dim=6, in_features=6, out_features=4)
        >>> block(torch.randn(2, 6), torch.randn(2, 6)).shape, block.output_dim
        (torch.Size([2, 4]), 4)
    """

    def __init__(
        self,
        mask_input_dim: int,
        in_features: int,
        out_features: int,
        reduction_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        check_sizes(mask_input_dim=mask_input_dim, in_features=in_features,
                    out_features=out_features)
        if not reduction_ratio > 0:
            raise ValueError(f"reduction_ratio must be > 0, got {reduction_ratio!r}")
        hidden = reduction_width(in_features, reduction_ratio)
        self.mask_hidden = nn.Linear(mask_input_dim, hidden)  # W1, b1
        self.mask_out = nn.Linear(hidden, in_features)  # W2, b2
        self.projection = nn.Linear(in_features, out_features, bias=False)  # W
        self.norm = nn.LayerNorm(out_features)
        for layer in (self.mask_hidden, self.mask_out, self.projection):
            init_linear(layer)
        nn.init.ones_(self.mask_out.bias)
        self.hidden_dim = hidden
        self.output_dim = out_features

    def mask(self, v_emb: torch.Tensor) -> torch.Tensor:
        """The instance-guided mask m (B, in_features) from v_emb (B, mask_input_dim)."""
        return self.mask_out(torch.relu(self.mask_hidden(v_emb)))  # (B, n)

    def forward(self, v_emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Map v_emb (B, mask_input_dim) and h (B, in_features) to (B, out_features)."""
        masked = self.mask(v_emb) * h  # (B, n)
        return torch.relu(self.norm(self.projection(masked)))  # (B, out)


class SerialMaskNet(nn.Module):
    """Serial MaskNet: MaskBlocks chained, the first one masking LN(v_emb) (Wang et al., 2021).

    h_0 = LN(x0),  h_{k+1} = MaskBlock_k(x0, h_k),  output h_L ∈ R^{block_dim}

    In the paper a linear output layer follows; here that is the CTR model's head (structure
    "cross_only"), or the deep tower is added with "stacked"/"parallel".

    Args:
        in_features (int): d, the width of x0.
        num_blocks (int): L, the number of MaskBlocks.
        block_dim (int): output width of every block.
        reduction_ratio (float): ρ of every block's mask.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = SerialMaskNet(in_features=6, num_blocks=3, block_dim=5)
        >>> net(torch.randn(1, 6)).shape, net.output_dim
        (torch.Size([1, 5]), 5)
    """

    def __init__(
        self,
        in_features: int,
        num_blocks: int,
        block_dim: int,
        reduction_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        check_sizes(num_blocks=num_blocks)
        self.emb_norm = nn.LayerNorm(in_features)
        widths = [in_features] + [block_dim] * num_blocks
        self.blocks = nn.ModuleList(
            MaskBlock(in_features, widths[k], widths[k + 1], reduction_ratio)
            for k in range(num_blocks)
        )
        self.in_features = in_features
        self.output_dim = block_dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to (B, block_dim)."""
        h = self.emb_norm(x0)  # (B, d)
        for block in self.blocks:
            h = block(x0, h)  # (B, block_dim)
        return h


class ParallelMaskNet(nn.Module):
    """Parallel MaskNet: MaskBlocks side by side on LN(v_emb), concatenated (Wang et al., 2021).

    out = concat_k MaskBlock_k(x0, LN(x0)) ∈ R^{num_blocks·block_dim}

    In the paper an MLP follows; here that is the CTR model's deep tower (structure "stacked").

    Args:
        in_features (int): d, the width of x0.
        num_blocks (int): the number of parallel MaskBlocks.
        block_dim (int): output width of every block.
        reduction_ratio (float): ρ of every block's mask.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = ParallelMaskNet(in_features=6, num_blocks=3, block_dim=5)
        >>> net(torch.randn(2, 6)).shape, net.output_dim
        (torch.Size([2, 15]), 15)
    """

    def __init__(
        self,
        in_features: int,
        num_blocks: int,
        block_dim: int,
        reduction_ratio: float = 0.2,
    ) -> None:
        super().__init__()
        check_sizes(num_blocks=num_blocks)
        self.emb_norm = nn.LayerNorm(in_features)
        self.blocks = nn.ModuleList(
            MaskBlock(in_features, in_features, block_dim, reduction_ratio)
            for _ in range(num_blocks)
        )
        self.in_features = in_features
        self.output_dim = num_blocks * block_dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to (B, num_blocks·block_dim)."""
        h = self.emb_norm(x0)  # (B, d)
        return torch.cat([block(x0, h) for block in self.blocks], dim=1)  # (B, L·block_dim)

"""The deep tower: a stack of Linear → ReLU → Dropout layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def init_linear(layer: nn.Linear) -> None:
    """Xavier-normal kernel and zero bias, the initialisation of the public DCNv2 code."""
    nn.init.xavier_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class MLP(nn.Module):
    """Multi-layer perceptron used as the deep tower of every CTR model.

    h_{k+1} = Dropout(ReLU(W_k h_k + b_k)), one such layer per entry of ``dims``.

    Args:
        in_features (int): width of the input.
        dims (Sequence[int]): widths of the hidden layers; empty gives the identity.
        dropout (float): dropout probability after each hidden layer (training only).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> mlp = MLP(8, [16, 4], dropout=0.1)
        >>> mlp(torch.randn(3, 8)).shape, mlp.output_dim
        (torch.Size([3, 4]), 4)
    """

    def __init__(self, in_features: int, dims: Sequence[int], dropout: float = 0.0) -> None:
        super().__init__()
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        layers: list[nn.Module] = []
        width = in_features
        for out in dims:
            if out < 1:
                raise ValueError(f"every MLP width must be >= 1, got {list(dims)}")
            linear = nn.Linear(width, out)
            init_linear(linear)
            layers += [linear, nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_features) to (B, output_dim)."""
        return self.layers(x)  # (B, output_dim)

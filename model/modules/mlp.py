"""The deep tower: a stack of Linear → [BatchNorm] → ReLU → Dropout layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def init_linear(layer: nn.Linear) -> None:
    """Xavier-normal kernel and zero bias, the initialisation of the public DCNv2 code."""
    nn.init.xavier_normal_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def fold_batch_norm(linear: nn.Linear, bn: nn.BatchNorm1d) -> nn.Linear:
    """One Linear computing ``bn(linear(x))`` with ``bn``'s running statistics (eval mode).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> lin, bn = nn.Linear(3, 2), nn.BatchNorm1d(2)
        >>> _ = bn.train()(lin(torch.randn(64, 3)))  # some running statistics
        >>> x = torch.randn(5, 3)
        >>> bool(torch.allclose(fold_batch_norm(lin, bn)(x), bn.eval()(lin(x)), atol=1e-6))
        True
    """
    assert bn.running_var is not None and bn.running_mean is not None  # tracked (the default)
    with torch.no_grad():
        scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
        out = nn.Linear(linear.in_features, linear.out_features)
        out.weight.copy_((linear.weight.double() * scale[:, None]).float())
        shift = (linear.bias.double() - bn.running_mean.double()) * scale + bn.bias.double()
        out.bias.copy_(shift.float())
    return out


class MLP(nn.Module):
    """Multi-layer perceptron used as the deep tower of every CTR model.

    h_{k+1} = Dropout(ReLU(BN(W_k h_k + b_k))), one such layer per entry of ``dims``; BN only
    with ``batch_norm`` (BatchNorm1d: batch statistics in training, running ones in eval, and
    folded into W_k, b_k for inference by :meth:`folded_linears`, so it costs nothing served).

    Args:
        in_features (int): width of the input.
        dims (Sequence[int]): widths of the hidden layers; empty gives the identity.
        dropout (float): dropout probability after each hidden layer (training only).
        batch_norm (bool): batch normalisation after each hidden Linear, before the ReLU.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> mlp = MLP(8, [16, 4], dropout=0.1, batch_norm=True)
        >>> mlp(torch.randn(3, 8)).shape, mlp.output_dim
        (torch.Size([3, 4]), 4)
        >>> [type(m).__name__ for m in mlp.layers][:4]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout']
    """

    def __init__(self, in_features: int, dims: Sequence[int], dropout: float = 0.0,
                 batch_norm: bool = False) -> None:
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
            layers.append(linear)
            if batch_norm:
                layers.append(nn.BatchNorm1d(out))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = out
        self.layers = nn.Sequential(*layers)
        self.in_features = in_features
        self.output_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_features) to (B, output_dim)."""
        return self.layers(x)  # (B, output_dim)

    def folded_linears(self) -> list[nn.Linear]:
        """The hidden layers' Linear maps as inference computes them: new modules, each with
        its BatchNorm (if any) folded in. The tower in eval mode is ReLU after each of them."""
        out: list[nn.Linear] = []
        mods = list(self.layers)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Linear):
                nxt = mods[i + 1] if i + 1 < len(mods) else None
                if isinstance(nxt, nn.BatchNorm1d):
                    out.append(fold_batch_norm(m, nxt))
                else:
                    plain = nn.Linear(m.in_features, m.out_features)
                    with torch.no_grad():
                        plain.weight.copy_(m.weight)
                        plain.bias.copy_(m.bias)
                    out.append(plain)
        return out

    def for_inference(self) -> nn.Sequential:
        """The eval-mode tower with BatchNorm folded in: Linear → ReLU per hidden layer."""
        layers: list[nn.Module] = []
        for linear in self.folded_linears():
            layers += [linear, nn.ReLU()]
        return nn.Sequential(*layers)

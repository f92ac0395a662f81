"""DCNv2 cross networks: full rank, low rank and a mixture of low-rank experts.

Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for Web-scale Learning
to Rank Systems", WWW 2021 (arXiv 2008.13535). Every class maps x0 ∈ R^{B×d} to x_L ∈ R^{B×d}
(``output_dim == in_features``); kernels are xavier-normal, biases zero.
"""

from __future__ import annotations

import torch
from torch import nn

from model.checks import check_sizes
from model.modules.mlp import init_linear


def make_activation(name: str) -> nn.Module:
    """The nonlinearity g of the rank space: "relu", "tanh" or "identity"."""
    if name == "relu":
        return nn.ReLU()
    if name == "tanh":
        return nn.Tanh()
    if name == "identity":
        return nn.Identity()
    raise ValueError(f"nonlinearity must be one of ('relu', 'tanh', 'identity'), got {name!r}")


class CrossNet(nn.Module):
    """Full-rank DCNv2 cross network (Wang et al., WWW 2021).

    x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l,  W_l ∈ R^{d×d}

    Args:
        in_features (int): d, the width of x0.
        num_layers (int): L, the number of cross layers.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = CrossNet(in_features=6, num_layers=2)
        >>> net(torch.randn(1, 6)).shape, net.output_dim
        (torch.Size([1, 6]), 6)
    """

    def __init__(self, in_features: int, num_layers: int) -> None:
        super().__init__()
        check_sizes(in_features=in_features, num_layers=num_layers)
        self.kernels = nn.ModuleList(nn.Linear(in_features, in_features) for _ in range(num_layers))
        for layer in self.kernels:
            init_linear(layer)
        self.in_features = in_features
        self.num_layers = num_layers
        self.output_dim = in_features

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to x_L (B, d)."""
        x = x0
        for kernel in self.kernels:
            x = x0 * kernel(x) + x  # (B, d)
        return x


class LowRankCrossNet(nn.Module):
    """Low-rank DCNv2 cross network, optionally with an r×r matrix C (Wang et al., WWW 2021).

    x_{l+1} = x0 ⊙ (U_l g(C_l g(V_lᵀ x_l)) + b_l) + x_l,  U_l, V_l ∈ R^{d×r}, C_l ∈ R^{r×r}

    Without C the rank-space map is U_l V_lᵀ x_l. The bias b_l belongs to U_l (``up[l].bias``);
    V_l and C_l have none.

    Args:
        in_features (int): d, the width of x0.
        num_layers (int): L, the number of cross layers.
        rank (int): r; it only saves compute over full rank when r < d/2.
        use_c (bool): add the r×r matrix C_l and the nonlinearity g in the rank space.
        nonlinearity (str): g, "relu", "tanh" or "identity"; only used with C.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = LowRankCrossNet(in_features=6, num_layers=2, rank=3, use_c=True)
        >>> net(torch.randn(4, 6)).shape, net.output_dim
        (torch.Size([4, 6]), 6)
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        rank: int,
        use_c: bool = False,
        nonlinearity: str = "relu",
    ) -> None:
        super().__init__()
        check_sizes(in_features=in_features, num_layers=num_layers, rank=rank)
        self.down = nn.ModuleList(
            nn.Linear(in_features, rank, bias=False) for _ in range(num_layers)
        )  # V_lᵀ
        self.up = nn.ModuleList(nn.Linear(rank, in_features) for _ in range(num_layers))  # U_l, b_l
        mids: list[nn.Module] = []
        for _ in range(num_layers):
            if use_c:
                c = nn.Linear(rank, rank, bias=False)
                init_linear(c)
                g = make_activation(nonlinearity)
                mids.append(nn.Sequential(g, c, make_activation(nonlinearity)))
            else:
                mids.append(nn.Identity())
        self.mids = nn.ModuleList(mids)
        for layer in [*self.down, *self.up]:
            init_linear(layer)
        self.in_features = in_features
        self.num_layers = num_layers
        self.rank = rank
        self.use_c = use_c
        self.output_dim = in_features

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to x_L (B, d)."""
        x = x0
        for down, mid, up in zip(self.down, self.mids, self.up, strict=True):
            z = mid(down(x))  # (B, r)
            x = x0 * up(z) + x  # (B, d)
        return x


class LowRankMixtureCrossNet(nn.Module):
    """Mixture of low-rank cross experts, DCN-Mix (Wang et al., WWW 2021).

    x_{l+1} = Σ_i softmax_i(w_iᵀ x_l) · x0 ⊙ (U_i g(C_i g(V_iᵀ x_l)) + b_l) + x_l

    Per layer: V of all K experts fused in one ``Linear(d, K·r)`` (rows i·r:(i+1)·r are V_iᵀ),
    ``c`` of shape (K, r, r) and ``u`` of shape (K, r, d) (row-vector convention: z @ c[i],
    z @ u[i]), one bias b_l shared by the experts, one bias-free gate ``Linear(d, K)``.

    Args:
        in_features (int): d, the width of x0.
        num_layers (int): L, the number of cross layers.
        rank (int): r, the rank of every expert.
        num_experts (int): K, experts per layer (the paper uses 4).
        nonlinearity (str): g, "relu" (torchrec), "tanh" (FuxiCTR, DeepCTR) or "identity".

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = LowRankMixtureCrossNet(in_features=6, num_layers=2, rank=3, num_experts=4)
        >>> net(torch.randn(1, 6)).shape, net.output_dim
        (torch.Size([1, 6]), 6)
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        rank: int,
        num_experts: int = 4,
        nonlinearity: str = "relu",
    ) -> None:
        super().__init__()
        check_sizes(
            in_features=in_features, num_layers=num_layers, rank=rank, num_experts=num_experts
        )
        d, r, k = in_features, rank, num_experts
        self.down = nn.ModuleList(nn.Linear(d, k * r, bias=False) for _ in range(num_layers))
        self.c = nn.ParameterList(nn.Parameter(torch.empty(k, r, r)) for _ in range(num_layers))
        self.u = nn.ParameterList(nn.Parameter(torch.empty(k, r, d)) for _ in range(num_layers))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(d)) for _ in range(num_layers))
        self.gates = nn.ModuleList(nn.Linear(d, k, bias=False) for _ in range(num_layers))
        self.g = make_activation(nonlinearity)
        with torch.no_grad():
            for layer in range(num_layers):
                for i in range(k):  # xavier per expert, not over the fused K·r axis
                    nn.init.xavier_normal_(self.down[layer].weight[i * r : (i + 1) * r])
                    nn.init.xavier_normal_(self.c[layer][i])
                    nn.init.xavier_normal_(self.u[layer][i])
                nn.init.xavier_normal_(self.gates[layer].weight)
        self.in_features = in_features
        self.num_layers = num_layers
        self.rank = rank
        self.num_experts = num_experts
        self.output_dim = in_features

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, d) to x_L (B, d)."""
        k, r = self.num_experts, self.rank
        x = x0
        for down, c, u, bias, gate in zip(
            self.down, self.c, self.u, self.bias, self.gates, strict=True
        ):
            z = self.g(down(x).reshape(-1, k, r))  # (B, K, r)
            z = self.g(torch.einsum("bkr,krs->bks", z, c))  # (B, K, r)
            experts = x0.unsqueeze(1) * (torch.einsum("bkr,krd->bkd", z, u) + bias)  # (B, K, d)
            weights = torch.softmax(gate(x), dim=-1)  # (B, K)
            x = (weights.unsqueeze(-1) * experts).sum(dim=1) + x  # (B, d)
        return x

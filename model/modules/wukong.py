"""WuKong (Zhang et al., Meta, 2024, arXiv 2403.02545): stacked factorization machine blocks.

x0 is turned into an n×e matrix of tokens: the F_cat field embeddings (B, F_cat, e) as they are,
and, when there are dense features, one more row ``W_d · dense + b_d`` (all F_num dense features
projected together to e), so n = F_cat + [F_num > 0]. Each layer is

    X_{i+1} = LN(concat(FMB(X_i), LCB(X_i)) + X_i)

with FMB(X) = MLP(LN(flatten(X (Xᵀ Y)))) reshaped to n_F rows (Y ∈ R^{n×k} learned, MLP one
hidden ReLU layer of width ``fmb_hidden``) and LCB(X) = W X, W ∈ R^{n_L×n} (linear compression
block). n_L = ⌊n/2⌋ and n_F = n − n_L, so the concatenation has n rows again and the residual needs
no projection; LN normalises each row over e. The output is flatten(X_L), n·e wide.
"""

from __future__ import annotations

import torch
from torch import nn

from model.checks import check_sizes
from model.modules.mlp import init_linear


def wukong_token_counts(num_tokens: int) -> tuple[int, int]:
    """(n_F, n_L): rows produced by the FM block and by the linear compression block.

    Example:
        >>> wukong_token_counts(5), wukong_token_counts(1)
        ((3, 2), (1, 0))
    """
    lcb = num_tokens // 2
    return num_tokens - lcb, lcb


class WuKongLayer(nn.Module):
    """One WuKong layer on n tokens of size e: LN(concat(FMB(X), LCB(X)) + X).

    Args:
        num_tokens (int): n.
        embed_dim (int): e.
        fm_rank (int): k, columns of Y (the FM block computes X (Xᵀ Y) ∈ R^{n×k}).
        fmb_hidden (int): hidden width of the FM block's MLP.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> WuKongLayer(5, 4, fm_rank=3, fmb_hidden=8)(torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
    """

    def __init__(self, num_tokens: int, embed_dim: int, fm_rank: int, fmb_hidden: int) -> None:
        super().__init__()
        check_sizes(num_tokens=num_tokens, embed_dim=embed_dim, fm_rank=fm_rank,
                        fmb_hidden=fmb_hidden)
        n, e, k = num_tokens, embed_dim, fm_rank
        self.num_fm, self.num_lcb = wukong_token_counts(n)
        self.y = nn.Parameter(torch.empty(n, k))
        nn.init.xavier_normal_(self.y)
        self.fm_norm = nn.LayerNorm(n * k)
        self.fm_in = nn.Linear(n * k, fmb_hidden)
        self.fm_out = nn.Linear(fmb_hidden, self.num_fm * e)
        init_linear(self.fm_in)
        init_linear(self.fm_out)
        self.lcb = nn.Linear(n, self.num_lcb, bias=False) if self.num_lcb else None
        if self.lcb is not None:
            nn.init.xavier_normal_(self.lcb.weight)
        self.norm = nn.LayerNorm(e)
        self.num_tokens, self.embed_dim = n, e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map X (B, n, e) to (B, n, e)."""
        xty = torch.matmul(x.transpose(1, 2), self.y)  # (B, e, k)
        inter = torch.matmul(x, xty)  # (B, n, k)
        h = torch.relu(self.fm_in(self.fm_norm(inter.flatten(1))))  # (B, fmb_hidden)
        fm = self.fm_out(h).reshape(-1, self.num_fm, self.embed_dim)  # (B, n_F, e)
        if self.lcb is not None:
            lcb = self.lcb(x.transpose(1, 2)).transpose(1, 2)  # (B, n_L, e)
            fm = torch.cat([fm, lcb], dim=1)  # (B, n, e)
        return self.norm(fm + x)  # (B, n, e)


class WuKong(nn.Module):
    """WuKong interaction on x0 = concat(F_cat field embeddings, F_num dense features).

    X_0 = [emb_1; …; emb_F; W_d·dense + b_d] ∈ R^{n×e}, X_{i+1} = WuKongLayer_i(X_i),
    output flatten(X_L) ∈ R^{n·e}.

    Args:
        num_fields (int): F_cat (may be 0).
        embed_dim (int): e.
        num_dense (int): F_num (may be 0; projected to one extra token when > 0).
        num_layers (int): L.
        fm_rank (int): k.
        fmb_hidden (int): hidden width of each FM block's MLP.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = WuKong(num_fields=3, embed_dim=4, num_dense=2, num_layers=2, fm_rank=3,
        ...              fmb_hidden=8)
        >>> net(torch.randn(7, 3 * 4 + 2)).shape, net.output_dim
        (torch.Size([7, 16]), 16)
    """

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        num_dense: int,
        num_layers: int,
        fm_rank: int,
        fmb_hidden: int,
    ) -> None:
        super().__init__()
        check_sizes(embed_dim=embed_dim, num_layers=num_layers)
        if num_fields < 0 or num_dense < 0 or num_fields + num_dense == 0:
            raise ValueError(
                f"need num_fields >= 0, num_dense >= 0 and at least one field, got "
                f"num_fields={num_fields}, num_dense={num_dense}"
            )
        n = num_fields + (1 if num_dense else 0)
        self.dense_proj = nn.Linear(num_dense, embed_dim) if num_dense else None
        if self.dense_proj is not None:
            init_linear(self.dense_proj)
        self.layers = nn.ModuleList(
            WuKongLayer(n, embed_dim, fm_rank, fmb_hidden) for _ in range(num_layers)
        )
        self.num_fields, self.num_dense, self.embed_dim = num_fields, num_dense, embed_dim
        self.num_tokens = n
        self.in_features = num_fields * embed_dim + num_dense
        self.output_dim = n * embed_dim

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, F_cat·e + F_num) to (B, n·e)."""
        split = self.num_fields * self.embed_dim
        tokens = []
        if self.num_fields:
            tokens.append(x0[:, :split].reshape(-1, self.num_fields, self.embed_dim))  # (B, F, e)
        if self.dense_proj is not None:
            tokens.append(self.dense_proj(x0[:, split:]).unsqueeze(1))  # (B, 1, e)
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]  # (B, n, e)
        for layer in self.layers:
            x = layer(x)  # (B, n, e)
        return x.flatten(1)  # (B, n·e)

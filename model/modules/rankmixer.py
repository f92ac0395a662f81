"""RankMixer (Zhu et al., ByteDance, 2025, arXiv 2507.15551): token mixing + per-token FFNs.

Tokens: one per categorical field, t_j = W_jᵀ emb_j + b_j (a separate e → D projection per field,
RankMixer's tokenisation with one field per group), and, when there are dense features, one more
token W_d · dense + b_d (all F_num dense features projected together to D). T = F_cat + [F_num > 0].

Each layer (T tokens of size D, D a multiple of T):

    S  = LN(TokenMixing(X) + X)
    X' = LN(PFFN(S) + S)

TokenMixing is parameter-free: every token is split into T heads of D/T and new token h is the
concatenation of head h of all T tokens. PFFN_t(s) = W2_t GELU(W1_t s + b1_t) + b2_t, a separate
feed-forward network (hidden width ``ffn_hidden``) per token. LN normalises each token over D. The
output is the mean of the T tokens, D wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.checks import check_sizes
from model.errors import InputError


def default_token_dim(num_tokens: int, embed_dim: int) -> int:
    """D when not given: the smallest multiple of T that is >= e (token mixing needs T | D).

    Example:
        >>> default_token_dim(5, 8), default_token_dim(27, 16), default_token_dim(1, 4)
        (10, 27, 4)
    """
    return num_tokens * math.ceil(embed_dim / num_tokens)


def _per_token_weight(tokens: int, fan_in: int, fan_out: int) -> nn.Parameter:
    w = torch.empty(tokens, fan_in, fan_out)
    for t in range(tokens):
        nn.init.xavier_normal_(w[t])
    return nn.Parameter(w)


class RankMixerLayer(nn.Module):
    """One RankMixer layer: S = LN(TokenMixing(X) + X), X' = LN(PFFN(S) + S).

    Args:
        num_tokens (int): T.
        token_dim (int): D, a multiple of T.
        ffn_hidden (int): hidden width of every token's feed-forward network.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> RankMixerLayer(3, 6, ffn_hidden=8)(torch.randn(2, 3, 6)).shape
        torch.Size([2, 3, 6])
    """

    def __init__(self, num_tokens: int, token_dim: int, ffn_hidden: int) -> None:
        super().__init__()
        check_sizes(num_tokens=num_tokens, token_dim=token_dim, ffn_hidden=ffn_hidden)
        if token_dim % num_tokens:  # a setting (token_dim) the user chose: an input error
            raise InputError(
                f"token_dim must be a multiple of the number of tokens ({num_tokens}) for token "
                f"mixing, got {token_dim}"
            )
        t, d, h = num_tokens, token_dim, ffn_hidden
        self.norm_mix = nn.LayerNorm(d)
        self.w1 = _per_token_weight(t, d, h)
        self.b1 = nn.Parameter(torch.zeros(t, 1, h))
        self.w2 = _per_token_weight(t, h, d)
        self.b2 = nn.Parameter(torch.zeros(t, 1, d))
        self.norm_ffn = nn.LayerNorm(d)
        self.num_tokens, self.token_dim = t, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map X (B, T, D) to (B, T, D)."""
        t, d = self.num_tokens, self.token_dim
        mixed = x.reshape(-1, t, t, d // t).transpose(1, 2).reshape(-1, t, d)  # (B, T, D)
        s = self.norm_mix(mixed + x)  # (B, T, D)
        h = F.gelu(torch.bmm(s.transpose(0, 1), self.w1) + self.b1)  # (T, B, H)
        out = (torch.bmm(h, self.w2) + self.b2).transpose(0, 1)  # (B, T, D)
        return self.norm_ffn(out + s)  # (B, T, D)


class RankMixer(nn.Module):
    """RankMixer interaction on x0 = concat(F_cat field embeddings, F_num dense features).

    Args:
        num_fields (int): F_cat (may be 0).
        embed_dim (int): e.
        num_dense (int): F_num (may be 0; projected to one extra token when > 0).
        num_layers (int): L.
        token_dim (int | None): D; None gives ``default_token_dim(T, e)``.
        ffn_hidden (int): hidden width of each per-token FFN.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = RankMixer(num_fields=3, embed_dim=4, num_dense=2, num_layers=2, token_dim=None,
        ...                 ffn_hidden=8)
        >>> net.num_tokens, net.token_dim
        (4, 4)
        >>> net(torch.randn(7, 3 * 4 + 2)).shape
        torch.Size([7, 4])
    """

    def __init__(
        self,
        num_fields: int,
        embed_dim: int,
        num_dense: int,
        num_layers: int,
        token_dim: int | None,
        ffn_hidden: int,
    ) -> None:
        super().__init__()
        if num_fields < 0 or num_dense < 0 or num_fields + num_dense == 0:
            raise ValueError(
                f"need num_fields >= 0, num_dense >= 0 and at least one field, got "
                f"num_fields={num_fields}, num_dense={num_dense}"
            )
        check_sizes(num_layers=num_layers)
        t = num_fields + (1 if num_dense else 0)
        d = default_token_dim(t, embed_dim) if token_dim is None else token_dim
        self.tok_w = _per_token_weight(num_fields, embed_dim, d) if num_fields else None
        self.tok_b = nn.Parameter(torch.zeros(num_fields, 1, d)) if num_fields else None
        self.dense_proj = nn.Linear(num_dense, d) if num_dense else None
        if self.dense_proj is not None:
            nn.init.xavier_normal_(self.dense_proj.weight)
            nn.init.zeros_(self.dense_proj.bias)
        self.layers = nn.ModuleList(RankMixerLayer(t, d, ffn_hidden) for _ in range(num_layers))
        self.num_fields, self.num_dense, self.embed_dim = num_fields, num_dense, embed_dim
        self.num_tokens, self.token_dim = t, d
        self.in_features = num_fields * embed_dim + num_dense
        self.output_dim = d

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        """Map x0 (B, F_cat·e + F_num) to (B, D)."""
        split = self.num_fields * self.embed_dim
        tokens = []
        if self.tok_w is not None and self.tok_b is not None:
            emb = x0[:, :split].reshape(-1, self.num_fields, self.embed_dim)  # (B, F, e)
            tok = torch.bmm(emb.transpose(0, 1), self.tok_w) + self.tok_b  # (F, B, D)
            tokens.append(tok.transpose(0, 1))  # (B, F, D)
        if self.dense_proj is not None:
            tokens.append(self.dense_proj(x0[:, split:]).unsqueeze(1))  # (B, 1, D)
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]  # (B, T, D)
        for layer in self.layers:
            x = layer(x)  # (B, T, D)
        return x.mean(dim=1)  # (B, D)

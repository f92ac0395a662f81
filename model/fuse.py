"""An inference-only ML-DCN graph: the same function as ``CTRModel`` + ML-DCN, fewer, larger ops.

``fuse_for_inference(model)`` takes a trained ``CTRModel`` whose interaction is a
``MaskedLowRankCrossNet`` and returns a ``FusedMLDCN``: eval-only, no parameters (every weight is
a precomputed buffer), logits equal to the model's within float32 rounding (tests check 1e-5 on
probabilities for every option). Training keeps the readable modules; ``export.exporter`` traces
this form for "mldcn" runs. Measurements and what was tried: docs/fusion.md.

Row-vector convention throughout (``y = x @ W + b``: one ONNX Gemm, MatMul without bias). What
changes against the readable model:

1. **LayerNorm affine folded.** LN(x)·γ + β, then W1, c1 → LN without affine, then
   W1' = diag(γ)·W1, c1' = c1 + β·W1 (folds computed in float64). With ``mask_source="x0"`` the
   L first mask layers are one (d × L·h) Gemm + ReLU, split once; the L second layers (W2) stay
   one (h × r) Gemm each: a block-diagonal Gemm would do L times their FLOPs.
2. **2·sigmoid folded.** The factor 2 moves into U ("rank" position) or V ("input" position).
3. **Residual and bias folded into one Gemm per layer.** Without residual LayerNorm,
   x_{l+1} = x0 ⊙ (U_l y_l + b_l) + x_l telescopes to x_l = x0 ⊙ s_l, s_0 = 1 and
   s_{l+1} = s_l + [y_l, 1]·[U_l; b_l]: one Gemm with s_l as its C input, then one Mul, instead
   of Gemm, Mul, Add. y_l's constant column costs nothing: a bias of 1 in V's Gemm and, in the
   rank space, a mask column of value 1 (weights 0, bias 1, or bias ``SIGMOID_ONE`` where
   σ(bias) = 1.0 in float32). A low-rank trick: full-rank DCNv2 has no rank vector to hold it.
4. **Head folded into the last layer** ("parallel" and "cross_only", no residual LayerNorm).
   The head's cross part is w_cᵀ x_L = rowsum(y ⊙ P) + w_cᵀ x_{L−1} + (w_c ⊙ b)ᵀ x0 with
   P = x0 @ (U ⊙ w_c)ᵀ (B, r): the last layer's (B, d) element-wise work becomes (B, r) work.
   With one expert, w_cᵀ x_{L−1} ("rank" masks) and the constant terms ride in extra columns of
   V, the mask and P, so the cross part is Mul, Mul, ReduceSum; the other terms (and the deep
   tower's) accumulate through Gemm's C input. No Concat.
5. **Mixture of experts (K > 1).** Σ_k g_k x0 ⊙ (U_k z_k + b) = x0 ⊙ ((g ⊗ z) U_cat + b)
   because the gate weights g sum to 1: one (K·r × d) Gemm instead of a (B, K, d) einsum,
   K products and a sum.
6. **Embedding.** One Gather; the Concat with the dense features only when F_num > 0.

Where a fusion does not apply it falls back to the readable computation for that part:
``mask_source="xl"`` (one LayerNorm, first and second mask layer per layer, affine still
folded), residual LayerNorm (no telescoping, no head fold: LN, its affine and the residual as
trained), "stacked" (the tower reads x_L: no head fold), K > 1 (no constant column: b is its own
Add; no w_cᵀ x_{L−1} column: its own Gemm).

Example:
    >>> from model.config import ModelConfig
    >>> from model.ctr import build_model
    >>> _ = torch.manual_seed(0)
    >>> model = build_model(ModelConfig(arch="mldcn", embed_dim=4, num_layers=2, rank=4,
    ...                                 mlp_dims=(8,)), [5, 7], num_dense=2).eval()
    >>> fused = fuse_for_inference(model)
    >>> cat, dense = torch.tensor([[1, 6], [4, 0]]), torch.randn(2, 2)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(fused(cat, dense), model(cat, dense), atol=1e-6))
    True
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from model.ctr import CTRModel
from model.modules.mldcn import MaskedLowRankCrossNet
from model.modules.mlp import MLP

_F64 = torch.float64
# A mask bias whose sigmoid is exactly 1.0 in float32 (and float16): 1 − σ(30) ≈ 9e-14.
SIGMOID_ONE = 30.0


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(_F64)


def _cols(*blocks: torch.Tensor) -> torch.Tensor:
    """Concatenate weight blocks (d, n_i) or bias blocks (n_i,) along the output axis."""
    return torch.cat(blocks, dim=-1)


class _FusedLayer(nn.Module):
    """One ML-DCN cross layer in fused form: the rank vector y_l and how it updates x.

    Buffers (row-vector convention, R = K·r, E extra columns of y, E_m extra mask columns):
        v (d, R + E), v_bias (R + E,): V of all experts (×2 for "2sigmoid" on the input);
        w2 (h, mask_dim + E_m), c2 (mask_dim + E_m,): the second mask layer;
        u (R + E, d), u_bias (d,): U (×2 for "2sigmoid" in the rank space), with b as its last
        row when y has a constant column (then u_bias is unused);
        gate (d, K): expert gate (K > 1).
    """

    def __init__(
        self,
        net: MaskedLowRankCrossNet,
        index: int,
        one_col: bool,
        xw_col: torch.Tensor | None,
    ) -> None:
        super().__init__()
        layer = net.layers[index]
        d, r, k = net.in_features, net.rank, layer.num_experts
        self.num_experts, self.rank = k, r
        self.position = layer.mask_position
        self.activation = layer.mask_activation
        two = 2.0 if self.activation == "2sigmoid" else 1.0
        v = _f64(layer.down.weight).T  # (d, R)
        if k == 1:
            u, b = _f64(layer.up.weight).T, _f64(layer.up.bias)  # (r, d), (d,)
        else:
            u, b = _f64(layer.u).reshape(k * r, d), _f64(layer.bias)  # (K·r, d), (d,)
            self.register_buffer("gate", _f64(layer.gate.weight).T.float())  # (d, K)
        if self.position == "rank":
            u = two * u
        else:
            v = two * v
        w2, c2 = _f64(layer.mask_out.weight).T, _f64(layer.mask_out.bias)  # (h, m), (m,)
        v_bias = torch.zeros(v.shape[1], dtype=_F64)
        # Extra columns of y: [x·w_c] (last layer only), then [1]. Rank-space masks multiply
        # them by mask columns of value 1: weights 0 and bias 1 (linear), or bias
        # ``SIGMOID_ONE`` where σ(bias) is 1 in float32.
        extra_w, extra_b = [], []
        if xw_col is not None:
            extra_w.append(_f64(xw_col).reshape(d, 1))
            extra_b.append(torch.zeros(1, dtype=_F64))
        if one_col:
            extra_w.append(torch.zeros(d, 1, dtype=_F64))
            extra_b.append(torch.ones(1, dtype=_F64))
        n_extra = len(extra_w)
        if n_extra:
            v, v_bias = _cols(v, *extra_w), _cols(v_bias, *extra_b)
            if self.position == "rank":
                w2 = _cols(w2, torch.zeros(w2.shape[0], n_extra, dtype=_F64))
                one = 1.0 if self.activation == "linear" else SIGMOID_ONE
                c2 = _cols(c2, torch.full((n_extra,), one, dtype=_F64))
        if one_col:
            u = torch.cat([u, b.reshape(1, d)], dim=0)  # (R + 1, d): b rides on y's 1
        self.register_buffer("v", v.float())
        self.register_buffer("v_bias", v_bias.float() if n_extra else None)
        self.register_buffer("w2", w2.float())
        self.register_buffer("c2", c2.float())
        self.register_buffer("u", u.float())
        self.register_buffer("u_bias", b.float())
        self.one_col = one_col
        self.norm: nn.Module = copy.deepcopy(layer.norm)  # residual LayerNorm or Identity

    def mask(self, a: torch.Tensor) -> torch.Tensor:
        """The mask (B, mask_dim + E_m) from the mask's hidden activation a (B, h)."""
        m = torch.addmm(self.c2, a, self.w2)  # (B, mask_dim + E_m)
        return m if self.activation == "linear" else torch.sigmoid(m)

    def rank_vector(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """y_l (B, R + E) from x_l (B, d) and the mask, such that x0 ⊙ (y U) is the update."""
        xv = x if self.position == "rank" else x * m  # (B, d)
        z = xv @ self.v if self.v_bias is None else torch.addmm(self.v_bias, xv, self.v)
        if self.position == "rank":
            z = z * m  # (B, R + E)
        if self.num_experts == 1:
            return z
        g = torch.softmax(x @ self.gate, dim=-1)  # (B, K)
        z = z.reshape(-1, self.num_experts, self.rank) * g.unsqueeze(-1)  # (B, K, r)
        return z.flatten(start_dim=1)  # (B, K·r)

    def update(self, y: torch.Tensor) -> torch.Tensor:
        """U y + b (B, d), for the residual-LayerNorm path."""
        if self.one_col:
            return y @ self.u  # (B, d)
        return torch.addmm(self.u_bias, y, self.u)  # (B, d)

    def accumulate(self, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """s_{l+1} = s_l + U y + b (B, d) as one Gemm with s_l as C (s_0 may be a (d,) vector)."""
        s = torch.addmm(s, y, self.u)  # (B, d)
        return s if self.one_col else s + self.u_bias


class FusedMLDCN(nn.Module):
    """Inference form of a ``CTRModel`` with an ML-DCN interaction (see the module docstring).

    Same inputs and output as ``CTRModel.forward``: cat_ids (B, F_cat) int64 and dense
    (B, F_num) float32 to logits (B,). Build it with ``fuse_for_inference``; it holds copies of
    the weights, so later changes to the source model do not reach it. Eval only.

    Args:
        model (CTRModel): a model whose ``interaction`` is a ``MaskedLowRankCrossNet``.
    """

    def __init__(self, model: CTRModel) -> None:
        super().__init__()
        net = model.interaction
        if not isinstance(net, MaskedLowRankCrossNet):
            raise TypeError(
                f"fuse_for_inference needs a CTRModel with a MaskedLowRankCrossNet interaction, "
                f"got {type(net).__name__}"
            )
        d, num_layers, h = net.in_features, net.num_layers, net.mask_hidden
        self.num_dense, self.num_layers, self.in_features = model.num_dense, num_layers, d
        self.structure = model.structure
        self.mask_source = net.mask_source
        self.eps = float(net.mask_norms[0].eps)
        # 6. Embedding: one table, one Gather.
        self.has_embedding = model.embedding is not None
        if model.embedding is not None:
            self.register_buffer("table", model.embedding.table.weight.detach().clone())
            self.register_buffer("offsets", model.embedding.offsets.clone())
        # 1. First mask layers with LayerNorm's affine folded in: (d, h) per layer.
        w1s, c1s = [], []
        for index in range(num_layers):
            norm = net.mask_norms[0 if net.mask_source == "x0" else index]
            w1 = _f64(net.mask_w1[index]).T  # (d, h)
            w1s.append(_f64(norm.weight).unsqueeze(1) * w1)
            c1s.append(_f64(net.mask_b1[index]) + _f64(norm.bias) @ w1)
        if net.mask_source == "x0":
            self.register_buffer("w1", torch.cat(w1s, dim=1).float())  # (d, L·h)
            self.register_buffer("c1", torch.cat(c1s).float())  # (L·h,)
        else:
            self.register_buffer("w1", torch.stack(w1s).float())  # (L, d, h)
            self.register_buffer("c1", torch.stack(c1s).float())  # (L, h)
        self.mask_hidden = h
        # 3./4. Which layers get y's constant column, and the head fold.
        layer0 = net.layers[0]
        residual_norm = not isinstance(layer0.norm, nn.Identity)
        self.telescoped = not residual_norm
        self.head_fold = not residual_norm and model.structure in ("parallel", "cross_only")
        single = layer0.num_experts == 1
        one_col = single
        xw_ok = single and layer0.mask_position == "rank"
        head_w = _f64(model.head.weight[0])  # (head_in,)
        head_b = _f64(model.head.bias)  # (1,)
        w_cross = head_w[:d]  # w_c (d,); unused by "stacked"
        layers = []
        for index in range(num_layers):
            last = index == num_layers - 1
            xw = w_cross if (last and self.head_fold and xw_ok) else None
            layers.append(_FusedLayer(net, index, one_col, xw))
        for layer in layers[1:]:  # one initializer for equal biases (no Identity nodes in ONNX)
            if layer.v_bias is not None and torch.equal(layer.v_bias, layers[0].v_bias):
                layer.v_bias = layers[0].v_bias
        self.layers = nn.ModuleList(layers)
        self.one_col = one_col
        self.xw_col = xw_ok and self.head_fold
        if self.head_fold:
            last = self.layers[-1]
            u = last.u[: last.u.shape[0] - int(one_col)].to(_F64)  # (R, d) without the b row
            p_w, p_b = (u * w_cross).T, torch.zeros(u.shape[0], dtype=_F64)  # (d, R)
            q = w_cross * last.u_bias.to(_F64)  # (d,): (w_c ⊙ b_L)ᵀ x0
            if self.xw_col:  # y's x·w_c column times a P column of 1
                p_w = _cols(p_w, torch.zeros(d, 1, dtype=_F64))
                p_b = _cols(p_b, torch.ones(1, dtype=_F64))
            if one_col:  # y's 1 times a P column (w_c ⊙ b_L)ᵀ x0 + head bias
                p_w, p_b = _cols(p_w, q.reshape(d, 1)), _cols(p_b, head_b)
            else:
                self.register_buffer("q", q.reshape(d, 1).float())  # (d, 1)
            if not self.xw_col:
                self.register_buffer("w_cross", w_cross.reshape(d, 1).float())  # (d, 1)
            self.register_buffer("p_w", p_w.float())  # (d, R + E)
            self.register_buffer("p_b", p_b.float())  # (R + E,)
        elif model.structure != "stacked":
            self.register_buffer("w_cross", w_cross.reshape(d, 1).float())  # (d, 1)
        self.bias_in_p = self.head_fold and one_col
        self.register_buffer("head_b", head_b.float())  # (1,)
        self.register_buffer("s0", torch.ones(d))  # s_0 = 1, (d,)
        # The deep tower without Dropout, BatchNorm folded in; its head weights as a
        # (width, 1) column.
        self.tower = model.mlp.for_inference() if isinstance(model.mlp, MLP) else nn.Sequential()
        if model.structure != "cross_only":
            start = 0 if model.structure == "stacked" else d
            w_tower = model.head.weight.detach()[0, start:].reshape(-1, 1)  # (width, 1)
            self.register_buffer("w_tower", w_tower.clone())
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> FusedMLDCN:
        """Only ``train(False)`` (``eval()``) is allowed: this form is inference-only."""
        if mode:
            raise RuntimeError("FusedMLDCN is inference-only; train the CTRModel it came from")
        return super().train(False)

    def embed(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """x0 (B, d) from cat_ids (B, F_cat) and dense (B, F_num)."""
        if not self.has_embedding:
            return dense  # (B, F_num)
        x0 = nn.functional.embedding(cat_ids + self.offsets, self.table)  # (B, F_cat, e)
        x0 = x0.flatten(start_dim=1)  # (B, F_cat·e)
        return torch.cat([x0, dense], dim=1) if self.num_dense else x0  # (B, d)

    def masks(self, x0: torch.Tensor) -> list[torch.Tensor] | None:
        """All L masks from one LayerNorm and one Gemm ("x0" source), else None."""
        if self.mask_source != "x0":
            return None
        n = nn.functional.layer_norm(x0, (self.in_features,), eps=self.eps)  # (B, d)
        a = torch.relu(torch.addmm(self.c1, n, self.w1))  # (B, L·h)
        hidden = torch.split(a, self.mask_hidden, dim=1)  # L × (B, h)
        return [layer.mask(part) for layer, part in zip(self.layers, hidden, strict=True)]

    def layer_mask(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``index``'s mask from LN(x_l) ("xl" source); x (B, d)."""
        n = nn.functional.layer_norm(x, (self.in_features,), eps=self.eps)  # (B, d)
        a = torch.relu(torch.addmm(self.c1[index], n, self.w1[index]))  # (B, h)
        return self.layers[index].mask(a)

    def forward(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Map cat_ids (B, F_cat) int64 and dense (B, F_num) float32 to logits (B,)."""
        x0 = self.embed(cat_ids, dense)  # (B, d)
        masks = self.masks(x0)
        x = x0
        s = self.s0  # (d,), then (B, d)
        n_full = self.num_layers - 1 if self.head_fold else self.num_layers
        for index in range(n_full):
            layer = self.layers[index]
            m = masks[index] if masks is not None else self.layer_mask(index, x)
            y = layer.rank_vector(x, m)  # (B, R + E)
            if self.telescoped:
                s = layer.accumulate(s, y)  # (B, d)
                x = x0 * s  # (B, d)
            else:
                x = layer.norm(x0 * layer.update(y) + x)  # (B, d)
        if self.head_fold:
            return self._folded_head(x0, x, masks)
        if self.structure == "stacked":
            return torch.addmm(self.head_b, self.tower(x), self.w_tower).squeeze(-1)  # (B,)
        logit = torch.addmm(self.head_b, x, self.w_cross)  # (B, 1)
        if self.structure == "parallel":
            logit = torch.addmm(logit, self.tower(x0), self.w_tower)  # (B, 1)
        return logit.squeeze(-1)  # (B,)

    def _folded_head(
        self, x0: torch.Tensor, x: torch.Tensor, masks: list[torch.Tensor] | None
    ) -> torch.Tensor:
        """The last cross layer and the head in one: logits (B,) from x0 and x_{L-1} (B, d)."""
        index = self.num_layers - 1
        layer = self.layers[index]
        m = masks[index] if masks is not None else self.layer_mask(index, x)
        y = layer.rank_vector(x, m)  # (B, R + E)
        p = torch.addmm(self.p_b, x0, self.p_w)  # (B, R + E)
        logit = (y * p).sum(dim=1, keepdim=True)  # (B, 1)
        # The remaining terms accumulate through Gemm's C input: no separate Adds.
        if not self.xw_col:
            logit = torch.addmm(logit, x, self.w_cross)  # (B, 1)
        if not self.bias_in_p:
            logit = torch.addmm(logit, x0, self.q) + self.head_b  # (B, 1)
        if self.structure == "parallel":
            logit = torch.addmm(logit, self.tower(x0), self.w_tower)  # (B, 1)
        return logit.squeeze(-1)  # (B,)


def fuse_for_inference(model: CTRModel) -> FusedMLDCN:
    """The inference form of an ML-DCN ``CTRModel`` (eval only; see the module docstring).

    Raises TypeError unless ``model`` is a ``CTRModel`` with a ``MaskedLowRankCrossNet``.
    """
    if not isinstance(model, CTRModel):
        raise TypeError(f"fuse_for_inference needs a CTRModel, got {type(model).__name__}")
    return FusedMLDCN(model)

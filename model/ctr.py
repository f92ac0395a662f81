"""The CTR model: field embeddings → interaction module → structure → one logit per example.

x0 = concat(flattened embeddings of the F_cat categorical fields, the F_num dense features), so
d = F_cat·e + F_num. The interaction module (DCNv2, ML-DCN, MaskNet, WuKong, RankMixer, or none
for the plain MLP) is built from a ``ModelConfig`` by ``build_interaction`` and passed in, so
architectures swap without touching the model. ``build_model`` assembles everything from a config,
asking the architecture registry (``model.archs``) for the interaction module.

Inputs are what ``model.encoders`` produces: ``cat_ids`` int64 (B, F_cat) with column j in
[0, cardinalities[j]) (0 is the OOV/missing id) and ``dense`` float32 (B, F_num), already
transformed and standardised. The output is logits (B,), not probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.archs import architecture
from model.config import ModelConfig, check_layout
from model.modules import MLP
from model.modules.mlp import init_linear

EMBEDDING_INIT_STD = 1e-4


class FieldEmbedding(nn.Module):
    """All categorical fields' embeddings in one table, field j's rows offset by Σ_{i<j} card_i.

    One table means one gather per batch (one ONNX Gather) instead of F_cat. Ids out of a field's
    range are not checked in ``forward`` (no data-dependent control flow); ``check_ids`` does it.

    Args:
        cardinalities (Sequence[int]): number of ids of each field.
        embed_dim (int): e.
        init_std (float): standard deviation of the table's normal initialisation.

    Example:
        >>> emb = FieldEmbedding([3, 5], embed_dim=4)
        >>> emb(torch.tensor([[0, 4], [2, 1]])).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, cardinalities: Sequence[int], embed_dim: int,
                 init_std: float = EMBEDDING_INIT_STD) -> None:
        super().__init__()
        cards = list(cardinalities)
        starts = [0]
        for c in cards[:-1]:
            starts.append(starts[-1] + c)
        self.table = nn.Embedding(sum(cards), embed_dim)
        nn.init.normal_(self.table.weight, std=init_std)
        self.register_buffer("offsets", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.cardinalities = cards
        self.embed_dim = embed_dim

    def check_ids(self, cat_ids: torch.Tensor) -> None:
        """Raise ValueError unless cat_ids is (B, F_cat) with column j in [0, card_j)."""
        num_fields = len(self.cardinalities)
        if cat_ids.dim() != 2 or cat_ids.shape[1] != num_fields:
            shape = tuple(cat_ids.shape)
            raise ValueError(f"cat_ids must have shape (B, {num_fields}), got {shape}")
        high = torch.tensor(self.cardinalities, device=cat_ids.device)
        bad = (cat_ids < 0) | (cat_ids >= high)  # (B, F_cat)
        if bool(bad.any()):
            fields = sorted(set(torch.nonzero(bad)[:, 1].tolist()))
            raise ValueError(f"ids out of range in categorical fields {fields}")

    def forward(self, cat_ids: torch.Tensor) -> torch.Tensor:
        """Map ids (B, F_cat) to embeddings (B, F_cat, e)."""
        return self.table(cat_ids + self.offsets)  # (B, F_cat, e)


def _check_inputs(
    embedding: FieldEmbedding | None, num_dense: int, cat_ids: torch.Tensor, dense: torch.Tensor
) -> None:
    if dense.dim() != 2 or dense.shape[1] != num_dense:
        raise ValueError(f"dense must have shape (B, {num_dense}), got {tuple(dense.shape)}")
    if cat_ids.dim() != 2 or cat_ids.shape[0] != dense.shape[0]:
        raise ValueError(
            f"cat_ids must have shape (B, F_cat) with the batch size of dense ({dense.shape[0]}), "
            f"got {tuple(cat_ids.shape)}"
        )
    if embedding is not None:
        embedding.check_ids(cat_ids)
    elif cat_ids.shape[1] != 0:
        raise ValueError(f"cat_ids must have shape (B, 0), got {tuple(cat_ids.shape)}")


def build_interaction(
    cfg: ModelConfig,
    in_features: int,
    num_fields: int | None = None,
    num_dense: int | None = None,
) -> nn.Module | None:
    """The interaction module of ``cfg`` for an x0 of width ``in_features`` (None for "mlp"),
    as its entry in the architecture registry (``model.archs``) builds it.

    WuKong and RankMixer read x0 as per-field tokens, so they also need the layout: F_cat
    (``num_fields``) and F_num (``num_dense``), with in_features = F_cat·e + F_num.
    """
    return architecture(cfg.arch).build(cfg, in_features, num_fields, num_dense)


class CTRModel(nn.Module):
    """Embeddings, an interaction module and a deep tower combined by ``structure``; one logit.

    parallel: head(concat(I(x0), MLP(x0)));  stacked: head(MLP(I(x0)));  cross_only: head(I(x0))

    Args:
        cardinalities (Sequence[int]): ids per categorical field (may be empty).
        num_dense (int): F_num, the number of dense features (may be 0).
        embed_dim (int): e.
        interaction (nn.Module | None): maps (B, d) to (B, output_dim) and has ``output_dim``;
            None is the identity (the plain MLP model).
        structure (str): "parallel", "stacked" or "cross_only".
        mlp_dims (Sequence[int]): hidden widths of the deep tower (empty: identity).
        dropout (float): dropout after each hidden layer of the tower.
        batch_norm (bool): batch normalisation after each hidden Linear of the tower.
        embed_init_std (float): standard deviation of the embedding table's initialisation.

    Example:
        >>> from model.modules import CrossNet
        >>> _ = torch.manual_seed(0)
        >>> model = CTRModel([10, 20], num_dense=3, embed_dim=4,
        ...                  interaction=CrossNet(2 * 4 + 3, num_layers=2), mlp_dims=[8])
        >>> model.input_dim
        11
        >>> model(torch.tensor([[1, 2]]), torch.randn(1, 3)).shape
        torch.Size([1])
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        num_dense: int,
        embed_dim: int,
        interaction: nn.Module | None,
        structure: str = "parallel",
        mlp_dims: Sequence[int] = (),
        dropout: float = 0.0,
        batch_norm: bool = False,
        embed_init_std: float = EMBEDDING_INIT_STD,
    ) -> None:
        super().__init__()
        cards = check_layout(cardinalities, num_dense)
        if structure not in ("parallel", "stacked", "cross_only"):
            raise ValueError(
                f"structure must be one of ('parallel', 'stacked', 'cross_only'), got {structure!r}"
            )
        d = len(cards) * embed_dim + num_dense
        inter_dim = d if interaction is None else interaction.output_dim
        self.embedding = FieldEmbedding(cards, embed_dim, embed_init_std) if cards else None
        self.interaction = interaction
        self.mlp: nn.Module = nn.Identity()  # unused by "cross_only"
        if structure == "parallel":
            self.mlp = MLP(d, mlp_dims, dropout, batch_norm)
            head_in = inter_dim + self.mlp.output_dim
        elif structure == "stacked":
            self.mlp = MLP(inter_dim, mlp_dims, dropout, batch_norm)
            head_in = self.mlp.output_dim
        else:
            head_in = inter_dim
        self.head = nn.Linear(head_in, 1)
        init_linear(self.head)
        self.cardinalities = cards
        self.num_cat = len(cards)
        self.num_dense = num_dense
        self.embed_dim = embed_dim
        self.input_dim = d
        self.structure = structure

    def check_inputs(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> None:
        """Raise ValueError on shapes or id ranges that ``forward`` would silently misuse."""
        _check_inputs(self.embedding, self.num_dense, cat_ids, dense)

    def embed(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """x0 (B, d) from cat_ids (B, F_cat) and dense (B, F_num)."""
        if self.embedding is None:
            return dense  # (B, F_num)
        emb = self.embedding(cat_ids).flatten(start_dim=1)  # (B, F_cat·e)
        # Concatenated even when F_num = 0 (a (B, 0) tensor), so that an exported graph keeps
        # both inputs whatever the layout.
        return torch.cat([emb, dense], dim=1)  # (B, d)

    def forward(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Map cat_ids (B, F_cat) int64 and dense (B, F_num) float32 to logits (B,)."""
        x0 = self.embed(cat_ids, dense)  # (B, d)
        crossed = x0 if self.interaction is None else self.interaction(x0)  # (B, d_int)
        if self.structure == "parallel":
            h = torch.cat([crossed, self.mlp(x0)], dim=1)  # (B, d_int + mlp_out)
        elif self.structure == "stacked":
            h = self.mlp(crossed)  # (B, mlp_out)
        else:
            h = crossed  # (B, d_int)
        return self.head(h).squeeze(-1)  # (B,)

    def scale_logits(self, factor: float) -> None:
        """Multiply every logit by ``factor`` from now on (temperature scaling: 1/T), in the
        weights themselves: the head's weight and bias, so an export carries it."""
        with torch.no_grad():
            self.head.weight.mul_(factor)
            self.head.bias.mul_(factor)


class LogisticRegression(nn.Module):
    """Baseline (not in ``ARCHS``): logistic regression on one-hot ids and dense features.

    logit = Σ_j w_j[id_j] + wᵀ dense + b

    Args:
        cardinalities (Sequence[int]): ids per categorical field (may be empty).
        num_dense (int): F_num (may be 0).

    Example:
        >>> model = LogisticRegression([3, 4], num_dense=2)
        >>> model(torch.tensor([[0, 3]]), torch.zeros(1, 2)).shape
        torch.Size([1])
    """

    def __init__(self, cardinalities: Sequence[int], num_dense: int) -> None:
        super().__init__()
        cards = check_layout(cardinalities, num_dense)
        self.embedding = FieldEmbedding(cards, 1) if cards else None
        self.dense = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None
        if self.dense is not None:
            nn.init.zeros_(self.dense.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.cardinalities = cards
        self.num_cat = len(cards)
        self.num_dense = num_dense

    def check_inputs(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> None:
        """Raise ValueError on shapes or id ranges that ``forward`` would silently misuse."""
        _check_inputs(self.embedding, self.num_dense, cat_ids, dense)

    def forward(self, cat_ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Map cat_ids (B, F_cat) and dense (B, F_num) to logits (B,)."""
        logit = self.bias.expand(dense.shape[0])  # (B,)
        if self.embedding is not None:
            logit = logit + self.embedding(cat_ids).sum(dim=(1, 2))  # (B,)
        if self.dense is not None:
            logit = logit + self.dense(dense).squeeze(-1)  # (B,)
        return logit

    def scale_logits(self, factor: float) -> None:
        """Multiply every logit by ``factor`` from now on: every term of the sum is scaled."""
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(factor)


def build_model(
    cfg: ModelConfig, cardinalities: Sequence[int], num_dense: int
) -> CTRModel | LogisticRegression:
    """The model described by ``cfg`` for a data layout (ids per categorical field, F_num).

    Arch "mlp" is embeddings → MLP → head whatever ``cfg.structure`` says; "lr" gives the
    ``LogisticRegression`` baseline.

    Example:
        >>> cfg = ModelConfig(arch="mldcn", embed_dim=4, num_layers=2, rank=4, mlp_dims=(8,))
        >>> model = build_model(cfg, [10, 10, 5], num_dense=2)
        >>> type(model.interaction).__name__, model.input_dim
        ('MaskedLowRankCrossNet', 14)
    """
    cards = check_layout(cardinalities, num_dense)
    if cfg.arch == "lr":
        return LogisticRegression(cards, num_dense)
    d = len(cards) * cfg.embed_dim + num_dense
    structure = architecture(cfg.arch).structure or cfg.structure
    return CTRModel(
        cards,
        num_dense,
        cfg.embed_dim,
        build_interaction(cfg, d, len(cards), num_dense),
        structure=structure,
        mlp_dims=cfg.mlp_dims,
        dropout=cfg.dropout,
        batch_norm=cfg.batch_norm,
        embed_init_std=cfg.embed_init_std,
    )

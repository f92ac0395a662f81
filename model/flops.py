"""FLOPs per example and parameter counts of the whole CTR model.

The per-module costs and the counting conventions (matmul vs element-wise FLOPs, what is not
counted, how ../shared/MODELS.md's formulas are reproduced) are in ``model.costs``; each
architecture's interaction cost and output width come from its entry in the registry
(``model.archs``). No torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from model.archs import architecture
from model.config import ModelConfig, check_layout
from model.costs import Cost, linear_cost, mlp_cost, sum_costs


def interaction_output_dim(
    cfg: ModelConfig, d: int, num_fields: int | None = None, num_dense: int | None = None
) -> int:
    """Width of the interaction module's output for an x0 of width ``d``.

    WuKong and RankMixer also need the layout (``num_fields`` = F_cat, ``num_dense`` = F_num).
    """
    return architecture(cfg.arch).output_dim(cfg, d, num_fields, num_dense)


def interaction_cost(
    cfg: ModelConfig, d: int, num_fields: int | None = None, num_dense: int | None = None
) -> Cost:
    """Cost of ``cfg``'s interaction module on an x0 of width ``d`` (zero for "mlp").

    WuKong and RankMixer also need the layout (``num_fields`` = F_cat, ``num_dense`` = F_num).
    """
    return architecture(cfg.arch).cost(cfg, d, num_fields, num_dense)


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs per example and parameters of a whole model (see the module docstring).

    ``parts`` breaks the cost down: "interaction", "mlp", "head" ("lr" for the baseline);
    ``embedding_params`` + ``dense_params`` = ``params``.
    """

    matmul: int
    elementwise: int
    total: int
    params: int
    embedding_params: int
    dense_params: int
    parts: dict[str, Cost] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: the counts and, per part, its matmul, total and params."""
        d: dict[str, Any] = {
            k: getattr(self, k)
            for k in (
                "matmul",
                "elementwise",
                "total",
                "params",
                "embedding_params",
                "dense_params",
            )
        }
        d["parts"] = {
            name: {"matmul": c.matmul, "total": c.total, "params": c.params}
            for name, c in self.parts.items()
        }
        return d


def model_flops(cfg: ModelConfig, cardinalities: Sequence[int], num_dense: int) -> FlopsReport:
    """FLOPs per example and parameter counts of ``build_model(cfg, cardinalities, num_dense)``.

    Example (DCNv2 full rank, d = 2·4 + 3 = 11, two layers, parallel with one hidden layer):
        >>> cfg = ModelConfig(arch="dcnv2", embed_dim=4, num_layers=2, mlp_dims=(8,))
        >>> r = model_flops(cfg, [10, 10], num_dense=3)
        >>> r.parts["interaction"].total == 2 * (2 * 11 * 11 + 3 * 11)
        True
        >>> r.matmul, r.total, r.embedding_params, r.params
        (698, 781, 80, 460)
    """
    cards = check_layout(cardinalities, num_dense)
    if cfg.arch == "lr":
        num_cat = len(cards)
        lr = Cost(2 * num_dense, num_cat + (1 if num_dense else 0), num_dense + 1)
        return _report({"lr": lr}, embedding_params=sum(cards))
    d = len(cards) * cfg.embed_dim + num_dense
    inter = interaction_cost(cfg, d, len(cards), num_dense)
    inter_dim = interaction_output_dim(cfg, d, len(cards), num_dense)
    mlp_dims = cfg.mlp_dims
    structure = architecture(cfg.arch).structure or cfg.structure
    mlp_out = mlp_dims[-1] if mlp_dims else None
    if structure == "parallel":
        mlp = mlp_cost(d, mlp_dims)
        head_in = inter_dim + (mlp_out or d)
    elif structure == "stacked":
        mlp = mlp_cost(inter_dim, mlp_dims)
        head_in = mlp_out or inter_dim
    else:
        mlp, head_in = Cost(), inter_dim
    parts = {"interaction": inter, "mlp": mlp, "head": linear_cost(head_in, 1)}
    return _report(parts, embedding_params=sum(cards) * cfg.embed_dim)


def _report(parts: dict[str, Cost], embedding_params: int) -> FlopsReport:
    total = sum_costs(list(parts.values()))
    return FlopsReport(
        matmul=total.matmul,
        elementwise=total.elementwise,
        total=total.total,
        params=total.params + embedding_params,
        embedding_params=embedding_params,
        dense_params=total.params,
        parts=parts,
    )

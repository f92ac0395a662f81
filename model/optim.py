"""Optimisers for large embedding tables: row-wise Adagrad on sparse gradients.

Dense Adam keeps two float32 moments per table *element* and a dense gradient the size of the
table, so a 10^7-row table of dimension e costs 16·e bytes per row, touched every step. With
``embedding_optimizer="rowwise_adagrad"`` the table's gradient is sparse (only the rows a batch
looked up) and :class:`RowWiseAdagrad` keeps one float32 per *row* (the running mean of the
squared gradient over the row's elements, as FBGEMM's and torchrec's row-wise Adagrad do):

    s_i ← s_i + mean_k g_ik²        w_i ← w_i − lr · g_i / (√s_i + eps)

for the rows i in the batch only; memory is 4·e + 4 bytes per row (weights + state). The rest
of the model keeps Adam.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model.errors import InputError

EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adam", "rowwise_adagrad")


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for 2-D parameters (embedding tables), sparse or dense gradients.

    Args:
        params: the tables (each a 2-D ``nn.Parameter``).
        lr (float): the learning rate.
        eps (float): added to √s.
        initial_accumulator_value (float): s at the start.

    Example:
        >>> table = nn.Embedding(10, 4, sparse=True)
        >>> opt = RowWiseAdagrad(table.parameters(), lr=0.1)
        >>> table(torch.tensor([1, 1, 3])).sum().backward()
        >>> opt.step()
        >>> opt.state[table.weight]["sum"].shape
        torch.Size([10])
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.01, eps: float = 1e-8,
                 initial_accumulator_value: float = 0.0) -> None:
        if not lr > 0:
            raise InputError(f"lr must be > 0, got {lr}")
        super().__init__(params, {"lr": lr, "eps": eps,
                                  "initial_accumulator_value": initial_accumulator_value})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad needs 2-D parameters, got {tuple(p.shape)}")
                self.state[p]["sum"] = torch.full(
                    (p.shape[0],), group["initial_accumulator_value"], dtype=torch.float32,
                    device=p.device)

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Update the rows that have a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]["sum"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()
                    rows, values = g.indices()[0], g.values()  # (n,), (n, e)
                    s = state.index_add_(0, rows, values.float().pow(2).mean(1))[rows]
                    p.index_add_(0, rows, values * (-group["lr"] / (s.sqrt() + group["eps"]))
                                 .unsqueeze(1).to(values.dtype))
                else:
                    state.add_(p.grad.float().pow(2).mean(1))
                    p.addcdiv_(p.grad, (state.sqrt() + group["eps"]).unsqueeze(1).to(p.dtype),
                               value=-group["lr"])


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``nn.utils.clip_grad_norm_`` that also accepts sparse gradients (their rows are coalesced
    in place first, so a row looked up twice counts once). Returns the total norm."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total

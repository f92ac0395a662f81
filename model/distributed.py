"""Data-parallel training with torch.distributed: the process group of a torchrun job.

``mldcn train --nproc N`` re-runs the same command under ``torchrun --standalone
--nproc-per-node N`` (:func:`launch`); any torchrun command line works the same way
(``torchrun --nnodes 2 --nproc-per-node 8 ... -m model train ...``,
docker/k8s/training/pytorchjob.yaml).
Each process reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment
(:func:`from_env`) and joins the group: gloo on the CPU, NCCL on CUDA.

What each rank does (model/train.py): rank 0 prepares the data (split, encoders, shards) into
the run's staging folder and the others receive where it is (so on several nodes the run
folder's parent must be a shared filesystem, as the PyTorchJob manifest mounts); every rank
walks the same shuffled order of global batches of ``--batch-size`` rows and trains on its own
contiguous 1/N of each (``model.dataset.iter_batches``, read from the memory-mapped shard);
gradients are averaged by ``DistributedDataParallel`` (a sparse embedding gradient by
:meth:`Dist.average_sparse`), so the job takes the steps one process would take with the same
batch size, up to: the mean of per-rank means where shares differ by a row, per-rank dropout
masks, per-rank batch-norm statistics (batch norm is off in the presets), the sparse table's
L2 counted per rank, and global batches of fewer than N rows skipped. Validation and test
metrics are computed on all ranks' predictions gathered together (:meth:`Dist.gather`), not
averaged per rank, so every rank takes the same early-stopping decision. Rank 0 writes the
run folder.

A collective waits at most ``MLDCN_DIST_TIMEOUT_S`` (default 4 hours: the other ranks wait in
one while rank 0 prepares the data); a rank that dies ends the job sooner, since torchrun stops
the others.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.errors import CLIError

DEFAULT_TIMEOUT_S = 4 * 3600.0


@dataclass(frozen=True)
class Dist:
    """This process's place in the job (``world == 1``: a plain single-process run)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on rank 0, the rank that writes files and logs."""
        return self.rank == 0

    def gather(self, *arrays: np.ndarray) -> tuple[np.ndarray, ...]:
        """Each array concatenated over the ranks, in rank order (the arrays themselves when
        single-process)."""
        if self.world == 1:
            return arrays
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, arrays)
        return tuple(np.concatenate([o[i] for o in out]) for i in range(len(arrays)))

    def broadcast_tensor(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` with rank 0's values, in place."""
        if self.world > 1:
            dist.broadcast(t, src=0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_sparse(self, grad: torch.Tensor) -> torch.Tensor:
        """The mean over the ranks of a sparse (row) gradient: every rank's rows and values are
        all-gathered (padded to the longest) and summed, since NCCL has no sparse all-reduce."""
        g = grad.coalesce()
        rows, values = g.indices()[0], g.values()
        n = torch.tensor([rows.numel()], device=rows.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        m = int(max(int(s.item()) for s in sizes))
        pad = m - rows.numel()
        rows_p = torch.cat([rows, rows.new_zeros(pad)])
        values_p = torch.cat([values, values.new_zeros((pad, *values.shape[1:]))])
        all_rows = [torch.empty_like(rows_p) for _ in range(self.world)]
        all_values = [torch.empty_like(values_p) for _ in range(self.world)]
        dist.all_gather(all_rows, rows_p)
        dist.all_gather(all_values, values_p)
        k = [int(s.item()) for s in sizes]
        rows_all = torch.cat([r[:c] for r, c in zip(all_rows, k, strict=True)])
        values_all = torch.cat([v[:c] for v, c in zip(all_values, k, strict=True)])
        return torch.sparse_coo_tensor(rows_all.unsqueeze(0), values_all / self.world,
                                       g.shape).coalesce()

    def total(self, value: float) -> float:
        """The sum of ``value`` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())


def from_env() -> Dist:
    """The job this process belongs to, from torchrun's environment (single-process without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(d: Dist, device: torch.device) -> None:
    """Join the process group (gloo on the CPU, NCCL on CUDA); nothing when single-process.
    Collectives of objects (``gather``/``broadcast``) run on the CPU group either way."""
    if d.world == 1 or dist.is_initialized():
        return
    timeout = timedelta(seconds=float(os.environ.get("MLDCN_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("cuda:nccl,cpu:gloo", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=timeout)


def shutdown(d: Dist, *, together: bool) -> None:
    """Leave the process group. ``together``: this rank is past the run's last collective (as
    every rank then is): wait for all ranks first, so none tears its group down while rank 0
    still writes the run folder (an early leaver's gloo threads can abort the process at exit);
    rank 0 reaches the barrier whether its writing succeeded or failed, so no rank waits for
    one that left. The group's objects are freed here, while the interpreter is fully alive."""
    if d.world > 1 and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mldcn train ARGV`` as ``nproc`` torchrun processes on this machine; their exit code."""
    if nproc < 1:
        raise CLIError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "model", "train", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(cmd, env=env, check=False).returncode

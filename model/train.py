"""Training: Adam + BCE with gradient clipping, lr-on-plateau and early stopping on valid AUC.

The loss is the mean BCE plus, with ``embedding_l2`` in the model config, λ/2·‖E‖² of the
embedding table (:func:`embedding_penalty`). Early stopping decides when a run ends: the epoch
cap (``epochs``, 100) is a guard, not the stopping rule. With ``calibrate="temperature"`` the
logits are divided by a temperature T fitted on the validation split after training
(:func:`model.calibration.fit_temperature`); T is folded into the model's last layer, so the
checkpoint and its export serve calibrated probabilities.

:func:`train_run` is what ``mldcn train`` calls: it prepares the data (split, fit encoders,
encode into shards; or pre-split valid/test files), trains, evaluates on the test split with the
best-on-valid weights, and writes a run folder::

    RUN_DIR/checkpoint.pt      state_dict of the best epoch (torch.save)
    RUN_DIR/model_config.json  ModelConfig + cardinalities + num_dense (enough to rebuild)
    RUN_DIR/encoders.json      feature schema + fitted encoders (numpy-only, used by serving)
    RUN_DIR/train_config.json  TrainConfig and the split
    RUN_DIR/metrics.json       valid/test AUC, logloss and calibration (mean predicted vs
                               observed CTR, ECE), the temperature, FLOPs and params per
                               example, examples/s, per-epoch history, data files, SHA-256

The folder is written under a temporary name and renamed at the end, so a run that fails
leaves no half-written run folder behind.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.calibration import fit_temperature
from model.config import ModelConfig
from model.ctr import build_model
from model.dataset import PreparedData, Shard, effective_split, iter_batches, prepare_sources
from model.device import AMP_CHOICES, amp_dtype, resolve_device
from model.distributed import Dist, from_env
from model.distributed import init as init_group
from model.distributed import shutdown as shutdown_group
from model.errors import InputError, one_line
from model.files import file_info, read_json
from model.flops import model_flops
from model.metrics import calibration, roc_auc
from model.optim import EMBEDDING_OPTIMIZERS, RowWiseAdagrad, clip_grad_norm
from model.split import SplitSpec

Log = Callable[[str], None]


CALIBRATIONS: tuple[str, ...] = ("none", "temperature")


@dataclass
class TrainConfig:
    """Optimisation settings. Defaults follow the BARS benchmark recipe (../shared/MODELS.md): Adam,
    lr 1e-3, the lr ×0.1 on a validation plateau, early stopping with patience 2; ``epochs`` is
    only a cap (see the module docstring). ``device`` is "cpu" here (``mldcn train`` passes its
    ``--device``, default "auto"), so library callers (tune, bench quality) stay on the CPU
    unless asked; ``amp`` applies on CUDA only (:mod:`model.device`). ``embedding_optimizer``
    "rowwise_adagrad" updates the table with :class:`model.optim.RowWiseAdagrad` at
    ``embedding_lr`` (no ``weight_decay`` on the table) and Adam the rest."""

    epochs: int = 100
    batch_size: int = 1024
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip_norm: float = 10.0
    early_stop_patience: int = 2
    lr_patience: int = 1
    lr_factor: float = 0.1
    min_lr: float = 1e-6
    seed: int = 0
    eval_batch_size: int = 16384
    calibrate: str = "none"
    threads: int | None = None
    progress: bool | None = None
    device: str = "cpu"
    amp: str = "auto"
    embedding_optimizer: str = "adam"
    embedding_lr: float = 0.01

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size", "early_stop_patience"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if self.lr_patience < 0:
            raise InputError(f"lr_patience must be >= 0, got {self.lr_patience}")
        if self.calibrate not in CALIBRATIONS:
            raise InputError(f"calibrate must be one of {CALIBRATIONS}, got {self.calibrate!r}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1, got {self.threads}")
        if self.amp not in AMP_CHOICES:
            raise InputError(f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        if self.embedding_optimizer not in EMBEDDING_OPTIMIZERS:
            raise InputError(f"embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, "
                             f"got {self.embedding_optimizer!r}")
        if not self.embedding_lr > 0:
            raise InputError(f"embedding_lr must be > 0, got {self.embedding_lr}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def to_tensors(
    cat: np.ndarray, dense: np.ndarray, label: np.ndarray | None = None,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, ...]:
    """numpy batch → torch tensors without copying where possible; on a CUDA ``device`` they
    are copied from pinned memory without blocking."""
    out = [torch.from_numpy(np.ascontiguousarray(a)) for a in (cat, dense)]
    if label is not None:
        out.append(torch.from_numpy(np.ascontiguousarray(label)))
    if device is not None and device.type == "cuda":
        out = [t.pin_memory().to(device, non_blocking=True) for t in out]
    return tuple(out)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(
    model: nn.Module, shards: list[Shard], batch_size: int, logits: bool = False,
    dist: Dist | None = None, amp: torch.dtype | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) over the shards (logits with ``logits``), in shard order; with
    ``dist`` each rank predicts its share and every rank gets all of them."""
    model.eval()
    device, d = _device_of(model), dist or Dist()
    labels, probs = [], []
    for cat, dense, y in iter_batches(shards, batch_size, share=(d.rank, d.world)):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(*to_tensors(cat, dense, device=device)).float()
        probs.append((out if logits else torch.sigmoid(out)).cpu().numpy())
        labels.append(y)
    y_all = np.concatenate(labels) if labels else np.empty(0, np.float32)
    p_all = np.concatenate(probs) if probs else np.empty(0, np.float32)
    return d.gather(y_all, p_all)


class DivergedError(InputError):
    """Training diverged (non-finite predictions): a setting, typically the learning rate."""


def evaluate(model: nn.Module, shards: list[Shard], batch_size: int,
             dist: Dist | None = None, amp: torch.dtype | None = None) -> dict[str, float]:
    """AUC, logloss and calibration (:func:`model.metrics.calibration`: mean predicted and
    observed CTR, their ratio, ECE) over the shards (all ranks' rows with ``dist``); AUC is NaN
    with a single class."""
    y, p = predict(model, shards, batch_size, dist=dist, amp=amp)
    if not np.isfinite(p).all():
        raise DivergedError("the model's predictions are not finite: training diverged (lower "
                            "--lr, or train with a smaller batch)")
    if y.size == 0:
        return {"auc": float("nan"), "logloss": float("nan"), "rows": 0}
    auc = roc_auc(y, p) if 0 < y.sum() < y.size else float("nan")
    return {"auc": float(auc), **calibration(y, p), "rows": int(y.size)}


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself when wrapped in DistributedDataParallel."""
    return getattr(model, "module", model)


def embedding_penalty(model: nn.Module, cat: torch.Tensor | None = None) -> torch.Tensor | None:
    """‖E‖² of the model's embedding table, or with ``cat`` (a batch's ids) of the rows the
    batch looks up, each once (None when the model has no table)."""
    emb = getattr(_unwrap(model), "embedding", None)
    if emb is None:
        return None
    if cat is None:
        return emb.table.weight.pow(2).sum()
    return emb.table(torch.unique(cat + emb.offsets)).pow(2).sum()


@dataclass
class Optimisers:
    """What one training step updates: Adam on the dense parameters (and on the embedding table
    unless it is sparse), row-wise Adagrad on a sparse table; the fp16 gradient scaler."""

    adam: torch.optim.Optimizer
    table: RowWiseAdagrad | None = None
    scaler: Any = None

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.adam] if self.table is None else [self.adam, self.table]


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer | Optimisers,
    cat: torch.Tensor,
    dense: torch.Tensor,
    labels: torch.Tensor,
    grad_clip_norm: float,
    embedding_l2: float = 0.0,
    amp: torch.dtype | None = None,
    dist: Dist | None = None,
) -> torch.Tensor:
    """One optimiser step on a batch (BCE + embedding_l2/2·penalty); returns the (detached)
    mean BCE loss. The penalty is the whole table's ‖E‖² (FuxiCTR's embedding regulariser) when
    the table is dense, the batch rows' when it is sparse (a whole-table term would make every
    row's gradient dense)."""
    opts = opt if isinstance(opt, Optimisers) else Optimisers(opt)
    sparse = opts.table is not None
    with torch.autocast(cat.device.type, dtype=amp, enabled=amp is not None):
        bce = F.binary_cross_entropy_with_logits(model(cat, dense).float(), labels)
    loss = bce
    if embedding_l2 > 0:
        penalty = embedding_penalty(model, cat if sparse else None)
        if penalty is not None:
            loss = bce + 0.5 * embedding_l2 * penalty
    for o in opts.all:
        o.zero_grad(set_to_none=True)
    (opts.scaler.scale(loss) if opts.scaler is not None else loss).backward()
    if sparse and dist is not None and dist.world > 1:
        table = _unwrap(model).embedding.table.weight
        grad = table.grad if table.grad is not None else torch.sparse_coo_tensor(
            torch.zeros((1, 0), dtype=torch.long, device=table.device),
            torch.zeros((0, table.shape[1]), dtype=table.dtype, device=table.device),
            table.shape)
        table.grad = dist.average_sparse(grad)  # on every rank: it is a collective
    if opts.scaler is not None:
        for o in opts.all:
            opts.scaler.unscale_(o)
    if grad_clip_norm > 0:
        if sparse:
            clip_grad_norm(model.parameters(), grad_clip_norm)
        else:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    if opts.scaler is not None:
        for o in opts.all:
            opts.scaler.step(o)
        opts.scaler.update()
    else:
        for o in opts.all:
            o.step()
    return bce.detach()


def make_optimisers(model: nn.Module, cfg: TrainConfig, amp: torch.dtype | None) -> Optimisers:
    """Adam (+ row-wise Adagrad on a sparse table, ``cfg.embedding_optimizer``) and, for fp16
    autocast, a gradient scaler. Marks the table sparse when it gets row-wise Adagrad."""
    emb = getattr(_unwrap(model), "embedding", None)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    if cfg.embedding_optimizer == "adam" or emb is None:
        return Optimisers(torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay), scaler=scaler)
    emb.table.sparse = True
    dense = [p for p in model.parameters() if p is not emb.table.weight]
    return Optimisers(torch.optim.Adam(dense, lr=cfg.lr, weight_decay=cfg.weight_decay),
                      RowWiseAdagrad([emb.table.weight], lr=cfg.embedding_lr), scaler)


def _monitor(m: dict[str, float]) -> float:
    """The number early stopping maximises: valid AUC, or -logloss if AUC is undefined."""
    return m["auc"] if math.isfinite(m["auc"]) else -m["logloss"]


def fit(
    model: nn.Module, data: PreparedData, cfg: TrainConfig, log: Log = _stderr,
    embedding_l2: float = 0.0,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    dist: Dist | None = None,
) -> list[dict[str, Any]]:
    """Train in place on ``cfg.device``; on return the model (left on that device) holds the
    weights of the best valid epoch.

    ``embedding_l2``: the model config's regulariser strength. ``on_epoch`` is called with each
    epoch's history row (valid AUC and logloss included); an exception it raises ends training
    and propagates (``mldcn tune`` prunes a trial so). ``dist``: this process's place in a
    data-parallel job (:mod:`model.distributed`; the group must be initialised)."""
    from tqdm import tqdm

    d = dist or Dist()
    device = resolve_device(cfg.device, d.local_rank)
    amp = amp_dtype(device, cfg.amp)
    model.to(device)
    opts = make_optimisers(model, cfg, amp)
    net = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if opts.table is not None:  # its sparse gradient is averaged by train_step
            DDP._set_params_and_buffers_to_ignore_for_model(model, ["embedding.table.weight"])
            d.broadcast_tensor(_unwrap(model).embedding.table.weight.data)  # DDP skips it
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(cfg.seed + d.rank)  # each rank its own dropout masks
    rng = np.random.default_rng(cfg.seed)
    scheds = [torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, mode="max", factor=cfg.lr_factor, patience=cfg.lr_patience, min_lr=cfg.min_lr)
        for o in opts.all]
    train_rows = data.rows("train")
    steps = sum(math.ceil(s.rows / cfg.batch_size) for s in data.shards["train"])
    batch_norm = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
    best, best_state, bad, history = -math.inf, None, 0, []
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        t0 = time.perf_counter()
        seen, loss_sum = 0, 0.0
        bar = tqdm(total=steps, desc=f"epoch {epoch}", unit="batch", leave=False,
                   disable=True if not d.main else (
                       (not cfg.progress) if cfg.progress is not None else None),
                   file=sys.stderr)
        # batch statistics of one row do not exist: such batches are skipped with batch norm
        for cat, dense, y in iter_batches(data.shards["train"], cfg.batch_size, True, rng,
                                          share=(d.rank, d.world),
                                          min_rows=2 if batch_norm else 1):
            loss = train_step(net, opts, *to_tensors(cat, dense, y, device), cfg.grad_clip_norm,
                              embedding_l2, amp, d)
            seen += len(y)
            loss_sum += float(loss) * len(y)
            bar.update(1)
            if bar.n % 20 == 0:
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", ex_s=f"{rate:,.0f}")
        bar.close()
        train_s = time.perf_counter() - t0
        seen_all, loss_all = d.total(seen), d.total(loss_sum)
        valid = evaluate(model, data.shards["valid"], cfg.eval_batch_size, d, amp)
        lr = opts.adam.param_groups[0]["lr"]
        row = {
            "epoch": epoch,
            "train_loss": loss_all / max(seen_all, 1),
            "train_examples_per_s": seen_all / max(train_s, 1e-9),
            "train_s": train_s,
            "valid_auc": valid["auc"],
            "valid_logloss": valid["logloss"],
            "lr": lr,
        }
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
        log(
            f"epoch {epoch}: train_loss {row['train_loss']:.4f}  valid_auc {valid['auc']:.4f}  "
            f"valid_logloss {valid['logloss']:.4f}  {row['train_examples_per_s']:,.0f} ex/s  "
            f"lr {lr:.1e}  ({train_rows:,} train rows)"
        )
        score = _monitor(valid)
        for sched in scheds:
            sched.step(score)
        if score > best + 1e-6:
            best, bad = score, 0
            best_state = _keep(model, best_state)
        else:
            bad += 1
            if bad >= cfg.early_stop_patience:
                log(f"early stop: no valid improvement for {bad} epochs")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    emb = getattr(model, "embedding", None)
    if emb is not None:
        emb.table.sparse = False  # a plain table again for export and inference
    return history


def check_out(out: Path, overwrite: bool) -> None:
    """FileExistsError if the run folder ``out`` holds files and ``overwrite`` is off."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"run folder {out} exists and is not empty (use --overwrite)")


def _keep(model: nn.Module, kept: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """A copy of the model's state (the best epoch's), written over ``kept`` in place: one copy
    of a large table is held, never two."""
    state = model.state_dict()
    if kept is None:
        return copy.deepcopy(state)
    for k, v in state.items():
        kept[k].copy_(v)
    return kept


def train_run(
    source: Any,
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    split: SplitSpec,
    out_dir: str | Path,
    overwrite: bool = False,
    chunk_rows: int = 65536,
    shard_rows: int = 262144,
    log: Log = _stderr,
    valid_source: Any = None,
    test_source: Any = None,
) -> dict[str, Any]:
    """Prepare data, train, test and write the run folder. Returns the metrics dict.

    ``valid_source`` / ``test_source``: pre-split validation / test files
    (:func:`model.dataset.prepare_sources`). Under torchrun (:mod:`model.distributed`) every
    rank calls this: rank 0 prepares the data and writes the folder, all ranks train."""
    out = Path(out_dir)
    check_out(out, overwrite)
    d = from_env()
    device = resolve_device(train_cfg.device, d.local_rank)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    torch.manual_seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    init_group(d, device)
    if not d.main:
        log = _quiet
    previous_sigterm = None
    if d.world > 1 and threading.current_thread() is threading.main_thread():
        # torchrun stops the other ranks with SIGTERM when one fails: exit through the
        # except clause below, so rank 0 removes its staging folder
        previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    data: PreparedData | None = None
    trained = False  # every rank is past the last collective (then all leave together)
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        if d.main:
            data = prepare_sources(source, split, tmp / "cache", valid_source, test_source,
                                   chunk_rows=chunk_rows, shard_rows=shard_rows)
        tmp, data = d.broadcast((tmp, data))
        assert data is not None
        prep_s = time.perf_counter() - t0
        log(
            f"data: {data.rows('train'):,} train / {data.rows('valid'):,} valid / "
            f"{data.rows('test'):,} test rows, encoded in {prep_s:.1f}s; "
            f"cardinalities {data.encoders.cardinalities}, {data.encoders.num_dense} dense"
        )
        if data.rows("valid") == 0:
            raise InputError(
                "the validation split is empty: use more rows, a larger --valid-frac or "
                "--valid-data"
            )
        cards, num_dense = data.encoders.cardinalities, data.encoders.num_dense
        model = build_model(model_cfg, cards, num_dense)
        flops = model_flops(model_cfg, cards, num_dense)
        log(f"model: {model_cfg.arch}, {flops.total / 1e6:.3f} MFLOPs/example, "
            f"{flops.params:,} parameters")

        t1 = time.perf_counter()
        history = fit(model, data, train_cfg, log, embedding_l2=model_cfg.embedding_l2,
                      dist=d)
        train_s = time.perf_counter() - t1
        calibrated = calibrate(model, data, train_cfg, log, d)
        amp = amp_dtype(device, train_cfg.amp)
        valid = evaluate(model, data.shards["valid"], train_cfg.eval_batch_size, d, amp)
        test = evaluate(model, data.shards["test"], train_cfg.eval_batch_size, d, amp)
        trained = True
        log(f"best: valid_auc {valid['auc']:.4f}  test_auc {test['auc']:.4f}  "
            f"test_logloss {test['logloss']:.4f}  test pred/obs CTR "
            f"{test.get('pred_obs_ratio', float('nan')):.3f}  test ECE "
            f"{test.get('ece', float('nan')):.4f}")

        metrics = {
            "arch": model_cfg.arch,
            "valid": valid,
            "test": test,
            "calibration": calibrated,
            "flops_per_example": flops.total,
            "matmul_flops_per_example": flops.matmul,
            "params": flops.params,
            "train_examples_per_s": float(
                np.median([h["train_examples_per_s"] for h in history])
            ),
            "epochs_run": len(history),
            "best_epoch": 1 + int(np.argmax([_monitor(
                {"auc": h["valid_auc"], "logloss": h["valid_logloss"]}) for h in history])),
            "history": history,
            "data": {
                "format": getattr(source, "fmt", None),
                "files": file_info(getattr(source, "paths", [])),
                "valid_files": file_info(getattr(valid_source, "paths", [])),
                "test_files": file_info(getattr(test_source, "paths", [])),
                "splits": data.stats,
                "prepare_s": prep_s,
            },
            "train_s": train_s,
            "device": str(device),
            "amp": str(amp).removeprefix("torch.") if amp is not None else "off",
            "world_size": d.world,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
        }
        if not d.main:
            return metrics
        model.cpu()
        write_samples(tmp / "samples", source, data)
        torch.save(model.state_dict(), tmp / "checkpoint.pt")
        (tmp / "model_config.json").write_text(json.dumps(
            {"model": model_cfg.to_dict(), "cardinalities": cards, "num_dense": num_dense},
            indent=2) + "\n")
        data.encoders.save(tmp / "encoders.json")
        (tmp / "train_config.json").write_text(json.dumps(
            {"train": asdict(train_cfg), "split": asdict(effective_split(
                split, valid_source is not None, test_source is not None))},
            indent=2) + "\n")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        data.cleanup()
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out)
    except BaseException:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        shutdown_group(d, together=trained)
    log(f"wrote {out}")
    return metrics


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0."""


def calibrate(model: nn.Module, data: PreparedData, cfg: TrainConfig,
              log: Log = _stderr, dist: Dist | None = None) -> dict[str, Any]:
    """Apply ``cfg.calibrate`` to the trained model (in place) and say what it did.

    ``"temperature"``: fit T on the validation logits (:func:`fit_temperature`) and fold 1/T
    into the model's last layer (``scale_logits``); returns the method, T and the validation
    log loss and ECE before and after. ``"none"``: ``{"method": "none", "temperature": 1.0}``.
    """
    if cfg.calibrate == "none":
        return {"method": "none", "temperature": 1.0}
    y, z = predict(model, data.shards["valid"], cfg.eval_batch_size, logits=True, dist=dist)
    before = calibration(y, torch.sigmoid(torch.from_numpy(z)).numpy())
    temperature = fit_temperature(z, y)
    model.scale_logits(1.0 / temperature)
    after = evaluate(model, data.shards["valid"], cfg.eval_batch_size, dist)
    log(f"temperature scaling: T = {temperature:.4f}, valid logloss {before['logloss']:.4f} -> "
        f"{after['logloss']:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}")
    keys = ("logloss", "pred_obs_ratio", "ece")
    return {"method": "temperature", "temperature": temperature,
            "valid_before": {k: before[k] for k in keys},
            "valid_after": {k: after[k] for k in keys}}


def write_samples(
    folder: Path, source: Any, data: PreparedData, raw_rows: int = 512, valid_rows: int = 65536
) -> None:
    """Keep real rows with the run, so export can check parity without the original files.

    ``raw_rows.json``: the first ``raw_rows`` rows of the input as raw values (column lists,
    missing values as null) plus labels. ``valid.npz``: up to ``valid_rows`` encoded rows of the
    validation split (cat_ids, dense, labels), for parity and fp16 AUC checks.
    """
    folder.mkdir(parents=True, exist_ok=True)
    chunk = next(iter(source.iter_chunks(raw_rows)), None)
    if chunk is not None:
        cols: dict[str, list[Any]] = {}
        for name in [*data.encoders.schema.names, data.encoders.schema.label]:
            values = np.asarray(chunk[name])
            if values.dtype.kind == "f":
                cols[name] = [None if math.isnan(v) else v for v in values.tolist()]
            else:
                cols[name] = values.tolist()
        (folder / "raw_rows.json").write_text(json.dumps(cols) + "\n")
    parts, n = [], 0
    for cat, dense, y in iter_batches(data.shards["valid"], valid_rows):
        parts.append((cat, dense, y))
        n += len(y)
        if n >= valid_rows:
            break
    if parts:
        np.savez(
            folder / "valid.npz",
            cat_ids=np.concatenate([p[0] for p in parts])[:valid_rows],
            dense=np.concatenate([p[1] for p in parts])[:valid_rows],
            labels=np.concatenate([p[2] for p in parts])[:valid_rows],
        )


RUN_FILES: tuple[str, ...] = ("checkpoint.pt", "model_config.json", "encoders.json",
                              "metrics.json")


class RunFolderError(InputError):
    """A run folder that cannot be loaded; the message names the file at fault."""


def load_run(run_dir: str | Path) -> tuple[nn.Module, ModelConfig, Any, dict[str, Any]]:
    """Rebuild (model with best weights, in eval mode; config, encoders, metrics) from a run
    folder, checking every file: FileNotFoundError (no folder, a missing file) or
    RunFolderError naming the file (one that does not parse, encoders that disagree with
    model_config.json, a checkpoint that does not fit its architecture)."""
    import pickle

    from model.encoders import FeatureEncoders
    from model.schema import SchemaError

    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    for name in RUN_FILES:
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run} is not a complete run folder: {name} is missing")
    mc_path, enc_path = run / "model_config.json", run / "encoders.json"
    mc = read_json(mc_path, RunFolderError)
    if not isinstance(mc, dict) or not {"model", "cardinalities", "num_dense"} <= set(mc):
        raise RunFolderError(f"{mc_path}: expected keys model, cardinalities and num_dense")
    try:
        cfg = ModelConfig.from_dict(mc["model"])
    except (ValueError, TypeError) as e:
        raise RunFolderError(f"{mc_path}: {one_line(e)}") from None
    try:
        encoders = FeatureEncoders.load(enc_path)
    except SchemaError as e:
        raise RunFolderError(f"{enc_path}: {one_line(e)}") from None
    if encoders.cardinalities != mc["cardinalities"] or encoders.num_dense != mc["num_dense"]:
        raise RunFolderError(
            f"{enc_path} does not match {mc_path}: the encoders give cardinalities "
            f"{encoders.cardinalities} and {encoders.num_dense} dense features, model_config "
            f"says {mc['cardinalities']} and {mc['num_dense']}")
    metrics = read_json(run / "metrics.json", RunFolderError)
    if not isinstance(metrics, dict):
        raise RunFolderError(f"{run / 'metrics.json'}: expected a JSON object")
    try:
        model = build_model(cfg, mc["cardinalities"], mc["num_dense"])
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError,
            pickle.UnpicklingError) as e:
        raise RunFolderError(
            f"{run / 'checkpoint.pt'}: cannot load it into the model that model_config.json "
            f"describes: {one_line(e, 240)}") from None
    model.eval()
    return model, cfg, encoders, metrics

"""``mldcn tune``: hyper-parameter search with Optuna on validation AUC only.

For each architecture asked for, one Optuna study (TPE sampler, median pruner) searches the
training recipe of the architecture's matched-FLOPs preset at one level: the settings that do
not change the FLOPs (:data:`SEARCH_SPACE`: learning rate, batch size, tower dropout, batch
norm, the embedding regulariser), so a tuned model is still compared at matched cost.
``--space wide`` adds the embedding init scale and each architecture's own settings
(``model.archs`` ``search``: DCNv2's ``dcn_type`` and experts, ML-DCN's mask position, source
and activation), for which the preset re-solves the width, so FLOPs stay matched. Every
trial trains one model (seed ``--seed``) on the same prepared data and reports its validation
AUC after each epoch; a trial whose AUC falls below the median of earlier trials at the same
epoch is pruned (``MedianPruner``: not before ``PRUNE_STARTUP`` trials have finished, nor in
the first epoch); so is a trial whose settings have no matched-FLOPs preset on this layout or
whose training diverges (an ``InputError``: the reason is logged). A trial that is not pruned
trains ``--seeds-per-trial`` seeds in all, and its value is the mean of their best validation
AUCs: one seed's luck (±0.001 AUC on these datasets) is as large as most of the differences a
search finds, so a one-seed winner is often noise.
Test rows are never read. The first trial of a new study is the recipe the search starts from
(the preset's model settings, ``--lr`` and ``--batch-size``), so the best trial is never worse on
validation than the default.

The studies live in ``OUT/optuna.db`` (SQLite), one per ``ARCH-LEVEL``, so a run that stops
resumes: a re-run counts the trials already finished (complete or pruned) and runs only the
rest of ``--trials`` (none once the budget is spent); a trial that was running when the
process died is marked failed by Optuna's heartbeat and does not count. ``--timeout-s`` bounds
each architecture's search time, summed over runs. A resume on other data, split or settings
is refused. Every architecture gets the same budget (``--trials`` and
``--timeout-s`` apply to each), so studies that compare architectures compare equal effort.

``--confirm-seeds K`` (K >= 2; 0, the default, is off) adds a no-regret check after the search:
the best trial's settings and the default recipe each train K fresh seeds (``seed`` + 1000 + k,
never a search seed), paired, on validation AUC; the best is written only if the 95% t-interval
of the mean paired gain lies above 0, else the default recipe is, and the config records the
numbers under ``confirmation``. (On MovieLens-100K and the Criteo set, recipe-space winners
gained up to 0.001 validation AUC over the default and lost up to 0.0027 test AUC; with
``--space wide`` and the check, a tuned ML-DCN gained 0.0004 test AUC on Criteo:
docs/quality/recipe/ and docs/quality/recipe/wide/.)

Outputs, per architecture: ``OUT/ARCH-LEVEL.json``, a config file (``model.overrides``) with
the best trial's settings, which ``mldcn train --config`` and ``mldcn bench quality --config``
apply; and ``OUT/summary.json``: every study's best value, its settings and trial counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.config import ARCHS
from model.errors import InputError
from model.overrides import Overrides
from model.presets import LEVELS

Log = Callable[[str], None]

# name: (kind, low/choices, high, log scale, where it goes: "model" or "train")
SEARCH_SPACE: dict[str, tuple[str, Any, Any, bool, str]] = {
    "lr": ("float", 1e-4, 1e-2, True, "train"),
    "batch_size": ("categorical", (512, 1024, 2048, 4096), None, False, "train"),
    "dropout": ("float", 0.0, 0.5, False, "model"),
    "batch_norm": ("categorical", (False, True), None, False, "model"),
    "embedding_l2": ("float", 1e-7, 1e-1, True, "model"),
}
# what --space wide adds to SEARCH_SPACE (besides the architecture's own keys)
WIDE_SPACE: dict[str, tuple[str, Any, Any, bool, str]] = {
    "embed_init_std": ("float", 1e-5, 1e-1, True, "model"),
}
SPACES = ("recipe", "wide")
PRUNE_STARTUP = 5  # finished trials before pruning starts
HEARTBEAT_S = 30


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def space(kind: str) -> dict[str, tuple[str, Any, Any, bool, str]]:
    """The shared search space of ``--space KIND`` (the architecture's own keys come on top)."""
    if kind not in SPACES:
        raise InputError(f"--space must be one of {SPACES}, got {kind!r}")
    return {**SEARCH_SPACE, **(WIDE_SPACE if kind == "wide" else {})}


def _arch_keys(arch: str, kind: str) -> tuple[Any, ...]:
    from model.archs import architecture

    return architecture(arch).search if kind == "wide" else ()


def suggest(trial: Any, arch: str = "mldcn", kind: str = "recipe") -> Overrides:
    """The trial's settings, drawn from :func:`space` and the architecture's own keys, as
    overrides."""
    parts: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for name, (k, low, high, log, where) in space(kind).items():
        if k == "float":
            value = trial.suggest_float(name, low, high, log=log)
        else:
            value = trial.suggest_categorical(name, list(low))
        parts[where][name] = value
    for key in _arch_keys(arch, kind):
        if key.active(parts["model"].get):
            parts["model"][key.name] = trial.suggest_categorical(key.name, list(key.choices))
    return Overrides(None, parts["model"], parts["train"])


def start_params(arch: str, level: str, cards: Sequence[int], num_dense: int,
                 train_kw: dict[str, Any], kind: str = "recipe") -> dict[str, Any]:
    """The search's first trial: the default recipe's value of every searched key."""
    from model.presets import preset
    from model.train import TrainConfig

    cfg, t = preset(arch, level, cards, num_dense), TrainConfig(**train_kw)
    values: dict[str, Any] = {}
    for name, (k, low, high, _, _) in space(kind).items():
        value_in = t.lr if name == "lr" else t.batch_size if name == "batch_size" else (
            getattr(cfg, name))
        inside = (low <= value_in <= high) if k == "float" else value_in in low
        if not inside:
            raise InputError(f"the default {name} = {value_in!r} is outside the search space")
        values[name] = value_in
    for key in _arch_keys(arch, kind):
        if key.active(lambda name: getattr(cfg, name)):
            value_in = getattr(cfg, key.name)
            if value_in not in key.choices:
                raise InputError(f"the default {key.name} = {value_in!r} is outside the "
                                 "search space")
            values[key.name] = value_in
    return values


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def tune_arch(data: Any, arch: str, level: str, storage: Any, trials: int,
              timeout_s: float | None, seed: int, train_kw: dict[str, Any],
              log: Log = _stderr, seeds_per_trial: int = 1,
              identity: dict[str, Any] | None = None, kind: str = "recipe") -> Any:
    """Run (or resume) the study ``ARCH-LEVEL`` up to ``trials`` finished trials, within
    ``timeout_s`` of search time over all its runs. A study made on other data or settings
    (``identity``) is refused (ValueError)."""
    import numpy as np
    import optuna
    from optuna.trial import TrialState

    cards, num_dense = data.encoders.cardinalities, data.encoders.num_dense

    study = optuna.create_study(
        study_name=f"{arch}-{level}", storage=storage, direction="maximize",
        load_if_exists=True, sampler=optuna.samplers.TPESampler(seed=seed),
        # reports are 1-based epochs: warm-up 2 spares the first epoch
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP, n_warmup_steps=2))
    identity = json.loads(json.dumps(identity or {}))
    existing = study.get_trials(deepcopy=False)
    if existing:
        if study.user_attrs.get("identity") != identity:
            raise InputError(f"{arch}-{level}: the study in this folder was made on other data "
                             "or settings; use another --out")
        # a resumed sampler must not replay the first run's random start-up draws
        study.sampler = optuna.samplers.TPESampler(seed=seed + len(existing))
    else:
        study.set_user_attr("identity", identity)
    start = start_params(arch, level, cards, num_dense, train_kw, kind)
    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    if not any((t.params or t.system_attrs.get("fixed_params")) == start
               for t in existing if t.state in alive):  # the default recipe is always tried
        study.enqueue_trial(start)
    done = _finished(study)
    left = max(0, trials - done)
    spent_s = float(study.user_attrs.get("search_s", 0.0))
    budget_s = None if timeout_s is None else timeout_s - spent_s
    log(f"{arch}-{level}: {done} trials finished, {left} to run"
        + ("" if budget_s is None else f", {max(budget_s, 0):.0f} s of search time left"))
    if left == 0 or (budget_s is not None and budget_s <= 0):
        return study

    def report(row: dict[str, Any], trial: Any) -> None:
        trial.report(row["valid_auc"], row["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned()

    def objective(trial: Any) -> float:
        o = suggest(trial, arch, kind)
        bests, epochs = [], []
        t0 = time.perf_counter()
        try:
            for k in range(seeds_per_trial):  # pruning watches the first seed's curve
                best, n = train_once(data, arch, level, o, train_kw, seed + k,
                                     (lambda row: report(row, trial)) if k == 0 else None)
                bests.append(best)
                epochs.append(n)
        except InputError as e:  # no matched-FLOPs preset for these settings, or diverged
            log(f"  trial {trial.number}: pruned, {e}")
            trial.set_user_attr("pruned_because", str(e))
            raise optuna.TrialPruned(str(e)) from None
        finally:
            trial.set_user_attr("train_s", time.perf_counter() - t0)
        value = float(np.mean(bests))
        trial.set_user_attr("epochs_run", epochs)
        trial.set_user_attr("seed_values", bests)
        log(f"  trial {trial.number}: valid AUC {value:.5f} (seeds {bests}, epochs {epochs}) "
            f"{json.dumps(trial.params)}")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    try:
        study.optimize(objective, n_trials=left, timeout=budget_s, gc_after_trial=True)
    finally:
        study.set_user_attr("search_s", spent_s + time.perf_counter() - t0)
    return study


def best_overrides(study: Any, arch: str, level: str) -> dict[str, Any]:
    """The config file of the study's best trial (model.overrides format plus a record)."""
    from optuna.trial import TrialState

    best = study.best_trial
    o = _params_overrides(best.params)
    parts = {"model": o.model, "train": o.train}
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return {
        "arch": arch, **parts, "level": level, "valid_auc": best.value,
        "trial": best.number,
        "trials": {"complete": states.count(TrialState.COMPLETE),
                   "pruned": states.count(TrialState.PRUNED),
                   "failed": states.count(TrialState.FAIL)},
    }


CONFIRM_SEED_OFFSET = 1000  # confirmation seeds: seed + 1000 + k, never a search seed


def _params_overrides(params: dict[str, Any]) -> Overrides:
    parts: dict[str, dict[str, Any]] = {"model": {}, "train": {}}
    for name, value in params.items():  # an architecture's own keys are model settings
        parts[space("wide").get(name, (None, None, None, None, "model"))[4]][name] = value
    return Overrides(None, parts["model"], parts["train"])


def train_once(data: Any, arch: str, level: str, o: Overrides, train_kw: dict[str, Any],
               seed: int, on_epoch: Callable[[dict[str, Any]], None] | None = None
               ) -> tuple[float, int]:
    """Train the preset with overrides ``o`` on seed ``seed``: its best valid AUC (-inf when
    never finite) and the epochs run. ``on_epoch`` as in ``model.train.fit``."""
    import numpy as np
    import torch

    from model.ctr import build_model
    from model.presets import preset
    from model.train import TrainConfig, fit

    cards, num_dense = data.encoders.cardinalities, data.encoders.num_dense
    cfg = preset(arch, level, cards, num_dense, **o.model)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_model(cfg, cards, num_dense)
    history = fit(model, data, TrainConfig(**{**train_kw, **o.train}, seed=seed, progress=False),
                  log=lambda m: None, embedding_l2=cfg.embedding_l2, on_epoch=on_epoch)
    aucs = [h["valid_auc"] for h in history if math.isfinite(h["valid_auc"])]
    return (max(aucs) if aucs else -math.inf), len(history)


def confirm(data: Any, arch: str, level: str, best: dict[str, Any], default: dict[str, Any],
            seeds: int, seed: int, train_kw: dict[str, Any]) -> dict[str, Any]:
    """The no-regret check: the best trial's settings and the default recipe trained on
    ``seeds`` fresh seeds each (paired), valid AUC only. The best is kept only if the mean
    paired gain's 95% t-interval lies above 0; else the default is (a search's winner on a few
    seeds is often noise that does not carry over to test rows). A run that diverges (an
    InputError) counts as null: the best is then never kept if it diverged, and kept if only
    the default did."""
    from model.files import json_safe
    from model.stats import mean_ci

    values: dict[str, list[float | None]] = {"best": [], "default": []}
    for k in range(seeds):
        for name, params in (("best", best), ("default", default)):
            try:
                auc: float | None = train_once(data, arch, level, _params_overrides(params),
                                               train_kw, seed + CONFIRM_SEED_OFFSET + k)[0]
            except InputError:
                auc = None
            values[name].append(auc)
    gains = [b - d for b, d in zip(values["best"], values["default"], strict=True)
             if b is not None and d is not None]
    stats = mean_ci(gains) if gains else {"mean": float("nan"), "half_width": float("nan")}
    mean, half = stats["mean"], stats["half_width"]
    if None in values["best"]:
        kept = "default"
    elif None in values["default"]:
        kept = "best"
    else:
        kept = "best" if mean - half > 0 else "default"
    return json_safe({"seeds": [seed + CONFIRM_SEED_OFFSET + k for k in range(seeds)],
                      "best_valid_auc": values["best"], "default_valid_auc": values["default"],
                      "mean_gain": mean, "ci95": [mean - half, mean + half], "kept": kept})


def run_tune(source: Any, split: Any, out_dir: str | Path, archs: Sequence[str], level: str,
             trials: int, timeout_s: float | None, seed: int, train_kw: dict[str, Any],
             valid_source: Any = None, threads: int | None = None,
             log: Log = _stderr, seeds_per_trial: int = 1,
             confirm_seeds: int = 0, kind: str = "recipe") -> dict[str, Any]:
    """Tune every arch in ``archs`` at ``level`` with the same budget; write the configs."""
    import shutil

    import optuna
    import torch

    from model.dataset import prepare_sources

    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise InputError(f"unknown architectures {bad}; choose from {ARCHS}")
    if level not in LEVELS:
        raise InputError(f"unknown level {level!r}; choose from {LEVELS}")
    if trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    if seeds_per_trial < 1:
        raise InputError(f"--seeds-per-trial must be >= 1, got {seeds_per_trial}")
    if confirm_seeds == 1 or confirm_seeds < 0:
        raise InputError(f"--confirm-seeds must be 0 (off) or >= 2, got {confirm_seeds}")
    if threads:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 4 and 5
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'optuna.db').resolve()}",
                                             heartbeat_interval=HEARTBEAT_S)
    cache = out / f".prepared-{os.getpid()}"
    summary: dict[str, Any] = {"level": level, "trials": trials, "timeout_s": timeout_s,
                               "seed": seed, "seeds_per_trial": seeds_per_trial,
                               "confirm_seeds": confirm_seeds,
                               "train": train_kw,
                               "search_space": {k: list(v[:4]) for k, v in
                                                space(kind).items()},
                               "archs": {}}
    from dataclasses import asdict

    from model.files import sha256_file

    identity = {"files": [sha256_file(p) for p in source.paths],
                "valid_files": [sha256_file(p) for p in (valid_source.paths if valid_source
                                                         else [])],
                "split": asdict(split), "train": train_kw, "seed": seed,
                "seeds_per_trial": seeds_per_trial, "search_space": summary["search_space"]}
    if kind != "recipe":  # (recipe studies made before --space existed keep their identity)
        arch_space = {a: [[k.name, list(k.choices), k.when] for k in _arch_keys(a, kind)]
                      for a in archs}
        summary.update(space=kind, arch_space=arch_space)
        identity.update(space=kind, arch_space=arch_space)
    try:
        data = prepare_sources(source, split, cache, valid_source, None)
        log(f"data: {data.rows('train'):,} train / {data.rows('valid'):,} valid rows")
        for arch in archs:
            study = tune_arch(data, arch, level, storage, trials, timeout_s, seed, train_kw, log,
                              seeds_per_trial, identity, kind)
            from optuna.trial import TrialState

            if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                raise InputError(f"{arch}: no trial completed (all pruned or failed)")
            best = best_overrides(study, arch, level)
            if confirm_seeds:
                default = start_params(arch, level, data.encoders.cardinalities,
                                       data.encoders.num_dense, train_kw, kind)
                check = confirm(data, arch, level, study.best_trial.params, default,
                                confirm_seeds, seed, train_kw)
                low, high = (float("nan") if v is None else v for v in check["ci95"])
                gain = float("nan") if check["mean_gain"] is None else check["mean_gain"]
                diverged = [n for n in ("best", "default")
                            if None in check[f"{n}_valid_auc"]]
                log(f"{arch}-{level}: confirmation on {confirm_seeds} fresh seeds: best - default "
                    f"{gain:+.5f} [{low:+.5f}, {high:+.5f}]"
                    + (f" ({' and '.join(diverged)} diverged on a seed)" if diverged else "")
                    + f" -> keep the {check['kept']}")
                if check["kept"] == "default":
                    o = _params_overrides(default)
                    best = {**best, "model": o.model, "train": o.train}
                best["confirmation"] = check
            path = out / f"{arch}-{level}.json"
            path.write_text(json.dumps(best, indent=2) + "\n")
            summary["archs"][arch] = {**best, "config": str(path)}
            kept = best.get("confirmation", {}).get("kept", "best")
            log(f"{arch}-{level}: best valid AUC {best['valid_auc']:.5f} "
                f"(trial {best['trial']}); wrote the {kept} settings -> {path}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(args: argparse.Namespace) -> dict[str, Any]:
    """``mldcn tune`` (see the module docstring)."""
    from model.readers import open_source
    from model.split import SplitSpec

    for path in [*args.data, *(args.valid_data or [])]:
        if not Path(path).exists():
            raise InputError(f"data file not found: {path}")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise InputError("mldcn tune needs Optuna: pip install 'mldcn[tune]'") from None
    source = open_source(args.data, fmt=args.format, schema=args.schema)
    valid_source = (open_source(args.valid_data, fmt=args.format, schema=source.schema)
                    if args.valid_data else None)
    time_column = args.time_column or source.schema.time_column
    split = SplitSpec(kind=args.split, valid_frac=args.valid_frac, test_frac=args.test_frac,
                      seed=args.split_seed,
                      time_column=time_column if args.split == "time" else None)
    train_kw = {"epochs": args.epochs, "early_stop_patience": args.patience}
    for key in ("lr", "batch_size"):
        if getattr(args, key) is not None:
            train_kw[key] = getattr(args, key)
    from model.cliargs import comma_list

    archs = comma_list(args.archs)
    return run_tune(source, split, args.out, archs, args.level, args.trials, args.timeout_s,
                    args.seed, train_kw, valid_source=valid_source, threads=args.threads,
                    seeds_per_trial=args.seeds_per_trial, confirm_seeds=args.confirm_seeds,
                    kind=args.space)

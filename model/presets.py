"""Named presets: ML-DCN, DCNv2, MaskNet, WuKong, RankMixer and an MLP at matched FLOPs.

A level fixes the settings every architecture shares; the reference is full-rank DCNv2 with
them, and each other architecture solves its width so that its total FLOPs per example
(``model.flops``, matmul + element-wise) match the reference's within ``MATCH_TOLERANCE`` (2%).
d = F_cat·e + F_num depends on the data's layout, so a preset is a function of it.

=======  =====  ==  ==========  ===============  =======
level    e      L   structure   mlp_dims         dropout
=======  =====  ==  ==========  ===============  =======
small    8      2   parallel    (64, 32)         0.0
medium   16     3   parallel    (256, 128)       0.1
large    16     4   parallel    (512, 256, 128)  0.1
=======  =====  ==  ==========  ===============  =======

What each architecture solves (L and the deep tower are the level's):

- dcnv2: full rank, the reference (nothing to solve). With ``dcn_type="lowrank"`` or ``"mix"``
  passed as an override, its ``rank`` is solved instead.
- mldcn: ``rank`` r, with ``mask_hidden`` h = round(ρ·r), ρ = ``MLDCN_MASK_RATIO`` = 0.5; default
  mask options (rank space, from LN(x0), linear). Because ML-DCN(r, h) costs about low-rank
  DCNv2 of rank r + h/2, r comes out near 0.37·d. If no integer r is within tolerance (tiny d),
  h moves off ρ·r.
- masknet: serial, ``reduction_ratio`` 0.2 (MODELS.md's example), L blocks; ``block_dim`` solved.
- mlp: embeddings → MLP → head (structure "stacked"); the level's ``mlp_dims`` are scaled by one
  factor (first width solved, the others keep their ratio to it).
- wukong: L WuKong layers, ``fm_rank`` k = 8, n_F = n − ⌊n/2⌋, n_L = ⌊n/2⌋ (``model/modules/
  wukong.py``); ``fmb_hidden`` solved.
- rankmixer: L RankMixer layers, ``token_dim`` D = the smallest multiple of T >= e;
  ``ffn_hidden`` solved. One unit of ``ffn_hidden`` costs L·T·(4D + 2), about 1-3% of the small
  reference, so when the nearest width is more than 1% off, D = 2T, 3T, … (up to 4× the default)
  are tried too and the nearest kept.

For the Criteo layout (26 categorical + 13 dense fields; d = 221 small, 429 medium and large),
every architecture lands within 0.4% of the reference:

=======  ==========  ===========  =================  ==================
level    reference   mldcn r, h   masknet block_dim  mlp mlp_dims
=======  ==========  ===========  =================  ==================
small    0.230 M     82, 41       166                (306, 153)
medium   1.395 M     159, 80      337                (826, 413)
large    2.247 M     159, 80      343                (1039, 520, 260)
=======  ==========  ===========  =================  ==================

``preset_table(cardinalities, num_dense)`` (or ``mldcn presets``) gives the table for any layout.

Overrides: ``preset(..., **overrides)`` takes any ``ModelConfig`` field. The shared keys
(``embed_dim``, ``num_layers``, ``structure``, ``mlp_dims``) change the level, so the reference
too; an architecture's own keys (e.g. ``mask_position``, ``num_experts``) change what is solved
for; overriding the solved key itself (``rank``, ``mask_hidden``, ``block_dim``, ``fmb_hidden``,
``ffn_hidden``) fixes it and skips the matching.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from model.config import ARCHS, ModelConfig, check_layout
from model.flops import model_flops, resolved_token_dim

LEVELS: tuple[str, ...] = ("small", "medium", "large")
MATCH_TOLERANCE = 0.02
MLDCN_MASK_RATIO = 0.5
SHARED_KEYS: tuple[str, ...] = ("embed_dim", "num_layers", "structure", "mlp_dims")

# The recipe's regulariser, chosen on validation AUC (docs/quality/recipe/): 1e-3 and 3e-3 tie
# at the top on both datasets and both architectures, 1e-2 and 1e-1 lose; batch norm in the
# tower lost everywhere, so it stays off.
EMBEDDING_L2 = 1e-3
_LEVEL_SETTINGS: dict[str, dict[str, Any]] = {
    "small": {
        "embed_dim": 8,
        "num_layers": 2,
        "structure": "parallel",
        "mlp_dims": (64, 32),
        "dropout": 0.0,
        "embedding_l2": EMBEDDING_L2,
    },
    "medium": {
        "embed_dim": 16,
        "num_layers": 3,
        "structure": "parallel",
        "mlp_dims": (256, 128),
        "dropout": 0.1,
        "embedding_l2": EMBEDDING_L2,
    },
    "large": {
        "embed_dim": 16,
        "num_layers": 4,
        "structure": "parallel",
        "mlp_dims": (512, 256, 128),
        "dropout": 0.1,
        "embedding_l2": EMBEDDING_L2,
    },
}
_ARCH_SETTINGS: dict[str, dict[str, Any]] = {
    "dcnv2": {"dcn_type": "full"},
    "mldcn": {},
    "masknet": {"masknet_mode": "serial", "reduction_ratio": 0.2},
    "mlp": {"structure": "stacked"},
    "wukong": {"fm_rank": 8},
    "rankmixer": {},
}
_SOLVED: dict[str, str] = {
    "dcnv2": "rank",
    "mldcn": "rank",
    "masknet": "block_dim",
    "mlp": "mlp_dims",
    "wukong": "fmb_hidden",
    "rankmixer": "ffn_hidden",
}


def _half_up(x: float) -> int:
    return int(x + 0.5)


def _check_names(arch: str, level: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; presets exist for {ARCHS}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; valid levels: {LEVELS}")


def reference_config(level: str, **overrides: Any) -> ModelConfig:
    """Full-rank DCNv2 at ``level``; only the shared keys of ``overrides`` apply."""
    _check_names("dcnv2", level)
    settings = {**_LEVEL_SETTINGS[level], "arch": "dcnv2", "dcn_type": "full"}
    settings.update({k: v for k, v in overrides.items() if k in SHARED_KEYS})
    return ModelConfig.from_dict(settings)


def flops_mismatch(
    cfg: ModelConfig, reference: ModelConfig, cardinalities: Sequence[int], num_dense: int
) -> float:
    """Relative difference of total FLOPs per example: total(cfg) / total(reference) − 1.

    Example:
        >>> cards = [100] * 26
        >>> ref = reference_config("small")
        >>> abs(flops_mismatch(preset("mldcn", "small", cards, 13), ref, cards, 13)) < 0.02
        True
    """
    total = model_flops(cfg, cardinalities, num_dense).total
    ref = model_flops(reference, cardinalities, num_dense).total
    return total / ref - 1.0


def _nearest(
    make: Callable[[int], ModelConfig], target: int, cards: list[int], num_dense: int
) -> tuple[ModelConfig, float]:
    """The config ``make(n)``, n >= 1, whose total FLOPs are nearest ``target``.

    Assumes FLOPs are non-decreasing in n (true for every width solved here).
    """

    def total(n: int) -> int:
        return model_flops(make(n), cards, num_dense).total

    hi = 1
    while total(hi) < target and hi < 1 << 24:
        hi *= 2
    lo = max(1, hi // 2)
    while lo < hi:  # smallest n in [lo, hi] with total(n) >= target
        mid = (lo + hi) // 2
        if total(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    best = min({max(1, lo - 1), lo}, key=lambda n: abs(total(n) - target))
    return make(best), total(best) / target - 1.0


def _solve_mldcn(
    base: ModelConfig, target: int, cards: list[int], num_dense: int, fix_hidden: bool
) -> tuple[ModelConfig, float]:
    if fix_hidden:
        return _nearest(lambda r: dataclasses.replace(base, rank=r), target, cards, num_dense)

    def make(r: int, h: int | None = None) -> ModelConfig:
        hidden = max(1, _half_up(MLDCN_MASK_RATIO * r)) if h is None else h
        return dataclasses.replace(base, rank=r, mask_hidden=hidden)

    cfg, mismatch = _nearest(make, target, cards, num_dense)
    if abs(mismatch) <= MATCH_TOLERANCE / 2:
        return cfg, mismatch
    # Tiny d: integer r is too coarse; let h move off ρ·r around the best r.
    best = (abs(mismatch), 0.0, cfg, mismatch)
    for r in range(max(1, cfg.rank - 2), cfg.rank + 3):
        for h in range(1, 2 * r + 2):
            candidate = make(r, h)
            m = model_flops(candidate, cards, num_dense).total / target - 1.0
            key = (abs(m), abs(h - MLDCN_MASK_RATIO * r))
            if key < best[:2]:
                best = (*key, candidate, m)
    return best[2], best[3]


def _solve_rankmixer(
    base: ModelConfig, target: int, cards: list[int], num_dense: int, fix_token_dim: bool
) -> tuple[ModelConfig, float]:
    def solve(b: ModelConfig) -> tuple[ModelConfig, float]:
        return _nearest(lambda h: dataclasses.replace(b, ffn_hidden=h), target, cards, num_dense)

    best = solve(base)
    if fix_token_dim or abs(best[1]) <= MATCH_TOLERANCE / 2:
        return best
    tokens = len(cards) + (1 if num_dense else 0)
    default = resolved_token_dim(base, len(cards), num_dense)
    for dim in range(default + tokens, 4 * default + 1, tokens):
        candidate = solve(dataclasses.replace(base, token_dim=dim))
        if abs(candidate[1]) < abs(best[1]):
            best = candidate
    return best


def _scaled_dims(dims: tuple[int, ...], first: int) -> tuple[int, ...]:
    if not dims:
        return (first,)
    return tuple(max(1, _half_up(first * w / dims[0])) for w in dims)


def preset(
    arch: str, level: str, cardinalities: Sequence[int], num_dense: int, **overrides: Any
) -> ModelConfig:
    """The ``arch`` config at ``level``, its width solved to match the level's reference FLOPs.

    Args:
        arch: one of ``ARCHS``.
        level: one of ``LEVELS``.
        cardinalities: ids per categorical field (only their number matters for FLOPs).
        num_dense: F_num.
        overrides: ``ModelConfig`` fields to set (see the module docstring).

    Raises:
        ValueError: unknown arch, level or override, or no width within ``MATCH_TOLERANCE``.

    Example:
        >>> cfg = preset("mldcn", "small", [1000] * 26, 13)
        >>> cfg.embed_dim, cfg.num_layers, cfg.mlp_dims, cfg.rank, cfg.mask_hidden
        (8, 2, (64, 32), 82, 41)
    """
    _check_names(arch, level)
    cards = check_layout(cardinalities, num_dense)
    reference = reference_config(level, **overrides)
    target = model_flops(reference, cards, num_dense).total
    settings = {**_LEVEL_SETTINGS[level], **_ARCH_SETTINGS[arch], **overrides, "arch": arch}
    base = ModelConfig.from_dict(settings)

    if arch == "dcnv2":
        if base.dcn_type == "full" or "rank" in overrides:
            return base
        solved = _nearest(lambda r: dataclasses.replace(base, rank=r), target, cards, num_dense)
    elif arch == "mldcn":
        if "rank" in overrides:
            return base
        solved = _solve_mldcn(base, target, cards, num_dense, "mask_hidden" in overrides)
    elif arch == "masknet":
        if "block_dim" in overrides:
            return base
        solved = _nearest(
            lambda k: dataclasses.replace(base, block_dim=k), target, cards, num_dense
        )
    elif arch == "wukong":
        if "fmb_hidden" in overrides:
            return base
        solved = _nearest(
            lambda h: dataclasses.replace(base, fmb_hidden=h), target, cards, num_dense
        )
    elif arch == "rankmixer":
        if "ffn_hidden" in overrides:
            return base
        solved = _solve_rankmixer(base, target, cards, num_dense, "token_dim" in overrides)
    else:  # mlp
        dims = base.mlp_dims
        solved = _nearest(
            lambda w: dataclasses.replace(base, mlp_dims=_scaled_dims(dims, w)),
            target,
            cards,
            num_dense,
        )
    cfg, mismatch = solved
    if abs(mismatch) > MATCH_TOLERANCE:
        width = _SOLVED[arch]
        raise ValueError(
            f"cannot match {arch} to the {level} reference ({target:,} FLOPs/example) within "
            f"{MATCH_TOLERANCE:.0%} for this layout: the nearest, {width}="
            f"{getattr(cfg, width)}, is {mismatch:+.1%} off; pass {width} to skip matching"
        )
    return cfg


def key_hyperparameters(cfg: ModelConfig) -> dict[str, Any]:
    """The settings that tell the architectures of one level apart."""
    if cfg.arch == "dcnv2":
        keys = ["dcn_type"] + (["rank"] if cfg.dcn_type != "full" else [])
        keys += ["num_experts"] if cfg.dcn_type == "mix" else []
    elif cfg.arch == "mldcn":
        keys = ["rank", "mask_hidden", "mask_position", "mask_source", "num_experts"]
    elif cfg.arch == "masknet":
        keys = ["masknet_mode", "block_dim", "reduction_ratio"]
    elif cfg.arch == "wukong":
        keys = ["fm_rank", "fmb_hidden"]
    elif cfg.arch == "rankmixer":
        keys = ["token_dim", "ffn_hidden"]
    else:
        keys = ["mlp_dims"]
    return {k: getattr(cfg, k) for k in keys}


def preset_table(
    cardinalities: Sequence[int],
    num_dense: int,
    levels: Sequence[str] = LEVELS,
    archs: Sequence[str] = ARCHS,
) -> list[dict[str, Any]]:
    """One row per (level, arch): key hyper-parameters, FLOPs, parameters and the mismatch.

    Example:
        >>> rows = preset_table([10] * 5, 0, levels=["small"])
        >>> [r["arch"] for r in rows]
        ['mldcn', 'dcnv2', 'masknet', 'mlp', 'wukong', 'rankmixer']
        >>> all(abs(r["mismatch"]) <= MATCH_TOLERANCE for r in rows)
        True
    """
    rows = []
    for level in levels:
        reference = reference_config(level)
        for arch in archs:
            cfg = preset(arch, level, cardinalities, num_dense)
            report = model_flops(cfg, cardinalities, num_dense)
            rows.append(
                {
                    "level": level,
                    "arch": arch,
                    "shared": {k: getattr(cfg, k) for k in SHARED_KEYS},
                    "key": key_hyperparameters(cfg),
                    "total_flops": report.total,
                    "matmul_flops": report.matmul,
                    "params": report.params,
                    "dense_params": report.dense_params,
                    "mismatch": flops_mismatch(cfg, reference, cardinalities, num_dense),
                }
            )
    return rows

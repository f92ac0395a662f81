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

What each architecture solves (L and the deep tower are the level's; the solvers are the
architectures' entries in ``model.archs``):

- dcnv2: full rank, the reference (nothing to solve). With ``dcn_type="lowrank"`` or ``"mix"``
  passed as an override, its ``rank`` is solved instead.
- mldcn: ``rank`` r, with ``mask_hidden`` h = round(ρ·r), ρ = 0.5
  (``model.archs.MLDCN_MASK_RATIO``); default mask options (rank space, from LN(x0), linear).
  Because ML-DCN(r, h) costs about low-rank DCNv2 of rank r + h/2, r comes out near 0.37·d.
  If no integer r is within tolerance (tiny d), h moves off ρ·r.
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

from collections.abc import Sequence
from typing import Any

from model.archs import Matcher, architecture
from model.config import ARCHS, ModelConfig, check_layout
from model.errors import InputError
from model.flops import model_flops

LEVELS: tuple[str, ...] = ("small", "medium", "large")
MATCH_TOLERANCE = 0.02
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


def _check_names(arch: str, level: str) -> None:
    if arch not in ARCHS:
        raise InputError(f"unknown arch {arch!r}; presets exist for {ARCHS}")
    if level not in LEVELS:
        raise InputError(f"unknown level {level!r}; valid levels: {LEVELS}")


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
    entry = architecture(arch)
    settings = {**_LEVEL_SETTINGS[level], **entry.preset_settings, **overrides, "arch": arch}
    base = ModelConfig.from_dict(settings)
    def flops(c: ModelConfig) -> int:
        return model_flops(c, cards, num_dense).total

    solved = entry.solve(base, Matcher(flops, target, MATCH_TOLERANCE, overrides, len(cards),
                                       num_dense))
    if solved is None:  # the user fixed the width this architecture solves
        return base
    cfg, mismatch = solved
    if abs(mismatch) > MATCH_TOLERANCE:
        width = entry.solved
        raise InputError(
            f"cannot match {arch} to the {level} reference ({target:,} FLOPs/example) within "
            f"{MATCH_TOLERANCE:.0%} for this layout: the nearest, {width}="
            f"{getattr(cfg, width)}, is {mismatch:+.1%} off; pass {width} to skip matching"
        )
    return cfg


def key_hyperparameters(cfg: ModelConfig) -> dict[str, Any]:
    """The settings that tell the architectures of one level apart."""
    return {k: getattr(cfg, k) for k in architecture(cfg.arch).key_hyperparameters(cfg)}


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

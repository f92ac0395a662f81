"""The architecture registry: one entry per interaction architecture, holding everything the
rest of the code asks about it.

An :class:`Architecture` says how to build its interaction module from a ``ModelConfig``
(``build``, used by ``model.ctr``), what that module costs and how wide its output is
(``cost``, ``output_dim``, used by ``model.flops``), and how a matched-FLOPs preset is made
(``preset_settings``, the ``solved`` width and ``solve``, used by ``model.presets``; plus the
``key_hyperparameters`` a preset table shows; ``search``, its own settings ``mldcn tune --space
wide`` searches). The modules themselves live in
``model/modules/`` and their costs in ``model.costs``; adding an architecture is its module,
its cost function, its ``ModelConfig`` fields and one entry in :data:`ARCHITECTURES` — no
if-chain elsewhere. No torch import at module level (``build`` imports the modules), so
``model.flops`` and the presets stay torch-free.

Every callable takes the x0 width ``d`` = F_cat·e + F_num and the layout (``num_fields`` = F_cat,
``num_dense`` = F_num; WuKong and RankMixer read x0 as per-field tokens and need it).

Example:
    >>> from model.config import ModelConfig
    >>> cfg = ModelConfig(arch="dcnv2", embed_dim=4, num_layers=2)
    >>> architecture("dcnv2").cost(cfg, 11, 2, 3).total == 2 * (2 * 11 * 11 + 3 * 11)
    True
    >>> sorted(ARCHITECTURES) == sorted(ARCHS)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from model.config import (
    ARCHS,
    DCN_TYPES,
    MASK_ACTIVATIONS,
    MASK_POSITIONS,
    MASK_SOURCES,
    ModelConfig,
    check_token_layout,
)
from model.costs import (
    Cost,
    crossnet_cost,
    lowrank_crossnet_cost,
    masked_lowrank_crossnet_cost,
    mixture_crossnet_cost,
    num_tokens,
    parallel_masknet_cost,
    rankmixer_cost,
    resolved_token_dim,
    serial_masknet_cost,
    wukong_cost,
)

MLDCN_MASK_RATIO = 0.5  # a preset's ML-DCN mask width h = round(ρ·r)


@dataclass(frozen=True)
class Matcher:
    """What a preset solver needs: the FLOPs of a candidate config and the target to match.

    ``flops(cfg)`` is the candidate's total FLOPs per example (``model.flops``, on the data's
    layout), ``target`` the reference's, ``tolerance`` the allowed relative mismatch;
    ``overrides`` are the user's fixed settings, ``num_fields``/``num_dense`` the layout.
    """

    flops: Callable[[ModelConfig], int]
    target: int
    tolerance: float
    overrides: Mapping[str, Any]
    num_fields: int
    num_dense: int

    def mismatch(self, cfg: ModelConfig) -> float:
        """total(cfg) / target − 1."""
        return self.flops(cfg) / self.target - 1.0

    def nearest(self, make: Callable[[int], ModelConfig]) -> tuple[ModelConfig, float]:
        """The config ``make(n)``, n >= 1, whose FLOPs are nearest the target, and its mismatch
        (assumes FLOPs non-decreasing in n, true for every width solved here)."""
        def total(n: int) -> int:
            return self.flops(make(n))

        hi = 1
        while total(hi) < self.target and hi < 1 << 24:
            hi *= 2
        lo = max(1, hi // 2)
        while lo < hi:  # smallest n in [lo, hi] with total(n) >= target
            mid = (lo + hi) // 2
            if total(mid) >= self.target:
                hi = mid
            else:
                lo = mid + 1
        best = min({max(1, lo - 1), lo}, key=lambda n: abs(total(n) - self.target))
        return make(best), total(best) / self.target - 1.0


Build = Callable[[ModelConfig, int, "int | None", "int | None"], Any]
CostOf = Callable[[ModelConfig, int, "int | None", "int | None"], Cost]
WidthOf = Callable[[ModelConfig, int, "int | None", "int | None"], int]
# (the preset's config before matching, the matcher) -> the matched config and its mismatch,
# or None when the user fixed the solved width (the config is used as it is)
Solve = Callable[[ModelConfig, Matcher], "tuple[ModelConfig, float] | None"]


@dataclass(frozen=True)
class SearchKey:
    """One of an architecture's own settings that ``mldcn tune --space wide`` searches
    (categorical; the preset re-solves the architecture's width for it, so FLOPs stay matched).
    ``when`` (key, value): searched only when that key has that value."""

    name: str
    choices: tuple[Any, ...]
    when: tuple[str, Any] | None = None

    def active(self, value_of: Callable[[str], Any]) -> bool:
        """Whether this key is searched, given the value of other settings by name."""
        return self.when is None or value_of(self.when[0]) == self.when[1]


@dataclass(frozen=True)
class Architecture:
    """One interaction architecture (see the module docstring)."""

    name: str
    build: Build
    cost: CostOf
    solved: str
    solve: Solve
    key_hyperparameters: Callable[[ModelConfig], list[str]]
    output_dim: WidthOf = lambda cfg, d, num_fields, num_dense: d
    preset_settings: Mapping[str, Any] = field(default_factory=dict)
    structure: str | None = None  # a structure the architecture always uses ("mlp": stacked)
    search: tuple[SearchKey, ...] = ()  # its own keys for ``mldcn tune --space wide``


def _half_up(x: float) -> int:
    return int(x + 0.5)


def _layout(cfg: ModelConfig, d: int, num_fields: int | None,
            num_dense: int | None) -> tuple[int, int]:
    check_token_layout(cfg, d, num_fields, num_dense)
    assert num_fields is not None and num_dense is not None
    return num_fields, num_dense


# -- DCNv2 -----------------------------------------------------------------------------------
def _dcnv2_build(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Any:
    from model.modules import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet

    if cfg.dcn_type == "full":
        return CrossNet(d, cfg.num_layers)
    if cfg.dcn_type == "lowrank":
        return LowRankCrossNet(d, cfg.num_layers, cfg.rank, cfg.low_rank_c,
                               cfg.low_rank_nonlinearity)
    return LowRankMixtureCrossNet(d, cfg.num_layers, cfg.rank, cfg.num_experts,
                                  cfg.low_rank_nonlinearity)


def _dcnv2_cost(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Cost:
    if cfg.dcn_type == "full":
        return crossnet_cost(d, cfg.num_layers)
    if cfg.dcn_type == "lowrank":
        return lowrank_crossnet_cost(d, cfg.num_layers, cfg.rank, cfg.low_rank_c,
                                     cfg.low_rank_nonlinearity)
    return mixture_crossnet_cost(d, cfg.num_layers, cfg.rank, cfg.num_experts,
                                 cfg.low_rank_nonlinearity)


def _dcnv2_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    if base.dcn_type == "full" or "rank" in m.overrides:
        return None
    return m.nearest(lambda r: dataclasses.replace(base, rank=r))


def _dcnv2_keys(cfg: ModelConfig) -> list[str]:
    keys = ["dcn_type"] + (["rank"] if cfg.dcn_type != "full" else [])
    return keys + (["num_experts"] if cfg.dcn_type == "mix" else [])


# -- ML-DCN ----------------------------------------------------------------------------------
def _mldcn_build(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Any:
    from model.modules import MaskedLowRankCrossNet

    return MaskedLowRankCrossNet(
        d, cfg.num_layers, cfg.rank, mask_hidden=cfg.resolved_mask_hidden,
        mask_position=cfg.mask_position, mask_source=cfg.mask_source,
        mask_activation=cfg.mask_activation, residual_layernorm=cfg.residual_layernorm,
        num_experts=cfg.num_experts)


def _mldcn_cost(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Cost:
    return masked_lowrank_crossnet_cost(
        d, cfg.num_layers, cfg.rank, cfg.resolved_mask_hidden, cfg.mask_position,
        cfg.mask_source, cfg.mask_activation, cfg.residual_layernorm, cfg.num_experts)


def _mldcn_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    """r, with h = round(ρ·r); if no integer r is within half the tolerance (tiny d), h moves
    off ρ·r around the best r. A fixed ``mask_hidden`` solves r alone."""
    if "rank" in m.overrides:
        return None
    if "mask_hidden" in m.overrides:
        return m.nearest(lambda r: dataclasses.replace(base, rank=r))

    def make(r: int, h: int | None = None) -> ModelConfig:
        hidden = max(1, _half_up(MLDCN_MASK_RATIO * r)) if h is None else h
        return dataclasses.replace(base, rank=r, mask_hidden=hidden)

    cfg, mismatch = m.nearest(make)
    if abs(mismatch) <= m.tolerance / 2:
        return cfg, mismatch
    best = (abs(mismatch), 0.0, cfg, mismatch)
    for r in range(max(1, cfg.rank - 2), cfg.rank + 3):
        for h in range(1, 2 * r + 2):
            candidate = make(r, h)
            off = m.mismatch(candidate)
            key = (abs(off), abs(h - MLDCN_MASK_RATIO * r))
            if key < best[:2]:
                best = (*key, candidate, off)
    return best[2], best[3]


# -- MaskNet ---------------------------------------------------------------------------------
def _masknet_build(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Any:
    from model.modules import ParallelMaskNet, SerialMaskNet

    net = SerialMaskNet if cfg.masknet_mode == "serial" else ParallelMaskNet
    return net(d, cfg.num_layers, cfg.block_dim, cfg.reduction_ratio)


def _masknet_cost(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Cost:
    net = serial_masknet_cost if cfg.masknet_mode == "serial" else parallel_masknet_cost
    return net(d, cfg.num_layers, cfg.block_dim, cfg.reduction_ratio)


def _masknet_width(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> int:
    return cfg.block_dim * (1 if cfg.masknet_mode == "serial" else cfg.num_layers)


def _masknet_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    if "block_dim" in m.overrides:
        return None
    return m.nearest(lambda k: dataclasses.replace(base, block_dim=k))


# -- MLP (no interaction module) ---------------------------------------------------------------
def _scaled_dims(dims: tuple[int, ...], first: int) -> tuple[int, ...]:
    if not dims:
        return (first,)
    return tuple(max(1, _half_up(first * w / dims[0])) for w in dims)


def _mlp_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    """The level's tower scaled by one factor (the first width solved, the others keep their
    ratio to it)."""
    dims = base.mlp_dims
    return m.nearest(lambda w: dataclasses.replace(base, mlp_dims=_scaled_dims(dims, w)))


# -- WuKong ----------------------------------------------------------------------------------
def _wukong_build(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Any:
    from model.modules import WuKong

    num_fields, num_dense = _layout(cfg, d, f, n)
    return WuKong(num_fields, cfg.embed_dim, num_dense, cfg.num_layers, cfg.fm_rank,
                  cfg.fmb_hidden)


def _wukong_cost(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Cost:
    num_fields, num_dense = _layout(cfg, d, f, n)
    return wukong_cost(num_fields, cfg.embed_dim, num_dense, cfg.num_layers, cfg.fm_rank,
                       cfg.fmb_hidden)


def _wukong_width(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> int:
    num_fields, num_dense = _layout(cfg, d, f, n)
    return num_tokens(num_fields, num_dense) * cfg.embed_dim


def _wukong_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    if "fmb_hidden" in m.overrides:
        return None
    return m.nearest(lambda h: dataclasses.replace(base, fmb_hidden=h))


# -- RankMixer -------------------------------------------------------------------------------
def _rankmixer_build(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Any:
    from model.modules import RankMixer

    num_fields, num_dense = _layout(cfg, d, f, n)
    return RankMixer(num_fields, cfg.embed_dim, num_dense, cfg.num_layers, cfg.token_dim,
                     cfg.ffn_hidden)


def _rankmixer_cost(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> Cost:
    num_fields, num_dense = _layout(cfg, d, f, n)
    return rankmixer_cost(num_fields, cfg.embed_dim, num_dense, cfg.num_layers,
                          resolved_token_dim(cfg, num_fields, num_dense), cfg.ffn_hidden)


def _rankmixer_width(cfg: ModelConfig, d: int, f: int | None, n: int | None) -> int:
    num_fields, num_dense = _layout(cfg, d, f, n)
    return resolved_token_dim(cfg, num_fields, num_dense)


def _rankmixer_solve(base: ModelConfig, m: Matcher) -> tuple[ModelConfig, float] | None:
    """``ffn_hidden``; one unit of it is coarse (1-3% of the small reference), so when the
    nearest is more than half the tolerance off, D = 2T, 3T, … (up to 4× the default) are
    tried too and the nearest kept. A fixed ``token_dim`` solves ``ffn_hidden`` alone."""
    if "ffn_hidden" in m.overrides:
        return None

    def solve(b: ModelConfig) -> tuple[ModelConfig, float]:
        return m.nearest(lambda h: dataclasses.replace(b, ffn_hidden=h))

    best = solve(base)
    if "token_dim" in m.overrides or abs(best[1]) <= m.tolerance / 2:
        return best
    tokens = num_tokens(m.num_fields, m.num_dense)
    default = resolved_token_dim(base, m.num_fields, m.num_dense)
    for dim in range(default + tokens, 4 * default + 1, tokens):
        candidate = solve(dataclasses.replace(base, token_dim=dim))
        if abs(candidate[1]) < abs(best[1]):
            best = candidate
    return best


ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in (
    Architecture("mldcn", _mldcn_build, _mldcn_cost, "rank", _mldcn_solve,
                 lambda cfg: ["rank", "mask_hidden", "mask_position", "mask_source",
                              "num_experts"],
                 search=(SearchKey("mask_position", MASK_POSITIONS),
                         SearchKey("mask_source", MASK_SOURCES),
                         SearchKey("mask_activation", MASK_ACTIVATIONS))),
    Architecture("dcnv2", _dcnv2_build, _dcnv2_cost, "rank", _dcnv2_solve, _dcnv2_keys,
                 preset_settings={"dcn_type": "full"},
                 search=(SearchKey("dcn_type", DCN_TYPES),
                         SearchKey("num_experts", (2, 4), when=("dcn_type", "mix")))),
    Architecture("masknet", _masknet_build, _masknet_cost, "block_dim", _masknet_solve,
                 lambda cfg: ["masknet_mode", "block_dim", "reduction_ratio"],
                 output_dim=_masknet_width,
                 preset_settings={"masknet_mode": "serial", "reduction_ratio": 0.2}),
    Architecture("mlp", lambda cfg, d, f, n: None, lambda cfg, d, f, n: Cost(), "mlp_dims",
                 _mlp_solve, lambda cfg: ["mlp_dims"],
                 preset_settings={"structure": "stacked"}, structure="stacked"),
    Architecture("wukong", _wukong_build, _wukong_cost, "fmb_hidden", _wukong_solve,
                 lambda cfg: ["fm_rank", "fmb_hidden"], output_dim=_wukong_width,
                 preset_settings={"fm_rank": 8}),
    Architecture("rankmixer", _rankmixer_build, _rankmixer_cost, "ffn_hidden",
                 _rankmixer_solve, lambda cfg: ["token_dim", "ffn_hidden"],
                 output_dim=_rankmixer_width),
)}


def architecture(name: str) -> Architecture:
    """The registry entry of ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"arch {name!r} has no interaction module (architectures: "
                         f"{', '.join(ARCHS)})") from None

"""Model configuration: which architecture to build and its hyper-parameters.

``ModelConfig`` is plain data (no torch import), so presets, FLOPs accounting, the exporter and
the scoring service can all read it. It round-trips through ``to_dict`` / ``from_dict`` (JSON
friendly: tuples become lists). Every value is checked when the object is built; a bad value
raises ``ConfigError`` (a ``ValueError``) that names the field and what was expected.

Fields, by the architecture that reads them (see ../shared/MODELS.md for the equations):

Shared
  arch          "mldcn", "dcnv2", "masknet", "mlp", "wukong" or "rankmixer" (``ARCHS``); "lr"
                (logistic regression, ``BASELINES``) is a baseline for tests and sanity checks.
  embed_dim     e, the size of every categorical field's embedding. The interaction input is
                x0 = concat(field embeddings, dense features), d = F_cat·e + F_num.
  structure     how the interaction output meets the deep tower (DCNv2 paper terms):
                "parallel"   head(concat(interaction(x0), MLP(x0)));
                "stacked"    head(MLP(interaction(x0)));
                "cross_only" head(interaction(x0)).
                Ignored by arch "mlp" (always head(MLP(x0))) and "lr".
  num_layers    L: cross layers (dcnv2, mldcn) or mask blocks (masknet).
  mlp_dims      widths of the deep tower's hidden layers (Linear → ReLU → Dropout each);
                may be empty (the tower is then the identity).
  dropout       dropout probability after each hidden layer of the deep tower.
  batch_norm    BatchNorm1d after each hidden Linear of the deep tower (before its ReLU);
                folded into that Linear for inference, so it adds no served FLOPs.
  embedding_l2  λ of the embedding regulariser: λ/2·‖E‖² over the whole embedding table is
                added to every training step's loss (FuxiCTR's ``embedding_regularizer`` with
                p = 2, so its values carry over). Training only; 0 = off.
  embed_init_std  standard deviation of the normal initialisation of the embedding table.

DCNv2
  dcn_type               "full" (W ∈ R^{d×d}), "lowrank" (U Vᵀ, rank ``rank``) or "mix"
                         (mixture of ``num_experts`` low-rank experts, DCN-Mix).
  rank                   r, the low rank (dcnv2 lowrank/mix, and mldcn).
  num_experts            K: experts per layer for dcnv2 "mix" (the paper uses 4) and for ML-DCN's
                         mixture of masked low-rank experts (1 = no mixture, the default).
  low_rank_c             dcnv2 "lowrank" only: add the r×r matrix C, U g(C g(Vᵀx)). DCN-Mix always
                         has C.
  low_rank_nonlinearity  g in the rank space where C is used: "relu", "tanh" or "identity".

MaskNet
  masknet_mode     "serial" (blocks chained, output width ``block_dim``) or "parallel"
                   (``num_layers`` blocks on the embedding, concatenated: num_layers·block_dim).
  block_dim        output width of each MaskBlock.
  reduction_ratio  ρ: the mask's hidden width is max(1, round(ρ × the width it masks)).

ML-DCN (default formulation and its ablations)
  mask_hidden         h, the mask MLP's hidden width; None means ⌈rank/2⌉ (ρ = 0.5).
  mask_position       "rank" (mask the r-dim rank space, default) or "input" (mask x_l ∈ R^d).
  mask_source         "x0" (masks read LN(x0), default; fused into one matmul) or "xl" (each
                      layer's mask reads LN(x_l)).
  mask_activation     "linear" (default, m = W2 a + c2), "sigmoid" or "2sigmoid" (2·σ(·)).
  residual_layernorm  LayerNorm after each layer's residual sum.

WuKong and RankMixer (the scaling-oriented alternatives; ``model/modules/wukong.py`` and
``rankmixer.py``). Both read x0 as tokens: the F_cat field embeddings, plus one token projected
from all dense features when F_num > 0 (n = T = F_cat + [F_num > 0]). ``num_layers`` is L.
  fm_rank      WuKong k: the FM block computes X (Xᵀ Y), Y ∈ R^{n×k}.
  fmb_hidden   WuKong: hidden width of each FM block's MLP (the width presets solve).
  token_dim    RankMixer D, a multiple of T; None means the smallest multiple of T >= e.
  ffn_hidden   RankMixer: hidden width of each per-token FFN (the width presets solve).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from model.checks import check_sizes
from model.errors import InputError

ARCHS: tuple[str, ...] = ("mldcn", "dcnv2", "masknet", "mlp", "wukong", "rankmixer")
BASELINES: tuple[str, ...] = ("lr",)
STRUCTURES: tuple[str, ...] = ("parallel", "stacked", "cross_only")
DCN_TYPES: tuple[str, ...] = ("full", "lowrank", "mix")
NONLINEARITIES: tuple[str, ...] = ("relu", "tanh", "identity")
MASKNET_MODES: tuple[str, ...] = ("serial", "parallel")
MASK_POSITIONS: tuple[str, ...] = ("rank", "input")
MASK_SOURCES: tuple[str, ...] = ("x0", "xl")
MASK_ACTIVATIONS: tuple[str, ...] = ("linear", "sigmoid", "2sigmoid")


class ConfigError(InputError):
    """A model configuration with an unknown key or a value out of range."""


def reduction_width(width: int, ratio: float) -> int:
    """Hidden width of a MaskNet mask that masks ``width`` units: max(1, round(ratio·width)).

    Rounds halves up (not Python's banker's rounding), so 0.5·5 gives 3.

    Example:
        >>> reduction_width(390, 0.2), reduction_width(5, 0.5), reduction_width(3, 0.01)
        (78, 3, 1)
    """
    return max(1, int(ratio * width + 0.5))


def check_layout(cardinalities: Sequence[int], num_dense: int) -> list[int]:
    """Validate a data layout (ids per categorical field, number of dense features).

    Raises ValueError unless every cardinality is an integer >= 1, ``num_dense`` >= 0 and there
    is at least one field; returns the cardinalities as a list.
    """
    cards = list(cardinalities)
    bad = [c for c in cards if not _is_int(c) or c < 1]
    if bad:
        raise ConfigError(f"cardinalities must be integers >= 1, got {bad[:5]}")
    if not _is_int(num_dense) or num_dense < 0:
        raise ConfigError(f"num_dense must be an integer >= 0, got {num_dense!r}")
    if not cards and num_dense == 0:
        raise ConfigError("a model needs at least one categorical or one dense field")
    return cards


def check_token_layout(cfg: ModelConfig, d: int, num_fields: int | None,
                       num_dense: int | None) -> None:
    """The layout check of the token-based archs (WuKong, RankMixer): they read x0 of width
    ``d`` as F_cat (``num_fields``) embeddings of width e plus F_num (``num_dense``) dense
    features, so both must be given and d = F_cat·e + F_num; ValueError (a bug) otherwise."""
    if num_fields is None or num_dense is None:
        raise ValueError(f"arch {cfg.arch!r} needs num_fields and num_dense")
    if num_fields * cfg.embed_dim + num_dense != d:
        raise ValueError(
            f"in_features ({d}) must equal num_fields·embed_dim + num_dense "
            f"({num_fields}·{cfg.embed_dim} + {num_dense})"
        )


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and hyper-parameters of one CTR model (see the module docstring).

    Example:
        >>> cfg = ModelConfig(arch="dcnv2", dcn_type="lowrank", rank=32, mlp_dims=[64, 32])
        >>> cfg.mlp_dims
        (64, 32)
        >>> ModelConfig.from_dict(cfg.to_dict()) == cfg
        True
        >>> ModelConfig(arch="mldcn", rank=10).resolved_mask_hidden
        5
        >>> ModelConfig.from_dict({"arch": "dcn"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        model.config.ConfigError: arch must be one of ('mldcn', 'dcnv2', ...), got 'dcn'
    """

    arch: str = "mldcn"
    embed_dim: int = 16
    structure: str = "parallel"
    num_layers: int = 3
    mlp_dims: tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    batch_norm: bool = False
    embedding_l2: float = 0.0
    embed_init_std: float = 1e-4
    # DCNv2
    dcn_type: str = "full"
    rank: int = 64
    num_experts: int = 1
    low_rank_c: bool = False
    low_rank_nonlinearity: str = "relu"
    # MaskNet
    masknet_mode: str = "serial"
    block_dim: int = 64
    reduction_ratio: float = 0.2
    # ML-DCN
    mask_hidden: int | None = None
    mask_position: str = "rank"
    mask_source: str = "x0"
    mask_activation: str = "linear"
    residual_layernorm: bool = False
    # WuKong
    fm_rank: int = 8
    fmb_hidden: int = 64
    # RankMixer
    token_dim: int | None = None
    ffn_hidden: int = 64

    def __post_init__(self) -> None:
        # JSON gives lists; keep the frozen dataclass hashable and comparable.
        dims = self.mlp_dims
        if isinstance(dims, (list, tuple)):
            object.__setattr__(self, "mlp_dims", tuple(dims))
        self._validate()

    def _validate(self) -> None:
        choices = {
            "arch": ARCHS + BASELINES,
            "structure": STRUCTURES,
            "dcn_type": DCN_TYPES,
            "low_rank_nonlinearity": NONLINEARITIES,
            "masknet_mode": MASKNET_MODES,
            "mask_position": MASK_POSITIONS,
            "mask_source": MASK_SOURCES,
            "mask_activation": MASK_ACTIVATIONS,
        }
        for name, valid in choices.items():
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(f"{name} must be one of {valid}, got {value!r}")
        check_sizes(ConfigError, **{name: getattr(self, name) for name in (
            "embed_dim", "num_layers", "rank", "num_experts", "block_dim", "fm_rank",
            "fmb_hidden", "ffn_hidden")})
        if self.mask_hidden is not None and (not _is_int(self.mask_hidden) or self.mask_hidden < 1):
            raise ConfigError(
                f"mask_hidden must be None or an integer >= 1, got {self.mask_hidden!r}"
            )
        if self.token_dim is not None and (not _is_int(self.token_dim) or self.token_dim < 1):
            raise ConfigError(f"token_dim must be None or an integer >= 1, got {self.token_dim!r}")
        if not isinstance(self.mlp_dims, tuple) or not all(
            _is_int(w) and w >= 1 for w in self.mlp_dims
        ):
            raise ConfigError(
                f"mlp_dims must be a list of integers >= 1 (may be empty), got {self.mlp_dims!r}"
            )
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise ConfigError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        ratio = self.reduction_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not ratio > 0:
            raise ConfigError(f"reduction_ratio must be a number > 0, got {ratio!r}")
        for name, low, strict in (("embedding_l2", 0.0, False), ("embed_init_std", 0.0, True)):
            value = getattr(self, name)
            if (not isinstance(value, (int, float)) or isinstance(value, bool)
                    or not math.isfinite(value) or value < low or (strict and value == low)):
                what = "> 0" if strict else ">= 0"
                raise ConfigError(f"{name} must be a finite number {what}, got {value!r}")
        for name in ("low_rank_c", "residual_layernorm", "batch_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def resolved_mask_hidden(self) -> int:
        """ML-DCN mask hidden width h: ``mask_hidden``, or ⌈rank/2⌉ when it is None."""
        return self.mask_hidden if self.mask_hidden is not None else (self.rank + 1) // 2

    def to_dict(self) -> dict[str, Any]:
        """All fields as JSON-friendly values (``mlp_dims`` as a list)."""
        d = asdict(self)
        d["mlp_dims"] = list(self.mlp_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a mapping; missing keys take their defaults, unknown keys are an error."""
        if not isinstance(d, dict):
            raise ConfigError(f"a model config must be a mapping, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        if "mlp_dims" in d and not isinstance(d["mlp_dims"], (list, tuple)):
            raise ConfigError(f"mlp_dims must be a list of integers, got {d['mlp_dims']!r}")
        return cls(**d)

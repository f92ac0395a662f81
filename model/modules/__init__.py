"""Interaction modules and the deep tower shared by the CTR models.

Every interaction module maps x0 (B, d) to (B, output_dim) and has an ``output_dim`` attribute,
so the CTR model can take any of them (``model.ctr.CTRModel``).

- ``crossnet``: DCNv2 ``CrossNet`` (full rank), ``LowRankCrossNet``, ``LowRankMixtureCrossNet``.
- ``mldcn``: ML-DCN ``MaskedLowRankCrossNet``.
- ``masknet``: ``MaskBlock``, ``SerialMaskNet``, ``ParallelMaskNet``.
- ``wukong``: ``WuKong`` (FM blocks + linear compression blocks on the field tokens).
- ``rankmixer``: ``RankMixer`` (parameter-free token mixing + per-token FFNs).
- ``mlp``: the deep tower ``MLP``.
"""

from model.modules.crossnet import CrossNet, LowRankCrossNet, LowRankMixtureCrossNet
from model.modules.masknet import MaskBlock, ParallelMaskNet, SerialMaskNet
from model.modules.mldcn import MaskedLowRankCrossNet
from model.modules.mlp import MLP
from model.modules.rankmixer import RankMixer
from model.modules.wukong import WuKong

__all__ = [
    "MLP",
    "CrossNet",
    "LowRankCrossNet",
    "LowRankMixtureCrossNet",
    "MaskBlock",
    "MaskedLowRankCrossNet",
    "ParallelMaskNet",
    "RankMixer",
    "SerialMaskNet",
    "WuKong",
]

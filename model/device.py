"""Where training runs: the ``--device`` and ``--amp`` choices resolved against this machine.

``auto`` is CUDA when ``torch.cuda.is_available()``, else the CPU; ``cuda`` / ``cuda:N`` where
there is no such GPU is an expected error (:class:`model.errors.CLIError`, one line), never a
silent fall-back to the CPU. Under torchrun, a bare ``cuda`` means the rank's own GPU
(``cuda:LOCAL_RANK``).

Mixed precision (``--amp``) only applies on CUDA: ``auto`` autocasts to bfloat16 where the GPU
supports it, else to float16 with a gradient scaler; ``bf16`` / ``fp16`` ask for one; ``off``
trains in float32. On the CPU every choice but ``off`` is ignored with float32 kept (CPU
autocast is slower than float32 for these models), so CPU results do not depend on ``--amp``.
"""

from __future__ import annotations

import re

import torch

from model.errors import CLIError, InputError

DEVICES_HELP = "auto, cpu, cuda or cuda:N (default auto: CUDA when present)"
AMP_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """The torch device for ``spec`` (auto | cpu | cuda | cuda:N); CLIError if unusable here."""
    spec = spec.strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if m is None:
        raise CLIError(f"--device must be {DEVICES_HELP}, got {spec!r}")
    if not torch.cuda.is_available():
        raise CLIError(f"--device {spec}: no CUDA GPU is available on this machine "
                       "(torch.cuda.is_available() is False); use --device cpu or auto")
    index = int(m.group(1)) if m.group(1) is not None else local_rank
    count = torch.cuda.device_count()
    if index >= count:
        raise CLIError(f"--device {spec}: GPU {index} does not exist ({count} visible)")
    return torch.device("cuda", index)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``, or None for float32 training."""
    if amp not in AMP_CHOICES:
        raise InputError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16

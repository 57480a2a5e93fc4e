"""Which device a run uses and whether it runs under autocast: one resolution for train, eval and sweep.

Owns `pick_device` (the `--device` / `train.device` setting, node-local rank aware under torchrun) and
`autocast_dtype` / `autocast` (bf16 autocast on CUDA when `model.dtype == "bf16"`; fp32 elsewhere).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from muonft_cli.errors import UserInputError


def pick_device(spec: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """Resolve a device setting: "auto" = CUDA when present (the node-local rank's GPU), else CPU.

    Args:
        spec: "auto", "cpu", "cuda", "cuda:N" (or a `torch.device`).
        local_rank: this process's node-local rank; selects the GPU for "auto" and a bare "cuda" under torchrun.

    Returns:
        The device. Raises `UserInputError` for an unknown name, or CUDA asked for but absent.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    pref = (spec or "auto").strip().lower()
    if pref == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if pref == "cpu":
        return torch.device("cpu")
    if pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserInputError(f"device '{pref}' asked for but no CUDA GPU is visible: use --device cpu (or auto)")
        try:
            return torch.device(pref) if ":" in pref else torch.device("cuda", local_rank)
        except RuntimeError:
            pass
    raise UserInputError(f"unknown device '{spec}': use auto, cpu, cuda or cuda:N")


def autocast_dtype(model_cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype the engine uses: bf16 on CUDA when `model.dtype == "bf16"`, else None (fp32)."""
    if getattr(model_cfg, "dtype", "fp32") == "bf16" and torch.device(device).type == "cuda":
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` on `device` in `dtype`, or a no-op context when `dtype` is None or the device is CPU."""
    if dtype is None or torch.device(device).type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)

"""Which device a run uses and whether it runs under autocast: one resolution for train, eval and sweep.

Owns `pick_device` (the `--device` / `train.device` setting, node-local rank aware under torchrun),
`resolve_base_dtype` (the dtype a LoRA run's frozen base is loaded in: `model.base_dtype`, auto = bf16 on
CUDA, fp32 on CPU; always fp32 for full fine-tuning and pretraining), the dtype names (`DTYPES`, `dtype_name`)
and `autocast_dtype` / `autocast` (on CUDA: autocast in a half-precision base's dtype, else bf16 when
`model.dtype == "bf16"`; never on the CPU, where a half-precision base computes in its own dtype and peft
runs the fp32 LoRA branch in fp32), and `limit_host_allocator_retention` (glibc's fixed mmap threshold, so
freed host tensors go back to the OS and peak RSS is what the run holds, not what the allocator kept).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
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


#: The short names of the float dtypes a model is loaded in (config `model.base_dtype`, `muonft.json`).
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """`torch.bfloat16` -> "bf16" (None for None; torch's own name for a dtype without a short one)."""
    if dtype is None:
        return None
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype).removeprefix("torch."))


def resolve_base_dtype(setting: str | None, device: torch.device | str, lora: bool) -> str:
    """The dtype name ("fp32" | "bf16" | "fp16") the model of a run is loaded in.

    A LoRA run's frozen base: `setting` as given, or for "auto" (None) bf16 on CUDA and fp32 on CPU (bf16
    matmuls are slow on CPUs without bf16 units and the memory saving matters most on GPUs; pass
    `--base-dtype bf16` on CPU for half the base's memory). A full fine-tune always loads fp32 master weights
    (`muonft_cli.train.build.check_inputs` refuses any other setting before this runs).
    """
    if not lora:
        return "fp32"
    if setting in (None, "auto"):
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return setting


def autocast_dtype(model_cfg: Any, device: torch.device, base_dtype: str | None = None) -> torch.dtype | None:
    """The autocast dtype the engine uses on CUDA: a half-precision base's own dtype (`base_dtype` "bf16" /
    "fp16"), else bf16 when `model.dtype == "bf16"`, else None (fp32). None on every other device: on the CPU
    a bf16/fp16 base runs its matmuls in its own dtype and peft computes the fp32 LoRA branch in fp32."""
    if torch.device(device).type != "cuda":
        return None
    if base_dtype in ("bf16", "fp16"):
        return DTYPES[base_dtype]
    if getattr(model_cfg, "dtype", "fp32") == "bf16":
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` on `device` in `dtype`, or a no-op context when `dtype` is None or the device is CPU."""
    if dtype is None or torch.device(device).type == "cpu":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


#: glibc's mmap threshold set by `limit_host_allocator_retention`: host allocations of at least 4 MiB are mmapped
#: (64 KiB, the previous value, mmapped every activation: a SmolLM2-135M LoRA step from the CLI took 1.7x as long,
#: from page faults; 4 MiB measured as fast as glibc's default there, and 1 MiB kept more of the retention)
HOST_MMAP_THRESHOLD = 4 << 20
#: models smaller than this keep glibc's default: their steps are allocation-bound, and mmap + page faults per
#: tensor (at the earlier 64 KiB threshold) made a tiny-preset pretraining run ~1.8x slower
HOST_RETENTION_MIN_PARAMS = 50_000_000
_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
_retention_limited: bool | None = None


def limit_host_allocator_retention(n_params: int | None = None) -> bool:
    """Serve every host allocation of `HOST_MMAP_THRESHOLD` bytes or more by mmap, so a freed tensor's memory
    goes back to the OS at once (Linux with glibc; once per process; a no-op elsewhere, and for a model of
    fewer than `HOST_RETENTION_MIN_PARAMS` parameters when `n_params` is given).

    glibc raises its mmap threshold after each large free (up to 32 MiB), after which tensors up to that size
    come from the heap, whose freed chunks stay resident and fragment: on a 0.4 B-parameter LoRA run on CPU
    this retention was 0.3 GB of the bf16 run's peak RSS and 0.85 GB of the fp32 run's (README "Memory").
    Setting the threshold with `mallopt` also turns that adaptation off. Left alone when the user chose it
    (`MALLOC_MMAP_THRESHOLD_` in the environment) or preloads another allocator (`LD_PRELOAD`, e.g. jemalloc).

    Returns:
        Whether the threshold is set by this process (True also on later calls).
    """
    global _retention_limited
    if _retention_limited is not None:
        return _retention_limited
    if n_params is not None and n_params < HOST_RETENTION_MIN_PARAMS:
        return False  # small models: speed over memory (and a larger model later in this process may still ask)
    _retention_limited = False
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ or os.environ.get("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: no glibc malloc tunables
            return False
        _retention_limited = bool(libc.mallopt(_M_MMAP_THRESHOLD, HOST_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False
    return _retention_limited

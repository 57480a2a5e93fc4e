"""Process-group plumbing for data-parallel training under `torchrun` (torch.distributed).

Owns: reading the torchrun environment (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), choosing the device and the
backend (NCCL on GPU, gloo on CPU), deterministic sharding of each global batch across ranks (the
`DistributedSampler` idea, applied per optimizer step so that the data position is one integer), and small
collectives the training loop needs (sum of a scalar, gathering picklable objects, a barrier).

Under `train.strategy: fsdp` it also owns the FSDP2 wrapping (`fsdp_wrap`: `fully_shard` on every decoder
layer, then on the root, over a 1-D device mesh), filling the shards from rank 0's weights when only rank 0
read them (`full_state`, `load_from_rank0`), and reading a sharded tensor's local part (`local`).

Only rank 0 writes files; the others compute. The Muon work split (each rank orthogonalises its
round-robin share of the matrices and the results are all-gathered — the plain-DDP arrangement the paper's
§4.7 used for full fine-tuning) lives in `muonft_cli.optim`; `train.build` switches it on through the
optimizer's distributed hook.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

from muonft_cli.models.device import pick_device


@dataclass
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this node (selects the GPU).
        device: the torch device this process trains on.
        backend: "nccl", "gloo" or None (single process).
        owns_group: True when `init_from_env` created the process group (and `cleanup` should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_from_env(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment, or run single-process.

    With `WORLD_SIZE` > 1 this calls `dist.init_process_group` (NCCL when training on CUDA, gloo otherwise)
    unless a group already exists (then it is reused and left alone by `cleanup`).

    Args:
        device_pref: the `train.device` setting.

    Returns:
        A `DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world <= 1:
        return DistInfo(device=device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
        owns = True
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    device=device, backend=dist.get_backend(), owns_group=owns)


def fsdp_wrap(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """Shard `model` in place with FSDP2: `fully_shard` on each decoder layer (the classes the HF model lists
    in `_no_split_modules`; for a peft model, its base's), then on the root, over a 1-D mesh of every rank.
    Parameters become DTensors sharded by rows (dim 0); frozen ones (a LoRA base) are sharded too.
    Returns the same module object (its class becomes FSDP2's subclass)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s full (unsharded) state dict in the FQNs `torch.distributed.checkpoint` uses: references to its
    tensors, no copies. Taken on rank 0 before `fsdp_wrap`, for `load_from_rank0`."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model)


def load_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor] | None, info: DistInfo) -> None:
    """Fill every rank's shards of the FSDP2-sharded `model` from rank 0's `full` state dict (`full_state`,
    taken before sharding; None on the other ranks, whose model may be on the meta device).

    A meta model is first given (uninitialised) storage on this rank's device (`to_empty`: only its shards, as
    FSDP2 parameters hold them, so tied weights stay tied); the parameters and persistent buffers are then
    broadcast tensor by tensor and each rank keeps its slice (`set_model_state_dict(..., full_state_dict=True,
    broadcast_from_rank0=True)`), and every buffer — the non-persistent ones too (rotary `inv_freq`), which no
    state dict holds — is replaced by rank 0's, dtype included. Rank 0's `full` is released when this returns."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        model.to_empty(device=info.device)
    set_model_state_dict(model, full if info.is_main else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    buffers = broadcast_object({n: b.detach().cpu() for n, b in model.named_buffers(remove_duplicate=False)}
                               if info.is_main else None, info)
    for name, value in buffers.items() if not info.is_main else ():
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        module._buffers[leaf] = value.to(info.device)


def is_fsdp(model: torch.nn.Module) -> bool:
    """True when `model` was sharded by `fsdp_wrap` (FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: a DTensor's local shard, any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: Any) -> Any:
    """A replicated/partial DTensor (e.g. the global grad norm over DTensors) as a plain tensor; others as is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def cleanup(info: DistInfo) -> None:
    """Destroy the process group if `init_from_env` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch: Sequence[int], info: DistInfo) -> list[int]:
    """This rank's contiguous share of one global batch of sample indices.

    Every rank sees the same global order (one seeded permutation per epoch), and rank r takes the r-th of
    `world_size` equal slices, so the union over ranks is exactly the single-process batch.

    Args:
        batch: the global batch's sample indices (length divisible by the world size).
        info: this process's place in the job.

    Returns:
        The indices this rank trains on.
    """
    n = len(batch)
    if n % info.world_size:
        raise ValueError(f"a global batch of {n} does not split evenly over {info.world_size} ranks")
    per = n // info.world_size
    return list(batch[info.rank * per:(info.rank + 1) * per])


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (in place; returned for chaining). No-op single-process."""
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order (`[obj]` single-process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op single-process)."""
    if info.distributed:
        dist.barrier()

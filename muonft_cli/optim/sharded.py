"""Muon over FSDP2 shards: Newton–Schulz of whole matrices whose parameters are row-sharded DTensors.

Owns the sharded execution of one chunk of the step plan (:mod:`.plan` builds the chunks; the update math
is :mod:`.update`):

* the owner of each matrix: a balanced split by Newton–Schulz FLOPs, not by count (:func:`assign_owners`,
  longest-processing-time-first: the costliest matrix goes to the least-loaded rank, ties to the lowest
  rank; every rank derives the same owners from the same plan);
* momentum and the NS input on the local row shards (``M ← βM + G`` and ``G + βM`` are element-wise);
* gather: one ``all_to_all_single`` per chunk sends each rank's rows of the NS input of matrix j to j's
  owner only, so an owner holds the full inputs of exactly its own matrices (never every matrix on every
  rank); the owner orthogonalises them batched by shape, as the single-process plan does;
* redistribute: a second ``all_to_all_single`` returns to every rank the rows of each result it owns in
  the FSDP2 layout, where ``W ← W − ηλW − η·s·O`` runs on the local shard.

Parameters must be DTensors sharded on dim 0 over a 1-D mesh (what ``fully_shard`` makes); the row split
is FSDP2's (``torch.chunk``: ⌈rows/world⌉ rows per rank, the last ranks fewer or none). The communication
volume is in docs/formulas.md ("Sharded Muon").
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import update as U

__all__ = ["assign_owners", "is_sharded", "ns_flops", "row_split", "run_chunk", "shard_group"]


def is_sharded(t: Tensor) -> bool:
    """True for a DTensor sharded on its dim 0 over a 1-D mesh of more than one rank (FSDP2's layout)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return False
    mesh = t.device_mesh
    if mesh.ndim != 1 or mesh.size() <= 1:
        return False
    pl = t.placements[0]
    if not (isinstance(pl, Shard) and pl.dim == 0):
        raise RuntimeError(f"sharded Muon needs parameters sharded on dim 0 (FSDP2's fully_shard), got "
                           f"placements {t.placements}")
    return True


def shard_group(t: Tensor) -> tuple[Any, int, int]:
    """(process group, rank, world size) of a sharded DTensor's mesh."""
    import torch.distributed as dist

    group = t.device_mesh.get_group()
    return group, dist.get_rank(group), dist.get_world_size(group)


def row_split(rows: int, world: int) -> list[int]:
    """Rows each rank holds of a `rows`-row matrix under FSDP2's dim-0 sharding (``torch.chunk`` sizes)."""
    per = math.ceil(rows / world) if rows else 0
    return [max(0, min(per, rows - k * per)) for k in range(world)]


def ns_flops(r: int, c: int, steps: int) -> float:
    """Newton–Schulz multiply-adds of one wide r×c matrix (r ≤ c): per iteration A = XXᵀ (r²c), A² (r³),
    BX (r²c)."""
    return float(steps) * (2.0 * r * r * c + r ** 3)


def assign_owners(costs: list[float], world: int) -> list[int]:
    """Owner rank of each matrix, balancing the summed cost (LPT: descending cost, least-loaded rank first,
    ties broken by index and lowest rank, so every rank computes the same answer)."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        k = min(range(world), key=lambda k: (load[k], k))
        owners[i] = k
        load[k] += costs[i]
    return owners


def _comm_dtype(dtype: torch.dtype, group: Any) -> torch.dtype:
    import torch.distributed as dist

    if dist.get_backend(group) == "gloo" and dtype in (torch.bfloat16, torch.float16):
        return torch.float32  # gloo has no half-precision collectives
    return dtype


def run_chunk(planner: Any, chunk: Any, rule: Any) -> int:
    """One chunk of sharded matrices: local momentum, gather to owners, NS there, redistribute, apply the
    local rows. Returns how many matrices this rank orthogonalised."""
    import torch.distributed as dist

    items, owners, rank, world = chunk.items, chunk.owners, chunk.rank, chunk.world
    group = shard_group(items[0].param)[0]
    it0 = items[0]
    rows, cols = it0.rows, it0.cols
    sizes = row_split(rows, world)
    mine = sizes[rank]
    device = it0.param.device
    p_loc = [it.param.to_local().view(mine, cols) for it in items]
    g_loc = [it.grad.to_local().reshape(mine, cols) for it in items]
    b_loc = [it.buf.to_local().view(mine, cols) for it in items]
    send_dtype = _comm_dtype(chunk.stack_dtype, group)
    # 1. momentum and the NS input on this rank's rows, packed by destination owner (chunk order within)
    order = sorted(range(len(items)), key=lambda j: (owners[j], j))
    send = torch.empty((len(items), mine, cols), dtype=send_dtype, device=device)
    for pos, j in enumerate(order):
        g = items[j].group
        U.momentum_(b_loc[j], g_loc[j], g["momentum"])
        U.ns_input_(send[pos], g_loc[j], b_loc[j], g["momentum"], g["nesterov"])
    count = [owners.count(k) for k in range(world)]
    n_own = count[rank]
    recv = torch.empty((n_own * rows * cols,), dtype=send_dtype, device=device)
    dist.all_to_all_single(recv, send.reshape(-1), output_split_sizes=[n_own * s * cols for s in sizes],
                           input_split_sizes=[c * mine * cols for c in count], group=group)
    # 2. the owner's full inputs (n_own, rows, cols): the pieces from rank k are rows [off_k, off_k + s_k)
    full = torch.empty((n_own, rows, cols), dtype=send_dtype, device=device)
    off, pos = 0, 0
    for s in sizes:
        full[:, off:off + s].copy_(recv[pos:pos + n_own * s * cols].view(n_own, s, cols))
        off, pos = off + s, pos + n_own * s * cols
    O_nat = full
    if n_own:
        X = full.mT if it0.flip else full  # wide stack (n_own, r, c)
        if X.dtype != chunk.stack_dtype:
            X = X.to(chunk.stack_dtype)
        rule._transform_stack(X)
        O = planner._ns(X, chunk.method, chunk.steps, chunk.thin)
        O_nat = O.mT if it0.flip else O  # (n_own, rows, cols)
    out_dtype = _comm_dtype(O_nat.dtype, group)
    # 3. redistribute: rank k gets rows [off_k, off_k + s_k) of each of my results
    back = torch.empty((n_own * rows * cols,), dtype=out_dtype, device=device)
    off, pos = 0, 0
    for s in sizes:
        back[pos:pos + n_own * s * cols].view(n_own, s, cols).copy_(O_nat[:, off:off + s])
        off, pos = off + s, pos + n_own * s * cols
    got = torch.empty((len(items), mine, cols), dtype=out_dtype, device=device)
    dist.all_to_all_single(got.reshape(-1), back, output_split_sizes=[c * mine * cols for c in count],
                           input_split_sizes=[n_own * s * cols for s in sizes], group=group)
    # 4. apply on the local rows, in `order` (the packing order of `got`)
    rule._apply_sharded([items[j] for j in order], [p_loc[j] for j in order], list(got.unbind(0)))
    return n_own

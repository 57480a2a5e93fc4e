"""Step planning for the Muon-family optimizers: which matrices are orthogonalised together, where, by whom.

Owns everything between "these parameters have gradients" and "apply this orthogonalised update", none of
the update math (that is :mod:`.update`; the NS iterations are :mod:`.orthogonalize`):

* bucketing: same-shape matrices (tall ones transposed, so every stack is wide) with the same NS method,
  steps, path and dtypes are stacked and orthogonalised in one batched call, in chunks of at most
  ``ns_chunk_bytes`` of stacked input (bounded extra memory); thin matrices (min dim ≤ 64, LoRA) take the
  Gram-space path.
* the fused thin path (:class:`_FusedThin`; Muon, fp32/fp64 weights, unsharded): per chunk a few
  whole-chunk launches on stacked tensors (the thin matrices' momentum buffers become views of one
  stacked tensor per chunk), one batched r×r Gram iteration for all thin matrices of the step, and a
  ``_foreach`` apply — no per-matrix op.  On CPU with fp32 weights and gradients the whole step of these
  matrices is instead one call into the native kernel (:mod:`muonft_cli.native`, built and loaded there;
  same math, each matrix read from memory once), unless it is unavailable or ``Muon(native=False)``.
* the plan cache: buckets → chunks (and per-chunk index and tensor lists, :meth:`StepPlanner.memoized`)
  are built once and reused while the param groups, the set of parameters with gradients, the state dict
  object and the sharding are unchanged.
* CPU cache blocking (the rest): on CPU (memory-bound) each matrix's momentum, NS input and stacking run
  while it is in cache, Gram-path chunks are ~4 MiB blocks, full-matrix chunks at most 8 MiB of stacked
  input, and the stacked input, its float64 Gram sub-blocks and output blocks live in scratch buffers
  reused across steps (fresh multi-MiB allocations are page-faulted in every step).  On CUDA
  (launch-bound) the same steps are ``torch._foreach_*`` ops over a chunk.
* the distributed split: after ``set_distributed`` the i-th matrix (one running index over the buckets,
  in an order every rank derives identically) is orthogonalised only by rank ``i mod world_size``, and
  the results are exchanged with ``torch.distributed.all_gather`` (one collective per chunk) so every
  rank applies the same update.  Thin matrices are computed by every rank unless ``shard_thin``.
* FSDP2: when the parameters are row-sharded DTensors (``fully_shard``), each matrix gets one owner
  (balanced by NS FLOPs) that gathers its full input, orthogonalises it and sends every rank its rows back
  (:mod:`.sharded`); no ``set_distributed`` is needed, the DTensors' mesh is the group.

The optimizer (:mod:`.muon`) owns the state and the per-algorithm rule; the planner calls back into it
through :class:`UpdateRule`.
"""

from __future__ import annotations

import math
import operator
from array import array
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from muonft_cli.native import MAX_RANK

from . import sharded
from . import update as U
from .orthogonalize import (
    _NORM_EPS,
    _PE_NORM_SCALE,
    GRAM_MAX_DIM,
    GRAM_NS_MIN_ASPECT,
    _direct,
    _direct_gram,
    _gram,
    _gram_q,
    _svd_polar,
    gram_iterate,
    gram_matrix,
    ns_coefficients,
    resolve_ns_dtype,
)

__all__ = ["Chunk", "Item", "StepPlanner", "UpdateRule"]

DEFAULT_CHUNK_BYTES = 512 * 2**20
CPU_BLOCK_BYTES = 4 * 2**20  # Gram-path blocks on CPU: fill → Gram → update while in cache
CPU_GRAM64_BYTES = 1 * 2**20  # float64 copy per Gram sub-block on CPU (L2-sized; 4 MiB measured ~15% slower)
CPU_FUSED_CHUNK_BYTES = 16 * 2**20  # thin chunks of the fused CPU path (few, large launches; see _FusedThin)
CPU_DIRECT_CHUNK_BYTES = 8 * 2**20  # full-matrix NS chunks on CPU: 32×1024² bf16 at once 14% slower than 4 at a time
_GRAD_OF = operator.attrgetter("grad")  # per-step getters of the native path (C-level, used with map)
_DTYPE_OF = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_F32_ONLY = {torch.float32}


class Item:
    """One Muon matrix in this step: parameter, gradient, momentum buffer, its 2-D layout and scale."""

    __slots__ = ("param", "grad", "buf", "group", "rows", "cols", "scale", "flip")

    def __init__(
        self, param: Tensor, grad: Tensor, buf: Tensor, group: dict[str, Any], scale: float, rows: int, cols: int
    ) -> None:
        self.param, self.grad, self.buf, self.group, self.scale = param, grad, buf, group, scale
        self.rows, self.cols = rows, cols  # (out, -1) flattening as stored
        self.flip = rows > cols  # tall matrices are stacked transposed (wide)

    @property
    def wide(self) -> tuple[int, int]:
        """(r, c) with r ≤ c: this matrix's shape in the stack."""
        return (self.cols, self.rows) if self.flip else (self.rows, self.cols)

    def slot(self, X: Tensor, i: int) -> Tensor:
        """Stack slot i viewed in this matrix's stored (rows, cols) orientation."""
        return X[i].mT if self.flip else X[i]

    def as2d(self, t: Tensor) -> Tensor:
        """``t`` (the param, its grad or buffer) viewed as the stored (rows, cols) matrix."""
        return t if t.ndim == 2 else t.reshape(self.rows, self.cols)


class Chunk(NamedTuple):
    """Matrices orthogonalised in one batched call (all of one bucket), and who computes which."""

    items: list[Item]
    owners: list[int] | None  # rank computing each matrix; None = every matrix on this rank, no exchange
    rank: int
    world: int
    method: str
    steps: int
    thin: bool  # Gram-space path
    stack_dtype: torch.dtype
    sharded: bool = False  # FSDP2 row-sharded DTensors: gather to owners, redistribute (:mod:`.sharded`)


class UpdateRule(Protocol):
    """What the planner needs from an optimizer: its state set-up and its per-algorithm update."""

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None: ...

    def _transform_stack(self, X: Tensor) -> None: ...

    def _apply_updates(self, chunk: list[Item], outs: list[Tensor]) -> None: ...

    def _apply_gram(self, chunk: list[Item], Q: Tensor, X: Tensor) -> bool: ...


class StepPlanner:
    """Builds, caches and runs one optimizer's Muon step plan (module docstring); owns its scratch buffers
    and distributed settings."""

    def __init__(self, ns_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.ns_chunk_bytes = int(ns_chunk_bytes)
        self.cpu_block_bytes = CPU_BLOCK_BYTES
        self._plan: tuple[Any, list[Chunk], list[Item]] | None = None  # (key, chunks, items)
        self._fused: _FusedThin | None = None  # the fused thin-matrix part of the cached plan
        self._keep: dict[tuple[Any, ...], Tensor] = {}  # the fused path's scratch, kept across steps
        self._memo: dict[tuple[str, int], Any] = {}  # per-chunk index lists of the cached plan
        self._ws: dict[tuple[str, torch.dtype], Tensor] = {}  # CPU scratch buffers, reused every step
        self._done = 0
        self.native = False  # may the fused thin path use the native kernel (Muon(native=True))
        self.native_done = 0  # matrices the native kernel stepped in the last step
        self.dist_enabled = False
        self.dist_group: Any = None
        self.shard_thin = False

    # ------------------------------------------------------------------ distribution

    def set_distributed(self, group: Any = None, *, enabled: bool = True, shard_thin: bool = False) -> None:
        """See :meth:`.muon.MuonFamily.set_distributed`."""
        if not enabled:
            self.dist_enabled, self.dist_group, self.shard_thin = False, None, False
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "set_distributed() needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        self.dist_enabled, self.dist_group, self.shard_thin = True, group, bool(shard_thin)

    def world(self) -> tuple[int, int]:
        """(rank, world size) of the sharding; (0, 1) when off."""
        if not self.dist_enabled:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self.dist_group), dist.get_world_size(self.dist_group)

    # ------------------------------------------------------------------ plan

    def run(self, param_groups: list[dict[str, Any]], state: Any, rule: UpdateRule) -> int:
        """One Muon step over the ``kind="muon"`` groups; returns how many matrices this rank orthogonalised."""
        self._done = self.native_done = 0
        chunks = self._current(param_groups, state, rule)
        if self._fused is not None:
            chunks = self._fused.run(self, chunks)
        for chunk in chunks:
            if chunk.sharded:
                self._done += sharded.run_chunk(self, chunk, rule)
            elif chunk.owners is not None:
                self._chunk_sharded(chunk, rule)
            else:
                self._chunk_local(chunk, rule)
        for it in self._plan[2]:
            it.grad = None  # the plan must not keep gradients alive past zero_grad(set_to_none=True)
        return self._done

    def _key(self, param_groups: list[dict[str, Any]], state: Any) -> tuple:
        """What the cached plan depends on: groups, their shape-relevant options, which params have
        gradients, the state dict object (``load_state_dict`` replaces it) and the sharding."""
        key: list[Any] = [id(state), self.dist_enabled, id(self.dist_group), self.shard_thin]
        for group in param_groups:
            if group["kind"] != "muon":
                continue
            key.append((id(group), group["scaling"], group["ns_method"], group["ns_steps"], group["ns_dtype"],
                        group["transposed"], tuple(id(p) for p in group["params"] if p.grad is not None)))
        return tuple(key)

    def _current(self, param_groups: list[dict[str, Any]], state: Any, rule: UpdateRule) -> list[Chunk]:
        """The plan, built once and reused while :meth:`_key` is unchanged; only gradient references are
        refreshed per step (no per-matrix set-up work)."""
        key = self._key(param_groups, state)
        if self._plan is not None and self._plan[0] == key:
            for it in self._plan[2]:
                g = it.param.grad
                if g.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                it.grad = g
            return self._plan[1]
        items: list[Item] = []
        for group in param_groups:
            if group["kind"] == "muon":
                items.extend(_collect(group, state, rule))
        fuse = bool(getattr(rule, "_fused_thin", False))
        chunks = self._chunks(items, fuse)
        self._plan, self._memo = (key, chunks, items), {}
        self._fused = _FusedThin.build(chunks, state) if fuse else None
        self._keep = {}
        return chunks

    def _chunks(self, items: list[Item], fuse: bool = False) -> list[Chunk]:
        """Bucket the matrices by wide shape/method/dtype and split the buckets into chunks (``fuse``: the
        rule takes the fused thin path, whose CPU chunks are larger)."""
        buckets: dict[tuple, list[Item]] = defaultdict(list)
        dtypes: dict[tuple, torch.dtype] = {}
        for it in items:
            g = it.group
            thin = min(it.rows, it.cols) <= GRAM_MAX_DIM and g["ns_method"] != "svd"
            dkey = (g["ns_dtype"], it.param.device)
            if dkey not in dtypes:
                dtypes[dkey] = resolve_ns_dtype(g["ns_dtype"], it.param.device)
            key = (it.wide, it.flip, g["ns_method"], g["ns_steps"], thin, dtypes[dkey], it.param.device, it.param.dtype)
            buckets[key].append(it)
        rank, world = self.world()
        fsdp = any(sharded.is_sharded(it.param) for it in items)
        if fsdp:  # FSDP2: every matrix is sharded; owners balanced by NS FLOPs over the whole plan
            if not all(sharded.is_sharded(it.param) for it in items):
                raise RuntimeError("sharded Muon needs every Muon matrix sharded by fully_shard (or none)")
            _, rank, world = sharded.shard_group(items[0].param)
            owner = dict(zip(map(id, items), sharded.assign_owners(
                [sharded.ns_flops(*it.wide, it.group["ns_steps"]) for it in items], world)))
        offset = 0  # running position, so round-robin continues across buckets
        chunks: list[Chunk] = []
        for key, bucket in buckets.items():
            (r, c), _, method, steps, thin, cdtype, _, pdtype = key
            if fsdp:
                stack_dtype = pdtype if thin or method == "svd" else cdtype
                # each owner stacks about 1/world of a chunk: world x the single-process chunk size
                per_chunk = world * max(1, self.ns_chunk_bytes // max(1, r * c * stack_dtype.itemsize))
                for start in range(0, len(bucket), per_chunk):
                    part = bucket[start : start + per_chunk]
                    chunks.append(Chunk(part, [owner[id(it)] for it in part], rank, world, method, steps, thin,
                                        stack_dtype, True))
                continue
            shard = world > 1 and (not thin or self.shard_thin)
            stack_dtype = pdtype if thin or method == "svd" else cdtype
            chunk_bytes = self.ns_chunk_bytes
            if thin and not shard and bucket[0].param.device.type == "cpu":
                fused = fuse and _FusedThin.eligible_dtype(pdtype) and method != "svd"
                # fused: few large launches; else stay in cache end to end
                chunk_bytes = min(chunk_bytes, CPU_FUSED_CHUNK_BYTES if fused else self.cpu_block_bytes)
            elif not thin and not shard and method != "svd" and bucket[0].param.device.type == "cpu":
                # a few matrices per batched product: large stacks cost page faults and cache misses
                chunk_bytes = min(chunk_bytes, CPU_DIRECT_CHUNK_BYTES)
            per_chunk = max(1, chunk_bytes // max(1, r * c * stack_dtype.itemsize))
            if shard:
                per_chunk = max(world, per_chunk - per_chunk % world)
            for start in range(0, len(bucket), per_chunk):
                chunk = bucket[start : start + per_chunk]
                owners = [(offset + start + i) % world for i in range(len(chunk))] if shard else None
                chunks.append(Chunk(chunk, owners, rank, world, method, steps, thin, stack_dtype))
            if shard:
                offset += len(bucket)
        return chunks

    # ------------------------------------------------------------------ caches

    def kept(self, tag: tuple[Any, ...], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Uninitialised ``shape`` tensor viewing a buffer kept for the life of the plan (any size: the fused
        path's stacks are at most ``CPU_FUSED_CHUNK_BYTES``).  Same reuse rule as :meth:`scratch`."""
        n = math.prod(shape)
        buf = self._keep.get((tag, dtype))
        if buf is None or buf.numel() < n:
            buf = self._keep[(tag, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def scratch(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """Uninitialised ``shape`` tensor; on CPU, up to ``cpu_block_bytes``, a view of a buffer kept
        across steps (fresh multi-MiB allocations are page-faulted in on every use, ~20% of a LoRA
        step on CPU).  Callers must be done with it before the next request for the same tag."""
        n = math.prod(shape)
        if device.type != "cpu" or n * dtype.itemsize > self.cpu_block_bytes:  # big ones: not kept
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self._ws.get((tag, dtype))
        if buf is None or buf.numel() < n:
            buf = self._ws[(tag, dtype)] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def memoized(self, tag: str, chunk: list[Item], build: Any) -> Any:
        """``build()`` once per chunk of the cached plan (chunks live as long as the plan)."""
        key = (tag, id(chunk))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not chunk:
            hit = self._memo[key] = (chunk, build())
        return hit[1]

    def by_group(
        self, chunk: list[Item], outs: list[Tensor]
    ) -> list[tuple[dict[str, Any], float, list[Tensor], list[Tensor]]]:
        """``(group, scale, params, updates)`` per param group of ``chunk`` (one scale per group: a chunk
        holds one shape), in chunk order; the index lists are built once per chunk of the plan."""

        def index() -> list[tuple[dict[str, Any], float, list[Tensor], list[int] | None]]:
            sets: dict[tuple[int, float], tuple[dict[str, Any], list[Tensor], list[int]]] = {}
            for i, it in enumerate(chunk):
                entry = sets.setdefault((id(it.group), it.scale), (it.group, [], []))
                entry[1].append(it.param)
                entry[2].append(i)
            whole = len(sets) == 1
            return [(g, k[1], ps, None if whole else idx) for k, (g, ps, idx) in sets.items()]

        return [
            (g, s, ps, outs if idx is None else [outs[i] for i in idx])
            for g, s, ps, idx in self.memoized("apply", chunk, index)
        ]

    # ------------------------------------------------------------------ execution

    def _fill(self, chunk: list[Item], owned: list[bool], stack_dtype: torch.dtype, rule: UpdateRule) -> Tensor:
        """Momentum for every item; returns the wide stack (n_owned, r, c) of NS inputs of the owned ones
        (on CUDA a transposed view for tall matrices)."""
        it0 = chunk[0]
        device = it0.param.device
        n_own = sum(owned)
        if device.type == "cpu":
            X = self.scratch("stack", (n_own, *it0.wide), stack_dtype, device)
            # memory-bound: touch each matrix once, while it is in cache; one pass per op
            j = 0
            for it, own in zip(chunk, owned):
                g = it.group
                U.momentum_(it.buf, it.grad, g["momentum"])
                if own:
                    U.ns_input_(it.slot(X, j), it.as2d(it.grad), it.as2d(it.buf), g["momentum"], g["nesterov"])
                    j += 1
            rule._transform_stack(X)
            return X

        # CUDA: launch-bound, so foreach over the chunk and one stacking copy
        def groups() -> list[tuple[dict[str, Any], list[int], list[Tensor], list[Tensor]]]:
            by_group: dict[int, list[int]] = defaultdict(list)
            for i, it in enumerate(chunk):
                by_group[id(it.group)].append(i)
            return [
                (chunk[idx[0]].group, idx, [chunk[i].buf for i in idx], [chunk[i].as2d(chunk[i].buf) for i in idx])
                for idx in by_group.values()
            ]

        inputs: dict[int, Tensor] = {}
        for g, idx, bufs, bufs2d in self.memoized("fill", chunk, groups):
            U.momentum_(bufs, [chunk[i].grad for i in idx], g["momentum"])
            mine = [k for k, i in enumerate(idx) if owned[i]]
            if not mine:
                continue
            src = bufs2d if len(mine) == len(idx) else [bufs2d[k] for k in mine]
            grads = [chunk[idx[k]].as2d(chunk[idx[k]].grad) for k in mine] if g["nesterov"] else []
            inputs.update(zip([idx[k] for k in mine], U.ns_inputs(grads, src, g["momentum"], g["nesterov"])))
        if n_own == 0:
            return torch.empty((0, *it0.wide), dtype=stack_dtype, device=device)
        srcs = [inputs[i] for i in range(len(chunk)) if i in inputs]
        if srcs[0].dtype == stack_dtype:
            X = torch.stack(srcs)  # (n, rows, cols)
        else:
            X = torch.stack(srcs).to(stack_dtype)
        X = X.mT if it0.flip else X  # wide view (n, r, c)
        rule._transform_stack(X)
        return X

    @staticmethod
    def _ns(X: Tensor, method: str, steps: int, thin: bool) -> Tensor:
        """Orthogonalise the wide stack X (k, r, c) → O (k, r, c) (fp32 for the Gram path). Rectangular full
        matrices (c ≥ `GRAM_NS_MIN_ASPECT`·r) iterate on their short side (`_direct_gram`, with restarts): the
        same iterate at equal accuracy against fp64 NS (tests), fewer FLOPs (README "Optimizers")."""
        if method == "svd":
            return _svd_polar(X, X.dtype)
        coeffs = ns_coefficients(method, steps)
        scale = _PE_NORM_SCALE if method == "polar_express" else 1.0
        if thin:
            out = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
            return _gram(X, coeffs, scale, out)
        if X.shape[-1] >= GRAM_NS_MIN_ASPECT * X.shape[-2]:
            return _direct_gram(X, coeffs, scale)
        return _direct(X, coeffs, scale)

    def _chunk_local(self, chunk: Chunk, rule: UpdateRule) -> None:
        items = chunk.items
        X = self._fill(items, [True] * len(items), chunk.stack_dtype, rule)  # (k, r, c)
        self._done += len(items)
        if chunk.thin and chunk.method != "svd":
            coeffs = ns_coefficients(chunk.method, chunk.steps)
            scale = _PE_NORM_SCALE if chunk.method == "polar_express" else 1.0
            work = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
            ws = None
            if X.device.type == "cpu" and X.dtype != torch.float64:
                step64 = max(1, min(len(items), CPU_GRAM64_BYTES // max(1, X[0].numel() * 8)))
                ws = self.scratch("gram64", (step64, *X.shape[1:]), torch.float64, X.device)
            Q = _gram_q(X, coeffs, scale, workspace=ws).to(work)  # (k, r, r)
            Xw = X.to(work)
            if not rule._apply_gram(items, Q, Xw):
                rule._apply_updates(items, self.outs(items, torch.bmm(Q, Xw)))  # O = Q X, (k, r, c)
            return
        O = self._ns(X, chunk.method, chunk.steps, chunk.thin)
        rule._apply_updates(items, self.outs(items, O))

    def _chunk_sharded(self, chunk: Chunk, rule: UpdateRule) -> None:
        """Orthogonalise this rank's share of the chunk, all_gather everyone's results, apply all."""
        import torch.distributed as dist

        items, owners, world = chunk.items, chunk.owners, chunk.world
        owned = [o == chunk.rank for o in owners]
        n_mine = sum(owned)
        per_rank = max(owners.count(k) for k in range(world))
        X = self._fill(items, owned, chunk.stack_dtype, rule)
        O = self._ns(X, chunk.method, chunk.steps, chunk.thin) if n_mine else X
        self._done += n_mine
        comm_dtype = O.dtype
        if dist.get_backend(self.dist_group) == "gloo" and comm_dtype in (torch.bfloat16, torch.float16):
            comm_dtype = torch.float32
        send = torch.zeros((per_rank, *items[0].wide), dtype=comm_dtype, device=X.device)
        send[:n_mine].copy_(O)
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=self.dist_group)
        seen = [0] * world
        ordered = []
        for o in owners:
            ordered.append(recv[o][seen[o]])
            seen[o] += 1
        rule._apply_updates(items, self.outs(items, torch.stack(ordered)))

    @staticmethod
    def outs(chunk: list[Item], O: Tensor) -> list[Tensor]:
        """Per-parameter views of the wide results O (k, r, c); contiguous, param dtype on CUDA so
        the foreach update takes its fused multi-tensor path."""
        it0 = chunk[0]
        nat = O.mT if it0.flip else O  # (k, rows, cols)
        if nat.device.type != "cpu":
            nat = nat.to(dtype=it0.param.dtype, memory_format=torch.contiguous_format)
        views = nat.unbind(0)
        return [v if it.param.ndim == 2 else v.reshape(it.param.shape) for v, it in zip(views, chunk)]


def _collect(group: dict[str, Any], state: Any, rule: UpdateRule) -> list[Item]:
    """The Muon matrices of one group that have gradients (state created lazily by ``rule``)."""
    items = []
    scales: dict[tuple[int, ...], tuple[float, int, int]] = {}
    transposed, scaling = group["transposed"], group["scaling"]
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if g.is_sparse:
            raise RuntimeError("Muon does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError("Muon does not support complex parameters")
        st = state[p]
        if not st:
            rule._init_state(p, group, st)
        info = scales.get(p.shape)
        if info is None:
            rows, cols = p.shape[0], math.prod(p.shape[1:])
            info = scales[p.shape] = (U.update_scale(scaling, *U.logical_shape(p.shape, transposed)), rows, cols)
        items.append(Item(p, g, st["momentum_buffer"], group, *info))
    return items


class _FusedEntry(NamedTuple):
    chunk: Chunk
    M: Tensor  # (k, rows, cols) stacked momentum; the state's buffers are views of it
    key: tuple[int, str, int]  # (r, method, steps): which batched Gram iteration it joins
    offset: int  # its rows in that iteration's (n, r, r) stack
    pshape: tuple[int, ...]  # the (shared) parameter shape
    params: list[Tensor]
    groups: list[dict[str, Any]]  # distinct param groups, in chunk order
    uniform: bool  # one group and one scale: scalar coefficients
    native: bool  # CPU fp32 with r ≤ 64: the native kernel can run it (:mod:`muonft_cli.native`)


@dataclass
class _NativeCall:
    """One native-kernel call of a step (the matrices of one NS method and step count), built per plan."""

    coeffs: list[tuple[float, float, float]]
    norm_scale: float
    entries: list[_FusedEntry] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    mp: array = field(default_factory=lambda: array("q"))  # momentum pointers (views of the entries' stacked M)
    shapes: array = field(default_factory=lambda: array("q"))  # (rows, cols) per matrix, as stored
    max_numel: int = 1  # the largest matrix's element count
    scal: tuple[Any, array] | None = None  # (key, per-matrix scalars) of the last step, see _native_scal


class _FusedThin:
    """The fused step of every thin (Gram-path) matrix, for rules that opt in (``_fused_thin``, Muon), on
    CPU and CUDA (on CUDA it is the launch count that drops: ~6 launches per bucket and ~25 for the one
    iteration, instead of per-chunk iterations; not measured on a GPU yet).

    Per chunk (a ≤ ``CPU_FUSED_CHUNK_BYTES`` slice of one same-shape bucket) the step is a handful of
    whole-chunk launches and no per-matrix op: the gradients are stacked once, momentum and the Nesterov
    input are one op each on the stacked momentum (the state's ``momentum_buffer`` tensors are views of
    one (k, rows, cols) tensor per chunk: state_dict keys and values unchanged), the float64 Gram
    S = XXᵀ (or XᵀX, tall matrices as stored) goes into one stack per r, then ONE batched r×r iteration
    runs for every thin matrix of the step, and the update is ``O = (−η·s·Q) X`` (one bmm) added with one
    ``_foreach`` decay and one ``_foreach_add_``.  The Nesterov inputs X stay in stack buffers kept by the
    plan between the Gram and the apply (one fp32 copy of the thin parameters; recomputing them from G and M
    instead measured ~20 % slower on CPU).  On CPU (fp32) all of it is one native call instead
    (:meth:`_run_native`).
    """

    def __init__(self, entries: list[_FusedEntry], sizes: dict[tuple[int, str, int], int]) -> None:
        self.entries, self.sizes = entries, sizes
        self.ids = {id(e.chunk) for e in entries}
        self._native: tuple[tuple[int, ...], list[_NativeCall]] | None = None  # cached kernel calls

    @staticmethod
    def eligible_dtype(dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float64)

    @classmethod
    def build(cls, chunks: list[Chunk], state: Any) -> _FusedThin | None:
        entries: list[_FusedEntry] = []
        sizes: dict[tuple[int, str, int], int] = {}
        for chunk in chunks:
            items = chunk.items
            it0 = items[0]
            p0 = it0.param
            if not (chunk.thin and chunk.owners is None and not chunk.sharded and chunk.method != "svd"
                    and p0.device.type in ("cpu", "cuda")
                    and cls.eligible_dtype(p0.dtype)
                    and all(it.param.shape == p0.shape and it.param.dtype == p0.dtype
                            and it.param.is_contiguous() for it in items)):
                continue
            M = _stack_buffers(items, state)
            key = (min(it0.rows, it0.cols), chunk.method, chunk.steps)
            offset = sizes.get(key, 0)
            sizes[key] = offset + len(items)
            groups = list({id(it.group): it.group for it in items}.values())
            uniform = len(groups) == 1 and len({it.scale for it in items}) == 1
            native = p0.device.type == "cpu" and p0.dtype == M.dtype == torch.float32 and key[0] <= MAX_RANK
            entries.append(_FusedEntry(chunk, M, key, offset, tuple(p0.shape), [it.param for it in items],
                                       groups, uniform, native))
        return cls(entries, sizes) if entries else None

    def run(self, planner: StepPlanner, chunks: list[Chunk]) -> list[Chunk]:
        """Step every fused chunk; returns the chunks left for the general path (any whose groups disagree
        on momentum/Nesterov this step, and every non-fused one)."""
        todo, rest_ids = [], set()
        for e in self.entries:
            beta, nesterov = e.groups[0]["momentum"], e.groups[0]["nesterov"]
            if any(g["momentum"] != beta or g["nesterov"] != nesterov for g in e.groups[1:]):
                rest_ids.add(id(e.chunk))
                continue
            todo.append((e, beta, bool(nesterov and beta > 0.0)))
        rest = [c for c in chunks if id(c) not in self.ids or id(c) in rest_ids]
        if not todo:
            return rest
        if self._run_native(planner, todo):
            return rest
        f64 = torch.float64
        S = {key: planner.kept(("S", key), (n, key[0], key[0]), f64, todo[0][0].M.device)
             for key, n in self.sizes.items()}
        inputs = []
        for j, (e, beta, nesterov) in enumerate(todo):  # 1. momentum, NS input, float64 Gram
            X = self._input(planner, j, e, beta, nesterov)
            inputs.append(X)
            k = X.shape[0]
            step64 = max(1, min(k, CPU_GRAM64_BYTES // max(1, X[0].numel() * 8)))
            ws = planner.kept(("gram64",), (step64, *X.shape[1:]), f64, X.device)
            gram_matrix(X, e.chunk.items[0].flip, out=S[e.key][e.offset : e.offset + k], workspace=ws)
        Q = {}  # 2. one batched r×r iteration per (r, method, steps)
        for key in {e.key for e, _, _ in todo}:
            _, method, steps = key
            Q[key] = gram_iterate(S[key], ns_coefficients(method, steps),
                                  _PE_NORM_SCALE if method == "polar_express" else 1.0)
        for (e, _, _), X in zip(todo, inputs):  # 3. apply
            self._apply(planner, e, Q[e.key][e.offset : e.offset + X.shape[0]], X)
            planner._done += X.shape[0]
        return rest

    def _run_native(self, planner: StepPlanner, todo: list[tuple[_FusedEntry, float, bool]]) -> bool:
        """The whole step of ``todo`` in the native kernel (one call per NS method and step count), when
        every entry is native-eligible and every gradient a contiguous CPU fp32 tensor; returns whether it
        ran.  Same math as the torch path below, one matrix at a time: each is read from memory once.
        Per step only the pointers are gathered (and the per-matrix scalars when a group's lr, decay or
        momentum changed); the rest is built once per plan (:meth:`_native_calls`)."""
        if not (planner.native and all(e.native for e, _, _ in todo)):
            return False
        from muonft_cli.native import thin_kernel

        kernel = thin_kernel()
        if kernel is None:
            return False
        calls = self._native_calls(todo)
        cpu, data_ptr = torch.device("cpu"), Tensor.data_ptr
        grads = []
        for call in calls:  # map() over C-level getters: ~4× less Python per matrix than a generator
            gs = list(map(_GRAD_OF, call.items))
            if not (set(map(_DTYPE_OF, gs)) == _F32_ONLY and all(map(_IS_CPU, gs))
                    and all(map(Tensor.is_contiguous, gs))):
                return False
            grads.append(gs)
        threads = torch.get_num_threads()
        for call, gs in zip(calls, grads):
            need = kernel.scratch_bytes(call.max_numel, threads) + 64
            buf = planner.kept(("native",), (need,), torch.uint8, cpu)  # kept across steps
            addr = buf.data_ptr()
            scratch = addr + (-addr) % 64
            # array(list) is one C loop; array(iterator) appends item by item (~4× slower here)
            kernel.step(array("q", list(map(data_ptr, call.params))), array("q", list(map(data_ptr, gs))), call.mp,
                        call.shapes, self._native_scal(call, todo), call.coeffs, call.norm_scale, _NORM_EPS,
                        threads, scratch, need - (scratch - addr))
            planner._done += len(call.params)
            planner.native_done += len(call.params)
        return True

    def _native_calls(self, todo: list[tuple[_FusedEntry, float, bool]]) -> list[_NativeCall]:
        """The kernel calls for ``todo`` (one per NS method and step count), cached per set of entries:
        parameters, shapes and momentum-buffer pointers in order."""
        key = tuple(id(e) for e, _, _ in todo)
        if self._native is not None and self._native[0] == key:
            return self._native[1]
        by: dict[tuple[str, int], _NativeCall] = {}
        for e, _, _ in todo:
            _, method, steps = e.key
            call = by.get((method, steps))
            if call is None:
                call = by[(method, steps)] = _NativeCall(
                    ns_coefficients(method, steps), _PE_NORM_SCALE if method == "polar_express" else 1.0)
            m0, mstep = e.M.data_ptr(), e.M[0].numel() * e.M.element_size()
            call.entries.append(e)
            for i, it in enumerate(e.chunk.items):
                call.params.append(it.param)
                call.items.append(it)
                call.mp.append(m0 + i * mstep)
                call.shapes.extend((it.rows, it.cols))
                call.max_numel = max(call.max_numel, it.rows * it.cols)
        calls = list(by.values())
        self._native = (key, calls)
        return calls

    @staticmethod
    def _native_scal(call: _NativeCall, todo: list[tuple[_FusedEntry, float, bool]]) -> array:
        """(beta, nesterov, −lr·scale, 1 − lr·wd) per matrix of ``call``, rebuilt only when a group's lr,
        decay, momentum or Nesterov flag changed since the last step."""
        flags = {id(e): (beta, nesterov) for e, beta, nesterov in todo}
        key = tuple((flags[id(e)], tuple((g["lr"], g["weight_decay"]) for g in e.groups)) for e in call.entries)
        if call.scal is not None and call.scal[0] == key:
            return call.scal[1]
        scal = array("d")
        for e in call.entries:
            beta, nesterov = flags[id(e)]
            nest = 1.0 if nesterov else 0.0
            items = e.chunk.items
            if e.uniform:
                g = e.groups[0]
                lr, wd = g["lr"], g["weight_decay"]
                scal.extend(array("d", (beta, nest, -lr * items[0].scale, 1.0 - lr * wd)) * len(items))
            else:
                for it in items:
                    lr, wd = it.group["lr"], it.group["weight_decay"]
                    scal.extend((beta, nest, -lr * it.scale, 1.0 - lr * wd))
        call.scal = (key, scal)
        return scal

    @staticmethod
    def _input(planner: StepPlanner, j: int, e: _FusedEntry, beta: float, nesterov: bool) -> Tensor:
        """``M ← βM + G`` and the NS input ``X = G + βM`` (Nesterov; in chunk ``j``'s stack buffer, kept
        until the apply) or ``M``, stacked."""
        G = planner.kept(("stack", j) if nesterov else ("stack",), tuple(e.M.shape), e.M.dtype, e.M.device)
        torch.stack([it.grad for it in e.chunk.items], out=G.view(len(e.params), *e.pshape))
        torch.add(G, e.M, alpha=beta, out=e.M)  # the same op as update.momentum_ on one tensor
        if not nesterov:
            return e.M
        return torch.add(G, e.M, alpha=beta, out=G)  # update.ns_input_

    @staticmethod
    def _apply(planner: StepPlanner, e: _FusedEntry, Q: Tensor, X: Tensor) -> None:
        """``W ← (1 − ηλ)W − η·s·(QX)`` for the chunk (tall matrices: ``X Qᵀ``, as stored): one bmm and one
        ``_foreach`` pass over W — ``add_`` without decay, else ``lerp_(W, E, ηλ)`` with ``E = −(s/λ)·QX``
        (``W + ηλ(E − W)`` is the same update with the decay folded in)."""
        items = e.chunk.items
        if e.uniform:
            g = e.groups[0]
            lr, wd = g["lr"], g["weight_decay"]
            decay = lr * wd != 0.0
            coef: Any = -(items[0].scale / wd) if decay else -lr * items[0].scale
            weight: Any = lr * wd
        else:
            lrs = [it.group["lr"] for it in items]
            wds = [it.group["weight_decay"] if lr != 0.0 else 0.0 for it, lr in zip(items, lrs)]
            decay = any(lr * wd != 0.0 for lr, wd in zip(lrs, wds))
            if decay and not all(lr * wd != 0.0 for lr, wd in zip(lrs, wds)):  # mixed: decay apart
                torch._foreach_mul_(e.params, [1.0 - lr * wd for lr, wd in zip(lrs, wds)])
                decay = False
            coef = [-(it.scale / wd) if decay else -lr * it.scale for it, lr, wd in zip(items, lrs, wds)]
            coef = torch.tensor(coef, dtype=Q.dtype, device=Q.device)[:, None, None]
            weight = [lr * wd for lr, wd in zip(lrs, wds)]
        Qs = Q.mul(coef).to(X.dtype)
        O = planner.kept(("out",), tuple(X.shape), X.dtype, X.device)
        if items[0].flip:
            torch.bmm(X, Qs.mT, out=O)  # O = X Qᵀ: (k, rows, r) as stored
        else:
            torch.bmm(Qs, X, out=O)
        O_list = O.view(len(e.params), *e.pshape).unbind(0)
        if decay:
            torch._foreach_lerp_(e.params, O_list, weight)
        else:
            torch._foreach_add_(e.params, O_list)


def _stack_buffers(items: list[Item], state: Any) -> Tensor:
    """The chunk's momentum buffers as one (k, rows, cols) tensor: the existing one when they are already
    consecutive views of it (built by an earlier plan or loaded that way), else a new one the values are
    copied into, whose views replace ``state[p]["momentum_buffer"]`` (and ``Item.buf``)."""
    it0 = items[0]
    b0 = it0.buf
    shape = (len(items), it0.rows, it0.cols)
    n, esz = b0.numel(), b0.element_size()
    storage = b0.untyped_storage()
    if all(it.buf.is_contiguous() and it.buf.dtype == b0.dtype and it.buf.untyped_storage().data_ptr()
           == storage.data_ptr() and it.buf.data_ptr() == b0.data_ptr() + i * n * esz for i, it in enumerate(items)):
        return b0.new_empty(0).set_(storage, b0.storage_offset(), shape)
    M = torch.empty(shape, dtype=b0.dtype, device=b0.device)
    for i, it in enumerate(items):
        M[i].copy_(it.as2d(it.buf))
        view = M[i].view(it.buf.shape)
        state[it.param]["momentum_buffer"] = view
        it.buf = view
    return M

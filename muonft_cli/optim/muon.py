"""Muon-family optimizers (Muon, AdaMuon, NorMuon) with a built-in auxiliary AdamW group.

Layers, as in KellerJordan/Muon: the pure orthogonalisation (:mod:`.orthogonalize`), the shared
batching/distribution machinery (:class:`MuonFamily`), and per-algorithm update rules
(``_apply_updates`` of :class:`Muon` / :class:`AdaMuon` / :class:`NorMuon`) that own the state.

One optimizer object holds every trainable parameter: param groups carry ``kind="muon"`` (hidden
matrices, LoRA A/B) or ``kind="adamw"`` (embeddings, heads, 1-D tensors; AdamW of Loshchilov & Hutter,
REFERENCE.md Eq. 3–5, run by torch's own functional ``adam(..., decoupled_weight_decay=True)``), so LR
schedulers, checkpoints and HF ``Trainer(optimizers=(opt, sched))`` see one thing.

Muon (paper §2.1, App. B; REFERENCE.md "Muon"), per matrix W (logical shape m×n = out×in):

    M ← β·M + G                       (classic momentum, the paper's / Moonlight's)
    U = G + β·M  (Nesterov)  or  M
    O = NS(U)                          (orthogonalize: NS5 or Polar Express, batched per shape)
    W ← W − η·λ·W − η·s·O              s = 0.2·√max(m, n)  ("match_rms_adamw", Moonlight, default)
                                       s = √max(1, m/n)     ("original", Keller Jordan)
                                       s = 1                ("none")

Keller Jordan's / torch.optim.Muon's EMA momentum ``B ← βB + (1−β)G`` equals ``(1−β)·M``, so it gives
the same orthogonalised direction; no option is needed.  Weights with more than two dims are
flattened to (out, −1).

Performance: same-shape matrices (tall ones transposed) are stacked and orthogonalised in one
batched call, in chunks of at most ``ns_chunk_bytes`` of stacked input (bounded extra memory); thin
matrices (min dim ≤ 64, LoRA) use the Gram-space path.  On CUDA momentum/updates are
``torch._foreach_*`` ops; on CPU (memory-bound) each matrix is updated once while in cache, in
~4 MiB blocks, and Muon applies Gram-path updates with one fused ``addmm_`` per matrix.
The bucketing/chunking plan (and per-chunk index and tensor lists) is built once and reused while
the param groups, the set of parameters with gradients and the state dict object are unchanged;
on CPU the stacked input, its float64 Gram sub-blocks and the output blocks live in scratch
buffers reused across steps (fresh multi-MiB allocations are page-faulted in every step).

Distributed NS (used by the engine under torchrun, with DDP-synchronised gradients): after
``opt.set_distributed()`` the i-th direct-path matrix (one running index over the same-shape buckets,
in an order every rank derives identically) is orthogonalised only by rank ``i mod world_size``; the
results are exchanged with ``torch.distributed.all_gather`` (one collective per chunk) so every rank
applies the same update and keeps identical state.  Gram-path (thin) matrices are computed by every
rank unless ``set_distributed(shard_thin=True)``: their NS costs about as much as sending the result.
``opt.ns_matrices_done`` / ``opt.ns_matrices_last_step`` count the matrices this rank orthogonalised.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam

from .orthogonalize import (
    _METHODS,
    _PE_NORM_SCALE,
    GRAM_MAX_DIM,
    _direct,
    _gram,
    _gram_q,
    _svd_polar,
    ns_coefficients,
    resolve_ns_dtype,
)

__all__ = ["MuonFamily", "Muon", "AdaMuon", "NorMuon", "SCALINGS", "update_scale"]

SCALINGS = ("match_rms_adamw", "original", "none")
_KINDS = ("muon", "adamw")
_DEFAULT_CHUNK_BYTES = 512 * 2**20
_CPU_BLOCK_BYTES = 4 * 2**20  # Gram-path blocks on CPU: fill → Gram → update while in cache
_CPU_GRAM64_BYTES = 1 * 2**20  # float64 copy per Gram sub-block on CPU (L2-sized; 4 MiB measured ~15% slower)


def update_scale(scaling: str, out_features: int, in_features: int) -> float:
    """Muon's update multiplier ``s`` for a logical ``out×in`` matrix (see module docstring)."""
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(out_features, in_features))
    if scaling == "original":
        return math.sqrt(max(1.0, out_features / in_features))
    if scaling == "none":
        return 1.0
    raise ValueError(f"unknown Muon scaling {scaling!r}; expected one of {SCALINGS}")


def _logical_shape(p: Tensor, transposed: bool) -> tuple[int, int]:
    """(out, in) of the matrix a parameter represents; ``transposed`` = stored as (in, out) (GPT-2 Conv1D)."""
    rows, cols = p.shape[0], math.prod(p.shape[1:])
    return (cols, rows) if transposed else (rows, cols)


def _as2d(t: Tensor, it: "_Item") -> Tensor:
    return t if t.ndim == 2 else t.reshape(it.rows, it.cols)


class _Item:
    """One Muon matrix in this step: parameter, gradient, momentum buffer, its 2-D layout and scale."""

    __slots__ = ("param", "grad", "buf", "group", "rows", "cols", "scale", "flip")

    def __init__(
        self, param: Tensor, grad: Tensor, buf: Tensor, group: dict[str, Any], scale: float, rows: int, cols: int
    ) -> None:
        self.param, self.grad, self.buf, self.group, self.scale = param, grad, buf, group, scale
        self.rows, self.cols = rows, cols  # (out, -1) flattening as stored
        self.flip = rows > cols  # tall matrices are stacked transposed (wide)

    def slot(self, X: Tensor, i: int) -> Tensor:
        """Stack slot i viewed in this matrix's stored (rows, cols) orientation."""
        return X[i].mT if self.flip else X[i]


class MuonFamily(torch.optim.Optimizer):
    """Shared machinery of :class:`Muon`, :class:`AdaMuon` and :class:`NorMuon`.

    Param groups may set ``kind`` to ``"muon"`` (default) or ``"adamw"``; AdamW groups use ``betas``
    and ``eps`` (defaults ``adamw_betas``/``adamw_eps``) and their own ``lr``/``weight_decay``.  A Muon
    group may set ``transposed=True`` when its weights are stored (in, out) (GPT-2 ``Conv1D``), so
    shape-dependent scalings use the true out×in orientation.

    Execution: Muon matrices are bucketed by wide 2-D shape (tall ones transposed) and processed in
    chunks of at most ``ns_chunk_bytes`` of stacked input.
    On CUDA momentum and updates are ``torch._foreach_*`` ops (launch-bound); on CPU (memory-bound)
    the momentum update, Nesterov input and stacking run per matrix while it is in cache, and Muon
    applies Gram-path updates with one fused ``addmm_`` (decay + update) per matrix.
    """


    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scaling: str = "match_rms_adamw",
        ns_steps: int = 5,
        ns_method: str = "jordan",
        ns_dtype: torch.dtype | str | None = "auto",
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_chunk_bytes: int = _DEFAULT_CHUNK_BYTES,
        **extra_defaults: Any,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown Muon scaling {scaling!r}; expected one of {SCALINGS}")
        if ns_method not in _METHODS:
            raise ValueError(f"unknown ns_method {ns_method!r}; expected one of {_METHODS}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if ns_chunk_bytes < 1:
            raise ValueError(f"ns_chunk_bytes must be >= 1, got {ns_chunk_bytes}")
        beta2 = extra_defaults.get("beta2")  # AdaMuon / NorMuon second-moment decay (None: AdaMuon uses β)
        if beta2 is not None and not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        resolve_ns_dtype(ns_dtype, "cpu")  # validates the name
        if isinstance(ns_dtype, torch.dtype):
            ns_dtype = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}.get(
                ns_dtype, ns_dtype
            )
        defaults = dict(
            kind="muon",
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            scaling=scaling,
            ns_steps=ns_steps,
            ns_method=ns_method,
            ns_dtype=ns_dtype if ns_dtype is not None else "auto",
            transposed=False,
            betas=tuple(adamw_betas),
            eps=adamw_eps,
            **extra_defaults,
        )
        super().__init__(params, defaults)
        self.ns_chunk_bytes = int(ns_chunk_bytes)
        self.cpu_block_bytes = _CPU_BLOCK_BYTES
        self._plan: tuple[Any, list[tuple], list[_Item]] | None = None  # (key, chunks, items)
        self._memo: dict[tuple[str, int], Any] = {}  # per-chunk index lists of the cached plan
        self._ws: dict[tuple[str, torch.dtype], Tensor] = {}  # CPU scratch buffers, reused every step
        self.ns_matrices_done = 0
        self.ns_matrices_last_step = 0
        self._dist_group: Any = None
        self._dist_enabled = False
        self._shard_thin = False
        for group in self.param_groups:
            self._check_group(group)

    # ------------------------------------------------------------------ set-up

    def _check_group(self, group: dict[str, Any]) -> None:
        kind = group["kind"]
        if kind not in _KINDS:
            raise ValueError(f"param group kind must be one of {_KINDS}, got {kind!r}")
        if kind == "muon":
            if group["scaling"] not in SCALINGS:
                raise ValueError(f"unknown Muon scaling {group['scaling']!r}; expected one of {SCALINGS}")
            if group["ns_method"] not in _METHODS:
                raise ValueError(f"unknown ns_method {group['ns_method']!r}; expected one of {_METHODS}")
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(
                        f"Muon got a {p.ndim}-D parameter of shape {tuple(p.shape)}; Muon only "
                        "updates matrices — put 1-D parameters (norms, biases, DoRA magnitudes) in a "
                        "group with kind='adamw' (split_params/build_optimizer do this)"
                    )
                if group["transposed"] and p.ndim != 2:
                    raise ValueError("transposed=True is only meaningful for 2-D (Conv1D) weights")

    def add_param_group(self, param_group: dict[str, Any]) -> None:  # noqa: D102
        super().add_param_group(param_group)
        if hasattr(self, "ns_matrices_done"):  # after __init__
            self._check_group(self.param_groups[-1])

    def set_distributed(self, group: Any = None, *, enabled: bool = True, shard_thin: bool = False) -> None:
        """Split the orthogonalisation work over the ranks of a ``torch.distributed`` process group.

        Every rank must hold identical gradients (e.g. DDP-synchronised) and the same parameters with
        gradients.  Rank ``k`` orthogonalises the matrices at positions ``i ≡ k (mod world_size)`` of
        the same-shape buckets (one running position across buckets, in param-group order); results
        are exchanged with ``all_gather`` (one collective per chunk) so all ranks apply the same update
        and keep identical optimizer state.  Works with gloo (CPU) and NCCL (GPU).

        Thin matrices (Gram path, e.g. LoRA A/B) are by default orthogonalised by every rank: their
        NS costs O(r²·c), the same order as sending the result, so sharding them only adds traffic.
        ``shard_thin=True`` shards them too.

        Args:
            group: process group (``None`` = the default group).
            enabled: ``False`` turns sharding off again.
            shard_thin: also shard Gram-path matrices.

        Raises:
            RuntimeError: ``torch.distributed`` is not initialised.
        """
        if not enabled:
            self._dist_enabled, self._dist_group, self._shard_thin = False, None, False
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "set_distributed() needs an initialised torch.distributed process group "
                "(call torch.distributed.init_process_group first, e.g. under torchrun)"
            )
        self._dist_enabled, self._dist_group, self._shard_thin = True, group, bool(shard_thin)

    def _world(self) -> tuple[int, int]:
        if not self._dist_enabled:
            return 0, 1
        import torch.distributed as dist

        return dist.get_rank(self._dist_group), dist.get_world_size(self._dist_group)

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimisation step over all groups (Muon groups batched together)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "adamw":
                self._adamw_group_step(group)
        self.ns_matrices_last_step = 0
        self._run_plan(self._current_plan())
        for it in self._plan[2]:
            it.grad = None  # the plan must not keep gradients alive past zero_grad(set_to_none=True)
        self.ns_matrices_done += self.ns_matrices_last_step
        return loss

    def _adamw_group_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW group does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        fused = all(p.device.type == "cuda" for p in params) and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
        )
        if fused:  # the fused kernel wants its step counters on the device
            for i, s in enumerate(steps):
                if s.device != params[i].device:
                    s = s.to(params[i].device)
                    self.state[params[i]]["step"] = s
                    steps[i] = s
        _adam(  # torch's own AdamW math (torch.optim.AdamW = Adam with decoupled decay)
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None if fused else True,
            fused=True if fused else None,
            decoupled_weight_decay=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _collect(self, group: dict[str, Any]) -> list[_Item]:
        """The Muon matrices of one group that have gradients (state created lazily)."""
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
            state = self.state[p]
            if not state:
                self._init_state(p, group, state)
            info = scales.get(p.shape)
            if info is None:
                rows, cols = p.shape[0], math.prod(p.shape[1:])
                out_f, in_f = (cols, rows) if transposed else (rows, cols)
                info = scales[p.shape] = (update_scale(scaling, out_f, in_f), rows, cols)
            items.append(_Item(p, g, state["momentum_buffer"], group, *info))
        return items

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _transform_stack(self, X: Tensor) -> None:
        """Hook applied to the stacked NS input in place (AdaMuon: sign)."""

    # ------------------------------------------------------------------ batched NS

    def _plan_key(self) -> tuple:
        """What the cached step plan depends on: groups, their shape-relevant options, which params
        have gradients, the state dict object (``load_state_dict`` replaces it) and the sharding."""
        key: list[Any] = [id(self.state), self._dist_enabled, id(self._dist_group), self._shard_thin]
        for group in self.param_groups:
            if group["kind"] != "muon":
                continue
            key.append((id(group), group["scaling"], group["ns_method"], group["ns_steps"], group["ns_dtype"],
                        group["transposed"], tuple(id(p) for p in group["params"] if p.grad is not None)))
        return tuple(key)

    def _current_plan(self) -> list[tuple]:
        """The step plan (buckets → chunks), built once and reused while :meth:`_plan_key` is
        unchanged; only gradient references are refreshed per step (no per-matrix set-up work)."""
        key = self._plan_key()
        if self._plan is not None and self._plan[0] == key:
            for it in self._plan[2]:
                g = it.param.grad
                if g.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                it.grad = g
            return self._plan[1]
        items: list[_Item] = []
        for group in self.param_groups:
            if group["kind"] == "muon":
                items.extend(self._collect(group))
        chunks = self._build_chunks(items)
        self._plan, self._memo = (key, chunks, items), {}
        return chunks

    def _run_plan(self, chunks: list[tuple]) -> None:
        for chunk, owners, rank, world, method, steps, thin, stack_dtype in chunks:
            if owners is not None:
                self._chunk_sharded(chunk, owners, rank, world, method, steps, thin, stack_dtype)
            else:
                self._chunk_local(chunk, method, steps, thin, stack_dtype)

    def _orthogonalize_and_apply(self, items: list[_Item]) -> None:
        self._run_plan(self._build_chunks(items))

    def _build_chunks(self, items: list[_Item]) -> list[tuple]:
        """Bucket the matrices by wide shape/method/dtype and split buckets into chunks:
        ``(chunk, owners or None, rank, world, method, steps, thin, stack_dtype)`` tuples."""
        buckets: dict[tuple, list[_Item]] = defaultdict(list)
        dtypes: dict[tuple, torch.dtype] = {}
        for it in items:
            g = it.group
            thin = min(it.rows, it.cols) <= GRAM_MAX_DIM and g["ns_method"] != "svd"
            dkey = (g["ns_dtype"], it.param.device)
            if dkey not in dtypes:
                dtypes[dkey] = resolve_ns_dtype(g["ns_dtype"], it.param.device)
            shape = (it.cols, it.rows) if it.flip else (it.rows, it.cols)
            key = (shape, it.flip, g["ns_method"], g["ns_steps"], thin, dtypes[dkey], it.param.device, it.param.dtype)
            buckets[key].append(it)
        rank, world = self._world()
        offset = 0  # running position, so round-robin continues across buckets
        chunks: list[tuple] = []
        for key, bucket in buckets.items():
            (r, c), _, method, steps, thin, cdtype, _, pdtype = key
            shard = world > 1 and (not thin or self._shard_thin)
            stack_dtype = pdtype if thin or method == "svd" else cdtype
            chunk_bytes = self.ns_chunk_bytes
            if thin and not shard and bucket[0].param.device.type == "cpu":
                chunk_bytes = min(chunk_bytes, self.cpu_block_bytes)  # stay in cache end to end
            per_chunk = max(1, chunk_bytes // max(1, r * c * stack_dtype.itemsize))
            if shard:
                per_chunk = max(world, per_chunk - per_chunk % world)
            for start in range(0, len(bucket), per_chunk):
                chunk = bucket[start : start + per_chunk]
                owners = [(offset + start + i) % world for i in range(len(chunk))] if shard else None
                chunks.append((chunk, owners, rank, world, method, steps, thin, stack_dtype))
            if shard:
                offset += len(bucket)
        return chunks

    def _scratch(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
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

    def _memoized(self, tag: str, chunk: list[_Item], build: Any) -> Any:
        """``build()`` once per chunk of the cached plan (chunks live as long as the plan)."""
        key = (tag, id(chunk))
        hit = self._memo.get(key)
        if hit is None or hit[0] is not chunk:
            hit = self._memo[key] = (chunk, build())
        return hit[1]

    def _fill(self, chunk: list[_Item], owned: list[bool], stack_dtype: torch.dtype) -> Tensor:
        """Momentum ``M ← βM + G`` for every item; returns the wide stack (n_owned, r, c) of NS inputs
        (``G + βM`` or ``M``) of the owned ones (on CUDA a transposed view for tall matrices)."""
        it0 = chunk[0]
        device = it0.param.device
        n_own = sum(owned)
        if device.type == "cpu":
            shape = (it0.cols, it0.rows) if it0.flip else (it0.rows, it0.cols)  # wide (r, c)
            X = self._scratch("stack", (n_own, *shape), stack_dtype, device)
            # memory-bound: touch each matrix once, while it is in cache; one pass per op
            j = 0
            for it, own in zip(chunk, owned):
                g = it.group
                beta = g["momentum"]
                torch.add(it.grad, it.buf, alpha=beta, out=it.buf)  # M ← G + βM
                if not own:
                    continue
                slot = it.slot(X, j)
                j += 1
                grad2 = it.grad.view(it.rows, it.cols) if it.grad.ndim != 2 else it.grad
                buf2 = it.buf.view(it.rows, it.cols) if it.buf.ndim != 2 else it.buf
                if g["nesterov"] and beta > 0.0:
                    if slot.dtype == grad2.dtype:
                        torch.add(grad2, buf2, alpha=beta, out=slot)  # G + βM into the stack
                    else:
                        slot.copy_(torch.add(grad2, buf2, alpha=beta))
                else:
                    slot.copy_(buf2)
            self._transform_stack(X)
            return X
        # CUDA: launch-bound, so foreach over the chunk and one stacking copy
        def groups() -> list[tuple[dict[str, Any], list[int], list[Tensor], list[Tensor]]]:
            by_group: dict[int, list[int]] = defaultdict(list)
            for i, it in enumerate(chunk):
                by_group[id(it.group)].append(i)
            return [
                (chunk[idx[0]].group, idx, [chunk[i].buf for i in idx], [_as2d(chunk[i].buf, chunk[i]) for i in idx])
                for idx in by_group.values()
            ]

        inputs: dict[int, Tensor] = {}
        for g, idx, bufs, bufs2d in self._memoized("fill", chunk, groups):
            beta = g["momentum"]
            torch._foreach_mul_(bufs, beta)
            torch._foreach_add_(bufs, [chunk[i].grad for i in idx])  # M ← βM + G
            mine = [k for k, i in enumerate(idx) if owned[i]]
            if not mine:
                continue
            everyone = len(mine) == len(idx)
            src = bufs2d if everyone else [bufs2d[k] for k in mine]
            if g["nesterov"] and beta > 0.0:
                grads = [_as2d(chunk[idx[k]].grad, chunk[idx[k]]) for k in mine]
                src = torch._foreach_add(grads, src, alpha=beta)  # G + βM
            inputs.update(zip([idx[k] for k in mine], src))
        if n_own == 0:
            shape = (it0.cols, it0.rows) if it0.flip else (it0.rows, it0.cols)
            return torch.empty((0, *shape), dtype=stack_dtype, device=device)
        srcs = [inputs[i] for i in range(len(chunk)) if i in inputs]
        if srcs[0].dtype == stack_dtype:
            X = torch.stack(srcs)  # (n, rows, cols)
        else:
            X = torch.stack(srcs).to(stack_dtype)
        X = X.mT if it0.flip else X  # wide view (n, r, c)
        self._transform_stack(X)
        return X

    def _ns(self, X: Tensor, method: str, steps: int, thin: bool) -> Tensor:
        """Orthogonalise the wide stack X (k, r, c) → O (k, r, c) (fp32 for the Gram path)."""
        if method == "svd":
            return _svd_polar(X, X.dtype)
        coeffs = ns_coefficients(method, steps)
        scale = _PE_NORM_SCALE if method == "polar_express" else 1.0
        if thin:
            out = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
            return _gram(X, coeffs, scale, out)
        return _direct(X, coeffs, scale)

    def _chunk_local(self, chunk: list[_Item], method: str, steps: int, thin: bool, stack_dtype: torch.dtype) -> None:
        X = self._fill(chunk, [True] * len(chunk), stack_dtype)  # (k, r, c)
        self.ns_matrices_last_step += len(chunk)
        if thin and method != "svd":
            coeffs = ns_coefficients(method, steps)
            scale = _PE_NORM_SCALE if method == "polar_express" else 1.0
            work = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
            ws = None
            if X.device.type == "cpu" and X.dtype != torch.float64:
                step64 = max(1, min(len(chunk), _CPU_GRAM64_BYTES // max(1, X[0].numel() * 8)))
                ws = self._scratch("gram64", (step64, *X.shape[1:]), torch.float64, X.device)
            Q = _gram_q(X, coeffs, scale, workspace=ws).to(work)  # (k, r, r)
            self._apply_gram(chunk, Q, X.to(work))
            return
        O = self._ns(X, method, steps, thin)
        self._apply_updates(chunk, self._outs(chunk, O))

    def _chunk_sharded(
        self,
        chunk: list[_Item],
        owners: list[int],
        rank: int,
        world: int,
        method: str,
        steps: int,
        thin: bool,
        stack_dtype: torch.dtype,
    ) -> None:
        """Orthogonalise this rank's share of ``chunk``, all_gather everyone's results, apply all."""
        import torch.distributed as dist

        it0 = chunk[0]
        shape = (it0.cols, it0.rows) if it0.flip else (it0.rows, it0.cols)  # wide (r, c)
        owned = [o == rank for o in owners]
        n_mine = sum(owned)
        per_rank = max(owners.count(k) for k in range(world))
        X = self._fill(chunk, owned, stack_dtype)
        O = self._ns(X, method, steps, thin) if n_mine else X
        self.ns_matrices_last_step += n_mine
        comm_dtype = O.dtype
        if dist.get_backend(self._dist_group) == "gloo" and comm_dtype in (torch.bfloat16, torch.float16):
            comm_dtype = torch.float32
        send = torch.zeros((per_rank, *shape), dtype=comm_dtype, device=X.device)
        send[:n_mine].copy_(O)
        recv = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(recv, send, group=self._dist_group)
        seen = [0] * world
        ordered = []
        for o in owners:
            ordered.append(recv[o][seen[o]])
            seen[o] += 1
        self._apply_updates(chunk, self._outs(chunk, torch.stack(ordered)))

    # ------------------------------------------------------------------ updates

    def _apply_gram(self, chunk: list[_Item], Q: Tensor, X: Tensor) -> None:
        """Apply Gram-path results ``O = Q X`` (wide stack); default: materialise O."""
        O = torch.bmm(Q, X)  # (k, r, c)
        self._apply_updates(chunk, self._outs(chunk, O))

    @staticmethod
    def _outs(chunk: list[_Item], O: Tensor) -> list[Tensor]:
        """Per-parameter views of the wide results O (k, r, c); contiguous, param dtype on CUDA so
        the foreach update takes its fused multi-tensor path."""
        it0 = chunk[0]
        nat = O.mT if it0.flip else O  # (k, rows, cols)
        if nat.device.type != "cpu":
            nat = nat.to(dtype=it0.param.dtype, memory_format=torch.contiguous_format)
        views = nat.unbind(0)
        return [v if it.param.ndim == 2 else v.reshape(it.param.shape) for v, it in zip(views, chunk)]

    def _apply_updates(self, chunk: list[_Item], outs: list[Tensor]) -> None:
        raise NotImplementedError  # implemented by each optimizer below

    @staticmethod
    def _decay(params: list[Tensor], lr: float, weight_decay: float) -> None:
        if weight_decay != 0.0 and lr != 0.0:
            torch._foreach_mul_(params, 1.0 - lr * weight_decay)  # W ← W − ηλW (decoupled)

    def _by_group_and_scale(
        self, chunk: list[_Item], outs: list[Tensor]
    ) -> dict[tuple[int, float], tuple[dict[str, Any], list[Tensor], list[Tensor]]]:
        def index() -> list[tuple[tuple[int, float], dict[str, Any], list[Tensor], list[int] | None]]:
            sets: dict[tuple[int, float], tuple[dict[str, Any], list[Tensor], list[int]]] = {}
            for i, it in enumerate(chunk):
                entry = sets.setdefault((id(it.group), it.scale), (it.group, [], []))
                entry[1].append(it.param)
                entry[2].append(i)
            whole = len(sets) == 1
            return [(k, g, ps, None if whole else idx) for k, (g, ps, idx) in sets.items()]

        return {
            k: (g, ps, outs if idx is None else [outs[i] for i in idx])
            for k, g, ps, idx in self._memoized("apply", chunk, index)
        }


class Muon(MuonFamily):
    """Muon for hidden matrices plus an auxiliary AdamW for ``kind="adamw"`` groups.

    Update per matrix (module docstring): ``M ← βM + G``; ``O = NS(G + βM)`` (Nesterov) or ``NS(M)``;
    ``W ← W − η·λ·W − η·s·O`` with ``s`` from ``scaling``.

    Args:
        params: parameters or param groups (groups may carry ``kind``/``transposed``/any option).
        lr: learning rate η (Muon groups; AdamW groups default to it too unless they set ``lr``).
        momentum: β (0.95 in the paper).
        nesterov: orthogonalise ``G + βM`` instead of ``M``.
        weight_decay: decoupled weight decay λ.
        scaling: ``"match_rms_adamw"`` (0.2·√max(m, n), default), ``"original"`` (√max(1, m/n)) or
            ``"none"``.
        ns_steps: orthogonalisation iterations (5).
        ns_method: ``"jordan"`` (NS5), ``"polar_express"`` (Muon-PE) or ``"svd"`` (exact; slow).
        ns_dtype: ``"auto"`` (bf16 on CUDA / CPUs with native bf16 matmul, else fp32), ``"bf16"``,
            ``"fp32"`` or a torch dtype; thin matrices always use the fp64 Gram-space path.
        adamw_betas: default betas of ``kind="adamw"`` groups ((0.9, 0.95), the paper's Muon runs).
        adamw_eps: default eps of ``kind="adamw"`` groups.
        ns_chunk_bytes: max bytes of stacked NS input per batched call (bounds extra memory).
    """

    def _apply_updates(self, chunk: list[_Item], outs: list[Tensor]) -> None:
        for (_, s), (g, params, updates) in self._by_group_and_scale(chunk, outs).items():
            self._decay(params, g["lr"], g["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-g["lr"] * s)

    def _apply_gram(self, chunk: list[_Item], Q: Tensor, X: Tensor) -> None:
        if X.device.type != "cpu" or not all(it.param.is_contiguous() for it in chunk):
            super()._apply_gram(chunk, Q, X)
            return
        # CPU: W ← (1 − ηλ)·W − η·s·(QX) as one addmm_ per wide matrix (no O materialised); tall
        # ones (stored transposed in the stack) take one bmm for the block, then a strided add.
        first = next((i for i, it in enumerate(chunk) if it.flip), len(chunk))  # chunks are all wide or all tall
        O_t = None
        if first < len(chunk):
            O_t = self._scratch("out", tuple(X[first:].shape), X.dtype, X.device)
            torch.bmm(Q[first:], X[first:], out=O_t)  # (f, r, c)
        j = 0
        for i, it in enumerate(chunk):
            g = it.group
            lr, decay = g["lr"], 1.0 - g["lr"] * g["weight_decay"]
            w2 = it.param.view(it.rows, it.cols)
            if it.flip:
                wt = w2.mT  # (r, c) view of the (c, r) weight
                if decay != 1.0:
                    wt.mul_(decay)
                wt.add_(O_t[j], alpha=-lr * it.scale)
                j += 1
            else:
                w2.addmm_(Q[i], X[i], beta=decay, alpha=-lr * it.scale)


class AdaMuon(MuonFamily):
    """AdaMuon (Si et al., seed 003, Algorithm 1), implemented exactly as the paper's algorithm.

    Per matrix W (m×n)::

        M ← β·M + G
        O = NS(sign(M))
        V ← β·V + (1 − β)·O ⊙ O              (no bias correction)
        Ô = O ⊘ (√V + ε)
        γ = 0.2·√(m·n) / ‖Ô‖_F
        W ← W − η·(γ·Ô + λ·W)

    Differences from the authors' released code (which this class does NOT follow by default): the
    code uses Nesterov momentum (``sign(G + βM)``) and a separate second-moment β₂ = 0.999 with bias
    correction; here ``nesterov=False`` and ``V`` uses the same β with no bias correction, as in
    Algorithm 1 (the RMS alignment γ cancels any constant bias in V).  ``nesterov=True`` and ``beta2``
    are available as options.  The ``scaling`` option does not apply: γ is AdaMuon's own RMS alignment.

    Args:
        params: parameters or param groups (see :class:`Muon`).
        lr: learning rate η.
        momentum: β (first and, by default, second moment).
        nesterov: use ``sign(G + βM)`` (authors' code) instead of ``sign(M)`` (Algorithm 1, default).
        weight_decay: decoupled weight decay λ.
        eps: ε in ``√V + ε``.
        beta2: second-moment decay; ``None`` = ``momentum`` (Algorithm 1).
        **kwargs: ``ns_steps``, ``ns_method``, ``ns_dtype``, ``adamw_betas``, ``adamw_eps``,
            ``ns_chunk_bytes`` as for :class:`Muon`.
    """


    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        eps: float = 1e-8,
        beta2: float | None = None,
        scaling: str = "match_rms_adamw",
        **kwargs: Any,
    ) -> None:
        if scaling != "match_rms_adamw":
            raise ValueError(
                "AdaMuon has its own RMS alignment (γ = 0.2·√(mn)/‖Ô‖_F); set "
                f"optimizer.scaling=match_rms_adamw (got {scaling!r})"
            )
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         scaling=scaling, adamuon_eps=eps, beta2=beta2, **kwargs)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._init_state(p, group, state)
        state["second_moment"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _transform_stack(self, X: Tensor) -> None:
        X.sign_()  # O = NS(sign(M)): sign-stabilised direction

    def _apply_updates(self, chunk: list[_Item], outs: list[Tensor]) -> None:
        by_group: dict[int, tuple[dict[str, Any], list[_Item], list[Tensor]]] = {}
        for it, o in zip(chunk, outs):
            by_group.setdefault(id(it.group), (it.group, [], []))
            by_group[id(it.group)][1].append(it)
            by_group[id(it.group)][2].append(o.to(it.param.dtype))
        for g, its, O in by_group.values():
            params = [it.param for it in its]
            beta = g["beta2"] if g["beta2"] is not None else g["momentum"]
            V = [self.state[p]["second_moment"] for p in params]
            torch._foreach_mul_(V, beta)
            torch._foreach_addcmul_(V, O, O, value=1.0 - beta)  # V ← βV + (1−β)O⊙O
            denom = torch._foreach_sqrt(V)
            torch._foreach_add_(denom, g["adamuon_eps"])
            O_hat = torch._foreach_div(O, denom)  # Ô = O ⊘ (√V + ε)
            norms = torch._foreach_norm(O_hat)
            gammas = [
                (0.2 * math.sqrt(p.numel()) * -g["lr"]) / n.clamp(min=1e-30) for p, n in zip(params, norms)
            ]  # −η·γ
            torch._foreach_mul_(O_hat, gammas)
            self._decay(params, g["lr"], g["weight_decay"])
            torch._foreach_add_(params, O_hat)


class NorMuon(MuonFamily):
    """NorMuon (Li et al. 2025): Muon with per-row second-moment normalisation after NS.

    Per matrix (REFERENCE.md "NorMuon"), rows = output neurons of the logical out×in matrix::

        O = NS(U)                                   (as in Muon)
        v_i ← β₂·v_i + (1 − β₂)·mean_j O_ij²       (β₂ = 0.95)
        Ô = O ⊘ (√v + ε)  rescaled to ‖Ô‖_F = ‖O‖_F
        W ← W − η·λ·W − η·s·Ô                      (s from ``scaling``, as in Muon)

    Args:
        params: parameters or param groups (see :class:`Muon`).
        lr, momentum, nesterov, weight_decay, scaling: as for :class:`Muon`.
        beta2: per-row second-moment decay β₂.
        eps: ε in ``√v + ε``.
        **kwargs: ``ns_steps``, ``ns_method``, ``ns_dtype``, ``adamw_betas``, ``adamw_eps``,
            ``ns_chunk_bytes`` as for :class:`Muon`.
    """


    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scaling: str = "match_rms_adamw",
        beta2: float = 0.95,
        eps: float = 1e-8,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         scaling=scaling, beta2=beta2, normuon_eps=eps, **kwargs)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._init_state(p, group, state)
        out_features, _ = _logical_shape(p, group["transposed"])
        state["row_second_moment"] = torch.zeros(out_features, dtype=p.dtype, device=p.device)

    def _apply_updates(self, chunk: list[_Item], outs: list[Tensor]) -> None:
        for (_, s), (g, params, updates) in self._by_group_and_scale(chunk, outs).items():
            beta2, eps = g["beta2"], g["normuon_eps"]
            normalised = []
            for p, o in zip(params, updates):
                o = o.to(p.dtype)
                mat = o.reshape(p.shape[0], -1)  # (rows, cols) as stored
                if g["transposed"]:
                    mat = mat.mT  # logical (out, in)
                v = self.state[p]["row_second_moment"]  # (out,)
                v.mul_(beta2).add_(mat.square().mean(dim=1), alpha=1.0 - beta2)
                o_hat = mat / (v.sqrt() + eps)[:, None]
                o_hat.mul_(torch.linalg.vector_norm(mat) / torch.linalg.vector_norm(o_hat).clamp(min=1e-30))
                if g["transposed"]:
                    o_hat = o_hat.mT
                normalised.append(o_hat.reshape(p.shape))
            self._decay(params, g["lr"], g["weight_decay"])
            torch._foreach_add_(params, normalised, alpha=-g["lr"] * s)

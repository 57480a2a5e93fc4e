"""The Muon-family optimizers (Muon, AdaMuon, NorMuon), each with a built-in auxiliary AdamW group.

Owns the optimizer objects: their hyper-parameters and param groups, their state (the keys checkpoints
load by: ``momentum_buffer``; AdaMuon ``second_moment``; NorMuon ``row_second_moment``; AdamW ``step``,
``exp_avg``, ``exp_avg_sq``), and which update rule each applies.  Layers, as in Keller Jordan's
``muon.py``: the pure orthogonalisation (:mod:`.orthogonalize`), the pure update rules (:mod:`.update`,
whose docstring has the formulas: Muon and Moonlight's "Muon is Scalable for LLM Training" scalings,
"AdaMuon: Adaptive Muon Optimizer" (Si et al.), "NorMuon: Making Muon more efficient and scalable"
(Li et al.)), and the step plan — batching by shape, CPU cache blocking, memo caches, the distributed
split and all-gather (:mod:`.plan`).  The classes here only own state, plan, and apply.

One optimizer object holds every trainable parameter: param groups carry ``kind="muon"`` (hidden
matrices, LoRA A/B) or ``kind="adamw"`` (embeddings, heads, 1-D tensors; AdamW of Loshchilov & Hutter,
"Decoupled Weight Decay Regularization", run by torch's own functional ``adam``), so LR schedulers,
checkpoints and HF ``Trainer(optimizers=(opt, sched))`` see one thing.  Weights with more than two dims
are flattened to (out, −1).

Distributed NS (used by the engine under torchrun, with DDP-synchronised gradients): after
``opt.set_distributed()`` each matrix is orthogonalised by one rank and the results are all-gathered
(:mod:`.plan`), so every rank applies the same update and keeps identical state.
With FSDP2 (``fully_shard``: DTensor parameters sharded by rows) no hook is needed: each matrix has one
owner rank, balanced by NS FLOPs, that gathers its full input, orthogonalises it and returns every rank its
rows (:mod:`.sharded`; Muon and muon-pe).
``opt.ns_matrices_done`` / ``opt.ns_matrices_last_step`` count the matrices this rank orthogonalised,
``opt.native_matrices_done`` those of them the native CPU kernel stepped (:mod:`muonft_cli.native`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from muonft_cli._common import SCALINGS

from . import constraints as C
from . import update as U
from .orthogonalize import _METHODS, resolve_ns_dtype
from .plan import DEFAULT_CHUNK_BYTES, Item, StepPlanner
from .update import update_scale

__all__ = ["MuonFamily", "Muon", "AdaMuon", "NorMuon", "SCALINGS", "update_scale"]

_KINDS = ("muon", "adamw")


class MuonFamily(torch.optim.Optimizer):
    """Shared machinery of :class:`Muon`, :class:`AdaMuon` and :class:`NorMuon`.

    Param groups may set ``kind`` to ``"muon"`` (default) or ``"adamw"``; AdamW groups use ``betas``
    and ``eps`` (defaults ``adamw_betas``/``adamw_eps``) and their own ``lr``/``weight_decay``.  A Muon
    group may set ``transposed=True`` when its weights are stored (in, out) (GPT-2 ``Conv1D``), so
    shape-dependent scalings use the true out×in orientation.

    Execution (:mod:`.plan`): Muon matrices are bucketed by wide 2-D shape (tall ones transposed) and
    orthogonalised in chunks of at most ``ns_chunk_bytes`` of stacked input; subclasses supply the state
    (:meth:`_init_state`) and the rule (:meth:`_apply_updates`, from :mod:`.update`).
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
        ns_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
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
        self._planner = StepPlanner(ns_chunk_bytes)
        self.ns_matrices_done = 0
        self.ns_matrices_last_step = 0
        self.native_matrices_done = 0
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
        self._planner.set_distributed(group, enabled=enabled, shard_thin=shard_thin)

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
        self.ns_matrices_last_step = self._planner.run(self.param_groups, self.state, self)
        self.ns_matrices_done += self.ns_matrices_last_step
        self.native_matrices_done += self._planner.native_done
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
        fused = all(p.device.type == "cuda" for p in params) and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params
        )
        if fused:  # the fused kernel wants its step counters on the device
            for i, s in enumerate(steps):
                if s.device != params[i].device:
                    s = s.to(params[i].device)
                    self.state[params[i]]["step"] = s
                    steps[i] = s
        U.adamw_update_(params, grads, exp_avgs, exp_avg_sqs, steps, betas=group["betas"], lr=group["lr"],
                        weight_decay=group["weight_decay"], eps=group["eps"], fused=fused)

    # ------------------------------------------------------------------ the rule (called by the plan)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _transform_stack(self, X: Tensor) -> None:
        """Hook applied to the stacked NS input in place (AdaMuon: sign)."""

    def _apply_gram(self, chunk: list[Item], Q: Tensor, X: Tensor) -> bool:
        """Apply Gram-path results ``O = Q X`` (wide stack) directly; False = let the plan form O."""
        return False

    def _apply_updates(self, chunk: list[Item], outs: list[Tensor]) -> None:
        raise NotImplementedError  # implemented by each optimizer below

    def _apply_sharded(self, chunk: list[Item], params: list[Tensor], outs: list[Tensor]) -> None:
        """Apply the results to the local row shards ``params`` (FSDP2, :mod:`.sharded`); ``outs[i]`` holds
        the rows of ``chunk[i]``'s result this rank owns."""
        raise NotImplementedError(f"{type(self).__name__} does not run over FSDP2 shards yet: use Muon "
                                  "(or muon-pe), or the DDP strategy")


class Muon(MuonFamily):
    """Muon for hidden matrices plus an auxiliary AdamW for ``kind="adamw"`` groups.

    Update per matrix (:mod:`.update`): ``M ← βM + G``; ``O = NS(G + βM)`` (Nesterov) or ``NS(M)``;
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
        update_rank: k: apply only the top-k directions of each orthogonalised update, ``O_k = Q·(Qᵀ·O)``
            with Q the top-k left singular vectors of the NS input (:func:`.constraints.top_k_project`;
            state ``rank_basis``, rows × (k + max(k, 4)) oversampled, warm-started); None = the full update.
        native: let fp32 thin matrices on CPU (LoRA factors) take the native kernel
            (:mod:`muonft_cli.native`: the same update, each matrix read from memory once) when it is
            available; ``False`` keeps them on the torch path.  ``MUONFT_NATIVE=0`` turns it off for the
            process.
    """

    _fused_thin = True  # thin matrices on CPU take the planner's fused path (plan._FusedThin)

    def __init__(self, params: Iterable[Any], *args: Any, update_rank: int | None = None, native: bool = True,
                 **kwargs: Any) -> None:
        if update_rank is not None and update_rank < 1:
            raise ValueError(f"update_rank must be >= 1 (or None = full rank), got {update_rank}")
        self.update_rank = update_rank
        if update_rank is not None:
            self._fused_thin = False  # the rank limit needs each matrix's O (`_apply_updates`)
        super().__init__(params, *args, **kwargs)
        self._planner.native = bool(native)

    def _apply_updates(self, chunk: list[Item], outs: list[Tensor]) -> None:
        if self.update_rank is not None:
            outs = [self._rank_limited(it, o) for it, o in zip(chunk, outs)]
        for g, s, params, updates in self._planner.by_group(chunk, outs):
            U.apply_updates_(params, updates, g["lr"], g["weight_decay"], s)

    def _apply_sharded(self, chunk: list[Item], params: list[Tensor], outs: list[Tensor]) -> None:
        sets: dict[tuple[int, float], tuple[dict[str, Any], list[Tensor], list[Tensor]]] = {}
        for it, p, o in zip(chunk, params, outs):
            entry = sets.setdefault((id(it.group), it.scale), (it.group, [], []))
            entry[1].append(p)
            entry[2].append(o)
        for (_, s), (g, ps, os_) in sets.items():
            U.apply_updates_(ps, os_, g["lr"], g["weight_decay"], s)

    def _rank_limited(self, it: Item, o: Tensor) -> Tensor:
        """The top-``update_rank`` part of one matrix's update ``o`` (as stored, (rows, cols) or param-shaped)."""
        g, st = it.group, self.state[it.param]
        grad, buf = it.as2d(it.grad), it.as2d(it.buf)
        x = torch.add(grad, buf, alpha=g["momentum"]) if g["nesterov"] and g["momentum"] > 0 else buf
        o2 = o.reshape(it.rows, it.cols)
        k = min(self.update_rank, it.rows, it.cols)
        basis, iters = st.get("rank_basis"), C.TRUST_ITERS
        if basis is None:
            width = C.rank_basis_width(k, it.rows, it.cols)
            basis, iters = C._start_basis(it.rows, width, o.device, torch.float32), C._FIRST_ITERS
        o_k, st["rank_basis"] = C.top_k_project(o2, x, k, basis, iters)
        return o_k.reshape(o.shape)

    def _apply_gram(self, chunk: list[Item], Q: Tensor, X: Tensor) -> bool:
        if self.update_rank is not None:
            return False  # the rank limit needs O itself
        if X.device.type != "cpu" or not all(it.param.is_contiguous() and it.param.dtype == X.dtype for it in chunk):
            return False
        # CPU: W ← (1 − ηλ)·W − η·s·(QX) as one addmm_ per wide matrix (no O materialised); tall
        # ones (stored transposed in the stack) take one bmm for the block, then a strided add.
        first = next((i for i, it in enumerate(chunk) if it.flip), len(chunk))  # chunks are all wide or all tall
        O_t = None
        if first < len(chunk):
            O_t = self._planner.scratch("out", tuple(X[first:].shape), X.dtype, X.device)
            torch.bmm(Q[first:], X[first:], out=O_t)  # (f, r, c)
        j = 0
        for i, it in enumerate(chunk):
            g = it.group
            w2 = it.param.view(it.rows, it.cols)
            if it.flip:
                U.apply_updates_([w2.mT], [O_t[j]], g["lr"], g["weight_decay"], it.scale)  # (r, c) view of (c, r)
                j += 1
            else:
                U.apply_gram_update_(w2, Q[i], X[i], g["lr"], g["weight_decay"], it.scale)
        return True


class AdaMuon(MuonFamily):
    """AdaMuon ("AdaMuon: Adaptive Muon Optimizer", Si et al. 2025), exactly as the paper's Algorithm 1.

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

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = False,
                 weight_decay: float = 0.0, eps: float = 1e-8, beta2: float | None = None,
                 scaling: str = "match_rms_adamw", **kwargs: Any) -> None:
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

    def _apply_updates(self, chunk: list[Item], outs: list[Tensor]) -> None:
        for g, _, params, updates in self._planner.by_group(chunk, outs):
            O = [o.to(p.dtype) for p, o in zip(params, updates)]
            V = [self.state[p]["second_moment"] for p in params]
            beta = g["beta2"] if g["beta2"] is not None else g["momentum"]
            U.apply_updates_(params, U.adamuon_scale_(O, V, beta, g["adamuon_eps"], g["lr"]), g["lr"],
                             g["weight_decay"], None)


class NorMuon(MuonFamily):
    """NorMuon ("NorMuon: Making Muon more efficient and scalable", Li et al. 2025): Muon with per-row
    second-moment normalisation after NS.

    Per matrix (the paper's algorithm), rows = output neurons of the logical out×in matrix::

        O = NS(U)                                   (as in Muon)
        v_i ← β₂·v_i + (1 − β₂)·mean_j O_ij²       (β₂ = 0.95)
        Ô = O ⊘ (√v + ε)  rescaled to ‖Ô‖_F = ‖O‖_F
        W ← W − η·λ·W − η·s·Ô                      (s from ``scaling``, as in Muon)

    Args:
        params: parameters or param groups (see :class:`Muon`).
        lr, momentum, nesterov, weight_decay, scaling: as for :class:`Muon`.
        beta2: per-row second-moment decay β₂.
        eps: ε in ``√v + ε``.
        **kwargs: the NS and AdamW-group options, as for :class:`AdaMuon`.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, scaling: str = "match_rms_adamw", beta2: float = 0.95, eps: float = 1e-8,
                 **kwargs: Any) -> None:
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                         scaling=scaling, beta2=beta2, normuon_eps=eps, **kwargs)

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        super()._init_state(p, group, state)
        out_features, _ = U.logical_shape(p.shape, group["transposed"])
        state["row_second_moment"] = torch.zeros(out_features, dtype=p.dtype, device=p.device)

    def _apply_updates(self, chunk: list[Item], outs: list[Tensor]) -> None:
        for g, s, params, updates in self._planner.by_group(chunk, outs):
            normalised = [
                U.normuon_normalize_(o.to(p.dtype), self.state[p]["row_second_moment"], g["beta2"], g["normuon_eps"],
                                     g["transposed"])
                for p, o in zip(params, updates)
            ]
            U.apply_updates_(params, normalised, g["lr"], g["weight_decay"], s)

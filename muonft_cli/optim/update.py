"""The Muon-family update rules as pure functions of tensors: no optimizer, no param groups, no plans.

Owns the math of one step for one matrix (or a list of same-rule matrices, as ``torch._foreach_*`` ops):
the momentum and its Nesterov input, the update scale, decoupled weight decay and the applied update of
Muon / Muon-PE, AdaMuon and NorMuon, and the auxiliary AdamW step.  The orthogonalisation itself is
:mod:`.orthogonalize`; batching, cache blocking and the distributed split are :mod:`.plan`; the
optimizer classes that own the state are :mod:`.muon`.  As in Keller Jordan's ``muon.py``, a one-matrix
step is ``update = muon_update(grad, momentum, ...)`` then ``apply_update_(param, update, ...)``;
:func:`adamuon_update` and :func:`normuon_update` are the same for the other two rules.  The batched
optimizer runs the very same building blocks (:func:`momentum_`, :func:`ns_input_`, :func:`adamuon_scale_`,
:func:`normuon_normalize_`, :func:`apply_updates_`) over stacks of matrices.

Muon (Keller Jordan's Muon; Moonlight = "Muon is Scalable for LLM Training", Liu et al. 2025), per matrix
W of logical shape m×n = out×in::

    M ← β·M + G                       (classic momentum; Keller Jordan's EMA is (1−β)·M: same direction)
    U = G + β·M  (Nesterov)  or  M
    O = NS(U)                          (NS5 or Polar Express, :mod:`.orthogonalize`)
    W ← W − η·λ·W − η·s·O              s = 0.2·√max(m, n)  ("match_rms_adamw", Moonlight §2.2, default)
                                       s = √max(1, m/n)     ("original", Keller Jordan)
                                       s = 1                ("none")

AdaMuon ("AdaMuon: Adaptive Muon Optimizer", Si et al. 2025, Algorithm 1)::

    M ← β·M + G;  O = NS(sign(M));  V ← β·V + (1 − β)·O ⊙ O;  Ô = O ⊘ (√V + ε)
    W ← W − η·(γ·Ô + λ·W),  γ = 0.2·√(m·n) / ‖Ô‖_F

NorMuon ("NorMuon: Making Muon more efficient and scalable", Li et al. 2025), rows = output neurons::

    O = NS(U) as in Muon;  v_i ← β₂·v_i + (1 − β₂)·mean_j O_ij²;  Ô = O ⊘ (√v + ε) rescaled to ‖O‖_F
    W ← W − η·λ·W − η·s·Ô

AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization") runs as torch's own functional
``adam(..., decoupled_weight_decay=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim.adam import adam as _adam

from muonft_cli._common import SCALINGS

from .orthogonalize import orthogonalize

__all__ = [
    "adamuon_scale_",
    "adamuon_update",
    "adamw_update_",
    "apply_gram_update_",
    "apply_update_",
    "apply_updates_",
    "decay_",
    "logical_shape",
    "momentum_",
    "muon_update",
    "normuon_normalize_",
    "normuon_update",
    "ns_input_",
    "ns_inputs",
    "update_scale",
]


# ------------------------------------------------------------------------------------------- shapes


def update_scale(scaling: str, out_features: int, in_features: int) -> float:
    """Muon's update multiplier ``s`` for a logical ``out×in`` matrix (see the module docstring)."""
    if scaling == "match_rms_adamw":
        return 0.2 * math.sqrt(max(out_features, in_features))
    if scaling == "original":
        return math.sqrt(max(1.0, out_features / in_features))
    if scaling == "none":
        return 1.0
    raise ValueError(f"unknown Muon scaling {scaling!r}; expected one of {SCALINGS}")


def logical_shape(shape: Sequence[int], transposed: bool) -> tuple[int, int]:
    """(out, in) of the matrix a parameter of ``shape`` represents, flattened to (shape[0], −1);
    ``transposed`` = stored as (in, out) (GPT-2 Conv1D)."""
    rows, cols = shape[0], math.prod(shape[1:])
    return (cols, rows) if transposed else (rows, cols)


# ------------------------------------------------------------------------------- momentum, NS input


def momentum_(bufs: Tensor | list[Tensor], grads: Tensor | list[Tensor], beta: float) -> None:
    """``M ← βM + G`` in place: one tensor (one pass, ``G + βM``) or a list (``torch._foreach_*``)."""
    if isinstance(bufs, Tensor):
        torch.add(grads, bufs, alpha=beta, out=bufs)
        return
    torch._foreach_mul_(bufs, beta)
    torch._foreach_add_(bufs, grads)


def ns_input_(out: Tensor, grad: Tensor, buf: Tensor, beta: float, nesterov: bool) -> None:
    """Write the orthogonalisation input of one matrix into ``out``: ``G + βM`` (Nesterov) or ``M``."""
    if nesterov and beta > 0.0:
        if out.dtype == grad.dtype:
            torch.add(grad, buf, alpha=beta, out=out)
        else:
            out.copy_(torch.add(grad, buf, alpha=beta))
    else:
        out.copy_(buf)


def ns_inputs(grads: list[Tensor], bufs: list[Tensor], beta: float, nesterov: bool) -> list[Tensor]:
    """The orthogonalisation inputs of a list of matrices: ``G + βM`` (Nesterov, new tensors) or ``M``."""
    if nesterov and beta > 0.0:
        return torch._foreach_add(grads, bufs, alpha=beta)
    return bufs


# ----------------------------------------------------------------------------------------- apply


def decay_(params: list[Tensor], lr: float, weight_decay: float) -> None:
    """Decoupled weight decay ``W ← W − ηλW`` in place."""
    if weight_decay != 0.0 and lr != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)


def apply_updates_(
    params: list[Tensor], updates: list[Tensor], lr: float, weight_decay: float, scale: float | None
) -> None:
    """``W ← W − ηλW − η·s·O`` for a list of matrices (Muon's and NorMuon's last line); ``scale=None``:
    the updates are whole steps already (AdaMuon's ``−η·γ·Ô``), ``W ← W − ηλW + Δ``."""
    decay_(params, lr, weight_decay)
    if scale is None:
        torch._foreach_add_(params, updates)
    else:
        torch._foreach_add_(params, updates, alpha=-lr * scale)


def apply_gram_update_(w: Tensor, Q: Tensor, X: Tensor, lr: float, weight_decay: float, scale: float) -> None:
    """``W ← (1 − ηλ)·W − η·s·(QX)`` for one wide 2-D ``w`` as a single ``addmm_`` (``O = QX`` is never
    formed): the Gram-space result ``Q`` (r×r) applied to the NS input ``X`` (r×c), :mod:`.orthogonalize`."""
    w.addmm_(Q, X, beta=1.0 - lr * weight_decay, alpha=-lr * scale)


def apply_update_(param: Tensor, update: Tensor, lr: float, weight_decay: float, scale: float | None) -> None:
    """:func:`apply_updates_` for one matrix (``update`` shaped like ``param`` or as (out, −1))."""
    apply_updates_([param], [update.reshape(param.shape).to(param.dtype)], lr, weight_decay, scale)


def adamuon_scale_(
    outs: list[Tensor], second_moments: list[Tensor], beta: float, eps: float, lr: float
) -> list[Tensor]:
    """AdaMuon's step direction ``−η·γ·Ô`` per matrix (``V`` updated in place; ``outs`` in param dtype)."""
    torch._foreach_mul_(second_moments, beta)
    torch._foreach_addcmul_(second_moments, outs, outs, value=1.0 - beta)  # V ← βV + (1−β)O⊙O
    denom = torch._foreach_sqrt(second_moments)
    torch._foreach_add_(denom, eps)
    o_hat = torch._foreach_div(outs, denom)  # Ô = O ⊘ (√V + ε)
    norms = torch._foreach_norm(o_hat)
    gammas = [(0.2 * math.sqrt(v.numel()) * -lr) / n.clamp(min=1e-30) for v, n in zip(second_moments, norms)]
    torch._foreach_mul_(o_hat, gammas)  # −η·γ·Ô
    return o_hat


def normuon_normalize_(update: Tensor, row_second_moment: Tensor, beta2: float, eps: float, transposed: bool) -> Tensor:
    """NorMuon's ``Ô`` for one matrix (``update`` as stored, any shape with rows first; ``v`` in place)."""
    mat = update.reshape(update.shape[0], -1)  # (rows, cols) as stored
    if transposed:
        mat = mat.mT  # logical (out, in)
    v = row_second_moment
    v.mul_(beta2).add_(mat.square().mean(dim=1), alpha=1.0 - beta2)
    o_hat = mat / (v.sqrt() + eps)[:, None]
    o_hat.mul_(torch.linalg.vector_norm(mat) / torch.linalg.vector_norm(o_hat).clamp(min=1e-30))
    if transposed:
        o_hat = o_hat.mT
    return o_hat.reshape(update.shape)


def adamw_update_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    betas: tuple[float, float],
    lr: float,
    weight_decay: float,
    eps: float,
    fused: bool,
) -> None:
    """One AdamW step in place: torch's own AdamW math (``torch.optim.AdamW`` = Adam with decoupled decay);
    ``fused`` wants every tensor, step counters included, on one CUDA device."""
    _adam(
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
        beta1=betas[0],
        beta2=betas[1],
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
    )


# ------------------------------------------------------------------------------ one matrix, whole


def _orthogonalized(U: Tensor, ns_steps: int, ns_method: str, ns_dtype: torch.dtype | str | None) -> Tensor:
    """NS of one matrix flattened to (out, −1) as stored, returned shaped like ``U``; a tall matrix is
    orthogonalised as its (contiguous) wide transpose, as the batched plan stacks it."""
    X = U.reshape(U.shape[0], -1)
    if X.shape[0] > X.shape[1]:
        return orthogonalize(X.mT.contiguous(), ns_steps, ns_method, ns_dtype).mT.reshape(U.shape)
    return orthogonalize(X, ns_steps, ns_method, ns_dtype).reshape(U.shape)


def muon_update(
    grad: Tensor,
    momentum: Tensor,
    *,
    beta: float = 0.95,
    nesterov: bool = True,
    ns_steps: int = 5,
    ns_method: str = "jordan",
    ns_dtype: torch.dtype | str | None = None,
) -> Tensor:
    """Muon's orthogonalised direction ``O`` for one matrix; ``momentum`` is updated in place.

    Apply it with ``apply_update_(param, O, lr, weight_decay, update_scale(scaling, out, in))``.
    """
    momentum_(momentum, grad, beta)
    U = torch.empty_like(grad)
    ns_input_(U, grad, momentum, beta, nesterov)
    return _orthogonalized(U, ns_steps, ns_method, ns_dtype)


def adamuon_update(grad: Tensor, momentum: Tensor, second_moment: Tensor, *, lr: float, beta: float = 0.95,
                   beta2: float | None = None, eps: float = 1e-8, nesterov: bool = False, ns_steps: int = 5,
                   ns_method: str = "jordan", ns_dtype: torch.dtype | str | None = None) -> Tensor:
    """AdaMuon's step ``Δ = −η·γ·Ô`` for one matrix (``momentum``/``second_moment`` in place).

    Apply it with ``apply_update_(param, step, lr, weight_decay, None)`` (γ is AdaMuon's own RMS alignment).
    """
    momentum_(momentum, grad, beta)
    U = torch.empty_like(grad)
    ns_input_(U, grad, momentum, beta, nesterov)
    O = _orthogonalized(U.sign_(), ns_steps, ns_method, ns_dtype).to(second_moment.dtype)
    return adamuon_scale_([O], [second_moment], beta if beta2 is None else beta2, eps, lr)[0]


def normuon_update(grad: Tensor, momentum: Tensor, row_second_moment: Tensor, *, beta: float = 0.95,
                   beta2: float = 0.95, eps: float = 1e-8, nesterov: bool = True, transposed: bool = False,
                   ns_steps: int = 5, ns_method: str = "jordan", ns_dtype: torch.dtype | str | None = None) -> Tensor:
    """NorMuon's normalised direction ``Ô`` for one matrix (``momentum``/``row_second_moment`` in place).

    Apply it with ``apply_update_(param, Ô, lr, weight_decay, update_scale(scaling, out, in))``.
    """
    O = muon_update(grad, momentum, beta=beta, nesterov=nesterov, ns_steps=ns_steps, ns_method=ns_method,
                    ns_dtype=ns_dtype)
    return normuon_normalize_(O.to(momentum.dtype), row_second_moment, beta2, eps, transposed)

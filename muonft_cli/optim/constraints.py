"""Update constraints for full fine-tuning under an optimizer mismatch: anchored decay toward the pretrained
weights and a trust region on the accumulated update (both attached to any torch optimizer), and the math of
Muon's rank-limited update (applied by :class:`~.muon.Muon`).

Owns the formulas (``docs/formulas.md``, "Mismatch mitigations"), the per-matrix constraint state (the anchor
``W₀``, the trust radius, the warm-started power-iteration basis), how that state travels in
``optimizer.state_dict()`` (key :data:`STATE_KEY`, so a resumed run, or a training loop that loads its model
checkpoint before building the optimizer, gets the true ``W₀`` back) and the drift ``‖W − W₀‖`` metrics.

For every trainable matrix W (≥ 2-D) with anchor W₀ (a copy taken when the optimizer is built, i.e. the
pretrained weights), learning rate η of its group at this step:

* anchored decay (L2-SP, decoupled like AdamW's decay), before the optimizer's own update::

      W ← W − η·λ_a·(W − W₀)

* trust region, after the update: ``Δ = W − W₀`` is projected onto ``{‖Δ‖ ≤ ρ·‖W₀‖}`` in the norm the
  pretraining optimizer's implicit bias keeps small: ``spectral`` (Muon-pretrained; hidden matrices only —
  embeddings and heads were AdamW-trained in either case and take ``max``) clips the singular values of Δ
  above ``ρ·‖W₀‖₂``; ``max`` (Adam-pretrained) clamps every entry of Δ to ``±ρ·max|W₀|``.  Both are the
  exact Euclidean projections onto their balls.  The spectral one finds the top-k singular triplets of Δ
  (k = :data:`TRUST_RANK` at first) by subspace iteration warm-started from the last step's right singular
  vectors (:data:`TRUST_ITERS` iterations; one Δᵀ·(Δ·V) and a thin QR each), clips them, and checks the result
  with one more block iteration; it falls back to an exact SVD when the smallest tracked one still exceeds the
  radius (more directions may be over it) or the check finds the result over the radius by more than
  :data:`TRUST_TOL` (inexact triplets); k then doubles for that matrix, so the iteration learns to track every
  direction the projection holds at the radius.

Hooks: :func:`attach` uses torch's ``register_step_pre_hook`` / ``register_step_post_hook`` and the
state-dict hooks, so ``build_optimizer`` still returns a plain ``torch.optim.AdamW`` or a Muon-family object.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "STATE_KEY", "TRUST_ITERS", "TRUST_NORMS", "TRUST_RANK", "Constraints", "ConstraintSpec", "anchor_decay_",
    "attach", "drift_norms", "max_clip_", "rank_basis_width", "spectral_clip_", "top_k_project",
]

#: the key of the constraint state inside ``optimizer.state_dict()``
STATE_KEY = "muonft_constraints"
TRUST_NORMS = ("spectral", "max")
#: singular triplets the spectral projection tracks per matrix, and subspace iterations per step
TRUST_RANK = 8
TRUST_ITERS = 2
_FIRST_ITERS = 8  # from the deterministic start basis (the first step after an anchor is taken)
#: relative excess over the spectral radius the subspace path may leave before the exact SVD is used instead
TRUST_TOL = 1e-3


@dataclass(frozen=True)
class ConstraintSpec:
    """The constraints of one optimizer: ``anchor_decay`` λ_a ≥ 0, ``trust_radius`` ρ (None: no trust region)
    and ``trust_norm`` (``spectral`` | ``max``, already resolved from the base)."""

    anchor_decay: float = 0.0
    trust_radius: float | None = None
    trust_norm: str = "spectral"

    @property
    def active(self) -> bool:
        return self.anchor_decay > 0.0 or self.trust_radius is not None


# -------------------------------------------------------------------------------------------- the math


def anchor_decay_(params: list[Tensor], anchors: list[Tensor], lr: float, anchor_decay: float) -> None:
    """``W ← W − η·λ_a·(W − W₀)`` in place for a list of matrices (``torch._foreach_lerp_``)."""
    if params and lr != 0.0 and anchor_decay != 0.0:
        torch._foreach_lerp_(params, anchors, lr * anchor_decay)


def max_clip_(w: Tensor, anchor: Tensor, radius: float) -> None:
    """Project ``W`` onto ``{max|W − W₀| ≤ radius}`` in place; entries inside the box are left bit-identical."""
    bound = anchor + radius
    torch.minimum(w, bound, out=w)
    torch.sub(anchor, radius, out=bound)
    torch.maximum(w, bound, out=w)


def _start_basis(n: int, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A fixed orthonormal n×k start (own generator: the global RNG, hence dropout and data order, is untouched)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0].to(device=device, dtype=dtype)


def spectral_clip_(w: Tensor, anchor: Tensor, radius: float, basis: Tensor, iters: int = TRUST_ITERS) -> tuple[Tensor, bool]:
    """Project the 2-D ``W`` onto ``{‖W − W₀‖₂ ≤ radius}`` in place: singular values of Δ above ``radius`` are
    set to ``radius`` (the exact projection in the spectral norm).

    Args:
        w, anchor: (m, n) views of the weight and its anchor.
        radius: the bound ρ·‖W₀‖₂.
        basis: (n, k) orthonormal warm start (the previous call's result).
        iters: subspace iterations.

    Returns:
        (the new basis: Δ's top right singular vectors before the clip — 2k of them after an exact SVD —,
        whether the exact SVD was used).
    """
    delta = (w - anchor).float()
    v = basis.float()
    for _ in range(iters):
        v = torch.linalg.qr(delta.mT @ (delta @ v))[0]
    ub, s, vbh = torch.linalg.svd(delta @ v, full_matrices=False)  # Δ·V = Ub·S·Vbh: Δ's top-k triplets
    right = v @ vbh.mT
    full = s.numel() >= min(delta.shape)
    if not (bool(s[-1] > radius) and not full):
        excess = (s - radius).clamp(min=0.0)
        if not bool(excess.any()):
            return right.to(basis.dtype), False
        clipped = delta - (ub * excess) @ right.mT
        # check the result: one more block iteration from the same directions estimates its top singular value;
        # the triplets were inexact (directions just under the radius mix into the top ones) when it is over
        check = torch.linalg.qr(clipped.mT @ (clipped @ right))[0]
        if full or float(torch.linalg.matrix_norm(clipped @ check, ord=2)) <= radius * (1.0 + TRUST_TOL):
            w.sub_(((ub * excess) @ right.mT).to(w.dtype))
            return right.to(basis.dtype), False
    # more directions may be over the radius than the basis tracks: project exactly, and track twice as many
    u_all, s_all, vh_all = torch.linalg.svd(delta, full_matrices=False)
    over = s_all > radius
    if over.any():
        w.sub_(((u_all[:, over] * (s_all[over] - radius)) @ vh_all[over]).to(w.dtype))
    grown = min(2 * v.shape[1], vh_all.shape[0])
    return vh_all[:grown].mT.contiguous().to(basis.dtype), True


def top_k_project(update: Tensor, ns_input: Tensor, k: int, basis: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Muon's rank-limited direction: the orthogonalised update ``O`` restricted to the top-``k`` left singular
    subspace of its NS input ``X`` (Q = top-k left singular vectors of X by warm-started subspace iteration):
    ``O_k = Q·(Qᵀ·O)``.  With an exact polar factor ``O = U·Vᵀ`` this is ``U_k·V_kᵀ``, the top-k directions.

    Args:
        update: O, (rows, cols).
        ns_input: X = G + βM (Nesterov) or M, same shape.
        k: rank (≤ min(rows, cols)).
        basis: (rows, w) orthonormal warm start, w ≥ k (oversampled, :func:`rank_basis_width`: the subspace
            iteration converges at the rate (σ_{w+1}/σ_k)^(2·iters), not (σ_{k+1}/σ_k)^(2·iters)).
        iters: subspace iterations.

    Returns:
        (O_k in ``update``'s dtype, the new basis).
    """
    x = ns_input.float()
    q = basis.float()
    for _ in range(iters):
        q = torch.linalg.qr(x @ (x.mT @ q))[0]
    ub = torch.linalg.svd(q.mT @ x, full_matrices=False)[0]  # the oversampled basis, sorted by singular value
    qk = q @ ub[:, :k]
    o = update.float()
    return (qk @ (qk.mT @ o)).to(update.dtype), (q @ ub).to(basis.dtype)


def rank_basis_width(k: int, rows: int, cols: int) -> int:
    """Columns of the rank-limited update's warm-start basis: k oversampled by max(k, 4), at most min(rows, cols)."""
    return min(k + max(k, 4), rows, cols)


#: matrices whose smaller side is at most this get an exact spectral norm (SVD); larger ones power iteration
#: (an SVD of each 1024×4096 matrix made the end-of-run drift of a 0.4 B LoRA run take minutes on 2 cores)
EXACT_NORM_MAX_DIM = 128
_POWER_ITERS = 30


def _spectral_norm(x: Tensor) -> float:
    """‖x‖₂: exact for small matrices, else :data:`_POWER_ITERS` power iterations from a fixed start (a lower
    bound, converged to the rate (σ₂/σ₁)^(2·iters); no SVD of a 4096×11008 matrix at the end of every run)."""
    x = x.float()
    if min(x.shape) <= EXACT_NORM_MAX_DIM:
        return float(torch.linalg.matrix_norm(x, ord=2))
    v = _start_basis(x.shape[1], 1, x.device, torch.float32)
    for _ in range(_POWER_ITERS):
        v = x.mT @ (x @ v)
        v = v / torch.linalg.vector_norm(v).clamp(min=1e-30)
    return float(torch.linalg.vector_norm(x @ v))


def drift_norms(pairs: Iterable[tuple[Tensor, Tensor, bool]]) -> dict[str, Any] | None:
    """How far fine-tuning moved the matrices: ``pairs`` of (W, W₀, hidden) (``hidden``: a Muon-routed matrix).

    Returns ``{matrices, fro, fro_rel, fro_rel_hidden, spectral_rel, max_rel}``: ``fro = ‖W − W₀‖_F`` over all
    matrices together and ``fro_rel`` that over ``‖W₀‖_F`` (``fro_rel_hidden``: the hidden matrices only); ``spectral_rel`` the largest ``‖Δ‖₂/‖W₀‖₂`` of a hidden matrix (the
    Muon-pretrained trust norm); ``max_rel`` the largest ``max|Δ|/max|W₀|`` of any matrix (the Adam-pretrained
    one); None without matrices.  The spectral norms: :func:`_spectral_norm` (exact up to
    :data:`EXACT_NORM_MAX_DIM`).
    """
    n, sq, sq0, spec, mx = 0, 0.0, 0.0, None, None
    hsq, hsq0 = 0.0, 0.0
    for w, w0, hidden in pairs:
        w2 = w.detach().reshape(w.shape[0], -1).float()
        a2 = w0.reshape(w0.shape[0], -1).to(device=w2.device, dtype=torch.float32)
        d = w2 - a2
        n += 1
        sq += float(d.square().sum())
        sq0 += float(a2.square().sum())
        top = float(a2.abs().max())
        if top > 0:
            mx = max(mx or 0.0, float(d.abs().max()) / top)
        if hidden:
            hsq += float(d.square().sum())
            hsq0 += float(a2.square().sum())
            s0 = _spectral_norm(a2)
            if s0 > 0:
                spec = max(spec or 0.0, _spectral_norm(d) / s0)
    if n == 0:
        return None
    return {"matrices": n, "fro": math.sqrt(sq), "fro_rel": math.sqrt(sq / sq0) if sq0 > 0 else None,
            "fro_rel_hidden": math.sqrt(hsq / hsq0) if hsq0 > 0 else None, "spectral_rel": spec, "max_rel": mx}


# ------------------------------------------------------------------------------------- attached state


class Constraints:
    """The constraint state of one optimizer (``opt.constraints`` after :func:`attach`)."""

    def __init__(self, opt: torch.optim.Optimizer, spec: ConstraintSpec, hidden: set[int]) -> None:
        if spec.anchor_decay < 0.0:
            raise ValueError(f"anchor_decay must be >= 0, got {spec.anchor_decay}")
        if spec.trust_radius is not None and not spec.trust_radius > 0.0:
            raise ValueError(f"trust_radius must be > 0 (or None = off), got {spec.trust_radius}")
        if spec.trust_norm not in TRUST_NORMS:
            raise ValueError(f"trust_norm must be one of {', '.join(TRUST_NORMS)} here (resolve 'auto' from the "
                             f"base's pretraining optimizer first), got {spec.trust_norm!r}")
        self.spec = spec
        self.opt = opt
        self.exact_svds = 0  # spectral projections that needed the full SVD
        self.params = [p for g in opt.param_groups for p in g["params"] if p.ndim >= 2]
        self.state: dict[Tensor, dict[str, Any]] = {}
        with torch.no_grad():
            for p in self.params:
                norm = "spectral" if spec.trust_norm == "spectral" and id(p) in hidden else "max"
                self.state[p] = {"anchor": p.detach().clone(memory_format=torch.contiguous_format), "norm": norm}
        self._set_radii()

    def _set_radii(self) -> None:
        rho = self.spec.trust_radius
        for st in self.state.values():
            st.pop("basis", None)
            if rho is None:
                continue
            a = st["anchor"]
            a2 = a.reshape(a.shape[0], -1)
            st["radius"] = rho * (_spectral_norm(a2) if st["norm"] == "spectral" else float(a2.abs().max()))

    # --------------------------------------------------------------------- the two hooks around step()

    @torch.no_grad()
    def before_step(self) -> None:
        lam = self.spec.anchor_decay
        if lam == 0.0:
            return
        for g in self.opt.param_groups:
            ps = [p for p in g["params"] if p.grad is not None and p in self.state]
            anchor_decay_(ps, [self.state[p]["anchor"] for p in ps], float(g["lr"]), lam)

    @torch.no_grad()
    def after_step(self) -> None:
        if self.spec.trust_radius is None:
            return
        for p in self.params:
            if p.grad is None:
                continue
            st = self.state[p]
            if st["norm"] == "max":
                max_clip_(p, st["anchor"], st["radius"])
                continue
            w2, a2 = p.view(p.shape[0], -1), st["anchor"].view(p.shape[0], -1)
            basis, iters = st.get("basis"), TRUST_ITERS
            if basis is None:
                k = min(TRUST_RANK, *w2.shape)
                basis, iters = _start_basis(w2.shape[1], k, p.device, torch.float32), _FIRST_ITERS
            st["basis"], exact = spectral_clip_(w2, a2, st["radius"], basis, iters)
            self.exact_svds += int(exact)

    # ------------------------------------------------------------------------------ checkpoints

    def _index(self) -> dict[Tensor, int]:
        i, out = 0, {}
        for g in self.opt.param_groups:
            for p in g["params"]:
                out[p] = i
                i += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        idx = self._index()
        per = {}
        for p, st in self.state.items():
            per[idx[p]] = {k: v for k, v in st.items() if isinstance(v, Tensor)}
        return {"spec": asdict(self.spec), "exact_svds": self.exact_svds, "params": per}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        by_index = {i: p for p, i in self._index().items()}
        with torch.no_grad():
            for i, entry in saved.get("params", {}).items():
                p = by_index.get(int(i))
                if p is None or p not in self.state:
                    continue
                st = self.state[p]
                st["anchor"].copy_(entry["anchor"])
                if "basis" in entry:
                    st["basis"] = entry["basis"].to(device=p.device, dtype=torch.float32).clone()
        basis = {p: st.get("basis") for p, st in self.state.items()}
        self._set_radii()  # the radii follow the restored anchors
        for p, b in basis.items():
            if b is not None:
                self.state[p]["basis"] = b
        self.exact_svds = int(saved.get("exact_svds", 0))

    def drift(self) -> dict[str, Any] | None:
        """:func:`drift_norms` of the constrained matrices against their anchors."""
        return drift_norms((p, st["anchor"], st["norm"] == "spectral" or self._hidden(p)) for p, st in self.state.items())

    def _hidden(self, p: Tensor) -> bool:
        split = getattr(self.opt, "param_split", None)
        return split is not None and any(r.param is p for r in split.muon)

    def bytes(self) -> int:
        """Memory the constraint state holds (the anchors and the bases)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if isinstance(v, Tensor))


def attach(opt: torch.optim.Optimizer, spec: ConstraintSpec, hidden: Iterable[Tensor] = ()) -> Constraints:
    """Give ``opt`` the constraints of ``spec`` (``opt.constraints``): anchors taken now from the current weights,
    applied around every ``opt.step()``, saved in and restored from its state dict.

    Args:
        opt: any torch optimizer (plain AdamW or a Muon-family one).
        spec: what to enforce.
        hidden: the hidden matrices (Muon-routed): only these take the spectral trust norm.
    """
    cons = Constraints(opt, spec, {id(p) for p in hidden})
    opt.constraints = cons  # type: ignore[attr-defined]
    opt.register_step_pre_hook(lambda o, args, kwargs: cons.before_step())
    opt.register_step_post_hook(lambda o, args, kwargs: cons.after_step())

    def save(o: Any, sd: dict) -> dict:
        sd[STATE_KEY] = cons.state_dict()
        return sd

    def load(o: Any, sd: dict) -> dict:
        sd = dict(sd)
        saved = sd.pop(STATE_KEY, None)
        if saved is not None:
            cons.load_state_dict(saved)
        return sd

    opt.register_state_dict_post_hook(save)
    opt.register_load_state_dict_pre_hook(load)
    return cons

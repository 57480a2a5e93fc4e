"""Fast estimates of stable rank and SVD entropy, with error bounds, for `muonft diagnose --fast`.

For W (m×n), r = min(m, n), let A be the smaller Gram matrix (WᵀW or WWᵀ, r×r), scaled so its mean eigenvalue
is 1: x = r·σ²/‖W‖²_F, Σx = r. Then (`docs/formulas.md` "Spectral metrics", paper App. F.1)

    stable rank = r / x₁,        SVD entropy = 1 − Σ f(xᵢ) / (r log r),   f(x) = x log x,

and ‖W‖²_F is exact (one pass). What remains are λ_max and the spectral sum tr f(A):

1. **Top of the spectrum** — randomized block Krylov (Musco & Musco 2015): a (q+1)-block Krylov basis from a
   Gaussian block, Rayleigh–Ritz on it. The largest Ritz value θ₁ ≤ x₁ ≤ θ₁ + ‖r₁‖ (r₁ its residual) bounds the
   stable rank. Converged Ritz pairs (small residual) are *deflated*: their f(θᵢ) is added exactly.
2. **The rest** — stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017) on the deflated operator PAP,
   P = I − UUᵀ, with Gaussian probes: zᵀf(PAP)z ≈ ‖z‖² Σₖ τₖ² f(θₖ) from a Lanczos tridiagonal, averaged over
   probes (Hutchinson). Deflation is what makes this work on *trained* (spiky) spectra: without it one outlier
   eigenvalue dominates the Hutchinson variance (the idea of Hutch++, Meyer et al. 2021).

A control variate removes most of the remaining variance: on the deflated complement f(x) = h(x) + (x − 1),
where h(x) = x log x − x + 1 ≈ (x − 1)²/2 is small on the bulk and tr(x), tr(1) there are known exactly.
The entropy's reported error is 2 × the probes' standard error plus the quadrature's change between the last
two Lanczos lengths; probes are added until it is below the tolerance (or the probe cap). All products run as
fp32 GEMMs on blocks of vectors, so the cost is a few hundred matrix-vector products instead of an O(r³)
eigendecomposition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from muonft_cli.spectral import singular_values, stable_rank, svd_entropy

__all__ = ["FastEstimate", "fast_spectrum", "exact_estimate"]

_CHUNK_BYTES = 1 << 21  # row blocks of about 2 MiB for the fp64 Frobenius sum


@dataclass
class FastEstimate:
    """Spectral summary of one matrix, exact or estimated, with error bounds (0 when exact)."""

    spectral_norm: float
    frobenius_norm: float
    stable_rank: float
    stable_rank_rel_err: float  # |estimate − exact| / exact ≤ this (deterministic Ritz bound)
    svd_entropy: float
    svd_entropy_err: float  # ≈ 95 % bound on |estimate − exact| (probabilistic)
    method: str  # "exact" | "fast"
    matvecs: int = 0


def exact_estimate(W: torch.Tensor) -> FastEstimate:
    """Exact metrics (fp64 singular values) packaged like `fast_spectrum`'s result. W: (m, n)."""
    sv = singular_values(W)  # (r,), fp64
    fro = float(sv.pow(2).sum().sqrt())
    return FastEstimate(float(sv[0]), fro, stable_rank(sv), 0.0, svd_entropy(sv), 0.0, "exact", 0)


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(0)
    return torch.where(x > 0, x * x.clamp_min(1e-300).log(), torch.zeros_like(x))


def fast_spectrum(
    W: torch.Tensor,
    *,
    block: int = 24,
    krylov_iters: int = 1,
    max_krylov_iters: int = 16,
    sr_tol: float = 0.005,
    lanczos_steps: int = 6,
    quad_gap: int = 2,
    probes: int = 8,
    max_probes: int = 32,
    entropy_tol: float = 0.005,
    seed: int = 0,
    exact_below: int = 256,
) -> FastEstimate:
    """Estimate σ₁, stable rank and SVD entropy of W by block Krylov deflation + stochastic Lanczos quadrature.

    Falls back to the exact computation when the Krylov basis would cover a large part of the space anyway
    (small matrices), so the result is never worse than exact there.

    Args:
        W: (m, n) matrix (any float dtype; computed in fp32, sums in fp64).
        block: block size of the Krylov basis (the number of top pairs that can be deflated).
        krylov_iters: minimum Krylov depth q (basis size block·(q+1)).
        max_krylov_iters: maximum depth; the basis deepens until the stable rank's bound is ≤ ``sr_tol``.
        sr_tol: target relative error bound for σ₁² (hence the stable rank).
        lanczos_steps: Lanczos steps per probe.
        quad_gap: the quadrature's error is estimated as its change from ``lanczos_steps − quad_gap`` steps.
        probes: initial number of Hutchinson probes; more are added (up to ``max_probes``) until the
            entropy's error bound is ≤ ``entropy_tol`` — only while the probes' sampling term is above half the
            tolerance (more probes cannot shrink the quadrature term).
        seed: seed of the probes' generator (results are deterministic for a given seed).
        exact_below: compute exactly when r ≤ max(exact_below, 3·block·(krylov_iters+1)).

    Returns:
        `FastEstimate` with ``method="fast"`` (or ``"exact"`` on fallback).
    """
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    m, n = W.shape
    r = min(m, n)
    basis_dim = block * (krylov_iters + 1)
    if r <= max(exact_below, 3 * basis_dim):
        return exact_estimate(W)
    X = (W if W.dtype == torch.float32 else W.float()).contiguous()  # (m, n)
    # ‖X‖²_F summed in fp64 over row blocks (no fp64 copy of the whole matrix)
    rows = max(1, _CHUNK_BYTES // (4 * n))
    fro2 = sum(float(torch.linalg.vector_norm(X[i : i + rows], dtype=torch.float64)) ** 2 for i in range(0, m, rows))
    if fro2 == 0:
        return FastEstimate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "fast", 0)
    c = r / fro2  # normalise: eigenvalues x = c·σ², mean 1
    gen = torch.Generator().manual_seed(seed)
    matvecs = 0

    def A(V: torch.Tensor) -> torch.Tensor:  # V: (r, b) → (r, b)
        # Written so every GEMM reads X row-major: a transposed X times a skinny block is ~50× slower on CPU.
        # (Row-blocked single-pass variants measured slower here: the skinny GEMM, not memory, is the bound.)
        nonlocal matvecs
        matvecs += V.shape[1]
        if m >= n:  # A = XᵀX
            Y = X @ V  # (m, b)
            return (Y.T @ X).T * c  # (r, b)
        Y = V.T @ X  # (b, n) = (XᵀV)ᵀ
        return (X @ Y.T) * c  # (m, b)

    # 1) randomized block Krylov + Rayleigh–Ritz, keeping A·Q of every block (one block product per depth);
    #    deepen until σ₁'s bound is within ``sr_tol`` (flat-topped spectra converge slowly) or ``max_krylov_iters``.
    Q, _ = torch.linalg.qr(torch.randn(r, block, generator=gen))  # (r, b)
    Qs, AQs = [Q], [A(Q)]
    depth = 0
    while True:
        depth += 1
        if depth >= krylov_iters:
            Qb, AQb = torch.cat(Qs, 1).double(), torch.cat(AQs, 1).double()  # (r, k)
            T = Qb.T @ AQb  # (k, k)
            theta, V = torch.linalg.eigh((T + T.T) / 2)  # ascending
            theta, V = theta.flip(0), V.flip(1)
            U = Qb @ V  # (r, k) Ritz vectors
            res = torch.linalg.vector_norm(AQb @ V - U * theta, dim=0)  # (k,) residual norms
            x1, r1 = float(theta[0]), float(res[0])
            if theta.numel() > 1:  # Kato–Temple-style gap bound: λ₁ − θ₁ ≤ ‖r₁‖²/δ, δ = θ₁ − (θ₂ + ‖r₂‖)
                gap = x1 - float(theta[1]) - float(res[1])
                if gap > 0:
                    r1 = min(r1, r1 * r1 / gap)
            if r1 / x1 <= sr_tol or depth >= max_krylov_iters or (depth + 2) * block >= r // 2:
                break
        Y = AQs[-1]  # (r, b)
        Qall = torch.cat(Qs, 1)
        for _ in range(2):  # block Gram–Schmidt, twice for stability
            Y = Y - Qall @ (Qall.T @ Y)
        Q, _ = torch.linalg.qr(Y)
        Qs.append(Q)
        AQs.append(A(Q))
    # deflate the leading run of converged pairs (residual ≤ 1 % of the value, values above the bulk's mean)
    ok = (res <= 1e-2 * theta.clamp_min(1.0)) & (theta > 1.0)
    K = int(torch.cumprod(ok.int(), 0).sum())
    Ud = U[:, :K].float()  # (r, K)
    exact_part = float(_xlogx(theta[:K]).sum())
    # Control variate: on the complement, f(x) = h(x) + (x − 1) with h(x) = x log x − x + 1 ≈ (x−1)²/2 near the
    # bulk, and tr(x) = r − Σθ_defl, tr(1) = r − K are known exactly; only tr h (small variance) is sampled.
    known = (r - float(theta[:K].sum())) - (r - K)

    def h(x: torch.Tensor) -> torch.Tensor:
        return _xlogx(x) - x + 1.0

    # 2) SLQ on PAP with Gaussian probes, batched: every column runs its own Lanczos
    def slq(p: int) -> tuple[torch.Tensor, torch.Tensor]:
        Z = torch.randn(r, p, generator=gen)
        if K:
            Z = Z - Ud @ (Ud.T @ Z)
        nz = torch.linalg.vector_norm(Z, dim=0)  # (p,)
        v = Z / nz
        Vs = [v]
        alphas, betas = [], []
        v_prev, beta_prev = torch.zeros_like(v), torch.zeros(p)
        for j in range(lanczos_steps):
            w = A(v)
            if K:
                w = w - Ud @ (Ud.T @ w)
            a = (w * v).sum(0)  # (p,)
            w = w - a * v - beta_prev * v_prev
            Vst = torch.stack(Vs)  # (j+1, r, p)
            w = w - torch.einsum("jrp,jp->rp", Vst, torch.einsum("jrp,rp->jp", Vst, w))  # full reorth
            b = torch.linalg.vector_norm(w, dim=0)
            alphas.append(a)
            if j == lanczos_steps - 1 or float(b.min()) < 1e-6:
                break
            betas.append(b)
            v_prev, v, beta_prev = v, w / b, b
            Vs.append(v)
        al = torch.stack(alphas, 1).double()  # (p, s)
        be = torch.stack(betas, 1).double() if betas else torch.zeros(p, 0, dtype=torch.float64)

        def quad(s: int) -> torch.Tensor:
            off = be[:, : s - 1]
            Tm = torch.diag_embed(al[:, :s]) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            nodes, vecs = torch.linalg.eigh(Tm)  # (p, s), (p, s, s)
            return (nz.double() ** 2) * (vecs[:, 0, :] ** 2 * h(nodes)).sum(1)  # (p,)

        s = al.shape[1]
        return quad(s), quad(max(1, s - quad_gap))

    ests, ests_short = slq(probes)
    while True:
        mean = float(ests.mean())
        stderr = float(ests.std() / math.sqrt(ests.numel())) if ests.numel() > 1 else abs(mean)
        quad_err = abs(mean - float(ests_short.mean()))
        err_T = 2 * stderr + quad_err
        ent_err = err_T / (r * math.log(r))
        # more probes only shrink the sampling term: stop when it is not what exceeds the tolerance
        sampling_ok = 2 * stderr / (r * math.log(r)) <= entropy_tol / 2
        if ent_err <= entropy_tol or ests.numel() >= max_probes or sampling_ok:
            break
        e2, s2 = slq(min(probes, max_probes - ests.numel()))
        ests, ests_short = torch.cat([ests, e2]), torch.cat([ests_short, s2])
    trace_f = exact_part + known + mean
    entropy = 1.0 - trace_f / (r * math.log(r))
    return FastEstimate(
        spectral_norm=math.sqrt(x1 / c),
        frobenius_norm=math.sqrt(fro2),
        stable_rank=r / x1,
        stable_rank_rel_err=r1 / x1,
        svd_entropy=min(1.0, max(0.0, entropy)),
        svd_entropy_err=ent_err,
        method="fast",
        matvecs=matvecs,
    )

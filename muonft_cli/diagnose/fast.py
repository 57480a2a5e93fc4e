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
GEMMs on blocks of vectors, so the cost is a few hundred matrix-vector products instead of an O(r³)
eigendecomposition.

Products: on CPU, every product A·V is by default the native Gram operator (`_gram_native`,
``muonft_cli/native/gram_apply.c``): fp32 products and sums straight from W as stored (bf16 or fp32; no fp32
copy of a bf16 W), W streamed row by row — BLAS does A·V as two skinny GEMMs and re-packs W for each (MKL fp32:
2–4× slower than the operator for 8–24 columns, measured on Zen 4; on an AVX2 Zen 3 35 % of a run was MKL's
packing). It serves the Krylov phase always and the SLQ unless the SLQ runs in bf16 (below). Without a C
compiler (or with ``MUONFT_NATIVE=0``) the torch products below run instead, with the same results to
rounding.

Precision: the SLQ products — most of the work — run in bf16 (fp32 accumulation, oneDNN; W is used as stored)
where `auto_precision` says so: on CPUs with AMX, or with native bf16 (``avx512_bf16``, `native_bf16`) when the
native operator is unavailable; elsewhere (CUDA included) everything is fp32. The Krylov phase needs more than
bf16: bf16 rounds each product's output (≈ 2⁻⁹ relative), which floors the Ritz residuals near 1e-3, so fewer
pairs deflate and the deflated ones stay coupled to the rest — a bias in the entropy, measured at up to 0.004 on
a spiky test matrix — whereas in the SLQ the same rounding is far below the probes' sampling error (measured:
bf16 and fp32 SLQ on one deflation agree to < 1e-4; a term for it is still added to the entropy's reported error,
`_BF16_ENTROPY_TERM`). So the Krylov products run on the native operator, or without it as *split* bf16 GEMMs
(`_split_mm`): the fp32 block is split into bf16 high and low parts, and the output's rounding error is recovered
by a second GEMM that subtracts the rounded result inside the fp32 accumulator (``addmm(−Ŷ, X, V_hi)`` =
round(XV_hi − Ŷ)); two bf16 GEMMs per product (one at twice the block's width), ≈ 2⁻¹⁷ relative, no fp32 copy of
W, and ~1.3× faster than fp32 GEMMs on W's upcast row blocks for the Krylov phase of a 5632×2048 matrix on one
AMX core. Only for matrices stored in bf16: the products must be of W itself, not of a rounded copy. Whether the
accumulator really takes the subtraction in fp32 is checked once per process (`split_bf16_ok`); where it does
not, the Krylov phase runs on fp32 products from W's row blocks (upcast on the fly) as before.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from muonft_cli.spectral import singular_values, stable_rank, svd_entropy

__all__ = ["FastEstimate", "auto_precision", "fast_spectrum", "exact_estimate", "native_bf16", "split_bf16_ok",
           "PRECISIONS"]

_CHUNK_BYTES = 1 << 21  # row blocks of about 2 MiB: the Frobenius sum, and a bf16 W's fp32 products (upcast per block)
PRECISIONS = ("auto", "bf16", "fp32")
_BF16_ENTROPY_TERM = 2.0 ** -8
"""Added to the entropy's error bound when the Lanczos products ran in bf16: two output roundings of ≤ 2⁻⁹
each move a quadrature node x by a relative ≲ 2⁻⁸, which moves h(x) by ≲ 2⁻⁸·|x log x| (h′(x) = log x); the
term is 2⁻⁸ × the probes' mean quadrature of |x log x| on the deflated complement, per r log r. (A model of
the rounding, not a proof; the measured bf16-vs-fp32 difference is far below it, and `tests/test_diagnose.py`
checks both precisions against exact SVD on real trained matrices.)"""


@lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (``avx512_bf16`` or AMX): then bf16 GEMMs beat fp32 ones.

    ``MUONFT_DIAGNOSE_BF16=0`` forces fp32 (and ``=1`` bf16) for comparison runs.
    """
    env = os.environ.get("MUONFT_DIAGNOSE_BF16")
    if env in ("0", "1"):
        return env == "1"
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a missing/odd probe means "not native"
            pass
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's bf16 GEMMs there are far faster than any fp32 product)."""
    f = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(f is not None and f())
    except Exception:  # noqa: BLE001 - a missing/odd probe means "no AMX"
        return False


def auto_precision(device_type: str = "cpu") -> str:
    """What ``precision="auto"`` runs: ``bf16`` (the SLQ products as bf16 GEMMs) on a CPU with native bf16 —
    unless the native Gram operator (`_gram_native`, fp32) is available and the CPU has no AMX: it was as fast
    as oneDNN's bf16 GEMMs there (AVX512-BF16 without AMX, Zen 4: measured faster for 8-column products of
    tall and square matrices, ~10 % slower for wide ones), and exact to fp32; ``fp32`` otherwise, CUDA
    included. ``MUONFT_DIAGNOSE_BF16=0|1`` forces it (`native_bf16`)."""
    if device_type != "cpu" or not native_bf16():
        return "fp32"
    if os.environ.get("MUONFT_DIAGNOSE_BF16") == "1" or _amx():
        return "bf16"
    return "fp32" if _gram_kernel() is not None else "bf16"


_SPLIT_EPS = 2.0 ** -16
"""Relative accuracy claimed for a split bf16 product (`_split_mm`): the low part and the recovered output
rounding leave ≈ 2⁻¹⁷ (measured 5e-6 max-relative on 5632×2048); the stable-rank bound is not reported below it."""


def _split_mm(X: torch.Tensor, S: torch.Tensor, left: bool) -> torch.Tensor:
    """``X @ S`` (``left``) or ``S @ X`` in fp32 accuracy (≈ 2⁻¹⁷ relative) from bf16 GEMMs: X bf16 (the matrix, as
    stored), S an fp32 block of vectors. S = S_hi + S_lo (both bf16); one GEMM gives round(X·S_hi) and
    round(X·S_lo) together, a second gives the first's rounding error, round(X·S_hi − round(X·S_hi)), because
    ``addmm`` subtracts its C inside the fp32 accumulator (`split_bf16_ok` checks that)."""
    hi = S.to(torch.bfloat16)
    lo = (S - hi.float()).to(torch.bfloat16)
    b = S.shape[1] if left else S.shape[0]
    if left:
        H = X @ torch.cat([hi, lo], 1)  # (m, 2b)
        main, low = H[:, :b], H[:, b:]
        # X·V of a width past a multiple of 16 (the Krylov block's 24) ran ~2× slower than at the next multiple
        # (oneDNN on AVX512-BF16, Zen 4: 8.2 vs 4.1 ms for 5632×2048 at 24 vs 32 columns; 45 vs 23 ms for a
        # 32000×2048 embedding; equal or ±5 % elsewhere): zero columns make it one pass, the same bits per column
        pad = -b % 16 if b > 16 else 0
        if pad:
            err = torch.addmm(torch.cat([main, main.new_zeros(main.shape[0], pad)], 1), X,
                              torch.cat([hi, hi.new_zeros(hi.shape[0], pad)], 1), beta=-1)[:, :b]
        else:
            err = torch.addmm(main, X, hi, beta=-1)
    else:
        H = torch.cat([hi, lo], 0) @ X  # (2b, n)
        main, low = H[:b], H[b:]
        err = torch.addmm(main, hi, X, beta=-1)
    return main.float().add_(err.float()).add_(low.float())


@lru_cache(maxsize=4)
def split_bf16_ok(device_type: str = "cpu") -> bool:
    """Whether `_split_mm` reaches its accuracy here: bf16 ``addmm`` must add ``beta·C`` in its fp32 accumulator
    (oneDNN does; a kernel that rounds the product first would return zeros for the error term). Checked once
    per process on both orientations at a size that takes the same GEMM path as real matrices."""
    if device_type != "cpu":
        return False
    gen = torch.Generator().manual_seed(1234)
    X = torch.randn(768, 1024, generator=gen).to(torch.bfloat16)
    Xd = X.double()
    for left in (True, False):
        S = torch.randn(1024, 24, generator=gen) if left else torch.randn(24, 768, generator=gen)
        ref = Xd @ S.double() if left else S.double() @ Xd
        got = _split_mm(X, S, left).double()
        if float((got - ref).abs().max() / ref.abs().max()) > 2.0 ** -14:
            return False
    return True


def _gram_kernel():
    """The native Gram operator (`muonft_cli.native.gram_kernel`), or ``None`` (no compiler, MUONFT_NATIVE=0)."""
    from muonft_cli.native import gram_kernel

    return gram_kernel()


def _gram_native(gk, W: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """(WᵀW if m ≥ n else WWᵀ)·V in fp32 (products and sums) from the native kernel, W (m, n) contiguous fp32 or
    bf16 on CPU, V (r, b) fp32: columns in blocks of ≤ 32, each padded to a multiple of 8 with zeros (the
    kernel's widths; a zero column changes no other column)."""
    from muonft_cli.native import GRAM_MAX_BLOCK

    m, n = W.shape
    r, b = V.shape
    out = torch.empty(r, b)
    for j in range(0, b, GRAM_MAX_BLOCK):
        k = min(GRAM_MAX_BLOCK, b - j)
        kp = -(-k // 8) * 8
        Vj = V[:, j : j + k].float()
        if kp != k:
            Vj = torch.cat([Vj, Vj.new_zeros(r, kp - k)], 1)
        Vj = Vj.contiguous()
        oj = torch.empty(r, kp)
        scratch = torch.empty(max(1, gk.scratch_floats(m, n, kp)))
        gk.apply(W.data_ptr(), W.dtype == torch.bfloat16, m, n, Vj.data_ptr(), kp, oj.data_ptr(), scratch.data_ptr())
        out[:, j : j + k] = oj[:, :k]
    return out


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
    precision: str = "auto",
) -> FastEstimate:
    """Estimate σ₁, stable rank and SVD entropy of W by block Krylov deflation + stochastic Lanczos quadrature.

    Falls back to the exact computation when the Krylov basis would cover a large part of the space anyway
    (small matrices), so the result is never worse than exact there.

    Args:
        W: (m, n) matrix (any float dtype, on any device: everything runs where W is; bf16 W is used as is
            by the bf16 products, without an fp32 copy; sums in fp64).
        block: block size of the Krylov basis (the number of top pairs that can be deflated).
        krylov_iters: minimum Krylov depth q (basis size block·(q+1)).
        max_krylov_iters: maximum depth; the basis deepens until the stable rank's bound is ≤ ``sr_tol``.
        sr_tol: target relative error bound for σ₁² (hence the stable rank).
        lanczos_steps: Lanczos steps per probe.
        quad_gap: the quadrature's error is estimated as its change from ``lanczos_steps − quad_gap`` steps.
        probes: initial number of Hutchinson probes; more are added (up to ``max_probes``) until the
            entropy's error bound is ≤ ``entropy_tol`` — only while the probes' sampling term is above half the
            tolerance (more probes cannot shrink the quadrature term).
        seed: seed of the probes' generator (results are deterministic for a given seed and precision).
        exact_below: compute exactly when r ≤ max(exact_below, 3·block·(krylov_iters+1)).
        precision: ``bf16`` (the SLQ products in bf16; the Krylov phase's fp32-accurate), ``fp32``, or
            ``auto`` (`auto_precision`: bf16 on a CPU with native bf16 unless the native fp32 operator is as
            fast there; fp32 otherwise, CUDA included).

    Returns:
        `FastEstimate` with ``method="fast"`` (or ``"exact"`` on fallback).
    """
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(W.shape)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    m, n = W.shape
    r = min(m, n)
    basis_dim = block * (krylov_iters + 1)
    if r <= max(exact_below, 3 * basis_dim):
        return exact_estimate(W)
    dev = W.device
    if precision == "auto":
        precision = auto_precision(dev.type)
    low = precision == "bf16"
    # the native Gram operator (`_gram_native`): fp32 products straight from W as stored (fp32 or bf16) — the
    # Krylov phase's products in bf16 mode (instead of split GEMMs or upcast row blocks), every product in fp32
    # mode (no fp32 copy of a bf16 W); where it is unavailable, the torch products below
    gk = _gram_kernel() if dev.type == "cpu" and W.dtype in (torch.float32, torch.bfloat16) else None
    Wn = W.contiguous() if gk is not None else None
    # without it, Krylov products as split bf16 GEMMs: only for a matrix stored in bf16 (X is then W itself; a
    # rounded copy of an fp32/fp16 W would be a different matrix, ≈ 2⁻⁹ off — 1.3e-4 in stable rank on MiniLM)
    split = low and gk is None and W.dtype == torch.bfloat16 and dev.type == "cpu" and split_bf16_ok(dev.type)
    # the matrix the torch block products read: bf16 as stored (or rounded once), else fp32
    X = Wn if gk is not None and not low else W.to(torch.bfloat16 if low else torch.float32).contiguous()
    rows = max(1, _CHUNK_BYTES // (4 * n))

    def chunks():  # fp32 row blocks of W: views if W is fp32, else upcast into one reused buffer (no fp32 copy
        # of the matrix, and no fresh allocation per block: page-faulting new blocks in cost as much as the math)
        buf = None if W.dtype == torch.float32 else torch.empty(min(rows, m), n, device=dev)
        for i in range(0, m, rows):
            if buf is None:
                yield i, W[i : i + rows]
            else:
                k = min(rows, m - i)
                yield i, buf[:k].copy_(W[i : i + k])

    def fro2_of(Wc: torch.Tensor) -> float:  # one block's ‖·‖²_F: fp32 norms per row, squared and summed in fp64
        # (~1e-7 relative, under the stable-rank bound's fp32 floor below; one fp32 norm over the block is ~1e-5
        # off, and an fp64 copy of each block costs ~15 % of the whole estimate)
        return float(torch.linalg.vector_norm(Wc, dim=1).double().square().sum())

    # ‖W‖²_F: in fp32 mode and with split products now (one pass over W's row blocks); otherwise in bf16 mode from
    # the same row blocks as the first fp32 Krylov product
    fro2 = sum(fro2_of(Wc) for _, Wc in chunks()) if split or not low or gk is not None else 0.0
    if fro2 == 0 and not low:
        return FastEstimate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "fast", 0)
    c = 1.0 if low else r / fro2  # normalise: eigenvalues x = c·σ², mean 1 (bf16 mode: set after the Krylov phase)
    gen = torch.Generator().manual_seed(seed)
    matvecs = 0

    def randn(*shape: int) -> torch.Tensor:  # CPU generator (same draws on every device), then moved
        return torch.randn(*shape, generator=gen).to(dev)

    def A(V: torch.Tensor) -> torch.Tensor:  # V: (r, b) fp32 → (r, b) fp32
        # Written so every GEMM reads X row-major: a transposed X times a skinny block is ~50× slower on CPU.
        # (Row-blocked single-pass variants measured slower here: the skinny GEMM, not memory, is the bound.)
        nonlocal matvecs
        matvecs += V.shape[1]
        if gk is not None and not low:
            return _gram_native(gk, Wn, V) * c
        Vx = V.to(X.dtype)
        if m >= n:  # A = XᵀX
            Y = X @ Vx  # (m, b)
            return (Y.T @ X).T.float() * c  # (r, b)
        Y = Vx.T @ X  # (b, n) = (XᵀV)ᵀ
        return (X @ Y.T).float() * c  # (m, b)

    def A_fp32(V: torch.Tensor, fro: bool) -> tuple[torch.Tensor, float]:
        """(WᵀW or WWᵀ)·V in fp32 from W's row blocks (unscaled), and with ``fro`` ‖W‖²_F from the same blocks
        (else 0). V: (r, b)."""
        nonlocal matvecs
        matvecs += V.shape[1]
        f2 = 0.0
        if m >= n:
            out = torch.zeros_like(V)
            for _, Wc in chunks():
                out += (Wc @ V).T.matmul(Wc).T
                f2 += fro2_of(Wc) if fro else 0.0
            return out, f2
        # A = WWᵀ: column blocks Wc (m, k) give A·V = Σ Wc·(Wcᵀ·V) in one pass (row blocks would need two)
        cols = max(1, 4 * _CHUNK_BYTES // (4 * m))
        buf = torch.empty(m, min(cols, n), device=dev)
        out = torch.zeros_like(V)
        for j in range(0, n, cols):
            k = min(cols, n - j)
            Wc = buf[:, :k].copy_(W[:, j : j + k])
            out += Wc @ (V.T @ Wc).T
            f2 += fro2_of(Wc) if fro else 0.0
        return out, f2

    def ritz(Qb: torch.Tensor, AQb: torch.Tensor):
        """Rayleigh–Ritz on an orthonormal basis Qb (r, k) with AQb = A·Qb: values (descending), vectors,
        residual norms, and λ₁'s bound (the residual, or the Kato–Temple-style gap bound when it is smaller)."""
        Qd, AQd = Qb.double(), AQb.double()
        T = (Qd.T @ AQd).cpu()  # (k, k)
        theta, V = torch.linalg.eigh((T + T.T) / 2)  # ascending
        theta, V = theta.flip(0), V.flip(1).to(dev)
        U = Qd @ V  # (r, k) Ritz vectors
        res = torch.linalg.vector_norm(AQd @ V - U * theta.to(dev), dim=0).cpu()  # (k,)
        x1, r1 = float(theta[0]), float(res[0])
        if theta.numel() > 1:  # Kato–Temple-style gap bound: λ₁ − θ₁ ≤ ‖r₁‖²/δ, δ = θ₁ − (θ₂ + ‖r₂‖)
            gap = x1 - float(theta[1]) - float(res[1])
            if gap > 0:
                r1 = min(r1, r1 * r1 / gap)
        return theta, U, res, x1, r1

    # 1) randomized block Krylov + Rayleigh–Ritz, keeping A·Q of every block (one block product per depth);
    #    deepen until σ₁'s bound is within ``sr_tol`` (flat-topped spectra converge slowly) or ``max_krylov_iters``.
    #    In bf16 mode this phase runs on fp32-accurate products — split bf16 GEMMs (`_split_mm`), or where those
    #    are unavailable fp32 GEMMs on W's row blocks upcast on the fly (whose first pass also sums ‖W‖²_F):
    #    bf16's rounded outputs put a ≈ 1e-3 relative floor under the Ritz residuals, which would leave fewer
    #    pairs deflated and the deflated ones coupled to the rest — a bias in the entropy, not only in σ₁'s
    #    bound. The Krylov phase is scale-free (only r₁/θ₁ is tested), so it runs unscaled until then.
    def A_split(V: torch.Tensor) -> torch.Tensor:  # (WᵀW or WWᵀ)·V, unscaled, fp32-accurate from split bf16 GEMMs
        nonlocal matvecs
        matvecs += V.shape[1]
        if m >= n:
            return _split_mm(X, _split_mm(X, V, left=True).T, left=False).T  # ((XV)ᵀX)ᵀ, (n, b)
        return _split_mm(X, _split_mm(X, V.T, left=False).T, left=True)  # X(VᵀX)ᵀ, (m, b)

    def A_krylov(V: torch.Tensor) -> torch.Tensor:
        nonlocal fro2, matvecs
        if not low:
            return A(V)
        if gk is not None:
            matvecs += V.shape[1]
            return _gram_native(gk, Wn, V)
        if split:
            return A_split(V)
        out, f2 = A_fp32(V, fro=fro2 == 0)
        fro2 = fro2 or f2
        return out

    Q, _ = torch.linalg.qr(randn(r, block))  # (r, b)
    Qs, AQs = [Q], [A_krylov(Q)]
    if fro2 == 0 or not bool(AQs[0].any()):  # W·Q = 0 for a random Q: W = 0
        return FastEstimate(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, "fast", matvecs)
    depth = 0
    while True:
        depth += 1
        if depth >= krylov_iters:
            theta, U, res, x1, r1 = ritz(torch.cat(Qs, 1), torch.cat(AQs, 1))
            if r1 / x1 <= sr_tol or depth >= max_krylov_iters or (depth + 2) * block >= r // 2:
                break
        Y = AQs[-1]  # (r, b)
        Qall = torch.cat(Qs, 1)
        for _ in range(2):  # block Gram–Schmidt, twice for stability
            Y = Y - Qall @ (Qall.T @ Y)
        Q, _ = torch.linalg.qr(Y)
        Qs.append(Q)
        AQs.append(A_krylov(Q))
    def converged(theta: torch.Tensor, res: torch.Tensor) -> int:
        """The leading run of converged pairs (residual ≤ 1 % of the value, values above the bulk's mean)."""
        ok = (res <= 1e-2 * theta.clamp_min(1.0)) & (theta > 1.0)
        return int(torch.cumprod(ok.int(), 0).sum())

    K = converged(theta, res)
    if low:  # the Krylov phase ran unscaled: put its values on the normalised scale (mean eigenvalue 1)
        c = r / fro2
        theta, res, x1, r1 = theta * c, res * c, x1 * c, r1 * c
        K = converged(theta, res)
    Ud = U[:, :K].float()  # (r, K) deflated Ritz vectors
    exact_part = float(_xlogx(theta[:K]).sum())
    # Control variate: on the complement, f(x) = h(x) + (x − 1) with h(x) = x log x − x + 1 ≈ (x−1)²/2 near the
    # bulk, and tr(x) = r − Σθ_defl, tr(1) = r − K are known exactly; only tr h (small variance) is sampled.
    known = (r - float(theta[:K].sum())) - (r - K)

    def h(x: torch.Tensor) -> torch.Tensor:
        return _xlogx(x) - x + 1.0

    # 2) SLQ on PAP with Gaussian probes, batched: every column runs its own Lanczos
    def slq(p: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        Z = randn(r, p)
        if K:
            Z = Z - Ud @ (Ud.T @ Z)
        nz = torch.linalg.vector_norm(Z, dim=0)  # (p,)
        v = Z / nz
        Vs = [v]
        alphas, betas = [], []
        v_prev, beta_prev = torch.zeros_like(v), torch.zeros(p, device=dev)
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
        al = torch.stack(alphas, 1).double().cpu()  # (p, s)
        be = torch.stack(betas, 1).double().cpu() if betas else torch.zeros(p, 0, dtype=torch.float64)
        nz2 = nz.double().cpu() ** 2

        def quad(s: int, g=h) -> torch.Tensor:
            off = be[:, : s - 1]
            Tm = torch.diag_embed(al[:, :s]) + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            nodes, vecs = torch.linalg.eigh(Tm)  # (p, s), (p, s, s)
            return nz2 * (vecs[:, 0, :] ** 2 * g(nodes)).sum(1)  # (p,)

        s = al.shape[1]
        return quad(s), quad(max(1, s - quad_gap)), quad(s, lambda x: _xlogx(x).abs())

    ests, ests_short, ests_abs = slq(probes)
    while True:
        mean = float(ests.mean())
        stderr = float(ests.std() / math.sqrt(ests.numel())) if ests.numel() > 1 else abs(mean)
        quad_err = abs(mean - float(ests_short.mean()))
        round_err = _BF16_ENTROPY_TERM * float(ests_abs.mean()) if low else 0.0
        err_T = 2 * stderr + quad_err + round_err
        ent_err = err_T / (r * math.log(r))
        # more probes only shrink the sampling term: stop when it is not what exceeds the tolerance
        sampling_ok = 2 * stderr / (r * math.log(r)) <= entropy_tol / 2
        if ent_err <= entropy_tol or ests.numel() >= max_probes or sampling_ok:
            break
        e2, s2, a2 = slq(min(probes, max_probes - ests.numel()))
        ests, ests_short, ests_abs = torch.cat([ests, e2]), torch.cat([ests_short, s2]), torch.cat([ests_abs, a2])
    trace_f = exact_part + known + mean
    entropy = 1.0 - trace_f / (r * math.log(r))
    return FastEstimate(
        spectral_norm=math.sqrt(x1 / c),
        frobenius_norm=math.sqrt(fro2),
        stable_rank=r / x1,
        # not below what fp32 products can resolve (≈ 2√max(m,n)·2⁻²⁴ on x₁; the Kato–Temple bound can go under it)
        # (split bf16 Krylov products: not below their ≈ 2⁻¹⁶ accuracy, for the two products of each step)
        stable_rank_rel_err=max(r1 / x1, 2 * math.sqrt(max(m, n)) * 2.0**-24, 2 * _SPLIT_EPS if split else 0.0),
        svd_entropy=min(1.0, max(0.0, entropy)),
        svd_entropy_err=ent_err,
        method="fast",
        matvecs=matvecs,
    )

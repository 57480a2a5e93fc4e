"""Matrix orthogonalisation for Muon: Newton–Schulz (NS5) and Polar Express, direct and Gram-space.

Owns the pure math that maps a (batch of) matrices ``G = U S Vᵀ`` to an approximation of its polar
factor ``U Vᵀ``:

* ``method="jordan"`` — Keller Jordan's NS5 quintic ``X ← aX + (bA + cA²)X`` with ``A = XXᵀ`` and
  ``(a, b, c) = (3.4445, −4.7750, 2.0315)`` (Keller Jordan, "Muon: An optimizer for hidden layers in
  neural networks"; paper §2.1, App. B).  It does not converge to ``UVᵀ`` but maps singular values into
  roughly [0.7, 1.1].
* ``method="polar_express"`` — Amsel et al., "The Polar Express" (2025/26): a different odd quintic per
  iteration, each the minimax (equioscillating) approximation of 1 on the current singular-value
  interval (optimal composition).  The coefficients are *computed* here by
  :func:`polar_express_coefficients` (Remez exchange on a 4×4 system), not copied.
* ``method="svd"`` — the exact polar factor via SVD (reference/tests; slow).

Two execution paths, chosen by shape:

* direct: iterate on the (r×c, r ≤ c) matrix itself in ``dtype`` (bf16 where matmul is native); with
  c ≥ 2r (``gram_ns``) on its short side, ``X_k = Q_k X_0`` with restarts (:func:`_direct_gram`).  On CPU
  the products symmetric in exact arithmetic are formed from their lower blocks (:func:`_sym_bmm`), the
  upper ones mirrored by a native copy kernel (:func:`muonft_cli.native.mirror_kernel`, torch's copy
  without it).
* Gram space (min dimension ≤ 64, i.e. LoRA A and B): every iterate is ``X_k = Q_k X_0`` with
  ``Q_k`` a polynomial in the r×r Gram matrix ``S = X_0 X_0ᵀ``, so the iteration runs on r×r
  matrices (in float64: free at r ≤ 64, and fp32 loses the small singular values once
  cond ≥ 1e3) and ``Q_K`` is applied to ``X_0`` once at the end.  Same iterate, ~c/r fewer FLOPs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from muonft_cli.native import mirror_kernel

__all__ = [
    "JORDAN_COEFFICIENTS",
    "GRAM_MAX_DIM",
    "orthogonalize",
    "polar_express_coefficients",
    "ns_coefficients",
    "default_ns_dtype",
    "resolve_ns_dtype",
]

JORDAN_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
"""NS5 quintic of Keller Jordan's Muon (also torch.optim.Muon's default)."""

GRAM_MAX_DIM = 64
"""Matrices whose smaller dimension is at most this use the Gram-space path."""

_NORM_EPS = 1e-7  # same clamp as torch.optim.Muon
_PE_NORM_SCALE = 1.01  # Polar Express reference code normalises by ‖X‖_F · 1.01
_METHODS = ("jordan", "polar_express", "svd")


# --------------------------------------------------------------------------------------------------
# Polar Express coefficients (optimal composition of minimax odd quintics)
# --------------------------------------------------------------------------------------------------


def _odd_quintic(coeffs: Sequence[float], x: float) -> float:
    a, b, c = coeffs
    return a * x + b * x**3 + c * x**5


def _optimal_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """Minimax odd quintic ``p`` approximating 1 on ``[lo, hi]`` (Remez exchange).

    ``p - 1`` equioscillates at ``lo < q < r < hi`` with values ``−E, +E, −E, +E``; ``q, r`` are the
    interior critical points of ``p``.  Each Remez step solves the 4×4 linear system for ``(a, b, c, E)``
    and moves ``q, r`` to the roots of ``p'(x) = a + 3bx² + 5cx⁴``.
    """
    if not 0.0 <= lo <= hi:
        raise ValueError(f"need 0 <= lo <= hi, got lo={lo}, hi={hi}")
    if lo / hi >= 1.0 - 5e-6:
        # Interval collapsed to a point: the limit is the Newton–Schulz quintic scaled to [lo, hi].
        return 15.0 / 8.0 / hi, -10.0 / 8.0 / hi**3, 3.0 / 8.0 / hi**5
    q, r = (3.0 * lo + hi) / 4.0, (lo + 3.0 * hi) / 4.0  # exact as lo → hi
    err, prev_err = math.inf, None
    for _ in range(100):
        if prev_err is not None and abs(prev_err - err) <= 1e-15:
            break
        prev_err = err
        lhs = torch.tensor(
            [[x, x**3, x**5, sign] for x, sign in ((lo, 1.0), (q, -1.0), (r, 1.0), (hi, -1.0))],
            dtype=torch.float64,
        )
        a, b, c, err = torch.linalg.solve(lhs, torch.ones(4, dtype=torch.float64)).tolist()
        disc = math.sqrt(9.0 * b * b - 20.0 * a * c)
        q = math.sqrt((-3.0 * b - disc) / (10.0 * c))
        r = math.sqrt((-3.0 * b + disc) / (10.0 * c))
    return a, b, c


@functools.lru_cache(maxsize=16)
def _polar_express_schedule(
    lower: float, iterations: int, safety: float, cushion: float
) -> tuple[tuple[tuple[float, float, float], ...], tuple[tuple[float, float, float], ...]]:
    raw: list[tuple[float, float, float]] = []
    lo, hi = lower, 1.0
    for _ in range(iterations):
        a, b, c = _optimal_quintic(max(lo, cushion * hi), hi)
        # The cushion may centre p on [cushion·hi, hi]; recentre so that 1 − p(lo) = p(hi) − 1.
        rescale = 2.0 / (_odd_quintic((a, b, c), lo) + _odd_quintic((a, b, c), hi))
        a, b, c = a * rescale, b * rescale, c * rescale
        raw.append((a, b, c))
        lo = _odd_quintic((a, b, c), lo)
        hi = 2.0 - lo
    s = 1.0 + safety
    safe = [(a / s, b / s**3, c / s**5) for a, b, c in raw[:-1]] + [raw[-1]]
    return tuple(raw), tuple(safe)


def polar_express_coefficients(
    lower: float = 1e-3,
    iterations: int = 10,
    safety: float = 1e-2,
    cushion: float = 0.02407327424182761,
    *,
    apply_safety: bool = True,
) -> list[tuple[float, float, float]]:
    """Per-iteration Polar Express coefficients ``(a_i, b_i, c_i)`` by optimal composition.

    Iteration ``i`` uses the minimax odd quintic on ``[max(ℓ_i, cushion·u_i), u_i]``, recentred so the
    error at ``ℓ_i`` and ``u_i`` is equal, then ``ℓ_{i+1} = p_i(ℓ_i)``, ``u_{i+1} = 2 − ℓ_{i+1}``
    (Amsel et al., Algorithm 1; ``ℓ_0 = lower``, ``u_0 = 1``).  Cached per argument set.

    Args:
        lower: lower bound ℓ on the normalised singular values.
        iterations: number of polynomials in the schedule.
        safety: safety margin ε; with ``apply_safety`` every polynomial except the last is replaced by
            ``p(x / (1 + ε)) `` i.e. ``(a/s, b/s³, c/s⁵)`` with ``s = 1 + ε`` (as the reference code does),
            guarding against round-off pushing singular values past the interval.
        cushion: the reference code's exact default 0.02407327424182761 (the paper rounds it to 0.02;
            only the exact value reproduces the published schedule).
        apply_safety: ``True`` (default): the safety factor IS applied (what :func:`orthogonalize` uses);
            ``False``: the raw triples as published, e.g. (8.28721, −23.59589, 17.30039).

    Returns:
        ``iterations`` triples ``(a, b, c)``.
    """
    if not 0.0 < lower < 1.0:
        raise ValueError(f"lower must be in (0, 1), got {lower}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if safety < 0.0:
        raise ValueError(f"safety must be >= 0, got {safety}")
    raw, safe = _polar_express_schedule(float(lower), int(iterations), float(safety), float(cushion))
    return list(safe if apply_safety else raw)


def ns_coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    """The ``steps`` coefficient triples that ``orthogonalize(method=...)`` applies.

    Polar Express uses the first ``steps`` triples of the default schedule; past its end the last
    triple repeats.
    """
    if steps < 0:
        raise ValueError(f"ns steps must be >= 0, got {steps}")
    if method == "jordan":
        return [JORDAN_COEFFICIENTS] * steps
    if method == "polar_express":
        sched = polar_express_coefficients()
        return sched[:steps] + [sched[-1]] * max(0, steps - len(sched))
    raise ValueError(f"unknown orthogonalisation method {method!r}; expected one of {_METHODS}")


# --------------------------------------------------------------------------------------------------
# dtype policy
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    """True when the CPU has native bf16 matmul (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for probe in probes:
        fn = getattr(torch.cpu, probe, None)
        if fn is not None:
            try:
                if fn():
                    return True
            except RuntimeError:
                pass
    if all(getattr(torch.cpu, p, None) is not None for p in probes):
        return False
    try:  # older torch: read the kernel's CPU flags
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def default_ns_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matmul (AVX512-BF16/AMX), fp32 otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu":
        return torch.bfloat16 if _cpu_has_native_bf16() else torch.float32
    return torch.float32


_DTYPE_NAMES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}


def resolve_ns_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """Map ``None``/``"auto"``/``"bf16"``/``"fp32"``/a torch dtype to the dtype NS runs in."""
    if dtype is None or dtype == "auto":
        return default_ns_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_NAMES[str(dtype).lower()]
    except KeyError:
        raise ValueError(
            f"unknown ns dtype {dtype!r}; expected 'auto', 'bf16' or 'fp32'"
        ) from None


# --------------------------------------------------------------------------------------------------
# The iterations
# --------------------------------------------------------------------------------------------------


SYM_MIN_BLOCK = 128
"""Symmetric products (:func:`_sym_bmm`) split their n rows into k equal blocks of at least this many
rows, ``SYM_MIN_BLOCKS ≤ k ≤ SYM_MAX_BLOCKS``; other matrices (n < 512, or no such k divides n) take
one plain ``bmm``: at 256×256 the blocked form ran 1.3–2.2× slower than one bmm (README "Optimizers")."""

SYM_MIN_BLOCKS = 4
SYM_MAX_BLOCKS = 8


def _sym_blocks(X: torch.Tensor) -> int:
    """How many row blocks :func:`_sym_bmm` splits X (b, n, ·) into; 1 = a plain bmm.

    CPU only: there the block products run at the full GEMM rate (oneDNN bf16/fp32, measured at
    n ≥ 256), and the per-matrix loop over blocks costs microseconds.  On a GPU the loop would be
    b·k launches per product, and nothing was measured there, so CUDA keeps the plain bmm.
    """
    if X.device.type != "cpu":
        return 1
    n = X.shape[-2]
    for k in range(min(SYM_MAX_BLOCKS, n // SYM_MIN_BLOCK), SYM_MIN_BLOCKS - 1, -1):
        if n % k == 0:
            return k
    return 1


def _sym_bmm(
    L: torch.Tensor,
    R: torch.Tensor,
    C: torch.Tensor | None = None,
    *,
    beta: float = 0.0,
    alpha: float = 1.0,
    symmetric_r: bool = False,
) -> torch.Tensor:
    """``beta·C + alpha·L Rᵀ`` (b, n, n) for a product that is symmetric in exact arithmetic.

    ``L``, ``R``: (b, n, m), any strides; ``C``: (b, n, n) symmetric (or None).  ``symmetric_r``: R is
    symmetric in exact arithmetic (``A``, ``Q``, ``AP``), so ``L R`` is meant, and unsplit that is the
    call made (``bmm(L, R)``; else ``bmm(L, Rᵀ)``).  Only the blocks on and below the diagonal are
    computed (k row blocks: block row j's ``j + 1`` blocks in one mm per matrix, written in place), the
    ones above are their transposes (:func:`_mirror_upper`): (k+1)/2k of the FLOPs, 0.69–0.74× the time of
    one bmm at n = 1024, k = 8 (measured by hand, bf16, 2 threads).  Every product Newton–Schulz forms besides the final
    ``B·X`` is of this kind (``XXᵀ``, ``A²``, and in Gram space the products of polynomials in one
    symmetric matrix, which commute).  The mirrored blocks are exact transposes, the diagonal blocks
    symmetric to round-off.  Unsplit (k = 1) it is the plain ``bmm``/``baddbmm``, the same call as before
    this existed.  This is a syrk/gemmt: BLAS has them, but torch exposes neither, and not for bf16 nor
    batched.
    """
    k = _sym_blocks(L)
    if k == 1:
        Rm = R if symmetric_r else R.mT
        if C is None:
            return torch.bmm(L, Rm) if alpha == 1.0 else torch.bmm(L, Rm).mul_(alpha)
        return torch.baddbmm(C, L, Rm, beta=beta, alpha=alpha)
    b, n, _ = L.shape
    s = n // k
    out = torch.empty((b, n, n), dtype=L.dtype, device=L.device)
    for i in range(b):
        Li, Ri, Oi = L[i], R[i], out[i]
        for j in range(k):
            rows, upto = slice(j * s, (j + 1) * s), slice(0, (j + 1) * s)
            blk = Oi[rows, upto]  # block row j up to the diagonal: one GEMM into the result's rows
            if C is None:
                torch.mm(Li[rows], Ri[upto].mT, out=blk)
                if alpha != 1.0:
                    blk.mul_(alpha)
            else:
                torch.addmm(C[i, rows, upto], Li[rows], Ri[upto].mT, beta=beta, alpha=alpha, out=blk)
    _mirror_upper(out, s)
    return out


def _mirror_upper(out: torch.Tensor, s: int) -> None:
    """Copy the blocks below the diagonal of (b, n, n) ``out``'s grid of s×s blocks, transposed, above it.

    The native kernel (``muonft_cli/native/sym_mirror.c``) on contiguous 2- and 4-byte CPU tensors: torch's
    strided transpose copy took ~1.4 ns per bf16 element on 2 threads, a sixth of the whole product at
    1024², the kernel 5–9× less; bit for bit the same copy.  Else (no compiler, ``MUONFT_NATIVE=0``, fp64)
    the torch copy, one block row at a time."""
    b, n, _ = out.shape
    kernel = mirror_kernel() if out.is_contiguous() and out.element_size() in (2, 4) else None
    if kernel is not None:
        kernel.mirror(out.data_ptr(), out.element_size(), b, n, s, torch.get_num_threads())
        return
    for i in range(b):
        Oi = out[i]
        for j in range(s, n, s):
            Oi[:j, j:j + s] = Oi[j:j + s, :j].mT


def _direct(
    X: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], norm_scale: float
) -> torch.Tensor:
    """Iterate on X itself.  X: (b, r, c) with r <= c, already in the compute dtype (modified).

    ``A = XXᵀ`` and ``A²`` are symmetric and formed by :func:`_sym_bmm`; ``B·X`` is a plain bmm."""
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)  # (b, 1, 1)
    if norm_scale != 1.0:
        norm = norm * norm_scale
    X = X.div_(norm.clamp_(min=_NORM_EPS))
    for a, b, c in coeffs:
        A = _sym_bmm(X, X)  # (b, r, r)
        B = _sym_bmm(A, A, A, beta=b, alpha=c, symmetric_r=True)  # b·A + c·A² (A = Aᵀ)
        X = torch.baddbmm(X, B, X, beta=a)  # a·X + B·X
    return X


GRAM_NS_MIN_ASPECT = 2.0
"""Direct-path matrices with long side ≥ this × short side iterate in Gram space (:func:`_direct_gram`)."""

GRAM_NS_RESTARTS: tuple[int, ...] = (2, 4)
"""Iterations after which the Gram-space NS rebuilds X = QX₀ and its Gram (bounds round-off in bf16)."""


def _direct_gram(
    X: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    norm_scale: float,
    restarts: Sequence[int] = GRAM_NS_RESTARTS,
) -> torch.Tensor:
    """The same iteration as :func:`_direct` for wide X (b, r, c), c ≥ 2r, run on the r×r side.

    Every iterate is ``X_k = Q_k X₀`` with ``Q_k`` a polynomial in the Gram ``A₀ = X₀X₀ᵀ``: per step
    ``P = a + bA + cA²``, ``Q ← PQ``, ``A ← PAP`` (r×r products only) and ``O = Q X₀`` once at the end,
    so a step costs ~8r³ instead of 4r²c + 2r³ (the idea of Dao-AILab's gram-newton-schulz).  In bf16
    the r×r recursion drifts, so after the iterations in ``restarts`` the iterate is formed explicitly,
    ``X ← QX``, and its Gram recomputed (``A = XXᵀ``, ``Q = I``).  X is in the compute dtype (modified).
    """
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    if norm_scale != 1.0:
        norm = norm * norm_scale
    X = X.div_(norm.clamp_(min=_NORM_EPS))
    r = X.shape[-2]
    eye = torch.eye(r, dtype=X.dtype, device=X.device)
    A = _sym_bmm(X, X)
    Q = None
    last = len(coeffs) - 1
    for i, (a, b, c) in enumerate(coeffs):
        if i in restarts and Q is not None:
            X, Q = torch.bmm(Q, X), None
            A = _sym_bmm(X, X)
        P = _sym_bmm(A, A, A, beta=b, alpha=c, symmetric_r=True).add_(eye, alpha=a)  # a + bA + cA²
        # P, Q, A: polynomials in A₀, symmetric, commuting
        Q = P if Q is None else _sym_bmm(P, Q, symmetric_r=True)
        if i < last and (i + 1) not in restarts:
            A = _sym_bmm(P, _sym_bmm(A, P, symmetric_r=True), symmetric_r=True)  # PAP
    return X if Q is None else torch.bmm(Q, X)


def gram_matrix(
    X: torch.Tensor,
    tall: bool = False,
    *,
    out: torch.Tensor | None = None,
    block_bytes: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """The float64 Gram matrices ``S = X Xᵀ`` (wide, X: (b, r, c)) or ``XᵀX`` (``tall``, X: (b, c, r)).

    Formed over float64 blocks of at most ``block_bytes`` (no float64 copy of X exists as a whole);
    ``workspace`` (float64, shaped ``(step, *X.shape[1:])``) is reused as the block buffer when given.
    float64 matters here: S squares the condition number, and an fp32-accumulated S already costs
    ~1e-4 relative error in the result at condition 1e3 (tests/test_optim.py).

    Returns:
        (b, r, r) float64 tensor (``out`` when given).
    """
    b = X.shape[0]
    r = X.shape[-1] if tall else X.shape[-2]
    f64 = torch.float64

    def gram(blk: torch.Tensor, dst: torch.Tensor) -> None:
        if tall:
            torch.bmm(blk.mT, blk, out=dst)  # (k, r, r)
        else:
            torch.bmm(blk, blk.mT, out=dst)

    if block_bytes is None:
        block_bytes = 4 * 2**20 if X.device.type == "cpu" else 1024 * 2**20
    step = max(1, min(b, block_bytes // max(1, X[0].numel() * 8)))
    if workspace is not None:
        if workspace.dtype != f64 or tuple(workspace.shape[1:]) != tuple(X.shape[1:]):
            raise ValueError("workspace must be float64 shaped (step, *X.shape[1:])")
        step = workspace.shape[0]
    S = out if out is not None else torch.empty((b, r, r), dtype=f64, device=X.device)
    if X.dtype == f64:
        gram(X, S)
    else:
        buf = workspace if workspace is not None else torch.empty((step, *X.shape[1:]), dtype=f64, device=X.device)
        for i in range(0, b, step):
            k = min(step, b - i)
            gram(buf[:k].copy_(X[i : i + k]), S[i : i + k])
    return S


def gram_iterate(S: torch.Tensor, coeffs: Sequence[tuple[float, float, float]], norm_scale: float) -> torch.Tensor:
    """The r×r factor ``Q_K / ‖X₀‖`` of the Gram-space iteration from the float64 Grams ``S`` (b, r, r).

    With ``S = X₀X₀ᵀ``, every iterate is ``X_k = Q_k X₀`` and ``A_k = X_k X_kᵀ = Q_k² S``;
    ``P = a + bA + cA²`` gives ``Q ← PQ``, ``A ← P²A`` (all polynomials in S: they commute and are
    symmetric).  Batched over any number of matrices of one r (the optimizer runs every thin matrix of
    a step through one call).  ``S`` is overwritten.

    Returns:
        (b, r, r) float64 tensor ``Q_K / (‖X₀‖_F · norm_scale)``.
    """
    r = S.shape[-1]
    f64 = torch.float64
    sq = S.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_(min=0.0)  # ‖X‖_F², (b,)
    norm = (sq.sqrt() * norm_scale).clamp_(min=_NORM_EPS)[:, None, None]  # (b, 1, 1)
    A = S.div_(norm.square())  # Gram of the normalised X₀
    eye = torch.eye(r, dtype=f64, device=S.device).expand_as(S)
    Q = None
    for a, bb, cc in coeffs:
        P = torch.baddbmm(A, A, A, beta=bb, alpha=cc).add_(eye, alpha=a)  # a + bA + cA², (b, r, r)
        Q = P if Q is None else torch.bmm(P, Q)
        A = torch.bmm(P, torch.bmm(A, P))
        A = 0.5 * (A + A.mT)  # keep it symmetric against round-off
    if Q is None:
        Q = eye.clone()
    return Q / norm


def _gram_q(
    X: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    norm_scale: float,
    tall: bool = False,
    block_bytes: int | None = None,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """The r×r factor ``Q_K / ‖X‖`` of the Gram-space iteration, in float64: :func:`gram_matrix` then
    :func:`gram_iterate`.  X: (b, r, c) with r <= c (``tall=False``; result ``O = Q X``) or (b, c, r)
    (``tall=True``; ``O = X Q``) — tall matrices are used as stored, never transposed.

    Returns:
        (b, r, r) float64 tensor ``Q_K / (‖X₀‖_F · norm_scale)``.
    """
    S = gram_matrix(X, tall, block_bytes=block_bytes, workspace=workspace)
    return gram_iterate(S, coeffs, norm_scale)


def _gram(
    X: torch.Tensor,
    coeffs: Sequence[tuple[float, float, float]],
    norm_scale: float,
    out_dtype: torch.dtype,
    tall: bool = False,
) -> torch.Tensor:
    """Gram-space orthogonalisation of X (see :func:`_gram_q`), returning ``O`` shaped like X.

    The final product runs in X's precision (fp32 for 16-bit inputs), which adds no error beyond
    the input's own rounding (measured: agrees with float64 to ~5e-5 at condition number 1e4).
    """
    work = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.float32
    Q = _gram_q(X, coeffs, norm_scale, tall).to(work)
    Xw = X.to(work)
    O = torch.bmm(Xw, Q) if tall else torch.bmm(Q, Xw)  # (b, ·, ·) like X
    return O.to(out_dtype)


def _svd_polar(X: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Exact polar factor ``U 1[σ > tol] Vᵀ`` (rank-deficient inputs keep their zero directions)."""
    X64 = X.to(torch.float64)
    U, S, Vh = torch.linalg.svd(X64, full_matrices=False)  # (b, r, k), (b, k), (b, k, c)
    in_eps = torch.finfo(X.dtype).eps if X.dtype.is_floating_point else torch.finfo(torch.float64).eps
    tol = S.amax(dim=-1, keepdim=True) * max(X.shape[-2:]) * in_eps  # rank cut at the input's precision
    keep = (S > tol).to(torch.float64)
    return ((U * keep[:, None, :]) @ Vh).to(out_dtype)


def orthogonalize(
    G: torch.Tensor,
    steps: int = 5,
    method: str = "jordan",
    dtype: torch.dtype | str | None = None,
    *,
    gram: bool | None = None,
    gram_ns: bool = False,
) -> torch.Tensor:
    """Approximate the polar factor ``UVᵀ`` of each matrix in ``G`` (batched over leading dims).

    The input is Frobenius-normalised (times 1.01 for Polar Express, as its reference code does), wide
    orientation is used internally (tall matrices are transposed and transposed back), and
    ``steps`` odd-quintic iterations are applied.

    Args:
        G: ``(..., m, n)`` tensor.
        steps: number of iterations (ignored for ``method="svd"``).
        method: ``"jordan"`` (NS5, (3.4445, −4.7750, 2.0315)), ``"polar_express"`` (the first ``steps``
            triples of :func:`polar_express_coefficients`, last one repeating) or ``"svd"`` (exact).
        dtype: compute dtype of the direct path; ``None``/"auto" = bf16 on CUDA and on CPUs with
            native bf16 matmul, fp32 otherwise.  The Gram-space path always runs its r×r part in
            float64 and returns ``G``'s dtype (fp32 for half inputs).
        gram: force (``True``) or forbid (``False``) the Gram-space path; default: used when
            ``min(m, n) <= 64``.
        gram_ns: on the direct path, iterate rectangular matrices (aspect ≥ ``GRAM_NS_MIN_ASPECT``) on
            their short side with restarts (:func:`_direct_gram`): the same iterate, equal accuracy in
            bf16 (tests), fewer FLOPs (~1.2× at aspect 2.75 with the two restarts bf16 needs).  Off by
            default here (this function is the reference form); the optimizers' step planner
            (:meth:`.plan.StepPlanner._ns`) always uses it for rectangular matrices: a 1.48× faster
            full-matrix step on this project's CPU (AMX bf16); not measured on a GPU.

    Returns:
        ``(..., m, n)`` tensor: the compute dtype for the direct path, otherwise ``G``'s floating dtype
        (fp32 for 16-bit inputs).
    """
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a (..., m, n) tensor, got shape {tuple(G.shape)}")
    if method not in _METHODS:
        raise ValueError(f"unknown orthogonalisation method {method!r}; expected one of {_METHODS}")
    m, n = G.shape[-2:]
    lead = G.shape[:-2]
    X = G.reshape(-1, m, n)  # (b, m, n)
    tall = m > n
    out_dtype = G.dtype if G.dtype in (torch.float32, torch.float64) else torch.float32
    use_gram = method != "svd" and (min(m, n) <= GRAM_MAX_DIM if gram is None else gram)
    if use_gram:  # tall matrices used as stored: S = XᵀX, O = XQ
        coeffs = ns_coefficients(method, steps)
        scale = _PE_NORM_SCALE if method == "polar_express" else 1.0
        return _gram(X, coeffs, scale, out_dtype, tall=tall).reshape(*lead, m, n)
    if tall:
        X = X.mT  # (b, r, c) with r = n <= c = m
    if method == "svd":
        O = _svd_polar(X, out_dtype)
    else:
        coeffs = ns_coefficients(method, steps)
        scale = _PE_NORM_SCALE if method == "polar_express" else 1.0
        Xc = X.to(resolve_ns_dtype(dtype, G.device), copy=True)
        if gram_ns and Xc.shape[-1] >= GRAM_NS_MIN_ASPECT * Xc.shape[-2]:
            O = _direct_gram(Xc, coeffs, scale)
        else:
            O = _direct(Xc, coeffs, scale)
    if tall:
        O = O.mT
    return O.reshape(*lead, m, n)

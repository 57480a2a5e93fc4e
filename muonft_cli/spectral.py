"""Exact spectral metrics of weight matrices and layer-type naming: the one implementation muonft uses.

Owns the metrics of paper App. F.1 (and of Moonlight, "Muon is Scalable for LLM Training"), as
`docs/formulas.md` "Spectral metrics" defines them, for a matrix W (m×n) with singular values σ₁ ≥ … ≥ σᵣ,
r = min(m, n):

- stable rank       ``srank(W) = ‖W‖²_F / ‖W‖²₂ = Σσᵢ² / σ₁²``
- SVD entropy       ``H = −Σ pᵢ log pᵢ / log r``,  ``pᵢ = σᵢ² / Σσⱼ²``   (normalised to [0, 1])

plus the random-matrix baseline of each (a Gaussian matrix of the same shape and the same entry RMS, whose
squared singular values follow the Marchenko–Pastur law), and `layer_type`, which maps parameter names of
Llama/Qwen/Mistral/Gemma, GPT-2, BERT, T5, GGUF and peft LoRA checkpoints onto a small set of layer types.

`muonft eval` (LoRA spectra, paper F.2) and `muonft diagnose` both use these functions; the diagnose engine adds
streaming readers and fast (Lanczos) estimators on top in `muonft_cli.diagnose` (`io`, `fast`).
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

import torch

from muonft_cli._common import plain_name

__all__ = [
    "LAYER_TYPES",
    "HIDDEN_TYPES",
    "singular_values",
    "stable_rank",
    "svd_entropy",
    "random_baseline",
    "matrix_metrics",
    "metrics_from_singular_values",
    "layer_type",
    "lora_part",
    "fused_qkv_split",
]

LAYER_TYPES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "fc1", "fc2",
               "mla_q_a", "mla_q_b", "mla_kv_a", "mla_kv_b", "router", "embedding", "lm_head", "other")
"""Every value `layer_type` can return. ``qkv``: a fused q|k|v matrix left whole (its layout unknown: see
`muonft_cli.diagnose.layouts`, which splits it when config.json gives the head counts). ``mla_*``: DeepSeek-V2/V3
(Moonlight, Kimi K2) multi-head latent attention, ``q_a_proj`` / ``q_b_proj`` (query down / up projection),
``kv_a_proj_with_mqa`` / ``kv_b_proj`` (key-value latent down projection with the shared RoPE key / up projection).
``router``: an MoE router (``block_sparse_moe.gate``, ``mlp.gate``, ``mlp.router``, ``ffn.router.layer``)."""

HIDDEN_TYPES = ("q", "k", "v", "o", "qkv", "gate", "up", "down", "fc1", "fc2",
                "mla_q_a", "mla_q_b", "mla_kv_a", "mla_kv_b")
"""Hidden (transformer-block) matrix types: the ones Muon trains and the verdict weighs. Routers (a few rows,
one per expert), embeddings and heads are not among them."""

# Above this many elements, `singular_values(method="auto")` uses the eigenvalues of the smaller Gram matrix
# in fp64 (σ² is what every metric here weighs, so squaring the condition number costs nothing that matters).
_GRAM_ABOVE = 512 * 512


def _as_matrix(W: torch.Tensor) -> torch.Tensor:
    """Check W is a non-empty 2-D tensor and return it detached."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"spectral metrics need a 2-D matrix, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"spectral metrics need a non-empty matrix, got shape {tuple(W.shape)}")
    return W.detach()


def singular_values(W: torch.Tensor, *, dtype: torch.dtype = torch.float64, method: str = "auto") -> torch.Tensor:
    """All r = min(m, n) singular values of W, descending.

    Args:
        W: (m, n) matrix of any floating dtype (bf16/fp16 are upcast).
        dtype: compute dtype, ``torch.float64`` (default) or ``torch.float32``.
        method: ``"svd"`` (``torch.linalg.svdvals``), ``"gram"`` (square roots of the eigenvalues of the smaller
            Gram matrix WWᵀ or WᵀW, clamped at 0), or ``"auto"`` (svd for small matrices, gram above 512² elements).

    Returns:
        (r,) tensor of singular values in ``dtype``, sorted descending.
    """
    W = _as_matrix(W)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method must be 'auto', 'svd' or 'gram', got {method!r}")
    X = W.to(dtype)  # (m, n)
    if method == "auto":
        method = "gram" if X.numel() > _GRAM_ABOVE else "svd"
    if method == "svd":
        return torch.linalg.svdvals(X)  # (r,), descending
    m, n = X.shape
    G = X @ X.T if m <= n else X.T @ X  # (r, r)
    ev = torch.linalg.eigvalsh(G)  # (r,), ascending
    return ev.clamp_min(0).sqrt().flip(0)  # (r,), descending


def _sv(W_or_sv: torch.Tensor) -> torch.Tensor:
    """Singular values from either a matrix (computed exactly) or a 1-D tensor of singular values."""
    if isinstance(W_or_sv, torch.Tensor) and W_or_sv.ndim == 1:
        if W_or_sv.numel() == 0:
            raise ValueError("need at least one singular value")
        return W_or_sv.detach().to(torch.float64).abs()
    return singular_values(W_or_sv)


def stable_rank(W_or_sv: torch.Tensor) -> float:
    """Stable rank ‖W‖²_F / ‖W‖²₂ = Σσᵢ²/σ₁² (paper App. F.1). 0.0 for the zero matrix.

    Args:
        W_or_sv: a (m, n) matrix, or a 1-D tensor of its singular values (any order).
    """
    s2 = _sv(W_or_sv).pow(2)  # (r,)
    top = float(s2.max())
    return float(s2.sum()) / top if top > 0 else 0.0


def svd_entropy(W_or_sv: torch.Tensor, *, rank: int | None = None) -> float:
    """Normalised SVD entropy −Σ pᵢ log pᵢ / log r with pᵢ = σᵢ²/Σσⱼ² (paper App. F.1, Moonlight).

    Args:
        W_or_sv: a (m, n) matrix, or a 1-D tensor of its singular values.
        rank: r in the normaliser; default min(m, n) (for a matrix) or the number of singular values given.

    Returns:
        Entropy in [0, 1]; 0.0 for the zero matrix and whenever r = 1 (a single singular value carries no spread).
    """
    s2 = _sv(W_or_sv).pow(2)  # (r,)
    r = int(rank) if rank is not None else s2.numel()
    total = float(s2.sum())
    if total <= 0 or r <= 1:
        return 0.0
    p = s2 / total
    p = p[p > 0]
    return float(-(p * p.log()).sum()) / math.log(r)


def _mp_entropy_and_moments(y: float) -> float:
    """E[x log x] under the Marchenko–Pastur law with ratio y = r/R ≤ 1 and mean E[x] = 1.

    Density f(x) = √((b−x)(x−a)) / (2π y x) on [a, b] = [(1−√y)², (1+√y)²] (eigenvalues of XXᵀ/R for an
    r×R matrix X with i.i.d. unit-variance entries). Integrated with Gauss–Chebyshev (second kind) quadrature,
    which is exact for the square-root edges.
    """
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    n = 4000
    k = torch.arange(1, n + 1, dtype=torch.float64)
    t = torch.cos(k * math.pi / (n + 1))  # nodes in (-1, 1)
    w = math.pi / (n + 1) * torch.sin(k * math.pi / (n + 1)) ** 2  # weights for ∫ g(t) √(1−t²) dt
    x = (a + b) / 2 + (b - a) / 2 * t  # (n,)
    # ∫ √((b−x)(x−a)) g(x) dx = ((b−a)/2)² ∫ √(1−t²) g dt
    dens_w = ((b - a) / 2) ** 2 * w / (2 * math.pi * y * x)  # quadrature weights of the MP density
    return float((dens_w * x * x.log()).sum())


@lru_cache(maxsize=256)
def _random_baseline_cached(r: int, R: int) -> tuple[float, float, float, float, float]:
    """(stable rank, entropy, σ₁, std of stable rank, std of entropy) of an r×R unit-RMS Gaussian, r ≤ R."""
    if r <= 512:
        # Finite-size effects matter for small matrices: mean and spread of seeded Gaussian draws, exactly.
        draws = max(2, min(16, 8192 // r))
        gen = torch.Generator().manual_seed(1_000_003 * r + R)
        srs, ents, s1s = [], [], []
        for _ in range(draws):
            X = torch.randn(r, R, generator=gen, dtype=torch.float64)  # unit entry RMS
            sv = singular_values(X, method="gram")  # = svdvals to ~1e-13 here, several times faster
            srs.append(stable_rank(sv))
            ents.append(svd_entropy(sv))
            s1s.append(float(sv[0]))
        t_sr, t_ent = torch.tensor(srs, dtype=torch.float64), torch.tensor(ents, dtype=torch.float64)
        return (float(t_sr.mean()), float(t_ent.mean()), sum(s1s) / draws, float(t_sr.std()), float(t_ent.std()))
    # Large matrices: the Marchenko–Pastur limit for the entropy (finite-size error O(1/r)); σ₁² from Johnstone's
    # Tracy–Widom centring and scaling, μ + σ·E[TW₁] with E[TW₁] = −1.2065, std(TW₁) = 1.2680.
    y = r / R
    a, b = math.sqrt(r - 1), math.sqrt(R)
    mu, sd = (a + b) ** 2, (a + b) * (1 / a + 1 / b) ** (1 / 3)
    s1 = math.sqrt(mu - 1.2065 * sd)
    sr = r * R / s1**2
    sr_std = sr * 1.2680 * sd / s1**2
    ent = 1.0 - _mp_entropy_and_moments(y) / math.log(r)
    # entropy spread: measured on 128 × 128/y draws, scaled by the 1/(r log r) of a linear spectral statistic
    ref = _random_baseline_cached(128, max(128, round(128 / y)))
    ent_std = ref[4] * (128 * math.log(128)) / (r * math.log(r))
    return sr, ent, s1, sr_std, ent_std


def random_baseline(m: int, n: int) -> dict[str, float]:
    """Metrics of a Gaussian matrix of shape (m, n) with unit entry RMS (the Marchenko–Pastur baseline).

    Small matrices (min(m, n) ≤ 512) use the mean over seeded Gaussian draws (deterministic, cached per shape);
    larger ones the Marchenko–Pastur limit with the Tracy–Widom mean for σ₁ (within ~0.2 % of the draws at 512).

    Returns:
        ``stable_rank``, ``stable_rank_ratio`` (÷ min(m, n)), ``svd_entropy``, their spread over random draws
        ``stable_rank_std`` and ``svd_entropy_std``, ``spectral_norm_per_rms`` (σ₁ / entry RMS) and
        ``max_norm_per_rms`` (expected max |entry| / RMS, extreme-value approximation).
    """
    if m < 1 or n < 1:
        raise ValueError(f"shape must be positive, got ({m}, {n})")
    r, R = min(m, n), max(m, n)
    if r == 1:
        sr, ent, s1, sr_std, ent_std = 1.0, 0.0, math.sqrt(R), 0.0, 0.0
    else:
        sr, ent, s1, sr_std, ent_std = _random_baseline_cached(r, R)
    N = 2.0 * m * n  # max |g| over N entries ≈ max of 2N one-sided Gaussians (Gumbel location + mean shift)
    if N > 2:
        L = math.sqrt(2 * math.log(N))
        max_norm = L - (math.log(math.log(N)) + math.log(4 * math.pi)) / (2 * L) + 0.5772156649 / L
    else:
        max_norm = math.sqrt(2 / math.pi)
    return {
        "stable_rank": sr,
        "stable_rank_ratio": sr / r,
        "svd_entropy": ent,
        "stable_rank_std": sr_std,
        "svd_entropy_std": ent_std,
        "spectral_norm_per_rms": s1,
        "max_norm_per_rms": max_norm,
    }


def metrics_from_singular_values(
    sv: torch.Tensor, shape: tuple[int, int], *, max_norm: float, frobenius_norm: float | None = None
) -> dict:
    """`matrix_metrics` from precomputed singular values (used by the streaming engine).

    Args:
        sv: (r,) singular values, r = min(shape).
        shape: (m, n) of the matrix.
        max_norm: max |Wᵢⱼ|.
        frobenius_norm: ‖W‖_F if known exactly (else from the singular values).
    """
    m, n = int(shape[0]), int(shape[1])
    s = sv.detach().to(torch.float64)
    fro = float(frobenius_norm) if frobenius_norm is not None else float(s.pow(2).sum().sqrt())
    s1 = float(s.max()) if s.numel() else 0.0
    r = min(m, n)
    sr = stable_rank(s) if s1 > 0 else 0.0
    ent = svd_entropy(s, rank=r)
    rms = fro / math.sqrt(m * n)
    base = random_baseline(m, n)
    return {
        "shape": [m, n],
        "spectral_norm": s1,
        "frobenius_norm": fro,
        "stable_rank": sr,
        "stable_rank_ratio": sr / r,
        "svd_entropy": ent,
        "max_norm": float(max_norm),
        "random_spectral_norm": base["spectral_norm_per_rms"] * rms,
        "random_stable_rank": base["stable_rank"],
        "random_stable_rank_ratio": base["stable_rank_ratio"],
        "random_svd_entropy": base["svd_entropy"],
        "random_stable_rank_std": base["stable_rank_std"],
        "random_svd_entropy_std": base["svd_entropy_std"],
        "random_max_norm": base["max_norm_per_rms"] * rms,
    }


def matrix_metrics(W: torch.Tensor) -> dict:
    """Exact spectral metrics of one matrix and their random (Gaussian, same shape and entry RMS) baselines.

    Name-agnostic; pair it with `layer_type(name)`.

    Args:
        W: (m, n) matrix.

    Returns:
        dict with ``shape`` [m, n], ``spectral_norm`` σ₁, ``frobenius_norm``, ``stable_rank``,
        ``stable_rank_ratio`` (÷ min(m, n)), ``svd_entropy``, ``max_norm`` (max |Wᵢⱼ|) and ``random_*`` baselines
        of the same quantities (``random_spectral_norm``, ``random_stable_rank``, ``random_stable_rank_ratio``,
        ``random_svd_entropy``, ``random_max_norm``). All values are Python floats.
    """
    W = _as_matrix(W)
    X = W.to(torch.float64)  # (m, n)
    sv = singular_values(X)
    return metrics_from_singular_values(
        sv, tuple(X.shape), max_norm=float(X.abs().max()), frobenius_norm=float(torch.linalg.norm(X))
    )


# ---------------------------------------------------------------------------------------------- layer types

_LORA_RE = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.[^.]+)?(\.weight)?$")

# (regex on the dotted module path without ".weight"/".bias" suffix, layer type). First match wins.
_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(p), t)
    for p, t in [
        # embeddings / heads
        (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
         r"embed_positions|shared|token_embd|tok_embeddings|embeddings|embed_in)$", "embedding"),
        (r"(^|\.)(lm_head|output|embed_out|cls\.predictions\.decoder)$", "lm_head"),
        # MoE routers: Mixtral/Granite block_sparse_moe.gate, Qwen-MoE/DeepSeek/OLMoE mlp.gate, GPT-OSS/Llama-4
        # mlp.router / feed_forward.router, DBRX ffn.router.layer, Switch router.classifier, GGUF ffn_gate_inp
        (r"(^|\.)(block_sparse_moe|mlp|moe|feed_forward|ffn)\.(gate|router)$", "router"),
        (r"(^|\.)router(\.(layer|classifier))?$", "router"),
        (r"(^|\.)ffn_gate_inp(_shexp)?$", "router"),
        # DeepSeek-V2/V3 multi-head latent attention
        (r"(^|\.)q_a_proj$", "mla_q_a"),
        (r"(^|\.)q_b_proj$", "mla_q_b"),
        (r"(^|\.)kv_a_proj_with_mqa$", "mla_kv_a"),
        (r"(^|\.)kv_b_proj$", "mla_kv_b"),
        # GPT-2: attn.c_attn (fused q|k|v, split by the reader), attn.c_proj, mlp.c_fc, mlp.c_proj
        (r"attn\.c_proj$", "o"),
        (r"mlp\.c_fc$", "fc1"),
        (r"mlp\.c_proj$", "fc2"),
        # BERT: attention.self.{query,key,value}, attention.output.dense, intermediate.dense, output.dense
        (r"(^|\.)(q_proj|query|q|wq|attn_q|q_lin)$", "q"),
        (r"(^|\.)(k_proj|key|k|wk|attn_k|k_lin)$", "k"),
        (r"(^|\.)(v_proj|value|v|wv|attn_v|v_lin)$", "v"),
        (r"(^|\.)(o_proj|out_proj|o|wo_attn|attn_output|out_lin)$", "o"),
        (r"attention\.output\.dense$", "o"),
        (r"(attention|attn|self_attn)\.wo$", "o"),
        (r"(self_attn|attention|attn)\.dense$", "o"),
        (r"(^|\.)(gate_proj|w1|ffn_gate|ffn_gate_shexp|wi_0)$", "gate"),
        (r"(^|\.)(up_proj|w3|v1|ffn_up|ffn_up_shexp|wi_1)$", "up"),
        (r"(^|\.)(down_proj|w2|ffn_down|ffn_down_shexp)$", "down"),
        (r"(^|\.)(fc1|intermediate\.dense|wi|dense_h_to_4h|c_fc|lin1)$", "fc1"),
        (r"(^|\.)(fc2|dense_4h_to_h|lin2)$", "fc2"),
        (r"(DenseReluDense|mlp|ffn)\.wo$", "fc2"),
        (r"(^|\.)output\.dense$", "fc2"),
    ]
]


def lora_part(name: str) -> str | None:
    """``"A"`` or ``"B"`` for a peft LoRA parameter name (``...q_proj.lora_A.weight``), else None."""
    m = _LORA_RE.search(name)
    if m is None:
        return None
    part = m.group(1)
    if part in ("A", "embedding_A"):
        return "A"
    if part in ("B", "embedding_B"):
        return "B"
    return None


def _module_path(name: str) -> str:
    """Strip the parameter suffix and peft wrappers: ``base_model.model.x.q_proj.lora_A.default.weight`` → ``x.q_proj``."""
    s = _LORA_RE.sub("", plain_name(name))
    s = re.sub(r"\.(weight|bias|qweight|scales|kernel)$", "", s)
    return s


def layer_type(name: str) -> str:
    """Layer type of a parameter from its name, across architectures.

    Recognises Llama/Qwen/Mistral/Gemma (``q_proj`` … ``down_proj``, ``embed_tokens``, ``lm_head``), Mixtral
    experts (``w1``/``w3``/``w2``), DBRX experts (``w1``/``v1``/``w2``), MoE routers (→ ``"router"``),
    DeepSeek MLA (``q_a_proj`` … → ``"mla_*"``), fused q|k|v (``c_attn``, ``qkv_proj``, ``query_key_value``,
    ``Wqkv`` → ``"qkv"`` while fused), GPT-2 (its blocks
    ``...c_attn.weight[q]`` etc. from `fused_qkv_split` → q/k/v; ``attn.c_proj`` → o; ``mlp.c_fc`` and
    ``mlp.c_proj`` → fc1/fc2; ``wte``/``wpe``), BERT
    (``attention.self.query`` …, ``attention.output.dense`` → o, ``intermediate.dense``/``output.dense`` →
    fc1/fc2), T5 (``SelfAttention.q`` …, ``DenseReluDense.wi``/``wo`` → fc1/fc2, ``wi_0``/``wi_1`` → gate/up,
    ``shared``), GPT-NeoX/Falcon (``dense_h_to_4h``/``dense_4h_to_h``), GGUF (``blk.N.attn_q``,
    ``ffn_down``, ``token_embd``, ``output``) and peft LoRA names (the type of the wrapped module).

    Returns:
        One of `LAYER_TYPES`.
    """
    block = re.search(r"\[(q|k|v|gate|up|down)\]$", name)
    if block:  # a block of a fused matrix, named by `fused_qkv_split` or `muonft_cli.diagnose.layouts`
        return block.group(1)
    path = _module_path(name)
    if re.search(r"(^|\.)(c_attn|qkv_proj|attn_qkv|Wqkv|wqkv|query_key_value)$", path):
        return "qkv"  # fused q|k|v left whole (see `fused_qkv_split`)
    for pat, t in _RULES:
        if pat.search(path):
            return t
    return "other"


def fused_qkv_split(name: str, shape: tuple[int, ...]) -> list[tuple[str, str, int, slice]] | None:
    """How to split a fused q|k|v matrix into its three blocks, or None if ``name`` is not one we can split.

    GPT-2's ``attn.c_attn.weight`` is a Conv1D of shape (d, 3d) holding [q | k | v] along columns; Phi-3's
    ``qkv_proj`` and GGUF's ``attn_qkv`` hold [q; k; v] along rows (shape (3d, d), equal blocks only). The
    layouts that need config.json's head counts (grouped-query, per-head interleaved) are split by
    `muonft_cli.diagnose.layouts`.

    Returns:
        [(block_name, layer_type, dim, slice), ...] for q, k, v, where ``W.narrow``/indexing along ``dim`` with
        ``slice`` gives the block.
    """
    path = _module_path(name)
    if len(shape) != 2:
        return None
    if path.endswith("c_attn") and shape[1] == 3 * shape[0]:
        d, dim = shape[0], 1
    elif re.search(r"(^|\.)(qkv_proj|attn_qkv)$", path) and shape[0] == 3 * shape[1]:
        d, dim = shape[1], 0
    else:
        return None
    return [(f"{name}[{t}]", t, dim, slice(i * d, (i + 1) * d)) for i, t in enumerate(("q", "k", "v"))]

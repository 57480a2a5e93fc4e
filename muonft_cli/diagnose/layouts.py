"""Architecture layouts for `muonft diagnose`: how each checkpoint tensor becomes role-typed 2-D matrices.

Owns the rules that split fused and packed tensors into the matrices their roles are, with the head and expert
counts from the checkpoint's ``config.json`` (`layout_from_config`), the reasons a ≥2-D tensor is not analysed,
and the per-layer sampling of MoE experts (`sample_experts`). Nothing here reads tensor data: `blocks` returns
which rows of a tensor to read and how to cut the matrix out of them, and `muonft_cli.diagnose.io` reads them.

Fused attention (rows of the ``nn.Linear`` weight, out × in; ``hd`` the head dim, ``H``/``K`` query/kv heads):

- GPT-NeoX/Pythia and Bloom ``query_key_value``, Falcon without ``multi_query`` or the new decoder
  architecture, GPT-BigCode without ``multi_query``: interleaved per head, rows ``[H, 3, hd]`` (q, k, v of head
  0, then of head 1, ...).
- Falcon ``new_decoder_architecture`` (40B/180B) and InternLM2 ``wqkv``: grouped per kv head, rows
  ``[K, H/K + 2, hd]`` (the group's H/K query heads, then its key, then its value).
- Phi-3 ``qkv_proj``, MPT/DBRX ``Wqkv``, ChatGLM ``query_key_value``, Falcon ``multi_query``, GPT-BigCode
  ``multi_query`` ``c_attn``, Qwen-1 ``c_attn``, GGUF ``attn_qkv``: contiguous ``[q (H·hd); k (K·hd); v (K·hd)]``.
- GPT-2 ``c_attn`` (a Conv1D, in × out): ``[q | k | v]`` along columns (`muonft_cli.spectral.fused_qkv_split`).

Without the head counts (no config.json beside the checkpoint) only equal-thirds contiguous layouts are split;
the others are analysed whole as type ``qkv`` (they still feed the verdict) and the report says so.

Fused MLP: Phi-3/GLM-4 ``gate_up_proj`` and ChatGLM ``dense_h_to_4h`` are ``[gate; up]`` row halves.

MoE experts: per-expert tensors (Mixtral ``experts.N.w1/w3/w2``, Qwen-MoE/DeepSeek/OLMoE
``experts.N.gate_proj/up_proj/down_proj``) keep their types and get an expert index; packed 3-D tensors are split
per expert, each read alone (only its bytes): transformers-v5 ``experts.gate_up_proj`` ``[E, 2I, hidden]`` (row
halves) and ``experts.down_proj`` ``[E, hidden, I]``, Llama-4 ``[E, hidden, 2I]`` (column halves), GPT-OSS
``[E, hidden, 2I]`` (columns interleaved: gate ``::2``, up ``1::2``), Granite ``input_linear``/``output_linear``;
DBRX's 2-D ``experts.mlp.w1/v1/w2`` ``[E·ffn, hidden]`` are cut into E row blocks. Shared experts are ordinary
MLP matrices (no expert index: always analysed). Routers are type ``router`` (`muonft_cli.spectral.layer_type`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from muonft_cli.spectral import _module_path, fused_qkv_split, layer_type

__all__ = ["Block", "Layout", "layout_from_config", "blocks", "sample_experts", "DEFAULT_SAMPLE_EXPERTS"]

DEFAULT_SAMPLE_EXPERTS = 4
"""Experts analysed per MoE layer by default (``--sample-experts``; 0 = all)."""

Take = Callable[[Any], Any]  # torch.Tensor slab → torch.Tensor (m, n)


@dataclass(frozen=True)
class Block:
    """One 2-D matrix cut out of a checkpoint tensor.

    ``rows``: the range of the tensor's first dimension to read (contiguous bytes; None = the whole tensor);
    ``take``: maps that slab, shape ``(rows[1] - rows[0], *tensor.shape[1:])``, to the (m, n) matrix (None: the
    slab is that matrix already). ``expert``/``group``: the expert index and its MoE layer (for sampling).
    """

    name: str
    layer_type: str
    shape: tuple[int, int]
    rows: tuple[int, int] | None = None
    take: Take | None = None
    expert: int | None = None
    group: str | None = None


@dataclass(frozen=True)
class Layout:
    """What ``config.json`` says about how tensors are laid out (None: not given)."""

    model_type: str = ""
    hidden: int | None = None
    heads: int | None = None
    kv_heads: int | None = None
    head_dim: int | None = None
    falcon_new: bool = False
    multi_query: bool = False
    n_experts: int | None = None
    has_config: bool = False
    fp8_block: tuple[int, int] = (128, 128)  # quantization_config.weight_block_size of block-scaled FP8 weights


def _int(*vals: Any) -> int | None:
    for v in vals:
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def layout_from_config(cfg: dict | None) -> Layout:
    """The `Layout` of a checkpoint from its ``config.json`` (a multimodal ``text_config`` takes precedence)."""
    if not isinstance(cfg, dict):
        return Layout()
    c = {**cfg, **(cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {})}
    mt = str(c.get("model_type") or "").lower()
    attn = c.get("attn_config") if isinstance(c.get("attn_config"), dict) else {}
    ffn = c.get("ffn_config") if isinstance(c.get("ffn_config"), dict) else {}
    hidden = _int(c.get("hidden_size"), c.get("d_model"), c.get("n_embd"))
    heads = _int(c.get("num_attention_heads"), c.get("n_head"), c.get("n_heads"), c.get("num_heads"))
    falcon = mt in ("falcon", "refinedweb", "refinedwebmodel")
    falcon_new = bool(c.get("new_decoder_architecture", mt == "refinedweb")) if falcon else False
    multi_query = bool(c.get("multi_query", falcon))
    kv = _int(c.get("num_key_value_heads"), c.get("num_kv_heads"), c.get("n_head_kv"), attn.get("kv_n_heads"))
    if mt == "chatglm" and c.get("multi_query_attention"):
        kv = _int(c.get("multi_query_group_num"))
    if falcon and not falcon_new:
        kv = 1 if multi_query else heads
    if mt == "gpt_bigcode":
        kv = 1 if multi_query else heads
    head_dim = _int(c.get("head_dim"), c.get("kv_channels"))
    if head_dim is None and hidden and heads and hidden % heads == 0:
        head_dim = hidden // heads
    n_exp = _int(ffn.get("moe_num_experts"), c.get("num_local_experts"), c.get("num_experts"),
                 c.get("n_routed_experts"))
    q = c.get("quantization_config") if isinstance(c.get("quantization_config"), dict) else {}
    wb = q.get("weight_block_size")
    block = (int(wb[0]), int(wb[1])) if isinstance(wb, list) and len(wb) == 2 and all(
        isinstance(x, int) and x > 0 for x in wb) else (128, 128)
    return Layout(mt, hidden, heads, kv or heads, head_dim, falcon_new, multi_query, n_exp, True, block)


# ----------------------------------------------------------------------------------------------- splits


def _contiguous(name: str, shape: tuple[int, int], sizes: list[int], types: tuple[str, ...]) -> list[Block]:
    """Row blocks [t₀; t₁; …] of the given sizes, each read alone."""
    out, r = [], 0
    for t, n in zip(types, sizes):
        out.append(Block(f"{name}[{t}]", t, (n, shape[1]), (r, r + n)))
        r += n
    return out


def _per_head(name: str, shape: tuple[int, int], heads: int, hd: int) -> list[Block]:
    """Rows [heads, 3, hd]: q, k, v interleaved per head (GPT-NeoX, Bloom, Falcon MHA)."""
    n = shape[1]

    def take(j: int) -> Take:
        return lambda W: W.reshape(heads, 3, hd, n)[:, j].reshape(heads * hd, n).contiguous()

    return [Block(f"{name}[{t}]", t, (heads * hd, n), None, take(j)) for j, t in enumerate(("q", "k", "v"))]


def _grouped(name: str, shape: tuple[int, int], heads: int, kv: int, hd: int) -> list[Block]:
    """Rows [kv, heads/kv + 2, hd]: each kv group's query heads, then its key, then its value (Falcon-40B)."""
    n, g = shape[1], heads // kv

    def q(W):
        return W.reshape(kv, g + 2, hd, n)[:, :g].reshape(kv * g * hd, n).contiguous()

    def kv_part(j: int) -> Take:
        return lambda W: W.reshape(kv, g + 2, hd, n)[:, g + j].reshape(kv * hd, n).contiguous()

    return [Block(f"{name}[q]", "q", (heads * hd, n), None, q),
            Block(f"{name}[k]", "k", (kv * hd, n), None, kv_part(0)),
            Block(f"{name}[v]", "v", (kv * hd, n), None, kv_part(1))]


def _fused_qkv(name: str, path: str, shape: tuple[int, int], L: Layout) -> list[Block] | None:
    """The q/k/v blocks of a fused attention matrix, or None when its layout is not known."""
    rows, cols = shape
    leaf = path.rsplit(".", 1)[-1]
    H, K, hd = L.heads, L.kv_heads, L.head_dim
    known = bool(H and K and hd and H % K == 0)
    if leaf == "c_attn" and cols == 3 * rows:  # GPT-2 Conv1D (in, 3·out): columns
        return [Block(b, t, (rows, sl.stop - sl.start), None, (lambda W, sl=sl: W[:, sl].contiguous()))
                for b, t, _, sl in fused_qkv_split(name, shape)]
    falcon = L.model_type.startswith(("falcon", "refinedweb"))
    per_head = (leaf == "query_key_value" and (L.model_type in ("gpt_neox", "bloom")
                                               or (falcon and not L.falcon_new and not L.multi_query))) or \
        (leaf == "c_attn" and L.model_type == "gpt_bigcode" and not L.multi_query)
    grouped = (leaf == "query_key_value" and L.falcon_new) or (leaf == "wqkv" and L.model_type == "internlm2")
    if per_head or grouped:
        if known and per_head and rows == 3 * H * hd:
            return _per_head(name, shape, H, hd)
        if known and grouped and rows == (H + 2 * K) * hd:
            return _grouped(name, shape, H, K, hd)
        return None  # interleaved, and the head counts are not known: left whole
    if leaf == "query_key_value" and not (falcon or L.model_type == "chatglm"):
        return None  # an architecture whose interleaving we do not know
    if known and rows == (H + 2 * K) * hd:
        return _contiguous(name, shape, [H * hd, K * hd, K * hd], ("q", "k", "v"))
    if rows == 3 * cols:
        return _contiguous(name, shape, [rows // 3] * 3, ("q", "k", "v"))
    return None


_FUSED_QKV = re.compile(r"(^|\.)(c_attn|qkv_proj|attn_qkv|Wqkv|wqkv|query_key_value)$")
_PER_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.")
_PACKED_GATE_UP = ("gate_up_proj", "input_linear", "w13")
_PACKED_ROLE = {"down_proj": "down", "output_linear": "down", "w2": "down",
                "gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up", "v1": "up"}


def _packed_experts(name: str, path: str, shape: tuple[int, ...], L: Layout) -> list[Block] | None:
    """Per-expert blocks of a packed 3-D expert tensor [E, a, b], or None if it is not one."""
    leaf = path.rsplit(".", 1)[-1]
    if leaf not in _PACKED_GATE_UP and leaf not in _PACKED_ROLE:
        return None
    E, a, b = shape
    group = path.rsplit(".", 1)[0]
    out: list[Block] = []
    if leaf in _PACKED_ROLE:
        t = _PACKED_ROLE[leaf]
        for e in range(E):
            out.append(Block(f"{name}[{e}][{t}]", t, (a, b), (e, e + 1), lambda W: W[0], e, group))
        return out
    H = L.hidden
    if L.model_type == "gpt_oss":  # [E, hidden, 2I], gate = columns ::2, up = columns 1::2
        cuts = ((lambda W: W[0][:, 0::2].contiguous()), (lambda W: W[0][:, 1::2].contiguous()))
        shp = (a, b // 2)
    elif L.model_type.startswith("llama4") or (H is not None and a == H and b != H):  # [E, hidden, 2I] halves
        cuts = ((lambda W: W[0][:, : b // 2].contiguous()), (lambda W: W[0][:, b // 2:].contiguous()))
        shp = (a, b // 2)
    else:  # transformers v5 and Granite: [E, 2I, hidden], row halves
        cuts = ((lambda W: W[0][: a // 2]), (lambda W: W[0][a // 2:]))
        shp = (a // 2, b)
    for e in range(E):
        for t, cut in zip(("gate", "up"), cuts):
            out.append(Block(f"{name}[{e}][{t}]", t, shp, (e, e + 1), cut, e, group))
    return out


def blocks(name: str, shape: tuple[int, ...], layout: Layout) -> list[Block] | str:
    """The matrices to analyse in the floating-point tensor ``name`` of ``shape`` (≥ 2-D), or the reason it is
    not analysed (a str)."""
    path = _module_path(name)
    leaf = path.rsplit(".", 1)[-1]
    dims = "×".join(map(str, shape))
    if len(shape) > 3:
        return f"a {len(shape)}-D tensor ({dims}): a convolution kernel or mask, not a matrix"
    if leaf.endswith("bias"):
        return f"stacked bias vectors ({dims}), not a weight matrix"
    if len(shape) == 3:
        packed = _packed_experts(name, path, tuple(shape), layout)
        if packed:
            return packed
        return f"a 3-D tensor ({dims}) of no known expert layout"
    m, n = int(shape[0]), int(shape[1])
    if min(m, n) < 2:
        return f"a vector ({dims}): it has no spectrum"
    if re.search(r"\.experts\.mlp\.(w1|v1|w2)$", path):  # DBRX: [E·ffn, hidden] per tensor
        E = layout.n_experts
        if not E or m % E:
            return (f"DBRX packed experts ({dims}): no config.json with ffn_config.moe_num_experts beside the "
                    "checkpoint to cut them per expert")
        t, f = layer_type(name), m // E
        group = path.rsplit(".", 1)[0]
        return [Block(f"{name}[{e}][{t}]", t, (f, n), (e * f, (e + 1) * f), None, e, group) for e in range(E)]
    if _FUSED_QKV.search(path):
        split = _fused_qkv(name, path, (m, n), layout)
        if split:
            return split
        return [Block(name, "qkv", (m, n))]
    if (leaf == "gate_up_proj" or (leaf == "dense_h_to_4h" and layout.model_type == "chatglm")) and m % 2 == 0:
        return _contiguous(name, (m, n), [m // 2, m // 2], ("gate", "up"))
    t = layer_type(name)
    hit = _PER_EXPERT.match(path + ".")
    if hit:
        return [Block(name, t, (m, n), None, None, int(hit.group(2)), hit.group(1))]
    return [Block(name, t, (m, n))]


# --------------------------------------------------------------------------------------------- sampling


def _evenly(ids: list[int], n: int) -> list[int]:
    """``n`` of the sorted ``ids``, evenly spaced from the first (all when ``n`` is 0 or ≥ len)."""
    if n <= 0 or n >= len(ids):
        return ids
    return [ids[(i * len(ids)) // n] for i in range(n)]


def sample_experts(specs: list, n: int) -> tuple[list, list, dict[str, Any] | None]:
    """Keep ``n`` experts per MoE layer (evenly spaced indices, the same for its gate/up/down; 0 = all).

    Args:
        specs: objects with ``expert`` and ``group`` attributes (`muonft_cli.diagnose.io.MatrixSpec`).
        n: experts per layer to keep.

    Returns:
        ``(kept, not_sampled, summary)``; ``summary`` is None when there are no routed experts, else
        ``sample_experts`` (n), ``moe_layers``, ``experts_per_layer`` (the most in one layer),
        ``expert_matrices`` (all), ``analysed`` and ``not_analysed`` (matrices), and ``experts`` (the indices
        kept in each layer, when they are the same in every layer; else None).
    """
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    groups: dict[str, set[int]] = {}
    for s in specs:
        if s.expert is not None:
            groups.setdefault(s.group, set()).add(s.expert)
    if not groups:
        return list(specs), [], None
    chosen = {g: set(_evenly(sorted(es), n)) for g, es in groups.items()}
    kept = [s for s in specs if s.expert is None or s.expert in chosen[s.group]]
    dropped = [s for s in specs if s.expert is not None and s.expert not in chosen[s.group]]
    picks = {tuple(sorted(c)) for c in chosen.values()}
    return kept, dropped, {
        "sample_experts": n,
        "moe_layers": len(groups),
        "experts_per_layer": max(len(es) for es in groups.values()),
        "expert_matrices": sum(s.expert is not None for s in specs),
        "analysed": sum(s.expert is not None for s in kept),
        "not_analysed": len(dropped),
        "experts": list(next(iter(picks))) if len(picks) == 1 else None,
    }

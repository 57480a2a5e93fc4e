"""Exact spectral metrics (muonft_cli.spectral) against hand-computed spectra, and layer-type naming."""

from __future__ import annotations

import math

import pytest
import torch

from muonft_cli import spectral as S


def _orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q


def _with_spectrum(sv: list[float], m: int, n: int, seed: int = 0) -> torch.Tensor:
    """U diag(sv) Vᵀ with random orthogonal U (m×m), V (n×n)."""
    U = _orthogonal(m, seed)[:, : len(sv)]
    V = _orthogonal(n, seed + 1)[:, : len(sv)]
    return U @ torch.diag(torch.tensor(sv, dtype=torch.float64)) @ V.T


def test_diagonal_matrix_hand_computed():
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert S.stable_rank(D) == pytest.approx((9 + 4 + 1) / 9)
    p = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64) / 14
    H = float(-(p * p.log()).sum()) / math.log(3)
    assert S.svd_entropy(D) == pytest.approx(H, abs=1e-12)
    torch.testing.assert_close(S.singular_values(D), torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))


def test_orthogonal_is_flat_spectrum():
    Q = _orthogonal(16)
    assert S.stable_rank(Q) == pytest.approx(16.0)
    assert S.svd_entropy(Q) == pytest.approx(1.0)
    m = S.matrix_metrics(3.0 * Q)
    assert m["spectral_norm"] == pytest.approx(3.0)
    assert m["frobenius_norm"] == pytest.approx(12.0)
    assert m["stable_rank_ratio"] == pytest.approx(1.0)


def test_rank_one_and_zero():
    W = torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 4.0))  # rank 1, 5×3
    assert S.stable_rank(W) == pytest.approx(1.0)
    assert S.svd_entropy(W) == pytest.approx(0.0, abs=1e-7)
    assert S.stable_rank(torch.zeros(4, 3)) == 0.0
    assert S.svd_entropy(torch.zeros(4, 3)) == 0.0


@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_known_spectrum_rectangular(shape):
    sv = [10.0, 5.0, 5.0, 1.0] + [0.5] * 20
    W = _with_spectrum(sv, *shape)
    s2 = torch.tensor(sv, dtype=torch.float64) ** 2
    assert S.stable_rank(W) == pytest.approx(float(s2.sum() / s2[0]))
    p = s2 / s2.sum()
    assert S.svd_entropy(W) == pytest.approx(float(-(p * p.log()).sum()) / math.log(24))
    for method in ("svd", "gram"):
        got = S.singular_values(W, method=method)
        torch.testing.assert_close(got, torch.tensor(sv, dtype=torch.float64), atol=1e-9, rtol=1e-9)
    # the same numbers from the singular values directly, and fp32 close to fp64
    assert S.stable_rank(torch.tensor(sv)) == pytest.approx(S.stable_rank(W), rel=1e-6)
    f32 = S.singular_values(W.float(), dtype=torch.float32)
    torch.testing.assert_close(f32.double(), torch.tensor(sv, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def test_bf16_input_and_errors():
    W = torch.randn(8, 6).to(torch.bfloat16)
    assert S.singular_values(W).dtype == torch.float64
    with pytest.raises(ValueError, match="2-D"):
        S.stable_rank(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="non-empty"):
        S.matrix_metrics(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="method"):
        S.singular_values(W, method="qr")


@pytest.mark.parametrize("shape", [(64, 64), (48, 256), (600, 600)])
def test_random_baseline_matches_gaussian_draws(shape):
    g = torch.Generator().manual_seed(123)
    W = 0.02 * torch.randn(*shape, generator=g, dtype=torch.float64)
    m = S.matrix_metrics(W)
    # a fresh draw lands close to the baseline (stable rank: σ₁ fluctuates O(r^-2/3), so a few %)
    assert m["stable_rank"] == pytest.approx(m["random_stable_rank"], rel=0.06)
    assert m["svd_entropy"] == pytest.approx(m["random_svd_entropy"], abs=0.01)
    assert m["spectral_norm"] == pytest.approx(m["random_spectral_norm"], rel=0.04)
    assert m["max_norm"] == pytest.approx(m["random_max_norm"], rel=0.15)
    # MP closed form for a square matrix: stable rank → n/4
    if shape == (600, 600):
        assert m["random_stable_rank_ratio"] == pytest.approx(0.25, rel=0.03)


def test_matrix_metrics_keys():
    m = S.matrix_metrics(torch.randn(12, 7))
    for key in ("shape", "spectral_norm", "frobenius_norm", "stable_rank", "stable_rank_ratio", "svd_entropy",
                "max_norm", "random_stable_rank", "random_svd_entropy", "random_spectral_norm", "random_max_norm",
                "random_stable_rank_ratio"):
        assert key in m
    assert m["shape"] == [12, 7]
    assert all(isinstance(v, float) for k, v in m.items() if k != "shape")


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", "q"),
        ("model.layers.3.self_attn.k_proj.weight", "k"),
        ("model.layers.3.self_attn.v_proj.weight", "v"),
        ("model.layers.3.self_attn.o_proj.weight", "o"),
        ("model.layers.3.mlp.gate_proj.weight", "gate"),
        ("model.layers.3.mlp.up_proj.weight", "up"),
        ("model.layers.3.mlp.down_proj.weight", "down"),
        ("model.embed_tokens.weight", "embedding"),
        ("lm_head.weight", "lm_head"),
        ("model.norm.weight", "other"),
        ("model.layers.0.block_sparse_moe.experts.1.w1.weight", "gate"),
        ("model.layers.0.block_sparse_moe.experts.1.w2.weight", "down"),
        # GPT-2
        ("transformer.h.0.attn.c_attn.weight", "qkv"),
        ("transformer.h.0.attn.c_attn.weight[k]", "k"),
        ("transformer.h.0.attn.c_proj.weight", "o"),
        ("transformer.h.0.mlp.c_fc.weight", "fc1"),
        ("transformer.h.0.mlp.c_proj.weight", "fc2"),
        ("transformer.wte.weight", "embedding"),
        ("h.0.attn.c_proj.weight", "o"),
        # BERT
        ("encoder.layer.0.attention.self.query.weight", "q"),
        ("bert.encoder.layer.0.attention.self.value.weight", "v"),
        ("encoder.layer.0.attention.output.dense.weight", "o"),
        ("encoder.layer.0.intermediate.dense.weight", "fc1"),
        ("encoder.layer.0.output.dense.weight", "fc2"),
        ("embeddings.word_embeddings.weight", "embedding"),
        ("pooler.dense.weight", "other"),
        # T5
        ("encoder.block.0.layer.0.SelfAttention.q.weight", "q"),
        ("decoder.block.0.layer.1.EncDecAttention.o.weight", "o"),
        ("encoder.block.0.layer.1.DenseReluDense.wi.weight", "fc1"),
        ("encoder.block.0.layer.1.DenseReluDense.wo.weight", "fc2"),
        ("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", "gate"),
        ("encoder.block.0.layer.1.DenseReluDense.wi_1.weight", "up"),
        ("shared.weight", "embedding"),
        # GGUF
        ("blk.0.attn_q.weight", "q"),
        ("blk.0.attn_output.weight", "o"),
        ("blk.11.ffn_down.weight", "down"),
        ("token_embd.weight", "embedding"),
        ("output.weight", "lm_head"),
        ("blk.0.attn_norm.weight", "other"),
        # peft
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "q"),
        ("base_model.model.model.layers.0.mlp.down_proj.lora_B.default.weight", "down"),
        ("base_model.model.model.layers.0.self_attn.v_proj.base_layer.weight", "v"),
    ],
)
def test_layer_type(name, expected):
    assert S.layer_type(name) == expected
    assert expected in S.LAYER_TYPES


def test_lora_part_and_fused_split():
    assert S.lora_part("base_model.model.x.q_proj.lora_A.weight") == "A"
    assert S.lora_part("base_model.model.x.q_proj.lora_B.default.weight") == "B"
    assert S.lora_part("model.layers.0.self_attn.q_proj.weight") is None
    blocks = S.fused_qkv_split("h.0.attn.c_attn.weight", (8, 24))
    assert [b[1] for b in blocks] == ["q", "k", "v"]
    assert blocks[1][2] == 1 and blocks[1][3] == slice(8, 16)
    assert S.layer_type(blocks[2][0]) == "v"
    assert S.fused_qkv_split("h.0.attn.c_attn.weight", (8, 20)) is None
    assert S.fused_qkv_split("model.layers.0.self_attn.q_proj.weight", (8, 8)) is None

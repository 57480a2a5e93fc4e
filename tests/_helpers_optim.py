"""Tiny models and reference implementations shared by the optim tests (optim helper's fixtures)."""

from __future__ import annotations

import torch


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg)


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(cfg)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg)


def tiny_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(
        vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
        num_heads=4, decoder_start_token_id=0,
    )
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg)


def ns5_reference(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Keller Jordan's NS5 written out plainly, float64 (the textbook loop, no batching/Gram tricks)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.float64)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / X.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def matrix_with_condition(m: int, n: int, cond: float, seed: int = 0) -> torch.Tensor:
    """Random m×n float64 matrix with log-spaced singular values from 1 down to 1/cond."""
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, r, dtype=torch.float64, generator=g))
    s = torch.logspace(0.0, -torch.log10(torch.tensor(cond)).item(), r, dtype=torch.float64)
    return (U * s) @ V.T

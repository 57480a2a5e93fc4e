"""Shared fixtures for the models/eval tests: tiny random Llama / GPT-2 models and token datasets."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 64


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    """A 2-layer, hidden-32 random Llama (fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB):
    """A 2-layer, hidden-32 random GPT-2 (Conv1D projections)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_tokenizer(vocab: int = VOCAB):
    """A word-level fast tokenizer over `vocab` ids (ids 0..3 special), built offline with `tokenizers`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for i in range(4, vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def save_tiny(model, path: Path, tokenizer=True) -> Path:
    """Save `model` (and a tiny tokenizer) as a normal HF dir."""
    model.save_pretrained(path)
    if tokenizer:
        tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset of equal-length items like `data.build_splits` returns."""

    def __init__(self, n: int, seq_len: int, vocab: int = VOCAB, seed: int = 0, mask_prefix: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, vocab, (n, seq_len), generator=g)
        self.labels = self.ids.clone()
        # mask a varying-length prefix (prompt) so sequences have different numbers of target tokens
        for i in range(n):
            k = (i * mask_prefix) % max(seq_len - 1, 1) if mask_prefix else 0
            self.labels[i, :k] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i],
                "attention_mask": torch.ones_like(self.ids[i])}

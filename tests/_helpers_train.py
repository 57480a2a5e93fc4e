"""Fixtures for the engine tests: tiny corpora, a tiny Llama directory and model config, CLI arguments."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from _helpers_models import save_tiny, tiny_llama

WORDS = [f"w{i}" for i in range(4, 64)]


def write_corpus(folder: Path, n_docs: int = 24, words_per_doc: int = 120, seed: int = 0) -> Path:
    """A folder of `n_docs` small .txt documents over the tiny tokenizer's words (w4..w63)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        # a few "topics" so the text is learnable: each doc cycles through a short random phrase
        phrase = [rng.choice(WORDS) for _ in range(rng.randint(3, 7))]
        text = " ".join(phrase[i % len(phrase)] if rng.random() < 0.8 else rng.choice(WORDS)
                        for i in range(words_per_doc))
        (folder / f"doc{d:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return folder


def write_instructions(path: Path, n: int = 48, seed: int = 0) -> Path:
    """A .jsonl of prompt/response pairs of varying lengths (prompt tokens are masked out of the loss)."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            response = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A saved 2-layer hidden-32 random Llama with its word-level tokenizer."""
    return save_tiny(tiny_llama(seed), path)


def wide_model_dir(path: Path, seed: int = 0) -> Path:
    """A saved 2-layer hidden-128 Llama: every matrix has both sides > 64, so Muon orthogonalises it directly
    (not on the Gram path, whose thin matrices every rank handles itself) and DDP shards the work."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return save_tiny(LlamaForCausalLM(cfg), path)


def tiny_model_config(path: Path) -> Path:
    """A transformers config.json for `pretrain --model-config`: 2 layers, hidden 32."""
    cfg = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "tie_word_embeddings": False}
    path.write_text(json.dumps(cfg), encoding="utf-8")
    return path


def read_metrics(run: Path) -> list[dict]:
    """The records of `run/metrics.jsonl`."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


FAST = ["--seq-len", "16", "--batch-size", "4", "--micro-batch-size", "2", "--eval-every", "2",
        "--warmup-ratio", "0", "--quiet"]


def one_line_error(r, *needles: str, code: int = 2) -> None:
    """A CLI result is bad input as the house wants it: exit `code`, one `error:` line on stderr naming each of
    `needles`, no traceback."""
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in err, err

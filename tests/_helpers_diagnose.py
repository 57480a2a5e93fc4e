"""Synthetic checkpoints for the diagnose tests (no training): spectra built to order, written as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

LLAMA_SHAPES = {  # hidden 64, intermediate 176, 2 layers
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (64, 64), "self_attn.v_proj": (64, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (176, 64), "mlp.up_proj": (176, 64),
    "mlp.down_proj": (64, 176),
}


def _orth(n: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    return q


def matrix(kind: str, shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """A (m, n) matrix whose spectrum looks random-init, Adam-trained (few dominant directions), or Muon-trained
    (a random init plus an update with a flat spectrum, as orthogonalised updates add)."""
    m, n = shape
    W0 = 0.02 * torch.randn(m, n, generator=g)
    if kind == "init":
        return W0
    r = min(m, n)
    U, V = _orth(m, g)[:, :r], _orth(n, g)[:, :r]
    if kind == "adam":  # power-law spectrum: σᵢ ∝ i^-1.2 on top of the init
        s = 0.6 * torch.arange(1, r + 1, dtype=torch.float32) ** -1.2
    elif kind == "muon":  # flat update spectrum
        s = torch.full((r,), 0.2) * torch.linspace(1.0, 0.5, r)
    else:
        raise ValueError(kind)
    return W0 + (U * s) @ V.T


def write_llama(path: Path, kind: str, layers: int = 2, seed: int = 0, label: str | None = None) -> Path:
    """A Llama-named checkpoint dir (model.safetensors + config.json) of synthetic matrices."""
    g = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    t = {"model.embed_tokens.weight": 0.02 * torch.randn(256, 64, generator=g),
         "lm_head.weight": 0.02 * torch.randn(256, 64, generator=g),
         "model.norm.weight": torch.ones(64)}
    for i in range(layers):
        for k, shape in LLAMA_SHAPES.items():
            t[f"model.layers.{i}.{k}.weight"] = matrix(kind, shape, g)
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(64)
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    if label:
        (path / "muonft.json").write_text(json.dumps({"mode": "pretrain", "optimizer": label, "lr": 1e-3,
                                                      "steps": 300}))
    return path


def labelled_pretrain(optim: str) -> Path:
    """The cached 400-step `muonft pretrain` checkpoint (final/) for ``optim`` (adamw | muon) that
    `test_diagnose.test_labelled_pretrain_checkpoints_are_classified` also uses (``.cache/muonft-tests/``,
    gitignored): trained far enough that the spectra decide. Built on first use (about a minute on 2 cores)."""
    import os
    import subprocess
    import sys

    cache = Path(__file__).resolve().parents[1] / ".cache/muonft-tests"
    cfg = cache / "llama-h64-l2.json"
    cache.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
                               "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                               "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 256,
                               "tie_word_embeddings": False}))
    run = cache / f"pretrain-{optim}-h64-l2-s400-lr3e-3"
    if not (run / "final" / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "muonft_cli", "pretrain", "--model-config", str(cfg),
                        "--vocab-size", "512", "--data", "builtin:shakespeare", "--optim", optim,
                        "--steps", "400", "--lr", "3e-3", "--seq-len", "64", "--batch-size", "16",
                        "--eval-every", "0", "--save-every", "0", "--out", str(run), "--overwrite", "--quiet"],
                       check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return run / "final"

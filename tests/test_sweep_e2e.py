"""`muonft sweep` end to end through the real CLI and engine: a 2 x 2 x 2 micro-sweep (full/LoRA x AdamW/Muon x
2 learning rates) of a tiny random Llama on a synthetic corpus, then the report, and a resume that runs nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from muonft_cli import sweep as S

VOCAB = 48


def _tiny_base(path: Path) -> Path:
    """A 2-layer, hidden-32 Llama with a word-level tokenizer, saved as a normal HF dir."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(path)
    return path


def _corpus(path: Path, n_docs: int = 20, words: int = 120, seed: int = 0) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as fh:  # a learnable pattern: each word tends to be followed by the next id
        for _ in range(n_docs):
            w, out = rng.randrange(4, VOCAB), []
            for _ in range(words):
                out.append(f"w{w}")
                w = w + 1 if w + 1 < VOCAB and rng.random() < 0.8 else rng.randrange(4, VOCAB)
            fh.write(json.dumps({"text": " ".join(out)}) + "\n")
    return path


def micro_e2e_recipe(tmp_path: Path, optims: list[str], lr: dict[str, list[float]]) -> dict:
    """The micro-sweep: a tiny Adam-pretrained base, a synthetic corpus and reference set under `tmp_path`,
    full and LoRA (r=4) fine-tuning of 4 steps with `optims` at the `lr` grid, one seed."""
    base = _tiny_base(tmp_path / "base")
    data = _corpus(tmp_path / "corpus.jsonl")
    ref = _corpus(tmp_path / "reference.jsonl", n_docs=10, seed=1)
    return {
        "data": {"path": str(data), "seq_len": 16, "val_fraction": 0.2},
        "train": {"steps": 4, "batch_size": 4, "micro_batch_size": 4, "eval_every": 2, "save_every": 2},
        "eval": {"batch_size": 8},
        "sweep": {"bases": {"tiny": {"path": str(base), "pretrained_with": "adamw"}},
                  "methods": ["full", "lora"], "optims": optims, "lr": lr, "lora_ranks": [4], "seeds": [0],
                  "reference_data": str(ref)},
    }


def test_micro_sweep_end_to_end_through_the_cli(tmp_path):
    recipe = micro_e2e_recipe(tmp_path, ["adamw", "muon"], {"full": [1e-3, 1e-2], "lora": [1e-2, 3e-2]})
    base, ref = Path(recipe["sweep"]["bases"]["tiny"]["path"]), Path(recipe["sweep"]["reference_data"])
    rp = tmp_path / "micro.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sw"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "muonft_cli", "sweep", str(rp), "--out", str(out), "--workers", "2", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"]["done"] == 8 and summary["counts"]["failed"] == 0
    plan = S.load_plan(rp)
    latest = S.SweepIndex(out / S.INDEX).latest()
    for c in plan.cells:
        rec = latest[c.id]
        assert rec["status"] == "done" and rec["summary"]["steps"] == 4, rec
        d = out / "cells" / c.id
        saved = yaml.safe_load((d / "config.yaml").read_text())  # the engine ran exactly the cell's config
        assert saved["optimizer"]["name"] == c.optim and saved["optimizer"]["lr"] == c.lr
        assert saved["lora"]["rank"] == c.rank and saved["train"]["seed"] == 0
        if c.method == "lora":
            assert saved["lora"]["alpha"] == 8 and (d / "final" / "adapter_config.json").exists()
    base_ppl = latest["base_eval:tiny:s0"]["eval"]["data"]["model"]["ppl"]
    assert base_ppl > 1
    table = {r["label"]: r for r in summary["table1"]}
    assert set(table) == {"Full-Adam", "Full-Muon", "LoRA-Adam (r=4)", "LoRA-Muon (r=4)"}
    assert all(r["cols"]["tiny"]["normalised"] > 0 for r in table.values())
    assert table["Full-Muon"]["cols"]["tiny"]["gap"] is not None  # Muon is the mismatched optimizer here
    for name in ("summary.md", "summary.csv", "summary.json", "ppl_vs_lr.png", "val_curves.png"):
        assert (out / name).stat().st_size > 0
    # forgetting from the sweep's model-only evaluations (each best cell alone + the base once) equals what
    # `muonft eval --base --reference-data` measures for a LoRA cell and a full one
    from muonft_cli import evaluate
    from muonft_cli.config import load_saved

    groups = json.loads((out / "summary.json").read_text())["groups"]
    for method in ("lora", "full"):
        g = next(g for g in groups if g["method"] == method and g["best_lr"] is not None)
        (cid,) = g["best_cells"]
        cfg = load_saved(out / "cells" / cid / "config.yaml")
        cfg.model.name_or_path = str(out / "cells" / cid / "final")
        cfg.eval.reference_data = str(ref)
        rep = evaluate.run_eval(cfg, base=str(base) if method == "full" else None)["forgetting"]
        assert latest[f"ref:{cid}"]["eval"]["data"]["model"]["ppl"] == pytest.approx(rep["model"]["ppl"], rel=1e-5)
        assert latest["base_ref:tiny:s0"]["eval"]["data"]["model"]["ppl"] == pytest.approx(rep["base"]["ppl"],
                                                                                          rel=1e-5)
        assert g["forgetting"] == pytest.approx(rep["model"]["ppl"] / rep["base"]["ppl"] - 1, rel=1e-5)
    # running it again finds everything done and starts nothing
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0 and "start" not in res.stderr and "8 finished before this run and not rerun" in res.stderr

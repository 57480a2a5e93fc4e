"""Slow (real-model) engine tests: LoRA-Muon fine-tuning of SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to
fp32) for a few steps lowers the validation loss on a builtin corpus, and the adapter loads with plain peft."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from muonft_cli.cli import app

pytestmark = pytest.mark.slow


def test_smollm2_lora_muon_lowers_val_loss_and_adapter_loads_with_peft(tmp_path, real_model):
    gguf = real_model("smollm2-gguf")
    out = tmp_path / "ft"
    runner = CliRunner()
    r = runner.invoke(app, ["finetune", "--model", str(gguf), "--data", "builtin:kjv", "--optim", "muon",
                            "--lora-rank", "8", "--lr", "2e-3", "--steps", "8", "--seq-len", "64",
                            "--batch-size", "4", "--eval-every", "0", "--set", "data.max_documents=40",
                            "--set", "eval.max_batches=4", "--out", str(out), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "--model", str(out / "final"), "--base", str(gguf), "--data", "builtin:kjv",
                            "--seq-len", "64", "--max-batches", "4", "--set", "data.max_documents=40", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["data"]
    assert rep["model"]["loss"] < rep["base"]["loss"] - 0.05, rep

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = PeftModel.from_pretrained(base, str(out / "final"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0

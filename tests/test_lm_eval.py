"""`muonft eval --tasks`: lm-evaluation-harness through its Python API, on a local task definition (offline).

The tasks are YAMLs over a jsonl the test writes (`dataset_path: json`), run on the tiny model / a LoRA adapter of
it through the real CLI, and checked against a direct `lm_eval.simple_evaluate` call on the same (merged) model.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from muonft_cli import models
from muonft_cli.cli import app
from muonft_cli.config import LoraConfig, ModelConfig

LL_TASK, MC_TASK = "muonft_tiny_ll", "muonft_tiny_mc"


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(4, 64)}" for _ in range(n))


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """Two local tasks over 8 docs each: a loglikelihood one (perplexity: a continuous number) and a
    multiple-choice one (acc, acc_norm); and a third whose jsonl does not exist."""
    d = tmp_path_factory.mktemp("lm-eval-tasks")
    rng = random.Random(0)
    ll = [{"context": _words(rng, 6), "target": " " + _words(rng, 2)} for _ in range(8)]
    mc = [{"context": _words(rng, 6), "choices": [_words(rng, 1) for _ in range(3)], "label": i % 3}
          for i in range(8)]
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (d / "gone.yaml").write_text(f"task: muonft_tiny_gone\n{common}dataset_kwargs:\n  data_files:\n"
                                 f"    test: {d / 'gone.jsonl'}\noutput_type: loglikelihood\n"
                                 "doc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n")
    for name, rows in (("ll", ll), ("mc", mc)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "ll.yaml").write_text(
        f"task: {LL_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'll.jsonl'}\n"
        "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{target}}'\n"
        "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (d / "mc.yaml").write_text(
        f"task: {MC_TASK}\n{common}dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return d


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA adapter on the tiny model with visibly non-zero A and B (so merging it changes the numbers)."""
    model, tok = models.load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "cpu")
    pm = models.apply_lora(model, LoraConfig(rank=4))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("lm-eval-adapter") / "ad"
    models.save_model(pm, tok, out, {"optimizer": "muon"})
    return out


def _direct(model, tok, tasks_dir: Path) -> dict:
    """lm-eval's own API, as its README shows it, on an already-loaded model (the local tasks alone indexed)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    res = lm_eval.simple_evaluate(model=lm, tasks=[LL_TASK, MC_TASK], limit=4, bootstrap_iters=1000,
                                  task_manager=tm, log_samples=False)
    return res["results"]


def test_cli_tasks_on_adapter_match_direct_lm_eval(tiny_model_dir, adapter_dir, tasks_dir, corpus):
    pytest.importorskip("lm_eval")
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from muonft_cli.render import eval_tables

    r = CliRunner().invoke(app, [
        "eval", "--model", str(adapter_dir), "--model-only", "--data", str(corpus), "--seq-len", "16",
        "--max-batches", "1", "--batch-size", "2", "--tasks", f"{LL_TASK},{MC_TASK}", "--limit", "4",
        "--include-path", str(tasks_dir), "--bootstrap-iters", "1000", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["data"]["model"]["tokens"] > 0  # perplexity beside the task metrics
    assert rep["lm_eval"]["samples"] == {LL_TASK: 4, MC_TASK: 4} and rep["lm_eval"]["limit"] == 4
    ll, mc = rep["tasks"][LL_TASK], rep["tasks"][MC_TASK]
    assert 0.0 <= mc["acc"] <= 1.0 and 0.0 <= mc["acc_norm"] <= 1.0 and 0.0 <= ll["acc"] <= 1.0
    assert math.isfinite(ll["perplexity"]) and ll["perplexity"] > 1.0 and "sample_len" not in ll

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       str(adapter_dir)).merge_and_unload().eval()
    direct = _direct(merged, tok, tasks_dir)
    assert ll["perplexity"] == pytest.approx(direct[LL_TASK]["perplexity,none"], rel=1e-6)
    assert ll["acc"] == direct[LL_TASK]["acc,none"] and ll["acc_stderr"] == direct[LL_TASK]["acc_stderr,none"]
    assert ll["perplexity_stderr"] == pytest.approx(direct[LL_TASK]["perplexity_stderr,none"], rel=1e-6)
    assert mc["acc"] == direct[MC_TASK]["acc,none"] and mc["acc_norm"] == direct[MC_TASK]["acc_norm,none"]
    base = _direct(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tok, tasks_dir)
    assert ll["perplexity"] != pytest.approx(base[LL_TASK]["perplexity,none"], rel=1e-3)  # the adapter was merged

    # with the adapter's base: distance too (the adapter merged once, for both); --tasks alone needs no --data
    r = CliRunner().invoke(app, ["eval", "--model", str(adapter_dir), "--tasks", LL_TASK, "--limit", "4",
                                 "--batch-size", "2", "--include-path", str(tasks_dir), "--bootstrap-iters", "0",
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep2 = json.loads(r.stdout)
    assert rep2["data"] is None and rep2["distance"]["total"]["l2"] > 0 and list(rep2["tasks"]) == [LL_TASK]
    assert rep2["tasks"][LL_TASK]["perplexity"] == pytest.approx(ll["perplexity"], rel=1e-6)
    assert rep2["tasks"][LL_TASK]["perplexity_stderr"] is None  # lm-eval's "N/A" without bootstrap

    console = Console(record=True, width=160)
    console.print(eval_tables(rep))
    text = console.export_text()
    assert "lm-evaluation-harness" in text and MC_TASK in text and "acc_norm" in text


@pytest.mark.parametrize("extra,msg", [
    (["--tasks", f"{LL_TASK},hellaswg"], "close names: hellaswag"),  # lm-eval's bundled names, offline
    (["--tasks", LL_TASK, "--limit", "0"], "--limit"),
    (["--tasks", LL_TASK, "--num-fewshot", "-1"], "--num-fewshot"),
    (["--tasks", LL_TASK, "--bootstrap-iters", "-1"], "--bootstrap-iters"),
    (["--tasks", LL_TASK, "--include-path", "/no/such/dir"], "is not a folder"),
    (["--tasks", "muonft_tiny_gone", "--limit", "1"], "could not load the data of --tasks muonft_tiny_gone"),
    (["--num-fewshot", "2"], "go with --tasks"),
])
def test_cli_tasks_bad_input(tiny_model_dir, tasks_dir, extra, msg):
    pytest.importorskip("lm_eval")
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--include-path", str(tasks_dir)] + extra
                           if "--tasks" in extra else ["eval", "--model", str(tiny_model_dir)] + extra)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_cli_tasks_without_the_extra(tiny_model_dir, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--tasks", "hellaswag"])
    assert r.exit_code == 2, r.output
    assert "pip install 'muonft[lm-eval]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1

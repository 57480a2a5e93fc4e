"""evaluate.py: evaluate_loss vs a hand computation (batch-size independent), weight distance and LoRA spectra vs
closed forms / exact SVD, run_eval numbers vs direct computation, and `muonft eval` through the CLI."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _helpers_models import TokenDataset, save_tiny, tiny_llama
from muonft_cli import models
from muonft_cli.cli import app
from muonft_cli.config import LoraConfig, ModelConfig, RunConfig
from muonft_cli.evaluate import evaluate_loss, lora_spectra, run_eval, weight_distance
from muonft_cli.spectral import stable_rank, svd_entropy


def _hand_nll(model, ds):
    """Per-token loop: Σ −log softmax(logits[t])[label[t+1]] over unmasked targets, / count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(ds)):
            item = ds[i]
            logits = model(input_ids=item["input_ids"][None]).logits[0].double()  # [T, V]
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(len(item["labels"]) - 1):
                y = int(item["labels"][t + 1])
                if y != -100:
                    total -= float(logp[t, y])
                    count += 1
    return total / count, count


def test_matches_hand_computation_and_is_batch_size_independent():
    model = tiny_llama()
    ds = TokenDataset(7, 12, mask_prefix=3)  # uneven masking, 7 not divisible by the batch sizes
    want, count = _hand_nll(model, ds)
    results = [evaluate_loss(model, ds, bs, "cpu") for bs in (1, 2, 3, 7)]
    for r in results:
        assert r["tokens"] == count
        assert r["loss"] == pytest.approx(want, rel=1e-5)
        assert r["ppl"] == pytest.approx(math.exp(want), rel=1e-5)
    # a mean of per-batch means would differ here (batches hold different numbers of targets)
    per_batch = []
    for s in range(0, 7, 3):
        per_batch.append(evaluate_loss(model, torch.utils.data.Subset(ds, range(s, min(s + 3, 7))), 3)["loss"])
    assert abs(sum(per_batch) / len(per_batch) - want) > 1e-4


def test_max_batches_and_mode_restored():
    model = tiny_llama().train()
    ds = TokenDataset(6, 10)
    r = evaluate_loss(model, ds, 2, "cpu", max_batches=1)
    assert r["tokens"] == 2 * 9
    assert model.training
    assert torch.is_grad_enabled()


def test_no_targets_gives_nan():
    ds = TokenDataset(2, 6)
    ds.labels[:] = -100
    r = evaluate_loss(tiny_llama(), ds, 2)
    assert r["tokens"] == 0 and math.isnan(r["loss"])


# --------------------------------------------------------------------------------------------- muonft eval



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base, a full fine-tune of it, a LoRA adapter on it, and two small text corpora."""
    d = tmp_path_factory.mktemp("eval")
    save_tiny(tiny_llama(), d / "base")
    rng = random.Random(0)
    for name in ("a", "b"):
        (d / name).mkdir()
        for i in range(6):
            (d / name / f"doc{i}.txt").write_text(" ".join(f"w{rng.randrange(4, 64)}" for _ in range(200)))
    model, tok = models.load_model(ModelConfig(name_or_path=str(d / "base")), "cpu")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    models.save_model(model, tok, d / "full", {"optimizer": "adamw"})
    model, tok = models.load_model(ModelConfig(name_or_path=str(d / "base")), "cpu")
    pm = models.apply_lora(model, LoraConfig(rank=4))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    models.save_model(pm, tok, d / "ad", {"optimizer": "muon"})
    return d


def _cfg(d: Path, model: str, **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name_or_path = str(d / model)
    cfg.data.path = str(d / "a")
    cfg.data.seq_len = 32
    cfg.data.val_fraction = 0.34
    cfg.eval.batch_size = 3
    for k, v in kw.items():
        sect, key = k.split("__")
        setattr(getattr(cfg, sect), key, v)
    return cfg


def test_weight_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    w0 = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 6, generator=g),
          "model.embed_tokens.weight": torch.randn(10, 6, generator=g)}
    w = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in w0.items()}
    w["model.embed_tokens.weight"] = 2.0 * w0["model.embed_tokens.weight"]  # same direction: cosine distance 0
    r = weight_distance(w, w0)
    rows = {m["name"]: m for m in r["matrices"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert rows[q]["l2"] == pytest.approx(float(torch.linalg.norm(w[q] - w0[q])), rel=1e-6)
    cos = torch.nn.functional.cosine_similarity(w[q].flatten().double(), w0[q].flatten().double(), dim=0)
    assert rows[q]["cosine"] == pytest.approx(1 - float(cos), rel=1e-6)
    assert rows["model.embed_tokens.weight"]["cosine"] == pytest.approx(0.0, abs=1e-7)
    flat = torch.cat([w[k].flatten() for k in w0]).double()
    flat0 = torch.cat([w0[k].flatten() for k in w0]).double()
    assert r["total"]["l2"] == pytest.approx(float(torch.linalg.norm(flat - flat0)), rel=1e-6)
    assert r["total"]["cosine"] == pytest.approx(
        1 - float(torch.nn.functional.cosine_similarity(flat, flat0, dim=0)), rel=1e-6)
    assert r["hidden"]["matrices"] == 1 and r["by_type"]["q"]["l2"] == pytest.approx(rows[q]["l2"])


def test_lora_spectra_match_explicit_product():
    pm = models.apply_lora(tiny_llama(), LoraConfig(rank=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    s = lora_spectra(pm)
    assert s["rank"] == 4 and s["all"]["n"] == 14
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    A, B = q.lora_A["default"].weight.detach(), q.lora_B["default"].weight.detach()
    row = next(m for m in s["matrices"] if m["name"] == "model.layers.0.self_attn.q_proj")
    assert row["type"] == "q"
    assert row["A"]["stable_rank"] == pytest.approx(stable_rank(A))
    sv = torch.linalg.svdvals((B @ A).double())[:4]
    assert row["BA"]["stable_rank"] == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=1e-6)
    assert row["BA"]["svd_entropy"] == pytest.approx(svd_entropy(sv, rank=4), rel=1e-6)
    qs = [m for m in s["matrices"] if m["type"] == "q"]
    assert s["by_type"]["q"]["B"]["svd_entropy"] == pytest.approx(
        sum(m["B"]["svd_entropy"] for m in qs) / len(qs))


def test_run_eval_adapter_numbers_match_hand(world):
    from muonft_cli import data

    rep = run_eval(_cfg(world, "ad", eval__reference_data=str(world / "b")))
    model, tok = models.load_model(ModelConfig(name_or_path=str(world / "ad")), "cpu")
    cfg = _cfg(world, "ad")
    val = data.build_splits(cfg.data, tok, cfg.train.seed).val
    want = evaluate_loss(model, val, 1)
    assert rep["data"]["model"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert rep["data"]["model"]["tokens"] == want["tokens"] == int((val.labels[:, 1:] != -100).sum())
    base, _ = models.load_model(ModelConfig(name_or_path=str(world / "base")), "cpu")
    assert rep["data"]["base"]["loss"] == pytest.approx(evaluate_loss(base, val, 5)["loss"], rel=1e-6)
    assert rep["data"]["ppl_change"] == pytest.approx(rep["data"]["model"]["ppl"] - rep["data"]["base"]["ppl"])
    assert rep["forgetting"]["base"] is not None and rep["forgetting"]["split"] == "val"
    assert rep["base"] == str((world / "base").resolve())
    # distance on merged weights: ‖scaling · B A‖ for each adapted matrix, 0 for the rest
    q = model.base_model.model.model.layers[1].self_attn.v_proj
    delta = q.get_delta_weight("default")
    row = next(m for m in rep["distance"]["matrices"] if m["name"] == "model.layers.1.self_attn.v_proj.weight")
    assert row["l2"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)
    emb = next(m for m in rep["distance"]["matrices"] if m["name"] == "model.embed_tokens.weight")
    assert emb["l2"] == 0.0
    assert rep["lora_spectra"]["all"]["n"] == 14


def test_run_eval_full_model_with_base(world):
    rep = run_eval(_cfg(world, "full", eval__max_batches=1), base=str(world / "base"))
    assert rep["lora_spectra"] is None and rep["data"]["model"]["tokens"] <= 3 * 31
    full, _ = models.load_model(ModelConfig(name_or_path=str(world / "full")), "cpu")
    base, _ = models.load_model(ModelConfig(name_or_path=str(world / "base")), "cpu")
    w, w0 = full.model.layers[0].mlp.up_proj.weight.detach(), base.model.layers[0].mlp.up_proj.weight.detach()
    row = next(m for m in rep["distance"]["matrices"] if m["name"] == "model.layers.0.mlp.up_proj.weight")
    assert row["l2"] == pytest.approx(float(torch.linalg.norm(w - w0)), rel=1e-5)
    assert rep["distance"]["total"]["matrices"] == 16 and rep["distance"]["skipped"] == 0


def test_model_only_skips_every_base_number(world, monkeypatch):
    """`--model-only`: the same model numbers, and the base (an adapter's too) is never evaluated."""
    import muonft_cli.evaluate as E

    both = run_eval(_cfg(world, "ad"))
    calls = []
    real = E.evaluate_loss
    monkeypatch.setattr(E, "evaluate_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    alone = run_eval(_cfg(world, "ad"), compare=False)
    assert alone["data"]["model"] == both["data"]["model"] and alone["data"]["base"] is None
    assert len(calls) == 1 and alone["distance"] is None and alone["lora_spectra"]["all"]["n"] == 14


def test_cli_eval_json_and_table(world):
    args = ["eval", "--model", str(world / "ad"), "--data", str(world / "a"), "--reference-data",
            str(world / "b"), "--seq-len", "32", "--val-fraction", "0.34", "--max-batches", "1"]
    r = CliRunner().invoke(app, args + ["--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert {"data", "forgetting", "distance", "lora_spectra"} <= set(rep) and rep["data"]["split"] == "val"
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0 and "LoRA spectra" in r.stdout and "Weight distance" in r.stdout


@pytest.mark.parametrize("extra,msg", [
    (["--model", "./no/such/model", "--data", "x"], "does not exist"),
    (["--model", "{full}", "--reference-data", "{b}"], "pass --base"),
    (["--model", "{full}"], "nothing to evaluate"),
    (["--model", "{full}", "--base", "{ad}"], "is an adapter"),
    (["--model", "{ad}", "--data", "{a}", "--base", "{full}", "--model-only"], "--model-only"),
    (["--model", "nobody/nothing-here", "--data", "{a}", "--offline"], "hub is offline"),
])
def test_cli_eval_bad_input(world, extra, msg):
    args = ["eval"] + [a.format(full=world / "full", b=world / "b", a=world / "a", ad=world / "ad") for a in extra]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output

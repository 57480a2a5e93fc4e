"""split_params on tiny HF models and their peft-LoRA versions; build_optimizer inside HF Trainer."""

from __future__ import annotations

import re
import types

import pytest
import torch

from _helpers_optim import tiny_bert, tiny_gpt2, tiny_llama, tiny_mistral, tiny_qwen2, tiny_t5
from muonft_cli.optim import Muon, build_optimizer, split_params
from muonft_cli.optim import routing

# Independent expectations written from each architecture's layout, not from the router's rules.
LLAMA_MUON = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
GPT2_MUON = re.compile(r"transformer\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
BERT_MUON = re.compile(
    r"bert\.(encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
    r"|intermediate\.dense|output\.dense)|pooler\.dense)\.weight$"
)
T5_MUON = re.compile(r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.(SelfAttention|EncDecAttention|DenseReluDense)\.(q|k|v|o|wi|wo)\.weight$")


def _check(model, muon_pattern):
    split = split_params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = [r.name for r in split]
    assert len(names) == len(set(names)) == len(trainable) and set(names) == trainable
    for r in split:
        want = "muon" if muon_pattern.search(r.name) else "adamw"
        assert r.kind == want, (r.name, r.kind, r.reason)
    return split


@pytest.mark.parametrize("factory", [tiny_llama, tiny_qwen2, tiny_mistral])
def test_llama_family(factory):
    split = _check(factory(), LLAMA_MUON)
    reasons = {r.name: r.reason for r in split}
    assert reasons["model.embed_tokens.weight"] == "embedding"
    assert reasons["lm_head.weight"] == "output head"
    assert reasons["model.norm.weight"] == "1-D (norm/bias)"
    assert len(split.muon) == 14


def test_tied_lm_head_is_one_adamw_param():
    model = tiny_llama(tie=True)
    split = _check(model, LLAMA_MUON)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(r.param is model.lm_head.weight for r in split) == 1


def test_gpt2_conv1d_is_flagged_transposed():
    split = _check(tiny_gpt2(), GPT2_MUON)
    assert split.muon and all(r.transposed for r in split.muon)
    assert {r.reason for r in split.adamw} >= {"embedding", "1-D (norm/bias)"}


def test_bert_and_t5():
    split = _check(tiny_bert(), BERT_MUON)
    assert [r.reason for r in split if r.name.startswith("classifier.weight")] == ["output head"]
    t5 = tiny_t5()
    split = _check(t5, T5_MUON)
    assert t5.lm_head.weight is t5.shared.weight  # tied in T5 v1.0 configs
    assert {r.name: r.reason for r in split}["shared.weight"] == "embedding"


def _lora(model, **kw):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **kw))


@pytest.mark.parametrize(
    "factory,targets,extra",
    [
        (tiny_llama, "all-linear", {}),
        (tiny_gpt2, ["c_attn", "c_proj", "c_fc"], {"fan_in_fan_out": True}),
        (tiny_bert, ["query", "key", "value", "dense"], {"task_type": "SEQ_CLS"}),
        (tiny_t5, ["q", "k", "v", "o", "wi", "wo"], {}),
    ],
)
def test_peft_lora_routing(factory, targets, extra):
    model = _lora(factory(), target_modules=targets, **extra)
    split = split_params(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(r.name for r in split) == sorted(trainable)
    for r in split:
        if ".lora_A." in r.name or ".lora_B." in r.name:
            assert r.kind == "muon" and not r.transposed
        else:  # e.g. BERT's classifier in modules_to_save
            assert r.kind == "adamw" and ("classifier" in r.name or r.param.ndim < 2), r.name
    assert any(".lora_A." in r.name for r in split.muon) and any(".lora_B." in r.name for r in split.muon)
    b_only = split_params(model, lora_a="adamw")
    assert all(".lora_B." in r.name for r in b_only.muon)
    assert {r.reason for r in b_only.adamw if ".lora_A." in r.name} == {"LoRA A (lora_a=adamw)"}


def test_dora_magnitude_goes_to_adamw():
    model = _lora(tiny_llama(), target_modules=["q_proj", "v_proj"], use_dora=True)
    split = split_params(model)
    mags = [r for r in split if "lora_magnitude_vector" in r.name]
    assert mags and all(r.kind == "adamw" and r.reason == "DoRA magnitude (1-D)" for r in mags)
    assert len(split.muon) == 2 * 2 * 2  # layers × (q, v) × (A, B)
    opt = build_optimizer(model, types.SimpleNamespace(name="muon", lr=1e-3, weight_decay=0.1, ns_dtype="fp32"))
    mag_ids = {id(r.param) for r in mags}
    for g in opt.param_groups:
        if any(id(p) in mag_ids for p in g["params"]):
            assert g["kind"] == "adamw" and g["weight_decay"] == 0.0


def test_unrouted_or_double_routed_raises():
    model = tiny_llama()
    split = split_params(model)
    with pytest.raises(ValueError, match="routed more than once"):
        routing._validate(model, split.routes + [split.routes[0]])
    with pytest.raises(ValueError, match="unrouted"):
        routing._validate(model, split.routes[1:])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        split_params(model)
    with pytest.raises(ValueError, match="lora_a"):
        split_params(tiny_llama(), lora_a="sgd")


def test_build_optimizer_in_hf_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _lora(tiny_llama(), target_modules="all-linear")
    cfg = types.SimpleNamespace(name="muon", lr=1e-2, weight_decay=0.0, ns_dtype="fp32")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 4)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 12), generator=g)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, learning_rate=1e-2,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    n_muon = len(opt.param_split.muon)
    assert opt.ns_matrices_done == 3 * n_muon  # Muon really ran, every step, on every adapter
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * (1 - 3 / 4))

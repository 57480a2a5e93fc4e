"""muonft's optimizer in other people's training loops: the keyword form of `build_optimizer`, and
`muonft_cli.hf.MuonTrainer`/`MuonTrainerMixin` inside transformers' `Trainer`, peft LoRA and TRL's `SFTTrainer`
(training, and checkpoint save + `resume_from_checkpoint`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys

import pytest
import torch

from _helpers_models import TokenDataset, tiny_tokenizer
from muonft_cli._common import OPTIMIZER_NAMES
from muonft_cli.config import OptimizerConfig
from muonft_cli.optim import OPTION_DEFAULTS, build_optimizer

# ------------------------------------------------------------------ keyword form of the factory


def _groups(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in opt.param_groups:
        out.append(({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]]))
    return out


def _one_step(model, opt, seed=0):
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_option_defaults_are_the_config_sections_keys_and_defaults():
    fields = {f.name: f for f in dataclasses.fields(OptimizerConfig) if f.name != "name"}
    assert list(OPTION_DEFAULTS) == list(fields)
    cfg = OptimizerConfig()
    for key, default in OPTION_DEFAULTS.items():
        value = getattr(cfg, key)
        assert (tuple(value) if isinstance(value, list) else value) == default, key


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_keyword_form_matches_config_form(tiny_llama, name):
    options = dict(lr=3e-3, weight_decay=0.1, momentum=0.9, ns_steps=4, adamw_lr=1e-3)
    cfg = OptimizerConfig(name=name, **options)
    model_a, model_b = tiny_llama(0), tiny_llama(0)
    opt_a = build_optimizer(model_a, cfg)
    opt_b = build_optimizer(model_b, name, **options)
    assert type(opt_a) is type(opt_b)
    assert _groups(opt_a, model_a) == _groups(opt_b, model_b)
    assert [(r.name, r.kind, r.reason) for r in opt_a.param_split] == [
        (r.name, r.kind, r.reason) for r in opt_b.param_split]
    after_a, after_b = _one_step(model_a, opt_a), _one_step(model_b, opt_b)
    assert all(torch.equal(after_a[n], after_b[n]) for n in after_a)
    assert any(not torch.equal(after_a[n], p) for n, p in tiny_llama(0).named_parameters())  # it moved


def test_keyword_form_routes_like_muonfts_runs(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    opt = build_optimizer(model, "muon", lr=2e-4)
    kinds = {r.name: r.kind for r in opt.param_split}
    assert kinds and all(kind == "muon" for n, kind in kinds.items() if "lora_A" in n or "lora_B" in n)
    full = build_optimizer(tiny_llama(0), "muon", lr=2e-4)
    by_name = {r.name: r.kind for r in full.param_split}
    assert by_name["model.embed_tokens.weight"] == by_name["lm_head.weight"] == "adamw"
    assert by_name["model.norm.weight"] == "adamw"
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == "muon"


def test_keyword_form_unknown_keyword_names_the_valid_ones(tiny_llama):
    with pytest.raises(TypeError, match="'ns_step'.*valid options: lr, weight_decay, momentum.*lora_a"):
        build_optimizer(tiny_llama(0), "muon", lr=2e-4, ns_step=5)
    with pytest.raises(TypeError, match="only with an optimizer name"):
        build_optimizer(tiny_llama(0), OptimizerConfig(name="muon"), lr=2e-4)
    with pytest.raises(ValueError, match="unknown optimizer.name 'sgd'"):
        build_optimizer(tiny_llama(0), "sgd", lr=2e-4)


# ------------------------------------------------------------------ transformers Trainer


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), max_steps=10, per_device_train_batch_size=4, learning_rate=3e-3,
                logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
                dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0)
    base.update(kw)
    return TrainingArguments(**base)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _corpus():
    return TokenDataset(8, 16, seed=3)  # 8 sequences, seen again and again: a model can learn them


def test_import_is_light_and_the_cli_does_not_import_it():
    code = ("import sys, muonft_cli.hf, muonft_cli.cli; "
            "assert 'transformers' not in sys.modules and 'torch' not in sys.modules, 'heavy import'; "
            "del sys.modules['muonft_cli.hf']; import muonft_cli.cli; "
            "assert 'muonft_cli.hf' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_muon_trainer_trains_with_muon(tiny_llama, tmp_path):
    from muonft_cli.hf import MuonTrainer
    from muonft_cli.optim import Muon

    trainer = MuonTrainer(model=tiny_llama(0), args=_args(tmp_path, gradient_accumulation_steps=2, learning_rate=1e-2,
                                                          adam_beta2=0.97, weight_decay=0.01),
                          train_dataset=_corpus(), muon_options={"ns_steps": 4})
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, Muon)
    assert opt.ns_matrices_done > 0  # Muon really ran: no silent AdamW fallback
    matrices = sum(len(g["params"]) for g in opt.param_groups if g["kind"] == "muon")
    assert opt.ns_matrices_done == 10 * matrices  # one Muon step per optimizer step (2 micro-batches each)
    muon_group = next(g for g in opt.param_groups if g["kind"] == "muon")
    adamw_group = next(g for g in opt.param_groups if g["kind"] == "adamw")
    assert muon_group["ns_steps"] == 4 and muon_group["weight_decay"] == 0.01
    assert adamw_group["betas"] == (0.9, 0.97)
    losses = _losses(trainer)
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]


def test_muon_trainer_under_bf16_mixed_precision(tiny_llama, tmp_path):
    from muonft_cli.hf import MuonTrainer

    trainer = MuonTrainer(model=tiny_llama(0), args=_args(tmp_path, bf16=True, learning_rate=1e-2),
                          train_dataset=_corpus(), optim_name="muon-pe")
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    opt = trainer.optimizer.optimizer
    assert opt.ns_matrices_done > 0
    assert all(p.dtype == torch.float32 for g in opt.param_groups for p in g["params"])  # fp32 master weights
    losses = _losses(trainer)
    assert losses[-1] < 0.8 * losses[0]


def test_muon_trainer_with_peft_lora(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    from muonft_cli.hf import MuonTrainer

    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules="all-linear"))
    trainer = MuonTrainer(model=model, args=_args(tmp_path, learning_rate=5e-2), train_dataset=_corpus())
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    reasons = {r.reason for r in opt.param_split if r.kind == "muon"}
    assert reasons == {"LoRA A", "LoRA B"}
    assert opt.ns_matrices_done > 0
    losses = _losses(trainer)  # rank-4 adapters on a random model learn slowly, but steadily
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


def test_muon_options_are_checked_before_the_trainer_sets_up(tiny_llama, tmp_path):
    from muonft_cli.hf import MuonTrainer

    with pytest.raises(TypeError, match="'ns_step'.*valid keys: momentum"):
        MuonTrainer(model=tiny_llama(0), args=_args(tmp_path), muon_options={"ns_step": 3})
    with pytest.raises(TypeError, match="'lr' \\(set TrainingArguments.learning_rate\\)"):
        MuonTrainer(model=tiny_llama(0), args=_args(tmp_path), muon_options={"lr": 1e-3})
    with pytest.raises(ValueError, match="unknown optim_name 'sgd'"):
        MuonTrainer(model=tiny_llama(0), args=_args(tmp_path), optim_name="sgd")


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_checkpoint_resume_continues_identically(tiny_llama, tmp_path):
    """An uninterrupted 6-step run == a run stopped at step 3 (max_steps) and resumed from its checkpoint;
    the resumed run without the checkpoint's optimizer.pt differs, so the Muon state round-trips."""
    from muonft_cli.hf import MuonTrainer

    def trainer(out, steps, **kw):
        return MuonTrainer(model=tiny_llama(0), train_dataset=_corpus(), optim_name="muon",
                           args=_args(out, max_steps=steps, save_strategy="steps", save_steps=3, **kw))

    full = trainer(tmp_path / "full", 6)
    full.train()
    first = trainer(tmp_path / "split", 3)
    first.train()
    ckpt = tmp_path / "split" / "checkpoint-3"
    assert (ckpt / "optimizer.pt").is_file()
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert any("momentum_buffer" in s for s in state["state"].values())
    resumed = trainer(tmp_path / "split", 6)
    resumed.train(resume_from_checkpoint=str(ckpt))
    want, got = _weights(full.model), _weights(resumed.model)
    assert all(torch.equal(want[n], got[n]) for n in want)
    assert _losses(resumed)[-1] == _losses(full)[-1]

    bare = tmp_path / "bare" / "checkpoint-3"
    shutil.copytree(ckpt, bare)
    (bare / "optimizer.pt").unlink()
    fresh_opt = trainer(tmp_path / "bare", 6)
    fresh_opt.train(resume_from_checkpoint=str(bare))
    other = _weights(fresh_opt.model)
    assert not all(torch.equal(want[n], other[n]) for n in want)


def test_fsdp_is_refused(tiny_llama, tmp_path):
    from muonft_cli.hf import MuonTrainer

    trainer = MuonTrainer(model=tiny_llama(0), args=_args(tmp_path), train_dataset=_corpus())
    trainer.is_fsdp_enabled = True  # what Trainer sets under an FSDP config
    with pytest.raises(ValueError, match="FSDP/DeepSpeed shard them"):
        trainer.create_optimizer()


_DDP_SCRIPT = """
import sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from _helpers_models import TokenDataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
from muonft_cli.hf import MuonTrainer


def tiny_llama(seed):  # hidden 128: no thin matrix, so every one is orthogonalised by exactly one rank
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4))


args = TrainingArguments(output_dir={out!r}, max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                         report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                         lr_scheduler_type="constant", logging_steps=1, ddp_backend="gloo")
trainer = MuonTrainer(model=tiny_llama(0), args=args, train_dataset=TokenDataset(8, 16, seed=3))
trainer.train()
assert dist.is_initialized() and dist.get_world_size() == 2
flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
start = torch.cat([p.detach().flatten() for p in tiny_llama(0).parameters()])
gathered = [torch.empty_like(flat) for _ in range(2)]
dist.all_gather(gathered, flat)
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
assert not torch.equal(flat, start), "nothing trained"
opt = trainer.optimizer.optimizer
done = torch.tensor([opt.ns_matrices_done])
both = [torch.zeros_like(done) for _ in range(2)]
dist.all_gather(both, done)
muon_matrices = sum(len(g["params"]) for g in opt.param_groups if g["kind"] == "muon")
assert muon_matrices == 7 and min(both).item() > 0, (both, muon_matrices)
assert sum(both).item() == 4 * muon_matrices, (both, muon_matrices)  # split over the ranks, not repeated
print("RANK_OK", dist.get_rank(), flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo; accelerate's own `--cpu` multi-process mode needs
    mpirun, so `--multi_gpu` starts the two processes and `use_cpu=True` keeps them on the CPU): both ranks train
    with Muon, share the orthogonalisations and stay identical."""
    import os
    from pathlib import Path

    tests = str(Path(__file__).parent)
    script = tmp_path / "train_ddp.py"
    script.write_text(_DDP_SCRIPT.format(tests=tests, out=str(tmp_path / "out")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(tests).parent), tests]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("RANK_OK") == 2, proc.stdout[-2000:]


# ------------------------------------------------------------------ TRL


@pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                    reason="TRL is not installed (pip install trl, or the dev extra): SFTTrainer composition untested")
def test_mixin_composes_with_trl_sft_trainer(tiny_llama, tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from muonft_cli.hf import MuonTrainerMixin
    from muonft_cli.optim import NorMuon

    class MuonSFT(MuonTrainerMixin, SFTTrainer):
        pass

    texts = [" ".join(f"w{4 + (i * 7 + j * 3) % 60}" for j in range(14)) for i in range(8)]
    args = SFTConfig(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=4, learning_rate=3e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0,
                     dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant",
                     max_length=32, dataset_text_field="text")
    trainer = MuonSFT(model=tiny_llama(0), args=args, train_dataset=Dataset.from_dict({"text": texts}),
                      processing_class=tiny_tokenizer(), optim_name="normuon")
    trainer.train()
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, NorMuon) and opt.ns_matrices_done > 0
    losses = _losses(trainer)
    assert losses[-1] < 0.8 * losses[0]

"""`muonft finetune|pretrain ... --plan`: the memory plan through the real CLI — its JSON, that nothing is read
but config.json and nothing is written, its optimizer state against the real optimizers' state, FSDP2/DDP and
dtype arithmetic, the fit and the largest micro-batch, bad input — and (slow) its total against measured peak RSS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _helpers_train import one_line_error
from muonft_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
LLAMA_7B = REPO / "docs" / "configs" / "llama-2-7b.json"
OPTIMIZERS = ("adamw", "muon", "muon-pe", "adamuon", "normuon")
runner = CliRunner()


def plan(*args: str, code: int = 0) -> dict:
    r = runner.invoke(app, ["finetune", "--plan", "--json", *[str(a) for a in args]])
    assert r.exit_code == code, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory) -> Path:
    """A folder holding only the Llama-2-7B config.json of docs/configs (no weights at all)."""
    d = tmp_path_factory.mktemp("llama-2-7b")
    (d / "config.json").write_text(LLAMA_7B.read_text())
    return d


def test_plan_json_reads_only_config_and_writes_nothing(llama7b, tmp_path):
    out = tmp_path / "run"
    p = plan("--model", llama7b, "--out", out, "--data", tmp_path / "absent.txt", "--lora-rank", 8,
             "--optim", "muon", "--gpu-memory", "24GiB")
    assert not out.exists() and sorted(os.listdir(llama7b)) == ["config.json"]
    assert p["params"] == 6_738_415_616 + 19_988_480 and p["trainable_params"] == 19_988_480  # peft's r=8 count
    assert set(p["bytes"]) >= {"weights", "gradients", "optimizer_state", "activations", "total"}
    assert isinstance(p["fits"], bool) and isinstance(p["max_micro_batch"], int)
    assert p["base_dtype"] == "bf16"  # auto on a GPU (--gpu-memory): bf16 for a LoRA base
    b = p["bytes"]
    assert b["weights"] == 2 * 6_738_415_616 + 4 * 19_988_480
    assert b["optimizer_state"] == 4 * 19_988_480  # Muon: one momentum buffer per LoRA matrix, nothing else
    r = runner.invoke(app, ["finetune", "--plan", "--model", str(llama7b), "--lora-rank", "8", "--optim", "muon",
                            "--gpu-memory", "24GiB"])
    assert r.exit_code == 0 and "total" in r.stdout and "largest micro-batch" in r.stderr, r.output


def test_plan_optimizer_state_equals_the_real_optimizers(tiny_model_dir):
    """The plan's optimizer-state bytes are those the real optimizers hold after a step (routing included)."""
    from muonft_cli import optim
    from muonft_cli.config import LoraConfig, ModelConfig, OptimizerConfig
    from muonft_cli.models import apply_lora, load_model

    for rank in (None, 4):
        for name in OPTIMIZERS:
            p = plan("--model", tiny_model_dir, "--optim", name, "--device", "cpu",
                     *(["--lora-rank", rank] if rank else []))
            model, _ = load_model(ModelConfig(name_or_path=str(tiny_model_dir)), "cpu")
            if rank:
                model = apply_lora(model, LoraConfig(rank=rank))
            opt = optim.build_optimizer(model, OptimizerConfig(name=name))
            for q in model.parameters():
                if q.requires_grad:
                    q.grad = torch.ones_like(q)
            opt.step()
            assert p["bytes"]["optimizer_state"] == optim.optimizer_state_bytes(opt), (name, rank)
            assert p["trainable_params"] == sum(q.numel() for q in model.parameters() if q.requires_grad)


def test_plan_muon_halves_adamw_state_and_fsdp_shards(llama7b):
    """Full FT of Llama-2-7B: Muon's state is half AdamW's on the hidden matrices; FSDP2 over 8 divides
    weights, gradients and state by 8; DDP adds its gradient buckets."""
    base = ("--model", llama7b, "--gpu-memory", "80GiB", "--micro-batch-size", 1, "--seq-len", 512)
    adamw = plan(*base, "--optim", "adamw", "--world-size", 8)
    muon = plan(*base, "--optim", "muon", "--world-size", 8)
    fsdp = plan(*base, "--optim", "muon", "--world-size", 8, "--set", "train.strategy=fsdp")
    n, hidden = adamw["params"], muon["muon_params"]
    assert adamw["bytes"]["optimizer_state"] == 8 * n + 4 * 291  # two fp32 moments (+ a step counter) each
    assert muon["bytes"]["optimizer_state"] == adamw["bytes"]["optimizer_state"] - 4 * hidden - 4 * 224
    assert muon["bytes"]["ddp_buckets"] == muon["bytes"]["gradients"] == 4 * n
    for key in ("weights", "gradients"):
        assert fsdp["bytes"][key] == pytest.approx(muon["bytes"][key] / 8, rel=1e-6)
    assert fsdp["bytes"]["optimizer_state"] == pytest.approx(muon["bytes"]["optimizer_state"] / 8, rel=1e-6)
    assert fsdp["bytes"]["ddp_buckets"] == 0 and fsdp["bytes"]["fsdp_gather"] > 0
    assert fsdp["fits"] and not muon["fits"]  # 7B full FT: ~95 GiB per GPU under DDP, ~20 GiB under FSDP2


def test_plan_base_dtypes_and_4bit(llama7b):
    args = ("--model", llama7b, "--lora-rank", 8, "--gpu-memory", "24GiB")
    w = {d: plan(*args, "--set", f"model.base_dtype={d}")["bytes"]["weights"] for d in ("fp32", "bf16", "fp16")}
    nf4 = plan(*args, "--set", "model.load_in_4bit=true")
    assert w["fp32"] == 4 * (6_738_415_616 + 19_988_480) and w["bf16"] == w["fp16"] < w["fp32"] / 1.9
    assert nf4["base_dtype"] == "nf4" and 3.5e9 < nf4["bytes"]["weights"] < 0.3 * w["fp32"]
    assert nf4["fits"]


def test_plan_fit_and_largest_micro_batch(llama7b):
    args = ("--model", llama7b, "--lora-rank", 8, "--gpu-memory", "24GiB", "--seq-len", 1024,
            "--batch-size", 64)
    p = plan(*args, "--micro-batch-size", 1)
    m = p["max_micro_batch"]
    assert m >= 1
    at, over = plan(*args, "--micro-batch-size", m), plan(*args, "--micro-batch-size", m + 1)
    assert at["fits"] and at["bytes"]["total"] <= 24 * 2**30 < over["bytes"]["total"] and not over["fits"]
    ckpt = plan(*args, "--micro-batch-size", m, "--gradient-checkpointing")
    assert ckpt["bytes"]["activations"] < at["bytes"]["activations"] / 4 and ckpt["max_micro_batch"] > 4 * m


def test_plan_without_gpu_judges_no_fit(tiny_model_dir):
    p = plan("--model", tiny_model_dir, "--device", "cpu")
    if not torch.cuda.is_available():
        assert p["fits"] is None and p["max_micro_batch"] is None and p["base_dtype"] == "fp32"


def test_pretrain_plan_writes_nothing(tmp_path):
    out = tmp_path / "pre"
    r = runner.invoke(app, ["pretrain", "--plan", "--json", "--preset", "tiny", "--out", str(out),
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert not out.exists() and p["mode"] == "pretrain" and p["params"] == p["trainable_params"] > 1e6


def test_plan_bad_input(tmp_path, tiny_model_dir):
    empty = tmp_path / "no-config"
    empty.mkdir()
    for args, needle in (
        (["--model", empty], "no config.json"),
        (["--model", tmp_path / "absent"], "does not exist"),
        (["--model", "builtin:smollm2"], "no config.json"),
        (["--model", tiny_model_dir, "--set", "model.load_in_4bit=true"], "--lora-rank"),
        (["--model", tiny_model_dir, "--set", "model.base_dtype=bf16"], "fp32 master weights"),
        (["--model", tiny_model_dir, "--gpu-memory", "lots"], "--gpu-memory"),
        (["--model", tiny_model_dir, "--world-size", 0], "--world-size"),
    ):
        r = runner.invoke(app, ["finetune", "--plan", *[str(a) for a in args]])
        one_line_error(r, needle)
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--world-size", "2"])
    one_line_error(r, "--plan")
    r = runner.invoke(app, ["pretrain", "--plan", "--model-config", str(tmp_path / "absent.json")])
    one_line_error(r, "does not exist")
    assert sorted(os.listdir(empty)) == []


# ----------------------------------------------------------------------------------- against measurement

MEASURED_MODEL = {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 32000,
                  "max_position_embeddings": 256, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
MEASURED_RUNS = {  # ~58 M parameters: full fine-tuning with AdamW, LoRA-Muon, LoRA-Muon on a bf16 base
    "full-adamw": ["optimizer.name=adamw", "train.micro_batch_size=4", "data.seq_len=64"],
    "lora-muon": ["optimizer.name=muon", "lora.rank=8", "train.micro_batch_size=4", "data.seq_len=64"],
    "lora-muon-bf16": ["optimizer.name=muon", "lora.rank=8", "train.micro_batch_size=4", "data.seq_len=64",
                       "model.base_dtype=bf16"],
}
CUDA_RUNS = {
    "full-adamw-bf16-autocast": ["optimizer.name=adamw", "model.dtype=bf16", "train.micro_batch_size=4",
                                 "data.seq_len=256"],
    "lora-muon-bf16-base": ["optimizer.name=muon", "lora.rank=8", "model.base_dtype=bf16",
                            "train.micro_batch_size=8", "data.seq_len=256"],
}


def _measure_and_compare(tmp_path: Path, runs: dict[str, list[str]], device: str) -> None:
    d = tmp_path / "m58"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(MEASURED_MODEL))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536",
           "MALLOC_TRIM_THRESHOLD_": "0"}
    procs = {name: subprocess.Popen([sys.executable, str(REPO / "tests" / "_helpers_memory.py"), str(d),
                                     json.dumps(sets), "2", device], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, sets in runs.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        measured = json.loads(stdout.strip().splitlines()[-1])["measured"]
        sets = [a for s in runs[name] for a in ("--set", s)]
        planned = plan("--model", d, "--device", device, *sets)["bytes"]["total"]
        assert abs(planned / measured - 1) <= 0.15, (name, planned, measured)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_plan_total_within_15_percent_of_measured_peak_rss(tmp_path):
    """Peak RSS over two training steps (minus the RSS after imports) in a fresh process per run, against the
    plan of the same run. glibc's malloc gets a fixed mmap threshold in those processes: its default, dynamic
    one keeps freed activation blocks in the heap and makes RSS grow step by step, an allocator effect the
    plan (like torch.cuda.max_memory_allocated on a GPU) does not model."""
    _measure_and_compare(tmp_path, MEASURED_RUNS, "cpu")


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_plan_total_within_15_percent_of_cuda_max_memory_allocated(tmp_path):
    """On a GPU: torch.cuda.max_memory_allocated over two steps against the plan (bf16 autocast over fp32
    weights; LoRA on a bf16 base)."""
    _measure_and_compare(tmp_path, CUDA_RUNS, "cuda")

"""Half-precision and 4-bit frozen bases of LoRA runs (issue 12.1): `--base-dtype` and `--load-in-4bit`.

A bf16 base is loaded as bf16 (never fp32 first) while the LoRA weights and their optimizer state stay fp32; the
loss follows the fp32-base run; resume stays bit-exact; `--merge` merges in fp32 and saves in the checkpoint's own
dtype (checked against peft's own merge); the adapter loads with plain peft on a base in any dtype; bad input is
one line, exit 2, with nothing written.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _helpers_models import save_tiny, tiny_llama
from _helpers_train import FAST, one_line_error, read_metrics
from muonft_cli import config as cfgmod
from muonft_cli.cli import app
from muonft_cli.train import build

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory) -> Path:
    """The tiny Llama (seed 0) saved in bf16, as a bf16 hub checkpoint would be."""
    return save_tiny(tiny_llama(0).to(torch.bfloat16), tmp_path_factory.mktemp("bf16") / "model")


def _finetune(model: Path, out: Path, corpus: Path, *extra, steps: int = 4):
    return invoke("finetune", "--model", model, "--data", corpus, "--out", out, "--steps", steps, "--lora-rank", 4,
                  "--optim", "muon", "--lr", "3e-3", *FAST, *extra)


def _cfg(model: Path, out: Path, corpus: Path, **flags):
    return cfgmod.resolve(None, {"model.name_or_path": str(model), "data.path": str(corpus), "output.dir": str(out),
                                 "data.seq_len": 16, "train.batch_size": 4, "train.micro_batch_size": 2,
                                 "train.steps": 2, "lora.rank": 4, "optimizer.name": "muon", **flags})


def test_bf16_base_is_loaded_bf16_and_lora_and_optimizer_state_stay_fp32(bf16_model, corpus, tmp_path):
    cfg = _cfg(bf16_model, tmp_path / "x", corpus, **{"model.base_dtype": "bf16"})
    built = build.build_model_and_data(cfg, "finetune", tmp_path / "x", False, torch.device("cpu"))
    frozen = {p.dtype for p in built.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in built.model.parameters() if p.requires_grad}
    assert built.base_dtype == "bf16" and frozen == {torch.bfloat16} and trainable == {torch.float32}
    # the same checkpoint with the CPU default (auto = fp32) is fp32 throughout
    auto = build.build_model_and_data(_cfg(bf16_model, tmp_path / "y", corpus), "finetune", tmp_path / "y", False,
                                      torch.device("cpu"))
    assert auto.base_dtype == "fp32" and {p.dtype for p in auto.model.parameters()} == {torch.float32}

    out = tmp_path / "run"
    r = _finetune(bf16_model, out, corpus, "--base-dtype", "bf16", "--save-every", 2, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["base_dtype"] == "bf16"
    assert json.loads((out / "env.json").read_text())["base_dtype"] == "bf16"
    prov = json.loads((out / "final" / "muonft.json").read_text())
    assert prov["base_dtype"] == "bf16" and prov["base_checkpoint_dtype"] == "bf16"
    state = torch.load(out / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)["state"]
    buffers = [v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.is_floating_point()
               and v.ndim > 0]
    assert buffers and {v.dtype for v in buffers} == {torch.float32}  # Muon momenta / Adam moments in fp32
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(out / "final" / "adapter_model.safetensors")).values()} == {torch.float32}


def test_bf16_base_follows_the_fp32_base_loss(bf16_model, corpus, tmp_path):
    runs = {}
    for dtype in ("fp32", "bf16"):
        r = _finetune(bf16_model, tmp_path / dtype, corpus, "--base-dtype", dtype, steps=5)
        assert r.exit_code == 0, r.output
        runs[dtype] = [m["loss"] for m in read_metrics(tmp_path / dtype)]
    assert runs["fp32"] != runs["bf16"]  # the bf16 base really computed in bf16
    for a, b in zip(runs["fp32"], runs["bf16"]):
        assert b == pytest.approx(a, rel=2e-2)


@pytest.mark.parametrize("source", ["bf16", "fp32"])
def test_merge_is_peft_merge_in_fp32_saved_in_the_checkpoints_own_dtype(bf16_model, tiny_model_dir, corpus, tmp_path,
                                                                        source):
    """Trained on a bf16 base, `--merge` equals peft's own merge of the saved adapter onto the fp32-loaded original
    checkpoint, cast to that checkpoint's dtype (bf16 stays bf16, fp32 stays fp32)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = bf16_model if source == "bf16" else tiny_model_dir
    want = {"bf16": torch.bfloat16, "fp32": torch.float32}[source]
    out = tmp_path / "run"
    r = _finetune(model, out, corpus, "--base-dtype", "bf16", "--merge", "--lora-variant", "dora")
    assert r.exit_code == 0, r.output
    merged = load_file(str(out / "final" / "merged" / "model.safetensors"))
    assert {v.dtype for v in merged.values()} == {want}
    cfg = json.loads((out / "final" / "merged" / "config.json").read_text())
    assert cfg["dtype"] == str(want).removeprefix("torch.")
    assert json.loads((out / "final" / "merged" / "muonft.json").read_text())["dtype"] == source

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(out / "final")).merge_and_unload().state_dict()
    assert set(merged) <= set(reference)
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k].to(want), rtol=0, atol=0, msg=k)
    changed = [k for k in merged if "proj" in k and not torch.equal(merged[k], load_file(
        str(model / "model.safetensors"))[k])]
    assert changed  # the adapter did move the merged weights


def test_the_adapter_loads_with_plain_peft_on_a_base_in_any_dtype(bf16_model, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _finetune(bf16_model, out, corpus, "--base-dtype", "bf16").exit_code == 0
    ids = torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = AutoModelForCausalLM.from_pretrained(str(bf16_model), dtype=dtype)
        peft_model = PeftModel.from_pretrained(base, str(out / "final")).eval()
        assert {p.dtype for n, p in peft_model.named_parameters() if "lora_" in n} == {torch.float32}
        with torch.no_grad():
            logits[dtype] = peft_model(input_ids=ids).logits.float()
    for dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(logits[dtype], logits[torch.float32], rtol=0.05, atol=0.05)


def test_auto_on_resume_keeps_the_dtype_the_run_started_with(tiny_model_dir, corpus, tmp_path):
    """`base_dtype: auto` is resolved by device; a resumed run keeps the base dtype it recorded in env.json, and a
    run from before the setting (no key) resumes on the fp32 base it had."""
    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(tiny_model_dir, out, corpus)
    cpu = torch.device("cpu")
    assert build.base_dtype_for(cfg, "finetune", out, True, cpu) == "fp32"  # no env.json: the device decides
    (out / "env.json").write_text(json.dumps({"device": "cuda:0", "base_dtype": "bf16"}))
    assert build.base_dtype_for(cfg, "finetune", out, True, cpu) == "bf16"
    assert build.base_dtype_for(cfg, "finetune", out, False, cpu) == "fp32"
    (out / "env.json").write_text(json.dumps({"device": "cuda:0"}))  # written by an older muonft
    assert build.base_dtype_for(cfg, "finetune", out, True, torch.device("cuda", 0)) == "fp32"
    assert build.base_dtype_for(_cfg(tiny_model_dir, out, corpus, **{"model.base_dtype": "fp16"}), "finetune", out,
                                True, cpu) == "fp16"  # an explicit setting is what it says


@pytest.mark.parametrize("args,needles", [
    (["--base-dtype", "bf16"], ["--base-dtype bf16", "full fine-tuning", "--lora-rank"]),
    (["--base-dtype", "fp16"], ["--base-dtype fp16", "full fine-tuning", "--lora-rank"]),
    (["--load-in-4bit"], ["--load-in-4bit", "full fine-tuning", "--lora-rank"]),
    (["--lora-rank", "4", "--load-in-4bit", "--device", "cpu"], ["--load-in-4bit", "CUDA", "--base-dtype bf16"]),
    (["--lora-rank", "4", "--load-in-4bit", "--merge"], ["--merge", "4-bit", "merge_and_unload"]),
    (["--lora-rank", "4", "--base-dtype", "fp8"], ["model.base_dtype", "fp8", "auto, fp32, bf16, fp16"]),
])
def test_bad_base_dtype_input_is_one_line_and_writes_nothing(tiny_model_dir, corpus, tmp_path, args, needles):
    out = tmp_path / "deep" / "out"
    r = invoke("finetune", "--model", tiny_model_dir, "--data", corpus, "--out", out, "--steps", 2, *FAST, *args)
    one_line_error(r, *needles)
    assert not (tmp_path / "deep").exists()


def test_4bit_without_bitsandbytes_names_the_extra(tiny_model_dir, corpus, tmp_path, monkeypatch):
    """On a CUDA machine without bitsandbytes: one line naming `pip install 'muonft[qlora]'`, nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        real(name, *a))
    out = tmp_path / "out"
    r = invoke("finetune", "--model", tiny_model_dir, "--data", corpus, "--out", out, "--steps", 2, "--lora-rank", 4,
               "--load-in-4bit", *FAST)
    one_line_error(r, "bitsandbytes", "pip install 'muonft[qlora]'")
    assert not out.exists()


def test_pretrain_refuses_a_half_precision_base(tmp_path, corpus):
    out = tmp_path / "out"
    r = invoke("pretrain", "--preset", "tiny", "--data", corpus, "--out", out, "--steps", 2, "--set",
               "model.base_dtype=bf16", *FAST)
    one_line_error(r, "--base-dtype bf16", "pretrain")
    assert not out.exists()


def test_base_dtype_is_in_finetune_help():
    from test_cli_help import default, options

    opts = options("finetune")
    assert "bf16 on CUDA, fp32 on CPU" in opts["--base-dtype"] and default(opts["--base-dtype"]) == "auto"
    assert "muonft[qlora]" in opts["--load-in-4bit"]


@pytest.mark.slow
def test_gguf_base_is_dequantised_straight_to_bf16(real_model):
    from muonft_cli import models

    path = real_model("smollm2-gguf")
    mcfg = cfgmod.ModelConfig(name_or_path=str(path))
    model, _ = models.load_model(mcfg, "cpu", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert models.loaded_dtypes(model) == ("bf16", None)


def test_4bit_on_a_gguf_base_says_what_to_pass(real_model):
    from muonft_cli import models
    from muonft_cli.errors import UserInputError

    mcfg = cfgmod.ModelConfig(name_or_path=str(real_model("smollm2-gguf")))
    with pytest.raises(UserInputError, match="GGUF file: drop --load-in-4bit") as e:
        models.load_model(mcfg, "cpu", dtype="bf16", load_in_4bit=True)
    assert "\n" not in str(e.value)


def test_host_allocator_returns_freed_tensors_to_the_os():
    """glibc's adaptive mmap threshold keeps freed mid-sized tensors resident; muonft fixes it at 4 MiB, so
    freeing 240 MiB of 8 MiB tensors (after a larger free that would have raised the threshold) gives it back
    to the OS. Run in children: the setting is process-wide and one-way."""
    import subprocess
    import sys

    code = """
import os, torch
from muonft_cli.models.device import limit_host_allocator_retention
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
limited = {limit}
if limited: assert not limit_host_allocator_retention(1000) and limit_host_allocator_retention(10**9)
big = torch.ones(4 << 20); del big          # a 16 MiB free: glibc would raise its threshold to 16 MiB
before = rss()
ts, keep = [], []
for _ in range(30):                         # 30 x 8 MiB, each followed by a 256 KiB tensor that stays (large
    ts.append(torch.ones(2 << 20)); keep.append(torch.ones(1 << 16))  # enough not to fit a hole from the imports)
del ts                                      # from the heap, the holes between the kept ones stay resident
print((rss() - before) / 2**20)
"""
    import os as _os
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc tunables are Linux-only")
    env = {k: v for k, v in _os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "LD_PRELOAD")}
    kept = {}
    for limit in (False, True):
        out = subprocess.run([sys.executable, "-c", code.replace("{limit}", str(limit))], capture_output=True,
                             text=True, env=env, check=True).stdout
        kept[limit] = float(out.strip().splitlines()[-1])
    assert kept[True] < 20, kept     # freed at once
    assert kept[False] > 100, kept   # the default keeps them: the test can tell the two apart


def test_cpu_lora_on_a_bf16_base_keeps_bf16_inputs_with_the_same_values_and_gradients(bf16_model, corpus, tmp_path):
    """On CPU a bf16 base's LoRA A matrices take the bf16 activations and upcast inside their product
    (`keep_adapter_inputs_in_base_dtype`): loss and every LoRA gradient equal peft's own path (which keeps an
    fp32 copy of each adapted layer's input), the adapter's state_dict is unchanged, and the step keeps fewer
    bytes for the backward pass."""
    from peft import get_peft_model_state_dict

    from muonft_cli import models

    cfg = _cfg(bf16_model, tmp_path / "x", corpus, **{"model.base_dtype": "bf16"})
    built = build.build_model_and_data(cfg, "finetune", tmp_path / "x", False, torch.device("cpu"))
    patched = built.model
    assert any(type(m).__name__ == "_UpcastInputLinear" for m in patched.modules())
    stock, _ = models.load_model(cfg.model, torch.device("cpu"), dtype="bf16")
    stock = models.apply_lora(stock, cfg.lora)
    stock.load_state_dict(patched.state_dict())
    assert get_peft_model_state_dict(stock).keys() == get_peft_model_state_dict(patched).keys()
    batch = built.splits.train.input_ids[:2]

    def step(model):
        saved = []

        def pack(t):
            saved.append(t.untyped_storage().nbytes() if t.device.type != "meta" else 0)
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, sum(saved)

    (l1, g1, b1), (l2, g2, b2) = step(stock), step(patched)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and all(g2[n].dtype == torch.float32 for n in g2)
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], rtol=1e-6, atol=1e-7, msg=n)
    assert b2 < b1, (b1, b2)

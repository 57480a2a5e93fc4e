"""Measured peak memory of a few training steps on CPU, for checking `--plan` (tests/test_plan_memory.py).

Run as a script in a fresh process: `python _helpers_memory.py MODEL_DIR '<json of --set overrides>' STEPS [cuda]`.
It imports everything first and reads the resident set size (the baseline), builds the model from MODEL_DIR's
config.json with random fp32 weights, attaches the run's LoRA and builds the run's optimizer with muonft's own
code, resets the kernel's peak-RSS mark (`/proc/self/clear_refs` "5", so the model's initialisation does not
count), runs STEPS optimizer steps the way `train.loop.Trainer.train_step` does (forward without cache, Σ NLL,
backward, clip, step, zero_grad(set_to_none)) on random tokens, and prints one JSON line: `baseline`, `peak`
(VmHWM) and `measured` = peak − baseline, in bytes. With `cuda`: the same on the GPU, `measured` =
`torch.cuda.max_memory_allocated()` since the model was built (bf16 autocast as the engine runs it).
"""

from __future__ import annotations

import gc
import json
import sys


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def main(model_dir: str, sets: list[str], steps: int, device: str = "cpu") -> dict:
    import peft  # noqa: F401  (imported lazily by transformers otherwise: ~130 MB that would count as training)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from muonft_cli import config as cfgmod
    from muonft_cli import optim
    from muonft_cli.models.lora import apply_lora
    from muonft_cli.train.batching import token_nll_sum

    torch.set_num_threads(1)
    cfg = cfgmod.resolve(None, {"model.name_or_path": model_dir}, sets)
    gc.collect()
    baseline = _status("VmRSS")
    torch.manual_seed(0)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.model.base_dtype)
    dtype = half if half is not None and cfg.lora.rank is not None else torch.float32  # a LoRA base, loaded so
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    model.config.use_cache = False
    if cfg.lora.rank is not None:
        model = apply_lora(model, cfg.lora)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    model.to(device)
    opt = optim.build_optimizer(model, cfg.optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    b, t, v = cfg.train.micro_batch_size, cfg.data.seq_len, model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(4, v, (b, t), generator=gen).to(device) for _ in range(steps)]
    mask = torch.ones(b, t, dtype=torch.long, device=device)
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS to the current RSS
            f.write("5")
    from muonft_cli.models import device as device_mod

    amp = device_mod.autocast_dtype(cfg.model, torch.device(device))
    if device == "cuda" and amp is None and cfg.lora.rank is not None and dtype != torch.float32:
        amp = torch.bfloat16  # a half-precision base computes under autocast on CUDA
    for ids in batches:
        with device_mod.autocast(torch.device(device), amp):
            outputs = model(input_ids=ids, attention_mask=mask, use_cache=False)
        nll = token_nll_sum(outputs.logits, ids)
        (nll / ids.numel()).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        del outputs, nll
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"baseline": 0, "peak": peak, "measured": peak}
    peak = _status("VmHWM")
    return {"baseline": baseline, "peak": peak, "measured": peak - baseline}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5])))

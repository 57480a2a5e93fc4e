"""Fine-tuning throughput of muonft's engine vs a plain HF `Trainer` + peft script, and Muon vs AdamW cost.

Measures, in one run, on one model — `--model toy` (default: a small Llama built from a config, tokenizer trained
on the data) or `--model smollm2` (the real SmolLM2-135M, `builtin:smollm2` dequantised to fp32 and saved once as
an HF folder that both sides load) — and the same packed `builtin:kjv` sequences, batch and sequence length:

1. tokens/s of `muonft finetune` (LoRA-AdamW, the engine `train.run`) vs `transformers.Trainer` + `peft`
   (LoRA, torch AdamW) — target: muonft >= 1.0x Trainer;
2. step time of LoRA-Muon / LoRA-AdamW in muonft — target <= 1.05x (the paper measured 1.1-1.2x, §4.7);
3. peak RSS of full fine-tuning with Muon vs AdamW (Muon keeps one state buffer per matrix, Adam two), each
   in its own `muonft finetune` subprocess (toy: a wider toy model, `--rss-hidden`; smollm2: SmolLM2 itself).

Per-step times exclude set-up and evaluation (median over the steps after `--warmup` steps); the three
training runs are interleaved and repeated `--repeats` times (rotating the order) so drift in machine load
hits all of them alike; the reported ratio is the median of the per-repeat ratios.

Run: `python bench/finetune_throughput.py [--model toy|smollm2] [--repeats 3] [--steps N]`; writes the model's
entry of `bench/results/finetune_throughput.json` (`{"toy": {...}, "smollm2": {...}}`). On a shared, loaded
machine run it with `OMP_NUM_THREADS=1`: two OpenMP threads spinning against a dozen other processes made a
SmolLM2 step ~25x slower here (132 s vs 4.9 s at 128 tokens), which swamps what is compared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from muonft_cli import config as cfgmod  # noqa: E402
from muonft_cli import train  # noqa: E402

DATA = "builtin:kjv"


def build_assets(work: Path, hidden: int, layers: int, vocab: int, max_docs: int) -> Path:
    """Save a random Llama (fp32) and a BPE tokenizer trained on the data into `work/model`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from muonft_cli import data as data_mod
    from muonft_cli.data import tokenizer as tok_mod

    dcfg = cfgmod.DataConfig(path=DATA, max_documents=max_docs)
    tok = tok_mod.train_bpe(data_mod.iter_texts(dcfg), vocab)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), max_position_embeddings=1024,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    d = work / "model"
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def smollm2_assets(work: Path) -> Path:
    """builtin:smollm2 loaded as muonft loads it (GGUF dequantised to fp32) and saved as an HF folder, so that
    muonft and the Trainer start from the same weights and tokenizer."""
    from muonft_cli.models.load import load_model

    d = work / "smollm2"
    if not (d / "config.json").is_file():
        model, tok = load_model(cfgmod.ModelConfig(name_or_path="builtin:smollm2"))
        model.save_pretrained(d)
        tok.save_pretrained(d)
        del model
    return d


def run_config(model: Path, out: Path, args: argparse.Namespace, optim: str, lora: bool) -> cfgmod.RunConfig:
    flags = {"model.name_or_path": str(model), "data.path": DATA, "data.seq_len": args.seq_len,
             "data.max_documents": args.max_docs, "train.batch_size": args.batch, "train.micro_batch_size": args.batch,
             "train.steps": args.steps, "train.eval_every": 0, "eval.max_batches": 1, "optimizer.name": optim,
             "optimizer.lr": 1e-3, "output.dir": str(out), "output.overwrite": True}
    if lora:
        flags["lora.rank"] = args.rank
    return cfgmod.resolve(None, flags)


def muonft_step_times(model: Path, work: Path, args: argparse.Namespace, optim: str) -> list[float]:
    """Per-step seconds of the muonft engine (LoRA), from metrics.jsonl (tokens / tokens_per_s)."""
    out = work / f"muonft-{optim}"
    train.run(run_config(model, out, args, optim, lora=True), "finetune")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step_tokens = args.batch * args.seq_len
    return [per_step_tokens / r["tokens_per_s"] for r in recs][args.warmup:]


def trainer_step_times(model: Path, work: Path, args: argparse.Namespace) -> list[float]:
    """Per-step seconds of a plain `transformers.Trainer` + peft LoRA (torch AdamW) on the same sequences."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from muonft_cli import data as data_mod

    tok = AutoTokenizer.from_pretrained(model)
    dcfg = cfgmod.DataConfig(path=DATA, seq_len=args.seq_len, max_documents=args.max_docs)
    ds = data_mod.build_splits(dcfg, tok, seed=0).train
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(model)
    m = get_peft_model(m, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear",
                                     task_type="CAUSAL_LM"))
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(
        output_dir=str(work / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=max(1, round(0.03 * args.steps)),
        max_grad_norm=1.0,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), seed=0)
    Trainer(model=m, args=targs, train_dataset=ds, callbacks=[Clock()]).train()
    return times[args.warmup:]


def peak_rss_mb(model: Path, work: Path, args: argparse.Namespace, optim: str) -> float:
    """Peak RSS (MiB) of a `muonft finetune` full fine-tuning subprocess."""
    out = work / f"rss-{optim}"
    cmd = [sys.executable, "-m", "muonft_cli", "finetune", "--model", str(model), "--data", DATA,
           "--optim", optim, "--steps", "3", "--seq-len", str(args.seq_len), "--batch-size", str(args.batch),
           "--set", f"data.max_documents={args.max_docs}", "--set", "eval.max_batches=1", "--eval-every", "0",
           "--out", str(out), "--overwrite", "--quiet"]
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"peak-RSS run for {optim} failed (status {status})")
    return usage.ru_maxrss / 1024  # Linux: KiB


#: per-model defaults of the run-length and shape flags (smollm2: short runs, the 2 shared cores are slow)
DEFAULTS = {"toy": {"steps": 30, "warmup": 5, "batch": 8, "seq_len": 256, "max_docs": 150},
            "smollm2": {"steps": 8, "warmup": 2, "batch": 2, "seq_len": 128, "max_docs": 40}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(DEFAULTS), default="toy")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--hidden", type=int, default=256, help="toy model width")
    ap.add_argument("--layers", type=int, default=4, help="toy model depth")
    ap.add_argument("--vocab", type=int, default=4096, help="toy model BPE vocabulary")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-docs", type=int)
    ap.add_argument("--rss-hidden", type=int, default=768, help="toy: model width for the peak-RSS runs")
    ap.add_argument("--work", help="scratch folder for models and runs (default: a temporary one, removed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "finetune_throughput.json"))
    args = ap.parse_args()
    for k, v in DEFAULTS[args.model].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()[0]  # recorded: on a shared machine the ratios are noisier
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="muonft-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        if args.model == "smollm2":
            model = smollm2_assets(Path(args.work) if args.work else work)
        else:
            model = build_assets(work, args.hidden, args.layers, args.vocab, args.max_docs)
        kinds = {"trainer": lambda: trainer_step_times(model, work, args),
                 "muonft-adamw": lambda: muonft_step_times(model, work, args, "adamw"),
                 "muonft-muon": lambda: muonft_step_times(model, work, args, "muon")}
        medians: dict[str, list[float]] = {k: [] for k in kinds}
        order = list(kinds)
        for r in range(args.repeats):
            for k in order[r % len(order):] + order[:r % len(order)]:
                t = statistics.median(kinds[k]())
                medians[k].append(t)
                print(f"repeat {r + 1}: {k:13s} {t * 1e3:8.1f} ms/step", file=sys.stderr, flush=True)
        tokens = args.batch * args.seq_len
        speedup = [t / m for t, m in zip(medians["trainer"], medians["muonft-adamw"])]
        muon_ratio = [m / a for m, a in zip(medians["muonft-muon"], medians["muonft-adamw"])]
        big = model if args.model == "smollm2" else build_assets(work / "big", args.rss_hidden, args.layers,
                                                                  args.vocab, args.max_docs)
        rss = {o: peak_rss_mb(big, work, args, o) for o in ("adamw", "muon")}
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(big)
                       .parameters())
    result = {
        "command": "python bench/finetune_throughput.py " + " ".join(sys.argv[1:]),
        "model": "builtin:smollm2 (SmolLM2-135M-Instruct, dequantised to fp32)" if args.model == "smollm2" else
                 f"random Llama, hidden {args.hidden} x {args.layers} layers",
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_1min": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
        "tokens_per_step": tokens,
        "ms_per_step_median": {k: [round(v * 1e3, 2) for v in vs] for k, vs in medians.items()},
        "tokens_per_s": {k: round(tokens / statistics.median(vs), 1) for k, vs in medians.items()},
        "muonft_vs_trainer_tokens_per_s": round(statistics.median(speedup), 3),
        "lora_muon_over_lora_adamw_step_time": round(statistics.median(muon_ratio), 3),
        "per_repeat": {"muonft_vs_trainer_tokens_per_s": [round(x, 3) for x in speedup],
                       "lora_muon_over_lora_adamw_step_time": [round(x, 3) for x in muon_ratio]},
        "full_ft_peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "full_ft_rss_params": n_params,
        "full_ft_peak_rss_muon_over_adamw": round(rss["muon"] / rss["adamw"], 3),
        "targets": {"muonft_vs_trainer_tokens_per_s": ">= 1.0", "lora_muon_over_lora_adamw_step_time": "<= 1.05"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        results = json.loads(out.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        results = {}
    if "command" in results:  # the earlier one-run layout: that was the toy model's run
        results = {"toy": results}
    results[args.model] = result
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"muonft / Trainer tokens/s: {result['muonft_vs_trainer_tokens_per_s']:.3f}x (target >= 1.0)")
    print(f"LoRA-Muon / LoRA-AdamW step time: {result['lora_muon_over_lora_adamw_step_time']:.3f}x (target <= 1.05)")
    print(f"full FT peak RSS ({n_params / 1e6:.1f} M params): Muon {rss['muon']:.0f} MiB, AdamW {rss['adamw']:.0f} MiB "
          f"({result['full_ft_peak_rss_muon_over_adamw']:.3f}x)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

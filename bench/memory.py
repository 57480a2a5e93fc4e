"""Memory benchmarks: what a run's peak memory is, case by case (issue 12).

Each case is named; `--case NAME` (repeatable) runs only those, and every case writes its own key into
`bench/results/memory.json` (the other keys are kept, so cases run at different times add up).

CPU cases:

- `lora-bf16-base-llama0.4b`: LoRA-Muon (r=8, every linear layer) on a ~0.4 B-parameter Llama (random weights
  from a config, saved bf16 on disk under the work folder, deleted after) with `--base-dtype bf16` vs `fp32`:
  peak RSS of each `muonft finetune` run in its own subprocess (`ru_maxrss` of the child from `os.wait4`),
  target <= 0.65x; the per-step losses compared.
- `lora-bf16-base-llama0.4b-ckpt`: the same with `--gradient-checkpointing` on both sides (the setting a
  memory-bound run uses: the stored activations, which a half-precision base does not halve, mostly go).
- `lora-bf16-base-smollm2`: the same on the real SmolLM2-135M (`builtin:smollm2`, a Q4_1 GGUF dequantised
  straight to the base dtype).

The two dtypes alternate inside one invocation (`--repeats` rounds, the order swapped each round) so load on a
shared machine hits both alike; the ratio reported is the median of the per-round ratios, with its spread.

Run: `python bench/memory.py [--case NAME] [--repeats 2] [--steps 3] [--work DIR]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "memory.json"
DATA = "builtin:shakespeare"


def llama_04b(work: Path) -> str:
    """A random ~0.4 B-parameter Llama (hidden 1024, 24 layers, SmolLM2's 49 152-token tokenizer, untied head)
    written in bf16 straight from a config (never held in fp32), with the tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(REPO))
    from muonft_cli.models import builtin_model_path, load_tokenizer

    tok = load_tokenizer(str(builtin_model_path("smollm2")))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    d = work / "llama0.4b"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def smollm2(work: Path) -> str:
    return "builtin:smollm2"


#: case name -> (what it measures, how to get its --model, its own CLI arguments)
CASES: dict[str, tuple[str, Callable[[Path], str], list[str]]] = {
    "lora-bf16-base-llama0.4b": ("LoRA-Muon r=8, random 0.4B Llama saved bf16, --base-dtype bf16 vs fp32",
                                 llama_04b, []),
    "lora-bf16-base-llama0.4b-ckpt": ("the same with --gradient-checkpointing on both sides", llama_04b,
                                      ["--gradient-checkpointing"]),
    "lora-bf16-base-smollm2": ("LoRA-Muon r=8, SmolLM2-135M (Q4_1 GGUF), --base-dtype bf16 vs fp32", smollm2, []),
}


def finetune_rss(model: str, out: Path, dtype: str, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One `muonft finetune` LoRA run in its own process: its peak RSS (MiB) and per-step losses."""
    cmd = [sys.executable, "-m", "muonft_cli", "finetune", "--model", model, "--data", DATA, "--lora-rank", "8",
           "--optim", "muon", "--lr", "1e-3", "--steps", str(args.steps), "--seq-len", str(args.seq_len),
           "--batch-size", str(args.batch), "--warmup-ratio", "0", "--eval-every", "0", "--save-every", "0",
           "--set", "eval.max_batches=1", "--set", f"data.max_documents={args.max_docs}",
           "--threads", str(args.threads), "--base-dtype", dtype, "--out", str(out), "--overwrite", "--quiet",
           "--json", *extra]
    p = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE)
    stdout = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0:
        raise SystemExit(f"{dtype} run failed (status {status}): {' '.join(cmd)}")
    summary = json.loads(stdout.decode().strip().splitlines()[-1])
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    shutil.rmtree(out, ignore_errors=True)
    return {"peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "losses": losses, "base_dtype": summary["base_dtype"]}


def cpu_name() -> str:
    """The CPU model (lscpu's name from /proc/cpuinfo), and whether it has native bf16 (avx512_bf16)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    return f"{name}{' (avx512_bf16)' if 'avx512_bf16' in info else ''}"


def _model_in_child(name: str, work: Path) -> str:
    """The case's --model, made in a child process: a child's ru_maxrss starts from its parent's peak (Linux
    folds the pre-exec address space's high-water mark in), so the bench process itself must stay small."""
    if CASES[name][1] is smollm2:
        return smollm2(work)
    out = subprocess.run([sys.executable, __file__, "--make-model", name, "--work", str(work)], check=True,
                         capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def run_case(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    what, model_of, extra = CASES[name]
    model = _model_in_child(name, work)
    rounds = []
    for r in range(args.repeats):
        order = ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")
        got = {d: finetune_rss(model, work / f"out-{d}", d, args, extra) for d in order}
        rounds.append(got)
        print(f"  {name} round {r + 1}: fp32 {got['fp32']['peak_rss_mib']:.0f} MiB, bf16 "
              f"{got['bf16']['peak_rss_mib']:.0f} MiB", flush=True)
    ratios = [g["bf16"]["peak_rss_mib"] / g["fp32"]["peak_rss_mib"] for g in rounds]
    rel = [abs(b - a) / abs(a) for g in rounds for a, b in zip(g["fp32"]["losses"], g["bf16"]["losses"])]
    return {
        "what": what,
        "model": model if model.startswith("builtin:") else "random Llama from a config (saved bf16, deleted after)",
        "settings": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch,
                     "threads": args.threads, "lora_rank": 8, "optim": "muon", "data": DATA},
        "peak_rss_mib": {d: [g[d]["peak_rss_mib"] for g in rounds] for d in ("fp32", "bf16")},
        "rss_ratio_bf16_over_fp32": {"median": round(statistics.median(ratios), 3),
                                     "min": round(min(ratios), 3), "max": round(max(ratios), 3)},
        "target_ratio": 0.65 if "0.4b" in name else None,
        "losses": {d: rounds[0][d]["losses"] for d in ("fp32", "bf16")},
        "loss_max_rel_diff": round(max(rel), 5),
        "base_dtype_recorded": {d: rounds[0][d]["base_dtype"] for d in ("fp32", "bf16")},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="run only this case (repeatable)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--max-docs", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--note", default="shared 2-core machine; other jobs may have been running",
                    help="what to record about the machine's load")
    ap.add_argument("--work", default=None, help="scratch folder for the checkpoint (deleted after)")
    ap.add_argument("--make-model", choices=sorted(CASES), help=argparse.SUPPRESS)  # the child of _model_in_child
    args = ap.parse_args()
    if args.make_model:
        print(CASES[args.make_model][1](Path(args.work)))
        return
    base = Path(args.work) if args.work else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="muonft-memory-", dir=base))
    try:
        for name in args.case or list(CASES):
            print(f"{name}: {CASES[name][0]}", flush=True)
            res = run_case(name, work, args)
            res["machine"] = {"cpu": cpu_name(), "cores": os.cpu_count(), "note": args.note}
            results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}  # other cases' keys stay
            results[name] = res
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(results, indent=2) + "\n")
            print(f"  peak RSS bf16/fp32: {res['rss_ratio_bf16_over_fp32']}; loss max rel diff "
                  f"{res['loss_max_rel_diff']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

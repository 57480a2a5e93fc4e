"""CPU, 2 ranks (gloo): full fine-tuning under `--strategy fsdp` (FSDP2, sharded Muon) vs `--strategy ddp`.

One random Llama built from a config (no download), the same data, batch and steps for both; each run is a
`torchrun --nproc_per_node 2 -m muonft_cli finetune ...` subprocess, launched through a small wrapper that
records every rank's peak RSS (`ru_maxrss`) at exit. Reported per strategy and optimizer:

- per-rank peak RSS (MiB; includes Python + torch + transformers, ~0.4 GiB, the same for both);
- per-rank parameter / gradient / optimizer-state bytes (the run summary's `local_bytes_per_rank`, measured
  from the tensors' local shards after the first step);
- step time (median of the steps after the first, from `metrics.jsonl`'s tokens / tokens_per_s).

The strategies are interleaved and repeated `--repeats` times (rotating the order) so drift in machine load
hits both alike; ratios are medians of the per-repeat ratios, with their spread.

Run: `python bench/fsdp_memory.py [--repeats 2] [--steps 8] [--optim muon adamw]`; writes
`bench/results/fsdp_memory.json`. Scratch files go to `--scratch` (deleted at the end).
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

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = '''
import atexit, json, os, resource, sys
def _report():
    with open(os.path.join(os.environ["MUONFT_BENCH_RSS"], f"rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}, f)
atexit.register(_report)
from muonft_cli.cli import app
sys.argv = ["muonft", *sys.argv[1:]]
app()
'''


def build_model(d: Path, hidden: int, layers: int, vocab: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=512, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    words = {f"w{i}": i for i in range(vocab)}
    words.update({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(d)
    return d


def write_corpus(d: Path, vocab: int, n_docs: int = 32, words: int = 600) -> Path:
    import random

    rng = random.Random(0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (d / f"doc{i:03d}.txt").write_text(" ".join(f"w{rng.randrange(4, vocab)}" for _ in range(words)) + "\n")
    return d


def one_run(model: Path, data: Path, out: Path, strategy: str, optim: str, steps: int, seq_len: int,
            threads: int) -> dict:
    rss_dir = out.parent / f"{out.name}-rss"
    rss_dir.mkdir(parents=True)
    wrapper = out.parent / "bench_wrapper.py"
    wrapper.write_text(WRAPPER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MUONFT_BENCH_RSS": str(rss_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper),
           "finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--optim", optim,
           "--strategy", strategy, "--steps", str(steps), "--batch-size", "4", "--micro-batch-size", "2",
           "--seq-len", str(seq_len), "--eval-every", "0", "--val-fraction", "0.05", "--save-every", "0",
           "--lr", "3e-4", "--json", "--quiet", "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{strategy}/{optim} failed:\n{r.stderr[-3000:]}")
    summary = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    prev, times = 0, []
    for rec in recs:
        n, prev = rec["tokens"] - prev, rec["tokens"]
        times.append(n / rec["tokens_per_s"] if rec["tokens_per_s"] else float("nan"))
    rss = [json.loads((rss_dir / f"rank{k}.json").read_text())["maxrss_kib"] / 1024 for k in range(2)]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(rss_dir, ignore_errors=True)
    return {"peak_rss_mib": rss, "local_bytes": summary["local_bytes_per_rank"],
            "step_s": statistics.median(times[1:]), "ortho_per_rank": summary["ortho_per_rank"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--optim", nargs="+", default=["muon"])
    ap.add_argument("--scratch", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fsdp_memory.json"))
    a = ap.parse_args()
    scratch = Path(a.scratch or tempfile.mkdtemp(prefix="muonft-fsdp-bench-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        model = build_model(scratch / "model", a.hidden, a.layers, a.vocab)
        data = write_corpus(scratch / "corpus", a.vocab)
        n_params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
            model).parameters())
        results: dict[str, dict[str, list]] = {}
        for rep in range(a.repeats):
            for optim in a.optim:
                order = ["ddp", "fsdp"] if rep % 2 == 0 else ["fsdp", "ddp"]
                for strategy in order:
                    r = one_run(model, data, scratch / f"run-{optim}-{strategy}-{rep}", strategy, optim, a.steps,
                                a.seq_len, a.threads)
                    results.setdefault(f"{optim}/{strategy}", {}).setdefault("runs", []).append(r)
                    print(f"repeat {rep} {optim}/{strategy}: peak RSS {r['peak_rss_mib']} MiB, "
                          f"step {r['step_s']:.3f} s", flush=True)
        summary = {}
        for optim in a.optim:
            d, f = results[f"{optim}/ddp"]["runs"], results[f"{optim}/fsdp"]["runs"]
            rss_ratio = [max(y["peak_rss_mib"]) / max(x["peak_rss_mib"]) for x, y in zip(d, f)]
            step_ratio = [y["step_s"] / x["step_s"] for x, y in zip(d, f)]
            state = {k: [sum(r.values()) for r in runs[0]["local_bytes"]] for k, runs in (("ddp", d), ("fsdp", f))}
            summary[optim] = {
                "peak_rss_mib_per_rank": {"ddp": statistics.median(max(x["peak_rss_mib"]) for x in d),
                                          "fsdp": statistics.median(max(y["peak_rss_mib"]) for y in f)},
                "fsdp_over_ddp_peak_rss": {"median": statistics.median(rss_ratio), "min": min(rss_ratio),
                                           "max": max(rss_ratio)},
                "step_s": {"ddp": statistics.median(x["step_s"] for x in d),
                           "fsdp": statistics.median(y["step_s"] for y in f)},
                "fsdp_over_ddp_step_time": {"median": statistics.median(step_ratio), "min": min(step_ratio),
                                            "max": max(step_ratio)},
                "param_grad_state_bytes_per_rank": state,
                "fsdp_over_ddp_state_bytes": max(state["fsdp"]) / max(state["ddp"]),
                "ortho_per_rank": {"ddp": d[0]["ortho_per_rank"], "fsdp": f[0]["ortho_per_rank"]},
            }
        doc = {"what": "2-rank CPU (gloo) full fine-tuning, --strategy fsdp vs ddp", "n_params": n_params,
               "settings": vars(a) | {"batch_size": 4, "micro_batch_size": 2}, "machine": platform.platform(),
               "cpus": os.cpu_count(), "summary": summary, "raw": results}
        Path(a.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(summary, indent=2))
    finally:
        if not a.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

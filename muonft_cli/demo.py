"""`make demo`: the whole muonft story, offline, on the embedded corpora, in a few minutes on 2 CPU cores.

1. `muonft pretrain` a tiny Llama with Adam on `builtin:shakespeare` (tokenizer trained on it);
2. `muonft diagnose` the result (when the command is installed): does its spectrum say "Adam-pretrained"?
3. `muonft finetune` it on `builtin:kjv` twice, LoRA-Muon and LoRA-Adam (paper §4: under LoRA, Muon is a
   drop-in for Adam with half the optimizer state; the mismatch penalty of Table 1 is small under LoRA);
4. `muonft eval` both: KJV perplexity, forgetting on Shakespeare, weight distance from the base (Table 17),
   LoRA spectra (App. F.2);
5. print one comparison table.

Every stage is the real CLI, run as `python -m muonft_cli ...` subprocesses, so the demo is also an
end-to-end check. Run: `python -m muonft_cli.demo [--out runs/demo] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PRETRAIN_DATA = "builtin:shakespeare"
FINETUNE_DATA = "builtin:kjv"

# Sized for ~5 minutes on 2 cores (tiny preset ≈ 1 M parameters at vocab 2048).
FULL = {"vocab": 2048, "seq_len": 128, "batch": 16, "pretrain_steps": 300, "pretrain_lr": 3e-3,
        "finetune_steps": 80, "lora_rank": 8, "lr_muon": 2e-3, "lr_adam": 2e-3, "eval_batches": 8,
        "max_docs": None}
# A smoke-sized run for tests (seconds, not minutes; numbers mean little).
QUICK = {"vocab": 300, "seq_len": 32, "batch": 4, "pretrain_steps": 4, "pretrain_lr": 3e-3,
         "finetune_steps": 3, "lora_rank": 4, "lr_muon": 2e-3, "lr_adam": 2e-3, "eval_batches": 2,
         "max_docs": 60}


def _cli(args: list[str], capture: bool) -> str:
    """Run `python -m muonft_cli ARGS`; stream stderr (progress) to ours; return stdout when captured."""
    cmd = [sys.executable, "-m", "muonft_cli", *args]
    print("$ muonft " + " ".join(args), file=sys.stderr, flush=True)
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0:
        raise SystemExit(f"demo: `muonft {args[0]}` failed with exit code {p.returncode}")
    print(f"  ({args[0]}: {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return p.stdout or ""


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def run_demo(out: Path, quick: bool = False) -> dict[str, Any]:
    """Run the demo into `out` (replaced) and return the collected numbers.

    Args:
        out: demo directory; holds `pre/`, `ft-lora-muon/`, `ft-lora-adamw/` and `demo.json`.
        quick: tiny settings for a smoke test.

    Returns:
        `{"pretrain": summary, "diagnose": report | None, "finetune": {name: summary}, "eval": {name: report}}`.
    """
    s = QUICK if quick else FULL
    t0 = time.perf_counter()
    common = ["--seq-len", str(s["seq_len"]), "--batch-size", str(s["batch"]), "--json", "--overwrite",
              "--set", f"eval.max_batches={s['eval_batches']}"]
    if s["max_docs"]:
        common += ["--set", f"data.max_documents={s['max_docs']}"]
    pre = out / "pre"
    result: dict[str, Any] = {"settings": s, "finetune": {}, "eval": {}}
    result["pretrain"] = json.loads(_cli(
        ["pretrain", "--preset", "tiny", "--vocab-size", str(s["vocab"]), "--data", PRETRAIN_DATA,
         "--optim", "adamw", "--lr", str(s["pretrain_lr"]), "--steps", str(s["pretrain_steps"]),
         "--eval-every", str(max(1, s["pretrain_steps"] // 3)), "--out", str(pre), *common], capture=True))

    result["diagnose"] = json.loads(_cli(["diagnose", str(pre / "final"), "--json", "--quiet"], capture=True))

    runs = {"LoRA-Muon": ("muon", s["lr_muon"]), "LoRA-Adam": ("adamw", s["lr_adam"])}
    for name, (optim, lr) in runs.items():
        d = out / f"ft-lora-{optim}"
        result["finetune"][name] = json.loads(_cli(
            ["finetune", "--model", str(pre / "final"), "--data", FINETUNE_DATA, "--optim", optim, "--lr", str(lr),
             "--lora-rank", str(s["lora_rank"]), "--steps", str(s["finetune_steps"]),
             "--eval-every", str(max(1, s["finetune_steps"] // 2)), "--out", str(d), *common], capture=True))
        result["eval"][name] = json.loads(_cli(
            ["eval", "--model", str(d / "final"), "--base", str(pre / "final"), "--data", FINETUNE_DATA,
             "--reference-data", PRETRAIN_DATA, "--seq-len", str(s["seq_len"]),
             "--max-batches", str(s["eval_batches"]), "--json"], capture=True))
    result["runtime_s"] = round(time.perf_counter() - t0, 1)
    (out / "demo.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    return result


def render(result: dict[str, Any]) -> None:
    """Print the comparison table (rich) on stdout."""
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con = Console(width=max(con.width, 112))  # the table needs ~110 columns; wrap rather than truncate
    p = result["pretrain"]
    con.print(f"\n[bold]Pretrained[/] tiny Llama with Adam on {PRETRAIN_DATA}: {p['steps']} steps, "
              f"{p['tokens']:,} tokens, val ppl {_fmt(p['val_ppl'])}")
    dg = result.get("diagnose")
    if dg:
        said = (dg.get("provenance") or {}).get("optimizer") or "-"
        why = f"confidence {_fmt(dg['confidence'])}" if dg.get("confidence") is not None else \
            dg.get("unknown_reason") or "no guess"
        con.print(f"[bold]diagnose[/] spectral guess: {dg.get('optimizer_guess')} ({why}); provenance says: {said}"
                  + ("; they disagree, the recommendation follows provenance" if dg.get("spectra_disagree") else ""))
    t = Table(title=f"LoRA fine-tuning on {FINETUNE_DATA} (rank {result['settings']['lora_rank']}, "
                    f"{result['settings']['finetune_steps']} steps)")
    for col in ("", "KJV ppl", "Shakespeare ppl", "forgetting", "‖ΔW‖", "cos dist", "srank(BA)", "s"):
        t.add_column(col, justify="right" if col else "left")
    for name, rep in result["eval"].items():
        d, f = rep.get("data") or {}, rep.get("forgetting") or {}
        dist = (rep.get("distance") or {}).get("hidden") or {}
        spec = ((rep.get("lora_spectra") or {}).get("all") or {}).get("BA") or {}
        change = f.get("ppl_change")
        t.add_row(name,
                  f"{_fmt((d.get('base') or {}).get('ppl'), '.1f')}→{_fmt((d.get('model') or {}).get('ppl'), '.1f')}",
                  f"{_fmt((f.get('base') or {}).get('ppl'), '.1f')}→{_fmt((f.get('model') or {}).get('ppl'), '.1f')}",
                  ("+" if (change or 0) >= 0 else "") + _fmt(change, ".2f"),
                  _fmt(dist.get("l2"), ".3f"), _fmt(dist.get("cosine"), ".1e"), _fmt(spec.get("stable_rank")),
                  _fmt(result["finetune"][name].get("runtime_s"), ".0f"))
    con.print(t)
    con.print("KJV ppl / Shakespeare ppl: base → fine-tuned (validation, token-weighted); forgetting: change of "
              "Shakespeare ppl; ‖ΔW‖, cos dist: distance of the merged hidden weights from the base (paper "
              "Table 17); srank(BA): stable rank of the adapter update (App. F.2); s: training seconds.")
    con.print(f"demo finished in {result['runtime_s']:.0f} s; runs and demo.json are in the demo directory.")


def main(argv: list[str] | None = None) -> None:
    """`python -m muonft_cli.demo`: run the demo and print the comparison."""
    ap = argparse.ArgumentParser(prog="python -m muonft_cli.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo", help="demo directory (replaced; default runs/demo)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test settings (seconds)")
    args = ap.parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    result = run_demo(Path(args.out), quick=args.quick)
    render(result)


if __name__ == "__main__":
    main()

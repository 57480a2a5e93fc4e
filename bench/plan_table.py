"""The README's "Memory plan" table: `muonft finetune --plan` on Llama-2-7B's config.json (docs/configs/).

Every row is one `muonft finetune --model DIR --plan --json ...` call through the real CLI (in-process, Typer's
CliRunner), planned for one micro-batch of 1 × 1024 tokens with bf16 compute, per GPU; the largest micro-batch
columns repeat the plan with `--gpu-memory 24GiB` and `80GiB`. No weights exist or are read: DIR holds only
config.json. Writes bench/results/plan_llama7b.json and prints the markdown table.

    python bench/plan_table.py            # plan every row, write the JSON, print the table
    python bench/plan_table.py --table    # print the table of the JSON already written
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from typer.testing import CliRunner

from muonft_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
ROWS = [  # (label, extra finetune arguments)
    ("LoRA r=8, Muon, fp32 base", ["--lora-rank", "8", "--optim", "muon", "--set", "model.base_dtype=fp32"]),
    ("LoRA r=8, AdamW, bf16 base", ["--lora-rank", "8", "--optim", "adamw", "--set", "model.base_dtype=bf16"]),
    ("LoRA r=8, Muon, bf16 base", ["--lora-rank", "8", "--optim", "muon", "--set", "model.base_dtype=bf16"]),
    ("LoRA r=8, Muon, 4-bit NF4 base", ["--lora-rank", "8", "--optim", "muon", "--set", "model.load_in_4bit=true"]),
    ("full FT, AdamW, DDP × 8", ["--optim", "adamw", "--world-size", "8"]),
    ("full FT, Muon, DDP × 8", ["--optim", "muon", "--world-size", "8"]),
    ("full FT, AdamW, FSDP2 × 8", ["--optim", "adamw", "--world-size", "8", "--set", "train.strategy=fsdp"]),
    ("full FT, Muon, FSDP2 × 8", ["--optim", "muon", "--world-size", "8", "--set", "train.strategy=fsdp"]),
]
COMMON = ["--dtype", "bf16", "--seq-len", "1024", "--micro-batch-size", "1", "--batch-size", "64"]


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def main() -> None:
    runner = CliRunner()
    tmp = Path(tempfile.mkdtemp())
    try:
        shutil.copy(REPO / "docs" / "configs" / "llama-2-7b.json", tmp / "config.json")
        results = []
        for label, extra in ROWS:
            row = {"label": label, "args": extra + COMMON}
            for gpu in ("24GiB", "80GiB"):
                r = runner.invoke(app, ["finetune", "--model", str(tmp), "--plan", "--json", *extra, *COMMON,
                                        "--gpu-memory", gpu])
                assert r.exit_code == 0, r.output
                row[gpu] = json.loads(r.stdout)
            results.append(row)
    finally:
        shutil.rmtree(tmp)
    out = REPO / "bench" / "results" / "plan_llama7b.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    """The markdown table of `main`'s results (binary units: GiB = 2**30)."""
    from muonft_cli.render import human_bytes as hb

    lines = ["| run (per GPU) | weights | gradients (+ DDP buckets) | optimizer state | activations | other¹ "
             "| **total** | fits 24 GiB | largest micro-batch, 24 / 80 GiB |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for row in results:
        p = row["24GiB"]
        b = p["bytes"]
        grads = b["gradients"] + b["ddp_buckets"]
        other = b["total"] - b["weights"] - grads - b["optimizer_state"] - b["activations"]
        lines.append(f"| {row['label']} | {hb(b['weights'])} | {hb(grads)} | {hb(b['optimizer_state'])} | "
                     f"{hb(b['activations'])} | {hb(other)} | **{hb(b['total'])}** | "
                     f"{'yes' if p['fits'] else 'no'} | {p['max_micro_batch']} / {row['80GiB']['max_micro_batch']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--table"]:
        print(table(json.loads((REPO / "bench" / "results" / "plan_llama7b.json").read_text())))
    else:
        main()

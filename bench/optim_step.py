"""Optimizer step time and state size: muonft Muon vs torch.optim.Muon vs torch.optim.AdamW.

Measures, in one run (issue 2 §5):
  1. Llama-2-7B LoRA r=8 adapter shapes on all linear layers (32 layers × q,k,v,o,gate,up,down →
     448 matrices, ~20 M params): muonft Muon (and Muon-PE) vs torch.optim.Muon vs AdamW
     (foreach=True, and fused=True beside it).
  2. Full hidden matrices of a Llama-style model (default hidden 1024, 8 layers; intermediate 2816):
     muonft Muon vs torch.optim.Muon at equal NS accuracy (both NS5 in bf16), plus muonft with its
     default dtype (fp32 on CPUs without native bf16 matmul).
  3. Optimizer state bytes, muonft Muon / AdamW on the LoRA matrices (target 0.5).
Step times are medians over ``--steps`` interleaved steps (each optimizer in turn, order rotated)
after ``--warmup`` steps.  Writes JSON (default ``bench/results/optim_step.json``, or
``optim_step_cuda.json`` with ``--device cuda``) and prints the ratios.

    python bench/optim_step.py                 # CPU
    python bench/optim_step.py --device cuda   # GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muonft_cli.optim import Muon, default_ns_dtype, optimizer_state_bytes  # noqa: E402

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32)


def lora_shapes(hidden: int, intermediate: int, layers: int, r: int) -> list[tuple[int, int]]:
    """(out, in) of every LoRA A (r×in) and B (out×r) on q,k,v,o,gate,up,down of each layer."""
    linear = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    shapes = []
    for _ in range(layers):
        for out_f, in_f in linear:
            shapes += [(r, in_f), (out_f, r)]
    return shapes


def hidden_shapes(hidden: int, intermediate: int, layers: int) -> list[tuple[int, int]]:
    linear = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)]
    return linear * layers


def make_params(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for s in shapes:
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device))
        p.grad = torch.randn(s, generator=g).to(device)
        params.append(p)
    return params


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(builders, shapes, device, warmup, steps):
    """builders: name -> fn(params) -> optimizer.  Returns name -> list of step seconds."""
    opts = {}
    for i, (name, build) in enumerate(builders.items()):
        opts[name] = build(make_params(shapes, device, seed=i))
    times = {name: [] for name in opts}
    names = list(opts)
    for rep in range(warmup + steps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            sync(device)
            t0 = time.perf_counter()
            opts[name].step()
            sync(device)
            if rep >= warmup:
                times[name].append(time.perf_counter() - t0)
    return opts, times


def summarize(times):
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "n": len(t)} for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/optim_step[_cuda].json)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=None, help="full case hidden size (cuda 1024, cpu 256)")
    ap.add_argument("--intermediate", type=int, default=None, help="(cuda 2816, cpu 704)")
    ap.add_argument("--layers", type=int, default=None, help="(cuda 8, cpu 2)")
    ap.add_argument("--full-steps", type=int, default=None, help="timed steps, full case (cpu default 3)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # bf16 matmul is emulated (slow) on CPUs without AVX512-BF16/AMX, and torch.optim.Muon always
    # runs NS in bf16, so the CPU default for the full-matrix case is smaller.
    gpu = device.type == "cuda"
    args.hidden = args.hidden or (1024 if gpu else 256)
    args.intermediate = args.intermediate or (2816 if gpu else 704)
    args.layers = args.layers or (8 if gpu else 2)
    args.full_steps = args.full_steps or (args.steps if gpu else 3)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "optim_step_cuda.json" if device.type == "cuda" else "optim_step.json"
    )
    lr = 1e-3
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "muonft_default_ns_dtype": str(default_ns_dtype(device)),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "warmup": args.warmup,
        "steps": args.steps,
    }

    # 1. LoRA r=8 shapes of Llama-2-7B ---------------------------------------------------------
    shapes = lora_shapes(**LLAMA2_7B, r=args.lora_rank)
    builders = {
        "muonft_muon": lambda ps: Muon(ps, lr=lr),
        "muonft_muon_pe": lambda ps: Muon(ps, lr=lr, ns_method="polar_express"),
        "torch_muon": lambda ps: torch.optim.Muon(ps, lr=lr, adjust_lr_fn="match_rms_adamw"),
        "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True),
        "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True),
    }
    opts, times = time_interleaved(builders, shapes, device, args.warmup, args.steps)
    lora = summarize(times)
    med = {k: v["median_ms"] for k, v in lora.items()}
    lora_ratios = {
        "muonft_muon / adamw_foreach": med["muonft_muon"] / med["adamw_foreach"],
        "muonft_muon / adamw_fused": med["muonft_muon"] / med["adamw_fused"],
        "torch_muon / muonft_muon (speed-up)": med["torch_muon"] / med["muonft_muon"],
        "torch_muon / adamw_foreach": med["torch_muon"] / med["adamw_foreach"],
        "muonft_muon_pe / adamw_foreach": med["muonft_muon_pe"] / med["adamw_foreach"],
    }
    state_ratio = optimizer_state_bytes(opts["muonft_muon"]) / optimizer_state_bytes(opts["adamw_foreach"])
    result["lora"] = {
        "shapes": "Llama-2-7B LoRA r=%d, q,k,v,o,gate,up,down x 32 layers" % args.lora_rank,
        "matrices": len(shapes),
        "params": sum(a * b for a, b in shapes),
        "step_ms": lora,
        "ratios": lora_ratios,
        "state_bytes": {
            "muonft_muon": optimizer_state_bytes(opts["muonft_muon"]),
            "adamw": optimizer_state_bytes(opts["adamw_foreach"]),
            "ratio": state_ratio,
        },
    }
    del opts

    # 2. Full hidden matrices ------------------------------------------------------------------
    fshapes = hidden_shapes(args.hidden, args.intermediate, args.layers)
    fbuilders = {
        "muonft_muon_bf16": lambda ps: Muon(ps, lr=lr, ns_dtype="bf16"),
        "torch_muon": lambda ps: torch.optim.Muon(ps, lr=lr, adjust_lr_fn="match_rms_adamw"),
    }
    if default_ns_dtype(device) != torch.bfloat16:
        fbuilders["muonft_muon_auto"] = lambda ps: Muon(ps, lr=lr)
    _, ftimes = time_interleaved(fbuilders, fshapes, device, 1, args.full_steps)
    full = summarize(ftimes)
    fmed = {k: v["median_ms"] for k, v in full.items()}
    full_ratios = {"torch_muon / muonft_muon_bf16 (speed-up, equal NS accuracy)": fmed["torch_muon"] / fmed["muonft_muon_bf16"]}
    if "muonft_muon_auto" in fmed:
        full_ratios["torch_muon / muonft_muon_auto (speed-up, fp32 NS)"] = fmed["torch_muon"] / fmed["muonft_muon_auto"]
    result["full"] = {
        "shapes": f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, q,k,v,o,gate,up,down",
        "matrices": len(fshapes),
        "params": sum(a * b for a, b in fshapes),
        "step_ms": full,
        "ratios": full_ratios,
    }

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device={result['device']} torch={result['torch']} threads={result['threads']} "
          f"muonft ns dtype={result['muonft_default_ns_dtype']}")
    print(f"LoRA r={args.lora_rank} ({len(shapes)} matrices, {result['lora']['params'] / 1e6:.1f} M params), median step ms:")
    for k, v in lora.items():
        print(f"  {k:<18} {v['median_ms']:9.1f}")
    for k, v in lora_ratios.items():
        print(f"  {k:<40} {v:6.2f}x")
    print(f"  state bytes muonft Muon / AdamW        {state_ratio:6.3f}")
    print(f"Full hidden matrices ({len(fshapes)} matrices, {result['full']['params'] / 1e6:.1f} M params), median step ms:")
    for k, v in full.items():
        print(f"  {k:<18} {v['median_ms']:9.1f}")
    for k, v in full_ratios.items():
        print(f"  {k:<55} {v:6.2f}x")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

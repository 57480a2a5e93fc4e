"""Optimizer step time: muonft Muon vs AdamW (fused, foreach), torch.optim.Muon and the peers a user would
pick instead (heavyball's Muon, pytorch-optimizer's Muon), at realistic sizes, plus state size.

Cases (defaults):
  1. LoRA r=8 at Llama-2-7B shapes: adapters on q,k,v,o,gate,up,down of 32 layers → 448 thin matrices,
     ~20 M params (muonft's fused thin path; on CPU its native kernel, ``muonft_muon_torchpath`` the same
     optimizer with ``native=False``: stacked momentum, one batched r×r Gram iteration per step).
  2. Full hidden matrices of a Llama-style model: hidden 1024, intermediate 2816, 8 layers (56 matrices),
     every Muon with its NS in bf16 (torch.optim.Muon's and the peers' choice), muonft too (``ns_dtype=bf16``).
  3. Optimizer state bytes, muonft Muon / AdamW on the LoRA matrices (target 0.5).

Method: every optimizer gets its own copy of the same parameters (shared, identical gradients); steps are
interleaved in rounds (each optimizer once per round, order rotated) after warm-up rounds, so drifting load
hits all alike.  Reported: median and min/max step ms per optimizer, ratios of medians, and the median of
the per-round ratios (two optimizers timed within one rotation of each other; a shared machine's slow
spells cancel).  Like is compared
with like: on one layer's matrices each Muon's first update direction (same init, same gradient) is compared
with torch.optim.Muon's (mean per-matrix cosine similarity; 1.0 = same direction; scale-invariant, so the
different lr-scaling conventions do not matter).  Peers missing from the environment are reported as skipped
(``pip install --no-deps -r bench/requirements.txt``).  heavyball runs eager unless ``--heavyball-compile``
(its torch.compile on CPU takes minutes).

    python bench/optim_step.py --threads 2            # CPU, writes bench/results/optim_step.json
    python bench/optim_step.py --device cuda          # GPU, writes bench/results/optim_step_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from muonft_cli.native import status as native_status  # noqa: E402
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


def make_weights(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).to(device) for s in shapes]


def make_grads(shapes, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device) for s in shapes]


def params_from(weights, grads):
    ps = []
    for w, g in zip(weights, grads):
        p = torch.nn.Parameter(w.clone())
        p.grad = g  # shared, read-only for every optimizer here
        ps.append(p)
    return ps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------- optimizers


def drop(build: dict, skipped: dict, names: list[str]) -> None:
    """Remove the peers named with ``--skip`` (muonft's own, AdamW and torch.optim.Muon — the reference the
    update directions are compared with — are never dropped)."""
    for name in names:
        if name in build and not name.startswith(("muonft", "adamw", "torch_muon")):
            del build[name]
            skipped[name] = "left out with --skip"


def builders(lr: float, full: bool, heavyball_compile: bool) -> tuple[dict, dict]:
    """name -> fn(params) -> optimizer, and name -> reason for peers that are not installed."""
    out, skipped = {}, {}
    if full:
        out["muonft_muon_bf16"] = lambda ps: Muon(ps, lr=lr, ns_dtype="bf16")
    else:
        out["muonft_muon"] = lambda ps: Muon(ps, lr=lr)
        out["muonft_muon_pe"] = lambda ps: Muon(ps, lr=lr, ns_method="polar_express")
        out["muonft_muon_torchpath"] = lambda ps: Muon(ps, lr=lr, native=False)  # the kernel's A/B
    out["torch_muon"] = lambda ps: torch.optim.Muon(ps, lr=lr, adjust_lr_fn="match_rms_adamw")
    try:
        import pytorch_optimizer

        out["pytorch_optimizer_muon"] = lambda ps: pytorch_optimizer.Muon([dict(params=ps, use_muon=True)], lr=lr)
        if full:
            out["pytorch_optimizer_muon_gram"] = lambda ps: pytorch_optimizer.Muon(
                [dict(params=ps, use_muon=True)], lr=lr, ns_method="gram_newton_schulz")
    except ImportError as e:
        skipped["pytorch_optimizer_muon"] = f"not installed ({e})"
    try:
        import heavyball
        import heavyball.utils

        if not heavyball_compile:
            heavyball.utils.compile_mode = None  # eager
        out["heavyball_muon"] = lambda ps: heavyball.Muon(ps, lr=lr)
    except ImportError as e:
        skipped["heavyball_muon"] = f"not installed ({e})"
    if not full:
        out["adamw_foreach"] = lambda ps: torch.optim.AdamW(ps, lr=lr, foreach=True)
        out["adamw_fused"] = lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)
    return out, skipped


def time_interleaved(build, shapes, device, warmup, rounds):
    """Returns the optimizers and name -> (wall seconds, process CPU seconds) per step after ``warmup``
    rounds.  CPU seconds are the less load-sensitive measure on a shared machine (they include the
    threads' spin-waits, so they are no better than wall time on a quiet one)."""
    grads = make_grads(shapes, device, seed=1)
    weights = make_weights(shapes, device, seed=0)
    params = {name: params_from(weights, grads) for name in build}
    opts = {name: fn(params[name]) for name, fn in build.items()}
    del weights
    times = {name: ([], []) for name in opts}
    names = list(opts)
    for rep in range(warmup + rounds):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            for p, g in zip(params[name], grads):
                p.grad = g  # some optimizers drop .grad after their step (heavyball)
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            opts[name].step()
            sync(device)
            if rep >= warmup:
                times[name][0].append(time.perf_counter() - t0)
                times[name][1].append(time.process_time() - c0)
    return opts, times


def directions(build, shapes, device):
    """Mean per-matrix cosine similarity of each optimizer's first update with torch.optim.Muon's."""
    weights, grads = make_weights(shapes, device, seed=2), make_grads(shapes, device, seed=3)
    deltas = {}
    for name, fn in build.items():
        ps = params_from(weights, [g.clone() for g in grads])
        fn(ps).step()
        deltas[name] = [(p.detach() - w).double().flatten() for p, w in zip(ps, weights)]
    ref = deltas["torch_muon"]
    return {name: statistics.fmean(torch.nn.functional.cosine_similarity(a, b, dim=0).item()
                                   for a, b in zip(d, ref)) for name, d in deltas.items()}


def summarize(times):
    return {n: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                "cpu_median_ms": 1e3 * statistics.median(c), "n": len(t)} for n, (t, c) in times.items()}


def ratios(med: dict, pairs: list[tuple[str, str]]) -> dict:
    return {f"{a} / {b}": med[a] / med[b] for a, b in pairs if a in med and b in med}


def per_round_ratios(times: dict, pairs: list[tuple[str, str]]) -> dict:
    """Median over rounds of a's step time / b's in the same round (measured within one rotation of each
    other, so a shared machine's slow spells cancel): [median, lower quartile, upper quartile]."""
    out = {}
    for a, b in pairs:
        if a in times and b in times:
            r = sorted(x / y for x, y in zip(times[a][0], times[b][0]))
            q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0], r[0], r[0]]
            out[f"{a} / {b}"] = [statistics.median(r), q[0], q[2]]
    return out


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/optim_step[_cuda].json)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up rounds, LoRA case")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds, LoRA case")
    ap.add_argument("--full-rounds", type=int, default=3, help="timed rounds, full case (1 warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024, help="full case hidden size")
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skip-full", action="store_true", help="LoRA case only")
    ap.add_argument("--skip-lora", action="store_true", help="full case only")
    ap.add_argument("--heavyball-compile", action="store_true", help="let heavyball torch.compile its step")
    ap.add_argument("--skip", action="append", default=[], metavar="NAME",
                    help="leave out this peer (repeatable; recorded under 'skipped'), e.g. "
                         "pytorch_optimizer_muon_gram, whose fp16 Gram iteration runs torch's unvectorised "
                         "fp16 GEMM on CPUs without native fp16 (minutes per step)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        "optim_step_cuda.json" if device.type == "cuda" else "optim_step.json")
    lr = 1e-3
    load = None
    try:
        import os

        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "muonft_default_ns_dtype": str(default_ns_dtype(device)),
        "native_kernel": native_status()["thin"],
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "load_average_1min_at_start": load,
        "method": "interleaved rounds, order rotated; medians of per-step times; ratios of medians, and "
                  "medians of the per-round ratios",
    }

    if args.skip_full and args.skip_lora:
        ap.error("--skip-full and --skip-lora leave nothing to measure")
    report = []

    # 1. LoRA ------------------------------------------------------------------------------------
    if not args.skip_lora:
        shapes = lora_shapes(**LLAMA2_7B, r=args.lora_rank)
        build, skipped = builders(lr, full=False, heavyball_compile=args.heavyball_compile)
        drop(build, skipped, args.skip)
        opts, times = time_interleaved(build, shapes, device, args.warmup, args.rounds)
        lora = summarize(times)
        med = {k: v["median_ms"] for k, v in lora.items()}
        peers = [k for k in med if k.startswith(("torch_muon", "pytorch_optimizer", "heavyball"))]
        pairs = [("muonft_muon", "adamw_fused"), ("muonft_muon", "adamw_foreach"),
                 ("muonft_muon_pe", "adamw_fused"), ("muonft_muon_torchpath", "muonft_muon")] + [
            (p, "muonft_muon") for p in peers]
        lora_ratios = ratios(med, pairs)
        cpu_ratios = ratios({k: v["cpu_median_ms"] for k, v in lora.items()}, pairs)
        state_ratio = optimizer_state_bytes(opts["muonft_muon"]) / optimizer_state_bytes(opts["adamw_foreach"])
        del opts
        one_layer = shapes[:14]
        muons = {k: v for k, v in build.items() if not k.startswith("adamw")}
        result["lora"] = {
            "shapes": "Llama-2-7B LoRA r=%d, q,k,v,o,gate,up,down x 32 layers" % args.lora_rank,
            "matrices": len(shapes),
            "params": sum(a * b for a, b in shapes),
            "step_ms": lora,
            "ratios": lora_ratios,
            "ratios_cpu_time": cpu_ratios,
            "ratios_per_round": per_round_ratios(times, pairs),
            "cosine_vs_torch_muon (one layer)": directions(muons, one_layer, device),
            "state_bytes_ratio_muonft_muon_to_adamw": state_ratio,
            "skipped": skipped,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")  # each case as soon as it is measured
        report.append(("LoRA r=%d (%d matrices, %.1f M params)" % (args.lora_rank, len(shapes),
                                                                  result["lora"]["params"] / 1e6), result["lora"]))

    # 2. Full hidden matrices --------------------------------------------------------------------
    if not args.skip_full:
        fshapes = hidden_shapes(args.hidden, args.intermediate, args.layers)
        fbuild, fskipped = builders(lr, full=True, heavyball_compile=args.heavyball_compile)
        drop(fbuild, fskipped, args.skip)
        _, ftimes = time_interleaved(fbuild, fshapes, device, 1, args.full_rounds)
        full = summarize(ftimes)
        fmed = {k: v["median_ms"] for k, v in full.items()}
        fpeers = [k for k in fmed if k != "muonft_muon_bf16"]
        fpairs = [(p, "muonft_muon_bf16") for p in fpeers]
        result["full"] = {
            "shapes": f"hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
                      "q,k,v,o,gate,up,down; every Muon NS5 in bf16",
            "matrices": len(fshapes),
            "params": sum(a * b for a, b in fshapes),
            "step_ms": full,
            "ratios": ratios(fmed, fpairs),
            "ratios_cpu_time": ratios({k: v["cpu_median_ms"] for k, v in full.items()}, fpairs),
            "ratios_per_round": per_round_ratios(ftimes, fpairs),
            "cosine_vs_torch_muon (one layer)": directions(fbuild, fshapes[:7], device),
            "skipped": fskipped,
        }
        report.append((f"Full hidden {args.hidden}/{args.intermediate} x {args.layers} layers "
                       f"({len(fshapes)} matrices)", result["full"]))

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"device={result['device']} torch={result['torch']} threads={result['threads']} load={load}")
    for title, sec in report:
        print(title + ": median step ms [min..max], cosine with torch.optim.Muon's update")
        cos = sec["cosine_vs_torch_muon (one layer)"]
        for k, v in sec["step_ms"].items():
            c = f"  cos {cos[k]:.4f}" if k in cos else ""
            print(f"  {k:<30} {v['median_ms']:9.1f}  [{v['min_ms']:.1f}..{v['max_ms']:.1f}]  "
                  f"cpu {v['cpu_median_ms']:.1f}{c}")
        for k, v in sec["ratios"].items():
            pr = sec["ratios_per_round"][k]
            print(f"  {k:<48} {v:6.2f}x   (cpu time {sec['ratios_cpu_time'][k]:.2f}x; per round "
                  f"{pr[0]:.2f}x [{pr[1]:.2f}..{pr[2]:.2f}])")
        for k, v in sec["skipped"].items():
            print(f"  skipped {k}: {v}")
    if "lora" in result:
        print(f"  state bytes muonft Muon / AdamW: {state_ratio:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

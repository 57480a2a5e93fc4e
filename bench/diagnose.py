"""Benchmark `muonft diagnose` on a synthetic checkpoint with a real model's geometry.

Writes bf16 safetensors shards shaped like TinyLlama-1.1B (default) or Llama-2-7B (``--shape llama7b``,
13.5 GB, all 32 blocks) into a temp dir (or ``--dir``), then measures in one run, each in a fresh subprocess
(peak RSS = its own VmHWM; CPU seconds = its user + system time, all threads):

- cold read: every shard read once after dropping it from the page cache (``fsync`` then
  ``posix_fadvise(DONTNEED)`` on each shard — we cannot drop the host's caches; a warm read, without the
  drop, is measured once to show the drop took effect), the physical floor for any tool that reads the weights,
- ``diagnose --fast`` on the whole model (each shard dropped from the page cache first, too),
- with ``--baseline SRC``, the same ``--fast`` run of another muonft source tree (e.g. a ``git archive`` of an
  older commit), for before/after ratios,
- ``diagnose --exact`` on a slice (embeddings, LM head and ``--exact-layers`` blocks), extrapolated to all
  layers and labelled as such, plus ``--fast`` on the same slice for a like-for-like ratio.

``--rounds N`` interleaves read / fast (/ baseline) N times, so load from other jobs hits all of them alike;
the ratios are per round, reported as median and range, with the load average before and after.

Matrices are an init-like Gaussian plus a power-law low-rank part so the spectra look trained (the fast
estimator deflates the spikes). Results: ``bench/results/diagnose.json``.

    .venv/bin/python bench/diagnose.py                    # TinyLlama-1.1B shape
    .venv/bin/python bench/diagnose.py --shape llama7b    # Llama-2-7B shape (13 GB on disk)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("MUONFT_BENCH_SRC") or str(ROOT))  # --baseline runs another source tree

SHAPES = {  # hidden, intermediate, layers, kv_dim, vocab
    "tinyllama": (2048, 5632, 22, 256, 32000),
    "llama7b": (4096, 11008, 32, 4096, 32000),
    "mini": (1024, 2816, 4, 256, 8000),  # a quick smoke run of the script itself
}


def _tensor(m: int, n: int, gen):
    import torch

    r = min(m, n)
    k = 32  # power-law spikes on top of an init-like Gaussian
    W = torch.randn(m, n, generator=gen) * 0.02
    U = torch.randn(m, k, generator=gen) / m**0.5
    V = torch.randn(k, n, generator=gen) / n**0.5
    # top singular value ≈ 5× the Gaussian bulk edge 0.02(√m+√n), decaying as a power law (trained-like spikes)
    s = 0.1 * (m**0.5 + n**0.5) * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    W += (U * s) @ V
    del U, V
    return W.to(torch.bfloat16), r


def write_checkpoint(d: Path, shape: str, seed: int = 0, layers: int | None = None) -> dict:
    """Synthetic bf16 shards (one per layer, plus embeddings/head) with an index, like an HF sharded dir."""
    import torch
    from safetensors.torch import save_file

    h, inter, L, kv, vocab = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    files = []
    shard = {"model.embed_tokens.weight": _tensor(vocab, h, gen)[0], "lm_head.weight": _tensor(vocab, h, gen)[0],
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    fname = "model-emb.safetensors"
    save_file(shard, str(d / fname))
    files.append(fname)
    weight_map.update({k: fname for k in shard})
    for i in range(L if layers is None else min(layers, L)):
        p = f"model.layers.{i}."
        shard = {p + "self_attn.q_proj.weight": _tensor(h, h, gen)[0],
                 p + "self_attn.k_proj.weight": _tensor(kv, h, gen)[0],
                 p + "self_attn.v_proj.weight": _tensor(kv, h, gen)[0],
                 p + "self_attn.o_proj.weight": _tensor(h, h, gen)[0],
                 p + "mlp.gate_proj.weight": _tensor(inter, h, gen)[0],
                 p + "mlp.up_proj.weight": _tensor(inter, h, gen)[0],
                 p + "mlp.down_proj.weight": _tensor(h, inter, gen)[0],
                 p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        fname = f"model-{i:05d}.safetensors"
        save_file(shard, str(d / fname))
        files.append(fname)
        weight_map.update({k: fname for k in shard})
        print(f"\rwriting layer {i + 1}/{L}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": h, "num_hidden_layers": L}))
    return {"files": files, "bytes": sum((d / f).stat().st_size for f in files)}


def _drop_cache(d: Path) -> None:
    for f in d.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # freshly written pages are dirty; DONTNEED drops only clean ones
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _own_peak_rss_mb(ru: resource.struct_rusage) -> float:
    """This process's own peak RSS (MB): VmHWM of its address space. Not ru_maxrss: Linux carries it over
    from the parent across fork + exec, so a child of the process that wrote a 13 GB checkpoint would report
    the writer's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return ru.ru_maxrss / 1024


def child(args: argparse.Namespace) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch

    from muonft_cli.diagnose import analyse
    from muonft_cli.diagnose.io import open_checkpoint

    d = Path(args.dir)
    if args.child != "warm":
        _drop_cache(d)
    t0 = time.perf_counter()
    if args.child in ("read", "warm"):
        n = 0
        buf = bytearray(64 << 20)
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while k := fh.readinto(buf):
                    n += k
        out = {"bytes": n}
    else:
        ck = open_checkpoint(d)
        if args.layers is not None:
            keep = {f"model.layers.{i}." for i in range(args.layers)}
            ck.matrices = [s for s in ck.matrices if s.layer_type in ("embedding", "lm_head")
                           or any(s.name.startswith(k) for k in keep)]
        recs = analyse(ck, mode=args.child, workers=args.workers)
        emb = sum(r["seconds"] for r in recs if r["layer_type"] in ("embedding", "lm_head"))
        out = {"n_matrices": len(recs), "seconds_embed_head": emb, "seconds_layers": sum(r["seconds"] for r in recs) - emb,
               "stable_rank": {r["name"]: r["stable_rank"] for r in recs},
               "svd_entropy": {r["name"]: r["svd_entropy"] for r in recs}, "threads": torch.get_num_threads()}
    out["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["peak_rss_mb"] = _own_peak_rss_mb(ru)
    out["cpu_s"] = ru.ru_utime + ru.ru_stime
    print(json.dumps(out))


def _run_child(mode: str, d: Path, layers: int | None = None, workers: int | None = None,
               src: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--dir", str(d)]
    if layers is not None:
        cmd += ["--layers", str(layers)]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    print("+", " ".join(cmd[1:]), f"(src {src})" if src else "", file=sys.stderr, flush=True)
    env = os.environ | ({"MUONFT_BENCH_SRC": src} if src else {})
    p = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    out = json.loads(p.stdout.strip().splitlines()[-1])
    print("  ", {k: round(v, 2) for k, v in out.items() if k in ("seconds", "cpu_s", "peak_rss_mb")},
          file=sys.stderr, flush=True)
    return out


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--exact-layers", type=int, default=2,
                    help="blocks in the exact slice (then extrapolated); 0 skips the exact comparison")
    ap.add_argument("--fast-layers", type=int, default=None,
                    help="run the whole-model fast pass on embeddings + head + this many blocks only (time "
                         "extrapolated and labelled; peak RSS is set by the largest matrices, which the slice has)")
    ap.add_argument("--write-layers", type=int, default=None,
                    help="write only embeddings + head + this many blocks (the largest matrices, so the same "
                         "peak RSS); whole-model times are then extrapolated and labelled")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--dir", help="reuse/keep the synthetic checkpoint here (default: a temp dir, deleted)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of cold read / fast (/ baseline)")
    ap.add_argument("--baseline", help="another muonft source tree to time the same --fast run with, interleaved")
    ap.add_argument("--out", help="results file (default bench/results/diagnose[-SHAPE].json)")
    ap.add_argument("--child", choices=["read", "warm", "fast", "exact"], help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    h, inter, L, kv, vocab = SHAPES[args.shape]
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="muonft-bench-diag-"))
    try:
        if not (tmp / "model.safetensors.index.json").is_file():
            t = time.perf_counter()
            info = write_checkpoint(tmp, args.shape, layers=args.write_layers)
            print(f"wrote {info['bytes'] / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        size = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        load = os.getloadavg()
        written = min(args.write_layers or L, L)
        fast_layers = args.fast_layers if args.fast_layers is not None else (written if written < L else None)
        warm = _run_child("warm", tmp)  # page cache warm after the write (or a previous run), for comparison
        rounds: list[dict] = []
        for _ in range(args.rounds):  # interleaved: read, fast, baseline — other jobs' load hits all alike
            rd = _run_child("read", tmp)
            ft = _run_child("fast", tmp, layers=fast_layers, workers=args.workers)
            row = {"cold_read_s": rd["seconds"], "fast_s": ft["seconds"], "fast_cpu_s": ft["cpu_s"],
                   "fast_peak_rss_mb": ft["peak_rss_mb"], "fast_over_cold_read": ft["seconds"] / rd["seconds"],
                   "loadavg_1m": os.getloadavg()[0]}
            if args.baseline:
                bl = _run_child("fast", tmp, layers=fast_layers, workers=args.workers, src=args.baseline)
                row.update({"baseline_fast_s": bl["seconds"], "baseline_cpu_s": bl["cpu_s"],
                            "baseline_peak_rss_mb": bl["peak_rss_mb"],
                            "baseline_over_cold_read": bl["seconds"] / rd["seconds"],
                            "speedup_wall": bl["seconds"] / ft["seconds"], "speedup_cpu": bl["cpu_s"] / ft["cpu_s"]})
            rounds.append(row)
        med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
        read = {"seconds": med["cold_read_s"], "peak_rss_mb": rd["peak_rss_mb"]}
        fast = dict(ft)
        fast["seconds"] = med["fast_s"]
        fast["peak_rss_mb"] = max(r["fast_peak_rss_mb"] for r in rounds)
        if fast_layers is not None:  # extrapolate the partial pass to all blocks
            fast["measured_seconds"] = fast["seconds"]
            fast["seconds"] = (fast["seconds"] - fast["seconds_layers"]
                               + fast["seconds_layers"] * L / min(fast_layers, written))
        full_bytes = 2 * (2 * vocab * h + L * (2 * h * h + 2 * kv * h + 3 * inter * h))  # bf16 matrices
        read_full_s = read["seconds"] * full_bytes / size  # the whole model's cold read, scaled from what is on disk
        k = args.exact_layers
        cmp: dict = {"exact_slice_layers": k}
        if k > 0:  # exact on a slice, extrapolated; the fast pass on the same slice for its error
            exact_s = _run_child("exact", tmp, layers=k, workers=args.workers)
            fast_s = _run_child("fast", tmp, layers=k, workers=args.workers)
            exact_extrap = exact_s["seconds_embed_head"] + exact_s["seconds_layers"] * L / k
            cmp.update({
                "exact_slice_s": exact_s["seconds"], "exact_peak_rss_mb": exact_s["peak_rss_mb"],
                "exact_extrapolated_s": exact_extrap, "fast_slice_s": fast_s["seconds"],
                "fast_slice_extrapolated_s": fast_s["seconds_embed_head"] + fast_s["seconds_layers"] * L / k,
                "exact_over_fast_extrapolated": exact_extrap / fast["seconds"],
                "slice_max_rel_err_stable_rank": max(abs(fast_s["stable_rank"][n] / v - 1)
                                                     for n, v in exact_s["stable_rank"].items()),
                "slice_max_abs_err_entropy": max(abs(fast_s["svd_entropy"][n] - v)
                                                 for n, v in exact_s["svd_entropy"].items()),
            })
        res = {
            "shape": args.shape, "geometry": {"hidden": h, "intermediate": inter, "layers": L, "kv_dim": kv,
                                              "vocab": vocab},
            "checkpoint_gb": size / 1e9, "cpu_count": os.cpu_count(), "loadavg_at_start": load,
            "loadavg_at_end": os.getloadavg(), "rounds": rounds,
            "ratio_fast_over_cold_read": _spread([r["fast_over_cold_read"] for r in rounds]),
            **({"speedup_vs_baseline_wall": _spread([r["speedup_wall"] for r in rounds]),
                "speedup_vs_baseline_cpu": _spread([r["speedup_cpu"] for r in rounds]),
                "baseline_over_cold_read": _spread([r["baseline_over_cold_read"] for r in rounds]),
                "baseline_src": args.baseline} if args.baseline else {}),
            "warm_read_s": warm["seconds"], "fast_cpu_s": med["fast_cpu_s"],
            "cold_read_s": read["seconds"], "cold_read_rss_mb": read["peak_rss_mb"],
            "fast_s": fast["seconds"], "fast_peak_rss_mb": fast["peak_rss_mb"], "fast_n_matrices": fast["n_matrices"],
            "blocks_written": written, "fast_layers": fast_layers or L, "fast_s_extrapolated": fast_layers is not None,
            "workers": args.workers,
            **cmp,
            "cold_read_whole_model_s": read_full_s, "cold_read_scaled": written < L,
            "fast_over_cold_read": (fast["seconds"] / read_full_s if fast_layers is not None
                                    else med["fast_over_cold_read"]),
            "threads": fast["threads"],
            "note": "exact time is extrapolated from the slice (embeddings + head + k blocks, per-matrix timings); "
                    "2 shared CPU cores: other jobs' load is recorded in loadavg_at_start/_end and per round; "
                    "cold = fsync + posix_fadvise(DONTNEED) on every shard before each child (host caches "
                    "not dropped), warm_read_s the same read without the drop",
        }
        out = Path(args.out) if args.out else ROOT / "bench/results/diagnose.json" if args.shape == "tinyllama" \
            else ROOT / f"bench/results/diagnose-{args.shape}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        exact_txt = (f"exact ≈ {res['exact_extrapolated_s']:.0f} s (extrapolated) → "
                     f"×{res['exact_over_fast_extrapolated']:.1f}; exact peak RSS {res['exact_peak_rss_mb']:.0f} MB; "
                     if k > 0 else "exact not run; ")
        print(f"fast {res['fast_s']:.1f} s{' (extrapolated)' if fast_layers else ''} "
              f"(×{res['fast_over_cold_read']:.1f} the cold read {read_full_s:.1f} s), {exact_txt}"
              f"fast peak RSS {res['fast_peak_rss_mb']:.0f} MB")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`muonft diagnose`: read a checkpoint's spectra in bounded memory, guess its pretraining optimizer, recommend.

Owns the diagnose pipeline (no Typer here; `cli.py` calls `diagnose` and `render`):

1. `muonft_cli.diagnose.io` finds the 2-D matrices of an HF dir / .safetensors / peft adapter / .gguf and reads
   them one at a time by header offsets (bounded RSS).
2. Per matrix, the metrics of paper App. F.1 (REFERENCE.md "Spectral metrics": stable rank, SVD entropy with
   pᵢ = σᵢ²/Σσⱼ², spectral / Frobenius / max norms) and their Marchenko–Pastur baselines of the same shape, from
   `muonft_cli.spectral` (exact) or `muonft_cli.diagnose.fast` (Lanczos estimates with error bounds).
3. `muonft_cli.diagnose.verdict` turns them into ``optimizer_guess`` (adam | muon | unknown) with a calibrated
   confidence and evidence, reads provenance separately, and recommends how to fine-tune (paper §5, Table 1:
   mismatched pretrain/fine-tune optimizers → LoRA at moderate rank).

Progress goes to a callback (the CLI draws a bar on stderr); `--json` output is the dict `diagnose` returns.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable

import torch

from muonft_cli.diagnose.fast import exact_estimate, fast_spectrum
from muonft_cli.diagnose.io import Checkpoint, MatrixSpec, open_checkpoint
from muonft_cli.errors import UserInputError
from muonft_cli.spectral import random_baseline

__all__ = ["diagnose", "analyse", "AUTO_FAST_MIN_DIM", "MODES", "render", "ProgressBar"]

MODES = ("auto", "exact", "fast")
AUTO_FAST_MIN_DIM = 1024
"""In ``auto`` mode a matrix whose smaller side is at least this uses the fast estimator (where it beats the
exact fp64 eigendecomposition clearly; see README's benchmark); smaller ones are computed exactly."""

INFLIGHT_BYTES = 768 << 20
"""With several workers, a new matrix starts only while the fp32 matrices being analysed total at most this."""

ProgressFn = Callable[[int, int, str], None]


def _matrix_record(spec: MatrixSpec, mode: str, seed: int) -> dict[str, Any]:
    """Read one matrix and compute its metrics (exact or fast) and baselines."""
    t0 = time.perf_counter()
    W = spec.read()  # (m, n) fp32
    m, n = W.shape
    use_fast = mode == "fast" or (mode == "auto" and min(m, n) >= AUTO_FAST_MIN_DIM)
    est = fast_spectrum(W, seed=seed) if use_fast else exact_estimate(W)
    max_norm = float(W.abs().max())
    del W
    r = min(m, n)
    base = random_baseline(m, n)
    rms = est.frobenius_norm / math.sqrt(m * n)
    return {
        "name": spec.name,
        "layer_type": spec.layer_type,
        "role": spec.role,
        "shape": [m, n],
        "method": est.method,
        "spectral_norm": est.spectral_norm,
        "frobenius_norm": est.frobenius_norm,
        "stable_rank": est.stable_rank,
        "stable_rank_ratio": est.stable_rank / r,
        "svd_entropy": est.svd_entropy,
        "max_norm": max_norm,
        "stable_rank_rel_err": est.stable_rank_rel_err,
        "svd_entropy_err": est.svd_entropy_err,
        "random_stable_rank": base["stable_rank"],
        "random_stable_rank_ratio": base["stable_rank_ratio"],
        "random_svd_entropy": base["svd_entropy"],
        "random_stable_rank_std": base["stable_rank_std"],
        "random_svd_entropy_std": base["svd_entropy_std"],
        "random_spectral_norm": base["spectral_norm_per_rms"] * rms,
        "random_max_norm": base["max_norm_per_rms"] * rms,
        "seconds": round(time.perf_counter() - t0, 4),
    }


def analyse(
    ck: Checkpoint,
    *,
    mode: str = "auto",
    workers: int | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Metrics of every matrix of an opened checkpoint, streaming (at most ``workers`` matrices in memory).

    Args:
        ck: from `open_checkpoint`.
        mode: ``auto`` (fast for matrices with min side ≥ `AUTO_FAST_MIN_DIM`), ``exact`` or ``fast``.
        workers: matrices processed concurrently (threads; torch releases the GIL), CPU threads divided between
            them. Default: 2 (one BLAS thread each on 2 cores) in ``fast``/``auto`` mode, whose skinny block
            products use threads poorly; in ``exact`` mode 1 on ≤ 2 cores (its GEMM/eigh use them well), else 2.
            Each worker reads its own matrix, so reading overlaps computing. A matrix is only started while
            the fp32 matrices in flight total at most `INFLIGHT_BYTES` (one alone always runs), which bounds
            peak memory by the largest matrices, not by ``workers`` of them.
        progress: ``progress(done, total, name)`` after each matrix.
        seed: seed of the fast estimator's probes.

    Returns:
        One dict per matrix, in checkpoint order (see README "diagnose JSON" for the fields).
    """
    if mode not in MODES:
        raise UserInputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    specs = ck.matrices
    total = len(specs)
    if workers is None:
        cores = os.cpu_count() or 1
        workers = min(2, cores) if mode != "exact" else (1 if cores <= 2 else 2)
    workers = max(1, min(int(workers), total))
    out: list[dict[str, Any] | None] = [None] * total
    if workers == 1:
        for i, s in enumerate(specs):
            out[i] = _matrix_record(s, mode, seed + i)
            if progress:
                progress(i + 1, total, s.name)
        return out  # type: ignore[return-value]
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            # submit in a sliding window of `workers` so at most that many matrices are alive at once, and
            # only while the fp32 bytes in flight stay within INFLIGHT_BYTES (one matrix alone always runs)
            pending: dict[Any, int] = {}
            nxt, done = 0, 0

            def size(i: int) -> int:
                return 4 * specs[i].shape[0] * specs[i].shape[1]

            while done < total:
                while nxt < total and len(pending) < workers and (
                        not pending or sum(size(i) for i in pending.values()) + size(nxt) <= INFLIGHT_BYTES):
                    pending[pool.submit(_matrix_record, specs[nxt], mode, seed + nxt)] = nxt
                    nxt += 1
                finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    out[i] = fut.result()
                    done += 1
                    if progress:
                        progress(done, total, specs[i].name)
    finally:
        torch.set_num_threads(threads)
    return out  # type: ignore[return-value]


def diagnose(
    path: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    mode: str = "auto",
    target_optim: str = "muon",
    data: str = "builtin:kjv",
    per_matrix: bool = False,
    workers: int | None = None,
    progress: ProgressFn | None = None,
    on_open: Callable[[Checkpoint], None] | None = None,
) -> dict[str, Any]:
    """Diagnose a checkpoint: spectra, optimizer guess, provenance, and a fine-tuning recommendation.

    Args:
        path: HF model dir, ``.safetensors`` file, peft adapter dir, or ``.gguf`` file.
        base: for an adapter, its base model; adds merged-weight spectra, and the verdict is on the base.
        mode: ``auto`` | ``exact`` | ``fast``.
        target_optim: the optimizer you want to fine-tune with (``adamw``, ``muon``, ``muon-pe``, ``adamuon``,
            ``normuon``); the recommendation is for it.
        data: dataset put into the recommended ``muonft finetune`` command.
        per_matrix: include every matrix's record under ``"matrices"``.
        workers: see `analyse`.
        progress: ``progress(done, total, name)`` callback.
        on_open: called with the opened checkpoint before any matrix is read.

    Returns:
        The report (the ``--json`` document; schema in README "diagnose JSON").

    Raises:
        UserInputError: bad path / not a checkpoint / corrupt or truncated / no 2-D tensors / bad option.
    """
    from muonft_cli.diagnose import verdict as V

    if mode not in MODES:
        raise UserInputError(f"--mode {mode!r} is not one of {', '.join(MODES)}; use --exact or --fast")
    V.check_target(target_optim)
    t0 = time.perf_counter()
    ck = open_checkpoint(path, base)
    if on_open:
        on_open(ck)
    records = analyse(ck, mode=mode, workers=workers, progress=progress)
    seconds = time.perf_counter() - t0
    report = V.build_report(ck, records, mode=mode, target_optim=target_optim, data=data)
    report["seconds"] = round(seconds, 3)
    if per_matrix:
        report["matrices"] = records
    return report


class ProgressBar:
    """A rich progress bar over matrices on stderr; pass it as ``progress`` and its `start` as ``on_open``."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None

    def start(self, ck: Checkpoint) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("diagnose"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task("", total=len(ck.matrices))

    def __call__(self, done: int, total: int, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, description=name[-48:])

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def render(report: dict[str, Any], console: Any = None) -> None:
    """Print a report as rich tables: per layer type vs the random baseline, then verdict and recommendation."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]{escape(str(report['path']))}[/bold]  ({report['kind']}, {report['n_matrices']} matrices, "
                  f"mode {report['mode']}, {report['seconds']:.1f} s)")
    t = Table(title="Spectra per layer type (r = min(m, n); random = a Gaussian matrix of the same shape)")
    for col in ("type", "n", "srank", "srank/r", "random", "entropy", "random", "lean"):
        t.add_column(col, justify="left" if col in ("type", "lean") else "right")
    for lt, d in report["layer_types"].items():
        t.add_row(lt, str(d["count"]), f"{d['stable_rank']:.1f}", f"{d['stable_rank_ratio']:.3f}",
                  f"{d['random_stable_rank_ratio']:.3f}", f"{d['svd_entropy']:.3f}", f"{d['random_svd_entropy']:.3f}",
                  d.get("lean", ""))
    console.print(t)
    if report.get("matrices"):
        mt = Table(title="Matrices")
        for col in ("name", "type", "shape", "stable rank", "entropy", "method"):
            mt.add_column(col)
        for r in report["matrices"]:
            mt.add_row(r["name"], r["layer_type"], "×".join(map(str, r["shape"])), f"{r['stable_rank']:.2f}",
                       f"{r['svd_entropy']:.4f}", r["method"])
        console.print(mt)
    guess, conf = report["optimizer_guess"], report["confidence"]
    color = {"adam": "yellow", "muon": "cyan"}.get(guess, "white")
    console.print(f"\n[bold]Spectral guess:[/bold] [{color}]{guess}[/{color}]  (confidence {conf:.2f})")
    for line in report["evidence"]:  # plain text: names like lora_A[...] must not be read as markup
        console.print(f"  • {line}", markup=False)
    prov = report.get("provenance")
    if prov and prov.get("optimizer"):
        console.print(f"[bold]Provenance:[/bold] {escape(str(prov['optimizer']))} ({escape(str(prov['source']))})")
    rec = report["recommendation"]
    console.print(f"\n[bold]Recommendation[/bold] for fine-tuning with {rec['target_optim']}: "
                  f"[bold]{rec['method']}[/bold]"
                  + (f", LoRA rank {rec['lora_rank'][0]}–{rec['lora_rank'][1]}" if rec.get("lora_rank") else "")
                  + f", lr {rec['lr']['min']:.0e}–{rec['lr']['max']:.0e}")
    for line in rec["reasons"]:
        console.print(f"  • {line}", markup=False)
    # commands are printed verbatim and unwrapped so they can be copied ("[lora]" is not markup here)
    console.print(f"\n  {rec['command']}", markup=False, soft_wrap=True)
    if rec.get("sweep_command"):
        console.print(f"  {rec['sweep_command']}", markup=False, soft_wrap=True)

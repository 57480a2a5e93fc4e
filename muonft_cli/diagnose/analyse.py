"""The diagnose pipeline: read every matrix of a checkpoint in bounded memory, compute its spectra, build the report.

Owns `analyse` (per-matrix metrics, streamed through a bounded thread pool) and `diagnose` (open, analyse,
hand the records to `muonft_cli.diagnose.verdict` for the report). Per matrix: the metrics of paper App. F.1
(stable rank, SVD entropy with pᵢ = σᵢ²/Σσⱼ², spectral / Frobenius / max norms; formulas in
`docs/formulas.md`) and their Marchenko–Pastur baselines of the same shape, from `muonft_cli.spectral` (exact)
or `muonft_cli.diagnose.fast` (Lanczos estimates with error bounds). Progress goes to a callback; nothing here
prints (the CLI's bar and tables live in `muonft_cli.render`).
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any, Callable

import torch

from muonft_cli.diagnose.fast import exact_estimate, fast_spectrum
from muonft_cli.diagnose.io import Checkpoint, MatrixSpec, open_checkpoint, recorded_base
from muonft_cli.diagnose.layouts import DEFAULT_SAMPLE_EXPERTS, sample_experts as _sample_experts
from muonft_cli.errors import UserInputError
from muonft_cli.spectral import random_baseline

__all__ = ["diagnose", "analyse", "AUTO_FAST_MIN_DIM", "INFLIGHT_BYTES", "MODES", "ProgressFn"]

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
    sample_experts: int = DEFAULT_SAMPLE_EXPERTS,
) -> dict[str, Any]:
    """Diagnose a checkpoint: spectra, optimizer guess, provenance, and a fine-tuning recommendation.

    Args:
        path: HF model dir, ``.safetensors`` file, peft adapter dir, or ``.gguf`` file.
        base: for an adapter, its base model; adds merged-weight spectra, and the verdict is on the base.
            Default: the base the adapter's muonft.json (``base_model``) or adapter_config.json
            (``base_model_name_or_path``) names, when it exists locally (`muonft_cli.diagnose.io.recorded_base`).
        mode: ``auto`` | ``exact`` | ``fast``.
        target_optim: the optimizer you want to fine-tune with (``adamw``, ``muon``, ``muon-pe``, ``adamuon``,
            ``normuon``); the recommendation is for it.
        data: dataset put into the recommended ``muonft finetune`` command.
        per_matrix: include every matrix's record under ``"matrices"``.
        workers: see `analyse`.
        progress: ``progress(done, total, name)`` callback.
        on_open: called with the opened checkpoint before any matrix is read.
        sample_experts: routed MoE experts analysed per layer (evenly spaced indices, the same for each
            layer's gate/up/down; shared experts always); 0 = all. Bounds the time on models with thousands
            of expert matrices; the report's ``experts`` says how many were analysed.

    Returns:
        The report (the ``--json`` document; schema in README "diagnose JSON").

    Raises:
        UserInputError: bad path / not a checkpoint / corrupt or truncated / no 2-D tensors / bad option.
    """
    from muonft_cli.diagnose import verdict as V

    if mode not in MODES:
        raise UserInputError(f"--mode {mode!r} is not one of {', '.join(MODES)}; use --exact or --fast")
    V.check_target(target_optim)
    if isinstance(sample_experts, bool) or not isinstance(sample_experts, int) or sample_experts < 0:
        raise UserInputError(f"--sample-experts {sample_experts!r} must be a whole number ≥ 0 (0 = every expert)")
    t0 = time.perf_counter()
    ck = open_checkpoint(path, base)
    if ck.kind == "adapter" and base is None:  # the base the adapter's own metadata names, when it is local
        found, source, note = recorded_base(path)
        if found is not None:
            ck = open_checkpoint(path, found, base_source=source)
        else:
            ck.base_note = note
    ck.matrices, ck.not_sampled, ck.experts = _sample_experts(ck.matrices, sample_experts)
    if on_open:
        on_open(ck)
    records = analyse(ck, mode=mode, workers=workers, progress=progress)
    seconds = time.perf_counter() - t0
    report = V.build_report(ck, records, mode=mode, target_optim=target_optim, data=data)
    report["seconds"] = round(seconds, 3)
    if per_matrix:
        report["matrices"] = records
    return report

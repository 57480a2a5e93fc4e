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
import queue
import threading
import time
from typing import Any, Callable

import torch

from muonft_cli.diagnose.fast import auto_precision, exact_estimate, fast_spectrum
from muonft_cli.diagnose.io import Checkpoint, MatrixSpec, open_checkpoint, recorded_base
from muonft_cli.diagnose.layouts import DEFAULT_SAMPLE_EXPERTS, sample_experts as _sample_experts
from muonft_cli.errors import UserInputError
from muonft_cli.spectral import random_baseline

__all__ = ["diagnose", "analyse", "resolve_device", "AUTO_FAST_MIN_DIM", "INFLIGHT_BYTES", "PREFETCH", "MODES",
           "DEVICES", "ProgressFn"]

MODES = ("auto", "exact", "fast")
DEVICES = ("auto", "cpu", "cuda")
AUTO_FAST_MIN_DIM = 1024
"""In ``auto`` mode a matrix whose smaller side is at least this uses the fast estimator (where it beats the
exact fp64 eigendecomposition clearly; see README's benchmark); smaller ones are computed exactly."""

INFLIGHT_BYTES = 768 << 20
"""A new matrix is read only while the matrices read and not yet analysed total at most this (as read: bf16
stays bf16); one alone always runs."""

PREFETCH = 2
"""Matrices the reader may hold ready beyond the ones being analysed."""

ProgressFn = Callable[[int, int, str], None]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cpu``; ``cuda`` (or ``cuda:N``), which must be available.

    Raises:
        UserInputError: an unknown device, or ``cuda`` where torch sees no CUDA device.
    """
    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d == "cuda" or d.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {device}: no CUDA device is available to torch "
                                 f"(torch {torch.__version__}); use --device cpu (or auto)")
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UserInputError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s); "
                                 "use cuda:0 … or auto")
        return dev
    raise UserInputError(f"--device {device!r} is not one of {', '.join(DEVICES)}; use auto, cpu or cuda")


def _matrix_record(spec: MatrixSpec, W: torch.Tensor, mode: str, seed: int, device: torch.device,
                   read_s: float = 0.0) -> dict[str, Any]:
    """The metrics (exact or fast) and baselines of one read matrix W (m, n; stored dtype or fp32, on CPU),
    computed on ``device``."""
    t0 = time.perf_counter()
    if W.device != device:
        W = W.to(device)
    m, n = W.shape
    use_fast = mode == "fast" or (mode == "auto" and min(m, n) >= AUTO_FAST_MIN_DIM)
    est = fast_spectrum(W, seed=seed) if use_fast else exact_estimate(W)
    lo, hi = torch.aminmax(W)  # max |wᵢⱼ| = max(−min, max): one vectorised pass, no |W| temporary (vector_norm's
    max_norm = max(-float(lo), float(hi))  # ord=inf reduction is ~18× slower on a bf16 matrix)
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
        "seconds": round(read_s + time.perf_counter() - t0, 4),
    }


def analyse(
    ck: Checkpoint,
    *,
    mode: str = "auto",
    workers: int | None = None,
    progress: ProgressFn | None = None,
    seed: int = 0,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Metrics of every matrix of an opened checkpoint, streaming in bounded memory.

    A reader thread reads the matrices in checkpoint order (safetensors fp16/bf16/fp32 as stored, no fp32
    copy) while ``workers`` threads analyse the ones already read, so reading overlaps computing. A matrix is
    read only while the matrices read and not yet finished total at most `INFLIGHT_BYTES` (one alone always
    runs) and number at most ``workers + PREFETCH``: peak memory is bounded by the largest matrices, not by the
    model.

    Args:
        ck: from `open_checkpoint`.
        mode: ``auto`` (fast for matrices with min side ≥ `AUTO_FAST_MIN_DIM`), ``exact`` or ``fast``.
        workers: matrices analysed concurrently (threads; torch releases the GIL), CPU threads divided between
            them. Default: 2 (one BLAS thread each on 2 cores) in ``fast``/``auto`` mode, whose skinny block
            products use threads poorly; in ``exact`` mode 1 on ≤ 2 cores (its GEMM/eigh use them well), else 2;
            1 on CUDA (the GPU runs one matrix at a time anyway).
        progress: ``progress(done, total, name)`` after each matrix.
        seed: seed of the fast estimator's probes.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``: where the matrices are analysed (exact
            mode included); reading stays on the CPU, streamed.

    Returns:
        One dict per matrix, in checkpoint order (see README "diagnose JSON" for the fields).
    """
    if mode not in MODES:
        raise UserInputError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    dev = resolve_device(device)
    specs = ck.matrices
    total = len(specs)
    if workers is None:
        cores = os.cpu_count() or 1
        workers = 1 if dev.type == "cuda" else min(2, cores) if mode != "exact" else (1 if cores <= 2 else 2)
    workers = max(1, min(int(workers), total))

    def size(i: int) -> int:
        return specs[i].raw_bytes

    cond = threading.Condition()
    state = {"bytes": 0, "alive": 0, "stop": False}
    todo: queue.Queue = queue.Queue()
    results: queue.Queue = queue.Queue()

    def reader() -> None:
        for i in range(total):
            with cond:  # wait for room: bytes within the budget (or nothing in flight) and few enough matrices
                while not state["stop"] and state["alive"] > 0 and (
                        state["bytes"] + size(i) > INFLIGHT_BYTES or state["alive"] >= workers + PREFETCH):
                    cond.wait()
                if state["stop"]:
                    break
                state["bytes"] += size(i)
                state["alive"] += 1
            t0 = time.perf_counter()
            try:
                W = specs[i].read(raw=True)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                results.put((i, None, e))
                break
            todo.put((i, W, time.perf_counter() - t0))
            del W
        for _ in range(workers):
            todo.put(None)

    def work() -> None:
        while (item := todo.get()) is not None:
            i, W, read_s = item
            try:
                rec = _matrix_record(specs[i], W, mode, seed + i, dev, read_s)
                results.put((i, rec, None))
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                results.put((i, None, e))
            finally:
                del W, item
                with cond:
                    state["bytes"] -= size(i)
                    state["alive"] -= 1
                    cond.notify_all()

    out: list[dict[str, Any] | None] = [None] * total
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // workers))
    pool = [threading.Thread(target=reader, name="diagnose-reader", daemon=True)]
    pool += [threading.Thread(target=work, name=f"diagnose-{k}", daemon=True) for k in range(workers)]
    try:
        for t in pool:
            t.start()
        for done in range(1, total + 1):
            i, rec, err = results.get()
            if err is not None:
                raise err
            out[i] = rec
            if progress:
                progress(done, total, specs[i].name)
    finally:
        with cond:
            state["stop"] = True
            cond.notify_all()
        while True:  # unblock the workers if we stopped early (an error): drop what is queued
            try:
                todo.get_nowait()
            except queue.Empty:
                break
        for _ in range(workers):
            todo.put(None)
        for t in pool:
            t.join()
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
    device: str = "auto",
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
        device: ``auto`` | ``cpu`` | ``cuda``: where the matrices are analysed (see `analyse`).

    Returns:
        The report (the ``--json`` document; schema in README "diagnose JSON").

    Raises:
        UserInputError: bad path / not a checkpoint / corrupt or truncated / no 2-D tensors / bad option /
            ``--device cuda`` without CUDA.
    """
    from muonft_cli.diagnose import verdict as V

    if mode not in MODES:
        raise UserInputError(f"--mode {mode!r} is not one of {', '.join(MODES)}; use --exact or --fast")
    dev = resolve_device(device)  # before anything is read: a bad --device is a one-line error
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
    records = analyse(ck, mode=mode, workers=workers, progress=progress, device=str(dev))
    seconds = time.perf_counter() - t0
    report = V.build_report(ck, records, mode=mode, target_optim=target_optim, data=data)
    report["seconds"] = round(seconds, 3)
    report["device"] = str(dev)
    report["fast_precision"] = auto_precision(dev.type)
    if per_matrix:
        report["matrices"] = records
    return report

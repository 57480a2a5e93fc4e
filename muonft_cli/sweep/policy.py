"""The sweep's decisions from its index: best learning rates, which weights to prune, which evals to queue.

Owns the paper's selection rule as the running sweep applies it (the best LR of a group = lowest mean
validation PPL over seeds; an LR with a failed seed is ineligible), when a group counts as finished (every one
of its cells done or failed), weight pruning (checkpoints of done cells; full-model weights off the best LR,
only once the group has finished, so a later seed cannot make a pruned LR the best), and the discovery of
forgetting evaluations (the cells at the best LR of every finished group). No process control here: that is
`muonft_cli.sweep.scheduler`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

from muonft_cli.sweep.index import SweepIndex
from muonft_cli.sweep.jobs import Job, cell_eval_job
from muonft_cli.sweep.plan import SweepPlan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_FINISHED = ("done", "failed")


def _finished(rec: dict | None, hash_: str) -> bool:
    return rec is not None and rec.get("hash") == hash_ and rec.get("status") in _FINISHED


def cell_ppl(rec: dict, metric: str) -> float | None:
    """The validation PPL of a done cell record (`final` = last eval, `best` = best eval)."""
    s = rec.get("summary") or {}
    val = s.get("best_val_ppl") if metric == "best" else s.get("val_ppl")
    if val is None:
        val = s.get("val_ppl") if metric == "best" else s.get("best_val_ppl")
    try:
        val = float(val)
    except (TypeError, ValueError):
        return None
    return val


def best_lrs(plan: SweepPlan, latest: dict[str, dict]) -> dict[tuple, float]:
    """group -> best LR so far (lowest mean PPL over the done seeds; an LR with a failed seed is ineligible)."""
    per: dict[tuple, dict[float, list[float]]] = {}
    for c in plan.cells:
        rec = latest.get(c.id)
        if not _finished(rec, c.hash):
            continue
        ppl = cell_ppl(rec, plan.metric) if rec["status"] == "done" else None
        per.setdefault(c.group, {}).setdefault(c.lr, []).append(
            ppl if ppl is not None and math.isfinite(ppl) else math.inf)
    out = {}
    for g, curve in per.items():
        means = {lr: sum(v) / len(v) for lr, v in curve.items()}
        lr, m = min(means.items(), key=lambda kv: (kv[1], kv[0]))
        if math.isfinite(m):
            out[g] = lr
    return out


def finished_groups(plan: SweepPlan, latest: dict[str, dict]) -> set[tuple]:
    """The groups (LR curves) whose every cell, over all LRs and seeds, is done or failed for its config."""
    state: dict[tuple, bool] = {}
    for c in plan.cells:
        state[c.group] = state.get(c.group, True) and _finished(latest.get(c.id), c.hash)
    return {g for g, ok in state.items() if ok}


def _delete_weights(run_dir: Path, full_model: bool) -> bool:
    """Delete checkpoints (always) and, for full fine-tuning, the model weights in final/ and best/."""
    deleted = False
    ck = run_dir / "checkpoints"
    if ck.is_dir():
        shutil.rmtree(ck, ignore_errors=True)
        deleted = True
    if full_model:
        for sub in ("final", "best"):
            d = run_dir / sub
            if not d.is_dir():
                continue
            for p in d.iterdir():
                if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".safetensors.index.json")):
                    p.unlink()
                    deleted = True
            if deleted:
                (d / "WEIGHTS_DELETED").write_text(
                    "muonft sweep deleted this model's weights: it was not at its group's best learning rate "
                    "(re-run with --keep-weights to keep them).\n", encoding="utf-8")
    return deleted


def prune_weights(plan: SweepPlan, out: Path, index: SweepIndex) -> list[str]:
    """Delete weights that are no longer needed; returns the ids of the cells pruned.

    Checkpoints of every finished cell go. Full-model `final/`/`best/` weights go once the cell's group has
    finished (every seed of every LR), unless the cell is at the group's best LR (all its seeds kept): while
    seeds still run, the mean PPLs can still move the best LR. LoRA adapters are small and always kept.
    """
    latest = index.latest()
    best = best_lrs(plan, latest)
    done_groups = finished_groups(plan, latest)
    pruned = []
    for c in plan.cells:
        rec = latest.get(c.id)
        if not _finished(rec, c.hash) or rec.get("weights_deleted") == "all":
            continue
        keep_model = c.method != "full" or c.group not in done_groups or best.get(c.group) == c.lr
        if keep_model and rec.get("weights_deleted") == "checkpoints":
            continue
        _delete_weights(out / "cells" / c.id, full_model=not keep_model)
        index.append({**rec, "weights_deleted": "checkpoints" if keep_model else "all"})
        pruned.append(c.id)
    return pruned


def forgetting_jobs(plan: SweepPlan, out: Path, latest: dict[str, dict]) -> list[Job]:
    """Forgetting evaluations for the done cells at the best LR of every finished group (needs reference
    data)."""
    if not plan.reference_data:
        return []
    done_groups = finished_groups(plan, latest)
    best = best_lrs(plan, latest)
    return [cell_eval_job(plan, out, c) for c in plan.cells
            if c.group in done_groups and best.get(c.group) == c.lr and latest[c.id].get("status") == "done"]

"""The sweep's jobs: what each subprocess of a sweep runs, and how to read what it reported.

Owns the `Job` (pretrain a base, evaluate a base, fine-tune a cell, a cell's forgetting evaluation), its run
config (a cell's `train.run_name` is its cell id, a base's `base:NAME`: their names in the `--report-to`
backends) and `muonft` command line (`--resume` when its run directory has a checkpoint, else `--overwrite`),
and the reading of a finished process: its JSON result on stdout, its error line on stderr, and whether it was
the engine's "cannot resume" refusal (`muonft_cli.errors.ResumeRefusedError`).
"""

from __future__ import annotations

import copy
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from muonft_cli import config as C
from muonft_cli.sweep.plan import BaseSpec, Cell, SweepPlan, config_hash, split_seeds

#: How `muonft finetune` / `pretrain` start the stderr line of a refused `--resume` (a `ResumeRefusedError`:
#: the CLI prints `error: ` + the message, which always starts with `--resume: `).
RESUME_REFUSED_PREFIX = "error: --resume:"


@dataclass
class Job:
    """One subprocess of the sweep.

    kind: `base` (pretrain a base), `base_eval` (a base's PPL on the fine-tuning validation split),
    `base_ref` (a base's PPL on the reference set, for forgetting), `cell` (one fine-tuning run), `cell_eval`
    (forgetting: the reference-set PPL of a cell at its group's best LR, the model alone). Base numbers are
    measured once per validation split (`split_seeds`), never again per cell.
    """

    id: str
    kind: str
    hash: str
    out: Path
    config: dict
    deps: list[str]
    cell: Cell | None = None
    base: BaseSpec | None = None
    seed: int | None = None


def default_engine() -> list[str]:
    """The command that runs one cell: this Python's `-m muonft_cli`."""
    return [sys.executable, "-m", "muonft_cli"]


def _base_model_path(out: Path, b: BaseSpec) -> str:
    return b.path if b.path is not None else str(out / "bases" / b.name / "final")


def _base_deps(b: BaseSpec) -> list[str]:
    return [f"base:{b.name}"] if b.pretrain is not None else []


def base_eval_id(name: str, seed: int, reference: bool = False) -> str:
    """Index id of a base's evaluation on the fine-tuning validation split (or the reference set) of `seed`."""
    return f"{'base_ref' if reference else 'base_eval'}:{name}:s{seed}"


def _eval_config(config: dict, model: str, seed: int | None = None, data: str | None = None) -> dict:
    """A run config turned into a `muonft eval --model-only` config: that model, on `data` (default: the
    fine-tuning data) with the same split settings, no forgetting section."""
    cfg = copy.deepcopy(config)
    cfg.pop("output", None)
    cfg = C.merge_dicts(cfg, {"model": {"name_or_path": model}, "eval": {"reference_data": None},
                              "lora": {"rank": None}})
    if data is not None:
        cfg["data"] = {**(cfg.get("data") or {}), "path": data}
    if seed is not None:
        cfg["train"] = {**(cfg.get("train") or {}), "seed": seed}
    return cfg


def static_jobs(plan: SweepPlan, out: Path) -> list[Job]:
    """The jobs known before anything ran: pretrain bases, evaluate bases (once per validation split, on the
    fine-tuning data and on the reference set), and every cell. Forgetting evaluations are added while the
    sweep runs (`muonft_cli.sweep.policy.forgetting_jobs`)."""
    jobs: list[Job] = []
    for b in plan.bases.values():
        if b.pretrain is not None:
            pre = copy.deepcopy(b.pretrain)
            pre.pop("output", None)
            pre["train"] = {**(pre.get("train") or {}), "run_name": f"base:{b.name}"}
            jobs.append(Job(id=f"base:{b.name}", kind="base", hash=b.hash, out=out / "bases" / b.name,
                            config=pre, deps=[], base=b))
        for seed in sorted(set(split_seeds(plan).values())):
            for ref in [False] + ([True] if plan.reference_data else []):
                cfg = _eval_config(plan.run, _base_model_path(out, b), seed, plan.reference_data if ref else None)
                h = config_hash([b.hash, {k: v for k, v in cfg.items() if k != "model"}])
                jobs.append(Job(id=base_eval_id(b.name, seed, ref), kind="base_ref" if ref else "base_eval",
                                hash=h, out=out / "bases" / f"{b.name}-eval-s{seed}", config=cfg,
                                deps=_base_deps(b), base=b, seed=seed))
    for c in plan.cells:
        b = plan.bases[c.base]
        cfg = copy.deepcopy(c.config)
        cfg["model"]["name_or_path"] = _base_model_path(out, b)
        cfg["train"] = {**(cfg.get("train") or {}), "run_name": c.id}  # its name in the logging backends
        jobs.append(Job(id=c.id, kind="cell", hash=c.hash, out=out / "cells" / c.id, config=cfg,
                        deps=_base_deps(b), cell=c, base=b, seed=c.seed))
    return jobs


def cell_eval_job(plan: SweepPlan, out: Path, c: Cell) -> Job:
    """The forgetting evaluation of a finished cell: its final model alone on the reference set."""
    cfg = _eval_config(c.config, str(out / "cells" / c.id / "final"), data=plan.reference_data)
    return Job(id=f"ref:{c.id}", kind="cell_eval", hash=c.hash, out=out / "cells" / c.id, config=cfg,
               deps=[c.id], cell=c, base=plan.bases[c.base], seed=c.seed)


def command(j: Job, cfg_path: Path, force_overwrite: bool = False) -> tuple[list[str], bool]:
    """The `muonft` arguments of a job, and whether it resumes a checkpoint."""
    if j.kind in ("base_eval", "base_ref", "cell_eval"):
        return ["eval", "--config", str(cfg_path), "--model", str(j.config["model"]["name_or_path"]),
                "--model-only", "--json"], False
    args = ["pretrain" if j.kind == "base" else "finetune", "--config", str(cfg_path), "--out", str(j.out),
            "--json", "--quiet"]
    if j.out.exists() and any(j.out.iterdir()):
        if has_checkpoint(j.out) and not force_overwrite:
            return args + ["--resume"], True
        return args + ["--overwrite"], False
    return args, False


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint (`checkpoints/step-*`) to resume."""
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any(p.is_dir() and p.name.startswith("step-") for p in ck.iterdir())


def last_json(path: Path) -> dict | None:
    """The last JSON object line of a job's stdout (its `--json` result), or None."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def _stderr_lines(path: Path, offset: int) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def error_line(path: Path, code: int, offset: int = 0) -> str:
    """One line saying how a job's process ended: `exit N: <its last error line>` or `killed by SIGNAME`.

    `offset`: where this attempt's part of the (appended-to) stderr log starts.
    """
    lines = _stderr_lines(path, offset)
    errs = [ln for ln in lines if ln.lower().startswith("error") or "Error" in ln]
    msg = (errs or lines or [""])[-1][:500]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by {name}" + (f": {msg}" if msg else "")
    return f"exit {code}" + (f": {msg}" if msg else "")


def resume_refused(path: Path, code: int, offset: int = 0) -> bool:
    """Whether a `--resume` attempt ended in the engine's "cannot resume" refusal (exit 2 and, as the last
    `error:` line of this attempt's stderr, a `ResumeRefusedError`), rather than in any other error."""
    if code != 2:
        return False
    errs = [ln for ln in _stderr_lines(path, offset) if ln.startswith("error:")]
    return bool(errs) and errs[-1].startswith(RESUME_REFUSED_PREFIX)

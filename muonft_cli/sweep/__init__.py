"""`muonft sweep`: resumable learning-rate × method × optimizer × rank × seed grids.

Owns the sweep recipe schema (a run recipe plus a `sweep:` section), its deterministic expansion into cells,
the append-only `sweep.jsonl` index, and the scheduler that runs every cell as a separate
`python -m muonft_cli finetune` process. Aggregation, tables and plots live in `muonft_cli.sweep.report`.

The paper's whole method ("Can Muon Fine-tune Adam-Pretrained Models?", Qu et al. 2026, §3 Table 1 / Fig. 4,
§4.4 Fig. 5) is "best validation perplexity over a learning-rate sweep, averaged over 3 seeds", per
(pretrained model, full/LoRA, optimizer[, rank]); a sweep runs exactly that grid.

Sweep recipe (every key below `sweep:` is checked strictly; the other sections are the run recipe that every
cell starts from, see `muonft_cli.config`):

```yaml
data: {path: builtin:kjv, seq_len: 128}
train: {steps: 300, eval_every: 50}
sweep:
  bases:                       # name -> a local model (path) or a pretrain run recipe, run first and cached
    adam: {pretrain: {model: {preset: tiny}, data: {path: builtin:shakespeare}, optimizer: {name: adamw}}}
    llama: {path: meta-llama/Llama-2-7b-hf, pretrained_with: adamw}
  methods: [full, lora]
  optims: [adamw, muon]
  lr: {full: {adamw: [1e-4, 3e-4]}, lora: {adamw: [1e-3], muon: [1e-3]}}   # per method x optim
  lora_ranks: [8]
  alpha_equals_2r: true        # lora.alpha = 2 * rank (paper); false keeps the recipe's lora.alpha
  seeds: [0, 1, 2]
  axes: {schedule.warmup_ratio: [0.0, 0.03]}   # any other config key as an extra axis
  metric: final                # final | best: which validation PPL of a run counts
  reference_data: builtin:shakespeare          # forgetting (default: the recipe's eval.reference_data)
```

Index and resumption: `sweep.jsonl` holds one JSON record per event (append-only, one `write` per line, fsync'd;
a torn last line after SIGKILL is ignored), the latest record of an id wins. A restart skips `done` cells whose
config hash matches, resumes interrupted ones (`--resume` when the run has a checkpoint, else `--overwrite`),
re-runs cells whose config changed, and leaves `failed` ones alone unless `retry_failed`. Every cell process
holds an inherited `flock` on `locks/<id>.lock` for its whole life and gets SIGTERM (checkpoint and exit) when
the sweep process dies, so a restarted sweep never runs a cell twice at the same time.
"""

from __future__ import annotations

import copy
import dataclasses
import fcntl
import hashlib
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

from muonft_cli import config as C
from muonft_cli.errors import ConfigError, MuonftError, UserInputError

METHODS = ("full", "lora")
METRICS = ("final", "best")
SWEEP_KEYS = ("name", "bases", "methods", "optims", "lr", "lora_ranks", "alpha_equals_2r", "seeds", "axes",
              "metric", "reference_data", "per_optim")
BASE_KEYS = ("path", "pretrain", "pretrained_with", "label")
INDEX = "sweep.jsonl"
PLAN_FILE = "sweep.yaml"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# keys the sweep sets itself in every cell (an extra axis may not fight over them)
_OWNED_KEYS = ("model.name_or_path", "optimizer.name", "optimizer.lr", "lora.rank", "train.seed", "output.dir")


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class BaseSpec:
    """One base model of the sweep: a local/hub model, or a pretrain run recipe the sweep runs first."""

    name: str
    path: str | None
    pretrain: dict | None
    pretrained_with: str | None
    label: str
    hash: str

    @property
    def family(self) -> str | None:
        """`adam` | `muon` | None: the optimizer family that pretrained it (matched vs mismatched)."""
        return optim_family(self.pretrained_with) if self.pretrained_with else None


@dataclass(frozen=True)
class Cell:
    """One fine-tuning run of the grid."""

    id: str
    base: str
    method: str
    optim: str
    lr: float
    rank: int | None
    seed: int
    axes: tuple[tuple[str, Any], ...]
    config: dict = field(compare=False, hash=False, repr=False)
    hash: str = ""

    @property
    def group(self) -> tuple:
        """(base, method, optim, rank, axes): the cells of one LR curve, over LRs and seeds."""
        return (self.base, self.method, self.optim, self.rank, self.axes)


@dataclass
class SweepPlan:
    """A validated, expanded sweep."""

    recipe: dict  # the whole resolved recipe (run sections + sweep:), as saved in sweep.yaml
    run: dict  # the run-recipe part every cell starts from
    name: str
    bases: dict[str, BaseSpec]
    methods: list[str]
    optims: list[str]
    lrs: dict[str, dict[str, list[float]]]
    lora_ranks: list[int]
    alpha_equals_2r: bool
    seeds: list[int]
    axes: dict[str, list[Any]]
    metric: str
    reference_data: str | None
    cells: list[Cell]


def optim_family(name: str) -> str:
    """Map an optimizer name to its family for matched/mismatched: `adamw` -> adam, Muon variants -> muon."""
    return "adam" if name.startswith("adam") and name != "adamuon" else "muon"


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """Short, stable hash of a JSON-able config (sorted keys)."""
    return hashlib.sha256(_canon(obj).encode()).hexdigest()[:12]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "_".join(_fmt_value(x) for x in v)
    return str(v)


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in s)


def cell_id(base: str, method: str, optim: str, lr: float, rank: int | None, seed: int,
            axes: Iterable[tuple[str, Any]] = ()) -> str:
    """Readable, filesystem-safe id, e.g. `adam-lora-r8-muon-lr0.003-s1`."""
    parts = [base, method + (f"-r{rank}" if rank is not None else ""), optim, f"lr{lr:g}", f"s{seed}"]
    parts += [f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in axes]
    return _safe("-".join(parts))


def _check_list(where: str, value: Any, problems: list[str], kind: type, allowed: Sequence | None = None,
                positive: bool = False, allow_zero: bool = False) -> list:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: expected a non-empty list, got {value!r}")
        return []
    out = []
    for i, v in enumerate(value):
        sub: list[str] = []
        v2 = C._coerce(v, kind, f"{where}[{i}]", sub)
        if sub:
            problems.extend(sub)
            continue
        if allowed is not None and v2 not in allowed:
            problems.append(f"{where}[{i}]: {v2!r} is not one of {', '.join(map(str, allowed))}"
                            f"{C._did_you_mean(str(v2), map(str, allowed))}")
            continue
        if positive and (v2 < 0 or (v2 == 0 and not allow_zero)):
            problems.append(f"{where}[{i}]: must be {'>= 0' if allow_zero else '> 0'}, got {v2}")
            continue
        out.append(v2)
    if len(set(map(_canon, out))) != len(out):
        problems.append(f"{where}: has duplicate values {value!r}")
    return out


def _validate_run(data: dict, where: str, problems: list[str]) -> C.RunConfig | None:
    try:
        return C.from_dict(copy.deepcopy(data))
    except ConfigError as e:
        problems.extend(f"{where}{p}" for p in e.problems)
    return None


def _apply_dotted(data: dict, key: str, value: Any) -> dict:
    return C.merge_dicts(data, C.nest(key.split("."), value))


def plan_from_dict(recipe: dict, origin: str = "recipe") -> SweepPlan:
    """Validate a sweep recipe mapping and expand it into cells.

    Args:
        recipe: the parsed YAML (run sections + a `sweep:` mapping).
        origin: name used in messages.

    Returns:
        The `SweepPlan`. Raises `ConfigError` listing every problem at once (unknown keys with did-you-mean,
        types, ranges, missing learning rates, invalid cell configs).
    """
    problems: list[str] = []
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sweep"), dict):
        raise ConfigError(f"{origin}: a sweep recipe needs a 'sweep:' section (bases, methods, optims, lr, seeds);"
                          " see `muonft recipes show mismatch-small`")
    recipe = copy.deepcopy(recipe)
    sw = recipe["sweep"]
    run = {k: v for k, v in recipe.items() if k != "sweep"}
    for key in sw:
        if key not in SWEEP_KEYS:
            problems.append(f"unknown key 'sweep.{key}'{C._did_you_mean(str(key), SWEEP_KEYS)}")
    run_cfg = _validate_run(run, "", problems)

    # bases
    bases: dict[str, BaseSpec] = {}
    raw_bases = sw.get("bases")
    if not isinstance(raw_bases, dict) or not raw_bases:
        problems.append("sweep.bases: expected a mapping name -> {path: ...} or {pretrain: {...}}, e.g. "
                        "bases: {adam: {path: runs/pre-adam/final, pretrained_with: adamw}}")
        raw_bases = {}
    for name, spec in raw_bases.items():
        where = f"sweep.bases.{name}"
        if not isinstance(spec, dict):
            problems.append(f"{where}: expected a mapping with 'path' or 'pretrain', got {spec!r}")
            continue
        for key in spec:
            if key not in BASE_KEYS:
                problems.append(f"unknown key '{where}.{key}'{C._did_you_mean(str(key), BASE_KEYS)}")
        path, pre = spec.get("path"), spec.get("pretrain")
        if (path is None) == (pre is None):
            problems.append(f"{where}: give exactly one of 'path' (an existing model) or 'pretrain' (a run recipe)")
            continue
        with_ = spec.get("pretrained_with")
        if with_ is not None and with_ not in C.OPTIMIZERS:
            problems.append(f"{where}.pretrained_with: {with_!r} is not one of {', '.join(C.OPTIMIZERS)}"
                            f"{C._did_you_mean(str(with_), C.OPTIMIZERS)}")
            with_ = None
        if pre is not None:
            if not isinstance(pre, dict):
                problems.append(f"{where}.pretrain: expected a run recipe mapping, got {pre!r}")
                continue
            pcfg = _validate_run(pre, f"{where}.pretrain.", problems)
            if pcfg is None:
                continue
            if pcfg.model.preset is None and pcfg.model.model_config is None:
                problems.append(f"{where}.pretrain.model: give 'preset' (tiny | small) or 'model_config'")
            if pcfg.data.path is None:
                problems.append(f"{where}.pretrain.data.path: missing (the pretraining corpus)")
            with_ = with_ or pcfg.optimizer.name
            spec_hash = config_hash({k: v for k, v in C.to_dict(pcfg).items() if k != "output"})
        else:
            if not isinstance(path, str) or not path:
                problems.append(f"{where}.path: expected a model path or hub id, got {path!r}")
                continue
            spec_hash = config_hash({"path": path})
        bases[str(name)] = BaseSpec(name=str(name), path=path, pretrain=pre, pretrained_with=with_,
                                    label=str(spec.get("label") or name), hash=spec_hash)

    methods = _check_list("sweep.methods", sw.get("methods", ["full", "lora"]), problems, str, METHODS)
    optims = _check_list("sweep.optims", sw.get("optims", ["adamw", "muon"]), problems, str, C.OPTIMIZERS)
    ranks = _check_list("sweep.lora_ranks", sw.get("lora_ranks", [8]), problems, int, positive=True)
    seeds = _check_list("sweep.seeds", sw.get("seeds", [0]), problems, int, positive=True, allow_zero=True)
    a2r: list[str] = []
    alpha_equals_2r = C._coerce(sw.get("alpha_equals_2r", True), bool, "sweep.alpha_equals_2r", a2r)
    problems.extend(a2r)
    metric = sw.get("metric", "final")
    if metric not in METRICS:
        problems.append(f"sweep.metric: {metric!r} is not one of {', '.join(METRICS)}"
                        f"{C._did_you_mean(str(metric), METRICS)}")
    name = str(sw.get("name") or Path(origin).stem)
    reference = sw.get("reference_data")
    if reference is None and run_cfg is not None:
        reference = run_cfg.eval.reference_data
    if reference is not None and not isinstance(reference, str):
        problems.append(f"sweep.reference_data: expected a dataset spec string, got {reference!r}")

    # per-optimizer run-recipe overrides (e.g. Muon's scaling / aux lr), validated below with the cells
    per_optim = sw.get("per_optim") or {}
    if not isinstance(per_optim, dict):
        problems.append(f"sweep.per_optim: expected a mapping optimizer -> run-recipe overrides, got {per_optim!r}")
        per_optim = {}
    for k in per_optim:
        if k not in C.OPTIMIZERS:
            problems.append(f"sweep.per_optim.{k}: not an optimizer ({', '.join(C.OPTIMIZERS)})"
                            f"{C._did_you_mean(str(k), C.OPTIMIZERS)}")

    # learning rates: {method: {optim: [..]}}, or {method: [..]} for every optimizer, or one list for all
    raw_lr = sw.get("lr")
    lrs: dict[str, dict[str, list[float]]] = {}
    if raw_lr is None:
        problems.append("sweep.lr: missing; give the LR grid per method and optimizer, e.g. "
                        "lr: {full: {adamw: [1e-5, 3e-5]}, lora: {adamw: [1e-4, 3e-4]}}")
    else:
        if isinstance(raw_lr, dict):
            for k in raw_lr:
                if k not in METHODS:
                    problems.append(f"unknown key 'sweep.lr.{k}'{C._did_you_mean(str(k), METHODS)}")
        for m in methods:
            per_m = raw_lr.get(m) if isinstance(raw_lr, dict) else raw_lr
            if per_m is None:
                problems.append(f"sweep.lr.{m}: missing; give a list of learning rates for method '{m}'")
                continue
            lrs[m] = {}
            if isinstance(per_m, dict):
                for k in per_m:
                    if k not in C.OPTIMIZERS:
                        problems.append(f"unknown key 'sweep.lr.{m}.{k}'{C._did_you_mean(str(k), C.OPTIMIZERS)}")
            for o in optims:
                grid = per_m.get(o) if isinstance(per_m, dict) else per_m
                if grid is None:
                    problems.append(f"sweep.lr.{m}.{o}: missing; give a list of learning rates for {m} "
                                    f"fine-tuning with {o}")
                    continue
                lrs[m][o] = sorted(_check_list(f"sweep.lr.{m}.{o}", grid, problems, float, positive=True))

    # extra axes: any config key
    axes: dict[str, list[Any]] = {}
    raw_axes = sw.get("axes") or {}
    if not isinstance(raw_axes, dict):
        problems.append(f"sweep.axes: expected a mapping config.key -> list of values, got {raw_axes!r}")
        raw_axes = {}
    for key, values in raw_axes.items():
        if key in _OWNED_KEYS or key in ("lora.alpha",) and alpha_equals_2r:
            problems.append(f"sweep.axes.{key}: set by the sweep itself; use sweep.methods/optims/lr/"
                            "lora_ranks/seeds (or alpha_equals_2r: false)")
            continue
        if not isinstance(values, list) or not values:
            problems.append(f"sweep.axes.{key}: expected a non-empty list of values, got {values!r}")
            continue
        for v in values:
            _validate_run(_apply_dotted(run, key, v), f"sweep.axes.{key}={v!r}: ", problems)
        axes[str(key)] = values

    if problems:
        raise ConfigError(_dedupe(problems))

    cells: list[Cell] = []
    axis_keys = list(axes)
    validated: set = set()
    defaults = {k: v for k, v in C.to_dict(C.RunConfig()).items() if k != "output"}
    for bname, b in bases.items():
        model_ref = b.path if b.path is not None else f"sweep-base:{bname}:{b.hash}"
        for m in methods:
            for o in optims:
                for r in (ranks if m == "lora" else [None]):
                    for lr in lrs[m][o]:
                        for combo in itertools.product(*(axes[k] for k in axis_keys)):
                            ax = tuple(zip(axis_keys, combo))
                            for s in seeds:
                                cfg = copy.deepcopy(run)
                                cfg = C.merge_dicts(cfg, per_optim.get(o) or {})
                                for k, v in ax:
                                    cfg = _apply_dotted(cfg, k, v)
                                cfg = C.merge_dicts(cfg, {
                                    "model": {"name_or_path": model_ref},
                                    "optimizer": {"name": o, "lr": lr},
                                    "lora": {"rank": r},
                                    "train": {"seed": s},
                                })
                                if r is not None and alpha_equals_2r:
                                    cfg = _apply_dotted(cfg, "lora.alpha", float(2 * r))
                                if reference is not None:
                                    cfg = _apply_dotted(cfg, "eval.reference_data", reference)
                                cfg.pop("output", None)
                                # validate once per curve (lr and seed were checked above); hash the cell's
                                # complete config (defaults filled in) so recipe-default changes count too
                                gkey = (bname, m, o, r, ax)
                                if gkey not in validated:
                                    try:
                                        C.from_dict(copy.deepcopy(cfg))
                                        validated.add(gkey)
                                    except ConfigError as e:
                                        problems.extend(f"cell {bname}/{m}/{o}: {p}" for p in e.problems)
                                        continue
                                full = C.merge_dicts(defaults, cfg)
                                cid = cell_id(bname, m, o, lr, r, s, ax)
                                cells.append(Cell(id=cid, base=bname, method=m, optim=o, lr=lr, rank=r, seed=s,
                                                  axes=ax, config=cfg, hash=config_hash(full)))
    if problems:
        raise ConfigError(_dedupe(problems))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):  # only possible with axis values that print the same
        raise ConfigError("sweep.axes: two cells get the same id; use axis values that print differently")
    return SweepPlan(recipe=recipe, run=run, name=name, bases=bases, methods=methods, optims=optims, lrs=lrs,
                     lora_ranks=ranks, alpha_equals_2r=bool(alpha_equals_2r), seeds=seeds, axes=axes,
                     metric=metric, reference_data=reference, cells=cells)


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def load_plan(recipe: str | Path, overrides: Sequence[str] = ()) -> SweepPlan:
    """Read a sweep recipe, apply `--set key.path=value` overrides (run keys or `sweep.*`), validate, expand.

    Raises `UserInputError`/`ConfigError` (exit 2) naming every problem.
    """
    data = C.read_yaml(recipe)
    problems: list[str] = []
    for item in overrides:
        try:
            path, value = C.parse_override(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        data = C.merge_dicts(data, C.nest(path, value))
    if problems:
        raise ConfigError(problems)
    return plan_from_dict(data, origin=str(recipe))


# ------------------------------------------------------------------------------------------------ the index


class SweepIndex:
    """Append-only JSON-lines event log; the latest record per id is the state of that job.

    Each record is written with one `os.write` on an `O_APPEND` descriptor and fsync'd, so a SIGKILL can at
    worst leave a torn final line, which `read` skips.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> dict:
        """Add one record (a `time` field is added); returns it."""
        rec = {**record, "time": round(time.time(), 3)}
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # a torn line from a killed writer: start ours on a fresh line so it stays parseable
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def records(self) -> list[dict]:
        """Every parseable record, in order."""
        if not self.path.exists():
            return []
        out = []
        for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            raw = raw.strip()
            if not raw:
                continue
            try:
                rec = json.loads(raw)
            except json.JSONDecodeError:
                continue  # torn line from a kill mid-write
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
        return out

    def latest(self) -> dict[str, dict]:
        """id -> its latest record."""
        state: dict[str, dict] = {}
        for rec in self.records():
            state[rec["id"]] = rec
        return state


# ------------------------------------------------------------------------------------------------ jobs


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


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    started: float
    attempt: int
    lock_fd: int
    stdout: Path
    stderr: Path
    resumed: bool


def default_engine() -> list[str]:
    """The command that runs one cell: this Python's `-m muonft_cli`."""
    return [sys.executable, "-m", "muonft_cli"]


def _base_model_path(out: Path, b: BaseSpec) -> str:
    return b.path if b.path is not None else str(out / "bases" / b.name / "final")


def _base_deps(b: BaseSpec) -> list[str]:
    return [f"base:{b.name}"] if b.pretrain is not None else []


def split_seeds(plan: SweepPlan) -> dict[int, int]:
    """Seed -> the seed whose validation (and reference) split it uses. The engine holds documents out by
    `train.seed` unless `data.split_seed` fixes the split; then every seed shares the first seed's split and
    each base is evaluated once, not once per seed."""
    fixed = (plan.run.get("data") or {}).get("split_seed") is not None
    return {s: (plan.seeds[0] if fixed else s) for s in plan.seeds}


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


def _jobs(plan: SweepPlan, out: Path) -> list[Job]:
    """The static jobs: pretrain bases, evaluate bases (once per validation split, on the fine-tuning data and
    on the reference set), and every cell. Forgetting evaluations are added while the sweep runs
    (`_eval_jobs`)."""
    jobs: list[Job] = []
    for b in plan.bases.values():
        if b.pretrain is not None:
            pre = copy.deepcopy(b.pretrain)
            pre.pop("output", None)
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
        jobs.append(Job(id=c.id, kind="cell", hash=c.hash, out=out / "cells" / c.id, config=cfg,
                        deps=_base_deps(b), cell=c, base=b, seed=c.seed))
    return jobs


def _eval_jobs(plan: SweepPlan, out: Path, latest: dict[str, dict]) -> list[Job]:
    """Forgetting evaluations for the cells at the best LR of every finished group (needs reference data)."""
    if not plan.reference_data:
        return []
    finished = {}
    for c in plan.cells:
        rec = latest.get(c.id)
        ok = rec is not None and rec.get("hash") == c.hash and rec.get("status") in ("done", "failed")
        finished[c.group] = finished.get(c.group, True) and ok
    best = best_lrs(plan, latest)
    jobs = []
    for c in plan.cells:
        if not finished.get(c.group) or best.get(c.group) != c.lr or latest[c.id].get("status") != "done":
            continue
        b = plan.bases[c.base]
        cfg = _eval_config(c.config, str(out / "cells" / c.id / "final"), data=plan.reference_data)
        jobs.append(Job(id=f"ref:{c.id}", kind="cell_eval", hash=c.hash, out=out / "cells" / c.id, config=cfg,
                        deps=[c.id], cell=c, base=b, seed=c.seed))
    return jobs


def _command(j: Job, cfg_path: Path, out: Path, force_overwrite: bool) -> tuple[list[str], bool]:
    """The `muonft` arguments of a job, and whether it resumes a checkpoint."""
    if j.kind in ("base_eval", "base_ref", "cell_eval"):
        return ["eval", "--config", str(cfg_path), "--model", str(j.config["model"]["name_or_path"]),
                "--model-only", "--json"], False
    args = ["pretrain" if j.kind == "base" else "finetune", "--config", str(cfg_path), "--out", str(j.out),
            "--json", "--quiet"]
    if j.out.exists() and any(j.out.iterdir()):
        if _has_checkpoint(j.out) and not force_overwrite:
            return args + ["--resume"], True
        return args + ["--overwrite"], False
    return args, False


def _last_json(path: Path) -> dict | None:
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


def _error_line(path: Path, code: int) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    except OSError:
        lines = []
    errs = [ln for ln in lines if ln.lower().startswith("error") or "Error" in ln]
    msg = (errs or lines or [""])[-1][:500]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = str(-code)
        return f"killed by {name}" + (f": {msg}" if msg else "")
    return f"exit {code}" + (f": {msg}" if msg else "")


def _has_checkpoint(run_dir: Path) -> bool:
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any(p.is_dir() and p.name.startswith("step-") for p in ck.iterdir())


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the cell process when the sweep process dies (it checkpoints and exits)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setpgrp()  # own process group: a Ctrl-C at the terminal goes to the sweep, which stops cells itself


def _try_lock(path: Path) -> int | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def worker_env(worker: int, workers: int, gpus: int, threads: int | None = None) -> dict[str, str]:
    """Environment for one worker: CPU threads divided between workers; on GPUs one device per worker."""
    env = dict(os.environ)
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        ncpu = os.cpu_count() or 1
    n = threads or max(1, ncpu // max(1, workers))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(n)
    if gpus > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devs = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = devs[worker % len(devs)]
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def _count_gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pragma: no cover
        return 0


# ------------------------------------------------------------------------------------------------ pruning


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
        if rec is None or rec.get("hash") != c.hash or rec.get("status") not in ("done", "failed"):
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


def prune_weights(plan: SweepPlan, out: Path, index: SweepIndex) -> list[str]:
    """Delete weights of done cells that are not at their group's current best LR; returns pruned ids.

    Checkpoints of every done cell go; full-model `final/`/`best/` weights go unless the cell is at its group's
    best LR (all its seeds kept). LoRA adapters are small and always kept.
    """
    latest = index.latest()
    best = best_lrs(plan, latest)
    pruned = []
    for c in plan.cells:
        rec = latest.get(c.id)
        if rec is None or rec.get("hash") != c.hash or rec.get("status") not in ("done", "failed"):
            continue
        if rec.get("weights_deleted") == "all":
            continue
        run_dir = out / "cells" / c.id
        keep_model = c.method != "full" or best.get(c.group) == c.lr
        if keep_model and rec.get("weights_deleted") == "checkpoints":
            continue
        _delete_weights(run_dir, full_model=not keep_model)
        index.append({**rec, "weights_deleted": "checkpoints" if keep_model else "all"})
        pruned.append(c.id)
    return pruned


# ------------------------------------------------------------------------------------------------ running


def _status_of(rec: dict | None, job: Job) -> str:
    if rec is None or rec.get("hash") != job.hash:
        return "pending"
    return str(rec.get("status", "pending"))


def run_sweep(
    plan: SweepPlan,
    out: str | Path,
    workers: int = 1,
    keep_weights: bool = False,
    retry_failed: bool = False,
    engine: Sequence[str] | None = None,
    on_event: Callable[[dict], None] | None = None,
    threads: int | None = None,
    poll_s: float = 0.2,
) -> dict:
    """Run (or resume) every job of the plan; returns counts `{"total", "skipped", "done", "failed"}` of cells.

    Args:
        plan: from `load_plan`.
        out: the sweep directory (created; holds sweep.yaml, sweep.jsonl, bases/, cells/, configs/, logs/).
        workers: parallel processes (CPU threads divided between them; on GPUs one device each, round-robin).
        keep_weights: keep every cell's checkpoints and full-model weights.
        retry_failed: run failed jobs again (default: keep their recorded failure).
        engine: the command prefix that runs a job (default `python -m muonft_cli`).
        on_event: called with each index record as it is written (display).
        threads: CPU threads per worker (default: available cores // workers).
        poll_s: how often running processes are polled.

    Raises:
        UserInputError: bad `workers`, or another sweep process holds this directory.
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running cells checkpointed and stopped.
    """
    out = Path(out)
    if workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {workers}")
    engine = list(engine or default_engine())
    for sub in ("configs", "logs", "locks", "cells", "bases"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sweep_lock = _try_lock(out / "locks" / "sweep.lock")
    if sweep_lock is None:
        raise UserInputError(f"another `muonft sweep` is running in '{out}': wait for it or stop it first")
    try:
        _save_plan(plan, out)
        return _Scheduler(plan, out, workers, keep_weights, retry_failed, engine, on_event, threads, poll_s).run()
    finally:
        os.close(sweep_lock)


def _save_plan(plan: SweepPlan, out: Path) -> None:
    p = out / PLAN_FILE
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(plan.recipe, sort_keys=False), encoding="utf-8")
    tmp.replace(p)


def _describe(j: Job) -> dict:
    if j.cell is None:
        return {"base": j.base.name if j.base else None, "seed": j.seed}
    c = j.cell
    return {"base": c.base, "method": c.method, "optim": c.optim, "lr": c.lr, "rank": c.rank, "seed": c.seed,
            "axes": [[k, v] for k, v in c.axes]}


class _Scheduler:
    """The main-thread loop: start ready jobs on free worker slots, record how each process ended."""

    def __init__(self, plan, out, workers, keep_weights, retry_failed, engine, on_event, threads, poll_s):
        self.plan, self.out, self.workers, self.keep_weights = plan, out, workers, keep_weights
        self.retry_failed, self.engine, self.threads, self.poll_s = retry_failed, engine, threads, poll_s
        self.emit = on_event or (lambda rec: None)
        self.index = SweepIndex(out / INDEX)
        self.gpus = _count_gpus()
        self.jobs: dict[str, Job] = {}
        self.state: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.queue: list[str] = []
        self.running: dict[int, _Running] = {}
        self.stopping = False
        self.skipped = 0

    # -- bookkeeping
    def _record(self, j: Job, status: str, **extra) -> dict:
        rec = self.index.append({"id": j.id, "kind": j.kind, "hash": j.hash, "status": status,
                                 "attempt": self.attempts.get(j.id, 0), **_describe(j), **extra})
        self.emit(rec)
        return rec

    def _add(self, j: Job, latest: dict[str, dict]) -> None:
        if j.id in self.jobs:
            return
        self.jobs[j.id] = j
        rec = latest.get(j.id)
        st = _status_of(rec, j)
        self.attempts[j.id] = int(rec.get("attempt", 0)) if st != "pending" and rec else 0
        if st == "done" or (st == "failed" and not self.retry_failed):
            self.state[j.id] = st
            self.skipped += j.kind == "cell"
            return
        self.state[j.id] = "pending"
        if rec is None or rec.get("hash") != j.hash:
            self._record(j, "pending")
        self.queue.append(j.id)

    def run(self) -> dict:
        latest = self.index.latest()
        for j in _jobs(self.plan, self.out):
            self._add(j, latest)
        for j in _eval_jobs(self.plan, self.out, latest):
            self._add(j, latest)

        def _stop(signum, frame):  # SIGTERM/SIGINT: cells checkpoint and stop; they stay "running" for a resume
            self.stopping = True
            for r in self.running.values():
                try:
                    r.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

        old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (self.queue or self.running) and not self.stopping:
                self._reap()
                self._fail_orphans()
                self._fill()
                if self.running or self.queue:
                    time.sleep(self.poll_s)
            if self.stopping:
                for r in self.running.values():
                    try:
                        r.proc.wait(timeout=300)
                    except subprocess.TimeoutExpired:
                        r.proc.kill()
                        r.proc.wait()
                    os.close(r.lock_fd)
                raise KeyboardInterrupt
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        if not self.keep_weights:
            prune_weights(self.plan, self.out, self.index)
        latest = self.index.latest()
        cells = [self.jobs[c.id] for c in self.plan.cells]
        return {"total": len(cells), "skipped": self.skipped,
                "done": sum(_status_of(latest.get(j.id), j) == "done" for j in cells),
                "failed": sum(_status_of(latest.get(j.id), j) == "failed" for j in cells)}

    def _fail_orphans(self) -> None:
        """Jobs whose dependency failed fail too (a base that could not be pretrained)."""
        for jid in list(self.queue):
            j = self.jobs[jid]
            bad = [d for d in j.deps if self.state.get(d) == "failed"]
            if bad:
                self.queue.remove(jid)
                self.state[jid] = "failed"
                self._record(j, "failed", error=f"{bad[0]} failed")

    def _fill(self) -> None:
        for slot in range(self.workers):
            if slot in self.running:
                continue
            ready = [jid for jid in self.queue if all(self.state.get(d) == "done" for d in self.jobs[jid].deps)]
            started = False
            for jid in ready:
                r = self._start(self.jobs[jid], slot)
                if r is not None:  # None: an orphaned process of a killed sweep still holds it; try later
                    self.queue.remove(jid)
                    self.running[slot] = r
                    started = True
                    break
            if not started:
                return

    def _start(self, j: Job, slot: int, force_overwrite: bool = False) -> _Running | None:
        lock_fd = _try_lock(self.out / "locks" / f"{_safe(j.id)}.lock")
        if lock_fd is None:
            return None
        name = _safe(j.id)
        cfg_path = self.out / "configs" / f"{name}.yaml"
        tmp = cfg_path.with_name(cfg_path.name + ".tmp")
        tmp.write_text(yaml.safe_dump(j.config, sort_keys=False), encoding="utf-8")
        tmp.replace(cfg_path)
        args, resumed = _command(j, cfg_path, self.out, force_overwrite)
        self.attempts[j.id] = self.attempts.get(j.id, 0) + 1
        stdout, stderr = self.out / "logs" / f"{name}.out", self.out / "logs" / f"{name}.err"
        with open(stdout, "wb") as fo, open(stderr, "ab") as fe:
            fe.write(f"\n=== attempt {self.attempts[j.id]}: {' '.join(args)}\n".encode())
            fe.flush()
            proc = subprocess.Popen(self.engine + args, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    env=worker_env(slot, self.workers, self.gpus, self.threads), pass_fds=(lock_fd,),
                                    preexec_fn=_set_pdeathsig)
        self.state[j.id] = "running"
        self._record(j, "running", resumed=resumed, pid=proc.pid)
        return _Running(job=j, proc=proc, started=time.time(), attempt=self.attempts[j.id], lock_fd=lock_fd,
                        stdout=stdout, stderr=stderr, resumed=resumed)

    def _reap(self) -> None:
        for slot, r in list(self.running.items()):
            code = r.proc.poll()
            if code is None:
                continue
            del self.running[slot]
            os.close(r.lock_fd)
            nxt = self._finish(r, code, slot)
            if nxt is not None:
                self.running[slot] = nxt

    def _finish(self, r: _Running, code: int, slot: int) -> _Running | None:
        j = r.job
        runtime = round(time.time() - r.started, 2)
        if code == 2 and r.resumed:
            # the engine refused to resume (e.g. a checkpoint of a different config): start the run afresh
            self._record(j, "running", note="resume refused, restarting: " + _error_line(r.stderr, code))
            return self._start(j, slot, force_overwrite=True)
        if code != 0:
            self.state[j.id] = "failed"
            self._record(j, "failed", error=_error_line(r.stderr, code), returncode=code, runtime_s=runtime)
            if j.kind == "cell":
                self._after_cell()
            return None
        result = _last_json(r.stdout)
        if result is None:
            self.state[j.id] = "failed"
            self._record(j, "failed", error="no JSON result on stdout", returncode=0, runtime_s=runtime)
            return None
        self.state[j.id] = "done"
        key = {"cell": "summary", "base": "summary"}.get(j.kind, "eval")
        self._record(j, "done", runtime_s=runtime, **{key: result})
        if j.kind == "cell":
            self._after_cell()
        return None

    def _after_cell(self) -> None:
        """Prune weights that are no longer needed; queue forgetting evals of groups that just finished."""
        if not self.keep_weights:
            prune_weights(self.plan, self.out, self.index)
        latest = self.index.latest()
        for j in _eval_jobs(self.plan, self.out, latest):
            self._add(j, latest)


# ------------------------------------------------------------------------------------------------ dry run


def describe_cells(plan: SweepPlan) -> list[dict]:
    """One row per cell (for `--dry-run`): id, base, method, optim, rank, lr, seed, axes, hash."""
    return [{"id": c.id, "base": c.base, "method": c.method, "optim": c.optim, "rank": c.rank, "lr": c.lr,
             "seed": c.seed, "axes": {k: v for k, v in c.axes}, "hash": c.hash} for c in plan.cells]


def load_saved_plan(out: str | Path) -> SweepPlan:
    """The plan a sweep directory was run with (its `sweep.yaml`)."""
    p = Path(out) / PLAN_FILE
    if not p.is_file():
        raise UserInputError(f"'{out}' is not a sweep directory (no {PLAN_FILE}): pass the --out of a "
                             "`muonft sweep` run")
    return plan_from_dict(C.read_yaml(p), origin=str(p))


def format_event(rec: dict) -> str | None:
    """One progress line for an index record (the CLI prints these on stderr)."""
    st, jid = rec.get("status"), rec.get("id")
    if st == "running":
        return f"  start    {jid}" + (" (resuming)" if rec.get("resumed") else "") + \
            (f"  [{rec['note']}]" if rec.get("note") else "")
    if st == "done":
        s = rec.get("summary") or {}
        ppl = s.get("val_ppl")
        ppl_txt = f"  val ppl {ppl:.3f}" if isinstance(ppl, (int, float)) else ""
        return f"  done     {jid}{ppl_txt}  ({rec.get('runtime_s') or 0:.0f} s)"
    if st == "failed":
        return f"  FAILED   {jid}: {rec.get('error')}"
    return None


FINETUNE_SWEEP_RECIPE = "recipe:sweep-finetune"  # shipped with the package: runs from any directory


def diagnose_sweep_command(model: str, data: str, rec: dict) -> str:
    """The `muonft sweep …` line `muonft diagnose` prints beside its finetune command.

    It sweeps the recommended method with the target optimizer over the recommended LR grid (3 seeds) using
    the shipped `recipe:sweep-finetune`, and marks the base's pretraining optimizer so the report shows the mismatch.

    Args:
        model: the diagnosed checkpoint.
        data: the fine-tuning dataset.
        rec: diagnose's recommendation (method, lora_rank, lr_grid, target_optim, pretrain_optimizer).
    """
    import shlex

    method, optim = rec.get("method", "lora"), rec.get("target_optim", "muon")
    fam = rec.get("pretrain_optimizer")
    pretrained_with = {"adam": "adamw", "muon": "muon"}.get(str(fam), "null")
    grid = ",".join(f"{x:g}" for x in sorted(set(rec.get("lr_grid") or [])))  # rounding may repeat values
    args = ["muonft", "sweep", FINETUNE_SWEEP_RECIPE, "--out", f"runs/sweep-{method}-{optim}",
            "--set", f"sweep.bases.model.path={model}", "--set", f"sweep.bases.model.pretrained_with={pretrained_with}",
            "--set", f"data.path={data}", "--set", f"sweep.methods=[{method}]", "--set", f"sweep.optims=[{optim}]"]
    if grid:
        args += ["--set", f"sweep.lr.{method}=[{grid}]"]
    ranks = rec.get("lora_rank")
    if method == "lora" and ranks:
        args += ["--set", f"sweep.lora_ranks=[{','.join(str(r) for r in ranks)}]"]
    return shlex.join(args) + " --workers 2"

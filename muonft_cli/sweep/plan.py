"""The sweep plan: a sweep recipe (run sections + `sweep:`) validated and expanded into bases and cells.

Owns the recipe's meaning (see `muonft_cli.sweep` for the YAML), the deterministic expansion of the grid into
`Cell`s with readable ids and config hashes (the hashes decide what a restarted sweep re-runs, so they must
never change for an unchanged recipe), and the `muonft sweep` line `muonft diagnose` prints. The `sweep:`
section's schema is `muonft_cli.config.SweepSection`, loaded by the run config's strict loader.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from muonft_cli import config as C
from muonft_cli._common import looks_like_hub_id, looks_local, optimizer_family
from muonft_cli.errors import ConfigError, UserInputError

METHODS = C.SWEEP_METHODS
METRICS = C.SWEEP_METRICS
PLAN_FILE = "sweep.yaml"
FINETUNE_SWEEP_RECIPE = "recipe:sweep-finetune"  # shipped with the package: runs from any directory
# keys the sweep sets itself in every cell (an extra axis may not fight over them)
_OWNED_KEYS = ("model.name_or_path", "optimizer.name", "optimizer.lr", "lora.rank", "train.seed", "output.dir")


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
        return optimizer_family(self.pretrained_with)


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
    variants: list[dict] = field(default_factory=list)  # [{name, where, set, lr}] (`config.SweepVariant`)


def _stable(obj: Any) -> Any:
    """`obj` with every run-config mapping in it as `config.stable_view` hashes it (old sweeps still resume)."""
    if isinstance(obj, list):
        return [_stable(x) for x in obj]
    if not isinstance(obj, dict):
        return obj
    return C.stable_view({k: _stable(v) for k, v in obj.items()})


def _canon(obj: Any) -> str:
    return json.dumps(_stable(obj), sort_keys=True, separators=(",", ":"), default=str)


def config_hash(obj: Any) -> str:
    """Short, stable hash of a JSON-able config (sorted keys)."""
    return hashlib.sha256(_canon(obj).encode()).hexdigest()[:12]


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "_".join(_fmt_value(x) for x in v)
    return str(v)


def safe_name(s: str) -> str:
    """`s` with every character but letters, digits and `-_.+=` replaced by `_` (file names of jobs)."""
    return "".join(c if c.isalnum() or c in "-_.+=" else "_" for c in s)


def cell_id(base: str, method: str, optim: str, lr: float, rank: int | None, seed: int,
            axes: Iterable[tuple[str, Any]] = ()) -> str:
    """Readable, filesystem-safe id, e.g. `adam-lora-r8-muon-lr0.003-s1`."""
    parts = [base, method + (f"-r{rank}" if rank is not None else ""), optim, f"lr{lr:g}", f"s{seed}"]
    parts += [f"{k.split('.')[-1]}={_fmt_value(v)}" for k, v in axes]
    return safe_name("-".join(parts))


def _validate_run(data: dict, where: str, problems: list[str]) -> C.RunConfig | None:
    try:
        return C.from_dict(copy.deepcopy(data))
    except ConfigError as e:
        problems.extend(f"{where}{p}" for p in e.problems)
    return None


def _apply_dotted(data: dict, key: str, value: Any) -> dict:
    return C.merge_dicts(data, C.nest(key.split("."), value))


def _base_spec(name: str, b: C.SweepBaseSection, problems: list[str]) -> BaseSpec | None:
    """A base of the section as a `BaseSpec` (a pretrain recipe validated as a run config)."""
    where = f"sweep.bases.{name}"
    with_ = b.pretrained_with
    if b.pretrain is not None:
        pcfg = _validate_run(b.pretrain, f"{where}.pretrain.", problems)
        if pcfg is None:
            return None
        if pcfg.model.preset is None and pcfg.model.model_config is None:
            problems.append(f"{where}.pretrain.model: give 'preset' (tiny | small) or 'model_config'")
        if pcfg.data.path is None:
            problems.append(f"{where}.pretrain.data.path: missing (the pretraining corpus)")
        with_ = with_ or pcfg.optimizer.name
        spec_hash = config_hash({k: v for k, v in C.to_dict(pcfg).items() if k != "output"})
    else:
        spec_hash = config_hash({"path": b.path})
    return BaseSpec(name=name, path=b.path, pretrain=b.pretrain, pretrained_with=with_, label=str(b.label or name),
                    hash=spec_hash)


def _lr_grids(sec: C.SweepSection) -> dict[str, dict[str, list[float]]]:
    """`sweep.lr` in its three spellings as {method: {optim: sorted LRs}} (the section is valid)."""
    out: dict[str, dict[str, list[float]]] = {}
    for m in sec.methods:
        per_m = sec.lr.get(m) if isinstance(sec.lr, dict) else sec.lr
        out[m] = {o: sorted(per_m.get(o) if isinstance(per_m, dict) else per_m) for o in sec.optims}
    return out


def _expand(plan_args: dict, run: dict, per_optim: dict, problems: list[str]) -> list[Cell]:
    """Every cell of the grid, in a fixed order (bases, methods, optimizers, ranks, LRs, axes, seeds)."""
    bases, lrs, axes = plan_args["bases"], plan_args["lrs"], plan_args["axes"]
    ranks, alpha_equals_2r, reference = plan_args["lora_ranks"], plan_args["alpha_equals_2r"], \
        plan_args["reference_data"]
    axis_keys = list(axes)
    all_lrs = sorted({lr for per_m in lrs.values() for grid in per_m.values() for lr in grid})
    defaults = {k: v for k, v in C.to_dict(C.RunConfig()).items() if k != "output"}
    validated: set = set()
    cells: list[Cell] = []
    variants = plan_args.get("variants") or []
    all_lrs = sorted(set(all_lrs) | {lr for v in variants for lr in v["lr"] or ()})
    grid = itertools.product(bases.values(), plan_args["methods"], plan_args["optims"], [*ranks, None], all_lrs,
                             itertools.product(*(axes[k] for k in axis_keys)), plan_args["seeds"],
                             [None, *variants])
    for b, m, o, r, lr, combo, s, var in grid:
        if (r is None) != (m == "full") or lr not in (var["lr"] if var and var["lr"] else lrs[m][o]):
            continue  # LoRA cells have a rank, full ones none; each (method, optimizer) has its own LRs
        if var is not None and not _variant_applies(var["where"], b, m, o):
            continue
        ax = tuple(zip(axis_keys, combo)) + ((("variant", var["name"]),) if var is not None else ())
        model_ref = b.path if b.path is not None else f"sweep-base:{b.name}:{b.hash}"
        cfg = C.merge_dicts(copy.deepcopy(run), per_optim.get(o) or {})
        for k, v in ax:
            if k != "variant":
                cfg = _apply_dotted(cfg, k, v)
        for k, v in (var["set"] if var is not None else {}).items():
            cfg = _apply_dotted(cfg, k, v)
        cfg = C.merge_dicts(cfg, {"model": {"name_or_path": model_ref}, "optimizer": {"name": o, "lr": lr},
                                  "lora": {"rank": r}, "train": {"seed": s}})
        if r is not None and alpha_equals_2r:
            cfg = _apply_dotted(cfg, "lora.alpha", float(2 * r))
        if reference is not None:
            cfg = _apply_dotted(cfg, "eval.reference_data", reference)
        cfg.pop("output", None)
        # validate once per curve (lr and seed were checked already); hash the cell's complete config (defaults
        # filled in) so that a change of a default counts too
        gkey = (b.name, m, o, r, ax, var["name"] if var is not None else None)
        if gkey not in validated:
            try:
                C.from_dict(copy.deepcopy(cfg))
                validated.add(gkey)
            except ConfigError as e:
                what = f"/{var['name']}" if var is not None else ""
                problems.extend(f"cell {b.name}/{m}/{o}{what}: {p}" for p in e.problems)
                continue
        cells.append(Cell(id=cell_id(b.name, m, o, lr, r, s, ax), base=b.name, method=m, optim=o, lr=lr, rank=r,
                          seed=s, axes=ax, config=cfg, hash=config_hash(C.merge_dicts(defaults, cfg))))
    return cells


def _variant_applies(where: dict, b: BaseSpec, method: str, optim: str) -> bool:
    """Whether a variant's `where` (`config.SweepWhere` as a dict) selects the cells of (base, method, optimizer)."""
    if where.get("methods") is not None and method not in where["methods"]:
        return False
    if where.get("optims") is not None and optim not in where["optims"]:
        return False
    if where.get("bases") is not None and b.name not in where["bases"]:
        return False
    if where.get("matched") is not None:
        fam = b.family
        if fam is None or optim == "auto" or (optimizer_family(optim) == fam) != where["matched"]:
            return False
    return True


def _variants(sec: C.SweepSection, problems: list[str]) -> list[dict]:
    """The section's variants as plain dicts; overrides of keys the sweep owns are refused here, the others are
    validated with each cell they apply to (`_expand`)."""
    out = []
    for i, v in enumerate(sec.variants or []):
        if not isinstance(v, C.SweepVariant) or not v.set:
            continue
        for key, value in v.set.items():
            if key in _OWNED_KEYS:
                problems.append(f"sweep.variants[{i}].set.{key}: set by the sweep itself; a variant may not change it")
        where = C.to_dict(v.where) if isinstance(v.where, C.SweepWhere) else {}
        out.append({"name": str(v.name), "where": where, "set": dict(v.set),
                    "lr": sorted(v.lr) if v.lr else None})
    return out


def plan_from_dict(recipe: dict, origin: str = "recipe") -> SweepPlan:
    """Validate a sweep recipe mapping and expand it into cells.

    Args:
        recipe: the parsed YAML (run sections + a `sweep:` mapping).
        origin: name used in messages.

    Returns:
        The `SweepPlan`. Raises `ConfigError` listing every problem at once (unknown keys with did-you-mean,
        types, ranges, missing learning rates, invalid cell configs).
    """
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sweep"), dict):
        raise ConfigError(f"{origin}: a sweep recipe needs a 'sweep:' section (bases, methods, optims, lr, seeds);"
                          " see `muonft recipes show mismatch-small`")
    recipe = copy.deepcopy(recipe)
    run = {k: v for k, v in recipe.items() if k != "sweep"}
    sec, problems = C.load_sweep_section(recipe["sweep"])
    run_cfg = _validate_run(run, "", problems)
    bases: dict[str, BaseSpec] = {}
    for name, b in (sec.bases or {}).items() if isinstance(sec.bases, dict) else ():
        spec = _base_spec(name, b, problems) if isinstance(b, C.SweepBaseSection) else None
        if spec is not None:
            bases[name] = spec
    reference = sec.reference_data
    if reference is None and run_cfg is not None:
        reference = run_cfg.eval.reference_data
    axes: dict[str, list[Any]] = {}
    for key, values in (sec.axes or {}).items() if isinstance(sec.axes, dict) else ():
        if key in _OWNED_KEYS or key == "lora.alpha" and sec.alpha_equals_2r:
            problems.append(f"sweep.axes.{key}: set by the sweep itself; use sweep.methods/optims/lr/"
                            "lora_ranks/seeds (or alpha_equals_2r: false)")
            continue
        if not isinstance(values, list) or not values:
            continue  # reported by the section's checks
        for v in values:
            _validate_run(_apply_dotted(run, key, v), f"sweep.axes.{key}={v!r}: ", problems)
        axes[key] = values
    variants = _variants(sec, problems)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    args = dict(bases=bases, methods=sec.methods, optims=sec.optims, lrs=_lr_grids(sec), lora_ranks=sec.lora_ranks,
                alpha_equals_2r=sec.alpha_equals_2r, seeds=sec.seeds, axes=axes, metric=sec.metric,
                reference_data=reference, variants=variants)
    cells = _expand(args, run, sec.per_optim or {}, problems)
    if not problems:
        problems += [f"sweep.variants: '{v['name']}' applies to no cell of the grid (check its where:)"
                     for v in variants if not any(_variant_applies(v["where"], b, m, o) for b in bases.values()
                                                  for m in sec.methods for o in sec.optims)]
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):  # only possible with axis values that print the same
        raise ConfigError("sweep.axes: two cells get the same id; use axis values that print differently")
    return SweepPlan(recipe=recipe, run=run, name=str(sec.name or Path(origin).stem), cells=cells, **args)


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


def load_saved_plan(out: str | Path) -> SweepPlan:
    """The plan a sweep directory was run with (its `sweep.yaml`)."""
    p = Path(out) / PLAN_FILE
    if not p.is_file():
        raise UserInputError(f"'{out}' is not a sweep directory (no {PLAN_FILE}): pass the --out of a "
                             "`muonft sweep` run")
    return plan_from_dict(C.read_yaml(p), origin=str(p))


def check_base_paths(plan: SweepPlan) -> None:
    """Fail fast when a base given by `path:` (and no `pretrain:`) names a local path that does not exist.

    A name counts as local when it looks like a path (`_common.looks_local`) or cannot be a hub id
    (`_common.looks_like_hub_id`, the rule `--model` uses); hub ids and `builtin:NAME` models are left to the
    engine (no network here). Torch-free, so `muonft sweep --dry-run` checks it too.

    Raises:
        ConfigError: one problem per missing base, all at once.
    """
    problems = []
    for b in plan.bases.values():
        if b.pretrain is not None or b.path is None or Path(b.path).expanduser().exists():
            continue
        if b.path.startswith("builtin:"):
            continue
        if looks_local(b.path) or not looks_like_hub_id(b.path):
            problems.append(f"sweep.bases.{b.name}.path: '{b.path}' does not exist: pass an existing model "
                            "folder or .gguf file, a hub id, or a pretrain: recipe")
    if problems:
        raise ConfigError(problems)


def split_seeds(plan: SweepPlan) -> dict[int, int]:
    """Seed -> the seed whose validation (and reference) split it uses. The engine holds documents out by
    `train.seed` unless `data.split_seed` fixes the split; then every seed shares the first seed's split and
    each base is evaluated once, not once per seed."""
    fixed = (plan.run.get("data") or {}).get("split_seed") is not None
    return {s: (plan.seeds[0] if fixed else s) for s in plan.seeds}


def describe_cells(plan: SweepPlan) -> list[dict]:
    """One row per cell (for `--dry-run`): id, base, method, optim, rank, lr, seed, axes, hash."""
    return [{"id": c.id, "base": c.base, "method": c.method, "optim": c.optim, "rank": c.rank, "lr": c.lr,
             "seed": c.seed, "axes": {k: v for k, v in c.axes}, "hash": c.hash} for c in plan.cells]


def diagnose_sweep_command(model: str, data: str, rec: dict) -> str:
    """The `muonft sweep …` line `muonft diagnose` prints beside its finetune command.

    It sweeps the recommended method with the target optimizer over the recommended LR grid (3 seeds) using
    the shipped `recipe:sweep-finetune`, and marks the base's pretraining optimizer so the report shows the mismatch.

    Args:
        model: the diagnosed checkpoint.
        data: the fine-tuning dataset.
        rec: diagnose's recommendation (method, lora_rank, lr_grid, target_optim, pretrain_optimizer).
    """
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

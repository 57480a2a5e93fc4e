"""`muonft plot`: the curves of one or several runs, and a sweep's figures redrawn.

Owns
- telling a run directory (the `--out` of pretrain/finetune: `metrics.jsonl`, `config.yaml`) from a sweep
  directory (`sweep.yaml`, `sweep.jsonl`), and the checks of `muonft plot`'s input (bad input is one
  `UserInputError` line, raised before anything is written);
- run curves (`plot_runs`): each run's `metrics.jsonl` records (`muonft_cli.train.rundir`) on shared axes, one
  panel per metric of `METRICS` (log y where the values span a decade), each run labelled from its
  `config.yaml` (`run_label`: `LoRA-Muon (r=8), lr 1e-3`);
- a sweep's figures redrawn into a folder (`plot_sweep`), by the aggregation of `muonft_cli.sweep.report`.
Writes the figures only, each whole or not at all; returns the paths written. The figure helpers (headless
panels, saving) are those of `muonft_cli.sweep.plots`. Torch-free.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

import yaml

from muonft_cli._common import read_jsonl, unwritable_dir_problem
from muonft_cli.errors import UserInputError
from muonft_cli.sweep.labels import OPTIM_NAMES, label

#: The metrics.jsonl keys `--metric` may name, with their axis labels.
METRICS = {"loss": "train loss", "val_loss": "validation loss", "val_ppl": "validation PPL",
           "lr": "learning rate", "grad_norm": "gradient norm (before clipping)", "tokens_per_s": "tokens / s"}
DEFAULT_METRICS = ("loss", "val_loss")
#: Always on a log scale (when positive); the others when their values span a decade.
_LOG_METRICS = ("val_ppl", "grad_norm")
#: Noisy per-step metrics: a curve of more than _SMOOTH_ABOVE points is drawn faint, a moving average over it.
_NOISY = ("loss", "grad_norm", "tokens_per_s")
_SMOOTH_ABOVE = 60
_SWEEP_FILES = ("sweep.yaml", "sweep.jsonl")
_RUN_FILES = ("metrics.jsonl", "config.yaml")
_HINT = "pass run directories (the --out of pretrain/finetune) or one sweep directory (the --out of `muonft sweep`)"


def plot(paths: Iterable[str | Path], out: str | Path | None = None,
         metrics: Iterable[str] | None = None) -> dict[str, Any]:
    """`muonft plot PATH...`: run curves of run directories, or the figures of one sweep directory.

    Returns:
        {"kind": "runs" | "sweep", "paths": [written files], ...}: for runs also "runs", "labels" (the legend,
        in the order of `paths`) and "metrics" (the panels drawn); for a sweep "sweep" and "plots" (name: path).
    """
    paths = [Path(p).expanduser() for p in paths]
    if not paths:
        raise UserInputError(f"nothing to plot: {_HINT}")
    kinds = [_kind(p) for p in paths]
    if "sweep" in kinds:
        if len(paths) > 1:
            raise UserInputError(f"'{paths[kinds.index('sweep')]}' is a sweep directory: plot one sweep at a "
                                 f"time, without other paths")
        if metrics:
            raise UserInputError("--metric is for run directories: a sweep's figures are fixed (PPL vs LR, "
                                 "validation curves, PPL vs rank); drop --metric")
        return plot_sweep(paths[0], out)
    return plot_runs(paths, out, metrics)


def _kind(p: Path) -> str:
    if not p.exists():
        raise UserInputError(f"'{p}' does not exist: {_HINT}")
    if p.is_dir() and any((p / f).is_file() for f in _SWEEP_FILES):
        return "sweep"
    if p.is_dir() and any((p / f).is_file() for f in _RUN_FILES):
        return "run"
    raise UserInputError(f"'{p}' is neither a run directory (no metrics.jsonl, config.yaml) nor a sweep "
                         f"directory (no sweep.yaml): {_HINT}")


# ------------------------------------------------------------------------------------------------- runs


def _fmt_lr(lr: Any) -> str:
    """1e-3, 3e-4, 2.5e-4 (the way the CLI's help writes learning rates)."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return "?"
    mantissa, exp = f"{float(lr):.3e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def run_label(run: str | Path) -> str:
    """A run's legend label from its `config.yaml` (and `env.json`'s mode): `Full-Adam, lr 3e-4`,
    `LoRA-Muon (r=8), lr 1e-3`, `Pretrain-Muon, lr 1e-3`; the folder's name when it has no config."""
    run = Path(run)
    cfg = _read_yaml(run / "config.yaml")
    if not cfg:
        return run.name or str(run)
    opt = cfg.get("optimizer") if isinstance(cfg.get("optimizer"), dict) else {}
    lora = cfg.get("lora") if isinstance(cfg.get("lora"), dict) else {}
    name = str(opt.get("name") or "adamw")
    rank = lora.get("rank")
    try:
        mode = json.loads((run / "env.json").read_text(encoding="utf-8")).get("mode")
    except (OSError, ValueError, AttributeError):
        mode = None
    if rank is None and mode == "pretrain":
        head = f"Pretrain-{OPTIM_NAMES.get(name, name)}"
    else:
        head = label("full" if rank is None else "lora", name, rank)
    return f"{head}, lr {_fmt_lr(opt.get('lr'))}"


def _value(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric (a later record of a step wins; null / NaN values are left out)."""
    pts: dict[int, float] = {}
    for r in records:
        step, v = r.get("step"), _value(r.get(metric))
        if isinstance(step, int) and v is not None:
            pts[step] = v
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def _smooth(ys: list[float]) -> list[float]:
    """A centred moving average over ~1/20 of the points (no lag, unlike an EMA); the window stays centred,
    shrinking towards the ends (the first and last points are themselves)."""
    n, half = len(ys), max(1, len(ys) // 40)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        w = ys[i - h:i + h + 1]
        out.append(sum(w) / len(w))
    return out


def _image_suffix_problem(out: Path) -> str | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kinds = FigureCanvasAgg.get_supported_filetypes()
    suffix = out.suffix[1:].lower()
    if suffix in kinds:
        return None
    what = f"has the suffix .{suffix}, which matplotlib cannot write" if suffix else "has no image suffix"
    return f"--out '{out}' {what}: end it in .png, .pdf or .svg (matplotlib writes {', '.join(sorted(kinds))})"


def plot_runs(runs: list[Path], out: str | Path | None = None,
              metrics: Iterable[str] | None = None) -> dict[str, Any]:
    """The curves of `runs` (run directories) into the image `out` (default: `RUN/curves.png` for one run), one
    panel per metric (default: train loss and validation loss, the panels with data). Bad input (an unknown
    metric, a run without records, a requested metric no run logged, an `--out` matplotlib cannot write) is a
    `UserInputError`, raised before anything is written."""
    runs = [Path(r) for r in runs]
    asked = [m.strip() for ms in (metrics or ()) for m in str(ms).split(",") if m.strip()]
    unknown = [m for m in asked if m not in METRICS]
    if unknown:
        raise UserInputError(f"unknown --metric '{unknown[0]}': choose from {', '.join(METRICS)} "
                             f"(repeat --metric for several panels)")
    chosen = list(dict.fromkeys(asked)) or list(DEFAULT_METRICS)
    if out is None:
        if len(runs) > 1:
            raise UserInputError("--out is required with several runs: pass the image to write, e.g. "
                                 "--out curves.png")
        out = runs[0] / "curves.png"
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserInputError(f"--out '{out}' is a directory: pass an image file, e.g. --out {out / 'curves.png'}")
    problem = _image_suffix_problem(out) or unwritable_dir_problem(out.parent)
    if problem:
        raise UserInputError(problem if problem.startswith("--out") else
                             f"--out '{out}' cannot be written ({problem}): pass a writable path")

    records = {}
    for r in runs:
        records[r] = read_jsonl(r / "metrics.jsonl")
        if not records[r]:
            raise UserInputError(f"run '{r}' has no metrics yet (its metrics.jsonl is missing or empty): plot it "
                                 f"once it has logged a step")
    labels = [run_label(r) for r in runs]
    if len(set(labels)) < len(labels):  # e.g. seeds of one config: tell them apart by folder
        names = [r.name for r in runs] if len({r.name for r in runs}) == len(runs) else [str(r) for r in runs]
        labels = [f"{lab} [{n}]" if labels.count(lab) > 1 else lab for lab, n in zip(labels, names)]
    data = {m: [_series(records[r], m) for r in runs] for m in chosen}
    for m in chosen:
        if asked and not any(xs for xs, _ in data[m]):
            why = " (validation is logged every --eval-every steps and needs a validation split)" \
                if m.startswith("val_") else ""
            raise UserInputError(f"no run has '{m}' values{why}: choose another --metric")
    panels_drawn = [m for m in chosen if any(xs for xs, _ in data[m])]
    if not panels_drawn:
        raise UserInputError(f"the runs have no {' or '.join(chosen)} values yet: pass --metric (one of "
                             f"{', '.join(METRICS)})")

    from matplotlib.ticker import FormatStrFormatter

    from muonft_cli.sweep.plots import panels, save_figure

    fig, axes = panels(len(panels_drawn), 4.0, per_row=3)
    for ax, m in zip(axes, panels_drawn):
        values = []
        for i, ((xs, ys), lab) in enumerate(zip(data[m], labels)):
            if not xs:
                continue
            values += ys
            col = f"C{i % 10}"
            if m in _NOISY and len(xs) > _SMOOTH_ABOVE:
                ax.plot(xs, ys, color=col, lw=0.8, alpha=0.3)
                ax.plot(xs, _smooth(ys), color=col, lw=1.8, label=lab)
            else:
                sparse = m.startswith("val_") or len(xs) <= 30
                ax.plot(xs, ys, color=col, lw=1.8, marker="o" if sparse else None, ms=3.5, label=lab)
        lo, hi = min(values), max(values)
        if lo > 0 and (m in _LOG_METRICS or (m != "lr" and hi / lo >= 10)):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            if hi / lo < 10:  # within a decade the minor ticks are the only labels
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
        ax.set_title(METRICS[m])
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    return {"kind": "runs", "paths": [str(out)], "runs": [str(r) for r in runs], "labels": labels,
            "metrics": panels_drawn}


# ------------------------------------------------------------------------------------------------ sweep


def plot_sweep(sweep_dir: Path, out: str | Path | None = None) -> dict[str, Any]:
    """Redraw the figures of a sweep directory into the folder `out` (default: the sweep directory itself), the
    way `muonft sweep --report` draws them (and nothing else: no summary files)."""
    from muonft_cli.sweep import report

    out = Path(out).expanduser() if out is not None else sweep_dir
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file: a sweep's figures go in a folder, pass --out DIR")
    if out.suffix and _image_suffix_problem(out) is None:
        raise UserInputError(f"--out '{out}' looks like an image file: a sweep has several figures, pass a "
                             f"folder as --out")
    problem = unwritable_dir_problem(out)
    if problem:
        raise UserInputError(f"--out '{out}' cannot be written ({problem}): pass a writable folder as --out")
    summary = report.summarise(sweep_dir)
    if not any(g["ppl_mean"] is not None for g in summary["groups"]):
        raise UserInputError(f"sweep '{sweep_dir}' has no cell with a validation PPL yet: nothing to plot (run or "
                             f"resume `muonft sweep`, then plot again)")
    out.mkdir(parents=True, exist_ok=True)
    plots = report.write_plots(summary, out)
    return {"kind": "sweep", "sweep": str(sweep_dir), "paths": list(plots.values()), "plots": plots}

"""Aggregation and tables of a `muonft sweep` (what `muonft sweep --report DIR` re-runs).

Owns the paper's reporting method ("Can Muon Fine-tune Adam-Pretrained Models?", Qu et al. 2026):
- per (base model, method, optimizer[, rank, extra axes]): the best learning rate by mean validation PPL over
  seeds, mean ± sample std (ddof=1) at that LR, and the whole PPL-vs-LR curve; an LR where any seed failed
  (diverged) is not eligible;
- Table 1 (§3): best PPL normalised by the base model's own PPL on the fine-tuning validation set; for each
  base and method the mismatch gap = normalised PPL with the mismatched optimizer − with the matched one, and the
  percentage by which LoRA shrinks that gap, 100·(gap_full − gap_lora)/gap_full (paper: 39 % / 78 %);
- mismatch mitigations (issue 14 §2): each sweep variant on a mismatched cell against the same cell without it —
  its gap, the share of the plain gap it closes, 100·(gap_plain − gap)/gap_plain, forgetting, and the drift
  ‖W − W₀‖ its runs recorded (Frobenius, spectral, max; `muonft_cli.optim.constraints.drift_norms`);
- the rank study (§4.4, Tables 14–16): best LR and PPL per LoRA rank; forgetting (§4.5) as the reference-set
  PPL at the best LR vs the base model's;
- figures: PPL vs LR (Fig. 4: solid = matched pretraining, dashed = mismatched; dark = full, light = LoRA),
  validation curves of the best runs (Fig. 3), best PPL vs rank (Fig. 5).
Outputs `summary.md`, `summary.csv`, `summary.json` and the PNGs of `muonft_cli.sweep.plots` in the sweep
directory. The terminal table is `muonft_cli.render.sweep_table`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable

from muonft_cli._common import atomic_write_text, optimizer_family, read_jsonl
from muonft_cli.sweep.index import INDEX, SweepIndex
from muonft_cli.sweep.jobs import base_eval_id
from muonft_cli.sweep.labels import OPTIM_NAMES, base_header, fmt_num, fmt_pm, label, table1_cell
from muonft_cli.sweep.plan import SweepPlan, load_saved_plan, split_seeds
from muonft_cli.sweep.plots import PLOTS, plot_mitigations, plot_ppl_vs_lr, plot_ppl_vs_rank, plot_val_curves
from muonft_cli.sweep.policy import cell_ppl



def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v


def _find(obj: Any, paths: Iterable[str]) -> float | None:
    """First numeric value at one of the dotted `paths` in a nested dict."""
    for path in paths:
        cur = obj
        for part in path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        v = _num(cur)
        if v is not None:
            return v
    return None


def eval_ppl(rec: dict | None, hash_: str | None = None) -> float | None:
    """The model's PPL in a finished `muonft eval --json` job record of the index (the sweep's evaluations are
    `--model-only`); None unless the job is done (and, with `hash_`, of that config)."""
    if not rec or rec.get("status") != "done" or (hash_ is not None and rec.get("hash") != hash_):
        return None
    return _find(rec.get("eval") or {}, ("data.model.ppl",))


# ------------------------------------------------------------------------------------------------ collect


def read_metrics(path: Path) -> list[dict]:
    """Records of a run's metrics.jsonl (a torn last line of a killed run is dropped; a resumed run rewrites
    the file whole)."""
    return read_jsonl(path)


def val_curve(path: Path) -> list[tuple[int, float]]:
    """(step, val_ppl) points of a run's metrics.jsonl."""
    pts = {}
    for rec in read_metrics(path):
        ppl = _num(rec.get("val_ppl"))
        if ppl is None and _num(rec.get("val_loss")) is not None:
            ppl = math.exp(min(float(rec["val_loss"]), 50.0))
        step = rec.get("step")
        if ppl is not None and isinstance(step, int):
            pts[step] = ppl
    return sorted(pts.items())


PLATEAU_FRACTION = 0.2   # the last fifth of pretraining ...
PLATEAU_TOLERANCE = 0.01  # ... improves validation loss by less than 1 %: the base has plateaued


def convergence(path: Path, fraction: float = PLATEAU_FRACTION) -> dict | None:
    """How far a pretraining run had converged, from its metrics.jsonl: validation loss at the last eval and
    at the last eval at or before the start of the final `fraction` of its steps, and the relative
    improvement between them (`plateaued` when below PLATEAU_TOLERANCE). None without two such evals."""
    pts = [(s, math.log(p)) for s, p in val_curve(path)]
    if len(pts) < 2:
        return None
    last_step, last = pts[-1]
    cut = last_step * (1.0 - fraction)
    before = [pt for pt in pts[:-1] if pt[0] <= cut + 1e-9]
    if not before:
        return None
    start_step, start = before[-1]
    best_step, best = min(pts, key=lambda pt: pt[1])
    rel = (start - last) / start if start else None
    return {"steps": last_step, "window": [start_step, last_step], "val_loss_start": start, "val_loss_end": last,
            "best_val_loss": best, "best_step": best_step, "rel_improvement": rel,
            "plateaued": rel is not None and rel < PLATEAU_TOLERANCE}


def collect(plan: SweepPlan, out: str | Path) -> tuple[list[dict], dict[str, dict]]:
    """Flatten a sweep directory into cell rows and base rows for `aggregate`.

    The engine holds out validation documents by `train.seed` (unless `data.split_seed` fixes them), so a base
    is evaluated once per validation split (`sweep.split_seeds`) and every cell is normalised by the base's PPL
    on its own split; forgetting compares a cell's reference-set PPL with the base's on the same split.

    Returns:
        (cells, bases): cells = [{id, base, method, optim, rank, axes, lr, seed, status, ppl, norm, ref_ppl,
        base_ref_ppl, error, runtime_s, curve}], bases = {name: {label, pretrained_with, ppl, ppl_by_seed,
        ref_ppl, ref_by_seed}}.
    """
    out = Path(out)
    latest = SweepIndex(out / INDEX).latest()
    splits = split_seeds(plan)

    def base_ppl(name: str, seed: int, reference: bool) -> float | None:
        return eval_ppl(latest.get(base_eval_id(name, splits[seed], reference)))

    def mean(values: dict) -> float | None:
        return statistics.fmean(values.values()) if values else None

    bases: dict[str, dict] = {}
    for name, b in plan.bases.items():
        by_seed = {s: v for s in plan.seeds if (v := base_ppl(name, s, False)) is not None}
        ref_by_seed = {s: v for s in plan.seeds if (v := base_ppl(name, s, True)) is not None}
        bases[name] = {"label": b.label, "pretrained_with": b.pretrained_with, "ppl": mean(by_seed),
                       "ppl_by_seed": by_seed, "ref_ppl": mean(ref_by_seed), "ref_by_seed": ref_by_seed,
                       "pretrain_runtime_s": (latest.get(f"base:{name}") or {}).get("runtime_s"),
                       "convergence": (convergence(out / "bases" / name / "metrics.jsonl")
                                       if b.path is None else None)}
    cells = []
    for c in plan.cells:
        rec = latest.get(c.id)
        ok = rec is not None and rec.get("hash") == c.hash
        status = rec.get("status", "pending") if ok else "pending"
        ppl = cell_ppl(rec, plan.metric) if ok and status == "done" else None
        ref = eval_ppl(latest.get(f"ref:{c.id}"), c.hash)
        bppl = bases[c.base]["ppl_by_seed"].get(c.seed)
        cells.append({"id": c.id, "base": c.base, "method": c.method, "optim": c.optim, "rank": c.rank,
                      "axes": [list(a) for a in c.axes], "lr": c.lr, "seed": c.seed, "status": status,
                      "ppl": ppl, "norm": ppl / bppl if ppl is not None and bppl else None,
                      "ref_ppl": ref, "base_ref_ppl": bases[c.base]["ref_by_seed"].get(c.seed),
                      "error": rec.get("error") if ok else None, "runtime_s": rec.get("runtime_s") if ok else None,
                      "drift": ((rec.get("summary") or {}).get("drift") if ok and status == "done" else None),
                      "curve": val_curve(out / "cells" / c.id / "metrics.jsonl") if status == "done" else []})
    return cells, bases


# ------------------------------------------------------------------------------------------------ aggregate


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return m, s


def aggregate(cells: list[dict], bases: dict[str, dict]) -> dict:
    """Best LR per group, Table 1 with gaps and LoRA's gap reduction, rank study and forgetting.

    Args:
        cells: rows as `collect` returns (needs base, method, optim, rank, axes, lr, seed, status, ppl;
            ref_ppl and curve optional).
        bases: {name: {label, pretrained_with, ppl, ref_ppl}}; ppl (the base model's own validation PPL)
            enables normalisation, pretrained_with enables matched/mismatched.

    Returns:
        A JSON-able summary: groups, table1, gap_reduction, rank_study, forgetting, counts, warnings.
    """
    groups: dict[tuple, dict] = {}
    for c in cells:
        key = (c["base"], c["method"], c["optim"], c["rank"], tuple(tuple(a) for a in c.get("axes") or []))
        g = groups.setdefault(key, {"cells": []})
        g["cells"].append(c)
    warnings: list[str] = []
    out_groups = []
    for key, g in groups.items():
        base, method, optim, rank, axes = key
        b = bases.get(base, {})
        fam = optimizer_family(b["pretrained_with"]) if b.get("pretrained_with") else None
        per_lr: dict[float, list[dict]] = {}
        for c in g["cells"]:
            per_lr.setdefault(float(c["lr"]), []).append(c)
        curve = []
        for lr in sorted(per_lr):
            cs = per_lr[lr]
            done = [c for c in cs if c["status"] == "done" and c.get("ppl") is not None
                    and math.isfinite(c["ppl"])]
            failed = [c for c in cs if c["status"] == "failed" or (c["status"] == "done" and (
                c.get("ppl") is None or not math.isfinite(c["ppl"])))]
            pt = {"lr": lr, "n": len(done), "n_failed": len(failed),
                  "n_pending": len(cs) - len(done) - len(failed), "values": [c["ppl"] for c in done],
                  "seeds": [c["seed"] for c in done], "mean": None, "std": None, "norm_mean": None,
                  "norm_std": None}
            if done:
                pt["mean"], pt["std"] = _mean_std([c["ppl"] for c in done])
                norms = [c["norm"] if c.get("norm") is not None else
                         (c["ppl"] / b["ppl"] if b.get("ppl") else None) for c in done]
                if all(v is not None for v in norms):
                    pt["norm_mean"], pt["norm_std"] = _mean_std(norms)
            refs = [c["ref_ppl"] for c in done if c.get("ref_ppl") is not None]
            if refs:
                pt["ref_mean"], pt["ref_std"] = _mean_std(refs)
                brefs = [c.get("base_ref_ppl") or b.get("ref_ppl") for c in done if c.get("ref_ppl") is not None]
                if all(brefs):
                    pt["forgetting"] = statistics.fmean(
                        c["ref_ppl"] / br - 1.0 for c, br in zip([c for c in done if c.get("ref_ppl")], brefs))
            drifts = [c["drift"] for c in done if isinstance(c.get("drift"), dict)]
            if drifts:
                pt["drift"] = {k: statistics.fmean(d[k] for d in drifts) for k in DRIFT_KEYS
                               if all(isinstance(d.get(k), (int, float)) for d in drifts)}
            curve.append(pt)
        eligible = [p for p in curve if p["mean"] is not None and p["n_failed"] == 0]
        row = {"base": base, "base_label": b.get("label", base), "pretrained_with": b.get("pretrained_with"),
               # `auto` decides per base, so it is neither matched nor mismatched
               "matched": (optimizer_family(optim) == fam) if fam and optim != "auto" else None,
               "method": method, "optim": optim, "rank": rank, "axes": [list(a) for a in axes],
               "label": label(method, optim, rank, axes),
               "curve": curve, "best_lr": None, "ppl_mean": None, "ppl_std": None, "n_seeds": 0,
               "normalised": None, "normalised_std": None, "edge": None, "ref_ppl_mean": None,
               "ref_ppl_std": None, "forgetting": None, "best_cells": [], "best_curve": [], "drift": None}
        if eligible:
            best = min(eligible, key=lambda p: (p["mean"], p["lr"]))
            row.update(best_lr=best["lr"], ppl_mean=best["mean"], ppl_std=best["std"], n_seeds=best["n"],
                       best_cells=[c["id"] for c in per_lr[best["lr"]] if c["status"] == "done"])
            lrs = [p["lr"] for p in curve]
            if len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1]):
                row["edge"] = "lowest" if best["lr"] == lrs[0] else "highest"
                warnings.append(f"{row['base_label']} / {row['label']}: best LR {best['lr']:g} is the "
                                f"{row['edge']} of the grid; widen the grid there")
            row["normalised"], row["normalised_std"] = best["norm_mean"], best["norm_std"]
            row["drift"] = best.get("drift") or None
            if "ref_mean" in best:
                row["ref_ppl_mean"], row["ref_ppl_std"] = best["ref_mean"], best["ref_std"]
                row["forgetting"] = best.get("forgetting")
            row["best_curve"] = _mean_curve([c.get("curve") or [] for c in per_lr[best["lr"]]
                                             if c["status"] == "done"])
            if row["best_curve"] and row["best_curve"][0][0] > 0 and b.get("ppl"):
                # step 0 is the base model itself, measured on the same validation split
                row["best_curve"] = [[0, b["ppl"]]] + [list(p) for p in row["best_curve"]]
        elif any(p["n_failed"] for p in curve):
            warnings.append(f"{row['base_label']} / {row['label']}: every LR had a failed seed")
        out_groups.append(row)
    out_groups.sort(key=lambda r: (list(bases).index(r["base"]) if r["base"] in bases else 99,
                                   r["method"], r["optim"], r["rank"] or 0, str(r["axes"])))
    table1, reduction = _table1(out_groups, bases)
    mitigation = _mitigation(table1, out_groups, bases)
    rank_study = _rank_study(out_groups)
    counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "failed", "running", "pending")}
    counts["total"] = len(cells)
    if counts["done"] < counts["total"]:
        warnings.append(f"{counts['total'] - counts['done']} of {counts['total']} cells are not done "
                        f"({counts['failed']} failed, {counts['running'] + counts['pending']} not run yet)")
    return {"groups": out_groups, "table1": table1, "gap_reduction": reduction, "mitigation": mitigation,
            "rank_study": rank_study,
            "bases": bases, "counts": counts, "warnings": warnings,
            "normalised": all(b.get("ppl") for b in bases.values())}


def _mean_curve(curves: list[list]) -> list[list[float]]:
    """Mean val PPL per step over seeds (steps every seed logged)."""
    curves = [dict((int(s), float(v)) for s, v in c) for c in curves if c]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [[s, statistics.fmean(c[s] for c in curves)] for s in steps]


def _table1(groups: list[dict], bases: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Rows = method x optimizer (x rank, axes), columns = bases; gaps vs the matched optimizer."""
    rows: dict[tuple, dict] = {}
    for g in groups:
        key = (g["method"], g["optim"], g["rank"], str(g["axes"]))
        row = rows.setdefault(key, {"label": g["label"], "method": g["method"], "optim": g["optim"],
                                    "rank": g["rank"], "axes": g["axes"], "cols": {}})
        value = g["normalised"] if g["normalised"] is not None else g["ppl_mean"]
        row["cols"][g["base"]] = {"value": value, "normalised": g["normalised"], "ppl": g["ppl_mean"],
                                  "std": g["normalised_std"] if g["normalised"] is not None else g["ppl_std"],
                                  "best_lr": g["best_lr"], "matched": g["matched"], "gap": None}
    # gap: mismatched value - best matched value, same base / method / rank / axes (a variant's row: against the
    # matched rows without the variant, the grid it was added to)
    for (method, optim, rank, axes), row in rows.items():
        plain = str(_without_variant(row["axes"]))
        for base, col in row["cols"].items():
            if col["matched"] is not False or col["value"] is None:
                continue
            matched = [r["cols"][base]["value"] for (m2, o2, r2, a2), r in rows.items()
                       if (m2, r2) == (method, rank) and a2 in (axes, plain) and base in r["cols"]
                       and r["cols"][base]["matched"] and r["cols"][base]["value"] is not None]
            if matched:
                col["gap"] = col["value"] - min(matched)
    reduction = []
    for (method, optim, rank, axes), row in rows.items():
        if method != "lora":
            continue
        full = rows.get(("full", optim, None, axes))
        if full is None:
            continue
        for base, col in row["cols"].items():
            fcol = full["cols"].get(base)
            if fcol is None or col["gap"] is None or fcol["gap"] is None:
                continue
            red = 100.0 * (fcol["gap"] - col["gap"]) / fcol["gap"] if fcol["gap"] > 0 else None
            reduction.append({"base": base, "base_label": bases.get(base, {}).get("label", base),
                              "mismatched_optim": optim, "rank": rank, "axes": row["axes"],
                              "gap_full": fcol["gap"], "gap_lora": col["gap"], "reduction_pct": red})
    order = {"full": 0, "lora": 1}
    ordered = sorted(rows.values(), key=lambda r: (order[r["method"]], r["rank"] or 0, str(r["axes"]),
                                                   -int(optimizer_family(r["optim"]) == "muon"), r["optim"]))
    return ordered, reduction


DRIFT_KEYS = ("fro_rel", "fro_rel_hidden", "spectral_rel", "max_rel")


def _without_variant(axes: list) -> list:
    return [list(a) for a in axes if a[0] != "variant"]


def _variant(axes: list) -> str | None:
    return next((a[1] for a in axes if a[0] == "variant"), None)


def _mitigation(table1: list[dict], groups: list[dict], bases: dict[str, dict]) -> list[dict]:
    """One row per variant group on a mismatched cell: its Table-1 value and gap, the gap of the same cell
    without the variant, the share of that gap it closes, 100·(gap_plain − gap)/gap_plain, forgetting and drift;
    with the plain mismatched and matched rows of the same base beside them (share 0 % and 100 % by definition)."""
    by_key = {(g["base"], g["method"], g["optim"], g["rank"], str(g["axes"])): g for g in groups}
    rows = {(r["method"], r["optim"], r["rank"], str(r["axes"])): r for r in table1}
    out = []
    for r in table1:
        name = _variant(r["axes"])
        if name is None:
            continue
        plain_axes = _without_variant(r["axes"])
        plain = rows.get((r["method"], r["optim"], r["rank"], str(plain_axes)))
        for base, col in r["cols"].items():
            if col["matched"] is not False:
                continue
            pcol = (plain or {}).get("cols", {}).get(base) or {}
            gp, gv = pcol.get("gap"), col["gap"]
            share = 100.0 * (gp - gv) / gp if gp is not None and gv is not None and gp > 0 else None
            g = by_key.get((base, r["method"], r["optim"], r["rank"], str(r["axes"]))) or {}
            out.append({"base": base, "base_label": bases.get(base, {}).get("label", base), "method": r["method"],
                        "optim": r["optim"], "rank": r["rank"], "variant": name, "label": r["label"],
                        "best_lr": col["best_lr"], "value": col["value"], "std": col["std"], "gap": gv,
                        "gap_plain": gp, "gap_closed_pct": share, "forgetting": g.get("forgetting"),
                        "drift": g.get("drift"), "plain_drift": (by_key.get(
                            (base, r["method"], r["optim"], r["rank"], str(plain_axes))) or {}).get("drift")})
    order = list(bases)
    out.sort(key=lambda m: (order.index(m["base"]) if m["base"] in order else 99, m["method"], m["optim"],
                            m["rank"] or 0, m["variant"]))
    return out


def _rank_study(groups: list[dict]) -> list[dict]:
    ranks = sorted({g["rank"] for g in groups if g["rank"] is not None})
    if len(ranks) < 2:
        return []
    return [{"base": g["base"], "base_label": g["base_label"], "optim": g["optim"], "rank": g["rank"],
             "axes": g["axes"], "best_lr": g["best_lr"], "ppl_mean": g["ppl_mean"], "ppl_std": g["ppl_std"],
             "normalised": g["normalised"], "normalised_std": g["normalised_std"], "n_seeds": g["n_seeds"]}
            for g in sorted(groups, key=lambda g: (g["base"], g["optim"], str(g["axes"]), g["rank"] or 0))
            if g["method"] == "lora"]


# ------------------------------------------------------------------------------------------------ render


def to_markdown(summary: dict, title: str = "sweep") -> str:
    """summary.md: Table 1, gap reduction, per-group best LRs, rank study, forgetting, warnings."""
    bases = summary["bases"]
    norm = summary["normalised"]
    lines = [f"# {title}", ""]
    c = summary["counts"]
    lines += [f"Cells: {c['done']} done, {c['failed']} failed, {c['running'] + c['pending']} not run "
              f"(of {c['total']}).", ""]
    names = list(bases)
    what = "validation PPL / base model's PPL" if norm else "validation PPL"
    lines += [f"## Table 1 — best {what} over the LR sweep, mean over seeds", "",
              "(mismatched entries: gap to the matched optimizer in parentheses)", "",
              "| fine-tune | " + " | ".join(base_header(n, bases[n]) for n in names) + " |",
              "|---|" + "---|" * len(names)]
    for row in summary["table1"]:
        cells = [table1_cell(row["cols"].get(n)) for n in names]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    lines.append("")
    if norm:
        lines += ["Base models' own PPL on the fine-tuning validation set: " + ", ".join(
            f"{bases[n].get('label', n)} {bases[n]['ppl']:.2f}" for n in names) + ".", ""]
    conv = {n: b["convergence"] for n, b in bases.items() if b.get("convergence")}
    if conv:
        lines += ["## Pretraining convergence of the bases", "",
                  "(validation loss over the last fifth of pretraining; plateaued = less than "
                  f"{100 * PLATEAU_TOLERANCE:.0f} % improvement)", "",
                  "| base | window (steps) | val loss at start | val loss at end | improvement | best (step) | "
                  "plateaued |", "|---|---|---|---|---|---|---|"]
        for n, cv in conv.items():
            lines.append(f"| {bases[n].get('label', n)} | {cv['window'][0]}→{cv['window'][1]} | "
                         f"{cv['val_loss_start']:.4f} | {cv['val_loss_end']:.4f} | "
                         f"{100 * cv['rel_improvement']:+.2f} % | {cv['best_val_loss']:.4f} ({cv['best_step']}) | "
                         f"{'yes' if cv['plateaued'] else 'no'} |")
        lines.append("")
    if summary["gap_reduction"]:
        lines += ["## Mismatch gap reduction by LoRA", "", "| base | mismatched optimizer | gap full | gap LoRA | "
                  "reduction |", "|---|---|---|---|---|"]
        for r in summary["gap_reduction"]:
            rk = f" (r={r['rank']})" if r["rank"] is not None else ""
            red = (fmt_num(r["reduction_pct"], ".0f") + " %" if r["reduction_pct"] is not None
                   else "n/a (no gap in full FT)")
            lines.append(f"| {r['base_label']} | {OPTIM_NAMES.get(r['mismatched_optim'], r['mismatched_optim'])}{rk}"
                         f" | {r['gap_full']:+.3f} | {r['gap_lora']:+.3f} | "
                         f"{red} |")
        lines.append("")
    if summary.get("mitigation"):
        lines += _mitigation_markdown(summary)
    lines += ["## Best learning rate per group", "",
              "| base | fine-tune | matched | best LR | val PPL (mean ± std) | normalised | seeds | note |",
              "|---|---|---|---|---|---|---|---|"]
    for g in summary["groups"]:
        m = {True: "yes", False: "no", None: "?"}[g["matched"]]
        note = f"best LR at the {g['edge']} edge" if g["edge"] else ""
        lines.append(f"| {g['base_label']} | {g['label']} | {m} | {fmt_num(g['best_lr'], 'g')} | "
                     f"{fmt_pm(g['ppl_mean'], g['ppl_std'], '.2f')} | {fmt_pm(g['normalised'], g['normalised_std'])} | "
                     f"{g['n_seeds']} | {note} |")
    lines.append("")
    if summary["rank_study"]:
        lines += ["## Rank study (alpha = 2r)", "", "| base | optimizer | rank | best LR | val PPL (mean ± std) |",
                  "|---|---|---|---|---|"]
        for r in summary["rank_study"]:
            lines.append(f"| {r['base_label']} | {OPTIM_NAMES.get(r['optim'], r['optim'])} | {r['rank']} | "
                         f"{fmt_num(r['best_lr'], 'g')} | {fmt_pm(r['ppl_mean'], r['ppl_std'], '.2f')} |")
        lines.append("")
    if any(g["ref_ppl_mean"] is not None for g in summary["groups"]):
        lines += ["## Forgetting — reference-set PPL at the best LR", "",
                  "| base | fine-tune | reference PPL (mean ± std) | base reference PPL | change |",
                  "|---|---|---|---|---|"]
        for g in summary["groups"]:
            if g["ref_ppl_mean"] is None:
                continue
            bref = bases.get(g["base"], {}).get("ref_ppl")
            ch = "—" if g["forgetting"] is None else f"{100 * g['forgetting']:+.1f} %"
            lines.append(f"| {g['base_label']} | {g['label']} | {fmt_pm(g['ref_ppl_mean'], g['ref_ppl_std'], '.2f')} | "
                         f"{fmt_num(bref, '.2f')} | {ch} |")
        lines.append("")
    if summary["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in summary["warnings"]] + [""]
    lines += ["PPL-vs-LR curves: `ppl_vs_lr.png`; best runs' validation curves: `val_curves.png`"
              + ("; PPL vs rank: `ppl_vs_rank.png`" if summary["rank_study"] else "") + ".", ""]
    return "\n".join(lines)


def _fmt_drift(d: dict | None, key: str) -> str:
    return fmt_num((d or {}).get(key), ".3g")


def _mitigation_markdown(summary: dict) -> list[str]:
    """The "Mismatch mitigations" section: each variant on a mismatched cell against the same cell without it."""
    lines = ["## Mismatch mitigations — mismatched full fine-tuning with an update constraint", "",
             "(gap: to the matched optimizer on the same base; closed: share of the plain mismatched cell's gap the "
             "variant removes; drift at the best LR: ‖W − W₀‖_F / ‖W₀‖_F over all matrices and over the hidden "
             "ones, the largest ‖ΔW‖₂/‖W₀‖₂ of a hidden matrix, the largest max|ΔW| / max|W₀|)", "",
             "| base | fine-tune | best LR | value | gap | closed | forgetting | drift F | drift F hidden | "
             "drift spectral | drift max |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    done = set()
    for r in summary["mitigation"]:
        key = (r["base"], r["method"], r["optim"], r["rank"])
        if key not in done:  # the plain mismatched row first, as the reference
            done.add(key)
            for g in summary["groups"]:
                if (g["base"], g["method"], g["optim"], g["rank"]) == key and _variant(g["axes"]) is None:
                    col = next((c["cols"].get(r["base"]) for c in summary["table1"]
                                if (c["method"], c["optim"], c["rank"], str(c["axes"])) ==
                                (g["method"], g["optim"], g["rank"], str(g["axes"]))), None) or {}
                    ch = "—" if g["forgetting"] is None else f"{100 * g['forgetting']:+.1f} %"
                    lines.append(f"| {r['base_label']} | {g['label']} (none) | {fmt_num(g['best_lr'], 'g')} | "
                                 f"{fmt_num(col.get('value'))} | {fmt_num(col.get('gap'), '+.3f')} | 0 % | {ch} | "
                                 f"{_fmt_drift(g['drift'], 'fro_rel')} | {_fmt_drift(g['drift'], 'fro_rel_hidden')} | "
                                 f"{_fmt_drift(g['drift'], 'spectral_rel')} | "
                                 f"{_fmt_drift(g['drift'], 'max_rel')} |")
        closed = "—" if r["gap_closed_pct"] is None else f"{r['gap_closed_pct']:.0f} %"
        ch = "—" if r["forgetting"] is None else f"{100 * r['forgetting']:+.1f} %"
        lines.append(f"| {r['base_label']} | {r['label']} | {fmt_num(r['best_lr'], 'g')} | {fmt_num(r['value'])} | "
                     f"{fmt_num(r['gap'], '+.3f')} | {closed} | {ch} | {_fmt_drift(r['drift'], 'fro_rel')} | "
                     f"{_fmt_drift(r['drift'], 'fro_rel_hidden')} | "
                     f"{_fmt_drift(r['drift'], 'spectral_rel')} | {_fmt_drift(r['drift'], 'max_rel')} |")
    return lines + [""]


CSV_FIELDS = ("base", "pretrained_with", "method", "optim", "rank", "axes", "matched", "best_lr", "ppl_mean",
              "ppl_std", "n_seeds", "normalised", "normalised_std", "gap", "ref_ppl_mean", "ref_ppl_std",
              "forgetting", "edge", "drift_fro_rel", "drift_fro_rel_hidden", "drift_spectral_rel", "drift_max_rel")


def to_csv(summary: dict) -> str:
    """summary.csv: one row per group (best LR, PPL mean/std, normalised, gap, forgetting)."""
    gaps = {(r["method"], r["optim"], r["rank"], str(r["axes"]), b): col["gap"]
            for r in summary["table1"] for b, col in r["cols"].items()}
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for g in summary["groups"]:
        row = {k: g.get(k) for k in CSV_FIELDS}
        row["axes"] = ";".join(f"{k}={v}" for k, v in g["axes"])
        row["gap"] = gaps.get((g["method"], g["optim"], g["rank"], str(g["axes"]), g["base"]))
        for k in DRIFT_KEYS:
            row[f"drift_{k}"] = (g.get("drift") or {}).get(k)
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()



# ------------------------------------------------------------------------------------------------ report


def write_plots(summary: dict, out: str | Path) -> dict[str, str]:
    """Draw the figures the aggregated `summary` has data for into the folder `out`; {name: path written}
    (none before a cell has a validation PPL)."""
    out, plots = Path(out), {}
    if any(g["ppl_mean"] is not None for g in summary["groups"]):
        plots["ppl_vs_lr"] = str(plot_ppl_vs_lr(summary, out / PLOTS["lr"]))
        if any(g["best_curve"] for g in summary["groups"]):
            plots["val_curves"] = str(plot_val_curves(summary, out / PLOTS["curves"]))
        if summary["rank_study"]:
            plots["ppl_vs_rank"] = str(plot_ppl_vs_rank(summary, out / PLOTS["rank"]))
        if any(r["value"] is not None for r in summary.get("mitigation") or []):
            plots["mitigation"] = str(plot_mitigations(summary, out / PLOTS["mitigation"]))
    return plots


def summarise(out: str | Path, plan: SweepPlan | None = None) -> dict:
    """The aggregated summary of a sweep directory (its index and run directories), writing nothing."""
    out = Path(out)
    plan = plan or load_saved_plan(out)
    cells, bases = collect(plan, out)
    summary = aggregate(cells, bases)
    summary["sweep"] = {"name": plan.name, "metric": plan.metric, "seeds": plan.seeds,
                        "reference_data": plan.reference_data, "dir": str(out),
                        "cell_runtime_s": sum(c["runtime_s"] or 0 for c in cells)}
    return summary


def write_report(out: str | Path, plan: SweepPlan | None = None) -> dict:
    """Aggregate a sweep directory and write summary.md/.csv/.json and the PNG plots; returns the summary.

    Re-running it (`muonft sweep --report DIR`) only re-reads the index and run directories.
    """
    out = Path(out)
    plan = plan or load_saved_plan(out)
    summary = summarise(out, plan)
    summary["plots"] = write_plots(summary, out)
    atomic_write_text(out / "summary.md", to_markdown(summary, title=f"muonft sweep: {plan.name}"))
    atomic_write_text(out / "summary.csv", to_csv(summary))
    slim = {**summary, "groups": [{k: v for k, v in g.items()} for g in summary["groups"]]}
    atomic_write_text(out / "summary.json", json.dumps(slim, indent=1, default=str))
    return summary

"""The figures of a sweep report (matplotlib, headless), drawn from the summary `muonft_cli.sweep.report`
aggregates: PPL vs LR (Fig. 4 of "Can Muon Fine-tune Adam-Pretrained Models?": solid = matched pretraining,
dashed = mismatched; dark = full, light = LoRA), validation curves of the best runs (Fig. 3), best PPL vs LoRA
rank (Fig. 5), and the mismatch mitigations (target PPL against forgetting, one point per variant). Also the one home of the figure helpers (`panels`, `save_figure`, `colour`) that `muonft plot`'s
run curves (`muonft_cli.plot`) share. matplotlib is imported inside the functions.
"""

from __future__ import annotations

from pathlib import Path

from muonft_cli._common import optimizer_family
from muonft_cli.sweep.labels import OPTIM_NAMES, base_header

#: The PNG file of each figure, in the sweep directory.
PLOTS = {"lr": "ppl_vs_lr.png", "curves": "val_curves.png", "rank": "ppl_vs_rank.png",
         "mitigation": "mitigation.png"}


def colour(optim: str, method: str, rank_pos: float = 0.0) -> str:
    """Dark shade for full, light for LoRA (lighter with rank position in [0, 1]); a hue per optimizer."""
    import matplotlib

    cmap = matplotlib.colormaps["Blues" if optimizer_family(optim) == "adam" else "Oranges"]
    if optim not in ("adamw", "muon"):
        cmap = matplotlib.colormaps["Greens" if optimizer_family(optim) == "muon" else "Purples"]
    return matplotlib.colors.to_hex(cmap(0.9 if method == "full" else 0.55 - 0.2 * rank_pos))


def _style(g: dict) -> str:
    return {True: "-", False: "--", None: ":"}[g["matched"]]


def panels(n: int, height: float, per_row: int | None = None):
    """A headless (Agg) figure with `n` panels side by side (`per_row` of them a row, default all): (fig, the
    `n` axes in reading order; the unused cells of the last row are hidden)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, n)
    cols = min(n, per_row or n)
    rows = -(-n // cols)
    fig, axs = plt.subplots(rows, cols, figsize=(5.2 * cols, height * rows), squeeze=False)
    flat = list(axs.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save_figure(fig, path: Path, title: str | None = None) -> Path:
    """Title, lay out, write the image (its format from the suffix, PNG without one) and free the figure; the
    file appears whole or not at all (written beside it, then renamed)."""
    import os

    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, dpi=120, format=path.suffix[1:].lower() or "png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def plot_ppl_vs_lr(summary: dict, path: Path) -> Path:
    """Fig. 4: PPL vs LR, one panel per fine-tuning optimizer; solid matched / dashed mismatched pretraining,
    dark full / light LoRA; shaded ± std over seeds; the best LR of each curve marked."""
    groups = [g for g in summary["groups"] if any(p["mean"] is not None for p in g["curve"])]
    optims = list(dict.fromkeys(g["optim"] for g in summary["groups"]))
    ranks = sorted({g["rank"] for g in groups if g["rank"] is not None})
    norm = summary["normalised"]
    fig, axes = panels(len(optims), 4.2)
    best_all = [g["normalised"] if norm else g["ppl_mean"] for g in groups if g["ppl_mean"] is not None]
    for ax, optim in zip(axes, optims):
        for g in [g for g in groups if g["optim"] == optim]:
            b = summary["bases"].get(g["base"], {})
            pts = [p for p in g["curve"] if p["mean"] is not None and (p["norm_mean"] is not None or not norm)]
            xs = [p["lr"] for p in pts]
            ys = [p["norm_mean"] if norm else p["mean"] for p in pts]
            sd = [(p["norm_std"] if norm else p["std"]) or 0 for p in pts]
            rp = ranks.index(g["rank"]) / max(1, len(ranks) - 1) if g["rank"] in ranks else 0.0
            col = colour(optim, g["method"], rp)
            rank_txt = f" r={g['rank']}" if g["rank"] is not None and len(ranks) > 1 else ""
            name = f"{'Full' if g['method'] == 'full' else 'LoRA'}{rank_txt}, {base_header(g['base'], b)}"
            name += "".join(f", {k.split('.')[-1]}={v}" for k, v in g["axes"])
            ax.plot(xs, ys, _style(g), color=col, marker="o", ms=3.5, lw=2.0, label=name)
            ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)], color=col,
                            alpha=0.15, lw=0)
            failed = [p["lr"] for p in g["curve"] if p["n_failed"]]
            best_y = g["normalised"] if norm else g["ppl_mean"]
            if g["best_lr"] is not None and best_y is not None:
                ax.plot([g["best_lr"]], [best_y], marker="*", ms=12, color=col, mec="black", mew=0.6)
            if failed:
                ax.plot(failed, [ax.get_ylim()[1]] * len(failed), "x", color=col, ms=7)
        ax.set_xscale("log")
        ax.set_title(f"fine-tuned with {OPTIM_NAMES.get(optim, optim)}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("val PPL / base PPL" if norm else "validation PPL")
        if best_all:  # every curve's optimum visible; diverged / far-off LRs may leave the top
            lo, hi = min(best_all), max(best_all)
            ax.set_ylim(lo - 0.05 * abs(lo), max(hi * 1.25, lo * 1.3))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path, "PPL vs LR — solid: matched pretraining, dashed: mismatched; dark: full, "
                            "light: LoRA; ★ best LR, × diverged")


def plot_val_curves(summary: dict, path: Path) -> Path:
    """Fig. 3: validation PPL vs step of each group's best-LR runs (mean over seeds), one panel per base."""
    names = list(summary["bases"])
    ranks = sorted({g["rank"] for g in summary["groups"] if g["rank"] is not None})
    fig, axes = panels(len(names), 4.0)
    for ax, name in zip(axes, names):
        b = summary["bases"][name]
        scale = b["ppl"] if summary["normalised"] else 1.0
        ymin, ymax = [], []
        for g in [g for g in summary["groups"] if g["base"] == name and g["best_curve"]]:
            rp = ranks.index(g["rank"]) / max(1, len(ranks) - 1) if g["rank"] in ranks else 0.0
            xs = [s for s, _ in g["best_curve"]]
            ys = [v / scale for _, v in g["best_curve"]]
            ymin.append(min(ys))
            ymax.append(max(ys))
            ax.plot(xs, ys, _style(g), color=colour(g["optim"], g["method"], rp), lw=2,
                    label=f"{g['label']} (lr {g['best_lr']:g})")
        ax.set_title(base_header(name, b))
        ax.set_xlabel("step")
        ax.set_ylabel("val PPL / base PPL" if summary["normalised"] else "validation PPL")
        if ymin:  # log scale: the base model (step 0) and the fine-tuned ends fit one panel
            from matplotlib.ticker import FormatStrFormatter

            ax.set_yscale("log")
            ax.set_ylim(min(ymin) * 0.95, max(ymax) * 1.05)
            for axis_fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis_fmt(FormatStrFormatter("%.3g"))
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return save_figure(fig, path, "validation curves of the best-LR runs (mean over seeds; step 0 = the base model)")


def plot_ppl_vs_rank(summary: dict, path: Path) -> Path:
    """Fig. 5: best (normalised) PPL vs LoRA rank per optimizer, ± std, one panel per base."""
    names = list(summary["bases"])
    fig, axes = panels(len(names), 4.0)
    for ax, name in zip(axes, names):
        b = summary["bases"][name]
        rows = [r for r in summary["rank_study"] if r["base"] == name and r["ppl_mean"] is not None]
        for key in dict.fromkeys((r["optim"], str(r["axes"])) for r in rows):
            rr = sorted([r for r in rows if (r["optim"], str(r["axes"])) == key], key=lambda r: r["rank"])
            norm = summary["normalised"] and all(r["normalised"] is not None for r in rr)
            ax.errorbar([r["rank"] for r in rr], [r["normalised"] if norm else r["ppl_mean"] for r in rr],
                        yerr=[(r["normalised_std"] if norm else r["ppl_std"]) or 0 for r in rr], marker="o", capsize=3,
                        color=colour(key[0], "full"), label=f"LoRA-{OPTIM_NAMES.get(key[0], key[0])}")
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in rows})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_title(base_header(name, b))
        ax.set_xlabel("LoRA rank (alpha = 2r)")
        ax.set_ylabel("best val PPL / base PPL" if summary["normalised"] else "best validation PPL")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_mitigations(summary: dict, path: Path) -> Path:
    """The mismatch mitigations: one panel per mismatched full fine-tuning cell (base × optimizer), each
    variant at its best LR as a point (x: target PPL, normalised when the summary is, ± std over seeds; y:
    forgetting, the change of the reference-set PPL), beside the plain mismatched cell ("none", black) and
    the matched optimizer's full fine-tuning on the same base (grey, with a vertical line: left of it, the
    mismatch is gone)."""
    norm = summary["normalised"]
    rows = [r for r in summary["mitigation"] if r["value"] is not None]
    keys = list(dict.fromkeys((r["base"], r["method"], r["optim"], r["rank"]) for r in rows))
    fig, axes = panels(len(keys), 4.2)

    def group(base: str, method: str, optim: str | None, rank, matched: bool | None = None) -> dict | None:
        return next((g for g in summary["groups"] if g["base"] == base and g["method"] == method
                     and g["rank"] == rank and not any(a[0] == "variant" for a in g["axes"])
                     and (optim is None or g["optim"] == optim) and (matched is None or g["matched"] == matched)
                     and g["ppl_mean"] is not None), None)

    def point(ax, x, sd, forgetting, name, **style) -> None:
        y = 100 * forgetting if forgetting is not None else float("nan")
        ax.errorbar([x], [y], xerr=[sd or 0], capsize=3, ls="none", **style)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)

    for ax, (base, method, optim, rank) in zip(axes, keys):
        plain = group(base, method, optim, rank)
        matched = group(base, method, None, rank, matched=True)
        for g, name, style in ((plain, "none", {"marker": "s", "ms": 6, "color": "black"}),
                               (matched, f"matched: {matched['label'] if matched else ''}",
                                {"marker": "D", "ms": 6, "color": "grey"})):
            if g is not None:
                point(ax, g["normalised"] if norm else g["ppl_mean"], g["normalised_std"] if norm else g["ppl_std"],
                      g["forgetting"], name, **style)
        if matched is not None:
            ax.axvline(matched["normalised"] if norm else matched["ppl_mean"], color="grey", ls="--", lw=1)
        for r in [r for r in rows if (r["base"], r["method"], r["optim"], r["rank"]) == (base, method, optim, rank)]:
            point(ax, r["value"], r["std"], r["forgetting"], r["variant"], marker="o", ms=5,
                  color=colour(optim, method))
        label = plain["label"] if plain else optim
        ax.set_title(f"{base_header(base, summary['bases'].get(base, {}))} + {label}", fontsize=9)
        ax.set_xlabel("best val PPL / base PPL" if norm else "best validation PPL")
        ax.set_ylabel("forgetting: reference PPL change (%)")
        ax.grid(True, alpha=0.3)
    return save_figure(fig, path, "Mismatch mitigations — each variant at its best LR, mean ± std over seeds; "
                                  "lower-left is better")

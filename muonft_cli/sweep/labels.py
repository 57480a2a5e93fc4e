"""The names a sweep's tables and figures show: optimizer and family names, row labels in the paper's style,
column headers, and the number formats of the tables (Markdown, the terminal table, the figures' legends).
"""

from __future__ import annotations

from typing import Iterable

from muonft_cli._common import optimizer_family

OPTIM_NAMES = {"adamw": "Adam", "muon": "Muon", "muon-pe": "Muon-PE", "adamuon": "AdaMuon", "normuon": "NorMuon"}
FAMILY_NAMES = {"adam": "Adam", "muon": "Muon"}


def label(method: str, optim: str, rank: int | None = None, axes: Iterable = ()) -> str:
    """Row label in the paper's style: `Full-Muon`, `LoRA-Adam (r=8)`, `Full-Adam (anchor0.3)` (a sweep variant)."""
    s = f"{'Full' if method == 'full' else 'LoRA'}-{OPTIM_NAMES.get(optim, optim)}"
    extra = [f"r={rank}"] if rank is not None else []
    extra += [str(v) if k == "variant" else f"{k.split('.')[-1]}={v}" for k, v in axes]  # a variant: its name
    return s + (f" ({', '.join(extra)})" if extra else "")


def base_header(name: str, b: dict) -> str:
    """Column header: `adam (Adam-pretrained)`."""
    w, lab = b.get("pretrained_with"), str(b.get("label", name))
    return lab + (f" ({FAMILY_NAMES[optimizer_family(w)]}-pretrained)" if w and "pretrained" not in lab else "")


def fmt_num(x: float | None, fmt: str = ".3f") -> str:
    """A number, or `—` when there is none."""
    return "—" if x is None else format(x, fmt)


def fmt_pm(m: float | None, s: float | None, fmt: str = ".3f") -> str:
    """`mean ± std`, or `—`."""
    return "—" if m is None else f"{m:{fmt}} ± {s or 0:{fmt}}"


def fmt_gap(g: float | None) -> str:
    """The gap to the matched optimizer as ` (+.023)` / ` (−.011)`, or nothing."""
    return "" if g is None else f" ({'+' if g >= 0 else '−'}{abs(g):.3f})".replace("0.", ".", 1)


def table1_cell(col: dict | None, std: bool = False) -> str:
    """One Table 1 entry: the mean (± its std with `std`) and the gap to the matched optimizer; "—" when empty."""
    if col is None or col["value"] is None:
        return "—"
    spread = f" ± {col['std'] or 0:.3f}" if std else ""
    return f"{col['value']:.3f}{spread}{fmt_gap(col['gap'])}"

"""Everything muonft shows a person: rich tables, progress bars and console lines, for every command.

Engine modules (train, evaluate, diagnose, sweep) return data and report progress through callbacks or sinks;
only this module (called from `cli.py`) turns that data into text on the console. A Python user of the engine
therefore gets no console output they did not ask for. Talk goes to stderr; data (`--json`) to stdout.
"""

from __future__ import annotations

# ------------------------------------------------------------------------------------ training (sinks)

# ------------------------------------------------------------------------------------------------ eval

# -------------------------------------------------------------------------------------------- diagnose

# ----------------------------------------------------------------------------------------------- sweep


def sweep_event_line(rec: dict) -> str | None:
    """One progress line for a `sweep.jsonl` record (`muonft sweep` prints these on stderr), or None."""
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


def sweep_table(summary: dict):
    """A rich Table of a sweep's Table 1 (best normalised PPL per base, mean ± std over seeds, gap)."""
    from rich.table import Table

    from muonft_cli.sweep.labels import base_header, fmt_gap, fmt_num

    bases = summary["bases"]
    t = Table(title="best " + ("val PPL / base PPL" if summary["normalised"] else "val PPL")
              + " over the LR sweep (mean over seeds; gap to matched in parentheses)")
    t.add_column("fine-tune")
    for n in bases:
        t.add_column(base_header(n, bases[n]), justify="right")
    t.add_column("best LRs", justify="right")
    for row in summary["table1"]:
        vals = []
        for n in bases:
            col = row["cols"].get(n)
            vals.append("—" if col is None or col["value"] is None else
                        f"{col['value']:.3f} ± {col['std'] or 0:.3f}{fmt_gap(col['gap'])}")
        lrs = " / ".join(fmt_num(row["cols"][n]["best_lr"], "g") if n in row["cols"] else "—" for n in bases)
        t.add_row(row["label"], *vals, lrs)
    return t


def print_sweep_table(summary: dict) -> None:
    """Print a sweep's Table 1 on stdout."""
    from rich.console import Console

    Console().print(sweep_table(summary))

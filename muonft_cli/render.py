"""Everything muonft shows a person: rich tables, progress bars and console lines, for every command.

Engine modules (train, evaluate, diagnose, sweep) return data and report progress through callbacks or sinks;
only this module (called from `cli.py`) turns that data into text on the console. A Python user of the engine
therefore gets no console output they did not ask for. Talk goes to stderr; data (`--json`) to stdout.
"""

from __future__ import annotations

from typing import Any

# ------------------------------------------------------------------------------------ training (sinks)

# ------------------------------------------------------------------------------------------------ eval

# -------------------------------------------------------------------------------------------- diagnose


class DiagnoseProgressBar:
    """`muonft diagnose`'s rich progress bar over matrices on stderr: pass it to `muonft_cli.diagnose.diagnose` as
    ``progress`` and its `start` as ``on_open``; call `stop` when done."""

    def __init__(self) -> None:
        self._progress = None
        self._task = None

    def start(self, ck: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._progress = Progress(TextColumn("diagnose"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  TextColumn("{task.description}"), console=Console(stderr=True), transient=True)
        self._progress.start()
        self._task = self._progress.add_task("", total=len(ck.matrices))

    def __call__(self, done: int, total: int, name: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, description=name[-48:])

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def render_diagnose(report: dict[str, Any], console: Any = None) -> None:
    """Print a diagnose report as rich tables: per layer type vs the random baseline, then the verdict and the
    recommendation."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    console.print(f"[bold]{escape(str(report['path']))}[/bold]  ({report['kind']}, {report['n_matrices']} matrices, "
                  f"mode {report['mode']}, {report['seconds']:.1f} s)")
    t = Table(title="Spectra per layer type (r = min(m, n); random = a Gaussian matrix of the same shape)")
    for col in ("type", "n", "srank", "srank/r", "random", "entropy", "random", "lean"):
        t.add_column(col, justify="left" if col in ("type", "lean") else "right")
    for lt, d in report["layer_types"].items():
        t.add_row(lt, str(d["count"]), f"{d['stable_rank']:.1f}", f"{d['stable_rank_ratio']:.3f}",
                  f"{d['random_stable_rank_ratio']:.3f}", f"{d['svd_entropy']:.3f}", f"{d['random_svd_entropy']:.3f}",
                  d.get("lean", ""))
    console.print(t)
    if report.get("matrices"):
        mt = Table(title="Matrices")
        for col in ("name", "type", "shape", "stable rank", "entropy", "method"):
            mt.add_column(col)
        for r in report["matrices"]:
            mt.add_row(r["name"], r["layer_type"], "×".join(map(str, r["shape"])), f"{r['stable_rank']:.2f}",
                       f"{r['svd_entropy']:.4f}", r["method"])
        console.print(mt)
    guess, conf = report["optimizer_guess"], report["confidence"]
    color = {"adam": "yellow", "muon": "cyan"}.get(guess, "white")
    console.print(f"\n[bold]Spectral guess:[/bold] [{color}]{guess}[/{color}]  (confidence {conf:.2f})")
    for line in report["evidence"]:  # plain text: names like lora_A[...] must not be read as markup
        console.print(f"  • {line}", markup=False)
    prov = report.get("provenance")
    if prov and prov.get("optimizer"):
        console.print(f"[bold]Provenance:[/bold] pretrained with {escape(str(prov['optimizer']))} "
                      f"({escape(str(prov['source']))})")
    if prov and prov.get("finetune_optimizer"):
        console.print(f"[bold]Provenance:[/bold] fine-tuned with {escape(str(prov['finetune_optimizer']))}")
    rec = report["recommendation"]
    console.print(f"\n[bold]Recommendation[/bold] for fine-tuning with {rec['target_optim']}: "
                  f"[bold]{rec['method']}[/bold]"
                  + (f", LoRA rank {rec['lora_rank'][0]}–{rec['lora_rank'][1]}" if rec.get("lora_rank") else "")
                  + f", lr {rec['lr']['min']:.0e}–{rec['lr']['max']:.0e}")
    for line in rec["reasons"]:
        console.print(f"  • {line}", markup=False)
    # commands are printed verbatim and unwrapped so they can be copied ("[lora]" is not markup here)
    console.print(f"\n  {rec['command']}", markup=False, soft_wrap=True)
    if rec.get("sweep_command"):
        console.print(f"  {rec['sweep_command']}", markup=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------- sweep

"""Everything muonft shows a person: rich tables, progress bars and console lines, for every command.

Engine modules (train, evaluate, diagnose, sweep) return data and report progress through callbacks or sinks;
only this module (called from `cli.py`) turns that data into text on the console. A Python user of the engine
therefore gets no console output they did not ask for. Talk goes to stderr; data (`--json`) to stdout.
"""

from __future__ import annotations

import math
import sys
from typing import Any

# ------------------------------------------------------------------------------------ training (sinks)


class RichSink:
    """The training progress bar on stderr (a `muonft_cli.train.sink.Sink`): step, loss, lr, tok/s and ETA;
    evaluations and notices as printed lines."""

    def __init__(self, stream: Any = None) -> None:
        from rich.console import Console

        self.console = Console(file=stream or sys.stderr, stderr=stream is None)
        self.progress: Any = None
        self.task: Any = None

    def on_start(self, info: dict[str, Any]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(f"[bold]{info.get('mode', 'train')}[/] {info.get('optim', '')}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["start_step"],
                                           stats="")

    def on_step(self, record: dict[str, Any]) -> None:
        if self.progress is None:
            return
        stats = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s"
        self.progress.update(self.task, completed=record["step"], stats=stats)
        if record.get("val_loss") is not None:
            ppl = record.get("val_ppl")
            ppl_s = f"{ppl:.2f}" if ppl is not None and math.isfinite(ppl) else "inf"
            self.progress.console.print(f"step {record['step']}: val loss {record['val_loss']:.4f}  ppl {ppl_s}")

    def on_message(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text, markup=False)

    def on_end(self, summary: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def optim_choice_lines(choice: dict[str, Any]) -> list[str]:
    """The `--optim auto` decision as stderr lines: the decision and its reason on one line, then the
    warning for an unknown base under full fine-tuning, when there is one."""
    lines = [f"--optim auto: {choice['chosen']} at lr {choice['lr']:g} ({choice['lr_source']}); source "
             f"{choice['source']}: {choice['reason']}"]  # the reason carries a spectral verdict's confidence
    if choice.get("warning"):
        lines.append(f"warning: {choice['warning']}")
    return lines


class NoticeSink:
    """`--quiet`: no progress bar, only the one-line notices (resume point, nothing to do), on stderr."""

    def on_start(self, info: dict[str, Any]) -> None:
        pass

    def on_step(self, record: dict[str, Any]) -> None:
        pass

    def on_message(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_end(self, summary: dict[str, Any]) -> None:
        pass


# ------------------------------------------------------------------------------------------------ eval


def eval_tables(report: dict[str, Any]):
    """The `muonft eval` report as rich renderables (a Group of tables) for the terminal."""
    from rich.console import Group
    from rich.table import Table

    parts: list = []
    ppl = Table(title=f"Perplexity of {report['model']}", show_lines=False)
    for col in ("set", "split", "tokens", "model loss", "model ppl", "base ppl", "Δ ppl", "ratio"):
        ppl.add_column(col, justify="left" if col in ("set", "split") else "right")
    for key, label in (("data", "data"), ("forgetting", "reference")):
        r = report.get(key)
        if not r:
            continue
        b = r.get("base")
        ppl.caption = ((ppl.caption + "\n") if ppl.caption else "") + f"{label}: {r['source']}"
        ppl.add_row(label, r["split"], f"{r['model']['tokens']:,}", f"{r['model']['loss']:.4f}",
                    f"{r['model']['ppl']:.3f}", f"{b['ppl']:.3f}" if b else "-",
                    f"{r['ppl_change']:+.3f}" if b else "-", f"{r['ppl_ratio']:.4f}" if b else "-")
    if ppl.row_count:
        parts.append(ppl)
    dist = report.get("distance")
    if dist:
        t = Table(title=f"Weight distance from base ({report['base']}) — paper Table 17")
        for col in ("layer type", "matrices", "L2 ‖W−W₀‖", "rel L2", "cosine dist 1−cos"):
            t.add_column(col, justify="left" if col == "layer type" else "right")
        for name, agg in [*dist["by_type"].items(), ("hidden (all block matrices)", dist["hidden"]),
                          ("total", dist["total"])]:
            if agg:
                t.add_row(name, str(agg["matrices"]), f"{agg['l2']:.4g}", f"{agg['rel_l2']:.4g}",
                          f"{agg['cosine']:.4g}")
        parts.append(t)
    spec = report.get("lora_spectra")
    if spec:
        t = Table(title=f"LoRA spectra (rank {spec['rank']}) — paper App. F.2")
        t.add_column("layer type")
        t.add_column("n", justify="right")
        for part in ("A", "B", "BA"):
            t.add_column(f"{part} srank", justify="right")
            t.add_column(f"{part} entropy", justify="right")
        for name, agg in [*spec["by_type"].items(), ("all", spec["all"])]:
            t.add_row(name, str(agg["n"]), *[f"{agg[p][m]:.3f}" for p in ("A", "B", "BA")
                                              for m in ("stable_rank", "svd_entropy")])
        parts.append(t)
    if report.get("tasks"):
        parts.append(_tasks_table(report["tasks"], report.get("lm_eval") or {}))
    return Group(*parts)


def _tasks_table(tasks: dict[str, dict], info: dict[str, Any]):
    """lm-evaluation-harness metrics: one row per task and metric, its stderr beside it."""
    from rich.table import Table

    def fmt(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and v != v) else f"{v:.4f}"

    shots, samples = info.get("n_shot") or {}, info.get("samples") or {}
    t = Table(title=f"lm-evaluation-harness {info.get('version', '')}".rstrip())
    for col in ("task", "shots", "examples", "metric", "value", "± stderr"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metrics in tasks.items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            err = metrics.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            t.add_row(task, str(shots.get(task, "-")), str(samples.get(task, "-")), key, fmt(value), fmt(err))
    return t


def print_eval(report: dict[str, Any]) -> None:
    """Print the `muonft eval` tables (`eval_tables`) on stdout: they are the command's output; a line on stderr
    for each data set whose records were dropped (no text fields)."""
    from rich.console import Console

    from muonft_cli.data.documents import drop_note

    for key in ("data", "forgetting"):
        r = report.get(key) or {}
        note = drop_note(r.get("rows_read", 0), r.get("drop_reasons") or {}, f"'{r.get('source')}'")
        if note:
            print(note, file=sys.stderr)
    Console().print(eval_tables(report))


# ----------------------------------------------------------------------------------------- memory plan


def human_bytes(n: float | None) -> str:
    """Bytes as a person reads them: binary units (GiB = 2**30), three significant digits."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def plan_table(plan: dict[str, Any]):
    """The `--plan` table: one row per term of the per-device total (`muonft_cli.plan_memory`)."""
    from rich.table import Table

    b = plan["bytes"]
    ckpt = "on" if plan["gradient_checkpointing"] else "off"
    lora = f", LoRA r={plan['lora_rank']}" if plan["lora_rank"] else ", full fine-tuning"
    title = (f"memory plan per device: {plan['model']} | {plan['optimizer']}"
             f"{lora} | "
             f"{plan['world_size']} device(s), {plan['strategy']} | base {plan['base_dtype']}, compute "
             f"{plan['compute_dtype']} on {plan['device']} | micro-batch {plan['micro_batch_size']} x "
             f"{plan['seq_len']} tokens")
    t = Table(title=title, title_justify="left")
    t.add_column("term")
    t.add_column("bytes", justify="right")
    t.add_column("", style="dim")
    in_muon = f" ({plan['muon_params']:,} in Muon)" if plan.get("muon_params") else ""
    t.add_row("parameters", f"{plan['params']:,}", f"{plan['trainable_params']:,} trainable{in_muon}")
    rows = [("weights", b["weights"], ""), ("gradients", b["gradients"], ""),
            ("optimizer state", b["optimizer_state"], ""),
            ("activations", b["activations"], f"gradient checkpointing {ckpt}; "
             f"{human_bytes(b['activations_checkpointed'])} with, "
             f"{human_bytes(b['activations_not_checkpointed'])} without"),
            ("optimizer-step workspace", b["step_workspace"], "transient, after the activations are freed"),
            ("DDP gradient buckets", b["ddp_buckets"], ""), ("FSDP2 all-gathered layers", b["fsdp_gather"], ""),
            ("autocast bf16 weight copies", b["autocast_copies"], "")]
    for name, value, note in rows:
        if value or name in ("weights", "gradients", "optimizer state", "activations"):
            t.add_row(name, human_bytes(value), note)
    budget = plan.get("gpu_memory")
    verdict = ("" if plan["fits"] is None else
               f"fits {human_bytes(budget)}" if plan["fits"] else f"does NOT fit {human_bytes(budget)}")
    t.add_row("[bold]total[/]", f"[bold]{human_bytes(b['total'])}[/]", verdict)
    return t


def print_plan(plan: dict[str, Any]) -> None:
    """Print the memory plan on stdout (it is the command's output), and its notes and fit on stderr."""
    from rich.console import Console

    Console().print(plan_table(plan))
    if plan.get("max_micro_batch") is not None:
        mmb = plan["max_micro_batch"]
        print(f"largest micro-batch that fits {human_bytes(plan['gpu_memory'])}: {mmb}"
              + (" (not even 1: shard with --strategy fsdp, use LoRA, a smaller --seq-len or "
                 "--gradient-checkpointing)" if mmb == 0 else ""), file=sys.stderr)
    for note in plan.get("notes") or []:
        print(f"note: {note}", file=sys.stderr)


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
    if report.get("excluded"):  # every ≥2-D tensor not analysed, grouped by reason (kind of reason: up to ':')
        why: dict[str, int] = {}
        for x in report["excluded"]:
            key = x["reason"].split(" (")[0].split(":")[0]
            why[key] = why.get(key, 0) + 1
        console.print(f"not analysed: {len(report['excluded'])} tensors — "
                      + "; ".join(f"{n} × {k}" for k, n in why.items()) + " (listed under \"excluded\" in --json)",
                      markup=False, soft_wrap=True)
    if report.get("matrices"):
        mt = Table(title="Matrices")
        for col in ("name", "type", "shape", "stable rank", "entropy", "method"):
            mt.add_column(col)
        for r in report["matrices"]:
            mt.add_row(escape(r["name"]), r["layer_type"], "×".join(map(str, r["shape"])), f"{r['stable_rank']:.2f}",
                       f"{r['svd_entropy']:.4f}", r["method"])
        console.print(mt)
    if report.get("kind") == "adapter":
        if report.get("base"):
            said = report.get("base_source") or "--base"
            said = "given with --base" if said == "--base" else f"from the adapter's {said}"
            console.print(f"base: {report['base']} ({said})", markup=False, soft_wrap=True)
        elif report.get("base_note"):
            console.print(f"base: none — {report['base_note']}", markup=False, soft_wrap=True)
    guess, conf = report["optimizer_guess"], report.get("confidence")
    color = {"adam": "yellow", "muon": "cyan"}.get(guess, "white")
    # confidence is the probability of the printed guess; an unknown has a reason instead
    said = f"confidence {conf:.2f}" if conf is not None else escape(str(report.get("unknown_reason") or "no guess"))
    console.print(f"\n[bold]Spectral guess:[/bold] [{color}]{guess}[/{color}]  ({said})")
    for line in report["evidence"]:  # plain text: names like lora_A[...] must not be read as markup
        console.print(f"  • {line}", markup=False)
    prov = report.get("provenance")
    if prov and prov.get("optimizer"):
        console.print(f"[bold]Provenance:[/bold] pretrained with {escape(str(prov['optimizer']))} "
                      f"({escape(str(prov['source']))})")
    if prov and prov.get("finetune_optimizer"):
        console.print(f"[bold]Provenance:[/bold] fine-tuned with {escape(str(prov['finetune_optimizer']))}")
    if report.get("spectra_disagree"):
        console.print(f"[bold]Provenance and spectra disagree:[/bold] the spectra look {escape(str(guess))}-"
                      f"pretrained, provenance says {escape(str(prov['optimizer']))}; the recommendation follows "
                      "provenance")
    rec = report["recommendation"]
    console.print(f"\n[bold]Recommendation[/bold] for fine-tuning with {rec['target_optim']}: "
                  f"[bold]{rec['method']}[/bold]"
                  + (f", LoRA rank {rec['lora_rank'][0]}–{rec['lora_rank'][1]}" if rec.get("lora_rank") else "")
                  + f", lr {rec['lr']['min']:.0e}–{rec['lr']['max']:.0e}")
    for line in rec["reasons"]:
        console.print(f"  • {line}", markup=False)
    # commands are printed verbatim and unwrapped so they can be copied ("[lora]" is not markup here)
    if rec.get("command"):
        console.print(f"\n  {rec['command']}", markup=False, soft_wrap=True)
        if rec.get("auto_command"):
            console.print(f"  {rec['auto_command']}", markup=False, soft_wrap=True)
    else:
        console.print("\n  (no finetune command: the model to fine-tune is not known; pass --base PATH)")
    if rec.get("sweep_command"):
        console.print(f"  {rec['sweep_command']}", markup=False, soft_wrap=True)


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


#: At most this many failed cells are listed one per line at the end of a sweep (the rest: sweep.jsonl).
SWEEP_FAILED_LISTED = 20


def sweep_outcome_lines(counts: dict) -> list[str]:
    """What `muonft sweep` says on stderr when its run ends: the cell counts, then every failed cell with its
    error line (and any failed base or evaluation job), and, when failed cells of an earlier run were kept
    failed, that `--retry-failed` runs them again. `counts` is what `muonft_cli.sweep.run_sweep` returns."""
    total, failed = counts["total"], counts["failed"]
    lines = [f"sweep: {counts['done']} done, {failed} failed, {counts['skipped']} finished before this run and "
             f"not rerun (of {total} cells)"]
    listed = counts.get("failed_cells") or []
    if failed:
        lines.append(f"{failed} of {total} cells failed:")
        lines += [f"  FAILED   {c['id']}: {c['error']}" for c in listed[:SWEEP_FAILED_LISTED]]
        if len(listed) > SWEEP_FAILED_LISTED:
            lines.append(f"  ... and {len(listed) - SWEEP_FAILED_LISTED} more (see sweep.jsonl and summary.md)")
    for j in counts.get("failed_jobs") or []:
        lines.append(f"  FAILED   {j['id']}: {j['error']}")
    kept = counts.get("kept_failed") or 0
    if kept:
        lines.append(f"{kept} failed cell(s) from an earlier run were left failed: pass --retry-failed to run "
                     "them again")
    return lines


def sweep_warning_lines(summary: dict) -> list[str]:
    """The warnings of a sweep's report (an LR at the edge of its grid, cells not done), one `warning:` line
    each, for stderr; summary.md lists the same ones."""
    return [f"warning: {w}" for w in summary.get("warnings") or []]


def sweep_table(summary: dict):
    """A rich Table of a sweep's Table 1 (best normalised PPL per base, mean ± std over seeds, gap)."""
    from rich.table import Table

    from muonft_cli.sweep.labels import base_header, fmt_num, table1_cell

    bases = summary["bases"]
    t = Table(title="best " + ("val PPL / base PPL" if summary["normalised"] else "val PPL")
              + " over the LR sweep (mean over seeds; gap to matched in parentheses)")
    t.add_column("fine-tune")
    for n in bases:
        t.add_column(base_header(n, bases[n]), justify="right")
    t.add_column("best LRs", justify="right")
    for row in summary["table1"]:
        vals = [table1_cell(row["cols"].get(n), std=True) for n in bases]
        lrs = " / ".join(fmt_num(row["cols"][n]["best_lr"], "g") if n in row["cols"] else "—" for n in bases)
        t.add_row(row["label"], *vals, lrs)
    return t


def print_sweep_table(summary: dict) -> None:
    """Print a sweep's Table 1 on stdout."""
    from rich.console import Console

    Console().print(sweep_table(summary))

"""Where the training loop reports progress: a no-op sink and a rich progress bar on stderr.

The loop in `train.py` calls the sink and never branches on how (or whether) progress is shown, so
`--quiet` and `--json` keep stdout clean: the CLI picks `NullSink` or `RichSink`; tests pass their own.
"""

from __future__ import annotations

import math
import sys
from typing import Any


class NullSink:
    """Receives every event and shows nothing (`--quiet`, library use, non-zero ranks)."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Called once before the first step; `info` has mode, optim, start_step, total_steps, device."""

    def on_step(self, record: dict[str, Any]) -> None:
        """Called after every optimizer step with the `metrics.jsonl` record of that step."""

    def on_message(self, text: str) -> None:
        """A one-line notice (resume point, checkpoint on signal, ...)."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Called once with the run summary (also on an interrupted run's last checkpoint)."""


class RichSink(NullSink):
    """A rich progress bar on stderr: step, loss, lr, tok/s and ETA; evaluations as printed lines."""

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

"""The sink protocol: how the training loop reports progress without knowing how (or whether) it is shown.

The loop calls a sink's four methods and never branches on display, so `--quiet` and `--json` keep stdout
clean and library users get no console output: `NullSink` shows nothing; the CLI's progress bar is
`muonft_cli.render.RichSink`; tests pass their own.
"""

from __future__ import annotations

from typing import Any, Protocol


class Sink(Protocol):
    """What the training loop calls; any object with these four methods will do."""

    def on_start(self, info: dict[str, Any]) -> None: ...

    def on_step(self, record: dict[str, Any]) -> None: ...

    def on_message(self, text: str) -> None: ...

    def on_end(self, summary: dict[str, Any]) -> None: ...


class NullSink:
    """Receives every event and shows nothing (`--quiet`, library use, non-zero ranks)."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Called once before the first step; `info` has mode, optim, start_step, total_steps, device,
        world_size."""

    def on_step(self, record: dict[str, Any]) -> None:
        """Called after every optimizer step with the `metrics.jsonl` record of that step."""

    def on_message(self, text: str) -> None:
        """A one-line notice (resume point, ...)."""

    def on_end(self, summary: dict[str, Any]) -> None:
        """Called once with the run summary (also on an interrupted run's last checkpoint)."""

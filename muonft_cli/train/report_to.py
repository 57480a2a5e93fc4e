"""Logging backends beside `metrics.jsonl`: `train.report_to` / `--report-to tensorboard|wandb` (repeatable).

Owns
- `check(backends)`: an unknown backend, or one whose package is not installed, is bad input (one line naming
  the `pip install`), raised before any work; it only looks the packages up (`importlib.util.find_spec`) — a
  backend is imported when a run opens it, never for a plain run;
- `Reporter`: rank 0's writers (the training loop opens none on other ranks). Every step it logs the scalars of
  that step's `metrics.jsonl` record (`TAGS`) and the matrices Muon orthogonalised so far (all ranks),
  at the record's `step`:
  - TensorBoard: `torch.utils.tensorboard.SummaryWriter` into `OUT/tb/`; a resumed run writes into the same
    folder with `purge_step` = the checkpoint's step + 1, so the steps redone after a kill appear once;
  - W&B: `wandb.init(dir=OUT, ...)` (its files go to `OUT/wandb/`; `WANDB_MODE=offline` works without an
    account), named `train.run_name` (a sweep cell: its cell id) or the `--out` folder's name; the run id is
    kept in `OUT/wandb/muonft-run-id`, and a resumed run continues it (`resume="allow"`).
"""

from __future__ import annotations

import importlib.util
import secrets
import shutil
from pathlib import Path
from typing import Any

from muonft_cli._common import first_line
from muonft_cli.config import REPORT_BACKENDS
from muonft_cli.errors import UserInputError

#: `metrics.jsonl` key -> the scalar's name in the backends.
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
        "tokens": "train/tokens", "epoch": "train/epoch", "val_loss": "val/loss", "val_ppl": "val/ppl"}
#: The scalar of Muon's counter (matrices orthogonalised so far, summed over ranks; absent without Muon).
ORTHO_TAG = "muon/ns_matrices_done"
#: Each backend's package (what `find_spec` looks up) and the line that installs it.
PACKAGES = {"tensorboard": ("tensorboard", "pip install muonft[tensorboard]"),
            "wandb": ("wandb", "pip install wandb")}
#: Where a run keeps its W&B run id (a resumed run continues that run).
WANDB_ID_FILE = Path("wandb") / "muonft-run-id"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check(backends: list[str]) -> list[str]:
    """The backends to open (`none` and repeats dropped); `UserInputError` for an unknown or missing one."""
    out: list[str] = []
    for name in backends:
        if name == "none" or name in out:
            continue
        if name not in PACKAGES:
            raise UserInputError(f"--report-to: unknown backend {name!r}: use one of {', '.join(REPORT_BACKENDS)}")
        module, install = PACKAGES[name]
        if not _installed(module):
            raise UserInputError(f"--report-to {name}: the {module} package is not installed: {install} (or drop "
                                 f"--report-to {name})")
        out.append(name)
    return out


class Reporter:
    """The open backends of one run (rank 0); `log(record, ortho)` every step, `close()` at the end."""

    def __init__(self, backends: list[str], out: Path, start_step: int | None, run_name: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        """Open the backends; `start_step`: the checkpoint step a resumed run continues from (0: it starts over),
        None for a new run. W&B failing to start (no account, no network) is bad input; on any failure what
        this opened is closed and the folders it created removed."""
        self.tb: Any = None
        self.wandb_run: Any = None
        names = check(backends)
        new = [out / d for d in ("tb", "wandb") if not (out / d).exists()]
        opening = ""
        try:
            if "tensorboard" in names:
                opening = "tensorboard"
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(out / "tb"),
                                        purge_step=None if start_step is None else start_step + 1)
            if "wandb" in names:
                opening = "wandb"
                self.wandb_run = _wandb_init(out, run_name or out.name, config)
        except BaseException as e:
            self.close()
            for d in new:
                shutil.rmtree(d, ignore_errors=True)
            if opening == "wandb" and type(e).__module__.split(".")[0] == "wandb":  # its errors: login, network
                raise UserInputError(f"--report-to wandb: wandb could not start a run ({first_line(e)}): run "
                                     f"`wandb login` or set WANDB_MODE=offline, then continue with --resume (the "
                                     f"run has not started)") from None
            raise

    def log(self, record: dict[str, Any], ortho: int | None = None) -> None:
        """Log one step's record (the `metrics.jsonl` one) at its `step`; None values (no validation) skipped."""
        step = int(record["step"])
        scalars = {tag: float(record[key]) for key, tag in TAGS.items() if record.get(key) is not None}
        if ortho is not None:
            scalars[ORTHO_TAG] = float(ortho)
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        """Flush and close every backend (also after an interrupted or failed run)."""
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wandb_init(out: Path, name: str, config: dict[str, Any] | None) -> Any:
    import wandb

    id_file = out / WANDB_ID_FILE
    try:
        run_id = id_file.read_text(encoding="utf-8").strip()
    except OSError:
        run_id = ""
    if not run_id:
        run_id = secrets.token_hex(4)
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n", encoding="utf-8")
    return wandb.init(project="muonft", name=name, id=run_id, resume="allow", dir=str(out), config=config,
                      settings=wandb.Settings(console="off", silent=True))

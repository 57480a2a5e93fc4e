"""Domain exceptions. The engine raises these; only `cli.py` turns them into a message and an exit code.

`MuonftError` (and subclasses) carry an `exit_code`: 2 for bad input (the user can fix it), 1 for a
failure during work (the last good state is kept).
"""

from __future__ import annotations


class MuonftError(Exception):
    """A failure during work: one-line message, exit code 1."""

    exit_code = 1


class UserInputError(MuonftError):
    """Bad input the user can fix: one-line message naming the problem and the fix, exit code 2."""

    exit_code = 2


class ResumeRefusedError(UserInputError):
    """`--resume` refused: the run directory cannot be continued (no run there, another config, another data
    size or process count). Exit code 2. The message always starts with `--resume: `, so the CLI's line is
    `error: --resume: ...`; `muonft sweep` recognises exactly that line (after an exit 2 of a resume attempt)
    as the one error after which it may restart a cell afresh with `--overwrite`."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("--resume: ") else f"--resume: {message}")


class ConfigError(UserInputError):
    """An invalid config / recipe / override. May hold several problems, reported at once."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        if len(self.problems) == 1:
            msg = self.problems[0]
        else:
            msg = f"{len(self.problems)} problems in the config: " + "; ".join(self.problems)
        super().__init__(msg)


class TrainingDivergedError(MuonftError):
    """Loss became NaN/inf; the last good checkpoint is kept."""


class TrainingInterrupted(MuonftError):
    """SIGINT/SIGTERM stopped training after writing a checkpoint; `--resume` continues it (exit 130)."""

    exit_code = 130

"""torchrun entry point for the kill -9 test: `_fsdp_kill_after.py N muonft-args...` runs the muonft CLI and
SIGKILLs this process right after its N-th checkpoint is complete (every rank does: the checkpoint ends with
a barrier), like a node lost to the scheduler."""

from __future__ import annotations

import os
import signal
import sys

from muonft_cli.train import loop

after = int(sys.argv[1])
_save = loop.Loop.save_checkpoint
_count = [0]


def _save_then_die(self):
    path = _save(self)
    _count[0] += 1
    if _count[0] == after:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


loop.Loop.save_checkpoint = _save_then_die

if __name__ == "__main__":
    from muonft_cli.cli import app

    sys.argv = ["muonft", *sys.argv[2:]]
    app()

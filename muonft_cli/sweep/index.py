"""The sweep's index, `sweep.jsonl`: an append-only JSON-lines event log; the latest record of an id wins.

Each record is written with one `os.write` on an `O_APPEND` descriptor and fsync'd, so a SIGKILL can at worst
leave a torn final line. The next writer starts its record on a fresh line, so a torn line can also sit in the
middle of the file: reading skips every line that does not parse and keeps the records after it
(`_common.read_jsonl(..., skip_bad=True)`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from muonft_cli._common import read_jsonl

INDEX = "sweep.jsonl"


class SweepIndex:
    """Append-only JSON-lines event log; the latest record per id is the state of that job."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: dict) -> dict:
        """Add one record (a `time` field is added); returns it."""
        rec = {**record, "time": round(time.time(), 3)}
        line = (json.dumps(rec, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # a torn line from a killed writer: start ours on a fresh line so it stays parseable
            size = os.fstat(fd).st_size
            if size:
                with open(self.path, "rb") as fh:
                    fh.seek(size - 1)
                    if fh.read(1) != b"\n":
                        line = b"\n" + line
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def records(self) -> list[dict]:
        """Every parseable record, in order (a torn line from a kill mid-write is skipped)."""
        return [rec for rec in read_jsonl(self.path, skip_bad=True) if "id" in rec]

    def latest(self) -> dict[str, dict]:
        """id -> its latest record."""
        state: dict[str, dict] = {}
        for rec in self.records():
            state[rec["id"]] = rec
        return state


def status_of(rec: dict | None, hash_: str) -> str:
    """A job's status from its latest record: `pending` when there is none or it is of another config."""
    if rec is None or rec.get("hash") != hash_:
        return "pending"
    return str(rec.get("status", "pending"))

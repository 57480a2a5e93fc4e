"""Process control of a sweep: run every job as a `python -m muonft_cli` subprocess on a pool of worker slots.

Owns spawning (one environment per worker slot: CPU threads divided, one GPU each), waiting and reaping,
the up-front check that the sweep directory can be written, signals (SIGTERM/SIGINT stop the running jobs,
which checkpoint; `PR_SET_PDEATHSIG` stops them if the sweep process dies), and locks (`locks/sweep.lock` for
the directory, an inherited `flock` on `locks/<id>.lock` for each job's whole life, so a restarted sweep never
runs a job twice at once). Which weights to prune and which evaluations to add are decisions of
`muonft_cli.sweep.policy`, called after each finished cell. `executor="ray"` swaps the process control for
Ray's (`muonft_cli.sweep.ray_executor`): the loop, the index and the decisions stay these.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import yaml

from muonft_cli._common import atomic_write_text, unwritable_dir_problem
from muonft_cli._common import try_lock as _try_lock
from muonft_cli.errors import UserInputError
from muonft_cli.sweep import policy
from muonft_cli.sweep.index import INDEX, SweepIndex, status_of
from muonft_cli.sweep.jobs import Job, command, default_engine, error_line, last_json, resume_refused, static_jobs
from muonft_cli.sweep.plan import PLAN_FILE, SweepPlan, safe_name

EXECUTORS = ("local", "ray")


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    started: float
    attempt: int
    lock_fd: int
    stdout: Path
    stderr: Path
    stderr_offset: int  # where this attempt's part of the appended-to stderr log starts
    resumed: bool


def run_sweep(
    plan: SweepPlan,
    out: str | Path,
    workers: int | None = None,
    keep_weights: bool = False,
    retry_failed: bool = False,
    engine: Sequence[str] | None = None,
    on_event: Callable[[dict], None] | None = None,
    threads: int | None = None,
    poll_s: float = 0.2,
    executor: str = "local",
    address: str | None = None,
) -> dict:
    """Run (or resume) every job of the plan; returns what happened to its cells.

    Returns:
        `{"total", "skipped", "done", "failed", "kept_failed", "failed_cells", "failed_jobs"}`: cell counts
        (`skipped`: finished before this run and not run again, `kept_failed` of them failed, left failed
        without `retry_failed`), then `[{"id", "error"}]` for every failed cell and every other failed job
        (a base's pretraining or an evaluation).

    Args:
        plan: from `load_plan`.
        out: the sweep directory (created; holds sweep.yaml, sweep.jsonl, bases/, cells/, configs/, logs/).
        workers: parallel processes (CPU threads divided between them; on GPUs one device each, round-robin);
            default 1 (local), as many as the Ray cluster's resources fit (ray).
        keep_weights: keep every cell's checkpoints and full-model weights.
        retry_failed: run failed jobs again (default: keep their recorded failure).
        engine: the command prefix that runs a job (default `python -m muonft_cli`).
        on_event: called with each index record as it is written (display).
        threads: CPU threads per worker (default: available cores // workers; ray: 1), under Ray the `num_cpus`
            of each job's task.
        poll_s: how often running processes are polled.
        executor: `local` (subprocesses on this machine) or `ray` (each job a Ray task on a cluster, see
            `muonft_cli.sweep.ray_executor`; `out` must then be on a filesystem every node shares).
        address: with `ray`: the cluster to connect to (`auto`, `HOST:PORT`, `local`); default: start or
            attach a local instance.

    Raises:
        UserInputError: bad `workers`/`executor`, an unwritable `out`, another sweep process holds this
            directory, Ray not installed or its cluster not reachable.
        KeyboardInterrupt: on SIGINT/SIGTERM, after the running cells checkpointed and stopped.
    """
    out = Path(out)
    if executor not in EXECUTORS:
        raise UserInputError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if address is not None and executor != "ray":
        raise UserInputError("--address is the Ray cluster's: pass it with --executor ray")
    if workers is not None and workers < 1:
        raise UserInputError(f"--workers must be >= 1, got {workers}")
    ray = None
    if executor == "ray":
        from muonft_cli.sweep import ray_executor

        ray = ray_executor.import_ray()
        out = out.absolute()  # the tasks run on other nodes, in other working directories
    check_out_dir(out)
    engine = list(engine) if engine else (None if ray else default_engine())
    for sub in ("configs", "logs", "locks", "cells", "bases"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sweep_lock = _try_lock(out / "locks" / "sweep.lock")
    if sweep_lock is None:
        raise UserInputError(f"another `muonft sweep` is running in '{out}': wait for it or stop it first")
    try:
        atomic_write_text(out / PLAN_FILE, yaml.safe_dump(plan.recipe, sort_keys=False))
        if ray is not None:
            args = (plan, out, workers or math.inf, keep_weights, retry_failed, engine, on_event, threads, poll_s)
            return ray_executor.run_sweep_ray(ray, address, args)
        return _Scheduler(plan, out, workers or 1, keep_weights, retry_failed, engine, on_event, threads,
                          poll_s).run()
    finally:
        os.close(sweep_lock)


def check_out_dir(out: Path) -> None:
    """Fail fast, before anything runs, when the sweep directory cannot be created or written.

    `_common.unwritable_dir_problem` first; then `out` is created (as the sweep would) and a probe file written
    and removed in it (as root, `os.access` says yes under /proc); nothing else is touched.

    Raises:
        UserInputError: one line naming the path, why, and what to pass instead.
    """
    fix = "pass an --out in a directory you can write"
    problem = unwritable_dir_problem(out)  # the check `pretrain`/`finetune` make too
    if problem:
        raise UserInputError(f"--out '{out}': {problem}: {fix}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserInputError(f"--out '{out}' is not writable ({e.strerror or e}): {fix}") from None


def _describe(j: Job) -> dict:
    if j.cell is None:
        return {"base": j.base.name if j.base else None, "seed": j.seed}
    c = j.cell
    return {"base": c.base, "method": c.method, "optim": c.optim, "lr": c.lr, "rank": c.rank, "seed": c.seed,
            "axes": [[k, v] for k, v in c.axes]}


class _Scheduler:
    """The main-thread loop: start ready jobs on free worker slots, record how each process ended."""

    def __init__(self, plan, out, workers, keep_weights, retry_failed, engine, on_event, threads, poll_s):
        self.plan, self.out, self.workers, self.keep_weights = plan, out, workers, keep_weights
        self.retry_failed, self.engine, self.threads, self.poll_s = retry_failed, engine, threads, poll_s
        self.emit = on_event or (lambda rec: None)
        self.index = SweepIndex(out / INDEX)
        self.gpus = _count_gpus()
        self.jobs: dict[str, Job] = {}
        self.state: dict[str, str] = {}
        self.attempts: dict[str, int] = {}
        self.queue: list[str] = []
        self.running: dict[int, _Running] = {}
        self.stopping = False
        self.skipped = 0
        self.kept_failed = 0

    # -- bookkeeping
    def _record(self, j: Job, status: str, **extra) -> dict:
        rec = self.index.append({"id": j.id, "kind": j.kind, "hash": j.hash, "status": status,
                                 "attempt": self.attempts.get(j.id, 0), **_describe(j), **extra})
        self.emit(rec)
        return rec

    def _add(self, j: Job, latest: dict[str, dict]) -> None:
        if j.id in self.jobs:
            return
        self.jobs[j.id] = j
        rec = latest.get(j.id)
        st = status_of(rec, j.hash)
        self.attempts[j.id] = int(rec.get("attempt", 0)) if st != "pending" and rec else 0
        if st == "done" or (st == "failed" and not self.retry_failed):
            self.state[j.id] = st
            self.skipped += j.kind == "cell"
            self.kept_failed += j.kind == "cell" and st == "failed"
            return
        self.state[j.id] = "pending"
        if rec is None or rec.get("hash") != j.hash:
            self._record(j, "pending")
        self.queue.append(j.id)

    def run(self) -> dict:
        latest = self.index.latest()
        for j in static_jobs(self.plan, self.out):
            self._add(j, latest)
        for j in policy.forgetting_jobs(self.plan, self.out, latest):
            self._add(j, latest)

        def _stop(signum, frame):  # SIGTERM/SIGINT: cells checkpoint and stop; they stay "running" for a resume
            self.stopping = True
            self._on_stop_signal()

        old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            while (self.queue or self.running) and not self.stopping:
                self._reap()
                self._fail_orphans()
                self._fill()
                if self.running or self.queue:
                    self._idle_wait()
            if self.stopping:
                self._stop_running()
                raise KeyboardInterrupt
        finally:
            for sig, h in old.items():
                signal.signal(sig, h)
        if not self.keep_weights:
            policy.prune_weights(self.plan, self.out, self.index)
        latest = self.index.latest()
        cells = [self.jobs[c.id] for c in self.plan.cells]

        def failed(jobs) -> list[dict]:
            return [{"id": j.id, "error": str(latest[j.id].get("error") or "failed")} for j in jobs
                    if status_of(latest.get(j.id), j.hash) == "failed"]

        failed_cells = failed(cells)
        return {"total": len(cells), "skipped": self.skipped,
                "done": sum(status_of(latest.get(j.id), j.hash) == "done" for j in cells),
                "failed": len(failed_cells), "kept_failed": self.kept_failed, "failed_cells": failed_cells,
                "failed_jobs": failed([j for j in self.jobs.values() if j.kind != "cell"])}

    def _fail_orphans(self) -> None:
        """Jobs whose dependency failed fail too (a base that could not be pretrained)."""
        for jid in list(self.queue):
            j = self.jobs[jid]
            bad = [d for d in j.deps if self.state.get(d) == "failed"]
            if bad:
                self.queue.remove(jid)
                self.state[jid] = "failed"
                self._record(j, "failed", error=f"{bad[0]} failed")

    def _ready(self, jid: str) -> bool:
        return all(self.state.get(d) == "done" for d in self.jobs[jid].deps)

    def _fill(self) -> None:
        while len(self.running) < self.workers:
            slot = min(set(range(len(self.running) + 1)) - set(self.running))
            started = False
            for jid in [jid for jid in self.queue if self._ready(jid)]:
                r = self._start(self.jobs[jid], slot)
                if r is not None:  # None: an orphaned process of a killed sweep still holds it; try later
                    self.queue.remove(jid)
                    self.running[slot] = r
                    started = True
                    break
            if not started:
                return

    # -- process control of the local executor (`muonft_cli.sweep.ray_executor.RayScheduler` has Ray's)
    def _idle_wait(self) -> None:
        time.sleep(self.poll_s)

    def _on_stop_signal(self) -> None:
        for r in self.running.values():
            try:
                r.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _stop_running(self) -> None:
        """After a stop signal: wait for the signalled cells to checkpoint and exit."""
        for r in self.running.values():
            try:
                r.proc.wait(timeout=300)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            os.close(r.lock_fd)

    def _start(self, j: Job, slot: int, force_overwrite: bool = False) -> _Running | None:
        lock_fd = _try_lock(self.out / "locks" / f"{safe_name(j.id)}.lock")
        if lock_fd is None:
            return None
        name = safe_name(j.id)
        cfg_path = atomic_write_text(self.out / "configs" / f"{name}.yaml", yaml.safe_dump(j.config, sort_keys=False))
        args, resumed = command(j, cfg_path, force_overwrite)
        self.attempts[j.id] = self.attempts.get(j.id, 0) + 1
        stdout, stderr = self.out / "logs" / f"{name}.out", self.out / "logs" / f"{name}.err"
        with open(stdout, "wb") as fo, open(stderr, "ab") as fe:
            fe.write(f"\n=== attempt {self.attempts[j.id]}: {' '.join(args)}\n".encode())
            fe.flush()
            offset = fe.tell()
            proc = subprocess.Popen(self.engine + args, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                    env=worker_env(slot, self.workers, self.gpus, self.threads), pass_fds=(lock_fd,),
                                    preexec_fn=_set_pdeathsig)
        self.state[j.id] = "running"
        self._record(j, "running", resumed=resumed, pid=proc.pid)
        return _Running(job=j, proc=proc, started=time.time(), attempt=self.attempts[j.id], lock_fd=lock_fd,
                        stdout=stdout, stderr=stderr, stderr_offset=offset, resumed=resumed)

    def _reap(self) -> None:
        for slot, r in list(self.running.items()):
            code = r.proc.poll()
            if code is None:
                continue
            del self.running[slot]
            os.close(r.lock_fd)
            nxt = self._finish(r, code, slot)
            if nxt is not None:
                self.running[slot] = nxt

    def _finish(self, r: _Running, code: int, slot: int) -> _Running | None:
        outcome = {"code": code, "error": error_line(r.stderr, code, r.stderr_offset),
                   "refused": r.resumed and resume_refused(r.stderr, code, r.stderr_offset),
                   "result": last_json(r.stdout) if code == 0 else None}
        return self._conclude(r.job, r.resumed, r.started, outcome, slot)

    def _conclude(self, j: Job, resumed: bool, started: float, outcome: dict, slot: int):
        """Record how a job's process ended (`outcome`: its exit `code`, `error` line, whether a `--resume` was
        `refused`, its JSON `result`); returns the job's restart when its resume was refused, else None."""
        runtime = round(time.time() - started, 2)
        code, err = outcome["code"], outcome["error"]
        if resumed and outcome["refused"]:
            # the engine refused to resume (e.g. a checkpoint of a different config): start the run afresh.
            # Any other error (exit 2 included) fails the job below and keeps its checkpoint.
            self._record(j, "running", note="resume refused, restarting: " + err)
            return self._start(j, slot, force_overwrite=True)
        if code != 0:
            self.state[j.id] = "failed"
            self._record(j, "failed", error=err, returncode=code, runtime_s=runtime)
            if j.kind == "cell":
                self._after_cell()
            return None
        result = outcome["result"]
        if result is None:
            self.state[j.id] = "failed"
            self._record(j, "failed", error="no JSON result on stdout", returncode=0, runtime_s=runtime)
            return None
        self.state[j.id] = "done"
        key = {"cell": "summary", "base": "summary"}.get(j.kind, "eval")
        self._record(j, "done", runtime_s=runtime, **{key: result})
        if j.kind == "cell":
            self._after_cell()
        return None

    def _after_cell(self) -> None:
        """Apply the policy: prune weights no longer needed; queue forgetting evals of finished groups."""
        if not self.keep_weights:
            policy.prune_weights(self.plan, self.out, self.index)
        latest = self.index.latest()
        for j in policy.forgetting_jobs(self.plan, self.out, latest):
            self._add(j, latest)


# ------------------------------------------------------------------------------------- processes, locks


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: SIGTERM the cell process when the sweep process dies (it checkpoints and exits)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setpgrp()  # own process group: a Ctrl-C at the terminal goes to the sweep, which stops cells itself


def worker_env(worker: int, workers: int, gpus: int, threads: int | None = None) -> dict[str, str]:
    """Environment for one worker: CPU threads divided between workers; on GPUs one device per worker."""
    env = dict(os.environ)
    try:
        ncpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        ncpu = os.cpu_count() or 1
    n = threads or max(1, ncpu // max(1, workers))
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(n)
    if gpus > 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        devs = [d for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(gpus)]
        env["CUDA_VISIBLE_DEVICES"] = devs[worker % len(devs)]
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def _count_gpus() -> int:
    """CUDA devices the workers share: torch's count (imported here, lazily), whether or not nvidia-smi is on
    PATH; 0 when `CUDA_VISIBLE_DEVICES` is empty or torch/CUDA is unavailable."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # pragma: no cover - a broken CUDA install: run on CPU
        return 0

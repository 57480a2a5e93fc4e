"""`muonft sweep --executor ray`: every job of a sweep a Ray task, so a sweep spreads over a Ray cluster's GPUs.

Owns the connection to Ray (`--address`: default start or attach a local instance, `auto` an existing cluster),
the task that runs one job on whatever node Ray picks, and the driver's side of it (`RayScheduler`, the local
`muonft_cli.sweep.scheduler._Scheduler` with its process control swapped for Ray's). Everything else is the
local executor's: the same `sweep.jsonl`, written by the driver only, the same resume rules, the same policy
and reports.

One job = one Ray task asking for `num_cpus` = threads per cell and `num_gpus` = 1 when it trains on CUDA
(`train.device` cuda, or auto on a cluster with GPUs; Ray then sets `CUDA_VISIBLE_DEVICES`). On its node the
task checks that it sees the sweep directory (a token the driver wrote: on several machines `--out` must be on
a filesystem every node mounts at the same path), takes the job's `locks/<id>.lock` (held: an interrupted
process of a killed driver is still checkpointing, and the driver tries again a second later), picks
`--resume`/`--overwrite` as the local executor does, and runs the same `muonft finetune|pretrain|eval`
subprocess under a small supervisor process:

    Ray worker -> supervisor (`python -m muonft_cli.sweep.ray_executor supervise`) -> muonft finetune ...

Ray SIGKILLs a worker's direct children when the worker exits (`RAY_kill_child_processes_on_worker_exit`,
e.g. when the driver dies), which would give a cell no chance to checkpoint; the supervisor takes that kill and
the cell, which holds the job's lock and has `PR_SET_PDEATHSIG` = SIGTERM on the supervisor, checkpoints and
exits, exactly as a local cell does when its sweep process dies. (A cluster started with
`RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper=1` kills the cell too: it is then resumed from
its last periodic checkpoint.) The supervisor exits as the cell did (its code, or the same signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from muonft_cli._common import atomic_write_text, first_line
from muonft_cli._common import try_lock as _try_lock
from muonft_cli.errors import UserInputError
from muonft_cli.sweep.jobs import Job, command, error_line, last_json, resume_refused
from muonft_cli.sweep.plan import safe_name
from muonft_cli.sweep.scheduler import _Scheduler, _set_pdeathsig

INSTALL_HINT = "pip install 'muonft[ray]'"
#: The driver's token in the sweep directory, which each task reads back on its node (shared-filesystem check).
TOKEN_FILE = "ray-driver.token"
#: Environment variables of the driver that reach every cell on the cluster (beside the nodes' own).
FORWARDED_ENV_PREFIXES = ("MUONFT_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "WANDB_")
BUSY_RETRY_S = 1.0  # a job whose lock is still held (an orphan checkpointing) is tried again after this
LOST_RETRIES = 3  # a task lost to Ray (its worker or node died) is resubmitted this many times, then fails
VISIBLE_WAIT_S = 10.0  # how long a task retries the shared-directory check (a shared filesystem's caching)
STOP_WAIT_S = 300.0  # on SIGTERM/SIGINT: how long the driver waits for the cells to checkpoint and exit
_POLL_S = 0.2


def import_ray():
    """The `ray` module, or the one-line exit-2 error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserInputError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def connect(ray, address: str | None) -> None:
    """Start or attach a local Ray instance (`address` None), or connect to `address` (`auto`: the running
    cluster on this machine; `local`: always a new local instance; `HOST:PORT`; `ray://...`)."""
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as e:
        hint = ("start one with `ray start --head` (then `ray start --address HEAD:6379` on the other nodes), or "
                "leave out --address to start a local instance")
        raise UserInputError(f"--address {address}: no Ray cluster to connect to ({first_line(e)}): {hint}") \
            from None
    except ValueError as e:
        raise UserInputError(f"--address {address}: {first_line(e)}") from None


def uses_gpu(config: dict, cluster_gpus: float) -> bool:
    """Whether a job trains (or evaluates) on CUDA: `train.device` cuda[:N], or auto on a cluster with GPUs."""
    device = str(((config.get("train") or {}).get("device")) or "auto").lower()
    return device.startswith("cuda") or (device == "auto" and cluster_gpus > 0)


# ------------------------------------------------------------------------------------------- on the node


def shared_dir_problem(out: Path, token: str, wait_s: float | None = None) -> str | None:
    """Why this node cannot use the sweep directory (None: it sees the driver's token there).

    A few seconds of retries cover a shared filesystem's attribute caching; a directory that is missing, or
    holds another driver's token (a same-named local folder), is reported."""
    deadline = time.monotonic() + (VISIBLE_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            seen = (out / "locks" / TOKEN_FILE).read_text(encoding="utf-8").strip()
            why = None if seen == token else "it holds another sweep driver's token"
        except FileNotFoundError:
            why = "it does not exist there" if not out.is_dir() else "the driver's files are not there"
        except OSError as e:
            why = e.strerror or str(e)
        if why is None:
            return None
        if time.monotonic() >= deadline:
            return why
        time.sleep(0.5)


def _node() -> str:
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:  # pragma: no cover - outside a Ray worker
        import socket

        return socket.gethostname()


def _wait_ignoring_interrupts(proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        if time.monotonic() >= deadline:
            proc.kill()
        try:
            time.sleep(_POLL_S)
        except KeyboardInterrupt:  # Ray's cancel, again: the cell is already stopping
            pass


def run_job(spec: dict):
    """The body of a job's Ray task (a generator: Ray streams what it yields to the driver).

    Yields `{"event": "busy"}` (the job's lock is held: nothing ran), `{"event": "failed", "error"}` (the node
    cannot use the sweep directory), or `{"event": "started", "resumed", "pid", "node"}` and then
    `{"event": "ended", "code", "error", "refused", "result"}`. A cancelled task (the driver was stopped)
    SIGTERMs its cell, which checkpoints, and waits for it.
    """
    job: Job = spec["job"]
    out = Path(spec["out"])
    problem = shared_dir_problem(out, spec["token"])
    if problem:
        yield {"event": "failed", "error": (
            f"Ray node {_node()} cannot use the sweep directory '{out}' ({problem}): with --executor ray on "
            f"several machines, --out must be on a filesystem that every node mounts at the same path (e.g. NFS); "
            f"rerun with --retry-failed once it is")}
        return
    name = safe_name(job.id)
    lock_fd = _try_lock(out / "locks" / f"{name}.lock")
    if lock_fd is None:
        yield {"event": "busy"}
        return
    proc = None
    try:
        args, resumed = command(job, Path(spec["cfg_path"]), spec["force_overwrite"])
        engine = list(spec["engine"] or [sys.executable, "-m", "muonft_cli"])
        env = dict(os.environ)
        env.update(spec["env"])
        threads = str(spec["threads"])
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = threads
        if not spec["gpu"]:
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU cell never takes a GPU that Ray did not give it
        env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        cwd = spec["cwd"] if spec["cwd"] and os.path.isdir(spec["cwd"]) else None
        stdout, stderr = out / "logs" / f"{name}.out", out / "logs" / f"{name}.err"
        with open(stdout, "wb") as fo, open(stderr, "ab") as fe:
            fe.write(f"\n=== attempt {spec['attempt']} (ray node {_node()}): {' '.join(args)}\n".encode())
            fe.flush()
            offset = fe.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "muonft_cli.sweep.ray_executor", "supervise", str(lock_fd), "--",
                 *engine, *args], stdout=fo, stderr=fe, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                pass_fds=(lock_fd,), preexec_fn=_set_pdeathsig)
        yield {"event": "started", "resumed": resumed, "pid": proc.pid, "node": _node()}
        while proc.poll() is None:
            time.sleep(_POLL_S)
        code = proc.returncode
        ended = {"event": "ended", "code": code, "error": error_line(stderr, code, offset),
                 "refused": resumed and resume_refused(stderr, code, offset),
                 "result": last_json(stdout) if code == 0 else None}
        os.close(lock_fd)  # released before the driver hears of it, so it can start the job again at once
        lock_fd = None
        yield ended
    finally:
        if proc is not None and proc.poll() is None:  # cancelled (the driver stopped): checkpoint and exit
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            _wait_ignoring_interrupts(proc, STOP_WAIT_S)
        if lock_fd is not None:
            os.close(lock_fd)


def supervise(lock_fd: int, cmd: list[str]) -> int:  # pragma: no cover - runs as its own process
    """Run `cmd` (the cell) with the lock fd inherited and `PR_SET_PDEATHSIG` = SIGTERM; forward SIGTERM to it;
    end as it ended. See the module docstring for why this process exists."""
    proc = subprocess.Popen(cmd, pass_fds=(lock_fd,), preexec_fn=_set_pdeathsig)
    os.close(lock_fd)

    def _forward(signum, frame):
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:  # pragma: no cover
            continue
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


# ------------------------------------------------------------------------------------------ the driver


@dataclass
class _RayRunning:
    job: Job
    gen: object  # ray.ObjectRefGenerator
    force_overwrite: bool
    started: float = field(default_factory=time.time)
    resumed: bool = False
    launched: bool = False  # the task reported "started"


class RayScheduler(_Scheduler):
    """The local scheduler's loop with each job a Ray task instead of a local subprocess."""

    def __init__(self, ray, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray = ray
        self.gpus = 0  # the local executor's GPU slots are not used: Ray assigns devices
        self.cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
        self.threads = self.threads or 1
        self.token = uuid.uuid4().hex
        atomic_write_text(self.out / "locks" / TOKEN_FILE, self.token + "\n")
        self.not_before: dict[str, float] = {}
        self.lost: dict[str, int] = {}
        self.cwd = os.getcwd()
        self.env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        self.remote = ray.remote(run_job)

    def _ready(self, jid: str) -> bool:
        return super()._ready(jid) and self.not_before.get(jid, 0.0) <= time.time()

    def _start(self, j: Job, slot: int, force_overwrite: bool = False) -> _RayRunning | None:
        gpu = uses_gpu(j.config, self.cluster_gpus)
        if gpu and self.cluster_gpus <= 0:
            if j.id in self.queue:
                self.queue.remove(j.id)
            self.state[j.id] = "failed"
            self._record(j, "failed", error="train.device is cuda but the Ray cluster has no GPU: add GPU nodes "
                                            "or set train.device: cpu")
            if j.kind == "cell":
                self._after_cell()
            return None
        name = safe_name(j.id)
        cfg_path = atomic_write_text(self.out / "configs" / f"{name}.yaml", yaml.safe_dump(j.config, sort_keys=False))
        self.attempts[j.id] = self.attempts.get(j.id, 0) + 1
        spec = {"job": j, "out": str(self.out), "cfg_path": str(cfg_path), "force_overwrite": force_overwrite,
                "attempt": self.attempts[j.id], "token": self.token, "engine": self.engine, "env": self.env,
                "threads": self.threads, "gpu": gpu, "cwd": self.cwd}
        gen = self.remote.options(num_returns="streaming", max_retries=0, num_cpus=self.threads,
                                  num_gpus=1 if gpu else 0).remote(spec)
        self.state[j.id] = "running"
        return _RayRunning(job=j, gen=gen, force_overwrite=force_overwrite)

    def _next(self, r: _RayRunning):
        """The task's next event, `None` while there is none yet, or `{"event": "lost", "error"}`."""
        ready, _ = self.ray.wait([r.gen], timeout=0)
        if not ready:
            return None
        try:
            return self.ray.get(next(r.gen))
        except StopIteration:
            return {"event": "lost", "error": "the Ray task ended without a result"}
        except self.ray.exceptions.RayTaskError as e:  # our own code raised on the node: a bug, not an outage
            return {"event": "failed", "error": "ray task: " + first_line(e.as_instanceof_cause())}
        except self.ray.exceptions.RayError as e:  # its worker or node died, or it was cancelled
            return {"event": "lost", "error": f"ray: {type(e).__name__}: {first_line(e)}"}

    def _reap(self) -> None:
        for slot, r in list(self.running.items()):
            while (ev := self._next(r)) is not None:
                j = r.job
                kind = ev["event"]
                if kind == "started":
                    r.launched, r.resumed, r.started = True, bool(ev["resumed"]), time.time()
                    self._record(j, "running", resumed=r.resumed, pid=ev["pid"], node=ev["node"])
                    continue
                del self.running[slot]
                nxt = None
                if kind == "ended":
                    nxt = self._conclude(j, r.resumed, r.started, ev, slot)
                elif kind == "busy":  # an earlier driver's cell still checkpoints: try again shortly
                    self.attempts[j.id] -= 1
                    self._requeue(j)
                elif kind == "lost" and self.lost.get(j.id, 0) < LOST_RETRIES:
                    self.lost[j.id] = self.lost.get(j.id, 0) + 1
                    self._record(j, "running", note=ev["error"] + "; resubmitting")
                    self._requeue(j)
                else:  # "failed", or lost too often
                    self.state[j.id] = "failed"
                    self._record(j, "failed", error=ev["error"], runtime_s=round(time.time() - r.started, 2))
                    if j.kind == "cell":
                        self._after_cell()
                if nxt is not None:
                    self.running[slot] = nxt
                break

    def _requeue(self, j: Job) -> None:
        self.state[j.id] = "pending"
        self.not_before[j.id] = time.time() + BUSY_RETRY_S
        self.queue.insert(0, j.id)

    def _idle_wait(self) -> None:
        gens = [r.gen for r in self.running.values()]
        if gens:  # wake on the first event of any task, at most poll_s later
            self.ray.wait(gens, num_returns=1, timeout=self.poll_s)
        else:
            time.sleep(self.poll_s)

    def _on_stop_signal(self) -> None:
        pass  # no Ray calls inside a signal handler: `_stop_running` cancels the tasks once the loop has left

    def _stop_running(self) -> None:
        """After SIGTERM/SIGINT: cancel every task (each SIGTERMs its cell, which checkpoints) and wait until
        every job's lock is free (its cell exited), as the local executor waits for its processes."""
        for r in self.running.values():
            try:
                self.ray.cancel(r.gen)
            except Exception:  # pragma: no cover - already finished
                pass
        deadline = time.monotonic() + STOP_WAIT_S
        for r in self.running.values():
            path = self.out / "locks" / f"{safe_name(r.job.id)}.lock"
            while (fd := _try_lock(path)) is None and time.monotonic() < deadline:
                time.sleep(_POLL_S)
            if fd is not None:
                os.close(fd)


def run_sweep_ray(ray, address: str | None, scheduler_args: tuple) -> dict:
    """Connect, run the scheduler on Ray, disconnect (a local instance this driver started stops with it)."""
    connect(ray, address)
    try:
        return RayScheduler(ray, *scheduler_args).run()
    finally:
        ray.shutdown()


if __name__ == "__main__":  # pragma: no cover - the supervisor process
    if len(sys.argv) >= 4 and sys.argv[1] == "supervise" and sys.argv[3] == "--":
        sys.exit(supervise(int(sys.argv[2]), sys.argv[4:]))
    sys.exit("usage: python -m muonft_cli.sweep.ray_executor supervise LOCK_FD -- COMMAND...")

"""The run directory (`--out`): what is in it, when it may be reused, and the files that describe a run.

Owns
- the rules for reusing a directory: `--resume` needs a muonft run whose `config.yaml` matches the new
  config (only `train.steps` may grow, never below the steps already done; a finished run resumed without a
  larger `--steps` is left as it is); otherwise the directory must be empty or `--overwrite` given (which
  removes the run files listed in `RUN_FILES`, nothing else);
- the directory lock `.lock` (`lock_out_dir`): a `flock` held for the whole run by rank 0, so a second run
  into the same `--out` is refused at once; it names its holder (pid, host). The kernel drops a `flock` when
  its holder dies, so a lock left by a killed run is taken over without any staleness check;
- `config.yaml` (the resolved config), `tokenizer/` (a pretrain run's tokenizer), `env.json` (versions,
  device, world size, thread count, data, batch layout), `metrics.jsonl` (one record per optimizer step,
  appended; a resumed run drops the records after its checkpoint), `summary.json`, and the saved models
  `final/` and `best/` with their `muonft.json` provenance; the logging backends' `tb/` and `wandb/`
  (`muonft_cli.train.report_to`) are run files too.

Checkpoints (`checkpoints/`) belong to `muonft_cli.train.state`. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import socket
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from muonft_cli import __version__
from muonft_cli import config as config_mod
from muonft_cli._common import atomic_write_text, read_jsonl, try_lock, unwritable_dir_problem
from muonft_cli.config import RunConfig
from muonft_cli.errors import MuonftError, ResumeRefusedError, UserInputError
from muonft_cli.train import distributed as dist_mod
from muonft_cli.train.state import TrainerState, checkpoint_steps

RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "checkpoints", "final", "best", "tokenizer",
             "summary.json", "tb", "wandb")
# Config keys a resumed run may change: the step budget can grow; output.overwrite is a command-line choice.
# Checkpoint cadence does not change the result, so it may change too (old runs saved `save_every: 0`); so may
# the CPU thread count, and the logging backends.
RESUME_MAY_CHANGE = ("train.steps", "output.overwrite", "train.save_every", "train.save_every_minutes",
                     "train.keep_last", "train.threads", "train.report_to", "train.run_name")
METRICS = "metrics.jsonl"
LOCK = ".lock"


@dataclasses.dataclass
class OutDir:
    """What `prepare_out_dir` found: the directory, the checkpoint step to resume (None: none), and, for a
    finished run resumed without a larger `--steps`, its `summary.json` (nothing to do)."""

    path: Path
    ckpt_step: int | None = None
    finished: dict[str, Any] | None = None


def check_writable(out: Path) -> None:
    """Bad input unless `out` is (or can be created as) a directory this process can write; creates nothing."""
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file: pass a directory path")
    problem = unwritable_dir_problem(out)
    if problem:
        raise UserInputError(f"--out '{out}' cannot be written ({problem}): pass a writable directory as --out")


def lock_out_dir(out: Path) -> int:
    """Create `out` if needed and take its `.lock` (the holder's pid and host written into it); return the
    file descriptor (`unlock_out_dir` releases it). Bad input when another run holds it or `out` cannot be
    written."""

    try:
        fd = try_lock(out / LOCK, note=f"pid {os.getpid()} on host {socket.gethostname()}\n")
    except OSError as e:
        raise UserInputError(f"cannot write to --out '{out}' ({e.strerror or e}): pass a writable directory "
                             f"as --out") from None
    if fd is None:
        try:
            holder = (out / LOCK).read_text(encoding="utf-8", errors="replace").strip() or "an unknown process"
        except OSError:
            holder = "an unknown process"
        raise UserInputError(f"output directory '{out}' is in use by another run ({holder}): wait for it to "
                             f"finish or stop it, or pass another --out")
    return fd


def first_missing(out: Path) -> Path | None:
    """The outermost folder of `out` (itself included) that does not exist yet, or None when `out` exists."""
    top = None
    p = out.absolute()
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    return top


def unlock_out_dir(out: Path, fd: int, created: Path | None) -> None:
    """Remove `.lock` (still holding it) and release it; remove the folders this run created (`created`: the
    outermost, from `first_missing`) when they are empty, so a run refused before writing leaves no trace."""
    try:
        (out / LOCK).unlink()
    except OSError:
        pass
    os.close(fd)
    p = out.absolute()
    while created is not None:
        try:
            p.rmdir()  # only when empty
        except OSError:
            break
        if p == created:
            break
        p = p.parent


def prepare_out_dir(cfg: RunConfig, resume: bool) -> OutDir:
    """Check the output directory against resume/overwrite; return what to do with it (`OutDir`).

    Writes nothing: bad input is raised (`UserInputError`) before a run touches the directory.
    """
    out = Path(cfg.output.dir).expanduser()
    if resume:
        if not (out / "config.yaml").is_file():
            raise ResumeRefusedError(f"--resume: '{out}' is not a muonft run directory (no config.yaml): pass the "
                                     f"--out of the run to continue, or drop --resume to start a new run")
        try:
            saved = config_mod.load_saved(out / "config.yaml")
        except MuonftError as e:
            raise ResumeRefusedError(f"--resume: the config.yaml in '{out}' cannot be read ({e}): start a new run "
                                     f"with --overwrite") from None
        diffs = config_mod.diff(saved, cfg, ignore=RESUME_MAY_CHANGE)
        if diffs:
            raise ResumeRefusedError(f"--resume: the config differs from the run in '{out}' ({'; '.join(diffs)}): "
                                     f"resume with the same settings (only --steps may grow), or start a new run "
                                     f"with another --out")
        steps = checkpoint_steps(out)
        ckpt = steps[-1] if steps else None
        finished = finished_summary(out)
        done = max(ckpt or 0, finished["steps"] if finished else 0)
        want = cfg.train.steps
        if want is not None and want < done:
            # not a ResumeRefusedError: a sweep would answer that with --overwrite, losing the steps done
            raise UserInputError(f"--resume: the run in '{out}' has already done {done} steps, more than "
                                 f"--steps {want}: --steps may only grow (pass --steps {done} or more), or start "
                                 f"a new run with another --out")
        if finished is not None and (want is None or want <= finished["steps"]):
            return OutDir(out, ckpt, finished)
        return OutDir(out, ckpt)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file: pass a directory path")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()) and not cfg.output.overwrite:
        what = "holds a muonft run" if (out / "config.yaml").is_file() else "is not empty"
        raise UserInputError(f"output directory '{out}' {what}: pass --resume to continue it, --overwrite to "
                             f"replace it, or another --out")
    return OutDir(out)


def finished_summary(out: Path) -> dict[str, Any] | None:
    """The `summary.json` of a run that finished (it and `final/` exist, with a step count), else None."""
    try:
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (out / "final").is_dir() or not isinstance(summary, dict) or not isinstance(summary.get("steps"), int):
        return None
    return summary


def versions() -> dict[str, str | None]:
    """Python, muonft, torch and the installed versions of the libraries a run depends on."""
    import importlib.metadata as md

    v: dict[str, str | None] = {"python": platform.python_version(), "muonft": __version__,
                                "torch": torch.__version__}
    for pkg in ("transformers", "peft", "datasets", "tokenizers", "safetensors", "numpy"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


def write_run_files(out: Path, cfg: RunConfig, resume: bool, step: int, tokenizer: Any | None,
                    env: dict[str, Any]) -> None:
    """Start (or, on resume, reopen) the run directory: clear old run files on `--overwrite`, write
    `config.yaml`, `tokenizer/` (when given and absent), `env.json` (`env` plus versions and seed), and reset
    `metrics.jsonl` (on resume: keep only the records up to the checkpoint's `step`)."""
    if not resume and out.is_dir() and cfg.output.overwrite:
        for name in RUN_FILES:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    config_mod.save_yaml(cfg, out / "config.yaml")
    if tokenizer is not None and not (out / "tokenizer").is_dir():
        tokenizer.save_pretrained(str(out / "tokenizer"))
    env = {"versions": versions(), "seed": cfg.train.seed, **env}
    atomic_write_text(out / "env.json", json.dumps(env, indent=2, default=str) + "\n")
    metrics = out / METRICS
    if resume:
        # a killed run may have logged steps after its last checkpoint: drop them, they will be redone
        keep = [r for r in read_jsonl(metrics) if r.get("step", 0) <= step]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))
    else:
        metrics.write_text("", encoding="utf-8")


def append_metrics(out: Path, record: dict[str, Any]) -> None:
    """Append one step's record to `metrics.jsonl`."""
    with (out / METRICS).open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def recorded_base_dtype(out: Path) -> str | None:
    """The base dtype a run recorded in its env.json ("fp32" for runs from before the key), or None when the
    run has no readable env.json."""
    try:
        env = json.loads((out / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return env.get("base_dtype", "fp32") if isinstance(env, dict) else None


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def provenance(cfg: RunConfig, mode: str, state: TrainerState,
               optim_choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `muonft.json` written beside a saved model: how it was trained (``optim_choice``: the `--optim auto`
    decision, only for such runs)."""
    extra = {"optim_choice": optim_choice} if optim_choice is not None else {}
    return extra | {
        "mode": mode,
        "optimizer": cfg.optimizer.name,
        "optimizer_settings": dataclasses.asdict(cfg.optimizer),
        "lr": cfg.optimizer.lr,
        "schedule": dataclasses.asdict(cfg.schedule),
        "steps": state.step,
        "tokens": state.tokens,
        "seed": cfg.train.seed,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "data": cfg.data.path,
        "base_model": cfg.model.name_or_path,
        "preset": cfg.model.preset,
        "lora": dataclasses.asdict(cfg.lora) if cfg.lora.rank is not None else None,
        "val_loss": state.last_val["loss"] if state.last_val else None,
        "muonft_version": __version__,
    }


def save_model(out: Path, name: str, model: Any, tokenizer: Any, cfg: RunConfig, mode: str,
               state: TrainerState, info: dist_mod.DistInfo, optim_choice: dict[str, Any] | None = None,
               sharded: bool = False) -> Path:
    """Save the model as `out/name` (`final` or `best`) with its provenance; collective (a barrier). A model
    sharded with FSDP2 (`sharded`) is consolidated first (collective): the full state dict on rank 0's CPU (for
    a LoRA run only the adapter's tensors), so the folder is a plain HF model / peft adapter."""
    from muonft_cli import models

    path = out / name
    state_dict = consolidated_state_dict(model, adapter_only=cfg.lora.rank is not None) if sharded else None
    if info.is_main:
        models.save_model(model, tokenizer, path, provenance(cfg, mode, state, optim_choice),
                          merge=cfg.lora.merge, state_dict=state_dict)
    dist_mod.barrier(info)
    return path


def consolidated_state_dict(model: Any, adapter_only: bool) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model, on rank 0's CPU (empty on the other ranks);
    collective. `adapter_only`: just the trainable tensors (a LoRA adapter), gathered one by one."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if adapter_only:
        rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        out = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                full = dist_mod.full_value(p.detach())
                if rank0:
                    out[n] = full.cpu()
        return out
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def env_record(info: dist_mod.DistInfo, device: torch.device, autocast: torch.dtype | None, mode: str,
               resumed_from: int | None, model: torch.nn.Module, trainable: list, data_info: Any,
               steps: int, batch_size: int, local_batch: int, micro: int,
               strategy: str | None = None, base_dtype: str = "fp32") -> dict[str, Any]:
    """The run-specific part of `env.json` (key order as written; `base_dtype`: the dtype name the (base) model
    was loaded in, which `--resume` with `base_dtype: auto` reuses; `strategy` — ddp | fsdp, None for a single
    process — last)."""
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(),
        "world_size": info.world_size,
        "backend": info.backend,
        "threads": torch.get_num_threads(),
        "autocast": autocast is not None and str(autocast),
        "base_dtype": base_dtype,
        "mode": mode,
        "argv": sys.argv,
        "resumed_from_step": resumed_from,
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_trainable": sum(p.numel() for p in trainable),
        "data": data_info if isinstance(data_info, dict) else None,
        "total_steps": steps,
        "batch_size": batch_size,
        "micro_batch_size": micro,
        "accumulation_steps": math.ceil(local_batch / micro),
        "strategy": strategy,
    }

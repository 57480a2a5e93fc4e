"""What a run must carry across a restart, and the checkpoints that carry it.

Owns
- `TrainerState`: the loop's progress (step, data position, tokens, best validation, recent losses), the one
  list of fields that `trainer_state.json` saves and `--resume` restores;
- checkpoints `checkpoints/step-NNNNNN/`: `model.safetensors` (trainable weights), `optimizer.pt`,
  `scheduler.pt`, `rng.pt` (torch / CUDA / python / numpy RNG states of every rank) and `trainer_state.json`
  (the state plus the run's identity: world_size, data_seed, n_train, total_steps, muonft_version). A
  checkpoint is written to a temporary directory and renamed into place, so a kill never leaves half of one;
  only the newest `train.keep_last` are kept. Restoring all of it makes `--resume` bit-exact (CPU, same threads).
- under FSDP2 (`train.strategy: fsdp`) the weights and optimizer state are sharded: `dcp/` holds them as a
  `torch.distributed.checkpoint` (every rank writes its own shards into the temporary directory before the
  rename), `optimizer_groups.pt` the optimizer's hyper-parameters, and `trainer_state.json` adds
  `strategy: fsdp`. Such a checkpoint resumes only with the same strategy and process count
  (`ResumeRefusedError` otherwise; DCP could reshard the tensors, but the data order and RNG streams are per
  rank, so a different world size would not continue the same run).

Only rank 0 writes; every rank reads its own RNG state back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muonft_cli import __version__
from muonft_cli.errors import MuonftError, ResumeRefusedError
from muonft_cli.train import distributed as dist_mod
from muonft_cli.train import schedule

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclasses.dataclass
class TrainerState:
    """The loop's progress; saved (in this field order) as the first keys of `trainer_state.json`.

    Attributes:
        step: optimizer steps done.
        position: samples of the global data stream consumed.
        tokens: input tokens seen (all ranks).
        best_val_loss / best_step: the best periodic validation so far (kept in `best/`), or None.
        last_val: the latest `evaluate_loss` result, or None.
        recent_losses: the train losses of the last <= 10 steps (the summary's train_loss is their mean).
    """

    step: int = 0
    position: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    last_val: dict | None = None
    recent_losses: list[float] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainerState:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints in `out/checkpoints`, ascending."""
    d = out / CHECKPOINTS
    if not d.is_dir():
        return []
    steps = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / STATE_FILE).is_file():
            try:
                steps.append(int(p.name[5:]))
            except ValueError:
                continue
    return sorted(steps)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    py = rng["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = rng["numpy"]
    np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))


def save_checkpoint(out: Path, state: TrainerState, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, info: dist_mod.DistInfo, keep_last: int, identity: dict[str, Any],
                    sharded: bool = False) -> Path:
    """Write `checkpoints/step-NNNNNN` for `state.step` atomically (temp dir + rename); prune to `keep_last`.

    Args:
        identity: the run facts saved after the state: world_size, data_seed, n_train, total_steps
            (`load_checkpoint` checks world_size and n_train); muonft_version is added here.
        sharded: the model is sharded with FSDP2: weights and optimizer state go to `dcp/` (every rank writes).
    Collective: every rank must call it (RNG states are gathered to rank 0).
    """
    from safetensors.torch import save_file

    rngs = dist_mod.all_gather_object(_rng_state(), info)
    final = checkpoint_dir(out, state.step)
    tmp = out / CHECKPOINTS / f".tmp-step-{state.step:06d}"
    if sharded:
        if info.is_main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        dist_mod.barrier(info)
        _save_sharded(tmp, model, optimizer)  # collective: every rank writes its shards
    if info.is_main:
        if not sharded:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            weights = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters()
                       if p.requires_grad}
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"ranks": rngs}, tmp / "rng.pt")
        saved = {**state.to_json(), **identity, "muonft_version": __version__}
        (tmp / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_steps(out)[:-keep_last]:
            shutil.rmtree(checkpoint_dir(out, old), ignore_errors=True)
    dist_mod.barrier(info)
    return final


def load_checkpoint(out: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, info: dist_mod.DistInfo, n_train: int, device: torch.device,
                    strategy: str | None = None) -> TrainerState:
    """Restore weights, optimizer, scheduler and this rank's RNG states from `checkpoints/step-N`; return the
    saved `TrainerState`. Bad input when the process count, the strategy (`strategy`: "fsdp" for an FSDP2
    model; anything else reads the replicated format) or the training data changed."""
    d = checkpoint_dir(out, step)
    saved = json.loads((d / STATE_FILE).read_text(encoding="utf-8"))
    was_sharded, sharded = saved.get("strategy") == "fsdp", strategy == "fsdp"
    if was_sharded != sharded:
        how = ("--strategy fsdp under torchrun with " + str(saved["world_size"]) + " processes") if was_sharded \
            else "--strategy ddp (or one process)"
        raise ResumeRefusedError(f"--resume: checkpoint {d.name} was written "
                                 f"{'sharded by FSDP2' if was_sharded else 'unsharded'}, this run is "
                                 f"{'sharded' if sharded else 'unsharded'}: resume with {how}")
    if saved["world_size"] != info.world_size:
        raise ResumeRefusedError(f"--resume: checkpoint {d.name} was written by {saved['world_size']} processes, "
                                 f"this run has {info.world_size}: resume with the same process count")
    if saved["n_train"] != n_train:
        raise ResumeRefusedError(f"--resume: the training data now gives {n_train} sequences, the run had "
                                 f"{saved['n_train']}: resume with the same data")
    if sharded:
        _load_sharded(d, model, optimizer)
    else:
        _load_replicated(d, model, optimizer, device)
    scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
    schedule.reapply(scheduler)  # a larger --steps: the next step runs on the new schedule
    _set_rng_state(torch.load(d / "rng.pt", weights_only=True)["ranks"][info.rank])
    return TrainerState.from_json(saved)


def _load_replicated(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(d / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise MuonftError(f"checkpoint {d} does not match the model (e.g. {(missing or list(weights))[0]})")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=device, weights_only=True))


# ------------------------------------------------------------------------------------------ FSDP2 (DCP)

DCP_DIR = "dcp"
GROUPS_FILE = "optimizer_groups.pt"


def _sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The DCP state of an FSDP2 run: trainable parameters (DTensors) by name, and each one's optimizer state
    as `NAME/KEY` (momentum buffers, AdamW moments: DTensors; step counters: plain tensors)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim = {}
    for n, p in params.items():
        for k, v in optimizer.state.get(p, {}).items():
            if torch.is_tensor(v):
                optim[f"{n}/{k}"] = v
    return {"model": params, "optim": optim}


def _groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _save_sharded(tmp: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR))
    if dist.get_rank() == 0:
        torch.save(_groups(optimizer), tmp / GROUPS_FILE)


def _load_sharded(d: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read `dcp/` into the FSDP2 model's shards and the optimizer; its state is first created empty (zeros
    shaped like each saved entry: a DTensor like the parameter, or a plain tensor) so DCP loads in place."""
    import torch.distributed.checkpoint as dcp

    reader = dcp.FileSystemReader(str(d / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optim: dict[str, torch.Tensor] = {}
    for key, m in meta.items():
        if not key.startswith("optim."):
            continue
        name, k = key[len("optim."):].rsplit("/", 1)
        p = params.get(name)
        if p is None:
            raise MuonftError(f"checkpoint {d} does not match the model (e.g. {name})")
        size = tuple(m.size)
        optim[f"{name}/{k}"] = (torch.zeros_like(p) if size == tuple(p.shape) else
                                torch.zeros(size, dtype=m.properties.dtype))
    saved_params = {k[len("model."):] for k in meta if k.startswith("model.")}
    if saved_params != set(params):
        raise MuonftError(f"checkpoint {d} does not match the model (e.g. "
                          f"{sorted(saved_params ^ set(params))[0]})")
    state = {"model": params, "optim": optim}
    with torch.no_grad():
        dcp.load(state, checkpoint_id=str(d / DCP_DIR))
    for key, t in optim.items():
        name, k = key.rsplit("/", 1)
        optimizer.state[params[name]][k] = t
    for g, saved in zip(optimizer.param_groups, torch.load(d / GROUPS_FILE, weights_only=True)):
        g.update(saved)

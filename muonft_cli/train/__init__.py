"""The training engine shared by `muonft pretrain` and `muonft finetune`.

Owns the loop and the run directory:

- schedule: linear warmup over `schedule.warmup_ratio` of the steps, then cosine decay to
  `schedule.min_lr_ratio` x lr (the paper's §4 setting: warmup 0.03, cosine), as a `LambdaLR`;
- global batch = `train.batch_size` sequences per optimizer step, split over ranks and micro-batches
  (gradient accumulation). The loss of a step is Σ token NLL / N, with N the number of target tokens of the
  whole global batch (all micro-batches, all ranks), so prompt masking, the micro-batch size and the number
  of processes do not change the gradient;
- gradient clipping on the raw gradients before the optimizer (never on Muon's orthogonalised update);
- periodic validation with `evaluate.evaluate_loss`, keeping `best/` and `final/`;
- `config.yaml`, `env.json`, `metrics.jsonl`, and atomic checkpoints `checkpoints/step-NNNNNN` (trainable
  weights as safetensors, optimizer + scheduler state, RNG states, data position) that make `--resume`
  bit-exact on CPU with the same thread count;
- SIGINT/SIGTERM → checkpoint, then `TrainingInterrupted`; NaN/inf loss → `TrainingDivergedError` with the
  last good checkpoint kept;
- data parallelism under torchrun through `muonft_cli.train.distributed` (DDP; the optimizer's distributed hook
  splits Newton–Schulz work round-robin over ranks, paper §4.7).

Display goes through a sink (`muonft_cli.train.sink`), so the loop never knows how it is shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from muonft_cli import __version__
from muonft_cli import config as config_mod
from muonft_cli.models import device as device_mod
from muonft_cli.train import distributed as dist_mod
from muonft_cli.config import RunConfig
from muonft_cli.errors import MuonftError, ResumeRefusedError, TrainingDivergedError, UserInputError
from muonft_cli.train.sink import NullSink

MODES = ("pretrain", "finetune")
IGNORE_INDEX = -100
RUN_FILES = ("config.yaml", "env.json", "metrics.jsonl", "checkpoints", "final", "best", "tokenizer",
             "summary.json")
# Config keys a resumed run may change: the step budget can grow; output.overwrite is a command-line choice.
RESUME_MAY_CHANGE = ("train.steps", "output.overwrite")


class TrainingInterrupted(MuonftError):
    """SIGINT/SIGTERM stopped training after writing a checkpoint; `--resume` continues it (exit 130)."""

    exit_code = 130


# --------------------------------------------------------------------------------------------- small pieces


def set_seed(seed: int) -> int:
    """Seed python, numpy and torch (CPU and every CUDA device); return the seed used."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float):
    """The lr multiplier as a function of the number of completed optimizer steps.

    Linear warmup over `w = round(warmup_ratio * total_steps)` steps ((s+1)/w, so the first step does not
    waste itself at lr 0), then a cosine from 1 down to `min_lr_ratio` at the last step.

    Args:
        total_steps: optimizer steps in the run.
        warmup_ratio: fraction of the steps spent warming up, in [0, 1].
        min_lr_ratio: final lr as a fraction of the peak lr, in [0, 1].

    Returns:
        A plain function (so `LambdaLR.state_dict` stores nothing of it, and a resumed run with a larger
        step budget uses its own schedule).
    """
    warmup = int(round(warmup_ratio * total_steps))
    decay = max(1, total_steps - warmup)

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / decay)  # < 1 on the last step: it still learns
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a permutation from an explicit generator seeded by (seed, epoch).

    Stateless by construction, so the data position (samples consumed) alone restores the data stream.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def global_batch(position: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Sample indices of the global batch that starts at data position `position` (may span epochs)."""
    out: list[int] = []
    cache: dict[int, torch.Tensor] = {}
    for p in range(position, position + batch_size):
        epoch, i = divmod(p, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(int(cache[epoch][i]))
    return out


def collate(dataset: Any, indices: list[int]) -> dict[str, torch.Tensor]:
    """Stack dataset items into a batch: each value [B, T]."""
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "attention_mask")
            if k in items[0]}


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL over target tokens (labels != -100 after the causal shift), in fp32.

    Args:
        logits: [B, T, V].
        labels: [B, T], -100 where no loss is taken.
    """
    shift_logits = logits[:, :-1, :].float()  # [B, T-1, V]
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def n_targets(labels: torch.Tensor) -> int:
    """Number of target tokens in labels [B, T] after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _ckpt_steps(out: Path) -> list[int]:
    d = out / "checkpoints"
    if not d.is_dir():
        return []
    steps = []
    for p in d.iterdir():
        if p.is_dir() and p.name.startswith("step-") and (p / "trainer_state.json").is_file():
            try:
                steps.append(int(p.name[5:]))
            except ValueError:
                continue
    return sorted(steps)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is void
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    v = {"python": platform.python_version(), "muonft": __version__, "torch": torch.__version__}
    for pkg in ("transformers", "peft", "datasets", "tokenizers", "safetensors", "numpy"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    return v


# --------------------------------------------------------------------------------------------- input checks


def check_inputs(cfg: RunConfig, mode: str) -> None:
    """Mode-specific checks that need no model or data; raise `UserInputError` before anything is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not cfg.output.dir:
        raise UserInputError("no output directory: pass --out DIR (or set output.dir in the recipe)")
    if not cfg.data.path:
        raise UserInputError("no training data: pass --data builtin:shakespeare, a local file/folder or a hub "
                             "dataset name")
    if mode == "finetune" and not cfg.model.name_or_path:
        raise UserInputError("no model to fine-tune: pass --model PATH (a local HF dir, a .gguf file, a run's "
                             "final/ dir) or a hub id")
    if mode == "pretrain":
        if cfg.model.name_or_path:
            raise UserInputError("pretrain builds a fresh model: use --preset tiny|small or --model-config "
                                 "config.json instead of --model (to continue training a model, use finetune)")
        if not cfg.model.preset and not cfg.model.model_config:
            raise UserInputError("pretrain needs a model shape: pass --preset tiny|small or --model-config "
                                 "path/config.json")
        if cfg.model.preset and cfg.model.model_config:
            raise UserInputError("pass either --preset or --model-config, not both")
        if cfg.lora.rank is not None:
            raise UserInputError("pretrain trains all weights: drop --lora-rank (LoRA is for finetune)")
    if cfg.lora.merge and cfg.lora.rank is None:
        raise UserInputError("--merge only applies to LoRA runs: add --lora-rank R or drop --merge")
    if cfg.train.steps is not None and cfg.train.epochs is not None:
        raise UserInputError("pass either --steps or --epochs, not both")


def _prepare_out_dir(cfg: RunConfig, resume: bool) -> tuple[Path, int | None]:
    """Check the output directory against resume/overwrite; return (out, checkpoint step to resume or None)."""
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
        steps = _ckpt_steps(out)
        return out, (steps[-1] if steps else None)
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file: pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not cfg.output.overwrite:
        what = "holds a muonft run" if (out / "config.yaml").is_file() else "is not empty"
        raise UserInputError(f"output directory '{out}' {what}: pass --resume to continue it, --overwrite to "
                             f"replace it, or another --out")
    return out, None


# --------------------------------------------------------------------------------------------- the run


class _Stop:
    """Signal flag set by SIGINT/SIGTERM; checked between optimizer steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop at once
        self.signum = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


def run(cfg: RunConfig, mode: str, sink: Any = None, resume: bool = False) -> dict[str, Any]:
    """Train (pretrain or fine-tune) as `cfg` says and return the run summary.

    Args:
        cfg: the resolved run config (saved as `config.yaml`).
        mode: "pretrain" (fresh model from a preset/config, tokenizer trained or given) or "finetune"
            (model loaded with `models.load_model`; LoRA via `models.apply_lora` when `lora.rank` is set).
        sink: progress receiver (see `train_sink.NullSink`); None = silent.
        resume: continue the run in `cfg.output.dir` from its last checkpoint.

    Returns:
        The summary dict: out, mode, optim, steps, tokens, train_loss (mean of the last <= 10 steps),
        val_loss, val_ppl, best_val_loss, best_val_ppl, best_step, final, runtime_s, plus world_size and
        ortho_per_rank (matrices each rank orthogonalised, from the optimizer's counter; None without Muon).

    Raises:
        UserInputError: bad input, before anything is written.
        TrainingDivergedError: loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    check_inputs(cfg, mode)
    out, ckpt_step = _prepare_out_dir(cfg, resume)
    info = dist_mod.init_from_env(cfg.train.device)
    try:
        trainer = _Trainer(cfg, mode, sink or NullSink(), info, out, resume, ckpt_step)
        return trainer.execute()
    finally:
        dist_mod.cleanup(info)


class _Trainer:
    """State of one run; `execute` sets up, loops and saves."""

    def __init__(self, cfg: RunConfig, mode: str, sink: Any, info: dist_mod.DistInfo, out: Path,
                 resume: bool, ckpt_step: int | None) -> None:
        self.cfg, self.mode, self.info, self.out = cfg, mode, info, out
        self.sink = sink if info.is_main else NullSink()
        self.resume, self.ckpt_step = resume, ckpt_step
        self.device = info.device
        self.step = 0
        self.position = 0  # samples of the global stream consumed
        self.tokens = 0  # input tokens seen (global)
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.last_val: dict | None = None
        self.recent_losses: list[float] = []
        self.t0 = time.perf_counter()

    # ----------------------------------------------------------------------------------------- set-up

    def _build(self) -> None:
        from muonft_cli import data as data_mod
        from muonft_cli import models

        cfg = self.cfg
        if cfg.model.offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # our sink shows progress; keep stderr to one bar
        set_seed(cfg.train.seed)
        if self.mode == "pretrain":
            self.tokenizer = self._pretrain_tokenizer()
            model = models.build_pretrain_model(cfg.model, self.tokenizer)
            model.to(self.device)
        else:
            # an adapter folder given without --lora-rank: continue training that adapter
            model, self.tokenizer = models.load_model(cfg.model, self.device, is_trainable=cfg.lora.rank is None)
            if cfg.lora.rank is not None:
                model = models.apply_lora(model, cfg.lora)
        model.to(self.device)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
            model.config.use_cache = False
        self.model = model
        self.splits = data_mod.build_splits(cfg.data, self.tokenizer, cfg.train.seed)
        self.n_train = len(self.splits.train)
        if self.n_train == 0:
            raise UserInputError(f"data '{cfg.data.path}' gave no training sequences: use a smaller --seq-len")

    def _pretrain_tokenizer(self):
        cfg = self.cfg
        saved = self.out / "tokenizer"
        if self.resume and saved.is_dir():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(saved))
        if cfg.model.tokenizer:
            from transformers import AutoTokenizer

            p = Path(cfg.model.tokenizer).expanduser()
            try:
                tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else cfg.model.tokenizer,
                                                    local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")),
                                                    trust_remote_code=cfg.model.trust_remote_code)
            except (OSError, ValueError) as e:
                raise UserInputError(f"--tokenizer '{cfg.model.tokenizer}' could not be loaded "
                                     f"({str(e).splitlines()[0]}): pass a local tokenizer directory") from None
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return tok
        from muonft_cli import data as data_mod
        from muonft_cli.data import tokenizer as tok_mod

        try:
            # only the training documents of the hold-out split: the tokenizer never sees validation text
            texts = data_mod.iter_texts(cfg.data, seed=cfg.train.seed)
            return tok_mod.train_bpe(texts, cfg.model.vocab_size)
        except ValueError as e:
            raise UserInputError(f"cannot train a tokenizer on '{cfg.data.path}' ({e}): pass --vocab-size >= 258 "
                                 f"or --tokenizer PATH") from None

    def _total_steps(self) -> int:
        t = self.cfg.train
        if t.steps is not None:
            return int(t.steps)
        epochs = t.epochs if t.epochs is not None else 1.0
        return max(1, math.ceil(epochs * self.n_train / t.batch_size))

    def _check_batch(self) -> None:
        t, w = self.cfg.train, self.info.world_size
        if t.batch_size % w:
            raise UserInputError(f"--batch-size {t.batch_size} does not split over {w} processes: use a multiple "
                                 f"of {w}")
        self.local_batch = t.batch_size // w
        self.micro = min(t.micro_batch_size, self.local_batch)

    def _build_optimizer(self) -> None:
        from muonft_cli.optim import build_optimizer

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not self.trainable:
            raise MuonftError("the model has no trainable parameters (check --lora-targets)")
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.total_steps = self._total_steps()
        s = self.cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, s.warmup_ratio, s.min_lr_ratio))
        self.dist_optim = False
        if self.info.distributed:
            self.dist_optim = _enable_distributed_optimizer(self.optimizer, self.info)

    def _wrap_ddp(self) -> None:
        self.ddp = None
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)

    # ----------------------------------------------------------------------------------------- files

    def _write_run_files(self) -> None:
        if not self.info.is_main:
            return
        out = self.out
        if not self.resume and out.is_dir() and self.cfg.output.overwrite:
            for name in RUN_FILES:
                p = out / name
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        out.mkdir(parents=True, exist_ok=True)
        config_mod.save_yaml(self.cfg, out / "config.yaml")
        if self.mode == "pretrain" and not (out / "tokenizer").is_dir():
            self.tokenizer.save_pretrained(str(out / "tokenizer"))
        env = {
            "versions": _versions(),
            "seed": self.cfg.train.seed,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else
            platform.processor() or platform.machine(),
            "world_size": self.info.world_size,
            "backend": self.info.backend,
            "threads": torch.get_num_threads(),
            "autocast": self.autocast_dtype is not None and str(self.autocast_dtype),
            "mode": self.mode,
            "argv": sys.argv,
            "resumed_from_step": self.step if self.resume else None,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "n_trainable": sum(p.numel() for p in self.trainable),
            "data": self.splits.info if isinstance(getattr(self.splits, "info", None), dict) else None,
            "total_steps": self.total_steps,
            "batch_size": self.cfg.train.batch_size,
            "micro_batch_size": self.micro,
            "accumulation_steps": math.ceil(self.local_batch / self.micro),
        }
        _atomic_write_text(out / "env.json", json.dumps(env, indent=2, default=str) + "\n")
        metrics = out / "metrics.jsonl"
        if self.resume:
            # a killed run may have logged steps after its last checkpoint: drop them, they will be redone
            keep = [r for r in _read_metrics(metrics) if r.get("step", 0) <= self.step]
            _atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))
        else:
            metrics.write_text("", encoding="utf-8")

    def _provenance(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "mode": self.mode,
            "optimizer": cfg.optimizer.name,
            "optimizer_settings": dataclasses.asdict(cfg.optimizer),
            "lr": cfg.optimizer.lr,
            "schedule": dataclasses.asdict(cfg.schedule),
            "steps": self.step,
            "tokens": self.tokens,
            "seed": cfg.train.seed,
            "batch_size": cfg.train.batch_size,
            "seq_len": cfg.data.seq_len,
            "data": cfg.data.path,
            "base_model": cfg.model.name_or_path,
            "preset": cfg.model.preset,
            "lora": dataclasses.asdict(cfg.lora) if cfg.lora.rank is not None else None,
            "val_loss": self.last_val["loss"] if self.last_val else None,
            "muonft_version": __version__,
        }

    def _save_model(self, name: str) -> Path:
        from muonft_cli import models

        path = self.out / name
        if self.info.is_main:
            models.save_model(self.model, self.tokenizer, path, self._provenance(), self.cfg.lora,
                              self.cfg.lora.merge)
        dist_mod.barrier(self.info)
        return path

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").contiguous() for n, p in self.model.named_parameters() if p.requires_grad}

    def _rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
        }

    def _save_checkpoint(self) -> Path:
        """Write `checkpoints/step-NNNNNN` atomically (temp dir + rename); prune to `keep_last`."""
        from safetensors.torch import save_file

        rngs = dist_mod.all_gather_object(self._rng_state(), self.info)
        final = self.out / "checkpoints" / f"step-{self.step:06d}"
        if self.info.is_main:
            tmp = self.out / "checkpoints" / f".tmp-step-{self.step:06d}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            save_file(self._trainable_state(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"ranks": rngs}, tmp / "rng.pt")
            state = {
                "step": self.step, "position": self.position, "tokens": self.tokens,
                "best_val_loss": self.best_val_loss, "best_step": self.best_step, "last_val": self.last_val,
                "recent_losses": self.recent_losses, "world_size": self.info.world_size,
                "data_seed": self.cfg.train.seed, "n_train": self.n_train, "total_steps": self.total_steps,
                "muonft_version": __version__,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _ckpt_steps(self.out)[:-self.cfg.train.keep_last]:
                shutil.rmtree(self.out / "checkpoints" / f"step-{old:06d}", ignore_errors=True)
        dist_mod.barrier(self.info)
        return final

    def _load_checkpoint(self, step: int) -> None:
        from safetensors.torch import load_file

        d = self.out / "checkpoints" / f"step-{step:06d}"
        state = json.loads((d / "trainer_state.json").read_text(encoding="utf-8"))
        if state["world_size"] != self.info.world_size:
            raise ResumeRefusedError(f"--resume: checkpoint {d.name} was written by {state['world_size']} processes, "
                                     f"this run has {self.info.world_size}: resume with the same process count")
        if state["n_train"] != self.n_train:
            raise ResumeRefusedError(f"--resume: the training data now gives {self.n_train} sequences, the run had "
                                     f"{state['n_train']}: resume with the same data")
        weights = load_file(str(d / "model.safetensors"))
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing or any(n not in params for n in weights):
            raise MuonftError(f"checkpoint {d} does not match the model (e.g. {(missing or list(weights))[0]})")
        with torch.no_grad():
            for n, t in weights.items():
                params[n].copy_(t)
        self.optimizer.load_state_dict(torch.load(d / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        self.scheduler.load_state_dict(torch.load(d / "scheduler.pt", weights_only=True))
        rng = torch.load(d / "rng.pt", weights_only=True)["ranks"][self.info.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        npst = rng["numpy"]
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), npst[2], npst[3], npst[4]))
        self.step, self.position, self.tokens = state["step"], state["position"], state["tokens"]
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.last_val, self.recent_losses = state["last_val"], state["recent_losses"]

    # ----------------------------------------------------------------------------------------- the loop

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return device_mod.autocast_dtype(self.cfg.model, self.device)

    def _autocast(self):
        return device_mod.autocast(self.device, self.autocast_dtype)

    def _train_step(self) -> tuple[float, float, int]:
        """One optimizer step over the global batch; returns (loss, grad_norm, input tokens)."""
        t = self.cfg.train
        batch_idx = global_batch(self.position, t.batch_size, self.n_train, t.seed)
        local = dist_mod.shard(batch_idx, self.info)
        micro = [collate(self.splits.train, local[i:i + self.micro]) for i in range(0, len(local), self.micro)]
        counts = torch.tensor([sum(n_targets(b["labels"]) for b in micro),
                               sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                                   for b in micro)], dtype=torch.float64, device=self.device)
        dist_mod.all_reduce_sum(counts, self.info)
        n_global, in_tokens = float(counts[0]), int(counts[1])
        scale = self.info.world_size / max(n_global, 1.0)  # DDP averages over ranks; undo that, divide by N
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, b in enumerate(micro):
            sync = self.ddp is None or j == len(micro) - 1
            ctx = contextlib.nullcontext() if sync else self.ddp.no_sync()
            with ctx:
                with self._autocast():
                    outputs = net(input_ids=b["input_ids"].to(self.device),
                                  attention_mask=b["attention_mask"].to(self.device) if "attention_mask" in b
                                  else None, use_cache=False)
                nll = token_nll_sum(outputs.logits, b["labels"])
                (nll * scale).backward()
            loss_sum += nll.detach().double()
        dist_mod.all_reduce_sum(loss_sum, self.info)
        loss = float(loss_sum) / max(n_global, 1.0)
        if self.cfg.train.clip is not None:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.clip))
        else:
            gnorm = float(torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))
        if not math.isfinite(loss) or not math.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            last = _ckpt_steps(self.out)
            where = f"last good checkpoint: {self.out}/checkpoints/step-{last[-1]:06d}" if last else \
                "no checkpoint was written yet"
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingDivergedError(
                f"training diverged at step {self.step + 1}: {what} became {loss if what == 'loss' else gnorm} "
                f"({where}); lower --lr (now {self.cfg.optimizer.lr:g}) or keep --clip on")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.position += t.batch_size
        return loss, gnorm, in_tokens

    def _evaluate(self) -> dict | None:
        from muonft_cli.evaluate import evaluate_loss

        if self.splits.val is None or len(self.splits.val) == 0:
            return None
        res = None
        if self.info.is_main:
            self.model.eval()
            res = evaluate_loss(self.model, self.splits.val, self.cfg.eval.batch_size, self.device,
                                max_batches=self.cfg.eval.max_batches, autocast_dtype=self.autocast_dtype)
            self.model.train()
        return dist_mod.broadcast_object(res, self.info)

    def _ortho_count(self) -> int | None:
        c = getattr(self.optimizer, "ns_matrices_done", None)  # muonft Muon family: matrices this rank did
        return None if c is None else int(c)

    def execute(self) -> dict[str, Any]:
        self._build()
        self._check_batch()
        self._build_optimizer()
        if self.resume and self.ckpt_step is not None:
            self._load_checkpoint(self.ckpt_step)
        dist_mod.barrier(self.info)
        self._write_run_files()
        dist_mod.barrier(self.info)
        self._wrap_ddp()
        self.model.train()
        cfg, t = self.cfg, self.cfg.train
        if self.resume:
            self.sink.on_message(f"resuming {self.out} at step {self.step} of {self.total_steps}"
                                 if self.ckpt_step is not None else
                                 f"{self.out} has no checkpoint yet: starting it from step 0")
        self.sink.on_start({"mode": self.mode, "optim": cfg.optimizer.name, "start_step": self.step,
                            "total_steps": self.total_steps, "device": str(self.device),
                            "world_size": self.info.world_size})
        stop = _Stop()
        stop.install()
        metrics_path = self.out / "metrics.jsonl"
        eval_every = t.eval_every
        try:
            while self.step < self.total_steps:
                t_start = time.perf_counter()
                loss, gnorm, in_tokens = self._train_step()
                lr = self._lr_used
                self.step += 1
                self.tokens += in_tokens
                dt = time.perf_counter() - t_start
                record = {"step": self.step, "epoch": round(self.position / self.n_train, 4), "loss": loss,
                          "lr": lr, "grad_norm": gnorm, "tokens": self.tokens,
                          "tokens_per_s": in_tokens / dt if dt > 0 else 0.0, "val_loss": None, "val_ppl": None}
                last = self.step == self.total_steps
                if (eval_every and self.step % eval_every == 0) or last:
                    res = self._evaluate()
                    if res is not None:
                        self.last_val = res
                        record["val_loss"], record["val_ppl"] = res["loss"], res["ppl"]
                        if eval_every and (self.best_val_loss is None or res["loss"] < self.best_val_loss):
                            self.best_val_loss, self.best_step = res["loss"], self.step
                            self._save_model("best")
                self.recent_losses = (self.recent_losses + [loss])[-10:]
                if self.info.is_main:
                    with metrics_path.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                self.sink.on_step(record)
                if t.save_every and (self.step % t.save_every == 0 or last):
                    self._save_checkpoint()  # also at the end: `--resume --steps MORE` continues from here
                flag = torch.tensor([1.0 if stop.signum is not None else 0.0], device=self.device)
                if self.info.distributed:
                    dist_mod.all_reduce_sum(flag, self.info)
                if float(flag) > 0 and not last:
                    path = self._save_checkpoint() if not (t.save_every and self.step % t.save_every == 0) \
                        else self.out / "checkpoints" / f"step-{self.step:06d}"
                    self.sink.on_end(self._summary(final=None))
                    raise TrainingInterrupted(
                        f"interrupted at step {self.step} of {self.total_steps}; checkpoint written to {path}: "
                        f"continue with the same command plus --resume")
        finally:
            stop.restore()
        final = self._save_model("final")
        summary = self._summary(final=str(final))
        if self.info.is_main:
            _atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        self.sink.on_end(summary)
        return summary

    @property
    def _lr_used(self) -> float:
        # after scheduler.step() the groups hold the next lr; the step just taken used lambda(step) * base
        base = self.optimizer.param_groups[0]["initial_lr"]
        return base * self.scheduler.lr_lambdas[0](self.step)

    def _summary(self, final: str | None) -> dict[str, Any]:
        lv = self.last_val or {}
        ortho = self._ortho_count()
        per_rank = dist_mod.all_gather_object(ortho, self.info) if ortho is not None else None
        best_ppl = math.exp(self.best_val_loss) if self.best_val_loss is not None and \
            self.best_val_loss < 700 else (None if self.best_val_loss is None else float("inf"))
        return {
            "out": str(self.out), "mode": self.mode, "optim": self.cfg.optimizer.name, "steps": self.step,
            "tokens": self.tokens,
            "train_loss": sum(self.recent_losses) / len(self.recent_losses) if self.recent_losses else None,
            "val_loss": lv.get("loss"), "val_ppl": lv.get("ppl"),
            "best_val_loss": self.best_val_loss, "best_val_ppl": best_ppl, "best_step": self.best_step,
            "final": final, "runtime_s": round(time.perf_counter() - self.t0, 3),
            "world_size": self.info.world_size, "ortho_per_rank": per_rank,
            "lora": self.cfg.lora.rank is not None,
        }


def _enable_distributed_optimizer(optimizer: torch.optim.Optimizer, info: dist_mod.DistInfo) -> bool:
    """Switch on the optimizer's round-robin Newton–Schulz split over ranks, if it has the hook."""
    hook = getattr(optimizer, "set_distributed", None)
    if hook is None:
        return False
    hook()  # the default process group, which `distributed.init_from_env` joined
    return True

"""Setting a run up: the checks that need nothing built, then the model, tokenizer, data and optimizer.

Owns: the mode rules of `pretrain` / `finetune` (`check_inputs`, with the `--base-dtype` / `--load-in-4bit`
rules), seeding, building the model (a fresh one from a preset or config for pretrain, with a BPE tokenizer
trained on the training documents unless `--tokenizer` is given; a loaded one, optionally with LoRA, for
finetune, its frozen base in the run's base dtype, `base_dtype_for`), the train/val splits, the
optimizer over the trainable parameters (with its distributed Newton–Schulz split switched on under
torchrun), and the DDP or FSDP2 wrapper (`train.strategy`, with its input rules `check_strategy`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from muonft_cli._common import first_line, hub_offline, set_offline
from muonft_cli.config import RunConfig, missing_inputs
from muonft_cli.errors import ConfigError, MuonftError, UserInputError
from muonft_cli.train import distributed as dist_mod

MODES = ("pretrain", "finetune")


def check_pretrain_shape(cfg: RunConfig, what: str = "pretrain") -> None:
    """A pretrain run's model shape: a preset or a config.json, never a `--model` (also `--plan`'s rule)."""
    if cfg.model.name_or_path:
        raise UserInputError("pretrain builds a fresh model: use --preset tiny|small or --model-config "
                             "config.json instead of --model (to continue training a model, use finetune)")
    if not cfg.model.preset and not cfg.model.model_config:
        raise UserInputError(f"{what} needs a model shape: pass --preset tiny|small or --model-config "
                             "path/config.json")
    if cfg.model.preset and cfg.model.model_config:
        raise UserInputError("pass either --preset or --model-config, not both")


def check_inputs(cfg: RunConfig, mode: str) -> None:
    """Mode-specific checks that need no model or data; raise `UserInputError` before anything is written."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    missing = missing_inputs(cfg, mode)  # the CLI reports these with every other config problem already
    if missing:
        raise ConfigError(missing)
    if mode == "pretrain":
        check_pretrain_shape(cfg)
        if cfg.lora.rank is not None:
            raise UserInputError("pretrain trains all weights: drop --lora-rank (LoRA is for finetune)")
    if cfg.lora.merge and cfg.lora.rank is None:
        raise UserInputError("--merge only applies to LoRA runs: add --lora-rank R or drop --merge")
    _check_base_dtype(cfg, mode)
    if cfg.train.steps is not None and cfg.train.epochs is not None:
        raise UserInputError("pass either --steps or --epochs, not both")


#: The optimizers that run over FSDP2 shards (sharded Muon applies whole-matrix updates row by row; AdaMuon's
#: norm and NorMuon's rescale need whole-matrix statistics the owner does not send back yet).
FSDP_OPTIMIZERS = ("adamw", "muon", "muon-pe")


def check_strategy(cfg: RunConfig) -> None:
    """`train.strategy: fsdp` rules that need nothing built (after `--optim auto` is resolved); bad input."""
    if cfg.train.strategy != "fsdp":
        return
    if cfg.optimizer.name not in FSDP_OPTIMIZERS:
        raise UserInputError(f"--strategy fsdp runs {', '.join(FSDP_OPTIMIZERS)}; {cfg.optimizer.name} is not "
                             f"sharded yet: use --strategy ddp or --optim muon")
    o = cfg.optimizer
    if o.anchor_decay or o.trust_radius is not None or o.update_rank is not None:
        raise UserInputError("the mismatch mitigations (optimizer.anchor_decay, trust_radius, update_rank) need "
                             "whole matrices and are not sharded yet: use --strategy ddp")
    if cfg.lora.merge:
        raise UserInputError("--merge is not available with --strategy fsdp: drop --merge and merge final/ "
                             "afterwards (peft: PeftModel.from_pretrained(base, final).merge_and_unload())")
    if cfg.lora.rank is not None and cfg.lora.variant in ("pissa", "olora"):
        raise UserInputError(f"--lora-variant {cfg.lora.variant} is not available with --strategy fsdp (its "
                             "adapter is converted against the initial weights at save): use lora, rslora or "
                             "dora, or --strategy ddp")


def strategy_note(cfg: RunConfig, info: dist_mod.DistInfo) -> str | None:
    """The line to show when `--strategy fsdp` runs in a single process (nothing to shard), else None."""
    if cfg.train.strategy == "fsdp" and not info.distributed:
        return ("--strategy fsdp with one process: nothing to shard, training runs unsharded (launch with "
                "torchrun --nproc-per-node N to shard)")
    return None


def is_lora_run(cfg: RunConfig, mode: str) -> bool:
    """Whether the run trains a LoRA adapter on a frozen base: `--lora-rank`, or a finetune of an adapter folder
    (continued training). Adapters are local folders only (`models.source`), so this reads no more than that."""
    if mode != "finetune":
        return False
    if cfg.lora.rank is not None:
        return True
    name = cfg.model.name_or_path
    p = Path(name).expanduser() if name and not name.startswith("builtin:") else None
    return p is not None and p.is_dir() and (p / "adapter_config.json").is_file()


def _check_base_dtype(cfg: RunConfig, mode: str) -> None:
    """`--base-dtype` and `--load-in-4bit` are for a LoRA run's frozen base; 4-bit needs CUDA and bitsandbytes."""
    lora = is_lora_run(cfg, mode)
    what = "pretrain" if mode == "pretrain" else "full fine-tuning"
    if cfg.model.base_dtype not in ("auto", "fp32") and not lora:
        raise UserInputError(f"--base-dtype {cfg.model.base_dtype} sets the frozen base of a LoRA run, and {what} "
                             "trains every weight in fp32: add --lora-rank R, or drop --base-dtype (--dtype bf16 "
                             "gives bf16 autocast on CUDA)")
    if not cfg.model.load_in_4bit:
        return
    if not lora:
        raise UserInputError(f"--load-in-4bit quantises the frozen base of a LoRA run, and {what} cannot train "
                             "4-bit weights: add --lora-rank R, or drop --load-in-4bit")
    if cfg.lora.merge:
        raise UserInputError("--merge cannot merge into a 4-bit base: drop --merge, and merge final/ onto the "
                             "unquantised base with peft (PeftModel.from_pretrained(base, 'final').merge_and_unload())")
    import importlib.util

    from muonft_cli.models.device import pick_device

    if pick_device(cfg.train.device).type != "cuda":
        raise UserInputError("--load-in-4bit needs a CUDA GPU (bitsandbytes NF4) and this run computes on the "
                             "CPU: run it on a CUDA machine, or drop --load-in-4bit (--base-dtype bf16 halves the "
                             "base's memory on any device)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserInputError("--load-in-4bit needs bitsandbytes, which is not installed: pip install "
                             "'muonft[qlora]'")


def base_dtype_for(cfg: RunConfig, mode: str, out: Path, resume: bool, device: torch.device) -> str:
    """The dtype name the run's (base) model is loaded in (`models.resolve_base_dtype`). On `--resume` with
    `base_dtype: auto`, the one the run recorded in env.json (runs from before the setting: fp32), so a run
    continues on the base it started with whatever device it resumes on."""
    from muonft_cli.models.device import resolve_base_dtype
    from muonft_cli.train import rundir

    lora = is_lora_run(cfg, mode)
    if resume and lora and cfg.model.base_dtype in (None, "auto"):
        recorded = rundir.recorded_base_dtype(out)
        if recorded is not None:
            return recorded
    return resolve_base_dtype(cfg.model.base_dtype, device, lora)


def set_seed(seed: int) -> int:
    """Seed python, numpy and torch (CPU and every CUDA device); return the seed used."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


@dataclass
class Built:
    """The model side of a run: the model (on its device), its tokenizer, the data splits and the dtype name
    its (base) weights were loaded in (the compute dtype of a 4-bit base)."""

    model: torch.nn.Module
    tokenizer: Any
    splits: Any
    base_dtype: str = "fp32"

    @property
    def n_train(self) -> int:
        return len(self.splits.train)


def loads_on_rank0(cfg: RunConfig, info: dist_mod.DistInfo | None) -> bool:
    """Whether only rank 0 reads (or initialises) the weights: FSDP2 under torchrun. The other ranks build the
    same model on the meta device (no weights read, no memory) and get rank 0's weights, buffers and LoRA init
    once sharded (`wrap_fsdp`), so host memory holds one full copy of the model per job, not one per rank.
    Sources only rank 0 can read (GGUF files, adapter folders) are loaded by every rank as before."""
    return info is not None and info.distributed and cfg.train.strategy == "fsdp"


def build_model_and_data(cfg: RunConfig, mode: str, out: Path, resume: bool, device: torch.device,
                         info: dist_mod.DistInfo | None = None) -> Built:
    """Seed, then build the model and tokenizer for `mode` and the train/val splits of `cfg.data`. Under FSDP2
    with `info` (`loads_on_rank0`), ranks other than 0 build the model on the meta device."""
    import contextlib

    from muonft_cli import data as data_mod
    from muonft_cli import models

    if cfg.model.offline:
        set_offline()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our sink shows progress; keep stderr to one bar
    set_seed(cfg.train.seed)
    base_dtype = base_dtype_for(cfg, mode, out, resume, device)
    on_meta = loads_on_rank0(cfg, info) and not info.is_main
    if mode == "pretrain":
        tokenizer = _pretrain_tokenizer(cfg, out, resume)
        with torch.device("meta") if on_meta else contextlib.nullcontext():
            model = models.build_pretrain_model(cfg.model, tokenizer)
    else:
        # an adapter folder given without --lora-rank: continue training that adapter. A LoRA base comes in
        # `base_dtype`; peft keeps the adapter weights (and so the optimizer state) fp32 on any base.
        model, tokenizer = models.load_model(cfg.model, device, is_trainable=cfg.lora.rank is None,
                                             dtype=base_dtype, load_in_4bit=cfg.model.load_in_4bit,
                                             on_meta=on_meta)
        if cfg.lora.rank is not None:
            model = models.apply_lora(model, cfg.lora)  # on a meta base: meta adapters, rank 0's init later
    if loads_on_rank0(cfg, info):
        # rank 0's initialisation drew from the RNG and the meta ranks' did not: continue from rank 0's state,
        # as every rank did when each built its own copy (dropout, anything seeded after this point)
        torch.set_rng_state(dist_mod.broadcast_object(torch.get_rng_state(), info))
    # a large model's freed host tensors go back to the OS (glibc); a small one keeps the faster default
    models.limit_host_allocator_retention(sum(p.numel() for p in model.parameters()))
    if not cfg.model.load_in_4bit and not models.is_meta(model):  # a 4-bit base sits on its GPU already
        model.to(device)  # (bitsandbytes refuses `.to()`); a meta model is materialised once sharded
    if (device.type == "cpu" and base_dtype in ("bf16", "fp16") and not cfg.model.load_in_4bit
            and hasattr(model, "peft_config")):  # no autocast on CPU: LoRA keeps the half-precision input
        models.keep_adapter_inputs_in_base_dtype(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    built = Built(model, tokenizer, data_mod.build_splits(cfg.data, tokenizer, cfg.train.seed), base_dtype)
    if built.n_train == 0:
        raise UserInputError(f"data '{cfg.data.path}' gave no training sequences: use a smaller --seq-len")
    from muonft_cli.train.batching import n_targets

    if not any(n_targets(built.splits.train[i]["labels"][None]) for i in range(built.n_train)):
        raise UserInputError(f"data '{cfg.data.path}' gave no target tokens to train on (every label is masked, "
                             "e.g. prompts that fill --seq-len): use a larger --seq-len or data with responses")
    return built


def data_notice(splits: Any) -> str | None:
    """The line to show when the data layer dropped records without the text fields (None when none were)."""
    from muonft_cli.data.documents import drop_note

    info = getattr(splits, "info", None) or {}
    return drop_note(info.get("rows_read", 0), info.get("drop_reasons") or {}, f"'{info.get('source')}'")


def _pretrain_tokenizer(cfg: RunConfig, out: Path, resume: bool) -> Any:
    """The run's saved tokenizer on resume, else `--tokenizer`, else a BPE trained on the training documents."""
    saved = out / "tokenizer"
    if resume and saved.is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(saved))
    if cfg.model.tokenizer:
        from transformers import AutoTokenizer

        p = Path(cfg.model.tokenizer).expanduser()
        try:
            tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else cfg.model.tokenizer,
                                                local_files_only=hub_offline(),
                                                trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise UserInputError(f"--tokenizer '{cfg.model.tokenizer}' could not be loaded "
                                 f"({first_line(e)}): pass a local tokenizer directory") from None
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


def build_optimizer(model: torch.nn.Module, cfg: RunConfig,
                    info: dist_mod.DistInfo) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    """(trainable parameters, optimizer); under torchrun with DDP the optimizer's distributed hook is switched on,
    so each rank orthogonalises its round-robin share of the matrices (the plain-DDP arrangement of the paper's
    §4.7). Under FSDP2 the parameters are DTensors and Muon shards itself (`muonft_cli.optim.sharded`)."""
    from muonft_cli import optim

    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise MuonftError("the model has no trainable parameters (check --lora-targets)")
    optimizer = optim.build_optimizer(model, cfg.optimizer)
    if info.distributed and not dist_mod.is_fsdp(model):
        hook = getattr(optimizer, "set_distributed", None)
        if hook is not None:
            hook()  # the default process group, which `distributed.init_from_env` joined
    return trainable, optimizer


def wrap_fsdp(model: torch.nn.Module, info: dist_mod.DistInfo, cfg: RunConfig) -> bool:
    """Shard the model with FSDP2 (in place) under torchrun with `train.strategy: fsdp`; whether it did.
    Before the optimizer is built: the optimizer must hold the sharded (DTensor) parameters. Every rank's shards
    are then filled from rank 0's weights and buffers (`loads_on_rank0`: the other ranks built on meta)."""
    if not loads_on_rank0(cfg, info):
        return False
    # rank 0's full weights (references, not copies) outlive its sharding, for the broadcast into the shards
    full = dist_mod.full_state(model) if info.is_main else None
    dist_mod.fsdp_wrap(model, info)
    dist_mod.load_from_rank0(model, full, info)
    return True


def wrap_ddp(model: torch.nn.Module, info: dist_mod.DistInfo, device: torch.device) -> Any:
    """The model wrapped in DistributedDataParallel under torchrun (and not sharded by FSDP2), else None."""
    if not info.distributed or dist_mod.is_fsdp(model):
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

"""The training engine shared by `muonft pretrain` and `muonft finetune`: `run(cfg, mode)`.

The package, one job per module:

- `build`: the mode rules, seeding, the model / tokenizer / data splits, the optimizer and the DDP / FSDP2
  wrapper (`train.strategy`);
- `schedule`: the step budget and the lr schedule (linear warmup, then cosine to `min_lr_ratio`);
- `batching`: the data order, global and micro-batches, and the next-token loss (shared with `evaluate`);
- `loop`: the optimizer steps, validation, checkpoints on schedule and on signals, the summary;
- `state`: `TrainerState` and the checkpoints that save and restore it (bit-exact `--resume`);
- `rundir`: the run directory's rules and files (config.yaml, env.json, metrics.jsonl, summary.json, final/);
- `distributed`: torchrun process groups, batch sharding and collectives;
- `sink`: the progress protocol (`NullSink`); the CLI's progress bar is `muonft_cli.render.RichSink`;
- `report_to`: the logging backends (`train.report_to`: TensorBoard, W&B), opened on rank 0 only.

The names below are the public API; the engine never prints.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from muonft_cli import config as config_mod
from muonft_cli.config import RunConfig
from muonft_cli.train import distributed as dist_mod
from muonft_cli.train import report_to, rundir, schedule, state as state_mod
from muonft_cli.train.batching import collate, epoch_order, global_batch, micro_batch_size, n_targets, token_nll_sum
from muonft_cli.train.build import (MODES, build_model_and_data, build_optimizer, check_inputs, check_strategy,
                                   data_notice, set_seed, strategy_note, wrap_ddp, wrap_fsdp)
from muonft_cli.errors import TrainingInterrupted
from muonft_cli.train.loop import Loop
from muonft_cli.train.rundir import RESUME_MAY_CHANGE, RUN_FILES
from muonft_cli.train.schedule import lr_lambda, total_steps
from muonft_cli.train.sink import NullSink, Sink
from muonft_cli.train.state import TrainerState

__all__ = [
    "MODES", "RESUME_MAY_CHANGE", "RUN_FILES", "NullSink", "Sink", "TrainerState", "TrainingInterrupted",
    "check_inputs", "collate", "epoch_order", "global_batch", "lr_lambda", "n_targets", "run", "set_seed",
    "token_nll_sum", "total_steps",
]


def run(cfg: RunConfig, mode: str, sink: Any = None, resume: bool = False,
        optim_choice: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train (pretrain or fine-tune) as `cfg` says and return the run summary.

    Args:
        cfg: the resolved run config (saved as `config.yaml`).
        mode: "pretrain" (fresh model from a preset/config, tokenizer trained or given) or "finetune"
            (model loaded with `models.load_model`; LoRA via `models.apply_lora` when `lora.rank` is set).
        sink: progress receiver (the `sink.Sink` protocol, e.g. `NullSink`); None = silent.
        resume: continue the run in `cfg.output.dir` from its last checkpoint (from step 0, said on the sink,
            when it has none); a finished run resumed without a larger `train.steps` is left untouched and its
            saved summary returned.
        optim_choice: the `--optim auto` decision when the caller resolved it already
            (`muonft_cli.diagnose.auto.resolve_config`); a `cfg` still naming ``auto`` is resolved here, before
            the model is loaded. Recorded in the summary and muonft.json as ``optim_choice``.

    Returns:
        The summary dict: out, mode, optim, steps, tokens, train_loss (mean of the last <= 10 steps),
        val_loss, val_ppl, best_val_loss, best_val_ppl, best_step, final, runtime_s, lora, base_dtype (the dtype
        the (base) weights were loaded in: fp32, bf16, fp16, or nf4 for a 4-bit base), plus world_size,
        ortho_per_rank (matrices each rank orthogonalised, from the optimizer's counter; None without Muon),
        local_bytes_per_rank (each rank's {params, grads, optimizer_state} bytes of its local tensors or shards,
        measured after this process's first step; None entries when it ran none), strategy ("fsdp" | "ddp" |
        None for one process),
        and ``optim_choice`` ({requested, chosen, source, reason, confidence, ...}) for an `--optim auto` run.

    Raises:
        UserInputError: bad input, before anything is written (an unwritable `--out`, one that another run
            holds (its `.lock`), a `--resume` with a `--steps` below the steps already done).
        TrainingDivergedError: loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    import os

    from muonft_cli.diagnose import auto as auto_mod

    check_inputs(cfg, mode)
    cfg, resolved = auto_mod.resolve_config(cfg, mode)  # `auto`: decided from the base, streamed, no model load
    optim_choice = resolved or optim_choice
    cfg, trust_choice = auto_mod.resolve_mitigations(cfg, mode)  # `trust_norm: auto`: from the same provenance
    check_strategy(cfg)  # --strategy fsdp's rules, on the resolved optimizer
    report_to.check(cfg.train.report_to)  # an unknown or missing backend: bad input, before any work
    sink = sink or NullSink()
    out = Path(cfg.output.dir).expanduser()
    rundir.check_writable(out)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 locks (and writes)
        created = rundir.first_missing(out)
        lock = rundir.lock_out_dir(out), created
    if cfg.train.threads is not None:  # --threads: CPU threads of this run (None: torch's default)
        import torch

        torch.set_num_threads(cfg.train.threads)
    try:
        where = rundir.prepare_out_dir(cfg, resume)
        if where.finished is not None:
            sink.on_message(f"{out} already finished {where.finished['steps']} steps; nothing to do (pass a "
                            f"larger --steps to continue training)")
            return where.finished
        info = dist_mod.init_from_env(cfg.train.device)
        try:
            loop = _assemble(cfg, mode, sink, info, out, resume, where.ckpt_step)
            loop.optim_choice = optim_choice
            loop.trust_choice = trust_choice
            try:
                return loop.run()
            finally:
                if loop.reporter is not None:
                    loop.reporter.close()
        finally:
            dist_mod.cleanup(info)
    finally:
        if lock is not None:
            rundir.unlock_out_dir(out, *lock)


def _assemble(cfg: RunConfig, mode: str, sink: Any, info: dist_mod.DistInfo, out: Any, resume: bool,
              ckpt_step: int | None) -> Loop:
    """Build everything, restore the checkpoint when resuming, write the run files; the loop, ready to run."""
    t0, device = time.perf_counter(), info.device
    built = build_model_and_data(cfg, mode, out, resume, device, info)
    local_batch, micro = micro_batch_size(cfg.train.batch_size, cfg.train.micro_batch_size, info.world_size)
    fsdp = wrap_fsdp(built.model, info, cfg)  # before the optimizer: it must hold the sharded parameters
    trainable, optimizer = build_optimizer(built.model, cfg, info)
    steps = total_steps(cfg.train, built.n_train)
    scheduler = schedule.make_scheduler(optimizer, steps, cfg.schedule)
    loop = Loop(cfg=cfg, mode=mode, out=out, info=info, sink=sink if info.is_main else NullSink(),
                model=built.model, tokenizer=built.tokenizer, splits=built.splits, trainable=trainable,
                optimizer=optimizer, scheduler=scheduler, total_steps=steps, micro=micro, t0=t0, fsdp=fsdp,
                base_dtype=built.base_dtype)
    if resume and ckpt_step is not None:
        loop.state = state_mod.load_checkpoint(out, ckpt_step, built.model, optimizer, scheduler, info,
                                               built.n_train, device, strategy=loop.strategy)
    dist_mod.barrier(info)
    if info.is_main:
        env = rundir.env_record(info, device, loop.autocast_dtype, mode, loop.state.step if resume else None,
                                built.model, trainable, getattr(built.splits, "info", None), steps,
                                cfg.train.batch_size, local_batch, micro, strategy=loop.strategy,
                                base_dtype=built.base_dtype)
        rundir.write_run_files(out, cfg, resume, loop.state.step, built.tokenizer if mode == "pretrain" else None,
                               env)
    dist_mod.barrier(info)
    loop.ddp = wrap_ddp(built.model, info, device)
    if info.is_main and cfg.train.report_to:  # packages checked before any work (`run`); rank 0 only logs
        loop.reporter = report_to.Reporter(cfg.train.report_to, out, loop.state.step if resume else None,
                                           cfg.train.run_name, config_mod.to_dict(cfg))
    for note in (strategy_note(cfg, info), data_notice(built.splits)):
        if note is not None:
            loop.sink.on_message(note)
    if resume:
        loop.sink.on_message(f"resuming {out} at step {loop.state.step} of {steps}" if ckpt_step is not None
                             else f"{out} has no checkpoint: starting over from step 0")
    return loop

"""The learning-rate schedule: how many optimizer steps a run takes and the lr multiplier of each.

Owns: the step budget (`train.steps`, or `train.epochs` over the training sequences), the schedule itself
(linear warmup over `schedule.warmup_ratio` of the steps, then a cosine decay to `schedule.min_lr_ratio` x the
peak lr: the paper's §4 setting is warmup 0.03 and a cosine), and the
`LambdaLR` that applies it to an optimizer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch


def total_steps(train_cfg: Any, n_train: int) -> int:
    """Optimizer steps of a run: `train.steps`, else ceil(epochs x sequences / batch) (epochs default 1)."""
    if train_cfg.steps is not None:
        return int(train_cfg.steps)
    epochs = train_cfg.epochs if train_cfg.epochs is not None else 1.0
    return max(1, math.ceil(epochs * n_train / train_cfg.batch_size))


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """The lr multiplier as a function of the number of completed optimizer steps.

    Linear warmup over `w = round(warmup_ratio * total_steps)` steps ((s+1)/w, so the first step does not
    waste itself at lr 0), then a cosine from 1 down to `min_lr_ratio` at the last step.

    Args:
        total_steps: optimizer steps in the run.
        warmup_ratio: fraction of the steps spent warming up, in [0, 1].
        min_lr_ratio: final lr as a fraction of the peak lr, in [0, 1].

    Returns:
        A plain function (so `LambdaLR.state_dict` stores nothing of it: a resumed run with a larger step budget
        runs on its own schedule, see `reapply`).
    """
    warmup = int(round(warmup_ratio * total_steps))
    decay = max(1, total_steps - warmup)

    def fn(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / decay)  # < 1 on the last step: it still learns
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def make_scheduler(optimizer: torch.optim.Optimizer, steps: int,
                   schedule_cfg: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """The `LambdaLR` applying `lr_lambda(steps, warmup_ratio, min_lr_ratio)` to every param group."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(steps, schedule_cfg.warmup_ratio, schedule_cfg.min_lr_ratio))


def reapply(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set every param group's lr from the scheduler's own schedule at its restored step.

    After `load_state_dict` the param groups hold the lr the *saved* run's schedule gave for the next step; a
    resume with a larger `--steps` must run that step at the new schedule's lr. The expression is `LambdaLR`'s
    own (`base_lr * lambda(last_epoch)`), so a resume with an unchanged schedule stays bit-exact.
    """
    for group, base_lr, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base_lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]

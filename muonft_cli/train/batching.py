"""Batching and the next-token loss: which samples each optimizer step sees, and how a batch is scored.

Owns
- the data order: one permutation per epoch from an explicit generator seeded by (seed, epoch), so the data
  position (samples consumed) alone restores the stream on resume;
- the global batch of a step (`train.batch_size` sequences, possibly spanning epochs) and its stacking;
- the micro-batch size of a rank (gradient accumulation when the per-rank batch is larger);
- the next-token loss, `token_nll_sum` / `n_targets`: Σ token NLL over target tokens (labels != IGNORE_INDEX
  after the causal shift) and their count. This is the one implementation: the training loop divides the
  sum by the target count of the whole global batch, and `muonft_cli.evaluate.evaluate_loss` by the count of
  the whole evaluated set. It lives here, beside the batches it scores, because training is its main
  user; `evaluate` imports these two functions (and nothing else of train), so neither engine needs the
  other's loop and there is no import cycle (train imports `evaluate` only inside its validation call).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from muonft_cli._common import IGNORE_INDEX
from muonft_cli.errors import UserInputError


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
    """Stack dataset items into a batch: `input_ids`, `labels` and (when present) `attention_mask`, each [B, T]."""
    items = [dataset[i] for i in indices]
    return {k: torch.stack([it[k] for it in items]) for k in ("input_ids", "labels", "attention_mask")
            if k in items[0]}


def micro_batch_size(batch_size: int, micro_batch_size: int, world_size: int) -> tuple[int, int]:
    """(sequences per rank per step, sequences per forward pass); bad input if the batch does not split."""
    if batch_size % world_size:
        raise UserInputError(f"--batch-size {batch_size} does not split over {world_size} processes: use a "
                             f"multiple of {world_size}")
    local = batch_size // world_size
    return local, min(micro_batch_size, local)


#: elements of one fp32 chunk of logits in `token_nll_sum` (4 Mi = 16 MiB): the loss never upcasts more at once
NLL_CHUNK_ELEMENTS = 1 << 22


def _chunk_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ NLL of one chunk: logits [B, t, V] (any dtype, upcast here), labels [B, t] (already shifted)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL over target tokens (labels != IGNORE_INDEX after the causal shift), in fp32.

    Position t's logits predict label t+1 (as HF causal LMs do internally). Computed in chunks of sequence
    positions (at most `NLL_CHUNK_ELEMENTS` logits each), so the fp32 upcast and log-softmax of the whole
    [B, T, V] never exist at once; with autograd each chunk is recomputed in the backward pass
    (`torch.utils.checkpoint`) instead of keeping its fp32 log-softmax, so the graph holds only the logits.

    Args:
        logits: [B, T, V].
        labels: [B, T], IGNORE_INDEX (-100) where no loss is taken; moved to the logits' device.
    """
    b, t, v = logits.shape
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    step = max(1, NLL_CHUNK_ELEMENTS // max(1, b * v))  # positions per chunk
    grad = torch.is_grad_enabled() and logits.requires_grad
    total = None
    for s in range(0, t - 1, step):
        e = min(s + step, t - 1)
        if grad:
            part = torch.utils.checkpoint.checkpoint(_chunk_nll, logits[:, s:e], shift_labels[:, s:e],
                                                     use_reentrant=False, preserve_rng_state=False)
        else:
            part = _chunk_nll(logits[:, s:e], shift_labels[:, s:e])
        total = part if total is None else total + part
    if total is None:  # T == 1: no next token to predict
        total = logits.float().sum() * 0.0
    return total


def n_targets(labels: torch.Tensor) -> int:
    """Number of target tokens in labels [B, T] after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

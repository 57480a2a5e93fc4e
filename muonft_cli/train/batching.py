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


class _ChunkedNLL(torch.autograd.Function):
    """Σ next-token NLL of logits [B, T, V] against shifted labels [B, T−1], chunk by chunk of positions.

    Forward: per chunk, its log-sum-exp (exp(x − max) upcast into one fp32 buffer that every chunk of the pass
    reuses) and the target's logit; only the per-token log-sum-exp (B × (T−1) fp32) is saved beside the logits.
    Backward: per chunk, ``softmax − onehot`` = exp(x − lse) with 1 taken off at the target, times the incoming
    gradient, formed in the logits' gradient itself (fp32 logits) or in the one fp32 buffer and copied there.
    The same math as ``F.cross_entropy(reduction="sum")``, with two passes over the logits instead of
    log-softmax's saved fp32 copy (or, as before, a recomputed checkpoint: 2.4× slower at SmolLM2's vocabulary,
    measured).
    """

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        b, n = labels.shape
        lse = torch.empty(b, n, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        work = _chunk_buffer(logits, min(step, n))
        for s in range(0, n, step):
            e = min(s + step, n)
            x = logits[:, s:e]
            tgt = labels[:, s:e]
            valid = tgt != IGNORE_INDEX
            # log-sum-exp as torch.logsumexp forms it (an infinite max taken as 0), its exp written into the
            # one chunk buffer instead of a fresh fp32 temporary per chunk
            m = x.amax(dim=-1, keepdim=True).float()
            m.masked_fill_(m.abs() == float("inf"), 0.0)
            w = work[:, :e - s]
            torch.sub(x, m, out=w).exp_()
            lse_c = w.sum(dim=-1).log_().add_(m.squeeze(-1))
            picked = x.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1).float()
            total += torch.where(valid, lse_c - picked, 0.0).sum()
            lse[:, s:e] = lse_c
        ctx.save_for_backward(logits, labels, lse)
        ctx.step = step
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        logits, labels, lse = ctx.saved_tensors
        n = labels.shape[1]
        grad = torch.empty_like(logits)
        grad[:, n:] = 0  # the last position predicts nothing
        # fp32 logits: the softmax is formed in the gradient itself; otherwise in one fp32 chunk buffer
        work = None if logits.dtype == torch.float32 else _chunk_buffer(logits, min(ctx.step, n))
        for s in range(0, n, ctx.step):
            e = min(s + ctx.step, n)
            p = grad[:, s:e] if work is None else work[:, :e - s]
            torch.sub(logits[:, s:e], lse[:, s:e].unsqueeze(-1), out=p).exp_()  # softmax, fp32
            tgt = labels[:, s:e]
            valid = (tgt != IGNORE_INDEX).to(p.dtype)
            p.scatter_add_(-1, tgt.clamp_min(0).unsqueeze(-1), -valid.unsqueeze(-1))  # − onehot
            p.mul_((valid * grad_total).unsqueeze(-1))  # ignored positions: no gradient
            if work is not None:
                grad[:, s:e] = p
        return grad, None, None


def _chunk_buffer(logits: torch.Tensor, positions: int) -> torch.Tensor:
    """One fp32 [B, positions, V] buffer that every chunk of a pass reuses. A fresh temporary per chunk costs more
    than its arithmetic on CPU: with glibc's mmap threshold at 4 MiB (`models.device`) each 16 MiB temporary is a
    new mapping, page-faulted again (forward + backward at SmolLM2's batch 2 × 128 and vocabulary 49 152: 97–107 ms
    with a temporary per chunk, 61–69 ms with this buffer, README "Fine-tuning throughput")."""
    b, _, v = logits.shape
    return torch.empty(b, positions, v, dtype=torch.float32, device=logits.device)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ next-token NLL over target tokens (labels != IGNORE_INDEX after the causal shift), in fp32.

    Position t's logits predict label t+1 (as HF causal LMs do internally). Computed in chunks of sequence
    positions (at most `NLL_CHUNK_ELEMENTS` logits each, `_ChunkedNLL`), so the fp32 upcast and log-softmax of
    the whole [B, T, V] never exist at once; with autograd the graph holds the logits and one fp32 log-sum-exp
    per token, and the backward pass forms each chunk's softmax again.

    Args:
        logits: [B, T, V].
        labels: [B, T], IGNORE_INDEX (-100) where no loss is taken; moved to the logits' device.
    """
    b, t, v = logits.shape
    if t <= 1:  # T == 1: no next token to predict
        return logits.float().sum() * 0.0
    shift_labels = labels[:, 1:].to(logits.device)  # [B, T-1]
    step = max(1, NLL_CHUNK_ELEMENTS // max(1, b * v))  # positions per chunk
    return _ChunkedNLL.apply(logits, shift_labels, step)


def n_targets(labels: torch.Tensor) -> int:
    """Number of target tokens in labels [B, T] after the causal shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())

"""The training loop: optimizer steps over global batches, periodic validation and checkpoints, signals.

Owns
- one optimizer step: the global batch (`train.batch_size` sequences) split over ranks and micro-batches;
  its loss is Σ token NLL / N with N the target tokens of the whole global batch (all micro-batches, all
  ranks), so prompt masking, the micro-batch size and the number of processes do not change the gradient;
  gradient clipping on the raw gradients, before the optimizer (never on Muon's orthogonalised update);
- the step record logged to `metrics.jsonl`, the sink and the logging backends (`reporter`, with Muon's
  matrix counter summed over ranks); its `lr` is the one the step used (read from the optimizer before
  `scheduler.step()`);
- validation every `train.eval_every` steps and at the end (`evaluate.evaluate_loss`), keeping `best/`;
- checkpoints every `train.save_every` steps and at the end; by default (`save_every: null`, "auto") every
  10 % of the run (ceil(steps / 10), at least 1) and whenever `train.save_every_minutes` passed since the
  last one, whichever comes first; SIGINT/SIGTERM (checked between steps and between validation batches) →
  checkpoint of the last finished step, then `TrainingInterrupted`; NaN/inf loss or gradient norm →
  `TrainingDivergedError` (the last good checkpoint is kept);
- FSDP2 (`fsdp`): a gradient reduce-scatter after every micro-batch (the gradients accumulate sharded; skipping
  the sync would hold full-size unsharded gradients between micro-batches), the clip norm over the
  DTensor gradients, validation on every rank (the forward gathers the shards; a signal is noticed after it);
- the run summary.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from muonft_cli.config import RunConfig
from muonft_cli.errors import TrainingDivergedError, TrainingInterrupted
from muonft_cli.models import device as device_mod
from muonft_cli.train import batching, rundir, state as state_mod
from muonft_cli.train import distributed as dist_mod
from muonft_cli.train.state import TrainerState


#: The loop's clock for time-based checkpoints (seconds; tests replace it).
clock = time.monotonic


def save_interval(save_every: int | None, total_steps: int) -> int:
    """Steps between checkpoints: `save_every` as given (0 = none), or for "auto" (None) every 10 % of the run."""
    if save_every is not None:
        return save_every
    return max(1, math.ceil(total_steps / 10))


class _ValidationStopped(Exception):
    """A signal arrived during validation (raised between its batches)."""


class _Stoppable:
    """A validation dataset that stops its pass when the stop flag is set: `evaluate_loss` reads it one batch
    of samples at a time, so a SIGINT/SIGTERM ends validation before the next batch."""

    def __init__(self, dataset: Any, stop: _Stop) -> None:
        self.dataset, self.stop = dataset, stop

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        if self.stop.signum is not None:
            raise _ValidationStopped
        return self.dataset[i]


class _Stop:
    """Signal flag set by SIGINT/SIGTERM; checked between optimizer steps and between validation batches."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.during_validation = False
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


@dataclass
class Loop:
    """Everything one run trains with (built by `muonft_cli.train.run`) and its progress, `state`."""

    cfg: RunConfig
    mode: str
    out: Path
    info: dist_mod.DistInfo
    sink: Any
    model: torch.nn.Module
    tokenizer: Any
    splits: Any
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    micro: int
    ddp: Any = None
    fsdp: bool = False  # the model is sharded with FSDP2 (`train.strategy: fsdp` under torchrun)
    reporter: Any = None  # `report_to.Reporter` on rank 0 when `train.report_to` names a backend
    state: TrainerState = field(default_factory=TrainerState)
    optim_choice: dict[str, Any] | None = None  # the `--optim auto` decision (`muonft_cli.diagnose.auto`)
    trust_choice: dict[str, Any] | None = None  # the `trust_norm: auto` decision (`diagnose.auto.resolve_mitigations`)
    base_dtype: str = "fp32"  # the dtype name the (base) weights were loaded in (a 4-bit base: its compute dtype)
    t0: float = field(default_factory=time.perf_counter)
    local_bytes: dict[str, int] | None = None  # this rank's parameter / gradient / optimizer-state bytes

    @property
    def strategy(self) -> str | None:
        """How the ranks share the model: "fsdp" (sharded), "ddp" (replicated), None (one process)."""
        return "fsdp" if self.fsdp else ("ddp" if self.info.distributed else None)

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def n_train(self) -> int:
        return len(self.splits.train)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return device_mod.autocast_dtype(self.cfg.model, self.device, self.base_dtype)

    def identity(self) -> dict[str, Any]:
        """The run facts a checkpoint records beside the state."""
        ident = {"world_size": self.info.world_size, "data_seed": self.cfg.train.seed, "n_train": self.n_train,
                 "total_steps": self.total_steps}
        return ident | ({"strategy": "fsdp"} if self.fsdp else {})  # DDP checkpoints keep their old keys

    def save_checkpoint(self) -> Path:
        return state_mod.save_checkpoint(self.out, self.state, self.model, self.optimizer, self.scheduler,
                                         self.info, self.cfg.train.keep_last, self.identity(), sharded=self.fsdp)

    def save_model(self, name: str) -> Path:
        return rundir.save_model(self.out, name, self.model, self.tokenizer, self.cfg, self.mode, self.state,
                                 self.info, optim_choice=self.optim_choice, sharded=self.fsdp)

    def train_step(self) -> tuple[float, float, int, float]:
        """One optimizer step over the global batch; returns (loss, grad_norm, input tokens, lr used)."""
        t, st = self.cfg.train, self.state
        local = dist_mod.shard(batching.global_batch(st.position, t.batch_size, self.n_train, t.seed), self.info)
        micro = [batching.collate(self.splits.train, local[i:i + self.micro])
                 for i in range(0, len(local), self.micro)]
        counts = torch.tensor([sum(batching.n_targets(b["labels"]) for b in micro),
                               sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                                   for b in micro)], dtype=torch.float64, device=self.device)
        dist_mod.all_reduce_sum(counts, self.info)
        n_global, in_tokens = float(counts[0]), int(counts[1])
        scale = self.info.world_size / max(n_global, 1.0)  # DDP averages over ranks; undo that, divide by N
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, b in enumerate(micro):
            sync = self.ddp is None or j == len(micro) - 1
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with device_mod.autocast(self.device, self.autocast_dtype):
                    outputs = net(input_ids=b["input_ids"].to(self.device),
                                  attention_mask=b["attention_mask"].to(self.device) if "attention_mask" in b
                                  else None, use_cache=False)
                nll = batching.token_nll_sum(outputs.logits, b["labels"])
                del outputs  # the graph keeps what backward needs; the logits go with it, not at the next forward
                (nll * scale).backward()
            loss_sum += nll.detach().double()
            del nll
        dist_mod.all_reduce_sum(loss_sum, self.info)
        loss = float(loss_sum) / max(n_global, 1.0)
        # over DTensor gradients (FSDP2) torch computes the global norm; full_value makes it a plain tensor
        if t.clip is not None:
            gnorm = float(dist_mod.full_value(torch.nn.utils.clip_grad_norm_(self.trainable, t.clip)))
        else:
            gnorm = float(dist_mod.full_value(torch.nn.utils.get_total_norm(
                [p.grad for p in self.trainable if p.grad is not None])))
        if not math.isfinite(loss) or not math.isfinite(gnorm):
            self.optimizer.zero_grad(set_to_none=True)
            last = state_mod.checkpoint_steps(self.out)
            where = f"last good checkpoint: {state_mod.checkpoint_dir(self.out, last[-1])}" if last else \
                "no checkpoint was written yet"
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            raise TrainingDivergedError(
                f"training diverged at step {st.step + 1}: {what} became {loss if what == 'loss' else gnorm} "
                f"({where}); lower --lr (now {self.cfg.optimizer.lr:g}) or keep --clip on")
        lr = float(self.optimizer.param_groups[0]["lr"])  # the lr this step runs at, before the scheduler moves it
        self.optimizer.step()
        if self.local_bytes is None:
            self.local_bytes = self.measure_local_bytes()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        st.position += t.batch_size
        return loss, gnorm, in_tokens, lr

    def measure_local_bytes(self) -> dict[str, int]:
        """Bytes this rank holds (local shards under FSDP2): parameters, gradients, optimizer state."""
        def nbytes(t: torch.Tensor) -> int:
            t = dist_mod.local(t)
            return t.numel() * t.element_size()

        state = [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        return {"params": sum(nbytes(p) for p in self.model.parameters()),
                "grads": sum(nbytes(p.grad) for p in self.trainable if p.grad is not None),
                "optimizer_state": sum(nbytes(v) for v in state)}

    def evaluate(self, stop: _Stop | None = None) -> dict | None:
        """Validation loss on rank 0 (broadcast); None without a validation split, or when `stop` was set
        during the pass (then `stop.during_validation` is True). Under FSDP2 every rank runs the pass (the
        forward all-gathers the shards) and a signal is noticed after it."""
        from muonft_cli.evaluate import evaluate_loss

        if self.splits.val is None or len(self.splits.val) == 0:
            return None
        res = None
        if self.info.is_main or self.fsdp:
            self.model.eval()
            data = self.splits.val if stop is None or self.fsdp else _Stoppable(self.splits.val, stop)
            try:
                res = evaluate_loss(self.model, data, self.cfg.eval.batch_size, self.device,
                                    max_batches=self.cfg.eval.max_batches, autocast_dtype=self.autocast_dtype)
            except _ValidationStopped:
                stop.during_validation = True
            self.model.train()
        return dist_mod.broadcast_object(res, self.info)

    def run(self) -> dict[str, Any]:
        """Train from `state.step` to `total_steps`; save `final/` and `summary.json`; return the summary."""
        t, st = self.cfg.train, self.state
        self.model.train()
        self.sink.on_start({"mode": self.mode, "optim": self.cfg.optimizer.name, "start_step": st.step,
                            "total_steps": self.total_steps, "device": str(self.device),
                            "world_size": self.info.world_size})
        stop = _Stop()
        stop.install()
        every = save_interval(t.save_every, self.total_steps)
        minutes = t.save_every_minutes if t.save_every is None else 0  # an explicit --save-every N is exactly N
        last_save = clock()
        ran = False
        try:
            while st.step < self.total_steps:
                ran = True
                t_start = time.perf_counter()
                loss, gnorm, in_tokens, lr = self.train_step()
                st.step += 1
                st.tokens += in_tokens
                dt = time.perf_counter() - t_start
                record = {"step": st.step, "epoch": round(st.position / self.n_train, 4), "loss": loss,
                          "lr": lr, "grad_norm": gnorm, "tokens": st.tokens,
                          "tokens_per_s": in_tokens / dt if dt > 0 else 0.0, "val_loss": None, "val_ppl": None}
                last = st.step == self.total_steps
                if (t.eval_every and st.step % t.eval_every == 0) or last:
                    res = self.evaluate(stop)
                    if res is not None:
                        st.last_val = res
                        record["val_loss"], record["val_ppl"] = res["loss"], res["ppl"]
                        if t.eval_every and (st.best_val_loss is None or res["loss"] < st.best_val_loss):
                            st.best_val_loss, st.best_step = res["loss"], st.step
                            self.save_model("best")
                st.recent_losses = (st.recent_losses + [loss])[-10:]
                if self.info.is_main:
                    rundir.append_metrics(self.out, record)
                if self.cfg.train.report_to:
                    ortho = self.ortho_total()  # collective: every rank takes part
                    if self.reporter is not None:
                        self.reporter.log(record, ortho)
                self.sink.on_step(record)
                due = bool(every) and (st.step % every == 0 or last)
                if not due and minutes and self.info.is_main:
                    due = clock() - last_save >= minutes * 60
                if self.info.distributed and minutes:  # rank 0's clock decides for every rank
                    due = bool(dist_mod.broadcast_object(due, self.info))
                if due:
                    self.save_checkpoint()  # also at the end: `--resume --steps MORE` continues from here
                    last_save = clock()
                flag = torch.tensor([1.0 if stop.signum is not None else 0.0, float(stop.during_validation)],
                                    device=self.device)
                if self.info.distributed:
                    dist_mod.all_reduce_sum(flag, self.info)
                # a signal during the last step's validation stops too: the run is not finished without it
                if float(flag[0]) > 0 and (not last or float(flag[1]) > 0):
                    path = state_mod.checkpoint_dir(self.out, st.step) if due else self.save_checkpoint()
                    self.sink.on_end(self.summary(final=None))
                    during = " (during validation)" if stop.during_validation else ""
                    raise TrainingInterrupted(
                        f"interrupted at step {st.step} of {self.total_steps}{during}; checkpoint written to "
                        f"{path}: continue with the same command plus --resume")
            if not ran and st.step == self.total_steps:
                # resumed at its last step (stopped during the final validation): validate, then finish
                res = self.evaluate()
                if res is not None:
                    st.last_val = res
        finally:
            stop.restore()
        final = self.save_model("final")
        summary = self.summary(final=str(final))
        if self.info.is_main:
            rundir.write_summary(self.out, summary)
        self.sink.on_end(summary)
        return summary

    def ortho_total(self) -> int | None:
        """Matrices Muon orthogonalised so far on all ranks together (collective); None without Muon."""
        ortho = getattr(self.optimizer, "ns_matrices_done", None)
        if ortho is None:
            return None
        return sum(dist_mod.all_gather_object(int(ortho), self.info))

    def mitigation(self) -> dict[str, Any] | None:
        """The mismatch mitigation this run trained with (`optim.constraints`), or None when none is on."""
        o = self.cfg.optimizer
        cons = getattr(self.optimizer, "constraints", None)
        if cons is None and o.update_rank is None:
            return None
        out: dict[str, Any] = {"anchor_decay": o.anchor_decay, "trust_radius": o.trust_radius,
                               "trust_norm": o.trust_norm if o.trust_radius is not None else None,
                               "update_rank": o.update_rank}
        if cons is not None:
            out["state_bytes"] = cons.bytes()
            out["exact_svds"] = cons.exact_svds
        if self.trust_choice is not None:
            out["trust_choice"] = self.trust_choice
        return out

    def drift(self) -> dict[str, Any] | None:
        """‖W − W₀‖ of the trained matrices (`optim.constraints.drift_norms`) for full fine-tuning: against the
        optimizer's anchors under a mitigation, else against the base's weights read back from its safetensors
        one tensor at a time; for LoRA (`lora`/`rslora`) the merged update s·B·A of every adapted matrix against its
        base weight; None for pretraining, other LoRA variants and bases that are not a local safetensors folder."""
        if self.mode != "finetune":
            return None
        from muonft_cli.optim.constraints import drift_norms

        if self.cfg.lora.rank is not None:
            if self.cfg.lora.variant not in ("lora", "rslora"):
                return None  # DoRA rescales, PiSSA / OLoRA move the base weights: s·B·A is not W − W₀
            return drift_norms((w0 + d, w0, True) for w0, d in self._lora_deltas())

        cons = getattr(self.optimizer, "constraints", None)
        if cons is not None:
            return cons.drift()
        from muonft_cli.models.load import model_source

        src = model_source(self.model)
        files = sorted(Path(src.path).glob("*.safetensors")) if src is not None and src.kind == "dir" else []
        if not dist_mod.broadcast_object(bool(files), self.info) if self.fsdp else not files:
            return None
        split = getattr(self.optimizer, "param_split", None)
        hidden = {id(r.param) for r in split.muon} if split is not None else set()
        named = {n: p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2}

        def pairs():
            import contextlib

            from safetensors import safe_open

            with contextlib.ExitStack() as stack:
                where = {}  # only rank 0 reads the base (under FSDP2 the others only help gather each matrix)
                for f in files if self.info.is_main else ():
                    h = stack.enter_context(safe_open(str(f), "pt"))
                    where.update((k, h) for k in h.keys())
                for k, p in named.items():
                    h = where.get(k)
                    if h is None and not self.fsdp:
                        continue
                    w = dist_mod.full_value(p.detach())  # a DTensor gathered on every rank, in the same order
                    if h is not None and tuple(h.get_slice(k).get_shape()) == tuple(w.shape):
                        yield w, h.get_tensor(k), id(p) in hidden

        return drift_norms(pairs())

    def _lora_deltas(self):
        """(base weight W₀, merged update s·B·A) for every adapted linear layer (peft's `get_delta_weight` of
        plain LoRA; under FSDP2 W₀, B and A are gathered whole on every rank, in the same order)."""
        from peft.utils.other import transpose

        for mod in self.model.modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer") and "default" in getattr(
                    mod, "lora_A", {}):
                with torch.no_grad():
                    if not self.fsdp:
                        yield mod.base_layer.weight, mod.get_delta_weight("default")
                        continue
                    w0, b, a = (dist_mod.full_value(t.detach()) for t in (
                        mod.base_layer.weight, mod.lora_B["default"].weight, mod.lora_A["default"].weight))
                    yield w0, transpose(b @ a, mod.fan_in_fan_out) * mod.scaling["default"]

    def summary(self, final: str | None) -> dict[str, Any]:
        """The run summary (see `muonft_cli.train.run`); collective (gathers the ranks' Muon counters)."""
        st, lv = self.state, self.state.last_val or {}
        ortho = getattr(self.optimizer, "ns_matrices_done", None)  # muonft Muon family: matrices this rank did
        per_rank = dist_mod.all_gather_object(int(ortho), self.info) if ortho is not None else None
        best = st.best_val_loss
        best_ppl = None if best is None else (math.exp(best) if best < 700 else float("inf"))
        extra = {"optim_choice": self.optim_choice} if self.optim_choice is not None else {}
        drift = self.drift() if self.info.is_main or self.fsdp else None  # FSDP2: every rank gathers
        drift = drift if self.info.is_main else None
        if drift is not None:
            extra["drift"] = drift
        if (mit := self.mitigation()) is not None:
            extra["mitigation"] = mit
        if ortho is not None:  # the muonft Muon family: did its native CPU kernel run (and if not, why)?
            from muonft_cli.native import status as native_status

            extra["native_kernel"] = {"matrices": int(getattr(self.optimizer, "native_matrices_done", 0)),
                                      "status": native_status(build=False)["thin"]}
        return extra | {
            "out": str(self.out), "mode": self.mode, "optim": self.cfg.optimizer.name, "steps": st.step,
            "tokens": st.tokens,
            "train_loss": sum(st.recent_losses) / len(st.recent_losses) if st.recent_losses else None,
            "val_loss": lv.get("loss"), "val_ppl": lv.get("ppl"),
            "best_val_loss": best, "best_val_ppl": best_ppl, "best_step": st.best_step,
            "final": final, "runtime_s": round(time.perf_counter() - self.t0, 3),
            "world_size": self.info.world_size, "ortho_per_rank": per_rank,
            "local_bytes_per_rank": dist_mod.all_gather_object(self.local_bytes, self.info),
            "strategy": self.strategy,
            "lora": self.cfg.lora.rank is not None,
            "base_dtype": "nf4" if self.cfg.model.load_in_4bit else self.base_dtype,
            "data_rows_dropped": (getattr(self.splits, "info", None) or {}).get("rows_dropped", 0),
        }

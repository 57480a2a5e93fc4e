"""muonft's optimizer inside a transformers ``Trainer`` (or TRL's ``SFTTrainer``): :class:`MuonTrainerMixin`
and :class:`MuonTrainer`.

Owns only the bridge: ``create_optimizer`` builds muonft's one optimizer object
(:func:`muonft_cli.optim.build_optimizer`, routed as in muonft's own runs: hidden matrices and LoRA A/B to
Muon, embeddings/heads/1-D tensors to the auxiliary AdamW group) from the ``TrainingArguments`` and a
``muon_options`` dict, and leaves everything else — the LR scheduler, gradient accumulation, mixed precision,
clipping, DDP (under a process group each matrix is orthogonalised by one rank and all-gathered, as in muonft's
runs under torchrun, so every rank keeps the same weights and state), ``optimizer.pt`` checkpoints and
``resume_from_checkpoint`` — to the Trainer. FSDP and DeepSpeed shard the matrices Muon must see whole, so
they are refused::

    from muonft_cli.hf import MuonTrainer
    trainer = MuonTrainer(model=model, args=args, train_dataset=ds, optim_name="muon",
                          muon_options={"ns_steps": 5})

    class MySFT(MuonTrainerMixin, SFTTrainer): ...   # the mixin goes first

From ``TrainingArguments``: ``learning_rate`` → ``lr``, ``weight_decay``, ``adam_epsilon`` → ``eps`` and
``(adam_beta1, adam_beta2)`` → the auxiliary AdamW group's betas (``betas`` for ``optim_name="adamw"``);
those keys are therefore refused in ``muon_options``. ``args.optim`` is ignored.

transformers is imported when :class:`MuonTrainer` is first used (the mixin needs none), so importing this
module is cheap; the CLI never imports it.
"""

from __future__ import annotations

from typing import Any

from muonft_cli._common import OPTIMIZER_NAMES

__all__ = ["MuonTrainerMixin", "MuonTrainer", "optimizer_kwargs"]

#: ``muon_options`` keys that come from ``TrainingArguments`` instead (option -> the argument to set).
_FROM_ARGS = {
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "eps": "adam_epsilon",
    "betas": "adam_beta1/adam_beta2",
    "adamw_betas": "adam_beta1/adam_beta2",
}


def _check_options(optim_name: str, muon_options: dict[str, Any]) -> None:
    from muonft_cli.optim.factory import OPTION_DEFAULTS

    if optim_name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optim_name {optim_name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    owned = sorted(set(muon_options) & set(_FROM_ARGS))
    if owned:
        raise TypeError(
            "muon_options sets " + ", ".join(f"{k!r} (set TrainingArguments.{_FROM_ARGS[k]})" for k in owned)
            + ": these come from the TrainingArguments"
        )
    unknown = sorted(set(muon_options) - set(OPTION_DEFAULTS))
    if unknown:
        valid = [k for k in OPTION_DEFAULTS if k not in _FROM_ARGS]
        raise TypeError(
            f"unknown muon_options key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}; "
            f"valid keys: {', '.join(valid)}"
        )


def optimizer_kwargs(args: Any, optim_name: str = "muon", muon_options: dict[str, Any] | None = None) -> dict:
    """The keyword options :func:`~muonft_cli.optim.build_optimizer` gets from ``TrainingArguments`` ``args``
    and ``muon_options`` (checked: unknown keys and keys the arguments own raise ``TypeError``)."""
    options = dict(muon_options or {})
    _check_options(optim_name, options)
    betas = (float(args.adam_beta1), float(args.adam_beta2))
    options.update(
        lr=float(args.learning_rate),
        weight_decay=float(args.weight_decay),
        eps=float(args.adam_epsilon),
    )
    options["betas" if optim_name == "adamw" else "adamw_betas"] = betas
    return options


class MuonTrainerMixin:
    """Put first in the bases of a ``transformers.Trainer`` subclass (``Trainer``, TRL's ``SFTTrainer``, ...)
    to train with muonft's optimizer.

    Args (keywords, beside the Trainer's own):
        optim_name: any muonft optimizer name ("muon", "muon-pe", "adamuon", "normuon", "adamw").
        muon_options: the other keys of muonft's ``optimizer`` config section (``momentum``, ``nesterov``,
            ``scaling``, ``ns_steps``, ``ns_dtype``, ``adamw_lr``, ``lora_a``), checked here, before the
            Trainer sets up.
    """

    def __init__(self, *args: Any, optim_name: str = "muon", muon_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.optim_name = str(optim_name).lower()
        self.muon_options = dict(muon_options or {})
        _check_options(self.optim_name, self.muon_options)
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: Any = None):  # noqa: D102 - transformers' hook
        if getattr(self, "optimizer", None) is None:
            from muonft_cli.optim import build_optimizer

            if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
                raise ValueError(
                    "muonft's Muon orthogonalises whole matrices, and FSDP/DeepSpeed shard them: train with "
                    "DDP (accelerate launch / torchrun without an FSDP or DeepSpeed config) or without MuonTrainer"
                )

            opt_model = self.model if model is None else model
            self.optimizer = build_optimizer(
                opt_model, self.optim_name, **optimizer_kwargs(self.args, self.optim_name, self.muon_options)
            )
            hook = getattr(self.optimizer, "set_distributed", None)
            if hook is not None and _ddp_world() > 1:
                hook()  # as muonft's own runs under torchrun: each matrix orthogonalised on one rank, all-gathered
        return self.optimizer


def _ddp_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def __getattr__(name: str) -> Any:
    """``MuonTrainer`` (``MuonTrainerMixin`` + ``transformers.Trainer``), built on first access so that
    importing this module does not import transformers."""
    if name == "MuonTrainer":
        from transformers import Trainer

        cls = type("MuonTrainer", (MuonTrainerMixin, Trainer), {
            "__module__": __name__,
            "__doc__": "``transformers.Trainer`` that trains with muonft's optimizer (see MuonTrainerMixin).",
        })
        globals()["MuonTrainer"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

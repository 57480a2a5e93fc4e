"""`--optim auto`: choose the fine-tuning optimizer (and, without `--lr`, its learning rate) from how the base
was pretrained.

Owns `choose` (the decision, from diagnose's provenance and spectral verdict: one streamed read of the base with
`muonft_cli.diagnose.analyse`, no model load) and `resolve_config` (a run config with ``optimizer.name: auto``
turned into a concrete one, plus the decision to record), and `resolve_mitigations` (``optimizer.trust_norm: auto``
made concrete from the same provenance). Rule (paper §5):

- full fine-tuning → the matched optimizer: Adam-pretrained → ``adamw``, Muon-pretrained → ``muon``;
- LoRA → ``muon`` (matches or beats LoRA-Adam at moderate rank with half the optimizer state);
- pretraining unknown, full fine-tuning → ``adamw`` with a warning that LoRA would be the robust choice.

Learning rate, when none was given (``optimizer.lr`` None after `muonft_cli.config.resolve`): the geometric middle
of `muonft_cli.diagnose.verdict.lr_range` for that method, optimizer family and base size. Nothing here prints.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from muonft_cli._common import AUTO_OPTIMIZER as AUTO

__all__ = ["AUTO", "choose", "resolve_config", "resolve_mitigations"]


def _read_base(model: str) -> dict[str, Any]:
    """Provenance, spectral verdict and size of ``model`` (diagnose's report), or names-only provenance for a
    hub id that is not on disk (known model families)."""
    from muonft_cli.diagnose import verdict as V

    p = Path(str(model)).expanduser()
    if str(model).startswith("builtin:"):
        from muonft_cli.models.source import builtin_model_path

        p = builtin_model_path(str(model)[len("builtin:"):])
    if p.exists():
        from muonft_cli.diagnose.analyse import diagnose

        return diagnose(p, target_optim="adamw")
    prov = V.read_provenance({"config.json": {"_name_or_path": str(model)}}, str(model))
    return {"provenance": prov, "optimizer_guess": "unknown", "confidence": None, "n_params": None,
            "unknown_reason": "the base is not on disk (a hub id): only its name was checked"}


def _family(rep: dict[str, Any]) -> tuple[str | None, str, float | None, str]:
    """(pretraining family or None, where it came from, confidence, the reason in words) of a base's report."""
    prov = rep["provenance"]
    if prov.get("family"):
        return prov["family"], prov["source"], 1.0, f"{prov['source']} says {prov['optimizer']}"
    if rep.get("optimizer_guess") in ("adam", "muon"):
        fam, conf = rep["optimizer_guess"], rep["confidence"]
        return fam, "spectral", conf, f"the spectra look {fam}-pretrained (confidence {conf:.2f})"
    why = rep.get("unknown_reason") or "no provenance, no spectral signal"
    return None, "unknown", None, f"pretraining unknown ({why})"


def resolve_mitigations(cfg: Any, mode: str) -> tuple[Any, dict[str, Any] | None]:
    """``cfg`` with ``optimizer.trust_norm: auto`` made concrete for a trust region (``trust_radius`` set):
    ``spectral`` for a Muon-pretrained base, ``max`` for an Adam-pretrained one (the norm its implicit bias keeps
    small, paper §3.1), and the decision ``{trust_norm, source, reason}``; unchanged with None otherwise.
    Raises `UserInputError` when the pretraining optimizer is unknown, for a pretrain run, or for
    ``update_rank`` beside a resolved optimizer that is not Muon."""
    from muonft_cli.errors import UserInputError

    opt = cfg.optimizer
    if opt.update_rank is not None and opt.name not in ("muon", "muon-pe"):
        raise UserInputError(f"optimizer.update_rank limits Muon's update, but the optimizer is {opt.name}: unset "
                             "update_rank or pass --optim muon")
    if opt.trust_radius is None or opt.trust_norm != "auto":
        return cfg, None
    if mode != "finetune" or not cfg.model.name_or_path:
        raise UserInputError("optimizer.trust_norm auto follows the base's pretraining optimizer, so it is for "
                             "finetune: set optimizer.trust_norm=spectral or max")
    family, source, _, said = _family(_read_base(cfg.model.name_or_path))
    if family is None:
        raise UserInputError(f"optimizer.trust_norm auto: {said}; set optimizer.trust_norm=spectral (a "
                             "Muon-pretrained base) or max (an Adam-pretrained one)")
    norm = "spectral" if family == "muon" else "max"
    return (dataclasses.replace(cfg, optimizer=dataclasses.replace(opt, trust_norm=norm)),
            {"trust_norm": norm, "source": source, "reason": f"{said}: the {norm} norm"})


def choose(model: str, *, lora: bool, lr: float | None = None) -> dict[str, Any]:
    """Decide the optimizer for fine-tuning ``model`` (full, or LoRA when ``lora``).

    Returns:
        ``{requested: "auto", chosen, source, reason, confidence, pretrain_family, lr, lr_source, warning}``:
        ``source`` is where the pretraining optimizer came from (``muonft.json``, ``training_args.json``,
        ``known family``, ``spectral`` or ``unknown``); ``confidence`` 1.0 for provenance, the verdict's for
        spectra, None when unknown; ``lr`` the given one or the middle of the recommended range; ``warning``
        a line for the unknown full-fine-tuning case, else None.
    """
    from muonft_cli.diagnose import verdict as V

    rep = _read_base(model)
    family, source, conf, said = _family(rep)
    warning = None
    if lora:
        chosen = "muon"
        why = "LoRA: Muon matches or beats LoRA-Adam at moderate rank with half the optimizer state (paper §5)"
    elif family is None:
        chosen = "adamw"
        why = "full fine-tuning of an unknown base: adamw, the usual pretraining optimizer"
        warning = ("the pretraining optimizer is unknown: LoRA (--lora-rank 16) would be the robust choice under "
                   "a possible mismatch (paper Table 1)")
    else:
        chosen = "adamw" if family == "adam" else "muon"
        why = f"full fine-tuning: the matched optimizer for a {family}-pretrained base (paper Table 1)"
    lr_source = "given"
    if lr is None:
        lo, hi = V.lr_range("lora" if lora else "full", "adam" if chosen == "adamw" else "muon", rep.get("n_params"))
        lr = float(f"{math.sqrt(lo * hi):.1g}")
        lr_source = f"middle of diagnose's range {lo:g}–{hi:g}"
    return {"requested": AUTO, "chosen": chosen, "source": source, "reason": f"{said}; {why}",
            "confidence": None if conf is None else round(float(conf), 4), "pretrain_family": family,
            "lr": lr, "lr_source": lr_source, "warning": warning}


def resolve_config(cfg: Any, mode: str) -> tuple[Any, dict[str, Any] | None]:
    """``cfg`` with ``optimizer.name: auto`` made concrete (and its lr, when None), and the decision; a config
    that names an optimizer comes back unchanged with None. Raises `UserInputError` for ``auto`` in pretrain."""
    from muonft_cli.errors import UserInputError

    if cfg.optimizer.name != AUTO:
        return cfg, None
    if mode != "finetune":
        raise UserInputError("--optim auto decides from how the base was pretrained, so it is for finetune: pass "
                             "--optim adamw or muon to pretrain")
    if not cfg.model.name_or_path:
        raise UserInputError("--optim auto needs the base model: pass --model PATH")
    choice = choose(cfg.model.name_or_path, lora=cfg.lora.rank is not None, lr=cfg.optimizer.lr)
    opt = dataclasses.replace(cfg.optimizer, name=choice["chosen"], lr=choice["lr"])
    return dataclasses.replace(cfg, optimizer=opt), choice

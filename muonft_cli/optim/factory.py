"""``build_optimizer``: one ``torch.optim.Optimizer`` for a whole model, from an optimizer config or keywords.

Two call forms, one code path: ``build_optimizer(model, cfg)`` (muonft's runs: ``cfg`` is the config's
``optimizer`` section) and ``build_optimizer(model, "muon", lr=2e-4, **options)`` for other people's
training loops, where the keywords are exactly the optimizer section's keys (:data:`OPTION_DEFAULTS`).

Routes parameters with :func:`~.routing.split_params` and returns a single optimizer whose param groups
carry ``kind="muon"|"adamw"`` (so LR schedulers, checkpoints and HF ``Trainer(optimizers=(opt, sched))``
see one object).  Hyper-parameters follow the Muon papers: plain ``adamw`` uses betas
(0.9, 0.999); Muon's auxiliary AdamW group uses (0.9, 0.95) and its own lr — equal to Muon's lr under
``match_rms_adamw`` scaling ("Muon is Scalable for LLM Training": the RMS match makes AdamW's lr
transfer), required explicitly otherwise (:func:`muonft_cli._common.adamw_lr_problem`, the rule the config
loader checks too).  Weight decay applies to ≥2-D tensors only (never to norms, biases or DoRA magnitudes).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from muonft_cli._common import OPTIMIZER_NAMES, adamw_lr_problem

from .constraints import TRUST_NORMS, ConstraintSpec, attach
from .muon import AdaMuon, Muon, NorMuon
from .routing import ParamSplit, split_params

__all__ = ["OPTIMIZER_NAMES", "OPTION_DEFAULTS", "build_optimizer", "optimizer_state_bytes"]

#: The keyword form's options and their defaults: the keys of the config's ``optimizer`` section (less
#: ``name``) with the same defaults (``muonft_cli.config.OptimizerConfig``; a test keeps the two in step).
OPTION_DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "weight_decay": 0.0,
    "momentum": 0.95,
    "nesterov": True,
    "betas": (0.9, 0.999),
    "eps": 1e-8,
    "scaling": "match_rms_adamw",
    "ns_steps": 5,
    "ns_dtype": "auto",
    "adamw_lr": None,
    "adamw_betas": (0.9, 0.95),
    "lora_a": "muon",
    "anchor_decay": 0.0,
    "trust_radius": None,
    "trust_norm": "auto",
    "update_rank": None,
}


def _opt(cfg: Any, name: str, default: Any) -> Any:
    value = getattr(cfg, name, default)
    return default if value is None and default is not None else value


def build_optimizer(model: nn.Module, cfg: Any, **options: Any) -> torch.optim.Optimizer:
    """Build the optimizer named by ``cfg.name`` (or by ``cfg`` itself, a string) over all trainable
    parameters of ``model``.

    Args:
        model: the (possibly peft-wrapped) model.
        cfg: an optimizer name (keyword form: ``build_optimizer(model, "muon", lr=2e-4, weight_decay=0.0,
            **options)``, each option a key of :data:`OPTION_DEFAULTS`, unset ones at those defaults) or any
            object with attributes ``name`` ("adamw" | "muon" | "muon-pe" | "adamuon" |
            "normuon"), ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``betas`` (plain AdamW),
            ``eps``, ``scaling`` ("match_rms_adamw" | "original" | "none"), ``ns_steps``, ``ns_dtype``
            ("auto" | "bf16" | "fp32"), ``adamw_lr`` (None = lr under match_rms_adamw), ``adamw_betas``
            (Muon's auxiliary group), ``lora_a`` ("muon" | "adamw") and the mismatch mitigations
            (:mod:`.constraints`, all off by default): ``anchor_decay`` (λ_a of ``W ← W − η·λ_a·(W − W₀)``),
            ``trust_radius`` (ρ of ``‖W − W₀‖ ≤ ρ·‖W₀‖``, None = off) in ``trust_norm`` ("spectral" |
            "max"; "auto" must be resolved from the base first, as ``muonft finetune`` does) and
            ``update_rank`` (Muon / Muon-PE: the top-k directions of each update, None = full).  ``muon-pe`` is Muon with Polar
            Express coefficients; ``adamuon`` follows "AdaMuon: Adaptive Muon Optimizer" (Si et al.),
            Algorithm 1 (no Nesterov, so
            ``nesterov`` is not used by it).

    Returns:
        ``torch.optim.AdamW`` (for "adamw") or a :class:`~.muon.Muon`/:class:`~.muon.AdaMuon`/
        :class:`~.muon.NorMuon`; every param group has ``kind``; ``opt.param_split`` keeps the routing;
        with a mitigation on, ``opt.constraints`` (:class:`~.constraints.Constraints`) holds its state.

    Raises:
        ValueError: unknown name, ``optimizer.adamw_lr`` missing where it is required, or a mitigation the
            optimizer cannot take (``update_rank`` outside Muon / Muon-PE, ``trust_norm`` "auto" unresolved).
        TypeError: an unknown keyword (the message names the valid ones), or keywords beside a config object.
    """
    if isinstance(cfg, str):
        cfg = _keyword_config(cfg, options)
    elif options:
        raise TypeError(
            "build_optimizer() takes keyword options only with an optimizer name, e.g. "
            f"build_optimizer(model, 'muon', lr=2e-4); got a config object and {', '.join(sorted(options))}"
        )
    name = str(getattr(cfg, "name", "")).lower()
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer.name {name!r}; expected one of {', '.join(OPTIMIZER_NAMES)}")
    lr = float(cfg.lr)
    weight_decay = float(_opt(cfg, "weight_decay", 0.0))
    eps = float(_opt(cfg, "eps", 1e-8))
    spec, update_rank = _mitigations(cfg, name)
    split = split_params(model, lora_a=_opt(cfg, "lora_a", "muon") if name != "adamw" else "muon")
    fused = _all_cuda(split)

    if name == "adamw":
        betas = tuple(_opt(cfg, "betas", (0.9, 0.999)))
        params = [r.param for r in split]
        groups = _adamw_groups(params, weight_decay, lr)
        opt = torch.optim.AdamW(
            groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
            foreach=None if fused else True, fused=True if fused else None,
        )
        opt.param_split = split  # type: ignore[attr-defined]
        return _constrained(opt, spec, split)

    scaling = _opt(cfg, "scaling", "match_rms_adamw")
    adamw_lr = getattr(cfg, "adamw_lr", None)
    problem = adamw_lr_problem(name, scaling, adamw_lr)
    if problem:
        raise ValueError(problem)
    if adamw_lr is None:
        adamw_lr = lr
    groups: list[dict[str, Any]] = []
    plain = [r.param for r in split.muon if not r.transposed]
    conv1d = [r.param for r in split.muon if r.transposed]
    if plain:
        groups.append({"params": plain, "kind": "muon"})
    if conv1d:
        groups.append({"params": conv1d, "kind": "muon", "transposed": True})
    groups += _adamw_groups([r.param for r in split.adamw], weight_decay, float(adamw_lr))
    common = dict(
        lr=lr,
        momentum=float(_opt(cfg, "momentum", 0.95)),
        weight_decay=weight_decay,
        ns_steps=int(_opt(cfg, "ns_steps", 5)),
        ns_dtype=_opt(cfg, "ns_dtype", "auto"),
        adamw_betas=tuple(_opt(cfg, "adamw_betas", (0.9, 0.95))),
        adamw_eps=eps,
    )
    nesterov = bool(_opt(cfg, "nesterov", True))
    if name in ("muon", "muon-pe"):
        method = "polar_express" if name == "muon-pe" else "jordan"
        opt = Muon(groups, nesterov=nesterov, scaling=scaling, ns_method=method, update_rank=update_rank, **common)
    elif name == "adamuon":
        opt = AdaMuon(groups, nesterov=False, eps=eps, scaling=scaling, **common)
    else:
        opt = NorMuon(groups, nesterov=nesterov, scaling=scaling, **common)
    opt.param_split = split  # type: ignore[attr-defined]
    return _constrained(opt, spec, split)


def _mitigations(cfg: Any, name: str) -> tuple[ConstraintSpec, int | None]:
    """The mismatch mitigations of ``cfg`` (:mod:`.constraints`), checked against optimizer ``name``."""
    rank = getattr(cfg, "update_rank", None)
    if rank is not None and name not in ("muon", "muon-pe"):
        raise ValueError(f"optimizer.update_rank limits the rank of Muon's orthogonalised update: it needs "
                         f"optimizer.name muon or muon-pe, not {name}")
    radius = getattr(cfg, "trust_radius", None)
    norm = _opt(cfg, "trust_norm", "auto")
    if radius is not None and norm not in TRUST_NORMS:
        raise ValueError(f"optimizer.trust_norm {norm!r}: build_optimizer takes {' or '.join(TRUST_NORMS)} ('auto' "
                         "is resolved from the base's pretraining optimizer by `muonft finetune`)")
    spec = ConstraintSpec(anchor_decay=float(_opt(cfg, "anchor_decay", 0.0)),
                          trust_radius=None if radius is None else float(radius),
                          trust_norm=norm if norm in TRUST_NORMS else "spectral")
    return spec, None if rank is None else int(rank)


def _constrained(opt: torch.optim.Optimizer, spec: ConstraintSpec, split: ParamSplit) -> torch.optim.Optimizer:
    """``opt`` with the constraints of ``spec`` attached when any is on (else untouched)."""
    if spec.active:
        attach(opt, spec, [r.param for r in split.muon])
    return opt


def _keyword_config(name: str, options: dict[str, Any]) -> SimpleNamespace:
    """The keyword form's options as a config-like object, unknown keywords refused by name."""
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
        raise TypeError(
            f"build_optimizer() got unknown keyword argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(k) for k in unknown)}; valid options: {', '.join(OPTION_DEFAULTS)}"
        )
    values = {**OPTION_DEFAULTS, **options}
    if values["lora_a"] not in ("muon", "adamw"):
        raise ValueError(f"lora_a must be 'muon' or 'adamw', got {values['lora_a']!r}")
    if values["trust_norm"] not in TRUST_NORMS + ("auto",):
        raise ValueError(f"trust_norm must be one of {', '.join(TRUST_NORMS)}, got {values['trust_norm']!r}")
    return SimpleNamespace(name=name, **values)


def _adamw_groups(params: list[torch.Tensor], weight_decay: float, lr: float) -> list[dict[str, Any]]:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "kind": "adamw", "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "kind": "adamw", "lr": lr, "weight_decay": 0.0})
    return groups


def _all_cuda(split: ParamSplit) -> bool:
    return all(r.param.device.type == "cuda" for r in split)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (momenta, second moments, step counters, and the anchors of
    a mismatch mitigation)."""
    cons = getattr(opt, "constraints", None)
    total = cons.bytes() if cons is not None else 0
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
    return total

"""LoRA: attaching a stock peft LoRA to a model, and reading peft's names and settings back.

Owns `apply_lora` (paper §2.2: W = W₀ + α̃·B·A with α̃ = α/r, or α/√r for rsLoRA; variants lora | rslora | dora |
pissa | olora; every linear layer but the embeddings and the LM head by default; the rank checked against each
target first), the PiSSA/OLoRA initial-adapter snapshot `save_model` converts against, `plain_name` (the one
helper that turns a peft parameter or module name into the plain model's name) and `lora_scale` (an adapter
module's α̃, with peft's own `rank_pattern` / `alpha_pattern` lookup), and `keep_adapter_inputs_in_base_dtype`
(on CPU, a half-precision base's LoRA branch keeps its bf16/fp16 input for the backward pass, not an fp32 copy).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from muonft_cli._common import plain_name  # noqa: F401  (re-exported: its home is _common, torch-free)
from muonft_cli.errors import UserInputError

# ------------------------------------------------------------------------------------------ peft names


def lora_scale(adapter_config: dict, module: str) -> float:
    """α̃ of one LoRA module of a saved adapter: α/r, or α/√r with rsLoRA (`use_rslora`).

    r and α are the adapter's `r` / `lora_alpha`, overridden per module by its `rank_pattern` / `alpha_pattern`
    with peft's own lookup (`peft.utils.other.get_pattern_key`, the one peft uses when it builds the layers).

    Args:
        adapter_config: the adapter's `adapter_config.json`, as a dict.
        module: the module's name, with or without peft's ``base_model.model.`` prefix.
    """
    from peft.utils.other import get_pattern_key

    key = plain_name(module)
    r = adapter_config.get("r", 8)
    alpha = adapter_config.get("lora_alpha", r)
    ranks = adapter_config.get("rank_pattern") or {}
    alphas = adapter_config.get("alpha_pattern") or {}
    r = ranks.get(get_pattern_key(ranks.keys(), key), r)
    alpha = alphas.get(get_pattern_key(alphas.keys(), key), alpha)
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


# --------------------------------------------------------------------------------------------- attaching


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def default_lora_targets(model: torch.nn.Module) -> list[str]:
    """peft `target_modules` for "every linear layer except embeddings and the LM head" (paper §2.2).

    Returns the sorted set of module-name suffixes (`q_proj`, … or GPT-2's `c_attn`, `c_proj`, `c_fc`) of every
    `nn.Linear` / GPT-2 `Conv1D`, excluding the output embedding; full module names if a suffix is shared
    with the LM head.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names, excluded = [], []
    for name, module in model.named_modules():
        if not _is_linear(module):
            continue
        (excluded if module is head else names).append(name)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    if any(e.rsplit(".", 1)[-1] in suffixes for e in excluded):
        return sorted(names)
    return suffixes


def _matches(name: str, target: str) -> bool:
    """Whether module `name` is targeted by `target`: peft's rule for a list of `target_modules` names (the
    whole name, or its tail after a dot)."""
    return name == target or name.endswith("." + target)


def _check_targets(model: torch.nn.Module, targets: list[str], rank: int) -> None:
    modules = dict(model.named_modules())
    hits = {t: [n for n in modules if _matches(n, t)] for t in targets}
    missing = [t for t, ns in hits.items() if not ns]
    if missing:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_linear(m)})
        raise UserInputError(f"--lora-targets {', '.join(missing)} match no module of this model: choose from "
                             f"{', '.join(known)}")
    for t, ns in hits.items():
        for n in ns:
            w = getattr(modules[n], "weight", None)
            if w is None or w.ndim != 2:
                raise UserInputError(f"LoRA target '{n}' is not a linear layer: choose linear modules")
            side = min(w.shape)
            if rank > side:
                raise UserInputError(f"--lora-rank {rank} is larger than the smaller side of '{n}' "
                                     f"({w.shape[0]} x {w.shape[1]}): use --lora-rank {side} or less")


def apply_lora(model: torch.nn.Module, lora_cfg: Any):
    """Wrap `model` in a stock peft LoRA (`peft.get_peft_model`), after checking the rank and targets.

    α defaults to 2·r; scaling α/r (α/√r for rsLoRA). Variants: "lora"; "rslora" (`use_rslora`); "dora"
    (`use_dora`); "pissa" / "olora" (`init_lora_weights`, which also rewrite the base weights to W − B₀A₀). For
    PiSSA/OLoRA the initial adapter is snapshot on the returned model so `save_model` can convert the trained
    adapter to a plain LoRA on the original base. The init is deterministic given the base weights, so a
    resumed run that calls `apply_lora` on the same base gets the same snapshot.

    Args:
        model: a causal LM (fp32).
        lora_cfg: `config.LoraConfig` (rank, alpha, dropout, targets, variant).

    Returns:
        The `peft.PeftModel` (LoRA A/B and DoRA magnitudes trainable, everything else frozen).
    """
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    rank = lora_cfg.rank
    if rank is None or rank < 1:
        raise UserInputError("LoRA needs --lora-rank >= 1 (omit it for full fine-tuning)")
    if hasattr(model, "peft_config"):
        raise UserInputError("--model is already a LoRA adapter: omit --lora-rank to continue training it, or "
                             "train a new adapter on its merged model (saved with --merge in merged/)")
    variant = getattr(lora_cfg, "variant", "lora") or "lora"
    if variant not in ("lora", "rslora", "dora", "pissa", "olora"):
        raise UserInputError(f"unknown --lora-variant '{variant}': use lora, rslora, dora, pissa or olora")
    targets = list(lora_cfg.targets) if lora_cfg.targets else default_lora_targets(model)
    _check_targets(model, targets, rank)
    alpha = float(lora_cfg.alpha) if lora_cfg.alpha is not None else 2.0 * rank
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                         if any(_matches(n, t) for t in targets))
    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=float(lora_cfg.dropout or 0.0),
        target_modules=targets, bias="none", fan_in_fan_out=fan_in_fan_out,
        use_rslora=variant == "rslora", use_dora=variant == "dora",
        init_lora_weights=variant if variant in ("pissa", "olora") else True,
    )
    with warnings.catch_warnings():  # "PiSSA/OLoRA changes the base weights": save_model converts them
        warnings.filterwarnings("ignore", message=r".*changes the base weights of the model.*")
        peft_model = get_peft_model(model, config)
    peft_model._muonft_lora = {"variant": variant, "rank": rank, "alpha": alpha,
                               "dropout": float(lora_cfg.dropout or 0.0), "targets": targets}
    if variant in ("pissa", "olora"):
        peft_model._muonft_initial_adapter = {
            k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(peft_model).items()}
    return peft_model


def initial_adapter_state(model: Any) -> dict[str, torch.Tensor] | None:
    """The PiSSA/OLoRA initial adapter snapshot `apply_lora` stored (None for other variants)."""
    return getattr(model, "_muonft_initial_adapter", None)


# ------------------------------------------------------------------------ half-precision bases on CPU


class _UpcastLinear(torch.autograd.Function):
    """``y = x·Wᵀ (+ b)`` computed in W's dtype from a lower-precision x, keeping x itself — not its upcast
    copy — for the backward pass (which upcasts it again): the same values as ``F.linear(x.to(W.dtype), W, b)``
    for half the saved bytes, none when x is saved anyway."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ weight).to(x.dtype)
        if ctx.needs_input_grad[1]:
            gw = gy.reshape(-1, gy.shape[-1]).mT @ x.reshape(-1, x.shape[-1]).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0)
        return gx, gw, gb


class _UpcastInputLinear(torch.nn.Linear):
    """A LoRA A matrix (`torch.nn.Linear`, fp32) fed the base's half-precision activations directly
    (`_UpcastLinear`); its parameters, state_dict and peft names are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return super().forward(x)
        return _UpcastLinear.apply(x, self.weight, self.bias)


def keep_adapter_inputs_in_base_dtype(model: torch.nn.Module) -> int:
    """On CPU, where no autocast runs, peft upcasts a half-precision base's activations to fp32 before every
    LoRA branch and autograd keeps that fp32 copy (one per adapted layer: q, k and v each make their own) for
    A's gradient — ~60 % of the stored activations of a bf16-base LoRA step. This hands each vanilla LoRA
    layer's A matrix the bf16/fp16 input itself (peft's own switch `cast_input_dtype_enabled = False`) and
    upcasts inside A's product (`_UpcastLinear`): the same forward values and gradients (tested equal to
    peft's path), the copy never kept. Layers with a variant (DoRA), LoRA dropout or a non-Linear base are left
    to peft.

    Returns:
        How many LoRA layers were changed.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or getattr(module, "lora_variant", None):
            continue
        adapters = list(module.lora_A.keys())
        if not adapters or not all(type(module.lora_A[a]) in (torch.nn.Linear, _UpcastInputLinear)
                                   and isinstance(module.lora_dropout[a], torch.nn.Identity) for a in adapters):
            continue
        for a in adapters:
            module.lora_A[a].__class__ = _UpcastInputLinear
        module.cast_input_dtype_enabled = False
        n += 1
    return n

"""Parameter routing: which trainable tensor Muon updates and which AdamW updates, and why.

Muon is for hidden matrices only (Jordan 2024; Moonlight; paper §2.1 and App. B): embeddings, the LM
head (tied or not), task heads and every 1-D tensor (norms, biases, DoRA magnitudes) go to AdamW.
Under LoRA all adapter matrices (A and B) use Muon (paper §2.2, "LoRA-Muon"), optionally B only.

:func:`split_params` is one pure function that accounts for every trainable parameter exactly once,
records the reason, and raises if anything is left unrouted or routed twice.  It recognises modules by
type/name only (``nn.Embedding``, GPT-2's ``Conv1D`` by class name, peft's ``lora_A``/``lora_B``/
``lora_magnitude_vector``/``lora_embedding_*`` names), so it needs neither transformers nor peft.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Route", "ParamSplit", "split_params", "HEAD_NAMES"]

HEAD_NAMES = frozenset({"lm_head", "classifier", "classification_head", "score", "qa_outputs", "embed_out"})
"""Module names treated as output heads (AdamW), wherever they appear in the module path."""

_LORA_A = "lora_A"
_LORA_B = "lora_B"


@dataclass(frozen=True)
class Route:
    """Where one trainable parameter goes.

    Attributes:
        name: qualified parameter name (the first alias ``named_parameters`` reports).
        param: the parameter.
        kind: ``"muon"`` or ``"adamw"``.
        reason: human-readable reason (e.g. ``"hidden matrix"``, ``"embedding"``, ``"LoRA B"``).
        transposed: stored as (in, out) — GPT-2 ``Conv1D`` — so shape-based scalings must transpose.
    """

    name: str
    param: nn.Parameter = field(repr=False, compare=False)
    kind: str
    reason: str
    transposed: bool = False


@dataclass
class ParamSplit:
    """The result of :func:`split_params`: one :class:`Route` per trainable parameter."""

    routes: list[Route]

    @property
    def muon(self) -> list[Route]:
        """Routes with ``kind == "muon"``."""
        return [r for r in self.routes if r.kind == "muon"]

    @property
    def adamw(self) -> list[Route]:
        """Routes with ``kind == "adamw"``."""
        return [r for r in self.routes if r.kind == "adamw"]

    def counts(self) -> dict[str, int]:
        """Number of parameters per ``"kind: reason"``."""
        return dict(Counter(f"{r.kind}: {r.reason}" for r in self.routes))

    def numel(self) -> dict[str, int]:
        """Number of scalar parameters per kind."""
        out = {"muon": 0, "adamw": 0}
        for r in self.routes:
            out[r.kind] += r.param.numel()
        return out

    def __iter__(self) -> Iterator[Route]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)


def _output_modules(model: nn.Module) -> set[int]:
    """ids of the model's output-embedding modules (HF ``get_output_embeddings``), peft-aware."""
    found: set[int] = set()
    candidates = [model]
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        try:
            candidates.append(get_base())
        except (AttributeError, TypeError):
            pass
    for m in candidates:
        fn = getattr(m, "get_output_embeddings", None)
        if callable(fn):
            try:
                out = fn()
            except (AttributeError, NotImplementedError, TypeError):
                out = None
            if isinstance(out, nn.Module):
                found.add(id(out))
                base = getattr(out, "base_layer", None)  # peft-wrapped head
                if isinstance(base, nn.Module):
                    found.add(id(base))
    return found


def _classify(
    aliases: list[tuple[str, nn.Module]], p: torch.Tensor, output_ids: set[int], lora_a: str
) -> tuple[str, str, bool]:
    """(kind, reason, transposed) for a parameter seen under ``aliases`` = [(qualified name, owner)]."""
    parts = {part for name, _ in aliases for part in name.split(".")}
    if _LORA_A in parts:
        return (lora_a, "LoRA A" if lora_a == "muon" else "LoRA A (lora_a=adamw)", False)
    if _LORA_B in parts:
        return ("muon", "LoRA B", False)
    if parts & {"lora_embedding_A", "lora_embedding_B"}:
        return ("adamw", "LoRA on an embedding", False)
    if "lora_magnitude_vector" in parts:
        return ("adamw", "DoRA magnitude (1-D)", False)
    owners = [m for _, m in aliases]
    if any(isinstance(m, nn.Embedding) for m in owners):
        return ("adamw", "embedding", False)
    if any(id(m) in output_ids for m in owners) or parts & HEAD_NAMES:
        return ("adamw", "output head", False)
    if p.ndim < 2:
        return ("adamw", "1-D (norm/bias)", False)
    transposed = any(type(m).__name__ == "Conv1D" and hasattr(m, "nf") for m in owners)
    return ("muon", "hidden matrix (Conv1D, stored in×out)" if transposed else "hidden matrix", transposed)


def split_params(model: nn.Module, lora_a: str = "muon") -> ParamSplit:
    """Route every trainable parameter of ``model`` to Muon or AdamW, exactly once, with a reason.

    Rules, first match wins: peft ``lora_A`` → Muon (or AdamW with ``lora_a="adamw"``: B-only Muon);
    ``lora_B`` → Muon; LoRA on embeddings → AdamW; DoRA magnitudes → AdamW; anything owned by an
    ``nn.Embedding`` (token/position embeddings, T5 ``shared``, relative-attention biases) → AdamW;
    the output embedding / a module named ``lm_head``, ``classifier``, ``score``, ``qa_outputs`` (tied
    or not) → AdamW; other tensors with < 2 dims → AdamW; remaining ≥2-D tensors (Linear, GPT-2
    ``Conv1D`` — flagged ``transposed`` — and conv kernels) → Muon.  Tied parameters are classified
    from all their aliases (an LM head tied to the embedding is one AdamW parameter).

    Args:
        model: any ``nn.Module`` (HF model or peft model).
        lora_a: ``"muon"`` (paper default) or ``"adamw"``.

    Returns:
        A :class:`ParamSplit`; ``split.muon`` / ``split.adamw`` list the routes.

    Raises:
        ValueError: bad ``lora_a``, no trainable parameters, or a parameter unrouted / routed twice.
    """
    if lora_a not in ("muon", "adamw"):
        raise ValueError(f"lora_a must be 'muon' or 'adamw', got {lora_a!r}")
    aliases: dict[int, list[tuple[str, nn.Module]]] = {}
    params: dict[int, torch.Tensor] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            qual = f"{mod_name}.{p_name}" if mod_name else p_name
            aliases.setdefault(id(p), []).append((qual, module))
            params[id(p)] = p
    output_ids = _output_modules(model)
    routes: list[Route] = []
    for name, p in model.named_parameters():  # deduplicated, stable order
        if not p.requires_grad:
            continue
        kind, reason, transposed = _classify(aliases.get(id(p), [(name, model)]), p, output_ids, lora_a)
        routes.append(Route(name=name, param=p, kind=kind, reason=reason, transposed=transposed))
    _validate(model, routes)
    return ParamSplit(routes)


def _validate(model: nn.Module, routes: list[Route]) -> None:
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    seen = Counter(id(r.param) for r in routes)
    problems = []
    unrouted = [n for i, n in trainable.items() if i not in seen]
    if unrouted:
        problems.append(f"unrouted: {', '.join(unrouted[:5])}{' ...' if len(unrouted) > 5 else ''}")
    twice = [r.name for r in routes if seen[id(r.param)] > 1]
    if twice:
        problems.append(f"routed more than once: {', '.join(sorted(set(twice))[:5])}")
    bad = [r.name for r in routes if r.kind not in ("muon", "adamw") or id(r.param) not in trainable]
    if bad:
        problems.append(f"routed but not trainable or bad kind: {', '.join(bad[:5])}")
    muon_1d = [r.name for r in routes if r.kind == "muon" and r.param.ndim < 2]
    if muon_1d:
        problems.append(f"1-D tensors routed to Muon: {', '.join(muon_1d[:5])}")
    if problems:
        raise ValueError("parameter routing failed: " + "; ".join(problems))

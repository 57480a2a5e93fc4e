"""Evaluation: token-weighted loss / perplexity, and the `muonft eval` report.

Owns
- `evaluate_loss`: mean next-token negative log-likelihood over every target token (labels != -100, after the
  causal shift), summed over tokens and divided by their count, so the number does not depend on the batch size
  or on how many tokens each sequence masks. Perplexity = exp(loss). The training loop uses it for validation.
- `run_eval`: what `muonft eval` reports — perplexity of a model (or base + adapter) on a dataset, forgetting
  on a reference dataset (model vs `--base`), weight distance from the base (paper Table 17: L2 ‖W − W₀‖ and
  cosine distance 1 − cos(W, W₀) per matrix and in total; on merged weights for an adapter), and LoRA spectra
  (paper App. F.2: stable rank and SVD entropy of each A, B and B·A, averaged per layer type; the metrics come
  from `muonft_cli.spectral`, the one implementation of the definitions in `docs/formulas.md`), and
  lm-evaluation-harness task metrics (`--tasks`, through `muonft_cli.lm_eval_bridge`, on the merged model).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from muonft_cli.models.device import autocast, limit_host_allocator_retention
from muonft_cli.models.lora import plain_name
from muonft_cli.train.batching import collate, n_targets, token_nll_sum


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    dataset: Any,
    batch_size: int,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float]:
    """Token-weighted mean next-token NLL of `model` on `dataset`.

    The loss is Σ_tokens −log p(label_t | x_<t) / N over every target token (label != -100 after shifting
    labels one position left, as HF causal LMs do internally), so it is identical for any `batch_size`. The
    per-batch sums come from `muonft_cli.train.batching.token_nll_sum`, the loss training minimises.
    Runs under `torch.no_grad()` in eval mode; the model's previous train/eval mode is restored.

    Args:
        model: a causal LM returning `.logits` of shape [B, T, V] (HF / peft model).
        dataset: map-style dataset of dicts with `input_ids` and `labels` LongTensor[T] (and optionally
            `attention_mask`), e.g. `data.build_splits(...).val`.
        batch_size: sequences per forward pass (>= 1).
        device: where to run; default the model's device.
        max_batches: evaluate only the first `max_batches` batches (None = all).
        autocast_dtype: e.g. `torch.bfloat16` to run the forward pass under autocast (GPU bf16 runs).

    Returns:
        `{"loss": float, "ppl": float, "tokens": int}`; loss/ppl are NaN when there are no target tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = 0
    n = len(dataset)
    try:
        for b, start in enumerate(range(0, n, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            batch = collate(dataset, list(range(start, min(start + batch_size, n))))  # each [B, T]
            kwargs = {"attention_mask": batch["attention_mask"].to(device)} if "attention_mask" in batch else {}
            with autocast(device, autocast_dtype):
                logits = model(input_ids=batch["input_ids"].to(device), **kwargs).logits  # [B, T, V]
            total_nll += token_nll_sum(logits, batch["labels"]).double()
            del logits  # freed before the next batch's forward, not after it
            total_tokens += n_targets(batch["labels"])
    finally:
        model.train(was_training)
    if total_tokens == 0:
        return {"loss": float("nan"), "ppl": float("nan"), "tokens": 0}
    loss = float(total_nll) / total_tokens
    return {"loss": loss, "ppl": _safe_exp(loss), "tokens": total_tokens}


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------------------------- muonft eval


def _matrices(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every 2-D parameter (deduplicated, so tied embeddings count once), by plain-model name, on CPU fp32.

    LoRA-wrapped base weights (`.base_layer.`) are copied, since merging the adapter rewrites them in place;
    the others are views (no copy on CPU).
    """
    return {plain_name(n): p.detach().to("cpu", torch.float32, copy=".base_layer." in n)
            for n, p in model.named_parameters() if p.ndim == 2 and "lora_" not in n}


def _aggregate(rows: list[dict]) -> dict[str, float]:
    """Total L2 = sqrt(Σ‖W−W₀‖²_F); total cosine distance = 1 − Σ⟨W,W₀⟩ / (sqrt(Σ‖W‖²) · sqrt(Σ‖W₀‖²))."""
    d2 = sum(r["_d2"] for r in rows)
    dot = sum(r["_dot"] for r in rows)
    n1 = sum(r["_n1"] for r in rows)
    n0 = sum(r["_n0"] for r in rows)
    cos = dot / math.sqrt(n1 * n0) if n1 > 0 and n0 > 0 else 1.0
    return {"l2": math.sqrt(d2), "cosine": 1.0 - cos, "rel_l2": math.sqrt(d2 / n0) if n0 > 0 else float("nan"),
            "matrices": len(rows)}


def weight_distance(weights: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Distance of fine-tuned weights from the base (paper Table 17), per matrix and in total.

    Per matrix W (base W₀): L2 ‖W − W₀‖_F, cosine distance 1 − ⟨W, W₀⟩/(‖W‖‖W₀‖), and relative L2 ‖W − W₀‖/‖W₀‖.
    Totals treat all matrices as one long vector. "hidden" restricts to the transformer-block matrices
    (`spectral.HIDDEN_TYPES`), "by_type" groups by `spectral.layer_type`. Matrices whose name or shape differ
    between the two are skipped and counted.

    Args:
        weights: name → matrix of the fine-tuned (for an adapter: merged) model.
        base: name → matrix of the base model.
    """
    from muonft_cli.spectral import HIDDEN_TYPES, layer_type

    rows, skipped = [], 0
    for name, w0 in base.items():
        w = weights.get(name)
        if w is None or w.shape != w0.shape:
            skipped += 1
            continue
        w64, b64 = w.double(), w0.double()  # [m, n]
        d2 = float((w64 - b64).pow(2).sum())
        n1, n0, dot = float(w64.pow(2).sum()), float(b64.pow(2).sum()), float((w64 * b64).sum())
        cos = dot / math.sqrt(n1 * n0) if n1 > 0 and n0 > 0 else 1.0
        rows.append({"name": name, "type": layer_type(name), "shape": list(w0.shape), "l2": math.sqrt(d2),
                     "cosine": 1.0 - cos, "rel_l2": math.sqrt(d2 / n0) if n0 > 0 else float("nan"),
                     "_d2": d2, "_dot": dot, "_n1": n1, "_n0": n0})
    by_type: dict[str, dict] = {}
    for t in sorted({r["type"] for r in rows}):
        by_type[t] = _aggregate([r for r in rows if r["type"] == t])
    hidden = [r for r in rows if r["type"] in HIDDEN_TYPES]
    out = {
        "total": _aggregate(rows),
        "hidden": _aggregate(hidden) if hidden else None,
        "by_type": by_type,
        "skipped": skipped,
        "matrices": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    }
    return out


def _ba_singular_values(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """σ(B·A) from the r×r core: B = Q_B R_B, Aᵀ = Q_A R_A ⇒ σ(BA) = σ(R_B R_Aᵀ) (never forms the m×n product)."""
    rb = torch.linalg.qr(B.double(), mode="r").R  # [r, r]  (B: [m, r])
    ra = torch.linalg.qr(A.double().T, mode="r").R  # [r, r]  (A: [r, n])
    return torch.linalg.svdvals(rb @ ra.T)  # [r]


def lora_spectra(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, Any] | None:
    """Stable rank and SVD entropy of every LoRA A, B and B·A, averaged per layer type (paper App. F.2).

    Uses `spectral.stable_rank` / `spectral.svd_entropy` (definitions in `docs/formulas.md`). B·A has rank ≤ r, so its
    entropy is normalised by log r (the rank it can reach), A's and B's by log min(shape) = log r as well.
    Returns None for a model without LoRA layers.
    """
    from muonft_cli.spectral import layer_type, stable_rank, svd_entropy

    rows = []
    for name, module in model.named_modules():
        la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(la, torch.nn.ModuleDict) or adapter_name not in la:
            continue
        A = la[adapter_name].weight.detach().float().cpu()  # [r, n]
        B = lb[adapter_name].weight.detach().float().cpu()  # [m, r]
        r = A.shape[0]
        sv_ba = _ba_singular_values(B, A)
        plain = plain_name(name)
        rows.append({
            "name": plain, "type": layer_type(plain), "rank": r,
            "A": {"stable_rank": stable_rank(A), "svd_entropy": svd_entropy(A)},
            "B": {"stable_rank": stable_rank(B), "svd_entropy": svd_entropy(B)},
            "BA": {"stable_rank": stable_rank(sv_ba), "svd_entropy": svd_entropy(sv_ba, rank=r)},
        })
    if not rows:
        return None

    def mean(rs: list[dict]) -> dict:
        return {part: {m: sum(x[part][m] for x in rs) / len(rs) for m in ("stable_rank", "svd_entropy")}
                for part in ("A", "B", "BA")} | {"n": len(rs)}

    return {
        "rank": rows[0]["rank"],
        "all": mean(rows),
        "by_type": {t: mean([x for x in rows if x["type"] == t]) for t in sorted({x["type"] for x in rows})},
        "matrices": rows,
    }


def _compare(model_res: dict, base_res: dict | None) -> dict:
    out: dict[str, Any] = {"model": model_res, "base": base_res}
    if base_res is not None:
        out["loss_change"] = model_res["loss"] - base_res["loss"]
        out["ppl_change"] = model_res["ppl"] - base_res["ppl"]
        out["ppl_ratio"] = model_res["ppl"] / base_res["ppl"] if base_res["ppl"] else float("nan")
    return out


def _eval_dataset(data_cfg: Any, tokenizer: Any, seed: int, split: str):
    from muonft_cli import data

    splits = data.build_splits(data_cfg, tokenizer, seed, only="train" if split == "train" else "val")
    if split == "train":
        return splits.train, splits.info, "train"
    if splits.val is None:
        return splits.train, splits.info, "all"
    return splits.val, splits.info, "val"


def _check_scored(ds: Any, batch_size: int, max_batches: int | None, what: str, path: str, seq_len: int) -> None:
    """Refuse (exit 2) a set in which the part `evaluate_loss` would read has no target token: its loss would be
    0 tokens' mean (NaN), not a number worth reporting. Checked before any forward pass."""
    from muonft_cli.errors import UserInputError

    n = len(ds) if max_batches is None else min(len(ds), batch_size * max_batches)
    if any(n_targets(ds[i]["labels"][None]) for i in range(n)):
        return
    fix = ("use --seq-len 2 or more (N tokens give N-1 targets)" if seq_len < 2 else
           "use data with target tokens in the first --seq-len tokens, or another split (--split train)")
    raise UserInputError(f"{what} '{path}' gives no tokens to score ({n} sequence(s) of --seq-len {seq_len} with "
                         f"no next-token target): {fix}")


def run_eval(cfg: Any, base: str | None = None, split: str = "val", compare: bool = True,
             tasks: Any = None) -> dict[str, Any]:
    """Everything `muonft eval` reports, as one JSON-ready dict.

    - `data`: perplexity of the model (and of the base, with the change) on `cfg.data.path`, packed into
      `cfg.data.seq_len` sequences, token-weighted (`evaluate_loss`), on the validation split that training used
      (same `--seed` / `--val-fraction` ⇒ the same held-out documents).
    - `forgetting`: the same on `cfg.eval.reference_data` for the model and the base, and the change.
    - `distance`: `weight_distance` of the (merged, for an adapter) weights from the base.
    - `lora_spectra`: `lora_spectra` of an adapter.
    - `tasks` / `lm_eval`: lm-evaluation-harness metrics `{task: {metric: value}}` of the model (an adapter merged
      into its base after the other measurements) and the settings they ran with; None without `tasks`.

    The base is `base` (`--base`), or, for an adapter, the base it records (loaded anyway); comparisons are
    skipped without one. For an adapter the base is evaluated by disabling the adapter (no second copy).
    `compare=False` (`--model-only`) evaluates the model alone: no base numbers, no distance, half the forward
    passes for an adapter (the sweep uses it: the base's numbers are measured once per sweep, not per cell).

    Args:
        cfg: `RunConfig` (model, data, eval sections; train.seed / train.device).
        base: `--base` (model folder, .gguf or hub id).
        split: "val" (default) or "train".
        compare: evaluate the base too (default); False for the model alone.
        tasks: a `lm_eval_bridge.TaskPlan` (from `lm_eval_bridge.prepare`: checked before anything loads), or None.
    """
    from muonft_cli import models
    from muonft_cli._common import set_offline
    from muonft_cli.config import ModelConfig
    from muonft_cli.errors import UserInputError

    if cfg.model.offline:  # --offline: the libraries' own switches, for the model and the data alike
        set_offline()
    if split not in ("val", "train"):
        raise UserInputError(f"--split {split!r}: use val or train")
    ref_path = cfg.eval.reference_data
    if not cfg.data.path and not ref_path and not base and tasks is None:
        raise UserInputError("nothing to evaluate: pass --data (perplexity), --reference-data (forgetting), "
                             "--base (weight distance) and/or --tasks (lm-evaluation-harness)")
    device = models.pick_device(cfg.train.device)
    src = models.resolve_model(cfg.model.name_or_path, cfg.model.offline)
    is_adapter = src.kind == "adapter"
    if not compare and (base or ref_path):
        raise UserInputError("--model-only evaluates the model alone: drop --base / --reference-data (they compare "
                             "with the base), or drop --model-only")
    if ref_path and not base and not is_adapter:
        raise UserInputError("--reference-data measures forgetting against the base model: pass --base PATH")
    base_src = models.resolve_model(base, cfg.model.offline) if base else None
    if base_src is not None and base_src.kind == "adapter":
        raise UserInputError(f"--base '{base}' is an adapter: pass the full base model")
    model, tokenizer = models.load_model(cfg.model, device, base=base if is_adapter else None)
    limit_host_allocator_retention(sum(p.numel() for p in model.parameters()))  # large models only (models.device)
    base_model = None
    if base_src is not None and not is_adapter:
        bcfg = ModelConfig(name_or_path=base, tokenizer=cfg.model.tokenizer, offline=cfg.model.offline,
                           trust_remote_code=cfg.model.trust_remote_code)
        base_model, base_tok = models.load_model(bcfg, device)
        if base_tok.get_vocab() != tokenizer.get_vocab():
            raise UserInputError(f"--base '{base}' uses a different tokenizer than --model: compare models that "
                                 "share a vocabulary (or pass --tokenizer for both)")
    has_base = compare and (is_adapter or base_model is not None)
    ac = models.autocast_dtype(cfg.model, device)
    bs, mb = cfg.eval.batch_size, cfg.eval.max_batches

    def both(ds) -> dict:
        res = evaluate_loss(model, ds, bs, device, mb, autocast_dtype=ac)
        bres = None
        if has_base and is_adapter:
            with model.disable_adapter():
                bres = evaluate_loss(model, ds, bs, device, mb, autocast_dtype=ac)
        elif has_base:
            bres = evaluate_loss(base_model, ds, bs, device, mb, autocast_dtype=ac)
        return _compare(res, bres)

    report: dict[str, Any] = {
        "model": src.path, "model_kind": src.kind,
        "base": (base_src.path if base_src else (models.model_source(model).path  # the base load_model found
                                                   if is_adapter and not base else None)),
        "device": str(device), "seq_len": cfg.data.seq_len, "batch_size": bs, "max_batches": mb,
        "seed": cfg.train.seed, "data": None, "forgetting": None, "distance": None, "lora_spectra": None,
        "tasks": None, "lm_eval": None,
    }
    sets = {}  # both sets are built and checked before any forward pass
    if cfg.data.path:
        sets["data"] = (cfg.data.path, *_eval_dataset(cfg.data, tokenizer, cfg.train.seed, split))
        _check_scored(sets["data"][1], bs, mb, "--data", cfg.data.path, cfg.data.seq_len)
    if ref_path:
        rcfg = copy.deepcopy(cfg.data)
        rcfg.path = ref_path
        sets["forgetting"] = (ref_path, *_eval_dataset(rcfg, tokenizer, cfg.train.seed, split))
        _check_scored(sets["forgetting"][1], bs, mb, "--reference-data", ref_path, cfg.data.seq_len)
    for key, (path, ds, info, used) in sets.items():
        report[key] = {"source": info.get("source", path), "split": used, "sequences": len(ds),
                       "rows_dropped": info.get("rows_dropped", 0), "drop_reasons": info.get("drop_reasons", {}),
                       "rows_read": info.get("rows_read", 0), **both(ds)}
    if is_adapter:
        report["lora_spectra"] = lora_spectra(model)
    merged = None
    if has_base:
        if is_adapter:
            w0 = _matrices(model.get_base_model())  # base_layer weights = W₀ (adapter not merged yet)
            merged = model.merge_and_unload()  # in place; the adapter is not needed any more
            report["distance"] = weight_distance(_matrices(merged), w0)
        else:
            report["distance"] = weight_distance(_matrices(model), _matrices(base_model))
    if tasks is not None:
        from muonft_cli import lm_eval_bridge

        if is_adapter and merged is None:
            merged = model.merge_and_unload()  # after every measurement that needs the adapter apart
        base_model = None  # lm-eval scores the model alone: free the base
        report["tasks"], report["lm_eval"] = lm_eval_bridge.run_tasks(
            merged if is_adapter else model, tokenizer, tasks, batch_size=bs, autocast_dtype=ac)
    return report

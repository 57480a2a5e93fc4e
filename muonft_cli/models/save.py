"""Saving: the model directories muonft writes (`final/`, `best/`, `merged/`) and their `muonft.json`.

Owns `save_model` — atomic (temp dir + rename) directories holding a peft adapter (PiSSA/OLoRA converted to a
plain LoRA on the original base with peft's `path_initial_model_for_weight_conversion`), optionally the merged
full model (`merged_model`: merged in fp32 onto the original base checkpoint, saved in its own dtype), or a
full HF model — with the tokenizer, the generation config and the `muonft.json` provenance,
whose model facts come from `model_provenance`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from muonft_cli import __version__
from muonft_cli.errors import MuonftError
from muonft_cli.models.device import dtype_name
from muonft_cli.models.load import loaded_dtypes, model_source
from muonft_cli.models.lora import initial_adapter_state
from muonft_cli.models.source import PROVENANCE_FILE, ModelSource


def model_provenance(model: torch.nn.Module) -> dict[str, Any]:
    """Facts about a model to record in `muonft.json`: base model (`base_model`: its absolute, resolved path or
    hub id; `base_model_as_given`: the string it was passed as; `base_gguf_file` for a GGUF base, the
    `gguf_file=` that loads it; `base_dtype`: the dtype the (base) weights were loaded in for this run, fp32 |
    bf16 | fp16 | nf4; `base_checkpoint_dtype`: the float dtype the base checkpoint stores, None for GGUF or
    a model built from a config), architecture, parameter counts."""
    m = _unwrap(model)
    src = model_source(m)
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    out: dict[str, Any] = {
        "base_model": src.describe() if src else None,
        "base_model_as_given": src.name if src else None,
        "architecture": type(base).__name__,
        "model_type": getattr(getattr(base, "config", None), "model_type", None),
        "params": total,
        "trainable_params": trainable,
        "base_dtype": loaded_dtypes(m)[0],
        "base_checkpoint_dtype": dtype_name(loaded_dtypes(m)[1]),
    }
    if src is not None and src.kind == "gguf":
        out["base_gguf_file"] = Path(src.path).name  # load with from_pretrained(its folder, gguf_file=this)
    lora = getattr(m, "_muonft_lora", None)
    if lora:
        out["lora"] = dict(lora)
    return out


def _base_pretrain_optimizer(src: ModelSource | None) -> str | None:
    """The pretraining optimizer recorded in a local base model's own `muonft.json`, or None when unknown."""
    if src is None or src.kind not in ("dir", "safetensors"):
        return None
    d = Path(src.path) if src.kind == "dir" else Path(src.path).parent
    try:
        info = json.loads((d / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if "pretrain_optimizer" in info:
        return info["pretrain_optimizer"]
    return info.get("optimizer") if info.get("mode") == "pretrain" else None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or (
            hasattr(model, "module") and type(model).__name__ in ("DistributedDataParallel", "DataParallel")):
        model = model.module
    return model


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")


def _generation_config(model: torch.nn.Module):
    from transformers import GenerationConfig

    gen = getattr(model, "generation_config", None)
    if gen is None:
        gen = GenerationConfig.from_model_config(model.config)
    return gen


def merged_model(model: Any, adapter_dir: str | Path, tokenizer: Any = None) -> tuple[torch.nn.Module, torch.dtype]:
    """The full model that peft `model`'s saved adapter (`adapter_dir`) merges to, and the dtype it is in.

    The merge is the one plain peft does on the ORIGINAL base: the base checkpoint is loaded again in its own
    dtype (`loaded_dtypes`; fp32 when it has none, e.g. a GGUF base), whatever dtype the run trained it in, so
    weights a bf16 training base rounded come back exact, and PiSSA/OLoRA adapters (saved converted) land on
    the original weights. Each LoRA layer is merged in fp32 (its base weight upcast, peft's own `merge`, which
    handles DoRA and GPT-2's `Conv1D`), then cast back: a bf16 checkpoint merges to bf16, an fp32 one to fp32.
    Only one layer at a time is held in fp32 beyond the base copy. A model muonft did not load (no recorded
    source) is merged on a copy of itself. The training model is never touched.
    """
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from muonft_cli.models.load import reload_base

    target = loaded_dtypes(model)[1] or torch.float32
    if target not in (torch.float32, torch.bfloat16, torch.float16):
        target = torch.float32
    base = reload_base(model, target, tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)) if base is not None else copy.deepcopy(model)
    with torch.no_grad():
        for module in merged.modules():
            if isinstance(module, LoraLayer):
                weight = module.get_base_layer().weight
                weight.data = weight.data.float()
                module.merge()
                weight.data = weight.data.to(target)
        plain = merged.unload()  # every LoRA layer replaced by its (merged) base layer
        for t in plain.parameters():
            if t.is_floating_point() and t.dtype != target:
                t.data = t.data.to(target)
    if getattr(plain, "config", None) is not None:
        plain.config.dtype = target
    return plain, target


def _save_adapter(model: Any, d: Path, variant: str, state_dict: dict | None = None) -> bool:
    """Save the peft adapter into `d`; PiSSA/OLoRA converted to a plain LoRA. Returns whether converted."""
    from safetensors.torch import save_file

    if variant not in ("pissa", "olora"):
        model.save_pretrained(str(d), **({"state_dict": state_dict} if state_dict is not None else {}))
        return False
    initial = initial_adapter_state(model)
    if initial is None:
        raise MuonftError(f"the {variant} adapter has no initial snapshot to convert against: create it with "
                          "muonft_cli.models.apply_lora")
    # peft loads the snapshot as an extra adapter named after the folder: the name must be a valid module name
    holder = d.parent / f".{d.name}.conv-{os.getpid()}"
    init_dir = holder / "muonft_initial"
    shutil.rmtree(holder, ignore_errors=True)
    init_dir.mkdir(parents=True)
    try:
        cfg = copy.deepcopy(model.peft_config["default"])
        cfg.init_lora_weights = True
        cfg.save_pretrained(str(init_dir))
        save_file({k: v.contiguous() for k, v in initial.items()}, str(init_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        with warnings.catch_warnings():  # the snapshot is loaded beside the PiSSA adapter only to subtract it
            warnings.filterwarnings("ignore", message=r".*changes the base weights of the model.*")
            model.save_pretrained(str(d), path_initial_model_for_weight_conversion=str(init_dir))
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    return True


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, provenance: dict | None = None,
               *, merge: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model directory atomically (temp dir + rename; an existing `out_dir` is replaced).

    - peft model → adapter (`adapter_config.json` + `adapter_model.safetensors`) that loads with plain
      `PeftModel.from_pretrained(original_base, out_dir)` (and, for a HF-folder or hub base, with
      `AutoPeftModelForCausalLM.from_pretrained(out_dir)` from any directory: `base_model_name_or_path` is the
      base's absolute path); PiSSA/OLoRA adapters are converted to a rank-2r plain
      LoRA on the original base (peft's `path_initial_model_for_weight_conversion`). With `merge`, also
      `out_dir/merged/`, the full merged model (`merged_model`: the saved adapter merged in fp32 onto the
      original base checkpoint, saved in that checkpoint's own dtype; the training model is untouched).
    - any other model → a full HF directory (safetensors) that loads with `AutoModelForCausalLM.from_pretrained`.
    Beside it: the tokenizer, `generation_config.json`, and `muonft.json` = `provenance` + muonft version +
    `model_provenance(model)` facts (base model, architecture, parameter counts, LoRA settings) + format +
    `pretrain_optimizer` (for a fine-tune: from the base's own muonft.json; None when unknown) and, for a
    fine-tune, `finetune_optimizer`.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        tokenizer: saved beside it (None to skip).
        out_dir: destination directory.
        provenance: what the engine records (optimizer and settings, lr, steps, tokens, seed, ...; for an
            `--optim auto` run also ``optim_choice``, the decision of `muonft_cli.diagnose.auto`).
        merge: also write the merged full model (adapters only).
        state_dict: the tensors to write instead of the model's own (an FSDP2 model's consolidated state dict,
            `muonft_cli.train.rundir.consolidated_state_dict`; for an adapter its trainable tensors); None = the
            model's.

    Returns:
        `out_dir` as a Path.
    """
    from peft import PeftModel

    model = _unwrap(model)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    facts = model_provenance(model)
    info: dict[str, Any] = {**facts, **(provenance or {})}
    if facts["base_model"] is not None:  # the resolved base, not the string typed (relative to some cwd)
        info["base_model"] = facts["base_model"]
        info["base_model_as_given"] = facts["base_model_as_given"]
    info["muonft_version"] = __version__
    # which optimizer pretrained the weights (as far as known) and which fine-tuned them: `optimizer` is this
    # run's. Older muonft.json files lack these fields; a missing or None one means unknown.
    if info.get("mode") == "pretrain":
        info.setdefault("pretrain_optimizer", info.get("optimizer"))
    elif info.get("mode") == "finetune":
        info.setdefault("finetune_optimizer", info.get("optimizer"))
        info.setdefault("pretrain_optimizer", _base_pretrain_optimizer(model_source(model)))
    try:
        if isinstance(model, PeftModel):
            lora = dict(getattr(model, "_muonft_lora", {}) or {})
            # the variant apply_lora recorded; an adapter loaded from disk (continued training) saves as is
            variant = lora.get("variant") or "lora"
            converted = _save_adapter(model, tmp, variant, state_dict)
            cfg_path = tmp / "adapter_config.json"
            acfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if info.get("base_model"):
                acfg["base_model_name_or_path"] = info["base_model"]
                _write_json(cfg_path, acfg)
            info["format"] = "peft-adapter"
            info["lora"] = {**lora, "variant": variant, "converted_to_lora": converted,
                            "saved_rank": acfg.get("r"), "saved_alpha": acfg.get("lora_alpha")}
            base = model.get_base_model()
            _generation_config(base).save_pretrained(str(tmp))
            if merge:
                merged, merged_dtype = merged_model(model, tmp, tokenizer)
                mdir = tmp / "merged"
                merged.save_pretrained(str(mdir))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(mdir))
                _write_json(mdir / PROVENANCE_FILE, {**info, "format": "full", "merged_from_adapter": True,
                                                     "dtype": dtype_name(merged_dtype)})
                del merged
        else:
            model.save_pretrained(str(tmp), **({"state_dict": state_dict} if state_dict is not None else {}))
            if not (tmp / "generation_config.json").is_file():
                _generation_config(model).save_pretrained(str(tmp))
            info["format"] = "full"
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _write_json(tmp / PROVENANCE_FILE, info)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

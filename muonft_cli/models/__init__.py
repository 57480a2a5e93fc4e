"""Models: where a checkpoint comes from, loading it, building pretrain models, LoRA, saving, devices.

The package re-exports the API callers use (``from muonft_cli import models; models.load_model(...)``); each
part lives in its own module:

- `source`: `resolve_model` turns `--model` into a `ModelSource` (local HF dir, sharded dir, `.gguf` file,
  `.safetensors` file beside a config.json, peft adapter dir, `builtin:NAME` packaged model, or hub id) or one
  `UserInputError` line; `adapter_base` (an adapter's recorded base, or where it looked); the hub look-up
  `hub_model_files`.
- `safetensors`: the one safetensors header reader (`read_header`) and completeness check
  (`check_safetensors`), shared with `muonft diagnose`.
- `load`: `load_model` / `load_tokenizer` (weights read straight into the requested dtype, fp32 by default;
  safetensors or GGUF only, adapters onto their base), `loaded_dtypes`, `checkpoint_dtype`,
  `ensure_pad_token`, `build_pretrain_model` (the `tiny` / `small` presets or a config.json).
- `lora`: `apply_lora` (stock peft LoRA and its variants), `plain_name` (peft names → plain model names),
  `lora_scale` (α̃ of a saved adapter's module), `keep_adapter_inputs_in_base_dtype` (CPU, half-precision base).
- `save`: `save_model` (atomic model directories, PiSSA/OLoRA conversion, `merged/`) and `model_provenance`
  (the model facts in `muonft.json`).
- `device`: `pick_device`, `resolve_base_dtype` (a LoRA base's dtype), `autocast_dtype` / `autocast`,
  `limit_host_allocator_retention`.
"""

from __future__ import annotations

from muonft_cli.models.device import (DTYPES, autocast, autocast_dtype, dtype_name, limit_host_allocator_retention,
                                     pick_device, resolve_base_dtype)
from muonft_cli.models.load import (
    PRESET_MAX_POSITIONS,
    PRESETS,
    TOKENIZER_FILES,
    build_pretrain_model,
    checkpoint_dtype,
    ensure_pad_token,
    is_meta,
    load_model,
    load_tokenizer,
    loaded_dtypes,
    model_source,
)
from muonft_cli.models.lora import (
    apply_lora,
    default_lora_targets,
    initial_adapter_state,
    keep_adapter_inputs_in_base_dtype,
    lora_scale,
    plain_name,
)
from muonft_cli.models.safetensors import TensorEntry, check_safetensors, index_shards, read_header
from muonft_cli.models.save import model_provenance, save_model
from muonft_cli.models.source import (
    BUILTIN_MODELS,
    HUB_TIMEOUT_S,
    PROVENANCE_FILE,
    BuiltinModel,
    ModelSource,
    adapter_base,
    builtin_model_path,
    hub_model_files,
    looks_like_hub_id,
    resolve_model,
)

__all__ = [
    "DTYPES", "autocast", "autocast_dtype", "dtype_name", "limit_host_allocator_retention", "pick_device",
    "resolve_base_dtype",
    "PRESET_MAX_POSITIONS", "PRESETS", "TOKENIZER_FILES", "build_pretrain_model", "checkpoint_dtype",
    "ensure_pad_token", "is_meta", "load_model", "load_tokenizer", "loaded_dtypes", "model_source",
    "apply_lora", "default_lora_targets", "initial_adapter_state", "keep_adapter_inputs_in_base_dtype", "lora_scale",
    "plain_name",
    "TensorEntry", "check_safetensors", "index_shards", "read_header",
    "model_provenance", "save_model",
    "BUILTIN_MODELS", "BuiltinModel", "HUB_TIMEOUT_S", "PROVENANCE_FILE", "ModelSource", "adapter_base",
    "builtin_model_path", "hub_model_files", "looks_like_hub_id", "resolve_model",
]

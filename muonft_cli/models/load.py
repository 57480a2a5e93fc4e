"""Loading: a resolved `ModelSource` turned into a causal LM and its tokenizer; the pretrain presets.

Owns `load_model` (weights read straight into the requested dtype: fp32 master weights by default, a LoRA
run's frozen base in bf16/fp16 or, on CUDA, NF4 via bitsandbytes; `use_safetensors=True`, so nothing is ever
unpickled; no remote code unless `trust_remote_code`; GGUF files dequantised to that dtype by transformers'
`gguf_file=` loader; a peft adapter loaded onto its base; the tokenizer from the same place, with a pad
token), the same model built on the meta device from its config alone (`on_meta`, for FSDP2 ranks other than 0),
`load_tokenizer`, `ensure_pad_token`, `model_source` / `loaded_dtypes` (what a model was loaded from,
and in which dtype), `checkpoint_dtype` (the float dtype a checkpoint stores) and `build_pretrain_model` (the
`tiny` / `small` Llama presets or a config.json, vocabulary from the tokenizer).

A checkpoint the libraries cannot read becomes one `UserInputError` line. Only the exceptions the libraries
raise for bad files are caught, and only around the library calls (`_CHECKPOINT_ERRORS`,
`_is_tokenizer_error`): any other exception is a bug and propagates with its traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from muonft_cli._common import first_line, hub_offline, looks_local
from muonft_cli.errors import UserInputError
from muonft_cli.models.device import DTYPES, dtype_name
from muonft_cli.models.source import ModelSource, adapter_base, hub_model_files, looks_like_hub_id, resolve_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Llama configs sized for CPU pretraining. Parameter counts at vocab 4096 (untied embeddings + head):
# tiny ≈ 1.9 M (1.05 M of them embedding/head), small ≈ 13.8 M.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6),
}
PRESET_MAX_POSITIONS = 2048


def _config_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for config values it rejects: huggingface_hub's strict-dataclass validation
    errors (a string where a size belongs, heads that do not divide the width) besides ValueError."""
    from huggingface_hub import errors

    strict = getattr(errors, "StrictDataclassError", None)
    return (ValueError,) + ((strict,) if strict is not None else ())


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What transformers, peft, safetensors and gguf raise for a checkpoint they cannot read: OSError (missing
    or unreadable files, bad config JSON), ValueError (unsupported architecture or GGUF version; JSON errors),
    RuntimeError (weights whose shapes do not match the config), `struct.error` (a truncated GGUF),
    `SafetensorError` and the config validation errors."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, struct.error, SafetensorError, *_config_errors())


def _is_tokenizer_error(e: BaseException) -> bool:
    """Whether `e` is what transformers / tokenizers raise for tokenizer files they cannot read: OSError,
    ValueError (JSON errors included), KeyError (a tokenizer.json of another schema), the config validation
    errors (`AutoTokenizer` reads the model's config.json too), or the plain `Exception` the `tokenizers`
    library (Rust) raises for a file it cannot parse."""
    return isinstance(e, (OSError, KeyError, *_config_errors())) or type(e) is Exception


# ------------------------------------------------------------------------------------------------ models


def _check_remote_code(d: Path, trust_remote_code: bool) -> None:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return  # nothing to check here: the loader says what is missing
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"'{cfg_path}' is not valid JSON: re-download or re-save the checkpoint") from None
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type") if isinstance(cfg, dict) else None
    if model_type is None:
        raise UserInputError(f"'{cfg_path}' has no model_type: it is not a transformers model config")
    if model_type in CONFIG_MAPPING:
        return
    import transformers

    if not isinstance(cfg.get("auto_map"), dict):  # no code of its own: --trust-remote-code cannot help
        raise UserInputError(f"'{d}' has model_type '{model_type}', which transformers {transformers.__version__} "
                             "does not know, and the folder ships no modeling code (no auto_map in config.json): "
                             "upgrade transformers (pip install -U transformers) to a version that supports "
                             f"'{model_type}', or use a copy of the checkpoint that includes its modeling .py files")
    if not trust_remote_code:
        raise UserInputError(f"'{d}' needs the model code it ships (model_type '{model_type}' is unknown to "
                             "transformers; config.json auto_map names its .py files): pass --trust-remote-code "
                             "if you trust it")


def _unreadable(src: ModelSource, e: BaseException) -> UserInputError:
    msg = first_line(e)
    if "trust_remote_code" in msg:
        return UserInputError(f"'{src.name}' needs custom model code: pass --trust-remote-code if you trust it")
    return UserInputError(f"could not load model '{src.name}' ({msg}): pass a complete causal-LM checkpoint")


def _load_weights(src: ModelSource, trust_remote_code: bool, local_only: bool = False,
                  dtype: torch.dtype = torch.float32, load_in_4bit: bool = False,
                  device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load a non-adapter source as a causal LM whose weights are `dtype` (`local_only`: from the local HF
    cache only). The weights are read straight into `dtype` (transformers' `dtype=`; GGUF blocks dequantised
    to it tensor by tensor): an fp32 copy of a half-precision model never exists. `load_in_4bit`: NF4 through
    bitsandbytes onto the CUDA `device`, `dtype` being the compute dtype (checked by the caller)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    errors = _checkpoint_errors()
    kw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kw.update(quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype), device_map={"": torch.device(device)})
    if src.kind == "gguf":
        from transformers import GgufConfig

        p = Path(src.path)
        try:  # dequantize=True: a plain dense model (no packed GGUF layers), trainable and serialisable
            model = AutoModelForCausalLM.from_pretrained(
                str(p.parent), gguf_file=p.name, quantization_config=GgufConfig(gguf_file=p.name, dequantize=True),
                **kw)
        except errors as e:
            raise _unreadable(src, e) from None
    elif src.kind == "safetensors":
        from safetensors.torch import load_file

        p = Path(src.path)
        _check_remote_code(p.parent, trust_remote_code)
        try:  # built in `dtype` (never fp32 first), then the file's tensors copied in (cast on copy)
            config = AutoConfig.from_pretrained(str(p.parent), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
            missing, unexpected = model.load_state_dict(load_file(str(p)), strict=False)
        except errors as e:
            raise _unreadable(src, e) from None
        if getattr(config, "tie_word_embeddings", False):
            missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise UserInputError(f"'{p}' does not match its config.json ({len(missing)} missing, "
                                 f"{len(unexpected)} unexpected tensors): pass the matching HF model folder")
        model.tie_weights()
    else:
        if src.kind == "dir":
            _check_remote_code(Path(src.path), trust_remote_code)
        try:
            model = AutoModelForCausalLM.from_pretrained(src.path, use_safetensors=True,
                                                         local_files_only=local_only, **kw)
        except errors as e:
            raise _unreadable(src, e) from None
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        # frozen NF4 base, fp32 norms/embeddings; gradient checkpointing is the run's own choice (train.build)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        _to_dtype(model, dtype)
    model._muonft_source = src
    model._muonft_trust_remote_code = trust_remote_code
    model._muonft_source_dtype = checkpoint_dtype(src)
    model._muonft_base_dtype = "nf4" if load_in_4bit else dtype_name(dtype)
    return model


#: The sources `load_model(on_meta=True)` can build from their config alone (a GGUF file's config lives in its
#: blocks, an adapter needs its base's weights, and a 4-bit base is quantised while it is read).
META_KINDS = ("dir", "hub", "safetensors")


def _meta_weights(src: ModelSource, trust_remote_code: bool, local_only: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The model `_load_weights(src, ...)` gives, built on the meta device from its config.json alone: the
    same modules, parameter names, shapes, dtype and tied weights, no storage, nothing read but the config (an
    FSDP2 rank other than 0 fills it from rank 0's weights: `train.distributed.load_from_rank0`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    where = str(Path(src.path).parent) if src.kind == "safetensors" else src.path
    if src.kind != "hub":
        _check_remote_code(Path(where), trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, local_files_only=local_only)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    except _checkpoint_errors() as e:
        raise _unreadable(src, e) from None
    model._muonft_source = src
    model._muonft_trust_remote_code = trust_remote_code
    model._muonft_source_dtype = checkpoint_dtype(src)
    model._muonft_base_dtype = dtype_name(dtype)
    return model


def is_meta(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are on the meta device (shapes only, no storage)."""
    return any(p.is_meta for p in model.parameters())


def _to_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every floating parameter `dtype` in place, and for fp32 every floating buffer too (`model.to()` is
    refused for GGUF-loaded models, which transformers flags as quantized even though their weights are
    already dequantised). A half-precision model keeps fp32 buffers (rotary frequencies) as transformers
    made them."""
    for t in model.parameters():
        if t.is_floating_point() and t.dtype != dtype:
            t.data = t.data.to(dtype)
    if dtype == torch.float32:
        for t in model.buffers():
            if t.is_floating_point() and t.dtype != dtype:
                t.data = t.data.float()


def checkpoint_dtype(src: ModelSource) -> torch.dtype | None:
    """The float dtype a checkpoint stores its weights in: its config.json `dtype` (`torch_dtype` in older
    files), else the first floating tensor of its safetensors; None for a GGUF file (quantised blocks, no
    float dtype) or when nothing says."""
    if src.kind == "gguf":
        return None
    cfg_path: Path | None = None
    weights: list[Path] = []
    if src.kind == "hub":
        try:
            from huggingface_hub import hf_hub_download

            cfg_path = Path(hf_hub_download(src.path, "config.json", local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: nothing recorded locally says
            return None
    else:
        d = Path(src.path) if src.kind == "dir" else Path(src.path).parent
        cfg_path = d / "config.json"
        weights = [Path(src.path)] if src.kind == "safetensors" else sorted(d.glob("*.safetensors"))
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cfg = {}
    name = (cfg.get("dtype") or cfg.get("torch_dtype")) if isinstance(cfg, dict) else None
    if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    from muonft_cli.models.safetensors import read_header

    widths = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    for w in weights[:1]:
        for entry in read_header(w):
            if entry.dtype in widths:
                return widths[entry.dtype]
    return None


def _loaded_base(model: torch.nn.Module) -> torch.nn.Module:
    m = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def model_source(model: torch.nn.Module) -> ModelSource | None:
    """The `ModelSource` a model (or the base of a peft model) was loaded from; None for built models."""
    return getattr(_loaded_base(model), "_muonft_source", None)


def loaded_dtypes(model: torch.nn.Module) -> tuple[str, torch.dtype | None]:
    """(the dtype name the (base) model was loaded in: "fp32" | "bf16" | "fp16" | "nf4"; the float dtype its
    checkpoint stores, None for GGUF or unknown). A model muonft built (pretrain) is ("fp32", None)."""
    m = _loaded_base(model)
    return getattr(m, "_muonft_base_dtype", "fp32"), getattr(m, "_muonft_source_dtype", None)


def reload_base(model: torch.nn.Module, dtype: torch.dtype, tokenizer: Any = None) -> torch.nn.Module | None:
    """The (base) checkpoint `model` was loaded from, loaded again on the CPU in `dtype` from the local files
    (`save.merged_model` merges onto it), its embeddings grown as `tokenizer` needs like the run's were; None
    for a model muonft built rather than loaded."""
    m = _loaded_base(model)
    src = getattr(m, "_muonft_source", None)
    if src is None:
        return None
    base = _load_weights(src, getattr(m, "_muonft_trust_remote_code", False), local_only=True, dtype=dtype)
    if tokenizer is not None:
        ensure_pad_token(tokenizer, base)
    return base


# --------------------------------------------------------------------------------------------- tokenizers


def _tokenizer_location(src: ModelSource) -> tuple[str, dict[str, Any]] | None:
    """(path_or_id, kwargs) to load the tokenizer that ships with `src`, or None if it has none."""
    if src.kind == "gguf":
        p = Path(src.path)
        return str(p.parent), {"gguf_file": p.name}
    if src.kind == "hub":
        return src.path, {}
    d = Path(src.path).parent if src.kind == "safetensors" else Path(src.path)
    if any((d / f).is_file() for f in TOKENIZER_FILES):
        return str(d), {}
    return None


def _auto_tokenizer(where: str, what: str, fix: str, trust_remote_code: bool, **kw: Any):
    """`AutoTokenizer.from_pretrained(where, **kw)`; a tokenizer the libraries cannot read is a `UserInputError`
    ``could not load <what> (<first line>): <fix>``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
    except Exception as e:
        if not _is_tokenizer_error(e):
            raise
        raise UserInputError(f"could not load {what} ({first_line(e)}): {fix}") from None


_TOKENIZER_FIX = "pass a tokenizer folder, tokenizer.json, .gguf file or model folder"


def load_tokenizer(name_or_path: str, offline: bool = False, trust_remote_code: bool = False):
    """Load a tokenizer from a folder, a tokenizer.json file, a .gguf file, a model/adapter folder or a hub id.

    `offline`: never contact the hub (a hub id is then read from the local HF cache only).
    """
    what = f"tokenizer '{name_or_path}'"
    p = Path(name_or_path).expanduser()
    if p.is_file() and p.suffix == ".json":
        from transformers import PreTrainedTokenizerFast

        try:
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        except Exception as e:
            if not _is_tokenizer_error(e):
                raise
            raise UserInputError(f"could not load {what} ({first_line(e)}): {_TOKENIZER_FIX}") from None
    if p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES):
        return _auto_tokenizer(str(p), what, _TOKENIZER_FIX, trust_remote_code)
    if not p.exists() and not looks_local(name_or_path) and looks_like_hub_id(name_or_path):
        if offline or hub_offline():
            raise UserInputError(f"tokenizer '{name_or_path}': no such local path, and the hub is offline: "
                                 "pass a local tokenizer folder or tokenizer.json")
        hub_model_files(name_or_path)  # fails fast: hub unreachable, no such repo
        return _auto_tokenizer(name_or_path, what, _TOKENIZER_FIX, trust_remote_code)
    src = resolve_model(name_or_path, offline)
    loc = _tokenizer_location(src)
    if loc is None and src.kind == "adapter" and src.base:
        loc = _tokenizer_location(adapter_base(src, offline=offline))
    if loc is None:
        raise UserInputError(f"'{name_or_path}' has no tokenizer files: pass --tokenizer PATH")
    return _auto_tokenizer(loc[0], what, _TOKENIZER_FIX, trust_remote_code, local_files_only=offline, **loc[1])


def ensure_pad_token(tokenizer: Any, model: torch.nn.Module | None = None) -> None:
    """Give `tokenizer` a pad token (eos, else unk, else a new `<pad>` with the embeddings resized)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
            if model is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
                model.resize_token_embeddings(len(tokenizer))
    if model is not None:
        cfg = getattr(model, "config", None)
        if cfg is not None and getattr(cfg, "pad_token_id", None) is None:
            cfg.pad_token_id = tokenizer.pad_token_id
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, "pad_token_id", None) is None:
            gen.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------------------- load_model


def load_model(model_cfg: Any, device: torch.device | str = "cpu", *, base: str | None = None,
               is_trainable: bool = False, dtype: str = "fp32",
               load_in_4bit: bool = False, on_meta: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load `model_cfg.name_or_path` as a causal LM on `device`, with its tokenizer.

    Weights are loaded directly in `dtype` (default fp32, the master copy a full fine-tune updates; a LoRA
    run's frozen base may be "bf16" / "fp16", see `device.resolve_base_dtype`): the checkpoint's tensors are
    read into that dtype, never into an fp32 copy first. `model_cfg.dtype == "bf16"` does not change them: the
    engine runs forward/backward under `torch.autocast("cuda", ...)` on GPU (see `autocast_dtype`). GGUF
    weights (any quantisation) are dequantised to `dtype`. An adapter's own weights stay fp32 on any base
    (peft's `autocast_adapter_dtype`). `load_in_4bit`: the (base) model in NF4 via bitsandbytes on the CUDA
    `device`, `dtype` as compute dtype, prepared with peft's `prepare_model_for_kbit_training` (the caller
    checked CUDA and bitsandbytes: `muonft_cli.train.build.check_inputs`). The model records its source
    (`model_source`), the dtype it was loaded in and the checkpoint's own dtype (`loaded_dtypes`). With
    `model_cfg.offline` a hub id is read from the local HF cache only (`local_files_only=True`); the
    environment is not changed.

    Args:
        model_cfg: `config.ModelConfig` (name_or_path, tokenizer, trust_remote_code, offline).
        device: target device.
        base: for an adapter folder, the base model to load it onto (default: the base the adapter records;
            gone from there, one `UserInputError` line says where it looked and to pass `--base`).
        is_trainable: for an adapter folder, load its weights trainable (continue training it).
        dtype: "fp32" | "bf16" | "fp16", the dtype of the (base) model's weights.
        load_in_4bit: QLoRA's NF4 base (CUDA only).
        on_meta: build the model on the meta device from its config alone, no weights read, and leave it
            there (an FSDP2 rank other than 0, which gets rank 0's weights after sharding), when the source
            allows it (`META_KINDS`, not 4-bit); other sources are loaded as usual (see `is_meta`).

    Returns:
        `(model, tokenizer)`; the model is a `peft.PeftModel` when the source is an adapter. The tokenizer comes
        from `model_cfg.tokenizer` if set, else from the model (or the adapter folder, else its base) and always
        has a pad token.
    """
    offline = bool(getattr(model_cfg, "offline", False))
    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    src = resolve_model(model_cfg.name_or_path, offline)
    base_src = None
    if src.kind == "adapter":
        base_src = adapter_base(src, base, offline)
    if load_in_4bit and (base_src or src).kind == "gguf":
        raise UserInputError(f"--load-in-4bit quantises a safetensors checkpoint, and '{(base_src or src).name}' "
                             "is a GGUF file: drop --load-in-4bit (--base-dtype bf16 dequantises it to bf16), or pass "
                             "the model's safetensors folder or hub id")
    # the model's own config first (an unknown model_type: one line, before the tokenizer loader warns about it)
    for s in (src, base_src):
        if s is not None and s.kind in ("dir", "safetensors"):
            _check_remote_code(Path(s.path) if s.kind == "dir" else Path(s.path).parent, trust)
    # tokenizer next: cheap, and a missing tokenizer should fail before a long model load
    if getattr(model_cfg, "tokenizer", None):
        tokenizer = load_tokenizer(model_cfg.tokenizer, offline, trust)
    else:
        loc = _tokenizer_location(src)
        if loc is None and base_src is not None:
            loc = _tokenizer_location(base_src)
        if loc is None:
            raise UserInputError(f"model '{src.name}' has no tokenizer files: pass --tokenizer PATH")
        tokenizer = _auto_tokenizer(loc[0], f"the tokenizer of '{src.name}'", "pass --tokenizer PATH", trust,
                                    local_files_only=offline, **loc[1])
    if src.kind == "adapter":
        from peft import PeftModel

        base_model = _load_weights(base_src, trust, offline, DTYPES[dtype], load_in_4bit, device)
        ensure_pad_token(tokenizer, base_model)
        try:
            model = PeftModel.from_pretrained(base_model, src.path, is_trainable=is_trainable)
        except (KeyError, *_checkpoint_errors()) as e:
            raise UserInputError(f"could not load adapter '{src.name}' onto base '{base_src.name}' "
                                 f"({first_line(e)}): pass the base it was trained on with --base") from None
    elif on_meta and src.kind in META_KINDS and not load_in_4bit:
        model = _meta_weights(src, trust, offline, DTYPES[dtype])
        ensure_pad_token(tokenizer, model)
        return model, tokenizer
    else:
        model = _load_weights(src, trust, offline, DTYPES[dtype], load_in_4bit, device)
        ensure_pad_token(tokenizer, model)
    if load_in_4bit:  # placed on its GPU by bitsandbytes (device_map); `.to()` is refused for 4-bit models
        return model, tokenizer
    return model.to(device), tokenizer


# --------------------------------------------------------------------------------------------- pretraining


def pretrain_config(model_cfg: Any, ids: dict[str, Any]) -> Any:
    """The transformers config `muonft pretrain` builds: `model_cfg.preset` "tiny" / "small" (Llama) or
    `model_cfg.model_config` (a config.json, or a folder holding one), with the vocabulary size and bos/eos/pad
    ids of `ids` (`vocab_size`, `bos_token_id`, ...). One `UserInputError` line for a missing or unusable file."""
    from transformers import AutoConfig, LlamaConfig

    path = getattr(model_cfg, "model_config", None)
    preset = getattr(model_cfg, "preset", None)
    if not path:
        if preset not in PRESETS:
            raise UserInputError(f"unknown preset {preset!r}: use --preset {' | '.join(PRESETS)} or "
                                 "--model-config config.json")
        return LlamaConfig(max_position_embeddings=PRESET_MAX_POSITIONS, tie_word_embeddings=False,
                           **PRESETS[preset], **ids)
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserInputError(f"model config '{path}' does not exist: pass the path of a config.json")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"model config '{path}' is not valid JSON: fix it") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise UserInputError(f"model config '{path}' has no model_type: pass a transformers config.json")
    model_type = data.pop("model_type")
    for k in ("architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype"):
        data.pop(k, None)
    data.update(ids)
    try:  # the values come from the user's file: unknown model types, wrong types, inconsistent sizes
        return AutoConfig.for_model(model_type, **data)
    except (KeyError, TypeError, *_config_errors()) as e:
        raise UserInputError(f"model config '{path}' cannot build a causal LM ({first_line(e)}): fix it") from None


def build_pretrain_model(model_cfg: Any, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised fp32 causal LM for `muonft pretrain`.

    `model_cfg.preset` "tiny" (Llama, 4 layers, hidden 128: ≈1.9 M parameters at vocab 4096, trains in minutes
    on 2 CPU cores) or "small" (6 layers, hidden 384: ≈13.8 M), or `model_cfg.model_config`, the path of a
    transformers config.json (or a folder holding one): `pretrain_config`. The vocabulary size and bos/eos/pad
    ids come from `tokenizer`. Uses the caller's RNG state (seed first).
    """
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    ensure_pad_token(tokenizer)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = pretrain_config(model_cfg, ids)
    if getattr(model_cfg, "model_config", None):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (KeyError, TypeError, *_config_errors()) as e:
            raise UserInputError(f"model config '{model_cfg.model_config}' cannot build a causal LM "
                                 f"({first_line(e)}): fix it") from None
    else:
        model = LlamaForCausalLM(config)
    model.float()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model

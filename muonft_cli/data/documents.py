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
  `from`/`value`); `data.text_field` overrides. Rows without the kind's fields are dropped and counted, with
  the reason (`DocumentSet.rows_read` / `drop_reasons`, `drop_note`); more than `data.max_dropped_fraction`
  of the rows dropped is a `UserInputError`, and so are rows that mix two kinds ("rows mix chat `messages`
  (N rows) and `text` (M rows)").
* The builtin corpora's own layouts: Shakespeare's plays (one edition, one document per work) and the King James
  Bible's verse lines (one document per chapter). Their JSON-lines reader is this module's own, not
  `_common.read_jsonl`: a bad line in a data file is the user's error, reported with its line number, not a
  torn end to skip.

Nothing here imports torch.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import tempfile
from collections import Counter
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
    rows_read: int = 0  # records read from record files / datasets (train and own validation); 0 for text
    drop_reasons: dict[str, int] = field(default_factory=dict)  # why rows were dropped -> how many

    @property
    def rows_dropped(self) -> int:
        return sum(self.drop_reasons.values())


def drop_note(rows_read: int, drop_reasons: dict[str, int], source: str) -> str | None:
    """One line saying how many rows of `source` were dropped and why (None when none were)."""
    n = sum(drop_reasons.values())
    if not n:
        return None
    return f"data: dropped {n} of {rows_read} rows of {source} ({_reasons(drop_reasons)})"


def _reasons(drop_reasons: dict[str, int]) -> str:
    return ", ".join(f"{k} {reason}" for reason, k in sorted(drop_reasons.items(), key=lambda kv: -kv[1]))


@dataclass
class _Rows:
    """What reading records saw: how many rows, and the rows dropped by reason."""

    read: int = 0
    dropped: Counter = field(default_factory=Counter)


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


def _has(v: Any) -> bool:
    """Whether a record's field holds a value (not missing, null, blank or an empty list)."""
    if v is None:
        return False
    if isinstance(v, str):
        return bool(v.strip())
    if isinstance(v, (list, tuple, dict)):
        return bool(v)
    return True


def _why_missing(v: Any, name: str) -> str:
    if v is None:
        return f"with no '{name}'"
    if isinstance(v, str) or isinstance(v, (list, tuple, dict)):
        return f"with an empty '{name}'"
    return f"with a non-text '{name}'"


def _check_mixed(ds: Any, resp: str | None, chosen: tuple[str, tuple[str, ...]], where: str) -> None:
    """Raise when rows lacking the chosen kind's fields hold another kind's (one file, two schemas)."""
    colset = set(ds.column_names)
    kinds = [(f"chat `{c}`", (c,)) for c in ("messages", "conversations")]
    if resp is not None:
        kinds += [(f"`instruction`/`{resp}`", ("instruction", resp)), (f"`prompt`/`{resp}`", ("prompt", resp))]
    kinds += [(f"`{c}`", (c,)) for c in ("text", "content")]
    kinds = [k for k in kinds if k[0] != chosen[0] and all(c in colset for c in k[1])]
    if not kinds:
        return
    cols = {c: list(ds[c]) for k in (chosen, *kinds) for c in k[1]}
    has_chosen = [all(_has(cols[c][i]) for c in chosen[1]) for i in range(len(ds))]
    missing = [i for i, h in enumerate(has_chosen) if not h]
    for label, fields in kinds:
        m = sum(all(_has(cols[c][i]) for c in fields) for i in missing)
        if m:
            raise UserInputError(f"{where}: rows mix {chosen[0]} ({sum(has_chosen)} rows) and {label} ({m} rows): "
                                 "give every row the same fields (one kind per file), or pick the text column "
                                 "with --set data.text_field=COLUMN")


def _docs_from_dataset(ds: Any, text_field: str | None, where: str, rows: _Rows
                       ) -> tuple[list[Doc], list[str], str]:
    """Turn a `datasets.Dataset` into documents; detect the kind from its columns. Rows without the kind's
    fields are dropped and counted in `rows` (with the reason)."""
    cols = list(ds.column_names)
    colset = set(cols)
    rows.read += len(ds)

    def col(name: str) -> list:
        return list(ds[name])

    idx_names = [f"{where}#{i}" for i in range(len(ds))]

    def texts(name: str) -> tuple[list[Doc], list[str], str]:
        keep, names = [], []
        for v, n in zip(col(name), idx_names):
            if isinstance(v, str) and v.strip():
                keep.append(v)
                names.append(n)
            else:
                rows.dropped[_why_missing(v, name)] += 1
        return keep, names, "text"

    if text_field is not None:
        if text_field not in colset:
            raise UserInputError(f"data.text_field '{text_field}' is not a column of {where} (columns: "
                                 f"{', '.join(cols)}): set --set data.text_field=COLUMN")
        return texts(text_field)
    resp = next((c for c in ("response", "completion", "output") if c in colset), None)
    for chat_col in ("messages", "conversations"):
        if chat_col in colset:
            _check_mixed(ds, resp, (f"chat `{chat_col}`", (chat_col,)), where)
            docs, names = [], []
            for i, (c, n) in enumerate(zip(col(chat_col), idx_names)):
                if c is None or (isinstance(c, (list, tuple)) and not c):
                    rows.dropped[_why_missing(c, chat_col)] += 1
                    continue
                docs.append(Chat(_as_messages(c, f"{where} row {i}")))
                names.append(n)
            return docs, names, "instruction"

    def instructions(prompt_col: str, make) -> tuple[list[Doc], list[str], str]:
        _check_mixed(ds, resp, (f"`{prompt_col}`/`{resp}`", (prompt_col, resp)), where)
        inputs = col("input") if "input" in colset else [""] * len(ds)
        docs, names = [], []
        for p, x, r, n in zip(col(prompt_col), inputs, col(resp), idx_names):
            if p and r:
                docs.append(make(p, x, r))
                names.append(n)
            else:
                rows.dropped[_why_missing(p, prompt_col) if not p else _why_missing(r, resp)] += 1
        return docs, names, "instruction"

    if "instruction" in colset and resp is not None:
        return instructions("instruction", lambda p, x, r: Instruction(str(p), str(r), str(x or ""), "alpaca"))
    if "prompt" in colset and resp is not None:
        return instructions("prompt", lambda p, x, r: Instruction(str(p), str(r)))
    strings = _string_columns(ds)
    field_ = "text" if "text" in colset else ("content" if "content" in colset else
                                               (strings[0] if len(strings) == 1 else None))
    if field_ is None:
        raise UserInputError(f"cannot tell which column of {where} holds the text (columns: {', '.join(cols)}): "
                             f"set --set data.text_field=COLUMN, or use text / prompt+response / "
                             f"instruction+output / messages columns")
    if field_ in ("text", "content"):
        _check_mixed(ds, resp, (f"`{field_}`", (field_,)), where)
    return texts(field_)


def _docs_from_splits(obj: Any, text_field: str | None, where: str, single: str, rows: _Rows
                      ) -> tuple[list, list, list | None, list | None, str]:
    """Documents of a `DatasetDict` (its train and validation splits, named `where[split]`) or of a `Dataset`
    (no own validation; its rows named `single#i`)."""
    import datasets

    if not isinstance(obj, datasets.DatasetDict):
        d, n, kind = _docs_from_dataset(obj, text_field, single, rows)
        return d, n, None, None, kind
    tr, va, tn, vn = sources.pick_splits(obj)
    d, n, kind = _docs_from_dataset(tr, text_field, f"{where}[{tn}]", rows)
    if va is not None:
        vd, vnames, _ = _docs_from_dataset(va, text_field, f"{where}[{vn}]", rows)
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


def _load_local(path: Path, text_field: str | None, rows: _Rows) -> tuple[list, list, list | None, list | None, str]:
    """Returns train docs, train names, val docs | None, val names | None, kind."""
    if sources.is_saved_dataset(path):
        return _docs_from_splits(sources.open_saved(path), text_field, str(path), str(path), rows)

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
    d, n, kind = _docs_from_dataset(ds, text_field, str(path), rows)
    if files.val:
        vds = _load_records(files.val, files.fmt)
        vd, vn, _ = _docs_from_dataset(vds, text_field, f"{path} (validation)", rows)
        return d, n, vd, vn, kind
    return d, n, None, None, kind


def load_documents(data_cfg: Any) -> DocumentSet:
    """Load the documents of `data_cfg.path` (see the module docstrings of `sources` and this module).

    Args:
        data_cfg: a `config.DataConfig` (uses `path`, `text_field`, `max_documents`, `max_dropped_fraction`).

    Returns:
        A `DocumentSet`; `.val` holds the source's own validation split, or None (then `build_splits` holds out
        a fraction of the documents).

    Raises:
        UserInputError: the source is missing, empty, unreadable, not UTF-8, or of an unsupported type; its rows
            mix two kinds of records; more than `max_dropped_fraction` of its rows lack the text fields.
    """
    src = sources.resolve(data_cfg.path)
    text_field = getattr(data_cfg, "text_field", None)
    vd = vn = None
    rows = _Rows()
    if src.kind == "builtin":
        loader = {"shakespeare": _load_shakespeare, "kjv": _load_kjv}[src.builtin]
        d, n = loader(src.path)
        kind, desc = "text", f"{src.spec} ({src.path})"
    elif src.kind == "local":
        d, n, vd, vn, kind = _load_local(src.path, text_field, rows)
        desc = str(src.path)
    else:
        d, n, vd, vn, kind = _docs_from_splits(sources.open_hub(src.spec), text_field, src.spec,
                                               f"{src.spec}[train]", rows)
        desc = f"hub:{src.spec}"
    dropped = sum(rows.dropped.values())
    limit_share = getattr(data_cfg, "max_dropped_fraction", 0.1)
    if rows.read and dropped and d and dropped / rows.read > limit_share:
        raise UserInputError(f"{dropped} of {rows.read} rows of '{data_cfg.path}' would be dropped "
                             f"({_reasons(rows.dropped)}), more than data.max_dropped_fraction={limit_share:g}: "
                             "fix those rows or pick the text column with --set data.text_field=COLUMN (or "
                             "accept the loss with --set data.max_dropped_fraction="
                             f"{min(1.0, math.ceil(100 * dropped / rows.read) / 100):g})")
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
    return DocumentSet(train=d, val=vd, kind=kind, source=desc, train_names=n, val_names=vn, rows_read=rows.read,
                       drop_reasons=dict(rows.dropped))

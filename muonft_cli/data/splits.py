"""Train/validation splitting: which documents validate, and the tokenised `Splits` training iterates.

Owns the hold-out and the seed that fixes it:

* The source's own validation split is used when it has one (a `validation`/`test` file, folder or dataset
  split); otherwise `split_documents` holds out a seeded fraction of whole *documents* (an explicit
  `torch.Generator`, so the split is the same on every machine), so no document is in both parts.
* `split_seed`: the hold-out follows the run's `train.seed` unless `data.split_seed` fixes it, so runs with
  different training seeds can share one validation set.
* `build_splits` loads (`documents.load_documents`), splits and encodes (`encode.pack_documents` for text,
  `encode.encode_instructions` for instruction data), and checks that each part fills at least one sequence;
  `iter_texts` yields the training side's plain text (to train a tokenizer on, never on validation text).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from muonft_cli.data import encode
from muonft_cli.data.documents import load_documents, plain_text
from muonft_cli.data.encode import TokenDataset
from muonft_cli.errors import UserInputError


@dataclass
class Splits:
    """Tokenised train/validation datasets. `val` is None when there is no split and val_fraction is 0 (or
    when `build_splits(only="train")`); `train` is None only after `build_splits(only="val")`."""

    train: TokenDataset | None
    val: TokenDataset | None
    info: dict


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
        yield plain_text(d)


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
        target_tokens_train/val, sequences_train/val, val_docs (names, up to 20), rows_read / rows_dropped /
        drop_reasons (records of record files and datasets without the text fields: `documents.drop_note`), and
        for instruction data truncated/dropped counts (examples cut or left without a target by --seq-len).

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
                            "val_docs": val_names[:20], "rows_read": docs.rows_read,
                            "rows_dropped": docs.rows_dropped, "drop_reasons": docs.drop_reasons}
    fix_val = ("a smaller --seq-len" if val_source == "split" else "a smaller --seq-len or a larger --val-fraction")
    want_train = only != "val" or val is None
    if only == "train":
        val = None
    tr_ds = va_ds = None
    if docs.kind == "text":
        if want_train:
            tr_ds, tr_total = encode.pack_documents(tokenizer, train, seq_len)
            if len(tr_ds) == 0:
                raise UserInputError(f"the training data has {tr_total} tokens in {len(train)} document(s), "
                                     f"fewer than one sequence of {seq_len}: use a smaller --seq-len (or a "
                                     f"smaller --val-fraction, or more data)")
        if val is not None:
            va_ds, va_total = encode.pack_documents(tokenizer, val, seq_len)
            if len(va_ds) == 0:
                raise UserInputError(f"the validation data has {va_total} tokens in {len(val)} document(s), fewer "
                                     f"than one sequence of {seq_len}: use {fix_val}")
    else:
        info.update(truncated=0, dropped=0)
        if want_train:
            tr_ds, st = encode.encode_instructions(tokenizer, train, seq_len, train_names or None)
            info.update(truncated=st["truncated"], dropped=st["dropped"])
            if len(tr_ds) == 0:
                raise UserInputError(f"none of the {len(train)} training examples has a response within "
                                     f"--seq-len {seq_len} tokens: use a larger --seq-len")
        if val is not None:
            va_ds, vst = encode.encode_instructions(tokenizer, val, seq_len, val_names or None)
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

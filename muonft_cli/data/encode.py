"""Encoding documents into token datasets: packing plain text, rendering and masking instruction examples.

Owns `TokenDataset` (equal-length `input_ids` / `labels` / `attention_mask` items) and the two encoders:

* `pack_documents`: plain text is tokenised in batch calls (the Rust backend's batch encoder when present), the
  tokenizer's own prefix (e.g. bos) put before and an eos token after every document, and the stream cut into
  fixed-length sequences. Labels = input_ids: the engine's next-token loss (`muonft_cli.train`,
  `muonft_cli.evaluate`) shifts them by one position, not the model.
* `encode_instructions`: instruction examples are rendered (the tokenizer's chat template when it has one, else
  an Alpaca-style or verbatim prompt), prompt tokens get the label `IGNORE_INDEX` so only responses are trained
  on (as in InstructGPT-style SFT; Ouyang et al. 2022, "Training language models to follow instructions with
  human feedback"), and examples are truncated/padded to `seq_len` with an attention mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from muonft_cli._common import IGNORE_INDEX, first_line
from muonft_cli.data.documents import Chat, Doc
from muonft_cli.errors import UserInputError

ENCODE_BATCH = 1024  # documents per batch-encode call, at most
ENCODE_CHARS = 1 << 20  # characters per batch-encode call, at most (a longer document goes alone): bounds the
#                         memory the Rust backend's Encoding objects hold at once (~100 B a token)
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                       "context. Write a response that appropriately completes the request.\n\n"
                       "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


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
        """Tokens that count in the loss (labels != -100, before the loss's one-position shift)."""
        return int((self.labels != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------- plain text


def _char_batches(texts: Sequence[str]) -> list[list[str]]:
    """Consecutive runs of `texts`, each at most `ENCODE_BATCH` texts and `ENCODE_CHARS` characters (a longer
    text alone), in order."""
    out: list[list[str]] = []
    cur: list[str] = []
    chars = 0
    for t in texts:
        if cur and (len(cur) >= ENCODE_BATCH or chars + len(t) > ENCODE_CHARS):
            out.append(cur)
            cur, chars = [], 0
        cur.append(t)
        chars += len(t)
    if cur:
        out.append(cur)
    return out


def _encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of many texts without special tokens, via the Rust backend's batch encoder when present."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    fast = getattr(backend, "encode_batch_fast", None)  # tokenizers >= 0.21: no offsets, parallel in Rust
    out: list[list[int]] = []
    for batch in _char_batches(texts):  # batches bound the memory held by Encoding objects
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


# ------------------------------------------------------------------------------------------- instructions


def _chat_template(tokenizer: Any) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def _render_chat(tokenizer: Any, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """Render a chat with the tokenizer's template; char spans of the assistant turns (prefix differencing)."""
    from jinja2 import TemplateError  # what templates raise, `raise_exception` included (e.g. roles must alternate)

    def render(msgs: list[dict], gen: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        except TemplateError as e:
            raise UserInputError(f"{where}: the tokenizer's chat template rejects this conversation "
                                 f"({first_line(e, 160)}): fix the messages or use another tokenizer") from None

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

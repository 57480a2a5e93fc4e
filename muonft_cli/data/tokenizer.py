"""Tokenizer training for `muonft pretrain`: a byte-level BPE built with Hugging Face `tokenizers`.

Owns `train_bpe`, which learns a GPT-2-style byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation
of Rare Words with Subword Units"; byte-level variant of Radford et al. 2019, GPT-2) on the training text and
returns it as a normal `transformers.PreTrainedTokenizerFast`, so it saves with `save_pretrained` and loads
back with plain `AutoTokenizer.from_pretrained`. Byte-level means every UTF-8 string is encodable (no unknown
token) and decoding round-trips the text exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer on `texts`.

    The special tokens are `<|endoftext|>` (id 0; bos and eos, as in GPT-2: documents are separated by it)
    and `<|pad|>` (id 1; padding, never a training target). No bos is added automatically; the data module
    appends eos after every document. Training is deterministic for the same texts and vocab size.

    Args:
        texts: the training documents (any iterable of strings; consumed once).
        vocab_size: target vocabulary size including the 256 byte symbols and the 2 special tokens. The result
            may be smaller when the text has fewer mergeable pairs.
        min_frequency: a pair must occur at least this often to be merged.

    Returns:
        A `PreTrainedTokenizerFast` with `bos_token`, `eos_token` and `pad_token` set.

    Raises:
        ValueError: `vocab_size` is below 258 (bytes + specials) or the texts are empty.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special "
                         f"tokens), got {vocab_size}")
    seen = {"chars": 0}

    def counted(it: Iterable[str]):
        for t in it:
            if t:
                seen["chars"] += len(t)
                yield t

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(counted(texts), trainer=trainer)
    if seen["chars"] == 0:
        raise ValueError("cannot train a tokenizer on empty text")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=1_000_000_000,
        clean_up_tokenization_spaces=False,
    )

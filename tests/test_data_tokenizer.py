"""Byte-level BPE training (`muonft_cli.data.tokenizer.train_bpe`): round trip, determinism, save/load."""

from __future__ import annotations

import random

import pytest

from muonft_cli.data.tokenizer import EOS_TOKEN, PAD_TOKEN, train_bpe

WORDS = ("the quick brown fox jumps over lazy dog and then runs away into forest where birds sing "
         "while rivers flow under bridges of stone made long ago by people").split()


def corpus(n_docs: int = 20, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(60)) + ".\n" for _ in range(n_docs)]


def test_train_bpe_specials_and_size():
    tok = train_bpe(corpus(), 300)
    assert tok.eos_token == EOS_TOKEN and tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    assert 258 < len(tok) <= 300
    # no special tokens are added to plain text; merges make common words single tokens
    ids = tok("the forest", add_special_tokens=False)["input_ids"]
    assert tok.eos_token_id not in ids
    assert len(ids) < len("the forest")


def test_train_bpe_round_trips_any_utf8():
    tok = train_bpe(corpus(), 300)
    text = "Unseen: naïve café — 東京 😀 \t tabs\nand newlines  "
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in ids


def test_train_bpe_is_deterministic():
    a = train_bpe(corpus(), 320)
    b = train_bpe(iter(corpus()), 320)  # any iterable, same texts
    assert a.get_vocab() == b.get_vocab()
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    c = train_bpe(corpus(seed=1), 320)
    assert c.backend_tokenizer.to_str() != a.backend_tokenizer.to_str()


def test_train_bpe_save_load_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = train_bpe(corpus(), 300)
    tok.save_pretrained(tmp_path / "tok")
    back = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = " ".join(corpus(2, seed=5))
    assert back(text)["input_ids"] == tok(text)["input_ids"]
    assert back.decode(back(text)["input_ids"]) == text
    assert (back.eos_token, back.bos_token, back.pad_token) == (EOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert back.pad_token_id == tok.pad_token_id and back.eos_token_id == tok.eos_token_id


def test_train_bpe_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 258"):
        train_bpe(corpus(), 100)
    with pytest.raises(ValueError, match="empty"):
        train_bpe(["", ""], 300)

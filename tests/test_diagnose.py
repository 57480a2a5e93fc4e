"""`muonft diagnose`: streaming reader, fast vs exact, verdict, recommendation, JSON schema, bad inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import _helpers_diagnose as H
from muonft_cli import spectral as S
from muonft_cli.diagnose import io as diagnose_io, verdict as V
from muonft_cli.cli import app
from muonft_cli.diagnose import analyse, diagnose
from muonft_cli.diagnose.analyse import PREFETCH
from muonft_cli.diagnose.fast import exact_estimate, fast_spectrum

runner = CliRunner()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    return {k: H.write_llama(root / k, k, seed=i) for i, k in enumerate(("init", "adam", "muon"))}


# ------------------------------------------------------------------------------------------- reader


def test_streaming_reads_one_tensor_at_a_time(ckpts):
    ck = diagnose_io.open_checkpoint(ckpts["adam"])
    assert len(ck.matrices) == 2 * 7 + 2
    diagnose_io.reset_read_count()
    recs = analyse(ck, mode="exact", workers=1)
    rc = diagnose_io.read_count
    assert rc["tensors"] == len(ck.matrices)  # every matrix read exactly once
    # one matrix analysed while the reader holds at most PREFETCH more (the byte budget bounds them too)
    assert rc["max_live"] <= 1 + PREFETCH
    assert rc["max_bytes"] == max(s.nbytes for s in ck.matrices)  # reads are per tensor, not per file
    # values equal the reference loader's
    from safetensors.torch import load_file

    ref = load_file(str(ckpts["adam"] / "model.safetensors"))
    r = next(x for x in recs if x["name"] == "model.layers.1.mlp.down_proj.weight")
    m = S.matrix_metrics(ref["model.layers.1.mlp.down_proj.weight"])
    assert r["stable_rank"] == pytest.approx(m["stable_rank"], rel=1e-9)
    assert r["svd_entropy"] == pytest.approx(m["svd_entropy"], abs=1e-9)
    assert r["max_norm"] == pytest.approx(m["max_norm"], rel=1e-6)
    diagnose_io.reset_read_count()
    analyse(ck, mode="exact", workers=2)
    assert diagnose_io.read_count["max_live"] <= 2 + PREFETCH


def test_cli_device_cpu_and_a_read_error_stops_the_pipeline(ckpts, monkeypatch):
    """--device cpu analyses on the CPU (stated in the JSON); an error while the reader thread reads a matrix
    reaches the caller as itself, and no thread is left behind."""
    import threading

    res = runner.invoke(app, ["diagnose", str(ckpts["adam"]), "--json", "--quiet", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["device"] == "cpu" and d["fast_precision"] in ("bf16", "fp32")
    ck = diagnose_io.open_checkpoint(ckpts["adam"])
    spec = ck.matrices[5]

    def boom():
        raise diagnose_io.UserInputError("x: truncated while reading; re-download")

    monkeypatch.setattr(spec, "load", boom)
    before = threading.active_count()
    with pytest.raises(diagnose_io.UserInputError, match="truncated"):
        analyse(ck, mode="exact", workers=2)
    assert threading.active_count() == before


def test_reader_reads_ahead_while_a_matrix_is_analysed(ckpts, monkeypatch):
    """With one worker, matrix 0's analysis waits until the reader has read matrices 1..PREFETCH: it only
    finishes (instead of timing out) because reading runs ahead of computing."""
    import importlib
    import threading

    D = importlib.import_module("muonft_cli.diagnose.analyse")
    ck = diagnose_io.open_checkpoint(ckpts["adam"])
    ahead = threading.Event()
    last = ck.matrices[PREFETCH]
    load = last.load

    def load_and_signal():
        ahead.set()
        return load()

    monkeypatch.setattr(last, "load", load_and_signal)  # no .raw: read(raw=True) falls back to this
    record, waited = D._matrix_record, []

    def slow_first(spec, *a, **k):
        if spec is ck.matrices[0]:
            waited.append(ahead.wait(timeout=30))
        return record(spec, *a, **k)

    monkeypatch.setattr(D, "_matrix_record", slow_first)
    recs = analyse(ck, mode="exact", workers=1)
    assert waited == [True] and len(recs) == len(ck.matrices)


def test_inflight_budget_keeps_one_large_matrix_at_a_time(ckpts, monkeypatch):
    """With workers=2 but a byte budget below two matrices, matrices are analysed one at a time."""
    import importlib

    D = importlib.import_module("muonft_cli.diagnose.analyse")  # the module (the package re-exports the function)

    ck = diagnose_io.open_checkpoint(ckpts["adam"])
    monkeypatch.setattr(D, "INFLIGHT_BYTES", min(4 * s.shape[0] * s.shape[1] for s in ck.matrices))
    diagnose_io.reset_read_count()
    recs = analyse(ck, mode="exact", workers=2)
    assert diagnose_io.read_count["max_live"] == 1 and len(recs) == len(ck.matrices)


def test_sharded_and_single_file_agree(ckpts, tmp_path):
    from safetensors.torch import load_file

    t = load_file(str(ckpts["muon"] / "model.safetensors"))
    names = sorted(t)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    d = tmp_path / "sharded"
    d.mkdir()
    for f, ns in shards.items():
        save_file({n: t[n] for n in ns}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: f for f, ns in shards.items() for n in ns}}))
    a = {r["name"]: r["stable_rank"] for r in analyse(diagnose_io.open_checkpoint(d), mode="exact")}
    b = {r["name"]: r["stable_rank"] for r in
         analyse(diagnose_io.open_checkpoint(ckpts["muon"] / "model.safetensors"), mode="exact")}
    assert a == pytest.approx(b)


def test_gpt2_fused_qkv_is_split(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"h.0.attn.c_attn.weight": torch.randn(32, 96, generator=g),
               "h.0.attn.c_proj.weight": torch.randn(32, 32, generator=g),
               "h.0.mlp.c_fc.weight": torch.randn(32, 128, generator=g),
               "h.0.mlp.c_proj.weight": torch.randn(128, 32, generator=g),
               "wte.weight": torch.randn(100, 32, generator=g)}, str(tmp_path / "model.safetensors"))
    ck = diagnose_io.open_checkpoint(tmp_path)
    types = {s.name: s.layer_type for s in ck.matrices}
    assert types["h.0.attn.c_attn.weight[k]"] == "k" and types["h.0.mlp.c_fc.weight"] == "fc1"
    W = next(s for s in ck.matrices if s.name.endswith("[v]")).read()
    from safetensors.torch import load_file

    torch.testing.assert_close(W, load_file(str(tmp_path / "model.safetensors"))["h.0.attn.c_attn.weight"][:, 64:])


def test_gguf_reader(tmp_path):
    import gguf
    import numpy as np

    g = np.random.default_rng(0)
    W = g.standard_normal((48, 32)).astype(np.float32)  # rows × cols
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_name("toy")
    w.add_tensor("blk.0.attn_q.weight", W)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ck = diagnose_io.open_checkpoint(tmp_path / "m.gguf")
    assert [(s.name, s.layer_type, s.shape) for s in ck.matrices] == [("blk.0.attn_q.weight", "q", (48, 32))]
    torch.testing.assert_close(ck.matrices[0].read(), torch.from_numpy(W))


def test_adapter_spectra_and_merged(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path / "ad")
    rep = diagnose(tmp_path / "ad", mode="exact", per_matrix=True)
    roles = sorted({m["role"] for m in rep["matrices"]})
    assert roles == ["lora_A", "lora_B", "lora_delta"]
    mod = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = 2.0 * (mod.lora_B["default"].weight @ mod.lora_A["default"].weight)  # alpha / r = 2
    d = next(m for m in rep["matrices"] if m["role"] == "lora_delta" and m["layer_type"] == "q")
    assert d["stable_rank"] == pytest.approx(S.stable_rank(delta.detach()), rel=1e-6)
    assert d["spectral_norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta.detach(), 2)), rel=1e-5)
    assert rep["optimizer_guess"] == "unknown" and any("--base" in e for e in rep["evidence"])
    rep2 = diagnose(tmp_path / "ad", base=tmp_path / "base", mode="exact", per_matrix=True)
    merged = next(m for m in rep2["matrices"] if m["role"] == "merged" and m["layer_type"] == "q")
    Wm = mod.base_layer.weight.detach() + delta.detach()  # peft wraps the base layer in place
    assert merged["stable_rank"] == pytest.approx(S.stable_rank(Wm), rel=1e-5)
    assert rep2["base"] == str(tmp_path / "base")


def test_dora_adapter_merged_as_peft_merges_it(tmp_path):
    """Bug: a DoRA adapter's merged matrices were W₀ + s·B·A, ignoring `use_dora` and the magnitude vector. They
    must be what peft's `merge_and_unload` produces: m ⊙ (W₀ + s·B·A) / ‖W₀ + s·B·A‖ (per output row)."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.3)
            elif "lora_magnitude_vector" in n:
                p.mul_(torch.empty_like(p).uniform_(0.3, 3.0))  # far from peft's init ‖W₀‖ (rows rescaled)
    model.save_pretrained(tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"] is True
    peft_merged = {n: p.detach().clone() for n, p in copy.deepcopy(model).merge_and_unload().named_parameters()}

    ck = diagnose_io.open_checkpoint(tmp_path / "ad", tmp_path / "base")
    merged = {s.name[: -len(".merged")]: s for s in ck.matrices if s.role == "merged"}
    assert len(merged) == 3
    rep = diagnose(tmp_path / "ad", base=tmp_path / "base", mode="exact", per_matrix=True)
    by_name = {m["name"]: m for m in rep["matrices"] if m["role"] == "merged"}
    for module, spec in merged.items():
        ref = peft_merged[module[len("base_model.model."):] + ".weight"]  # (out, in)
        torch.testing.assert_close(spec.read(), ref, rtol=1e-5, atol=1e-6)
        r = by_name[module + ".merged"]
        sv = torch.linalg.svdvals(ref.double())
        assert r["stable_rank"] == pytest.approx(float((sv ** 2).sum() / sv[0] ** 2), rel=1e-6)
        assert r["spectral_norm"] == pytest.approx(float(sv[0]), rel=1e-6)
        # and it is not the plain-LoRA merge the old code analysed
        mod = model.get_submodule(module)
        plain = mod.base_layer.weight.detach() + mod.get_delta_weight("default").detach()
        assert not torch.allclose(ref, plain, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------- fast vs exact


@pytest.mark.parametrize("name", ["encoder.layer.0.attention.self.query.weight",
                                  "encoder.layer.3.intermediate.dense.weight",
                                  "encoder.layer.5.output.dense.weight"])
def test_fast_matches_exact_on_trained_matrices(name, real_model):
    """MiniLM's trained matrices (384 × 384/1536): stable rank ≤ 1 % rel, entropy ≤ 0.01 abs, within the bound."""
    ck = diagnose_io.open_checkpoint(real_model("minilm"))
    W = next(s for s in ck.matrices if s.name == name).read()
    e = exact_estimate(W)
    f = fast_spectrum(W, block=12, exact_below=0, max_probes=48)
    assert f.method == "fast"
    assert abs(f.stable_rank / e.stable_rank - 1) <= 0.01
    assert abs(f.stable_rank / e.stable_rank - 1) <= f.stable_rank_rel_err + 1e-9
    assert abs(f.svd_entropy - e.svd_entropy) <= 0.01
    assert abs(f.svd_entropy - e.svd_entropy) <= f.svd_entropy_err
    assert f.frobenius_norm == pytest.approx(e.frobenius_norm, rel=1e-5)


@pytest.fixture(scope="module")
def smollm2_mlp(real_model) -> list[tuple[str, torch.Tensor, object]]:
    """Six trained 576×1536 / 1536×576 MLP matrices of SmolLM2-135M (GGUF, dequantised), spread over its
    layers, each with its exact estimate."""
    ck = diagnose_io.open_checkpoint(real_model("smollm2-gguf"))
    mlp = [s for s in ck.matrices if tuple(s.shape) in ((576, 1536), (1536, 576))]
    out = []
    for s in mlp[:: max(1, len(mlp) // 6)][:6]:
        W = s.read()
        out.append((s.name, W, exact_estimate(W)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp32", "bf16-stored"])
def test_fast_matches_exact_on_real_smollm2_matrices(smollm2_mlp, precision):
    """The fast path (defaults, both product precisions) on real trained matrices large enough for it
    (SmolLM2-135M, 576 × 1536): stable rank ≤ 1 % relative, entropy ≤ 0.01 absolute, each within its reported
    bound, against exact fp64 singular values. ``bf16-stored``: the same matrices saved as bf16 (as most
    checkpoints are), where the Krylov phase runs on split bf16 products. (Slow only on a loaded machine.)"""
    for name, W, e in smollm2_mlp:
        if precision == "bf16-stored":
            W = W.bfloat16()
            e = exact_estimate(W)
        f = fast_spectrum(W, precision="bf16" if precision == "bf16-stored" else precision)
        assert f.method == "fast", name
        sr_err, ent_err = abs(f.stable_rank / e.stable_rank - 1), abs(f.svd_entropy - e.svd_entropy)
        assert sr_err <= 0.01 and sr_err <= f.stable_rank_rel_err + 1e-9, (name, sr_err, f.stable_rank_rel_err)
        assert ent_err <= 0.01 and ent_err <= f.svd_entropy_err, (name, ent_err, f.svd_entropy_err)
        assert f.frobenius_norm == pytest.approx(e.frobenius_norm, rel=1e-5)
        assert f.spectral_norm == pytest.approx(e.spectral_norm, rel=0.01)


def test_bf16_products_keep_a_bf16_matrix_and_agree_with_fp32():
    """A bf16 matrix is used as stored by the bf16 products (no fp32 copy), and the result agrees with fp32
    products well inside the stated accuracy; the stable rank's bound comes from the fp32 refinement."""
    gen = torch.Generator().manual_seed(0)
    U, V = torch.randn(1536, 16, generator=gen), torch.randn(16, 1024, generator=gen)
    W = (torch.randn(1536, 1024, generator=gen) * 0.02 + (U * torch.arange(16, 0, -1) * 0.01) @ V).bfloat16()
    lo, hi = fast_spectrum(W, precision="bf16"), fast_spectrum(W, precision="fp32")
    e = exact_estimate(W)
    assert lo.method == hi.method == "fast"
    assert abs(lo.stable_rank / e.stable_rank - 1) <= lo.stable_rank_rel_err + 1e-9
    assert abs(lo.svd_entropy - e.svd_entropy) <= lo.svd_entropy_err
    assert lo.stable_rank == pytest.approx(hi.stable_rank, rel=1e-3)
    assert lo.svd_entropy == pytest.approx(hi.svd_entropy, abs=2e-3)
    assert lo.frobenius_norm == pytest.approx(e.frobenius_norm, rel=1e-6)
    with pytest.raises(ValueError, match="precision"):
        fast_spectrum(W, precision="fp8")
    assert fast_spectrum(torch.zeros(1536, 1024, dtype=torch.bfloat16), precision="bf16").stable_rank == 0.0


@pytest.mark.parametrize("shape", [(700, 1900), (1900, 700)])
def test_stable_rank_bound_holds_on_a_converged_spectrum(shape):
    """When the Krylov bound is far below fp32's resolution (few strong spikes), the reported bound is floored
    there instead of claiming what fp32 products cannot deliver; tall and wide matrices, both precisions."""
    g = torch.Generator().manual_seed(1)
    W = (torch.randn(*shape, generator=g) * 0.02
         + torch.randn(shape[0], 8, generator=g) @ torch.randn(8, shape[1], generator=g) * 0.01).bfloat16()
    e = exact_estimate(W)
    for precision in ("bf16", "fp32"):
        f = fast_spectrum(W, precision=precision)
        assert abs(f.stable_rank / e.stable_rank - 1) <= f.stable_rank_rel_err, precision
        assert abs(f.svd_entropy - e.svd_entropy) <= f.svd_entropy_err, precision
        assert f.frobenius_norm == pytest.approx(e.frobenius_norm, rel=1e-6)


def test_split_bf16_products_match_fp64_both_orientations():
    """`_split_mm` (bf16 GEMMs, output rounding recovered in the fp32 accumulator) is ~2⁻¹⁷-accurate where plain
    bf16 products are ~2⁻⁹ off; `split_bf16_ok` finds that on any CPU whose bf16 addmm accumulates in fp32."""
    from muonft_cli.diagnose import fast as F

    if not F.split_bf16_ok("cpu"):
        pytest.skip("this CPU's bf16 addmm does not add C in fp32 (the fp32 Krylov fallback runs instead)")
    assert not F.split_bf16_ok("cuda")
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1200, 900, generator=g).bfloat16()
    for left, S_ in ((True, torch.randn(900, 24, generator=g)), (False, torch.randn(24, 1200, generator=g))):
        ref = X.double() @ S_.double() if left else S_.double() @ X.double()
        plain = (X @ S_.bfloat16()) if left else (S_.bfloat16() @ X)
        got = F._split_mm(X, S_, left)
        rel = float((got.double() - ref).abs().max() / ref.abs().max())
        assert got.dtype == torch.float32 and rel < 2.0**-15, rel
        assert float((plain.double() - ref).abs().max() / ref.abs().max()) > 2.0**-10  # what the split recovers


@pytest.mark.parametrize("shape", [(1536, 1024), (1024, 1536)])
def test_split_krylov_agrees_with_fp32_row_blocks(shape, monkeypatch):
    """On a bf16 matrix the split-product Krylov phase and the native Gram operator's give the fp32-product
    estimate (same basis to rounding), all within their bounds of exact SVD; an fp32 matrix never takes the
    split path (it would analyse a rounded copy)."""
    from muonft_cli.diagnose import fast as F

    if not F.split_bf16_ok("cpu"):
        pytest.skip("no split bf16 products on this CPU")
    g = torch.Generator().manual_seed(5)
    U, V = torch.randn(shape[0], 16, generator=g), torch.randn(16, shape[1], generator=g)
    W = (torch.randn(*shape, generator=g) * 0.02 + (U * torch.arange(16, 0, -1) * 0.01) @ V).bfloat16()
    e = exact_estimate(W)
    native = fast_spectrum(W, precision="bf16")  # the native Gram operator's fp32 products, where it builds
    monkeypatch.setattr(F, "_gram_kernel", lambda: None)
    split = fast_spectrum(W, precision="bf16")
    monkeypatch.setattr(F, "split_bf16_ok", lambda device_type="cpu": False)
    blocks = fast_spectrum(W, precision="bf16")
    for f in (native, split, blocks):
        assert abs(f.stable_rank / e.stable_rank - 1) <= f.stable_rank_rel_err + 1e-9
        assert abs(f.svd_entropy - e.svd_entropy) <= f.svd_entropy_err
        assert f.frobenius_norm == pytest.approx(e.frobenius_norm, rel=1e-6)
    for f in (native, split):
        assert f.stable_rank == pytest.approx(blocks.stable_rank, rel=1e-4)
        assert f.svd_entropy == pytest.approx(blocks.svd_entropy, abs=1e-4)
    assert split.stable_rank_rel_err >= 2 * F._SPLIT_EPS  # never claims more than the split products resolve
    calls = []
    monkeypatch.setattr(F, "split_bf16_ok", lambda device_type="cpu": calls.append(1) or True)
    monkeypatch.setattr(F, "_split_mm", lambda *a, **k: pytest.fail("fp32 W took the split path"))
    fast_spectrum(W.float(), precision="bf16")


def test_native_bf16_detection_and_override(monkeypatch):
    from muonft_cli.diagnose import fast as F

    for env, want in (("0", False), ("1", True)):
        monkeypatch.setenv("MUONFT_DIAGNOSE_BF16", env)
        F.native_bf16.cache_clear()
        assert F.native_bf16() is want
    monkeypatch.delenv("MUONFT_DIAGNOSE_BF16")
    F.native_bf16.cache_clear()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if " avx512_bf16" in flags or " amx_bf16" in flags:
        assert F.native_bf16()
    F.native_bf16.cache_clear()


def test_fast_falls_back_to_exact_on_small_matrices():
    W = torch.randn(64, 100)
    f = fast_spectrum(W)
    assert f.method == "exact" and f.stable_rank == pytest.approx(S.stable_rank(W))


# ----------------------------------------------------------------------------------- verdict, recommendation


def test_verdict_on_constructed_spectra(ckpts):
    assert diagnose(ckpts["init"], mode="exact")["optimizer_guess"] == "unknown"
    a = diagnose(ckpts["adam"], mode="exact")
    assert a["optimizer_guess"] == "adam" and a["confidence"] >= 0.6
    m = diagnose(ckpts["muon"], mode="exact")
    assert m["optimizer_guess"] == "muon" and m["confidence"] >= 0.6
    assert a["layer_types"]["q"]["lean"] == "adam-like"


def test_fit_logistic_recovers_separation_and_calibration_file():
    X = torch.tensor([[-1.5, 1.0], [-1.2, 0.8], [-0.1, 0.1], [-0.2, 0.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    w, b = V.fit_logistic(X, y, l2=0.1)
    p = torch.sigmoid(X @ torch.tensor(w, dtype=torch.float64) + b)
    assert (p[:2] < 0.5).all() and (p[2:] > 0.5).all() and (p > 0.01).all() and (p < 0.99).all()
    cal = V.load_calibration()
    assert cal["produced_by"].startswith("bench/calibrate_diagnose.py") and cal["loo_accuracy"] >= 0.8
    assert set(cal) >= {"weights", "bias", "z_moved", "min_confidence", "min_moved"}


def test_recommendation_follows_the_paper():
    assert V.lr_range("lora", "muon", int(6.7e9)) == (1e-4, 5e-4)
    assert V.lr_range("full", "adam", int(2.2e8)) == (5e-5, 1e-4)
    lo7, hi7 = V.lr_range("full", "muon", int(6.7e9))
    lo1, hi1 = V.lr_range("full", "muon", int(1.1e9))
    assert lo7 <= lo1 and hi7 <= hi1  # smaller model, higher LR
    mism = V.recommend("adam", "muon", 10**9, "m", "builtin:kjv", source="x")
    assert mism["method"] == "lora" and mism["lora_rank"] == [8, 32] and "--lora-rank" in mism["command"]
    matched = V.recommend("muon", "muon", 10**9, "m", "builtin:kjv", source="x")
    assert matched["method"] == "full" and "--lora-rank" not in matched["command"]
    unk = V.recommend(None, "adamw", None, "m", "builtin:kjv", source="x")
    assert unk["method"] == "lora" and unk["command"].startswith("muonft finetune --model m")


def test_provenance_is_separate_from_the_spectral_guess(tmp_path):
    d = H.write_llama(tmp_path / "p", "adam", label="muon")  # the file claims muon; the spectra say adam
    rep = diagnose(d, mode="exact")
    assert rep["optimizer_guess"] == "adam"
    assert rep["provenance"] == {"optimizer": "muon", "family": "muon", "source": "muonft.json",
                                 "finetune_optimizer": None}
    assert any("DISAGREES" in e for e in rep["evidence"])
    assert rep["recommendation"]["method"] == "full"  # muon-pretrained (ground truth) + muon target


def test_full_finetune_reports_the_pretraining_optimizer(tmp_path):
    """Bug: a full fine-tune's muonft.json made diagnose report the *fine-tuning* optimizer as the pretraining
    one. Pretrain with AdamW, fully fine-tune with Muon (the real CLI): diagnose says pretrained with adamw, and
    fine-tuned with muon; an older muonft.json without the new fields still reads, via the base's own file."""
    from _helpers_train import FAST, tiny_model_config, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    pre, ft = tmp_path / "pre", tmp_path / "ft"
    r = runner.invoke(app, [str(a) for a in (
        "pretrain", "--model-config", tiny_model_config(tmp_path / "mcfg.json"), "--vocab-size", 300, "--data",
        corpus, "--optim", "adamw", "--lr", "3e-3", "--steps", 2, "--out", pre, "--json", *FAST)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [str(a) for a in (
        "finetune", "--model", pre / "final", "--data", corpus, "--optim", "muon", "--lr", "1e-2", "--steps", 2,
        "--out", ft, "--json", *FAST)])
    assert r.exit_code == 0, r.output
    mj = json.loads((ft / "final" / "muonft.json").read_text())
    assert mj["optimizer"] == "muon" and mj["mode"] == "finetune"  # the old fields stay
    assert mj["pretrain_optimizer"] == "adamw" and mj["finetune_optimizer"] == "muon"
    assert json.loads((pre / "final" / "muonft.json").read_text())["pretrain_optimizer"] == "adamw"
    rep = diagnose(ft / "final", mode="exact")
    assert rep["provenance"] == {"optimizer": "adamw", "family": "adam", "source": "muonft.json",
                                 "finetune_optimizer": "muon"}
    assert rep["recommendation"]["pretrain_optimizer"] == "adam"  # → mismatch with the muon target: LoRA
    assert rep["recommendation"]["method"] == "lora"
    res = runner.invoke(app, ["diagnose", str(ft / "final"), "--quiet", "--exact"])
    assert res.exit_code == 0, res.output
    assert "pretrained with adamw" in res.stdout and "fine-tuned with muon" in res.stdout
    # a muonft.json written before these fields: the base's muonft.json says how it was pretrained
    for k in ("pretrain_optimizer", "finetune_optimizer"):
        del mj[k]
    (ft / "final" / "muonft.json").write_text(json.dumps(mj))
    rep = diagnose(ft / "final", mode="exact")
    assert rep["provenance"]["optimizer"] == "adamw" and rep["provenance"]["finetune_optimizer"] == "muon"
    # ... and with no base to ask, the pretraining optimizer is unknown, never the fine-tuning one
    mj["base_model"] = str(tmp_path / "gone")
    (ft / "final" / "muonft.json").write_text(json.dumps(mj))
    rep = diagnose(ft / "final", mode="exact")
    assert rep["provenance"]["optimizer"] is None and rep["provenance"]["finetune_optimizer"] == "muon"


def test_provenance_families_are_the_shared_ones():
    """One family function (`_common.optimizer_family`): Lion and Adafactor are Adam-like, SGD is neither."""
    fam = {o: V.read_provenance({"training_args": {"optim": o}}, "x")["family"]
           for o in ("adamw_torch", "lion_32bit", "adafactor", "sgd", "adamuon")}
    assert fam == {"adamw_torch": "adam", "lion_32bit": "adam", "adafactor": "adam", "sgd": None, "adamuon": "muon"}


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_json_schema(ckpts):
    res = runner.invoke(app, ["diagnose", str(ckpts["adam"]), "--json", "--per-matrix", "--quiet"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)  # nothing but JSON on stdout
    for k in ("path", "n_matrices", "mode", "optimizer_guess", "confidence", "evidence", "layer_types", "matrices",
              "recommendation", "provenance"):
        assert k in d
    assert d["optimizer_guess"] in ("adam", "muon", "unknown") and 0 <= d["confidence"] <= 1
    assert d["n_matrices"] == len(d["matrices"]) == 16
    for m in d["matrices"]:
        assert {"name", "shape", "layer_type", "stable_rank", "svd_entropy"} <= set(m)
    rec = d["recommendation"]
    assert rec["method"] in ("lora", "full") and set(rec["lr"]) == {"min", "max"}
    assert {"target_optim", "reasons", "command", "lora_rank"} <= set(rec)


def test_cli_table_and_subprocess(ckpts):
    res = runner.invoke(app, ["diagnose", str(ckpts["muon"]), "--quiet", "--exact", "--target-optim", "adamw"])
    assert res.exit_code == 0, res.output
    assert "Spectral guess" in res.stdout and "muonft finetune" in res.stdout
    p = subprocess.run([sys.executable, "-m", "muonft_cli", "diagnose", str(ckpts["adam"]), "--json"],
                       capture_output=True, text=True, env=os.environ | {"HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["optimizer_guess"] == "adam"


def _bad_inputs(tmp_path: Path, good: Path) -> dict[str, list[str]]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "tok").mkdir()
    save_file({"a": torch.ones(3), "b": torch.ones(4)}, str(tmp_path / "tok" / "model.safetensors"))
    raw = (good / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\x00" * 20)
    return {
        "missing": [str(tmp_path / "nope")],
        "not a checkpoint": [str(tmp_path / "empty")],
        "no matrices": [str(tmp_path / "tok")],
        "truncated": [str(tmp_path / "trunc.safetensors")],
        "corrupt": [str(tmp_path / "garbage.safetensors")],
        "bad gguf": [str(tmp_path / "garbage.gguf")],
        "both modes": [str(good), "--exact", "--fast"],
        "bad target": [str(good), "--target-optim", "sgd"],
        "base on a model": [str(good), "--base", str(good)],
        "bad device": [str(good), "--device", "tpu"],
        **({} if torch.cuda.is_available() else {"cuda without CUDA": [str(good), "--device", "cuda"]}),
    }


def test_bad_inputs_exit_2_one_line(ckpts, tmp_path):
    for what, args in _bad_inputs(tmp_path, ckpts["init"]).items():
        res = runner.invoke(app, ["diagnose", *args, "--quiet"])
        assert res.exit_code == 2, (what, res.output)
        err = res.stderr.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in res.output, (what, err)
        assert res.stdout == "", what


# ------------------------------------------------------------------------------------------ real models


@pytest.mark.slow
def test_minilm_is_adam(real_model):
    rep = diagnose(real_model("minilm"))
    assert rep["optimizer_guess"] == "adam", rep["evidence"]


@pytest.mark.slow
def test_smollm2_gguf_is_adam(real_model):
    rep = diagnose(real_model("smollm2-gguf"))
    assert rep["optimizer_guess"] == "adam", rep["evidence"]
    assert rep["kind"] == "gguf" and rep["layer_types"]["down"]["count"] == 30


@pytest.mark.slow
def test_labelled_pretrain_checkpoints_are_classified(tmp_path):
    """`muonft pretrain` checkpoints (cached in .cache/muonft-tests/, gitignored) come out as trained."""
    for optim, expected in (("adamw", "adam"), ("muon", "muon")):
        final = H.labelled_pretrain(optim)
        rep = diagnose(final, mode="exact")
        assert rep["optimizer_guess"] == expected, (optim, rep["evidence"])
        assert rep["provenance"]["family"] == expected


def test_render_prints_commands_verbatim():
    """Rich must not eat `[lora]`-style text as markup: the printed commands are copy-paste ready."""
    from rich.console import Console

    from muonft_cli.render import render_diagnose as render

    rec = {"target_optim": "muon", "method": "lora", "lora_rank": [8, 32], "lr": {"min": 2e-3, "max": 8e-3},
           "reasons": ["keep lora_A[0] moderate"],
           "command": "muonft finetune --model m --lora-rank 16 --out runs/ft-muon",
           "sweep_command": "muonft sweep recipes/sweep-finetune.yaml --set 'sweep.methods=[lora]' --workers 2"}
    report = {"path": "ckpt[1]", "kind": "hf", "n_matrices": 0, "mode": "exact", "seconds": 0.1, "layer_types": {},
              "optimizer_guess": "adam", "confidence": 0.9, "evidence": ["q [x]"], "recommendation": rec}
    console = Console(record=True, width=60)
    render(report, console=console)
    text = console.export_text()
    assert "'sweep.methods=[lora]'" in text and "ckpt[1]" in text and "q [x]" in text
    assert rec["sweep_command"] in text.replace("\n", "") or rec["sweep_command"] in text


# ------------------------------------------------------------------- issue 11: diagnose must not mislead


def _tiny_pretrain(out: Path, optim: str, steps: int, lr: str, tokenizer: Path | None = None) -> Path:
    """A real `muonft pretrain` of the tiny preset at the demo's --quick sizes (seconds); returns final/."""
    args = ["pretrain", "--preset", "tiny", "--vocab-size", "300", "--data", "builtin:shakespeare", "--optim", optim,
            "--lr", lr, "--steps", str(steps), "--seq-len", "32", "--batch-size", "4", "--set",
            "data.max_documents=60", "--set", "eval.max_batches=1", "--eval-every", "0", "--save-every", "0",
            "--out", str(out), "--quiet", "--json"] + (["--tokenizer", str(tokenizer)] if tokenizer else [])
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    return out / "final"


def test_barely_trained_adam_pretrain_is_unknown_not_muon(tmp_path):
    """Bug: a 10-step AdamW `muonft pretrain` without its muonft.json was called `muon` (confidence 0.96) — a
    barely trained model is near its random init, which looks Muon-like. It must be `unknown`, with the reason,
    no confidence and no P(muon) (the logistic model was fitted on trained checkpoints)."""
    final = _tiny_pretrain(tmp_path / "pre", "adamw", 10, "1.5e-3")
    (final / "muonft.json").unlink()
    rep = diagnose(final, mode="exact")
    assert rep["optimizer_guess"] == "unknown", rep["evidence"]
    assert rep["unknown_reason"] == "weights are still close to a random initialisation"
    assert rep["confidence"] is None and rep["p_muon"] is None and rep["features"]["near_init"] >= 0.5
    assert rep["recommendation"]["method"] == "lora"  # unknown → the mismatch-robust choice, not "full"
    res = runner.invoke(app, ["diagnose", str(final), "--quiet", "--exact"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.stdout.splitlines() if "Spectral guess" in x)
    assert "unknown" in line and "close to a random initialisation" in line and "confidence" not in line


def test_random_init_is_unknown_with_no_confidence(ckpts):
    """Bug: a random init came out `unknown (confidence 0.96)` with p_muon 0.977. `confidence` is the probability
    of the printed verdict: None for unknown (the reason says why), and so is p_muon when nothing moved."""
    rep = diagnose(ckpts["init"], mode="exact")
    assert rep["optimizer_guess"] == "unknown" and rep["confidence"] is None and rep["p_muon"] is None
    assert rep["unknown_reason"] == "weights are still close to a random initialisation"
    for kind in ("adam", "muon"):  # a guess: confidence = P(guess), p_muon the model's P(muon)
        r = diagnose(ckpts[kind], mode="exact")
        assert r["optimizer_guess"] == kind and r["unknown_reason"] is None
        assert r["confidence"] == pytest.approx(r["p_muon"] if kind == "muon" else 1 - r["p_muon"], abs=1e-4)
    res = runner.invoke(app, ["diagnose", str(ckpts["init"]), "--json", "--quiet"])
    d = json.loads(res.stdout)
    assert d["confidence"] is None and d["optimizer_guess"] == "unknown"


def test_provenance_wins_over_disagreeing_spectra_and_says_so(tmp_path):
    """Provenance says adamw, the spectra look Muon: the recommendation follows adamw (mismatch with a muon
    target → LoRA) and says the spectra disagree (a JSON field, a reason, a line in the table)."""
    d = H.write_llama(tmp_path / "p", "muon", label="adamw")
    rep = diagnose(d, mode="exact")
    assert rep["optimizer_guess"] == "muon" and rep["provenance"]["family"] == "adam"
    rec = rep["recommendation"]
    assert rep["spectra_disagree"] is True and rec["spectra_disagree"] is True
    assert rec["pretrain_optimizer"] == "adam" and rec["method"] == "lora" and "--lora-rank" in rec["command"]
    assert "disagree" in rec["reasons"][0] and "follows provenance" in rec["reasons"][0]
    res = runner.invoke(app, ["diagnose", str(d), "--quiet", "--exact"])
    assert res.exit_code == 0, res.output
    assert "Provenance and spectra disagree" in res.stdout and "follows provenance" in res.stdout
    agree = diagnose(H.write_llama(tmp_path / "q", "muon", label="muon"), mode="exact")
    assert agree["spectra_disagree"] is False and not any("disagree" in r for r in agree["recommendation"]["reasons"])


def test_adapter_uses_the_base_it_records_and_its_command_runs(tmp_path, tiny_model_dir, corpus):
    """Bug: an adapter diagnosed without --base was `unknown (confidence 1.00)`, "no hidden matrices", although
    its muonft.json names its base; and the printed `muonft finetune --model ADAPTER ... --lora-rank 16` is
    refused by finetune. The recorded base is used (and said), and the printed command runs."""
    import shlex

    from _helpers_train import FAST

    ad = tmp_path / "ft"
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "adamw",
                            "--lr", "1e-3", "--lora-rank", "4", "--steps", "1", "--out", str(ad), *FAST])
    assert r.exit_code == 0, r.output
    final = ad / "final"
    rep = diagnose(final, mode="exact", data=str(corpus))
    assert rep["base"] == str(tiny_model_dir) and rep["base_source"] == "muonft.json"
    assert any(e.startswith(f"base: {tiny_model_dir} (from the adapter's muonft.json)") for e in rep["evidence"])
    assert rep["features"]["n_hidden"] > 0 and not any("no hidden" in e for e in rep["evidence"])
    res = runner.invoke(app, ["diagnose", str(final), "--quiet", "--exact", "--data", str(corpus)])
    assert res.exit_code == 0, res.output
    assert f"base: {tiny_model_dir} (from the adapter's muonft.json)" in res.stdout
    # the printed command fine-tunes the base, and finetune accepts it (one step here)
    cmd = shlex.split(rep["recommendation"]["command"])
    assert cmd[:2] == ["muonft", "finetune"] and cmd[cmd.index("--model") + 1] == str(tiny_model_dir)
    cmd[cmd.index("--out") + 1] = str(tmp_path / "from-diagnose")
    r = runner.invoke(app, [*cmd[1:], "--steps", "1", *FAST])
    assert r.exit_code == 0, r.output
    # without muonft.json: peft's adapter_config.json names the base
    (final / "muonft.json").unlink()
    rep = diagnose(final, mode="exact")
    assert rep["base"] == str(tiny_model_dir) and rep["base_source"] == "adapter_config.json"
    # a base that is gone: one clear reason, no confidence, no command that cannot run
    acfg = json.loads((final / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (final / "adapter_config.json").write_text(json.dumps(acfg))
    rep = diagnose(final, mode="exact")
    assert rep["base"] is None and rep["optimizer_guess"] == "unknown" and rep["confidence"] is None
    assert "was not found" in rep["base_note"] and "--base" in rep["base_note"]
    assert not any("no hidden" in e for e in rep["evidence"])
    assert rep["recommendation"]["command"] is None and rep["recommendation"]["sweep_command"] is None
    res = runner.invoke(app, ["diagnose", str(final), "--quiet", "--exact"])
    assert res.exit_code == 0, res.output
    assert "was not found" in res.stdout and "no finetune command" in res.stdout
    # a hub id: diagnose reads local files only, but finetune can download it, so the command names it
    acfg["base_model_name_or_path"] = "some-org/some-model"
    (final / "adapter_config.json").write_text(json.dumps(acfg))
    rep = diagnose(final, mode="exact")
    assert rep["base"] is None and "hub id" in rep["base_note"]
    assert "--model some-org/some-model" in rep["recommendation"]["command"]

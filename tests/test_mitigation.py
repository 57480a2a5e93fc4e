"""Issue 14 §2, mismatch mitigations for full fine-tuning (`muonft_cli.optim.constraints`, Muon's `update_rank`):
the formulas against closed forms and exact SVDs, bit-identity when off, resume bit-exactness with one on,
checkpointed anchors, `trust_norm: auto` from the base's provenance, and the CLI with `--set optimizer.…`."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from _helpers_models import tiny_llama
from _helpers_train import one_line_error, read_metrics
from muonft_cli import config as cfgmod
from muonft_cli import train
from muonft_cli.cli import app
from muonft_cli.optim import build_optimizer
from muonft_cli.optim import constraints as C
from muonft_cli.optim.muon import Muon
from muonft_cli.optim.update import update_scale

runner = CliRunner()


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


def _train(model, opt, steps: int = 4) -> None:
    for i in range(steps):
        x = _batch(i)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _matrices(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.ndim >= 2}


# ------------------------------------------------------------------------------------------- anchored decay


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_anchor_decay_with_zero_gradient_is_geometric_toward_w0(name):
    model = tiny_llama(0)
    lr, lam, steps = 0.1, 0.5, 6
    opt = build_optimizer(model, name, lr=lr, anchor_decay=lam)
    w0 = {n: p.detach().clone() for n, p in _matrices(model).items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in _matrices(model).values():
            p.add_(torch.randn(p.shape, generator=g))  # W = W0 + D after the anchors were taken
    d = {n: p.detach() - w0[n] for n, p in _matrices(model).items()}
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for n, p in _matrices(model).items():  # W_t − W0 = (1 − ηλ)^t · D
        torch.testing.assert_close(p.detach() - w0[n], (1 - lr * lam) ** steps * d[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_constraints_that_never_bind_leave_the_optimizer_bit_identical(name):
    """λ = 0 and a trust region too wide to bind, attached: the very same weights as the plain optimizer."""
    plain_m, cons_m = tiny_llama(0), tiny_llama(0)
    plain = build_optimizer(plain_m, name, lr=1e-2)
    assert not hasattr(plain, "constraints")  # off by default: nothing attached at all
    cons = build_optimizer(cons_m, name, lr=1e-2)
    for norm in ("spectral", "max"):
        C.attach(cons, C.ConstraintSpec(anchor_decay=0.0, trust_radius=1e6, trust_norm=norm),
                 [r.param for r in cons.param_split.muon])
    _train(plain_m, plain)
    _train(cons_m, cons)
    for (n, a), (_, b) in zip(plain_m.named_parameters(), cons_m.named_parameters()):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------------------------------- trust region


def _projection_reference(delta: torch.Tensor, radius: float) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u * s.clamp(max=radius)) @ vh


@pytest.mark.parametrize("over", [3, 20], ids=["few-over-subspace", "many-over-exact-svd"])
def test_spectral_projection_matches_the_exact_svd_projection(over):
    g = torch.Generator().manual_seed(0)
    m, n = 40, 24
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    s = torch.cat([torch.linspace(10, 6, over), torch.linspace(1, 0.1, n - over)]).double()
    delta = ((u * s) @ v.mT).float()
    anchor = torch.randn(m, n, generator=g)
    w = anchor + delta
    basis = C._start_basis(n, min(C.TRUST_RANK, n), w.device, torch.float32)
    new_basis, exact = C.spectral_clip_(w, anchor, 2.0, basis, iters=C._FIRST_ITERS)
    assert exact == (over >= C.TRUST_RANK)
    torch.testing.assert_close((w - anchor).double(), _projection_reference(delta, 2.0), rtol=0, atol=2e-5)
    assert torch.linalg.matrix_norm((w - anchor).double(), ord=2) <= 2.0 + 1e-4
    assert new_basis.shape == (n, min(2 * C.TRUST_RANK, n) if exact else C.TRUST_RANK)


def test_max_projection_clamps_entries_and_leaves_the_rest_bit_identical():
    g = torch.Generator().manual_seed(0)
    anchor, delta = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    w = anchor + delta
    inside = (w - anchor).abs() <= 0.5
    before = w.clone()
    C.max_clip_(w, anchor, 0.5)
    assert torch.equal(w[inside], before[inside])
    torch.testing.assert_close(w - anchor, delta.clamp(-0.5, 0.5), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("norm", ["spectral", "max"])
def test_trust_region_holds_after_steps(name, norm):
    model, rho = tiny_llama(0), 0.02
    opt = build_optimizer(model, name, lr=3e-2, trust_radius=rho, trust_norm=norm)
    hidden = {id(r.param) for r in opt.param_split.muon}
    w0 = {n: p.detach().clone() for n, p in _matrices(model).items()}
    _train(model, opt, steps=5)
    moved = 0
    for n, p in _matrices(model).items():
        d, a = p.detach() - w0[n], w0[n]
        if norm == "spectral" and id(p) in hidden:  # hidden matrices: the spectral ball
            measure = lambda x: float(torch.linalg.matrix_norm(x.double(), ord=2))  # noqa: E731
        else:  # embeddings / head (AdamW-trained in pretraining either way), or norm max: the max-norm box
            measure = lambda x: float(x.abs().max())  # noqa: E731
        assert measure(d) <= rho * measure(a) * (1 + 1e-4) + 1e-7, n
        moved += measure(d) > 0.5 * rho * measure(a)
    assert moved > len(w0) // 2  # the region binds: this is not a test of an optimizer that did not move
    drift = opt.constraints.drift()
    assert drift["matrices"] == len(w0) and drift[f"{norm}_rel"] <= rho * (1 + 1e-4)


# ------------------------------------------------------------------------------------------- rank-limited Muon


def _spiked(m: int, n: int, top: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0][:, : min(m, n)]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0][:, : min(m, n)]
    s = torch.tensor(top + [0.5 * 0.9**i for i in range(min(m, n) - len(top))], dtype=torch.float64)
    return ((u * s) @ v.mT).float()


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)], ids=["wide", "tall"])
def test_rank_limited_update_is_the_top_k_of_the_orthogonalised_update(shape):
    k, lr = 3, 0.1
    grad = _spiked(*shape, [9.0, 8.0, 7.0, 6.5])
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = Muon([w], lr=lr, ns_method="svd", update_rank=k)
    w.grad = grad.clone()
    opt.step()
    u, _, vh = torch.linalg.svd(grad.double(), full_matrices=False)  # the reference: exact top-k of polar(G)
    expected = -lr * update_scale("match_rms_adamw", *shape) * (u[:, :k] @ vh[:k])
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=1e-5)
    assert opt.state[w]["rank_basis"].shape == (shape[0], C.rank_basis_width(k, *shape))


def test_rank_limited_update_has_rank_at_most_k_with_newton_schulz():
    model = tiny_llama(0)
    opt = build_optimizer(model, "muon", lr=1e-2, update_rank=2)
    before = {id(r.param): r.param.detach().clone() for r in opt.param_split.muon}
    x = _batch()
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    for r in opt.param_split.muon:
        step = r.param.detach() - before[id(r.param)]
        assert int(torch.linalg.matrix_rank(step.double(), rtol=1e-6)) <= 2, r.name
        assert float(step.abs().max()) > 0


def test_update_rank_is_refused_outside_muon(tiny_model_dir, corpus, tmp_path):
    with pytest.raises(ValueError, match="update_rank"):
        build_optimizer(tiny_llama(0), "adamw", update_rank=2)
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "adamw",
                            "--out", str(tmp_path / "o"), "--set", "optimizer.update_rank=2"])
    one_line_error(r, "optimizer.update_rank")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- checkpoints


def test_anchors_travel_in_the_state_dict_so_a_loop_that_loads_weights_first_keeps_w0():
    """HF Trainer's order on resume: model checkpoint first, optimizer built after, its state loaded last."""
    model = tiny_llama(0)
    opt = build_optimizer(model, "muon", lr=1e-2, anchor_decay=0.1, trust_radius=0.05, trust_norm="spectral")
    w0 = {n: p.detach().clone() for n, p in _matrices(model).items()}
    _train(model, opt, steps=3)
    sd = opt.state_dict()
    assert C.STATE_KEY in sd
    again = build_optimizer(model, "muon", lr=1e-2, anchor_decay=0.1, trust_radius=0.05, trust_norm="spectral")
    moved = {n: p for n, p in _matrices(model).items() if not torch.equal(p, w0[n])}
    assert moved and all(torch.equal(again.constraints.state[p]["anchor"], p) for p in moved.values())
    again.load_state_dict(sd)
    for n, p in _matrices(model).items():
        st = again.constraints.state[p]
        assert torch.equal(st["anchor"], w0[n]), n
        assert st["radius"] == opt.constraints.state[p]["radius"]
        if "basis" in opt.constraints.state[p]:
            assert torch.equal(st["basis"], opt.constraints.state[p]["basis"])


def _cfg(out, model, data, **flags):
    f = {"model.name_or_path": str(model), "data.path": str(data), "output.dir": str(out), "data.seq_len": 16,
         "train.batch_size": 4, "train.micro_batch_size": 4, "train.eval_every": 0, "eval.max_batches": 1,
         "data.max_documents": 20, "train.steps": 6, "train.save_every": 3, "train.keep_last": 2, **flags}
    return cfgmod.resolve(flags=f)


@pytest.mark.parametrize("optim,extra", [
    ("adamw", {"optimizer.anchor_decay": 0.5, "optimizer.trust_radius": 0.02, "optimizer.trust_norm": "spectral"}),
    ("muon", {"optimizer.update_rank": 2, "optimizer.trust_radius": 0.02, "optimizer.trust_norm": "spectral"}),
], ids=["adamw-anchor-trust", "muon-rank-trust"])
def test_resume_with_a_mitigation_is_bit_exact(tiny_model_dir, corpus, tmp_path, optim, extra):
    from test_train import _KillAt

    flags = {"optimizer.name": optim, "optimizer.lr": 2e-2, **extra}
    full, cut = tmp_path / "full", tmp_path / "cut"
    s_full = train.run(_cfg(full, tiny_model_dir, corpus, **flags), "finetune")
    with pytest.raises(train.TrainingInterrupted):
        train.run(_cfg(cut, tiny_model_dir, corpus, **flags), "finetune", sink=_KillAt(4))
    s_cut = train.run(_cfg(cut, tiny_model_dir, corpus, **flags), "finetune", resume=True)
    for ra, rb in zip(read_metrics(full), read_metrics(cut), strict=True):
        assert (ra["loss"], ra["grad_norm"]) == (rb["loss"], rb["grad_norm"]), ra["step"]
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "final" / "model.safetensors")), load_file(str(cut / "final" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert s_full["drift"] == s_cut["drift"] and s_full["drift"]["spectral_rel"] <= 0.02 * (1 + 1e-4)
    assert s_full["mitigation"]["update_rank"] == extra.get("optimizer.update_rank")


# ------------------------------------------------------------------------------------------- engine and CLI


FAST = ["--steps", "3", "--seq-len", "16", "--batch-size", "4", "--set", "data.max_documents=20", "--set",
        "eval.max_batches=1", "--eval-every", "0", "--save-every", "0", "--quiet", "--json"]


def _labelled(tiny_model_dir, tmp_path, optimizer: str | None):
    base = tmp_path / f"base-{optimizer}"
    shutil.copytree(tiny_model_dir, base)
    if optimizer is not None:
        (base / "muonft.json").write_text(json.dumps({"mode": "pretrain", "optimizer": optimizer, "steps": 300}))
    return base


@pytest.mark.parametrize("pretrained,norm", [("muon", "spectral"), ("adamw", "max")])
def test_cli_trust_norm_auto_follows_the_base_and_the_summary_records_drift(tiny_model_dir, corpus, tmp_path,
                                                                              pretrained, norm):
    base, out = _labelled(tiny_model_dir, tmp_path, pretrained), tmp_path / "run"
    r = runner.invoke(app, ["finetune", "--model", str(base), "--data", str(corpus), "--optim", "adamw", "--lr", "3e-2",
                            "--out", str(out), "--set", "optimizer.trust_radius=0.01", "--set",
                            "optimizer.anchor_decay=0.1", *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    mit = summary["mitigation"]
    assert mit["trust_norm"] == norm and mit["trust_choice"]["source"] == "muonft.json"
    assert mit["anchor_decay"] == 0.1 and mit["state_bytes"] > 0
    assert summary["drift"][f"{norm}_rel"] <= 0.01 * (1 + 1e-4)
    assert "trust_norm: " + norm in (out / "config.yaml").read_text()  # resolved, so --resume agrees


def test_cli_plain_full_run_records_drift_against_the_base(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "plain"
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "muon",
                            "--lr", "1e-2", "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert "mitigation" not in summary
    from safetensors.torch import load_file

    base, final = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(out / "final" / "model.safetensors"))
    pairs = [(final[k], base[k], ".layers." in k) for k in base if base[k].ndim >= 2 and k in final]
    assert summary["drift"] == pytest.approx(C.drift_norms(pairs), rel=1e-6)
    assert summary["drift"]["fro"] > 0


def test_cli_trust_norm_auto_on_an_unknown_base_is_one_line(tiny_model_dir, corpus, tmp_path):
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "adamw",
                            "--out", str(tmp_path / "o"), "--set", "optimizer.trust_radius=0.05", *FAST])
    one_line_error(r, "trust_norm auto", "optimizer.trust_norm=spectral")
    assert not (tmp_path / "o").exists()


def test_bad_mitigation_values_are_config_errors(tiny_model_dir, corpus, tmp_path):
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--out",
                            str(tmp_path / "o"), "--set", "optimizer.trust_norm=frobenius", "--set",
                            "optimizer.anchor_decay=-1"])
    assert r.exit_code == 2 and "optimizer.trust_norm" in r.output and "optimizer.anchor_decay" in r.output


def test_mitigation_keys_at_their_defaults_keep_old_cell_hashes():
    from muonft_cli.sweep.plan import config_hash

    plain = cfgmod.to_dict(cfgmod.RunConfig())
    old = json.loads(json.dumps(plain))
    for key in ("anchor_decay", "trust_radius", "trust_norm", "update_rank"):
        old["optimizer"].pop(key)
    assert config_hash(plain) == config_hash(old)
    on = cfgmod.to_dict(cfgmod.from_dict({"optimizer": {"anchor_decay": 0.1}}))
    assert config_hash(on) != config_hash(plain)


def test_large_matrices_take_a_power_iteration_spectral_norm_close_to_the_exact_one(monkeypatch):
    monkeypatch.setattr(C, "EXACT_NORM_MAX_DIM", 8)
    x = _spiked(40, 24, [5.0, 3.0])
    assert C._spectral_norm(x) == pytest.approx(float(torch.linalg.matrix_norm(x.double(), ord=2)), rel=1e-5)


def test_spectral_trust_region_holds_when_singular_values_cluster_at_the_radius():
    """Bug: with the top of Δ's spectrum held at the radius by earlier projections, the warm-started subspace
    iteration returned inexact triplets and the clipped Δ stayed up to ~10 % over the radius."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    opt = build_optimizer(model, "adamw", lr=3e-3, trust_radius=0.1, trust_norm="spectral")
    w0 = {id(r.param): r.param.detach().clone() for r in opt.param_split.muon}
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x = torch.randint(0, 512, (8, 32), generator=g)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for r in opt.param_split.muon:
        a = w0[id(r.param)].double()
        d = r.param.detach().double() - a
        assert torch.linalg.matrix_norm(d, ord=2) <= 0.1 * torch.linalg.matrix_norm(a, ord=2) * (1 + 2e-3), r.name


def test_cli_lora_run_records_the_drift_of_its_merged_update(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "lora"
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "muon",
                            "--lr", "3e-2", "--lora-rank", "4", "--out", str(out), *FAST])
    assert r.exit_code == 0, r.output
    drift = json.loads((out / "summary.json").read_text())["drift"]
    assert drift["matrices"] == 14 and drift["fro"] > 0  # 2 layers x 7 adapted linears; embeddings untouched
    assert drift["fro_rel"] == pytest.approx(drift["fro_rel_hidden"])

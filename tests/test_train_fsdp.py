"""`--strategy fsdp` (FSDP2 with sharded Muon) on CPU with gloo, 2 ranks under torchrun: the loss curve of one
process, about half the parameter / gradient / optimizer-state bytes per rank, the NS work split, checkpoints
that survive `kill -9` and resume to the uninterrupted curve, LoRA, two "nodes" on localhost, and the bad input.

The torchrun runs take half a minute each on a loaded 2-core machine: they are marked `slow`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _helpers_train import one_line_error, read_metrics, wide_model_dir

from muonft_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
KILLER = Path(__file__).resolve().parent / "_fsdp_kill_after.py"
PROBE = Path(__file__).resolve().parent / "_fsdp_load_probe.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
STEPS = 12


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--steps", str(STEPS), "--batch-size", "4",
            "--micro-batch-size", "1", "--seq-len", "16", "--eval-every", "6", "--val-fraction", "0.2",
            "--lr", "0.01", "--warmup-ratio", "0.1", "--save-every", "4", "--json", "--quiet", "--out", str(out),
            *extra]


def _torchrun(args: list[str], nproc: int = 2, script: Path | None = None, launcher: list[str] | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "muonft_cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *(launcher or ["--standalone"]),
           "--nproc_per_node", str(nproc), *target, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-4000:]
    return r


def _summary(r: subprocess.CompletedProcess) -> dict:
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, r.stdout  # only rank 0 prints
    return json.loads(lines[0])


def _single(args: list[str]) -> dict:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def _assert_curve(one: Path, two: Path, rel: float = 1e-3) -> None:
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == STEPS
    assert b == pytest.approx(a, rel=rel)
    assert read_metrics(two)[-1]["val_loss"] == pytest.approx(read_metrics(one)[-1]["val_loss"], rel=rel)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return wide_model_dir(tmp_path_factory.mktemp("wide") / "model")


@pytest.fixture(scope="module")
def fsdp_muon(tmp_path_factory, wide, corpus) -> dict:
    """One uninterrupted 2-rank FSDP2 Muon run and its single-process twin (shared by several tests)."""
    d = tmp_path_factory.mktemp("fsdp_muon")
    one = _single(_args(wide, corpus, d / "one", "--optim", "muon"))
    two = _summary(_torchrun(_args(wide, corpus, d / "two", "--optim", "muon", "--strategy", "fsdp")))
    return {"dir": d, "one": one, "two": two}


# ------------------------------------------------------------------------------------------------ bad input


def test_fsdp_bad_input_is_one_line(tmp_path, tiny_model_dir, corpus):
    base = ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "1", "--quiet"]
    for extra, needles in [
        (["--strategy", "zero3"], ("train.strategy", "ddp, fsdp")),
        (["--strategy", "fsdp", "--optim", "adamuon"], ("--strategy fsdp", "adamuon", "--strategy ddp")),
        (["--strategy", "fsdp", "--lora-rank", "4", "--merge"], ("--merge", "--strategy fsdp")),
        (["--strategy", "fsdp", "--set", "optimizer.anchor_decay=1.0"], ("mitigations", "--strategy ddp")),
        (["--strategy", "fsdp", "--lora-rank", "4", "--lora-variant", "pissa"], ("pissa", "--strategy ddp")),
    ]:
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        r = CliRunner().invoke(app, [*base, "--out", str(out), *extra])
        one_line_error(r, *needles)
        assert not out.exists()  # nothing written


def test_fsdp_with_one_process_says_it_runs_unsharded(tmp_path, tiny_model_dir, corpus):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--steps", "2",
                                 "--seq-len", "16", "--batch-size", "2", "--micro-batch-size", "2", "--optim", "muon",
                                 "--strategy", "fsdp", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "--strategy fsdp with one process: nothing to shard, training runs unsharded" in r.output
    assert json.loads((out / "summary.json").read_text())["strategy"] is None


def test_meta_build_is_the_loaded_model_without_storage(tmp_path, monkeypatch):
    """`load_model(on_meta=True)` (FSDP2 ranks other than 0): the loaded model's parameter names, shapes,
    dtypes, tied weights and LoRA targets, on the meta device, with no weight file read."""
    from muonft_cli import models
    from muonft_cli.config import LoraConfig, ModelConfig
    from muonft_cli.models import load as load_mod

    d = _tied_model_dir(tmp_path / "tied")
    ref, _ = models.load_model(ModelConfig(name_or_path=str(d)), "cpu", dtype="bf16")
    monkeypatch.setattr(load_mod, "_load_weights", lambda *a, **k: pytest.fail("weights read"))
    for where in (d, d / "model.safetensors"):
        meta, tok = models.load_model(ModelConfig(name_or_path=str(where)), "cpu", dtype="bf16", on_meta=True)
        assert models.is_meta(meta) and tok.pad_token is not None
        assert all(p.is_meta for p in meta.parameters())
        assert meta.lm_head.weight is meta.model.embed_tokens.weight
        assert [(n, p.shape, p.dtype) for n, p in meta.named_parameters()] == \
            [(n, p.shape, p.dtype) for n, p in ref.named_parameters()]
        assert models.loaded_dtypes(meta) == models.loaded_dtypes(ref)
    lora = LoraConfig(rank=4, dropout=0.0)
    a, b = models.apply_lora(meta, lora), models.apply_lora(ref, lora)
    assert [(n, p.shape, p.requires_grad) for n, p in a.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in b.named_parameters()]
    assert models.is_meta(a)


# ------------------------------------------------------------------------------------------ 2 ranks, gloo


@pytest.mark.slow
def test_fsdp_muon_follows_one_process_with_half_the_bytes(fsdp_muon):
    d, one, two = fsdp_muon["dir"], fsdp_muon["one"], fsdp_muon["two"]
    _assert_curve(d / "one", d / "two")
    assert two["world_size"] == 2 and two["strategy"] == "fsdp"
    # ‖W − W₀‖ of the sharded matrices, each gathered whole: the single process's. `max_rel` (the largest
    # element-wise |ΔW|/|W|) is a maximum over near-zero weights and moves with rounding alone: two
    # mathematically equal loss implementations put it 1.6e-3 apart in one process, so it gets 5e-3
    assert {k: v for k, v in two["drift"].items() if k != "max_rel"} == \
        pytest.approx({k: v for k, v in one["drift"].items() if k != "max_rel"}, rel=1e-3)
    assert two["drift"]["max_rel"] == pytest.approx(one["drift"]["max_rel"], rel=5e-3)
    # every matrix orthogonalised once, split between the ranks (by NS FLOPs: equal shapes here, so halves)
    total = one["ortho_per_rank"][0]
    assert total == STEPS * 14 and sum(two["ortho_per_rank"]) == total
    assert all(abs(c - total / 2) <= total * 0.1 for c in two["ortho_per_rank"])
    # parameter + gradient + optimizer-state bytes of each rank's local shards: about 1/2 of one process's
    whole = sum(one["local_bytes_per_rank"][0].values())
    for rank in two["local_bytes_per_rank"]:
        assert 0.45 * whole <= sum(rank.values()) <= 0.55 * whole, (rank, whole)
    # final/ is a plain consolidated HF folder holding exactly the sharded weights of the last checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    ckpt = d / "two" / "checkpoints" / f"step-{STEPS:06d}"
    dcp_to_torch_save(ckpt / "dcp", d / "consolidated.pt")
    saved = torch.load(d / "consolidated.pt", weights_only=True)["model"]
    final = AutoModelForCausalLM.from_pretrained(d / "two" / "final").state_dict()
    assert set(saved) == set(final)
    for n, t in saved.items():
        assert torch.equal(final[n], t), n
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    assert json.loads((ckpt / "trainer_state.json").read_text())["strategy"] == "fsdp"


@pytest.mark.slow
def test_fsdp_adamw_follows_one_process(tmp_path, wide, corpus):
    one = _single(_args(wide, corpus, tmp_path / "one", "--optim", "adamw", "--lr", "0.003"))
    two = _summary(_torchrun(_args(wide, corpus, tmp_path / "two", "--optim", "adamw", "--lr", "0.003",
                                   "--strategy", "fsdp")))
    _assert_curve(tmp_path / "one", tmp_path / "two")
    whole = sum(one["local_bytes_per_rank"][0].values())
    assert all(0.45 * whole <= sum(r.values()) <= 0.55 * whole for r in two["local_bytes_per_rank"])


@pytest.mark.slow
def test_fsdp_kill9_after_second_checkpoint_resumes_to_the_same_curve(tmp_path, fsdp_muon, wide, corpus):
    cut = tmp_path / "cut"
    args = _args(wide, corpus, cut, "--optim", "muon", "--strategy", "fsdp")
    r = _torchrun(["2", *args], script=KILLER, check=False)  # every rank: SIGKILL after its 2nd checkpoint
    assert r.returncode != 0
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    assert not (cut / "final").exists()
    # resumed with one process: refused, one line, nothing changed
    def files() -> dict[str, bytes]:  # the lock file a killed run leaves is taken over and released
        return {str(p): p.read_bytes() for p in cut.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    r1 = CliRunner().invoke(app, [*args, "--resume"])
    one_line_error(r1, "sharded by FSDP2", "--strategy fsdp under torchrun with 2 processes")
    assert files() == before
    _torchrun([*args, "--resume"])
    full = fsdp_muon["dir"] / "two"
    a, b = read_metrics(full), read_metrics(cut)
    assert [x["step"] for x in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "lr", "grad_norm", "tokens", "val_loss"):
            assert ra[key] == rb[key], (key, ra, rb)


@pytest.mark.slow
def test_fsdp_lora_follows_one_process_and_saves_a_plain_adapter(tmp_path, tiny_model_dir, corpus):
    lora = ["--optim", "muon", "--lora-rank", "4", "--lora-dropout", "0"]
    one = _single(_args(tiny_model_dir, corpus, tmp_path / "one", *lora))
    two = _summary(_torchrun(_args(tiny_model_dir, corpus, tmp_path / "two", *lora, "--strategy", "fsdp")))
    _assert_curve(tmp_path / "one", tmp_path / "two")
    assert two["drift"] == pytest.approx(one["drift"], rel=1e-3)
    assert two["lora"] and sum(two["ortho_per_rank"]) == one["ortho_per_rank"][0] and min(two["ortho_per_rank"]) > 0
    # the frozen base is sharded too: each rank holds about half of the weights
    whole = one["local_bytes_per_rank"][0]["params"]
    assert all(0.45 * whole <= r["params"] <= 0.55 * whole for r in two["local_bytes_per_rank"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = tmp_path / "two" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, final)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "one" / "final")
    ids = torch.arange(1, 17)[None]
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=2e-3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_fsdp_two_nodes_on_localhost_match_one_node(tmp_path, fsdp_muon, wide, corpus):
    """Two torchrun launchers (`--nnodes 2 --node-rank 0/1 --rdzv-endpoint`), one process each: the run of
    one 2-process launcher."""
    port = _free_port()
    args = _args(wide, corpus, tmp_path / "two", "--optim", "muon", "--strategy", "fsdp")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--rdzv-endpoint", f"localhost:{port}", "--nproc_per_node", "1", "-m", "muonft_cli", *args]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                                      cwd=REPO))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    summary = json.loads([ln for ln in outs[0][0].splitlines() if ln.startswith("{")][0])
    assert not [ln for ln in outs[1][0].splitlines() if ln.startswith("{")]  # only global rank 0 prints
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"
    assert summary["ortho_per_rank"] == fsdp_muon["two"]["ortho_per_rank"]
    assert _losses(tmp_path / "two") == pytest.approx(_losses(fsdp_muon["dir"] / "two"), rel=1e-6)


@pytest.mark.slow
def test_fsdp_under_accelerate_launch_is_the_torchrun_run(tmp_path, fsdp_muon, wide, corpus):
    """`accelerate launch --multi_gpu --num_processes 2` sets the torchrun environment: the same run."""
    pytest.importorskip("accelerate")
    args = _args(wide, corpus, tmp_path / "acc", "--optim", "muon", "--strategy", "fsdp")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "muonft_cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert _summary(r)["strategy"] == "fsdp"
    assert _losses(tmp_path / "acc") == pytest.approx(_losses(fsdp_muon["dir"] / "two"), rel=1e-6)


def _tied_model_dir(path: Path) -> Path:
    """A wide Llama whose LM head is its input embedding (tied), with non-default rotary frequencies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from _helpers_models import save_tiny

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return save_tiny(LlamaForCausalLM(cfg), path)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--lora-rank", "4", "--lora-dropout", "0"]], ids=["full", "lora"])
def test_fsdp_only_rank0_reads_the_weights(tmp_path, corpus, extra):
    """Under FSDP2 rank 1 builds the model on the meta device: it never calls a weight loader nor holds a
    full parameter, and once rank 0's weights and buffers are broadcast into the shards both ranks' logits are
    exactly the single-process model's (tied embeddings, rotary inv_freq with a non-default theta)."""
    from transformers import AutoModelForCausalLM

    model = _tied_model_dir(tmp_path / "tied")
    probe = tmp_path / "probe"
    probe.mkdir()
    args = _args(model, corpus, tmp_path / "two", "--optim", "muon", "--strategy", "fsdp", *extra, "--steps", "2")
    summary = _summary(_torchrun([str(probe), *args], script=PROBE))
    assert summary["world_size"] == 2 and summary["strategy"] == "fsdp"
    r0, r1 = (json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["calls"]["_load_weights"] == 1 and r0["real_param_bytes"] == r0["all_param_bytes"] > 0
    assert r1["calls"] == {k: 0 for k in r1["calls"]}, r1  # no loader, no safetensors file opened
    assert r1["real_param_bytes"] == 0 and r1["all_param_bytes"] == r0["all_param_bytes"]
    ref = AutoModelForCausalLM.from_pretrained(model).eval()
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    with torch.no_grad():
        want = ref(input_ids=torch.arange(1, 17)[None]).logits
    for r in (0, 1):  # a LoRA adapter starts at B = 0: the base's logits exactly
        assert torch.equal(torch.load(probe / f"logits{r}.pt"), want), r

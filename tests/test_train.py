"""Engine tests (`muonft_cli.train`): schedule, data order, gradient accumulation, exact resume, signals,
divergence, run-directory rules and DDP — on 2-layer hidden-32 models."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers_train import (
    read_metrics,
    tiny_model_config,
    wide_model_dir,
    write_instructions,
)

from muonft_cli import config as cfgmod
from muonft_cli import train
from muonft_cli.errors import ResumeRefusedError, TrainingDivergedError, UserInputError
from muonft_cli.train.sink import NullSink

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, corpus, tiny_model_dir):
    d = tmp_path_factory.mktemp("assets")
    return {"corpus": corpus, "model": tiny_model_dir,
            "instr": write_instructions(d / "instr.jsonl"), "mcfg": tiny_model_config(d / "mcfg.json")}


def make_cfg(out: Path, data: Path, model: Path | None = None, mcfg: Path | None = None, **flags):
    f = {"data.path": str(data), "output.dir": str(out), "data.seq_len": 16, "train.batch_size": 4,
         "train.micro_batch_size": 2, "train.steps": 6, "train.eval_every": 3, "schedule.warmup_ratio": 0.2,
         "optimizer.lr": 3e-3, "data.val_fraction": 0.2}
    if model is not None:
        f["model.name_or_path"] = str(model)
    if mcfg is not None:
        f["model.model_config"] = str(mcfg)
        f["model.vocab_size"] = 300
    f.update(flags)
    return cfgmod.resolve(None, f)


# --------------------------------------------------------------------------------------------- pieces


def test_lr_lambda_warmup_then_cosine():
    fn = train.lr_lambda(total_steps=100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [fn(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0)
    assert fn(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert fn(99) > 0.1 and fn(100) == pytest.approx(0.1)
    assert train.lr_lambda(10, 0.0, 0.0)(0) == 1.0


def test_global_batch_is_deterministic_and_spans_epochs():
    b1 = train.global_batch(0, 4, 6, seed=3)
    assert b1 == train.global_batch(0, 4, 6, seed=3)
    two_epochs = train.global_batch(0, 12, 6, seed=3)
    assert sorted(two_epochs[:6]) == list(range(6)) and sorted(two_epochs[6:]) == list(range(6))
    assert two_epochs[4:8] == train.global_batch(4, 4, 6, seed=3)  # resuming mid-stream gives the same batch
    assert train.global_batch(0, 6, 6, seed=4) != train.global_batch(0, 6, 6, seed=3)


def test_token_nll_sum_matches_hf_mean_loss():
    from _helpers_models import tiny_llama

    model = tiny_llama()
    ids = torch.randint(4, 64, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    out = model(input_ids=ids, labels=labels)
    mine = train.token_nll_sum(out.logits, labels) / train.n_targets(labels)
    assert float(mine) == pytest.approx(float(out.loss), rel=1e-6)



def test_token_nll_sum_never_holds_the_whole_fp32_upcast(monkeypatch):
    """The loss upcasts [B, T, V] bf16 logits chunk by chunk (no fp32 tensor larger than a chunk, forward or
    backward, with or without autograd) and its graph keeps the logits and one fp32 log-sum-exp per token (no
    fp32 log-softmax saved for backward); same value and gradient as the unchunked formula."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        fp32 = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.dtype == torch.float32:
                    Largest.fp32 = max(Largest.fp32, t.numel())
            return out

    # 3 positions of B=2, V=50 per chunk (raising=False: the old code has no chunks and fails the asserts)
    monkeypatch.setattr(train.batching, "NLL_CHUNK_ELEMENTS", 2 * 3 * 50, raising=False)
    torch.manual_seed(0)
    logits = torch.randn(2, 12, 50).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 50, (2, 12))
    labels[0, :5] = -100
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, logits)

    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if t.dtype == torch.float32 else 0)
        return t

    for grad in (False, True):
        Largest.fp32 = 0
        with torch.set_grad_enabled(grad), Largest():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                nll = train.token_nll_sum(logits, labels)
        assert Largest.fp32 <= 2 * 3 * 50, (grad, Largest.fp32)  # never the whole [2, 11, 50] in fp32
        assert float(nll) == pytest.approx(float(ref), rel=1e-5)
    assert sum(saved) == 2 * 11 * 4  # the bf16 logits and the [2, 11] fp32 log-sum-exp, nothing [B, T, V]-sized
    Largest.fp32 = 0
    with Largest():
        (grad,) = torch.autograd.grad(nll, logits)
    assert Largest.fp32 <= 2 * 3 * 50, Largest.fp32  # backward: one chunk's softmax at a time
    assert grad.dtype == torch.bfloat16
    assert torch.allclose(grad.float(), ref_grad.float(), atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_nll_sum_gradient_equals_cross_entropys(dtype, monkeypatch):
    """Value and gradient against ``F.cross_entropy`` over the shifted logits, several chunks, ignored targets
    (their positions get no gradient), and the last position (predicts nothing) gets zero."""
    import torch.nn.functional as F

    monkeypatch.setattr(train.batching, "NLL_CHUNK_ELEMENTS", 3 * 4 * 37)
    torch.manual_seed(1)
    logits = (torch.randn(3, 9, 37, dtype=dtype) * 4).requires_grad_()
    labels = torch.randint(0, 37, (3, 9))
    labels[1, 3:6] = -100
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 37), labels[:, 1:].reshape(-1), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref * 0.37, logits)
    nll = train.token_nll_sum(logits, labels)
    (grad,) = torch.autograd.grad(nll * 0.37, logits)
    assert nll.dtype == torch.float32 and float(nll) == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6)
    assert not grad[:, -1].any() and not grad[1, 2:5].any()
    assert float(train.token_nll_sum(logits[:, :1], labels[:, :1])) == 0.0  # T = 1: no target


def test_token_nll_sum_masked_vocabulary_and_no_per_chunk_temporaries(monkeypatch):
    """Entries at -inf (a masked vocabulary) give cross_entropy's value and gradient (torch.logsumexp's rule
    for an infinite max), and neither pass allocates a [B, chunk, V] fp32 temporary per chunk: one buffer per
    pass at most, none in the backward pass of fp32 logits (the softmax is formed in the gradient itself)."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(train.batching, "NLL_CHUNK_ELEMENTS", 2 * 2 * 40)  # 2 positions per chunk, 6 chunks
    torch.manual_seed(2)
    logits = (torch.randn(2, 12, 40) * 3)
    logits[:, :, 30:] = float("-inf")
    logits.requires_grad_()
    labels = torch.randint(0, 30, (2, 12))
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, logits)

    class Chunked(TorchDispatchMode):
        """Counts the distinct storages of chunk size (2 × 2 × 40 fp32) that ops return."""
        storages: set[int] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if torch.is_tensor(t) and t.untyped_storage().nbytes() == 2 * 2 * 40 * 4:
                    Chunked.storages.add(t.untyped_storage().data_ptr())
            return out

    with Chunked():
        nll = train.token_nll_sum(logits, labels)
    assert len(Chunked.storages) <= 1, Chunked.storages  # at most one buffer for all 6 chunks
    Chunked.storages = set()
    with Chunked():
        (grad,) = torch.autograd.grad(nll, logits)
    assert not Chunked.storages, Chunked.storages
    assert float(nll) == pytest.approx(float(ref), rel=1e-6)
    assert torch.allclose(grad, ref_grad, atol=1e-6) and not grad[:, :, 30:].any()


def test_rich_sink_shows_progress_validation_and_notices():
    import io

    from muonft_cli.render import RichSink

    buf = io.StringIO()
    sink = RichSink(stream=buf)
    sink.on_message("resuming [run] at step 2")
    sink.on_start({"mode": "finetune", "optim": "muon", "start_step": 2, "total_steps": 4})
    sink.on_step({"step": 3, "loss": 1.5, "lr": 1e-3, "tokens_per_s": 100.0, "val_loss": None})
    sink.on_step({"step": 4, "loss": 1.25, "lr": 5e-4, "tokens_per_s": 100.0, "val_loss": 1.0,
                  "val_ppl": math.e})
    sink.on_end({})
    text = buf.getvalue()
    assert "resuming [run] at step 2" in text  # not read as rich markup
    assert "step 4: val loss 1.0000  ppl 2.72" in text and "4/4" in text


# --------------------------------------------------------------------------------------------- the loop


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "model.safetensors"))


def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    """1 x 8 and 4 x 2 micro-batches give the same update, with prompt masking making token counts differ."""
    runs = {}
    for mbs in (8, 2):
        out = tmp_path / f"mbs{mbs}"
        cfg = make_cfg(out, assets["instr"], model=assets["model"], **{
            "train.batch_size": 8, "train.micro_batch_size": mbs, "train.steps": 2, "train.clip": None,
            "optimizer.name": "adamw", "train.eval_every": 0, "data.seq_len": 32})
        train.run(cfg, "finetune")
        runs[mbs] = (read_metrics(out), _weights(out))
    (m8, w8), (m2, w2) = runs[8], runs[2]
    for a, b in zip(m8, m2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert w8.keys() == w2.keys()
    for k in w8:
        torch.testing.assert_close(w8[k], w2[k], rtol=1e-5, atol=1e-6)


class _KillAt(NullSink):
    """Sends this process SIGTERM after step `k`, like a scheduler pre-empting the job."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_step(self, record: dict) -> None:
        if record["step"] == self.k:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("kind", ["pretrain-adamw", "lora-muon", "lora-muon-bf16-base"])
def test_resume_after_sigterm_is_bit_exact(assets, tmp_path, kind):
    if kind == "pretrain-adamw":
        mode, kw = "pretrain", dict(mcfg=assets["mcfg"], **{"optimizer.name": "adamw"})
    else:
        mode, kw = "finetune", dict(model=assets["model"], **{"optimizer.name": "muon", "lora.rank": 4,
                                                               "lora.dropout": 0.1})
        if kind.endswith("bf16-base"):
            kw["model.base_dtype"] = "bf16"
    flags = {"train.steps": 8, "train.save_every": 3, "train.keep_last": 2}
    full, cut = tmp_path / "full", tmp_path / "cut"
    train.run(make_cfg(full, assets["corpus"], **kw, **flags), mode)
    with pytest.raises(train.TrainingInterrupted, match="--resume"):
        train.run(make_cfg(cut, assets["corpus"], **kw, **flags), mode, sink=_KillAt(4))
    ckpts = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert ckpts == ["step-000003", "step-000004"]  # save_every and the signal's own checkpoint
    assert {p.name for p in (cut / "checkpoints" / "step-000004").iterdir()} >= {
        "model.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json"}
    assert not (cut / "final").exists()
    saved = json.loads((cut / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert list(saved) == ["step", "position", "tokens", "best_val_loss", "best_step", "last_val", "recent_losses",
                           "world_size", "data_seed", "n_train", "total_steps", "muonft_version"]  # old runs resume
    assert saved["step"] == 4 and saved["position"] == 16 and len(saved["recent_losses"]) == 4
    summary = train.run(make_cfg(cut, assets["corpus"], **kw, **flags), mode, resume=True)
    assert summary["steps"] == 8
    a, b = read_metrics(full), read_metrics(cut)
    assert [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_ppl"):
            assert ra[key] == rb[key], (key, ra, rb)
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-000006", "step-000008"]  # keep_last
    prov = json.loads((cut / "final" / "muonft.json").read_text())
    assert prov["optimizer"] == kw["optimizer.name"] and prov["steps"] == 8 and prov["mode"] == mode
    assert prov["base_dtype"] == summary["base_dtype"] == kw.get("model.base_dtype", "fp32")


def test_resume_may_extend_steps_but_not_change_config(assets, tmp_path):
    out = tmp_path / "run"
    kw = dict(model=assets["model"], **{"train.steps": 2, "train.save_every": 2})
    train.run(make_cfg(out, assets["corpus"], **kw), "finetune")
    with pytest.raises(UserInputError, match=r"optimizer\.lr: 0\.003 -> 0\.01"):
        train.run(make_cfg(out, assets["corpus"], **{**kw, "optimizer.lr": 0.01}), "finetune", resume=True)
    s = train.run(make_cfg(out, assets["corpus"], **{**kw, "train.steps": 4}), "finetune", resume=True)
    assert s["steps"] == 4 and [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


def test_resume_with_more_steps_logs_the_lr_each_step_used(assets, tmp_path, monkeypatch):
    """Bug 3: resuming with a larger --steps logged, for the first resumed step, the new schedule's lr although
    the step ran at the old one. Each logged lr must be the lr the optimizer stepped with."""
    from muonft_cli import optim

    used: list[float] = []
    real_build = optim.build_optimizer

    def recording(*a, **k):  # records param_groups[0]["lr"] as each optimizer.step() starts
        opt = real_build(*a, **k)
        opt.register_step_pre_hook(lambda o, args, kwargs: used.append(o.param_groups[0]["lr"]))
        return opt

    monkeypatch.setattr(optim, "build_optimizer", recording)
    out, lr, warm = tmp_path / "run", 3e-3, 0.2
    kw = dict(model=assets["model"], **{"train.save_every": 4, "train.eval_every": 0})
    train.run(make_cfg(out, assets["corpus"], **kw, **{"train.steps": 4}), "finetune")
    train.run(make_cfg(out, assets["corpus"], **kw, **{"train.steps": 8}), "finetune", resume=True)
    logged = [r["lr"] for r in read_metrics(out)]
    assert len(used) == len(logged) == 8
    assert logged == pytest.approx(used, rel=1e-12, abs=0)
    # the schedule each step ran under: the 4-step run's for steps 1-4, the 8-step run's from step 5 on (the
    # resumed run re-applies its own schedule; before, step 5 ran at the 4-step schedule's final lr, 0)
    old, new = train.lr_lambda(4, warm, 0.0), train.lr_lambda(8, warm, 0.0)
    want = [lr * old(s) for s in range(4)] + [lr * new(s) for s in range(4, 8)]
    assert logged == pytest.approx(want, rel=1e-12, abs=0)
    assert logged[4] > 0 and logged[4] != pytest.approx(lr * old(4))  # the cases the bug got wrong


def test_output_dir_rules(assets, tmp_path):
    out = tmp_path / "run"
    cfg = make_cfg(out, assets["corpus"], model=assets["model"], **{"train.steps": 1})
    with pytest.raises(UserInputError, match="not a muonft run"):
        train.run(cfg, "finetune", resume=True)
    assert not out.exists()  # nothing written on bad input
    train.run(cfg, "finetune")
    with pytest.raises(UserInputError, match="holds a muonft run.*--overwrite"):
        train.run(cfg, "finetune")
    (out / "final" / "stale.txt").write_text("old")
    train.run(make_cfg(out, assets["corpus"], model=assets["model"], **{"train.steps": 1,
                                                                          "output.overwrite": True}), "finetune")
    assert not (out / "final" / "stale.txt").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="is not empty"):
        train.run(make_cfg(other, assets["corpus"], model=assets["model"]), "finetune")


def test_nan_loss_stops_with_last_good_checkpoint(assets, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = train.batching.token_nll_sum

    def poisoned(logits, labels):  # micro-batches 1..4 are steps 1-2; step 3's first micro-batch is NaN
        calls["n"] += 1
        v = real(logits, labels)
        return v * float("nan") if calls["n"] == 5 else v

    monkeypatch.setattr(train.batching, "token_nll_sum", poisoned)
    cfg = make_cfg(out, assets["corpus"], model=assets["model"], **{"train.save_every": 2})
    with pytest.raises(TrainingDivergedError, match="step 3.*step-000002"):
        train.run(cfg, "finetune")
    assert (out / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert not (out / "final").exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_ddp_two_processes_match_one(assets, tmp_path):
    """torchrun with 2 CPU processes: same loss curve as 1 process at the same global batch, and each rank
    orthogonalised about half of the Muon matrices."""
    model = wide_model_dir(tmp_path / "wide")
    common = ["-m", "muonft_cli", "finetune", "--model", str(model), "--data", str(assets["corpus"]),
              "--optim", "muon", "--steps", "3", "--batch-size", "4", "--micro-batch-size", "1",
              "--seq-len", "16", "--eval-every", "3", "--val-fraction", "0.2", "--lr", "0.01", "--json",
              "--quiet"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    s1 = train.run(make_cfg(tmp_path / "one", assets["corpus"], model=model, **{
        "optimizer.name": "muon", "train.steps": 3, "train.micro_batch_size": 1, "optimizer.lr": 0.01,
        "schedule.warmup_ratio": 0.03}), "finetune")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *common, "--out", str(tmp_path / "two")], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [ln for ln in two.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1  # only rank 0 prints
    s2 = json.loads(lines[0])
    assert s2["world_size"] == 2
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in m1] == pytest.approx([r["loss"] for r in m2], rel=1e-4)
    assert m1[-1]["val_loss"] == pytest.approx(m2[-1]["val_loss"], rel=1e-4)
    total = s1["ortho_per_rank"][0]
    assert total == 3 * 14  # 3 steps x (2 layers x 7 matrices): Muon really ran
    assert sum(s2["ortho_per_rank"]) == total
    assert all(abs(c - total / 2) <= total * 0.1 for c in s2["ortho_per_rank"])
    env_json = json.loads((tmp_path / "two" / "env.json").read_text())
    assert env_json["world_size"] == 2 and env_json["backend"] == "gloo"


# ------------------------------------------------------------------------- checkpoint cadence, signals


def _ckpts(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_default_checkpoints_every_tenth_of_the_run(assets, tmp_path):
    """Issue 11.3: the default (save_every: null = auto) checkpoints every ceil(steps / 10) steps, so a killed
    run can resume; before, the default was 0 (no checkpoint at all)."""
    out = tmp_path / "run"
    cfg = make_cfg(out, assets["corpus"], model=assets["model"], **{"train.steps": 10, "train.keep_last": 20})
    assert cfg.train.save_every is None and cfg.train.save_every_minutes == 10
    train.run(cfg, "finetune")
    assert _ckpts(out) == list(range(1, 11))
    out2 = tmp_path / "kept"
    train.run(make_cfg(out2, assets["corpus"], model=assets["model"], **{"train.steps": 10}), "finetune")
    assert _ckpts(out2) == [9, 10]  # --keep-last (2) keeps disk flat


class _Clock:
    """A fake clock for the loop (seconds); a sink that moves it forward at chosen steps."""

    def __init__(self, jumps: dict[int, float]) -> None:
        self.now, self.jumps = 0.0, jumps

    def __call__(self) -> float:
        return self.now

    def on_start(self, info): ...

    def on_message(self, text): ...

    def on_end(self, summary): ...

    def on_step(self, record):
        self.now += self.jumps.get(record["step"], 0.0)


@pytest.mark.parametrize("save_every,want", [(None, [2, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20]),
                                              (4, [4, 8, 12, 16, 20])])
def test_time_based_checkpoints(assets, tmp_path, monkeypatch, save_every, want):
    """Issue 11.3: with the auto default, a checkpoint is also written when train.save_every_minutes passed
    since the last one (here: 11 minutes pass during step 5); an explicit --save-every N means exactly N."""
    from muonft_cli.train import loop as loop_mod

    clock = _Clock({5: 11 * 60.0})
    monkeypatch.setattr(loop_mod, "clock", clock)
    out = tmp_path / "run"
    cfg = make_cfg(out, assets["corpus"], model=assets["model"], **{
        "train.steps": 20, "train.keep_last": 50, "train.eval_every": 0, "train.save_every": save_every})
    train.run(cfg, "finetune", sink=clock)
    assert _ckpts(out) == want


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


class _Notes(NullSink):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def test_resume_of_a_finished_run_is_a_no_op_and_steps_never_shrink(assets, tmp_path):
    """Issue 11.1: `--resume` on a finished run retrained its last steps; a smaller --steps replaced final/
    with a shorter run. Now: nothing to do (the saved summary, said on the sink), or refused; nothing touched."""
    out = tmp_path / "run"
    kw = dict(model=assets["model"], **{"train.steps": 6, "train.save_every": 4})
    first = train.run(make_cfg(out, assets["corpus"], **kw), "finetune")
    before = _snapshot(out)
    notes = _Notes()
    again = train.run(make_cfg(out, assets["corpus"], **kw), "finetune", sink=notes, resume=True)
    assert again == json.loads((out / "summary.json").read_text()) and again["steps"] == 6
    assert again["final"] == first["final"]
    assert notes.messages == [f"{out} already finished 6 steps; nothing to do (pass a larger --steps to "
                              f"continue training)"]
    assert _snapshot(out) == before
    with pytest.raises(UserInputError, match="already done 6 steps.*--steps 5") as e:
        train.run(make_cfg(out, assets["corpus"], **{**kw, "train.steps": 5}), "finetune", resume=True)
    assert not isinstance(e.value, ResumeRefusedError)  # a sweep answers that one with --overwrite
    assert _snapshot(out) == before
    grown = train.run(make_cfg(out, assets["corpus"], **{**kw, "train.steps": 8}), "finetune", resume=True)
    assert grown["steps"] == 8 and [r["step"] for r in read_metrics(out)] == list(range(1, 9))


def test_interrupted_run_refuses_fewer_steps_than_its_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    kw = dict(model=assets["model"], **{"train.steps": 8, "train.save_every": 3})
    with pytest.raises(train.TrainingInterrupted):
        train.run(make_cfg(out, assets["corpus"], **kw), "finetune", sink=_KillAt(4))
    before = _snapshot(out)
    with pytest.raises(UserInputError, match="already done 4 steps"):
        train.run(make_cfg(out, assets["corpus"], **{**kw, "train.steps": 3}), "finetune", resume=True)
    assert _snapshot(out) == before


@pytest.mark.parametrize("where", ["mid-run", "last step"])
def test_signal_during_validation_stops_it(assets, tmp_path, monkeypatch, where):
    """Issue 11.7: SIGTERM during a validation pass was ignored until the pass ended (and at the last step,
    altogether). Now it stops validation before the next batch, checkpoints the step and exits interrupted."""
    from muonft_cli import evaluate as eval_mod

    calls = {"n": 0}
    real = eval_mod.collate

    def signalling(dataset, idx):  # validation's batch function: SIGTERM while fetching its 2nd batch
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(dataset, idx)

    monkeypatch.setattr(eval_mod, "collate", signalling)
    out, steps = tmp_path / "run", 6 if where == "mid-run" else 3
    kw = dict(model=assets["model"], **{"train.steps": steps, "train.eval_every": 3 if where == "mid-run" else 0,
                                        "eval.batch_size": 1, "train.save_every": 0})
    with pytest.raises(train.TrainingInterrupted, match="at step 3 .*during validation.*step-000003"):
        train.run(make_cfg(out, assets["corpus"], **kw), "finetune")
    assert calls["n"] == 2  # no batch after the signal
    assert _ckpts(out) == [3] and not (out / "final").exists()
    monkeypatch.setattr(eval_mod, "collate", real)
    s = train.run(make_cfg(out, assets["corpus"], **kw), "finetune", resume=True)
    assert s["steps"] == steps and s["val_loss"] is not None and (out / "final").is_dir()

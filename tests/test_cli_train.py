"""`muonft pretrain` / `muonft finetune` through the real CLI (Typer's CliRunner and one subprocess):
pretrain -> fine-tune (full and LoRA, every optimizer) -> eval, the saved formats, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _helpers_train import FAST, one_line_error, read_metrics, tiny_model_config, tiny_model_dir, write_corpus
from muonft_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
OPTIMIZERS = ("adamw", "muon", "muon-pe", "adamuon", "normuon")
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def one_json_line(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus):
    """A tiny model pretrained with Adam through `muonft pretrain` (BPE tokenizer trained on the corpus)."""
    d = tmp_path_factory.mktemp("cli")
    out = d / "pre"
    r = invoke("pretrain", "--model-config", tiny_model_config(d / "mcfg.json"), "--vocab-size", 300,
               "--data", corpus, "--optim", "adamw", "--lr", "3e-3", "--steps", 4, "--val-fraction", 0.2,
               "--out", out, "--json", *FAST)
    assert r.exit_code == 0, r.output
    return {"dir": d, "corpus": corpus, "pre": out, "summary": one_json_line(r.stdout)}


def test_pretrain_writes_a_self_describing_run(pretrained):
    out, s = pretrained["pre"], pretrained["summary"]
    assert s["mode"] == "pretrain" and s["optim"] == "adamw" and s["steps"] == 4
    assert s["final"] == str(out / "final") and s["val_loss"] is not None
    assert {"config.yaml", "env.json", "metrics.jsonl", "final", "best", "tokenizer"} <= {
        p.name for p in out.iterdir()}
    prov = json.loads((out / "final" / "muonft.json").read_text())
    assert prov["optimizer"] == "adamw" and prov["lr"] == 3e-3 and prov["steps"] == 4
    assert prov["tokens"] == 4 * 4 * 16 and prov["seed"] == 0 and prov["mode"] == "pretrain"
    assert prov["muonft_version"]
    env = json.loads((out / "env.json").read_text())
    assert env["world_size"] == 1 and env["seed"] == 0 and env["versions"]["torch"] == torch.__version__
    m = read_metrics(out)
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert {"loss", "lr", "tokens", "tokens_per_s", "val_loss", "val_ppl"} <= set(m[0])
    assert m[1]["val_loss"] is not None and m[0]["val_loss"] is None  # --eval-every 2
    from transformers import AutoModelForCausalLM, AutoTokenizer  # loads without muonft

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert model.config.vocab_size == len(tok) and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("optim", OPTIMIZERS)
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_every_optimizer(pretrained, tmp_path, optim, lora):
    out = tmp_path / "ft"
    extra = ["--lora-rank", "4"] if lora else []
    lr = "1e-2" if optim != "adamw" else "3e-3"
    r = invoke("finetune", "--model", pretrained["pre"] / "final", "--data", pretrained["corpus"],
               "--optim", optim, "--lr", lr, "--steps", 3, "--val-fraction", 0.2, "--out", out, "--json",
               *extra, *FAST)
    assert r.exit_code == 0, r.output
    s = one_json_line(r.stdout)
    assert s["optim"] == optim and s["steps"] == 3 and s["lora"] is lora
    if optim != "adamw":
        assert s["ortho_per_rank"][0] > 0  # Muon ran (did not degrade to AdamW)
        nk = s["native_kernel"]
        if optim == "muon" and lora and nk["status"].startswith("loaded"):  # fp32 LoRA factors on CPU
            assert nk["matrices"] == s["ortho_per_rank"][0], nk
        elif optim in ("adamuon", "normuon"):  # their own rules: never the Muon kernel
            assert nk["matrices"] == 0, nk
    losses = [rec["loss"] for rec in read_metrics(out)]
    assert all(torch.isfinite(torch.tensor(losses)))
    final = out / "final"
    if lora:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(pretrained["pre"] / "final")
        PeftModel.from_pretrained(base, final)  # plain peft on the original base
    else:
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(final)
    assert json.loads((final / "muonft.json").read_text())["optimizer"] == optim


def test_finetune_then_eval(pretrained, tmp_path):
    out = tmp_path / "ft"
    r = invoke("finetune", "--model", pretrained["pre"] / "final", "--data", pretrained["corpus"],
               "--optim", "muon", "--lr", "1e-2", "--lora-rank", "4", "--steps", 3, "--val-fraction", 0.2,
               "--out", out, *[a for a in FAST if a != "--quiet"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[-1] == f"final model: {out / 'final'}"  # progress went to stderr
    assert "val loss" in r.stderr
    r = invoke("eval", "--model", out / "final", "--base", pretrained["pre"] / "final", "--data",
               pretrained["corpus"], "--reference-data", pretrained["corpus"], "--seq-len", 16,
               "--val-fraction", 0.2, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report  # the eval command's own tests check its fields


def test_finetune_json_subprocess(tmp_path):
    """`python -m muonft_cli finetune --json`: exactly one JSON line on stdout, progress on stderr."""
    corpus = write_corpus(tmp_path / "corpus")
    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "muonft_cli", "finetune", "--model", str(model), "--data",
                        str(corpus), "--optim", "muon", "--steps", "2", "--seq-len", "16", "--batch-size", "4",
                        "--micro-batch-size", "2", "--val-fraction", "0.2", "--out", str(out), "--json"],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    s = one_json_line(p.stdout)
    assert set(s) >= {"out", "mode", "optim", "steps", "tokens", "train_loss", "val_loss", "val_ppl",
                      "best_val_loss", "best_val_ppl", "best_step", "final", "runtime_s"}
    assert s["final"] == str(out / "final") and (out / "final" / "model.safetensors").is_file()
    assert "finetune" in p.stderr  # the progress bar went to stderr


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return {"d": d, "corpus": write_corpus(d / "corpus", n_docs=10), "model": tiny_model_dir(d / "model")}


def _ft(small, out, *extra):
    return invoke("finetune", "--model", small["model"], "--data", small["corpus"], "--steps", 1,
                  "--val-fraction", 0.2, "--out", out, *FAST, *extra)


@pytest.mark.parametrize("lr", ["0", "-1e-3"])
def test_bad_lr(small, tmp_path, lr):
    out = tmp_path / "run"
    one_line_error(_ft(small, out, "--lr", lr), "optimizer.lr")
    assert not out.exists()


def test_resume_of_a_directory_that_is_not_a_run(small, tmp_path):
    (tmp_path / "junk").mkdir()
    one_line_error(_ft(small, tmp_path / "junk", "--resume"), "not a muonft run", "--resume")


def test_resume_with_a_different_config_says_what_differs(small, tmp_path):
    out = tmp_path / "run"
    assert _ft(small, out, "--save-every", 1).exit_code == 0
    one_line_error(_ft(small, out, "--resume", "--seed", 5), "train.seed: 0 -> 5")
    r = invoke("finetune", "--out", out, "--resume", "--steps", 2, "--quiet", "--json")  # config from the run
    assert r.exit_code == 0, r.output
    assert one_json_line(r.stdout)["steps"] == 2


def test_output_dir_holding_another_run(small, tmp_path):
    out = tmp_path / "run"
    assert _ft(small, out).exit_code == 0
    one_line_error(_ft(small, out, "--optim", "muon"), "holds a muonft run", "--overwrite")
    assert _ft(small, out, "--optim", "muon", "--overwrite").exit_code == 0
    assert "muon" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args,needle", [
    (["--merge"], "--merge only applies to LoRA"),
    (["--lora-rank", "64"], "--lora-rank 64"),
    (["--steps", "2", "--epochs", "1"], "either --steps or --epochs"),
])
def test_finetune_bad_flags(small, tmp_path, args, needle):
    out = tmp_path / "run"
    one_line_error(_ft(small, out, *args), needle)
    assert not out.exists()


def test_pretrain_needs_a_model_shape(small, tmp_path):
    r = invoke("pretrain", "--data", small["corpus"], "--out", tmp_path / "p", "--quiet")
    one_line_error(r, "--preset")
    r = invoke("pretrain", "--model", small["model"], "--data", small["corpus"], "--out", tmp_path / "p")
    assert r.exit_code == 2  # pretrain has no --model option


# ------------------------------------------------------------------- issue 11: the run directory is safe


def _files(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_of_a_finished_run_says_nothing_to_do(small, tmp_path):
    """Issue 11.1 through the CLI: exit 0, one line on stderr, the saved summary on stdout, nothing rewritten;
    a smaller --steps is refused (exit 2) and nothing is touched."""
    out = tmp_path / "run"
    r = _ft(small, out, "--steps", 3, "--json")
    assert r.exit_code == 0, r.output
    first, before = one_json_line(r.stdout), _files(out)
    r = invoke("finetune", "--out", out, "--resume", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert one_json_line(r.stdout) == first
    assert r.stderr.strip() == (f"{out} already finished 3 steps; nothing to do (pass a larger --steps to "
                                f"continue training)")
    one_line_error(invoke("finetune", "--out", out, "--resume", "--steps", 2, "--quiet"),
                   "already done 3 steps", "--steps 2")
    assert _files(out) == before


def test_resume_without_a_checkpoint_says_it_starts_over(small, tmp_path):
    """Issue 11.3: a killed run with no checkpoint restarted from step 0 without a word under --quiet."""
    out = tmp_path / "run"
    assert _ft(small, out, "--steps", 2, "--save-every", 0).exit_code == 0
    import shutil

    shutil.rmtree(out / "final")  # as a run killed before its end leaves it
    (out / "summary.json").unlink()
    r = invoke("finetune", "--out", out, "--resume", "--quiet", "--json")
    assert r.exit_code == 0, r.output
    assert f"{out} has no checkpoint: starting over from step 0" in r.stderr
    assert one_json_line(r.stdout)["steps"] == 2


def test_a_second_run_into_a_held_directory_is_refused(small, tmp_path):
    """Issue 11.2: two runs into one --out both ran, interleaving their files. The holder's `.lock` refuses
    the second at once (exit 2, naming pid and host) and nothing in the directory changes."""
    from muonft_cli._common import try_lock

    out = tmp_path / "run"
    assert _ft(small, out).exit_code == 0
    assert not (out / ".lock").exists()  # released (and removed) when the run ended
    fd = try_lock(out / ".lock", note="pid 4242 on host elsewhere\n")
    assert fd is not None
    try:
        before = _files(out)
        for args in (["--resume", "--steps", 3], ["--overwrite"]):
            one_line_error(_ft(small, out, *args), "in use by another run", "pid 4242 on host elsewhere")
        assert _files(out) == before
        fresh = tmp_path / "fresh"
        fd2 = try_lock(fresh / ".lock", note="pid 4243 on host elsewhere\n")
        one_line_error(_ft(small, fresh), "pid 4243")
        os.close(fd2)
        assert set(_files(fresh)) == {".lock"}  # the refused run wrote nothing
    finally:
        os.close(fd)


def test_a_lock_left_by_a_killed_run_is_taken_over(small, tmp_path):
    """flock is dropped by the kernel when its holder dies (even SIGKILL): the next run just takes it."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from muonft_cli._common import try_lock; "
        f"fd = try_lock({str(out / '.lock')!r}, note='pid 1 on host gone\\n'); print(fd is not None, flush=True); "
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.readline().strip() == "True"
    one_line_error(_ft(small, out), "pid 1 on host gone")
    holder.kill()
    holder.wait()
    r = _ft(small, out, "--json")
    assert r.exit_code == 0, r.output
    assert one_json_line(r.stdout)["steps"] == 1


@pytest.mark.parametrize("kind", ["proc", "under-a-file", "read-only"])
@pytest.mark.parametrize("mode", ["finetune", "pretrain"])
def test_unwritable_out_is_one_line_before_any_work(small, tmp_path, kind, mode):
    """Issue 11.8: an unwritable --out gave a traceback (exit 1) after loading everything. Now: exit 2, one
    line naming --out, before the model or data is touched (the model and data given here do not exist)."""
    if kind == "proc":
        out = Path("/proc/muonft-x/run")
    elif kind == "under-a-file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "run"
    what = ["--model", tmp_path / "no-such-model"] if mode == "finetune" else ["--preset", "tiny"]
    r = invoke(mode, *what, "--data", tmp_path / "no-such-data", "--out", out, "--quiet")
    one_line_error(r, "--out", str(out))
    assert not out.exists()


# ------------------------------------------------------------------------- issue 11: CLI trust and honesty


def _strict_json(text: str) -> dict:
    """Parse as a strict JSON parser (Node's JSON.parse) would: NaN / Infinity are errors."""
    def refuse(name: str):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "eval"])
def test_seq_len_below_two_is_refused_before_any_work(small, tmp_path, cmd):
    out = tmp_path / "run"
    args = {"pretrain": ["pretrain", "--preset", "tiny", "--data", small["corpus"], "--out", out],
            "finetune": ["finetune", "--model", small["model"], "--data", small["corpus"], "--out", out],
            "eval": ["eval", "--model", small["model"], "--data", small["corpus"], "--model-only"]}[cmd]
    one_line_error(invoke(*args, "--seq-len", 1, "--json"), "data.seq_len: must be >= 2")
    assert not out.exists()


def test_eval_that_would_score_no_tokens_is_refused(small):
    """The engine's own check (a Python caller can bypass the config's range check): zero target tokens is a
    user error before any forward pass, not a report with `tokens: 0` and a NaN perplexity."""
    from muonft_cli.config import RunConfig
    from muonft_cli.errors import UserInputError
    from muonft_cli.evaluate import run_eval

    cfg = RunConfig()
    cfg.model.name_or_path, cfg.data.path, cfg.data.seq_len = str(small["model"]), str(small["corpus"]), 1
    with pytest.raises(UserInputError, match=r"gives no tokens to score .* use --seq-len 2 or more"):
        run_eval(cfg, compare=False)


def test_json_outputs_never_hold_nan_or_infinity(small, tmp_path, monkeypatch):
    from muonft_cli import diagnose, evaluate, train
    from muonft_cli import sweep as sw
    from muonft_cli.sweep import report as rep

    nan, inf = float("nan"), float("inf")
    monkeypatch.setattr(train, "run", lambda cfg, mode, sink=None, resume=False: {
        "steps": 1, "tokens": 16, "train_loss": 0.0, "val_loss": nan, "val_ppl": inf, "final": "x"})
    monkeypatch.setattr(evaluate, "run_eval", lambda cfg, **kw: {"model": "m", "data": {"loss": nan, "ppl": inf}})
    monkeypatch.setattr(diagnose, "diagnose", lambda path, **kw: {"verdict": "unknown", "confidence": nan})
    monkeypatch.setattr(sw, "load_saved_plan", lambda d: object())
    monkeypatch.setattr(rep, "write_report", lambda d, plan: {
        "table1": [{"ppl": nan}], "gap_reduction": -inf, "counts": {}, "warnings": [], "plots": {}})
    outputs = {
        "finetune": invoke("finetune", "--model", small["model"], "--data", small["corpus"], "--out",
                           tmp_path / "r", "--json", "--quiet"),
        "eval": invoke("eval", "--model", small["model"], "--data", small["corpus"], "--json"),
        "diagnose": invoke("diagnose", small["model"], "--json", "--quiet"),
        "sweep": invoke("sweep", "--report", tmp_path, "--json"),
    }
    for name, r in outputs.items():
        assert r.exit_code == 0, (name, r.output)
        doc = _strict_json(r.stdout)
        assert doc["status"] == "non_finite", (name, doc)
    assert outputs["finetune"].stdout.count("null") == 2
    assert _strict_json(outputs["finetune"].stdout)["non_finite"] == ["val_loss", "val_ppl"]
    assert _strict_json(outputs["eval"].stdout)["data"] == {"loss": None, "ppl": None}
    assert _strict_json(outputs["sweep"].stdout)["non_finite"] == ["table1[0].ppl", "gap_reduction"]


def test_a_real_json_summary_says_ok(pretrained):
    s = _strict_json(json.dumps(pretrained["summary"]))
    assert s["status"] == "ok" and "non_finite" not in s


def test_config_problems_come_in_one_pass(small, tmp_path):
    """Missing --out and --data, a type error and a range error: one line naming all four, nothing written."""
    r = invoke("finetune", "--model", small["model"], "--set", "optimizer.momentum=1.5", "--set",
               "train.steps=ten", "--quiet")
    one_line_error(r, "4 problems", "train.steps: expected an integer, got 'ten'",
                    "optimizer.momentum: must be in [0, 1), got 1.5", "pass --out DIR", "pass --data")


@pytest.mark.parametrize("how", [["--clip", "0"], ["--set", "train.clip=0"]], ids=["flag", "set"])
def test_clip_zero_is_off_in_both_spellings(small, tmp_path, how):
    out = tmp_path / "run"
    r = _ft(small, out, *how)
    assert r.exit_code == 0, r.output
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["clip"] is None


def test_bf16_on_cpu_says_so_and_threads_apply(small, tmp_path):
    out = tmp_path / "run"
    try:
        r = _ft(small, out, "--dtype", "bf16", "--device", "cpu", "--threads", "2")
    finally:
        torch.set_num_threads(1)
    assert r.exit_code == 0, r.output
    assert "note: --dtype bf16 only affects CUDA runs; this CPU run computes in fp32" in r.stderr
    assert json.loads((out / "env.json").read_text())["threads"] == 2


def test_unknown_model_type_without_code_says_what_helps(small, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(small["model"], model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "model_type": "brandnew_lm"}))
    for extra in ([], ["--trust-remote-code"]):
        r = invoke("finetune", "--model", model, "--data", small["corpus"], "--out", tmp_path / "run", "--steps",
                   1, *FAST, *extra)
        one_line_error(r, "brandnew_lm", "upgrade transformers", "modeling .py files")
        assert "pass --trust-remote-code" not in r.stderr


_QUIET_PROBE = """
import sys, types, warnings
import muonft_cli
from muonft_cli.cli import app
assert "tqdm" not in sys.modules  # as in a real `muonft` process: the engine imports the libraries later

def fake_run(cfg, mode, sink=None, resume=False):  # what the engine does with a GGUF base, nothing else
    warnings.warn("Could not find a config file in x.gguf - will assume that the vocabulary was not modified.")
    from tqdm.auto import tqdm
    for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    return {"steps": 1, "tokens": 1, "train_loss": 1.0, "val_loss": None, "final": "x"}

train, sink = types.ModuleType("muonft_cli.train"), types.ModuleType("muonft_cli.train.sink")
train.__path__, train.run, sink.NullSink = [], fake_run, type("NullSink", (), {})
sys.modules.update({"muonft_cli.train": train, "muonft_cli.train.sink": sink})
muonft_cli.train = train
app(sys.argv[1:])
"""


@pytest.mark.parametrize("quiet", [True, False], ids=["quiet", "loud"])
def test_quiet_silences_the_libraries_notices_and_bars(tmp_path, quiet):
    """peft's "Could not find a config file" warning and transformers' GGUF tqdm bar (from a stand-in engine
    that emits exactly those) stay off stderr under --quiet."""
    args = ["finetune", "--model", "m", "--data", "d", "--out", str(tmp_path / "r")] + (["--quiet"] if quiet else [])
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    p = subprocess.run([sys.executable, "-c", _QUIET_PROBE, *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    noisy = ("Could not find a config file" in p.stderr, "de-quantizing GGUF" in p.stderr)
    assert noisy == ((False, False) if quiet else (True, True)), p.stderr


@pytest.mark.parametrize("args", [["recipes"], ["recipes", "--json"], ["--help"], ["finetune", "--help"]])
def test_a_closed_stdout_pipe_ends_quietly_with_exit_0(args):
    """`muonft ... | head`: the reader is gone before muonft writes (the pipe's read end closed first)."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([sys.executable, "-m", "muonft_cli", *args], stdout=w, stderr=subprocess.PIPE,
                           text=True, cwd=REPO, timeout=120)
    finally:
        os.close(w)
    assert (p.returncode, p.stderr) == (0, "")


def test_diagnose_labels_lora_as_lora(small):
    r = invoke("diagnose", small["model"], "--json", "--quiet")
    assert r.exit_code == 0, r.output
    assert "LoRA-muon" in r.stdout and "LORA-" not in r.stdout

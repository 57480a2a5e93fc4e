"""`--optim auto` (issue 14 §1): the optimizer (and, without --lr, the LR) decided from how the base was
pretrained — provenance first, diagnose's spectra otherwise — printed, and recorded in config.yaml, summary.json /
--json, and muonft.json; resume of an auto run."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import _helpers_diagnose as H
from muonft_cli.cli import app
from muonft_cli.diagnose import auto, verdict as V

runner = CliRunner()

FAST = ["--steps", "2", "--seq-len", "32", "--batch-size", "4", "--set", "data.max_documents=20", "--set",
        "eval.max_batches=1", "--eval-every", "0", "--save-every", "0", "--quiet", "--json"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The Adam- and Muon-pretrained checkpoints, each with and without its muonft.json (copies: the cache
    stays intact)."""
    root = tmp_path_factory.mktemp("auto-bases")
    out = {}
    for optim in ("adamw", "muon"):
        src = H.labelled_pretrain(optim)
        out[(optim, True)] = src
        bare = root / f"{optim}-bare"
        shutil.copytree(src, bare)
        (bare / "muonft.json").unlink()
        out[(optim, False)] = bare
    return out


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("with_json", [True, False], ids=["muonft.json", "spectra"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_rule_full_matched_lora_muon(bases, optim, with_json, lora):
    c = auto.choose(str(bases[(optim, with_json)]), lora=lora)
    family = "adam" if optim == "adamw" else "muon"
    assert c["pretrain_family"] == family, c
    assert c["chosen"] == ("muon" if lora else optim)
    if with_json:
        assert c["source"] == "muonft.json" and c["confidence"] == 1.0
    else:
        assert c["source"] == "spectral" and 0.5 < c["confidence"] <= 1.0
    assert c["requested"] == "auto" and c["warning"] is None and c["reason"]
    # no lr given: the geometric middle of diagnose's range for this method / optimizer / size
    lo, hi = V.lr_range("lora" if lora else "full", family if not lora else "muon",
                        _n_params(bases[(optim, with_json)]))
    assert c["lr"] == float(f"{math.sqrt(lo * hi):.1g}") and lo <= c["lr"] <= hi
    assert auto.choose(str(bases[(optim, with_json)]), lora=lora, lr=3e-5)["lr"] == 3e-5  # a given lr is kept


def _n_params(path: Path) -> int:
    from muonft_cli.diagnose import diagnose

    return diagnose(path)["n_params"]


def test_cli_records_the_decision_and_resume_resolves_the_same(bases, tmp_path):
    """Muon-pretrained base without muonft.json, full fine-tuning: spectra decide → muon; the line on stderr;
    config.yaml has the concrete name and lr, so a resume (with --optim auto again, or without it) continues."""
    base = bases[("muon", False)]
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(base), "--data", "builtin:shakespeare", "--optim", "auto", "--out", str(out)]
    r = runner.invoke(app, args + FAST)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stderr.splitlines() if x.startswith("--optim auto:"))
    assert "muon" in line and "spectral" in line and "matched" in line
    s = json.loads(r.stdout)
    choice = s["optim_choice"]
    assert s["optim"] == "muon" and choice["chosen"] == "muon" and choice["requested"] == "auto"
    assert {"requested", "chosen", "source", "reason", "confidence"} <= set(choice) and choice["source"] == "spectral"
    saved = yaml.safe_load((out / "config.yaml").read_text())["optimizer"]
    assert saved["name"] == "muon" and saved["lr"] == choice["lr"]
    assert json.loads((out / "summary.json").read_text())["optim_choice"] == choice
    mj = json.loads((out / "final" / "muonft.json").read_text())
    assert mj["optimizer"] == "muon" and mj["optim_choice"] == choice
    # resume with --optim auto again: the same decision, the saved lr, 2 more steps
    r2 = runner.invoke(app, args + ["--resume"] + FAST[:1] + ["4"] + FAST[2:])
    assert r2.exit_code == 0, r2.output
    s2 = json.loads(r2.stdout)
    assert s2["steps"] == 4 and s2["optim"] == "muon" and s2["optim_choice"]["lr"] == choice["lr"]
    # ... and a resume that names nothing resumes the concrete optimizer config.yaml holds
    r3 = runner.invoke(app, ["finetune", "--model", str(base), "--data", "builtin:shakespeare", "--out", str(out),
                             "--resume"] + FAST[:1] + ["6"] + FAST[2:])
    assert r3.exit_code == 0, r3.output
    assert json.loads(r3.stdout)["optim"] == "muon"


def test_cli_lora_on_adam_base_is_muon(bases, tmp_path):
    r = runner.invoke(app, ["finetune", "--model", str(bases[("adamw", True)]), "--data", "builtin:shakespeare",
                            "--optim", "auto", "--lora-rank", "4", "--out", str(tmp_path / "ft")] + FAST)
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["optim"] == "muon" and s["lora"] and s["optim_choice"]["source"] == "muonft.json"
    assert "LoRA" in s["optim_choice"]["reason"]


def test_untrained_base_is_the_unknown_path(tiny_model_dir, corpus, tmp_path):
    """A random init: no provenance, the spectra say unknown → full FT with adamw, and a warning that LoRA would
    be the robust choice; an lr given with --lr is kept."""
    r = runner.invoke(app, ["finetune", "--model", str(tiny_model_dir), "--data", str(corpus), "--optim", "auto",
                            "--lr", "2e-4", "--out", str(tmp_path / "ft")] + FAST[:-2] + ["--quiet", "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    c = s["optim_choice"]
    assert s["optim"] == "adamw" and c["source"] == "unknown" and c["confidence"] is None
    assert c["lr"] == 2e-4 and c["lr_source"] == "given"
    assert any(x.startswith("warning:") and "LoRA" in x for x in r.stderr.splitlines())
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["optimizer"]["name"] == "adamw"


def test_auto_in_a_recipe_and_refused_for_pretrain(tmp_path, bases):
    from muonft_cli import config as cfgmod

    rec = tmp_path / "r.yaml"
    rec.write_text("optimizer: {name: auto, lr: 5e-5}\n")
    cfg = cfgmod.resolve(rec, {"model.name_or_path": str(bases[("adamw", False)]), "output.dir": str(tmp_path / "o"),
                               "data.path": "builtin:shakespeare"}, command="finetune")
    assert cfg.optimizer.name == "auto" and cfg.optimizer.lr == 5e-5  # the recipe's lr is a given lr
    resolved, choice = auto.resolve_config(cfg, "finetune")
    assert resolved.optimizer.name == "adamw" and resolved.optimizer.lr == 5e-5 and choice["source"] == "spectral"
    r = runner.invoke(app, ["pretrain", "--preset", "tiny", "--data", "builtin:shakespeare", "--optim", "auto",
                            "--out", str(tmp_path / "p"), "--quiet"])
    assert r.exit_code == 2 and "--optim auto" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "p").exists()
    r = runner.invoke(app, ["finetune", "--model", "x", "--data", "d", "--optim", "sgd", "--out", str(tmp_path / "q")])
    assert r.exit_code == 2 and "auto" in r.output  # the requested names: the optimizers and auto


def test_diagnose_prints_the_auto_command(bases):
    r = runner.invoke(app, ["diagnose", str(bases[("muon", True)]), "--quiet", "--json"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["recommendation"]
    assert rec["auto_command"].startswith("muonft finetune --model ") and "--optim auto" in rec["auto_command"]
    r = runner.invoke(app, ["diagnose", str(bases[("muon", True)]), "--quiet"])
    assert rec["auto_command"] in r.stdout.replace("\n", "") or rec["auto_command"] in r.stdout


def test_sweep_accepts_auto_and_each_cell_decides_from_its_base(bases, tmp_path):
    """`optims: [auto]` in a sweep recipe: the plan keeps the requested name (cell id, LR grid key, hash); the
    cell's finetune resolves it from its base — here a Muon-pretrained base without muonft.json → muon."""
    import os
    import subprocess
    import sys

    from muonft_cli import sweep as S

    recipe = {
        "data": {"path": "builtin:shakespeare", "seq_len": 32, "max_documents": 20},
        "train": {"steps": 2, "batch_size": 4, "micro_batch_size": 4, "eval_every": 0, "save_every": 0},
        "eval": {"max_batches": 1},
        "sweep": {"bases": {"m": {"path": str(bases[("muon", False)]), "pretrained_with": "muon"}}, "methods": ["full"], "optims": ["auto"],
                  "lr": {"full": {"auto": [1e-4]}}, "seeds": [0]},
    }
    rp = tmp_path / "auto.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    plan = S.load_plan(rp)
    assert [c.optim for c in plan.cells] == ["auto"] and plan.cells[0].config["optimizer"]["name"] == "auto"
    bad = dict(recipe, sweep=dict(recipe["sweep"], optims=["autoo"]))
    rp2 = tmp_path / "bad.yaml"
    rp2.write_text(yaml.safe_dump(bad))
    with pytest.raises(Exception, match="auto"):
        S.load_plan(rp2)
    out = tmp_path / "sw"
    res = subprocess.run([sys.executable, "-m", "muonft_cli", "sweep", str(rp), "--out", str(out), "--json"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    cell = plan.cells[0]
    saved = yaml.safe_load((out / "cells" / cell.id / "config.yaml").read_text())
    assert saved["optimizer"]["name"] == "muon" and saved["optimizer"]["lr"] == 1e-4
    rec = S.SweepIndex(out / S.INDEX).latest()[cell.id]
    assert rec["status"] == "done" and rec["summary"]["optim"] == "muon"
    assert rec["summary"]["optim_choice"]["source"] == "spectral"
    # the report: `auto` is neither the matched nor a mismatched optimizer (no gap against itself)
    groups = json.loads((out / "summary.json").read_text())["groups"]
    assert [g["optim"] for g in groups] == ["auto"] and groups[0]["matched"] is None


def test_a_hub_id_not_on_disk_is_decided_by_its_known_family():
    """No download for the decision: a hub id that is not local is judged by its name (known families), its
    size is unknown, so the LR is the middle of the union of diagnose's anchor ranges."""
    c = auto.choose("HuggingFaceTB/SmolLM2-135M", lora=False)
    assert c["chosen"] == "adamw" and c["source"] == "known family" and c["confidence"] == 1.0
    lo, hi = V.lr_range("full", "adam", None)
    assert c["lr"] == float(f"{math.sqrt(lo * hi):.1g}")
    c = auto.choose("moonshotai/Moonlight-16B-A3B", lora=False)
    assert c["chosen"] == "muon" and c["pretrain_family"] == "muon"
    c = auto.choose("someone/unknown-model", lora=False)
    assert c["chosen"] == "adamw" and c["source"] == "unknown" and c["warning"]

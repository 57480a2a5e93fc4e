"""`muonft plot` through the real CLI: run curves of a real tiny run and a hand-made one on shared axes (the PNG
opened: size, not blank, coloured; legend labels from the configs), `--metric` panels, a sweep's figures redrawn
(fake-engine sweep), and bad input as one line with exit 2 and nothing written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from _helpers_train import FAST, one_line_error
from muonft_cli import sweep as S
from muonft_cli.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def png_ok(path: Path, min_w: int = 500, min_h: int = 300):
    """The image at `path` opened (matplotlib's reader, PIL underneath): big enough, not blank, and with more
    than one colour (the curves, not only black text on white). Returns its (height, width)."""
    import matplotlib.image as mpimg
    import numpy as np

    img = np.asarray(mpimg.imread(path))[..., :3]
    assert img.shape[0] >= min_h and img.shape[1] >= min_w, img.shape
    assert img.var() > 0.001  # not one flat colour
    colours = {tuple(c) for c in (img.reshape(-1, 3) * 255).round().astype(int)[::7]}
    assert len(colours) > 10
    assert (img.std(axis=2) > 0.1).mean() > 0.002  # some saturated (curve) pixels, not just greys
    return img.shape[:2]


def write_run(d: Path, optim: str, lr: float, rank=None, steps: int = 120, val_every: int = 20,
              val: bool = True) -> Path:
    """A run directory by hand, in the engine's format (config.yaml sections, one metrics.jsonl record per step
    with null val_* between evaluations)."""
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"name": optim, "lr": lr, "weight_decay": 0.0},
                                                   "lora": {"rank": rank, "alpha": None}, "train": {"seed": 0}}))
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            loss = 2.0 + 2.0 * math.exp(-s / 30) + 0.05 * math.sin(s)
            rec = {"step": s, "epoch": s / steps, "loss": loss, "lr": lr * min(1.0, s / 10), "grad_norm": 1 / s ** 0.5,
                   "tokens": 64 * s, "tokens_per_s": 1000.0 + s % 7, "val_loss": None, "val_ppl": None}
            if val and (s % val_every == 0 or s == steps):
                rec["val_loss"] = loss + 0.1
                rec["val_ppl"] = math.exp(loss + 0.1)
            f.write(json.dumps(rec) + "\n")
    return d


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, corpus):
    """A real tiny LoRA-Muon run through `muonft finetune`, and a hand-made full-Adam one."""
    d = tmp_path_factory.mktemp("plot")
    real = d / "real"
    r = invoke("finetune", "--model", tiny_model_dir, "--data", corpus, "--optim", "muon", "--lora-rank", 4,
               "--lr", "1e-2", "--steps", 6, "--val-fraction", 0.2, "--out", real, *FAST)
    assert r.exit_code == 0, r.output
    return {"d": d, "real": real, "hand": write_run(d / "hand", "adamw", 3e-4)}


def one_json(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


def test_two_runs_on_shared_axes_labelled_from_their_configs(runs, tmp_path):
    out = tmp_path / "figs" / "curves.png"  # the folder is created
    r = invoke("plot", runs["real"], runs["hand"], "--out", out, "--json")
    assert r.exit_code == 0, r.output
    res = one_json(r.stdout)
    assert res["paths"] == [str(out)] and res["kind"] == "runs"
    assert res["labels"] == ["LoRA-Muon (r=4), lr 1e-2", "Full-Adam, lr 3e-4"]
    assert res["metrics"] == ["loss", "val_loss"]  # default: two panels
    h, w = png_ok(out)
    assert w > 1.8 * h  # two panels side by side
    assert [p.name for p in out.parent.iterdir()] == ["curves.png"]  # no temporary file left
    # without --json: the written path, one line
    r = invoke("plot", runs["real"], runs["hand"], "--out", tmp_path / "again.png")
    assert r.exit_code == 0 and r.stdout.strip() == str(tmp_path / "again.png"), r.output


def test_metric_panels_formats_and_default_out(runs, tmp_path):
    out = tmp_path / "m.png"
    r = invoke("plot", runs["real"], runs["hand"], "--out", out, "--metric", "val_ppl", "--metric",
               "lr,grad_norm", "--metric", "tokens_per_s", "--json")
    assert r.exit_code == 0, r.output
    assert one_json(r.stdout)["metrics"] == ["val_ppl", "lr", "grad_norm", "tokens_per_s"]
    h, w = png_ok(out)
    assert h > 600  # four panels: two rows of at most three
    svg = tmp_path / "m.svg"
    assert invoke("plot", runs["hand"], "--out", svg, "--metric", "loss").exit_code == 0
    assert svg.read_text().lstrip().startswith("<?xml") and "</svg>" in svg.read_text()
    # one run, no --out: RUN/curves.png
    r = invoke("plot", runs["real"], "--json")
    assert r.exit_code == 0, r.output
    assert one_json(r.stdout)["paths"] == [str(runs["real"] / "curves.png")]
    png_ok(runs["real"] / "curves.png")
    (runs["real"] / "curves.png").unlink()


def test_same_labels_are_told_apart_by_folder(tmp_path):
    a = write_run(tmp_path / "seed0", "muon", 1e-3, rank=8)
    b = write_run(tmp_path / "seed1", "muon", 1e-3, rank=8)
    c = write_run(tmp_path / "pre", "adamw", 2.5e-4, val=False)
    (c / "env.json").write_text(json.dumps({"mode": "pretrain"}))
    r = invoke("plot", a, b, c, "--out", tmp_path / "x.png", "--json")
    assert r.exit_code == 0, r.output
    assert one_json(r.stdout)["labels"] == ["LoRA-Muon (r=8), lr 1e-3 [seed0]", "LoRA-Muon (r=8), lr 1e-3 [seed1]",
                                            "Pretrain-Adam, lr 2.5e-4"]
    # a run without validation records only leaves the default val_loss panel to the others
    r = invoke("plot", c, "--out", tmp_path / "y.png", "--json")
    assert r.exit_code == 0 and one_json(r.stdout)["metrics"] == ["loss"], r.output


# ----------------------------------------------------------------------------------------------- sweeps


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, fake_engine):
    """A finished two-base-free sweep run by the fake engine: one pretrained base, full/LoRA x Adam/Muon."""
    d = tmp_path_factory.mktemp("sweep")
    recipe = {"data": {"path": "builtin:kjv", "seq_len": 32}, "train": {"steps": 6, "eval_every": 3},
              "sweep": {"name": "plot", "methods": ["full", "lora"], "optims": ["adamw", "muon"],
                        "bases": {"adam": {"pretrain": {"model": {"preset": "tiny"},
                                                        "data": {"path": "builtin:shakespeare"},
                                                        "optimizer": {"name": "adamw"}, "train": {"steps": 4}}}},
                        "lr": {"full": [1e-3, 3e-3], "lora": [3e-3, 1e-2]}, "lora_ranks": [8], "seeds": [0]}}
    plan = S.plan_from_dict(recipe)
    out = d / "sw"
    counts = S.run_sweep(plan, out, workers=2, engine=fake_engine, poll_s=0.05)
    assert counts["done"] == len(plan.cells) == 8, counts
    return out


def test_sweep_figures_redrawn_into_a_folder(sweep_dir, tmp_path):
    figs = tmp_path / "figs"
    r = invoke("plot", sweep_dir, "--out", figs, "--json")
    assert r.exit_code == 0, r.output
    res = one_json(r.stdout)
    assert res["kind"] == "sweep" and set(res["plots"]) == {"ppl_vs_lr", "val_curves"}
    assert sorted(p.name for p in figs.iterdir()) == ["ppl_vs_lr.png", "val_curves.png"]  # figures only
    for p in res["paths"]:
        assert Path(p).parent == figs
        png_ok(Path(p), min_w=400)
    assert not (sweep_dir / "summary.md").exists()  # the sweep directory is left alone
    # default: into the sweep directory
    r = invoke("plot", sweep_dir)
    assert r.exit_code == 0, r.output
    assert sorted(r.stdout.split()) == sorted(str(sweep_dir / n) for n in ("ppl_vs_lr.png", "val_curves.png"))


# ------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_and_writes_nothing(runs, sweep_dir, tmp_path):
    hand = runs["hand"]
    empty = tmp_path / "empty"
    empty.mkdir()
    no_metrics = tmp_path / "fresh"
    no_metrics.mkdir()
    (no_metrics / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"name": "muon", "lr": 1e-3}}))
    (no_metrics / "metrics.jsonl").write_text("")
    no_val = write_run(tmp_path / "noval", "adamw", 1e-3, val=False)
    unplotted = tmp_path / "unplotted"  # a sweep that has not finished a cell
    unplotted.mkdir()
    (unplotted / S.PLAN_FILE).write_text((sweep_dir / S.PLAN_FILE).read_text())
    (unplotted / S.INDEX).write_text("")
    out = tmp_path / "out" / "c.png"
    cases = [
        (("plot", tmp_path / "nope", "--out", out), ("does not exist",)),
        (("plot", empty, "--out", out), ("neither a run directory", "sweep directory")),
        (("plot", no_metrics, "--out", out), ("has no metrics",)),
        (("plot", hand, "--out", out, "--metric", "perplexity"), ("unknown --metric 'perplexity'", "val_ppl")),
        (("plot", hand, "--out", tmp_path / "out" / "c.xyz"), (".xyz", "matplotlib cannot write", ".png")),
        (("plot", hand, "--out", tmp_path / "out" / "curves"), ("no image suffix",)),
        (("plot", hand, "--out", tmp_path), ("is a directory",)),
        (("plot", hand, no_val), ("--out is required",)),
        (("plot", no_val, "--out", out, "--metric", "val_ppl"), ("no run has 'val_ppl'",)),
        (("plot", sweep_dir, "--metric", "loss"), ("--metric is for run directories",)),
        (("plot", sweep_dir, hand, "--out", out), ("one sweep at a time",)),
        (("plot", sweep_dir, "--out", tmp_path / "out" / "fig.png"), ("folder",)),
        (("plot", unplotted, "--out", tmp_path / "out"), ("no cell with a validation PPL",)),
    ]
    for args, needles in cases:
        one_line_error(invoke(*args), *needles)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in unplotted.iterdir()) == sorted([S.PLAN_FILE, S.INDEX])
    assert not (hand / "curves.png").exists() and not (no_val / "curves.png").exists()

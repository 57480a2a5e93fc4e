"""`muonft sweep`: grid expansion, strict schema, resumption after crashes / SIGKILL, failed cells, pruning,
aggregation on hand-made results (the paper's Table 1 numbers), report regeneration and plots, recipes.

Scheduling tests use `tests/_helpers_sweep.py`, a stand-in engine with the real CLI contract (the package has
no fake engine); the end-to-end test through the real engine is in tests/test_sweep_e2e.py.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from muonft_cli import render
from muonft_cli import sweep as S
from muonft_cli.sweep import report as R
from muonft_cli.sweep import scheduler
from muonft_cli.cli import app
from muonft_cli.errors import ConfigError, UserInputError
from _helpers_sweep import fake_ppl

ROOT = Path(__file__).resolve().parents[1]
SWEEP_RECIPES = [ROOT / "recipes" / n for n in ("mismatch-small.yaml", "llama2-7b-lora-muon.yaml",
                                                  "llama2-7b-full.yaml", "sweep-rank-study.yaml",
                                                  "sweep-finetune.yaml")]


def micro_recipe(**sweep_over) -> dict:
    """2 pretrained bases x full/lora x adamw/muon x 3 LRs x 2 seeds = 48 cells (fake engine: fast)."""
    sweep = {
        "name": "micro",
        "bases": {
            "adam": {"pretrain": {"model": {"preset": "tiny"}, "data": {"path": "builtin:shakespeare"},
                                  "optimizer": {"name": "adamw"}, "train": {"steps": 4}}},
            "muon": {"pretrain": {"model": {"preset": "tiny"}, "data": {"path": "builtin:shakespeare"},
                                  "optimizer": {"name": "muon"}, "train": {"steps": 4}}},
        },
        "methods": ["full", "lora"],
        "optims": ["adamw", "muon"],
        "lr": {"full": {"adamw": [3e-4, 1e-3, 3e-3], "muon": [1e-3, 3e-3, 1e-2]},
               "lora": [3e-3, 1e-2, 3e-2]},
        "lora_ranks": [8],
        "seeds": [0, 1],
        "reference_data": "builtin:shakespeare",
    }
    sweep.update(sweep_over)
    return {"data": {"path": "builtin:kjv", "seq_len": 32}, "train": {"steps": 6, "eval_every": 3},
            "sweep": sweep}


def write_recipe(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def fake_log(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Wait until `condition()` holds (a state the fake engine reaches and then keeps); the timeout only bounds a
    hang, and a sweep process that exits first fails the test at once."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the sweep exited ({proc.returncode}) before the awaited state"
        assert time.monotonic() < deadline, f"no {condition.__name__} state after {timeout_s:g} s"
        time.sleep(0.05)


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return log


# ------------------------------------------------------------------------------------------------ grid


def test_grid_expansion_is_complete_deterministic_and_hashes_configs():
    rec = micro_recipe(lora_ranks=[4, 8], axes={"schedule.warmup_ratio": [0.0, 0.1]})
    plan = S.plan_from_dict(rec)
    # per base: full 2 optims x 3 lr x 2 axis x 2 seeds = 24; lora 2 optims x 2 ranks x 3 lr x 2 x 2 = 48
    assert len(plan.cells) == 2 * (24 + 48)
    assert len({c.id for c in plan.cells}) == len(plan.cells)
    assert len({c.hash for c in plan.cells}) == len(plan.cells)
    again = S.plan_from_dict(copy.deepcopy(rec))
    assert [(c.id, c.hash) for c in again.cells] == [(c.id, c.hash) for c in plan.cells]
    c = next(c for c in plan.cells if c.method == "lora" and c.rank == 4 and c.optim == "muon")
    assert c.config["lora"] == {"rank": 4, "alpha": 8.0}
    assert c.config["optimizer"] == {"name": "muon", "lr": c.lr}
    assert c.config["train"]["seed"] == c.seed and c.config["train"]["steps"] == 6
    assert c.config["eval"]["reference_data"] == "builtin:shakespeare"
    assert c.config["schedule"]["warmup_ratio"] in (0.0, 0.1)
    full = next(c for c in plan.cells if c.method == "full")
    assert full.config["lora"]["rank"] is None and full.rank is None
    assert sorted({c.lr for c in plan.cells if c.method == "full" and c.optim == "muon"}) == [1e-3, 3e-3, 1e-2]
    # a changed setting changes exactly the hashes it touches
    rec2 = copy.deepcopy(rec)
    rec2["sweep"]["bases"]["muon"]["pretrain"]["train"]["steps"] = 5
    h1 = {c.id: c.hash for c in plan.cells}
    changed = {c.id for c in S.plan_from_dict(rec2).cells if h1[c.id] != c.hash}
    assert changed == {c.id for c in plan.cells if c.base == "muon"}
    # alpha_equals_2r: false keeps the recipe's alpha
    rec3 = micro_recipe(alpha_equals_2r=False)
    rec3["lora"] = {"alpha": 4}
    assert all(c.config["lora"]["alpha"] == 4 for c in S.plan_from_dict(rec3).cells if c.method == "lora")
    assert plan.bases["muon"].pretrained_with == "muon" and plan.bases["adam"].family == "adam"


def test_sweep_schema_reports_every_problem_at_once_with_suggestions():
    rec = micro_recipe()
    sw = rec["sweep"]
    sw["seed"] = [0]
    sw["methods"] = ["ful", "lora"]
    sw["lr"] = {"full": {"adamw": [1e-3]}, "lora": {"adamw": [-1.0], "moun": [1e-3]}}
    sw["bases"]["adam"]["paht"] = "x"
    sw["axes"] = {"train.stpes": [1, 2], "optimizer.lr": [1e-3]}
    with pytest.raises(ConfigError) as e:
        S.plan_from_dict(rec)
    msg = str(e.value)
    assert "unknown key 'sweep.seed' (did you mean 'seeds'?)" in msg
    assert "sweep.methods[0]: 'ful' is not one of full, lora (did you mean 'full'?)" in msg
    assert "unknown key 'sweep.bases.adam.paht' (did you mean 'path'?)" in msg
    assert "sweep.lr.lora.adamw[0]: must be > 0, got -1.0" in msg
    assert "unknown key 'sweep.lr.lora.moun' (did you mean 'muon'?)" in msg
    assert "sweep.lr.lora.muon: missing" in msg
    assert "unknown key 'train.stpes' (did you mean 'steps'?)" in msg
    assert "sweep.axes.optimizer.lr: set by the sweep itself" in msg
    assert len(e.value.problems) >= 8
    bad = micro_recipe()
    bad["sweep"]["bases"]["adam"]["pretrain"]["optimizer"]["name"] = "adma"
    bad["trian"] = {}
    with pytest.raises(ConfigError) as e:
        S.plan_from_dict(bad)
    assert "sweep.bases.adam.pretrain.optimizer.name: 'adma' is not one of" in str(e.value)
    assert "unknown key 'trian' (did you mean 'train'?)" in str(e.value)
    with pytest.raises(ConfigError, match="needs a 'sweep:' section"):
        S.plan_from_dict({"train": {"steps": 3}})


def test_set_overrides_reach_sweep_and_run_keys(tmp_path):
    p = write_recipe(tmp_path, micro_recipe())
    plan = S.load_plan(p, ["sweep.seeds=[0]", "train.steps=9", "sweep.lr.full.adamw=[1e-4]",
                           "sweep.bases.adam.pretrain.train.steps=2"])
    assert plan.seeds == [0]
    assert all(c.config["train"]["steps"] == 9 for c in plan.cells)
    assert {c.lr for c in plan.cells if (c.method, c.optim) == ("full", "adamw")} == {1e-4}
    assert plan.bases["adam"].pretrain["train"]["steps"] == 2
    with pytest.raises(ConfigError, match="unknown key 'sweep.seedz'"):
        S.load_plan(p, ["sweep.seedz=[0]"])


# ------------------------------------------------------------------------------------------------ running


def small_plan(tmp_path: Path, **over) -> S.SweepPlan:
    rec = micro_recipe(**over)
    rec["sweep"]["lr"] = {"full": {"adamw": [1e-3, 3e-3], "muon": [3e-3, 1e-2]}, "lora": [3e-3, 1e-2]}
    return S.plan_from_dict(rec)


def test_sweep_runs_every_cell_once_records_failures_and_prunes_weights(tmp_path, fake_env, monkeypatch, fake_engine):
    monkeypatch.setenv("FAKE_DIVERGE_LR", "0.01")  # lr 1e-2 cells "diverge to NaN" and exit 1
    rec = micro_recipe(seeds=[0])
    rec["sweep"]["bases"].pop("adam")
    rec["sweep"]["lr"] = {"full": {"adamw": [1e-3, 3e-3], "muon": [3e-3, 1e-2]}, "lora": [3e-3, 1e-2]}
    plan = S.plan_from_dict(rec)
    out = tmp_path / "sw"
    events = []
    counts = S.run_sweep(plan, out, workers=2, engine=fake_engine, on_event=events.append, poll_s=0.05)
    n_fail = sum(c.lr >= 0.01 for c in plan.cells)
    assert n_fail == 3 and {k: counts[k] for k in ("total", "skipped", "done", "failed", "kept_failed")} == {
        "total": 8, "skipped": 0, "done": 5, "failed": 3, "kept_failed": 0}
    assert sorted(c["id"] for c in counts["failed_cells"]) == sorted(c.id for c in plan.cells if c.lr >= 0.01)
    assert all("loss is NaN" in c["error"] for c in counts["failed_cells"]) and counts["failed_jobs"] == []
    latest = S.SweepIndex(out / S.INDEX).latest()
    for c in plan.cells:
        rec = latest[c.id]
        assert rec["status"] == ("failed" if c.lr >= 0.01 else "done"), rec
        if rec["status"] == "failed":
            assert "loss is NaN" in rec["error"] and rec["returncode"] == 1
        else:
            assert rec["summary"]["val_ppl"] == pytest.approx(fake_ppl(c.lr, c.optim, c.method, "muon", c.seed))
    # forgetting is evaluated for the cells at each group's best LR, and only for them
    best = S.best_lrs(plan, latest)
    evals = {i[len("ref:"):]: r for i, r in latest.items() if i.startswith("ref:")}
    assert set(evals) == {c.id for c in plan.cells if best.get(c.group) == c.lr}
    assert all(r["status"] == "done" and r["eval"]["data"]["model"]["ppl"] == pytest.approx(
        40.0 * (1.2 if r["method"] == "full" else 1.05)) for r in evals.values())
    # the base is evaluated once on the fine-tuning split and once on the reference set, never per cell
    assert latest["base_eval:muon:s0"]["eval"]["data"]["model"]["ppl"] == 25.0
    assert latest["base_ref:muon:s0"]["eval"]["data"]["model"]["ppl"] == 40.0
    ev_log = [e for e in fake_log(fake_env) if e["event"] == "eval"]
    assert all(e["model_only"] for e in ev_log) and len(ev_log) == len(evals) + 2
    assert sum(e["key"] == "ref_ppl" for e in ev_log) == len(evals) + 1
    starts = [e for e in fake_log(fake_env) if e["event"] == "start"]
    assert len(starts) == 8 + 1  # every cell once + the pretrain base
    assert any(e["status"] == "failed" for e in events) and any(e["status"] == "done" for e in events)
    # pruning: checkpoints gone everywhere; full-model weights only at each group's best LR
    for c in plan.cells:
        d = out / "cells" / c.id
        assert not (d / "checkpoints").exists()
        if latest[c.id]["status"] != "done":
            continue
        if c.method == "lora":
            assert (d / "final" / "adapter_model.safetensors").exists()
        else:
            assert (d / "final" / "model.safetensors").exists() == (best[c.group] == c.lr)
            assert (d / "final" / "WEIGHTS_DELETED").exists() == (best[c.group] != c.lr)
    assert not (out / "cells" / "muon-full-adamw-lr0.003-s0" / "final" / "model.safetensors").exists()
    assert (out / "bases" / "muon" / "final" / "model.safetensors").exists()
    # a second run skips everything (failed cells are kept as failed unless retry_failed)
    counts = S.run_sweep(plan, out, workers=2, engine=fake_engine, poll_s=0.05)
    assert counts["skipped"] == 8 and len([e for e in fake_log(fake_env) if e["event"] == "start"]) == 9
    assert counts["failed"] == counts["kept_failed"] == 3 and len(counts["failed_cells"]) == 3
    # --keep-weights keeps every full model
    out2 = tmp_path / "sw2"
    monkeypatch.delenv("FAKE_DIVERGE_LR")
    rec = micro_recipe(seeds=[0], methods=["full"], optims=["adamw"], reference_data=None,
                       bases={"a": {"path": str(tmp_path / "nobase")}})
    S.run_sweep(S.plan_from_dict(rec), out2, engine=fake_engine, keep_weights=True, poll_s=0.05)
    assert all((d / "final" / "model.safetensors").exists() and (d / "checkpoints").exists()
               for d in (out2 / "cells").iterdir())


def _sweep_script(plan_path: Path, out: Path, engine: list[str], workers: int = 2) -> list[str]:
    """`run_sweep` in a process of its own (the tests kill it); the engine command is passed in as a literal."""
    code = ("from muonft_cli import sweep as S;"
            f"S.run_sweep(S.load_plan({str(plan_path)!r}), {str(out)!r}, workers={workers}, "
            f"engine={list(engine)!r}, poll_s=0.05)")
    return [sys.executable, "-c", code]


def _check_each_cell_done_once(plan: S.SweepPlan, out: Path, log: Path) -> None:
    latest = S.SweepIndex(out / S.INDEX).latest()
    assert all(latest[c.id]["status"] == "done" for c in plan.cells)
    done = [Path(e["out"]).name for e in fake_log(log) if e["event"] == "done"]
    cell_done = [d for d in done if d in {c.id for c in plan.cells}]
    assert sorted(cell_done) == sorted(c.id for c in plan.cells)  # none lost, none finished twice
    for c in plan.cells:  # every run's metrics are whole: each step exactly once, ending at the last step
        steps = [json.loads(ln)["step"] for ln in (out / "cells" / c.id / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(0, 7)), (c.id, steps)


def test_resume_after_sigkill_of_the_sweep_process(tmp_path, fake_env, monkeypatch, fake_engine):
    monkeypatch.setenv("FAKE_HOLD_AT", "-muon-lr:4")  # the muon cells stop at step 4, checkpointed, until SIGTERM
    plan_path = write_recipe(tmp_path, micro_recipe(seeds=[0], methods=["lora"], optims=["adamw", "muon"],
                                                    lr={"lora": [3e-3, 1e-2]}, reference_data=None,
                                                    bases={"adam": {"path": str(tmp_path / "nobase")}}))
    plan = S.load_plan(plan_path)
    out = tmp_path / "sw"
    proc = subprocess.Popen(_sweep_script(plan_path, out, fake_engine), env=os.environ.copy())
    index = S.SweepIndex(out / S.INDEX)

    def settled() -> bool:  # the adamw cells are done and both workers hold a muon cell mid-run
        st = [r["status"] for i, r in index.latest().items() if not i.startswith("base")]
        return st.count("done") == 2 and sum(e["event"] == "held" for e in fake_log(fake_env)) == 2

    wait_for(settled, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = index.latest()
    done_before = {i for i, r in latest.items() if r["status"] == "done" and not i.startswith("base")}
    interrupted = {i for i, r in latest.items() if r["status"] == "running" and S.has_checkpoint(out / "cells" / i)}
    assert done_before and interrupted
    monkeypatch.delenv("FAKE_HOLD_AT")
    S.run_sweep(plan, out, workers=2, engine=fake_engine, poll_s=0.05)  # waits for orphans to let go of cells
    _check_each_cell_done_once(plan, out, fake_env)
    log = fake_log(fake_env)
    for i in done_before:  # finished cells were not started again
        assert sum(e["event"] == "start" and Path(e["out"]).name == i for e in log) == 1
    resumed = {Path(e["out"]).name for e in log if e["event"] == "start" and e["resume"]}
    assert interrupted <= resumed  # interrupted runs with a checkpoint continued from it
    terms = {Path(e["out"]).name for e in log if e["event"] == "term"}
    assert interrupted <= terms  # orphaned cells got SIGTERM (PR_SET_PDEATHSIG), checkpointed and exited


def test_resume_after_crash_mid_cell(tmp_path, fake_env, monkeypatch, fake_engine):
    """The sweep dies in the middle of a cell (the cell itself kills it at step 4); a restart resumes that cell."""
    target = "adam-lora-r8-muon-lr0.003-s0"
    monkeypatch.setenv("FAKE_KILL_PARENT_AT", f"{target}:4")
    plan_path = write_recipe(tmp_path, micro_recipe(seeds=[0], methods=["lora"], lr={"lora": [3e-3]},
                                                    reference_data=None, bases={"adam": {
                                                        "path": str(tmp_path / "nobase"), "pretrained_with": "adamw"}}))
    plan = S.load_plan(plan_path)
    out = tmp_path / "sw"
    proc = subprocess.run(_sweep_script(plan_path, out, fake_engine, workers=1), env=os.environ.copy(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert S.SweepIndex(out / S.INDEX).latest()[target]["status"] == "running"
    counts = S.run_sweep(plan, out, workers=1, engine=fake_engine, poll_s=0.05)
    assert counts["done"] == len(plan.cells) == 2
    _check_each_cell_done_once(plan, out, fake_env)
    starts = [e for e in fake_log(fake_env) if e["event"] == "start" and Path(e["out"]).name == target]
    assert [s["resume"] for s in starts] == [False, True] and starts[1]["start"] == 4


def test_torn_index_line_is_ignored_and_writing_goes_on(tmp_path):
    idx = S.SweepIndex(tmp_path / "sweep.jsonl")
    idx.append({"id": "a", "status": "done"})
    with open(idx.path, "a") as fh:
        fh.write('{"id": "b", "status": "do')  # SIGKILL mid-write
    idx.append({"id": "b", "status": "running"})
    assert {k: v["status"] for k, v in idx.latest().items()} == {"a": "done", "b": "running"}


# ------------------------------------------------------------------------------------------------ aggregation


def paper_cells() -> tuple[list[dict], dict]:
    """Hand-made results whose best normalised PPLs are the paper's Table 1 (base PPL 20, 3 seeds)."""
    table1 = {("muon", "full", "muon"): 0.716, ("muon", "full", "adamw"): 0.739,
              ("muon", "lora", "muon"): 0.719, ("muon", "lora", "adamw"): 0.733,
              ("adam", "full", "muon"): 0.719, ("adam", "full", "adamw"): 0.710,
              ("adam", "lora", "muon"): 0.723, ("adam", "lora", "adamw"): 0.721}
    cells = []
    for (base, method, optim), best in table1.items():
        for i, lr in enumerate([1e-4, 1e-3, 1e-2]):
            for seed, noise in enumerate([-0.1, 0.0, 0.1]):
                ppl = 20 * best + noise + (0 if i == 1 else 1.5)
                cells.append({"id": f"{base}-{method}-{optim}-{lr}-{seed}", "base": base, "method": method,
                              "optim": optim, "rank": 8 if method == "lora" else None, "axes": [], "lr": lr,
                              "seed": seed, "status": "done", "ppl": ppl, "ref_ppl": 30.0 + seed})
    bases = {"muon": {"label": "muon", "pretrained_with": "muon", "ppl": 20.0, "ref_ppl": 25.0},
             "adam": {"label": "adam", "pretrained_with": "adamw", "ppl": 20.0, "ref_ppl": 25.0}}
    return cells, bases


def test_aggregate_reproduces_table1_gaps_and_gap_reduction():
    cells, bases = paper_cells()
    # one failed seed at the lowest LR of one group must make that LR ineligible, not the best
    cells.append({**cells[0], "id": "x", "lr": 1e-5, "status": "failed", "ppl": None, "seed": 0})
    s = R.aggregate(cells, bases)
    g = {(r["base"], r["method"], r["optim"]): r for r in s["groups"]}
    fm = g[("muon", "full", "muon")]
    assert fm["best_lr"] == 1e-3 and fm["n_seeds"] == 3
    assert fm["ppl_mean"] == pytest.approx(20 * 0.716)
    assert fm["ppl_std"] == pytest.approx(0.1)  # sample std of (-0.1, 0, 0.1)
    assert fm["normalised"] == pytest.approx(0.716) and fm["matched"] is True
    assert g[("muon", "full", "adamw")]["matched"] is False
    assert fm["ref_ppl_mean"] == pytest.approx(31.0) and fm["forgetting"] == pytest.approx(31 / 25 - 1)
    assert fm["edge"] is None
    row = {r["label"]: r for r in s["table1"]}
    assert row["Full-Adam"]["cols"]["muon"]["gap"] == pytest.approx(0.023)
    assert row["Full-Muon"]["cols"]["adam"]["gap"] == pytest.approx(0.009)
    assert row["LoRA-Adam (r=8)"]["cols"]["muon"]["gap"] == pytest.approx(0.014)
    assert row["LoRA-Muon (r=8)"]["cols"]["adam"]["gap"] == pytest.approx(0.002)
    assert row["Full-Muon"]["cols"]["muon"]["gap"] is None  # matched entries have no gap
    red = {r["base"]: r["reduction_pct"] for r in s["gap_reduction"]}
    assert red["muon"] == pytest.approx(100 * (0.023 - 0.014) / 0.023)  # paper: 39 %
    assert red["adam"] == pytest.approx(100 * (0.009 - 0.002) / 0.009)  # paper: 78 %
    assert round(red["muon"]) == 39 and round(red["adam"]) == 78
    md = R.to_markdown(s)
    assert "| Full-Adam | 0.739 (+.023) | 0.710 |" in md
    assert "| muon | Adam (r=8) | +0.023 | +0.014 | 39 % |" in md
    csv_rows = R.to_csv(s).splitlines()
    assert len(csv_rows) == 1 + 8 and csv_rows[0].startswith("base,pretrained_with,method")


def test_aggregate_flags_edges_failures_and_rank_study():
    cells, bases = paper_cells()
    for c in cells:  # make the highest LR best for one group, and add a second rank
        if (c["base"], c["method"], c["optim"]) == ("adam", "full", "adamw") and c["lr"] == 1e-2:
            c["ppl"] -= 3
    extra = [{**c, "id": c["id"] + "-r2", "rank": 2, "ppl": c["ppl"] + 0.5} for c in cells if c["method"] == "lora"]
    s = R.aggregate(cells + extra, bases)
    g = next(r for r in s["groups"] if (r["base"], r["method"], r["optim"]) == ("adam", "full", "adamw"))
    assert g["best_lr"] == 1e-2 and g["edge"] == "highest"
    assert any("highest of the grid" in w for w in s["warnings"])
    ranks = {(r["base"], r["optim"], r["rank"]) for r in s["rank_study"]}
    assert ("adam", "muon", 2) in ranks and ("adam", "muon", 8) in ranks
    # no base PPL: no normalisation, raw PPL gaps
    s2 = R.aggregate(cells, {k: {**v, "ppl": None} for k, v in bases.items()})
    assert s2["normalised"] is False
    row = {r["label"]: r for r in s2["table1"]}
    assert row["Full-Adam"]["cols"]["muon"]["gap"] == pytest.approx(20 * 0.023)


# ------------------------------------------------------------------------------------------------ report + CLI


def _png_ok(path: Path, min_w: int = 400, min_h: int = 300, coloured: float = 0.002) -> None:
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(path)
    assert img.shape[0] >= min_h and img.shape[1] >= min_w
    rgb = np.asarray(img)[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert (rgb.reshape(-1, 3).std(axis=1) > 0.1).mean() > coloured  # some coloured (line / marker) pixels


def fabricate_sweep(plan: S.SweepPlan, out: Path) -> None:
    """A finished sweep directory written by hand: index records + metrics.jsonl from `fake_ppl`."""
    idx = S.SweepIndex(out / S.INDEX)
    (out / "cells").mkdir(parents=True)
    for name, b in plan.bases.items():
        for seed in plan.seeds:
            idx.append({"id": f"base_eval:{name}:s{seed}", "kind": "base_eval", "hash": "x", "status": "done",
                        "eval": {"data": {"model": {"ppl": 25.0 + seed}}}})
            idx.append({"id": f"base_ref:{name}:s{seed}", "kind": "base_ref", "hash": "x", "status": "done",
                        "eval": {"data": {"model": {"ppl": 40.0}}}})
    for c in plan.cells:
        ppl = fake_ppl(c.lr, c.optim, c.method, plan.bases[c.base].pretrained_with, c.seed) + 0.1 * (c.rank or 0)
        d = out / "cells" / c.id
        d.mkdir()
        with open(d / "metrics.jsonl", "w") as fh:
            for step in range(1, 7):
                v = 28.0 + (ppl - 28.0) * step / 6
                fh.write(json.dumps({"step": step, "loss": math.log(v), "val_ppl": v}) + "\n")
        idx.append({"id": c.id, "kind": "cell", "hash": c.hash, "status": "done", "runtime_s": 1.0,
                    "summary": {"val_ppl": ppl, "best_val_ppl": ppl}})
        idx.append({"id": f"ref:{c.id}", "kind": "cell_eval", "hash": c.hash, "status": "done",
                    "eval": {"data": {"model": {"ppl": 40.0 * (1.2 if c.method == "full" else 1.05)}}}})


def test_report_regeneration_and_plots_through_the_cli(tmp_path):
    plan = small_plan(tmp_path, lora_ranks=[4, 8], seeds=[0, 1])
    out = tmp_path / "sw"
    fabricate_sweep(plan, out)
    (out / S.PLAN_FILE).write_text(yaml.safe_dump(plan.recipe))
    summary = R.write_report(out, plan)
    first = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["done"] == len(plan.cells) == 2 * (4 + 8) * 2
    assert summary["normalised"] and summary["bases"]["adam"]["ppl_by_seed"] == {0: 25.0, 1: 26.0}
    g = next(g for g in summary["groups"] if g["best_lr"] is not None)  # per-seed normalisation
    cs = [c for c in plan.cells if (c.base, c.method, c.optim, c.rank) == (g["base"], g["method"], g["optim"],
                                                                            g["rank"]) and c.lr == g["best_lr"]]
    vals = [(fake_ppl(c.lr, c.optim, c.method, plan.bases[c.base].pretrained_with, c.seed) + 0.1 * (c.rank or 0))
            / (25.0 + c.seed) for c in cs]
    assert g["normalised"] == pytest.approx(sum(vals) / 2)
    assert g["forgetting"] == pytest.approx(0.2 if g["method"] == "full" else 0.05)
    # validation curve of the best runs: step 0 is the base itself (mean over seeds), then the logged evals
    assert g["best_curve"][0] == [0, 25.5] and [s for s, _ in g["best_curve"]] == list(range(7))
    for name in ("summary.md", "summary.csv", "summary.json", "ppl_vs_lr.png", "val_curves.png",
                 "ppl_vs_rank.png"):
        (out / name).unlink()
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", "--report", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["counts"]["done"] == 48
    again = json.loads((out / "summary.json").read_text())
    assert again["table1"] == first["table1"] and again["groups"] == first["groups"]
    for name in ("ppl_vs_lr.png", "val_curves.png", "ppl_vs_rank.png"):
        _png_ok(out / name)
    md = (out / "summary.md").read_text()
    assert "## Table 1" in md and "## Rank study" in md and "## Forgetting" in md
    # fake engine: the muon-pretrained base fine-tuned with adam is mismatched: a positive gap
    row = {r["label"]: r for r in again["table1"]}
    assert row["Full-Adam"]["cols"]["muon"]["gap"] > 0
    table = render.sweep_table(again)
    assert [c.header for c in table.columns][:3] == ["fine-tune", "adam (Adam-pretrained)", "muon (Muon-pretrained)"]


def test_cli_dry_run_and_bad_input(tmp_path):
    p = write_recipe(tmp_path, micro_recipe())
    runner = CliRunner()
    res = runner.invoke(app, ["sweep", str(p), "--dry-run", "--set", "sweep.seeds=[0]"])
    assert res.exit_code == 0, res.output
    ids = [ln.split()[0] for ln in res.stdout.strip().splitlines()]
    assert len(ids) == len(S.load_plan(p, ["sweep.seeds=[0]"]).cells) == 2 * (6 + 6)
    assert "adam-full-adamw-lr0.0003-s0" in ids
    assert not (tmp_path / "runs").exists()
    res = runner.invoke(app, ["sweep", str(p), "--dry-run", "--set", "sweep.metods=[full]"])
    assert res.exit_code == 2 and "did you mean 'methods'" in res.output
    res = runner.invoke(app, ["sweep", str(p)])
    assert res.exit_code == 2 and "--out is required" in res.output
    res = runner.invoke(app, ["sweep", "--report", str(tmp_path)])
    assert res.exit_code == 2 and "not a sweep directory" in res.output


def test_a_second_sweep_in_the_same_directory_is_refused(tmp_path, fake_engine):
    out = tmp_path / "sw"
    (out / "locks").mkdir(parents=True)
    fd = scheduler._try_lock(out / "locks" / "sweep.lock")
    try:
        with pytest.raises(UserInputError, match="another `muonft sweep` is running"):
            S.run_sweep(small_plan(tmp_path), out, engine=fake_engine)
    finally:
        os.close(fd)


def test_worker_env_divides_threads_and_assigns_gpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    env = S.worker_env(0, 2, gpus=0)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "4"
    assert S.worker_env(1, 16, gpus=0)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert [S.worker_env(i, 3, gpus=2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["2", "5", "2"]


def test_fixed_split_evaluates_each_base_once(tmp_path, fake_env, fake_engine):
    """`data.split_seed` fixes the validation split: each base is evaluated once (not once per seed) and every
    seed's cells are normalised by that one evaluation."""
    rec = micro_recipe(seeds=[0, 1, 2], methods=["lora"], optims=["muon"])
    rec["sweep"]["bases"].pop("adam")
    rec["sweep"]["lr"] = {"lora": [3e-3, 1e-2]}
    rec["data"]["split_seed"] = 7
    plan = S.plan_from_dict(rec)
    assert S.split_seeds(plan) == {0: 0, 1: 0, 2: 0}
    out = tmp_path / "sw"
    S.run_sweep(plan, out, workers=2, engine=fake_engine, poll_s=0.05)
    latest = S.SweepIndex(out / S.INDEX).latest()
    assert sorted(i for i in latest if i.startswith("base_")) == ["base_eval:muon:s0", "base_ref:muon:s0"]
    summary = R.write_report(out, plan)
    assert summary["bases"]["muon"]["ppl_by_seed"] == {0: 25.0, 1: 25.0, 2: 25.0}
    g = next(g for g in summary["groups"] if g["best_lr"] is not None)
    assert g["n_seeds"] == 3 and g["forgetting"] == pytest.approx(0.05)


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("path", SWEEP_RECIPES, ids=[p.name for p in SWEEP_RECIPES])
def test_sweep_recipes_validate(path):
    plan = S.load_plan(path)
    assert plan.cells and len(plan.seeds) >= 3
    for m in plan.methods:
        for o in plan.optims:
            lrs = plan.lrs[m][o]  # room for an interior optimum: >= 3 points over >= 1 decade
            assert len(lrs) >= 3 and max(lrs) / min(lrs) >= 10


def test_mismatch_small_is_the_papers_controlled_experiment():
    plan = S.load_plan(ROOT / "recipes" / "mismatch-small.yaml")
    assert plan.methods == ["full", "lora"] and plan.optims == ["adamw", "muon"] and plan.lora_ranks == [8]
    assert plan.alpha_equals_2r and plan.seeds == [0, 1, 2]
    assert {b.family for b in plan.bases.values()} == {"adam", "muon"}
    pre_data = {b.pretrain["data"]["path"] for b in plan.bases.values()}
    assert len(pre_data) == 1 and plan.run["data"]["path"] not in pre_data  # fine-tune on the other corpus
    assert plan.reference_data in pre_data  # forgetting measured on the pretraining corpus
    lora = next(c for c in plan.cells if c.method == "lora")
    assert lora.config["lora"]["rank"] == 8 and lora.config["lora"]["alpha"] == 16


def test_mismatch_converged_differs_from_the_small_recipe_only_in_pretraining_length():
    small, conv = (S.load_plan(ROOT / "recipes" / f"mismatch-{n}.yaml") for n in ("small", "converged"))
    assert small.run == conv.run and [c.id for c in small.cells] == [c.id for c in conv.cells]
    for a, b in zip(small.cells, conv.cells):  # the same fine-tuning run, from the other (longer) base
        assert a.config["model"]["name_or_path"] != b.config["model"]["name_or_path"]
        assert {k: v for k, v in a.config.items() if k != "model"} == {k: v for k, v in b.config.items()
                                                                       if k != "model"}
    for name in ("adam", "muon"):
        a, b = small.bases[name].pretrain, conv.bases[name].pretrain
        assert a["train"]["steps"] == 300 and b["train"]["steps"] == 3000
        strip = lambda d: {k: v for k, v in d.items() if k != "train"}  # noqa: E731
        assert strip(a) == strip(b)
        keep = ("batch_size", "micro_batch_size", "seed", "clip")
        assert {k: a["train"][k] for k in keep} == {k: b["train"][k] for k in keep}
    assert small.lrs == conv.lrs and small.seeds == conv.seeds


def test_pretraining_convergence_is_measured_over_the_last_fifth(tmp_path):
    from muonft_cli.sweep.report import convergence

    m = tmp_path / "metrics.jsonl"
    losses = {0: 8.0, 500: 5.0, 1000: 4.2, 1500: 4.05, 2000: 4.02, 2500: 4.0}
    m.write_text("".join(json.dumps({"step": s, "loss": v, "val_loss": v}) + "\n"
                         for s, v in losses.items()) + json.dumps({"step": 2500, "loss": 4.0}) + "\n")
    cv = convergence(m)
    assert cv["window"] == [2000, 2500] and cv["val_loss_start"] == pytest.approx(4.02)
    assert cv["rel_improvement"] == pytest.approx(0.02 / 4.02) and cv["plateaued"]
    m.write_text("".join(json.dumps({"step": s, "val_loss": v}) + "\n" for s, v in
                         {0: 8.0, 100: 6.0, 200: 5.0, 300: 4.5}.items()))
    cv = convergence(m)
    assert cv["window"] == [200, 300] and not cv["plateaued"] and cv["best_step"] == 300
    m.write_text(json.dumps({"step": 0, "val_loss": 8.0}) + "\n")
    assert convergence(m) is None


def test_llama_recipes_use_the_papers_grid_and_settings():
    grid = [1e-6, 5e-6, 8e-6, 1e-5, 2e-5, 5e-5, 1e-4, 5e-4]
    for name, method in (("llama2-7b-lora-muon.yaml", "lora"), ("llama2-7b-full.yaml", "full")):
        plan = S.load_plan(ROOT / "recipes" / name)
        assert plan.methods == [method]
        assert all(plan.lrs[method][o] == grid for o in plan.optims)
        (b,) = plan.bases.values()
        assert b.path == "meta-llama/Llama-2-7b-hf" and b.family == "adam"
        c = plan.cells[0]
        assert c.config["train"]["batch_size"] == 32 and c.config["data"]["seq_len"] == 1024
        assert c.config["train"]["epochs"] == 1 and c.config["schedule"]["warmup_ratio"] == 0.03
    plan = S.load_plan(ROOT / "recipes" / "sweep-rank-study.yaml")
    assert plan.lora_ranks == [2, 4, 8, 16, 32, 64, 128, 256, 512] and plan.alpha_equals_2r


def test_diagnose_recommendation_carries_a_valid_sweep_command():
    import shlex

    from muonft_cli.diagnose.verdict import recommend

    for fam, target in (("adam", "muon"), ("muon", "muon"), (None, "adamw")):
        rec = recommend(fam, target, 2_000_000, "runs/pre-adam/final", "builtin:kjv", source="test")
        args = shlex.split(rec["sweep_command"])
        assert args[:3] == ["muonft", "sweep", S.FINETUNE_SWEEP_RECIPE]
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
        plan = S.load_plan(S.FINETUNE_SWEEP_RECIPE, sets)
        assert plan.optims == [target] and plan.methods == [rec["method"]]
        assert plan.bases["model"].path == "runs/pre-adam/final"
        assert plan.bases["model"].family == {"adam": "adam", "muon": "muon", None: None}[fam]
        assert plan.run["data"]["path"] == "builtin:kjv"
        assert set(plan.lrs[rec["method"]][target]) == set(rec["lr_grid"])


# ------------------------------------------------------------------------------------------------ refactor pins

# (cells, sha256[:16] of the ordered (cell id, hash) list, sha256[:16] of the ordered (job id, hash) list of the
# static jobs, base hashes), computed with the sweep code before the issue-10 split (commit ce1aba6): an
# unchanged recipe must expand to the same cells with the same hashes, or old sweep directories re-run them.
PINNED_PLANS = {
    "llama2-7b-full.yaml": [48, "8782215dbbff5c93", "6a2e2c83477dd0e6", {"llama2-7b": "9a63c25391fc"}],
    "llama2-7b-lora-muon.yaml": [48, "b030fdd917738d6d", "3a0738f931e53878", {"llama2-7b": "9a63c25391fc"}],
    "mismatch-converged.yaml": [84, "457def41d5e1ee27", "989caa28bb708137",
                                {"adam": "2dd81e0f1bd2", "muon": "b1b56db83ccf"}],
    "mismatch-small.yaml": [84, "2c52b727e9611b81", "40da17592e89e95b",
                            {"adam": "b820688d9355", "muon": "312ba28e5f47"}],
    "mismatch-mitigation.yaml": [66, "5a5066bb76c979c7", "52db7ac9ec04c84c",
                                 {"adam": "b820688d9355", "muon": "312ba28e5f47"}],
    "mismatch-muon-form.yaml": [48, "b75daaa3c5853c76", "9edbae215561e2e5",
                                {"adam": "b820688d9355", "muon": "312ba28e5f47"}],
    "sweep-finetune.yaml": [60, "7da45a891ce66f1b", "8377e32d85fafe9a", {"model": "dc5d36813fe7"}],
    "sweep-rank-study.yaml": [486, "8c0a67ca6ac6a558", "b1e3dd3cdd385013", {"llama2-7b": "9a63c25391fc"}],
    "micro-axes": [288, "b812fa01ca3d4a8b", "8ec1a8a2a1854b95", {"adam": "a79f95179abc", "muon": "c61a07e24f29"}],
    "micro-alpha": [48, "89886f59fb196ef4", "7d46145a31f4229b", {"adam": "a79f95179abc", "muon": "c61a07e24f29"}],
}


def _plan_fingerprint(plan: S.SweepPlan) -> list:
    import hashlib

    from muonft_cli.sweep.jobs import static_jobs

    def digest(pairs):
        return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()[:16]

    return [len(plan.cells), digest([(c.id, c.hash) for c in plan.cells]),
            digest([(j.id, j.hash) for j in static_jobs(plan, Path("/x"))]), {n: b.hash for n, b in plan.bases.items()}]


@pytest.mark.parametrize("name", sorted(PINNED_PLANS))
def test_plans_expand_to_the_cells_and_hashes_of_before_the_split(name):
    if name == "micro-axes":
        plan = S.plan_from_dict(micro_recipe(
            lora_ranks=[4, 8], axes={"schedule.warmup_ratio": [0.0, 0.1], "train.batch_size": [8, 16]},
            per_optim={"muon": {"optimizer": {"adamw_lr": 3e-4}}}))
    elif name == "micro-alpha":
        rec = micro_recipe(alpha_equals_2r=False)
        rec["lora"] = {"alpha": 4}
        rec["data"]["split_seed"] = 1
        plan = S.plan_from_dict(rec)
    else:
        plan = S.load_plan(ROOT / "recipes" / name)
    assert _plan_fingerprint(plan) == PINNED_PLANS[name]


def test_every_shipped_sweep_recipe_is_pinned():
    shipped = {p.name for p in (ROOT / "recipes").glob("*.yaml") if "sweep" in yaml.safe_load(p.read_text())}
    assert shipped == {n for n in PINNED_PLANS if n.endswith(".yaml")}


# ------------------------------------------------------------------------------------------------ bug fixes


def test_full_weights_are_pruned_only_once_every_seed_of_the_group_finished(tmp_path, fake_env, fake_engine,
                                                                            monkeypatch):
    """Bug: pruning used the best LR over the seeds done so far; a later seed moved the best LR back to a
    pruned one, whose forgetting evaluation then failed for lack of model.safetensors."""
    # workers=1 runs lr 1e-3 (s0, s1), then lr 3e-3 s0 (shifted to look best), then s1 (shifted far up)
    monkeypatch.setenv("FAKE_PPL_SHIFT", "lr0.003-s0=-5,lr0.003-s1=20")
    rec = micro_recipe(seeds=[0, 1], methods=["full"], optims=["adamw"], lr={"full": [1e-3, 3e-3]},
                       bases={"adam": {"path": str(tmp_path / "nobase"), "pretrained_with": "adamw"}})
    plan = S.plan_from_dict(rec)
    out = tmp_path / "sw"
    counts = S.run_sweep(plan, out, workers=1, engine=fake_engine, poll_s=0.05)
    assert counts["done"] == 4
    latest = S.SweepIndex(out / S.INDEX).latest()
    (group,) = {c.group for c in plan.cells}
    assert S.best_lrs(plan, latest)[group] == 1e-3
    for c in plan.cells:
        final = out / "cells" / c.id / "final"
        assert (final / "model.safetensors").exists() == (c.lr == 1e-3), c.id
        assert (final / "WEIGHTS_DELETED").exists() == (c.lr != 1e-3), c.id
        assert not (out / "cells" / c.id / "checkpoints").exists()
    evals = {i: r for i, r in latest.items() if i.startswith("ref:")}
    assert set(evals) == {f"ref:{c.id}" for c in plan.cells if c.lr == 1e-3}
    assert all(r["status"] == "done" for r in evals.values()), evals


@pytest.mark.parametrize("message, refused", [
    ("--resume: the config differs from the run in 'x' (train.seq_len: 32 -> 64): resume with the same "
     "settings (only --steps may grow), or start a new run with another --out", True),
    ("data path 'corpus.txt' does not exist: pass a builtin:NAME, a local file or a hub dataset", False),
])
def test_only_a_refused_resume_restarts_a_cell_afresh(tmp_path, fake_env, fake_engine, monkeypatch, message, refused):
    """Bug: any exit 2 of a resume attempt restarted the cell with --overwrite, deleting its checkpoint."""
    monkeypatch.setenv("FAKE_RESUME_EXIT2", message)
    rec = micro_recipe(seeds=[0], methods=["lora"], optims=["adamw"], lr={"lora": [3e-3]}, reference_data=None,
                       bases={"adam": {"path": str(tmp_path / "nobase"), "pretrained_with": "adamw"}})
    plan = S.plan_from_dict(rec)
    (cell,) = plan.cells
    out = tmp_path / "sw"
    ck = out / "cells" / cell.id / "checkpoints" / "step-000004"  # an interrupted run with a checkpoint
    ck.mkdir(parents=True)
    (ck / "state.json").write_text('{"step": 4}')
    counts = S.run_sweep(plan, out, engine=fake_engine, keep_weights=True, poll_s=0.05)
    records = [r for r in S.SweepIndex(out / S.INDEX).records() if r["id"] == cell.id]
    starts = [e for e in fake_log(fake_env) if e["event"] == "start" and Path(e["out"]).name == cell.id]
    if refused:  # the engine's refusal: start afresh
        assert counts["done"] == 1 and records[-1]["status"] == "done"
        assert any("resume refused, restarting" in (r.get("note") or "") for r in records)
        assert [s["resume"] for s in starts] == [False]
    else:  # any other bad input: the cell fails and keeps its checkpoint for a fixed re-run
        assert counts["failed"] == 1 and records[-1]["status"] == "failed"
        assert records[-1]["returncode"] == 2 and "corpus.txt" in records[-1]["error"]
        assert not any(r.get("note") for r in records) and starts == []
        assert (ck / "state.json").exists()


def test_the_finetune_cli_reports_a_refused_resume_as_the_sweep_expects(tmp_path):
    from muonft_cli.errors import ResumeRefusedError, UserInputError
    from muonft_cli.sweep.jobs import resume_refused

    assert str(ResumeRefusedError("no run there")) == "--resume: no run there"
    assert isinstance(ResumeRefusedError("x"), UserInputError) and ResumeRefusedError.exit_code == 2
    res = CliRunner().invoke(app, ["finetune", "--model", str(tmp_path / "m"), "--data", "builtin:kjv",
                                   "--out", str(tmp_path / "empty"), "--resume"])
    assert res.exit_code == 2, res.output
    err = tmp_path / "err"
    err.write_text("=== attempt 1\n" + res.output)
    assert resume_refused(err, 2) and not resume_refused(err, 1)
    err.write_text("=== attempt 1\n" + res.output + "\nerror: data path 'x' does not exist\n")
    assert not resume_refused(err, 2)
    # only this attempt's part of the appended-to log counts (an earlier attempt's refusal does not)
    err.write_text("=== attempt 1\n" + res.output)
    offset = err.stat().st_size
    with open(err, "a") as fh:
        fh.write("=== attempt 2\nTraceback (most recent call last):\nSystemExit: 2\n")
    assert resume_refused(err, 2) and not resume_refused(err, 2, offset)


def test_gpus_are_counted_by_torch_without_nvidia_smi(monkeypatch):
    """Bug: with nvidia-smi not on PATH the sweep counted 0 GPUs, so every worker saw every GPU."""
    import shutil
    import types

    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=types.SimpleNamespace(device_count=lambda: 2)))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert scheduler._count_gpus() == 2
    gpus = scheduler._count_gpus()
    assert [scheduler.worker_env(w, 2, gpus)["CUDA_VISIBLE_DEVICES"] for w in range(3)] == ["0", "1", "0"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert scheduler._count_gpus() == 0


# ------------------------------------------------------------------------------------- the CLI's end of a sweep


def _cli_recipe(tmp_path: Path, **sweep_over) -> Path:
    """2 LoRA-Adam cells on an existing local base (1 seed, no forgetting): the fake engine runs it in seconds."""
    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    over = {"seeds": [0], "methods": ["lora"], "optims": ["adamw"], "lr": {"lora": [3e-3, 1e-2]},
            "reference_data": None, "bases": {"adam": {"path": str(base), "pretrained_with": "adamw"}}}
    return write_recipe(tmp_path, micro_recipe(**{**over, **sweep_over}))


@pytest.fixture
def cli_fake_engine(monkeypatch, fake_engine):
    """`muonft sweep` through the CLI, its cells run by the stand-in engine."""
    monkeypatch.setattr(scheduler, "default_engine", lambda: list(fake_engine))


def test_failed_cells_exit_1_are_listed_and_rerun_only_with_retry_failed(tmp_path, fake_env, monkeypatch,
                                                                        cli_fake_engine):
    recipe, out = _cli_recipe(tmp_path), tmp_path / "sw"
    runner = CliRunner()

    def starts() -> int:
        return sum(e["event"] == "start" for e in fake_log(fake_env))

    monkeypatch.setenv("FAKE_DIVERGE_LR", "0")  # every cell "diverges" and exits 1
    res = runner.invoke(app, ["sweep", str(recipe), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "2 of 2 cells failed:" in res.stderr
    for cid in ("adam-lora-r8-adamw-lr0.003-s0", "adam-lora-r8-adamw-lr0.01-s0"):
        assert any(cid in ln and "loss is NaN" in ln for ln in res.stderr.splitlines()), res.stderr
    assert (out / "summary.md").is_file()  # the report is still written
    n = starts()
    assert n == 2
    monkeypatch.delenv("FAKE_DIVERGE_LR")  # whatever made them fail is fixed now
    res = runner.invoke(app, ["sweep", str(recipe), "--out", str(out)])
    assert res.exit_code == 1, res.output  # a rerun leaves them failed, and says how to rerun them
    assert starts() == n and "2 of 2 cells failed:" in res.stderr
    assert "left failed: pass --retry-failed" in res.stderr
    res = runner.invoke(app, ["sweep", str(recipe), "--out", str(out), "--retry-failed"])
    assert res.exit_code == 0, res.output
    assert starts() == n + 2 and "failed:" not in res.stderr
    latest = S.SweepIndex(out / S.INDEX).latest()
    assert all(latest[c.id]["status"] == "done" for c in S.load_plan(recipe).cells)


def test_edge_of_grid_warning_is_printed_on_the_console(tmp_path, fake_env, cli_fake_engine):
    # the fake engine's best LoRA-Adam LR on an Adam base is 1e-2: the highest LR of this grid
    recipe, out = _cli_recipe(tmp_path), tmp_path / "sw"
    res = CliRunner().invoke(app, ["sweep", str(recipe), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    edge = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:") and "highest of the grid" in ln]
    assert len(edge) == 1 and "best LR 0.01" in edge[0], res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["warnings"]  # stdout stays one JSON line
    res = CliRunner().invoke(app, ["sweep", "--report", str(out)])  # and again when re-reporting
    assert res.exit_code == 0 and any("highest of the grid" in ln for ln in res.stderr.splitlines())


def test_unwritable_sweep_out_is_one_line_exit_2_before_anything_runs(tmp_path, fake_env, cli_fake_engine):
    recipe = _cli_recipe(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    outs = ["/proc/muonft-sweep", str(a_file / "sw"), str(a_file)]
    if os.geteuid() != 0:  # root writes into a read-only directory anyway
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        outs.append(str(ro / "sw"))
    for out in outs:
        res = CliRunner().invoke(app, ["sweep", str(recipe), "--out", out])
        assert res.exit_code == 2, (out, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --out '{out}'"), (out, res.stderr)
        assert "internal error" not in lines[0] and "directory you can write" in lines[0]
    assert fake_log(fake_env) == [] and a_file.read_text() == "x"


def test_dry_run_names_every_missing_base_path_at_once(tmp_path):
    rec = micro_recipe(bases={
        "gone": {"path": str(tmp_path / "nope" / "final")},
        "rel": {"path": "./runs/never-made/final"},
        "gguf": {"path": "model.gguf"},
        "hub": {"path": "meta-llama/Llama-2-7b-hf"},  # a hub id: not checked here (no network)
        "here": {"path": str(tmp_path)},
        "pre": micro_recipe()["sweep"]["bases"]["adam"],
    })
    res = CliRunner().invoke(app, ["sweep", str(write_recipe(tmp_path, rec)), "--dry-run"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 3 problems"), res.stderr
    for name in ("gone", "rel", "gguf"):
        assert f"sweep.bases.{name}.path:" in lines[0]
    assert "hub" not in lines[0].replace("a hub id", "") and "sweep.bases.here" not in lines[0]
    assert res.stdout == ""


# ------------------------------------------------------------------------------------------------ variants (issue 14 §2)


def test_variants_add_the_matching_cells_again_with_their_overrides_and_leave_the_grid_alone():
    plain = S.plan_from_dict(micro_recipe())
    rec = micro_recipe(variants=[
        {"name": "anc", "where": {"methods": ["full"], "matched": False}, "set": {"optimizer.anchor_decay": 1.0}},
        {"name": "rk2", "where": {"methods": ["full"], "optims": ["muon"], "matched": False}, "lr": [1e-3],
         "set": {"optimizer.update_rank": 2}}])
    plan = S.plan_from_dict(rec)
    assert [(c.id, c.hash) for c in plan.cells if not c.axes] == [(c.id, c.hash) for c in plain.cells]
    extra = [c for c in plan.cells if c.axes]
    anc = [c for c in extra if c.axes == (("variant", "anc"),)]
    # mismatched full cells only: adam base + muon, muon base + adamw; each with its own LR grid, 2 seeds
    assert {(c.base, c.optim) for c in anc} == {("adam", "muon"), ("muon", "adamw")} and len(anc) == 2 * 3 * 2
    assert all(c.config["optimizer"]["anchor_decay"] == 1.0 and c.id.endswith("-variant=anc") for c in anc)
    rk = [c for c in extra if c.axes == (("variant", "rk2"),)]
    assert {(c.base, c.optim, c.lr) for c in rk} == {("adam", "muon", 1e-3)} and len(rk) == 2
    assert len({c.hash for c in plan.cells}) == len(plan.cells)


@pytest.mark.parametrize("variant,needle", [
    ({"name": "x", "set": {"optimizer.lr": 1.0}}, "set by the sweep itself"),
    ({"name": "x", "where": {"optims": ["adamw"]}, "set": {"optimizer.update_rank": 2}}, "optimizer.update_rank"),
    ({"name": "x", "where": {"methods": ["ful"]}, "set": {"optimizer.anchor_decay": 1.0}}, "did you mean 'full'"),
    ({"name": "x", "where": {"bases": ["adam"], "optims": ["adamw"], "matched": False},
      "set": {"optimizer.anchor_decay": 1.0}}, "'x' applies to no cell"),
    ({"name": "a b", "set": {"optimizer.anchor_decay": 1.0}}, "sweep.variants[0].name"),
    ({"name": "x", "set": {"optimizer.anchr_decay": 1.0}}, "did you mean 'anchor_decay'"),
])
def test_bad_variants_are_config_errors_naming_the_problem(variant, needle):
    with pytest.raises(ConfigError, match=None) as e:
        S.plan_from_dict(micro_recipe(variants=[variant]))
    assert any(needle in p for p in e.value.problems), e.value.problems


def test_report_shows_each_mitigation_against_the_plain_mismatched_cell(tmp_path):
    cells, bases = paper_cells()
    drift = {"fro_rel": 0.5, "fro_rel_hidden": 0.3, "spectral_rel": 0.4, "max_rel": 0.9}
    for c in cells:
        c["drift"] = drift if c["method"] == "full" else None
    # Muon-pretrained + Full-Adam (gap +.023) with two anchors: one closes about half the gap, one makes it worse
    for name, value in (("anc1", 0.728), ("anc9", 0.75)):
        for seed in range(3):
            cells.append({"id": f"v-{name}-{seed}", "base": "muon", "method": "full", "optim": "adamw", "rank": None,
                          "axes": [["variant", name]], "lr": 1e-3, "seed": seed, "status": "done",
                          "ppl": 20 * value, "ref_ppl": 28.0, "drift": {**drift, "fro_rel": 0.1 * (seed + 1)}})
    s = R.aggregate(cells, bases)
    rows = {r["variant"]: r for r in s["mitigation"]}
    assert rows["anc1"]["gap"] == pytest.approx(0.012) and rows["anc1"]["gap_plain"] == pytest.approx(0.023)
    assert rows["anc1"]["gap_closed_pct"] == pytest.approx(100 * 0.011 / 0.023)
    assert rows["anc9"]["gap_closed_pct"] == pytest.approx(100 * (0.023 - 0.034) / 0.023)  # negative: it hurts
    assert rows["anc1"]["forgetting"] == pytest.approx(28 / 25 - 1)
    assert rows["anc1"]["drift"]["fro_rel"] == pytest.approx(0.2) and rows["anc1"]["plain_drift"] == pytest.approx(drift)
    t1 = {r["label"]: r for r in s["table1"]}
    assert t1["Full-Adam (anc1)"]["cols"]["muon"]["gap"] == pytest.approx(0.012)  # against the plain matched row
    md = R.to_markdown(s)
    assert "## Mismatch mitigations" in md
    assert "| muon | Full-Adam (none) | 0.001 | 0.739 | +0.023 | 0 % | +24.0 % | 0.5 | 0.3 | 0.4 | 0.9 |" in md
    assert "| muon | Full-Adam (anc1) | 0.001 | 0.728 | +0.012 | 48 % | +12.0 % | 0.2 | 0.3 | 0.4 | 0.9 |" in md
    assert "-48 %" in md
    header = R.to_csv(s).splitlines()[0]
    assert header.endswith("drift_fro_rel,drift_fro_rel_hidden,drift_spectral_rel,drift_max_rel")
    paths = R.write_plots(s, tmp_path)
    assert set(paths) >= {"ppl_vs_lr", "mitigation"} and Path(paths["mitigation"]).name == "mitigation.png"
    _png_ok(Path(paths["mitigation"]), coloured=0.0002)  # a few markers

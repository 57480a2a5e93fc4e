"""`muonft sweep --executor ray` on a local Ray instance: the micro-sweep of tests/test_sweep_e2e.py gives the
local executor's sweep.jsonl and reports; a SIGKILLed driver is rerun (finished cells skipped, the interrupted
one resumed from its checkpoint, none run twice, failed cells recorded); without Ray, one exit-2 line; a node
that does not see the sweep directory fails the cell with a clear error.

Each Ray test starts its own local instance (`--address local`: never another user's cluster); a start costs
~15 s on a loaded 2-core box, so there are two, marked slow (make test runs them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from _helpers_train import one_line_error
from muonft_cli import sweep as S
from muonft_cli.cli import app
from muonft_cli.sweep import ray_executor
from muonft_cli.sweep.jobs import static_jobs
from test_sweep import fake_log, micro_recipe, wait_for, write_recipe
from test_sweep_e2e import micro_e2e_recipe


def _needs_ray():
    return pytest.importorskip("ray", reason="Ray is in the dev extras: pip install 'muonft[ray]'")


def _ray_sweep_script(plan_path: Path, out: Path, engine: list[str]) -> list[str]:
    """`run_sweep` on Ray in a process of its own (the test SIGKILLs it), its cells run by `engine`."""
    code = ("from muonft_cli import sweep as S;"
            f"S.run_sweep(S.load_plan({str(plan_path)!r}), {str(out)!r}, workers=2, engine={list(engine)!r}, "
            "poll_s=0.05, executor='ray', address='local')")
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_ray_sweep_after_sigkill_of_the_driver_resumes_and_records_failures(tmp_path, monkeypatch, fake_engine):
    _needs_ray()
    log = tmp_path / "fake.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FAKE_DIVERGE_LR", "0.01")  # the lr 1e-2 cells "diverge" at step 3 and exit 1
    held = "adam-lora-r8-muon-lr0.003-s0"
    monkeypatch.setenv("FAKE_HOLD_AT", f"{held}:4")  # it stops at step 4, checkpointed, until SIGTERM
    plan_path = write_recipe(tmp_path, micro_recipe(seeds=[0], methods=["lora"], lr={"lora": [3e-3, 1e-2]},
                                                    reference_data=None,
                                                    bases={"adam": {"path": str(tmp_path / "nobase")}}))
    plan = S.load_plan(plan_path)
    out = tmp_path / "sw"
    index = S.SweepIndex(out / S.INDEX)
    proc = subprocess.Popen(_ray_sweep_script(plan_path, out, fake_engine), env=os.environ.copy())

    def settled() -> bool:  # one cell done, the two lr 1e-2 cells failed, the held one mid-run
        st = [r["status"] for i, r in index.latest().items() if not i.startswith("base")]
        return st.count("done") == 1 and st.count("failed") == 2 and any(e["event"] == "held" for e in fake_log(log))

    try:
        wait_for(settled, proc, timeout_s=300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = index.latest()
    assert latest[held]["status"] == "running" and latest[held]["node"] and S.has_checkpoint(out / "cells" / held)
    failed = {i for i, r in latest.items() if r["status"] == "failed"}
    assert failed == {c.id for c in plan.cells if c.lr >= 0.01}
    assert all("loss is NaN" in latest[i]["error"] and latest[i]["returncode"] == 1 for i in failed)
    done_before = {i for i, r in latest.items() if r["status"] == "done" and not i.startswith("base")}
    monkeypatch.delenv("FAKE_HOLD_AT")
    res = subprocess.run(_ray_sweep_script(plan_path, out, fake_engine), env=os.environ.copy(), timeout=600)
    assert res.returncode == 0
    latest = index.latest()
    assert latest[held]["status"] == "done" and {i for i, r in latest.items() if r["status"] == "failed"} == failed
    events = fake_log(log)
    starts = {c.id: [e for e in events if e["event"] == "start" and Path(e["out"]).name == c.id] for c in plan.cells}
    for i in done_before | failed:  # finished (done or failed) cells were not started again
        assert len(starts[i]) == 1, (i, starts[i])
    # the interrupted cell got SIGTERM when the driver died (through the supervisor), checkpointed at step 4
    # and was resumed from there, once
    assert any(e["event"] == "term" and Path(e["out"]).name == held for e in events)
    assert [(s["resume"], s["start"]) for s in starts[held]] == [(False, 0), (True, 4)]
    assert sum(e["event"] == "done" and Path(e["out"]).name == held for e in events) == 1
    steps = [json.loads(ln)["step"] for ln in (out / "cells" / held / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 7))  # every step exactly once


@pytest.mark.slow
def test_ray_micro_sweep_matches_the_local_executor(tmp_path):
    """The micro-sweep of test_sweep_e2e cut to Full-Muon and LoRA-Muon at one LR each (2 cells, the base's two
    evaluations, 2 forgetting evaluations) through the CLI, once per executor: the same statuses, numbers and
    reports."""
    _needs_ray()
    recipe = micro_e2e_recipe(tmp_path, ["muon"], {"full": [1e-3], "lora": [1e-2]})
    rp = tmp_path / "micro.yaml"
    rp.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for executor in ("local", "ray"):
        out = tmp_path / executor
        cmd = [sys.executable, "-m", "muonft_cli", "sweep", str(rp), "--out", str(out), "--workers", "2",
               "--threads", "1", "--json"]
        if executor == "ray":
            cmd += ["--executor", "ray", "--address", "local"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        assert res.returncode == 0, res.stderr[-3000:]
        results[executor] = (json.loads(res.stdout.strip().splitlines()[-1]), S.SweepIndex(out / S.INDEX).latest())
    (local_sum, local_idx), (ray_sum, ray_idx) = results["local"], results["ray"]
    assert local_sum["counts"]["done"] == 2 and local_sum["counts"] == ray_sum["counts"]
    assert set(local_idx) == set(ray_idx) and len(local_idx) == 2 + 2 + 2  # cells, base evals, forgetting
    for jid, rec in local_idx.items():
        other = ray_idx[jid]
        assert rec["status"] == other["status"] == "done" and rec["hash"] == other["hash"], (jid, rec, other)
        if "summary" in rec:
            assert rec["summary"]["steps"] == other["summary"]["steps"] == 4
            assert other["summary"]["val_ppl"] == pytest.approx(rec["summary"]["val_ppl"], rel=1e-6)
        else:
            assert other["eval"]["data"]["model"]["ppl"] == pytest.approx(rec["eval"]["data"]["model"]["ppl"],
                                                                          rel=1e-6)
    running = [r for r in S.SweepIndex(tmp_path / "ray" / S.INDEX).records() if r["status"] == "running"]
    assert running and all(r.get("node") for r in running)  # where each job ran is recorded
    assert [r["label"] for r in ray_sum["table1"]] == [r["label"] for r in local_sum["table1"]] == [
        "Full-Muon", "LoRA-Muon (r=4)"]
    for a, b in zip(local_sum["table1"], ray_sum["table1"]):
        assert b["cols"]["tiny"]["normalised"] == pytest.approx(a["cols"]["tiny"]["normalised"], rel=1e-6)
    groups = {e: json.loads((tmp_path / e / "summary.json").read_text())["groups"] for e in ("local", "ray")}
    assert len(groups["local"]) == len(groups["ray"]) == 2
    for a, b in zip(groups["local"], groups["ray"]):
        assert (a["method"], a["best_lr"], a["best_cells"]) == (b["method"], b["best_lr"], b["best_cells"])
        assert a["forgetting"] is not None and b["forgetting"] == pytest.approx(a["forgetting"], rel=1e-5)
    for name in ("summary.md", "summary.csv", "summary.json", "ppl_vs_lr.png", "val_curves.png"):
        assert (tmp_path / "ray" / name).stat().st_size > 0


def test_executor_ray_without_ray_installed_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    base = tmp_path / "base"
    base.mkdir()
    rp = write_recipe(tmp_path, micro_recipe(seeds=[0], methods=["lora"], optims=["adamw"], lr={"lora": [1e-2]},
                                             reference_data=None, bases={"a": {"path": str(base)}}))
    out = tmp_path / "sw"
    one_line_error(CliRunner().invoke(app, ["sweep", str(rp), "--out", str(out), "--executor", "ray"]),
                   "--executor ray", "pip install 'muonft[ray]'")
    assert not out.exists()  # nothing written
    one_line_error(CliRunner().invoke(app, ["sweep", str(rp), "--out", str(out), "--address", "auto"]),
                   "--address", "--executor ray")
    one_line_error(CliRunner().invoke(app, ["sweep", str(rp), "--out", str(out), "--executor", "slurm"]),
                   "--executor", "local, ray")
    assert not out.exists()


def test_a_node_that_does_not_see_the_sweep_directory_fails_the_cell_clearly(tmp_path, monkeypatch):
    """The check each Ray task makes on its node before it runs anything (multi-node clusters need --out on a
    shared filesystem): a missing directory, or a same-named local one without this driver's token."""
    monkeypatch.setattr(ray_executor, "VISIBLE_WAIT_S", 0.0)
    plan = S.plan_from_dict(micro_recipe(seeds=[0], methods=["lora"], optims=["adamw"], lr={"lora": [1e-2]},
                                         reference_data=None, bases={"a": {"path": str(tmp_path / "base")}}))
    out = tmp_path / "sw"
    job = next(j for j in static_jobs(plan, out) if j.kind == "cell")
    spec = {"job": job, "out": str(out), "cfg_path": str(out / "configs" / "x.yaml"), "force_overwrite": False,
            "attempt": 1, "token": "driver-token", "engine": ["false"], "env": {}, "threads": 1, "gpu": False,
            "cwd": None}
    for state in ("missing", "another driver's"):
        if state != "missing":
            (out / "locks").mkdir(parents=True)
            (out / "locks" / ray_executor.TOKEN_FILE).write_text("another-token\n")
        (ev,) = list(ray_executor.run_job(spec))
        assert ev["event"] == "failed" and f"cannot use the sweep directory '{out}'" in ev["error"], ev
        assert "every node mounts at the same path" in ev["error"] and "--retry-failed" in ev["error"]
        assert not (out / "logs").exists() and not (out / "cells").exists()  # nothing ran
    (out / "locks" / ray_executor.TOKEN_FILE).write_text("driver-token\n")
    assert ray_executor.shared_dir_problem(out, "driver-token", wait_s=0) is None

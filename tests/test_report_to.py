"""`--report-to tensorboard|wandb` (config `train.report_to`): the step scalars of `metrics.jsonl` in
TensorBoard (`OUT/tb/`) and offline W&B (`OUT/wandb/`), resume without duplicate steps, sweep cells named by
their cell id, and the one-line errors for an unknown backend or a missing package."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from _helpers_train import FAST, one_line_error, read_metrics, tiny_model_dir, write_corpus
from muonft_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    return {"corpus": write_corpus(d / "corpus", n_docs=10), "model": tiny_model_dir(d / "model")}


def _ft(small, out, *extra):
    return invoke("finetune", "--model", small["model"], "--data", small["corpus"], "--optim", "muon",
                  "--lr", "1e-2", "--val-fraction", 0.2, "--out", out, *FAST, *extra)


def _tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(x: float) -> float:
    return float(np.float32(x))


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install muonft[tensorboard])")
def test_tensorboard_has_the_metrics_jsonl_scalars(small, tmp_path):
    out = tmp_path / "run"
    r = _ft(small, out, "--steps", 4, "--report-to", "tensorboard")
    assert r.exit_code == 0, r.output
    m, tb = read_metrics(out), _tb_scalars(out)
    assert tb["train/loss"] == [(rec["step"], _f32(rec["loss"])) for rec in m]
    for key, tag in (("lr", "train/lr"), ("grad_norm", "train/grad_norm"), ("tokens_per_s", "train/tokens_per_s")):
        assert tb[tag] == [(rec["step"], _f32(rec[key])) for rec in m], tag
    val = [(rec["step"], rec["val_loss"], rec["val_ppl"]) for rec in m if rec["val_loss"] is not None]
    assert [s for s, _, _ in val] == [2, 4]  # --eval-every 2
    assert tb["val/loss"] == [(s, _f32(v)) for s, v, _ in val]
    assert tb["val/ppl"] == [(s, _f32(p)) for s, _, p in val]
    ortho = [v for _, v in tb["muon/ns_matrices_done"]]
    assert ortho[0] > 0 and ortho == sorted(ortho) and ortho[-1] == json.loads(
        (out / "summary.json").read_text())["ortho_per_rank"][0]


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install muonft[tensorboard])")
def test_tensorboard_resume_appends_without_duplicate_steps(small, tmp_path):
    out = tmp_path / "run"
    assert _ft(small, out, "--steps", 4, "--save-every", 2, "--report-to", "tensorboard").exit_code == 0
    # as a run killed after step 4 but before its step-4 checkpoint leaves it: TensorBoard already has 3, 4
    shutil.rmtree(out / "checkpoints" / "step-000004")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    r = invoke("finetune", "--out", out, "--resume", "--steps", 6, "--quiet")  # report_to from config.yaml
    assert r.exit_code == 0, r.output
    m, tb = read_metrics(out), _tb_scalars(out)
    assert [rec["step"] for rec in m] == [1, 2, 3, 4, 5, 6]
    assert tb["train/loss"] == [(rec["step"], _f32(rec["loss"])) for rec in m]
    assert [s for s, _ in tb["val/loss"]] == [2, 4, 6]


def _wandb_offline_run(run_dir: Path) -> tuple[dict, list[tuple[int, dict]]]:
    """An offline W&B run's summary (its summary updates applied in order) and history `(step, row)`s, read
    from the run's `run-ID.wandb` file (a leveldb-log of protobuf records; wandb-core writes no
    `wandb-summary.json` offline). Values are the JSON numbers wandb stored."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf, summary, history = 7, 32768, b"", {}, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: one record
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
            if rec.WhichOneof("record_type") == "summary":
                summary.update({key(u): json.loads(u.value_json) for u in rec.summary.update})
            elif rec.WhichOneof("record_type") == "history":
                row = {key(i): json.loads(i.value_json) for i in rec.history.item}
                history.append((row["_step"], row))
    return summary, history


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install muonft[tensorboard])")
def test_overwrite_removes_the_old_runs_logs(small, tmp_path):
    out = tmp_path / "run"
    assert _ft(small, out, "--steps", 3, "--report-to", "tensorboard").exit_code == 0
    assert _ft(small, out, "--steps", 2, "--seed", 1, "--overwrite", "--report-to", "tensorboard").exit_code == 0
    assert _tb_scalars(out)["train/loss"] == [(r["step"], _f32(r["loss"])) for r in read_metrics(out)]
    assert _ft(small, out, "--steps", 1, "--overwrite").exit_code == 0  # a run without the backend
    assert not (out / "tb").exists()


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install muonft[wandb])")
def test_wandb_offline_run_files_and_resume(small, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert _ft(small, out, "--steps", 3, "--save-every", 3, "--report-to", "wandb").exit_code == 0
    run_id = (out / "wandb" / "muonft-run-id").read_text().strip()
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(f"-{run_id}"), runs
    summary, history = _wandb_offline_run(runs[0])
    m = read_metrics(out)
    assert [(s, row["train/loss"]) for s, row in history] == [(r["step"], r["loss"]) for r in m]
    assert summary["train/loss"] == m[-1]["loss"] and summary["val/loss"] == m[-1]["val_loss"]
    assert summary["muon/ns_matrices_done"] > 0
    r = invoke("finetune", "--out", out, "--resume", "--steps", 5, "--quiet")
    assert r.exit_code == 0, r.output
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(p.name.endswith(f"-{run_id}") for p in runs)  # the same W&B run, continued
    summary, history = _wandb_offline_run(runs[-1])
    m = read_metrics(out)
    assert [s for s, _ in history] == [4, 5] and summary["train/loss"] == m[-1]["loss"]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install muonft[wandb])")
def test_wandb_that_cannot_start_is_one_line_and_resume_continues(small, tmp_path, monkeypatch):
    import wandb

    def no_login(**kw):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", no_login)
    out = tmp_path / "run"
    one_line_error(_ft(small, out, "--steps", 2, "--report-to", "wandb"), "wandb could not start a run",
                    "No API key", "WANDB_MODE=offline", "--resume")
    assert not (out / "wandb").exists() and not (out / "checkpoints").exists()
    r = invoke("finetune", "--out", out, "--resume", "--report-to", "none", "--quiet")  # without W&B
    assert r.exit_code == 0, r.output
    assert [rec["step"] for rec in read_metrics(out)] == [1, 2]


def test_unknown_backend_is_one_line(small, tmp_path):
    out = tmp_path / "run"
    one_line_error(_ft(small, out, "--steps", 1, "--report-to", "tensorbord"), "train.report_to",
                    "tensorboard")
    assert not out.exists()


@pytest.mark.parametrize("backend,install", [("tensorboard", "pip install muonft[tensorboard]"),
                                             ("wandb", "pip install wandb")])
def test_missing_backend_package_is_one_line_before_any_work(small, tmp_path, monkeypatch, backend, install):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kw):
        return None if name == backend else real(name, *args, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    out = tmp_path / "run"
    one_line_error(_ft(small, out, "--steps", 1, "--report-to", "none", "--report-to", backend), install)
    assert not out.exists()


def test_report_to_none_and_a_plain_run_import_no_backend(small, tmp_path):
    """No backend is needed for a plain run: neither tensorboard nor wandb is imported (a fresh process)."""
    code = ("import sys; from typer.testing import CliRunner; from muonft_cli.cli import app; "
            "r = CliRunner().invoke(app, sys.argv[1:]); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard') "
            "or m.startswith('torch.utils.tensorboard')))")
    out = tmp_path / "run"
    args = ["finetune", "--model", small["model"], "--data", small["corpus"], "--steps", 1, "--val-fraction",
            0.2, "--out", out, *FAST, "--report-to", "none"]
    p = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=REPO,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"
    assert "report_to: []" in (out / "config.yaml").read_text()
    assert not (out / "tb").exists() and not (out / "wandb").exists()


def test_sweep_cells_are_named_by_cell_id_and_logging_keeps_their_hashes(tmp_path):
    from muonft_cli import sweep as S
    from muonft_cli.sweep import jobs

    recipe = REPO / "recipes" / "mismatch-small.yaml"
    plain = S.load_plan(recipe)
    logged = S.load_plan(recipe, ["train.report_to=[tensorboard,wandb]"])
    assert [c.hash for c in logged.cells] == [c.hash for c in plain.cells]  # logging never reruns a cell
    cells = [j for j in jobs.static_jobs(logged, tmp_path) if j.kind == "cell"]
    assert cells and all(j.config["train"]["run_name"] == j.id for j in cells)
    assert all(j.config["train"]["report_to"] == ["tensorboard", "wandb"] for j in cells)
    from muonft_cli import config as C

    assert C.from_dict(cells[0].config).train.run_name == cells[0].id  # loads as a run config


@pytest.mark.skipif(not HAS_TB, reason="tensorboard is not installed (pip install muonft[tensorboard])")
def test_torchrun_logs_from_rank_0_only(small, tmp_path):
    """2 CPU processes: one event file (rank 0's), and Muon's counter summed over both ranks."""
    import os

    out = tmp_path / "two"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "muonft_cli", "finetune", "--model", str(small["model"]), "--data", str(small["corpus"]),
                        "--optim", "muon", "--lr", "1e-2", "--steps", "2", "--val-fraction", "0.2", "--out", str(out),
                        *FAST, "--report-to", "tensorboard", "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])
    assert summary["world_size"] == 2
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    tb = _tb_scalars(out)
    assert tb["train/loss"] == [(r["step"], _f32(r["loss"])) for r in read_metrics(out)]
    assert tb["muon/ns_matrices_done"][-1] == (2, float(sum(summary["ortho_per_rank"])))

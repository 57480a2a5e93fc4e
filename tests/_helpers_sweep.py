"""Test helpers for the sweep tests: a stand-in for `python -m muonft_cli` with the engine's CLI contract.

Run as `python tests/_helpers_sweep.py finetune --config C --out D [--resume] [--overwrite] --json`: it writes a
run directory like the engine's (config.yaml, metrics.jsonl, checkpoints/step-NNNNNN, final/, best/), prints one
summary JSON line, checkpoints and exits 143 on SIGTERM, and resumes from its last checkpoint with `--resume`.
Its validation PPL is a closed form of (lr, optimizer, method, pretraining optimizer, seed), so the sweep's
scheduling, resumption and aggregation can be tested fast and deterministically. Environment knobs:
FAKE_LOG (append start/done/term/held events), FAKE_DIVERGE_LR (exit 1 "loss is NaN" at lr >= it),
FAKE_KILL_PARENT_AT (`cell-id-substring:step`: SIGKILL the sweep process there, once), FAKE_HOLD_AT
(`cell-id-substring:step`: after that step's checkpoint, log a "held" event and wait until SIGTERM ends the run,
so a test can act on a known state instead of racing the clock), FAKE_REFERENCE (the reference corpus: `eval` on
it reports the model's reference PPL; default builtin:shakespeare), FAKE_PPL_SHIFT (`substring=delta,...`: add
delta to the PPL of runs whose --out contains substring), FAKE_RESUME_EXIT2 (a `--resume` prints
`error: <this>` and exits 2, as the engine does for bad input; the engine's refusal to resume is an
`error: --resume: ...` line). `eval` of a fine-tuned model whose weights were deleted fails like the engine
(exit 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import yaml

OPT_LR = {("full", "adam"): 1e-3, ("full", "muon"): 3e-3, ("lora", "adam"): 1e-2, ("lora", "muon"): 1e-2}


def _family(o: str) -> str:
    return "adam" if o == "adamw" else "muon"


def fake_ppl(lr: float, optim: str, method: str, pretrained_with: str, seed: int) -> float:
    """The fake final validation PPL: a parabola in log10(lr), shifted up-left under mismatch."""
    mismatch = _family(optim) != _family(pretrained_with)
    opt = OPT_LR[(method, _family(optim))] * (0.5 if mismatch else 1.0)
    pen = (0.06 if method == "full" else 0.02) if mismatch else 0.0
    return 20.0 * (0.7 + pen + 0.05 * (math.log10(lr) - math.log10(opt)) ** 2 + 0.002 * ((seed % 3) - 1))


def _log(event: str, out: str, **kw) -> None:
    path = os.environ.get("FAKE_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"event": event, "out": str(out), **kw}) + "\n")


def _pretrained_with(model: str) -> str:
    p = Path(model) / "fake.json"
    return json.loads(p.read_text())["optim"] if p.is_file() else "adamw"


def _write_model(d: Path, name: str, info: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(b"\0" * 64)
    (d / "fake.json").write_text(json.dumps(info))


def main(argv: list[str]) -> int:
    mode = argv[0]
    ap = argparse.ArgumentParser()
    for a in ("--config", "--out", "--model", "--base", "--data", "--reference-data", "--seq-len",
              "--val-fraction", "--batch-size", "--max-batches"):
        ap.add_argument(a)
    for a in ("--resume", "--overwrite", "--json", "--quiet", "--model-only"):
        ap.add_argument(a, action="store_true")
    args = ap.parse_args(argv[1:])
    if mode == "eval":  # `muonft eval --config C [--base B] [--model-only] --json`: the engine's report layout
        cfg = yaml.safe_load(Path(args.config).read_text())
        if args.model_only and (args.base or cfg.get("eval", {}).get("reference_data")):
            print("error: --model-only evaluates the model alone", file=sys.stderr)
            return 2

        def info(path):
            p = Path(path) / "fake.json"
            return json.loads(p.read_text()) if p.is_file() else {"val_ppl": 28.0, "ref_ppl": 40.0}

        model_dir = Path(args.model or cfg["model"]["name_or_path"])
        if (model_dir / "fake.json").is_file() and not any(model_dir.glob("*.safetensors")):
            print(f"error: no model weights in '{model_dir}'", file=sys.stderr)
            return 1
        m = info(model_dir)
        b = info(args.base) if args.base else None
        # the reference corpus (forgetting) when the config's data is not the fine-tuning data
        reference = os.environ.get("FAKE_REFERENCE", "builtin:shakespeare")
        key = "ref_ppl" if cfg["data"]["path"] == reference else "val_ppl"
        _log("eval", cfg["model"]["name_or_path"], key=key, model_only=args.model_only)

        def part(key):
            return {"model": {"ppl": m[key]}, "base": {"ppl": b[key]} if b else None}

        ref = cfg.get("eval", {}).get("reference_data")
        print(json.dumps({"data": part(key), "forgetting": part("ref_ppl") if ref else None}))
        return 0
    cfg = yaml.safe_load(Path(args.config).read_text())
    out = Path(args.out)
    steps = int(cfg.get("train", {}).get("steps") or 10)
    eval_every = int(cfg.get("train", {}).get("eval_every") or 5)
    lr = float(cfg["optimizer"].get("lr", 1e-3))
    optim = cfg["optimizer"]["name"]
    seed = int(cfg.get("train", {}).get("seed", 0))
    method = "lora" if cfg.get("lora", {}).get("rank") else "full"
    if mode == "pretrain":
        final_ppl, pw = 25.0, optim
    else:
        pw = _pretrained_with(cfg["model"]["name_or_path"])
        final_ppl = fake_ppl(lr, optim, method, pw, seed)
        for item in filter(None, os.environ.get("FAKE_PPL_SHIFT", "").split(",")):
            sub, delta = item.rsplit("=", 1)
            if sub in str(args.out):
                final_ppl += float(delta)
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        print(f"error: '{out}' holds a different run: pass --overwrite", file=sys.stderr)
        return 2
    start = 0
    if args.resume:
        if os.environ.get("FAKE_RESUME_EXIT2"):
            print(f"error: {os.environ['FAKE_RESUME_EXIT2']}", file=sys.stderr)
            return 2
        cks = sorted((out / "checkpoints").glob("step-*"))
        if not cks:
            print(f"error: --resume: '{out}' has no checkpoint to resume", file=sys.stderr)
            return 2
        start = int(cks[-1].name.split("-")[1])
    elif args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    _log("start", out, resume=args.resume, start=start, mode=mode)
    metrics = out / "metrics.jsonl"
    kept = [ln for ln in (metrics.read_text().splitlines() if metrics.exists() else [])
            if json.loads(ln)["step"] <= start]
    metrics.write_text("".join(ln + "\n" for ln in kept))
    state = {"step": start}

    def checkpoint() -> None:
        d = out / "checkpoints" / f"step-{state['step']:06d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "state.json").write_text(json.dumps(state))

    def on_term(signum, frame):
        checkpoint()
        _log("term", out, step=state["step"])
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)
    kill = os.environ.get("FAKE_KILL_PARENT_AT", "")
    hold = os.environ.get("FAKE_HOLD_AT", "")
    diverge = float(os.environ.get("FAKE_DIVERGE_LR", "inf"))
    base_ppl = 28.0 if mode == "finetune" else 500.0

    def val(step: int) -> float:
        return base_ppl + (final_ppl - base_ppl) * (step / steps)

    with open(metrics, "a") as fh:
        if not kept:
            fh.write(json.dumps({"step": 0, "val_loss": math.log(val(0)), "val_ppl": val(0)}) + "\n")
        for step in range(start + 1, steps + 1):
            if lr >= diverge and step == 3:
                print("error: loss is NaN at step 3; the last good checkpoint is kept", file=sys.stderr)
                return 1
            rec = {"step": step, "loss": math.log(val(step)), "lr": lr}
            if step % eval_every == 0 or step == steps:
                rec.update(val_loss=math.log(val(step)), val_ppl=val(step))
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            state["step"] = step
            if step % 2 == 0:
                checkpoint()
            if hold and hold.split(":")[0] in str(out) and step == int(hold.split(":")[1]):
                checkpoint()
                _log("held", out, step=step)
                time.sleep(600)  # until SIGTERM (on_term exits); the bound only ends a hang
            if kill and kill.split(":")[0] in str(out) and step == int(kill.split(":")[1]):
                marker = out / ".killed_parent"
                if not marker.exists():
                    marker.write_text("1")
                    os.kill(os.getppid(), signal.SIGKILL)
                    time.sleep(5)  # the sweep is gone: PDEATHSIG's SIGTERM arrives meanwhile
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    info = {"optim": optim, "val_ppl": final_ppl,
            "ref_ppl": 40.0 if mode == "pretrain" else 40.0 * (1.0 + (0.2 if method == "full" else 0.05))}
    _write_model(out / "final", name, info)
    _write_model(out / "best", name, info)
    _log("done", out)
    summary = {"out": str(out), "mode": mode, "optim": optim, "steps": steps, "tokens": steps * 100,
               "train_loss": math.log(final_ppl), "val_loss": math.log(final_ppl), "val_ppl": final_ppl,
               "best_val_loss": math.log(final_ppl), "best_val_ppl": final_ppl, "best_step": steps,
               "final": str(out / "final"), "runtime_s": 0.1}
    print(json.dumps(summary))
    return 0


FAKE_ENGINE = [sys.executable, str(Path(__file__).resolve())]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Fit the `muonft diagnose` verdict on labelled checkpoints; write muonft_cli/diagnose/calibration.json.

Labelled checkpoints come from either source (both may be given):

- ``--pretrain``: trains a grid with ``muonft pretrain`` (both optimizers × sizes/depths × seeds × steps × lr ×
  weight decay, via ``--model-config``), cached under ``.cache/muonft-calibration/<settings>/`` (gitignored),
  labels from each checkpoint's ``muonft.json``; plus untrained (HF-initialised) checkpoints labelled ``init``;
- ``--short``: short runs (4, 10, 30, 100 steps) of the ``tiny`` preset at both optimizers and two seeds, and
  untrained tiny inits of three seeds (seconds each): the barely trained checkpoints the verdict must not
  mistake for Muon-trained ones;
- ``--dirs D ...``: existing checkpoint dirs labelled by ``muonft.json`` (``optimizer``) or ``label.json``
  (``{"optimizer": "adamw" | "muon" | "init"}``);
- ``--reuse FILE``: the feature rows (``checkpoints``) of an earlier ``bench/results/diagnose_calibration.json``
  for checkpoints not measured in this run (their features only: no per-matrix records, so their near-init
  share is not known and they are held out by their logistic probability alone).

For each checkpoint it computes the model-level features of `muonft_cli.diagnose.verdict` (exact spectra),
fits the L2-regularised logistic model P(muon | sr, ent) on the adam/muon ones, reports leave-one-out
accuracy and mean LOO confidence (the held-out estimate quoted in README), checks that untrained ("init")
and near-init checkpoints come out ``unknown`` (they are not fitted on: their spectra carry no signal), and
writes the fitted parameters with their provenance.

    .venv/bin/python bench/calibrate_diagnose.py --dirs /path/to/ckpts/*/ [--pretrain] [--short] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from muonft_cli.diagnose import analyse  # noqa: E402
from muonft_cli.diagnose.io import open_checkpoint  # noqa: E402
from muonft_cli.diagnose.verdict import (  # noqa: E402
    CALIBRATION_FILE, FEATURES, _sigmoid, fit_logistic, model_features, spectral_verdict,
)

Z_MOVED = 3.0  # a matrix "moved" if > 3 sd (of Gaussian draws of its shape) from the random baseline
MIN_MOVED = 0.25  # fewer moved hidden matrices than this → "unknown" (a random init has ~1 % beyond 3 sd)
MIN_CONFIDENCE = 0.6  # below this the guess is "unknown"
L2 = 0.1  # ridge on the two weights: keeps the probabilities finite (calibrated) when the classes separate
# "near init": a hidden matrix whose |sr| ≤ 0.25 and |ent| ≤ 0.08 (or within 3 sd of Gaussian draws of its shape,
# whichever is wider); a checkpoint with at least half of them so is `unknown`. Measured on the tiny preset (28
# hidden 128-wide matrices; share of matrices within the margins): random inits 100 %, AdamW 4 steps at lr 3e-3
# 68 %, 10 steps at 1.5e-3 89 %, 10 steps at 3e-3 11 %; Muon 30 steps 100 %, 100 steps 93 % (orthogonal updates
# keep the spectrum random-like: a short Muon run cannot be told from a shorter Adam one), a 400-step h64 Muon run
# 21 %. Tighter margins (0.06, 0.025) leave the 4- and 10-step AdamW runs (21 %, 29 %) to be called Muon.
NEAR_INIT_SR, NEAR_INIT_ENT, NEAR_INIT_SHARE = 0.25, 0.08, 0.5

# (hidden, layers, intermediate, seed, steps, lr, weight_decay) per optimizer
GRID = [
    (64, 2, 176, 0, 300, 3e-3, 0.0),
    (96, 2, 256, 1, 300, 2e-3, 0.1),
    (64, 4, 176, 2, 200, 3e-3, 0.1),
    (128, 2, 344, 3, 200, 1e-3, 0.0),
    (64, 3, 176, 4, 400, 1e-3, 0.1),
    (96, 3, 256, 5, 250, 3e-3, 0.0),
    (128, 2, 344, 6, 300, 2e-3, 0.1),
    (80, 2, 224, 7, 200, 5e-3, 0.0),
]
INIT_GRID = [(64, 2, 176, 0), (128, 2, 344, 3), (96, 3, 256, 5)]  # untrained: must come out "unknown"
# short runs of the tiny preset (as `python -m muonft_cli.demo --quick` trains it): (optimizer, seed, steps)
SHORT_GRID = [(o, seed, n) for o in ("adamw", "muon") for seed in (0, 1) for n in (4, 10, 30, 100)]
SHORT_ARGS = ["--preset", "tiny", "--vocab-size", "300", "--data", "builtin:shakespeare", "--lr", "3e-3",
              "--seq-len", "32", "--batch-size", "4", "--set", "data.max_documents=60", "--set", "eval.max_batches=2",
              "--eval-every", "0", "--save-every", "0", "--overwrite", "--quiet"]
SHORT_INIT_SEEDS = (0, 1, 2)


def _shown(d: Path) -> str:
    """A checkpoint's path as recorded: relative to the repository when inside it."""
    try:
        return str(d.resolve().relative_to(ROOT))
    except ValueError:
        return str(d)


def _label(d: Path) -> str | None:
    for name in ("muonft.json", "label.json"):
        p = d / name
        if p.is_file():
            o = json.loads(p.read_text()).get("optimizer")
            if o:
                return "init" if o == "init" else ("muon" if "muon" in o else "adam")
    return None


def _model_config(hidden: int, layers: int, inter: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 4096, "max_position_embeddings": 256,
            "tie_word_embeddings": False}


def init_grid(cache: Path) -> list[Path]:
    """Untrained checkpoints (HF's own init, seeded) labelled ``init`` by a label.json."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = []
    for hidden, layers, inter, seed in INIT_GRID:
        d = cache / f"init-h{hidden}-l{layers}-s{seed}"
        if not (d / "model.safetensors").is_file():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(LlamaConfig(**_model_config(hidden, layers, inter)))
            model.save_pretrained(d)
            (d / "label.json").write_text(json.dumps({"optimizer": "init", "seed": seed}))
        out.append(d)
    return out


def pretrain_grid(cache: Path) -> list[Path]:
    """Train (or reuse) the labelled grid with `muonft pretrain`; return the final/ dirs."""
    out = []
    tok = None
    for optim in ("adamw", "muon"):
        for hidden, layers, inter, seed, steps, lr, wd in GRID:
            key = f"{optim}-h{hidden}-l{layers}-s{seed}-n{steps}-lr{lr:g}-wd{wd:g}"
            run = cache / key
            final = run / "final"
            if not (final / "model.safetensors").is_file():
                cfg = cache / f"{key}.config.json"
                cache.mkdir(parents=True, exist_ok=True)
                cfg.write_text(json.dumps(_model_config(hidden, layers, inter)))
                cmd = [*_MUONFT, "pretrain", "--model-config", str(cfg),
                       "--data", "builtin:shakespeare", "--optim", optim, "--steps", str(steps), "--lr", str(lr),
                       "--weight-decay", str(wd), "--seed", str(seed), "--out", str(run), "--overwrite", "--quiet",
                       "--eval-every", "0", "--save-every", "0"]
                if tok:
                    cmd += ["--tokenizer", tok]
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, env=_ENV)
            tok = tok or str(final)
            out.append(final)
    return out


def short_grid(cache: Path) -> list[Path]:
    """Short `muonft pretrain` runs of the tiny preset (`SHORT_GRID`) and its untrained inits (labelled init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = []
    tok = None
    for optim, seed, steps in SHORT_GRID:
        run = cache / f"short-{optim}-tiny-s{seed}-n{steps}"
        final = run / "final"
        if not (final / "model.safetensors").is_file():
            cmd = [*_MUONFT, "pretrain", *SHORT_ARGS, "--optim", optim, "--seed", str(seed), "--steps", str(steps),
                   "--out", str(run)] + (["--tokenizer", tok] if tok else [])
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, env=_ENV)
        tok = tok or str(final)
        out.append(final)
    cfg = AutoConfig.from_pretrained(out[0])
    for seed in SHORT_INIT_SEEDS:
        d = cache / f"short-init-tiny-s{seed}"
        if not (d / "model.safetensors").is_file():
            torch.manual_seed(seed)
            AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
            (d / "label.json").write_text(json.dumps({"optimizer": "init", "seed": seed}))
        out.append(d)
    return out


_MUONFT = [sys.executable, "-m", "muonft_cli"]
_ENV = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def _cal(w: list[float], b: float) -> dict:
    return {"weights": w, "bias": b, "z_moved": Z_MOVED, "min_confidence": MIN_CONFIDENCE, "min_moved": MIN_MOVED,
            "near_init_sr": NEAR_INIT_SR, "near_init_ent": NEAR_INIT_ENT, "near_init_share": NEAR_INIT_SHARE}


def _verdict(r: dict, cal: dict) -> dict:
    """The verdict on a row: the full logic on its records, or (a reused row) the logistic model alone."""
    if r.get("records") is not None:
        return spectral_verdict(r["records"], cal)
    if r["moved"] < MIN_MOVED:  # a reused row still at its init
        return {"optimizer_guess": "unknown", "confidence": None, "p_muon": None}
    p = _sigmoid(sum(wi * r[k] for wi, k in zip(cal["weights"], FEATURES)) + cal["bias"])
    if max(p, 1 - p) < MIN_CONFIDENCE:
        return {"optimizer_guess": "unknown", "confidence": None, "p_muon": p}
    return {"optimizer_guess": "muon" if p >= 0.5 else "adam", "confidence": max(p, 1 - p), "p_muon": p}


def features_of(d: Path) -> dict:
    recs = analyse(open_checkpoint(d), mode="exact")
    return {"records": recs, "mf": model_features(recs, Z_MOVED, (NEAR_INIT_SR, NEAR_INIT_ENT))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", nargs="*", default=[], help="labelled checkpoint dirs")
    ap.add_argument("--pretrain", action="store_true", help="train the labelled grid with muonft pretrain")
    ap.add_argument("--short", action="store_true", help="short tiny-preset runs (10-100 steps) and inits")
    ap.add_argument("--reuse", help="feature rows of an earlier bench/results/diagnose_calibration.json")
    ap.add_argument("--cache", default=str(ROOT / ".cache/muonft-calibration"))
    ap.add_argument("--dry-run", action="store_true", help="fit and report, but do not write the calibration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    reused = json.loads(Path(args.reuse).read_text())["checkpoints"] if args.reuse else []
    dirs = [Path(d) for d in args.dirs]
    if args.pretrain:
        dirs += pretrain_grid(Path(args.cache)) + init_grid(Path(args.cache))
    if args.short:
        dirs += short_grid(Path(args.cache))
    rows = []
    for d in dirs:
        lab = _label(d)
        if lab is None:
            print(f"skip {d}: no label", file=sys.stderr)
            continue
        f = features_of(d)
        rows.append({"dir": _shown(d), "label": lab, **{k: f["mf"][k] for k in FEATURES}, "moved": f["mf"]["moved"],
                     "near_init": f["mf"]["near_init"], "records": f["records"]})
        print(f"{lab:5s} sr {f['mf']['sr']:+.3f} ent {f['mf']['ent']:+.3f} moved {f['mf']['moved']:.2f} near init "
              f"{f['mf']['near_init']:.2f}  {d}", flush=True)
    measured = {r["dir"] for r in rows}
    for c in reused:
        if c["dir"] not in measured:
            rows.append({**c, "near_init": c.get("near_init"), "records": None, "reused": True})

    def near(r: dict) -> bool:  # still indistinguishable from an init: no signal, reported, not fitted on
        return r["moved"] < MIN_MOVED or (r["near_init"] is not None and r["near_init"] >= NEAR_INIT_SHARE)

    train = [r for r in rows if r["label"] in ("adam", "muon") and not near(r)]
    undertrained = [r for r in rows if r["label"] in ("adam", "muon") and near(r)]
    if len({r["label"] for r in train}) < 2:
        sys.exit("need labelled checkpoints of both optimizers")
    X = torch.tensor([[r[k] for k in FEATURES] for r in train], dtype=torch.float64)
    y = torch.tensor([1.0 if r["label"] == "muon" else 0.0 for r in train], dtype=torch.float64)
    w, b = fit_logistic(X, y, L2)
    # leave-one-out: refit without each checkpoint, classify it with the full verdict logic
    loo = []
    for i, r in enumerate(train):
        keep = [j for j in range(len(train)) if j != i]
        v = _verdict(r, _cal(*fit_logistic(X[keep], y[keep], L2)))
        loo.append({"dir": r["dir"], "label": r["label"], "guess": v["optimizer_guess"], "confidence": v["confidence"],
                    "p_muon": v["p_muon"], "reused": bool(r.get("reused"))})
    correct = sum(x["guess"] == x["label"] for x in loo)
    brier = sum((x["p_muon"] - (1.0 if x["label"] == "muon" else 0.0)) ** 2 for x in loo) / len(loo)
    cal_full = _cal(w, b)
    # untrained and near-init checkpoints, with the full fit: every one must come out "unknown"
    held = [{"dir": r["dir"], "label": r["label"], "near_init": r["near_init"], "moved": r["moved"],
             "guess": _verdict(r, cal_full)["optimizer_guess"]}
            for r in rows if r["label"] == "init" or r in undertrained]
    summary = {
        "weights": w, "bias": b, "features": list(FEATURES), "z_moved": Z_MOVED, "min_confidence": MIN_CONFIDENCE,
        "min_moved": MIN_MOVED, "near_init_sr": NEAR_INIT_SR, "near_init_ent": NEAR_INIT_ENT,
        "near_init_share": NEAR_INIT_SHARE, "l2": L2, "undertrained_excluded": [r["dir"] for r in undertrained],
        "produced_by": "bench/calibrate_diagnose.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "n_train": len(train), "n_adam": int((y == 0).sum()), "n_muon": int((y == 1).sum()),
        "n_reused": sum(bool(r.get("reused")) for r in train),
        "loo_accuracy": correct / len(loo), "loo_brier": brier,
        "loo_unknown": sum(x["guess"] == "unknown" for x in loo),
        "n_near_init": len(held), "near_init_unknown": sum(x["guess"] == "unknown" for x in held),
        "init_checkpoints": held,
        "checkpoints": [{k: r.get(k) for k in ("dir", "label", "sr", "ent", "moved", "near_init")} for r in rows],
        "loo": loo,
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("checkpoints", "loo", "init_checkpoints")},
                     indent=1))
    for x in loo:
        conf = "-" if x["confidence"] is None else f"{x['confidence']:.2f}"
        tag = "  (reused)" if x["reused"] else ""
        print(f"LOO {x['label']:5s} → {x['guess']:7s} conf {conf}  {x['dir']}{tag}")
    for x in held:
        share = "?" if x["near_init"] is None else f"{x['near_init']:.2f}"
        print(f"NEAR-INIT {x['label']:5s} → {x['guess']:7s} near init {share}  {x['dir']}")
    results = ROOT / "bench/results/diagnose_calibration.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=1))
    if not args.dry_run:
        CALIBRATION_FILE.write_text(json.dumps(
            {k: summary[k] for k in ("weights", "bias", "features", "z_moved", "min_confidence", "min_moved",
                                     "near_init_sr", "near_init_ent", "near_init_share", "l2", "produced_by",
                                     "date", "n_train", "n_adam", "n_muon", "n_reused", "loo_accuracy", "loo_brier",
                                     "loo_unknown", "n_near_init", "near_init_unknown")},
            indent=1) + "\n")
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()

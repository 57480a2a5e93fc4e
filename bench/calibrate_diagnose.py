"""Fit the `muonft diagnose` verdict on labelled checkpoints; write muonft_cli/diagnose/calibration.json.

Labelled checkpoints come from either source (both may be given):

- ``--pretrain``: trains a grid with ``muonft pretrain`` (both optimizers × sizes/depths × seeds × steps × lr ×
  weight decay, via ``--model-config``), cached under ``.cache/muonft-calibration/<settings>/`` (gitignored),
  labels from each checkpoint's ``muonft.json``; plus untrained (HF-initialised) checkpoints labelled ``init``;
- ``--dirs D ...``: existing checkpoint dirs labelled by ``muonft.json`` (``optimizer``) or ``label.json``
  (``{"optimizer": "adamw" | "muon" | "init"}``).

For each checkpoint it computes the model-level features of `muonft_cli.diagnose.verdict` (exact spectra),
fits the L2-regularised logistic model P(muon | sr, ent) on the adam/muon ones, reports leave-one-out
accuracy and mean LOO confidence (the held-out estimate quoted in README), checks that untrained ("init")
checkpoints come out ``unknown``, and writes the fitted parameters with their provenance.

    .venv/bin/python bench/calibrate_diagnose.py --dirs /path/to/ckpts/*/ [--pretrain] [--dry-run]
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
    CALIBRATION_FILE, FEATURES, fit_logistic, model_features, spectral_verdict,
)

Z_MOVED = 3.0  # a matrix "moved" if > 3 sd (of Gaussian draws of its shape) from the random baseline
MIN_MOVED = 0.25  # fewer moved hidden matrices than this → "unknown" (a random init has ~1 % beyond 3 sd)
MIN_CONFIDENCE = 0.6  # below this the guess is "unknown"
L2 = 0.1  # ridge on the two weights: keeps the probabilities finite (calibrated) when the classes separate

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
                cmd = [str(ROOT / ".venv/bin/muonft"), "pretrain", "--model-config", str(cfg),
                       "--data", "builtin:shakespeare", "--optim", optim, "--steps", str(steps), "--lr", str(lr),
                       "--weight-decay", str(wd), "--seed", str(seed), "--out", str(run), "--overwrite", "--quiet",
                       "--eval-every", "0", "--save-every", "0"]
                if tok:
                    cmd += ["--tokenizer", tok]
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
            tok = tok or str(final)
            out.append(final)
    return out


def features_of(d: Path) -> dict:
    recs = analyse(open_checkpoint(d), mode="exact")
    return {"records": recs, "mf": model_features(recs, Z_MOVED)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", nargs="*", default=[], help="labelled checkpoint dirs")
    ap.add_argument("--pretrain", action="store_true", help="train the labelled grid with muonft pretrain")
    ap.add_argument("--cache", default=str(ROOT / ".cache/muonft-calibration"))
    ap.add_argument("--dry-run", action="store_true", help="fit and report, but do not write the calibration")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dirs = [Path(d) for d in args.dirs]
    if args.pretrain:
        dirs += pretrain_grid(Path(args.cache)) + init_grid(Path(args.cache))
    rows = []
    for d in dirs:
        lab = _label(d)
        if lab is None:
            print(f"skip {d}: no label", file=sys.stderr)
            continue
        f = features_of(d)
        rows.append({"dir": _shown(d), "label": lab, **{k: f["mf"][k] for k in FEATURES}, "moved": f["mf"]["moved"],
                     "records": f["records"]})
        print(f"{lab:5s} sr {f['mf']['sr']:+.3f} ent {f['mf']['ent']:+.3f} moved {f['mf']['moved']:.2f}  {d}",
              flush=True)
    # checkpoints still indistinguishable from their init carry no signal: reported, not fitted on
    train = [r for r in rows if r["label"] in ("adam", "muon") and r["moved"] >= MIN_MOVED]
    undertrained = [r["dir"] for r in rows if r["label"] in ("adam", "muon") and r["moved"] < MIN_MOVED]
    if len({r["label"] for r in train}) < 2:
        sys.exit("need labelled checkpoints of both optimizers")
    X = torch.tensor([[r[k] for k in FEATURES] for r in train], dtype=torch.float64)
    y = torch.tensor([1.0 if r["label"] == "muon" else 0.0 for r in train], dtype=torch.float64)
    w, b = fit_logistic(X, y, L2)
    # leave-one-out: refit without each checkpoint, classify it with the full verdict logic
    loo = []
    for i, r in enumerate(train):
        keep = [j for j in range(len(train)) if j != i]
        wi, bi = fit_logistic(X[keep], y[keep], L2)
        cal = {"weights": wi, "bias": bi, "z_moved": Z_MOVED, "min_confidence": MIN_CONFIDENCE,
               "min_moved": MIN_MOVED}
        v = spectral_verdict(r["records"], cal)
        loo.append({"dir": r["dir"], "label": r["label"], "guess": v["optimizer_guess"], "confidence": v["confidence"],
                    "p_muon": v["p_muon"]})
    correct = sum(x["guess"] == x["label"] for x in loo)
    brier = sum((x["p_muon"] - (1.0 if x["label"] == "muon" else 0.0)) ** 2 for x in loo) / len(loo)
    cal_full = {"weights": w, "bias": b, "z_moved": Z_MOVED, "min_confidence": MIN_CONFIDENCE,
               "min_moved": MIN_MOVED}
    inits = [{"dir": r["dir"], "guess": spectral_verdict(r["records"], cal_full)["optimizer_guess"]}
             for r in rows if r["label"] == "init"]
    summary = {
        "weights": w, "bias": b, "features": list(FEATURES), "z_moved": Z_MOVED, "min_confidence": MIN_CONFIDENCE,
        "min_moved": MIN_MOVED, "l2": L2, "undertrained_excluded": undertrained,
        "produced_by": "bench/calibrate_diagnose.py " + " ".join(sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "n_train": len(train), "n_adam": int((y == 0).sum()), "n_muon": int((y == 1).sum()),
        "loo_accuracy": correct / len(loo), "loo_brier": brier,
        "loo_unknown": sum(x["guess"] == "unknown" for x in loo),
        "init_checkpoints": inits,
        "checkpoints": [{"dir": r["dir"], "label": r["label"], "sr": r["sr"], "ent": r["ent"], "moved": r["moved"]}
                        for r in rows],
        "loo": loo,
    }
    print(json.dumps({k: v for k, v in summary.items() if k not in ("checkpoints", "loo")}, indent=1))
    for x in loo:
        print(f"LOO {x['label']:5s} → {x['guess']:7s} conf {x['confidence']:.2f}  {x['dir']}")
    results = ROOT / "bench/results/diagnose_calibration.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=1))
    if not args.dry_run:
        CALIBRATION_FILE.write_text(json.dumps(
            {k: summary[k] for k in ("weights", "bias", "features", "z_moved", "min_confidence", "min_moved", "l2",
                                     "produced_by",
                                     "date", "n_train", "n_adam", "n_muon", "loo_accuracy", "loo_brier")},
            indent=1) + "\n")
        print(f"wrote {CALIBRATION_FILE}")


if __name__ == "__main__":
    main()

"""The verdict and recommendation of `muonft diagnose`: which optimizer pretrained this checkpoint, and how to
fine-tune it.

Spectral guess (paper §3 Fig. 2/10/11, App. F.1; Moonlight, "Muon is Scalable for LLM Training": Muon-trained
matrices keep higher stable rank and SVD entropy than Adam-trained ones; definitions in `docs/formulas.md`).
A raw threshold would confuse shapes, sizes and training lengths, and "high" alone also describes a random
matrix, so every feature is *relative to the random (Marchenko–Pastur) baseline of the same shape*
(`muonft_cli.spectral.random_baseline`):

- ``sr``  = log(stable rank / random stable rank)                  (0 for a random matrix, < 0 when spiky)
- ``ent`` = log(D / D_random), D = (1 − H)·log r the entropy deficit in nats (0 random, > 0 concentrated,
            < 0 flatter than random — Muon's orthogonal updates flatten spectra)

Features are averaged per layer type (q, k, v, o, gate/up/down or fc1/fc2, a fused ``qkv`` left whole, the
``mla_*`` projections of DeepSeek-style latent attention: `muonft_cli.spectral.HIDDEN_TYPES`; MoE routers,
embeddings and heads are not weighed) and then over types, so a model's many MLP (and expert) matrices don't
drown its attention matrices; a logistic model on those two averages gives
P(muon). Its weights are fitted by `bench/calibrate_diagnose.py` on labelled `muonft pretrain` checkpoints and
stored in `calibration.json` (with how they were produced and the leave-one-out accuracy).

Untrained and barely trained weights: a random init, and a model a few steps away from one, looks "Muon-like"
on stable rank and entropy alone (both near the random baseline), so it must not be called Muon. A matrix is
*near init* when |sr| and |ent| are within the calibration's margins (``near_init_sr``, ``near_init_ent``, or
``z_moved`` sd of Gaussian draws of its shape if wider); when at least ``near_init_share`` of the hidden matrices
are, or fewer than ``min_moved`` of them are further than ``z_moved`` sd from the baseline, the guess is
``unknown`` ("weights are still close to a random initialisation"). The margins were measured on short
``muonft pretrain`` runs (see ``bench/calibrate_diagnose.py``).

``confidence`` is the probability the model gives the printed guess (P(muon) for muon, 1 − P(muon) for adam)
and is None for ``unknown``; ``p_muon`` is the logistic model's raw output (None when the spectra carry no
signal).

Provenance (``muonft.json``, a Trainer's ``trainer_state.json``/``training_args.json``, known model families)
is reported separately; for a fine-tuned checkpoint it is the *pretraining* optimizer of its base (and, apart,
the fine-tuning one). The recommendation follows provenance when it is known, else the spectral guess; when
the two disagree the report says so (``spectra_disagree``, and a first reason in the recommendation).

Recommendation (paper §5, and the learning rates the paper selected for T5-base and Llama-2-7B): matched
pretrain/fine-tune optimizers → full fine-tuning is fine; mismatched or unknown → LoRA at rank 8–32 (high ranks
re-introduce the mismatch, §4.4), with learning-rate ranges interpolated in log-space between the paper's
T5-base (220 M) and Llama-2-7B anchors by parameter count.
"""

from __future__ import annotations

import json
import math
import shlex
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from muonft_cli._common import OPTIMIZER_NAMES, optimizer_family
from muonft_cli.errors import UserInputError
from muonft_cli.spectral import HIDDEN_TYPES

__all__ = [
    "FEATURES", "TARGET_OPTIMS", "check_target", "matrix_features", "model_features", "fit_logistic",
    "load_calibration", "spectral_verdict", "read_provenance", "recommend", "build_report", "lr_range",
]

FEATURES = ("sr", "ent")
TARGET_OPTIMS = OPTIMIZER_NAMES
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
_ROLES_FOR_VERDICT = ("weight", "merged")


def check_target(name: str) -> None:
    """Raise `UserInputError` unless ``name`` is an optimizer muonft can fine-tune with."""
    if name not in TARGET_OPTIMS:
        raise UserInputError(f"--target-optim {name!r} is not one of {', '.join(TARGET_OPTIMS)}")


# ---------------------------------------------------------------------------------------------- features


def matrix_features(rec: dict[str, Any]) -> dict[str, float] | None:
    """Features of one matrix record (from `muonft_cli.diagnose.analyse`), or None if it is not a hidden matrix.

    Returns:
        ``sr``, ``ent`` (see module docstring), and ``z`` = the larger |distance| from the random baseline in
        units of the random draws' standard deviation (inflated by the fast estimator's error bars).
    """
    if rec["layer_type"] not in HIDDEN_TYPES or rec.get("role", "weight") not in _ROLES_FOR_VERDICT:
        return None
    r = min(rec["shape"])
    if r < 8 or rec["stable_rank"] <= 0:
        return None
    logr = math.log(r)
    d = max((1.0 - rec["svd_entropy"]) * logr, 1e-6)
    d_rand = max((1.0 - rec["random_svd_entropy"]) * logr, 1e-6)
    sd_sr = math.hypot(rec["random_stable_rank_std"], rec["stable_rank"] * rec.get("stable_rank_rel_err", 0.0))
    sd_ent = math.hypot(rec["random_svd_entropy_std"], rec.get("svd_entropy_err", 0.0))
    z_sr = abs(rec["stable_rank"] - rec["random_stable_rank"]) / max(sd_sr, 1e-12)
    z_ent = abs(rec["svd_entropy"] - rec["random_svd_entropy"]) / max(sd_ent, 1e-12)
    return {
        "sr": math.log(rec["stable_rank"] / rec["random_stable_rank"]),
        "ent": math.log(d / d_rand),
        "z": max(z_sr, z_ent),
        # the features' own noise (one sd of Gaussian draws of this shape, in feature units), for `near_init`
        "sd_sr": sd_sr / rec["random_stable_rank"],
        "sd_ent": sd_ent * logr / d_rand,
    }


def near_init(f: dict[str, float], margin_sr: float, margin_ent: float, z: float) -> bool:
    """Whether a matrix's features are still within a margin of the random baseline: ``|sr| ≤ max(margin_sr,
    z·sd)`` and ``|ent| ≤ max(margin_ent, z·sd)`` (sd: the spread of Gaussian draws of its shape, so small
    matrices, whose random spectra vary more, get a wider margin)."""
    return (abs(f["sr"]) <= max(margin_sr, z * f["sd_sr"])
            and abs(f["ent"]) <= max(margin_ent, z * f["sd_ent"]))


def model_features(records: list[dict[str, Any]], z_moved: float,
                   near: tuple[float, float] = (0.0, 0.0)) -> dict[str, Any]:
    """Per-layer-type means of the features, their type-balanced average, the fraction of moved matrices
    (``moved``: beyond ``z_moved`` sd of the random baseline) and the fraction still near it (``near_init``:
    within the ``near`` = (margin_sr, margin_ent) margins of `near_init`)."""
    per_type: dict[str, list[dict[str, float]]] = defaultdict(list)
    for rec in records:
        f = matrix_features(rec)
        if f is not None:
            per_type[rec["layer_type"]].append(f)
    types = {
        t: {k: sum(f[k] for f in fs) / len(fs) for k in FEATURES} | {
            "count": len(fs), "moved": sum(f["z"] > z_moved for f in fs) / len(fs),
            "near_init": sum(near_init(f, near[0], near[1], z_moved) for f in fs) / len(fs)}
        for t, fs in per_type.items()
    }
    n = sum(len(fs) for fs in per_type.values())
    if not types:
        return {"types": {}, "n_hidden": 0, "moved": 0.0, "near_init": 0.0, **{k: 0.0 for k in FEATURES}}
    avg = {k: sum(d[k] for d in types.values()) / len(types) for k in FEATURES}
    moved = sum(d["moved"] * d["count"] for d in types.values()) / n
    near_share = sum(d["near_init"] * d["count"] for d in types.values()) / n
    return {"types": types, "n_hidden": n, "moved": moved, "near_init": near_share, **avg}


# ------------------------------------------------------------------------------------------- classifier


def fit_logistic(X: torch.Tensor, y: torch.Tensor, l2: float = 1.0, iters: int = 50) -> tuple[list[float], float]:
    """L2-regularised logistic regression by Newton's method (the bias is not penalised).

    Args:
        X: (N, F) features; y: (N,) labels in {0, 1}; l2: penalty on the weights (keeps probabilities finite
            when the classes separate, which is what makes the confidence calibrated rather than 0/1).

    Returns:
        (weights, bias) such that P(y=1 | x) = sigmoid(x·w + b).
    """
    X = X.to(torch.float64)
    y = y.to(torch.float64)
    N, F = X.shape
    Xb = torch.cat([X, torch.ones(N, 1, dtype=torch.float64)], 1)  # (N, F+1)
    w = torch.zeros(F + 1, dtype=torch.float64)
    reg = torch.full((F + 1,), float(l2), dtype=torch.float64)
    reg[-1] = 1e-8
    for _ in range(iters):
        p = torch.sigmoid(Xb @ w)
        g = Xb.T @ (p - y) + reg * w
        H = Xb.T @ (Xb * (p * (1 - p))[:, None]) + torch.diag(reg)
        step = torch.linalg.solve(H, g)
        w = w - step
        if float(step.abs().max()) < 1e-10:
            break
    return [float(v) for v in w[:-1]], float(w[-1])


def load_calibration(path: str | Path | None = None) -> dict[str, Any]:
    """The fitted verdict parameters (see `bench/calibrate_diagnose.py`, which writes them)."""
    p = Path(path) if path is not None else CALIBRATION_FILE
    return json.loads(p.read_text())


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0


NEAR_INIT_REASON = "weights are still close to a random initialisation"


def spectral_verdict(records: list[dict[str, Any]], calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spectral guess from matrix records alone (no provenance).

    ``unknown`` when there is nothing to judge, when most hidden matrices are still near a random init (their
    features within the calibration's ``near_init_sr`` / ``near_init_ent`` margins of the random baseline for
    at least ``near_init_share`` of them, or fewer than ``min_moved`` beyond ``z_moved`` sd of it: a barely
    trained model, whatever its optimizer, looks "Muon-like"), or when P(muon) is within ``min_confidence``
    of a coin flip.

    Returns:
        ``optimizer_guess`` (adam | muon | unknown); ``confidence``: the model's probability of that guess
        (P(muon) for muon, 1 − P(muon) for adam), None for unknown; ``p_muon`` (the logistic model's P(muon),
        None when the spectra carry no signal: nothing to judge or still near init); ``unknown_reason`` (None
        unless unknown); ``evidence`` (list of str); ``features`` (model-level); ``layer_leans`` (per type:
        adam-like | muon-like | neutral | near init).
    """
    cal = calibration or load_calibration()
    w, b = cal["weights"], cal["bias"]
    z_moved, c_min, min_moved = cal["z_moved"], cal["min_confidence"], cal["min_moved"]
    near = (cal.get("near_init_sr", 0.0), cal.get("near_init_ent", 0.0))
    near_share = cal.get("near_init_share", 1.01)  # an old calibration file: this test is off
    mf = model_features(records, z_moved, near)
    evidence: list[str] = []
    leans: dict[str, str] = {}
    if mf["n_hidden"] == 0:
        why = "no hidden (attention/MLP) matrices of at least 8×8 to judge from"
        return {"optimizer_guess": "unknown", "confidence": None, "p_muon": None, "unknown_reason": why,
                "features": mf, "layer_leans": leans, "evidence": [why]}
    for t in [t for t in HIDDEN_TYPES if t in mf["types"]]:
        d = mf["types"][t]
        logit_t = sum(wi * d[k] for wi, k in zip(w, FEATURES)) + b
        pt = _sigmoid(logit_t)
        leans[t] = "muon-like" if pt > 0.6 else "adam-like" if pt < 0.4 else "neutral"
        if d["near_init"] >= near_share:
            leans[t] = "near init"
        evidence.append(
            f"{t} ({d['count']}): stable rank ×{math.exp(d['sr']):.2f} of random, entropy deficit "
            f"×{math.exp(d['ent']):.2f} of random → {leans[t]}"
            + ("" if leans[t] == "near init" else f" (P(muon) {pt:.2f})"))
    logit = sum(wi * mf[k] for wi, k in zip(w, FEATURES)) + b
    p: float | None = _sigmoid(logit)
    conf: float | None
    reason: str | None = None
    if mf["moved"] < min_moved or mf["near_init"] >= near_share:
        guess, conf, reason = "unknown", None, NEAR_INIT_REASON
        if mf["near_init"] >= near_share:
            evidence.insert(0, f"{mf['near_init']:.0%} of {mf['n_hidden']} hidden matrices have stable rank and "
                               f"entropy within ±{near[0]:g} / ±{near[1]:g} (log-ratio) of a random matrix of "
                               f"their shape: {reason} (barely trained, or never trained); the spectra cannot "
                               "tell its optimizer")
        else:
            evidence.insert(0, f"{1 - mf['moved']:.0%} of {mf['n_hidden']} hidden matrices are indistinguishable "
                               f"from a random (untrained) matrix of their shape (|z| ≤ {z_moved:g}): {reason}")
        p = None  # the logistic model was fitted on trained checkpoints: its P(muon) means nothing here
    else:
        c = max(p, 1 - p)
        if c < c_min:
            guess, conf = "unknown", None
            reason = f"the evidence is weak: P(muon) = {p:.2f}, below the {c_min:.2f} needed for a guess"
            evidence.insert(0, reason)
        else:
            guess, conf = ("muon", p) if p >= 0.5 else ("adam", 1 - p)
        evidence.insert(0, f"all hidden matrices: stable rank ×{math.exp(mf['sr']):.2f} and entropy deficit "
                           f"×{math.exp(mf['ent']):.2f} of the random baseline (type-balanced) → P(muon) = {p:.2f}")
    return {"optimizer_guess": guess, "confidence": None if conf is None else round(conf, 4),
            "p_muon": None if p is None else round(p, 4), "unknown_reason": reason, "features": mf,
            "layer_leans": leans, "evidence": evidence}


# ------------------------------------------------------------------------------------------- provenance

# Known model families with a documented pretraining optimizer (published model cards / papers).
_KNOWN_FAMILIES = [
    ("moonlight", "muon", "Moonlight (Moonshot AI) was pretrained with Muon (Liu et al. 2025)"),
    ("kimi-k2", "muon", "Kimi K2 was pretrained with MuonClip"),
    ("kimi k2", "muon", "Kimi K2 was pretrained with MuonClip"),
    ("glm-4.5", "muon", "GLM-4.5 was pretrained with Muon"),
    ("smollm", "adam", "SmolLM/SmolLM2 (Hugging Face) were pretrained with AdamW"),
    ("llama", "adam", "Llama models (Meta) were pretrained with AdamW"),
    ("mistral", "adam", "Mistral models were pretrained with AdamW"),
    ("qwen", "adam", "Qwen models were pretrained with AdamW"),
    ("gemma", "adam", "Gemma models were pretrained with Adam-family optimizers"),
    ("gpt2", "adam", "GPT-2 was pretrained with Adam"),
    ("minilm", "adam", "MiniLM / all-MiniLM (Microsoft, sentence-transformers) were trained with AdamW"),
    ("bert", "adam", "BERT was pretrained with Adam"),
    ("t5", "adam", "T5 was pretrained with Adafactor (an Adam-family adaptive optimizer)"),
]


def _muonft_pretrain_optimizer(mj: dict[str, Any], base_mj: Any) -> str | None:
    """The pretraining optimizer a fine-tuned checkpoint's muonft.json records (``pretrain_optimizer``), else
    the one its base's muonft.json records (older files), else None (unknown)."""
    if mj.get("pretrain_optimizer"):
        return str(mj["pretrain_optimizer"])
    if "pretrain_optimizer" not in mj and isinstance(base_mj, dict):
        if base_mj.get("pretrain_optimizer"):
            return str(base_mj["pretrain_optimizer"])
        if base_mj.get("mode") == "pretrain" and base_mj.get("optimizer"):
            return str(base_mj["optimizer"])
    return None


def read_provenance(provenance_files: dict[str, Any], path: str) -> dict[str, Any]:
    """Ground truth about the pretraining optimizer, if the checkpoint carries any.

    A muonft.json of a fine-tune records how it was fine-tuned (``finetune_optimizer``, or ``optimizer`` in
    older files) apart from how its base was pretrained (``pretrain_optimizer``; missing or None = unknown, then
    the base's own muonft.json, then the other sources are asked). Only the pretraining one is the verdict's.

    Returns:
        ``{"optimizer", "family", "source", "finetune_optimizer", "evidence": [...]}``; ``optimizer`` / ``family``
        (the pretraining optimizer) and ``finetune_optimizer`` are None if unknown.
    """
    ev: list[str] = []
    names: list[str] = [Path(path).name]
    finetuned: str | None = None
    mj = provenance_files.get("muonft.json")
    if isinstance(mj, dict) and (mj.get("optimizer") or mj.get("pretrain_optimizer")):
        mode = mj.get("mode", "run")
        if mode == "finetune":
            finetuned = mj.get("finetune_optimizer") or mj.get("optimizer")
            how = "LoRA" if mj.get("lora") else "full fine-tuning"
            ev.append(f"muonft.json: fine-tuned from {mj.get('base_model')} with {finetuned} ({how})")
            names.append(str(mj.get("base_model") or ""))
            pre = _muonft_pretrain_optimizer(mj, provenance_files.get("base muonft.json"))
            if pre:
                src = "muonft.json" if mj.get("pretrain_optimizer") else "base's muonft.json"
                ev.append(f"{src}: the base was pretrained with {pre}")
                return {"optimizer": pre, "family": optimizer_family(pre), "source": "muonft.json",
                        "finetune_optimizer": finetuned, "evidence": ev}
            ev.append("muonft.json: the base's pretraining optimizer is not recorded")
        else:
            opt = mj.get("pretrain_optimizer") or mj["optimizer"]
            ev.append(f"muonft.json: {mode} with {opt}, lr {mj.get('lr')}, {mj.get('steps')} steps")
            return {"optimizer": opt, "family": optimizer_family(opt), "source": "muonft.json",
                    "finetune_optimizer": None, "evidence": ev}
    ta = provenance_files.get("training_args")
    if isinstance(ta, dict) and ta.get("optim"):
        ev.append(f"training_args.json: optim={ta['optim']}")
        return {"optimizer": ta["optim"], "family": optimizer_family(ta["optim"]), "source": "training_args.json",
                "finetune_optimizer": finetuned, "evidence": ev}
    cfg = provenance_files.get("config.json") or {}
    # names only: an architecture (model_type "llama") says nothing about who trained the weights, or how
    names.append(str(cfg.get("_name_or_path") or ""))
    gg = provenance_files.get("gguf") or {}
    names += [str(gg.get(k) or "") for k in ("general.name", "general.basename")]
    ad = provenance_files.get("adapter_config.json") or {}
    names.append(str(ad.get("base_model_name_or_path") or ""))
    hay = " ".join(names).lower()
    for key, fam, why in _KNOWN_FAMILIES:
        if key in hay:
            ev.append(f"known family: {why}")
            return {"optimizer": "adamw" if fam == "adam" else "muon", "family": fam, "source": "known family",
                    "finetune_optimizer": finetuned, "evidence": ev}
    if isinstance(provenance_files.get("trainer_state.json"), dict):
        ev.append("trainer_state.json present (a transformers Trainer run, AdamW unless training_args says "
                  "otherwise) — not used as ground truth")
    return {"optimizer": None, "family": None, "source": None, "finetune_optimizer": finetuned, "evidence": ev}


# ------------------------------------------------------------------------------------------ recommendation

# Learning-rate anchors from the learning rates the paper selected for its T5-base and Llama-2-7B runs:
# (method, optimizer family) → {params: (lo, hi)}. T5-base ≈ 220 M parameters, Llama-2-7B ≈ 6.7 B.
_LR_ANCHORS: dict[tuple[str, str], dict[float, tuple[float, float]]] = {
    ("full", "adam"): {2.2e8: (5e-5, 1e-4), 6.7e9: (8e-6, 1e-5)},
    ("full", "muon"): {2.2e8: (1e-4, 5e-4), 6.7e9: (2e-5, 5e-5)},
    ("lora", "adam"): {2.2e8: (5e-4, 2e-3), 6.7e9: (2e-4, 5e-4)},
    ("lora", "muon"): {2.2e8: (5e-4, 2e-3), 6.7e9: (1e-4, 5e-4)},
}
# Beyond the anchors, extrapolate at most one anchor span (×30 in size) on either side: no paper LR exists for
# models below 220 M or above 7 B, and LRs stop scaling with size for tiny models.
_MAX_EXTRAPOLATION = 1.0


def lr_range(method: str, family: str, n_params: int | None) -> tuple[float, float]:
    """LR range for (full|lora, adam|muon) at a model size, log-interpolated between the paper's anchors.

    Unknown size → the union of both anchors' ranges.
    """
    anchors = _LR_ANCHORS[(method, family)]
    (s0, (lo0, hi0)), (s1, (lo1, hi1)) = sorted(anchors.items())
    if n_params is None:
        return min(lo0, lo1), max(hi0, hi1)
    t = (math.log(n_params) - math.log(s0)) / (math.log(s1) - math.log(s0))
    t = min(max(t, -_MAX_EXTRAPOLATION), 1.0 + _MAX_EXTRAPOLATION)
    lo = math.exp(math.log(lo0) + t * (math.log(lo1) - math.log(lo0)))
    hi = math.exp(math.log(hi0) + t * (math.log(hi1) - math.log(hi0)))
    return float(f"{lo:.1g}"), float(f"{hi:.1g}")


def _lr_grid(lo: float, hi: float, n: int = 4) -> list[float]:
    if n == 1 or hi <= lo:
        return [lo]
    return [float(f"{math.exp(math.log(lo) + i * (math.log(hi) - math.log(lo)) / (n - 1)):.1g}") for i in range(n)]


def _sweep_command(model: str, data: str, rec: dict[str, Any]) -> str | None:
    """The ``muonft sweep …`` line beside the finetune command: the sweep that settles the recommendation's LR
    (and method), built by `muonft_cli.sweep.diagnose_sweep_command`, which owns the sweep's options."""
    from muonft_cli.sweep import diagnose_sweep_command

    return diagnose_sweep_command(model, data, rec)


def recommend(
    pretrain_family: str | None,
    target_optim: str,
    n_params: int | None,
    model: str | None,
    data: str,
    *,
    source: str,
) -> dict[str, Any]:
    """How to fine-tune a model pretrained with ``pretrain_family`` using ``target_optim`` (paper §5).

    Args:
        pretrain_family: adam | muon | None (unknown).
        target_optim: muonft optimizer name for fine-tuning.
        n_params: model size (parameters in its matrices) for LR scaling, or None.
        model, data: put into the ready ``muonft finetune`` command (``model`` None: no model to fine-tune is
            known, e.g. an adapter whose base was not found; ``command`` and ``sweep_command`` are then None).
        source: where ``pretrain_family`` came from (for the reasons).
    """
    check_target(target_optim)
    tfam = "adam" if target_optim == "adamw" else "muon"
    reasons: list[str] = []
    size = f"{n_params / 1e6:.1f} M" if n_params else "unknown size"
    if pretrain_family is None:
        method, rank = "lora", [8, 32]
        reasons.append("the pretraining optimizer is unknown: LoRA at moderate rank is robust to a mismatch "
                       "(paper Table 1: LoRA narrows the gap to +0.002–0.014 PPL), and sweep the LR (Fig. 4)")
    elif pretrain_family != tfam:
        method, rank = "lora", [8, 32]
        reasons.append(f"mismatch: {pretrain_family}-pretrained ({source}) fine-tuned with {target_optim}. Full "
                       "fine-tuning under a mismatch loses to the matched optimizer (paper Table 1, +0.009–0.023 "
                       "PPL, best LR shifts lower, Fig. 4); LoRA closes most of the gap")
        reasons.append("keep the rank moderate (8–32): higher ranks re-introduce the mismatch (§3.1 theory, "
                       "§4.4 rank study: best LR falls as rank grows)")
    else:
        method, rank = "full", None
        reasons.append(f"matched: {pretrain_family}-pretrained ({source}) and fine-tuned with {target_optim}; "
                       "full fine-tuning is fine (LoRA at rank 8–64 also works and halves memory)")
    lo, hi = lr_range(method, tfam, n_params)
    reasons.append(f"LR range for {'LoRA' if method == 'lora' else 'full'}-{target_optim} at {size}: "
                   f"log-interpolated between the paper's selected LRs for T5-base and Llama-2-7B")
    if tfam == "muon":
        reasons.append("tune Muon's LR separately from Adam's; under LoRA Muon is a drop-in with half the "
                       "optimizer state (§5)")
    lr_mid = float(f"{math.sqrt(lo * hi):.1g}")
    cmd = ["muonft", "finetune", "--model", str(model), "--data", data, "--optim", target_optim]
    if method == "lora":
        cmd += ["--lora-rank", "16"]  # the middle of the recommended 8–32
    # the same fine-tuning with `--optim auto`: the optimizer (and, with no --lr, the LR) decided from the base
    auto_cmd = ["muonft", "finetune", "--model", str(model), "--data", data, "--optim", "auto"] \
        + (["--lora-rank", "16"] if method == "lora" else []) + ["--out", "runs/ft-auto"]
    cmd += ["--lr", f"{lr_mid:g}", "--out", f"runs/ft-{target_optim}"]
    if model is None:
        reasons.append("no command: the base model this adapter was trained on was not found; pass --base PATH "
                       "for the command that fine-tunes it")
    rec: dict[str, Any] = {
        "method": method,
        "lora_rank": rank,
        "lr": {"min": lo, "max": hi},
        "lr_grid": _lr_grid(lo, hi),
        "target_optim": target_optim,
        "pretrain_optimizer": pretrain_family or "unknown",
        "reasons": reasons,
        "command": shlex.join(cmd) if model is not None else None,
        "auto_command": shlex.join(auto_cmd) if model is not None else None,
    }
    rec["sweep_command"] = _sweep_command(model, data, rec) if model is not None else None
    return rec


# ---------------------------------------------------------------------------------------------- report


def _layer_table(records: list[dict[str, Any]], leans: dict[str, str]) -> dict[str, dict[str, Any]]:
    acc: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        key = r["layer_type"] if r.get("role", "weight") == "weight" else f"{r['layer_type']}:{r['role']}"
        acc[key].append(r)
    out = {}
    for key, rs in acc.items():
        n = len(rs)
        mean = lambda k: sum(x[k] for x in rs) / n  # noqa: E731
        out[key] = {
            "count": n,
            "stable_rank": mean("stable_rank"),
            "stable_rank_ratio": mean("stable_rank_ratio"),
            "svd_entropy": mean("svd_entropy"),
            "random_stable_rank_ratio": mean("random_stable_rank_ratio"),
            "random_svd_entropy": mean("random_svd_entropy"),
            "spectral_norm": mean("spectral_norm"),
            "lean": leans.get(key, ""),
        }
    return out


def _base_said(ck: Any) -> str:
    src = getattr(ck, "base_source", None) or "--base"
    return "given with --base" if src == "--base" else f"from the adapter's {src}"


def _hub_base(ck: Any) -> str | None:
    """A base that an adapter names as a hub id (diagnose does not download it, but `muonft finetune` can)."""
    mj = ck.provenance.get("muonft.json") or {}
    ad = ck.provenance.get("adapter_config.json") or {}
    spec = (mj.get("base_model") if isinstance(mj, dict) else None) or \
        (ad.get("base_model_name_or_path") if isinstance(ad, dict) else None)
    note = getattr(ck, "base_note", None) or ""
    return str(spec) if spec and "is a hub id" in note else None


def build_report(ck: Any, records: list[dict[str, Any]], *, mode: str, target_optim: str, data: str) -> dict:
    """Assemble the ``--json`` document from an opened checkpoint and its matrix records."""
    verdict_records = records
    verdict_on = ck.path
    if ck.kind == "adapter":
        merged = [r for r in records if r["role"] == "merged"]
        verdict_records = merged
    if ck.kind == "adapter" and not verdict_records:
        why = ("adapter only: the pretraining verdict needs the base model's weights; "
               + (getattr(ck, "base_note", None) or "pass --base PATH"))
        spectral = {"optimizer_guess": "unknown", "confidence": None, "p_muon": None, "unknown_reason": why,
                    "features": {}, "layer_leans": {}, "evidence": [why]}
    else:
        spectral = spectral_verdict(verdict_records)
    evidence = list(spectral["evidence"])
    experts = getattr(ck, "experts", None)
    if experts:
        evidence.append(_experts_line(experts))
    evidence += [f"layout: {n}" for n in getattr(ck, "notes", [])]
    if ck.kind == "adapter" and ck.base is not None:
        evidence.insert(0, f"base: {ck.base.path} ({_base_said(ck)})")
    prov_files = dict(ck.provenance)
    if ck.kind == "adapter" and ck.base is not None:
        prov_files = dict(ck.base.provenance) | {"adapter_config.json": ck.provenance.get("adapter_config.json")}
        verdict_on = ck.base.path
    prov = read_provenance(prov_files, verdict_on)
    if ck.kind == "adapter" and prov["finetune_optimizer"] is None:
        amj = ck.provenance.get("muonft.json")  # the adapter's own: how it was fine-tuned
        if isinstance(amj, dict) and amj.get("mode") == "finetune":
            prov["finetune_optimizer"] = amj.get("finetune_optimizer") or amj.get("optimizer")
    for line in prov["evidence"]:
        evidence.append(f"provenance: {line}")
    disagree = bool(prov["family"] and spectral["optimizer_guess"] != "unknown"
                    and prov["family"] != spectral["optimizer_guess"])
    if prov["family"] and spectral["optimizer_guess"] != "unknown":
        evidence.append(f"provenance says {prov['family']}: the spectral guess {'DISAGREES' if disagree else 'agrees'}")
    if ck.kind == "adapter":
        ab = [r for r in records if r["role"] in ("lora_A", "lora_B", "lora_delta")]
        deltas = [r for r in ab if r["role"] == "lora_delta"]
        if deltas:
            sr = sum(r["stable_rank"] for r in deltas) / len(deltas)
            evidence.append(f"adapter: mean stable rank of the LoRA updates B·A is {sr:.2f} (paper F.2 at r=8: "
                            "~6–7 for LoRA-Muon, ~3–5 for LoRA-Adam)")
    # the base's size for LR scaling: parameters in its matrices
    size_src = ck.base if (ck.kind == "adapter" and ck.base is not None) else (None if ck.kind == "adapter" else ck)
    n_params = sum(s.shape[0] * s.shape[1] for s in [*size_src.matrices, *getattr(size_src, "not_sampled", [])]
                   if s.role in ("weight", "merged")) if size_src is not None else None  # experts not sampled too
    if prov["family"]:
        family, source = prov["family"], prov["source"]
    elif spectral["optimizer_guess"] != "unknown":
        family, source = spectral["optimizer_guess"], f"spectral guess, confidence {spectral['confidence']:.2f}"
    else:
        family, source = None, "unknown"
    # the command fine-tunes the model the verdict is about: for an adapter its base (finetune refuses
    # --lora-rank on an adapter); with no base found, a hub id the adapter names still works, else no command
    model_for_cmd: str | None = verdict_on
    if ck.kind == "adapter" and ck.base is None:
        model_for_cmd = _hub_base(ck)
    rec = recommend(family, target_optim, n_params, model_for_cmd, data, source=source)
    if disagree:
        rec["reasons"].insert(0, f"the spectra disagree with provenance: they look {spectral['optimizer_guess']}-"
                                 f"pretrained (confidence {spectral['confidence']:.2f}), {prov['source']} says "
                                 f"{prov['optimizer']} ({prov['family']}); the recommendation follows provenance "
                                 "(spectra of short or unusual training runs can mislead)")
    rec["spectra_disagree"] = disagree
    return {
        "path": ck.path,
        "kind": ck.kind,
        "base": ck.base.path if ck.base is not None else None,
        "base_source": getattr(ck, "base_source", None) if ck.base is not None else None,
        "base_note": getattr(ck, "base_note", None) if ck.kind == "adapter" and ck.base is None else None,
        "n_matrices": len(records),
        "n_params": n_params,
        "mode": mode,
        "methods": sorted({r["method"] for r in records}),
        "optimizer_guess": spectral["optimizer_guess"],
        "confidence": spectral["confidence"],
        "p_muon": spectral["p_muon"],
        "unknown_reason": spectral["unknown_reason"],
        "spectra_disagree": disagree,
        "evidence": evidence,
        "features": {k: spectral["features"].get(k) for k in ("sr", "ent", "moved", "near_init", "n_hidden")},
        "provenance": {k: prov[k] for k in ("optimizer", "family", "source", "finetune_optimizer")},
        "layer_types": _layer_table(records, spectral["layer_leans"]),
        "skipped": list(ck.skipped),
        "excluded": list(getattr(ck, "excluded", [])),
        "experts": experts,
        "coverage": _coverage(ck, records),
        "recommendation": rec,
    }


def _experts_line(e: dict[str, Any]) -> str:
    """One evidence line saying how many MoE experts were analysed."""
    which = f" (experts {', '.join(map(str, e['experts']))})" if e.get("experts") else ""
    layers = f"{e['moe_layers']} MoE layer{'s' if e['moe_layers'] != 1 else ''}"
    if e["not_analysed"] == 0:
        return (f"MoE: all {e['experts_per_layer']} experts of each of {layers} analysed "
                f"({e['expert_matrices']} expert matrices)")
    return (f"MoE: {e['sample_experts']} of {e['experts_per_layer']} experts per layer analysed{which} in "
            f"{layers}: {e['analysed']} of {e['expert_matrices']} expert matrices (--sample-experts N; 0 = all)")


def _coverage(ck: Any, records: list[dict[str, Any]]) -> dict[str, int] | None:
    """Where every ≥2-D tensor of the checkpoint went: ``analysed`` (at least one matrix read from it),
    ``not_sampled`` (only MoE experts left out by sampling), ``excluded`` (with a reason, in ``excluded``);
    they add up to ``tensors``. None for an adapter (its matrices are pairs and products, not tensors)."""
    if ck.kind == "adapter" or not getattr(ck, "n_tensors", 0):
        return None
    read = {s.source for s in ck.matrices}
    left = {s.source for s in getattr(ck, "not_sampled", [])} - read
    return {"tensors": ck.n_tensors, "analysed": len(read), "not_sampled": len(left),
            "excluded": len(getattr(ck, "excluded", [])), "matrices": len(records)}

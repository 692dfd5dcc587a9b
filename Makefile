# Set-up is two commands on a machine with Python >= 3.10 and pip: `make train` and `make test`.
# Each creates .venv and installs what it needs on first use.
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# GPT-2's BPE (r50k_base), the default reference tokenizer: taken from openai-whisper's source distribution
GPT2_BPE := $(VENV)/share/vlm/reference_tokenizers/gpt2.tiktoken
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: help install train test test-all lint format clean ocr gpu-check

help: ## show this help
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) $(GPT2_BPE) ## create .venv, install the package with its dev tools and GPT-2's BPE file

$(GPT2_BPE): | $(STAMP)
	$(PY) -m vlm.app.text_accounting install gpt2

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

train: install ## train the built-in default on rendered text, then evaluate it (CPU is fine)
	$(PY) train.py $(ARGS)

test: install ## ruff, then the default test suite (CPU, no network; slow tests left out)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(ARGS)

test-all: install ## every test, the slow ones too (pytest -m slow alone: only those)
	$(PY) -m pytest -m "slow or not slow" $(ARGS)

ocr: install ## the OCR engines of the baseline arm (python -m vlm.app.ocr_engines)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[ocr]"
	@command -v tesseract >/dev/null || echo "Tesseract is a system package: apt-get install tesseract-ocr"

lint: install ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install ## apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean: ## remove run outputs, caches and generated data (keeps .venv)
	rm -rf logs outputs multirun .pytest_cache .ruff_cache
	find data -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

gpu-check: install ## on a CUDA machine: bf16 steps at official sizes (MFU, packed vs unpacked), generation, FSDP smoke -> docs/benchmarks.md
	$(PY) -m vlm.app.bench gpu --out docs/benchmarks.md

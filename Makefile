# Everything runs from this checkout inside a local virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first: an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet ".[test]" $(TORCH)
	rm -rf build *.egg-info
	touch $(STAMP)

DEMO := outputs/demo

demo: setup $(DEMO)/models/flux-kontext/model_index.json $(DEMO)/data/metadata.jsonl
	rm -rf $(DEMO)/kontext
	$(PY) train_kontext_lora.py --config configs/kontext_tiny.yaml
	@echo
	@echo "LoRA:        $(DEMO)/kontext/pytorch_lora_weights.safetensors"
	@echo "metrics:     $(DEMO)/kontext/metrics.jsonl"
	@echo "validation:  $(DEMO)/kontext/validation/"
	@echo "checkpoints: $(DEMO)/kontext/checkpoint-*/"

$(DEMO)/models/flux-kontext/model_index.json: | setup
	$(PY) scripts/make_tiny_models.py --out $(DEMO)/models

$(DEMO)/data/metadata.jsonl: | setup
	$(PY) scripts/make_synthetic_data.py --family kontext --out $(DEMO)/data --n 8 --resolution 128

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

test: lint
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/kontext_step.py
	$(PY) benchmarks/inpaint_step.py
	$(PY) benchmarks/grpo_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

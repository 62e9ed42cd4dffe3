# facelab: `make test` sets up .venv from scratch and runs the fast suite; `make demo` runs every method.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel by default; on a CUDA machine e.g. `make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUN := WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo zoo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/python -m ruff check .

demo: $(STAMP)
	$(RUN) experiments/demo/run.py

zoo: $(STAMP)
	$(RUN) experiments/zoo/train_zoo.py

bench: $(STAMP)
	$(RUN) experiments/bench/sampling_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

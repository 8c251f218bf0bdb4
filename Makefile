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
	$(BIN)/pip install -q --no-deps --upgrade --target $(VENV)/reference-packages -r reference-packages.txt

# Main job: the CPU demo on its embedded default.
demo: venv
	$(BIN)/jaxsd demo --out demo_out

# Test suite (default: excludes @slow), on two pytest-xdist workers: XLA compiles mostly on one
# core, so two workers keep both busy. --dist loadfile keeps each file's module fixtures (a shared
# tiny run, a compiled step) on one worker. Extra pytest args: make test ARGS="-k unet".
XDIST := -n 2 --dist loadfile
test: venv-test
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

test-all: venv-test
	$(BIN)/python -m pytest $(XDIST) -m "" $(ARGS)

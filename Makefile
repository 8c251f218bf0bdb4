# The README's two commands. Each builds (or reuses) .venv from pyproject.toml.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-all venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q -e '.[torch,dev]'

# Main job: the CPU demo on its embedded default.
demo: venv
	$(BIN)/jaxsd demo --out demo_out

# Test suite (default: excludes @slow). Extra pytest args: make test ARGS="-k unet".
test: venv
	$(BIN)/python -m pytest $(ARGS)

test-all: venv
	$(BIN)/python -m pytest -m "" $(ARGS)

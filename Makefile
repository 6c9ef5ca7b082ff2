# Two commands on a fresh machine: `make demo` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow clean

install: $(STAMP)

# Rebuilt only when the project's requirements change, so a second `make` is fast.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: a CPU build that satisfies the extras' range, so nothing pulls a CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[edge,aggregator,sim,dev]"
	touch $(STAMP)

demo: install
	$(BIN)/fl-sim --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs

